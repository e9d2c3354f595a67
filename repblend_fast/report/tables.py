"""Numbers and Markdown tables of a demo report: formatting without negative zeros, the
results and diagnostics tables, and the verdict lines."""

from __future__ import annotations

import math
from typing import Any

from repblend_fast.methods import METHOD_REGISTRY

RECALL_KEYS = ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10")
METHOD_ORDER = ("repblend", "lors", "random", "random_infonce", "kcenter", "herding", "full")
DIAG_KEYS = (
    ("intra_sim_img", "intra-modal sim. (image)"),
    ("intra_sim_txt", "intra-modal sim. (text)"),
    ("modality_gap", "modality gap"),
    ("concentration_img", "concentration (image)"),
    ("concentration_txt", "concentration (text)"),
)
# Default row labels, for method dictionaries without a "label" entry: each distillation
# method's own (repblend_fast.methods), then the baselines'.
DEFAULT_LABELS = {
    **{m.name: m.label for m in METHOD_REGISTRY.values()},
    "random": "Random subset",
    "random_infonce": "Random subset (InfoNCE)",
    "kcenter": "k-center coreset (InfoNCE)",
    "herding": "Herding coreset (InfoNCE)",
    "full": "Full data",
}
VERDICT_BASELINES = ("random", "random_infonce", "kcenter", "herding")


# ------------------------------------------------------------------------------- numbers
WEAK_MATCH = 0.5
"""Below this cosine (text encoder's space) a distilled text's nearest real caption is marked as
a weak match in the grids and the report: the caption does not describe what the set learned."""


def fmt(x: float | None, digits: int = 1, *, sign: bool = False) -> str:
    """``x`` with ``digits`` decimals; never ``-0.0`` (a value that rounds to zero prints as
    ``0.0``, also with ``sign``), ``–`` for ``None``, ``nan`` / ``inf`` / ``-inf`` as such."""
    if x is None:
        return "–"
    x = float(x)
    if not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    v = round(x, digits) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{v:+.{digits}f}" if sign and v != 0 else f"{v:.{digits}f}"


def fmt_g(x: float | None, sig: int = 4) -> str:
    """``x`` to ``sig`` significant digits (``:g``), never ``-0``."""
    if x is None:
        return "–"
    x = float(x)
    if not math.isfinite(x):
        return fmt(x)
    return f"{float(f'{x:.{sig}g}') + 0.0:.{sig}g}"


def fmt_value(v: Any) -> str:
    """A configuration value: floats to 4 significant digits, everything else as is."""
    return fmt_g(v) if isinstance(v, float) else str(v)


def pm(summary: dict[str, Any] | None, key: str = "mean", digits: int = 1) -> str:
    """``"mean ± std"`` of ``key`` in an evaluation summary ``{"mean": {...}, "std": {...}}``."""
    if not summary:
        return "–"
    m, s = summary["mean"].get(key), summary["std"].get(key)
    if m is None:
        return "–"
    return f"{fmt(m, digits)} ± {fmt(s, digits)}"


# ------------------------------------------------------------------------------- methods
def ordered_methods(methods: dict[str, Any]) -> list[str]:
    """The method names of ``methods``, those of :data:`METHOD_ORDER` first in that order."""
    known = [m for m in METHOD_ORDER if m in methods]
    return known + sorted(m for m in methods if m not in METHOD_ORDER)


def method_label(methods: dict[str, Any], name: str) -> str:
    """Row label of method ``name``: its ``label`` entry, else :data:`DEFAULT_LABELS`."""
    own = METHOD_REGISTRY[name].label if name in METHOD_REGISTRY else None
    return (methods.get(name) or {}).get("label") or DEFAULT_LABELS.get(name, own or name)


# ------------------------------------------------------------------------------- tables
def results_table(metrics: dict[str, Any], which: str = "best") -> str:
    """Markdown table of the evaluation results (``which`` = ``best`` or ``last`` epoch)."""
    head = ["method", "pairs", "mean recall", *RECALL_KEYS, "eval lr img / txt"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in ordered_methods(metrics["methods"]):
        m = metrics["methods"][name]
        summ = m.get(which)
        if summ is None:
            err = str(m.get("error", "not evaluated")).replace("|", "/")
            row = [
                method_label(metrics["methods"], name),
                str(m.get("pairs", "–")),
                f"failed: {err}",
            ]
            lines.append("| " + " | ".join(row + ["–"] * (len(head) - len(row))) + " |")
            continue
        lr = m.get("lr_img"), m.get("lr_txt")
        lr_s = f"{fmt_g(lr[0])} / {fmt_g(lr[1])}" if None not in lr else "–"
        row = [
            method_label(metrics["methods"], name),
            str(m.get("pairs", "–")),
            f"**{pm(summ)}**",
            *[pm(summ, k) for k in RECALL_KEYS],
            lr_s,
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def diagnostics_table(diag: dict[str, dict[str, float]], labels: dict[str, str]) -> str:
    """Markdown table of the modality-collapse diagnostics, one row per set."""
    head = ["set", *[label for _, label in DIAG_KEYS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, d in diag.items():
        row = [labels.get(name, name), *[fmt(d[k], 3) if k in d else "–" for k, _ in DIAG_KEYS]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- verdict
def verdict_lines(methods: dict[str, Any]) -> list[str]:
    """One line per finding, from the best-epoch mean recall of each evaluated row: each
    distilled set (RepBlend, LoRS) against each real-data subset (random, coresets), and RepBlend
    against LoRS; the difference in points of mean recall, and whether it is larger than the sum
    of the two rows' standard deviations over evaluation seeds.

    ``methods`` is ``metrics["methods"]`` (entries need ``best.mean.mean`` and
    ``best.std.mean``; rows without them are left out)."""

    def best(name: str) -> dict[str, Any] | None:
        b = (methods.get(name) or {}).get("best")
        ok = b and b.get("mean", {}).get("mean") is not None
        return b if ok and b.get("std", {}).get("mean") is not None else None

    def line(a_name: str, b_name: str) -> str:
        a, b = best(a_name), best(b_name)
        d = a["mean"]["mean"] - b["mean"]["mean"]
        noise = a["std"]["mean"] + b["std"]["mean"]
        clear = "more than" if abs(d) > noise else "within"
        return (
            f"{method_label(methods, a_name)} vs {method_label(methods, b_name)}: "
            f"{fmt(d, 1, sign=True)} points of mean recall ({clear} the summed std "
            f"{fmt(noise, 1)})"
        )

    out = []
    for m in ("repblend", "lors"):
        if best(m) is None:
            continue
        out += [line(m, base) for base in VERDICT_BASELINES if best(base) is not None]
    if best("repblend") is not None and best("lors") is not None:
        out.append(line("repblend", "lors"))
    return out
