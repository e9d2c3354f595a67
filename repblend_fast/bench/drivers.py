"""The step benchmark and the step profiler over a shape set, and the benchmark's results table.

:func:`run_bench` times one distillation iteration (median ms over timed iterations after warm-up)
and its peak memory for, on the same inputs:

* ``lors-authors``: the LoRS algorithm as its authors run it (eager fp32, the image encoder is the
  student, TESLA two passes re-encoding every step, a fresh model copy and flat copies of the
  expert snapshots every iteration);
* ``repblend-authors``: the RepBlend algorithm as its authors run it (eager fp32, TESLA, the frozen
  encoder run on every step's batch in both passes);
* ``repblend-fast``: :class:`repblend_fast.unroll.Unroller` with ``share_encoder=True``, expert
  snapshots preloaded on the device, bf16 autocast of the encoder on a GPU; reported separately for
  ``meta_grad="exact"`` and ``"tesla"`` (``repblend-fast:exact`` / ``repblend-fast:tesla`` pick
  one);
* ``lors-fast`` (optional): the LoRS algorithm through the Unroller (TESLA).

How memory is measured: :mod:`repblend_fast.bench.measure`.

:func:`run_profile` runs the fast path with :class:`repblend_fast.profiling.ProfiledUnroller` and
reports per-phase time and memory (optionally a ``torch.profiler`` chrome trace).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from repblend_fast.bench.inputs import build_step_inputs
from repblend_fast.bench.measure import (
    check_parity,
    machine_info,
    resolve_device,
    run_in_subprocess,
    run_one,
)
from repblend_fast.bench.runners import DEFAULT_PROVIDERS, make_runner, parse_providers
from repblend_fast.bench.shapes import SHAPE_SETS, StepShape, default_encoder_chunk
from repblend_fast.io import atomic_write_json

__all__ = ["format_step_table", "run_bench", "run_profile"]


def _check_shapes(shapes: str) -> None:
    if shapes not in SHAPE_SETS:
        raise ValueError(f"shapes must be one of {', '.join(SHAPE_SETS)}, got {shapes!r}")


def _check_counts(iterations: int, warmup: int, chunk: int | None) -> None:
    if iterations < 1 or warmup < 0:
        raise ValueError("need iterations >= 1 and warmup >= 0")
    if chunk is not None and chunk < 0:
        raise ValueError(f"encoder_chunk must be >= 0 (0 keeps the encoder graph), got {chunk}")


def run_bench(
    shapes: str = "ci",
    json_path: str | None = None,
    providers: str | list[str] | tuple[str, ...] = DEFAULT_PROVIDERS,
    iterations: int | None = None,
    device: str = "auto",
    *,
    warmup: int | None = None,
    isolate: str = "auto",
    parity: bool = True,
    seed: int = 0,
    threads: int | None = None,
    timeout: float = 3600.0,
    verbose: bool = True,
    encoder_chunk: int | None = None,
) -> list[dict]:
    """Time one distillation iteration per provider and meta-gradient mode.

    Args:
        shapes: a :data:`SHAPE_SETS` name (``tiny``, ``ci``, ``paper``, ``scale``).
        json_path: write the records there as a JSON list (parent folders are created).
        providers: names from ``lors-authors, repblend-authors, repblend-fast, lors-fast``
            (``name:exact`` / ``name:tesla`` pick one mode), a list or a comma-separated string.
        iterations: timed iterations (default 2 on CPU, 5 on GPU) after ``warmup`` (1 / 2).
        device: ``auto``, ``cpu`` or ``cuda``.
        isolate: ``subprocess`` (a fresh process per provider: honest CPU peak RSS), ``inprocess``,
            or ``auto`` (subprocess on CPU, in-process on GPU where allocator stats are exact).
        parity: first check the baselines' meta-gradients against the fp32 fast path.
        seed: seeds the random stand-in data, snapshots and plans (same for every provider).
        threads: CPU threads for torch (default: torch's choice); on a shared machine 1 thread
            avoids OpenMP barriers stalling behind other processes.
        timeout: seconds per subprocess.
        verbose: print the table.
        encoder_chunk: the fast path's ``encoder_chunk`` (default: ``DistillConfig``'s; 0 keeps
            the encoder graph over all touched images, k > 0 re-encodes k at a time in the VJP).

    Returns:
        One record per (configuration, provider, meta_grad) with ``provider``, ``meta_grad``,
        ``shapes``, ``config``, ``shape``, ``ms_per_iter``, ``ms_all``, ``peak_mib``,
        ``peak_total_mib``, ``setup_mib``, ``memory_method``, ratios to ``repblend-fast``, and the
        machine description (``device``, ``cpu``, ``gpu``, ``torch``, ``git_sha``, ...);
        ``repblend-fast`` records also hold ``encoder_chunk``.
    """
    _check_shapes(shapes)
    if isolate not in ("auto", "subprocess", "inprocess"):
        raise ValueError(f"isolate must be auto, subprocess or inprocess, got {isolate!r}")
    dev = resolve_device(device)
    runs = parse_providers(providers)
    cuda = dev.type == "cuda"
    iterations = iterations if iterations is not None else (5 if cuda else 2)
    warmup = warmup if warmup is not None else (2 if cuda else 1)
    _check_counts(iterations, warmup, encoder_chunk)
    chunk = default_encoder_chunk() if encoder_chunk is None else encoder_chunk
    mode = isolate if isolate != "auto" else ("inprocess" if cuda else "subprocess")
    opts = _BenchOptions(mode, iterations, warmup, parity, seed, threads, timeout, verbose, chunk)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        records = _bench_all(shapes, runs, dev, opts)
    finally:
        torch.set_num_threads(old_threads)
    _add_ratios(records)
    if json_path:
        atomic_write_json(records, json_path, indent=1)
    if verbose:
        print(format_step_table(records))
    return records


@dataclass(frozen=True)
class _BenchOptions:
    """run_bench's resolved settings, as the loop over configurations and providers uses them."""

    mode: str  # "subprocess" or "inprocess"
    iterations: int
    warmup: int
    parity: bool
    seed: int
    threads: int | None
    timeout: float
    verbose: bool
    encoder_chunk: int


def _bench_all(shapes: str, runs, dev: torch.device, o: _BenchOptions) -> list[dict]:
    info = machine_info(dev)
    records: list[dict] = []
    for shape in SHAPE_SETS[shapes]:
        errs: dict[str, float] = {}
        if o.parity and any(p.endswith("-authors") for p, _ in runs):
            methods = tuple({p.split("-")[0] for p, _ in runs if p.endswith("-authors")})
            inputs = build_step_inputs(shape, 1, o.seed, methods=methods)
            errs = check_parity(inputs, runs, dev, encoder_chunk=o.encoder_chunk)
            del inputs
            gc.collect()
        for provider, meta_grad in runs:
            rec = {
                "provider": provider,
                "meta_grad": meta_grad,
                "shapes": shapes,
                "config": shape.name,
                "shape": asdict(shape),
                "isolation": o.mode,
                "iterations": o.iterations,
                "warmup": o.warmup,
                **info,
            }
            if provider in errs:
                rec["parity_rel_err"] = errs[provider]
            if o.verbose:
                print(f"[bench] {shape.name}: {provider} ({meta_grad}) ...", file=sys.stderr)
            if o.mode == "subprocess":
                spec = {
                    "shape": asdict(shape),
                    "provider": provider,
                    "meta_grad": meta_grad,
                    "device": str(dev),
                    "seed": o.seed,
                    "warmup": o.warmup,
                    "iterations": o.iterations,
                    "threads": o.threads,
                    "encoder_chunk": o.encoder_chunk,
                }
                out = run_in_subprocess(spec, o.timeout)
            else:
                out = run_one(
                    shape, provider, meta_grad, dev, o.seed, o.warmup, o.iterations, o.encoder_chunk
                )
            rec.update(out)
            records.append(rec)
    return records


def _add_ratios(records: list[dict]) -> None:
    by_cfg: dict[str, dict[str, dict]] = {}
    for r in records:
        if r.get("provider") == "repblend-fast" and "ms_per_iter" in r:
            by_cfg.setdefault(r["config"], {})[r["meta_grad"]] = r
    for r in records:
        for mode, ref in by_cfg.get(r["config"], {}).items():
            if "ms_per_iter" not in r:
                continue
            r[f"time_ratio_to_fast_{mode}"] = r["ms_per_iter"] / ref["ms_per_iter"]
            # A sub-MiB reference (tiny shapes) has no meaningful memory ratio.
            if ref["peak_mib"] >= 1.0:
                r[f"mem_ratio_to_fast_{mode}"] = r["peak_mib"] / ref["peak_mib"]


def format_step_table(records: list[dict]) -> str:
    """Markdown table: ms/iteration, peak MiB and ratios to ``repblend-fast`` per configuration.

    Records with ``skipped`` (written by older versions when a provider could not run) get a
    row with the reason.
    """
    lines: list[str] = []
    configs = list(dict.fromkeys(r["config"] for r in records))
    for cfg in configs:
        rows = [r for r in records if r["config"] == cfg]
        r0 = rows[0]
        dev = r0.get("gpu") or f"{r0.get('cpu')} ({r0.get('cpu_count')} cores)"
        shape = StepShape(**r0["shape"]).describe() if "shape" in r0 else cfg
        lines.append(
            f"**{cfg}** — {shape}; {r0.get('device')}: {dev}; torch {r0.get('torch')}, "
            f"git {r0.get('git_sha')}; {r0.get('memory_method', '')}"
        )
        lines.append("")
        lines.append(
            "| provider | meta-grad | ms/iter | peak MiB (iteration) | peak MiB (total) "
            "| time ÷ fast-exact | time ÷ fast-tesla | mem ÷ fast-exact | mem ÷ fast-tesla |"
        )
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            if "ms_per_iter" not in r:
                lines.append(
                    f"| {r['provider']} | {r['meta_grad']} | skipped: {r.get('skipped')} "
                    "| | | | | | |"
                )
                continue

            def ratio(key: str, r=r) -> str:
                v = r.get(key)
                return f"{v:.2f}×" if v is not None else "–"

            lines.append(
                f"| {r['provider']} | {r['meta_grad']} | {r['ms_per_iter']:.1f} | "
                f"{r['peak_mib']:.0f} | {r['peak_total_mib']:.0f} | "
                f"{ratio('time_ratio_to_fast_exact')} | {ratio('time_ratio_to_fast_tesla')} | "
                f"{ratio('mem_ratio_to_fast_exact')} | {ratio('mem_ratio_to_fast_tesla')} |"
            )
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# run_profile


def run_profile(
    shapes: str = "ci",
    provider: str = "repblend-fast",
    meta_grad: str = "tesla",
    iterations: int = 3,
    device: str = "auto",
    *,
    warmup: int = 1,
    trace: str | None = None,
    json_path: str | None = None,
    seed: int = 0,
    threads: int | None = None,
    verbose: bool = True,
    encoder_chunk: int | None = None,
    configs: Sequence[StepShape] | None = None,
) -> dict:
    """Per-phase time and peak memory of the fast path's distillation step.

    Phases: ``io``, ``encoder_forward``, ``unroll``, ``meta_gradient``, ``encoder_vjp``,
    ``optimiser`` (exclusive times; ``other`` is the rest of the step). Each configuration of the
    shape set gets a summary (medians over ``iterations`` steps after ``warmup``) and the raw
    per-step profiles. ``trace``: write a ``torch.profiler`` chrome trace of the timed steps of
    the first configuration there. ``threads``: torch CPU threads (default: torch's choice).
    ``encoder_chunk``: as for :func:`run_bench`. ``configs``: profile these configurations
    instead of the set's (e.g. :func:`repblend_fast.bench.shapes.shapes_with_config` of it);
    ``shapes`` then only names them in the result.
    """
    if configs is None:
        _check_shapes(shapes)
    if provider != "repblend-fast":
        raise ValueError("run_profile profiles provider='repblend-fast' (the phased Unroller path)")
    if meta_grad not in ("exact", "tesla"):
        raise ValueError(f"meta_grad must be exact or tesla, got {meta_grad!r}")
    _check_counts(iterations, warmup, encoder_chunk)
    dev = resolve_device(device)
    todo = list(configs) if configs is not None else SHAPE_SETS[shapes]
    chunk = default_encoder_chunk() if encoder_chunk is None else encoder_chunk
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        info = machine_info(dev)
        info["threads"] = torch.get_num_threads()
        result = {"provider": provider, "meta_grad": meta_grad, "shapes": shapes, **info}
        result["configs"] = []
        tables = []
        for k, shape in enumerate(todo):
            entry, table = _profile_one(
                shape, meta_grad, dev, iterations, warmup, seed, chunk, trace if k == 0 else None
            )
            result["configs"].append(entry)
            tables.append(table)
    finally:
        torch.set_num_threads(old_threads)
    if trace is not None:
        result["trace"] = str(trace)
    if json_path:
        atomic_write_json(result, json_path, indent=1)
    if verbose:
        print("\n\n".join(tables))
    return result


def _profile_one(
    shape: StepShape,
    meta_grad: str,
    dev: torch.device,
    iterations: int,
    warmup: int,
    seed: int,
    chunk: int,
    trace: str | None,
) -> tuple[dict, str]:
    """One configuration's results entry and table (and the trace, if asked for)."""
    from repblend_fast.profiling import PhaseTimer, format_profile_table, summarise_profiles

    provider = "repblend-fast"
    inputs = build_step_inputs(shape, warmup + iterations, seed, methods=("repblend",))
    timer = PhaseTimer(dev)
    runner = make_runner(inputs, provider, meta_grad, dev, timer=timer, encoder_chunk=chunk)
    for i in range(warmup):
        runner.iteration(i)
    prof_ctx = nullcontext()
    if trace is not None:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if dev.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        prof_ctx = torch.profiler.profile(activities=acts)
    with prof_ctx as prof:
        for i in range(warmup, warmup + iterations):
            with timer.step():
                runner.iteration(i)
    if trace is not None:
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    summary = summarise_profiles(timer.steps)
    mem = "peak MiB" if dev.type == "cuda" else "peak RSS MiB"
    title = f"{shape.name} — {shape.describe()}; {provider} ({meta_grad}) on {dev.type}"
    entry = {
        "config": shape.name,
        "shape": asdict(shape),
        "memory": "cuda max_memory_allocated" if dev.type == "cuda" else "process RSS",
        "summary": summary,
        "steps": [s.to_dict() for s in timer.steps],
    }
    del runner, inputs
    gc.collect()
    return entry, format_profile_table(summary, title, mem)
