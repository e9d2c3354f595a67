"""What the demo runs: :class:`DemoSettings`, and the labels of the methods it reports."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from repblend_fast.config import EVAL_TEMPERATURE, DistillConfig, preset
from repblend_fast.methods import get_method
from repblend_fast.report.tables import DEFAULT_LABELS

FORMAT_VERSION = 1
# The row label of each method of the demo's report (one table: the report's).
LABELS = DEFAULT_LABELS


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
        num_eval, eval_epochs, eval_every: the docs/algorithm.md §8 evaluation (seeds, epochs
            0..E-1, and how often the test split is scored for the best-epoch figure; ``None``:
            each method's research-code cadence, 20 for RepBlend and the baselines compared with
            it, 10 for LoRS).
        eval_temperature: the logit temperature of every evaluation (0.07, docs/algorithm.md §8).
        curve_points: the report's learning curve of the RepBlend set: this many evenly spaced
            iteration counts, 0 and the last included (the last is the final evaluation; 0 or 1
            = no curve).
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
    eval_every: int | None = None
    eval_temperature: float = EVAL_TEMPERATURE
    curve_points: int = 4
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
            (self.eval_every is None or self.eval_every >= 1, "eval_every", ">= 1 or None"),
            (0 < self.eval_temperature < float("inf"), "eval_temperature", "finite and > 0"),
            (self.curve_points >= 0, "curve_points", ">= 0"),
            (self.full_epochs >= 1, "full_epochs", ">= 1"),
            (self.image_size is None or self.image_size >= 8, "image_size", ">= 8"),
            (self.lors_image_size is None or self.lors_image_size >= 8, "lors_image_size", ">= 8"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise ValueError(f"DemoSettings.{name}={getattr(self, name)!r}: expected {want}")
        return self

    def curve_at(self, iterations: int) -> list[int]:
        """The iteration counts at which the RepBlend set is evaluated for the learning curve:
        ``curve_points`` evenly spaced counts from 0 to ``iterations``, the last left out (the
        final evaluation is that point)."""
        k = self.curve_points
        if k <= 1 or iterations <= 0:
            return []
        return sorted({round(i * iterations / (k - 1)) for i in range(k - 1)})

    def every(self, method: str) -> int:
        """How often the test split is scored when evaluating ``method``'s set (and the baselines
        compared with it: RepBlend's cadence)."""
        return self.eval_every or get_method(method).eval_every

    def configs(self, overrides: dict[str, Any] | None = None) -> dict[str, DistillConfig]:
        """The distillation config of each branch: ``demo`` preset + ``overrides`` (+ the LoRS
        overrides for LoRS); raises ``ValueError`` for an invalid combination."""
        over = {"seed": self.seed, **(overrides or {})}
        out = {"repblend": preset("demo", **over)}
        if self.lors:
            out["lors"] = preset("demo", **{**over, "method": "lors", **self.lors_overrides})
        return out
