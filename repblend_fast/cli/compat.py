"""Commands for users of the research code (RepBlend, LoRS, MTT-VL): ``import-experts``,
``export`` and ``import-distilled`` (library: :mod:`repblend_fast.compat`); ``authors`` is in
:mod:`repblend_fast.cli.authors`, which shares the encoder and import helpers defined here."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from repblend_fast.cli.common import (
    CLIError,
    add_encoder_args,
    add_parser,
    add_progress_arg,
    check_device,
    check_set_path,
)
from repblend_fast.compat.flag_specs import SCRIPTS

__all__ = [
    "FORMATS",
    "add_pixel_stats_arg",
    "cmd_export",
    "cmd_import_distilled",
    "cmd_import_experts",
    "import_buffer_folder",
    "load_frozen_encoders",
    "register",
]

FORMATS = tuple(SCRIPTS)  # one per research script, named by its method


def register(sub) -> None:
    """Add ``import-experts``, ``export`` and ``import-distilled`` to the subparsers ``sub``."""
    _register_import_experts(sub)
    _register_export(sub)
    _register_import_distilled(sub)


# ----------------------------------------------------------------------------- encoders
def load_frozen_encoders(
    image_encoder: str,
    image_checkpoint: str | None,
    random_init: bool,
    text_encoder: str,
    device: str,
    pixel_stats: str,
):
    """The frozen encoders, with CLIP's pixel statistics when ``pixel_stats == "clip"`` (what
    the research data pipelines normalise with); errors as :class:`CLIError`."""
    from repblend_fast.pipeline import Encoders, load_encoders

    try:
        if pixel_stats == "encoder":
            return load_encoders(
                image_encoder,
                text_encoder,
                image_checkpoint=image_checkpoint,
                random_init=random_init,
                device=device,
            )
        from repblend_fast.data import CLIP_MEAN_STD
        from repblend_fast.models.encoders import load_image_encoder, load_text_encoder

        img, info = load_image_encoder(
            image_encoder,
            image_checkpoint,
            random_init=random_init,
            device=device,
            mean=CLIP_MEAN_STD[0],
            std=CLIP_MEAN_STD[1],
        )
        return Encoders(img, info, load_text_encoder(text_encoder, device=device))
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise CLIError(str(exc).splitlines()[0]) from exc


def add_pixel_stats_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pixel-stats",
        choices=["encoder", "clip"],
        default="encoder",
        help="pixel normalisation: the image encoder's own (what `distill` uses), or CLIP's, "
        "which the research data pipelines use; it is part of the encoder id the store records",
    )


def import_buffer_folder(
    fmt: str,
    src: Path,
    out: Path | None,
    enc,
    *,
    dim: int | None,
    epochs: int | None,
    lr_img: float,
    lr_txt: float,
    dataset: str,
    dry_run: bool,
    overwrite: bool,
    progress: bool,
    src_flag: str,
):
    from repblend_fast.compat import AuthorsBufferError, buffer_layout, import_authors_buffers
    from repblend_fast.methods import get_method

    try:
        layout = buffer_layout(
            fmt,
            d_img=enc.image_info.feature_dim,
            d_txt=enc.text.dim,
            dim=dim,
            encoder=None if get_method(fmt).student_kind().frozen_encoder else enc.image,
        )
        return import_authors_buffers(
            src,
            out,
            fmt,
            layout,
            image_encoder=enc.image_id,
            text_encoder=enc.text_id,
            epochs=epochs,
            lr_img=lr_img,
            lr_txt=lr_txt,
            dataset=dataset,
            dry_run=dry_run,
            overwrite=overwrite,
            progress=progress,
        )
    except AuthorsBufferError as exc:
        raise CLIError(f"{src_flag}: {exc}") from exc
    except (ValueError, OSError) as exc:  # the store writer's refusals
        raise CLIError(str(exc).splitlines()[0]) from exc


# ----------------------------------------------------------------------------- import-experts
def _register_import_experts(sub) -> None:
    p = add_parser(
        sub,
        "import-experts",
        help="import the research scripts' expert buffers (img/txt_replay_buffer_<n>.pt)",
        description="Import a folder of img_replay_buffer_<n>.pt / txt_replay_buffer_<n>.pt "
        "(RepBlend, LoRS or MTT-VL buffer scripts) into an expert store that `distill` and "
        "`authors` use. Files are paired by <n>, every tensor's shape is checked, files are read "
        "with torch.load(weights_only=True) one pair at a time, and an interrupted import "
        "continues where it stopped.",
    )
    p.add_argument("--format", choices=FORMATS, required=True, help="which script wrote them")
    p.add_argument("--src", required=True, help="the folder holding the buffer files")
    p.add_argument("--out", default=None, help="expert store to write (required without --dry-run)")
    add_encoder_args(p)
    add_pixel_stats_arg(p)
    g = p.add_argument_group("what the files do not say")
    g.add_argument(
        "--dim",
        type=int,
        default=None,
        help="repblend: the heads' width D (default: the image embedding width, as their code)",
    )
    g.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="store snapshots 0..N only (default: every epoch all experts have)",
    )
    g.add_argument(
        "--lr-img",
        type=float,
        default=0.1,
        help="the experts' image-side SGD lr (their buffer script's --lr_teacher_img), recorded",
    )
    g.add_argument(
        "--lr-txt",
        type=float,
        default=0.1,
        help="the experts' text-head SGD lr (their --lr_teacher_txt), recorded",
    )
    g.add_argument(
        "--dataset", default="unknown", help="the data the experts were trained on (recorded)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished store at --out built from other files or settings",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check every file and list files, experts, epochs and shapes; write nothing",
    )
    add_progress_arg(p)
    p.set_defaults(func=cmd_import_experts)


def cmd_import_experts(args) -> int:
    from repblend_fast.compat.encoder_names import IMAGE_ENCODER_ALIASES

    if args.out is None and not args.dry_run:
        raise CLIError("--out is required (the expert store to write), or pass --dry-run")
    for flag in ("dim", "epochs"):
        v = getattr(args, flag)
        if v is not None and v < (1 if flag == "dim" else 0):
            raise CLIError(f"--{flag} {v}: must be >= {1 if flag == 'dim' else 0}")
    from repblend_fast.compat import AuthorsBufferError, find_buffer_pairs

    try:  # folder problems first: they need no encoders
        find_buffer_pairs(args.src)
    except AuthorsBufferError as exc:
        raise CLIError(f"--src: {exc}") from exc
    check_device(args)
    arch = IMAGE_ENCODER_ALIASES.get(args.image_encoder, args.image_encoder)
    enc = load_frozen_encoders(
        arch,
        args.image_checkpoint,
        args.random_init_encoder,
        args.text_encoder,
        args.device,
        args.pixel_stats,
    )
    report = import_buffer_folder(
        args.format,
        Path(args.src),
        Path(args.out) if args.out else None,
        enc,
        dim=args.dim,
        epochs=args.epochs,
        lr_img=args.lr_img,
        lr_txt=args.lr_txt,
        dataset=args.dataset,
        dry_run=args.dry_run,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        src_flag="--src",
    )
    if args.dry_run:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    print(
        f"{report.num_experts} experts ({report.imported} imported, {report.reused} kept from an "
        f"earlier run), epochs {report.epochs[0]}..{report.epochs[-1]}, written to {report.store}"
    )
    return 0


# ----------------------------------------------------------------------------- export / import
def _register_export(sub) -> None:
    p = add_parser(
        sub,
        "export",
        help="write a distilled set as a research script's distilled_<it>.pt",
        description="Write distilled.safetensors (or a run folder's) as the dict RepBlend's and "
        "LoRS's scripts save and their evaluation and --resume_from read: image, text, "
        "similarity_params, similarity_mat, syn_lr_img, syn_lr_txt.",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="repblend",
        help="target script (all three read the same dict; VL-distill has no reader of its own)",
    )
    p.add_argument("--distilled", required=True, help="distilled.safetensors, or its run folder")
    p.add_argument("--out", required=True, help="the .pt file to write (distilled_<it>.pt)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    import sys

    from repblend_fast.compat import export_authors_checkpoint
    from repblend_fast.evaluate_saved import open_checked_set

    src = check_set_path(args.distilled, "--distilled")
    if not args.out.endswith(".pt"):
        raise CLIError(f"--out {args.out}: their scripts read distilled_<it>.pt; end it in .pt")
    if Path(args.out).is_dir():
        raise CLIError(f"--out {args.out} is a folder; name the .pt file to write")
    try:
        # The checks of `evaluate`: bytes against the run folder's record, finite values.
        _, distilled, _ = open_checked_set(src, note=lambda msg: print(msg, file=sys.stderr))
    except (ValueError, OSError, KeyError) as exc:
        raise CLIError(f"--distilled {args.distilled}: {str(exc).splitlines()[0]}") from exc
    path = export_authors_checkpoint(distilled, args.out)
    print(f"{src} -> {path} ({distilled.images.shape[0]} pairs, {args.format} format)")
    return 0


def _parts(distilled) -> dict[str, Any]:
    """The tensors of an imported set, by the names of the research scripts' dict."""
    import torch

    parts = {
        "image": distilled.images,
        "text": distilled.texts,
        "syn_lr_img": torch.tensor(distilled.eta_img),
        "syn_lr_txt": torch.tensor(distilled.eta_txt),
        **{f"similarity_params[{k}]": v for k, v in distilled.sim_params.items()},
    }
    if distilled.similarity is not None:
        parts["similarity_mat"] = distilled.similarity
    return parts


def _register_import_distilled(sub) -> None:
    p = add_parser(
        sub,
        "import-distilled",
        help="read a research script's distilled_<it>.pt into distilled.safetensors",
        description="Read a distilled_<it>.pt of RepBlend's or LoRS's scripts (with "
        "torch.load(weights_only=True)) into a distilled.safetensors that `evaluate` and `info` "
        "read.",
    )
    p.add_argument("--src", required=True, help="their distilled_<it>.pt")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="repblend",
        help="the script that made it (recorded as the set's method)",
    )
    p.add_argument(
        "--loss",
        default=None,
        help="the set's training loss for `evaluate` (default: wbce; infonce for mtt-vl)",
    )
    p.set_defaults(func=cmd_import_distilled)


def cmd_import_distilled(args) -> int:
    from repblend_fast.compat import AuthorsBufferError, import_distilled
    from repblend_fast.config import DistillConfig
    from repblend_fast.engine.checkpoint import CHECKSUMS
    from repblend_fast.locks import FolderLock
    from repblend_fast.methods import get_method

    if not args.out.endswith(".safetensors"):
        raise CLIError(f"--out {args.out}: must end in .safetensors")
    folder = Path(args.out).resolve().parent
    if (folder / CHECKSUMS).exists():
        raise CLIError(
            f"--out {args.out}: {folder} is a run folder of `distill`, whose files its own "
            "checksums vouch for; write the imported set to another folder"
        )
    try:
        distilled = import_distilled(args.src)
    except AuthorsBufferError as exc:
        raise CLIError(f"--src: {exc}") from exc
    n = distilled.images.shape[0]
    kind = {3: "lowrank", 1: "full"}.get(len(distilled.sim_params), "none")
    if distilled.similarity is not None and not distilled.sim_params:
        kind = "full"
    method = get_method(args.format)
    fields: dict[str, Any] = {**method.defaults, "method": args.format}
    fields.update(pairs=n, batch_size=min(20, n))
    if method.learns_similarity:
        fields["similarity"] = kind
    elif kind != "none":
        raise CLIError(
            f"--src {args.src}: holds a learned similarity, which MTT-VL sets do not have; "
            "pass --format repblend or lors"
        )
    if kind == "lowrank":
        fields["sim_rank"] = int(distilled.sim_params["L"].shape[1])
    if args.loss is not None:
        fields["loss"] = args.loss
    try:
        cfg = DistillConfig(**fields).validate()
    except ValueError as exc:
        raise CLIError(f"--loss {args.loss}: {exc}") from exc
    bad = [k for k, v in _parts(distilled).items() if not bool(v.isfinite().all())]
    if bad:
        raise CLIError(
            f"--src {args.src}: its {' and '.join(bad)} hold NaN or Inf (the run that wrote it "
            "diverged); import a distilled_<it>.pt of an earlier iteration"
        )
    folder.mkdir(parents=True, exist_ok=True)
    # The folder's lock: a run or another import writing there is refused, not overwritten.
    with FolderLock(folder, "import-distilled"):
        known = ["method", "pairs", "similarity"] + (["sim_rank"] if kind == "lowrank" else [])
        known += ["loss"] if args.loss is not None else []
        path = distilled.save(args.out, cfg, known_fields=known)
    print(f"{args.src} -> {path} ({n} pairs, similarity {kind})")
    return 0
