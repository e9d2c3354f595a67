"""Evaluation protocol on tiny synthetic features (docs/algorithm.md §8)."""

from __future__ import annotations

import math

import pytest
import torch

from repblend_fast.coresets import herding_subset, kcenter_subset, random_subset
from repblend_fast.evaluate import (
    FeaturePairs,
    check_lr,
    evaluate_distilled,
    evaluate_full_data,
    evaluate_heads,
    train_on_pairs,
)

D_F, D_T, DIM = 20, 12, 24


def synthetic(n, gen, w, per=1, noise=0.1):
    """Learnable task: text feature = fixed linear map of the image feature + noise."""
    x = torch.randn(n, D_F, generator=gen)
    c2i = torch.arange(n).repeat_interleave(per)
    y = x[c2i] @ w / math.sqrt(D_F) + noise * torch.randn(c2i.numel(), D_T, generator=gen)
    return FeaturePairs(x, y, c2i)


@pytest.fixture
def task():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(D_F, D_T, generator=g)
    return synthetic(64, g, w), synthetic(40, g, w, per=2), synthetic(30, g, w)


def test_training_lowers_loss_and_beats_chance(task):
    train, test, _ = task
    res = train_on_pairs(
        train.img, train.txt, None, lr_img=0.1, lr_txt=0.1, dim=DIM, epochs=60, seed=0
    )
    assert len(res.losses) == 60 and not res.diverged
    assert sum(res.losses[-5:]) / 5 < 0.5 * res.losses[0]
    m = evaluate_heads(res.img_params, res.txt_params, res.img_spec, res.txt_spec, test)
    # Chance: TR@1 = 2/80 captions, IR@1 = 1/40 images (2.5 %).
    assert m["IR@1"] > 25 and m["TR@1"] > 25


def test_evaluate_distilled_report(task):
    train, test, val = task
    target = torch.eye(64) * 0.9 + 0.05
    rep = evaluate_distilled(
        train.img,
        train.txt,
        target,
        lr_img=torch.tensor(0.1),
        lr_txt=0.05,
        test=test,
        val=val,
        dim=DIM,
        num_eval=2,
        epochs=16,
        eval_every=5,
    )
    assert len(rep["per_seed"]) == 2 and [r["seed"] for r in rep["per_seed"]] == [0, 1]
    for part in ("best", "last", "val_selected"):
        assert set(rep[part]) == {"mean", "std"}
        assert set(rep[part]["mean"]) == set(rep[part]["std"]) >= {"TR@1", "IR@10", "mean"}
        assert all(s >= 0 for s in rep[part]["std"].values())
    for r in rep["per_seed"]:
        assert r["best_epoch"] in (0, 5, 10, 15) and r["last_epoch"] == 15
        assert (
            r["best"]["mean"] >= r["last"]["mean"]
            and r["best"]["mean"] >= r["val_selected"]["mean"]
        )
    assert rep["best"]["mean"]["mean"] > 20
    rep2 = evaluate_distilled(
        train.img,
        train.txt,
        target,
        lr_img=0.1,
        lr_txt=0.05,
        test=test,
        val=val,
        dim=DIM,
        seeds=[0, 1],
        epochs=16,
        eval_every=5,
    )
    assert rep2["per_seed"] == rep["per_seed"]  # deterministic in the seeds


def test_determinism_and_seed_sensitivity(task):
    train, _, _ = task
    kw = dict(lr_img=0.1, lr_txt=0.1, dim=DIM, epochs=5, batch_size=16)
    a = train_on_pairs(train.img, train.txt, seed=3, **kw)
    b = train_on_pairs(train.img, train.txt, seed=3, **kw)
    c = train_on_pairs(train.img, train.txt, seed=4, **kw)
    assert torch.equal(a.img_params, b.img_params) and torch.equal(a.txt_params, b.txt_params)
    assert a.losses == b.losses
    assert not torch.equal(a.img_params, c.img_params)


def test_lr_decay_and_sampling(task):
    train, _, _ = task
    lrs = []

    def spy(ep, pi, pt):
        lrs.append(ep)

    # 64 pairs, batch 16: reference sampling = 4 batches per epoch (ceil(N/B)), epoch sampling too.
    for sampling in ("reference", "epoch"):
        r = train_on_pairs(
            train.img,
            train.txt,
            lr_img=0.1,
            lr_txt=0.1,
            dim=DIM,
            epochs=3,
            batch_size=16,
            sampling=sampling,
            eval_fn=spy,
            eval_every=2,
        )
        assert len(r.losses) == 3
    assert lrs == [0, 2, 0, 2]
    with pytest.raises(ValueError, match="sampling"):
        train_on_pairs(train.img, train.txt, lr_img=0.1, lr_txt=0.1, dim=DIM, sampling="x")
    # Zero lr after the decay epoch is the same as decay_factor 0: parameters frozen from there on.
    kw = dict(
        lr_img=0.1,
        lr_txt=0.1,
        dim=DIM,
        epochs=4,
        decay_epoch=2,
        decay_factor=0.0,
        momentum=0.0,
        weight_decay=0.0,
    )
    p2 = train_on_pairs(train.img, train.txt, **{**kw, "epochs": 2})
    p4 = train_on_pairs(train.img, train.txt, **kw)
    assert torch.equal(p2.img_params, p4.img_params)


@pytest.mark.parametrize("bad", [-0.01, float("nan"), float("inf")])
def test_bad_learned_lr(task, bad):
    train, test, _ = task
    with pytest.raises(ValueError, match=r"learned txt learning rate is"):
        train_on_pairs(train.img, train.txt, lr_img=0.1, lr_txt=bad, dim=DIM)
    with pytest.raises(ValueError, match=r"learned img learning rate is"):
        evaluate_distilled(
            train.img, train.txt, lr_img=torch.tensor([bad]), lr_txt=0.1, test=test, dim=DIM
        )
    assert check_lr(torch.tensor(0.25), "img") == 0.25


def test_shape_errors(task):
    train, _, _ = task
    with pytest.raises(ValueError, match="target"):
        train_on_pairs(train.img, train.txt, torch.eye(3), lr_img=0.1, lr_txt=0.1, dim=DIM)
    with pytest.raises(ValueError, match="equal N"):
        train_on_pairs(train.img, train.txt[:5], lr_img=0.1, lr_txt=0.1, dim=DIM)


def test_divergence_is_flagged(task):
    train, _, _ = task
    r = train_on_pairs(train.img * 1e30, train.txt, lr_img=1e30, lr_txt=1e30, dim=DIM, epochs=6)
    assert r.diverged and len(r.losses) <= 6 and not math.isfinite(r.losses[-1])


def test_random_subset(task):
    _, test, _ = task  # 40 images, 2 captions each
    img, txt, caps = random_subset(test, 10, seed=1)
    assert img.shape == (10, D_F) and txt.shape == (10, D_T)
    assert len(set(test.cap2img[caps].tolist())) == 10
    assert torch.equal(img, test.img[test.cap2img[caps]]) and torch.equal(txt, test.txt[caps])
    img2, _, caps2 = random_subset(test, 10, seed=1)
    assert torch.equal(caps, caps2) and torch.equal(img, img2)
    _, _, caps3 = random_subset(test, 80, seed=0, distinct_images=False)
    assert sorted(caps3.tolist()) == list(range(80))
    with pytest.raises(ValueError):
        random_subset(test, 41, seed=0)


def test_full_data_and_subset_baselines(task):
    train, test, _ = task
    full = evaluate_full_data(train, test, dim=DIM, epochs=8, num_eval=2, batch_size=16)
    assert full["num_pairs"] == 64 and full["per_seed"][0]["last_epoch"] == 7
    img, txt, _ = random_subset(train, 8, seed=0)
    sub = evaluate_distilled(
        img,
        txt,
        lr_img=0.1,
        lr_txt=0.1,
        test=test,
        dim=DIM,
        num_eval=2,
        epochs=8,
        loss="infonce",
        eval_every=1,
    )
    assert full["last"]["mean"]["mean"] > sub["last"]["mean"]["mean"]


def test_kcenter_and_herding_select_distinct_images_by_their_criteria():
    g = torch.Generator().manual_seed(0)
    # Two tight clusters and one far outlier: k-center must take the outlier early, herding
    # must not (it matches the mean, which the outlier pulls away from).
    e1, e2 = torch.eye(6)[0], torch.eye(6)[1]
    img = torch.cat(
        [
            e1 + 0.01 * torch.randn(30, 6, generator=g),
            e2 + 0.01 * torch.randn(10, 6, generator=g),
            -(e1 + e2)[None],
        ]
    )
    txt = img[:, :4] * 2 + 0.01 * torch.randn(41, 4, generator=g)
    train = FeaturePairs(img, txt, torch.arange(41))
    ki, kt, kc = kcenter_subset(train, 3, seed=1)
    assert len(set(kc.tolist())) == 3 and 40 in kc.tolist()
    assert torch.equal(ki, img[kc]) and torch.equal(kt, txt[kc])
    hi, ht, hc = herding_subset(train, 10)
    assert len(set(hc.tolist())) == 10 and 40 not in hc.tolist()
    # Herding's running mean is closer to the data mean than a random choice of the same size.
    joint = torch.cat(
        [torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)], 1
    )
    err_h = (joint[hc].mean(0) - joint.mean(0)).norm()
    err_r = (joint[torch.randperm(41, generator=g)[:10]].mean(0) - joint.mean(0)).norm()
    assert err_h < err_r
    with pytest.raises(ValueError, match="n must be"):
        kcenter_subset(train, 0)
