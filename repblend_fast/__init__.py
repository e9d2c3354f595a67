"""repblend_fast: fast multimodal (image-text) dataset distillation.

RepBlend (representation blending + symmetric trajectory matching) with LoRS and MTT-VL as baselines
in the same engine. Importing the package needs only torch and probes no device; the distillation
entry points below are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from repblend_fast.ops import blend_pairs, contrastive_loss, trajectory_distance, trajectory_terms

__version__ = "0.1.0"

_LAZY = {
    "DistillConfig": "repblend_fast.config",
    "preset": "repblend_fast.config",
    "PRESETS": "repblend_fast.config",
    "Distiller": "repblend_fast.engine.distill",
    "DistilledSet": "repblend_fast.engine.distill",
    "NonFiniteLossError": "repblend_fast.engine.distill",
    "CollapseError": "repblend_fast.engine.distill",
    "DistillationStopped": "repblend_fast.engine.distill",
    "TrajectoryStore": "repblend_fast.experts",
    "train_experts_symmetric": "repblend_fast.experts",
    "train_experts_lors": "repblend_fast.experts",
    "Unroller": "repblend_fast.engine.unroll",
    "UnrollSettings": "repblend_fast.engine.unroll",
    "StepPlan": "repblend_fast.engine.unroll",
    "LowRankSimilarity": "repblend_fast.engine.similarity",
    "FullSimilarity": "repblend_fast.engine.similarity",
    "evaluate_distilled": "repblend_fast.evaluate",
    "retrieval_metrics": "repblend_fast.metrics",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'repblend_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "__version__",
    "blend_pairs",
    "contrastive_loss",
    "trajectory_distance",
    "trajectory_terms",
    *_LAZY,
]
