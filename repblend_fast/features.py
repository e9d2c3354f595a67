"""Encoder features of a real split (:class:`FeaturePairs`), what the evaluation protocol
(:mod:`repblend_fast.evaluate`) trains and scores on and the coreset baselines
(:mod:`repblend_fast.coresets`) choose from."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FeaturePairs"]


@dataclass
class FeaturePairs:
    """Encoder features of a real split: ``img`` ``[N_img, d_f]``, ``txt`` ``[N_cap, d_t]``,
    ``cap2img`` ``[N_cap]`` (image of each caption)."""

    img: torch.Tensor
    txt: torch.Tensor
    cap2img: torch.Tensor

    def __post_init__(self) -> None:
        self.cap2img = torch.as_tensor(self.cap2img, dtype=torch.long).reshape(-1)
        if self.img.dim() != 2 or self.txt.dim() != 2:
            raise ValueError("img and txt features must be 2-D [N, d]")
        if self.cap2img.numel() != self.txt.shape[0]:
            raise ValueError(
                f"cap2img has {self.cap2img.numel()} entries for {self.txt.shape[0]} captions"
            )

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One row per caption: ``(img[cap2img] [N_cap, d_f], txt [N_cap, d_t])``."""
        return self.img[self.cap2img.to(self.img.device)], self.txt
