"""The demo's first stages: data and encoders, features, and per method experts and
distillation."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from repblend_fast.demo.settings import LABELS
from repblend_fast.demo.state import DemoRun


# ----------------------------------------------------------------------------- stages 1-2
def stage_load(run: DemoRun, loader: Callable[[], tuple[Any, Any, Any]] | None) -> None:
    """The train and test splits and the encoders (``loader()`` or the settings' dataset with
    the packaged encoders)."""
    s = run.settings
    if loader is not None:
        run.train, run.test, run.enc = loader()
    else:
        from repblend_fast.data import get_dataset
        from repblend_fast.pipeline import load_encoders

        run.train, run.test = get_dataset(s.dataset, "train"), get_dataset(s.dataset, "test")
        run.enc = load_encoders()
    from repblend_fast.pipeline import image_size_for

    size = image_size_for(run.train.name, s.image_size, run.enc.image_info)
    run.sizes = {"repblend": size, "lors": s.lors_image_size or size}
    pairs = run.configs["repblend"].pairs
    if pairs > run.train.num_images:
        raise ValueError(
            f"pairs={pairs} exceeds the {run.train.num_images} training images: lower pairs"
        )


def stage_features(run: DemoRun) -> None:
    """Frozen-encoder features of both splits (cached on disk)."""
    from repblend_fast.evaluate import FeaturePairs
    from repblend_fast.pipeline import image_features, text_features

    kw = {"cache_dir": run.cache_dir, "progress": run.progress}

    def pairs(ds):
        return FeaturePairs(
            image_features(ds, run.enc, run.size, **kw),
            text_features(ds, run.enc, **kw),
            ds.cap2img,
        )

    run.ftrain, run.ftest = pairs(run.train), pairs(run.test)


# ----------------------------------------------------------------------------- stages 3-4
def branch_size(run: DemoRun, method: str) -> tuple[int, int]:
    """``(experts, expert batch)`` of a branch."""
    s = run.settings
    return (
        (s.experts, s.expert_batch)
        if _main_branch(run, method)
        else (s.lors_experts, s.lors_expert_batch)
    )


def _main_branch(run: DemoRun, method: str) -> bool:
    """Whether ``method`` is the demo's first branch (RepBlend's: the experts, head width and
    learning curve of :class:`DemoSettings` without the ``lors_`` prefix are its)."""
    return method == next(iter(run.configs))


def stage_experts(run: DemoRun, method: str) -> None:
    """Train (or reuse from the cache) the experts of ``method``."""
    from repblend_fast.pipeline import train_experts

    s, cfg = run.settings, run.configs[method]
    n_exp, e_batch = branch_size(run, method)
    epochs = cfg.max_start_epoch - 1 + cfg.expert_epochs
    edir = _expert_dir(run, method, n_exp, epochs, e_batch)
    train_experts(
        run.train,
        run.enc,
        edir,
        method=method,
        num_experts=n_exp,
        epochs=epochs,
        dim=s.dim,
        image_size=run.sizes[method],
        batch_size=e_batch,
        lr=s.expert_lr,
        seed=s.seed,
        cache_dir=run.cache_dir,
        progress=run.progress,
    )
    run.expert_dirs[method] = edir
    run.clock.note(f"{LABELS[method]} experts cached in {edir}")
    run.experts_meta[method] = {
        "num_experts": n_exp,
        "epochs": epochs,
        "batch_size": e_batch,
        "lr": s.expert_lr,
        "steps_per_epoch": math.ceil(run.train.num_captions / e_batch),
        "image_size": run.sizes[method],
        "dir": str(edir),
    }


def stage_distill(run: DemoRun, method: str) -> None:
    """Distil ``method``'s set into ``out/<method>`` and summarise its matching loss."""
    from repblend_fast.engine.guard_report import read_guard, summary_line
    from repblend_fast.pipeline import distill
    from repblend_fast.report import read_jsonl

    cfg = run.configs[method]
    curve: list[dict[str, Any]] = []
    at = set(run.settings.curve_at(cfg.iterations)) if _main_branch(run, method) else set()

    def on_iteration(dist) -> None:
        if dist.iteration in at:
            curve.append(_curve_point(run, method, dist))

    d = distill(
        run.train,
        run.enc,
        run.expert_dirs[method],
        cfg,
        out_dir=run.out / method,
        image_size=run.sizes[method],
        cache_dir=run.cache_dir,
        progress=run.progress,
        on_iteration=on_iteration,
    )
    run.distilled[method] = d
    recs = read_jsonl(run.out / method / "metrics.jsonl") if cfg.iterations else []
    meta = {
        **_loss_summary(recs),
        "eta_img": d.eta_img,
        "eta_txt": d.eta_txt,
        "config": cfg.to_dict(),
        "metrics_jsonl": f"{method}/metrics.jsonl",
        "image_size": run.sizes[method],
    }
    if curve:
        meta["curve"] = curve
    guard = read_guard(run.out / method)
    if guard is not None:
        meta["guard"] = guard
        run.clock.note(f"{LABELS[method]} {summary_line(guard)}")
    run.dist_meta[method] = meta
    if meta.get("loss_start") is not None:
        run.clock.note(
            f"{LABELS[method]} matching loss {meta['loss_start']:.3f} -> {meta['loss_end']:.3f} "
            f"(first/last 10% of iterations), η image {d.eta_img:.4g}, text {d.eta_txt:.4g}"
        )


def _curve_point(run: DemoRun, method: str, dist) -> dict[str, Any]:
    """The held-out evaluation of the set as it stands at ``dist.iteration`` (the learning
    curve of the report)."""
    from repblend_fast.demo.evaluation import eval_protocol
    from repblend_fast.evaluate import evaluate_distilled_set

    cfg = run.configs[method]
    res, _ = evaluate_distilled_set(
        dist.result(),
        encoders=run.enc,
        size=run.size,
        num_eval=run.settings.num_eval,
        loss=cfg.loss,
        eps=cfg.eps,
        **eval_protocol(run, method),
    )
    run.clock.note(
        f"{LABELS[method]} at iteration {dist.iteration}: held-out mean recall "
        f"{res['best']['mean']['mean']:.1f} ± {res['best']['std']['mean']:.1f}"
    )
    return {"iteration": dist.iteration, "best": res["best"], "last": res["last"]}


def _loss_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean matching loss over the first and the last 10% of the finite iterations."""
    out: dict[str, Any] = {
        "iterations": len(records),
        "skipped_non_finite": sum(1 for r in records if r.get("skipped_non_finite")),
    }
    if records:
        out["sec_per_iter"] = sum(r.get("ms", 0.0) for r in records) / len(records) / 1e3
    ok = [r["loss"] for r in records if math.isfinite(r["loss"])]
    if ok:
        k = max(1, len(ok) // 10)
        out.update(loss_start=sum(ok[:k]) / k, loss_end=sum(ok[-k:]) / k, loss_min=min(ok))
    return out


def _expert_dir(run: DemoRun, method: str, n: int, epochs: int, batch: int) -> Path:
    from repblend_fast.data.cache import default_cache_dir

    s = run.settings
    parts = {
        "method": method,
        "dataset": run.train.fingerprint(),
        "image_encoder": run.enc.image_id,
        "text_encoder": run.enc.text_id,
        "image_size": run.sizes[method],
        "num_experts": n,
        "epochs": epochs,
        "batch_size": batch,
        "lr": s.expert_lr,
        "dim": s.dim if _main_branch(run, method) else None,
        "seed": s.seed,
        # Expert bytes depend on the thread count (the store records it and refuses a mix).
        "threads": torch.get_num_threads(),
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    root = Path(run.cache_dir) if run.cache_dir is not None else default_cache_dir()
    return root / "experts" / f"{method}-{key}"
