"""The step's distance to the machine's limit: its FLOPs against the measured dense matmul rate.

:func:`count_flops` counts the floating-point operations of a region with
``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions, forward and
backward, as torch's formulas state them; elementwise work is not counted, nor the fused
Triton/CUDA ops, whose B²D-sized products are well under 1% of a step with an image encoder).
:func:`matmul_rate` measures the machine's dense matrix-product rate with the same thread count
(fp32 on a CPU; fp32 without TF32 and bf16 on CUDA), so that ``flops / seconds / rate`` is the
step's fraction of what the machine's fastest kernel reaches.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["count_flops", "matmul_rate", "peak_fraction"]


class _FlopMode(TorchDispatchMode):
    """Adds each op's FLOPs by torch's formulas (``torch.utils.flop_counter.flop_registry``).

    A dispatch mode of its own rather than ``FlopCounterMode``, whose per-module breakdown
    installs backward hooks that ``torch.autograd.grad`` on leaf tensors does not support."""

    def __init__(self):
        super().__init__()
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            name = func._overloadpacket.__name__
            self.by_op[name] = self.by_op.get(name, 0) + int(formula(*args, **kwargs, out_val=out))
        return out


@contextmanager
def count_flops():
    """``with count_flops() as c: ...`` then ``c["flops"]`` (total) and ``c["by_op"]``."""
    out: dict = {}
    mode = _FlopMode()
    with mode:
        yield out
    out["by_op"] = dict(sorted(mode.by_op.items()))
    out["flops"] = sum(mode.by_op.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    n: int | None = None,
    seconds: float = 1.0,
) -> dict:
    """The dense ``n x n`` matrix product's rate in FLOP/s (best of repeated timed batches).

    ``n`` defaults to 2048 on a CPU and 8192 on CUDA. fp32 on CUDA runs with TF32 off (the
    fp32 rate, not the tensor cores' TF32 rate).
    """
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch.mm(a, b)
        _sync(device)
        best, spent, reps = float("inf"), 0.0, 1
        while spent < seconds:
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            _sync(device)
            dt = (time.perf_counter() - t0) / reps
            spent += dt * reps
            best = min(best, dt)
            reps = min(reps * 2, 64) if dt * reps < 0.05 else reps
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    flops = 2.0 * n**3
    return {
        "n": n,
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "flops_per_s": flops / best,
    }


def peak_fraction(flops: float, seconds: float, rate_flops_per_s: float) -> float:
    """The step's achieved rate as a fraction of the measured matmul rate."""
    return flops / seconds / rate_flops_per_s
