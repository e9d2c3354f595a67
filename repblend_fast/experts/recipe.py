"""How experts are trained (docs/algorithm.md §3): :class:`ExpertRecipe`, the per-expert seeds
(:func:`expert_seed`) and the fingerprint of a training set (:func:`tensor_fingerprint`).

The recipe is shared by both kinds of expert (:mod:`repblend_fast.experts.students`); the loop
that follows it is :mod:`repblend_fast.experts.train`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from repblend_fast.config import TEMPERATURE

__all__ = ["ExpertRecipe", "expert_seed", "tensor_fingerprint"]


def is_integer(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def expert_seed(seed: int, index: int) -> int:
    """The seed of expert ``index`` in a run seeded with ``seed`` (well mixed, 63-bit)."""
    digest = hashlib.sha256(f"repblend-expert:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    """``sha256:<hex>`` over the shapes, dtypes and bytes of ``tensors`` (a dataset fingerprint)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


@dataclass(frozen=True)
class ExpertRecipe:
    """How experts are trained, for both kinds.

    Attributes:
        num_experts, epochs: how many experts, and epochs per expert. Training stops after the
            last epoch in ``keep_epochs`` (later epochs could not change any stored snapshot).
        batch_size: captions per SGD step.
        lr, lr_txt: SGD learning rates of the image side and the text head (``lr_txt`` defaults
            to ``lr``); momentum 0, weight decay 0, no decay.
        logit_scale, loss: ``s = 1/τ`` and the contrastive loss (identity targets).
        dropout: head dropout during expert training (on, as in the research code).
        keep_epochs: which snapshots to store (default all ``0..epochs``; 0 = initialisation).
        seed: run seed; expert ``i`` uses :func:`expert_seed` ``(seed, i)`` for its
            initialisation (image side first, then text head, from one CPU generator), its
            caption order and its dropout masks.
    """

    num_experts: int
    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    lr_txt: float | None = None
    logit_scale: float = 1 / TEMPERATURE
    loss: str = "infonce"
    dropout: float = 0.1
    keep_epochs: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        # Types first: a float count or a NaN rate would otherwise train silently wrong experts.
        for name in ("num_experts", "epochs", "batch_size", "seed"):
            v = getattr(self, name)
            if not is_integer(v):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        for name in ("lr", "lr_txt", "logit_scale", "dropout"):
            v = getattr(self, name)
            if v is None and name == "lr_txt":
                continue
            if not is_real(v) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.keep_epochs is not None:
            if not all(is_integer(e) for e in self.keep_epochs):
                raise ValueError(f"keep_epochs must be integers, got {self.keep_epochs!r}")
            object.__setattr__(self, "keep_epochs", tuple(int(e) for e in self.keep_epochs))
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_txt is not None and not self.lr_txt > 0:
            raise ValueError(f"lr_txt must be > 0, got {self.lr_txt}")
        if not 1 <= self.logit_scale <= 1000:
            raise ValueError(
                f"logit_scale must be in [1, 1000] (temperature 0.001 to 1), got {self.logit_scale}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.kept()  # validates epochs / keep_epochs

    @property
    def text_lr(self) -> float:
        return self.lr if self.lr_txt is None else self.lr_txt

    def kept(self) -> list[int]:
        """The stored epochs, sorted (``ValueError`` for an invalid ``keep_epochs``)."""
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.keep_epochs is None:
            return list(range(self.epochs + 1))
        keep = sorted(set(self.keep_epochs))
        bad = [e for e in keep if e < 0 or e > self.epochs]
        if not keep or bad:
            raise ValueError(
                f"keep_epochs must be a non-empty subset of 0..{self.epochs} (epoch 0 = "
                f"initialisation); got {sorted(self.keep_epochs)}"
            )
        return keep

    @classmethod
    def from_kwargs(cls, recipe: ExpertRecipe | None, kw: dict[str, Any]) -> ExpertRecipe:
        """``recipe`` with the keyword fields in ``kw`` applied (``TypeError`` for unknown ones)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise TypeError(f"unknown expert recipe arguments {unknown}; known: {sorted(names)}")
        if recipe is None:
            return cls(**kw)
        return dataclasses.replace(recipe, **kw)
