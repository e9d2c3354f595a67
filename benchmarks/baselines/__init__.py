"""Baselines for the step benchmarks: the LoRS and RepBlend algorithms run the way their authors
run them (eager fp32 loops), re-implemented here from SPEC.md (no code of theirs is used)."""

from benchmarks.baselines.authors import (
    AuthorsHead,
    AuthorsSettings,
    LoRSAuthors,
    LoRSModel,
    LowRankSim,
    RepBlendAuthors,
    RepBlendModel,
    split_pieces,
    wbce_loss,
)

__all__ = [
    "AuthorsHead",
    "AuthorsSettings",
    "LoRSAuthors",
    "LoRSModel",
    "LowRankSim",
    "RepBlendAuthors",
    "RepBlendModel",
    "split_pieces",
    "wbce_loss",
]
