"""The step benchmark and the step profiler over a shape set.

:func:`run_bench` times one distillation iteration (median ms over timed iterations after warm-up)
and its peak memory for, on the same inputs:

* ``lors-authors``: the LoRS algorithm as its authors run it (eager fp32, the image encoder is the
  student, TESLA two passes re-encoding every step, a fresh model copy and flat copies of the
  expert snapshots every iteration);
* ``repblend-authors``: the RepBlend algorithm as its authors run it (eager fp32, TESLA, the frozen
  encoder run on every step's batch in both passes);
* ``repblend-fast``: :class:`repblend_fast.engine.unroll.Unroller` with ``share_encoder=True``,
expert
  snapshots preloaded on the device, bf16 autocast of the encoder on a GPU; reported separately for
  ``meta_grad="exact"`` and ``"tesla"`` (``repblend-fast:exact`` / ``repblend-fast:tesla`` pick
  one);
* ``lors-fast`` (optional): the LoRS algorithm through the Unroller (TESLA).

How memory is measured: :mod:`repblend_fast.bench.measure`.

:func:`run_profile` runs the fast path under :class:`repblend_fast.profiling.RangeProfiler`, which
reads per-phase time and memory from the engine's ranges through ``torch.profiler`` (optionally
writing its chrome trace).

The results table (:func:`add_ratios`, :func:`format_step_table`) is
:mod:`repblend_fast.bench.table`'s (importable from here too).
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from repblend_fast.bench.inputs import build_step_inputs
from repblend_fast.bench.measure import (
    PARITY_RTOL,
    ParityError,
    check_parity,
    machine_info,
    resolve_device,
    run_in_subprocess,
    run_one,
)
from repblend_fast.bench.runners import (
    DEFAULT_AUTOCAST,
    DEFAULT_PROVIDERS,
    make_runner,
    parse_providers,
    precision_rows,
)
from repblend_fast.bench.shapes import SHAPE_SETS, StepShape, default_encoder_chunk
from repblend_fast.bench.table import (
    add_ratios,
    format_accounting_table,
    format_step_table,
    record_label,
)
from repblend_fast.host_allocator import HOST_ALLOCATORS, apply_host_allocator, host_allocator
from repblend_fast.io import atomic_write_json
from repblend_fast.threads import threads_scope

__all__ = [
    "FastVariant",
    "add_ratios",
    "fast_variants",
    "format_step_table",
    "run_bench",
    "run_profile",
]


def _check_shapes(shapes: str) -> None:
    if shapes not in SHAPE_SETS:
        raise ValueError(f"shapes must be one of {', '.join(SHAPE_SETS)}, got {shapes!r}")


def _check_counts(iterations: int, warmup: int, chunk: int | None) -> None:
    if iterations < 1 or warmup < 0:
        raise ValueError("need iterations >= 1 and warmup >= 0")
    if chunk is not None and chunk < 0:
        raise ValueError(f"encoder_chunk must be >= 0 (0 keeps the encoder graph), got {chunk}")


def _as_tuple(value, kind) -> tuple:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (kind(value),)


@dataclass(frozen=True)
class FastVariant:
    """One configuration of the fast path besides its meta-gradient mode."""

    compile: str = "none"
    memory_budget_mib: float = 0
    autocast: str = "auto"

    @property
    def default(self) -> bool:
        return self == FastVariant()


def fast_variants(compile=("none",), memory_budget_mib=(0,), autocast=("auto",)) -> list:
    """The cross product of the fast path's settings (strings may be comma-separated)."""
    from repblend_fast.config import COMPILE

    comps = _as_tuple(compile, str)
    budgets = tuple(float(b) for b in _as_tuple(memory_budget_mib, float))
    casts = _as_tuple(autocast, str)
    for c in comps:
        if c not in COMPILE:
            raise ValueError(f"compile must be one of {', '.join(COMPILE)}, got {c!r}")
    for b in budgets:
        if not b >= 0:
            raise ValueError(f"memory_budget_mib must be >= 0, got {b}")
    for a in casts:
        if a not in ("auto", "none", "bf16", "fp16"):
            raise ValueError(f"autocast must be auto, none, bf16 or fp16, got {a!r}")
    if not comps or not budgets or not casts:
        raise ValueError("compile, memory_budget_mib and autocast need at least one value each")
    return [FastVariant(c, b, a) for a in casts for b in budgets for c in comps]


def _check_modes(host_allocator: str, isolate: str) -> None:
    if host_allocator not in HOST_ALLOCATORS:
        raise ValueError(f"host_allocator must be one of {HOST_ALLOCATORS}, got {host_allocator!r}")
    if isolate not in ("auto", "subprocess", "inprocess"):
        raise ValueError(f"isolate must be auto, subprocess or inprocess, got {isolate!r}")


def _select_configs(shapes: str, configs: Sequence[str] | None) -> list[StepShape]:
    """The configurations of shape set ``shapes`` named in ``configs`` (default: all)."""
    todo = SHAPE_SETS[shapes]
    if configs is None:
        return todo
    names = {s.name for s in todo}
    unknown = sorted(set(configs) - names)
    if unknown:
        raise ValueError(f"configs {unknown} are not in shape set {shapes!r}: {sorted(names)}")
    return [s for s in todo if s.name in configs]


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
    compile: str | Sequence[str] = ("none",),
    memory_budget_mib: float | Sequence[float] = (0,),
    autocast: str | Sequence[str] = DEFAULT_AUTOCAST,
    configs: Sequence[str] | None = None,
    host_allocator: str = "system",
) -> list[dict]:
    """Time one distillation iteration per provider and meta-gradient mode.

    Args:
        shapes: a :data:`SHAPE_SETS` name (``tiny``, ``ci``, ``paper``, ``scale``).
        json_path: write the records there as a JSON list (parent folders are created), after
            every record, so that a run cut short keeps what it measured.
        providers: names from ``lors-authors, repblend-authors, repblend-fast, lors-fast``
            (``name:exact`` / ``name:tesla`` pick one mode), a list or a comma-separated string.
        iterations: timed iterations (default 2 on CPU, 5 on GPU) after ``warmup`` (1 / 2;
            a compiled configuration gets at least 1 / 2 warm-up iterations: they compile).
        device: ``auto``, ``cpu`` or ``cuda``.
        isolate: ``subprocess`` (a fresh process per provider: honest CPU peak RSS), ``inprocess``,
            or ``auto`` (subprocess on CPU, in-process on GPU where allocator stats are exact).
        parity: check every configuration's meta-gradients against the fp32 reference path
            (:mod:`repblend_fast.bench.parity`; the baselines before timing, each fast
            configuration — the one timed — after its timed iterations); a configuration that
            fails gets a record with its errors and no time, and :class:`ParityError` is raised
            once every provider has run and the JSON is written.
        seed: seeds the random stand-in data, snapshots and plans (same for every provider).
        threads: CPU threads for torch (default: torch's choice); on a shared machine 1 thread
            avoids OpenMP barriers stalling behind other processes.
        timeout: seconds per subprocess.
        verbose: print the table.
        encoder_chunk: the fast path's ``encoder_chunk`` (default: ``DistillConfig``'s; 0 keeps
            the encoder graph over all touched images, k > 0 re-encodes k at a time in the VJP).
        compile, memory_budget_mib, autocast: the fast path's ``DistillConfig.compile``,
            ``memory_budget_mib`` (with a budget the chunk comes from it) and encoder autocast
            (``auto``: bf16 on CUDA, none on a CPU; default ``auto`` and ``none``: the bf16 and
            the fp32 row on CUDA, one fp32 row on a CPU — values of one precision on the device
            are one row); each a value or a list: every combination is one ``repblend-fast``
            row per mode.
        configs: only these configuration names of the shape set (default: all).
        host_allocator: every provider's host allocator policy
            (:mod:`repblend_fast.host_allocator`: ``retain`` keeps freed memory in the process,
            ``system``, the default here, leaves the C library's defaults; the command line
            asks for ``retain``); applied in each worker process, or in this one (irreversibly)
            when the providers run in-process.

    Returns:
        One record per (configuration, provider, meta_grad, fast settings) with ``provider``,
        ``meta_grad``, ``shapes``, ``config``, ``shape``, ``ms_per_iter``, ``ms_all``,
        ``peak_mib``, ``peak_total_mib``, ``setup_mib``, ``memory_method``, ``parity_rel_err``,
        ratios to the default ``repblend-fast`` rows and to the baselines, and the machine
        description (``device``, ``cpu``, ``gpu``, ``torch``, ``git_sha``, ...); fast records
        also hold ``compile``, ``memory_budget_mib``, ``autocast``, ``encoder_chunk``,
        ``memory_plan`` and ``parity``; with a warm-up, the accounting of the last warm-up
        iteration (``saved_peak_mib``, ``state_mib``, ``predicted_peak_mib``, ``flops``,
        ``peak_fraction``: :func:`repblend_fast.bench.measure.account_iteration`).
    """
    _check_shapes(shapes)
    _check_modes(host_allocator, isolate)
    dev = resolve_device(device)
    runs = parse_providers(providers)
    variants = fast_variants(compile, memory_budget_mib, autocast)
    rows = precision_rows(dict.fromkeys(v.autocast for v in variants), dev)
    variants = [v for v in variants if v.autocast in rows]
    cuda = dev.type == "cuda"
    iterations = iterations if iterations is not None else (5 if cuda else 2)
    warmup = warmup if warmup is not None else (2 if cuda else 1)
    _check_counts(iterations, warmup, encoder_chunk)
    chunk = default_encoder_chunk() if encoder_chunk is None else encoder_chunk
    mode = isolate if isolate != "auto" else ("inprocess" if cuda else "subprocess")
    todo = _select_configs(shapes, configs)
    opts = _BenchOptions(
        mode, iterations, warmup, parity, seed, threads, timeout, verbose, chunk, json_path,
        host_allocator,
    )  # fmt: skip
    if mode == "inprocess":
        apply_host_allocator(host_allocator)
    with threads_scope(threads):
        records = _bench_all(shapes, todo, runs, variants, dev, opts)
    return _finish(records, json_path, verbose)


def _finish(records: list[dict], json_path: str | None, verbose: bool) -> list[dict]:
    """Ratios, the JSON file and the tables; :class:`ParityError` when a configuration failed."""
    add_ratios(records)
    if json_path:
        atomic_write_json(records, json_path, indent=1)
    if verbose:
        print(format_step_table(records))
        print(format_accounting_table(records))
    failed = [r for r in records if r.get("parity_failed")]
    if failed:
        names = ", ".join(f"{r['config']} {record_label(r)}" for r in failed)
        raise ParityError(
            f"parity failed for {names}: no time is recorded for them (errors in the records)"
        )
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
    json_path: str | None = None
    host_allocator: str = "system"


def _save_references(refs: dict[str, dict[str, torch.Tensor]], folder: str) -> dict[str, str]:
    from safetensors.torch import save_file

    paths = {}
    for mode, grads in refs.items():
        path = os.path.join(folder, f"reference_{mode}.safetensors")
        save_file({k: v.contiguous() for k, v in grads.items()}, path)
        paths[mode] = path
    return paths


def _bench_all(
    shapes: str, todo, runs, variants, dev: torch.device, o: _BenchOptions
) -> list[dict]:
    from repblend_fast.bench.parity import reference_grads

    info = machine_info(dev)
    records: list[dict] = []
    tmp = tempfile.mkdtemp(prefix="repblend-bench-")
    try:
        for shape in todo:
            errs: dict[str, float] = {}
            refs: dict[str, dict[str, torch.Tensor]] = {}
            if o.parity:
                authors = [r for r in runs if r[0].endswith("-authors")]
                fast_modes = {m for p, m in runs if p == "repblend-fast"}
                rb_modes = fast_modes | (
                    {"tesla"} if ("repblend-authors", "tesla") in runs else set()
                )
                methods = tuple(
                    {p.split("-")[0] for p, _ in authors} | ({"repblend"} if rb_modes else set())
                )
                inputs = build_step_inputs(shape, 1, o.seed, methods=methods)
                for m in sorted(rb_modes):
                    refs[m] = reference_grads(inputs, m, dev)
                if authors:
                    known = {"repblend": refs["tesla"]} if "tesla" in refs else None
                    errs = check_parity(
                        inputs,
                        authors,
                        dev,
                        o.encoder_chunk,
                        references=known,
                        raise_on_failure=False,
                    )
                del inputs
                gc.collect()
            ref_paths = _save_references(refs, tmp) if o.mode == "subprocess" else {}
            for provider, meta_grad in runs:
                for v in variants if provider == "repblend-fast" else [FastVariant()]:
                    rec = _run(
                        shape, shapes, provider, meta_grad, v, dev, o, info, errs, refs, ref_paths
                    )
                    records.append(rec)
                    if o.json_path:
                        atomic_write_json(records, o.json_path, indent=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return records


def _run(shape, shapes, provider, meta_grad, v, dev, o, info, errs, refs, ref_paths) -> dict:
    """One record: a provider (and fast variant) timed, or why not."""
    warmup = o.warmup
    if v.compile != "none":
        # The first iteration compiles every graph (the encoder's with a dynamic batch, the
        # step's grad-mode variants); a second one on a GPU catches a late recompilation.
        warmup = max(warmup, 2 if dev.type == "cuda" else 1)
    rec = {
        "provider": provider,
        "meta_grad": meta_grad,
        "shapes": shapes,
        "config": shape.name,
        "shape": asdict(shape),
        "isolation": o.mode,
        "iterations": o.iterations,
        "warmup": warmup,
        **info,
        "host_allocator": o.host_allocator,
    }
    if provider.endswith("-fast"):
        rec.update(
            {
                "compile": v.compile,
                "memory_budget_mib": v.memory_budget_mib,
                "autocast_requested": v.autocast,
            }
        )
    if provider in errs:
        rec["parity_rel_err"] = errs[provider]
        if not errs[provider] <= PARITY_RTOL:
            rec["parity_failed"] = True
            rec["skipped"] = (
                f"parity failed: relative error {errs[provider]:.3g} > {PARITY_RTOL:g} against "
                "the fp32 reference path; no time is recorded"
            )
            return rec
    if o.verbose:
        print(f"[bench] {shape.name}: {record_label({**rec, **_v_fields(v)})} ...", file=sys.stderr)
    fast_rb = provider == "repblend-fast"
    kw = {}
    if provider.endswith("-fast"):
        kw = {"compile": v.compile, "memory_budget_mib": v.memory_budget_mib}
    chunk = 0 if v.memory_budget_mib else o.encoder_chunk
    if o.mode == "subprocess":
        spec = {
            "shape": asdict(shape),
            "provider": provider,
            "meta_grad": meta_grad,
            "device": str(dev),
            "seed": o.seed,
            "warmup": warmup,
            "iterations": o.iterations,
            "threads": o.threads,
            "host_allocator": o.host_allocator,
            "encoder_chunk": chunk,
            "autocast": v.autocast,
            "reference": ref_paths.get(meta_grad) if fast_rb else None,
            **kw,
        }
        out = run_in_subprocess(spec, o.timeout)
    else:
        out = run_one(
            shape,
            provider,
            meta_grad,
            dev,
            o.seed,
            warmup,
            o.iterations,
            chunk,
            autocast=v.autocast,
            reference=refs.get(meta_grad) if fast_rb else None,
            **kw,
        )
        out["host_allocator"] = host_allocator()
    rec.update(out)
    if "skipped" in out and out.get("parity"):
        rec["parity_failed"] = True
    return rec


def _v_fields(v: FastVariant) -> dict:
    return {"compile": v.compile, "memory_budget_mib": v.memory_budget_mib, "autocast": v.autocast}


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
    memory_budget_mib: float = 0,
    host_allocator: str = "system",
) -> dict:
    """Per-phase time and peak memory of the fast path's distillation step.

    Phases: ``io``, ``encoder_forward``, ``unroll``, ``meta_gradient``, ``encoder_vjp``,
    ``optimiser`` (exclusive times; ``other`` is the rest of the step). Each configuration of the
    shape set gets a summary (medians over ``iterations`` steps after ``warmup``) and the raw
    per-step profiles. ``trace``: write a ``torch.profiler`` chrome trace of the timed steps of
    the first configuration there. ``threads``: torch CPU threads (default: torch's choice).
    ``encoder_chunk``: as for :func:`run_bench`. ``configs``: profile these configurations
    instead of the set's (e.g. :func:`repblend_fast.bench.shapes.shapes_with_config` of it);
    ``shapes`` then only names them in the result. ``memory_budget_mib``: the fast path's
    ``DistillConfig.memory_budget_mib`` (each entry then records the plan it chose).
    ``host_allocator``: this process's host allocator policy (:mod:`repblend_fast.host_allocator`;
    applied here, irreversibly, and recorded; the command line asks for ``retain``).
    """
    if not memory_budget_mib >= 0:
        raise ValueError(f"memory_budget_mib must be >= 0, got {memory_budget_mib}")
    if memory_budget_mib and encoder_chunk:
        raise ValueError("memory_budget_mib chooses the chunk itself: leave encoder_chunk at 0")
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
    with threads_scope(threads):
        info = machine_info(dev)
        info["threads"] = torch.get_num_threads()
        info["host_allocator"] = apply_host_allocator(host_allocator)
        result = {"provider": provider, "meta_grad": meta_grad, "shapes": shapes, **info}
        result["configs"] = []
        tables = []
        for k, shape in enumerate(todo):
            entry, table = _profile_one(
                shape,
                meta_grad,
                dev,
                iterations,
                warmup,
                seed,
                0 if memory_budget_mib else chunk,
                trace if k == 0 else None,
                memory_budget_mib,
            )
            result["configs"].append(entry)
            tables.append(table)
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
    memory_budget_mib: float = 0,
) -> tuple[dict, str]:
    """One configuration's results entry and table (and the trace, if asked for)."""
    from repblend_fast.profiling import (
        RangeProfiler,
        format_profile_table,
        rss_mib,
        summarise_profiles,
    )

    provider = "repblend-fast"
    inputs = build_step_inputs(shape, warmup + iterations, seed, methods=("repblend",))
    runner = make_runner(
        inputs,
        provider,
        meta_grad,
        dev,
        encoder_chunk=chunk,
        memory_budget_mib=memory_budget_mib,
    )
    del inputs
    gc.collect()
    for i in range(warmup):
        runner.iteration(i)
    before = torch.cuda.memory_allocated(dev) / 2**20 if dev.type == "cuda" else rss_mib()
    # The phases are the engine's ranges, read back from torch.profiler.
    with RangeProfiler(dev) as prof:
        for i in range(warmup, warmup + iterations):
            with prof.step():
                runner.iteration(i)
    if trace is not None:
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    summary = summarise_profiles(prof.steps)
    mem = "peak MiB" if dev.type == "cuda" else "peak RSS MiB"
    title = f"{shape.name} — {shape.describe()}; {provider} ({meta_grad}) on {dev.type}"
    plan = runner.unroller.last_memory_plan
    if memory_budget_mib:
        title += f"; memory budget {memory_budget_mib:g} MiB"
    if plan is not None and (memory_budget_mib or chunk):
        title += f" (keep {plan.keep}, chunk {plan.chunk}"
        title += ", steps checkpointed)" if plan.checkpoint_steps else ")"
    entry = {
        "config": shape.name,
        "shape": asdict(shape),
        "memory": "cuda max_memory_allocated" if dev.type == "cuda" else "process RSS",
        "memory_before_mib": before,
        "encoder_chunk": chunk,
        "memory_budget_mib": memory_budget_mib,
        "memory_plan": plan.to_dict() if plan is not None else None,
        "summary": summary,
        "steps": [s.to_dict() for s in prof.steps],
    }
    del runner
    gc.collect()
    return entry, format_profile_table(summary, title, mem)
