"""The outer optimiser and its guard (docs/algorithm.md §14), and the collapse detector.

The optimiser is driven with hand-made gradients so that every rule can be checked against an
independent computation: plain SGD with momentum for the unguarded path, a synthetic spike, a
forced loss jump, the per-pair trust region and the η clamp.
"""

from __future__ import annotations

import math

import pytest
import torch

from repblend_fast.config import DistillConfig
from repblend_fast.engine.outer import GROUPS, OuterOptimizer

N = 6


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(N, 3, 2, 2, generator=g),
        "y": torch.randn(N, 5, generator=g),
        "eta_img": torch.tensor(0.1),
        "eta_txt": torch.tensor(0.1),
        "sim.a": torch.ones(N),
        "sim.L": torch.randn(N, 2, generator=g),
    }


def _grads(scale=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    p = _params()
    return {k: scale * 1e-3 * torch.randn(v.shape, generator=g) for k, v in p.items()}


def _cfg(**kw):
    base = dict(lr_img=2.0, lr_txt=3.0, lr_lr=0.5, lr_sim=1.5, momentum=0.5, pairs=N, batch_size=2)
    base.update(kw)
    return DistillConfig(**base)


def _plain_sgd(params, grads_seq, cfg):
    """torch.optim.SGD (dampening 0) with four groups, then the η clamp: the reference."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    lr = {"x": cfg.lr_img, "y": cfg.lr_txt, "eta_img": cfg.lr_lr, "eta_txt": cfg.lr_lr}
    groups = [{"params": [v], "lr": lr.get(k, cfg.lr_sim)} for k, v in leaves.items()]
    opt = torch.optim.SGD(groups, lr=1.0, momentum=cfg.momentum)
    for grads in grads_seq:
        for k, v in leaves.items():
            v.grad = grads[k].clone()
        opt.step()
        if cfg.clamp_lr is not None:
            with torch.no_grad():
                leaves["eta_img"].clamp_(min=cfg.clamp_lr)
                leaves["eta_txt"].clamp_(min=cfg.clamp_lr)
    return {k: v.detach() for k, v in leaves.items()}


def test_unguarded_is_sgd_with_momentum():
    cfg = _cfg(guard=False, clamp_lr=0.0995)
    params = _params()
    want = _plain_sgd(params, [_grads(seed=s) for s in (1, 2, 3)], cfg)
    opt = OuterOptimizer(cfg, params)
    for s in (1, 2, 3):
        st = opt.step(_grads(seed=s), torch.tensor(2.0))
        assert bool(st["accepted"])
    for k in want:
        torch.testing.assert_close(params[k], want[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("guard", [False, True])
def test_non_finite_never_reaches_the_parameters(guard):
    cfg = _cfg(guard=guard, trust_region=0.0)
    params = _params()
    opt = OuterOptimizer(cfg, params)
    opt.step(_grads(seed=1), torch.tensor(2.0))
    before = {k: v.clone() for k, v in params.items()}
    bad = _grads(seed=2)
    bad["y"][1, 2] = float("nan")
    st = opt.step(bad, torch.tensor(2.0))
    assert not bool(st["finite"]) and not bool(st["accepted"])
    st = opt.step(_grads(seed=3), torch.tensor(float("inf")))
    assert not bool(st["accepted"])
    # A finite gradient whose update overflows is refused too.
    big = _grads(seed=4)
    big["x"].fill_(3e38)  # finite, but lr_img * 3e38 is not
    st = opt.step(big, torch.tensor(2.0))
    assert bool(st["finite"]) and not bool(st["update_finite"]) and not bool(st["accepted"])
    for k in before:
        assert torch.equal(params[k], before[k]), k


def test_spike_is_rejected_and_its_group_slowed():
    cfg = _cfg(guard=True, trust_region=0.0, guard_warmup=3, guard_cooldown=2)
    params = _params()
    opt = OuterOptimizer(cfg, params)
    for s in range(4):
        assert bool(opt.step(_grads(seed=10 + s), torch.tensor(2.0))["accepted"])
    before = {k: v.clone() for k, v in params.items()}
    spike = _grads(seed=20)
    spike["x"] = spike["x"] * 1000  # 1000x the image group's usual norm
    st = opt.step(spike, torch.tensor(2.0))
    assert bool(st["spike_image"]) and not bool(st["accepted"])
    assert not any(bool(st[f"spike_{g}"]) for g in GROUPS if g != "image")
    for k in before:
        assert torch.equal(params[k], before[k])
    assert float(st["lr_scale_image"]) == 0.5 and float(st["lr_scale_text"]) == 1.0
    # The next (normal) update moves the images at half the learning rate.
    g = _grads(seed=21)
    buf = opt.momentum["x"].clone()
    x0 = params["x"].clone()
    assert bool(opt.step(g, torch.tensor(2.0))["accepted"])
    want = x0 - 0.5 * cfg.lr_img * (cfg.momentum * buf + g["x"])
    torch.testing.assert_close(params["x"], want, rtol=1e-6, atol=1e-7)
    # ... and after the cooldown at the full rate again.
    for s in range(3):
        st = opt.step(_grads(seed=30 + s), torch.tensor(2.0))
    assert float(st["lr_scale_image"]) == 1.0


def test_loss_jump_rolls_back_the_previous_update():
    cfg = _cfg(guard=True, trust_region=0.0, guard_warmup=3)
    params = _params()
    opt = OuterOptimizer(cfg, params)
    for s in range(4):
        opt.step(_grads(seed=40 + s), torch.tensor(2.0 + 0.01 * s))
    before_last = {k: v.clone() for k, v in params.items()}
    momentum_before = {k: v.clone() for k, v in opt.momentum.items()}
    assert bool(opt.step(_grads(seed=50), torch.tensor(2.0))["accepted"])  # the bad update
    st = opt.step(_grads(seed=51), torch.tensor(31.0))  # its consequence: a loss 15x the median
    assert bool(st["rollback"]) and not bool(st["accepted"])
    for k in before_last:
        assert torch.equal(params[k], before_last[k]), k
        assert torch.equal(opt.momentum[k], momentum_before[k]), k
    assert all(float(st[f"lr_scale_{g}"]) == 0.5 for g in GROUPS)


def test_trust_region_bounds_each_pairs_update():
    tau = 0.05
    cfg = _cfg(guard=True, trust_region=tau, momentum=0.0)
    params = _params()
    x0 = params["x"].clone()
    ref = x0.reshape(N, -1).norm(dim=1).pow(2).mean().sqrt()
    g = _grads(seed=60)
    g["x"][2] *= 1e4  # one pair's image gradient far too large
    opt = OuterOptimizer(cfg, params)
    st = opt.step(g, torch.tensor(2.0))
    assert bool(st["accepted"])
    # What the metrics report: one image row of N scaled down, no text or similarity row.
    assert float(st["clipped_image"]) == pytest.approx(1 / N)
    assert float(st["clipped_text"]) == 0.0 and float(st["clipped_sim"]) == 0.0
    step = (params["x"] - x0).reshape(N, -1).norm(dim=1)
    assert float(step[2]) == pytest.approx(tau * float(ref), rel=1e-5)
    # The other pairs' small updates are untouched: exactly lr * g.
    others = [i for i in range(N) if i != 2]
    torch.testing.assert_close(
        params["x"][others], x0[others] - cfg.lr_img * g["x"][others], rtol=1e-6, atol=1e-8
    )


def test_trust_region_is_smooth_in_the_gradient():
    """A perturbation of the gradient at rounding level moves the update by as little: rows just
    below, at and just above the bound, tiny rows and zero rows included (a hard switch, a
    quantised factor or a branch at the bound would move a row by a finite amount)."""
    tau = 0.05
    cfg = _cfg(guard=True, trust_region=tau, momentum=0.0)
    base = _params()
    ref = float(base["x"].reshape(N, -1).norm(dim=1).pow(2).mean().sqrt())
    g = _grads(seed=61)
    rows = g["x"].reshape(N, -1)
    bound = tau * ref / cfg.lr_img  # the gradient row norm at which clipping starts
    for i, s in enumerate([1 - 1e-7, 1.0, 1 + 1e-7, 3.0, 1e-9, 0.0]):
        rows[i] *= s * bound / rows[i].norm() if s else 0.0
    gen = torch.Generator().manual_seed(62)
    moved = []
    for rel in (0.0, 1e-6):
        params = {k: v.clone() for k, v in base.items()}
        gp = {k: v * (1 + rel * torch.randn(v.shape, generator=gen)) for k, v in g.items()}
        OuterOptimizer(cfg, params).step(gp, torch.tensor(2.0))
        moved.append(params["x"] - base["x"])
    diff = (moved[1] - moved[0]).reshape(N, -1).norm(dim=1)
    size = moved[0].reshape(N, -1).norm(dim=1).clamp_min(1e-30)
    assert float((diff / size)[:5].max()) <= 1e-5  # rows moved: relative change ~1e-6
    assert float(diff[5]) == 0.0


def test_eta_momentum_is_reset_at_the_clamp():
    cfg = _cfg(guard=True, trust_region=0.0, clamp_lr=0.09, lr_lr=1.0)
    params = _params()
    opt = OuterOptimizer(cfg, params)
    g = _grads(seed=70)
    g["eta_img"] = torch.tensor(0.05)  # pushes eta_img below the clamp
    opt.step(g, torch.tensor(2.0))
    assert float(params["eta_img"]) == pytest.approx(0.09)
    assert float(opt.momentum["eta_img"]) == 0.0
    # A gradient that now points up moves it up at once (no buffer still pushing down).
    g2 = _grads(seed=71)
    g2["eta_img"] = torch.tensor(-0.01)
    opt.step(g2, torch.tensor(2.0))
    assert float(params["eta_img"]) == pytest.approx(0.1)


def test_guard_state_survives_a_checkpoint():
    cfg = _cfg(guard=True)
    a, b = _params(), _params()
    oa = OuterOptimizer(cfg, a)
    for s in range(5):
        oa.step(_grads(seed=80 + s), torch.tensor(2.0 + s % 2))
    ob = OuterOptimizer(cfg, b)
    for k, v in a.items():
        b[k].copy_(v)
    ob.load_state_tensors({k: v.clone() for k, v in oa.state_tensors().items()})
    for s in range(3):
        sa = oa.step(_grads(seed=90 + s), torch.tensor(2.5))
        sb = ob.step(_grads(seed=90 + s), torch.tensor(2.5))
        assert {k: float(v) for k, v in sa.items()} == {k: float(v) for k, v in sb.items()}
    for k in a:
        assert torch.equal(a[k], b[k])


# --------------------------------------------------------------------------- collapse detector
def test_a_run_that_stops_learning_is_stopped_with_its_state_saved(tmp_path):
    from test_distill import setup, small

    from repblend_fast.engine.distill import CollapseError

    # lr_img = lr_txt = 0: the synthetic set cannot improve, so the loss cannot fall.
    cfg = small(lr_img=0.0, lr_txt=0.0, lr_sim=0.0, lr_lr=0.0, iterations=30, collapse_window=5)
    d = setup(cfg, tmp_path / "run")
    with pytest.raises(CollapseError, match="no lower than"):
        d.run(progress=False)
    assert d.iteration < 30
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file()
    assert not (tmp_path / "run" / "distilled.safetensors").exists()


def test_learning_rates_pinned_at_the_clamp_stop_the_run(tmp_path):
    from test_distill import setup, small

    from repblend_fast.engine.distill import CollapseError

    cfg = small(lr_init=0.01, clamp_lr=0.01, lr_lr=1e3, iterations=30, collapse_window=4)
    d = setup(cfg, tmp_path / "run")
    d.opt.step = _pin(d.opt.step, d)
    with pytest.raises(CollapseError, match="clamp_lr"):
        d.run(progress=False)


def _pin(step, d):
    """Wrap the optimiser step so the η gradient always points down (a trap)."""

    def wrapped(grads, loss):
        grads = dict(grads)
        grads["eta_img"] = torch.tensor(1.0)
        grads["eta_txt"] = torch.tensor(1.0)
        return step(grads, loss)

    return wrapped


def test_healthy_run_is_not_stopped():
    from test_distill import setup, small

    d = setup(small(iterations=25, lr_img=30.0, lr_txt=30.0, collapse_window=8, guard=True))
    # One fixed trajectory makes the losses of different iterations comparable.
    d.cfg.max_start_epoch = 1
    d.sampler.experts.n = 1
    d.sampler.experts.order = torch.zeros(1, dtype=torch.long)
    d.run(progress=False)
    assert d.iteration == 25 and all(math.isfinite(r["loss"]) for r in d.history)
