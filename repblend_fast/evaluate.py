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
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from repblend_fast.metrics import retrieval_metrics
from repblend_fast.models.heads import HeadSpec, head_forward, init_head_flat
from repblend_fast.ops import contrastive_loss
from repblend_fast.stats import mean_std

DEFAULT_LOGIT_SCALE = 1.0 / 0.07  # docs/algorithm.md §8: evaluation at tau = 0.07
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
    """:func:`evaluate_distilled` of a :class:`repblend_fast.distill.DistilledSet`: its images
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


# ------------------------------------------------------------------------------ saved sets
def evaluate_file(
    path: str | os.PathLike,
    *,
    encoders,
    test,
    train=None,
    image_size: int | None = None,
    dim: int = 256,
    num_eval: int = 3,
    epochs: int = 101,
    eval_every: int | None = None,
    loss: str | None = None,
    temperature: float = 0.07,
    lr_img: float | None = None,
    lr_txt: float | None = None,
    cache_dir=None,
    note: Callable[[str], None] | None = None,
    shard_seeds: bool = False,
) -> dict[str, Any]:
    """Evaluate a saved distilled set (``distilled.safetensors`` or its run folder) with the
    docs/algorithm.md §8 protocol on the real ``test`` split.

    Args:
        encoders: the frozen :class:`repblend_fast.pipeline.Encoders` the set was distilled with.
        test: the real test split (a :class:`repblend_fast.data.PairDataset`).
        train: with a training split, also evaluate random real subsets of the same size (one
            per seed, same loss, lr 0.1) as a baseline.
        image_size: the encoder's input resolution (default: the dataset's).
        loss: training loss (default: the set's config, else ``wbce``).
        eval_every: score the test split every this many epochs (default: the set's method's
            cadence, :data:`repblend_fast.config.EVAL_EVERY`: 20 for RepBlend, 10 for LoRS).
        temperature: the logit temperature of evaluation (0.07 whatever the distillation used,
            as docs/algorithm.md §8 fixes it).
        lr_img, lr_txt: override the learned learning rates.
        note: receives one-line remarks (e.g. that the images are resized).
        shard_seeds: under torchrun, spread the evaluation seeds (and the random subsets) over
            the processes; every rank must call and returns the whole result.

    Returns ``{"kind", "distilled", "dataset", "image_encoder", "text_encoder", "methods":
    {"distilled": {...}, ["random": {...}]}}`` with :func:`evaluate_distilled`'s results; raises
    ``FileNotFoundError`` / ``ValueError`` with a one-line reason for a file it cannot use.
    """
    from repblend_fast.config import EVAL_EVERY
    from repblend_fast.coresets import random_subset
    from repblend_fast.pipeline import image_features, image_size_for, text_features

    _verify_distilled(path, note)
    path, d, (cfg_loss, eps, method) = _read_distilled(path)
    _check_finite(path, d)
    if eval_every is None:
        eval_every = EVAL_EVERY[method]
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    scale = 1.0 / temperature
    loss = loss or cfg_loss
    n = _check_set_shapes(path, d)
    d_t = int(encoders.text.dim)
    if d.texts.shape[1] != d_t:
        raise ValueError(
            f"{path}: the distilled texts are {d.texts.shape[1]}-dimensional but the text encoder "
            f"embeds captions in {d_t} dimensions: evaluate with the text encoder the set was "
            "distilled with (--text-encoder)"
        )
    size = image_size_for(test.name, image_size, encoders.image_info)
    if tuple(d.images.shape[-2:]) != (size, size) and note is not None:
        note(
            f"note: distilled images are {tuple(d.images.shape[-2:])} px, the test images "
            f"{size} px: resizing the distilled images for the encoder"
        )
    ftest = FeaturePairs(
        image_features(test, encoders, size, cache_dir=cache_dir),
        text_features(test, encoders, cache_dir=cache_dir),
        test.cap2img,
    )
    kw = dict(dim=dim, epochs=epochs, eval_every=eval_every, logit_scale=scale)
    res, _ = evaluate_distilled_set(
        d,
        encoders=encoders,
        size=size,
        test=ftest,
        loss=loss,
        eps=eps,
        lr_img=lr_img,
        lr_txt=lr_txt,
        num_eval=num_eval,
        shard_seeds=shard_seeds,
        **kw,
    )
    result: dict[str, Any] = {
        "kind": "repblend_fast.evaluation",
        "distilled": str(path),
        "dataset": test.name,
        "image_encoder": encoders.image_id,
        "text_encoder": encoders.text_id,
        "loss": loss,
        "eval_every": eval_every,
        "temperature": temperature,
        "methods": {"distilled": {"label": "distilled", "pairs": n, **res}},
    }
    if train is not None:
        ftrain = FeaturePairs(
            image_features(train, encoders, size, cache_dir=cache_dir),
            text_features(train, encoders, cache_dir=cache_dir),
            train.cap2img,
        )

        def random_seed(k: int) -> dict[str, Any]:
            ri, rt, _ = random_subset(ftrain, min(n, ftrain.img.shape[0]), seed=k)
            r = evaluate_distilled(
                ri,
                rt,
                None,
                lr_img=0.1,
                lr_txt=0.1,
                seeds=[k],
                test=ftest,
                loss=loss,
                eps=eps,
                **kw,
            )
            return r["per_seed"][0]

        if shard_seeds:
            from repblend_fast.distributed import map_shards

            per_seed = map_shards(random_seed, range(num_eval), "evaluate:random")
        else:
            per_seed = [random_seed(k) for k in range(num_eval)]
        result["methods"]["random"] = {
            "label": "random subset",
            "pairs": n,
            "per_seed": per_seed,
            "best": mean_std([p["best"] for p in per_seed]),
            "last": mean_std([p["last"] for p in per_seed]),
            "lr_img": 0.1,
            "lr_txt": 0.1,
        }
    return result


def _verify_distilled(path: str | os.PathLike, note: Callable[[str], None] | None) -> None:
    """Check a distilled set against its run folder's ``checksums.json`` (``IntegrityError``
    if its bytes changed since the run wrote them); a file without one is only noted."""
    from repblend_fast.checkpoint import CHECKSUMS, DISTILLED, RunRecord

    p = Path(path)
    if p.is_dir():
        p = p / DISTILLED
    if not p.is_file():
        return  # _read_distilled says so
    if (p.parent / CHECKSUMS).is_file():
        RunRecord(p.parent).verify(
            p.name, fix="distil it again (or restore the run folder's own file)"
        )
    elif note is not None:
        note(f"note: {p} has no {CHECKSUMS} beside it; its bytes are not checked")


def _check_finite(path: Path, d) -> None:
    """``ValueError`` for a set holding NaN or Inf: training on it gives meaningless numbers
    (an all-NaN set used to score "0.0 ± 0.0")."""
    parts = {"images": d.images, "texts": d.texts}
    if d.similarity is not None:
        parts["similarity"] = d.similarity
    bad = {k: float((~torch.isfinite(v)).float().mean()) for k, v in parts.items() if v.numel()}
    bad = {k: f for k, f in bad.items() if f > 0}
    if bad:
        what = ", ".join(f"{k} {100 * f:.3g}%" for k, f in bad.items())
        raise ValueError(
            f"{path}: the distilled set holds non-finite values ({what} NaN/Inf) and cannot be "
            "evaluated; distil again with lower learning rates (lr_img, lr_txt) or a clamp_lr"
        )


def _read_distilled(path: str | os.PathLike):
    """``(file path, DistilledSet, (loss, eps, method) of its config)`` of a saved set or its run
    folder; ``FileNotFoundError`` / ``ValueError`` naming the file otherwise."""
    from repblend_fast.config import DistillConfig
    from repblend_fast.distill import DistilledSet
    from repblend_fast.io import safetensors_metadata

    path = Path(path)
    if path.is_dir():
        path = path / "distilled.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: file not found (pass a distilled.safetensors written by "
            "`repblend-fast distill` or `demo`, or its run directory)"
        )
    try:
        d = DistilledSet.load(path)
    except Exception as exc:  # a foreign or truncated file: say which
        raise ValueError(f"{path}: cannot read a distilled set ({exc})") from exc
    cfg_loss, eps, method = "wbce", 1e-6, "repblend"
    try:
        meta = safetensors_metadata(path)
        if "config" in meta:
            c = DistillConfig.from_dict(json.loads(meta["config"]))
            cfg_loss, eps, method = c.loss, c.eps, c.method
    except (ValueError, TypeError, KeyError):
        pass
    return path, d, (cfg_loss, eps, method)


def _check_set_shapes(path: Path, d) -> int:
    """``N`` of a distilled set whose tensors have consistent shapes (``ValueError`` if not)."""
    if d.images.dim() != 4 or d.images.shape[1] != 3:
        raise ValueError(f"{path}: images must be [N, 3, H, W], got {tuple(d.images.shape)}")
    n = d.images.shape[0]
    if d.texts.dim() != 2 or d.texts.shape[0] != n:
        raise ValueError(f"{path}: texts must be [N={n}, d_t], got {tuple(d.texts.shape)}")
    if d.similarity is not None and tuple(d.similarity.shape) != (n, n):
        raise ValueError(f"{path}: similarity must be [{n}, {n}], got {tuple(d.similarity.shape)}")
    return n
