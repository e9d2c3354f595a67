"""Data loaders, image loading, splits and the feature cache."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from repblend_fast.data import (
    PairDataset,
    cache_key,
    cached_features,
    default_cache_dir,
    get_dataset,
    load_generic,
    load_karpathy,
    normalize_caption,
    split_pairs,
)
from repblend_fast.data.base import to_rgb
from repblend_fast.data.cache import cache_paths
from repblend_fast.data.embedded import TUXPAINT_DIR, load_openclipart, load_tuxpaint


def _png(path, color, size=(5, 7), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


@pytest.fixture
def karpathy(tmp_path):
    root = tmp_path / "images"
    for k, c in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        _png(root / f"img{k}.png", c)
    train = [
        {"image": "img0.png", "caption": "A Dog runs!", "image_id": "0"},
        {"image": "img0.png", "caption": "the (brown) dog: happy", "image_id": "0"},
        {"image": "img1.png", "caption": "a cat", "image_id": "1"},
    ]
    test = [
        {"image": "img1.png", "caption": ["a cat.", "cat on mat"]},
        {"image": "img2.png", "caption": ["blue   square", "a *blue* thing", "sky~"]},
    ]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(test))
    return tmp_path, root


def test_normalize_caption():
    assert normalize_caption('  A "Big" (red) Dog!!  runs.  ') == "a big red dog runs"
    assert normalize_caption("x*y#z:w;v~u") == "x y z w v u"
    assert normalize_caption("one two three four", max_words=2) == "one two"
    assert normalize_caption("tab\tand\nnewline") == "tab and newline"
    assert normalize_caption("...!!!") == ""


def test_karpathy_train_and_test(karpathy):
    d, root = karpathy
    tr = load_karpathy(d / "train.json", root, "train")
    assert tr.captions == ["a dog runs", "the brown dog happy", "a cat"]
    assert tr.cap2img.tolist() == [0, 0, 1] and tr.num_images == 2
    assert tr.image_ids == ["0", "1"]
    te = load_karpathy(d / "test.json", root, "test")
    assert te.num_images == 2 and te.num_captions == 5
    assert te.cap2img.tolist() == [0, 0, 1, 1, 1]
    assert te.captions[2:] == ["blue square", "a blue thing", "sky"]
    assert te.img2caps() == [[0, 1], [2, 3, 4]]
    x = te.load_images(8)
    assert x.shape == (2, 3, 8, 8)
    # img2 is pure blue: R=G=-1, B=+1 with the default [-1, 1] normalisation.
    assert torch.allclose(x[1, 2], torch.ones(8, 8)) and torch.allclose(x[1, 0], -torch.ones(8, 8))
    via = get_dataset("flickr30k", "test", annotation=d / "test.json", image_root=root)
    assert via.name == "flickr30k" and via.captions == te.captions


def test_karpathy_folder_defaults(karpathy):
    d, root = karpathy
    (d / "coco_karpathy_val.json").write_text((d / "test.json").read_text())
    ds = get_dataset("coco", "val", annotation=d, image_root=root)
    assert ds.name == "coco" and ds.split == "val" and ds.num_captions == 5


@pytest.mark.parametrize(
    "entries, exc, needle",
    [
        ([{"image": "img0.png", "caption": 3}], ValueError, "entry 0"),
        ([{"image": "img0.png", "caption": "ok"}, "oops"], ValueError, "entry 1"),
        ([{"caption": "x"}], ValueError, "'image'"),
        (
            [{"image": "img0.png", "caption": "fine"}, {"image": "img1.png", "caption": "..."}],
            ValueError,
            "entry 1",
        ),
        ([{"image": "img0.png", "caption": ["a", "!!"]}], ValueError, "caption 1"),
        ([{"image": "nope.png", "caption": "x"}], FileNotFoundError, "entry 0"),
        ({"image": "img0.png"}, ValueError, "list"),
    ],
)
def test_karpathy_errors(karpathy, entries, exc, needle):
    d, root = karpathy
    f = d / "bad.json"
    f.write_text(json.dumps(entries))
    with pytest.raises(exc) as ei:
        load_karpathy(f, root, "train")
    assert str(f) in str(ei.value) and needle in str(ei.value)


def test_karpathy_malformed_json(karpathy):
    d, root = karpathy
    f = d / "broken.json"
    f.write_text('[\n  {"image": "img0.png",\n   "caption": "x",,}\n]')
    with pytest.raises(ValueError, match=r"broken\.json: malformed JSON at line 3, column"):
        load_karpathy(f, root, "train")
    with pytest.raises(FileNotFoundError):
        load_karpathy(d / "missing.json", root, "train")


def test_generic_jsonl_csv(tmp_path):
    _png(tmp_path / "a.png", (10, 20, 30))
    _png(tmp_path / "sub" / "b.png", (0, 0, 0, 0), mode="RGBA")
    rows = [("a.png", "First caption."), ("sub/b.png", "Second"), ("a.png", "third one")]
    (tmp_path / "p.jsonl").write_text(
        "\n".join(json.dumps({"image": i, "caption": c}) for i, c in rows) + "\n\n"
    )
    (tmp_path / "p.csv").write_text("image,caption\n" + "".join(f'{i},"{c}"\n' for i, c in rows))
    for name in ("p.jsonl", "p.csv"):
        ds = load_generic(tmp_path / name)
        assert ds.captions == ["first caption", "second", "third one"]
        assert ds.cap2img.tolist() == [0, 1, 0]
    # Fully transparent RGBA composites on white -> +1 everywhere.
    assert torch.allclose(ds.load_image(1, 4), torch.ones(3, 4, 4))
    raw = load_generic(tmp_path / "p.jsonl", normalize=False)
    assert raw.captions[0] == "First caption."


def test_generic_errors(tmp_path):
    _png(tmp_path / "a.png", (1, 2, 3))
    f = tmp_path / "e.jsonl"
    f.write_text('{"image": "a.png", "caption": "ok"}\n{"image": "a.png", "caption": }\n')
    with pytest.raises(ValueError, match=r"e\.jsonl: malformed JSON at line 2"):
        load_generic(f)
    f.write_text('{"image": "a.png", "caption": "ok"}\n\n{"image": "zz.png", "caption": "x"}\n')
    with pytest.raises(FileNotFoundError, match=r"e\.jsonl: line 3"):
        load_generic(f)
    f.write_text('{"image": "a.png", "caption": 5}\n')
    with pytest.raises(ValueError, match="line 1"):
        load_generic(f)
    c = tmp_path / "e.csv"
    c.write_text("path,text\na.png,hi\n")
    with pytest.raises(ValueError, match="lacks the column 'image'"):
        load_generic(c)
    c.write_text("image,caption\na.png,hi\na.png,  ;;  \n")
    with pytest.raises(ValueError, match=r"e\.csv: line 3: caption is empty"):
        load_generic(c)


def _toy(n_img=12, dup=True):
    caps, c2i = [], []
    for i in range(n_img):
        for k in range(2):
            caps.append(f"thing {i % 5 if dup else i} view {k}")
            c2i.append(i)
    imgs = [np.full((4, 4, 3), 20 * i, dtype=np.uint8) for i in range(n_img)]
    return PairDataset("toy", "all", imgs, caps, torch.tensor(c2i))


def test_split_pairs_deterministic_and_disjoint():
    ds = _toy()
    tr, te = split_pairs(ds, 2, seed=3, group="caption")
    tr2, te2 = split_pairs(ds, 2, seed=3, group="caption")
    assert tr.captions == tr2.captions and te.captions == te2.captions
    assert not set(tr.captions) & set(te.captions)
    assert tr.num_captions + te.num_captions == ds.num_captions
    tri, tei = split_pairs(ds, 0.25, seed=0, group="image")
    assert tri.num_images + tei.num_images == 12 and tei.num_images == 3
    with pytest.raises(ValueError):
        split_pairs(ds, 0, seed=0)


def test_fingerprint(tmp_path, karpathy):
    d, root = karpathy
    a = load_karpathy(d / "test.json", root, "test")
    b = load_karpathy(d / "test.json", root, "test")
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 64
    b.captions[0] = "changed"
    assert a.fingerprint() != b.fingerprint()
    t1, t2 = _toy(), _toy()
    assert t1.fingerprint() == t2.fingerprint()
    t2.images[0] = t2.images[0] + 1
    assert t1.fingerprint() != t2.fingerprint()


def test_to_rgb_palette_and_gray():
    im = Image.new("P", (3, 3), 0)
    im.putpalette([255, 0, 0] * 256)
    im.info["transparency"] = 0
    assert np.asarray(to_rgb(im)).tolist()[0][0] == [255, 255, 255]
    assert to_rgb(np.zeros((3, 3), dtype=np.uint8)).mode == "RGB"


def test_emoji_dataset():
    full = get_dataset("emoji", "all")
    assert full.num_captions >= 1800 and full.num_images == full.num_captions
    assert len(set(full.captions)) == full.num_captions
    assert "grinning face" in full.captions
    tr, te = get_dataset("emoji", "train"), get_dataset("emoji", "test")
    assert te.num_captions == 300 and tr.num_captions == full.num_captions - 300
    assert not set(tr.captions) & set(te.captions)
    assert get_dataset("emoji", "test").captions == te.captions
    assert get_dataset("emoji", "test", seed=1).captions != te.captions
    assert tr.fingerprint() == get_dataset("emoji", "train").fingerprint()
    x = te.load_images(64, indices=range(16))
    assert x.shape == (16, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert (x.flatten(1).std(1) > 0.05).all()  # every image non-constant
    assert (x[0] - x[1]).abs().max() > 0.1


def test_embedded_missing_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install tuxpaint-stamps-default"):
        load_tuxpaint(root=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="apt-get install openclipart-png"):
        load_openclipart(root=tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset("imagenet")


def test_tuxpaint_layout(tmp_path):
    """A stand-in stamps folder in the package's layout (PNG + TXT; SVG-only stamps skipped)."""
    for k, (name, line) in enumerate(
        [
            ("frog", "A frog."),
            ("heron", "A great blue heron."),
            ("frog2", "A frog."),
            ("cat", "A cat.\nfr.utf8=Un chat."),
        ]
    ):
        _png(tmp_path / "animals" / f"{name}.png", (k * 50, 0, 0))
        (tmp_path / "animals" / f"{name}.txt").write_text(line + "\nde.utf8=x\n")
    (tmp_path / "animals" / "vector.txt").write_text("A vector stamp.\n")
    (tmp_path / "animals" / "vector.svg").write_text("<svg/>")
    ds = load_tuxpaint("all", root=tmp_path)
    assert sorted(ds.captions) == ["A cat.", "A frog.", "A frog.", "A great blue heron."]
    tr, te = (
        load_tuxpaint("train", n_test=1, root=tmp_path),
        load_tuxpaint("test", n_test=1, root=tmp_path),
    )
    assert not set(tr.captions) & set(te.captions)


@pytest.mark.skipif(not TUXPAINT_DIR.is_dir(), reason="tuxpaint-stamps-default not installed")
def test_tuxpaint_installed():
    ds = get_dataset("tuxpaint", "all")
    assert ds.num_captions > 500
    assert ds.load_images(32, indices=[0]).shape == (1, 3, 32, 32)


def test_cache_hit_miss_and_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(12.0).reshape(3, 4)

    key = {"dataset": "abc", "encoder": "enc@1", "size": 64, "mean": [0.5, 0.5, 0.5]}
    a = cached_features(key, compute, tmp_path)
    b = cached_features(dict(reversed(list(key.items()))), compute, tmp_path)
    assert len(calls) == 1 and torch.equal(a, b)
    t, s = cache_paths(key, tmp_path)
    assert t.is_file() and s.is_file() and json.loads(s.read_text())["shape"] == [3, 4]
    cached_features({**key, "size": 32}, compute, tmp_path)
    cached_features({**key, "encoder": "enc@2"}, compute, tmp_path)
    assert len(calls) == 3
    assert cache_key(key) != cache_key({**key, "mean": [0.5, 0.5, 0.4]})
    cached_features(key, compute, tmp_path, refresh=True)
    assert len(calls) == 4
    with pytest.raises(TypeError):
        cache_key({"x": object()})


def test_cache_corrupted_recomputes(tmp_path):
    key = {"dataset": "d", "encoder": "e"}
    ref = cached_features(key, lambda: torch.ones(2, 3), tmp_path)
    t, s = cache_paths(key, tmp_path)
    t.write_bytes(b"garbage" * 10)
    with pytest.warns(RuntimeWarning, match="unusable"):
        out = cached_features(key, lambda: torch.ones(2, 3), tmp_path)
    assert torch.equal(out, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(cached_features(key, lambda: 1 / 0, tmp_path), ref)  # repaired: hit
    s.unlink()
    with pytest.warns(RuntimeWarning, match="sidecar missing"):
        cached_features(key, lambda: torch.ones(2, 3), tmp_path)


def test_cache_env_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("REPBLEND_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    cached_features({"k": 1}, lambda: torch.zeros(1), None)
    assert any((tmp_path / "c" / "features").iterdir())
    monkeypatch.delenv("REPBLEND_CACHE_DIR")
    assert default_cache_dir().name == "repblend_fast"
