"""Differentiable fused ops with ``impl = auto | reference | triton | cuda`` dispatch."""

from repblend_fast.ops.blend import blend_pairs
from repblend_fast.ops.contrastive import contrastive_loss
from repblend_fast.ops.trajectory import TrajectoryTerms, trajectory_distance, trajectory_terms

__all__ = [
    "TrajectoryTerms",
    "blend_pairs",
    "contrastive_loss",
    "trajectory_distance",
    "trajectory_terms",
]
