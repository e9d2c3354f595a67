"""``report.md`` of a demo run, one function per section: header, results (with notes and
verdict), distillation runs, distilled sets, collapse diagnostics, time and data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from repblend_fast.report.run_dir import (
    COLLAPSE_PNG,
    LOSS_PNG,
    REPORT_FILE,
    grid_png,
    loss_reference,
    read_jsonl,
)
from repblend_fast.report.tables import (
    WEAK_MATCH,
    diagnostics_table,
    fmt,
    fmt_g,
    fmt_value,
    method_label,
    ordered_methods,
    pm,
    results_table,
    verdict_lines,
)

# Settings of a distillation run listed under its loss table, in this order.
CONFIG_KEYS = (
    "pairs",
    "iterations",
    "syn_steps",
    "batch_size",
    "expert_epochs",
    "max_start_epoch",
    "lr_img",
    "lr_txt",
    "lr_lr",
    "lr_sim",
    "lr_init",
    "clamp_lr",
    "loss",
    "similarity",
    "meta_grad",
)
# Columns of the distillation-runs table.
DISTILLATION_HEAD = (
    "run",
    "iterations",
    "loss, first 10%",
    "loss, last 10%",
    "η img (final)",
    "η txt (final)",
    "s per iteration",
)


def write_report_md(metrics: dict[str, Any], run_dir: str | os.PathLike) -> Path:
    """Write ``report.md`` for ``metrics`` (the content of ``metrics.json``) into ``run_dir``."""
    from repblend_fast.io import atomic_write_text

    run_dir = Path(run_dir)
    methods = metrics["methods"]
    labels = {k: method_label(methods, k) for k in methods}
    out = _header(metrics)
    out += _results(metrics, labels)
    out += _distillation(metrics, labels, run_dir)
    out += _distilled_sets(methods, labels, run_dir)
    out += _diagnostics(metrics, labels, run_dir)
    out += _time(metrics)
    out += _data(metrics)
    path = run_dir / REPORT_FILE
    atomic_write_text("\n".join(out).rstrip() + "\n", path)
    return path


# ------------------------------------------------------------------------------- sections
def _header(metrics: dict[str, Any]) -> list[str]:
    """Title, dataset splits and encoders."""
    ds = metrics.get("dataset", {})
    enc = metrics.get("encoders", {})
    return [
        f"# repblend_fast demo — {ds.get('name', '?')}",
        "",
        f"Train split: {ds.get('train_images', '?')} images / {ds.get('train_captions', '?')} "
        f"captions; test split: {ds.get('test_images', '?')} images / "
        f"{ds.get('test_captions', '?')} captions; images at {ds.get('image_size', '?')} px.",
        f"Image encoder `{enc.get('image', '?')}`; text encoder `{enc.get('text', '?')}`.",
        "",
    ]


def _results(metrics: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """Best- and last-epoch results tables, how each row was obtained, and the verdict."""
    methods = metrics["methods"]
    ev = metrics.get("evaluation", {})
    out = [
        "## Results (held-out test split)",
        "",
        f"Retrieval recall in % (IR = text→image, TR = image→text), mean ± std over "
        f"{ev.get('num_eval', '?')} evaluation seeds (fresh heads, D = {ev.get('dim', '?')}"
        + (f", logit temperature {fmt_g(ev['temperature'])}" if "temperature" in ev else "")
        + "); "
        'mean recall is the mean of the six recalls; "eval lr" is the learning rate the fresh '
        "heads are trained with. **Best epoch** (chosen on the test split, as the reference "
        f"does, among {_eval_epochs(ev)}):",
        "",
        results_table(metrics, "best"),
        "",
        "**Last epoch**:",
        "",
        results_table(metrics, "last"),
        "",
    ]
    notes = [k for k in ordered_methods(methods) if methods[k].get("note")]
    if notes:
        out += ["How each row was obtained:", ""]
        out += [f"- **{labels[k]}**: {methods[k]['note']}" for k in notes]
        out.append("")
    verdict = metrics.get("verdict")
    lines = verdict if isinstance(verdict, list) else verdict_lines(methods)
    if not lines and isinstance(verdict, str) and verdict.strip():
        lines = [verdict.strip()]
    if lines:
        out += [
            "**Verdict** (mean recall at the best epoch; a difference is called clear when it is "
            "more than the sum of the two rows' standard deviations):",
            "",
            *[f"- {s}" for s in lines],
            "",
        ]
    return out


def _distillation(metrics: dict[str, Any], labels: dict[str, str], run_dir: Path) -> list[str]:
    """The distillation runs: matching loss table, reductions, loss curves, settings."""
    dist = metrics.get("distillation", {})
    if not dist:
        return []
    out = _distillation_table(dist, labels, run_dir)
    reductions = [(n, d["reductions"]) for n, d in dist.items() if d.get("reductions")]
    for name, r in reductions:
        out += [f"Reduced settings of {labels.get(name, name)}: {r}.", ""]
    if (run_dir / LOSS_PNG).exists():
        out += [f"![loss curves]({LOSS_PNG})", ""]
    out += _learning_curves(dist, metrics.get("methods", {}), labels)
    out += _guard(dist, labels)
    out += _distillation_settings(metrics, labels)
    out.append("")
    return out


def _learning_curves(dist, methods, labels: dict[str, str]) -> list[str]:
    """Held-out mean recall of a distilled set at a few iteration counts (same protocol as the
    results table, best epoch, mean ± std over evaluation seeds); the last point is the set's
    final evaluation."""
    out: list[str] = []
    for name, d in dist.items():
        curve = list(d.get("curve") or [])
        if not curve:
            continue
        final = methods.get(name, {}).get("best")
        if final and d.get("iterations") is not None:
            curve.append({"iteration": d["iterations"], "best": final})
        head = " | ".join(str(p["iteration"]) for p in curve)
        vals = " | ".join(pm(p["best"]) for p in curve)
        out += [
            f"**Learning curve of {labels.get(name, name)}** (held-out mean recall of the set as "
            "it stood after that many iterations; best epoch, mean ± std over the evaluation "
            "seeds):",
            "",
            f"| iterations | {head} |",
            "|---|" + "---:|" * len(curve),
            f"| mean recall | {vals} |",
            "",
        ]
    return out


def _guard(dist: dict[str, dict[str, Any]], labels: dict[str, str]) -> list[str]:
    """How often the guard stepped in (docs/algorithm.md §14), and its warnings."""
    runs = [(n, d["guard"]) for n, d in dist.items() if d.get("guard")]
    if not runs:
        return []
    out = [
        "**Guard** (docs/algorithm.md §14): iterations not applied (a meta-gradient spike or a "
        "loss-jump rollback), the longest run of them, the share of rows the trust region "
        "scaled down (mean over iterations), and the gradient checks that failed:",
        "",
        "| run | iterations | rejected | rolled back | longest streak | rows clipped "
        "(image / text / sim) | gradient checks failed |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for name, g in runs:
        clip = " / ".join(f"{100 * v:.1f}%" for v in g["clipped_fraction"].values())
        checks = g.get("grad_checks", {})
        out.append(
            f"| {labels.get(name, name)} | {g['iterations']} | {g['rejected_iterations']} | "
            f"{g['rolled_back']} | {g['longest_rejected_streak']} | {clip} | "
            f"{checks.get('failed', 0)} of {checks.get('run', 0)} |"
        )
    out.append("")
    for name, g in runs:
        out += [f"- {labels.get(name, name)}: {w}" for w in g.get("warnings", [])]
    if any(g.get("warnings") for _, g in runs):
        out.append("")
    return out


def _distillation_table(
    dist: dict[str, dict[str, Any]], labels: dict[str, str], run_dir: Path
) -> list[str]:
    """What the matching loss is, and its first and last values per distillation run."""
    refs = {}
    for name, d in dist.items():
        p = run_dir / d.get("metrics_jsonl", f"{name}/metrics.jsonl")
        recs = read_jsonl(p) if p.is_file() and not d.get("config") else []
        refs[name] = loss_reference(d.get("config"), recs)
    if len(set(refs.values())) <= 1:
        ref_s = fmt(next(iter(refs.values()), 2.0), 0)
    else:
        ref_s = ", ".join(f"{fmt(r, 0)} for {labels.get(n, n)}" for n, r in refs.items())
    out = [
        "## Distillation runs",
        "",
        "Matching loss: ‖θ_T − θ*‖² / ‖θ₀ − θ*‖² per modality (image head, text head), the "
        "student's distance after T steps on the distilled set from the expert's parameters "
        "θ* some epochs later, relative to its distance at the start θ₀; the table gives the "
        "total over the two modalities, whose value for a student that does not move is "
        f"{ref_s} (0 = the student reaches the expert exactly). Mean over the first and the "
        "last 10% of the iterations.",
        "",
    ]
    head = DISTILLATION_HEAD
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, d in dist.items():
        row = [
            labels.get(name, name),
            str(d.get("iterations", "?")),
            fmt(d["loss_start"], 3) if "loss_start" in d else "–",
            fmt(d["loss_end"], 3) if "loss_end" in d else "–",
            fmt_g(d["eta_img"]) if "eta_img" in d else "–",
            fmt_g(d["eta_txt"]) if "eta_txt" in d else "–",
            fmt(d["sec_per_iter"], 2) if "sec_per_iter" in d else "–",
        ]
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    return out


def _distillation_settings(metrics: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """One bullet per distillation config and per expert set."""
    out = []
    dist = metrics.get("distillation", {})
    for name in dist:
        cfg = dist[name].get("config")
        if cfg:
            short = ", ".join(f"{k}={fmt_value(cfg[k])}" for k in CONFIG_KEYS if k in cfg)
            out.append(f"- {labels.get(name, name)} config: {short}")
    exp = metrics.get("experts", {})
    for name, e in exp.items():
        n_exp = e.get("num_experts")
        out.append(
            f"- {labels.get(name, name)} experts: {n_exp} expert"
            + ("s" if n_exp != 1 else "")
            + f" × {e.get('epochs')} epoch"
            + ("s" if e.get("epochs") != 1 else "")
            + f", batch {e.get('batch_size')}, lr {fmt_value(e.get('lr'))}"
            + (f", {e['steps_per_epoch']} SGD steps per epoch" if "steps_per_epoch" in e else "")
            + (f" ({e['note']})" if e.get("note") else "")
        )
    return out


def _distilled_sets(methods: dict[str, Any], labels: dict[str, str], run_dir: Path) -> list[str]:
    """Per method with a grid PNG: the grid and the nearest real caption of its first texts."""
    out = []
    for name in ordered_methods(methods):
        png = grid_png(name)
        if not (run_dir / png).exists():
            continue
        out += [
            f"### Distilled set: {labels.get(name, name)}",
            "",
            f"![{labels.get(name, name)} distilled images]({png})",
            "",
        ]
        caps = methods[name].get("nearest_captions")
        if caps:
            sims = methods[name].get("nearest_similarity") or []
            k = min(12, len(caps))
            out += [
                f"Nearest real training caption of the first {k} of {len(caps)} distilled "
                "texts, with its cosine similarity in the text encoder's space (1 = the "
                f"distilled text still is that caption; below {WEAK_MATCH} it is marked as a weak "
                "match: no real caption says what that text says):",
                "",
                "| # | nearest real caption | cosine |",
                "|---|---|---|",
            ]
            for i, c in enumerate(caps[:k]):
                c = str(c).replace("|", "/")
                cos = fmt(sims[i], 2) if i < len(sims) else "–"
                if i < len(sims) and float(sims[i]) < WEAK_MATCH:
                    cos += " (weak match)"
                out.append(f"| {i + 1} | {c} | {cos} |")
            out.append("")
    return out


def _diagnostics(metrics: dict[str, Any], labels: dict[str, str], run_dir: Path) -> list[str]:
    """The modality-collapse diagnostics table and figure."""
    diag = metrics.get("diagnostics")
    if not diag:
        return []
    out = [
        "## Modality-collapse diagnostics",
        "",
        "Each set's own pairs embedded by heads trained on that set (evaluation seed 0). "
        "Intra-modal similarity: mean pairwise cosine within a modality; modality gap: "
        "‖mean(image emb.) − mean(text emb.)‖ of the L2-normalised embeddings; concentration: "
        "share of the variance of the normalised embeddings on the top principal component "
        "(1 = collapsed onto a line). All unitless.",
        "",
        diagnostics_table(diag, labels),
        "",
    ]
    if (run_dir / COLLAPSE_PNG).exists():
        out += [f"![collapse diagnostics]({COLLAPSE_PNG})", ""]
    return out


def _time(metrics: dict[str, Any]) -> list[str]:
    """Total wall time, host load and the time of each stage."""
    tim = metrics.get("timings")
    if not tim:
        return []
    load = (
        f" (load average over 1 / 5 / 15 min: {_load_avg(tim['load_start'])} at the "
        f"start, {_load_avg(tim.get('load_end'))} at the end)"
        if tim.get("load_start")
        else ""
    )
    total = _fmt_s(tim.get("total_s", 0.0))
    out = ["## Time", "", f"Total wall time **{total}** on {tim.get('host', '?')}{load}.", ""]
    out += ["| stage | time |", "|---|---|"]
    out += [f"| {s['stage']} | {_fmt_s(s['seconds'])} |" for s in tim.get("stages", [])]
    out.append("")
    return out


def _data(metrics: dict[str, Any]) -> list[str]:
    """The dataset's attribution, when it has one."""
    attribution = metrics.get("dataset", {}).get("attribution")
    return ["## Data", "", str(attribution), ""] if attribution else []


# ------------------------------------------------------------------------------- helpers
def _fmt_s(sec: float) -> str:
    if sec < 0.05:
        return "< 0.1 s"
    return f"{fmt(sec, 0)} s" if sec >= 10 else f"{fmt(sec, 1)} s"


def _eval_epochs(ev: dict[str, Any]) -> str:
    """``"epochs 0, 10, …, 100 of the 101 training epochs, counted from 0"`` (per method when the
    cadence differs by method)."""
    every = ev.get("eval_every")
    if isinstance(every, dict) and every:
        names = {"repblend": "RepBlend and the baselines", "lors": "LoRS", "mtt-vl": "MTT-VL"}
        return "; ".join(
            f"{names.get(m, m)}: {_eval_epochs({**ev, 'eval_every': e})}" for m, e in every.items()
        )
    n = ev.get("epochs")
    if not isinstance(n, int) or not isinstance(every, int) or n < 1 or every < 1:
        return f"every {every if every is not None else '?'} epochs"
    shown = sorted(set(range(0, n, every)) | {n - 1})
    s = ", ".join(map(str, shown)) if len(shown) <= 4 else f"{shown[0]}, {shown[1]}, …, {shown[-1]}"
    return f"epochs {s} of the {n} training epochs, counted from 0"


def _load_avg(v: Any) -> str:
    if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v):
        return " / ".join(fmt(x, 2) for x in v)
    return str(v)
