"""Shared machinery of the op benchmarks: providers, timing, memory, parity, ``extra_info``.

Every op benchmark (``bench_<op>.py``) follows one pattern (docs/design.md §5):

1. build random inputs for its (shape, dtype) on the benchmark device;
2. skip a provider that cannot run, with the reason (:func:`provider_fn` asks the dispatcher);
3. run the provider once and check it against the reference on these inputs
   (:func:`assert_parity`, docs/design.md §4 tolerances) — no number is recorded for a wrong result;
4. time it (:func:`time_fn`: CUDA events on a GPU, ``perf_counter`` + synchronisation on a CPU),
   measure its peak memory (:func:`peak_mib`) and fill ``extra_info`` (:func:`record`).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence

import torch

from repblend_fast.stats import quantile

PROVIDERS = ("reference", "compile", "triton", "cuda")
"""``reference``: the op in plain eager torch at the inputs' dtype (what a user would otherwise
write; for the trajectory op the fp32 expression, not the float64-accumulating yardstick of
``repblend_fast.reference``); ``compile``: ``torch.compile`` of that same eager code; ``triton``,
``cuda``: the fused kernels. Speed-ups are ratios to the first two; the float64 reference only
checks parity."""
MODES = ("fwd", "fwd+bwd", "double-bwd")


# --------------------------------------------------------------------------------------------------
# device and machine


def bench_device() -> torch.device:
    """``cuda`` when available (``REPBLEND_BENCH_DEVICE=cpu`` forces the CPU)."""
    want = os.environ.get("REPBLEND_BENCH_DEVICE", "auto")
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("REPBLEND_BENCH_DEVICE=cuda but no CUDA device is available")
    return torch.device("cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.cache
def git_sha() -> str:
    from repblend_fast.bench.measure import git_sha as _sha

    return _sha()


@functools.cache
def copy_bandwidth_gbps(device_type: str, nbytes: int) -> float:
    """Measured ``dst.copy_(src)`` bandwidth (bytes read + written per second) in GB/s, for a copy
    that moves ``nbytes`` in all (reads ``nbytes / 2``, writes as many): the yardstick of a
    memory-bound benchmark with that byte model, measured in the same run (so caches and clocks
    are in the same state; a small copy stays in L2 like a small benchmark does)."""
    device = torch.device(device_type)
    n = max(1, int(nbytes) // 8)  # fp32 elements per side
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    stats = time_fn(lambda: dst.copy_(src), device, warmup=2, budget_s=0.1)
    return 2 * n * 4 / (stats["median_ms"] * 1e-3) / 1e9


# --------------------------------------------------------------------------------------------------
# providers


def _compile_allowed(device: torch.device) -> tuple[bool, str]:
    # On by default on a GPU (the eager code's compiled form is a baseline every speed-up is
    # reported against); opt-in on a CPU, where inductor spends minutes compiling C++.
    if device.type == "cpu" and os.environ.get("REPBLEND_BENCH_COMPILE", "0") != "1":
        return False, (
            "torch.compile on a CPU builds C++ kernels for minutes: set REPBLEND_BENCH_COMPILE=1"
        )
    if not hasattr(torch, "compile"):
        return False, "this torch has no torch.compile"
    return True, ""


_COMPILED: dict[tuple[str, str], Callable] = {}


def compiled(key: str, fn: Callable, mode: str) -> Callable:
    """One ``torch.compile`` of ``fn`` per (op, mode), shared by all shapes (dynamic shapes)."""
    k = (key, mode)
    if k not in _COMPILED:
        _COMPILED[k] = torch.compile(fn, dynamic=True)
    return _COMPILED[k]


def provider_status(op: str, provider: str, tensors: Sequence[torch.Tensor]) -> tuple[bool, str]:
    """Whether ``provider`` can run ``op`` on ``tensors``, and why not."""
    device = tensors[0].device
    if provider == "reference":
        return True, ""
    if provider == "compile":
        return _compile_allowed(device)
    if provider in ("triton", "cuda"):
        if device.type == "cpu" and provider == "triton":
            return False, (
                "triton on a CPU runs only through the interpreter (TRITON_INTERPRET=1), a "
                "correctness tool whose timings mean nothing"
            )
        from repblend_fast.ops._dispatch import resolve_impl

        try:
            resolve_impl(op, provider, tensors)
        except (RuntimeError, ValueError) as exc:
            return False, str(exc)
        return True, ""
    return False, f"unknown provider {provider!r}"


# --------------------------------------------------------------------------------------------------
# timing and memory


def time_fn(
    fn: Callable,
    device: torch.device,
    warmup: int = 3,
    reps: int | None = None,
    budget_s: float = 0.25,
) -> dict[str, float]:
    """Median / p20 / p80 milliseconds of ``fn()``.

    GPU: one pair of CUDA events per repetition. CPU: ``perf_counter`` around each call
    (synchronised, a no-op on CPU tensors). ``reps`` defaults to what fits ``budget_s`` (5..200).
    """
    for _ in range(warmup):
        fn()
    sync(device)
    if reps is None:
        t0 = time.perf_counter()
        fn()
        sync(device)
        one = max(time.perf_counter() - t0, 1e-6)
        reps = int(min(200, max(5, budget_s / one)))
    times = []
    if device.type == "cuda":
        evs = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(reps)
        ]
        for a, b in evs:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize(device)
        times = [a.elapsed_time(b) for a, b in evs]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {
        "median_ms": quantile(times, 0.5),
        "p20_ms": quantile(times, 0.2),
        "p80_ms": quantile(times, 0.8),
        "reps": reps,
    }


def peak_mib(fn: Callable, device: torch.device) -> float:
    """Peak memory of one ``fn()`` call above what was in use before it, in MiB.

    GPU: reset → run → synchronise → ``max_memory_allocated`` minus the allocation before.
    CPU: peak resident set (``VmHWM`` after a reset) minus the resident set before.
    """
    from repblend_fast.profiling import reset_rss_peak, rss_mib, rss_peak_mib

    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        sync(device)
        del out
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    before = rss_mib()
    reset_rss_peak()
    out = fn()
    del out
    return max(0.0, rss_peak_mib() - before)


# --------------------------------------------------------------------------------------------------
# parity


def _flat(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    out = []
    for t in x:
        out += _flat(t)
    return out


def _rel_errors(got, want) -> list[float]:
    return [
        float(
            (a.detach().double() - b.detach().double()).norm()
            / b.detach().double().norm().clamp_min(1e-30)
        )
        for a, b in zip(_flat(got), _flat(want))
    ]


def _max_abs(got, want) -> float:
    return max(
        float((a.detach().double() - b.detach().double()).abs().max())
        for a, b in zip(_flat(got), _flat(want))
    )


def tolerance(dtype: torch.dtype, device: torch.device, order: int) -> dict[str, float]:
    """docs/design.md §4: ``order`` 0 = forward, 1 = gradient, 2 = second order."""
    if dtype in (torch.bfloat16, torch.float16):
        return {"atol": 1e-2, "rtol": 1e-2, "rel_rmse": 1e-2}
    if device.type == "cuda":  # TF32 dots are allowed in fused GPU kernels
        return {"atol": 1e-3, "rtol": 1e-3, "rel_rmse": 2e-3}
    rtol = (1e-5, 1e-4, 1e-3)[order]
    return {"atol": 1e-5, "rtol": rtol, "rel_rmse": rtol}


def assert_parity(
    got,
    want,
    dtype: torch.dtype,
    device: torch.device,
    order: int,
    what: str,
    tol: dict[str, float] | None = None,
) -> dict[str, float]:
    """Check ``got`` against the reference ``want`` (tensors or nested sequences of tensors).

    Passes when every element is within ``atol + rtol * |want|`` or, for gradients, when the
    relative RMS error is within ``rel_rmse``. Returns ``max_abs_err`` and ``rel_err``.
    """
    g, w = _flat(got), _flat(want)
    if len(g) != len(w):
        raise AssertionError(f"{what}: {len(g)} outputs, the reference has {len(w)}")
    tol = tol or tolerance(dtype, device, order)
    max_abs = rel = 0.0
    for a, b in zip(g, w):
        a64, b64 = a.detach().double(), b.detach().double()
        if a64.shape != b64.shape:
            raise AssertionError(f"{what}: shape {tuple(a64.shape)} vs {tuple(b64.shape)}")
        if not torch.isfinite(a64).all():
            raise AssertionError(f"{what}: non-finite values")
        diff = (a64 - b64).abs()
        max_abs = max(max_abs, float(diff.max()) if diff.numel() else 0.0)
        r = float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))
        rel = max(rel, r)
        elementwise = bool((diff <= tol["atol"] + tol["rtol"] * b64.abs()).all())
        if not elementwise and not (order > 0 and r <= tol["rel_rmse"]):
            raise AssertionError(
                f"{what}: max |err| {float(diff.max()):.3g}, relative RMS error {r:.3g} exceed "
                f"{tol} — no timing is recorded for a wrong result"
            )
    return {"max_abs_err": max_abs, "rel_err": rel}


# --------------------------------------------------------------------------------------------------
# extra_info


def record(
    benchmark,
    *,
    op: str,
    provider: str,
    mode: str,
    dtype: torch.dtype,
    device: torch.device,
    shape: dict,
    fn: Callable,
    parity: dict,
    bytes_moved: float | None = None,
    flops: float | None = None,
) -> dict:
    """Time ``fn`` and fill ``benchmark.extra_info`` with the docs/design.md §5 schema.

    pytest-benchmark's own statistics come from a short ``pedantic`` run of the (synchronised)
    ``fn``; the ``extra_info`` medians come from :func:`time_fn` (CUDA events on a GPU).
    """
    stats = time_fn(fn, device)
    info = {
        "op": op,
        "provider": provider,
        "mode": mode,
        "dtype": str(dtype).replace("torch.", ""),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": shape,
        "median_ms": stats["median_ms"],
        "p20_ms": stats["p20_ms"],
        "p80_ms": stats["p80_ms"],
        "peak_mib": peak_mib(fn, device),
        "max_abs_err": parity["max_abs_err"],
        "rel_err": parity["rel_err"],
        "git_sha": git_sha(),
    }
    sec = stats["median_ms"] * 1e-3
    if bytes_moved is not None:
        info["bytes"] = bytes_moved
        info["gbps"] = bytes_moved / sec / 1e9
        info["copy_gbps"] = copy_bandwidth_gbps(device.type, int(bytes_moved))
        info["bw_fraction"] = info["gbps"] / info["copy_gbps"]
    if flops is not None:
        info["flops"] = flops
        info["tflops"] = flops / sec / 1e12
    benchmark.extra_info.update(info)

    def synced():
        out = fn()
        sync(device)
        return out

    rounds = int(min(50, max(3, stats["reps"] // 4)))
    benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=1)
    return info


def run_case(
    benchmark,
    *,
    op: str,
    provider: str,
    mode: str,
    dtype: torch.dtype,
    device: torch.device,
    shape: dict,
    make_fn: Callable[[str], Callable],
    tensors: Sequence[torch.Tensor],
    order: int,
    make_ref: Callable | None = None,
    tol: dict[str, float] | None = None,
    deterministic: bool = False,
    **model,
) -> dict:
    """Skip, check parity, time and record one (op, provider, mode, shape, dtype) case.

    ``make_fn(provider)`` returns a no-argument callable computing the mode's outputs;
    ``make_ref`` (default ``make_fn("reference")``) the reference outputs to check against (the
    fp32 reference on upcast inputs for bf16 cases, docs/design.md §4); ``tol`` overrides the
    tolerance of :func:`tolerance`; ``deterministic`` also requires a fused provider to give
    bit-identical results in two runs.
    """
    import pytest

    ok, why = provider_status(op, provider, tensors)
    if not ok:
        pytest.skip(f"{provider}: {why}")
    fn = make_fn(provider)
    try:
        got = fn()
    except Exception as exc:  # noqa: BLE001 - a provider that cannot run is skipped, with why
        if provider == "compile":
            pytest.skip(
                f"torch.compile cannot run {op} {mode}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}"
            )
        raise
    want = (make_ref or make_fn("reference"))()
    what = f"{op} {mode} {provider} {shape}"
    if dtype in (torch.bfloat16, torch.float16) and tol is None:
        # docs/design.md §4, low precision: within 1e-2 of the fp32 reference AND at most 2x the
        # error
        # of the eager reference run in the same dtype. The eager run is that yardstick itself, so
        # its own row only records its error. The 2x bound gets a 1e-3 floor: an eager result that
        # happens to round almost exactly must not fail a fused kernel that rounds once more.
        eager = make_fn("reference")() if provider != "reference" else got
        eager_err = _rel_errors(eager, want)
        if provider == "reference":
            parity = {"max_abs_err": _max_abs(got, want), "rel_err": max(eager_err)}
        else:
            parity = assert_parity(got, want, dtype, device, order, what)
            for e_got, e_eager in zip(_rel_errors(got, want), eager_err):
                if e_got > max(2 * e_eager, 1e-3):
                    raise AssertionError(
                        f"{what}: relative error {e_got:.3g} exceeds 2x the eager "
                        f"{dtype} reference's {e_eager:.3g} — no timing is recorded"
                    )
    else:
        parity = assert_parity(got, want, dtype, device, order, what, tol)
    if deterministic and provider in ("triton", "cuda"):
        for a, b in zip(_flat(got), _flat(fn())):
            if not torch.equal(a, b):
                raise AssertionError(f"{op} {mode} {provider}: two runs differ (must be bitwise)")
    del got, want
    return record(
        benchmark,
        op=op,
        provider=provider,
        mode=mode,
        dtype=dtype,
        device=device,
        shape=shape,
        fn=fn,
        parity=parity,
        **model,
    )
