"""Plain-torch soft-target contrastive losses (docs/algorithm.md §7): the specification in code.

Every fused implementation is tested against these. All functions are built from differentiable
torch ops only, so they are twice differentiable and work under ``torch.func.grad`` / ``vmap``.

Shapes: ``img`` ``[..., B, D]``, ``txt`` ``[..., B, D]`` (projection-head outputs, not normalised),
``target`` ``[..., B, B]`` (rows = images). The result has the leading shape ``[...]``.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
import torch.nn.functional as F

LOSSES = ("wbce", "infonce", "cwcl", "bce", "mse", "kl")
LOSS_IDS = MappingProxyType({name: i for i, name in enumerate(LOSSES)})
"""Loss name -> the integer id the fused kernels take (the position in :data:`LOSSES`). The one
definition: the Triton kernels and the ops import it; ``csrc/contrastive.cu`` repeats it as
constants, which a test parses and compares with this table."""
SOFTMAX_LOSSES = ("infonce", "cwcl", "kl")
"""The losses built from row and column softmaxes of the logits (the others are elementwise in
``Z``); the fused kernels keep row/column statistics for these only."""
# Count regulariser of the WBCE class weights and the CWCL row masses (a constant of the formula,
# independent of the log epsilon).
MASS_EPS = 1e-6
# F.normalize's clamp of the row norm: ``x / max(||x||, NORM_EPS)``.
NORM_EPS = 1e-12


def logits(img: torch.Tensor, txt: torch.Tensor, logit_scale) -> torch.Tensor:
    """``Z = s * norm(img) @ norm(txt)^T`` -> ``[..., B, B]``."""
    u = F.normalize(img, dim=-1, eps=NORM_EPS)
    v = F.normalize(txt, dim=-1, eps=NORM_EPS)
    return logit_scale * (u @ v.transpose(-1, -2))


def loss_from_logits(z: torch.Tensor, target: torch.Tensor, loss: str = "wbce", eps: float = 1e-6):
    """Loss of logits ``z`` ``[..., B, B]`` against soft targets ``target`` ``[..., B, B]``."""
    if loss == "wbce":
        if eps > 0:
            p = torch.sigmoid(z)
            ell = -target * torch.log(p + eps) - (1 - target) * torch.log(1 - p + eps)
        else:
            ell = -target * F.logsigmoid(z) - (1 - target) * F.logsigmoid(-z)
        pos = (target > 0.5).to(z.dtype).detach()
        neg = 1 - pos
        lp = (ell * pos).sum((-1, -2)) / (pos.sum((-1, -2)) + MASS_EPS)
        ln = (ell * neg).sum((-1, -2)) / (neg.sum((-1, -2)) + MASS_EPS)
        return 0.5 * (lp + ln)
    if loss == "infonce":
        b = z.shape[-1]
        li = -(target * torch.log_softmax(z, dim=-1)).sum((-1, -2)) / b
        lt = -(target * torch.log_softmax(z, dim=-2)).sum((-1, -2)) / b
        return 0.5 * (li + lt)
    if loss == "cwcl":
        b = z.shape[-1]
        row_mass = target.sum(-1, keepdim=True) + MASS_EPS
        col_mass = target.sum(-2, keepdim=True) + MASS_EPS
        li = -(target * torch.log_softmax(z, dim=-1) / row_mass).sum((-1, -2)) / b
        lt = -(target * torch.log_softmax(z, dim=-2) / col_mass).sum((-1, -2)) / b
        return 0.5 * (li + lt)
    if loss == "bce":
        # Same values as F.binary_cross_entropy(sigmoid(z), target): logs of the rounded
        # probabilities, clamped at -100. The inner where keeps the gradient finite (zero) where
        # the probability rounds to exactly 0 or 1.
        p = torch.sigmoid(z)
        q = 1 - p
        logp = torch.where(p > 0, torch.log(torch.where(p > 0, p, torch.ones_like(p))), -100.0)
        logq = torch.where(q > 0, torch.log(torch.where(q > 0, q, torch.ones_like(q))), -100.0)
        ell = -(target * logp.clamp_min(-100) + (1 - target) * logq.clamp_min(-100))
        return ell.mean((-1, -2))
    if loss == "mse":
        return (torch.sigmoid(z) - target).pow(2).mean((-1, -2))
    if loss == "kl":

        def _kl(zz, tt, dim):
            p = torch.softmax(10 * tt, dim=dim)
            logp = torch.log_softmax(10 * tt, dim=dim)
            return (p * (logp - torch.log_softmax(zz, dim=dim))).mean((-1, -2))

        return 0.5 * (_kl(z, target, -1) + _kl(z, target, -2))
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def contrastive_loss(img, txt, target, *, logit_scale, loss: str = "wbce", eps: float = 1e-6):
    """Reference ``contrastive_loss``: ``[]`` for ``[B, D]`` inputs, ``[K]`` for ``[K, B, D]``."""
    return loss_from_logits(logits(img, txt, logit_scale), target, loss=loss, eps=eps)
