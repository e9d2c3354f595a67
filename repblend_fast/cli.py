"""repblend-fast: fast multimodal dataset distillation (RepBlend, LoRS, MTT-VL).

Subcommands: buffer (train experts), distill, info, and, where their modules are installed,
demo, evaluate, report, bench, profile. Every subcommand validates its flags up front and fails
with a message that says what to change (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from repblend_fast.config import METHODS, PRESETS, DistillConfig, preset

log = logging.getLogger("repblend_fast")


class CLIError(Exception):
    """A user error: printed without a traceback, exit status 2."""


# ----------------------------------------------------------------------------- shared flags
def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default="emoji",
        help="emoji (embedded default), tuxpaint, openclipart, flickr30k, coco, generic",
    )
    g.add_argument("--annotation", help="flickr30k/coco: Karpathy-split annotation JSON (or dir)")
    g.add_argument("--image-root", help="flickr30k/coco/generic: folder the image paths are under")
    g.add_argument("--annotations", help="generic: a .jsonl or .csv of (image, caption) rows")
    g.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="image resolution (default: 64 for emoji, else the encoder's)",
    )
    g.add_argument(
        "--cache-dir",
        default=None,
        help="feature cache (default $REPBLEND_CACHE_DIR or ~/.cache/repblend_fast)",
    )


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("encoders (local files only)")
    g.add_argument(
        "--image-encoder",
        default="efficientnet_lite0",
        help="timm architecture or alias (default efficientnet_lite0, packaged weights)",
    )
    g.add_argument(
        "--image-checkpoint",
        default=None,
        help="local weights for --image-encoder (e.g. nfnet_l0 .safetensors)",
    )
    g.add_argument(
        "--text-encoder",
        default="minilm",
        help="local Hugging Face directory, or 'minilm' (packaged all-MiniLM-L6-v2)",
    )
    g.add_argument(
        "--random-init-encoder",
        action="store_true",
        help="allow a randomly initialised image encoder (timing/tests only)",
    )
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="compute device")


def _dataset(args, split: str = "train"):
    from repblend_fast.data import get_dataset

    kw: dict[str, Any] = {}
    if args.dataset in ("flickr30k", "coco"):
        if not args.annotation or not args.image_root:
            raise CLIError(
                f"--dataset {args.dataset} needs --annotation and --image-root "
                "(local Karpathy-split files; nothing is downloaded)"
            )
        kw = {"annotation": args.annotation, "image_root": args.image_root}
    elif args.dataset == "generic":
        if not args.annotations:
            raise CLIError("--dataset generic needs --annotations <pairs.jsonl|csv>")
        kw = {"annotations": args.annotations, "n_test": 0.2}
        if args.image_root:
            kw["image_root"] = args.image_root
    try:
        return get_dataset(args.dataset, split, **kw)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from exc


def _check_device(args) -> None:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda but no CUDA device is available here: use --device cpu")


def _encoders(args):
    from repblend_fast.pipeline import load_encoders

    try:
        return load_encoders(
            args.image_encoder,
            args.text_encoder,
            image_checkpoint=args.image_checkpoint,
            random_init=args.random_init_encoder,
            device=args.device,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from exc


# ----------------------------------------------------------------------------- buffer
def cmd_buffer(args) -> int:
    from repblend_fast.pipeline import train_experts

    _check_device(args)
    if args.experts < 1 or args.epochs < 1:
        raise CLIError("--experts and --epochs must be >= 1")
    ds = _dataset(args)
    enc = _encoders(args)
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
        progress=not args.no_progress,
    )
    print(f"experts written to {path}")
    return 0


# ----------------------------------------------------------------------------- distill
def _parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise CLIError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def config_from_args(args) -> DistillConfig:
    """The DistillConfig of a ``distill`` invocation: preset, then explicit flags, then --set."""
    over: dict[str, Any] = {}
    for flag, field in (
        ("method", "method"),
        ("pairs", "pairs"),
        ("iterations", "iterations"),
        ("syn_steps", "syn_steps"),
        ("batch_size", "batch_size"),
        ("meta_grad", "meta_grad"),
        ("seed", "seed"),
        ("device", "device"),
    ):
        v = getattr(args, flag, None)
        if v is not None:
            over[field] = v
    if args.no_share_encoder:
        over["share_encoder"] = False
    if args.method in ("lors", "mtt-vl"):
        over.setdefault("blend", False)
    if args.method == "mtt-vl":
        over.setdefault("similarity", "none")
        over.setdefault("loss", "infonce")
    over.update(_parse_set(args.set or []))
    try:
        return preset(args.preset, **over)
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from exc


def cmd_distill(args) -> int:
    from repblend_fast.pipeline import distill

    _check_device(args)
    cfg = config_from_args(args)
    if not Path(args.experts, "manifest.json").exists():
        raise CLIError(
            f"--experts {args.experts}: no manifest.json there; create experts with "
            "`repblend-fast buffer --out DIR` first"
        )
    ds = _dataset(args)
    if cfg.pairs > ds.num_images:
        raise CLIError(
            f"--pairs {cfg.pairs} exceeds the {ds.num_images} training images of "
            f"{args.dataset}: lower --pairs"
        )
    enc = _encoders(args)
    try:
        distill(
            ds,
            enc,
            args.experts,
            cfg,
            out_dir=args.out,
            image_size=args.image_size,
            resume=args.resume,
            cache_dir=args.cache_dir,
            progress=not args.no_progress,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from exc
    print(f"distilled set written to {Path(args.out) / 'distilled.safetensors'}")
    return 0


# ----------------------------------------------------------------------------- info
def cmd_info(args) -> int:
    from repblend_fast.io import safetensors_metadata

    path = Path(args.path)
    if path.is_dir():
        for name in ("manifest.json", "config.json"):
            if (path / name).exists():
                print(json.dumps(json.loads((path / name).read_text()), indent=2))
                return 0
        if (path / "distilled.safetensors").exists():
            path = path / "distilled.safetensors"
        else:
            raise CLIError(f"{path}: no manifest.json, config.json or distilled.safetensors")
    if not path.exists():
        raise CLIError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        meta = safetensors_metadata(path)
        out = {k: (json.loads(v) if k == "config" else v) for k, v in meta.items()}
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            out["tensors"] = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}
        print(json.dumps(out, indent=2))
        return 0
    print(path.read_text())
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="repblend-fast", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = ap.add_subparsers(dest="command", required=True)

    b = sub.add_parser("buffer", help="train expert trajectories")
    _add_dataset_args(b)
    _add_encoder_args(b)
    b.add_argument("--experts", type=int, default=5, help="number of experts E")
    b.add_argument("--epochs", type=int, default=3, help="epochs per expert (snapshots 0..N)")
    b.add_argument(
        "--method",
        choices=["repblend", "lors"],
        default="repblend",
        help="repblend: two heads on cached features; lors: encoder + text head",
    )
    b.add_argument("--dim", type=int, default=256, help="projection width D (repblend)")
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--lr", type=float, default=0.1)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True, help="output directory for the expert store")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_buffer)

    d = sub.add_parser("distill", help="distil a synthetic set against stored experts")
    _add_dataset_args(d)
    _add_encoder_args(d)
    d.add_argument("--experts", required=True, help="expert store directory (from `buffer`)")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument(
        "--preset",
        default="demo",
        choices=sorted(PRESETS),
        help="named hyper-parameters (SPEC presets; default demo)",
    )
    d.add_argument("--method", choices=list(METHODS), default=None)
    d.add_argument("--pairs", type=int, default=None, help="N synthetic pairs")
    d.add_argument("--iterations", type=int, default=None)
    d.add_argument("--syn-steps", type=int, default=None, help="T unrolled steps")
    d.add_argument("--batch-size", type=int, default=None, help="B inside the unroll")
    d.add_argument("--meta-grad", choices=["exact", "tesla"], default=None)
    d.add_argument(
        "--no-share-encoder",
        action="store_true",
        help="re-encode every step as the authors' code does (slower)",
    )
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    d.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="override any DistillConfig field (JSON value), repeatable",
    )
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_distill)

    i = sub.add_parser("info", help="print an expert store's or distilled set's manifest")
    i.add_argument("path", help="expert store dir, run dir, or .safetensors file")
    i.set_defaults(func=cmd_info)

    _mount_optional(sub)
    return ap


def _mount_optional(sub) -> None:
    """Subcommands implemented in other modules (evaluation, demo, benchmarks)."""
    for mod, name, helptext in (
        (
            "repblend_fast.demo",
            "evaluate",
            "evaluate a distilled set (train-on-distilled protocol)",
        ),
        ("repblend_fast.demo", "demo", "the whole pipeline on the embedded dataset"),
        ("repblend_fast.demo", "report", "render report.md for an evaluated run"),
        ("repblend_fast.bench", "bench", "time one distillation iteration per provider"),
        ("repblend_fast.bench", "profile", "per-phase time and memory of distillation steps"),
    ):
        import importlib

        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        main = getattr(m, f"main_{name}", None)
        if main is None:
            continue
        # The module parses its own flags (main() hands it everything after the name).
        p = sub.add_parser(name, help=helptext, add_help=False)
        p.set_defaults(func=None, forward=main)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = ap.parse_known_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    forward = getattr(args, "forward", None)
    if forward is not None:
        return int(forward(argv[argv.index(args.command) + 1 :]) or 0)
    if extra:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        rc = args.func(args)
    except CLIError as exc:
        print(f"repblend-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
