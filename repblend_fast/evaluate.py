"""Evaluation protocol (SPEC.md §8): train fresh projection heads on (distilled) pairs with frozen
encoders, then retrieve on the real test set.

Everything works on encoder *features* (the caller runs the frozen encoders once, e.g. through
:func:`repblend_fast.data.cached_features`; a distilled set's images are passed as their features).

Reference protocol (``train_on_pairs`` defaults): fresh heads from a seeded generator; epochs
0..100; SGD momentum 0.9, weight decay 5e-4 (on all head parameters), lr = the learned η per
side, ×0.1 from epoch 51 on (the reference's ``MultiStepLR(milestones=[Epoch//2+1])`` stepped
after each epoch; the momentum buffer is kept); each epoch runs ``ceil(N/128)`` batches, each
batch the first ``min(128, N)`` items of a fresh permutation (the reference
``SimilarityDataloader``: one batch per epoch for N ≤ 128); loss against the block ``S[I, I]`` of
the learned target (identity when none); no blending; dropout 0.1 on during training, off for
test embeddings; fixed s = 1/0.07. The test score matrix is ``s · Û V̂ᵀ``; see
:mod:`repblend_fast.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from repblend_fast.metrics import retrieval_metrics
from repblend_fast.models.heads import HeadSpec, head_forward, init_head_flat
from repblend_fast.ops import contrastive_loss

DEFAULT_LOGIT_SCALE = 1.0 / 0.07
EvalFn = Callable[[int, torch.Tensor, torch.Tensor], "dict[str, Any] | None"]


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


@dataclass
class TrainResult:
    """Trained heads (flat parameters ``[numel]``), per-epoch mean training loss and the outputs of
    the evaluation callback (``{"epoch": e, **eval_fn(...)}``)."""

    img_params: torch.Tensor
    txt_params: torch.Tensor
    img_spec: HeadSpec
    txt_spec: HeadSpec
    losses: list[float] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    diverged: bool = False


def check_lr(value: float | torch.Tensor, side: str) -> float:
    """A learned learning rate as a float; ``ValueError`` if negative or non-finite."""
    v = float(value.detach().reshape(-1)[0]) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(
            f"learned {side} learning rate is {v!r}: it must be finite and >= 0. The distilled "
            f"η went {'non-finite' if not math.isfinite(v) else 'negative'}; clamp it during "
            f"distillation (clamp_lr) or pass a valid lr_{side} explicitly"
        )
    return v


def _batches(n: int, batch_size: int, sampling: str, gen: torch.Generator) -> list[torch.Tensor]:
    if sampling == "reference":
        b = min(batch_size, n)
        return [torch.randperm(n, generator=gen)[:b] for _ in range(math.ceil(n / batch_size))]
    if sampling == "epoch":
        return list(torch.randperm(n, generator=gen).split(batch_size))
    raise ValueError(f"sampling must be 'reference' or 'epoch', got {sampling!r}")


def train_on_pairs(
    img_feats: torch.Tensor,
    txt_feats: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    lr_img: float | torch.Tensor,
    lr_txt: float | torch.Tensor,
    dim: int,
    epochs: int = 101,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    decay_epoch: int | None = 51,
    decay_factor: float = 0.1,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    loss: str = "wbce",
    eps: float = 1e-6,
    seed: int = 0,
    dropout: float = 0.1,
    sampling: str = "reference",
    eval_fn: EvalFn | None = None,
    eval_every: int = 10,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train fresh image and text heads on ``N`` pairs of features.

    Args:
        img_feats: ``[N, d_f]`` frozen image-encoder features (row i pairs with text row i).
        txt_feats: ``[N, d_t]`` text features.
        target: ``[N, N]`` soft similarity target (rows = images), ``None`` = identity.
        lr_img, lr_txt: per-side SGD learning rates (learned η; validated by :func:`check_lr`).
        dim: head output width ``D``.
        epochs: number of epochs (101 = epochs 0..100).
        decay_epoch: epochs ``>= decay_epoch`` use ``lr × decay_factor`` (``None``: no decay).
        sampling: ``"reference"`` (``ceil(N/B)`` batches per epoch, each the first ``min(B, N)``
            items of a fresh permutation) or ``"epoch"`` (one permutation cut into consecutive
            batches: a normal epoch over all pairs, used for full-data training).
        eval_fn: called as ``eval_fn(epoch, img_params, txt_params)`` (detached flat parameters,
            heads in eval mode are the caller's to run) at every epoch ``e`` with
            ``e % eval_every == 0`` and at the last epoch; a returned dict is stored in
            ``history``. ``eval_every=10`` gives the reference's epochs 0, 10, ..., 100.
        seed: seeds head init (image head first, then text head), batch order and dropout.

    Returns a :class:`TrainResult`. Training stops early (``diverged=True``) on a non-finite loss.
    """
    lr_i, lr_t = check_lr(lr_img, "img"), check_lr(lr_txt, "txt")
    if img_feats.dim() != 2 or txt_feats.dim() != 2 or img_feats.shape[0] != txt_feats.shape[0]:
        raise ValueError(
            f"need img_feats [N, d_f] and txt_feats [N, d_t] with equal N, got "
            f"{tuple(img_feats.shape)} and {tuple(txt_feats.shape)}"
        )
    n = img_feats.shape[0]
    if n < 1 or epochs < 1 or batch_size < 1 or eval_every < 1:
        raise ValueError("need N >= 1, epochs >= 1, batch_size >= 1, eval_every >= 1")
    dev = torch.device(device) if device is not None else img_feats.device
    x = img_feats.detach().to(dev, torch.float32)
    y = txt_feats.detach().to(dev, torch.float32)
    if target is not None:
        if tuple(target.shape) != (n, n):
            raise ValueError(f"target must be [N, N] = [{n}, {n}], got {tuple(target.shape)}")
        target = target.detach().to(dev, torch.float32)
    spec_i, spec_t = HeadSpec(x.shape[1], dim), HeadSpec(y.shape[1], dim)
    g_init = torch.Generator().manual_seed(int(seed))
    p_img = init_head_flat(spec_i.d_in, dim, generator=g_init).to(dev).requires_grad_(True)
    p_txt = init_head_flat(spec_t.d_in, dim, generator=g_init).to(dev).requires_grad_(True)
    g_batch = torch.Generator().manual_seed(int(seed) + 1_000_003)
    g_drop = torch.Generator(device=dev).manual_seed(int(seed) + 2_000_003)
    opt = torch.optim.SGD(
        [{"params": [p_img], "lr": lr_i}, {"params": [p_txt], "lr": lr_t}],
        lr=lr_i,
        momentum=momentum,
        weight_decay=weight_decay,
    )
    result = TrainResult(p_img.detach(), p_txt.detach(), spec_i, spec_t)
    eye = torch.eye(min(batch_size, n), device=dev)
    epoch_iter: Any = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epoch_iter = tqdm(epoch_iter, desc="eval-train", unit="ep")
    for ep in epoch_iter:
        scale = decay_factor if decay_epoch is not None and ep >= decay_epoch else 1.0
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lr_i * scale, lr_t * scale
        total, count = 0.0, 0
        for idx in _batches(n, batch_size, sampling, g_batch):
            idx = idx.to(dev)
            b = idx.numel()
            s_blk = target[idx[:, None], idx] if target is not None else eye[:b, :b]
            u = head_forward(p_img, x[idx], spec_i, dropout=dropout, generator=g_drop)
            v = head_forward(p_txt, y[idx], spec_t, dropout=dropout, generator=g_drop)
            ell = contrastive_loss(u, v, s_blk, logit_scale=logit_scale, loss=loss, eps=eps)
            opt.zero_grad(set_to_none=True)
            ell.backward()
            opt.step()
            total += ell.item() * b
            count += b
        result.losses.append(total / count)
        if not math.isfinite(result.losses[-1]):
            result.diverged = True
        last = ep == epochs - 1 or result.diverged
        if eval_fn is not None and (ep % eval_every == 0 or last):
            out = eval_fn(ep, p_img.detach(), p_txt.detach())
            if out is not None:
                result.history.append({"epoch": ep, **out})
        if result.diverged:
            break
    result.img_params, result.txt_params = p_img.detach(), p_txt.detach()
    return result


@torch.no_grad()
def embed(
    params: torch.Tensor, feats: torch.Tensor, spec: HeadSpec, *, batch_size: int = 4096
) -> torch.Tensor:
    """Head outputs (dropout off, not normalised) ``[N, D]`` of features ``[N, d_in]``."""
    p = params.detach()
    outs = [
        head_forward(p, feats[s : s + batch_size].to(p.device, torch.float32), spec)
        for s in range(0, feats.shape[0], batch_size)
    ]
    return torch.cat(outs) if outs else feats.new_zeros(0, spec.dim)


@torch.no_grad()
def evaluate_heads(
    img_params: torch.Tensor,
    txt_params: torch.Tensor,
    img_spec: HeadSpec,
    txt_spec: HeadSpec,
    test: FeaturePairs,
    *,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    batch_size: int = 4096,
) -> dict[str, float]:
    """Retrieval metrics of trained heads on real test features: score ``s · Û V̂ᵀ``
    ``[N_img, N_cap]`` -> :func:`repblend_fast.metrics.retrieval_metrics`."""
    u = F.normalize(embed(img_params, test.img, img_spec, batch_size=batch_size), dim=-1)
    v = F.normalize(embed(txt_params, test.txt, txt_spec, batch_size=batch_size), dim=-1)
    return retrieval_metrics(logit_scale * (u @ v.T), test.cap2img.to(u.device))


def _summary(rows: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = rows[0].keys()
    arr = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in keys}
    # Population std (numpy's default), as the reference reports np.std over its runs.
    return {
        "mean": {k: float(a.mean()) for k, a in arr.items()},
        "std": {k: float(a.std()) for k, a in arr.items()},
    }


def _select(history: list[dict[str, Any]], key: str) -> dict[str, Any]:
    best = None
    for h in history:  # strictly greater: the earliest best epoch wins, as in the reference
        if best is None or h[key]["mean"] > best[key]["mean"]:
            best = h
    assert best is not None
    return best


def evaluate_distilled(
    img_feats: torch.Tensor,
    txt_feats: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    lr_img: float | torch.Tensor,
    lr_txt: float | torch.Tensor,
    test: FeaturePairs,
    dim: int,
    val: FeaturePairs | None = None,
    num_eval: int = 5,
    seeds: Sequence[int] | None = None,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    progress: bool = False,
    **train_kw: Any,
) -> dict[str, Any]:
    """Train ``num_eval`` fresh head pairs on the pairs (SPEC.md §8) and report retrieval.

    Args:
        img_feats, txt_feats, target: as :func:`train_on_pairs` (``[N, d_f]``, ``[N, d_t]``,
            ``[N, N]`` or ``None``).
        test: real test features; val: optional real validation features.
        seeds: one training seed per run (default ``0 .. num_eval-1``).
        train_kw: more :func:`train_on_pairs` options (epochs, loss, sampling, eval_every, ...).

    Returns a JSON-serialisable dict:
        ``per_seed``: list of ``{"seed", "best_epoch", "best", "last", "final_loss", "diverged"}``
        (+ ``"val_epoch"``, ``"val_selected"`` with ``val``), metrics dicts as
        :func:`retrieval_metrics`;
        ``best`` (best epoch chosen **on test**, reference parity), ``last`` (last epoch),
        ``val_selected`` (test metrics at the epoch best on ``val``; only with ``val``): each
        ``{"mean": {...}, "std": {...}}`` over seeds.
    """
    lr_i, lr_t = check_lr(lr_img, "img"), check_lr(lr_txt, "txt")
    seeds = list(range(num_eval)) if seeds is None else list(seeds)
    if not seeds:
        raise ValueError("need at least one evaluation run (num_eval >= 1)")
    per_seed = []
    specs = (HeadSpec(img_feats.shape[1], dim), HeadSpec(txt_feats.shape[1], dim))

    def eval_fn(ep: int, pi: torch.Tensor, pt: torch.Tensor) -> dict[str, Any]:
        out = {"test": evaluate_heads(pi, pt, *specs, test, logit_scale=logit_scale)}
        if val is not None:
            out["val"] = evaluate_heads(pi, pt, *specs, val, logit_scale=logit_scale)
        return out

    for sd in seeds:
        res = train_on_pairs(
            img_feats,
            txt_feats,
            target,
            lr_img=lr_i,
            lr_txt=lr_t,
            dim=dim,
            seed=sd,
            logit_scale=logit_scale,
            eval_fn=eval_fn,
            progress=progress,
            **train_kw,
        )
        best = _select(res.history, "test")
        row = {
            "seed": sd,
            "best_epoch": best["epoch"],
            "best": best["test"],
            "last_epoch": res.history[-1]["epoch"],
            "last": res.history[-1]["test"],
            "final_loss": res.losses[-1],
            "diverged": res.diverged,
        }
        if val is not None:
            vbest = _select(res.history, "val")
            row["val_epoch"] = vbest["epoch"]
            row["val_selected"] = vbest["test"]
        per_seed.append(row)
    report: dict[str, Any] = {
        "per_seed": per_seed,
        "best": _summary([r["best"] for r in per_seed]),
        "last": _summary([r["last"] for r in per_seed]),
        "num_pairs": int(img_feats.shape[0]),
        "lr_img": lr_i,
        "lr_txt": lr_t,
    }
    if val is not None:
        report["val_selected"] = _summary([r["val_selected"] for r in per_seed])
    return report


# ------------------------------------------------------------------------------ baselines
def _one_caption_per_image(train: FeaturePairs, seed: int) -> torch.Tensor:
    """For every image, one of its captions drawn uniformly: ``[N_img]`` caption indices."""
    g = torch.Generator().manual_seed(int(seed))
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
    caps_all = _one_caption_per_image(train, seed)
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
    caps_all = _one_caption_per_image(train, seed)
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
        # Random caption per image: shuffle captions, keep the first caption seen per image.
        order = torch.randperm(c2i.numel(), generator=g)
        first = torch.full((n_img,), -1, dtype=torch.long)
        first[c2i[order].flip(0)] = order.flip(0)  # last write wins -> earliest in `order`
        if (first < 0).any():
            raise ValueError("some images have no caption; cannot pick distinct images")
        imgs = torch.randperm(n_img, generator=g)[:n]
        caps = first[imgs]
    else:
        if not 0 < n <= c2i.numel():
            raise ValueError(f"n must be in [1, {c2i.numel()}], got {n}")
        caps = torch.randperm(c2i.numel(), generator=g)[:n]
    caps_d = caps.to(train.txt.device)
    return train.img[c2i[caps].to(train.img.device)], train.txt[caps_d], caps


def evaluate_full_data(
    train: FeaturePairs,
    test: FeaturePairs,
    *,
    dim: int,
    lr_img: float = 0.1,
    lr_txt: float = 0.1,
    epochs: int = 10,
    loss: str = "infonce",
    decay_epoch: int | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """Upper-bound baseline: :func:`evaluate_distilled` on every real training pair (one row per
    caption, identity targets) with ``sampling="epoch"`` — normal epochs over all batches of a
    permutation (the reference's one-batch-per-epoch sampling is meant for N ≤ a few hundred).
    Defaults follow DESIGN.md §6's calibration (symmetric InfoNCE, SGD 0.1, momentum 0.9,
    wd 5e-4); ``epochs`` and the rest are configurable."""
    img, txt = train.pairs()
    kw.setdefault("sampling", "epoch")
    kw.setdefault("eval_every", 1)
    return evaluate_distilled(
        img,
        txt,
        None,
        lr_img=lr_img,
        lr_txt=lr_txt,
        test=test,
        dim=dim,
        epochs=epochs,
        loss=loss,
        decay_epoch=decay_epoch,
        **kw,
    )
