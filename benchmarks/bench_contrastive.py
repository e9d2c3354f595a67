"""contrastive_loss (docs/algorithm.md §7, WBCE): forward, forward+backward and double backward.

Providers (benchmarks/common.py): ``reference`` is the eager torch code a user would write (the
reference implementation, at the inputs' dtype), ``compile`` its ``torch.compile``; the fused
``triton`` / ``cuda`` rows run the kernels, whose double backward is the analytic second order of
``repblend_fast.ops.contrastive`` (no re-run of the reference). ``paper`` and ``scale`` shapes
with B >= 128 take the row-parallel kernels (``row_parallel(K, B)``).

FLOP model (matmuls only; the elementwise loss is O(B²) and the normalisation O(BD)), in units of
one ``2·K·B²·D`` product: forward 1 (the logits), forward+backward 3 (two more for the input
gradients), double backward 9 (forward 1, backward 2, and 6 for the VJP of the backward: the
reference's autograd differentiates its two products and the logits product, the analytic path
does three ``[B, B] x [B, 2D]`` products).

``python -m benchmarks.bench_contrastive`` prints the op counts, product FLOPs and CPU time of the
double backward's torch part, previous path (VJP of the reference's gradient) against the analytic
one, on the same saved state (benchmarks/README.md).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import PROVIDERS, compiled, run_case
from repblend_fast import reference
from repblend_fast.config import TEMPERATURE
from repblend_fast.ops import contrastive_loss

SCALE = 1 / TEMPERATURE
MODES = ("fwd", "fwd+bwd", "double-bwd")
FLOP_FACTOR = {"fwd": 1, "fwd+bwd": 3, "double-bwd": 9}


def cases(shapes: str) -> list[tuple[str, dict]]:
    if shapes == "tiny":
        grid, dtypes = [(20, 8, 256)], ["float32"]
    elif shapes == "ci":
        grid, dtypes = [(b, k, 256) for b in (20, 40) for k in (1, 8)], ["float32"]
    elif shapes == "check":
        grid, dtypes = [(20, 8, 2304), (512, 1, 2304)], ["float32", "bfloat16"]
    elif shapes == "paper":
        grid = [(b, k, 2304) for b in (20, 40, 128, 512) for k in (1, 8)]
        dtypes = ["float32", "bfloat16"]
    else:
        grid = [(b, k, 2304) for b in (1024, 2048) for k in (1, 8)]
        dtypes = ["float32", "bfloat16"]
    return [
        (f"B{b}-K{k}-D{d}-{dt}", {"B": b, "K": k, "D": d, "dtype": dt})
        for b, k, d in grid
        for dt in dtypes
    ]


def _inputs(case: dict, device: torch.device):
    g = torch.Generator().manual_seed(case["B"] * 31 + case["K"])
    K, B, D = case["K"], case["B"], case["D"]
    lead = (K,) if K > 1 else ()
    dtype = getattr(torch, case["dtype"])
    img = torch.randn(*lead, B, D, generator=g)
    txt = torch.randn(*lead, B, D, generator=g)
    # A learned-looking soft target: identity plus a small symmetric low-rank part.
    low = 0.1 * torch.randn(*lead, B, 3, generator=g)
    target = (torch.eye(B) + low @ low.transpose(-1, -2)).clamp(0, 1)
    v_img = torch.randn(*lead, B, D, generator=g)
    v_txt = torch.randn(*lead, B, D, generator=g)
    to = dict(device=device, dtype=dtype)
    return [t.to(**to) for t in (img, txt, target, v_img, v_txt)]


def _mode_fn(loss_fn, mode, img, txt, target, v_img, v_txt):
    if mode == "fwd":

        def fn():
            with torch.no_grad():
                return loss_fn(img, txt, target)

        return fn
    a = img.detach().requires_grad_(True)
    b = txt.detach().requires_grad_(True)
    if mode == "fwd+bwd":

        def fn():
            return torch.autograd.grad(loss_fn(a, b, target).sum(), [a, b])

        return fn

    def fn():
        ga, gb = torch.autograd.grad(loss_fn(a, b, target).sum(), [a, b], create_graph=True)
        return torch.autograd.grad((ga * v_img).sum() + (gb * v_txt).sum(), [a, b])

    return fn


def _compiled_double_bwd(img, txt, target, v_img, v_txt):
    """The double backward with ``torch.compile``: AOTAutograd has no double backward, so the
    compiled function returns the first-order gradient (``torch.func.grad`` inside the graph, as
    the unroll's ``compile="step"`` does) and autograd differentiates it once."""

    def first_order(i, t, s):
        def total(a, b):
            return reference.contrastive_loss(a, b, s, logit_scale=SCALE, loss="wbce").sum()

        return torch.func.grad(total, argnums=(0, 1))(i, t)

    grad_fn = compiled("contrastive_grad", first_order, "double-bwd")
    a = img.detach().requires_grad_(True)
    b = txt.detach().requires_grad_(True)

    def fn():
        ga, gb = grad_fn(a, b, target)
        return torch.autograd.grad((ga * v_img).sum() + (gb * v_txt).sum(), [a, b])

    return fn


def _loss(provider: str, mode: str):
    def ref(i, t, s):
        return reference.contrastive_loss(i, t, s, logit_scale=SCALE, loss="wbce")

    if provider == "reference":
        return ref
    if provider == "compile":
        return compiled("contrastive", ref, mode)
    return lambda i, t, s: contrastive_loss(i, t, s, logit_scale=SCALE, loss="wbce", impl=provider)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_contrastive(benchmark, device, case, provider, mode):
    tensors = _inputs(case, device)
    fp32 = [t.float() for t in tensors]

    def make_fn(p):
        if p == "compile" and mode == "double-bwd":
            return _compiled_double_bwd(*tensors)
        return _mode_fn(_loss(p, mode), mode, *tensors)

    K, B, D = case["K"], case["B"], case["D"]
    run_case(
        benchmark,
        op="contrastive_loss",
        provider=provider,
        mode=mode,
        dtype=tensors[0].dtype,
        device=device,
        shape={"K": K, "B": B, "D": D},
        make_fn=make_fn,
        make_ref=_mode_fn(_loss("reference", mode), mode, *fp32),
        tensors=tensors[:3],
        order=MODES.index(mode),
        flops=2.0 * K * B * B * D * FLOP_FACTOR[mode],
    )


# --------------------------------------------------------------------------------------------------
# cost of the double backward's torch part: `python -m benchmarks.bench_contrastive [--threads N]`


def _second_order_paths(k: int, b: int, d: int, loss: str, eps: float = 1e-6):
    """No-argument callables for the two double backwards of the fused op, on random fp32 inputs:
    ``previous`` (the VJP of the reference's gradient, which recomputes the reference forward and
    backward) and ``analytic`` (``ops.contrastive._second_order`` on the saved statistics)."""
    from repblend_fast.ops import contrastive as ops

    g = torch.Generator().manual_seed(b * 31 + k)
    img, txt = torch.randn(k, b, d, generator=g), torch.randn(k, b, d, generator=g)
    target, scale = torch.rand(k, b, b, generator=g), torch.full((k,), SCALE)
    gout = torch.randn(k, generator=g)
    cots = tuple(torch.randn(t.shape, generator=g) for t in (img, txt, target, scale))
    # The forward's statistics and the first-order outputs, as the kernels would leave them.
    aux = ops._torch_forward(img, txt, target, scale, loss, eps)[1:]
    d_img, d_txt, *_ = ops._torch_backward(gout, img, txt, target, scale, aux, loss, eps)

    def previous():
        _, vjp_fn = torch.func.vjp(
            lambda *a: ops._ref_grads(*a, loss, eps), gout, img, txt, target, scale
        )
        return vjp_fn(cots)

    def analytic():
        return ops._second_order(cots, gout, img, txt, target, scale, d_img, d_txt, aux, loss, eps)

    return previous, analytic


_NO_KERNEL = {
    "view", "_unsafe_view", "unsqueeze", "squeeze", "expand", "select", "slice", "transpose",
    "t", "permute", "alias", "detach", "as_strided", "scalar_tensor", "lift_fresh", "_to_copy",
}  # fmt: skip
"""aten ops that launch no device kernel (views, wrapped scalars; ``_to_copy`` only appears for
the fp32 casts, which are no-ops on fp32 inputs in the fused path)."""


def _op_profile(fn) -> tuple[int, float]:
    """(aten ops that launch a kernel, matrix-product GFLOP) of one call of ``fn``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops, flop = 0, 0.0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            self.ops += name not in _NO_KERNEL
            if name in ("mm", "bmm"):
                a, b = args[0], args[1]
                self.flop += 2.0 * a.numel() * b.shape[-1]
            return out

    with Count() as c:
        fn()
    return c.ops, c.flop / 1e9


def second_order_cost_table(threads: int = 1) -> str:
    """Markdown table: ops, product GFLOP and CPU ms of the two double backwards."""
    from benchmarks.common import time_fn

    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    rows = [
        "| K | B | D | loss | kernel ops previous → analytic | product GFLOP previous → analytic "
        "| CPU ms previous → analytic | ratio |",
        "|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    shapes = [(1, 20, 2304), (8, 20, 2304), (8, 128, 2304), (1, 512, 2304), (1, 1024, 256)]
    for k, b, d in shapes:
        for loss in ("wbce", "infonce"):
            prev, new = _second_order_paths(k, b, d, loss)
            (n0, f0), (n1, f1) = _op_profile(prev), _op_profile(new)
            t0 = time_fn(prev, cpu, warmup=1, budget_s=1.0)["median_ms"]
            t1 = time_fn(new, cpu, warmup=1, budget_s=1.0)["median_ms"]
            rows.append(
                f"| {k} | {b} | {d} | {loss} | {n0} → {n1} | {f0:.3g} → {f1:.3g} "
                f"| {t0:.3g} → {t1:.3g} | {t0 / t1:.2f}× |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=second_order_cost_table.__doc__)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    print(second_order_cost_table(ap.parse_args().threads))
