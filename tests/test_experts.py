"""Expert training and the trajectory store (docs/algorithm.md §3)."""

from __future__ import annotations

import json

import pytest
import torch

from repblend_fast.experts import (
    FORMAT_VERSION,
    TrajectoryStore,
    expert_seed,
    train_experts_lors,
    train_experts_symmetric,
)
from repblend_fast.io import atomic_save_safetensors, load_safetensors
from repblend_fast.models.flat import FlatSpec, functional_forward
from repblend_fast.models.heads import HeadSpec, head_forward, init_head_flat
from repblend_fast.reference.contrastive import contrastive_loss

N_IMG, D_F, D_T, DIM = 40, 12, 10, 8


def _data(seed=0, views=1):
    """Paired toy features: two captions per image, texts a noisy linear map of the image."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(N_IMG, D_F, generator=g)
    cap2img = torch.arange(N_IMG).repeat_interleave(2)
    txt = img[cap2img] @ torch.randn(D_F, D_T, generator=g)
    txt = txt + 0.3 * torch.randn(txt.shape, generator=g)
    if views > 1:
        img = torch.stack([img + 0.05 * torch.randn(img.shape, generator=g) for _ in range(views)])
    return img, txt, cap2img


def _train(out, **kw):
    img, txt, c2i = kw.pop("data", None) or _data()
    args = dict(num_experts=2, epochs=2, dim=DIM, seed=7, batch_size=16, progress=False)
    args.update(kw)
    return train_experts_symmetric(img, txt, c2i, out_dir=out, **args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("experts")
    return _train(out, image_encoder="timm:x@a", text_encoder="hf:y@b", dataset_fingerprint="fp")


def _full_loss(store, expert, epoch):
    img, txt, c2i = _data()
    u = head_forward(store.snapshot(expert, epoch, "image"), img[c2i], HeadSpec(D_F, DIM))
    w = head_forward(store.snapshot(expert, epoch, "text"), txt, HeadSpec(D_T, DIM))
    return float(contrastive_loss(u, w, torch.eye(len(c2i)), logit_scale=1 / 0.07, loss="infonce"))


def test_files_and_manifest(trained):
    names = sorted(p.name for p in trained.iterdir())
    assert names == ["expert_000.safetensors", "expert_001.safetensors", "manifest.json"]
    man = json.loads((trained / "manifest.json").read_text())
    assert man["format_version"] == FORMAT_VERSION and man["method"] == "repblend"
    assert man["epochs"] == [0, 1, 2] and man["num_experts"] == 2
    assert man["numel"] == {"image": HeadSpec(D_F, DIM).numel, "text": HeadSpec(D_T, DIM).numel}
    assert man["modalities"]["image"]["names"] == ["W1", "b1", "W2", "b2", "gamma", "beta"]
    assert man["modalities"]["text"]["shapes"][0] == [DIM, D_T]
    assert (man["image_encoder"], man["text_encoder"]) == ("timm:x@a", "hf:y@b")
    assert (man["d_img"], man["d_txt"], man["dim"]) == (D_F, D_T, DIM)
    assert man["dataset_fingerprint"] == "fp" and man["loss"] == "infonce"
    assert man["train"]["lr_img"] == 0.1 and man["train"]["momentum"] == 0.0
    assert man["train"]["batch_size"] == 16 and man["train"]["dropout"] == 0.1
    assert abs(man["logit_scale"] - 1 / 0.07) < 1e-9
    assert man["expert_seeds"] == [expert_seed(7, 0), expert_seed(7, 1)]
    tensors = load_safetensors(trained / "expert_000.safetensors")
    assert sorted(tensors) == sorted(f"{m}/epoch_{t}" for m in ("image", "text") for t in range(3))
    assert all(t.dim() == 1 and t.dtype == torch.float32 for t in tensors.values())


def test_load_roundtrip_and_init(trained):
    store = TrajectoryStore.load(trained)
    assert len(store) == 2 and store.epochs == [0, 1, 2] and store.method == "repblend"
    for i in range(2):
        raw = load_safetensors(trained / f"expert_{i:03d}.safetensors")
        for m in ("image", "text"):
            for t in range(3):
                assert torch.equal(store.snapshot(i, t, m), raw[f"{m}/epoch_{t}"])
        # Epoch 0 is the seeded initialisation: image head, then text head, one generator.
        g = torch.Generator().manual_seed(expert_seed(7, i))
        assert torch.equal(store.snapshot(i, 0, "image"), init_head_flat(D_F, DIM, generator=g))
        assert torch.equal(store.snapshot(i, 0, "text"), init_head_flat(D_T, DIM, generator=g))
    assert store.stacked("image").shape == (2, 3, HeadSpec(D_F, DIM).numel)
    assert store.spec("text") == HeadSpec(D_T, DIM)
    # A subset of epochs, another dtype.
    sub = TrajectoryStore.load(trained, epochs=[2, 0], dtype=torch.float64)
    assert sub.epochs == [0, 2] and sub.snapshot(1, 2, "text").dtype == torch.float64
    assert torch.equal(sub.snapshot(1, 2, "text").float(), store.snapshot(1, 2, "text"))
    with pytest.raises(KeyError, match="not loaded"):
        sub.snapshot(0, 1, "image")
    with pytest.raises(ValueError, match="not stored"):
        TrajectoryStore.load(trained, epochs=[5])
    with pytest.raises(IndexError):
        store.snapshot(2, 0, "image")
    with pytest.raises(ValueError, match="modality"):
        store.snapshot(0, 0, "audio")


def test_training_lowers_loss_and_experts_differ(trained):
    store = TrajectoryStore.load(trained)
    for i in range(2):
        losses = [_full_loss(store, i, t) for t in store.epochs]
        assert losses[2] < losses[1] < losses[0], losses
        assert losses[2] < 0.5 * losses[0]
        for m in ("image", "text"):
            assert not torch.equal(store.snapshot(i, 0, m), store.snapshot(i, 1, m))
    for t in store.epochs:
        for m in ("image", "text"):
            assert not torch.equal(store.snapshot(0, t, m), store.snapshot(1, t, m))
    assert len(store.losses()) == 2 and len(store.losses()[0]) == 2


def test_same_seed_byte_identical(trained, tmp_path):
    again = _train(
        tmp_path / "again",
        image_encoder="timm:x@a",
        text_encoder="hf:y@b",
        dataset_fingerprint="fp",
    )
    for i in range(2):
        name = f"expert_{i:03d}.safetensors"
        assert (trained / name).read_bytes() == (again / name).read_bytes()
    other = _train(tmp_path / "other", seed=8, num_experts=1)
    a = load_safetensors(trained / "expert_000.safetensors")
    b = load_safetensors(other / "expert_000.safetensors")
    assert not torch.equal(a["image/epoch_0"], b["image/epoch_0"])


def test_keep_epochs_views_and_resume(tmp_path):
    data = _data(views=3)
    out = _train(tmp_path / "k", data=data, keep_epochs=[1, 2], num_experts=1)
    store = TrajectoryStore.load(out)
    assert store.epochs == [1, 2]
    assert store.manifest["train"]["num_views"] == 3
    # Stopping early (keep up to epoch 1) yields the same epoch-1 snapshot.
    short = _train(tmp_path / "s", data=data, keep_epochs=[1], num_experts=1)
    assert torch.equal(
        TrajectoryStore.load(short).snapshot(0, 1, "image"), store.snapshot(0, 1, "image")
    )
    assert TrajectoryStore.load(short).manifest["epochs_trained"] == 1
    # Resume: an identical rerun keeps the existing file untouched.
    f = out / "expert_000.safetensors"
    mtime = f.stat().st_mtime_ns
    _train(tmp_path / "k", data=data, keep_epochs=[1, 2], num_experts=1)
    assert f.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="keep_epochs"):
        _train(tmp_path / "bad", keep_epochs=[3])


def test_bad_inputs(tmp_path):
    img, txt, c2i = _data()
    with pytest.raises(ValueError, match="cap2img"):
        train_experts_symmetric(
            img, txt, c2i.int(), num_experts=1, epochs=1, dim=4, out_dir=tmp_path, progress=False
        )
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        train_experts_symmetric(
            img, txt, c2i + 1, num_experts=1, epochs=1, dim=4, out_dir=tmp_path, progress=False
        )
    with pytest.raises(ValueError, match="captions"):
        train_experts_symmetric(
            img, txt[:5], c2i, num_experts=1, epochs=1, dim=4, out_dir=tmp_path, progress=False
        )


# --- corrupted stores -----------------------------------------------------------------------


def _copy(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_rejects_missing_tensor(trained, tmp_path):
    d = _copy(trained, tmp_path / "c")
    t = load_safetensors(d / "expert_001.safetensors")
    del t["text/epoch_2"], t["image/epoch_2"]
    atomic_save_safetensors(t, d / "expert_001.safetensors")
    with pytest.raises(
        ValueError, match=r"expert_001.*missing \['image/epoch_2', 'text/epoch_2'\]"
    ):
        TrajectoryStore.load(d)


def test_rejects_unequal_snapshot_counts(trained, tmp_path):
    d = _copy(trained, tmp_path / "c")
    t = load_safetensors(d / "expert_000.safetensors")
    del t["text/epoch_1"]
    atomic_save_safetensors(t, d / "expert_000.safetensors")
    with pytest.raises(ValueError, match="3 image snapshots but 2 text snapshots"):
        TrajectoryStore.load(d)


def test_rejects_wrong_numel(trained, tmp_path):
    d = _copy(trained, tmp_path / "c")
    t = load_safetensors(d / "expert_000.safetensors")
    t["image/epoch_1"] = t["image/epoch_1"][:-1]
    atomic_save_safetensors(t, d / "expert_000.safetensors")
    with pytest.raises(ValueError, match=r"expert_000.*image/epoch_1.*numel 192"):
        TrajectoryStore.load(d)


def test_rejects_manifest_problems(trained, tmp_path):
    d = _copy(trained, tmp_path / "c")
    man = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**man, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99.*reads format_version 1"):
        TrajectoryStore.load(d)
    (d / "manifest.json").write_text(json.dumps({**man, "num_experts": 3}))
    with pytest.raises(ValueError, match="num_experts is 3 but 2 files"):
        TrajectoryStore.load(d)
    (d / "manifest.json").write_text(json.dumps(man))
    (d / "expert_001.safetensors").unlink()
    with pytest.raises(ValueError, match="expert_001.safetensors.*missing"):
        TrajectoryStore.load(d)
    (d / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        TrajectoryStore.load(d)


def test_check_compatible(trained):
    store = TrajectoryStore.load(trained)
    store.check_compatible(
        method="repblend",
        image_encoder="timm:x@a",
        text_encoder="hf:y@b",
        dim=DIM,
        d_img=D_F,
        d_txt=D_T,
        dataset_fingerprint="fp",
    )
    with pytest.raises(ValueError) as e:
        store.check_compatible(method="lors", image_encoder="timm:z@c", dim=16)
    msg = str(e.value)
    assert "method: store has 'repblend', run wants 'lors'" in msg
    assert "image_encoder" in msg and "dim: store has 8, run wants 16" in msg


# --- LoRS experts ---------------------------------------------------------------------------


def test_lors_experts_with_tiny_encoder(tmp_path):
    from repblend_fast.models.encoders import load_image_encoder

    enc, info = load_image_encoder("test_nfnet", random_init=True, seed=0)
    g = torch.Generator().manual_seed(3)
    n_img = 8
    images = torch.randn(n_img, 3, 16, 16, generator=g)
    c2i = torch.arange(n_img).repeat_interleave(2)
    txt = torch.randn(2 * n_img, D_T, generator=g)
    out = train_experts_lors(
        enc,
        images,
        txt,
        c2i,
        num_experts=2,
        epochs=2,
        out_dir=tmp_path / "lors",
        seed=1,
        batch_size=8,
        image_encoder=info.encoder_id,
        progress=False,
    )
    store = TrajectoryStore.load(out)
    spec = FlatSpec.from_module(enc, trainable_only=False)
    d_f = info.feature_dim
    assert store.method == "lors" and store.manifest["dim"] == d_f
    store.check_compatible(method="lors", image_encoder=info.encoder_id, d_img=d_f)
    assert store.numel("image") == spec.numel == sum(p.numel() for p in enc.parameters())
    assert store.numel("text") == HeadSpec(D_T, d_f).numel
    assert store.spec("image") == spec
    # Epoch 0 is the encoder itself; training moves it; experts differ (text head init, order).
    assert torch.equal(store.snapshot(0, 0, "image"), spec.flatten(enc))
    assert torch.equal(store.snapshot(1, 0, "image"), spec.flatten(enc))
    assert not torch.equal(store.snapshot(0, 2, "image"), store.snapshot(0, 0, "image"))
    assert not torch.equal(store.snapshot(0, 2, "image"), store.snapshot(1, 2, "image"))
    # The snapshot drives the encoder functionally.
    with torch.no_grad():
        f = functional_forward(enc, spec, store.snapshot(0, 2, "image"), images[:3])
    assert f.shape == (3, d_f) and torch.isfinite(f).all()
    # The encoder module itself is left untouched.
    assert all(not p.requires_grad for p in enc.parameters())
    assert torch.equal(spec.flatten(enc), store.snapshot(0, 0, "image"))
