"""Compile check of every Triton kernel for the GPU target (sm_90), without a GPU.

The CPU suite runs the kernels through the Triton interpreter, which accepts programs the real
compiler rejects (``tl.dot`` tiles under 16, unsupported casts, ...). Here a subprocess without
``TRITON_INTERPRET`` calls each launcher with CPU tensors at paper-like shapes while
``JITFunction.run`` only records the launch; every recorded (kernel, argument types,
constexprs) is then compiled to a cubin for ``GPUTarget("cuda", 90, 32)`` with Triton's own
ptxas. Nothing runs on a device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    r"""
    import json, sys
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record

    from repblend_fast.kernels import blend as kb, contrastive as kc, trajectory as kt

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for K, B, D in ((1, 20, 2304), (8, 20, 2304), (1, 130, 64)):
            img = torch.randn(K, B, D, generator=g).to(dtype)
            txt = torch.randn(K, B, D, generator=g).to(dtype)
            tgt = torch.rand(K, B, B, generator=g).to(dtype)
            scale = torch.full((K,), 14.0)
            losses = kc.LOSS_IDS if (dtype == torch.float32 and K == 1 and B == 20) else ["wbce"]
            for loss in losses:
                for eps in (1e-6, 0.0) if loss == "wbce" else (1e-6,):
                    saved = kc.forward(img, txt, tgt, scale, loss, eps)
                    kc.backward(torch.ones(K), img, txt, tgt, scale, *saved[1:], loss, eps)
            perm = torch.stack([torch.randperm(B, generator=g) for _ in range(K)])
            lam = torch.rand(K, generator=g)
            kb.blend_gather(img, perm, lam)
            kb.blend_scatter(img, perm, lam)
        pieces = [torch.randn(n, generator=g).to(dtype) for n in (4099, 1000)]
        kt.distance_sums(pieces, pieces, pieces)
        kt.terms(pieces, pieces, pieces, torch.tensor([0.1]))

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
             torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32"}
    seen, compiled = set(), []
    target = GPUTarget("cuda", 90, 32)
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
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=target)
        assert kernel.asm["cubin"], fn.__name__
        compiled.append(fn.__name__)
    print(json.dumps(sorted(set(compiled))), len(compiled))
    """
)

EXPECTED = {
    "_cos_kernel", "_loss_kernel", "_dz_kernel", "_dx_kernel",
    "_blend_gather_kernel", "_blend_scatter_kernel",
    "_dist_partial_kernel", "_terms_partial_kernel", "_final_kernel",
}  # fmt: skip


def test_every_triton_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = os.path.join(ROOT, ".pytest_cache", "triton_sm90")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("Triton's ptxas is not available here")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    names, count = proc.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert set(json.loads(names)) == EXPECTED
    assert int(count) >= 20
