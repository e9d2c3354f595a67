"""The ``authors`` command: a research script's distillation command line (RepBlend, LoRS,
MTT-VL) run on repblend_fast (library: :mod:`repblend_fast.compat.flags`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from repblend_fast.cli.common import (
    CLIError,
    HelpFormatter,
    add_progress_arg,
    add_set_arg,
    add_threads_arg,
    parse_set,
)
from repblend_fast.cli.compat import (
    FORMATS,
    add_pixel_stats_arg,
    import_buffer_folder,
    load_frozen_encoders,
)

__all__ = ["cmd_authors", "register"]


_AUTHORS_EPILOG = (
    "Their flags are parsed as their script parses them (names, types, choices, defaults; "
    "type=bool flags read any non-empty string as True), mapped onto repblend_fast, and the "
    "mapping is printed. Logging-only and ineffective flags are accepted with one warning each; "
    "flags whose meaning is not reproduced are refused with the reason. `repblend-fast "
    "authors SCRIPT --help` lists both sets of flags; docs/migrating.md has the full table."
)


def register(sub) -> None:
    """Add the ``authors`` subcommand to the subparsers object ``sub``."""
    a = sub.add_parser(
        "authors",
        help="run a research script's distillation command line (RepBlend, LoRS, MTT-VL)",
        description="Run distill_repblend.py, distill_tesla_lors.py or VL-distill's distill.py "
        "command lines on repblend_fast: `python distill_repblend.py FLAGS` becomes "
        "`repblend-fast authors repblend FLAGS`. Writes a repblend_fast run folder and a "
        "distilled_<it>.pt in RepBlend's and LoRS's format (VL-distill's script itself writes "
        "none).",
        epilog=_AUTHORS_EPILOG,
        formatter_class=HelpFormatter,
    )
    a.add_argument("script", choices=FORMATS, help="repblend, lors or mtt-vl")
    a.add_argument(
        "argv",
        nargs=argparse.REMAINDER,
        help="their flags, plus repblend_fast's (see `authors SCRIPT --help`)",
    )
    a.set_defaults(func=cmd_authors)


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse API: one line instead of usage + exit
        raise CLIError(message)


def _extra_parser(script: str) -> argparse.ArgumentParser:
    """repblend_fast's own flags of ``authors`` (hyphenated: never one of theirs)."""
    p = _RaisingParser(
        prog=f"repblend-fast authors {script}",
        allow_abbrev=False,
        add_help=False,
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("repblend_fast flags (besides theirs)")
    g.add_argument(
        "--out",
        default=None,
        help="run folder (default: their logged_files/<dataset>/<name>); also receives "
        "distilled_<Iteration>.pt",
    )
    g.add_argument(
        "--image-checkpoint",
        default=None,
        help="weights of --image_encoder (default: their ./distill_utils/checkpoints file when "
        "present)",
    )
    g.add_argument(
        "--text-encoder-path",
        default=None,
        help="a local Hugging Face folder for --text_encoder, or 'minilm' (default: their "
        "./distill_utils/checkpoints/<model> when present)",
    )
    g.add_argument(
        "--random-init-encoder",
        action="store_true",
        help="a randomly initialised image encoder (tests and timing)",
    )
    g.add_argument(
        "--annotations", default=None, help="--dataset generic: the pairs file (required there)"
    )
    add_pixel_stats_arg(g)
    g.add_argument(
        "--import-epochs",
        type=int,
        default=None,
        help="importing a raw buffer folder: store snapshots 0..N only (default: all)",
    )
    g.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="compute device (default: cuda when available, as their scripts)",
    )
    g.add_argument("--cache-dir", default=None, help="feature cache (default: the usual one)")
    g.add_argument(
        "--dry-run", action="store_true", help="print the mapping and the config, run nothing"
    )
    add_set_arg(g)
    add_threads_arg(g)
    add_progress_arg(g)
    return p


def _authors_help(script: str, ours: argparse.ArgumentParser) -> str:
    from repblend_fast.compat import SCRIPTS, flag_table

    lines = [ours.format_help(), f"their flags ({SCRIPTS[script]}), default -> repblend_fast:"]
    for row in flag_table(script):
        target = row["target"] or row["kind"]
        refuses = f"; refused: {row['refuses']}" if row["refuses"] else ""
        head = f"  {row['flag']} (default {row['default']!r})"
        lines.append(f"{head} -> {row['kind']}: {target}{refuses}")
    return "\n".join(lines) + "\n"


def _print_mapping(run) -> None:
    from repblend_fast.compat import SCRIPTS

    print(f"{SCRIPTS[run.script]} flags -> repblend_fast")
    width = max(len(src) for src, _, _ in run.rows)
    for src, target, note in run.rows:
        print(f"  {src:<{width}}  ->  {target}" + (f"   ({note})" if note else ""))
    for w in run.warnings:
        print(f"repblend-fast authors: warning: {w}", file=sys.stderr)


def _resolve_paths(script: str, run, extra) -> dict[str, Any]:
    """Encoder files and data paths of an authors run: ours when given, else the local files
    their code loads, else a one-line error saying which flag to add."""
    from repblend_fast.compat.encoder_names import local_image_weights, local_text_model

    s = run.settings
    their_image = run.values["image_encoder"]
    ckpt = extra.image_checkpoint
    random_init = extra.random_init_encoder or s["random_init_encoder"]
    if ckpt is None and not random_init:
        local = local_image_weights(script, their_image)
        if local is not None and Path(local).is_file():
            ckpt = local
        elif s["image_encoder"] != "efficientnet_lite0":
            where = f"their code's {local} is not here; " if local else ""
            raise CLIError(
                f"--image_encoder {their_image}: {where}pass --image-checkpoint FILE (the "
                f"{s['image_encoder']} weights) or --random-init-encoder"
            )
    text = extra.text_encoder_path
    if text is None:
        local = local_text_model(script, run.values["text_encoder"])
        if local is None or not Path(local).is_dir():
            where = f"their code's {local} is not here; " if local else ""
            raise CLIError(
                f"--text_encoder {run.values['text_encoder']}: {where}pass --text-encoder-path "
                "DIR (a local Hugging Face folder)"
            )
        text = local
    return {"image_checkpoint": ckpt, "random_init": random_init, "text_encoder": text}


def _store_for(buffer_path: str, script: str, enc, run, extra) -> Path:
    """The expert store of ``--buffer_path``: itself when it is one, else their buffer folder
    imported (once, resumably) into ``<buffer_path>.repblend_fast`` beside it."""
    if not buffer_path:
        raise CLIError(
            "--buffer_path: required (their default is empty): the folder of "
            "img/txt_replay_buffer_<n>.pt, or an expert store"
        )
    src = Path(buffer_path)
    if (src / "manifest.json").is_file():
        return src
    store = src.parent / f"{src.name}.repblend_fast"
    report = import_buffer_folder(
        script,
        src,
        store,
        enc,
        dim=None,
        epochs=extra.import_epochs,
        lr_img=float(run.values["lr_teacher_img"]),
        lr_txt=float(run.values["lr_teacher_txt"]),
        dataset=str(run.values["dataset"]),
        dry_run=False,
        overwrite=False,
        progress=not extra.no_progress,
        src_flag="--buffer_path",
    )
    print(
        f"--buffer_path {src}: {report.num_experts} expert(s) in the store {store} "
        f"({report.imported} imported now)"
    )
    return store


def cmd_authors(args) -> int:
    import torch

    from repblend_fast.cli.run import run_distill
    from repblend_fast.compat import AuthorsFlagError, export_authors_checkpoint
    from repblend_fast.compat.flags import parse_authors_flags

    script = args.script
    ours = _extra_parser(script)
    if any(a in ("-h", "--help") for a in args.argv):
        print(_authors_help(script, ours), end="")
        return 0
    # Ours are hyphenated and theirs use underscores, so the two sets never collide.
    extra, theirs = ours.parse_known_args(list(args.argv))
    try:
        run = parse_authors_flags(script, theirs)
        overrides = parse_set(extra.set)
        device = extra.device or ("cuda" if torch.cuda.is_available() else "cpu")
        overrides.setdefault("device", device)
        cfg = run.config(**overrides)
    except AuthorsFlagError as exc:
        raise CLIError(str(exc)) from exc
    _print_mapping(run)
    if extra.dry_run:
        print(cfg.to_json())
        return 0

    out = Path(extra.out) if extra.out else run.output_dir
    resume = False
    resume_from = run.settings.get("resume_from")
    if resume_from:
        folder = Path(resume_from)
        folder = folder if folder.is_dir() else folder.parent
        if not (folder / "checkpoint.safetensors").is_file():
            raise CLIError(
                f"--resume_from {resume_from}: no repblend_fast run beside it (checkpoint."
                "safetensors); a file of their script has no optimiser or random state to "
                "continue from: start a new run, or read it with `repblend-fast import-distilled`"
            )
        out, resume = folder, True
    elif (out / "metrics.jsonl").exists():
        raise CLIError(
            f"{out} already holds a run: continue it with --resume_from {out}, or choose another "
            "--name (or --out)"
        )
    paths = _resolve_paths(script, run, extra)
    enc = load_frozen_encoders(
        run.settings["image_encoder"],
        paths["image_checkpoint"],
        paths["random_init"],
        paths["text_encoder"],
        cfg.device,
        extra.pixel_stats,
    )
    store = _store_for(run.settings["buffer_path"], script, enc, run, extra)
    dataset = run.settings["dataset"]
    # Their default data folders only mean something for their datasets; a local dataset
    # (generic) takes its folder from its own file unless --image_root is given.
    theirs_data = dataset in ("flickr30k", "coco")
    image_root = run.settings.get("image_root")
    if not theirs_data and "image_root" not in run.given:
        image_root = None
    ns = argparse.Namespace(
        device=cfg.device,
        resume=resume,
        out=str(out),
        threads=extra.threads,
        experts=str(store),
        dataset=dataset,
        annotation=run.settings.get("annotation"),
        image_root=image_root,
        annotations=extra.annotations,
        image_size=run.settings.get("image_size"),
        cache_dir=extra.cache_dir,
        no_progress=extra.no_progress,
    )
    flags = {"experts": "--buffer_path", "pairs": "--num_queries"}
    distilled = run_distill(ns, cfg, enc=enc, flags=flags)
    theirs_out = out / f"distilled_{cfg.iterations}.pt"
    export_authors_checkpoint(distilled, theirs_out)
    print(f"distilled set written to {out / 'distilled.safetensors'} and {theirs_out}")
    return 0
