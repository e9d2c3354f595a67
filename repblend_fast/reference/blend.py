"""Plain-torch representation blending (docs/algorithm.md §4 step 3): ``lam*x + (1-lam)*x[perm]``.

``img`` ``[(K,) B, Di]``, ``txt`` ``[(K,) B, Dt]``, ``perm`` ``[(K,) B]`` long, ``lam`` float or
tensor ``[]`` / ``[K]``. The same permutation and coefficient blend both modalities.
"""

from __future__ import annotations

import torch


def _lam_view(lam, x: torch.Tensor) -> torch.Tensor | float:
    if isinstance(lam, torch.Tensor) and lam.dim() == 1:
        return lam.to(x.dtype).reshape(lam.shape[0], *([1] * (x.dim() - 1)))
    if isinstance(lam, torch.Tensor):
        return lam.to(x.dtype)
    return lam


def blend_one(x: torch.Tensor, perm: torch.Tensor, lam) -> torch.Tensor:
    # A [B] perm broadcasts over the K batches of a [K, B, D] input.
    idx = perm.unsqueeze(-1).expand(x.shape)
    xp = torch.gather(x, -2, idx)
    lam_v = _lam_view(lam, x)
    return lam_v * x + (1 - lam_v) * xp


def blend_pairs(img: torch.Tensor, txt: torch.Tensor, perm: torch.Tensor, lam):
    """Reference ``blend_pairs`` -> ``(img_blended, txt_blended)``."""
    return blend_one(img, perm, lam), blend_one(txt, perm, lam)
