"""Resumable checkpoints of a distillation run, the run folder's files and their records.

A checkpoint is one safetensors file holding everything :class:`repblend_fast.Distiller` needs to
continue bit-for-bit (synthetic data, learned rates, similarity parameters, optimiser state, the
generator's and samplers' states, counters), with in its header the run's config, the sha256 of
the expert store's ``manifest.json`` it runs against, and the length and sha256 of
``metrics.jsonl`` up to the checkpoint. Reading one checks that it is a checkpoint, that the
current config and store continue it, that its counters are in range and agree with
``metrics.jsonl`` (docs/reliability.md).

Every file a run writes (``config.json``, ``checkpoint.safetensors``, ``distilled.safetensors``)
is listed with its size and sha256 in ``checksums.json`` (:class:`RunRecord`); ``metrics.jsonl``,
which grows by appends, is covered by the checkpoint's record of its prefix (:class:`MetricsLog`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from repblend_fast.config import DistillConfig
from repblend_fast.io import (
    FileDigest,
    IntegrityError,
    json_bytes,
    load_safetensors,
    read_safetensors_header,
    safetensors_bytes,
    verify_file,
    write_atomic,
)

__all__ = [
    "CHECKPOINT",
    "CHECKSUMS",
    "CONFIG",
    "DISTILLED",
    "KIND",
    "METRICS",
    "RECORDED_CHANGES",
    "RESUMABLE_CHANGES",
    "RUN_FILES",
    "SUMMARY",
    "Checkpoint",
    "MetricsLog",
    "RunInterrupted",
    "RunRecord",
    "StopOnSignal",
    "StoppedAtOnce",
    "check_continues",
    "check_run_folder",
    "check_state",
    "open_checkpoint",
    "read_checkpoint",
    "read_metrics_for_resume",
    "truncate_metrics",
    "write_checkpoint",
]

logger = logging.getLogger("repblend_fast.engine.checkpoint")

FORMAT_VERSION = 1
KIND = "repblend_fast.checkpoint"  # the file format's name (kept when the module moved)
# The files of a run folder.
CHECKPOINT = "checkpoint.safetensors"
CONFIG = "config.json"
DISTILLED = "distilled.safetensors"
METRICS = "metrics.jsonl"
CHECKSUMS = "checksums.json"
SUMMARY = "summary.json"
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, DISTILLED, SUMMARY, CHECKSUMS)
# Fields a resumed run may set differently from the run it continues: the learning rates and the
# clamp (the advice of the NaN guard: lower them, then resume), the length and the checkpoint
# cadence. Everything else changes what the saved state means.
RESUMABLE_CHANGES = (
    "iterations",
    "checkpoint_every",
    "lr_img",
    "lr_txt",
    "lr_lr",
    "lr_sim",
    "clamp_lr",
)
# Of those, the ones that change what the run computes from the checkpoint on: a resumed run
# appends a config-change record for them to metrics.jsonl.
RECORDED_CHANGES = ("lr_img", "lr_txt", "lr_lr", "lr_sim", "clamp_lr")

# What to do about run files that are damaged, edited or do not belong together: the run cannot
# be continued from them (--no-verify only skips the sha256: it would resume from altered state).
_FIX_RESUME = "restore the run folder's files from a copy, or start the run over with --overwrite"
# A folder without checksums.json (written by an older version, or the record was removed): its
# files may well be intact, they just cannot be checked.
_FIX_UNCHECKED = "pass --no-verify to resume without the check, or start over with --overwrite"


class RunInterrupted(Exception):
    """SIGINT or SIGTERM stopped a run after it wrote a checkpoint (``--resume`` continues)."""

    def __init__(self, signum: int, iteration: int, checkpoint: Path | None):
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        where = f"; its checkpoint is {checkpoint}: continue with --resume" if checkpoint else ""
        super().__init__(f"interrupted by signal {signum} at iteration {iteration}{where}")


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGINT or SIGTERM stopped a run at once (exit status 128 + ``signum``)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped at once by signal {signum}")


class StopOnSignal:
    """Within a ``with`` block, a first SIGINT or SIGTERM only sets :attr:`signum`, so that the
    loop can finish its iteration and write a checkpoint before it stops (an iteration is never
    cut in half); a second one raises :class:`StoppedAtOnce` (a ``KeyboardInterrupt``) at once.
    Outside the main thread (where handlers cannot be installed) it does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise StoppedAtOnce(signum)
        self.signum = signum
        try:
            os.write(
                2,
                b"\nrepblend-fast: stopping after this iteration to write a checkpoint "
                b"(signal again to stop at once)\n",
            )
        except OSError:
            pass

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}


def check_run_folder(out: Path, *, resume: bool, overwrite: bool) -> tuple[list[str], bool]:
    """``(run files present in out, whether a resume must start over)`` for a run into ``out``;
    ``FileExistsError`` for a folder holding a run without ``resume``/``overwrite``,
    ``FileNotFoundError`` for ``resume`` into a folder without one. Cheap: the command line runs
    it before anything heavy loads, the pipeline again under the folder's lock."""
    if resume and overwrite:
        raise ValueError(
            "--resume continues the run in --out and --overwrite replaces it: pick one"
        )
    present = [n for n in RUN_FILES if (out / n).exists()]
    if present and not (resume or overwrite):
        raise FileExistsError(
            f"{out} already holds a run ({', '.join(present)}): pass --resume to "
            "continue it, --overwrite to replace it, or choose another --out"
        )
    restart = resume and not (out / CHECKPOINT).exists()
    if restart and not present:
        raise FileNotFoundError(f"--resume: {out} holds no run to continue; run without --resume")
    return present, restart


# --------------------------------------------------------------------------- checksums.json
class RunRecord:
    """``checksums.json`` of a run folder: the size and sha256 of each file the run wrote.

    A file is replaced in two steps so that a kill at any point leaves a record that vouches for
    what is on disk: the record first accepts both the old and the new digest, then the file is
    replaced atomically, then the record keeps only the new one.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / CHECKSUMS
        self.files: dict[str, list[FileDigest]] = self._read()

    @property
    def exists(self) -> bool:
        return self.path.is_file()

    def _read(self) -> dict[str, list[FileDigest]]:
        if not self.path.exists():
            return {}
        try:
            obj = json.loads(self.path.read_bytes().decode("utf-8"))
            files = obj["files"]
            return {
                str(k): [FileDigest.from_json(d, f"{self.path}: {k}") for d in v]
                for k, v in files.items()
            }
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise IntegrityError(
                f"{self.path} is damaged (not the JSON record this run wrote); {_FIX_RESUME}"
            ) from None

    def _save(self) -> None:
        obj = {
            "kind": "repblend_fast.run-checksums",
            "algorithm": "sha256",
            "files": {k: [d.to_json() for d in v] for k, v in sorted(self.files.items())},
        }
        write_atomic(self.path, json_bytes(obj))

    def write(self, name: str, data: bytes) -> FileDigest:
        """Write ``data`` to ``folder/name`` atomically and record its digest."""
        new = FileDigest.of_bytes(data)
        old = [d for d in self.files.get(name, []) if d != new][:1]
        self.files[name] = [new, *old]
        self._save()
        write_atomic(self.folder / name, data)
        self.files[name] = [new]
        self._save()
        return new

    def verify(self, name: str, *, fix: str = _FIX_RESUME) -> FileDigest:
        """Check ``folder/name`` against the record (``IntegrityError`` naming it otherwise)."""
        path = self.folder / name
        if not self.exists:
            raise IntegrityError(
                f"{path}: the run folder has no {CHECKSUMS} (written by an older version of "
                f"repblend_fast, or removed), so the file cannot be checked; "
                f"{_FIX_UNCHECKED if fix == _FIX_RESUME else fix}"
            )
        if name not in self.files:
            raise IntegrityError(f"{self.path} records no checksum for {name}; {fix}")
        return verify_file(path, self.files[name], fix=fix)

    def forget(self, *names: str) -> None:
        """Drop the records of ``names`` (files that are being removed)."""
        if any(self.files.pop(n, None) is not None for n in names):
            self._save()


# --------------------------------------------------------------------------- metrics.jsonl
class MetricsLog:
    """``metrics.jsonl``, append-only, with a running sha256 of everything written to it.

    ``keep`` is the content the file must start with when the log is opened (the part a resumed
    run continues; empty for a new run): :meth:`open` truncates the file to it. A failed append
    (disk full) cuts the file back to its last complete record before the error is raised, so
    no torn line is left behind when the system lets us.
    """

    def __init__(self, path: str | os.PathLike, keep: bytes = b""):
        self.path = Path(path)
        self._keep = keep
        self._h = hashlib.sha256(keep)
        self.size = len(keep)
        self.records = sum(1 for r in _parse_lines(keep, self.path) if "iteration" in r)
        self._open = False

    def open(self) -> None:
        """Make the file hold exactly ``keep`` (truncate, or rewrite when it differs)."""
        if self._open:
            return
        n = len(self._keep)
        try:
            with open(self.path, "rb") as fh:
                intact = fh.read(n) == self._keep
        except FileNotFoundError:
            intact = False
        if intact:
            os.truncate(self.path, n)
        else:
            write_atomic(self.path, self._keep)
        self._open = True

    def append(self, rec: Mapping[str, Any]) -> None:
        """Append one record (one JSON line)."""
        self.open()
        line = (json.dumps(rec) + "\n").encode("utf-8")
        try:
            with open(self.path, "ab") as fh:
                fh.write(line)
                fh.flush()
        except OSError as exc:
            try:
                os.truncate(self.path, self.size)
            except OSError:
                pass  # the resume drops the torn line instead
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        self._h.update(line)
        self.size += len(line)
        if "iteration" in rec:
            self.records += 1

    def state(self) -> dict[str, Any]:
        """``{"bytes", "sha256", "records"}`` of what was written so far (for a checkpoint)."""
        return {"bytes": self.size, "sha256": self._h.copy().hexdigest(), "records": self.records}


def _parse_lines(data: bytes, path: Path) -> list[dict]:
    out = []
    for i, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(
                f"{path}: line {i} is not JSON (the file was damaged); {_FIX_RESUME}"
            ) from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: line {i} is not a JSON object; {_FIX_RESUME}")
        out.append(rec)
    return out


def read_metrics_for_resume(
    path: str | os.PathLike, iteration: int, recorded: Mapping[str, Any] | None, *, verify: bool
) -> bytes:
    """The part of ``metrics.jsonl`` a run resumed at ``iteration`` keeps.

    With the checkpoint's record of the file (``recorded``: bytes and sha256 at the
    checkpoint), that prefix must be intact (its sha256 is checked when ``verify``); what
    follows it was written after the checkpoint and is dropped. Without one (a checkpoint of an
    older version) the records of iterations ``>= iteration`` are dropped. Either way a torn
    last line (the run was killed, or the disk filled, while writing it) is dropped with a
    warning naming the file, and the kept records must be iterations ``0 .. iteration-1`` in
    order.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} is not a file (a folder?); {_FIX_RESUME}")
    data = path.read_bytes() if path.exists() else b""
    if recorded is not None:
        n = int(recorded["bytes"])
        if len(data) < n:
            raise IntegrityError(
                f"{path} holds {len(data)} bytes but held {n} when the checkpoint was written "
                f"(it was truncated or replaced); {_FIX_RESUME}"
            )
        keep, tail = data[:n], data[n:]
        if verify and hashlib.sha256(keep).hexdigest() != recorded["sha256"]:
            raise IntegrityError(
                f"{path} was changed before the checkpoint's iteration {iteration} (its first "
                f"{n} bytes differ from what the run wrote); {_FIX_RESUME}"
            )
    else:
        lines = data.splitlines(keepends=True)
        n = 0
        for i, line in enumerate(lines):
            try:
                (rec,) = _parse_lines(line, path) or [{}]
            except ValueError:
                if i == len(lines) - 1:
                    break  # a torn last line
                raise ValueError(
                    f"{path}: line {i + 1} is not JSON (the file was damaged); {_FIX_RESUME}"
                ) from None
            if not line.endswith(b"\n") or rec.get("iteration", -1) >= iteration:
                break
            n += len(line)
        keep, tail = data[:n], data[n:]
    lines = tail.splitlines(keepends=True)
    torn = bool(lines) and not lines[-1].endswith(b"\n")
    if not torn and lines:
        try:
            _parse_lines(lines[-1], path)
        except ValueError:
            torn = True
    if torn:
        logger.warning(
            "%s: dropped a torn last line (the run stopped while writing it)%s",
            path,
            f" and {len(lines) - 1} record(s) written after the checkpoint"
            if len(lines) > 1
            else "",
        )
    elif lines:
        logger.info("%s: dropped %d record(s) written after the checkpoint", path, len(lines))
    its = [r["iteration"] for r in _parse_lines(keep, path) if "iteration" in r]
    # Lengths first: an edited checkpoint may claim any iteration (never build that range).
    if len(its) != iteration or its != list(range(iteration)):
        shown = f"{its[:3]}…{its[-3:]}" if len(its) > 6 else str(its)
        raise ValueError(
            f"{path} and the checkpoint disagree: the checkpoint is at iteration {iteration} but "
            f"the metrics before it are of iterations {shown} (the files do not belong "
            f"together); {_FIX_RESUME}"
        )
    return keep


def truncate_metrics(path: str | os.PathLike, iteration: int) -> None:
    """Drop the records of ``metrics.jsonl`` at ``path`` from ``iteration`` on (written after the
    checkpoint a run resumes from), and a torn last line."""
    path = Path(path)
    if not path.exists():
        return
    MetricsLog(path, read_metrics_for_resume(path, iteration, None, verify=False)).open()


# --------------------------------------------------------------------------- checkpoints
def write_checkpoint(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    config: DistillConfig,
    *,
    store_sha256: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    record: RunRecord | None = None,
) -> Path:
    """Write ``tensors`` (CPU, contiguous) with ``config``, the store's manifest sha256 and the
    ``metrics.jsonl`` state in the header, atomically (recorded in ``record`` when given)."""
    meta = {"format_version": str(FORMAT_VERSION), "kind": KIND, "config": config.to_json()}
    if store_sha256 is not None:
        meta["store_manifest_sha256"] = store_sha256
    if metrics is not None:
        meta["metrics"] = json.dumps(dict(metrics), sort_keys=True)
    data = safetensors_bytes(tensors, metadata=meta)
    path = Path(path)
    if record is not None and path.parent.resolve() == record.folder.resolve():
        record.write(path.name, data)
    else:
        write_atomic(path, data)
    return path


def check_continues(saved: DistillConfig, current: DistillConfig, path) -> None:
    """``ValueError`` unless ``current`` may continue a run configured as ``saved``."""
    if saved.threads and saved.threads != current.threads:
        raise ValueError(
            f"checkpoint {path} was written with {saved.threads} CPU thread(s) and this run "
            f"uses {current.threads}; results depend on the thread count: resume with "
            f"threads={saved.threads} (CLI: --threads {saved.threads})"
        )
    mine = {**current.to_dict(), "threads": saved.threads}
    diff = {
        k: (v, mine[k])
        for k, v in saved.to_dict().items()
        if k not in RESUMABLE_CHANGES and mine[k] != v
    }
    if diff:
        raise ValueError(
            f"checkpoint {path} was written with a different config: "
            + ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            + f" (a resumed run may change only {', '.join(RESUMABLE_CHANGES)})"
        )


@dataclass
class Checkpoint:
    """A checkpoint as read: its tensors, the config it was written with, the sha256 of the
    store's manifest it ran against and the state of ``metrics.jsonl`` it covers."""

    tensors: dict[str, torch.Tensor]
    config: DistillConfig
    store_sha256: str | None
    metrics: dict[str, Any] | None


def open_checkpoint(
    path: str | os.PathLike,
    current: DistillConfig,
    *,
    store_sha256: str | None = None,
    record: RunRecord | None = None,
    verify: bool = True,
) -> Checkpoint:
    """Read the checkpoint at ``path`` after checking it (see the module docstring).

    ``record``: the run folder's :class:`RunRecord`; with ``verify`` the file's bytes must match
    it. ``store_sha256``: the manifest sha256 of the store the resumed run uses. Every problem is
    a ``ValueError`` (``IntegrityError`` for changed bytes) naming the file.
    """
    path = Path(path)
    if verify:
        (record or RunRecord(path.parent)).verify(path.name)
    header = read_safetensors_header(path)
    meta = header.get("__metadata__") or {}
    if meta.get("kind") != KIND:
        raise ValueError(f"{path} is not a repblend_fast checkpoint")
    try:
        saved = DistillConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the config in its header is unreadable ({exc})") from None
    check_continues(saved, current, path)
    have = meta.get("store_manifest_sha256")
    if store_sha256 is not None and have is not None and have != store_sha256:
        raise ValueError(
            f"checkpoint {path} continues a run on the expert store whose manifest.json has "
            f"sha256 {have[:12]}…, but the store given now has {store_sha256[:12]}…: resume with "
            "the --experts the run started with"
        )
    metrics = None
    if "metrics" in meta:
        try:
            metrics = json.loads(meta["metrics"])
            ok = isinstance(metrics, dict) and all(
                isinstance(metrics.get(k), t) for k, t in (("bytes", int), ("sha256", str))
            )
        except (TypeError, ValueError):
            ok = False
        if not ok or metrics["bytes"] < 0:
            raise ValueError(f"{path}: malformed metrics record in its header; {_FIX_RESUME}")
    return Checkpoint(load_safetensors(path), saved, have, metrics)


def read_checkpoint(path: str | os.PathLike, current: DistillConfig) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint at ``path``, after checking that ``current`` continues it
    (no byte check: :func:`open_checkpoint` does that)."""
    return open_checkpoint(path, current, verify=False).tensors


_COUNTERS = ("iteration", "bad_streak", "batch_pos", "expert_pos")
_REQUIRED = ("x", "y", "eta_img", "eta_txt", "rng", "batch_perm", "expert_order", *_COUNTERS)


def check_state(
    t: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    config: DistillConfig,
    num_experts: int,
    params: Mapping[str, torch.Tensor],
    rng_numel: int,
) -> None:
    """``ValueError`` naming ``path`` unless the checkpoint tensors ``t`` are a state this run
    can continue: every counter an integer in range, the sampler orders permutations, the
    generator state of the right size, every parameter of the current shape and finite."""
    missing = [k for k in _REQUIRED if k not in t]
    if missing:
        raise ValueError(f"{path} lacks {missing}: not a complete checkpoint; {_FIX_RESUME}")

    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: {what}; the checkpoint is damaged or was edited: {_FIX_RESUME}")

    counts = {}
    for k in _COUNTERS:
        v = t[k]
        if v.numel() != 1 or v.dtype.is_floating_point or v.dtype == torch.bool:
            raise bad(f"{k} must be one integer, got {v.dtype} of shape {list(v.shape)}")
        counts[k] = int(v.reshape(()))
    it = counts["iteration"]
    if it > config.iterations:
        raise ValueError(
            f"{path} is at iteration {it}, past iterations={config.iterations}: a resumed run "
            f"cannot end earlier than its checkpoint; resume with --iterations {it} or more"
        )
    limits = {
        "iteration": (0, None),
        "bad_streak": (0, min(config.nan_patience, it)),
        "batch_pos": (0, config.pairs),
        "expert_pos": (0, num_experts),
    }
    for k, (lo, hi) in limits.items():
        if counts[k] < lo or (hi is not None and counts[k] > hi):
            raise bad(f"{k} = {counts[k]} is outside [{lo}, {'∞' if hi is None else hi}]")
    for k, n in (("batch_perm", config.pairs), ("expert_order", num_experts)):
        v = t[k]
        if v.dim() != 1 or v.numel() != n or v.dtype.is_floating_point:
            raise bad(f"{k} must be a permutation of 0..{n - 1}")
        if not torch.equal(torch.sort(v.long()).values, torch.arange(n)):
            raise bad(f"{k} must be a permutation of 0..{n - 1}")
    if t["rng"].dtype != torch.uint8 or t["rng"].numel() != rng_numel:
        raise bad("the generator state has the wrong type or size")
    for name, p in params.items():
        v = t.get(name)
        if v is None:
            raise bad(f"it has no {name}")
        if tuple(v.shape) != tuple(p.shape):
            raise ValueError(_shape_mismatch(path, name, tuple(v.shape), tuple(p.shape)))
        if not bool(torch.isfinite(v).all()):
            raise bad(f"{name} holds non-finite values")


def _shape_mismatch(path, name: str, saved: tuple, now: tuple) -> str:
    """The message for a checkpoint tensor of another shape than this run's: the run was started
    with other settings (image size, pairs, encoders), which a resume must repeat."""
    if name == "x" and len(saved) == 4 and len(now) == 4 and saved[:2] == now[:2]:
        return (
            f"{path}: the run's synthetic images are {saved[2]}x{saved[3]} px but this run's "
            f"are {now[2]}x{now[3]}: resume with --image-size {saved[2]}, the size it started with"
        )
    return (
        f"{path}: {name} has shape {list(saved)}, this run's has {list(now)}: resume with the "
        "settings the run started with (--pairs, --image-size, the encoders)"
    )
