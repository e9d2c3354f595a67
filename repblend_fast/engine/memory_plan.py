"""MemoryPlan: how one iteration holds the shared encoder graph under ``memory_budget_mib``.

:func:`plan_memory` chooses ``keep`` (touched images whose encoder graph is kept from the forward
to the VJP), ``chunk`` (the others are re-encoded that many at a time during the VJP) and, in exact
mode, ``checkpoint_steps``, from the per-image encoder-graph size that
:func:`measure_image_graph_mib` measures. :class:`repblend_fast.engine.unroll.Unroller` calls both
(``Unroller.memory_plan``, ``Unroller.image_graph_mib``) and follows the plan.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from repblend_fast.engine.step_plan import StepPlan
from repblend_fast.methods import student_for_experts


@dataclass(frozen=True)
class MemoryPlan:
    """How one iteration holds the shared encoder graph (chosen from ``memory_budget_mib``).

    keep: touched images whose encoder graph is kept from the forward to the VJP.
    chunk: the others are re-encoded this many at a time during the VJP (0: none are).
    checkpoint_steps: exact mode recomputes each step in the backward.
    image_mib: measured encoder-graph MiB per image (saved tensors of an eager forward).
    state_mib, fixed_mib: estimated unroll state (held during the unroll) and the MiB held
        through the whole iteration (the image gradient, features, cotangents).
    """

    keep: int
    chunk: int
    checkpoint_steps: bool
    image_mib: float
    state_mib: float
    fixed_mib: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_memory(
    s, x: torch.Tensor, touched: int, start, plan: StepPlan, image_mib: Callable[[], float]
) -> MemoryPlan:
    """How this iteration holds the shared encoder graph (see :class:`MemoryPlan`).

    Without ``memory_budget_mib``: the settings' ``encoder_chunk`` (0 keeps every graph) and
    ``checkpoint_steps``. With a budget of M MiB, from the measured encoder-graph size per
    image ``e`` (``image_mib()``, :func:`measure_image_graph_mib`), the unroll state ``s`` held
    while the graph is kept (``2T + 6`` flat parameter sets in exact mode, ``T + 6`` with per-step
    checkpointing, 6 in TESLA, ``T + 6`` when TESLA stores ``theta_i`` for fresh pass-2
    dropout masks) and what the whole iteration holds ``f`` (two image-sized buffers):
    ``keep = (M - f - s) / e`` touched images keep their graph and the others are
    re-encoded ``chunk = (M - f) / e`` at a time during the VJP, which runs after the
    unroll state is freed. In exact mode the steps are checkpointed as well when that lets
    more images keep their graph, or when ``f + s`` alone exceeds the budget. An estimate
    of tensor memory: a CPU's resident set adds the allocator's own overhead and the
    transient buffers of each operation (benchmarks/README.md measures both).

    Args:
        s: the unroll's settings (``repblend_fast.engine.unroll.UnrollSettings``: method,
            share_encoder, meta_grad, checkpoint_steps, encoder_chunk, memory_budget_mib).
        x: the synthetic images ``[N, 3, H, W]``.
        touched: U, the number of distinct images the plan touches.
        start: the ``[K, numel]`` start parameters (their size and dtype).
        plan: the iteration's plan (T, and whether TESLA pass 2 has its own masks).
        image_mib: the encoder-graph MiB per image (called only under a budget).
    """
    ckpt = s.checkpoint_steps
    shared = student_for_experts(s.method).shares_encoder(s)
    if s.memory_budget_mib <= 0 or not shared:
        keep = touched if s.encoder_chunk == 0 else 0
        chunk = 0 if keep >= touched else s.encoder_chunk
        return MemoryPlan(keep, chunk, ckpt, 0.0, 0.0, 0.0)
    mib = float(2**20)
    theta = sum(t.numel() * t.element_size() for t in start) / mib
    steps = plan.steps
    if s.meta_grad == "exact":
        units = steps + 6 if ckpt else 2 * steps + 6
    else:
        fresh = plan.keep_img2 is not None or plan.keep_txt2 is not None
        units = steps + 6 if fresh else 6
    state = units * theta
    fixed = 2 * x.numel() * x.element_size() / mib
    image = image_mib()
    budget = float(s.memory_budget_mib)

    def kept(state_mib: float) -> int:
        return max(0, min(touched, math.floor((budget - fixed - state_mib) / image)))

    keep = kept(state)
    if keep < touched and s.meta_grad == "exact" and not ckpt:
        # Checkpoint the steps when that keeps more images' graphs, or when the state
        # without it does not even fit the budget (then it lowers the peak by T sets).
        keep_ckpt = kept((steps + 6) * theta)
        if keep_ckpt > keep or fixed + state > budget:
            ckpt, keep, state = True, keep_ckpt, (steps + 6) * theta
    chunk = 0
    if keep < touched:
        chunk = max(1, min(touched - keep, math.floor((budget - fixed) / image)))
    return MemoryPlan(keep, chunk, ckpt, image, state, fixed)


def measure_image_graph_mib(
    encode: Callable[[torch.Tensor], torch.Tensor], encoder: torch.nn.Module, x: torch.Tensor
) -> float:
    """MiB of encoder graph one more image keeps alive (its saved tensors, the encoder's own
    parameters excluded, plus its features), measured with eager forwards (``encode``, the
    unroll's eager encoder call) of 1 and 3 images of ``x``: the difference, so that what a
    forward saves once whatever the batch (autocast's low-precision copies of the weights) is
    not counted per image. A compiled encoder saves no more than this."""
    own = {t.untyped_storage()._cdata for t in encoder.parameters()}
    own |= {t.untyped_storage()._cdata for t in encoder.buffers()}

    def graph_bytes(n: int) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st._cdata not in own:
                seen[st._cdata] = st.nbytes()
            return t

        probe = x[:n].detach().clone().requires_grad_(True)
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with torch.enable_grad(), hooks:
            out = encode(probe)
        seen[out.untyped_storage()._cdata] = out.untyped_storage().nbytes()
        return sum(seen.values())

    if x.shape[0] >= 3:
        nbytes = (graph_bytes(3) - graph_bytes(1)) / 2
    else:
        nbytes = graph_bytes(1)
    return max(nbytes, 1.0) / 2**20
