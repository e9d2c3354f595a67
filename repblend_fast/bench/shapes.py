"""The step benchmark's configurations (shape sets) and the stand-in encoder they run.

A configuration is a frozen :class:`StepShape`; a shape set is a named list of them
(:data:`SHAPE_SETS`). The table is read-only by convention: a caller that wants other sizes (the
profile command's ``--config``) builds its own list with :func:`shapes_with_config`, so two runs
in one process never see each other's sizes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from repblend_fast.config import DistillConfig

__all__ = [
    "SHAPE_SETS",
    "StepShape",
    "TinyEncoder",
    "default_encoder_chunk",
    "make_encoder",
    "shapes_with_config",
]


@dataclass(frozen=True)
class StepShape:
    """One step-benchmark configuration (docs/algorithm.md §1 notation)."""

    name: str
    encoder: str  # "tiny" or a timm model name (random init)
    image_size: int
    d_txt: int
    dim: int  # head width D of the RepBlend heads
    pairs: int  # N
    batch: int  # B
    steps: int  # T
    rank: int = 10
    alpha: float = 3.0
    # The stand-in trajectories are random, so the paper's learning rates (100-1000 on the data)
    # would overflow within a few iterations; timing does not depend on these values.
    lr_img: float = 1.0
    lr_txt: float = 1.0
    lr_sim: float = 1.0
    lr_lr: float = 1e-3

    def describe(self) -> str:
        return (
            f"{self.encoder} @{self.image_size}px, N={self.pairs}, B={self.batch}, T={self.steps}, "
            f"d_t={self.d_txt}, D={self.dim}"
        )


SHAPE_SETS: dict[str, list[StepShape]] = {
    # Unit-test size: a two-layer conv encoder, seconds on one core.
    "tiny": [StepShape("tiny", "tiny", 8, 12, 16, 11, 4, 2, rank=2, alpha=1.0)],
    # The authors' setting shrunk for a CPU (docs/design.md §5): the outside anchor is measured
    # here.
    "ci": [StepShape("ci-resnet18-64", "resnet18", 64, 768, 512, 99, 20, 8)],
    # RepBlend's paper sizes (docs/algorithm.md §1; rank and alpha of flickr-100 and flickr-500).
    "paper": [
        StepShape("paper-n99", "nfnet_l0", 224, 768, 2304, 99, 20, 8),
        StepShape(
            "paper-n499",
            "nfnet_l0",
            224,
            768,
            2304,
            499,
            20,
            8,
            rank=20,
            alpha=0.01,
        ),
    ],
    "scale": [
        StepShape("scale-n999", "nfnet_l0", 224, 768, 2304, 999, 20, 8, rank=40, alpha=1.0),
        StepShape("scale-n1999-b40", "nfnet_l0", 224, 768, 2304, 1999, 40, 8, rank=40, alpha=1.0),
    ],
}


def shapes_with_config(shapes: Sequence[StepShape], cfg: DistillConfig) -> list[StepShape]:
    """``shapes`` with a distillation config's sizes: its pairs, batch size, unroll steps and
    similarity rank / alpha (names get a ``+config`` suffix so results cannot be mistaken for
    the set's own). A new list: :data:`SHAPE_SETS` is left as it is."""
    return [
        dataclasses.replace(
            sh,
            name=f"{sh.name}+config",
            pairs=cfg.pairs,
            batch=cfg.batch_size,
            steps=cfg.syn_steps,
            rank=cfg.sim_rank,
            alpha=cfg.sim_alpha,
        )
        for sh in shapes
    ]


def default_encoder_chunk() -> int:
    """``DistillConfig``'s ``encoder_chunk`` default, so that the benchmark times what a run
    does unless told otherwise (0 keeps the encoder graph over all touched images)."""
    from repblend_fast.config import DistillConfig

    return int(DistillConfig.__dataclass_fields__["encoder_chunk"].default)


class TinyEncoder(nn.Module):
    """Two convolutions and global pooling: the ``tiny`` shape set's stand-in for a timm model."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, width, 3, padding=1)
        self.num_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.conv1(x))
        return torch.nn.functional.gelu(self.conv2(h)).mean((-1, -2))


def make_encoder(shape: StepShape, seed: int = 0) -> nn.Module:
    """A randomly initialised encoder in eval mode (timm, pooled features; no download)."""
    torch.manual_seed(seed)
    if shape.encoder == "tiny":
        enc = TinyEncoder()
    else:
        import timm

        enc = timm.create_model(shape.encoder, pretrained=False, num_classes=0)
    return enc.eval()
