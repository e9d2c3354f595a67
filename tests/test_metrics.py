"""Retrieval metrics vs a brute-force per-row computation; collapse diagnostics on known inputs."""

from __future__ import annotations

import math

import pytest
import torch

from repblend_fast.metrics import (
    collapse_diagnostics,
    concentration_ratio,
    intra_modal_similarity,
    modality_gap,
    retrieval_metrics,
    retrieval_metrics_from_embeddings,
    retrieval_ranks,
    update_norm_ratio,
)


def brute_force(scores, cap2img, ks=(1, 5, 10)):
    """Per-row Python loops; rank = number of strictly greater scores."""
    n_img, n_cap = scores.shape
    s = scores.tolist()
    c2i = cap2img.tolist()
    tr_hits = {k: 0 for k in ks}
    for i in range(n_img):
        best = min(
            sum(1 for c2 in range(n_cap) if s[i][c2] > s[i][c]) for c in range(n_cap) if c2i[c] == i
        )
        for k in ks:
            tr_hits[k] += best < k
    ir_hits = {k: 0 for k in ks}
    for c in range(n_cap):
        r = sum(1 for i in range(n_img) if s[i][c] > s[c2i[c]][c])
        for k in ks:
            ir_hits[k] += r < k
    out = {f"TR@{k}": 100.0 * tr_hits[k] / n_img for k in ks}
    out.update({f"IR@{k}": 100.0 * ir_hits[k] / n_cap for k in ks})
    return out


@pytest.mark.parametrize("n_img, per", [(1, 1), (7, 1), (23, 5), (17, 3)])
@pytest.mark.parametrize("ties", [False, True])
def test_recall_matches_brute_force(gen, n_img, per, ties):
    c2i = torch.arange(n_img).repeat_interleave(per)
    c2i = c2i[torch.randperm(c2i.numel(), generator=gen)]  # captions not grouped by image
    scores = torch.randn(n_img, c2i.numel(), generator=gen)
    if ties:
        scores = (scores * 2).round() / 2  # many exact ties
    got = retrieval_metrics(scores, c2i, chunk_size=4)
    ref = brute_force(scores, c2i)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v), k
    assert got["mean"] == pytest.approx((got["TR_mean"] + got["IR_mean"]) / 2)


def test_mixed_caption_counts(gen):
    c2i = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 3, 3])  # 5, 6, 1, 2 captions
    scores = torch.randn(4, c2i.numel(), generator=gen)
    got = retrieval_metrics(scores, c2i)
    ref = brute_force(scores, c2i)
    assert all(got[k] == pytest.approx(v) for k, v in ref.items())


def test_perfect_and_tie_semantics():
    c2i = torch.tensor([0, 0, 1, 1, 2])
    perfect = torch.full((3, 5), -1.0)
    perfect[c2i, torch.arange(5)] = 1.0
    m = retrieval_metrics(perfect, c2i)
    assert m["TR@1"] == m["IR@1"] == m["mean"] == 100.0
    constant = torch.zeros(3, 5)  # all ties: nothing strictly greater -> rank 0
    assert retrieval_metrics(constant, c2i)["IR@1"] == 100.0
    nan = torch.full((3, 5), float("nan"))
    tr, ir = retrieval_ranks(nan, c2i)
    assert (tr == 5).all() and (ir == 3).all()


def test_image_counts_if_any_caption_in_top_k():
    # Image 0's first caption is ranked last, its second caption first: TR@1 counts it.
    scores = torch.tensor([[0.0, 0.9, 0.5], [0.8, 0.1, 0.9]])
    c2i = torch.tensor([0, 0, 1])
    tr, ir = retrieval_ranks(scores, c2i)
    assert tr.tolist() == [0, 0] and ir.tolist() == [1, 0, 0]


def test_from_embeddings_matches_scores(gen):
    u, v = torch.randn(9, 6, generator=gen), torch.randn(18, 6, generator=gen)
    c2i = torch.arange(9).repeat_interleave(2)
    s = torch.nn.functional.normalize(u, dim=-1) @ torch.nn.functional.normalize(v, dim=-1).T
    assert retrieval_metrics_from_embeddings(u, v, c2i) == retrieval_metrics(s, c2i)


def test_metric_argument_errors():
    with pytest.raises(ValueError, match="cap2img"):
        retrieval_metrics(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_metrics(torch.zeros(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        retrieval_metrics(torch.zeros(3), torch.tensor([0, 1, 2]))


def test_intra_modal_similarity_known():
    same = torch.tensor([[1.0, 2.0]]).repeat(5, 1)
    assert intra_modal_similarity(same) == pytest.approx(1.0)
    ortho = torch.eye(4) * 3
    assert intra_modal_similarity(ortho) == pytest.approx(0.0, abs=1e-12)
    pm = torch.tensor([[1.0, 0.0], [-2.0, 0.0]])
    assert intra_modal_similarity(pm) == pytest.approx(-1.0)


def test_intra_modal_similarity_vs_matrix(gen):
    z = torch.randn(13, 5, generator=gen)
    zn = torch.nn.functional.normalize(z.double(), dim=-1)
    c = zn @ zn.T
    ref = (c.sum() - c.diagonal().sum()) / (13 * 12)
    assert intra_modal_similarity(z) == pytest.approx(ref.item(), abs=1e-12)


def test_modality_gap_known():
    img = torch.tensor([[2.0, 0.0], [5.0, 0.0]])
    txt = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    assert modality_gap(img, txt) == pytest.approx(math.sqrt(2))
    assert modality_gap(img, img * 7) == pytest.approx(0.0)


def test_concentration_ratio_known(gen):
    # Two antipodal directions: all variance lies on one principal axis.
    line = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]] * 4)
    assert concentration_ratio(line) == pytest.approx(1.0)
    assert concentration_ratio(torch.ones(5, 3)) == 1.0  # collapsed to a point
    # The 2*D signed basis vectors: isotropic, every axis carries 1/D of the variance.
    d = 4
    iso = torch.cat([torch.eye(d), -torch.eye(d)])
    assert concentration_ratio(iso) == pytest.approx(1 / d)
    assert concentration_ratio(iso, k=2) == pytest.approx(2 / d)
    z = torch.randn(50, 8, generator=gen)
    assert 1 / 8 <= concentration_ratio(z) <= 1.0
    assert concentration_ratio(z, k=8) == pytest.approx(1.0)


def test_update_norm_ratio():
    t0 = torch.tensor([3.0, 4.0])
    assert update_norm_ratio(t0 + torch.tensor([0.0, 5.0]), t0) == pytest.approx(1.0)
    assert update_norm_ratio(t0, t0) == 0.0
    with pytest.raises(ValueError):
        update_norm_ratio(t0, torch.zeros(2))
    with pytest.raises(ValueError):
        update_norm_ratio(t0, torch.zeros(3))


def test_collapse_diagnostics_keys(gen):
    out = collapse_diagnostics(torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen))
    assert set(out) == {
        "intra_sim_img",
        "intra_sim_txt",
        "concentration_img",
        "concentration_txt",
        "modality_gap",
    }
