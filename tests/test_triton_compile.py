"""Compile check of every Triton kernel for the GPU target (sm_90), without a GPU.

The CPU suite runs the kernels through the Triton interpreter, which accepts programs the real
compiler rejects (``tl.dot`` tiles under 16, unsupported casts, ...). Here subprocesses without
``TRITON_INTERPRET`` call each launcher with CPU tensors while ``JITFunction.run`` only records the
launch; every distinct recorded (kernel, argument types, constexprs) is then compiled to a cubin
for ``GPUTarget("cuda", 90, 32)`` with Triton's own ptxas (the distinct launches are shared out
over one subprocess per core). Nothing runs on a device.

The launches cover every branch the dispatch can take, and the test checks that they do: every
block size the launchers pick (16, 32, 64), both grids of the contrastive kernels (one program per
problem, row-parallel), both dot precisions (IEEE, TF32), every loss id (and both WBCE log-eps
forms), and every dtype each op's dispatch accepts (contrastive fp32 / bf16 / fp16; blend and
trajectory also fp64). The default test compiles a covering set (each of those at least once, the
loss ids on both grids); the ``slow`` one compiles their full product.

Both supported Triton releases run it: 3.8 (the development set) and 3.6.0 (the GPU machine's
image, ``.ci/gpu_image_rehearsal.sh``), where the cwcl loss kernels failed in
``TritonGPUOptimizeThreadLocality`` until the second sweep summed its own row mass
(``kernels/contrastive.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from repblend_fast.ops import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    r"""
    import hashlib, json, sys
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    mode, worker, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record

    from repblend_fast.kernels import blend as kb, contrastive as kc, trajectory as kt

    g = torch.Generator().manual_seed(0)
    CASES = [(name, eps) for name in kc.LOSS_IDS
             for eps in ((1e-6, 0.0) if name == "wbce" else (1e-6,))]
    F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64

    def contrastive(dtype, K, B, D, losses, rows, tf32=False):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        img = torch.randn(K, B, D, generator=g).to(dtype)
        txt = torch.randn(K, B, D, generator=g).to(dtype)
        tgt = torch.rand(K, B, B, generator=g).to(dtype)
        scale = torch.full((K,), 14.0)
        for loss, eps in losses:
            saved = kc.forward(img, txt, tgt, scale, loss, eps, row_parallel=rows)
            kc.backward(torch.ones(K), img, txt, tgt, scale, *saved[1:], loss, eps,
                        row_parallel=rows)
        torch.backends.cuda.matmul.allow_tf32 = False

    # (K, B, D): B picks the block size (B <= 16: 16, <= 32: 32, else 64), D the D-chunk;
    # row-parallel is what the dispatch picks from B = 128 on, so only with 64-row blocks.
    SERIAL = {16: (2, 12, 40), 32: (2, 20, 2304), 64: (1, 100, 64)}
    ROWS = (1, 130, 64)
    if mode == "quick":
        contrastive(F32, *SERIAL[32], CASES, rows=False)
        contrastive(F32, *ROWS, CASES, rows=True)
        contrastive(F16, *SERIAL[16], [("wbce", 1e-6)], rows=False)
        contrastive(BF16, *SERIAL[64], [("infonce", 1e-6)], rows=False)
        contrastive(BF16, *ROWS, [("wbce", 0.0)], rows=True)
        contrastive(F16, *ROWS, [("kl", 1e-6)], rows=True)
        contrastive(F32, *SERIAL[32], [("cwcl", 1e-6)], rows=False, tf32=True)
    else:
        for dtype in (F32, BF16, F16):
            for shape in (*SERIAL.values(), ROWS):
                for tf32 in ((False, True) if dtype == F32 else (False,)):
                    contrastive(dtype, *shape, CASES, rows=shape == ROWS, tf32=tf32)

    # blend and trajectory: one block size each; every dtype (fp64 accumulates in fp64, and the
    # ops pass lam / lr in the accumulation dtype).
    for dtype in (F32, BF16, F16, F64):
        acc = kt.acc_dtype(dtype)
        x = torch.randn(8, 20, 300, generator=g).to(dtype)
        perm = torch.stack([torch.randperm(20, generator=g) for _ in range(8)])
        lam = torch.rand(8, generator=g).to(acc)
        kb.blend_gather(x, perm, lam)
        kb.blend_scatter(x, perm, lam)
        pieces = [torch.randn(n, generator=g).to(dtype) for n in (4099, 1000)]
        kt.distance_sums(pieces, pieces, pieces)
        kt.terms(pieces, pieces, pieces, torch.tensor([0.1], dtype=acc))

    names = {F32: "fp32", BF16: "bf16", F16: "fp16", F64: "fp64", torch.int64: "i64",
             torch.int32: "i32"}
    seen, keys = set(), []
    for fn, args, kwargs in launches:
        sig, const = {}, {}
        values = dict(zip([p.name for p in fn.params], args))
        values.update(kwargs)
        for p in fn.params:
            v = values[p.name]
            if p.is_constexpr:
                sig[p.name] = "constexpr"
                const[p.name] = v
            elif isinstance(v, torch.Tensor):
                sig[p.name] = "*" + names[v.dtype]
            elif isinstance(v, bool):
                sig[p.name] = "i1"
            elif isinstance(v, int):
                sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            elif isinstance(v, float):
                sig[p.name] = "fp32"
            else:
                raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(v)}")
        key = (fn.__name__, json.dumps(sig, sort_keys=True), json.dumps(const, sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        keys.append(key)
        # Deterministic share of the distinct launches for this worker.
        if int(hashlib.sha1(repr(key).encode()).hexdigest(), 16) % workers != worker:
            continue
        target = GPUTarget("cuda", 90, 32)
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=target)
        assert kernel.asm["cubin"], fn.__name__
    print("KEYS " + json.dumps(keys))
    """
)

# Every kernel the ops launch (repblend_fast.ops.registry).
EXPECTED = set(registry.triton_kernels())


def _compile_all(mode: str) -> list[tuple[str, dict, dict]]:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = os.path.join(ROOT, ".pytest_cache", "triton_sm90")
    workers = max(1, min(4, os.cpu_count() or 1))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, mode, str(i), str(workers)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for i in range(workers)
    ]
    outs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        if proc.returncode != 0 and "ptxas" in err and "not found" in err:
            pytest.skip("Triton's ptxas is not available here")
        assert proc.returncode == 0, out[-3000:] + err[-6000:]
        outs.append(out)
    line = [ln for ln in outs[0].splitlines() if ln.startswith("KEYS ")][-1]
    return [(name, json.loads(sig), json.loads(const)) for name, sig, const in json.loads(line[5:])]


def _values(keys, kernel: str, what: str) -> set:
    """The constexpr (or pointer-dtype, for ``what`` starting with ``*``) values compiled for
    ``kernel``."""
    out = set()
    for name, sig, const in keys:
        if name != kernel:
            continue
        if what.startswith("*"):
            out |= {t[1:] for t in sig.values() if t.startswith("*") and t[1:] != "i64"}
        else:
            out.add(const[what] if what in const else None)
    return out


def _check_coverage(keys) -> None:
    assert {k[0] for k in keys} == EXPECTED
    loss_ids = set(range(6))
    for kernel in ("_loss_kernel", "_loss_final_kernel", "_dz_kernel"):
        assert _values(keys, kernel, "LOSS") == loss_ids, kernel
    for kernel in ("_loss_kernel", "_dz_kernel"):
        assert {(c["LOSS"], c["ROWS"]) for n, _, c in keys if n == kernel} == {
            (i, r) for i in loss_ids for r in (False, True)
        }, kernel
    assert {c["LOG_EPS"] for n, _, c in keys if n == "_loss_kernel" and c["LOSS"] == 0} == {
        True,
        False,
    }
    for kernel, block in (("_cos_kernel", "BM"), ("_dx_kernel", "BM"), ("_loss_kernel", "BR")):
        assert _values(keys, kernel, block) == {16, 32, 64}, kernel
    assert {c["BR"] for n, _, c in keys if n == "_loss_kernel" and c["ROWS"]} == {64}
    for kernel in ("_cos_kernel", "_dx_kernel"):
        assert _values(keys, kernel, "PREC") == {"ieee", "tf32"}, kernel
    for kernel in ("_cos_kernel", "_dx_kernel", "_loss_kernel", "_dz_kernel"):
        assert {"fp32", "bf16", "fp16"} <= _values(keys, kernel, "*"), kernel
    for kernel in (
        "_blend_gather_kernel", "_blend_scatter_kernel", "_dist_partial_kernel",
        "_terms_partial_kernel",
    ):  # fmt: skip
        assert {"fp32", "bf16", "fp16", "fp64"} <= _values(keys, kernel, "*"), kernel
    assert _values(keys, "_final_kernel", "*") == {"fp32", "fp64"}


def test_every_triton_kernel_and_branch_compiles_for_sm90():
    keys = _compile_all("quick")
    _check_coverage(keys)
    assert len(keys) >= 70


@pytest.mark.slow  # ~300 distinct kernels: several minutes of compilation on 2 cores
def test_full_product_of_branches_compiles_for_sm90():
    keys = _compile_all("full")
    _check_coverage(keys)
    # every (loss, block size, dtype) on the per-problem grid and every (loss, dtype) row-parallel
    for kernel, block in (("_loss_kernel", "BR"), ("_dz_kernel", "BR")):
        combos = {
            (c["LOSS"], c[block], sig["tgt_ptr"])
            for n, sig, c in keys
            if n == kernel and not c.get("ROWS", False)
        }
        assert len(combos) == 6 * 3 * 3, kernel
