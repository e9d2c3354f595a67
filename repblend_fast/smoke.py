"""Smoke run: one forward/backward through every fused op on random CPU tensors."""

from __future__ import annotations

import torch

from repblend_fast import blend_pairs, contrastive_loss, trajectory_distance


def main() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.randn(20, 64, generator=g, requires_grad=True)
    txt = torch.randn(20, 64, generator=g, requires_grad=True)
    perm = torch.randperm(20, generator=g)
    bi, bt = blend_pairs(img, txt, perm, 0.7)
    loss = contrastive_loss(bi, bt, torch.eye(20), logit_scale=1 / 0.07)
    loss.backward()
    theta = torch.randn(1000, generator=g)
    dist = trajectory_distance(theta, torch.zeros(1000), torch.ones(1000))
    print(f"contrastive_loss={loss.item():.4f} trajectory_distance={dist.item():.4f} ok")


if __name__ == "__main__":
    main()
