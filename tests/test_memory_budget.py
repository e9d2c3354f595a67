"""``memory_budget_mib``: the plan (keep / chunk / checkpoint from the measured per-image encoder
graph) and results equal to the unbudgeted run (repblend_fast/engine/unroll.py,
``Unroller.memory_plan``).

Shapes: the step benchmark's ``tiny`` set (N = 11, B = 4, T = 2), where every quantity of the plan
is a fraction of a MiB, so budgets are given as exact fractions of the measured sizes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from repblend_fast.bench import SHAPE_SETS, build_step_inputs, make_runner
from repblend_fast.bench.parity import rel_errors
from repblend_fast.config import DistillConfig
from repblend_fast.engine.unroll import MemoryPlan, Unroller, UnrollSettings
from repblend_fast.models.heads import HeadSpec

TINY = SHAPE_SETS["tiny"][0]
MIB = 2**20


@pytest.fixture(scope="module")
def inputs():
    torch.set_num_threads(1)
    return build_step_inputs(TINY, 1, 0, methods=("repblend",))


def _run(inputs, meta_grad, budget):
    runner = make_runner(inputs, "repblend-fast", meta_grad, "cpu", memory_budget_mib=budget)
    grads = runner.grads_at_start(inputs.plans_repblend[0])
    return grads, runner.unroller.last_memory_plan, runner


def _sizes(inputs, meta_grad):
    """(touched U, per-image MiB e, exact-mode state at 2T+6 and T+6 sets, fixed MiB) of the
    tiny plan, from an unbudgeted runner (the quantities the budget is compared with)."""
    _, _, runner = _run(inputs, meta_grad, 0)
    u = int(torch.unique(inputs.plans_repblend[0].batches).numel())
    e = runner.unroller.image_graph_mib(runner.x)
    theta = sum(t.numel() * t.element_size() for t in runner.start) / MIB
    fixed = 2 * runner.x.numel() * runner.x.element_size() / MIB
    return u, e, theta, fixed


def test_image_graph_size_is_measured_per_image():
    """A frozen linear layer + tanh keeps, per image, tanh's output (which is also the features):
    exactly d floats, whatever the batch, without the weight (or a cast copy of it) counted."""
    h, d = 5, 7
    enc = nn.Sequential(nn.Flatten(), nn.Linear(3 * h * h, d), nn.Tanh())
    for p in enc.parameters():
        p.requires_grad_(False)
    spec = HeadSpec(d, 4)
    un = Unroller(UnrollSettings(memory_budget_mib=1.0), enc, spec, HeadSpec(3, 4))
    x = torch.randn(6, 3, h, h)
    assert un.image_graph_mib(x) * MIB == pytest.approx(4 * d)
    # Under bf16 autocast tanh saves a bf16 output and the features are its fp32 copy; the
    # weight's bf16 copy is shared by the batch (not counted).
    bf = Unroller(
        UnrollSettings(memory_budget_mib=1.0, encoder_autocast=torch.bfloat16),
        enc,
        spec,
        HeadSpec(3, 4),
    )
    assert bf.image_graph_mib(x) * MIB == pytest.approx(2 * d + 4 * d)
    # The same count with the work on the meta device (storages told apart by identity, not by
    # address: every meta storage has address 0), so a plan can be made without computing.
    deep = nn.Sequential(nn.Flatten(), nn.Tanh(), nn.Linear(3 * h * h, d), nn.Tanh())
    deep.requires_grad_(False)
    want = 4 * (3 * h * h + d)  # both tanh outputs per image
    for dev in ("cpu", "meta"):
        un = Unroller(UnrollSettings(memory_budget_mib=1.0), deep.to(dev), spec, HeadSpec(3, 4))
        assert un.image_graph_mib(x.to(dev)) * MIB == pytest.approx(want), dev


def test_plan_without_budget_follows_the_settings(inputs):
    _, plan, _ = _run(inputs, "exact", 0)
    u = int(torch.unique(inputs.plans_repblend[0].batches).numel())
    assert plan == MemoryPlan(u, 0, False, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("meta_grad", ["exact", "tesla"])
def test_plan_keeps_what_fits_and_chunks_the_rest(inputs, meta_grad):
    u, e, theta, fixed = _sizes(inputs, meta_grad)
    t = TINY.steps
    state = (2 * t + 6 if meta_grad == "exact" else 6) * theta
    # Everything fits: the whole graph is kept, nothing is re-encoded.
    _, plan, _ = _run(inputs, meta_grad, fixed + state + (u + 0.5) * e)
    assert (plan.keep, plan.chunk, plan.checkpoint_steps) == (u, 0, False)
    assert plan.image_mib == pytest.approx(e) and plan.fixed_mib == pytest.approx(fixed)
    assert plan.state_mib == pytest.approx(state)
    # Room for 3 images' graphs next to the unroll state: keep 3 (exact mode: more, if
    # checkpointing its steps frees room for them), re-encode the others in chunks as large as
    # the budget holds once the state is gone.
    budget = fixed + state + 3.5 * e
    _, plan, _ = _run(inputs, meta_grad, budget)
    keep, ckpt = 3, False
    if meta_grad == "exact":
        with_ckpt = min(u, math.floor((budget - fixed - (t + 6) * theta) / e))
        keep, ckpt = (with_ckpt, True) if with_ckpt > 3 else (3, False)
    assert (plan.keep, plan.checkpoint_steps) == (keep, ckpt)
    assert plan.chunk == min(u - keep, math.floor((budget - fixed) / e))
    # Less than one image next to the state: nothing kept, one image at a time at worst.
    _, plan, _ = _run(inputs, meta_grad, fixed + 0.01 * e)
    assert plan.keep == 0 and plan.chunk == 1


def test_exact_mode_checkpoints_its_steps_when_that_keeps_more(inputs):
    u, e, theta, fixed = _sizes(inputs, "exact")
    t = TINY.steps
    # Without checkpointing the state (2T+6 sets) leaves no room for an image; with it (T+6
    # sets) two images fit.
    budget = fixed + (t + 6) * theta + 2.5 * e
    assert budget < fixed + (2 * t + 6) * theta + e
    _, plan, _ = _run(inputs, "exact", budget)
    assert plan.checkpoint_steps and plan.keep == 2
    assert plan.state_mib == pytest.approx((t + 6) * theta)
    # A budget below the state itself: no image keeps its graph either way, and checkpointing
    # still lowers the peak by T parameter sets.
    _, plan, _ = _run(inputs, "exact", fixed + 0.5 * e)
    assert plan.checkpoint_steps and plan.keep == 0 and plan.chunk == 1


@pytest.mark.parametrize("meta_grad", ["exact", "tesla"])
def test_budgeted_results_equal_the_unbudgeted_run(inputs, meta_grad):
    want, _, _ = _run(inputs, meta_grad, 0)
    u, e, theta, fixed = _sizes(inputs, meta_grad)
    t = TINY.steps
    state = (2 * t + 6 if meta_grad == "exact" else 6) * theta
    seen = set()
    for budget in (fixed + state + 3.5 * e, fixed + (t + 6) * theta + 2.5 * e, fixed + 0.01 * e):
        got, plan, _ = _run(inputs, meta_grad, budget)
        seen.add((plan.keep, plan.chunk, plan.checkpoint_steps))
        errs = rel_errors(got, want)
        # Same computation, other encoder batch sizes and (checkpointing) a recomputed forward:
        # fp32 rounding only.
        assert max(errs.values()) <= 1e-5, (plan, errs)
    assert len(seen) >= 2, seen


def test_budget_is_a_checked_setting():
    with pytest.raises(ValueError, match="memory_budget_mib"):
        DistillConfig(memory_budget_mib=-1).validate()
    with pytest.raises(ValueError, match="memory_budget_mib"):
        DistillConfig(memory_budget_mib=100, encoder_chunk=10).validate()
    with pytest.raises(ValueError, match="memory_budget_mib"):
        DistillConfig(memory_budget_mib=100, checkpoint_steps=True).validate()
    with pytest.raises(ValueError, match="memory_budget_mib"):
        DistillConfig(memory_budget_mib=100, share_encoder=False).validate()
    with pytest.raises(ValueError, match="memory_budget_mib"):
        DistillConfig(method="lors", blend=False, memory_budget_mib=100).validate()
    DistillConfig(memory_budget_mib=100).validate()
