"""Plain-torch references of every fused op, with the same signatures as ``repblend_fast.ops``."""

from repblend_fast.reference.blend import blend_pairs
from repblend_fast.reference.contrastive import LOSS_IDS, LOSSES, contrastive_loss
from repblend_fast.reference.trajectory import (
    TrajectoryTerms,
    trajectory_distance,
    trajectory_terms,
)

__all__ = [
    "LOSSES",
    "LOSS_IDS",
    "TrajectoryTerms",
    "blend_pairs",
    "contrastive_loss",
    "trajectory_distance",
    "trajectory_terms",
]
