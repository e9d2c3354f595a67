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

Exit statuses (docs/reliability.md; ``EXIT_STATUSES`` is the ``--help`` text): 0 success; 2 for
anything the user can act on — a bad flag or file (:class:`~repblend_fast.cli.common.CLIError`),
a file whose bytes changed since they were written (``IntegrityError``), a folder another process
is writing (``LockHeldError``, naming its pid), an operating-system error such as a full disk or a
read-only folder — printed as one line naming the flag or file and what to do; 3 when a
distillation was stopped because it went wrong (``DistillationStopped``: the collapse detector,
or ``nan_patience`` non-finite iterations in a row; its state is checkpointed); 128 + N when
signal N stopped a run after it wrote a checkpoint (130 for Ctrl-C); 1 for an unexpected error (a
bug): one line, and ``--debug`` prints the traceback (of any error).

Under ``torchrun --nproc-per-node N -m repblend_fast COMMAND`` (``buffer``, ``distill`` and
``evaluate``; docs/distributed.md) :func:`main` joins the process group first and leaves it at
the end; only rank 0 prints results, logs and progress bars. A rank that fails prints its message
(once, whichever ranks meet it) and publishes it, so the other ranks stop at their next wait
instead of hanging; every failing rank also leaves its message in the launcher's error file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import traceback
import warnings

from repblend_fast.cli import authors, bench, compat, demo, evaluate, run
from repblend_fast.cli.common import CLIError, HelpFormatter, Parser

__all__ = ["CLIError", "GROUPS", "build_parser", "main"]

GROUPS = (run, evaluate, demo, bench, compat, authors)

EXIT_STATUSES = (
    "exit status: 0 success; 2 bad input (a flag, a file, a folder in use, a full disk), one line "
    "saying what to change; 3 a distillation stopped because it went wrong (collapse detector, "
    "non-finite iterations), its state checkpointed; 128+N stopped by signal N after a "
    "checkpoint (130: Ctrl-C); 1 an unexpected error (--debug shows the traceback)"
)


def build_parser() -> argparse.ArgumentParser:
    from repblend_fast import __version__

    ap = Parser(
        prog="repblend-fast",
        description="Fast multimodal (image-text) dataset distillation: RepBlend, LoRS, MTT-VL.",
        epilog=EXIT_STATUSES,
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"repblend-fast {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    ap.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback of an error (exit statuses stay the same)",
    )
    ap.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="under torchrun: how long a collective waits for the other processes, and how long "
        "a silent process is waited for, before the command stops with an error",
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
    ctx, joined = None, False
    try:
        ctx, joined = _join(args)
        if ctx is None:
            return int(args.func(args) or 0)
        prefix += f" [rank {ctx.rank}]"
        if ctx.is_main:
            return int(args.func(args) or 0)
        # Results, logs, warnings and progress bars come from rank 0.
        if hasattr(args, "no_progress"):
            args.no_progress = True
        logging.getLogger().setLevel(logging.ERROR)
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return int(args.func(args) or 0)
    except BaseException as exc:
        status, message = _classify(exc, args.command)
        if status is None:
            raise  # SystemExit and friends
        show = True
        if ctx is not None:
            show = ctx.report_failure(exc, message, status, collective=_collective(exc))
            _error_file(f"{prefix}: {message}")
        if args.debug and show:
            traceback.print_exc()
        if show:
            print(f"{prefix}: {message}", file=sys.stderr)
        return status
    finally:
        if joined:
            from repblend_fast import distributed

            distributed.close()


def _join(args) -> tuple:
    """``(context, joined here)``: the process group of a torchrun launch (None without one)."""
    if "repblend_fast.distributed" not in sys.modules and os.environ.get("WORLD_SIZE", "1") == "1":
        return None, False  # one process and no context yet: no need to load torch for that
    from repblend_fast import distributed

    ctx = distributed.current()
    if ctx is not None or not distributed.launched():
        return ctx, False
    device = getattr(args, "device", "cpu")
    if device == "cuda":
        from repblend_fast.cli.common import check_device

        check_device(args)
    ctx = distributed.init(device, timeout=args.dist_timeout)
    if ctx is not None and not getattr(args, "distributed", False):
        raise CLIError(
            f"`repblend-fast {args.command}` runs in one process: launch it without torchrun "
            "(buffer, distill and evaluate can use several)"
        )
    return ctx, ctx is not None


def _collective(exc: BaseException) -> bool:
    """Failures every rank meets at the same point (decided on values all ranks share)."""
    from repblend_fast.distributed import RanksDiverged
    from repblend_fast.engine.checkpoint import RunInterrupted
    from repblend_fast.engine.distill import DistillationStopped

    return isinstance(exc, (DistillationStopped, RunInterrupted, KeyboardInterrupt, RanksDiverged))


def _error_file(message: str) -> None:
    """The launcher's per-process error file (torchrun shows it in its failure summary)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"message": message, "timestamp": int(time.time())}, fh)
    except OSError:
        pass


# What to do after an interruption, for the commands that can be continued.
_AFTER_INTERRUPT = {
    "buffer": "rerun the same command to finish the store (finished experts are kept)",
    "distill": "continue with --resume from the last checkpoint",
}


def _classify(exc: BaseException, command: str = "") -> tuple[int | None, str]:
    """``(exit status, one-line message)`` of an exception that ends a command."""
    if isinstance(exc, CLIError):  # before the imports below: a bad flag never waits for torch
        return 2, f"error: {exc}"
    from repblend_fast.distributed import DistributedError, PeerFailed
    from repblend_fast.engine.checkpoint import RunInterrupted
    from repblend_fast.engine.distill import DistillationStopped
    from repblend_fast.io import IntegrityError
    from repblend_fast.locks import LockHeldError

    if isinstance(exc, PeerFailed):
        return (exc.status if exc.status is not None else 1), str(exc)
    if isinstance(exc, DistillationStopped):
        return 3, f"error: {exc}"
    if isinstance(exc, (CLIError, IntegrityError, LockHeldError)):
        return 2, f"error: {exc}"
    if isinstance(exc, DistributedError):
        return 2, f"error: {exc}"
    if isinstance(exc, RunInterrupted):
        return 128 + exc.signum, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        # Ctrl-C, or a second signal during a run (StopOnSignal records which).
        signum = getattr(exc, "signum", 2)
        after = _AFTER_INTERRUPT.get(command)
        return 128 + signum, f"interrupted (signal {signum}){f'; {after}' if after else ''}"
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
