"""What the guard did in a run (docs/algorithm.md §14): :class:`GuardReport`.

The outer optimiser's guard (:mod:`repblend_fast.engine.outer`) decides on the device; the Distiller
reads its decisions back once per iteration and hands each iteration's metrics record to
:meth:`GuardReport.add`, which counts them, watches for the signs of a wrong meta-gradient and
logs a one-line warning (once per kind) when one shows. :meth:`GuardReport.summary` is the
``guard`` block of the run folder's ``summary.json``.

The warnings and their thresholds (measured evidence in docs/algorithm.md §14):

- **rejections**: more than ``REJECTED_SHARE`` of the iterations so far (once ``WINDOW`` are
  done) were not applied by the guard (a spike or a rollback);
- **clipping**: on average more than ``CLIPPED_SHARE`` of a group's rows were scaled down by the
  trust region over the last ``WINDOW`` iterations (the steps are routinely larger than the bound);
- **gradient check**: along a small step of the update the loss changed by a ratio outside
  ``CHECK_BAND`` of what the meta-gradient predicts (``DistillConfig.grad_check_every``);
- **zero gradient**: an image or text meta-gradient that is exactly zero (a modality that does
  not reach the loss) in an applied iteration.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from repblend_fast.engine.outer import CLIPPED_GROUPS, GROUPS

__all__ = [
    "CHECK_BAND",
    "CHECK_CHANGE",
    "CLIPPED_SHARE",
    "GuardReport",
    "REJECTED_SHARE",
    "WINDOW",
    "probe_point",
    "read_guard",
    "summary_line",
]

logger = logging.getLogger("repblend_fast.guard")

WINDOW = 10
REJECTED_SHARE = 0.2
CLIPPED_SHARE = 0.5
CHECK_BAND = (0.5, 2.0)
# The gradient check's step: along the plain SGD direction (-lr · g, no momentum), as far as
# makes the loss fall by this fraction of its value if the gradient is right.
CHECK_CHANGE = 1e-4


def probe_point(
    params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], lr: dict, loss: torch.Tensor
):
    """``(shifted, predicted)``: the parameters moved along the plain SGD direction,
    ``p - s · lr · g``, and the loss change the gradient predicts for that move,
    ``-s · Σ lr · ||g||²`` (a 0-d tensor on the device), where the step ``s`` makes the
    prediction ``-CHECK_CHANGE · |loss|``: small enough that curvature does not count where
    the objective is sharply curved (a large gradient), large enough to stand far above fp32
    rounding where it is flat (a small one)."""
    g = {n: grads[n].to(p.dtype) for n, p in params.items()}
    slope = torch.stack([lr[n] * g[n].double().pow(2).sum() for n in params]).sum()
    s = CHECK_CHANGE * loss.double().abs() / slope.clamp_min(1e-300)
    shifted = {n: p - (s * lr[n]).to(p.dtype) * g[n] for n, p in params.items()}
    return shifted, -s * slope


class GuardReport:
    """Running tallies of the guard's decisions and the warnings they raised.

    Args:
        records: metrics records of iterations already run (a resumed run's ``metrics.jsonl``),
            counted without logging.
    """

    def __init__(self, records: Iterable[dict] = ()):
        self.iterations = 0
        self.rejected = dict.fromkeys(GROUPS, 0)
        self.rejected_iterations = 0
        self.rolled_back = 0
        self.streak = 0
        self.longest_streak = 0
        self.clipped_sum = dict.fromkeys(CLIPPED_GROUPS, 0.0)
        self.recent: list[dict] = []
        self.checks = 0
        self.checks_failed = 0
        self.warnings: list[str] = []
        self._kinds: set[str] = set()
        self._pending: list[str] = []
        for rec in records:
            if "iteration" in rec and "event" not in rec:
                self.add(rec, log=False)

    # ----------------------------------------------------------------- counting
    def add(self, rec: dict, *, log: bool = True) -> None:
        """Count iteration record ``rec`` (:meth:`Distiller._record`'s) and warn if it shows."""
        self.iterations += 1
        for g in rec.get("rejected_spike", ()):
            self.rejected[g] += 1
        self.rolled_back += bool(rec.get("rolled_back"))
        not_applied = bool(rec.get("update_rejected"))
        self.rejected_iterations += not_applied
        self.streak = self.streak + 1 if not_applied else 0
        self.longest_streak = max(self.longest_streak, self.streak)
        clipped = rec.get("clipped", {})
        for g in CLIPPED_GROUPS:
            self.clipped_sum[g] += clipped.get(g, 0.0)
        self.recent = (self.recent + [rec])[-WINDOW:]
        i = rec["iteration"]
        self._watch_rejections(i)
        self._watch_clipping(i)
        self._watch_zero(rec)
        if "grad_check" in rec and not rec.get("skipped_non_finite"):
            self._watch_check(rec)
        if log:
            self._flush()

    def _warn(self, kind: str, text: str) -> None:
        if kind not in self._kinds:
            self._kinds.add(kind)
            self.warnings.append(text)
            self._pending.append(text)

    def _flush(self) -> None:
        for text in self._pending:
            logger.warning("%s", text)
        self._pending.clear()

    def _watch_rejections(self, i: int) -> None:
        n, bad = self.iterations, self.rejected_iterations
        if n >= WINDOW and bad > REJECTED_SHARE * n:
            self._warn(
                "rejected",
                f"guard: {bad} of the first {n} iterations were rejected (more than "
                f"{REJECTED_SHARE:.0%}, at iteration {i}): the meta-gradient keeps spiking; lower "
                "lr_img/lr_txt, try meta_grad='tesla', or check the meta-gradient",
            )

    def _watch_clipping(self, i: int) -> None:
        if len(self.recent) < WINDOW:
            return
        for g in CLIPPED_GROUPS:
            share = sum(r.get("clipped", {}).get(g, 0.0) for r in self.recent) / WINDOW
            if share > CLIPPED_SHARE:
                lr = {"image": "lr_img", "text": "lr_txt", "sim": "lr_sim"}[g]
                self._warn(
                    f"clipped_{g}",
                    f"guard: the trust region scaled down {share:.0%} of the {g} rows over "
                    f"iterations {i - WINDOW + 1}-{i} (more than {CLIPPED_SHARE:.0%}): the "
                    f"steps are routinely larger than trust_region allows; lower {lr}, or check "
                    "the meta-gradient",
                )

    def _watch_zero(self, rec: dict) -> None:
        if rec.get("update_rejected") or rec.get("skipped_non_finite"):
            return
        for key, g in (("grad_norm_x", "image"), ("grad_norm_y", "text")):
            if rec.get(key) == 0.0:
                self._warn(
                    f"zero_{g}",
                    f"guard: the {g} meta-gradient is exactly zero at iteration "
                    f"{rec['iteration']}: the {g}s do not reach the matching loss, so they "
                    "cannot learn (a broken unroll or encoder path)",
                )

    def _watch_check(self, rec: dict) -> None:
        self.checks += 1
        r = rec["grad_check"]
        lo, hi = CHECK_BAND
        if lo <= r <= hi:
            return
        self.checks_failed += 1
        self._warn(
            "grad_check",
            f"guard: at iteration {rec['iteration']} the loss changed by {r:.3g} times what the "
            f"meta-gradient predicts along the update (expected in [{lo}, {hi}]): the "
            "meta-gradient does not match the loss (a bug, or a sharply curved objective: see "
            "docs/algorithm.md §14)",
        )

    # ----------------------------------------------------------------- the summary
    def summary(self) -> dict:
        """The ``guard`` block of ``summary.json``."""
        n = max(self.iterations, 1)
        return {
            "iterations": self.iterations,
            "rejected": dict(self.rejected),
            "rejected_iterations": self.rejected_iterations,
            "rolled_back": self.rolled_back,
            "longest_rejected_streak": self.longest_streak,
            "clipped_fraction": {g: round(v / n, 6) for g, v in self.clipped_sum.items()},
            "grad_checks": {"run": self.checks, "failed": self.checks_failed},
            "warnings": list(self.warnings),
        }

    def line(self) -> str:
        """The summary as one log line."""
        return summary_line(self.summary())


def read_guard(run_dir: str | os.PathLike) -> dict | None:
    """The ``guard`` block of a run folder's ``summary.json`` (``None`` if it has none)."""
    from repblend_fast.engine.checkpoint import SUMMARY

    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("guard")


def summary_line(s: dict) -> str:
    """One line from a ``guard`` block (:meth:`GuardReport.summary`)."""
    rej = ", ".join(f"{g} {k}" for g, k in s["rejected"].items() if k) or "none"
    clip = ", ".join(f"{g} {v:.1%}" for g, v in s["clipped_fraction"].items())
    checks = s["grad_checks"]
    return (
        f"guard: {s['rejected_iterations']} of {s['iterations']} iterations rejected (spikes: "
        f"{rej}; rolled back {s['rolled_back']}; longest streak "
        f"{s['longest_rejected_streak']}); rows clipped: {clip}; gradient checks failed "
        f"{checks['failed']} of {checks['run']}; warnings: {len(s['warnings'])}"
    )
