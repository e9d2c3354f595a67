"""``repblend_fast.ops._dispatch.values_readable``: the one answer to "may this code read the
tensor's values here?", used by every op's value checks and by the similarity generators."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, jvp, vmap

from repblend_fast.engine.similarity import LowRankSimilarity
from repblend_fast.ops import blend_pairs, contrastive_loss, trajectory_terms
from repblend_fast.ops._dispatch import values_readable


def test_plain_tensors_are_readable():
    assert values_readable(torch.tensor(1.0))
    assert values_readable(torch.ones(3, dtype=torch.long))
    assert values_readable(torch.ones(2).requires_grad_())


def test_vmap_batched_tensors_are_not_readable():
    seen = {}
    outer = torch.tensor(2.0)

    def f(x):
        seen["batched"] = values_readable(x)
        seen["captured"] = values_readable(outer)  # not batched: one value, readable
        return x * outer

    vmap(f)(torch.ones(3))
    assert seen == {"batched": False, "captured": True}


def test_grad_and_jvp_wrappers_are_peeled():
    seen = []

    def f(x):
        seen.append(values_readable(x))
        assert x.item() == 2.0  # what the helper promises: reading works here
        return x * x

    grad(f)(torch.tensor(2.0))
    jvp(f, (torch.tensor(2.0),), (torch.tensor(1.0),))
    assert seen == [True, True]


def test_nested_transforms():
    seen = []
    # vmap over grad: the grad wrapper sits on a batched tensor
    vmap(grad(lambda x: (seen.append(values_readable(x)), x * x)[1].sum()))(torch.ones(3))
    # grad over vmap: inside, the mapped value is batched, the differentiated one is not
    y0 = torch.tensor(2.0)
    grad(
        lambda y: vmap(lambda z: (seen.append((values_readable(z), values_readable(y))), z * y)[1])(
            torch.ones(2)
        ).sum()
    )(y0)
    assert seen == [False, (False, True)]


def test_contrastive_checks_a_wrapped_logit_scale_under_grad():
    img, txt, tgt = torch.randn(3, 4), torch.randn(3, 4), torch.rand(3, 3)
    f = lambda s: contrastive_loss(img, txt, tgt, logit_scale=s, impl="reference")  # noqa: E731
    assert torch.isfinite(grad(f)(torch.tensor(2.0)))
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        grad(f)(torch.tensor(float("nan")))
    # under vmap the value is not read: NaN propagates per sample instead
    out = vmap(f)(torch.tensor([2.0, float("nan")]))
    assert torch.isfinite(out[0]) and torch.isnan(out[1])


def test_blend_and_trajectory_checks_follow_the_helper():
    img, txt, perm = torch.randn(4, 3), torch.randn(4, 2), torch.randperm(4)
    f = lambda lm: blend_pairs(img, txt, perm, lm, impl="reference")[0].sum()  # noqa: E731
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\]"):
        grad(f)(torch.tensor(1.5))
    vmap(f)(torch.tensor([0.5, 1.5]))  # not readable under vmap: no check, no error
    a, t = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="lr must be finite"):
        grad(lambda lr: trajectory_terms(a, t, t, lr, impl="reference").num * lr)(
            torch.tensor(float("inf"))
        )


def test_similarity_range_check_runs_on_grad_wrapped_indices():
    sim = LowRankSimilarity(5, 2, 1.0, generator=torch.Generator().manual_seed(0))
    params = {k: v.detach() for k, v in sim.params().items()}

    def f(p, shift):
        idx = (p["a"][:2] * 0 + shift).long()  # a long tensor wrapped by grad
        return sim.block(idx, p).sum()

    assert torch.isfinite(grad(f)(params, 1.0)["a"]).all()
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\)"):
        grad(f)(params, 7.0)
