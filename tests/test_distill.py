"""The outer loop: determinism, bit-for-bit resume, NaN guard, config validation, all methods."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from repblend_fast.config import DistillConfig, preset
from repblend_fast.engine.distill import DistilledSet, Distiller, NonFiniteLossError
from repblend_fast.engine.sampling import BatchSampler, sample_beta
from repblend_fast.models.flat import FlatSpec
from repblend_fast.models.heads import init_head_flat

N, D_T, DIM = 12, 10, 8


def tiny_encoder(out_dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, out_dim), nn.Tanh())
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return enc


class DictStore:
    """A minimal in-memory trajectory store: ``snaps[e][modality][epoch]``."""

    def __init__(self, snaps, method="repblend", dim=DIM):
        self.snaps = snaps
        self.manifest = {"method": method, "dim": dim}
        self.epochs = list(range(len(snaps[0]["image"])))

    def __len__(self):
        return len(self.snaps)

    def snapshot(self, e, epoch, modality):
        return self.snaps[e][modality][epoch]


def make_store(img_numel_fn, experts=3, epochs=3, seed=0, method="repblend", enc=None):
    """Snapshots of heads (or encoder + text head) trained by plain SGD on random real pairs,
    so that trajectories point where the contrastive loss actually goes."""
    from repblend_fast.models.flat import functional_forward
    from repblend_fast.models.heads import HeadSpec, head_forward
    from repblend_fast.reference import contrastive_loss

    g = torch.Generator().manual_seed(seed)
    enc = enc if enc is not None else tiny_encoder()
    imgs = torch.randn(40, 3, 4, 4, generator=g)
    txts = torch.randn(40, D_T, generator=g)
    with torch.no_grad():
        feats = enc(imgs)
    dim_t = DIM if method == "repblend" else 6
    tspec = HeadSpec(D_T, dim_t)
    ispec = (
        HeadSpec(feats.shape[1], DIM) if method == "repblend" else FlatSpec.from_module(enc, False)
    )

    def img_emb(theta, i):
        if method == "repblend":
            return head_forward(theta, feats[i], ispec)
        return functional_forward(enc, ispec, theta, imgs[i])

    snaps = []
    for _ in range(experts):
        a = img_numel_fn(g).clone().requires_grad_()
        b = init_head_flat(D_T, dim_t, generator=g).requires_grad_()
        traj = {"image": [a.detach().clone()], "text": [b.detach().clone()]}
        for _ in range(epochs):
            for i in torch.randperm(40, generator=g).split(10):
                loss = contrastive_loss(
                    img_emb(a, i),
                    head_forward(b, txts[i], tspec),
                    torch.eye(len(i)),
                    logit_scale=1 / 0.07,
                    loss="infonce",
                )
                ga, gb = torch.autograd.grad(loss, (a, b))
                with torch.no_grad():
                    a -= 0.1 * ga
                    b -= 0.1 * gb
            traj["image"].append(a.detach().clone())
            traj["text"].append(b.detach().clone())
        snaps.append(traj)
    return DictStore(snaps, method=method)


def setup(cfg: DistillConfig, out_dir=None, store=None, seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    enc = tiny_encoder()
    if store is None:
        if cfg.method == "repblend":
            store = make_store(lambda g: init_head_flat(6, DIM, generator=g))
        else:
            spec = FlatSpec.from_module(enc, trainable_only=False)
            store = make_store(lambda g: spec.flatten(enc), method="lors", enc=enc)
    images = torch.randn(cfg.pairs, 3, 4, 4, generator=g)
    texts = torch.randn(cfg.pairs, D_T, generator=g)
    return Distiller(
        cfg, encoder=enc, store=store, init_images=images, init_texts=texts, out_dir=out_dir
    )


def small(**kw) -> DistillConfig:
    base = dict(
        pairs=N,
        batch_size=4,
        syn_steps=3,
        iterations=6,
        lr_img=10.0,
        lr_txt=10.0,
        lr_sim=1.0,
        sim_rank=2,
        sim_alpha=1.0,
        checkpoint_every=0,
        max_start_epoch=2,
        lr_lr=1e-4,
    )
    base.update(kw)
    return DistillConfig(**base)


def test_same_seed_gives_identical_files(tmp_path):
    cfg = small()
    setup(cfg, tmp_path / "a").run(progress=False)
    setup(cfg, tmp_path / "b").run(progress=False)
    a = (tmp_path / "a" / "distilled.safetensors").read_bytes()
    b = (tmp_path / "b" / "distilled.safetensors").read_bytes()
    assert a == b
    c = setup(small(seed=1), tmp_path / "c").run(progress=False)
    assert not torch.equal(
        c.images, DistilledSet.load(tmp_path / "a" / "distilled.safetensors").images
    )


@pytest.mark.parametrize("meta_grad", ["exact", "tesla"])
def test_resume_is_bit_for_bit(tmp_path, meta_grad):
    cfg = small(meta_grad=meta_grad, checkpoint_every=2, iterations=6)
    full = setup(cfg, tmp_path / "full").run(progress=False)
    part = setup(cfg.replace(iterations=4), tmp_path / "part")
    part.run(progress=False)
    # A crash after the last checkpoint leaves extra metric lines: resume must drop them.
    with open(tmp_path / "part" / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"iteration": 4, "loss": 123.0}) + "\n")
    resumed = setup(cfg, tmp_path / "part")
    resumed.load_checkpoint(tmp_path / "part" / "checkpoint.safetensors")
    assert resumed.iteration == 4
    out = resumed.run(progress=False)
    assert torch.equal(out.images, full.images)
    assert torch.equal(out.texts, full.texts)
    assert out.eta_img == full.eta_img and out.eta_txt == full.eta_txt
    for k in full.sim_params:
        assert torch.equal(out.sim_params[k], full.sim_params[k])
    a = (tmp_path / "full" / "distilled.safetensors").read_bytes()
    b = (tmp_path / "part" / "distilled.safetensors").read_bytes()
    assert a == b
    lines = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == list(range(6))


def test_resume_with_other_config_is_refused(tmp_path):
    d = setup(small(), tmp_path / "r")
    d.run(progress=False)
    # lr_img may change on resume (RESUMABLE_CHANGES); lr_init may not.
    other = setup(small(lr_init=0.2), tmp_path / "r2")
    with pytest.raises(ValueError, match="lr_init"):
        other.load_checkpoint(tmp_path / "r" / "checkpoint.safetensors")


def test_nan_guard_keeps_last_good_state_and_stops(tmp_path):
    store = make_store(lambda g: init_head_flat(6, DIM, generator=g))
    for traj in store.snaps:
        traj["image"] = [t.clone().fill_(float("nan")) for t in traj["image"]]
    d = setup(small(nan_patience=3, iterations=10), tmp_path / "nan", store=store)
    x0 = d.x.clone()
    with pytest.raises(NonFiniteLossError, match="3 consecutive"):
        d.run(progress=False)
    assert torch.equal(d.x, x0)
    assert (tmp_path / "nan" / "checkpoint.safetensors").exists()
    recs = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(r["skipped_non_finite"] for r in recs)


@pytest.mark.parametrize("method", ["repblend", "lors", "mtt-vl"])
def test_methods_run_and_lower_matching_loss(method):
    kw = dict(method=method, iterations=25, lr_img=30.0, lr_txt=30.0)
    if method != "repblend":
        kw["blend"] = False
    if method == "mtt-vl":
        kw.update(similarity="none", loss="infonce")
    d = setup(small(**kw))
    # A fixed trajectory makes the loss comparable across iterations.
    d.cfg.max_start_epoch = 1
    d.sampler.experts.n = 1
    d.sampler.experts.order = torch.zeros(1, dtype=torch.long)
    recs = [d.step() for _ in range(kw["iterations"])]
    # A loss that made the guard roll back the update before it measures a state that no longer
    # exists: compare the losses of the states the run kept.
    kept = [r for r in recs if not r.get("rolled_back") and not r.get("update_rejected")]
    first = sum(r["loss"] for r in kept[:3]) / 3
    last = sum(r["loss"] for r in kept[-3:]) / 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert last < first, (first, last)


def test_store_method_mismatch_is_a_clear_error():
    enc = tiny_encoder()
    spec = FlatSpec.from_module(enc, trainable_only=False)
    store = make_store(lambda g: spec.flatten(enc), method="lors", enc=enc)
    with pytest.raises(ValueError, match="buffer --method repblend"):
        setup(small(), store=store)


def test_store_without_needed_epochs_is_rejected():
    store = make_store(lambda g: init_head_flat(6, DIM, generator=g), epochs=1)
    with pytest.raises(ValueError, match=r"missing \[2\]"):
        setup(small(max_start_epoch=2), store=store)


def test_encoder_mismatch_is_rejected():
    store = make_store(lambda g: init_head_flat(7, DIM, generator=g), enc=tiny_encoder(out_dim=7))
    with pytest.raises(ValueError, match="another encoder"):
        setup(small(), store=store)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(method="nope"), "method"),
        (dict(batch_size=50), "batch_size"),
        (dict(meta_grad="reverse"), "meta_grad"),
        (dict(temperature=0.0), "temperature"),
        (dict(method="lors"), "blend"),
        (dict(method="mtt-vl", blend=False), "similarity"),
        (dict(lr_img=-1.0), "lr_img"),
    ],
)
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        small(**kw).validate()


def test_presets_match_spec_table():
    p = preset("flickr-500")
    assert (p.pairs, p.max_start_epoch, p.lr_img, p.lr_sim, p.sim_rank, p.sim_alpha) == (
        499,
        3,
        1000,
        100,
        20,
        0.01,
    )
    c = preset("coco-500")
    assert c.merge_loss and c.temperature == 0.1 and c.lr_img == 5000
    with pytest.raises(ValueError, match="unknown preset"):
        preset("flickr-1000")


def test_init_shape_errors():
    cfg = small()
    with pytest.raises(ValueError, match="init_images"):
        Distiller(
            cfg,
            encoder=tiny_encoder(),
            store=make_store(lambda g: init_head_flat(6, DIM, generator=g)),
            init_images=torch.randn(N - 1, 3, 4, 4),
            init_texts=torch.randn(N, D_T),
        )


def test_samplers_are_seeded_and_cover_the_set():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1, s2 = BatchSampler(10, 4, g1), BatchSampler(10, 4, g2)
    b1 = [s1.next() for _ in range(6)]
    b2 = [s2.next() for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(b1, b2))
    # Two chunks per permutation of 10 (the third would overflow): distinct indices per pair.
    assert len(set(torch.cat(b1[:2]).tolist())) == 8
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_beta(0.5, g) for _ in range(4000)])
    assert 0 <= draws.min() and draws.max() <= 1
    assert abs(draws.mean() - 0.5) < 0.03
    assert abs(draws.var() - 0.125) < 0.01  # Beta(a,a) variance 1/(4(2a+1))
    assert sample_beta(0.0, g) == 1.0


def test_several_trajectories_per_iteration_run_batched():
    d = setup(small(num_trajectories=3, iterations=2))
    rec = d.step()
    assert isinstance(rec["expert"], list) and len(rec["expert"]) == 3
    assert torch.isfinite(torch.tensor(rec["loss"]))
    lors = setup(small(method="lors", blend=False, num_trajectories=2, iterations=1))
    assert len(lors.step()["expert"]) == 2


@pytest.mark.parametrize("meta_grad", ["exact", "tesla"])
def test_unroll_dropout_draws_masks_and_stays_deterministic(meta_grad):
    cfg = small(unroll_dropout=True, meta_grad=meta_grad, iterations=2)
    a, b = setup(cfg), setup(cfg)
    plan = setup(cfg).sampler.draw()[0][2]
    assert plan.keep_img.shape == (cfg.syn_steps, cfg.batch_size, DIM)
    assert (plan.keep_img2 is not None) == (meta_grad == "tesla")
    vals = plan.keep_txt.unique()
    assert len(vals) == 2 and vals[0] == 0.0 and abs(float(vals[1]) - 1 / 0.9) < 1e-6
    ra, rb = a.step(), b.step()
    assert ra["loss"] == rb["loss"]


def test_asymmetric_ablation_uses_the_encoder_student_with_blending():
    enc = tiny_encoder()
    spec = FlatSpec.from_module(enc, trainable_only=False)
    store = make_store(lambda g: spec.flatten(enc), method="lors", enc=enc)
    cfg = small(symmetric=False, iterations=2)
    assert cfg.student == "encoder" and small().student == "heads"
    d = setup(cfg, store=store)
    assert d.unroller.s.method == "lors"
    plan = setup(cfg, store=store).sampler.draw()[0][2]
    assert bool((plan.lams < 1).any())  # blending stays on
    rec = d.step()
    assert torch.isfinite(torch.tensor(rec["loss"]))
    with pytest.raises(ValueError, match="symmetric=False"):
        setup(cfg)  # RepBlend (head) experts cannot drive the encoder student


def test_encoder_autocast_auto_is_off_on_cpu_and_validated():
    d = setup(small())
    assert d.cfg.encoder_autocast == "auto" and d.unroller.s.encoder_autocast is None
    assert setup(small(encoder_autocast="bf16")).unroller.s.encoder_autocast == torch.bfloat16
    with pytest.raises(ValueError, match="encoder_autocast"):
        small(encoder_autocast="fp8").validate()
