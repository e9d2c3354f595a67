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
=================  =====================================================================

A user error (:class:`~repblend_fast.cli.common.CLIError`) is printed as one line naming the flag
or file and what to do, with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from repblend_fast.cli import bench, demo, evaluate, run
from repblend_fast.cli.common import CLIError, HelpFormatter

__all__ = ["CLIError", "GROUPS", "build_parser", "main"]

GROUPS = (run, evaluate, demo, bench)


def build_parser() -> argparse.ArgumentParser:
    from repblend_fast import __version__

    ap = argparse.ArgumentParser(
        prog="repblend-fast",
        description="Fast multimodal (image-text) dataset distillation: RepBlend, LoRS, MTT-VL.",
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"repblend-fast {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"repblend-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
