"""The step benchmark's authors-style baselines compute the same meta-gradients as the Unroller.

``repblend-authors`` == ``Unroller(method="repblend", meta_grad="tesla", share_encoder=True)`` and
``lors-authors`` == ``make_unroller_for_lors(meta_grad="tesla")``, on tiny float64 problems, so the
step benchmark compares implementations of one computation.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from repblend_fast.bench.baselines import (
    AuthorsSettings,
    LoRSAuthors,
    LoRSModel,
    LowRankSim,
    RepBlendAuthors,
    RepBlendModel,
    split_pieces,
)
from repblend_fast.engine.unroll import (
    StepPlan,
    Unroller,
    UnrollSettings,
    make_unroller_for_lors,
)
from repblend_fast.models.flat import FlatSpec
from repblend_fast.models.heads import HeadSpec, init_head_flat

DT = torch.float64
N, B, T = 9, 4, 3
D_T, DIM = 6, 5


class TinyConv(nn.Module):
    """A conv encoder small enough for float64 double backward in milliseconds."""

    def __init__(self, out: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, out)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).mean((-1, -2))
        return torch.tanh(self.fc(h))


def _problem(seed: int, d_feat: int, blend: bool):
    g = torch.Generator().manual_seed(seed)
    enc = TinyConv(d_feat).double()
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.4)
    x = torch.randn(N, 3, 5, 5, generator=g, dtype=DT)
    y = torch.randn(N, D_T, generator=g, dtype=DT)
    sim = LowRankSim(N, 2, 0.7, generator=g, dtype=DT)
    with torch.no_grad():
        sim.a.add_(0.1 * torch.randn(N, generator=g, dtype=DT))
        sim.R.copy_(0.3 * torch.randn(N, 2, generator=g, dtype=DT))
    batches = torch.stack([torch.randperm(N, generator=g)[:B] for _ in range(T)])
    lams = torch.rand(T, generator=g, dtype=DT) if blend else torch.ones(T, dtype=DT)
    perms = torch.stack([torch.randperm(B, generator=g) for _ in range(T)])
    return g, enc, x, y, sim, StepPlan(batches, lams, perms)


def _assert_same(got: dict, want: dict, keys):
    for k in keys:
        assert want[k] is not None and got[k] is not None, k
        assert want[k].abs().sum() > 0, f"gradient {k} is all zero: the test is vacuous"
        torch.testing.assert_close(got[k], want[k], rtol=1e-8, atol=1e-11, msg=f"gradient {k}")


KEYS = ["x", "y", "eta_img", "eta_txt", "sim.a", "sim.L", "sim.R"]


@pytest.mark.parametrize("merge", [False, True])
def test_repblend_authors_equals_unroller_tesla_shared(merge):
    g, enc, x, y, sim, plan = _problem(0, d_feat=7, blend=True)
    model = RepBlendModel(copy.deepcopy(enc), 7, D_T, DIM).double()
    th0 = (
        init_head_flat(7, DIM, generator=g, dtype=DT),
        init_head_flat(D_T, DIM, generator=g, dtype=DT),
    )
    th1 = tuple(t + 0.05 * torch.randn(t.shape, generator=g, dtype=DT) for t in th0)
    buffer = {
        "image": [split_pieces(model.image_head, t[0]) for t in (th0, th1)],
        "text": [split_pieces(model.text_head, t[1]) for t in (th0, th1)],
    }
    settings = AuthorsSettings(merge_loss=merge, syn_lr_init=0.07)
    base = RepBlendAuthors(model, x, y, copy.deepcopy(sim), buffer, settings)
    loss = base.meta_grads(plan)

    unroller = Unroller(
        UnrollSettings(method="repblend", meta_grad="tesla", share_encoder=True, merge_loss=merge),
        enc.requires_grad_(False),
        HeadSpec(7, DIM),
        HeadSpec(D_T, DIM),
        sim,
    )
    eta = torch.tensor(0.07, dtype=DT)
    params = {k: v.detach() for k, v in sim.params().items()}
    res = unroller.run(x, y, params, eta, eta.clone(), th0, th1, plan)
    torch.testing.assert_close(loss, res.loss, rtol=1e-10, atol=0)
    _assert_same(base.grads(), res.grads, KEYS)


def test_lors_authors_equals_unroller_for_lors_tesla():
    g, enc, x, y, sim, plan = _problem(1, d_feat=DIM, blend=False)
    model = LoRSModel(copy.deepcopy(enc), D_T, DIM).double()
    th0_img = FlatSpec.from_module(enc, trainable_only=False).flatten(enc)
    th0 = (th0_img, init_head_flat(D_T, DIM, generator=g, dtype=DT))
    th1 = tuple(t + 0.05 * torch.randn(t.shape, generator=g, dtype=DT) for t in th0)
    buffer = {
        "image": [split_pieces(model.image_encoder, t[0]) for t in (th0, th1)],
        "text": [split_pieces(model.text_head, t[1]) for t in (th0, th1)],
    }
    base = LoRSAuthors(model, x, y, copy.deepcopy(sim), buffer, AuthorsSettings(syn_lr_init=0.05))
    loss = base.meta_grads(plan)

    settings = UnrollSettings(method="lors", meta_grad="tesla")
    unroller = make_unroller_for_lors(settings, enc.requires_grad_(False), HeadSpec(D_T, DIM), sim)
    eta = torch.tensor(0.05, dtype=DT)
    params = {k: v.detach() for k, v in sim.params().items()}
    res = unroller.run(x, y, params, eta, eta.clone(), th0, th1, plan)
    torch.testing.assert_close(loss, res.loss, rtol=1e-10, atol=0)
    _assert_same(base.grads(), res.grads, KEYS)


def test_iteration_updates_every_group_and_rebuilds_the_student():
    g, enc, x, y, sim, plan = _problem(2, d_feat=7, blend=True)
    model = RepBlendModel(enc, 7, D_T, DIM).double()
    th0 = (
        init_head_flat(7, DIM, generator=g, dtype=DT),
        init_head_flat(D_T, DIM, generator=g, dtype=DT),
    )
    th1 = tuple(t + 0.05 * torch.randn(t.shape, generator=g, dtype=DT) for t in th0)
    buffer = {
        "image": [split_pieces(model.image_head, t[0]) for t in (th0, th1)],
        "text": [split_pieces(model.text_head, t[1]) for t in (th0, th1)],
    }
    base = RepBlendAuthors(model, x, y, sim, buffer)
    before = [t.detach().clone() for t in (base.image_syn, base.text_syn, base.syn_lr_img, sim.R)]
    head_before = model.image_head.fc1.weight.detach().clone()
    loss = base.iteration(plan)
    after = [base.image_syn, base.text_syn, base.syn_lr_img, sim.R]
    assert loss > 0
    for b, a in zip(before, after):
        assert not torch.equal(b, a.detach())
    # The template model is never trained: each iteration works on a fresh copy.
    torch.testing.assert_close(model.image_head.fc1.weight, head_before, rtol=0, atol=0)
