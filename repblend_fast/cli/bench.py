"""``repblend-fast bench`` (the step benchmark) and ``repblend-fast profile`` (per-phase time and
memory of a distillation step).

Flags are checked here, before anything runs, so that a typo fails in a second with a message
naming the flag rather than after minutes of benchmarking; the work itself is
:func:`repblend_fast.bench.run_bench` / :func:`repblend_fast.bench.run_profile`.
"""

from __future__ import annotations

import argparse
import json

from repblend_fast.cli.common import CLIError, add_parser, add_threads_arg, threads_flag

__all__ = ["cmd_bench", "cmd_profile", "register"]

DEVICES = ("auto", "cpu", "cuda")


def _add_common(p: argparse.ArgumentParser, chunk_default: str) -> None:
    """Flags both commands share (same names, same meaning)."""
    from repblend_fast.bench import SHAPE_SETS

    p.add_argument(
        "--shapes",
        choices=sorted(SHAPE_SETS),
        default="ci",
        help="shape set: tiny (unit-test size), ci (resnet18 at 64 px, CPU), paper (RepBlend's "
        "sizes), scale (larger N and B)",
    )
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where to run; auto picks CUDA when a GPU is visible, else the CPU",
    )
    p.add_argument(
        "--encoder-chunk",
        type=int,
        default=None,
        metavar="N",
        help="the fast path's encoder_chunk: 0 keeps the encoder graph over all touched images, "
        "N > 0 re-encodes them N at a time in the VJP (less memory, one more encoder forward). "
        f"Without it: {chunk_default}",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the random stand-in data, expert snapshots and plans",
    )
    p.add_argument(
        "--host-allocator",
        choices=("retain", "system"),
        default="retain",
        help="host memory policy of the timed processes: retain keeps freed memory in the "
        "process for the next iteration (glibc: no per-allocation mappings, no trimming; "
        "repblend_fast.host_allocator), system leaves the C library's defaults",
    )
    add_threads_arg(p)


def register(sub) -> None:
    """Add the ``bench`` and ``profile`` subcommands to the subparsers object ``sub``."""
    _register_bench(sub)
    _register_profile(sub)


def _register_bench(sub) -> None:
    from repblend_fast.bench import DEFAULT_PROVIDERS, PROVIDERS
    from repblend_fast.bench.runners import DEFAULT_AUTOCAST

    b = add_parser(
        sub,
        "bench",
        help="time one distillation iteration per provider",
        description="Time one distillation iteration (and its peak memory) per provider and "
        "meta-gradient mode on random stand-in data, after checking that the baselines compute "
        "the same meta-gradients as the fast path.",
    )
    _add_common(b, "DistillConfig's default")
    b.add_argument(
        "--providers",
        default=",".join(DEFAULT_PROVIDERS),
        help=f"comma-separated from {', '.join(PROVIDERS)} (name:exact / name:tesla for one "
        "meta-gradient mode; repblend-fast alone runs both)",
    )
    b.add_argument(
        "--compile",
        default="none",
        metavar="LIST",
        help="the fast path's DistillConfig.compile, comma-separated from none, encoder, step: "
        "one repblend-fast row per value (compiled rows get extra warm-up iterations)",
    )
    b.add_argument(
        "--memory-budget-mib",
        default="0",
        metavar="LIST",
        help="the fast path's DistillConfig.memory_budget_mib, comma-separated MiB (0 = no "
        "budget): one repblend-fast row per value",
    )
    b.add_argument(
        "--autocast",
        default=",".join(DEFAULT_AUTOCAST),
        metavar="LIST",
        help="the fast path's frozen-encoder autocast, comma-separated from auto (bf16 on CUDA, "
        "none on a CPU), none, bf16, fp16: one repblend-fast row per precision (default "
        "auto,none: bf16 and fp32 rows on CUDA, one fp32 row on a CPU)",
    )
    b.add_argument(
        "--configs",
        default=None,
        metavar="NAMES",
        help="comma-separated configuration names of the shape set (e.g. paper-n99); without "
        "it: all of them",
    )
    b.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="timed iterations per provider (without it: 2 on a CPU, 5 on a GPU)",
    )
    b.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed iterations before them (without it: 1 on a CPU, 2 on a GPU)",
    )
    b.add_argument(
        "--isolate",
        choices=("auto", "subprocess", "inprocess"),
        default="auto",
        help="subprocess: a fresh process per provider (honest CPU peak memory); auto: "
        "subprocess on a CPU, in-process on a GPU (exact allocator statistics)",
    )
    b.add_argument(
        "--no-parity",
        dest="parity",
        action="store_false",
        help="skip the gradient parity check of the baselines against the fast path",
    )
    b.add_argument(
        "--json",
        dest="json_path",
        default=None,
        metavar="FILE",
        help="write the records there as a JSON list (without it: only the table is printed)",
    )
    b.set_defaults(func=cmd_bench)


def _register_profile(sub) -> None:
    p = add_parser(
        sub,
        "profile",
        help="per-phase time and memory of a distillation step",
        description="Per-phase time and peak memory (io, encoder_forward, unroll, meta_gradient, "
        "encoder_vjp, optimiser) of the fast path's distillation step.",
    )
    _add_common(p, "--config's encoder_chunk, else DistillConfig's default")
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="a DistillConfig JSON (e.g. a run's config.json): its pairs, batch_size, syn_steps, "
        "sim_rank, sim_alpha, meta_grad and encoder_chunk replace the shape set's (without it: "
        "the shape set's sizes)",
    )
    p.add_argument(
        "--meta-grad",
        choices=("exact", "tesla"),
        default=None,
        help="meta-gradient mode (without it: --config's meta_grad, else tesla)",
    )
    p.add_argument(
        "--iterations",
        "--steps",
        dest="iterations",
        type=int,
        default=3,
        help="profiled steps per configuration",
    )
    p.add_argument("--warmup", type=int, default=1, help="unprofiled steps before them")
    p.add_argument(
        "--memory-budget-mib",
        type=float,
        default=0.0,
        metavar="MIB",
        help="the fast path's DistillConfig.memory_budget_mib (0 = no budget; the table's "
        "title then says how many touched images kept their encoder graph)",
    )
    p.add_argument(
        "--trace",
        default=None,
        metavar="FILE",
        help="write the Chrome trace (JSON) of the first configuration's profiled steps there, "
        "with the engine's repblend:<phase> ranges (without it: no trace)",
    )
    p.add_argument(
        "--json",
        dest="json_path",
        default=None,
        metavar="FILE",
        help="write the summaries and per-step profiles there (without it: only the tables are "
        "printed)",
    )
    p.set_defaults(func=cmd_profile)


# ----------------------------------------------------------------------------- shared checks
def _check_counts(args) -> None:
    if args.iterations is not None and args.iterations < 1:
        raise CLIError(f"--iterations {args.iterations}: expected at least 1")
    if args.warmup is not None and args.warmup < 0:
        raise CLIError(f"--warmup {args.warmup}: expected 0 or more")
    if args.encoder_chunk is not None and args.encoder_chunk < 0:
        raise CLIError(
            f"--encoder-chunk {args.encoder_chunk}: expected 0 (keep the encoder graph) or a "
            "positive chunk size"
        )


def _check_device(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CLIError(
                "--device cuda but no CUDA device is available here: use --device cpu (or auto)"
            )


def _threads(value: str | None) -> int | None:
    """``--threads``: None keeps torch's default; ``auto`` or N as :func:`threads_flag` says."""
    return None if value is None else threads_flag(value)


def _read_config(path: str):
    from repblend_fast.config import DistillConfig

    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object of DistillConfig fields")
        return DistillConfig.from_dict(data).validate()
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CLIError(
            f"--config {path}: {exc} (pass a DistillConfig JSON such as a run's config.json)"
        ) from exc


# ----------------------------------------------------------------------------- commands
def cmd_bench(args: argparse.Namespace) -> int:
    """``repblend-fast bench``: the step benchmark's table (and JSON records)."""
    from repblend_fast.bench import parse_providers, run_bench

    try:
        parse_providers(args.providers)
    except ValueError as exc:
        raise CLIError(f"--providers {args.providers!r}: {exc}") from None
    _check_counts(args)
    _check_device(args.device)
    variants = _variants(args)
    configs = _configs(args)
    run_bench(
        args.shapes,
        args.json_path,
        args.providers,
        args.iterations,
        args.device,
        warmup=args.warmup,
        isolate=args.isolate,
        parity=args.parity,
        seed=args.seed,
        threads=_threads(args.threads),
        encoder_chunk=args.encoder_chunk,
        compile=variants["compile"],
        memory_budget_mib=variants["memory_budget_mib"],
        autocast=variants["autocast"],
        configs=configs,
        host_allocator=args.host_allocator,
    )
    return 0


def _variants(args) -> dict[str, list]:
    """``--compile``, ``--memory-budget-mib``, ``--autocast`` as lists, each checked (one line
    naming the flag on a bad value)."""
    from repblend_fast.bench import fast_variants

    out: dict[str, list] = {}
    for flag, name in (
        ("--compile", "compile"),
        ("--memory-budget-mib", "memory_budget_mib"),
        ("--autocast", "autocast"),
    ):
        text = getattr(args, name)
        values = [v.strip() for v in text.split(",") if v.strip()]
        try:
            if name == "memory_budget_mib":
                values = [float(v) for v in values]
            fast_variants(**{name: values})
        except ValueError as exc:
            raise CLIError(f"{flag} {text!r}: {exc}") from None
        out[name] = values
    return out


def _configs(args) -> list[str] | None:
    from repblend_fast.bench import SHAPE_SETS

    if args.configs is None:
        return None
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    known = [s.name for s in SHAPE_SETS[args.shapes]]
    bad = [c for c in names if c not in known]
    if bad or not names:
        raise CLIError(
            f"--configs {args.configs!r}: the {args.shapes} shape set has {', '.join(known)}"
        )
    return names


def cmd_profile(args: argparse.Namespace) -> int:
    """``repblend-fast profile``: per-phase tables (and JSON) of the fast path's step."""
    from repblend_fast.bench import SHAPE_SETS, run_profile, shapes_with_config

    _check_counts(args)
    _check_device(args.device)
    threads = _threads(args.threads)
    if not args.memory_budget_mib >= 0:
        raise CLIError(f"--memory-budget-mib {args.memory_budget_mib:g}: expected 0 or more MiB")
    shapes, configs = args.shapes, None
    meta_grad, chunk = args.meta_grad, args.encoder_chunk
    if args.config is not None:
        cfg = _read_config(args.config)
        shapes = f"{args.shapes}+config"
        configs = shapes_with_config(SHAPE_SETS[args.shapes], cfg)
        meta_grad = meta_grad or cfg.meta_grad
        chunk = cfg.encoder_chunk if chunk is None else chunk
    run_profile(
        shapes,
        "repblend-fast",
        meta_grad or "tesla",
        args.iterations,
        args.device,
        warmup=args.warmup,
        trace=args.trace,
        json_path=args.json_path,
        seed=args.seed,
        threads=threads,
        encoder_chunk=chunk,
        configs=configs,
        memory_budget_mib=args.memory_budget_mib,
        host_allocator=args.host_allocator,
    )
    return 0
