"""Coreset baselines for the evaluation: ``n`` real pairs chosen at random, by herding, or by
greedy k-center, each returned as ``(image features [n, d_f], text features [n, d_t], caption
indices [n])`` of a :class:`~repblend_fast.features.FeaturePairs` training split (one caption per
image, distinct images).
"""

from __future__ import annotations

import torch

from repblend_fast.features import FeaturePairs

__all__ = ["herding_subset", "kcenter_subset", "random_subset"]


def _one_caption_per_image(train, g: torch.Generator) -> torch.Tensor:
    """For every image, one of its captions drawn uniformly: ``[N_img]`` caption indices."""
    c2i = train.cap2img.cpu()
    n_img = train.img.shape[0]
    order = torch.randperm(c2i.numel(), generator=g)
    first = torch.full((n_img,), -1, dtype=torch.long)
    first[c2i[order].flip(0)] = order.flip(0)  # last write wins -> earliest in `order`
    if (first < 0).any():
        raise ValueError("some images have no caption; cannot pick one pair per image")
    return first


def _joint_pairs(train: FeaturePairs, caps: torch.Tensor) -> torch.Tensor:
    """Row-normalised image and text features of the pairs ``caps``, side by side ``[n, d_f+d_t]``
    (each modality weighs the same in the distances)."""
    c2i = train.cap2img.cpu()
    img = torch.nn.functional.normalize(train.img[c2i[caps].to(train.img.device)].float(), dim=-1)
    txt = torch.nn.functional.normalize(train.txt[caps.to(train.txt.device)].float(), dim=-1)
    return torch.cat([img, txt], dim=-1).cpu()


def _check_n(n: int, train: FeaturePairs) -> None:
    if not 0 < n <= train.img.shape[0]:
        raise ValueError(f"n must be in [1, {train.img.shape[0]}] (distinct images), got {n}")


def kcenter_subset(
    train: FeaturePairs, n: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy k-center coreset baseline: ``n`` real pairs (one caption per image, drawn with
    ``seed``), chosen in the joint normalised image+text feature space: start from a random pair,
    then repeatedly add the pair farthest from everything chosen. Returns like
    :func:`random_subset`."""
    _check_n(n, train)
    caps_all = _one_caption_per_image(train, torch.Generator().manual_seed(int(seed)))
    x = _joint_pairs(train, caps_all)
    g = torch.Generator().manual_seed(int(seed) + 1)
    chosen = [int(torch.randint(x.shape[0], (), generator=g))]
    dist = torch.cdist(x, x[chosen[0]][None]).squeeze(1)
    for _ in range(n - 1):
        nxt = int(torch.argmax(dist))
        chosen.append(nxt)
        dist = torch.minimum(dist, torch.cdist(x, x[nxt][None]).squeeze(1))
    caps = caps_all[torch.tensor(chosen)]
    c2i = train.cap2img.cpu()
    return train.img[c2i[caps].to(train.img.device)], train.txt[caps.to(train.txt.device)], caps


def herding_subset(
    train: FeaturePairs, n: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Herding baseline (Welling 2009): ``n`` real pairs (one caption per image, drawn with
    ``seed``) added greedily so that the mean of the chosen joint normalised image+text features
    stays closest to the mean over all pairs. Returns like :func:`random_subset`."""
    _check_n(n, train)
    caps_all = _one_caption_per_image(train, torch.Generator().manual_seed(int(seed)))
    x = _joint_pairs(train, caps_all)
    mu = x.mean(0)
    total = torch.zeros_like(mu)
    free = torch.ones(x.shape[0], dtype=torch.bool)
    chosen = []
    for k in range(1, n + 1):
        cand = ((total + x) / k - mu).pow(2).sum(1)
        cand[~free] = float("inf")
        nxt = int(torch.argmin(cand))
        chosen.append(nxt)
        free[nxt] = False
        total += x[nxt]
    caps = caps_all[torch.tensor(chosen)]
    c2i = train.cap2img.cpu()
    return train.img[c2i[caps].to(train.img.device)], train.txt[caps.to(train.txt.device)], caps


def random_subset(
    train: FeaturePairs, n: int, seed: int = 0, *, distinct_images: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random-selection baseline: ``n`` real pairs.

    With ``distinct_images`` (default) ``n`` different images are drawn, each with one of its
    captions drawn uniformly; otherwise ``n`` captions are drawn uniformly (an image may repeat).
    Returns ``(img [n, d_f], txt [n, d_t], caption_indices [n])``; deterministic in ``seed``.
    """
    g = torch.Generator().manual_seed(int(seed))
    c2i = train.cap2img.cpu()
    if distinct_images:
        n_img = train.img.shape[0]
        if not 0 < n <= n_img:
            raise ValueError(f"n must be in [1, {n_img}] (distinct images), got {n}")
        first = _one_caption_per_image(train, g)
        imgs = torch.randperm(n_img, generator=g)[:n]
        caps = first[imgs]
    else:
        if not 0 < n <= c2i.numel():
            raise ValueError(f"n must be in [1, {c2i.numel()}], got {n}")
        caps = torch.randperm(c2i.numel(), generator=g)[:n]
    caps_d = caps.to(train.txt.device)
    return train.img[c2i[caps].to(train.img.device)], train.txt[caps_d], caps
