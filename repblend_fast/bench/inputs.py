"""Random stand-in inputs of one step-benchmark configuration, shared by every provider.

All providers of a configuration get the same data, expert snapshots and unroll plans (built from
one seed), so that their timings and meta-gradients compare like with like.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from repblend_fast.bench.shapes import StepShape, make_encoder
from repblend_fast.engine.step_plan import StepPlan
from repblend_fast.models.flat import FlatSpec
from repblend_fast.models.heads import init_head_flat

__all__ = ["StepInputs", "build_step_inputs", "make_plans", "plan_to"]

Snapshots = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StepInputs:
    """Everything a provider needs, identical for all providers of one configuration.

    Snapshots are host tensors (the authors' loops copy them to the device every iteration; the
    fast path preloads them once).
    """

    shape: StepShape
    encoder: nn.Module
    d_feat: int
    images: torch.Tensor  # [N, 3, H, W]
    texts: torch.Tensor  # [N, d_t]
    sim: dict[str, torch.Tensor]  # low-rank a [N], L [N, r], R [N, r]
    repblend: Snapshots | None
    lors: Snapshots | None
    plans_repblend: list[StepPlan]
    plans_lors: list[StepPlan]


def make_plans(shape: StepShape, count: int, blend: bool, g: torch.Generator) -> list[StepPlan]:
    """``count`` unroll plans with ``blend`` and ``touched`` set, as the Distiller's sampler
    draws them; without ``blend`` the coefficients are 1 (LoRS does not blend)."""
    from repblend_fast.engine.sampling import BatchSampler

    sampler = BatchSampler(shape.pairs, shape.batch, g)
    out = []
    for _ in range(count):
        batches = torch.stack([sampler.next() for _ in range(shape.steps)])
        if blend:
            lams = torch.rand(shape.steps, generator=g)  # Beta(1, 1)
            perms = torch.stack(
                [torch.randperm(shape.batch, generator=g) for _ in range(shape.steps)]
            )
        else:
            lams = torch.ones(shape.steps)
            perms = torch.arange(shape.batch).expand(shape.steps, shape.batch).clone()
        # The fields the Distiller's sampler fills in too: whether the steps blend, and the
        # touched pairs (computed here, on the host), so that the timed step reads nothing back.
        out.append(StepPlan(batches, lams, perms, blend=blend).with_touched())
    return out


def plan_to(plan: StepPlan, device: torch.device) -> StepPlan:
    """The plan on ``device``, moved as ``Distiller.step`` moves it (:meth:`StepPlan.to`:
    pinned, non-blocking copies on CUDA); moving it is part of every provider's iteration."""
    return plan.to(device)


def build_step_inputs(
    shape: StepShape, count: int, seed: int = 0, methods: tuple[str, ...] = ("repblend", "lors")
) -> StepInputs:
    """Random stand-ins of the data, one expert's epochs 0 and 1, and ``count`` plans per method."""
    g = torch.Generator().manual_seed(seed)
    enc = make_encoder(shape, seed)
    for p in enc.parameters():
        p.requires_grad_(False)
    n, res = shape.pairs, shape.image_size
    images = torch.randn(n, 3, res, res, generator=g)
    texts = torch.randn(n, shape.d_txt, generator=g)
    with torch.no_grad():
        d_feat = int(enc(images[:2]).shape[-1])
    sim = {
        "a": torch.ones(n),
        "L": torch.randn(n, shape.rank, generator=g),
        "R": torch.zeros(n, shape.rank),
    }

    def epochs(start: tuple[torch.Tensor, torch.Tensor]) -> Snapshots:
        target = tuple(t + 1e-2 * torch.randn(t.shape, generator=g) for t in start)
        return start, target

    repblend = lors = None
    if "repblend" in methods:
        repblend = epochs(
            (
                init_head_flat(d_feat, shape.dim, generator=g),
                init_head_flat(shape.d_txt, shape.dim, generator=g),
            )
        )
    if "lors" in methods:
        enc_flat = FlatSpec.from_module(enc, trainable_only=False).flatten(enc).clone()
        lors = epochs((enc_flat, init_head_flat(shape.d_txt, d_feat, generator=g)))
    plans_rb = make_plans(shape, count, True, torch.Generator().manual_seed(seed + 1))
    plans_lors = make_plans(shape, count, False, torch.Generator().manual_seed(seed + 2))
    return StepInputs(shape, enc, d_feat, images, texts, sim, repblend, lors, plans_rb, plans_lors)
