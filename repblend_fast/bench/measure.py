"""Measuring one provider: warm-up and timed iterations, memory, the parity check, the machine.

Memory: on a GPU, ``peak_mib`` is ``max_memory_allocated`` during the warm-up and timed iterations
minus the memory allocated before them (model, synthetic data and snapshots), and
``peak_total_mib`` the absolute maximum. On a CPU each provider runs in a fresh subprocess
(:func:`run_in_subprocess`, so one provider's allocator state cannot hide another's);
``peak_total_mib`` is the peak resident set (``VmHWM``) of that process after setup, reset through
``/proc/self/clear_refs`` just before the first iteration, and ``peak_mib`` that minus the
resident set at the same moment: the memory the iterations themselves add (``setup_mib`` is the
resident set before them).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from repblend_fast.bench.inputs import StepInputs, build_step_inputs
from repblend_fast.bench.runners import AuthorsRunner, FastRunner, make_runner
from repblend_fast.bench.shapes import StepShape, default_encoder_chunk
from repblend_fast.stats import median

__all__ = [
    "PARITY_RTOL",
    "RESULT_TAG",
    "TIMING_KEYS",
    "WORKER",
    "ParityError",
    "account_iteration",
    "add_peak_fraction",
    "check_parity",
    "cpu_name",
    "git_sha",
    "machine_info",
    "machine_rates",
    "measure",
    "resolve_device",
    "run_in_subprocess",
    "run_one",
]

# Parity of the fp32 fast path with the authors-style loop on the benchmark's own first plan:
# relative L2 error of each meta-gradient (both sides fp32, different summation orders over T=8
# steps; float64 agreement to 1e-8 is tested in tests/test_baselines.py).
PARITY_RTOL = 2e-3
# The worker prints its result on one stdout line with this prefix (whatever else it prints).
RESULT_TAG = "@@repblend-bench-result "
WORKER = "repblend_fast.bench.worker"


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else the CPU; ``ValueError`` for CUDA without a GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available: use --device cpu")
    return dev


def measure(
    runner, warmup: int, iterations: int, device: torch.device, account: bool = True
) -> dict:
    """Warm-up then timed iterations of ``runner``: per-iteration ms and memory (module doc).

    ``account``: the last warm-up iteration (never a timed one) also counts the tensors saved
    for backward and the FLOPs (:func:`account_iteration`); no accounting without a warm-up.
    """
    from repblend_fast.profiling import reset_rss_peak, rss_mib, rss_peak_mib

    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        setup = torch.cuda.memory_allocated(device) / 2**20
        method = "cuda max_memory_allocated"
    else:
        setup = rss_mib()
        method = "peak RSS (VmHWM) after setup" if reset_rss_peak() else "peak RSS (ru_maxrss)"
    ms, losses = [], []
    split: dict[str, float] = {}
    if not cuda:
        split = _rss_split(setup, "setup")
        split.pop("peak_setup_mib", None)
    accounted: dict = {}
    for i in range(warmup + iterations):
        if i == warmup and split:
            split.update(_rss_split(setup, "warmup"))
        if account and i == warmup - 1:
            losses.append(account_iteration(runner, i, accounted))
            continue
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            losses.append(runner.iteration(i))
            b.record()
            torch.cuda.synchronize(device)
            t = a.elapsed_time(b)
        else:
            t0 = time.perf_counter()
            losses.append(runner.iteration(i))
            t = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            ms.append(t)
    if cuda:
        total = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        total = rss_peak_mib()
        if "peak_warmup_mib" in split:
            # The counter was reset after the warm-up: the whole run's peak is the larger one.
            split.update(_rss_split(setup, "timed"))
            total = max(total, setup + split["peak_warmup_mib"])
    return {
        "ms_per_iter": median(ms),
        "ms_all": ms,
        "peak_mib": max(0.0, total - setup),
        "peak_total_mib": total,
        "setup_mib": setup,
        "memory_method": method,
        "losses": losses,
        "threads": torch.get_num_threads(),
        **split,
        **accounted,
    }


def account_iteration(runner, i: int, out: dict, step=None):
    """Run ``runner.iteration(i)`` (or ``step()``, e.g. only the unroll where the optimiser's
    host read cannot run: the meta device) counting its tensors saved for backward and its FLOPs
    (:mod:`repblend_fast.bench.memory`, :mod:`repblend_fast.bench.flops`); fills ``out`` with
    ``saved_peak_mib``, ``saved_total_mib``, ``state_mib`` (after the iteration: the optimiser's
    state exists by then), ``predicted_peak_mib``, ``flops`` and ``flops_by_op``."""
    from repblend_fast.bench.flops import count_flops
    from repblend_fast.bench.memory import (
        SavedTensorMeter,
        predicted_peak_mib,
        state_bytes,
        state_tensors,
    )

    with SavedTensorMeter(exclude=state_tensors(runner)) as meter, count_flops() as fl:
        loss = runner.iteration(i) if step is None else step()
    out.update(meter.record())
    out["state_mib"] = state_bytes(runner) / 2**20
    out["predicted_peak_mib"] = predicted_peak_mib(out["state_mib"], out["saved_peak_mib"])
    out["flops"] = fl["flops"]
    out["flops_by_op"] = fl["by_op"]
    return loss


def machine_rates(device: torch.device) -> dict:
    """The dense matmul rates of this process's device and threads
    (:func:`repblend_fast.bench.flops.matmul_rate`): fp32 everywhere, bf16 on CUDA."""
    from repblend_fast.bench.flops import matmul_rate

    rates = {"matmul_fp32_flops_per_s": matmul_rate(device, torch.float32)["flops_per_s"]}
    if device.type == "cuda":
        rates["matmul_bf16_flops_per_s"] = matmul_rate(device, torch.bfloat16)["flops_per_s"]
    return rates


def add_peak_fraction(out: dict) -> None:
    """``peak_fraction``: the step's FLOP rate over the matmul rate of its precision (the bf16
    rate for a bf16-encoder row, where measured; else fp32)."""
    if "flops" not in out or "ms_per_iter" not in out:
        return
    key = "matmul_bf16_flops_per_s" if out.get("autocast") == "bf16" else ""
    rate = out.get(key) or out.get("matmul_fp32_flops_per_s")
    if rate:
        out["step_flops_per_s"] = out["flops"] / (out["ms_per_iter"] / 1e3)
        out["peak_fraction"] = out["step_flops_per_s"] / rate


def _rss_split(setup: float, phase: str) -> dict[str, float]:
    """CPU memory of the iterations so far, split (``/proc/self/status``): ``peak_<phase>_mib``
    (peak resident set above ``setup``; the counter is reset afterwards), and the resident set
    now as heap (``rss_anon_<phase>_mib``) and file-backed pages — library code paged in by the
    first use of an operator (``rss_file_<phase>_mib``). Empty where /proc cannot be read."""
    from repblend_fast.profiling import _status_kib, reset_rss_peak, rss_peak_mib

    anon, file = _status_kib("RssAnon"), _status_kib("RssFile")
    if anon is None or file is None:
        return {}
    out = {
        f"peak_{phase}_mib": max(0.0, rss_peak_mib() - setup),
        f"rss_anon_{phase}_mib": anon / 1024,
        f"rss_file_{phase}_mib": file / 1024,
    }
    reset_rss_peak()
    return out


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class ParityError(RuntimeError):
    """A benchmarked configuration's meta-gradients disagree with the reference path (its time
    is not recorded)."""


def check_parity(
    inputs: StepInputs,
    runs,
    device: torch.device,
    encoder_chunk: int | None = None,
    *,
    references: dict[str, dict[str, torch.Tensor]] | None = None,
    raise_on_failure: bool = True,
) -> dict[str, float]:
    """Meta-gradients of each authors baseline vs the fp32 reference TESLA path on the first
    plan (eager, plain-torch ops, no autocast, TF32 off: :func:`repblend_fast.bench.parity.
    reference_ops`).

    No speed is worth reporting for a baseline that computes something else. ``references``:
    already computed ``{method: grads}`` of that reference path (CPU tensors) to reuse. Returns
    ``{provider: max relative L2 error}``; raises :class:`ParityError` when one exceeds
    ``PARITY_RTOL`` (``raise_on_failure=False``: the caller reads the errors instead).
    """
    from repblend_fast.bench.parity import reference_ops

    errs: dict[str, float] = {}
    references = references or {}
    with reference_ops():
        for run in runs:
            provider = run[0]
            if not provider.endswith("-authors"):
                continue
            method = provider.split("-")[0]
            ref = AuthorsRunner(inputs, method, device)
            want = ref.grads(ref.plans[0])
            del ref
            got = references.get(method)
            if got is None:
                fast = FastRunner(
                    inputs, method, "tesla", device, None, encoder_chunk=encoder_chunk
                )
                got = fast.grads_at_start(fast.plans[0])
                del fast
            errs[provider] = max(_rel_err(got[k], want[k]) for k in want)
            if raise_on_failure and not errs[provider] <= PARITY_RTOL:
                bad = {k: _rel_err(got[k], want[k]) for k in want}
                raise ParityError(
                    f"parity failed for {provider} vs {method}-fast (tesla) on "
                    f"{inputs.shape.name}: "
                    f"relative errors {bad} exceed {PARITY_RTOL}; no speed is reported"
                )
    return errs


# --------------------------------------------------------------------------------------------------
# one provider, in this process or in a fresh one


TIMING_KEYS = ("ms_per_iter", "ms_all", "peak_mib", "peak_total_mib", "setup_mib", "losses")


def run_one(
    shape: StepShape,
    provider: str,
    meta_grad: str,
    device: torch.device,
    seed: int,
    warmup: int,
    iterations: int,
    encoder_chunk: int | None = None,
    *,
    compile: str = "none",
    memory_budget_mib: float = 0,
    autocast: str = "auto",
    reference: dict[str, torch.Tensor] | str | None = None,
) -> dict:
    """Build the inputs and runner of one provider, then :func:`measure` it.

    The inputs are dropped before timing so that only the runner's own copies count as setup.
    ``compile``, ``memory_budget_mib`` and ``autocast`` configure the fast path
    (:func:`repblend_fast.bench.runners.make_runner`). ``reference`` (fast providers): the fp32
    reference path's meta-gradients of the first plan (tensors, or a safetensors file of them);
    after the timed iterations the runner's own meta-gradients at its starting state — the
    configuration just timed — are checked against its reference path in the same precision and
    their distance to ``reference`` is recorded as the precision cost
    (:func:`repblend_fast.bench.parity.check_against`); on a parity failure the record keeps the
    errors and a ``skipped`` reason but no time or memory.
    """
    chunk = default_encoder_chunk() if encoder_chunk is None else encoder_chunk
    method = provider.split("-")[0]
    inputs = build_step_inputs(shape, warmup + iterations, seed, methods=(method,))
    runner = make_runner(
        inputs,
        provider,
        meta_grad,
        device,
        encoder_chunk=chunk,
        compile=compile,
        memory_budget_mib=memory_budget_mib,
        autocast=autocast,
    )
    del inputs
    # Compiled code is not run under the counting modes (they would change what is compiled).
    out = measure(runner, warmup, iterations, device, account=compile == "none")
    if isinstance(runner, FastRunner):
        out.update(runner.settings())
        plan = runner.unroller.last_memory_plan
        if plan is not None and runner.kind.frozen_encoder:
            out["memory_plan"] = plan.to_dict()
        if reference is not None:
            from repblend_fast.bench.parity import check_against

            if isinstance(reference, str):
                from safetensors.torch import load_file

                reference = load_file(reference)
            par = check_against(runner, reference)
            out["parity"] = par
            out["parity_rel_err"] = par["max_rel_err"]
            if not par["ok"]:
                for k in TIMING_KEYS:
                    out.pop(k, None)
                w = par["worst"]
                out["skipped"] = (
                    f"parity failed: {w} relative error {par['rel_err'][w]:.3g} > bound "
                    f"{par['rtol'][w]:.3g} against the reference path in the same precision; "
                    "no time is recorded"
                )
    else:
        out["autocast"] = "none"
    if "ms_per_iter" in out:
        out.update(machine_rates(device))
        add_peak_fraction(out)
        if device.type == "cuda" and out.get("predicted_peak_mib"):
            out["peak_over_prediction"] = out["peak_total_mib"] / out["predicted_peak_mib"]
    del runner
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def run_in_subprocess(spec: dict, timeout: float) -> dict:
    """:func:`run_one` in a fresh interpreter (``python -m repblend_fast.bench.worker '<json>'``).

    ``spec`` holds ``run_one``'s arguments as JSON (``shape`` as a dict) plus ``threads``.
    """
    cmd = [sys.executable, "-m", WORKER, json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(
        f"benchmark worker for {spec['provider']}:{spec['meta_grad']} failed "
        f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    )


# --------------------------------------------------------------------------------------------------
# machine description


def git_sha(root: str | os.PathLike | None = None) -> str:
    """Short sha of the checkout (``+dirty`` if tracked files changed); ``unknown`` outside git."""
    root = root or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=10", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``; ``platform`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str = "cpu") -> dict:
    """Versions and hardware for a results file (docs/design.md §5)."""
    device = torch.device(device)
    info = {
        "device": device.type,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_sha": git_sha(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - optional
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = None
    return info
