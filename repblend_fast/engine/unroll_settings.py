"""The settings and result types of :class:`repblend_fast.engine.unroll.Unroller` (importable from
:mod:`repblend_fast.engine.unroll` too)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from repblend_fast.config import TEMPERATURE

__all__ = ["MetaGrad", "SharedFeatures", "UnrollResult", "UnrollSettings"]

MetaGrad = Literal["exact", "tesla"]


@dataclass
class UnrollResult:
    """Losses and meta-gradients (averaged over the K trajectories of one call).

    grads: ``{"x": [N,...], "y": [N, d_t], "eta_img": [], "eta_txt": [], "sim.<name>": ...}``
    (full-size, zeros where untouched).
    """

    loss: torch.Tensor
    loss_img: torch.Tensor
    loss_txt: torch.Tensor
    grads: dict[str, torch.Tensor | None]


@dataclass
class UnrollSettings:
    """How one iteration is unrolled and differentiated (see ``DistillConfig``). ``method`` is the
    expert kind of the student (:func:`repblend_fast.methods.student_for_experts`)."""

    method: str = "repblend"
    meta_grad: MetaGrad = "exact"
    loss: str = "wbce"
    eps: float = 1e-6
    logit_scale: float = 1 / TEMPERATURE
    merge_loss: bool = False
    blend_target: bool = False
    share_encoder: bool = True
    checkpoint_steps: bool = False
    parity_eta_grad: bool = False
    encoder_autocast: torch.dtype | None = None
    encoder_chunk: int = 0
    compile: str = "none"
    memory_budget_mib: float = 0.0

    @classmethod
    def from_config(cls, cfg, encoder_autocast: torch.dtype | None = None) -> UnrollSettings:
        """The settings of a ``DistillConfig``: its fields of the same names, ``method`` =
        ``cfg.expert_kind``; the caller resolves ``encoder_autocast`` (it depends on the device)."""
        names = [f.name for f in dataclasses.fields(cls)]
        same = {n: getattr(cfg, n) for n in names if n not in ("method", "encoder_autocast")}
        same["memory_budget_mib"] = float(same["memory_budget_mib"])
        return cls(method=cfg.expert_kind, encoder_autocast=encoder_autocast, **same)


@dataclass
class SharedFeatures:
    """The touched images' features: ``touched`` ``[U]`` indices into x, ``inverse``
    ``[K, T, B]`` positions into them, ``graph`` (encoder output of the first ``keep`` touched
    images with its graph, or None), ``leaf`` (the detached features ``[U, d_f]`` the unroll
    differentiates) and ``chunk`` (the VJP re-encodes touched images ``keep:`` that many at a
    time)."""

    touched: torch.Tensor
    inverse: torch.Tensor
    graph: torch.Tensor | None
    leaf: torch.Tensor
    keep: int = 0
    chunk: int = 0
