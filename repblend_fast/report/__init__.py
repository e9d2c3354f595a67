"""Rendering of a demo run directory: ``report.md`` and the PNG figures.

Everything here reads only what a run directory holds (``metrics.json``, each distillation's
``metrics.jsonl`` and ``distilled.safetensors``, ``embeddings.safetensors``), so
``repblend-fast report --run DIR`` re-renders a run without encoders, data or a feature cache.

matplotlib (the ``plots`` extra) is imported lazily, with the non-interactive Agg backend.

Files written:

=========================  ========================================================================
``report.md``              results table (mean ± std over evaluation seeds), verdict, settings,
                           timings
``distilled_<m>.png``      the distilled images of method ``m``, each captioned with the real
                           training caption nearest to its distilled text after their cosine
                           (``?`` below :data:`WEAK_MATCH`)
``loss_curves.png``        matching loss per modality and in total, and the learned learning
                           rates, per distillation iteration
``collapse.png``           modality-collapse diagnostics (docs/algorithm.md §9) per set, and a PCA
view
=========================  ========================================================================

All figures are drawn at :data:`DPI` with no text smaller than :data:`MIN_FONT_PT` points, so
every label is at least 11 px tall (capital letters at least 8 px) at the PNG's native size.
:func:`run_figures` returns the figures without saving them; :func:`render_run` saves them.

Modules: ``run_dir`` (file names, loading ``metrics.json`` / ``metrics.jsonl``), ``tables``
(number formatting, Markdown tables, verdict), ``markdown`` (``report.md``, one function per
section) and ``figures`` (the matplotlib figures).
"""

from __future__ import annotations

import os
from pathlib import Path

from repblend_fast.report.figures import (
    CAPTION_LINES,
    CAPTION_PT,
    DIAG_TICKS,
    DPI,
    MIN_FONT_PT,
    MODALITY_STYLE,
    check_plotting,
    grid_captions,
    make_collapse_figure,
    make_distilled_grid,
    make_loss_figure,
    plot_collapse,
    plot_distilled_grid,
    plot_loss_curves,
    run_figures,
    save_figure,
)
from repblend_fast.report.markdown import write_report_md
from repblend_fast.report.run_dir import (
    COLLAPSE_PNG,
    LOSS_PNG,
    METRICS_FILE,
    REPORT_FILE,
    grid_png,
    load_metrics,
    read_jsonl,
)
from repblend_fast.report.tables import (
    DEFAULT_LABELS,
    DIAG_KEYS,
    METHOD_ORDER,
    RECALL_KEYS,
    VERDICT_BASELINES,
    WEAK_MATCH,
    diagnostics_table,
    fmt,
    fmt_g,
    pm,
    results_table,
    verdict_lines,
)

__all__ = [
    "CAPTION_LINES",
    "CAPTION_PT",
    "COLLAPSE_PNG",
    "DEFAULT_LABELS",
    "DIAG_KEYS",
    "DIAG_TICKS",
    "DPI",
    "LOSS_PNG",
    "METHOD_ORDER",
    "METRICS_FILE",
    "MIN_FONT_PT",
    "MODALITY_STYLE",
    "RECALL_KEYS",
    "REPORT_FILE",
    "VERDICT_BASELINES",
    "WEAK_MATCH",
    "check_plotting",
    "grid_captions",
    "diagnostics_table",
    "fmt",
    "fmt_g",
    "grid_png",
    "load_metrics",
    "make_collapse_figure",
    "make_distilled_grid",
    "make_loss_figure",
    "plot_collapse",
    "plot_distilled_grid",
    "plot_loss_curves",
    "pm",
    "read_jsonl",
    "render_run",
    "results_table",
    "run_figures",
    "save_figure",
    "verdict_lines",
    "write_report_md",
]


def render_run(run_dir: str | os.PathLike, *, figures: bool = True) -> dict[str, Path]:
    """Re-render ``report.md`` and (with ``figures``) all PNGs of a demo run directory from the
    files it holds. Returns ``{name: path}`` of what was written."""
    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir)
    written: dict[str, Path] = {}
    if figures:
        for name, fig in run_figures(run_dir, metrics).items():
            written[name] = save_figure(fig, run_dir / name)
    written[REPORT_FILE] = write_report_md(metrics, run_dir)
    return written
