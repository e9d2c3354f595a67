"""The end-to-end demo and the ``evaluate`` / ``report`` commands.

``repblend-fast demo --out DIR`` runs the whole pipeline on the embedded ``emoji`` dataset
(Twemoji images with their CLDR names) with the packaged EfficientNet-Lite0 and MiniLM encoders:

1. frozen-encoder features of the train and test splits (cached on disk);
2. RepBlend experts (image and text heads on the cached features) and RepBlend distillation of
   ``N`` pairs (the ``demo`` preset, N = 99 as the paper counts "100 pairs");
3. LoRS experts (the whole image encoder is trained) and LoRS-mode distillation of ``N`` pairs —
   deliberately small on a CPU, see :class:`DemoSettings`;
4. the SPEC.md §8 evaluation of both distilled sets, of random real subsets of ``N`` pairs and of
   the full training split (mean ± std over evaluation seeds, best- and last-epoch figures);
5. modality-collapse diagnostics (SPEC.md §9) of each set, and the report: ``report.md``,
   ``metrics.json`` and PNG figures (:mod:`repblend_fast.report`).

Expert stores live in the cache directory (``<cache>/experts/<key>``), keyed by everything that
produced them, so a rerun reuses features and experts and only distils and evaluates again.

``repblend-fast evaluate --distilled FILE`` evaluates any saved distilled set under the same
protocol; ``repblend-fast report --run DIR`` re-renders a demo run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from repblend_fast.config import DistillConfig, preset

FORMAT_VERSION = 1
LABELS = {
    "repblend": "RepBlend",
    "lors": "LoRS",
    "random": "Random subset",
    "random_infonce": "Random subset (InfoNCE)",
    "kcenter": "k-center coreset (InfoNCE)",
    "herding": "Herding coreset (InfoNCE)",
    "full": "Full data",
}


@dataclass
class DemoSettings:
    """What the demo runs besides the distillation hyper-parameters (those come from the ``demo``
    preset for RepBlend, and from it plus :attr:`lors_overrides` for LoRS).

    Attributes:
        dataset: dataset name for :func:`repblend_fast.data.get_dataset` (CLI: ``--dataset``).
        image_size: image resolution (``None``: the dataset's default, 64 px for emoji).
        dim: projection width D of the RepBlend experts and of every evaluation model.
        seed: seeds the distillations, the expert runs and the random subsets.
        experts, expert_batch, expert_lr: RepBlend experts (heads on cached features). Batch 32
            gives ~50 SGD steps per epoch on emoji's 1,614 captions (see docs/demo.md: with
            batch 128 one expert epoch is too short a move for T = 8 synthetic steps to match).
        lors: run the LoRS branch.
        lors_experts, lors_expert_batch: LoRS experts train the whole image encoder (expensive on
            a CPU: one epoch is a forward and backward pass of EfficientNet-Lite0 over every
            training image), so the demo trains few of them.
        lors_image_size: resolution of the LoRS branch (``None``: as RepBlend). Its distilled
            images are resized to ``image_size`` for evaluation.
        lors_overrides: DistillConfig fields that differ from the ``demo`` preset for LoRS
            (fewer iterations and unrolled steps: each LoRS iteration differentiates through the
            image encoder's own training steps).
        num_eval, eval_epochs, eval_every: the SPEC.md §8 evaluation (seeds, epochs 0..E-1, and
            how often the test split is scored for the best-epoch figure).
        full_epochs: epochs of the full-data baseline (normal epochs over all pairs).
    """

    dataset: str = "emoji"
    image_size: int | None = None
    dim: int = 256
    seed: int = 0
    experts: int = 5
    expert_batch: int = 32
    expert_lr: float = 0.1
    lors: bool = True
    lors_experts: int = 1
    lors_expert_batch: int = 32
    lors_image_size: int | None = None
    lors_overrides: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"iterations": 8, "syn_steps": 4, "max_start_epoch": 1}
    )
    num_eval: int = 3
    eval_epochs: int = 101
    eval_every: int = 10
    full_epochs: int = 10

    def validate(self) -> DemoSettings:
        checks = [
            (self.dim >= 1, "dim", ">= 1"),
            (self.experts >= 1, "experts", ">= 1"),
            (self.expert_batch >= 1, "expert_batch", ">= 1"),
            (self.expert_lr > 0, "expert_lr", "> 0"),
            (self.lors_experts >= 1, "lors_experts", ">= 1"),
            (self.lors_expert_batch >= 1, "lors_expert_batch", ">= 1"),
            (self.num_eval >= 1, "num_eval", ">= 1"),
            (self.eval_epochs >= 1, "eval_epochs", ">= 1"),
            (self.eval_every >= 1, "eval_every", ">= 1"),
            (self.full_epochs >= 1, "full_epochs", ">= 1"),
            (self.image_size is None or self.image_size >= 8, "image_size", ">= 8"),
            (self.lors_image_size is None or self.lors_image_size >= 8, "lors_image_size", ">= 8"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise ValueError(f"DemoSettings.{name}={getattr(self, name)!r}: expected {want}")
        return self


# ----------------------------------------------------------------------------- progress
class StageClock:
    """Prints one line per stage with the elapsed wall time, and records stage durations."""

    def __init__(self, total: int, log: Callable[[str], None] | None = None):
        self.t0 = time.perf_counter()
        self.total = total
        self.count = 0
        self.stages: list[dict[str, Any]] = []
        self.log = log if log is not None else _stderr

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _stamp(self) -> str:
        e = int(self.elapsed())
        return f"[demo {e // 60:d}:{e % 60:02d}]"

    def note(self, msg: str) -> None:
        self.log(f"{self._stamp()}   {msg}")

    def run(self, name: str, fn: Callable[[], Any], detail: str = "") -> Any:
        self.count += 1
        self.log(
            f"{self._stamp()} {self.count}/{self.total} {name}{': ' + detail if detail else ''}"
        )
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        self.stages.append({"stage": name, "seconds": round(dt, 3)})
        self.log(f"{self._stamp()} {self.count}/{self.total} {name} done in {dt:.1f} s")
        return out


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        return None


def auto_threads() -> int:
    """Intra-op threads for a CPU run: all cores, or fewer when other processes keep them busy.

    With OpenMP's default (active) wait policy, two threads on two cores that other processes
    also use spin against each other: small per-step kernels (the heads, the evaluation) then
    run an order of magnitude slower than with one thread. ``OMP_WAIT_POLICY=PASSIVE`` avoids
    that, and then all cores are used.
    """
    cores = os.cpu_count() or 1
    if os.environ.get("OMP_WAIT_POLICY", "").lower() == "passive":
        return cores
    load = load_average()
    busy = load[0] if load else 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


# ----------------------------------------------------------------------------- helpers
def _key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _cache_root(cache_dir) -> Path:
    from repblend_fast.data.cache import default_cache_dir

    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


@torch.no_grad()
def encode_images(enc, images: torch.Tensor, size: int, batch_size: int = 128) -> torch.Tensor:
    """Frozen-encoder features ``[N, d_f]`` of encoder-space images ``[N, 3, h, w]``, resized
    (bilinear, antialiased) to ``size`` first when ``h, w != size``."""
    import torch.nn.functional as F

    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got {tuple(images.shape)}")
    dev = next(enc.image.parameters()).device
    enc.image.eval()
    out = []
    for s in range(0, images.shape[0], batch_size):
        x = images[s : s + batch_size].to(dev, torch.float32)
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        out.append(enc.image(x).float().cpu())
    return torch.cat(out)


def nearest_captions(
    texts: torch.Tensor, caption_feats: torch.Tensor, captions: Sequence[str]
) -> tuple[list[str], list[float]]:
    """For each distilled text ``[N, d_t]``, the caption whose embedding (``[M, d_t]``) is most
    cosine-similar, and that cosine."""
    import torch.nn.functional as F

    a = F.normalize(texts.float(), dim=-1)
    b = F.normalize(caption_feats.float().to(a.device), dim=-1)
    sim, idx = (a @ b.T).max(dim=1)
    return [captions[int(i)] for i in idx], [round(float(s), 4) for s in sim]


def summarize(rows: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """``{"mean": {...}, "std": {...}}`` over runs (population std, as the evaluation reports)."""
    keys = rows[0].keys()
    out: dict[str, dict[str, float]] = {"mean": {}, "std": {}}
    for k in keys:
        v = torch.tensor([float(r[k]) for r in rows], dtype=torch.float64)
        out["mean"][k] = float(v.mean())
        out["std"][k] = float(v.std(unbiased=False)) if v.numel() > 1 else 0.0
    return out


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


def _lors_config(base: dict[str, Any], settings: DemoSettings) -> DistillConfig:
    over = {**base, "method": "lors", "blend": False, **settings.lors_overrides}
    return preset("demo", **over)


# ----------------------------------------------------------------------------- the demo
def run_demo(
    out_dir: str | os.PathLike,
    settings: DemoSettings | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    train_ds=None,
    test_ds=None,
    encoders=None,
    loader: Callable[[], tuple[Any, Any, Any]] | None = None,
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the demo into ``out_dir``; returns the content of its ``metrics.json``.

    Args:
        settings: :class:`DemoSettings` (default: the demo's).
        overrides: DistillConfig fields applied on top of the ``demo`` preset for both methods
            (LoRS then applies ``settings.lors_overrides``).
        train_ds, test_ds, encoders: data splits and :class:`repblend_fast.pipeline.Encoders`
            (default: ``settings.dataset`` and the packaged EfficientNet-Lite0 + MiniLM).
        loader: instead of those three, a callable returning ``(train, test, encoders)``, run
            as the first (timed) stage.
        cache_dir: feature and expert cache (default ``$REPBLEND_CACHE_DIR`` or
            ``~/.cache/repblend_fast``).
        overwrite: replace an earlier demo run in ``out_dir`` (only the files the demo writes).
        progress: tqdm bars of the inner loops; stage lines are always printed through ``log``.
    """
    from repblend_fast import report as rep

    s = (settings or DemoSettings()).validate()
    rep.check_plotting()  # fail before minutes of work, not after
    overrides = {"seed": s.seed, **(overrides or {})}
    rb_cfg = preset("demo", **overrides)
    lors_cfg = _lors_config(overrides, s) if s.lors else None
    out = Path(out_dir)
    _prepare_out(out, overwrite)
    clock = StageClock(total=7 + (2 if s.lors else 0), log=log)
    load_start = load_average()
    threads = torch.get_num_threads()
    clock.note(
        f"output {out}; {os.cpu_count()} CPU cores, {threads} torch threads, load average "
        f"{load_start}"
    )

    # 1. data and encoders ------------------------------------------------------------------
    def load_all():
        if loader is not None:
            return loader()
        from repblend_fast.data import get_dataset
        from repblend_fast.pipeline import load_encoders

        tr = train_ds if train_ds is not None else get_dataset(s.dataset, "train")
        te = test_ds if test_ds is not None else get_dataset(s.dataset, "test")
        enc = encoders if encoders is not None else load_encoders()
        return tr, te, enc

    train, test, enc = clock.run("load data and encoders", load_all)
    from repblend_fast.pipeline import image_size_for

    size = image_size_for(train.name, s.image_size, enc.image_info)
    lors_size = s.lors_image_size or size
    if rb_cfg.pairs > train.num_images:
        raise ValueError(
            f"pairs={rb_cfg.pairs} exceeds the {train.num_images} training images: lower pairs"
        )

    # 2. features -----------------------------------------------------------------------------
    def features():
        from repblend_fast.evaluate import FeaturePairs
        from repblend_fast.pipeline import image_features, text_features

        kw = {"cache_dir": cache_dir, "progress": progress}
        tr = FeaturePairs(
            image_features(train, enc, size, **kw), text_features(train, enc, **kw), train.cap2img
        )
        te = FeaturePairs(
            image_features(test, enc, size, **kw), text_features(test, enc, **kw), test.cap2img
        )
        return tr, te

    ftrain, ftest = clock.run(
        "image and text features",
        features,
        f"{train.num_images}+{test.num_images} images at {size} px, "
        f"{train.num_captions}+{test.num_captions} captions (cached)",
    )

    # 3-6. experts and distillations ------------------------------------------------------
    experts_meta: dict[str, Any] = {}
    distilled: dict[str, Any] = {}
    dist_meta: dict[str, Any] = {}
    branches = [("repblend", rb_cfg, size, s.experts, s.expert_batch)]
    if lors_cfg is not None:
        branches.append(("lors", lors_cfg, lors_size, s.lors_experts, s.lors_expert_batch))
    for method, cfg, img_size, n_exp, e_batch in branches:
        epochs = cfg.max_start_epoch - 1 + cfg.expert_epochs
        edir = _expert_dir(cache_dir, method, train, enc, img_size, n_exp, epochs, e_batch, s)
        steps = math.ceil(train.num_captions / e_batch)

        def experts(
            method=method, edir=edir, n_exp=n_exp, epochs=epochs, e_batch=e_batch, img_size=img_size
        ):
            from repblend_fast.pipeline import train_experts

            return train_experts(
                train,
                enc,
                edir,
                method=method,
                num_experts=n_exp,
                epochs=epochs,
                dim=s.dim,
                image_size=img_size,
                batch_size=e_batch,
                lr=s.expert_lr,
                seed=s.seed,
                cache_dir=cache_dir,
                progress=progress,
            )

        what = (
            "image + text heads on cached features"
            if method == "repblend"
            else ("whole image encoder + text head")
        )
        clock.run(
            f"{LABELS[method]} experts",
            experts,
            f"{n_exp} × {epochs} epochs, batch {e_batch} ({steps} steps/epoch), {what}, "
            f"cached in {edir}",
        )
        experts_meta[method] = {
            "num_experts": n_exp,
            "epochs": epochs,
            "batch_size": e_batch,
            "lr": s.expert_lr,
            "steps_per_epoch": steps,
            "image_size": img_size,
            "dir": str(edir),
        }

        def run_distill(method=method, cfg=cfg, edir=edir, img_size=img_size):
            from repblend_fast.pipeline import distill

            return distill(
                train,
                enc,
                edir,
                cfg,
                out_dir=out / method,
                image_size=img_size,
                cache_dir=cache_dir,
                progress=progress,
            )

        distilled[method] = clock.run(
            f"{LABELS[method]} distillation",
            run_distill,
            f"N={cfg.pairs}, {cfg.iterations} iterations, T={cfg.syn_steps}, B={cfg.batch_size},"
            f" {cfg.meta_grad} meta-gradient",
        )
        from repblend_fast.report import read_jsonl

        recs = read_jsonl(out / method / "metrics.jsonl") if cfg.iterations else []
        dist_meta[method] = {
            **_loss_summary(recs),
            "eta_img": distilled[method].eta_img,
            "eta_txt": distilled[method].eta_txt,
            "config": cfg.to_dict(),
            "metrics_jsonl": f"{method}/metrics.jsonl",
            "image_size": img_size,
        }
        if dist_meta[method].get("loss_start") is not None:
            clock.note(
                f"{LABELS[method]} matching loss {dist_meta[method]['loss_start']:.3f} -> "
                f"{dist_meta[method]['loss_end']:.3f} (first/last 10% of iterations), "
                f"η image {distilled[method].eta_img:.4g}, text {distilled[method].eta_txt:.4g}"
            )
    if lors_cfg is not None:
        dist_meta["lors"]["reductions"] = _lors_reductions(rb_cfg, lors_cfg, s, size, lors_size)
        experts_meta["lors"]["note"] = "fewer than RepBlend's: each epoch trains the encoder"

    # 7. evaluation --------------------------------------------------------------------------
    eval_kw = {"epochs": s.eval_epochs, "eval_every": s.eval_every}
    sets: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float, float]] = {}
    methods: dict[str, Any] = {}

    def evaluate_all():
        from repblend_fast.evaluate import (
            evaluate_distilled,
            evaluate_full_data,
            herding_subset,
            kcenter_subset,
            random_subset,
        )

        for method, d in distilled.items():
            cfg = rb_cfg if method == "repblend" else lors_cfg
            img = encode_images(enc, d.images, size)
            clock.note(f"evaluating {LABELS[method]} ({s.num_eval} seeds)")
            caps, sims = nearest_captions(d.texts, ftrain.txt, train.captions)
            entry = {
                "label": LABELS[method],
                "kind": "distilled",
                "pairs": int(d.texts.shape[0]),
                "distilled": f"{method}/distilled.safetensors",
                "nearest_captions": caps,
                "nearest_similarity": sims,
            }
            try:
                res = evaluate_distilled(
                    img,
                    d.texts.float(),
                    d.similarity,
                    lr_img=d.eta_img,
                    lr_txt=d.eta_txt,
                    test=ftest,
                    dim=s.dim,
                    num_eval=s.num_eval,
                    loss=cfg.loss,
                    eps=cfg.eps,
                    logit_scale=cfg.logit_scale,
                    **eval_kw,
                )
            except ValueError as exc:  # e.g. a learned lr that went negative: report, go on
                methods[method] = {**entry, "error": str(exc), "note": f"evaluation failed: {exc}"}
                clock.note(f"{LABELS[method]} evaluation failed: {exc}")
                continue
            sets[method] = (img, d.texts.float(), d.similarity, d.eta_img, d.eta_txt)
            methods[method] = {
                **entry,
                **res,
                "note": (
                    f"distilled set; fresh heads trained with {cfg.loss.upper()} against its "
                    "learned similarity S at its learned learning rates"
                    + (
                        f"; images resized {lors_size}→{size} px"
                        if lors_size != size and method == "lors"
                        else ""
                    )
                ),
            }
        # Random subsets: a different subset per evaluation seed, so the spread includes the
        # subset's. Two protocols: the distilled sets' own (WBCE, S = I, η at its initial value),
        # and DESIGN.md §6's calibration (symmetric InfoNCE, lr 0.1).
        # Coresets (k-center, herding) in the joint image+text feature space, with the same
        # protocol as the InfoNCE random row.
        n = rb_cfg.pairs
        for name, loss, lr, select in (
            ("random", rb_cfg.loss, rb_cfg.lr_init, random_subset),
            ("random_infonce", "infonce", 0.1, random_subset),
            ("kcenter", "infonce", 0.1, kcenter_subset),
            ("herding", "infonce", 0.1, herding_subset),
        ):
            clock.note(f"evaluating {LABELS[name]} ({s.num_eval} subsets of {n} pairs)")
            per_seed = []
            for k in range(s.num_eval):
                img, txt, _ = select(ftrain, n, seed=s.seed + k)
                if name == "random" and k == 0:
                    sets["random"] = (img, txt, None, lr, lr)
                r = evaluate_distilled(
                    img,
                    txt,
                    None,
                    lr_img=lr,
                    lr_txt=lr,
                    test=ftest,
                    dim=s.dim,
                    seeds=[k],
                    loss=loss,
                    eps=rb_cfg.eps,
                    logit_scale=rb_cfg.logit_scale,
                    **eval_kw,
                )
                per_seed.append({**r["per_seed"][0], "subset_seed": s.seed + k})
            methods[name] = {
                "label": LABELS[name],
                "kind": "baseline",
                "pairs": n,
                "per_seed": per_seed,
                "best": summarize([p["best"] for p in per_seed]),
                "last": summarize([p["last"] for p in per_seed]),
                "lr_img": lr,
                "lr_txt": lr,
                "note": (
                    {
                        "random": f"{n} random real pairs (distinct images, a new subset "
                        "per seed), ",
                        "random_infonce": f"{n} random real pairs (distinct images, a new subset "
                        "per seed), ",
                        "kcenter": f"{n} real pairs chosen by greedy k-center on joint normalised "
                        "image+text features (random start and caption draw per seed), ",
                        "herding": f"{n} real pairs chosen by herding (greedy mean matching) on "
                        "joint normalised image+text features (caption draw per seed), ",
                    }[name]
                    + (
                        f"{loss.upper()} vs identity targets at lr {lr:g} (= η init): the "
                        "distilled sets' evaluation with the learned parts removed"
                        if name == "random"
                        else f"symmetric InfoNCE at lr {lr:g} (DESIGN.md §6's protocol)"
                    )
                ),
            }
        clock.note(f"evaluating {LABELS['full']} ({s.num_eval} seeds, {s.full_epochs} epochs)")
        full = evaluate_full_data(
            ftrain,
            ftest,
            dim=s.dim,
            epochs=s.full_epochs,
            num_eval=s.num_eval,
            logit_scale=rb_cfg.logit_scale,
        )
        methods["full"] = {
            "label": LABELS["full"],
            "kind": "baseline",
            "pairs": int(ftrain.txt.shape[0]),
            **full,
            "note": (
                f"every training pair, symmetric InfoNCE, SGD lr 0.1, {s.full_epochs} normal "
                "epochs"
                + (" (DESIGN.md §6 calibration: 39.9 ± 0.7)" if train.name == "emoji" else "")
            ),
        }

    clock.run(
        "evaluation",
        evaluate_all,
        f"fresh heads D={s.dim}, {s.eval_epochs} epochs, {s.num_eval} seeds per set",
    )

    # 8. diagnostics -------------------------------------------------------------------------
    def diagnostics():
        from repblend_fast.evaluate import embed, train_on_pairs
        from repblend_fast.metrics import collapse_diagnostics

        diag, emb = {}, {}
        for name in ("random", "lors", "repblend"):
            if name not in sets:
                continue
            img, txt, target, lr_i, lr_t = sets[name]
            cfg = rb_cfg if name != "lors" else lors_cfg
            res = train_on_pairs(
                img,
                txt,
                target,
                lr_img=lr_i,
                lr_txt=lr_t,
                dim=s.dim,
                seed=0,
                epochs=s.eval_epochs,
                loss=cfg.loss if name != "random" else rb_cfg.loss,
                eps=cfg.eps,
                logit_scale=cfg.logit_scale,
            )
            u = embed(res.img_params, img, res.img_spec)
            v = embed(res.txt_params, txt, res.txt_spec)
            diag[name] = collapse_diagnostics(u, v)
            emb[f"{name}.image"], emb[f"{name}.text"] = u.float(), v.float()
        return diag, emb

    diag, emb = clock.run(
        "modality-collapse diagnostics",
        diagnostics,
        "each set embedded by heads trained on it (seed 0)",
    )
    from repblend_fast.io import atomic_save_safetensors

    atomic_save_safetensors(
        {k: v.contiguous() for k, v in emb.items()}, out / "embeddings.safetensors"
    )

    # 9. report ------------------------------------------------------------------------------
    metrics: dict[str, Any] = {
        "kind": "repblend_fast.demo",
        "format_version": FORMAT_VERSION,
        "dataset": {
            "name": train.name,
            "train_images": train.num_images,
            "train_captions": train.num_captions,
            "test_images": test.num_images,
            "test_captions": test.num_captions,
            "image_size": size,
            "fingerprint": train.fingerprint(),
            "attribution": (train.meta or {}).get("attribution"),
        },
        "encoders": {"image": enc.image_id, "text": enc.text_id},
        "image_mean": list(enc.image_info.mean),
        "image_std": list(enc.image_info.std),
        "settings": dataclasses.asdict(s),
        "evaluation": {
            "protocol": "SPEC.md §8",
            "num_eval": s.num_eval,
            "epochs": s.eval_epochs,
            "eval_every": s.eval_every,
            "dim": s.dim,
            "full_epochs": s.full_epochs,
        },
        "experts": experts_meta,
        "distillation": dist_meta,
        "methods": methods,
        "diagnostics": diag,
        "verdict": verdict(methods),
    }

    def write_report():
        from repblend_fast.io import atomic_write_json

        metrics["timings"] = _timings(clock, load_start, threads)
        atomic_write_json(metrics, out / rep.METRICS_FILE)
        return rep.render_run(out)

    clock.run("report", write_report, f"{out / rep.REPORT_FILE} and figures")
    metrics["timings"] = _timings(clock, load_start, threads)
    from repblend_fast.io import atomic_write_json

    atomic_write_json(metrics, out / rep.METRICS_FILE)
    rep.write_report_md(metrics, out)  # with the report stage's own time
    clock.note(f"done in {clock.elapsed():.0f} s; report: {out / rep.REPORT_FILE}")
    return metrics


def _timings(clock: StageClock, load_start, threads: int) -> dict[str, Any]:
    return {
        "total_s": round(clock.elapsed(), 3),
        "stages": list(clock.stages),
        "load_start": load_start,
        "load_end": load_average(),
        "host": f"{os.cpu_count()} CPU cores, {threads} torch threads, torch {torch.__version__}",
    }


def verdict(methods: dict[str, Any]) -> str:
    """One factual sentence per distilled method: its best-epoch mean recall against the random
    subsets' (difference and whether it exceeds the sum of the two standard deviations)."""
    lines = []
    for m in ("repblend", "lors"):
        if "best" not in methods.get(m, {}):
            continue
        a = methods[m]["best"]
        for base in ("random", "random_infonce", "kcenter", "herding"):
            if "best" not in methods.get(base, {}):
                continue
            b = methods[base]["best"]
            d = a["mean"]["mean"] - b["mean"]["mean"]
            noise = a["std"]["mean"] + b["std"]["mean"]
            rel = "above" if d > 0 else "below"
            sure = "more" if abs(d) > noise else "less"
            lines.append(
                f"{LABELS[m]} is {abs(d):.1f} points {rel} {LABELS[base].lower()} (mean recall, "
                f"best epoch; {sure} than the summed std {noise:.1f})."
            )
    if "best" in methods.get("repblend", {}) and "best" in methods.get("lors", {}):
        d = methods["repblend"]["best"]["mean"]["mean"] - methods["lors"]["best"]["mean"]["mean"]
        lines.append(f"RepBlend − LoRS: {d:+.1f} points.")
    return " ".join(lines)


def _lors_reductions(rb: DistillConfig, lo: DistillConfig, s: DemoSettings, size, lsize) -> str:
    parts = []
    if lo.iterations != rb.iterations:
        parts.append(f"{lo.iterations} iterations (RepBlend {rb.iterations})")
    if lo.syn_steps != rb.syn_steps:
        parts.append(f"T={lo.syn_steps} (RepBlend {rb.syn_steps})")
    if lo.max_start_epoch != rb.max_start_epoch:
        parts.append(f"E_max={lo.max_start_epoch}")
    if s.lors_experts != s.experts:
        parts.append(f"{s.lors_experts} expert(s) (RepBlend {s.experts})")
    if lsize != size:
        parts.append(f"{lsize} px images")
    return ", ".join(parts) + (
        ": every LoRS iteration differentiates through training steps of the whole image "
        "encoder, and every expert epoch trains it on all images; at RepBlend's settings the "
        "LoRS branch alone would take far longer than the demo's CPU budget"
        if parts
        else ""
    )


def _expert_dir(cache_dir, method, train, enc, size, n, epochs, batch, s: DemoSettings) -> Path:
    parts = {
        "method": method,
        "dataset": train.fingerprint(),
        "image_encoder": enc.image_id,
        "text_encoder": enc.text_id,
        "image_size": size,
        "num_experts": n,
        "epochs": epochs,
        "batch_size": batch,
        "lr": s.expert_lr,
        "dim": s.dim if method == "repblend" else None,
        "seed": s.seed,
    }
    return _cache_root(cache_dir) / "experts" / f"{method}-{_key(parts)}"


_OWNED = ("metrics.json", "report.md", "embeddings.safetensors", "loss_curves.png", "collapse.png")


def check_out(out: Path, overwrite: bool) -> list[Path]:
    """The files and run folders of an earlier demo run in ``out`` (``FileExistsError`` if there
    are any and not ``overwrite``)."""
    from repblend_fast.report import grid_png

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    owned = [out / n for n in _OWNED] + [out / grid_png(m) for m in LABELS]
    runs = [out / m for m in ("repblend", "lors")]
    existing = [p for p in owned if p.exists()] + [p for p in runs if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds a demo run ({existing[0].name}): pass --overwrite to replace "
            "it, or choose another --out"
        )
    return existing


def _prepare_out(out: Path, overwrite: bool) -> None:
    for p in check_out(out, overwrite):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------- CLI: demo
def _guarded(name: str, fn: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """Run a subcommand; a user error (``CLIError``) is printed without a traceback, status 2."""
    cli = _cli()
    try:
        return int(fn(argv) or 0)
    except cli.CLIError as exc:
        print(f"repblend-fast {name}: error: {exc}", file=sys.stderr)
        return 2


def _cli():
    from repblend_fast import cli

    return cli


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (0 = auto: all cores, fewer when the load average says "
        "other processes keep them busy)",
    )


def _set_threads(n: int) -> int:
    n = auto_threads() if n <= 0 else n
    torch.set_num_threads(n)
    return n


def demo_parser() -> argparse.ArgumentParser:
    cli = _cli()
    p = argparse.ArgumentParser(
        prog="repblend-fast demo",
        description="Run the whole pipeline (features, experts, RepBlend and LoRS distillation, "
        "evaluation against random and full-data baselines, report) on the embedded dataset.",
    )
    p.add_argument("--out", default="repblend_demo", help="run directory (default ./repblend_demo)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    cli._add_dataset_args(p)
    cli._add_encoder_args(p)
    d = DemoSettings()
    g = p.add_argument_group("demo size")
    g.add_argument("--pairs", type=int, default=None, help="N synthetic pairs (preset: 99)")
    g.add_argument("--iterations", type=int, default=None, help="RepBlend iterations (preset)")
    g.add_argument("--experts", type=int, default=d.experts, help="RepBlend experts")
    g.add_argument("--expert-batch", type=int, default=d.expert_batch)
    g.add_argument("--dim", type=int, default=d.dim, help="projection width D")
    g.add_argument("--no-lors", action="store_true", help="skip the LoRS branch")
    g.add_argument(
        "--lors-iterations",
        type=int,
        default=None,
        help=f"LoRS iterations (default {d.lors_overrides['iterations']})",
    )
    g.add_argument("--lors-experts", type=int, default=d.lors_experts)
    g.add_argument("--lors-image-size", type=int, default=None, help="LoRS resolution")
    g.add_argument("--num-eval", type=int, default=d.num_eval, help="evaluation seeds")
    g.add_argument("--eval-epochs", type=int, default=d.eval_epochs)
    g.add_argument("--eval-every", type=int, default=d.eval_every)
    g.add_argument("--full-epochs", type=int, default=d.full_epochs)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="DistillConfig override for both methods (JSON value), repeatable",
    )
    g.add_argument(
        "--lors-set",
        action="append",
        metavar="FIELD=VALUE",
        help="DistillConfig override for LoRS only, repeatable",
    )
    _add_threads(p)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (stage lines stay)")
    return p


def main_demo(argv: list[str] | None = None) -> int:
    """``repblend-fast demo``."""
    return _guarded("demo", _main_demo, argv)


def _main_demo(argv: list[str] | None) -> int:
    cli = _cli()
    args = demo_parser().parse_args(argv)
    threads = _set_threads(args.threads)
    over = cli._parse_set(args.set or [])
    if args.pairs is not None:
        over["pairs"] = args.pairs
    if args.iterations is not None:
        over["iterations"] = args.iterations
    if args.device != "cpu":
        over["device"] = args.device
    lors_over = dict(DemoSettings().lors_overrides)
    if args.lors_iterations is not None:
        lors_over["iterations"] = args.lors_iterations
    lors_over.update(cli._parse_set(args.lors_set or []))
    settings = DemoSettings(
        dataset=args.dataset,
        image_size=args.image_size,
        dim=args.dim,
        seed=args.seed,
        experts=args.experts,
        expert_batch=args.expert_batch,
        lors=not args.no_lors,
        lors_experts=args.lors_experts,
        lors_image_size=args.lors_image_size,
        lors_overrides=lors_over,
        num_eval=args.num_eval,
        eval_epochs=args.eval_epochs,
        eval_every=args.eval_every,
        full_epochs=args.full_epochs,
    )
    try:
        settings.validate()
        preset("demo", **over)
        if settings.lors:
            _lors_config(over, settings)
        from repblend_fast.report import check_plotting

        check_plotting()
        check_out(Path(args.out), args.overwrite)
    except (TypeError, ValueError, ImportError, FileExistsError) as exc:
        raise cli.CLIError(str(exc)) from exc

    def loader():
        return cli._dataset(args, "train"), cli._dataset(args, "test"), cli._encoders(args)

    try:
        metrics = run_demo(
            args.out,
            settings,
            overrides=over,
            loader=loader,
            cache_dir=args.cache_dir,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        raise cli.CLIError(str(exc)) from exc
    from repblend_fast.report import results_table

    print(results_table(metrics, "best"))
    if metrics.get("verdict"):
        print(metrics["verdict"])
    print(
        f"total {metrics['timings']['total_s']:.0f} s with {threads} torch thread(s); "
        f"report: {Path(args.out) / 'report.md'}"
    )
    return 0


# ----------------------------------------------------------------------------- CLI: report
def main_report(argv: list[str] | None = None) -> int:
    """``repblend-fast report --run DIR``: re-render report.md and the figures of a demo run."""
    return _guarded("report", _main_report, argv)


def _main_report(argv: list[str] | None) -> int:
    cli = _cli()
    p = argparse.ArgumentParser(
        prog="repblend-fast report",
        description="Re-render report.md and the PNG figures of a demo run directory.",
    )
    p.add_argument("--run", required=True, help="demo run directory (holds metrics.json)")
    p.add_argument("--no-figures", action="store_true", help="only rewrite report.md")
    args = p.parse_args(argv)
    from repblend_fast.report import render_run

    try:
        written = render_run(args.run, figures=not args.no_figures)
    except (FileNotFoundError, ValueError, ImportError, KeyError) as exc:
        raise cli.CLIError(str(exc)) from exc
    for name, path in written.items():
        print(f"wrote {path}" if name else path)
    return 0


# ----------------------------------------------------------------------------- CLI: evaluate
def evaluate_parser() -> argparse.ArgumentParser:
    cli = _cli()
    p = argparse.ArgumentParser(
        prog="repblend-fast evaluate",
        description="Evaluate a distilled set with the SPEC.md §8 protocol: fresh heads on its "
        "pairs (frozen encoders), retrieval on the real test split, mean ± std over seeds.",
    )
    p.add_argument("--distilled", required=True, help="distilled.safetensors (or its run dir)")
    cli._add_dataset_args(p)
    cli._add_encoder_args(p)
    p.add_argument("--dim", type=int, default=256, help="projection width D of the heads")
    p.add_argument("--num-eval", type=int, default=5, help="evaluation seeds (LoRS: 5)")
    p.add_argument("--epochs", type=int, default=101)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--loss", default=None, help="training loss (default: the set's config, wbce)")
    p.add_argument("--lr-img", type=float, default=None, help="override the learned η (image)")
    p.add_argument("--lr-txt", type=float, default=None, help="override the learned η (text)")
    p.add_argument(
        "--random-baseline",
        action="store_true",
        help="also evaluate random real subsets of the same size (same loss, lr 0.1)",
    )
    p.add_argument("--json", default=None, help="write the full result here")
    _add_threads(p)
    return p


def main_evaluate(argv: list[str] | None = None) -> int:
    """``repblend-fast evaluate --distilled FILE``."""
    return _guarded("evaluate", _main_evaluate, argv)


def _main_evaluate(argv: list[str] | None) -> int:
    cli = _cli()
    args = evaluate_parser().parse_args(argv)
    _set_threads(args.threads)
    from repblend_fast.distill import DistilledSet

    path = Path(args.distilled)
    if path.is_dir():
        path = path / "distilled.safetensors"
    if not path.is_file():
        raise cli.CLIError(
            f"--distilled {path}: file not found (pass a distilled.safetensors written by "
            "`repblend-fast distill` or `demo`, or its run directory)"
        )
    for flag in ("dim", "num_eval", "epochs", "eval_every"):
        if getattr(args, flag) < 1:
            raise cli.CLIError(f"--{flag.replace('_', '-')} must be >= 1")
    try:
        d = DistilledSet.load(path)
    except Exception as exc:  # a foreign or truncated file: say which
        raise cli.CLIError(f"--distilled {path}: cannot read a distilled set ({exc})") from exc
    cfg_loss, eps, scale = "wbce", 1e-6, 1 / 0.07
    try:
        from repblend_fast.io import safetensors_metadata

        meta = safetensors_metadata(path)
        if "config" in meta:
            c = DistillConfig.from_dict(json.loads(meta["config"]))
            cfg_loss, eps, scale = c.loss, c.eps, c.logit_scale
    except (ValueError, TypeError, KeyError):
        pass
    loss = args.loss or cfg_loss
    if d.images.dim() != 4 or d.images.shape[1] != 3:
        raise cli.CLIError(f"{path}: images must be [N, 3, H, W], got {tuple(d.images.shape)}")
    n = d.images.shape[0]
    if d.texts.dim() != 2 or d.texts.shape[0] != n:
        raise cli.CLIError(f"{path}: texts must be [N={n}, d_t], got {tuple(d.texts.shape)}")
    if d.similarity is not None and tuple(d.similarity.shape) != (n, n):
        raise cli.CLIError(
            f"{path}: similarity must be [{n}, {n}], got {tuple(d.similarity.shape)}"
        )
    enc = cli._encoders(args)
    d_t = int(enc.text.dim)
    if d.texts.shape[1] != d_t:
        raise cli.CLIError(
            f"{path}: the distilled texts are {d.texts.shape[1]}-dimensional but text encoder "
            f"{args.text_encoder!r} embeds captions in {d_t} dimensions: evaluate with the text "
            "encoder the set was distilled with (--text-encoder)"
        )
    test = cli._dataset(args, "test")
    from repblend_fast.evaluate import FeaturePairs, evaluate_distilled, random_subset
    from repblend_fast.pipeline import image_features, image_size_for, text_features

    size = image_size_for(test.name, args.image_size, enc.image_info)
    if tuple(d.images.shape[-2:]) != (size, size):
        _stderr(
            f"note: distilled images are {tuple(d.images.shape[-2:])} px, the test images "
            f"{size} px: resizing the distilled images for the encoder"
        )
    ftest = FeaturePairs(
        image_features(test, enc, size, cache_dir=args.cache_dir),
        text_features(test, enc, cache_dir=args.cache_dir),
        test.cap2img,
    )
    img = encode_images(enc, d.images, size)
    lr_i = args.lr_img if args.lr_img is not None else d.eta_img
    lr_t = args.lr_txt if args.lr_txt is not None else d.eta_txt
    kw = dict(
        test=ftest,
        dim=args.dim,
        epochs=args.epochs,
        eval_every=args.eval_every,
        loss=loss,
        eps=eps,
        logit_scale=scale,
    )
    try:
        res = evaluate_distilled(
            img,
            d.texts.float(),
            d.similarity,
            lr_img=lr_i,
            lr_txt=lr_t,
            num_eval=args.num_eval,
            **kw,
        )
    except ValueError as exc:
        raise cli.CLIError(f"{path}: {exc}") from exc
    result: dict[str, Any] = {
        "kind": "repblend_fast.evaluation",
        "distilled": str(path),
        "dataset": test.name,
        "image_encoder": enc.image_id,
        "text_encoder": enc.text_id,
        "methods": {"distilled": {"label": "distilled", "pairs": n, **res}},
    }
    if args.random_baseline:
        train = cli._dataset(args, "train")
        ftrain = FeaturePairs(
            image_features(train, enc, size, cache_dir=args.cache_dir),
            text_features(train, enc, cache_dir=args.cache_dir),
            train.cap2img,
        )
        per_seed = []
        for k in range(args.num_eval):
            ri, rt, _ = random_subset(ftrain, min(n, ftrain.img.shape[0]), seed=k)
            r = evaluate_distilled(ri, rt, None, lr_img=0.1, lr_txt=0.1, seeds=[k], **kw)
            per_seed.append(r["per_seed"][0])
        result["methods"]["random"] = {
            "label": "random subset",
            "pairs": n,
            "per_seed": per_seed,
            "best": summarize([p["best"] for p in per_seed]),
            "last": summarize([p["last"] for p in per_seed]),
            "lr_img": 0.1,
            "lr_txt": 0.1,
        }
    from repblend_fast.report import results_table

    print(f"{path}: {n} pairs, {args.num_eval} seeds, {args.epochs} epochs, loss {loss}")
    print("best epoch (chosen on test):")
    print(results_table(result, "best"))
    print("last epoch:")
    print(results_table(result, "last"))
    if args.json:
        from repblend_fast.io import atomic_write_json

        atomic_write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_demo())
