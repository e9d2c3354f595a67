"""Representation blending with implementation dispatch (STUB: reference only, being replaced)."""

from __future__ import annotations

from repblend_fast.reference import blend as _ref


def blend_pairs(img, txt, perm, lam, *, impl="auto"):
    return _ref.blend_pairs(img, txt, perm, lam)
