"""The demo from end to end: :func:`run_demo` runs the stages in order, then writes
``metrics.json``, ``report.md`` and the figures."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from repblend_fast.demo.evaluation import stage_diagnostics, stage_evaluate
from repblend_fast.demo.settings import FORMAT_VERSION, LABELS, DemoSettings
from repblend_fast.demo.stages import (
    branch_size,
    stage_distill,
    stage_experts,
    stage_features,
    stage_load,
)
from repblend_fast.demo.state import DemoRun, StageClock
from repblend_fast.threads import load_average


def _metrics(run: DemoRun) -> dict[str, Any]:
    from repblend_fast.report import verdict_lines

    s, train, test = run.settings, run.train, run.test
    metrics: dict[str, Any] = {
        "kind": "repblend_fast.demo",
        "format_version": FORMAT_VERSION,
        "dataset": {
            "name": train.name,
            "train_images": train.num_images,
            "train_captions": train.num_captions,
            "test_images": test.num_images,
            "test_captions": test.num_captions,
            "image_size": run.size,
            "fingerprint": train.fingerprint(),
            "attribution": (train.meta or {}).get("attribution"),
        },
        "encoders": {"image": run.enc.image_id, "text": run.enc.text_id},
        "image_mean": list(run.enc.image_info.mean),
        "image_std": list(run.enc.image_info.std),
        "settings": dataclasses.asdict(s),
        "evaluation": {
            "protocol": "docs/algorithm.md §8",
            "num_eval": s.num_eval,
            "epochs": s.eval_epochs,
            "eval_every": {m: s.every(m) for m in run.configs},
            "temperature": s.eval_temperature,
            "dim": s.dim,
            "full_epochs": s.full_epochs,
        },
        "experts": run.experts_meta,
        "distillation": run.dist_meta,
        "methods": run.methods,
        "diagnostics": run.diagnostics,
        "verdict": verdict_lines(run.methods),
    }
    if "lors" in run.configs:
        metrics["distillation"]["lors"]["reductions"] = _lors_reductions(run)
        metrics["experts"]["lors"]["note"] = "fewer than RepBlend's: each epoch trains the encoder"
    return metrics


def _lors_reductions(run: DemoRun) -> str:
    rb, lo, s = run.configs["repblend"], run.configs["lors"], run.settings
    parts = []
    if lo.iterations != rb.iterations:
        parts.append(f"{lo.iterations} iterations (RepBlend {rb.iterations})")
    if lo.syn_steps != rb.syn_steps:
        parts.append(f"T={lo.syn_steps} (RepBlend {rb.syn_steps})")
    if lo.max_start_epoch != rb.max_start_epoch:
        parts.append(f"E_max={lo.max_start_epoch}")
    if s.lors_experts != s.experts:
        parts.append(f"{s.lors_experts} expert(s) (RepBlend {s.experts})")
    if run.sizes["lors"] != run.size:
        parts.append(f"{run.sizes['lors']} px images")
    return ", ".join(parts) + (
        ": every LoRS iteration differentiates through training steps of the whole image "
        "encoder, and every expert epoch trains it on all images; at RepBlend's settings the "
        "LoRS branch alone would take far longer than the demo's CPU budget"
        if parts
        else ""
    )


def stage_report(run: DemoRun, metrics: dict[str, Any], timings: Callable[[], dict]) -> None:
    """Write ``metrics.json`` and render ``report.md`` and the figures."""
    from repblend_fast import report as rep
    from repblend_fast.io import atomic_write_json

    metrics["timings"] = timings()
    atomic_write_json(metrics, run.out / rep.METRICS_FILE)
    rep.render_run(run.out)


# ----------------------------------------------------------------------------- the demo
def run_demo(
    out_dir: str | os.PathLike,
    settings: DemoSettings | None = None,
    *,
    overrides: dict[str, Any] | None = None,
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
        loader: a callable returning ``(train split, test split, encoders)``, run as the first
            (timed) stage (default: ``settings.dataset`` and the packaged EfficientNet-Lite0 +
            MiniLM).
        cache_dir: feature and expert cache (default ``$REPBLEND_CACHE_DIR`` or
            ``~/.cache/repblend_fast``).
        overwrite: replace an earlier demo run in ``out_dir`` (only the files the demo writes).
        progress: tqdm bars of the inner loops; stage lines are always printed through ``log``.
    """
    from repblend_fast import report as rep

    s = (settings or DemoSettings()).validate()
    rep.check_plotting()  # fail before minutes of work, not after
    configs = s.configs(overrides)
    out = Path(out_dir)
    _prepare_out(out, overwrite)
    run = DemoRun(
        s, configs, out, StageClock(total=5 + 2 * len(configs), log=log), cache_dir, progress
    )
    clock = run.clock
    load_start, threads = load_average(), torch.get_num_threads()
    clock.note(
        f"output {out}; {os.cpu_count()} CPU cores, {threads} torch threads, load average "
        f"{load_start}"
    )
    clock.run("load data and encoders", lambda: stage_load(run, loader))
    tr, te = run.train, run.test
    clock.run(
        "image and text features",
        lambda: stage_features(run),
        f"{tr.num_images}+{te.num_images} images at {run.size} px, "
        f"{tr.num_captions}+{te.num_captions} captions (cached)",
    )
    for method in configs:
        _branch_stages(run, method)
    clock.run(
        "evaluation",
        lambda: stage_evaluate(run),
        f"fresh heads D={s.dim}, {s.eval_epochs} epochs, {s.num_eval} seeds per set",
    )
    emb = clock.run(
        "modality-collapse diagnostics",
        lambda: stage_diagnostics(run),
        "each set embedded by heads trained on it (seed 0)",
    )
    from repblend_fast.io import atomic_save_safetensors, atomic_write_json

    atomic_save_safetensors(
        {k: v.contiguous() for k, v in emb.items()}, out / "embeddings.safetensors"
    )
    metrics = _metrics(run)

    def timings() -> dict[str, Any]:
        return {
            "total_s": round(clock.elapsed(), 3),
            "stages": list(clock.stages),
            "load_start": load_start,
            "load_end": load_average(),
            "host": f"{os.cpu_count()} CPU cores, {threads} torch threads, "
            f"torch {torch.__version__}",
        }

    clock.run(
        "report",
        lambda: stage_report(run, metrics, timings),
        f"{out / rep.REPORT_FILE} and figures",
    )
    metrics["timings"] = timings()
    atomic_write_json(metrics, out / rep.METRICS_FILE)
    rep.write_report_md(metrics, out)  # with the report stage's own time
    clock.note(f"done in {clock.elapsed():.0f} s; report: {out / rep.REPORT_FILE}")
    return metrics


def _branch_stages(run: DemoRun, method: str) -> None:
    """The expert and distillation stages of one branch."""
    cfg, clock = run.configs[method], run.clock
    n_exp, e_batch = branch_size(run, method)
    epochs = cfg.max_start_epoch - 1 + cfg.expert_epochs
    steps = math.ceil(run.train.num_captions / e_batch)
    clock.run(
        f"{LABELS[method]} experts",
        lambda: stage_experts(run, method),
        f"{n_exp} × {epochs} epochs, batch {e_batch} ({steps} steps/epoch), "
        f"{cfg.student_kind.description}",
    )
    clock.run(
        f"{LABELS[method]} distillation",
        lambda: stage_distill(run, method),
        f"N={cfg.pairs}, {cfg.iterations} iterations, T={cfg.syn_steps}, B={cfg.batch_size},"
        f" {cfg.meta_grad} meta-gradient",
    )


# ----------------------------------------------------------------------------- output folder
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
