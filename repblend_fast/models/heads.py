"""Projection heads (docs/algorithm.md §2): an ``nn.Module`` and a function of one flat parameter
vector.

``p = W1 h + b1; u = W2 GELU(p) + b2; o = LayerNorm(Dropout(u) + p)`` (exact erf GELU, eps 1e-5).
Flat layout (row-major): ``W1 [D, d_in], b1 [D], W2 [D, D], b2 [D], gamma [D], beta [D]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LN_EPS = 1e-5


@dataclass(frozen=True)
class HeadSpec:
    """Shape of one projection head: input width ``d_in`` and output width ``dim``."""

    d_in: int
    dim: int

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        d, di = self.dim, self.d_in
        return {"W1": (d, di), "b1": (d,), "W2": (d, d), "b2": (d,), "gamma": (d,), "beta": (d,)}

    @property
    def numel(self) -> int:
        d, di = self.dim, self.d_in
        return d * di + d + d * d + d + 2 * d

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into ``flat`` ``[numel]`` or ``[K, numel]`` (no copies; a leading K is
        kept on every view)."""
        if flat.dim() not in (1, 2) or flat.shape[-1] != self.numel:
            raise ValueError(
                f"flat head parameters must be [numel] or [K, numel] with numel={self.numel} for "
                f"d_in={self.d_in}, dim={self.dim}; got shape {tuple(flat.shape)}"
            )
        lead = tuple(flat.shape[:-1])
        sizes = [math.prod(shape) for shape in self.shapes.values()]
        # One split instead of six slices: its backward assembles the flat gradient in a single
        # concatenation, where slice backwards each materialise a full-size zero tensor.
        parts = torch.split(flat, sizes, dim=-1)
        return {
            name: part.reshape(*lead, *shape)
            for (name, shape), part in zip(self.shapes.items(), parts)
        }


def head_forward(
    flat: torch.Tensor,
    h: torch.Tensor,
    spec: HeadSpec,
    *,
    dropout: float = 0.0,
    generator: torch.Generator | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply the head with parameters ``flat`` to ``h``.

    ``flat`` ``[numel]`` with ``h`` ``[..., d_in]`` -> ``[..., dim]``; or K heads at once:
    ``flat`` ``[K, numel]`` with ``h`` ``[K, B, d_in]`` -> ``[K, B, dim]``.

    ``dropout`` > 0 drops ``u`` with a mask drawn from ``generator``; alternatively ``keep`` is a
    precomputed, already rescaled mask of ``u``'s shape (the unroll draws its masks up front so
    that recomputation sees the same ones). The unroll keeps dropout off by default
    (docs/algorithm.md §2).
    """
    w = spec.views(flat)
    if flat.dim() == 2:
        return _head_forward_batched(w, h, spec, dropout, generator, keep)
    p = F.linear(h, w["W1"], w["b1"])
    u = F.linear(F.gelu(p), w["W2"], w["b2"])
    u = _dropout(u, dropout, generator) if keep is None else u * keep
    return F.layer_norm(u + p, (spec.dim,), w["gamma"], w["beta"], LN_EPS)


def _dropout(u: torch.Tensor, rate: float, generator: torch.Generator | None) -> torch.Tensor:
    if rate <= 0:
        return u
    keep = torch.rand(u.shape, generator=generator, device=u.device, dtype=u.dtype) >= rate
    return u * keep.to(u.dtype) / (1 - rate)


def _head_forward_batched(w, h, spec: HeadSpec, dropout: float, generator, keep) -> torch.Tensor:
    """K heads at once: parameters ``[K, ...]``, inputs ``[K, B, d_in]`` -> ``[K, B, dim]``."""
    if h.dim() != 3 or h.shape[0] != w["b1"].shape[0]:
        raise ValueError(
            f"batched head parameters [K={w['b1'].shape[0]}, numel] need inputs [K, B, d_in], "
            f"got {tuple(h.shape)}"
        )
    p = torch.baddbmm(w["b1"].unsqueeze(1), h, w["W1"].transpose(1, 2))
    u = torch.baddbmm(w["b2"].unsqueeze(1), F.gelu(p), w["W2"].transpose(1, 2))
    u = _dropout(u, dropout, generator) if keep is None else u * keep
    o = F.layer_norm(u + p, (spec.dim,), None, None, LN_EPS)
    return o * w["gamma"].unsqueeze(1) + w["beta"].unsqueeze(1)


class ProjectionHead(nn.Module):
    """Module form of the head; ``flat()`` / ``load_flat()`` convert to and from the flat layout."""

    def __init__(self, d_in: int, dim: int, dropout: float = 0.1):
        super().__init__()
        self.spec = HeadSpec(d_in, dim)
        self.fc1 = nn.Linear(d_in, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        p = self.fc1(h)
        u = self.fc2(F.gelu(p))
        return self.norm(self.drop(u) + p)

    def flat(self) -> torch.Tensor:
        """Parameters in the flat layout ``[numel]`` (a detached copy)."""
        parts = [self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias]
        parts += [self.norm.weight, self.norm.bias]
        return torch.cat([p.detach().reshape(-1) for p in parts])

    @torch.no_grad()
    def load_flat(self, flat: torch.Tensor) -> ProjectionHead:
        w = self.spec.views(flat)
        self.fc1.weight.copy_(w["W1"])
        self.fc1.bias.copy_(w["b1"])
        self.fc2.weight.copy_(w["W2"])
        self.fc2.bias.copy_(w["b2"])
        self.norm.weight.copy_(w["gamma"])
        self.norm.bias.copy_(w["beta"])
        return self


def init_head_flat(
    d_in: int, dim: int, *, generator: torch.Generator | None = None, dtype=torch.float32
) -> torch.Tensor:
    """Fresh flat parameters with PyTorch's default Linear init (kaiming-uniform a=sqrt(5) ==
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias), LayerNorm gamma=1, beta=0."""
    spec = HeadSpec(d_in, dim)
    b1 = 1.0 / d_in**0.5
    b2 = 1.0 / dim**0.5

    def u(shape, bound):
        return (torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1) * bound

    parts = [u((dim, d_in), b1), u((dim,), b1), u((dim, dim), b2), u((dim,), b2)]
    parts += [torch.ones(dim, dtype=dtype), torch.zeros(dim, dtype=dtype)]
    flat = torch.cat([p.reshape(-1) for p in parts])
    assert flat.numel() == spec.numel
    return flat
