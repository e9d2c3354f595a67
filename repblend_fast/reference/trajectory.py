"""Plain-torch trajectory distance and its TESLA terms (docs/algorithm.md §4 step 4, §5, §11e).

A parameter vector is a 1-D tensor or a sequence of tensors (pieces of one flattened vector).
All reductions accumulate in float64 here (the reference is the accuracy yardstick).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TrajectoryTerms(NamedTuple):
    """One pass over (theta0, theta*, G) with step size eta; Delta = theta* - theta0.

    denom: ``||Delta||^2``; num: ``||Delta + eta G||^2`` (= ``||theta_T - theta*||^2`` when
    ``theta_T = theta0 - eta G``); dot: ``(Delta + eta G)^T G``; direction:
    ``c = eta (Delta + eta G)`` (pieces like the inputs), the pass-2 direction before the scalar
    weight ``1/D``.
    """

    denom: torch.Tensor
    num: torch.Tensor
    dot: torch.Tensor
    direction: torch.Tensor | list[torch.Tensor]


def as_pieces(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    return list(x)


def trajectory_distance(student, start, target) -> torch.Tensor:
    """``||student - target||^2 / ||start - target||^2`` (fp32 result, float64 accumulation)."""
    s, a, t = as_pieces(student), as_pieces(start), as_pieces(target)
    num = sum(((si.double() - ti.double()) ** 2).sum() for si, ti in zip(s, t))
    den = sum(((ai.double() - ti.double()) ** 2).sum() for ai, ti in zip(a, t))
    out_dtype = torch.float64 if s[0].dtype == torch.float64 else torch.float32
    return (num / den).to(out_dtype)


def trajectory_terms(start, target, grad_sum, lr) -> TrajectoryTerms:
    """Reference of the fused one-pass TESLA terms (see :class:`TrajectoryTerms`)."""
    a, t, g = as_pieces(start), as_pieces(target), as_pieces(grad_sum)
    if isinstance(lr, torch.Tensor):
        eta = lr.double()
    else:
        eta = torch.tensor(float(lr), dtype=torch.float64)
    denom = num = dot = 0
    direction = []
    for ai, ti, gi in zip(a, t, g):
        delta = ti.double() - ai.double()
        r = delta + eta * gi.double()
        denom = denom + (delta * delta).sum()
        num = num + (r * r).sum()
        dot = dot + (r * gi.double()).sum()
        direction.append((eta * r).to(gi.dtype))
    acc = torch.float64 if a[0].dtype == torch.float64 else torch.float32
    out_dir = direction[0] if isinstance(start, torch.Tensor) else direction
    return TrajectoryTerms(denom.to(acc), num.to(acc), dot.to(acc), out_dir)
