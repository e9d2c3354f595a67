"""Soft-target contrastive losses with implementation dispatch (STUB: reference only, being replaced)."""

from __future__ import annotations

from repblend_fast.reference import contrastive as _ref


def contrastive_loss(img, txt, target, *, logit_scale, loss="wbce", eps=1e-6, impl="auto"):
    return _ref.contrastive_loss(img, txt, target, logit_scale=logit_scale, loss=loss, eps=eps)
