"""Evaluation protocol (docs/algorithm.md §8): train fresh projection heads on (distilled) pairs
with frozen encoders, then retrieve on the real test set.

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

This module holds the protocol (:func:`train_on_pairs`, :func:`evaluate_heads`), its repetition
over seeds (:func:`evaluate_distilled`, of a :class:`~repblend_fast.engine.distill.DistilledSet`
with
:func:`evaluate_distilled_set`) and the full-data baseline (:func:`evaluate_full_data`). Reading
and checking a saved set or run folder is :mod:`repblend_fast.evaluate_saved` (``evaluate_file``),
which sits above this module and imports it. The features of a real split are
:class:`~repblend_fast.features.FeaturePairs` (also importable from here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from repblend_fast.config import EVAL_TEMPERATURE
from repblend_fast.features import FeaturePairs
from repblend_fast.metrics import retrieval_metrics
from repblend_fast.models.heads import HeadSpec, head_forward, init_head_flat
from repblend_fast.ops import contrastive_loss
from repblend_fast.stats import mean_std

DEFAULT_LOGIT_SCALE = 1.0 / EVAL_TEMPERATURE  # docs/algorithm.md §8: evaluation at tau = 0.07
EvalFn = Callable[[int, torch.Tensor, torch.Tensor], "dict[str, Any] | None"]


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


def _training_inputs(
    img_feats: torch.Tensor,
    txt_feats: torch.Tensor,
    target: torch.Tensor | None,
    *,
    epochs: int,
    batch_size: int,
    eval_every: int,
    device: str | torch.device | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(x [N, d_f], y [N, d_t], target [N, N] or None)`` checked and moved to ``device``
    (default: ``img_feats``'s) in fp32, detached."""
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
    return x, y, target


def _fresh_heads(
    spec_i: HeadSpec, spec_t: HeadSpec, seed: int, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Freshly initialised flat image and text heads on ``dev`` (leaves requiring grad), drawn
    from one CPU generator seeded with ``seed``, image head first."""
    g_init = torch.Generator().manual_seed(int(seed))
    p_img = init_head_flat(spec_i.d_in, spec_i.dim, generator=g_init).to(dev).requires_grad_(True)
    p_txt = init_head_flat(spec_t.d_in, spec_t.dim, generator=g_init).to(dev).requires_grad_(True)
    return p_img, p_txt


def _train_epoch(
    batches: list[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
    eye: torch.Tensor,
    heads: tuple[torch.Tensor, torch.Tensor],
    specs: tuple[HeadSpec, HeadSpec],
    opt: torch.optim.Optimizer,
    g_drop: torch.Generator,
    *,
    dropout: float,
    logit_scale: float,
    loss: str,
    eps: float,
) -> float:
    """One SGD step of both heads per batch of indices; returns the epoch's mean loss per pair
    (the loss against the block ``target[I, I]``, or the identity when there is no target)."""
    (p_img, p_txt), (spec_i, spec_t) = heads, specs
    total, count = 0.0, 0
    for idx in batches:
        idx = idx.to(x.device)
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
    return total / count


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
    x, y, target = _training_inputs(
        img_feats,
        txt_feats,
        target,
        epochs=epochs,
        batch_size=batch_size,
        eval_every=eval_every,
        device=device,
    )
    n, dev = x.shape[0], x.device
    spec_i, spec_t = HeadSpec(x.shape[1], dim), HeadSpec(y.shape[1], dim)
    p_img, p_txt = _fresh_heads(spec_i, spec_t, seed, dev)
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
    heads, specs = (p_img, p_txt), (spec_i, spec_t)
    step_kw = dict(dropout=dropout, logit_scale=logit_scale, loss=loss, eps=eps)
    epoch_iter: Any = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epoch_iter = tqdm(epoch_iter, desc="eval-train", unit="ep")
    for ep in epoch_iter:
        scale = decay_factor if decay_epoch is not None and ep >= decay_epoch else 1.0
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lr_i * scale, lr_t * scale
        batches = _batches(n, batch_size, sampling, g_batch)
        mean = _train_epoch(batches, x, y, target, eye, heads, specs, opt, g_drop, **step_kw)
        result.losses.append(mean)
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
    shard_seeds: bool = False,
    **train_kw: Any,
) -> dict[str, Any]:
    """Train ``num_eval`` fresh head pairs on the pairs (docs/algorithm.md §8) and report retrieval.

    Args:
        img_feats, txt_feats, target: as :func:`train_on_pairs` (``[N, d_f]``, ``[N, d_t]``,
            ``[N, N]`` or ``None``).
        test: real test features; val: optional real validation features.
        seeds: one training seed per run (default ``0 .. num_eval-1``).
        shard_seeds: under torchrun, spread the seeds over the processes (every rank must call;
            each returns the whole result, the rows of a seed identical to a one-process run's).
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
    specs = (HeadSpec(img_feats.shape[1], dim), HeadSpec(txt_feats.shape[1], dim))

    def eval_fn(ep: int, pi: torch.Tensor, pt: torch.Tensor) -> dict[str, Any]:
        out = {"test": evaluate_heads(pi, pt, *specs, test, logit_scale=logit_scale)}
        if val is not None:
            out["val"] = evaluate_heads(pi, pt, *specs, val, logit_scale=logit_scale)
        return out

    def run_seed(sd: int) -> dict[str, Any]:
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
        return row

    if shard_seeds:
        from repblend_fast.distributed import map_shards

        per_seed = map_shards(run_seed, seeds, "evaluate:seeds")
    else:
        per_seed = [run_seed(sd) for sd in seeds]
    report: dict[str, Any] = {
        "per_seed": per_seed,
        "best": mean_std([r["best"] for r in per_seed]),
        "last": mean_std([r["last"] for r in per_seed]),
        "num_pairs": int(img_feats.shape[0]),
        "lr_img": lr_i,
        "lr_txt": lr_t,
    }
    if val is not None:
        report["val_selected"] = mean_std([r["val_selected"] for r in per_seed])
    return report


def evaluate_distilled_set(
    distilled,
    *,
    encoders,
    size: int,
    test: FeaturePairs,
    loss: str,
    eps: float = 1e-6,
    lr_img: float | None = None,
    lr_txt: float | None = None,
    **protocol: Any,
) -> tuple[dict[str, Any], torch.Tensor]:
    """:func:`evaluate_distilled` of a :class:`repblend_fast.engine.distill.DistilledSet`: its
    images
    encoded by the frozen ``encoders`` at ``size`` px first, its learned learning rates unless
    ``lr_img``/``lr_txt`` are given. ``protocol``: ``dim``, ``num_eval``, ``epochs``,
    ``eval_every``, ``logit_scale``, ... Returns ``(results, image features [N, d_f])``."""
    from repblend_fast.pipeline import encode_images

    img = encode_images(encoders, distilled.images, size)
    res = evaluate_distilled(
        img,
        distilled.texts.float(),
        distilled.similarity,
        lr_img=distilled.eta_img if lr_img is None else lr_img,
        lr_txt=distilled.eta_txt if lr_txt is None else lr_txt,
        test=test,
        loss=loss,
        eps=eps,
        **protocol,
    )
    return res, img


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
    Defaults follow docs/design.md §6's calibration (symmetric InfoNCE, SGD 0.1, momentum 0.9,
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
