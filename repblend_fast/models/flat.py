"""Flat parameter vectors for arbitrary modules (the LoRS student is a whole image encoder).

A :class:`FlatSpec` records the trainable parameters' names and shapes in ``named_parameters``
order, so a module's parameters can live in one 1-D tensor and be applied with
``torch.func.functional_call`` on views of it (no copies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.func import functional_call


@dataclass(frozen=True)
class FlatSpec:
    """Names and shapes of the pieces of one flat parameter vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_module(cls, module: nn.Module, trainable_only: bool = True) -> FlatSpec:
        items = [
            (n, tuple(p.shape))
            for n, p in module.named_parameters()
            if p.requires_grad or not trainable_only
        ]
        return cls(tuple(n for n, _ in items), tuple(s for _, s in items))

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into ``flat`` ``[numel]``."""
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ValueError(
                f"flat parameters must be 1-D with {self.numel} elements, got {tuple(flat.shape)}"
            )
        # One split (a single concatenation in backward) rather than a slice per parameter.
        parts = torch.split(flat, [math.prod(s) for s in self.shapes])
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes)}

    def flatten(self, module: nn.Module) -> torch.Tensor:
        """A detached flat copy of ``module``'s parameters in this spec's order."""
        params = dict(module.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ValueError(f"module lacks parameters {missing[:5]} of this flat spec")
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def to_json(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_json(cls, d: dict) -> FlatSpec:
        return cls(tuple(d["names"]), tuple(tuple(s) for s in d["shapes"]))


def functional_forward(module: nn.Module, spec: FlatSpec, flat: torch.Tensor, *args, **kwargs):
    """Run ``module`` with its trainable parameters replaced by views of ``flat``."""
    return functional_call(module, spec.views(flat), args, kwargs, strict=False)
