"""Trajectory distance with implementation dispatch (STUB: reference only, being replaced)."""

from __future__ import annotations

from repblend_fast.reference import trajectory as _ref
from repblend_fast.reference.trajectory import TrajectoryTerms


def trajectory_distance(student, start, target, *, impl="auto"):
    return _ref.trajectory_distance(student, start, target)


def trajectory_terms(start, target, grad_sum, lr, *, impl="auto") -> TrajectoryTerms:
    return _ref.trajectory_terms(start, target, grad_sum, lr)
