"""The run commands: ``buffer`` (train expert trajectories), ``distill`` and ``info``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from repblend_fast.cli.common import (
    CLIError,
    add_dataset_args,
    add_encoder_args,
    add_parser,
    add_progress_arg,
    add_set_arg,
    add_threads_arg,
    apply_threads,
    check_device,
    check_out_folder,
    dataset_from_args,
    encoders_from_args,
    parse_set,
    threads_flag,
)
from repblend_fast.config import (
    COMPILE,
    META_GRADS,
    PRESETS,
    DistillConfig,
    preset,
)
from repblend_fast.methods import METHOD_REGISTRY, STUDENT_KINDS


def register(sub) -> None:
    _register_buffer(sub)
    _register_distill(sub)
    i = add_parser(
        sub,
        "info",
        help="describe an expert store, a run or demo folder, or a .safetensors file",
    )
    i.add_argument("path", help="expert store, run folder, demo folder or .safetensors file")
    i.add_argument(
        "--json",
        action="store_true",
        help="print every recorded field as JSON instead of the short summary",
    )
    i.set_defaults(func=cmd_info)


# ----------------------------------------------------------------------------- buffer
def _register_buffer(sub) -> None:
    b = add_parser(sub, "buffer", help="train expert trajectories on real pairs")
    add_dataset_args(b)
    add_encoder_args(b)
    g = b.add_argument_group("experts")
    g.add_argument("--out", required=True, help="directory of the expert store to write")
    g.add_argument(
        "--method",
        choices=[k.experts for k in STUDENT_KINDS.values()],
        default="repblend",
        help="repblend: image and text heads on cached frozen-encoder features; lors: the image "
        "encoder itself and a text head (for --method lors and mtt-vl distillation)",
    )
    g.add_argument(
        "--experts",
        type=int,
        default=5,
        metavar="N",
        help="number of experts E to train (distill's --experts is the folder this writes)",
    )
    g.add_argument(
        "--epochs", type=int, default=3, help="epochs per expert (snapshots 0..epochs are kept)"
    )
    g.add_argument(
        "--dim", type=int, default=256, help="projection width D of the heads (repblend)"
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="captions per SGD step (the demo's; the paper's 128 gives the small embedded "
        "datasets too few steps per epoch, docs/demo.md)",
    )
    g.add_argument("--lr", type=float, default=0.1, help="SGD learning rate of both sides")
    g.add_argument("--seed", type=int, default=0, help="seeds every expert (expert i: a hash)")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished store built with other settings in --out (without it such a "
        "folder is refused; a rerun with the same settings keeps its experts)",
    )
    add_threads_arg(b)
    add_progress_arg(b)
    b.set_defaults(func=cmd_buffer, distributed=True)


def cmd_buffer(args) -> int:
    from repblend_fast.pipeline import train_experts

    check_device(args)
    for flag in ("experts", "epochs", "dim", "batch_size"):
        if getattr(args, flag) < 1:
            raise CLIError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise CLIError(f"--lr must be a finite number > 0, got {args.lr}")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    check_out_folder(args.out)
    apply_threads(args.threads)
    ds = dataset_from_args(args)
    enc = encoders_from_args(args)
    try:
        path = train_experts(
            ds,
            enc,
            args.out,
            method=args.method,
            num_experts=args.experts,
            epochs=args.epochs,
            dim=args.dim,
            image_size=args.image_size,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            cache_dir=args.cache_dir,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        raise CLIError(str(exc)) from exc
    print(f"experts written to {path}")
    return 0


# ----------------------------------------------------------------------------- distill
def _preset_default(field: str) -> str:
    """``default: the preset's, X for demo`` (the default preset) for a flag's help; read from
    the tables :func:`preset` combines, without building one (that would load torch)."""
    import dataclasses

    method = METHOD_REGISTRY[PRESETS["demo"].get("method", "repblend")]
    demo = {**PRESETS["demo"], **method.defaults}
    fallback = {f.name: f.default for f in dataclasses.fields(DistillConfig)}
    return f"default: the preset's, {demo.get(field, fallback[field])} for demo"


def _register_distill(sub) -> None:
    d = add_parser(sub, "distill", help="distil a synthetic set against stored experts")
    add_dataset_args(d)
    add_encoder_args(d)
    g = d.add_argument_group("distillation (flags override the preset; --set overrides both)")
    g.add_argument(
        "--experts",
        required=True,
        metavar="DIR",
        help="expert store directory, the --out of `buffer` (there --experts is their number)",
    )
    g.add_argument("--out", required=True, help="run directory to write")
    g.add_argument(
        "--preset",
        default="demo",
        choices=sorted(PRESETS),
        help="named hyper-parameters (docs/algorithm.md §12)",
    )
    g.add_argument(
        "--method",
        choices=list(METHOD_REGISTRY),
        default=None,
        help="default: the preset's (repblend); lors and mtt-vl need `buffer --method lors`",
    )
    g.add_argument(
        "--pairs", type=int, default=None, help=f"N synthetic pairs ({_preset_default('pairs')})"
    )
    g.add_argument(
        "--iterations",
        type=int,
        default=None,
        help=f"outer iterations ({_preset_default('iterations')}; under --resume: the run's)",
    )
    g.add_argument(
        "--syn-steps",
        type=int,
        default=None,
        help=f"T unrolled student steps ({_preset_default('syn_steps')})",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"B inside the unroll ({_preset_default('batch_size')})",
    )
    g.add_argument(
        "--meta-grad",
        choices=list(META_GRADS),
        default=None,
        help=f"exact reverse mode or the paper's two-pass tesla ({_preset_default('meta_grad')})",
    )
    g.add_argument(
        "--no-share-encoder",
        action="store_true",
        help="re-encode every step's images as the research code does (slower, same gradients)",
    )
    g.add_argument(
        "--compile",
        default=None,
        metavar="{none,encoder,step}",
        help="torch.compile the frozen encoder (encoder), or the encoder and every unroll step "
        "(step; RepBlend only); the first iterations pay the compilation, minutes on a CPU "
        f"({_preset_default('compile')})",
    )
    g.add_argument(
        "--memory-budget-mib",
        default=None,
        metavar="MIB",
        help="MiB of tensors one iteration may add (RepBlend with a shared encoder): the frozen "
        "encoder's graph is kept for as many touched images as fit, the others are re-encoded "
        "in chunks, exact mode checkpoints its steps when that keeps more; same results "
        f"({_preset_default('memory_budget_mib')}; 0 = no budget)",
    )
    g.add_argument(
        "--seed", type=int, default=None, help=f"seeds every draw ({_preset_default('seed')})"
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint.safetensors with the settings it "
        "was saved with (a run stopped before its first checkpoint starts over); a flag or "
        "--set may change lr_img, lr_txt, lr_lr, lr_sim, clamp_lr, iterations and "
        "checkpoint_every, and what changes is printed",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --out (its config, metrics, checkpoint and distilled set)",
    )
    g.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the sha256 of the expert files and of the checkpoint (for stores of hundreds "
        "of GB; sizes, structure and counters are still checked)",
    )
    add_set_arg(g)
    add_threads_arg(d)
    add_progress_arg(d)
    d.set_defaults(func=cmd_distill, distributed=True)


_FLAG_FIELDS = (
    ("method", "method"),
    ("pairs", "pairs"),
    ("iterations", "iterations"),
    ("syn_steps", "syn_steps"),
    ("batch_size", "batch_size"),
    ("meta_grad", "meta_grad"),
    ("seed", "seed"),
    ("device", "device"),
    ("compile", "compile"),
    ("memory_budget_mib", "memory_budget_mib"),
)


def _check_flags(args) -> None:
    """``--compile`` and ``--memory-budget-mib``: one line naming the flag (exit 2) before
    anything loads."""
    if args.compile is not None and args.compile not in COMPILE:
        raise CLIError(f"--compile {args.compile!r}: expected one of {', '.join(COMPILE)}")
    if args.memory_budget_mib is not None:
        try:
            value = int(args.memory_budget_mib)
        except ValueError:
            value = -1
        if value < 0:
            raise CLIError(
                f"--memory-budget-mib {args.memory_budget_mib!r}: expected a whole number of "
                "MiB >= 0 (0 = no budget)"
            )
        args.memory_budget_mib = value


def _explicit_fields(args) -> dict[str, Any]:
    """The config fields the command line sets (flags, then ``--set``), preset aside."""
    over: dict[str, Any] = {}
    for flag, field in _FLAG_FIELDS:
        v = getattr(args, flag, None)
        if v is not None:
            over[field] = v
    if args.no_share_encoder:
        over["share_encoder"] = False
    over.update(parse_set(args.set))
    return over


def config_from_args(args) -> DistillConfig:
    """The DistillConfig of a ``distill`` invocation: preset, then explicit flags, then --set."""
    _check_flags(args)
    over = _explicit_fields(args)
    sets = parse_set(args.set)
    try:
        return preset(args.preset, **over)
    except (TypeError, ValueError) as exc:
        # Name the flag the bad value came from.
        for name, value in sets.items():
            if f"DistillConfig.{name}=" in str(exc):
                raise CLIError(f"--set {name}={json.dumps(value)}: {exc}") from exc
        raise CLIError(str(exc)) from exc


def _checkpoint_config(out: Path) -> DistillConfig | None:
    """The config a run folder's checkpoint was written with, else its ``config.json``'s (a run
    stopped before its first checkpoint); None without either."""
    from repblend_fast.io import read_safetensors_header

    ckpt = out / "checkpoint.safetensors"
    if ckpt.is_file():
        try:
            meta = read_safetensors_header(ckpt).get("__metadata__") or {}
            return DistillConfig.from_dict(json.loads(meta["config"]))
        except Exception as exc:  # a damaged checkpoint: say which file
            raise CLIError(
                f"{ckpt}: cannot read the checkpoint's config ({exc}); start over with --overwrite"
            ) from exc
    cfg = out / "config.json"
    if cfg.is_file():
        try:
            return DistillConfig.from_dict(json.loads(cfg.read_text(encoding="utf-8")))
        except Exception as exc:
            raise CLIError(
                f"{cfg}: unreadable ({exc}); start over with --overwrite instead of --resume"
            ) from exc
    return None


def resumed_config(args, cfg: DistillConfig) -> DistillConfig:
    """Under ``--resume``: the config the run in ``--out`` was saved with, changed only where the
    command line sets a field (``cfg`` holds those values, already checked); prints what changed.
    Without a saved config ``cfg`` is returned (the resume then says there is nothing to
    continue)."""
    saved = _checkpoint_config(Path(args.out))
    if saved is None:
        return cfg
    over = _explicit_fields(args)
    merged = saved.replace(**{k: getattr(cfg, k) for k in over}).validate()
    changed = [
        f"{k} {getattr(saved, k)!r} -> {getattr(merged, k)!r}"
        for k in over
        if k != "threads" and getattr(saved, k) != getattr(merged, k)
    ]
    if changed:
        print(f"--resume: changing {', '.join(changed)}; every other setting as saved")
    return merged


def _check_out(args, out_flag: str) -> None:
    """``--out``: a folder, holding a run only with --resume or --overwrite (checked before the
    data and encoders load; the pipeline checks again under the folder's lock)."""
    from repblend_fast.engine.checkpoint import check_run_folder

    check_out_folder(args.out, out_flag)
    try:
        check_run_folder(
            Path(args.out), resume=args.resume, overwrite=getattr(args, "overwrite", False)
        )
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from exc


def cmd_distill(args) -> int:
    cfg = config_from_args(args)
    from repblend_fast.engine.guard_report import read_guard, summary_line

    if args.resume:
        cfg = resumed_config(args, cfg)
    run_distill(args, cfg, note=print)
    print(f"distilled set written to {Path(args.out) / 'distilled.safetensors'}")
    guard = read_guard(args.out)
    if guard is not None:
        print(summary_line(guard))
    return 0


def run_distill(
    args, cfg: DistillConfig, *, enc=None, flags: dict[str, str] | None = None, note=None
):
    """Everything ``distill`` does once its config is built; returns the DistilledSet.

    Shared with the commands that build the config another way (``authors``): ``args`` carries
    the data, encoder, ``experts``, ``out``, ``resume``, ``threads`` and progress attributes of
    ``distill``; ``enc`` replaces the encoders the encoder flags name; ``flags`` renames the flags
    the messages cite (``{"experts": "--buffer_path", "pairs": "--num_queries"}``).

    Under torchrun every rank runs this: rank 0 decides the thread count (a resumed run's comes
    from its checkpoint) and alone uses ``--out`` (lock, checks, resume, outputs); the others
    distil without a run folder and start from rank 0's state (docs/distributed.md).
    """
    from repblend_fast import distributed
    from repblend_fast.engine.distill import DistillationStopped
    from repblend_fast.pipeline import distill

    flag = {"experts": "--experts", "pairs": "--pairs", **(flags or {})}
    check_device(args)
    if getattr(args, "device", "cpu") == "cpu":
        from repblend_fast.host_allocator import retain_freed_memory

        retain_freed_memory()  # reuse each iteration's memory (docs/design.md, host memory)
    ctx = distributed.current()

    def saved_threads() -> int | None:
        saved = _checkpoint_config(Path(args.out)) if args.resume else None
        return saved.threads if saved is not None else None

    if ctx is None or ctx.is_main:
        _check_out(args, flag.get("out", "--out"))
    cfg = cfg.replace(threads=threads_flag(args.threads, saved_threads))
    writes = ctx is None or ctx.is_main
    if not Path(args.experts, "manifest.json").exists():
        if Path(args.experts, "manifest.partial.json").exists():
            raise CLIError(
                f"{flag['experts']} {args.experts}: an unfinished expert store (its `buffer` run "
                "was interrupted or is running); rerun the same `buffer` command to finish it"
            )
        raise CLIError(
            f"{flag['experts']} {args.experts}: no manifest.json there; create experts with "
            "`repblend-fast buffer --out DIR` first"
        )
    ds = dataset_from_args(args)
    if cfg.pairs > ds.num_images:
        raise CLIError(
            f"{flag['pairs']} {cfg.pairs} exceeds the {ds.num_images} training images of "
            f"{args.dataset}: lower {flag['pairs']}"
        )
    if enc is None:
        enc = encoders_from_args(args)
    try:
        return distill(
            ds,
            enc,
            args.experts,
            cfg,
            out_dir=args.out if writes else None,
            image_size=args.image_size,
            resume=args.resume and writes,
            overwrite=getattr(args, "overwrite", False) and writes,
            verify=not getattr(args, "no_verify", False),
            cache_dir=args.cache_dir,
            progress=not args.no_progress,
            note=note,
        )
    except DistillationStopped:
        raise  # exit status 3, not a bad input
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from exc


# ----------------------------------------------------------------------------- info
def cmd_info(args) -> int:
    from repblend_fast.describe import describe, summary

    try:
        out = describe(args.path)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise CLIError(str(exc)) from exc
    print(json.dumps(out, indent=2) if args.json else summary(out, args.path))
    return 0
