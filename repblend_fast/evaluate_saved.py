"""Evaluating a saved distilled set: :func:`evaluate_file` reads ``distilled.safetensors`` (or its
run folder), checks it (its bytes against the run folder's checksums, finite values, consistent
shapes, the text encoder's width), encodes the real test split and runs the docs/algorithm.md §8
protocol of :mod:`repblend_fast.evaluate` on it, optionally beside random real subsets of the
same size. The pipeline (encoders, cached features) is imported lazily, inside the functions.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from repblend_fast.config import EVAL_TEMPERATURE
from repblend_fast.evaluate import FeaturePairs, evaluate_distilled, evaluate_distilled_set
from repblend_fast.stats import mean_std

__all__ = ["evaluate_file", "open_checked_set"]


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
    temperature: float = EVAL_TEMPERATURE,
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
            cadence, ``Method.eval_every`` in :mod:`repblend_fast.methods`: 20 for RepBlend, 10 for
            LoRS).
        temperature: the logit temperature of evaluation (default
            :data:`repblend_fast.config.EVAL_TEMPERATURE`, 0.07 whatever the distillation used,
            as docs/algorithm.md §8 fixes it).
        lr_img, lr_txt: override the learned learning rates.
        note: receives one-line remarks (e.g. that the images are resized).
        shard_seeds: under torchrun, spread the evaluation seeds (and the random subsets) over
            the processes; every rank must call and returns the whole result.

    Returns ``{"kind", "distilled", "dataset", "image_encoder", "text_encoder", "methods":
    {"distilled": {...}, ["random": {...}]}}`` with :func:`evaluate_distilled`'s results; raises
    ``FileNotFoundError`` / ``ValueError`` with a one-line reason for a file it cannot use.
    """
    from repblend_fast.methods import get_method
    from repblend_fast.pipeline import image_size_for

    path, d, (cfg_loss, eps, method) = open_checked_set(path, note)
    if eval_every is None:
        eval_every = get_method(method).eval_every
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    loss = loss or cfg_loss
    n = _check_set_fits(path, d, encoders)
    size = image_size_for(test.name, image_size, encoders.image_info)
    if tuple(d.images.shape[-2:]) != (size, size) and note is not None:
        note(
            f"note: distilled images are {tuple(d.images.shape[-2:])} px, the test images "
            f"{size} px: resizing the distilled images for the encoder"
        )
    ftest = _split_features(test, encoders, size, cache_dir)
    kw = dict(dim=dim, epochs=epochs, eval_every=eval_every, logit_scale=1.0 / temperature)
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
        ftrain = _split_features(train, encoders, size, cache_dir)
        result["methods"]["random"] = _random_baseline(
            ftrain,
            n,
            ftest,
            loss=loss,
            eps=eps,
            num_eval=num_eval,
            shard_seeds=shard_seeds,
            protocol=kw,
        )
    return result


def open_checked_set(path: str | os.PathLike, note: Callable[[str], None] | None = None):
    """``(file path, DistilledSet, (loss, eps, method) of its config)`` of a saved set whose
    bytes match its run folder's checksums and whose values are finite (what ``evaluate`` and
    ``export`` read); ``note`` hears that a file without a record is not checked."""
    _verify_distilled(path, note)
    path, d, cfg = _read_distilled(path)
    _check_finite(path, d)
    return path, d, cfg


def _check_set_fits(path: Path, d, encoders) -> int:
    """``N`` of a set with consistent shapes whose texts have the text encoder's width."""
    n = _check_set_shapes(path, d)
    d_t = int(encoders.text.dim)
    if d.texts.shape[1] != d_t:
        raise ValueError(
            f"{path}: the distilled texts are {d.texts.shape[1]}-dimensional but the text encoder "
            f"embeds captions in {d_t} dimensions: evaluate with the text encoder the set was "
            "distilled with (--text-encoder)"
        )
    return n


def _split_features(split, encoders, size: int, cache_dir) -> FeaturePairs:
    """The frozen encoders' (cached) features of a real split, images at ``size`` px."""
    from repblend_fast.pipeline import image_features, text_features

    return FeaturePairs(
        image_features(split, encoders, size, cache_dir=cache_dir),
        text_features(split, encoders, cache_dir=cache_dir),
        split.cap2img,
    )


def _random_baseline(
    ftrain: FeaturePairs,
    n: int,
    ftest: FeaturePairs,
    *,
    loss: str,
    eps: float,
    num_eval: int,
    shard_seeds: bool,
    protocol: dict[str, Any],
) -> dict[str, Any]:
    """The random-subset row: for each seed ``k < num_eval``, a random real subset of ``n``
    pairs (seed ``k``) evaluated with seed ``k``, lr 0.1 and the distilled set's ``protocol``."""
    from repblend_fast.coresets import random_subset

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
            **protocol,
        )
        return r["per_seed"][0]

    if shard_seeds:
        from repblend_fast.distributed import map_shards

        per_seed = map_shards(random_seed, range(num_eval), "evaluate:random")
    else:
        per_seed = [random_seed(k) for k in range(num_eval)]
    return {
        "label": "random subset",
        "pairs": n,
        "per_seed": per_seed,
        "best": mean_std([p["best"] for p in per_seed]),
        "last": mean_std([p["last"] for p in per_seed]),
        "lr_img": 0.1,
        "lr_txt": 0.1,
    }


def _verify_distilled(path: str | os.PathLike, note: Callable[[str], None] | None) -> None:
    """Check a distilled set against its run folder's ``checksums.json`` (``IntegrityError``
    if its bytes changed since the run wrote them); a file without one is only noted."""
    from repblend_fast.engine.checkpoint import CHECKSUMS, DISTILLED, RunRecord

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
    from repblend_fast.engine.distill import DistilledSet
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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: cannot read a distilled set ({first})") from exc
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
