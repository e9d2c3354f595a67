"""Rendering of a demo run directory: ``report.md`` and the PNG figures.

Everything here reads only what a run directory holds (``metrics.json``, each distillation's
``metrics.jsonl`` and ``distilled.safetensors``, ``embeddings.safetensors``), so
``repblend-fast report --run DIR`` re-renders a run without encoders, data or a feature cache.

matplotlib (the ``plots`` extra) is imported lazily, with the non-interactive Agg backend.

Files written:

=========================  ========================================================================
``report.md``              results table (mean ± std over evaluation seeds), settings, timings
``distilled_<m>.png``      the distilled images of method ``m``, each captioned with the real
                           training caption nearest to its distilled text
``loss_curves.png``        matching loss per modality and learned learning rates per iteration
``collapse.png``           modality-collapse diagnostics (SPEC.md §9) per set, and a PCA view
=========================  ========================================================================
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path
from typing import Any

import torch

RECALL_KEYS = ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10")
METHOD_ORDER = ("repblend", "lors", "random", "random_infonce", "kcenter", "herding", "full")
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
LOSS_PNG = "loss_curves.png"
COLLAPSE_PNG = "collapse.png"
DIAG_KEYS = (
    ("intra_sim_img", "intra-modal sim. (image)"),
    ("intra_sim_txt", "intra-modal sim. (text)"),
    ("modality_gap", "modality gap"),
    ("concentration_img", "concentration (image)"),
    ("concentration_txt", "concentration (text)"),
)


def grid_png(method: str) -> str:
    """File name of the distilled-image grid of ``method``."""
    return f"distilled_{method}.png"


def _plt():
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the demo report draws its figures with matplotlib: pip install 'repblend_fast[plots]'"
            " (or pip install matplotlib)"
        ) from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def check_plotting() -> None:
    """Raise ``ImportError`` with the install command if matplotlib is missing."""
    _plt()


# ------------------------------------------------------------------------------- loading
def load_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``metrics.json`` of a demo run; ``FileNotFoundError`` / ``ValueError`` with the reason."""
    path = Path(run_dir) / METRICS_FILE
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"{run_dir} is not a directory (expected a demo run directory)")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: not a demo run directory, or the run did not finish "
            "(run `repblend-fast demo --out DIR` first)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("kind") != "repblend_fast.demo":
        raise ValueError(f"{path} is not a repblend_fast demo metrics file")
    if not isinstance(data.get("methods"), dict) or not data["methods"]:
        raise ValueError(f"{path} holds no evaluated methods")
    return data


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (blank lines skipped)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                out.append(json.loads(line))
    return out


# ------------------------------------------------------------------------------- numbers
def pm(summary: dict[str, Any] | None, key: str = "mean", digits: int = 1) -> str:
    """``"mean ± std"`` of ``key`` in an evaluation summary ``{"mean": {...}, "std": {...}}``."""
    if not summary:
        return "–"
    m, s = summary["mean"].get(key), summary["std"].get(key)
    if m is None:
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _ordered(methods: dict[str, Any]) -> list[str]:
    known = [m for m in METHOD_ORDER if m in methods]
    return known + sorted(m for m in methods if m not in METHOD_ORDER)


def results_table(metrics: dict[str, Any], which: str = "best") -> str:
    """Markdown table of the evaluation results (``which`` = ``best`` or ``last`` epoch)."""
    head = ["method", "pairs", "mean recall", *RECALL_KEYS, "lr img / txt"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in _ordered(metrics["methods"]):
        m = metrics["methods"][name]
        summ = m.get(which)
        if summ is None:
            err = str(m.get("error", "not evaluated")).replace("|", "/")
            lines.append(f"| {m.get('label', name)} | {m.get('pairs', '–')} | failed: {err} |")
            continue
        lr = m.get("lr_img"), m.get("lr_txt")
        lr_s = f"{lr[0]:.4g} / {lr[1]:.4g}" if None not in lr else "–"
        row = [
            m.get("label", name),
            str(m.get("pairs", "–")),
            f"**{pm(summ)}**",
            *[pm(summ, k) for k in RECALL_KEYS],
            lr_s,
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def diagnostics_table(diag: dict[str, dict[str, float]], labels: dict[str, str]) -> str:
    head = ["set", *[label for _, label in DIAG_KEYS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, d in diag.items():
        row = [labels.get(name, name), *[f"{d[k]:.3f}" if k in d else "–" for k, _ in DIAG_KEYS]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _fmt_s(sec: float) -> str:
    return f"{sec:.0f} s" if sec >= 10 else f"{sec:.1f} s"


# ------------------------------------------------------------------------------- report.md
def write_report_md(metrics: dict[str, Any], run_dir: str | os.PathLike) -> Path:
    """Write ``report.md`` for ``metrics`` (the content of ``metrics.json``) into ``run_dir``."""
    from repblend_fast.io import atomic_write_text

    run_dir = Path(run_dir)
    methods = metrics["methods"]
    labels = {k: v.get("label", k) for k, v in methods.items()}
    ds = metrics.get("dataset", {})
    enc = metrics.get("encoders", {})
    ev = metrics.get("evaluation", {})
    out: list[str] = [f"# repblend_fast demo — {ds.get('name', '?')}", ""]
    out += [
        f"Train split: {ds.get('train_images', '?')} images / {ds.get('train_captions', '?')} "
        f"captions; test split: {ds.get('test_images', '?')} images / "
        f"{ds.get('test_captions', '?')} captions; images at {ds.get('image_size', '?')} px.",
        f"Image encoder `{enc.get('image', '?')}`; text encoder `{enc.get('text', '?')}`.",
        "",
        "## Results (held-out test split)",
        "",
        f"Retrieval recall in % (IR = text→image, TR = image→text), mean ± std over "
        f"{ev.get('num_eval', '?')} evaluation seeds (fresh heads, D = {ev.get('dim', '?')}). "
        f"**Best epoch** (chosen on the test split, as the reference does; epochs "
        f"0, {ev.get('eval_every', '?')}, … of {ev.get('epochs', '?')}):",
        "",
        results_table(metrics, "best"),
        "",
        "**Last epoch**:",
        "",
        results_table(metrics, "last"),
        "",
    ]
    notes = [m["note"] for m in (methods[k] for k in _ordered(methods)) if m.get("note")]
    if notes:
        out += ["How each row was obtained:", ""]
        out += [
            f"- **{methods[k]['label']}**: {methods[k]['note']}"
            for k in _ordered(methods)
            if methods[k].get("note")
        ]
        out.append("")
    verdict = metrics.get("verdict")
    if verdict:
        out += [verdict, ""]

    dist = metrics.get("distillation", {})
    if dist:
        out += ["## Distillation runs", ""]
        head = [
            "run",
            "iterations",
            "loss first 10%",
            "loss last 10%",
            "η img",
            "η txt",
            "s / iteration",
            "reductions",
        ]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, d in dist.items():
            out.append(
                "| "
                + " | ".join(
                    [
                        labels.get(name, name),
                        str(d.get("iterations", "?")),
                        f"{d['loss_start']:.3f}" if "loss_start" in d else "–",
                        f"{d['loss_end']:.3f}" if "loss_end" in d else "–",
                        f"{d['eta_img']:.4g}" if "eta_img" in d else "–",
                        f"{d['eta_txt']:.4g}" if "eta_txt" in d else "–",
                        f"{d['sec_per_iter']:.2f}" if "sec_per_iter" in d else "–",
                        d.get("reductions") or "–",
                    ]
                )
                + " |"
            )
        out.append("")
        if (run_dir / LOSS_PNG).exists():
            out += [f"![loss curves]({LOSS_PNG})", ""]
        for name in dist:
            cfg = dist[name].get("config")
            if cfg:
                keys = (
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
                short = ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)
                out.append(f"- {labels.get(name, name)} config: {short}")
        exp = metrics.get("experts", {})
        for name, e in exp.items():
            out.append(
                f"- {labels.get(name, name)} experts: {e.get('num_experts')} × "
                f"{e.get('epochs')} epochs, batch {e.get('batch_size')}, lr {e.get('lr')}"
                + (
                    f", {e['steps_per_epoch']} SGD steps per epoch"
                    if "steps_per_epoch" in e
                    else ""
                )
                + (f" ({e['note']})" if e.get("note") else "")
            )
        out.append("")

    for name in _ordered(methods):
        png = grid_png(name)
        if (run_dir / png).exists():
            out += [
                f"### Distilled set: {labels.get(name, name)}",
                "",
                f"![{labels.get(name, name)} distilled images]({png})",
                "",
            ]
            caps = methods[name].get("nearest_captions")
            if caps:
                sims = methods[name].get("nearest_similarity") or []
                show = ", ".join(
                    f"{c!r}" + (f" ({sims[i]:.2f})" if i < len(sims) else "")
                    for i, c in enumerate(caps[:12])
                )
                out += [
                    f"Nearest real captions of the first distilled texts (cosine): {show}"
                    + (" …" if len(caps) > 12 else ""),
                    "",
                ]

    diag = metrics.get("diagnostics")
    if diag:
        out += [
            "## Modality-collapse diagnostics",
            "",
            "Each set's own pairs embedded by heads trained on that set (evaluation seed 0). "
            "Intra-modal similarity: mean pairwise cosine within a modality; modality gap: "
            "‖mean(image emb.) − mean(text emb.)‖ of the L2-normalised embeddings; concentration: "
            "share of the variance of the normalised embeddings on the top principal component "
            "(1 = collapsed onto a line).",
            "",
            diagnostics_table(diag, labels),
            "",
        ]
        if (run_dir / COLLAPSE_PNG).exists():
            out += [f"![collapse diagnostics]({COLLAPSE_PNG})", ""]

    tim = metrics.get("timings")
    if tim:
        out += ["## Time", ""]
        out += [
            f"Total wall time **{_fmt_s(tim.get('total_s', 0.0))}** on {tim.get('host', '?')}"
            + (
                f" (load average at start {tim['load_start']}, at end {tim['load_end']})"
                if tim.get("load_start")
                else ""
            )
            + ".",
            "",
        ]
        out += ["| stage | time |", "|---|---|"]
        out += [f"| {s['stage']} | {_fmt_s(s['seconds'])} |" for s in tim.get("stages", [])]
        out.append("")

    attribution = ds.get("attribution")
    if attribution:
        out += ["## Data", "", str(attribution), ""]
    path = run_dir / REPORT_FILE
    atomic_write_text("\n".join(out).rstrip() + "\n", path)
    return path


# ------------------------------------------------------------------------------- figures
def plot_distilled_grid(
    images: torch.Tensor,
    captions: list[str],
    path: str | os.PathLike,
    *,
    title: str = "",
    cols: int = 10,
) -> Path:
    """A grid of images ``[N, 3, H, W]`` with pixels in [0, 1], each captioned (wrapped)."""
    plt = _plt()
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1|3, H, W], got {tuple(images.shape)}")
    n = images.shape[0]
    if len(captions) != n:
        raise ValueError(f"{n} images but {len(captions)} captions")
    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.45 * cols, 1.75 * rows + 0.4), squeeze=False)
    arr = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= n:
            continue
        im = arr[k]
        ax.imshow(
            im[..., 0] if im.shape[-1] == 1 else im,
            cmap="gray" if im.shape[-1] == 1 else None,
            interpolation="nearest",
        )
        text = "\n".join(textwrap.wrap(captions[k], 16)[:3])
        ax.set_title(text, fontsize=6, pad=2)
    height = fig.get_size_inches()[1]
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 1 - (0.45 / height if title else 0)))
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_loss_curves(runs: dict[str, list[dict[str, Any]]], path: str | os.PathLike) -> Path:
    """Matching loss (total and per modality, log scale) and learned learning rates per
    iteration, one colour per run (``{label: metrics.jsonl records}``)."""
    plt = _plt()
    fig, (ax_l, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (label, recs) in enumerate(runs.items()):
        if not recs:
            continue
        c = colors[k % len(colors)]
        it = [r["iteration"] for r in recs]
        ax_l.plot(it, [r["loss"] for r in recs], color=c, lw=1.6, label=f"{label}: total")
        ax_l.plot(
            it, [r["loss_img"] for r in recs], color=c, lw=0.9, ls="--", label=f"{label}: image"
        )
        ax_l.plot(
            it, [r["loss_txt"] for r in recs], color=c, lw=0.9, ls=":", label=f"{label}: text"
        )
        ax_e.plot(it, [r["eta_img"] for r in recs], color=c, ls="--", label=f"{label}: η image")
        ax_e.plot(it, [r["eta_txt"] for r in recs], color=c, ls=":", label=f"{label}: η text")
    ax_l.axhline(1.0, color="gray", lw=0.6)
    ax_l.set_yscale("log")
    ax_l.set_xlabel("iteration")
    ax_l.set_ylabel("matching loss ‖θ_T − θ*‖² / ‖θ* − θ₀‖²")
    ax_l.set_title("trajectory-matching loss (1 = student does not move)", fontsize=9)
    ax_l.legend(fontsize=7)
    ax_e.set_xlabel("iteration")
    ax_e.set_ylabel("learned student learning rate η")
    ax_e.set_title("learned learning rates", fontsize=9)
    ax_e.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _pca2(z: torch.Tensor) -> torch.Tensor:
    z = z.double() - z.double().mean(0)
    _, _, v = torch.linalg.svd(z, full_matrices=False)
    return (z @ v[:2].T).float()


def plot_collapse(
    diag: dict[str, dict[str, float]],
    labels: dict[str, str],
    path: str | os.PathLike,
    embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Path:
    """Bar chart of the SPEC.md §9 diagnostics per set and, with ``embeddings``
    (``{set: (image emb [N, D], text emb [N, D])}``), a joint 2-D PCA of each set's normalised
    image and text embeddings."""
    plt = _plt()
    sets = list(diag)
    n_emb = len(embeddings or {})
    fig = plt.figure(figsize=(max(10, 3.4 * n_emb), 4.2 if not n_emb else 8))
    ax = fig.add_subplot(2 if n_emb else 1, 1, 1)
    width = 0.8 / max(1, len(sets))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, name in enumerate(sets):
        vals = [diag[name].get(key, float("nan")) for key, _ in DIAG_KEYS]
        xs = [i + (k - (len(sets) - 1) / 2) * width for i in range(len(DIAG_KEYS))]
        bars = ax.bar(xs, vals, width, label=labels.get(name, name), color=colors[k % len(colors)])
        for b, v in zip(bars, vals):
            if math.isfinite(v):
                ax.text(
                    b.get_x() + b.get_width() / 2,
                    v,
                    f"{v:.2f}",
                    ha="center",
                    va="bottom",
                    fontsize=6,
                )
    ax.set_xticks(range(len(DIAG_KEYS)))
    ax.set_xticklabels([label for _, label in DIAG_KEYS], fontsize=8)
    ax.set_title(
        "modality-collapse diagnostics of each set, embedded by heads trained on it", fontsize=9
    )
    ax.legend(fontsize=8)
    if n_emb:
        import torch.nn.functional as F

        for k, (name, (u, v)) in enumerate(embeddings.items()):
            a = fig.add_subplot(2, n_emb, n_emb + k + 1)
            z = _pca2(torch.cat([F.normalize(u.float(), dim=-1), F.normalize(v.float(), dim=-1)]))
            n = u.shape[0]
            a.scatter(z[:n, 0], z[:n, 1], s=6, label="image", alpha=0.7)
            a.scatter(z[n:, 0], z[n:, 1], s=6, label="text", alpha=0.7)
            a.set_title(f"{labels.get(name, name)}: PCA of normalised embeddings", fontsize=8)
            a.tick_params(labelsize=6)
            a.legend(fontsize=6)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------- whole run
def render_run(run_dir: str | os.PathLike, *, figures: bool = True) -> dict[str, Path]:
    """Re-render ``report.md`` and (with ``figures``) all PNGs of a demo run directory from the
    files it holds. Returns ``{name: path}`` of what was written."""
    from repblend_fast.io import load_safetensors

    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir)
    labels = {k: v.get("label", k) for k, v in metrics["methods"].items()}
    written: dict[str, Path] = {}
    if figures:
        check_plotting()
        mean = metrics.get("image_mean")
        std = metrics.get("image_std")
        for name, m in metrics["methods"].items():
            rel = m.get("distilled")
            caps = m.get("nearest_captions")
            if not rel or not caps:
                continue
            f = run_dir / rel
            if not f.is_file():
                raise FileNotFoundError(f"{f} (listed in metrics.json) is missing")
            images = load_safetensors(f)["images"].float()
            if mean is not None and std is not None:
                c = images.shape[1]
                images = images * torch.tensor(std).view(1, c, 1, 1) + torch.tensor(mean).view(
                    1, c, 1, 1
                )
            written[grid_png(name)] = plot_distilled_grid(
                images,
                list(caps),
                run_dir / grid_png(name),
                title=f"{labels[name]}: {images.shape[0]} distilled images, each with the real "
                "caption nearest to its distilled text",
            )
        runs = {}
        for name, d in metrics.get("distillation", {}).items():
            p = run_dir / d.get("metrics_jsonl", f"{name}/metrics.jsonl")
            if p.is_file():
                runs[labels.get(name, name)] = read_jsonl(p)
        if runs:
            written[LOSS_PNG] = plot_loss_curves(runs, run_dir / LOSS_PNG)
        diag = metrics.get("diagnostics")
        if diag:
            emb = None
            ep = run_dir / "embeddings.safetensors"
            if ep.is_file():
                t = load_safetensors(ep)
                emb = {
                    n: (t[f"{n}.image"], t[f"{n}.text"])
                    for n in diag
                    if f"{n}.image" in t and f"{n}.text" in t
                }
            written[COLLAPSE_PNG] = plot_collapse(diag, labels, run_dir / COLLAPSE_PNG, emb)
    written[REPORT_FILE] = write_report_md(metrics, run_dir)
    return written
