"""What the subcommands share: the user-error type, the help formatter, flag groups (data,
encoders, threads, ``--set``) and turning those flags into datasets, encoders and thread counts.

Nothing heavy is imported at module level: ``repblend-fast --help`` stays fast, and each command
imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


class CLIError(Exception):
    """A user error: printed as one line without a traceback, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the command, plus where the help is
    (instead of the whole usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after every flag whose default is a value; flags whose default is
    ``None`` or a switch say in their own help what happens without them."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default is None or default is False:
            return text
        if default is argparse.SUPPRESS:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text
        return super()._get_help_string(action)


def add_parser(sub, name: str, *, help: str, description: str | None = None):
    """A subcommand parser with the shared formatter (defaults shown on every flag)."""
    return sub.add_parser(
        name,
        help=help,
        description=description or help[:1].upper() + help[1:] + ".",
        formatter_class=HelpFormatter,
    )


# ----------------------------------------------------------------------------- flag groups
def add_dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default="emoji",
        help="emoji (embedded), tuxpaint, openclipart, real, real-sentences (Debian packages), "
        "flickr30k, coco or generic",
    )
    g.add_argument(
        "--annotation",
        help="flickr30k/coco: Karpathy-split annotation JSON (or its folder); required there",
    )
    g.add_argument(
        "--image-root",
        help="the folder the image paths are relative to (required for flickr30k/coco; "
        "default for generic: the annotations file's folder)",
    )
    g.add_argument(
        "--annotations", help="generic: a .jsonl or .csv of (image, caption) rows; required there"
    )
    g.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="image resolution in pixels (default: 64 for emoji, 96 for the Debian-package sets, "
        "else the image encoder's input size)",
    )
    g.add_argument(
        "--cache-dir",
        default=None,
        help="feature and expert cache (default: $REPBLEND_CACHE_DIR, else ~/.cache/repblend_fast)",
    )


def add_encoder_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("encoders (local files only, nothing is downloaded)")
    g.add_argument(
        "--image-encoder",
        default="efficientnet_lite0",
        help="timm architecture or alias; efficientnet_lite0 has packaged ImageNet weights",
    )
    g.add_argument(
        "--image-checkpoint",
        default=None,
        help="local weights for --image-encoder (.safetensors or a torch state dict); default: "
        "the packaged weights, which only efficientnet_lite0 has",
    )
    g.add_argument(
        "--text-encoder",
        default="minilm",
        help="a local Hugging Face model folder, or 'minilm' (packaged all-MiniLM-L6-v2)",
    )
    g.add_argument(
        "--random-init-encoder",
        action="store_true",
        help="allow a randomly initialised image encoder (timing and tests only)",
    )
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="compute device")


def add_threads_arg(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--threads``; ``default`` replaces "one per CPU core" in the help (the caller passes the
    same count to :func:`apply_threads`)."""
    what = default or "one per CPU core, whatever else runs on the machine"
    p.add_argument(
        "--threads",
        default=None,
        metavar="N|auto",
        help=f"torch CPU threads (default: {what}). "
        "Results depend on the thread count, so it is recorded with the run. 'auto' uses fewer "
        "threads while other processes keep the cores busy: faster on a shared machine, but the "
        "result then depends on the load",
    )


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_set_arg(p: argparse.ArgumentParser, what: str = "any DistillConfig field") -> None:
    p.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help=f'override {what} (VALUE is JSON: 3, 0.5, true, "text"); repeatable; '
        "default: no overrides",
    )


# ----------------------------------------------------------------------------- flag values
def check_out_folder(path: str, flag: str = "--out") -> None:
    """A folder the command writes: it may not be an existing file (one line, before anything
    loads)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CLIError(f"{flag} {path} is a file; {flag} names a folder to write: pass a folder")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CLIError(f"{flag} {path}: {parent} is a file, not a folder: pass a folder")
            break


def parse_set(items: list[str] | None, flag: str = "--set") -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}`` (values parsed as JSON, else kept as text);
    a name that is no DistillConfig field is refused with the nearest field suggested."""
    import dataclasses
    import difflib

    from repblend_fast.config import DistillConfig

    names = [f.name for f in dataclasses.fields(DistillConfig)]
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise CLIError(f"{flag} expects FIELD=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if k not in names:
            near = difflib.get_close_matches(k, names, n=1)
            hint = f"did you mean {flag} {near[0]}={v}?" if near else f"fields: {', '.join(names)}"
            raise CLIError(f"{flag} {item}: {k!r} is not a DistillConfig field; {hint}")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def check_set_path(value: str, flag: str) -> Path:
    """The distilled.safetensors a flag names (a file, or a run folder holding one), checked to
    be a readable safetensors file before anything heavy loads; returns its path."""
    from repblend_fast.io import read_safetensors_header

    path = Path(value)
    if path.is_dir():
        path = path / "distilled.safetensors"
    if not path.is_file():
        raise CLIError(
            f"{flag} {value}: file not found ({path}); pass a distilled.safetensors written by "
            "`repblend-fast distill` or `demo`, or its run folder"
        )
    try:
        read_safetensors_header(path)
    except (ValueError, OSError) as exc:
        reason = str(exc).splitlines()[0].removeprefix(f"{path}: ")
        raise CLIError(f"{flag} {value}: cannot read a distilled set ({reason})") from None
    return path


def threads_flag(value: str | int | None, default=None) -> int:
    """:func:`repblend_fast.threads.agreed_threads` for a ``--threads`` flag (a ``CLIError`` for
    a value it refuses)."""
    from repblend_fast.threads import agreed_threads

    try:
        return agreed_threads(value, default)
    except ValueError:
        raise CLIError(f"--threads {value!r}: expected a positive integer or 'auto'") from None


def apply_threads(value: str | int | None, default: int | None = None) -> int:
    """Resolve ``--threads`` (:func:`threads_flag`) and set torch's intra-op thread count to it;
    returns the count."""
    from repblend_fast.threads import set_threads

    return set_threads(threads_flag(value, default))


def check_device(args) -> None:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda but no CUDA device is available here: use --device cpu")


def dataset_from_args(args, split: str = "train"):
    """The ``split`` of the dataset the data flags name."""
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


def encoders_from_args(args):
    """Both frozen encoders the encoder flags name (local files only)."""
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
