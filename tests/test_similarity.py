"""Similarity generators (docs/algorithm.md §6): identity at init, batch blocks, scatter-add
gradients."""

from __future__ import annotations

import pytest
import torch

from repblend_fast.engine.similarity import (
    FullSimilarity,
    LowRankSimilarity,
    make_similarity,
    similarity_from_state,
)


def _randomise(sim, gen):
    """Move the parameters away from their (structured) init so every term is exercised."""
    with torch.no_grad():
        for v in sim.params().values():
            v.copy_(torch.randn(v.shape, generator=gen, dtype=v.dtype))
    return sim


@pytest.mark.parametrize("kind", ["lowrank", "full"])
def test_identity_at_init(kind, gen):
    sim = make_similarity(kind, 7, rank=3, alpha=2.0, generator=gen)
    assert torch.equal(sim.full(), torch.eye(7))
    idx = torch.tensor([4, 0, 6])
    assert torch.equal(sim.block(idx), torch.eye(3))
    assert all(
        p.is_leaf and p.requires_grad and p.dtype == torch.float32 for p in sim.params().values()
    )


def test_lowrank_init_and_params(gen):
    sim = LowRankSimilarity(9, 4, 0.5, generator=gen)
    p = sim.params()
    assert set(p) == {"a", "L", "R"}
    assert p["a"].shape == (9,) and p["L"].shape == (9, 4) and p["R"].shape == (9, 4)
    assert torch.equal(p["a"], torch.ones(9)) and torch.equal(p["R"], torch.zeros(9, 4))
    again = LowRankSimilarity(9, 4, 0.5, generator=torch.Generator().manual_seed(1234))
    assert torch.equal(p["L"], again.L)  # drawn from the given generator
    assert p["L"].std() > 0.3


@pytest.mark.parametrize("kind", ["lowrank", "full"])
def test_block_equals_full_slice(kind, gen):
    sim = _randomise(make_similarity(kind, 11, rank=3, alpha=1.5, generator=gen), gen)
    full = sim.full()
    idx = torch.randperm(11, generator=gen)[:5]
    torch.testing.assert_close(sim.block(idx), full[idx][:, idx], atol=1e-6, rtol=1e-6)
    batched = torch.stack([torch.randperm(11, generator=gen)[:5] for _ in range(3)])
    blocks = sim.block(batched)
    assert blocks.shape == (3, 5, 5)
    for k in range(3):
        torch.testing.assert_close(blocks[k], full[batched[k]][:, batched[k]], atol=1e-6, rtol=1e-6)
    # B = 1 edge case.
    one = torch.tensor([7])
    torch.testing.assert_close(sim.block(one), full[7:8, 7:8])


def test_lowrank_full_formula(gen):
    sim = _randomise(LowRankSimilarity(6, 2, 3.0, generator=gen), gen)
    a, L, R = (t.detach().double() for t in (sim.a, sim.L, sim.R))
    want = torch.diag(a) + (3.0 / 2) * L @ R.T
    torch.testing.assert_close(sim.full().double(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["lowrank", "full"])
def test_gradients_scatter_into_rows(kind, gen):
    n = 10
    sim = _randomise(make_similarity(kind, n, rank=3, alpha=0.7, generator=gen), gen)
    idx = torch.tensor([8, 2, 5, 0])
    up = torch.randn(4, 4, generator=gen)
    grads = torch.autograd.grad((sim.block(idx) * up).sum(), list(sim.params().values()))

    # Float64 brute force: the block of the full matrix built from float64 copies.
    p64 = {k: v.detach().double().requires_grad_(True) for k, v in sim.params().items()}
    full = sim.full(p64)
    want = torch.autograd.grad((full[idx][:, idx] * up.double()).sum(), list(p64.values()))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)

    untouched = torch.ones(n, dtype=torch.bool)
    untouched[idx] = False
    if kind == "lowrank":
        for g in grads:
            assert torch.count_nonzero(g[untouched]) == 0
            assert torch.count_nonzero(g[idx]) > 0
    else:
        (g,) = grads
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask[idx.unsqueeze(-1), idx.unsqueeze(0)] = True
        assert torch.count_nonzero(g[~mask]) == 0
        torch.testing.assert_close(g[idx][:, idx], up)


def test_batched_gradients_accumulate(gen):
    """Two blocks sharing rows: the gradient is the sum of both scatter-adds."""
    sim = _randomise(LowRankSimilarity(8, 2, 1.0, generator=gen), gen)
    idx = torch.tensor([[0, 3, 5], [5, 1, 0]])
    up = torch.randn(2, 3, 3, generator=gen)
    g_batched = torch.autograd.grad((sim.block(idx) * up).sum(), [sim.L, sim.R, sim.a])
    g_sep = [torch.zeros_like(t) for t in (sim.L, sim.R, sim.a)]
    for k in range(2):
        gk = torch.autograd.grad((sim.block(idx[k]) * up[k]).sum(), [sim.L, sim.R, sim.a])
        g_sep = [a + b for a, b in zip(g_sep, gk)]
    for a, b in zip(g_batched, g_sep):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_under_torch_func(gen):
    sim = _randomise(LowRankSimilarity(8, 2, 1.0, generator=gen), gen)
    idx = torch.tensor([1, 4, 6])
    params = {k: v.detach() for k, v in sim.params().items()}
    g = torch.func.grad(lambda p: sim.block(idx, p).pow(2).sum())(params)
    want = torch.autograd.grad(sim.block(idx).pow(2).sum(), [sim.a, sim.L, sim.R])
    for k, w in zip(["a", "L", "R"], want):
        torch.testing.assert_close(g[k], w)
    # vmap over a leading batch of index sets.
    many = torch.tensor([[1, 4, 6], [0, 2, 7]])
    out = torch.vmap(lambda i: sim.block(i, params))(many)
    torch.testing.assert_close(out, sim.block(many).detach())


@pytest.mark.parametrize("kind", ["lowrank", "full"])
def test_bad_indices(kind, gen):
    sim = make_similarity(kind, 5, rank=2, alpha=1.0, generator=gen)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        sim.block(torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        sim.block(torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="int64"):
        sim.block(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="int64"):
        sim.block(torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[K, B\]"):
        sim.block(torch.zeros(2, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one"):
        sim.block(torch.zeros(0, dtype=torch.long))
    with pytest.raises(TypeError):
        sim.block([0, 1])
    with pytest.raises(ValueError, match="lowrank"):
        make_similarity("sparse", 5)


@pytest.mark.parametrize("kind", ["lowrank", "full"])
def test_state_roundtrip_safetensors(kind, gen, tmp_path):
    from repblend_fast.io import atomic_save_safetensors, load_safetensors, safetensors_metadata

    sim = _randomise(make_similarity(kind, 6, rank=2, alpha=0.3, generator=gen), gen)
    path = tmp_path / "sim.safetensors"
    atomic_save_safetensors(sim.state_dict(), path, metadata=sim.metadata())
    meta = safetensors_metadata(path)
    assert meta["kind"] == kind and meta["n"] == "6"
    back = similarity_from_state(meta, load_safetensors(path))
    assert type(back) is type(sim)
    for k, v in sim.params().items():
        assert torch.equal(back.params()[k], v.detach())
    torch.testing.assert_close(back.full(), sim.full().detach())
    # In-place load keeps the leaves (an optimiser holding them stays valid).
    fresh = make_similarity(kind, 6, rank=2, alpha=0.3, generator=gen)
    leaves = dict(fresh.params())
    fresh.load_state_dict(sim.state_dict())
    assert all(fresh.params()[k] is leaves[k] for k in leaves)
    with pytest.raises(ValueError, match="shape"):
        make_similarity(kind, 7, rank=2, alpha=0.3).load_state_dict(sim.state_dict())
    with pytest.raises(ValueError, match="exactly"):
        fresh.load_state_dict({"x": torch.zeros(1)})


def test_full_similarity_is_leaf_matrix():
    sim = FullSimilarity(4)
    assert sim.full() is sim.S
    assert sim.config() == {"kind": "full", "n": 4}
