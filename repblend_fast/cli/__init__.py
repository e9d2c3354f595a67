"""``repblend-fast``: fast multimodal dataset distillation (RepBlend, LoRS, MTT-VL).

One parser; each command group lives in its own module and adds its subcommands through
``register(subparsers)``:

=================  =====================================================================
module             commands
=================  =====================================================================
``cli.run``        ``buffer`` (train experts), ``distill``, ``info``
``cli.evaluate``   ``evaluate`` (train-on-distilled evaluation of a saved set)
``cli.demo``       ``demo`` (the embedded-dataset pipeline), ``report``
``cli.bench``      ``bench`` (step benchmark), ``profile`` (per-phase time and memory)
``cli.compat``     ``import-experts``, ``export``, ``import-distilled`` (the research code's files)
``cli.authors``    ``authors`` (run with the research scripts' flags)
=================  =====================================================================

Exit statuses (docs/reliability.md): 0 success; 2 for anything the user can act on — a bad
flag or file (:class:`~repblend_fast.cli.common.CLIError`), a file whose bytes changed since they
were written (``IntegrityError``), a folder another process is writing (``LockHeldError``, naming
its pid), an operating-system error such as a full disk or a read-only folder — printed as one
line naming the flag or file and what to do; 128 + N when signal N stopped a run after it wrote
a checkpoint (130 for Ctrl-C); 1 for an unexpected error (a bug): one line, and ``--debug`` prints
the traceback (of any error).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from repblend_fast.cli import authors, bench, compat, demo, evaluate, run
from repblend_fast.cli.common import CLIError, HelpFormatter

__all__ = ["CLIError", "GROUPS", "build_parser", "main"]

GROUPS = (run, evaluate, demo, bench, compat, authors)


def build_parser() -> argparse.ArgumentParser:
    from repblend_fast import __version__

    ap = argparse.ArgumentParser(
        prog="repblend-fast",
        description="Fast multimodal (image-text) dataset distillation: RepBlend, LoRS, MTT-VL.",
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"repblend-fast {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    ap.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback of an error (exit statuses stay the same)",
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    prefix = f"repblend-fast {args.command}"
    try:
        return int(args.func(args) or 0)
    except BaseException as exc:
        status, message = _classify(exc)
        if status is None:
            raise  # SystemExit and friends
        if args.debug:
            traceback.print_exc()
        print(f"{prefix}: {message}", file=sys.stderr)
        return status


def _classify(exc: BaseException) -> tuple[int | None, str]:
    """``(exit status, one-line message)`` of an exception that ends a command."""
    from repblend_fast.checkpoint import RunInterrupted
    from repblend_fast.distill import DistillationStopped
    from repblend_fast.io import IntegrityError
    from repblend_fast.locks import LockHeldError

    if isinstance(exc, (CLIError, IntegrityError, LockHeldError, DistillationStopped)):
        return 2, f"error: {exc}"
    if isinstance(exc, RunInterrupted):
        return 128 + exc.signum, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(exc, OSError):
        # Disk full, permissions, a read-only folder: the environment, not a bug.
        what = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename else ""
        return 2, f"error: {what}{where}; fix that (free space, permissions) and rerun"
    if isinstance(exc, Exception):
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return 1, (
            f"internal error: {type(exc).__name__}: {text} (run with --debug for the traceback)"
        )
    return None, ""
