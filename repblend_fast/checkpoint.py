"""Resumable checkpoints of a distillation run, and the run folder's file names.

A checkpoint is one safetensors file holding everything :class:`repblend_fast.Distiller` needs to
continue bit-for-bit (synthetic data, learned rates, similarity parameters, momentum buffers, the
generator's and samplers' states, counters), with the run's config in its header. Reading one
checks that it is a checkpoint and that the current config continues it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from repblend_fast.config import DistillConfig

__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "DISTILLED",
    "KIND",
    "METRICS",
    "read_checkpoint",
    "truncate_metrics",
    "write_checkpoint",
]

FORMAT_VERSION = 1
KIND = "repblend_fast.checkpoint"
# The files of a run folder.
CHECKPOINT = "checkpoint.safetensors"
CONFIG = "config.json"
DISTILLED = "distilled.safetensors"
METRICS = "metrics.jsonl"
# Fields a resumed run may set differently from the run it continues.
RESUMABLE_CHANGES = ("iterations", "checkpoint_every")


def write_checkpoint(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], config: DistillConfig
) -> Path:
    """Write ``tensors`` (CPU, contiguous) with ``config`` in the header, atomically."""
    from repblend_fast.io import atomic_save_safetensors

    meta = {"format_version": str(FORMAT_VERSION), "kind": KIND, "config": config.to_json()}
    return atomic_save_safetensors(tensors, path, metadata=meta)


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
        )


def read_checkpoint(path: str | os.PathLike, current: DistillConfig) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint at ``path``, after checking that ``current`` continues it."""
    from repblend_fast.io import load_safetensors, safetensors_metadata

    meta = safetensors_metadata(path)
    if meta.get("kind") != KIND:
        raise ValueError(f"{path} is not a repblend_fast checkpoint")
    check_continues(DistillConfig.from_dict(json.loads(meta["config"])), current, path)
    return load_safetensors(path)


def truncate_metrics(path: str | os.PathLike, iteration: int) -> None:
    """Drop the records of ``metrics.jsonl`` at ``path`` from ``iteration`` on (written after the
    checkpoint a run resumes from)."""
    from repblend_fast.io import atomic_write_text

    path = Path(path)
    if not path.exists():
        return
    keep = [
        ln
        for ln in path.read_text(encoding="utf-8").splitlines()
        if ln.strip() and json.loads(ln).get("iteration", 0) < iteration
    ]
    atomic_write_text("".join(ln + "\n" for ln in keep), path)
