"""The matplotlib figures of a demo run: the distilled-image grids, the matching-loss curves and
the modality-collapse diagnostics.

matplotlib (the ``plots`` extra) is imported lazily, with the non-interactive Agg backend, on
the first figure drawn (or :func:`check_plotting`). All figures are drawn at :data:`DPI` with no
text smaller than :data:`MIN_FONT_PT` points.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from repblend_fast.report.run_dir import (
    COLLAPSE_PNG,
    LOSS_PNG,
    grid_png,
    load_metrics,
    loss_reference,
    read_jsonl,
)
from repblend_fast.report.tables import DIAG_KEYS, WEAK_MATCH, fmt, method_label

DPI = 100
MIN_FONT_PT = 8.5  # 11.8 px at DPI; DejaVu Sans capitals are 0.73 em, so 8.6 px tall
CAPTION_PT = 9.0
CAPTION_LINES = 3
MODALITY_STYLE = {"image": "--", "text": ":", "total": "-"}
# Tick labels of the diagnostics bar chart: what each number is, in two short lines.
DIAG_TICKS = {
    "intra_sim_img": "intra-modal cosine\nsimilarity (image)",
    "intra_sim_txt": "intra-modal cosine\nsimilarity (text)",
    "modality_gap": "modality gap\n‖mean image − mean text‖",
    "concentration_img": "top-PC variance\nshare (image)",
    "concentration_txt": "top-PC variance\nshare (text)",
}


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


# ------------------------------------------------------------------------------- grids
def _fit_caption(text: str, width_px: float, prop, renderer, max_lines: int) -> str:
    """``text`` broken into at most ``max_lines`` lines no wider than ``width_px`` as rendered
    with font ``prop``; what does not fit is cut, ending in an ellipsis."""

    def width(s: str) -> float:
        return renderer.get_text_width_height_descent(s, prop, ismath=False)[0]

    def cut(s: str) -> str:  # the longest prefix of s + "…" that fits
        while s and width(s.rstrip() + "…") > width_px:
            s = s[:-1]
        return s.rstrip() + "…"

    lines: list[str] = []
    words = " ".join(str(text).split()).split(" ")
    i = 0
    while i < len(words) and len(lines) < max_lines:
        line = words[i]
        i += 1
        while i < len(words) and width(f"{line} {words[i]}") <= width_px:
            line = f"{line} {words[i]}"
            i += 1
        if width(line) > width_px:  # one word wider than the cell: hard break
            k = len(line)
            while k > 1 and width(line[:k]) > width_px:
                k -= 1
            words.insert(i, line[k:])
            line = line[:k]
        lines.append(line)
    if i < len(words) and lines:
        lines[-1] = cut(lines[-1] + " " + words[i])
    return "\n".join(lines)


def make_distilled_grid(
    images: torch.Tensor,
    captions: list[str],
    *,
    title: str = "",
    cols: int = 10,
    cell_in: float = 1.3,
):
    """Figure of a grid of images ``[N, 1|3, H, W]`` with pixels in [0, 1], each under its
    caption (at most :data:`CAPTION_LINES` lines of :data:`CAPTION_PT` pt, cut with an ellipsis
    beyond). Each image is drawn ``cell_in - 0.16`` inches wide (114 px at :data:`DPI`)."""
    plt = _plt()
    from matplotlib.font_manager import FontProperties

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1|3, H, W], got {tuple(images.shape)}")
    n = images.shape[0]
    if len(captions) != n:
        raise ValueError(f"{n} images but {len(captions)} captions")
    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    margin, gap = 0.1, 0.16
    img_in = cell_in - gap
    line_in = CAPTION_PT * 1.2 / 72
    cap_in = CAPTION_LINES * line_in + 0.05
    row_in = img_in + cap_in + 0.08
    w_in = max(cols * cell_in, 4.0) + 2 * margin
    x0 = (w_in - cols * cell_in) / 2  # the grid, centred
    fig = plt.figure(figsize=(w_in, 1.0), dpi=DPI)
    renderer = fig.canvas.get_renderer()
    title_pt = 11.0
    title = _fit_caption(title, (w_in - 2 * margin) * DPI, FontProperties(size=title_pt),
                         renderer, 3) if title else ""  # fmt: skip
    title_in = (title.count("\n") + 1) * title_pt * 1.25 / 72 + 0.25 if title else 0.0
    h_in = rows * row_in + title_in + 2 * margin
    fig.set_size_inches(w_in, h_in)
    prop = FontProperties(size=CAPTION_PT)
    arr = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    for k in range(n):
        r, c = divmod(k, cols)
        left = x0 + c * cell_in + gap / 2
        top = h_in - margin - title_in - r * row_in - cap_in
        ax = fig.add_axes((left / w_in, (top - img_in) / h_in, img_in / w_in, img_in / h_in))
        ax.set_axis_off()
        im = arr[k]
        ax.imshow(
            im[..., 0] if im.shape[-1] == 1 else im,
            cmap="gray" if im.shape[-1] == 1 else None,
            vmin=0,
            vmax=1,
            interpolation="nearest",
        )
        text = _fit_caption(captions[k], (cell_in - 0.06) * DPI, prop, renderer, CAPTION_LINES)
        ax.set_title(text, fontsize=CAPTION_PT, pad=3, parse_math=False, linespacing=1.1)
    if title:
        fig.text(
            0.5,
            1 - (margin + title_in / 2) / h_in,
            title,
            ha="center",
            va="center",
            fontsize=title_pt,
            parse_math=False,
        )
    return fig


def grid_captions(captions, similarities) -> list[str]:
    """``"0.83 · caption"`` per distilled text, ``"? 0.31 · caption"`` below :data:`WEAK_MATCH`
    (the cosine first, so that cutting a long caption never cuts it; the captions alone where no
    similarities were recorded)."""
    sims = list(similarities or [])
    if len(sims) != len(captions):
        return [str(c) for c in captions]
    return [
        f"{'? ' if float(v) < WEAK_MATCH else ''}{fmt(v, 2)} · {c}" for c, v in zip(captions, sims)
    ]


def plot_distilled_grid(
    images: torch.Tensor,
    captions: list[str],
    path: str | os.PathLike,
    *,
    title: str = "",
    cols: int = 10,
) -> Path:
    """Save :func:`make_distilled_grid` as a PNG at ``path``."""
    return save_figure(make_distilled_grid(images, captions, title=title, cols=cols), path)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save ``fig`` at its own DPI as a PNG at ``path`` and close it."""
    plt = _plt()
    path = Path(path)
    fig.savefig(path, dpi=fig.dpi)
    plt.close(fig)
    return path


def _series(recs: list[dict[str, Any]], key: str) -> list[float]:
    out = []
    for r in recs:
        v = r.get(key)
        out.append(float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan)
    return out


def make_loss_figure(
    runs: dict[str, list[dict[str, Any]]], references: dict[str, float] | None = None
):
    """Figure of four panels per distillation iteration, one colour per run
    (``{label: metrics.jsonl records}``): the image and the text matching loss (a student that
    does not move scores 1 in each), the total loss (``references[label]`` for a student that
    does not move: 2 for the sum of the two, the default, 1 with a merged normalisation), and
    the learned learning rates."""
    plt = _plt()
    from matplotlib.lines import Line2D

    references = references or {}
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.4), dpi=DPI, layout="constrained")
    (ax_i, ax_x), (ax_t, ax_e) = axes
    ax_x.sharey(ax_i)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    refs_used: set[float] = set()
    for k, (label, recs) in enumerate(runs.items()):
        if not recs:
            continue
        c = colors[k % len(colors)]
        it = [r["iteration"] for r in recs]
        ax_i.plot(it, _series(recs, "loss_img"), color=c, lw=1.3, ls=MODALITY_STYLE["image"])
        ax_x.plot(it, _series(recs, "loss_txt"), color=c, lw=1.3, ls=MODALITY_STYLE["text"])
        ax_t.plot(it, _series(recs, "loss"), color=c, lw=1.6, ls=MODALITY_STYLE["total"])
        for key, mod in (("eta_img", "image"), ("eta_txt", "text")):
            ax_e.plot(it, _series(recs, key), color=c, lw=1.4, ls=MODALITY_STYLE[mod])
        refs_used.add(float(references.get(label, 2.0)))
        handles.append(Line2D([], [], color=c, lw=2.5, label=label))
    ref_kw = {"color": "0.35", "lw": 1.0, "zorder": 0}
    norm = r"$\|\theta_T-\theta^*\|^2\,/\,\|\theta_0-\theta^*\|^2$"
    for ax, mod in ((ax_i, "image"), (ax_x, "text")):
        ax.axhline(1.0, **ref_kw)
        ax.set_title(f"{mod} matching loss (grey line at 1: student does not move)", fontsize=10)
        ax.set_ylabel(f"{mod} loss {norm} (unitless)", fontsize=9.5)
    for ref in refs_used:
        ax_t.axhline(ref, **ref_kw)
    if refs_used <= {2.0}:
        title = "total matching loss = image + text (grey line at 2: student does not move)"
    elif refs_used == {1.0}:
        title = "total loss, image and text normalised together (grey line at 1: no move)"
    else:
        title = "total matching loss (grey lines at 1 and 2: no move, per normalisation)"
    ax_t.set_title(title, fontsize=10)
    ax_t.set_ylabel("total matching loss (unitless)", fontsize=9.5)
    ax_e.set_title("learned student learning rates η (image and text)", fontsize=10)
    ax_e.set_ylabel("learning rate η (SGD step size, unitless)", fontsize=9.5)
    for ax in axes.flat:
        ax.set_xlabel("distillation iteration", fontsize=9.5)
        ax.tick_params(labelsize=9, labelleft=True)
        ax.grid(alpha=0.25, lw=0.6)
        ax.margins(x=0.02)
    _include(ax_i, 1.0)
    for ref in refs_used:
        _include(ax_t, ref)
    handles += [
        Line2D([], [], color="0.2", lw=1.4, ls=MODALITY_STYLE[m], label=m)
        for m in ("image", "text", "total")
    ]
    handles.append(Line2D([], [], label="student does not move", **{**ref_kw, "zorder": 1}))
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=len(handles),
        fontsize=9.5,
        frameon=False,
    )
    fig.suptitle(
        r"trajectory matching: $\theta_0$ = expert at a start epoch, $\theta_T$ = student "
        r"after T steps on the distilled set from $\theta_0$, $\theta^*$ = expert some epochs "
        "later",
        fontsize=10.5,
    )
    return fig


def _include(ax, y: float) -> None:
    """Widen the y range of ``ax`` to show ``y`` with a small margin."""
    lo, hi = ax.get_ylim()
    if lo <= y <= hi:
        return
    lo, hi = min(lo, y), max(hi, y)
    pad = 0.05 * (hi - lo or 1.0)
    ax.set_ylim(lo - pad if y <= lo else lo, hi + pad if y >= hi else hi)


def plot_loss_curves(
    runs: dict[str, list[dict[str, Any]]],
    path: str | os.PathLike,
    references: dict[str, float] | None = None,
) -> Path:
    """Save :func:`make_loss_figure` as a PNG at ``path``."""
    return save_figure(make_loss_figure(runs, references), path)


def _pca2(z: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """The first two principal-component coordinates of the rows of ``z`` and the share of
    the total variance on each."""
    z = z.double() - z.double().mean(0)
    _, s, v = torch.linalg.svd(z, full_matrices=False)
    var = s.square()
    share = (var[:2] / var.sum().clamp_min(1e-30)).tolist()
    share += [0.0] * (2 - len(share))
    coords = z @ v[:2].T
    if coords.shape[1] < 2:
        coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 2 - coords.shape[1])], 1)
    return coords.float(), share


def make_collapse_figure(
    diag: dict[str, dict[str, float]],
    labels: dict[str, str],
    embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
):
    """Figure of a bar chart of the collapse diagnostics per set and, with ``embeddings``
    (``{set: (image emb [N, D], text emb [N, D])}``), a joint 2-D PCA of each set's normalised
    image and text embeddings (same scale on both axes of every panel)."""
    plt = _plt()
    embeddings = embeddings or {}
    n_emb = len(embeddings)
    width_in = max(11.0, 3.9 * n_emb + 1.4)
    fig = plt.figure(figsize=(width_in, 9.4 if n_emb else 4.8), dpi=DPI, layout="constrained")
    sub = fig.subfigures(2, 1, height_ratios=(1, 1.05)) if n_emb else [fig]
    _diagnostics_bars(sub[0].subplots(), diag, labels)
    if n_emb:
        _pca_panels(sub[1], embeddings, labels)
    return fig


def _diagnostics_bars(ax, diag: dict[str, dict[str, float]], labels: dict[str, str]) -> None:
    """Draw the collapse diagnostics of each set on ``ax``, one bar group per diagnostic, each
    bar labelled with its value as in the ``report.md`` table."""
    plt = _plt()
    sets = list(diag)
    width = 0.8 / max(1, len(sets))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lo = 0.0
    for k, name in enumerate(sets):
        vals = [diag[name].get(key, float("nan")) for key, _ in DIAG_KEYS]
        xs = [i + (k - (len(sets) - 1) / 2) * width for i in range(len(DIAG_KEYS))]
        bars = ax.bar(xs, vals, width, label=labels.get(name, name), color=colors[k % len(colors)])
        for b, v in zip(bars, vals):
            if math.isfinite(v):
                lo = min(lo, v)
                ax.annotate(
                    fmt(v, 3),
                    (b.get_x() + b.get_width() / 2, v),
                    xytext=(0, -2 if round(v, 3) < 0 else 2),
                    textcoords="offset points",
                    ha="center",
                    va="top" if round(v, 3) < 0 else "bottom",
                    fontsize=MIN_FONT_PT,
                )
    ax.axhline(0, color="0.3", lw=0.8)
    top = ax.get_ylim()[1]
    ax.set_ylim(min(lo * 1.15 - 0.04 * top, 0) if lo < 0 else 0, top * 1.08)
    ax.set_xticks(range(len(DIAG_KEYS)))
    ax.set_xticklabels([DIAG_TICKS.get(key, label) for key, label in DIAG_KEYS], fontsize=9)
    ax.tick_params(axis="y", labelsize=9)
    ax.set_xlabel("diagnostic, computed on L2-normalised embeddings", fontsize=9.5)
    ax.set_ylabel("value (unitless)", fontsize=9.5)
    ax.set_title(
        "modality-collapse diagnostics of each set, embedded by heads trained on it", fontsize=10
    )
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.005, 1.0), title="set")


def _pca_panels(
    subfig, embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]], labels: dict[str, str]
) -> None:
    """Draw one joint PCA panel per set of ``embeddings`` in ``subfig``, side by side."""
    import torch.nn.functional as F
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    axes = subfig.subplots(1, len(embeddings), squeeze=False, sharex=True, sharey=True)[0]
    style = {"image": ("tab:purple", "o"), "text": ("tab:cyan", "^")}
    for a, (name, (u, v)) in zip(axes, embeddings.items()):
        z, share = _pca2(
            torch.cat([F.normalize(u.float(), dim=-1), F.normalize(v.float(), dim=-1)])
        )
        n = u.shape[0]
        for mod, pts in (("image", z[:n]), ("text", z[n:])):
            c, mk = style[mod]
            a.scatter(pts[:, 0], pts[:, 1], s=12, marker=mk, color=c, alpha=0.7, lw=0)
        a.set_title(f"{labels.get(name, name)}: joint PCA", fontsize=10)
        a.set_xlabel(f"PC 1 ({fmt(100 * share[0], 0)}% of variance)", fontsize=9.5)
        a.set_ylabel(f"PC 2 ({fmt(100 * share[1], 0)}% of variance)", fontsize=9.5)
        a.tick_params(labelsize=9, labelleft=True)
        a.set_aspect("equal", adjustable="box")
        a.xaxis.set_major_locator(MaxNLocator(5))
        a.yaxis.set_major_locator(MaxNLocator(5))
        a.grid(alpha=0.25, lw=0.6)
    handles = [
        Line2D([], [], ls="", marker=style[m][1], color=style[m][0], label=f"{m} embedding")
        for m in ("image", "text")
    ]
    axes[-1].legend(handles=handles, fontsize=9, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    subfig.suptitle(
        "each set's normalised image and text embeddings projected on the top two principal "
        "components of both together",
        fontsize=10,
    )


def plot_collapse(
    diag: dict[str, dict[str, float]],
    labels: dict[str, str],
    path: str | os.PathLike,
    embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Path:
    """Save :func:`make_collapse_figure` as a PNG at ``path``."""
    return save_figure(make_collapse_figure(diag, labels, embeddings), path)


# ------------------------------------------------------------------------------- whole run
def run_figures(run_dir: str | os.PathLike, metrics: dict[str, Any] | None = None) -> dict:
    """The figures of a demo run directory, ``{png file name: matplotlib Figure}``, drawn from
    the files it holds and not yet saved (the caller closes them)."""
    from repblend_fast.io import load_safetensors

    check_plotting()
    run_dir = Path(run_dir)
    metrics = metrics if metrics is not None else load_metrics(run_dir)
    labels = {k: method_label(metrics["methods"], k) for k in metrics["methods"]}
    figs: dict[str, Any] = {}
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
        figs[grid_png(name)] = make_distilled_grid(
            images,
            grid_captions(caps, m.get("nearest_similarity")),
            title=f"{labels[name]}: {images.shape[0]} distilled images, each under the real "
            "training caption nearest to its distilled text, after their cosine; '?' marks a "
            f"cosine below {WEAK_MATCH}: no real caption says what that text says",
        )
    runs, refs = {}, {}
    for name, d in metrics.get("distillation", {}).items():
        p = run_dir / d.get("metrics_jsonl", f"{name}/metrics.jsonl")
        if p.is_file():
            label = labels.get(name, name)
            runs[label] = read_jsonl(p)
            refs[label] = loss_reference(d.get("config"), runs[label])
    if runs:
        figs[LOSS_PNG] = make_loss_figure(runs, refs)
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
        figs[COLLAPSE_PNG] = make_collapse_figure(diag, labels, emb)
    return figs
