"""Parity of the configuration the step benchmark times (repblend_fast/bench/parity.py).

The verdict compares the fused path with the reference path **in the same precision** (both fp32,
or both with the bf16 encoder) to RTOL = 1e-3 relative L2 on every meta-gradient (BF16_X_RTOL =
1e-2 for x with a bf16 encoder; reasons in parity.py); bf16 against fp32 is reported as the
precision cost, never bounded. On the CPU the fused path is the Triton
kernels through ``TRITON_INTERPRET=1`` (tests/conftest.py sets it), run inside the whole unroll
with ``impl="triton"``, exact and TESLA (``impl="auto"`` would pick the reference ops on a CPU and
compare the reference with itself). The parity point has a non-zero low-rank similarity, so the
similarity's gradients are checked too.

Every wrong gradient the check must catch is injected into the timed path and must fail it:
the meta-gradients scaled by 1.25 and by 0.75, the x-gradient zeroed for 7 of 99 images, one
image's x-gradient sign-flipped (``ci`` shapes: timm resnet18 at 64 px, N = 99, B = 20, T = 8),
and a x1.5 bug in the Triton contrastive backward (``tiny`` shapes, through the interpreter).
The ``gpu`` test runs the benchmark's GPU configuration (fused CUDA / Triton ops, bf16 encoder)
at the ``ci`` shapes; benchmarks/parity_check.py runs it at the paper shapes.
"""

from __future__ import annotations

import pytest
import torch

from repblend_fast.bench import SHAPE_SETS
from repblend_fast.bench import parity as parity_mod
from repblend_fast.bench.parity import BF16_X_RTOL, RTOL, timed_parity

TINY = SHAPE_SETS["tiny"][0]
CI = SHAPE_SETS["ci"][0]


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _assert_parity(rec):
    assert rec["zero_in_reference"] == [], rec["zero_in_reference"]
    bf16 = rec["autocast"] == "bf16"
    for name, err in rec["rel_err"].items():
        bound = BF16_X_RTOL if bf16 and name == "x" else RTOL
        assert rec["rtol"][name] == bound
        assert err <= bound, (name, err, rec["rel_err"])
    assert rec["max_fp32_vs_fp64"] <= RTOL, rec["fp32_vs_fp64"]
    assert rec["ok"]


@pytest.mark.parametrize("autocast", ["none", "bf16"])
@pytest.mark.parametrize("meta_grad", ["exact", "tesla"])
def test_triton_unroll_matches_the_reference_in_the_same_precision(meta_grad, autocast):
    rec = timed_parity(TINY, meta_grad, "cpu", autocast=autocast, impl="triton")
    assert rec["impl"] == "triton" and rec["autocast"] == autocast
    _assert_parity(rec)
    # The fused path is not the reference: the kernels' own fp32 rounding shows.
    assert rec["max_rel_err"] > 0
    # Every meta-gradient is checked, the similarity's L included (R != 0).
    assert {"x", "y", "eta_img", "eta_txt", "sim.a", "sim.L", "sim.R"} <= set(rec["rel_err"])
    cost = rec["precision_cost"]
    if autocast == "none":
        assert max(cost.values()) <= RTOL
    else:
        # The bf16 encoder really ran (its error is far above fp32's) and its cost on the image
        # gradient is reported, not bounded: it is above the parity bound and the check passes.
        assert rec["encoder_error"]["features"] > 1e-4
        assert cost["x"] > RTOL and cost["x"] > 10 * rec["rel_err"]["x"]


def test_a_zero_similarity_gradient_makes_the_check_fail():
    """At R = 0 the gradient of L is exactly zero in both paths: such a point checks nothing."""
    rec = timed_parity(TINY, "exact", "cpu", autocast="none", float64=False, sim_r_std=0.0)
    assert rec["zero_in_reference"] == ["sim.L"] and not rec["ok"]


def _inject_into_timed_path(monkeypatch, corrupt):
    """Make ``corrupt(grads)`` alter the timed runner's meta-gradients (not its reference's)."""
    real = parity_mod.make_runner

    def make_runner(*args, **kwargs):
        runner = real(*args, **kwargs)
        run = runner.unroller.run

        def wrong(*a, **k):
            r = run(*a, **k)
            r.grads = corrupt(dict(r.grads))
            return r

        runner.unroller.run = wrong
        return runner

    monkeypatch.setattr(parity_mod, "make_runner", make_runner)


def _scaled(factor):
    return lambda g: {k: v * factor for k, v in g.items()}


def _x_rows(g, fn):
    """``fn(x_grad, rows)`` applied to the rows of the images the plan touched."""
    x = g["x"].clone()
    rows = torch.nonzero(x.flatten(1).norm(dim=1)).flatten()
    fn(x, rows)
    return {**g, "x": x}


def _zero_seven(g):
    return _x_rows(g, lambda x, rows: x.index_fill_(0, rows[:7], 0.0))


def _flip_one(g):
    return _x_rows(g, lambda x, rows: x[rows[0]].neg_())


INJECTED = {
    "x1.25": _scaled(1.25),
    "x0.75": _scaled(0.75),
    "zero7": _zero_seven,
    "flip1": _flip_one,
}


# The injections alter the unroll's output, whatever the mode: each runs in one of them.
@pytest.mark.parametrize(
    "bug, meta_grad",
    [("x1.25", "exact"), ("x0.75", "tesla"), ("zero7", "exact"), ("flip1", "tesla")],
)
def test_every_injected_wrong_gradient_fails_parity_at_ci_shapes(bug, meta_grad, monkeypatch):
    _inject_into_timed_path(monkeypatch, INJECTED[bug])
    rec = timed_parity(CI, meta_grad, "cpu", autocast="none", float64=False)
    assert not rec["ok"], rec["rel_err"]
    # Wrong by far more than the bound: the check does not pass it by a hair either way.
    assert rec["worst_ratio"] > 50, rec["rel_err"]


@pytest.mark.parametrize("autocast", ["none", "bf16"])
@pytest.mark.parametrize("meta_grad", ["exact", "tesla"])
def test_a_bug_in_the_triton_backward_fails_parity(meta_grad, autocast, monkeypatch):
    from repblend_fast.kernels import contrastive as tk

    real = tk.backward

    def backward(*args, **kwargs):
        d_img, d_txt, d_tgt, d_scale = real(*args, **kwargs)
        return 1.5 * d_img, d_txt, d_tgt, d_scale

    monkeypatch.setattr(tk, "backward", backward)
    rec = timed_parity(TINY, meta_grad, "cpu", autocast=autocast, impl="triton", float64=False)
    assert rec["impl"] == "triton"
    assert not rec["ok"] and rec["worst_ratio"] > 10, rec["rel_err"]


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", ["auto", "none"])
@pytest.mark.parametrize("meta_grad", ["exact", "tesla"])
def test_gpu_timed_configuration_parity(meta_grad, autocast):
    """The step benchmark's GPU configurations (fused ops; bf16 encoder by default, and fp32)
    against the reference path in the same precision on the GPU, the fp32 reference against
    float64 on the CPU; the bf16 cost is recorded."""
    rec = timed_parity(CI, meta_grad, "cuda", autocast=autocast)
    assert rec["impl"] in ("cuda", "triton"), rec
    assert rec["autocast"] == ("bf16" if autocast == "auto" else "none")
    _assert_parity(rec)
