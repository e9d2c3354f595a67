"""The real-caption datasets: caption cleaning (fixed strings, always run), the Open Clip Art and
union loaders on stand-in folders in the packages' layout (always run), and all four on the
installed Debian packages (skipped, with the reason, where they are not installed)."""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from repblend_fast.data import get_dataset
from repblend_fast.data.captions import clean_caption, clean_title, is_placeholder, sentence_like
from repblend_fast.data.embedded import (
    OPENCLIPART_DIR,
    OPENCLIPART_MAX_SHARED,
    TUXPAINT_DIR,
    load_openclipart,
    load_real,
    openclipart_candidates,
    openclipart_metadata,
)

ROOT = Path(__file__).resolve().parents[1]
HAVE_TUXPAINT = TUXPAINT_DIR.is_dir()
HAVE_OPENCLIPART = (OPENCLIPART_DIR / "png").is_dir() and (OPENCLIPART_DIR / "svg").is_dir()
NEEDS_TUXPAINT = pytest.mark.skipif(
    not HAVE_TUXPAINT,
    reason="tuxpaint-stamps-default not installed (bash .ci/install_datasets.sh as root)",
)
NEEDS_OPENCLIPART = pytest.mark.skipif(
    not HAVE_OPENCLIPART,
    reason="openclipart-png / openclipart-svg not installed (bash .ci/install_datasets.sh as root)",
)


# ---------------------------------------------------------------------- caption cleaning
@pytest.mark.parametrize(
    "raw, clean",
    [
        ("<p>A red <b>apple</b>.</p>  Public domain.", "A red apple."),
        ("Croissant (B &amp;amp; W)", "Croissant (B & W)"),
        ("  lots   of\tspace\n here ", "lots of space here"),
        ("Cartoon of a happy woman.\n\nReleased under CC0.", "Cartoon of a happy woman."),
        ("a map of rivers, enjoy it! See http://x.org/a", "a map of rivers, enjoy it!"),
        ("Flag (see http://example.com)", "Flag"),
        ("Flag (from Wikipedia www.x.org) of Chad", "Flag (from Wikipedia) of Chad"),
        ("A boat. Drawn by me@example.org", "A boat. Drawn by"),
        ("A stop sign. Copyright 2005 someone.", "A stop sign."),
        ("Bandera.\nCity flag of Gijon.", "Bandera. City flag of Gijon."),
        # nothing caption-like left
        ("jean.victor.balin@gmail.com", ""),
        ("EPS converted from  http://aiga.org", ""),
        ("Part of Hotel Icons Collection", ""),
        ("Created with The Inkscape", ""),
        ("HASH(0x85a0ae8)", ""),
        ("Untitled", ""),
        ("drawing", ""),
        (":)", ""),
        ("", ""),
        (None, ""),
    ],
)
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("Clipart by Nicu Buculei - book_01", "book"),
        ("tux_01", "tux"),
        ("arrow08_4", "arrow"),
        ("BlueMan#103", "BlueMan"),
        ("kallisti-grenade", "kallisti grenade"),
        ("Water Tower", "Water Tower"),
        ("United Kingdom - Wales", "United Kingdom - Wales"),
        ("LED Triangular 1 (Blue)", "LED Triangular 1 (Blue)"),
        ("Milk (B &amp; W)", "Milk (B & W)"),
        ("x1", ""),
        ("Untitled", ""),
    ],
)
def test_clean_title(raw, clean):
    assert clean_title(raw) == clean


def test_sentence_like_and_placeholders():
    assert sentence_like("Apple with a bite taken out.") == "Apple with a bite taken out."
    assert sentence_like("A ladybug") == ""  # two words: a label, not a sentence
    long_first = " ".join(["word"] * 40) + ". Short."
    assert sentence_like(long_first) == ""
    assert sentence_like("Short one here. " + " ".join(["word"] * 40)) == "Short one here."
    assert sentence_like("") == ""
    assert is_placeholder("Untitled Document") and is_placeholder("ab") and is_placeholder("")
    assert not is_placeholder("cat")


# ------------------------------------------------------------------ SVG metadata
def _svg(title="", desc="", creator="", work=True) -> bytes:
    meta = (
        f"<cc:Work><dc:title>{title}</dc:title><dc:description>{desc}</dc:description>"
        f"<dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>"
        "<dc:publisher><cc:Agent><dc:title>Open Clip Art Library</dc:title></cc:Agent>"
        "</dc:publisher></cc:Work>"
        if work
        else ""
    )
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:cc="http://web.resource.org/cc/" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f"<metadata><rdf:RDF>{meta}</rdf:RDF></metadata><rect/></svg>"
    ).encode()


def test_openclipart_metadata_and_candidates():
    data = _svg("Apple_01", "An apple with a worm. Public domain.", "Jane Doe")
    assert openclipart_metadata(data) == (
        "Apple_01",
        "An apple with a worm. Public domain.",
        "Jane Doe",
    )
    assert openclipart_metadata(_svg(work=False)) == ("", "", "")
    assert openclipart_metadata(b"<svg><unclosed></svg>") == ("", "", "")
    title, desc, who = openclipart_metadata(data)
    # a sentence-like description first, then the title, then a short description
    assert openclipart_candidates(title, desc, who) == ["An apple with a worm.", "Apple"]
    assert openclipart_candidates("Pear", "Green pear", "") == ["Pear", "Green pear"]
    # a title that is the author's name is no caption
    assert openclipart_candidates("Jane Doe", "", "Jane Doe") == []
    assert openclipart_candidates("Untitled", "HASH(0x8a)", "") == []


def _png(path: Path, color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), color).save(path)


def _clipart(base: Path) -> Path:
    """A stand-in /usr/share/openclipart: png/ and svg/ trees at the same relative paths."""
    items = [
        # (relative stem, colour, title, description, creator)
        ("animals/apple_01", (200, 0, 0), "apple_01", "An apple with a worm.", "Ann"),
        ("animals/frog_02", (0, 200, 0), "Frog", "", "Bo"),
        ("animals/birds/heron", (0, 0, 200), "heron", "A great blue heron.", "Cy"),
        ("birds_copy/heron", (0, 0, 200), "heron", "A great blue heron.", "Cy"),  # same picture
        ("people/dee", (9, 9, 9), "Dee Smith", "", "Dee Smith"),  # title = author
        ("misc/nothing", (50, 50, 50), "Untitled", "jean@example.com", "Ed"),
        ("misc/orphan", (60, 60, 60), "Orphan", "", ""),  # PNG without an SVG
    ]
    # a collection label on more pictures than OPENCLIPART_MAX_SHARED: never a caption
    for k in range(OPENCLIPART_MAX_SHARED + 1):
        items.append((f"icons/icon{k}", (k, 100, 100), "Flat Icon Set", "", "Fa"))
    items.append(("icons/icon_named", (1, 2, 3), "Flat Icon Set", "Floppy disk", "Fa"))
    for stem, color, title, desc, who in items:
        _png(base / "png" / f"{stem}.png", color)
        if stem != "misc/orphan":
            svg = base / "svg" / f"{stem}.svg"
            svg.parent.mkdir(parents=True, exist_ok=True)
            svg.write_bytes(_svg(title, desc, who))
    return base


def test_openclipart_layout(tmp_path):
    base = _clipart(tmp_path / "oc")
    ds = load_openclipart("all", root=base)
    pairs = dict(zip(ds.images, ds.captions))
    assert pairs == {
        "png/animals/apple_01.png": "An apple with a worm.",
        "png/animals/frog_02.png": "Frog",
        "png/animals/birds/heron.png": "A great blue heron.",  # the deeper copy is kept
        "png/icons/icon_named.png": "Floppy disk",  # its title is a collection label
    }
    assert ds.images == sorted(ds.images)  # deterministic order
    for img in ds.images:  # every image has its SVG at the same relative path
        assert (base / "svg" / img[len("png/") :]).with_suffix(".svg").is_file()
    assert ds.meta["png_without_svg"] == 1 and ds.meta["captions_from_description"] == 3
    only = load_openclipart("all", root=base, captions="description")
    assert sorted(only.captions) == ["A great blue heron.", "An apple with a worm."]
    tr, te = (load_openclipart(s, n_test=1, root=base) for s in ("train", "test"))
    assert te.num_captions == 1 and tr.num_captions == 3
    assert not set(tr.captions) & set(te.captions)
    assert te.captions == load_openclipart("test", n_test=1, root=base).captions
    with pytest.raises(ValueError, match="captions must be"):
        load_openclipart(root=base, captions="title")
    png_only = tmp_path / "png_only"
    _png(png_only / "png" / "a.png", (1, 1, 1))
    with pytest.raises(FileNotFoundError, match="apt-get install openclipart-png openclipart-svg"):
        load_openclipart(root=png_only)


def test_real_union_layout(tmp_path):
    base = _clipart(tmp_path / "share" / "openclipart")
    stamps = tmp_path / "share" / "tuxpaint" / "stamps"
    for k, (name, line) in enumerate([("frog", "A frog."), ("cow", "A cow.")]):
        _png(stamps / "animals" / f"{name}.png", (k, 0, 0))
        (stamps / "animals" / f"{name}.txt").write_text(line + "\n")
    _png(stamps / "symbols" / "alphabets" / "a.png", (0, 0, 9))
    (stamps / "symbols" / "alphabets" / "a.txt").write_text("The letter A.\n")
    ds = load_real("all", tuxpaint_root=stamps, openclipart_root=base)
    assert ds.num_captions == 2 + 4 and ds.root == (tmp_path / "share").resolve()
    assert ds.images[:2] == ["tuxpaint/stamps/animals/cow.png", "tuxpaint/stamps/animals/frog.png"]
    assert ds.captions[:2] == ["A cow.", "A frog."]
    assert all(ds.image_path(i).is_file() for i in range(ds.num_images))
    assert ds.meta["tuxpaint_pairs"] == 2 and ds.meta["openclipart_pairs"] == 4
    with_letters = load_real("all", tuxpaint_root=stamps, openclipart_root=base, letters=True)
    assert "The letter A." in with_letters.captions
    tr, te = (
        load_real(s, n_test=2, tuxpaint_root=stamps, openclipart_root=base)
        for s in ("train", "test")
    )
    assert tr.num_captions + te.num_captions == 6 and not set(tr.captions) & set(te.captions)


def test_install_script_never_fails_without_apt(tmp_path):
    """Without dpkg/apt-get on PATH the script says so and exits 0 (the tests then skip)."""
    r = subprocess.run(
        ["/bin/bash", str(ROOT / ".ci" / "install_datasets.sh")],
        env={"PATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "apt-get not available" in r.stderr


# ------------------------------------------------------------------ installed packages
def _check_split(name: str, n_test: int, **kw):
    full = get_dataset(name, "all", **kw)
    tr, te = get_dataset(name, "train", **kw), get_dataset(name, "test", **kw)
    assert len(set(te.captions)) == n_test  # n_test caption groups held out
    assert tr.num_captions + te.num_captions == full.num_captions
    assert not set(tr.captions) & set(te.captions)  # split by caption
    assert not set(tr.images) & set(te.images)
    assert get_dataset(name, "test", **kw).captions == te.captions  # deterministic
    assert get_dataset(name, "test", seed=1, **kw).captions != te.captions
    assert tr.fingerprint() == get_dataset(name, "train", **kw).fingerprint()
    x = te.load_images(32, indices=[0, te.num_images - 1])
    assert x.shape == (2, 3, 32, 32) and (x.flatten(1).std(1) > 0.01).all()
    return full, tr, te


@NEEDS_TUXPAINT
def test_tuxpaint_installed_counts_and_split():
    full, tr, te = _check_split("tuxpaint", 100)
    # Debian 12 tuxpaint-stamps-default 2022.06.04: 627 PNG stamps with a sentence (785 with
    # the 158 letter stamps), 577 distinct sentences.
    assert 550 <= full.num_captions <= 750 and full.num_images == full.num_captions
    assert 500 <= len(set(full.captions)) <= full.num_captions
    assert not any("alphabets" in p for p in full.images)
    assert "A mandarin orange." in full.captions
    letters = get_dataset("tuxpaint", "all", letters=True)
    assert letters.num_captions - full.num_captions >= 100
    assert all(c.strip() == c and "  " not in c for c in full.captions)


@NEEDS_OPENCLIPART
def test_openclipart_installed_counts_pairing_and_cleaning():
    full, tr, te = _check_split("openclipart", 500)
    # Debian 12 openclipart-png/-svg 0.18: 8,121 PNGs, 6,900 distinct pictures, 2,663 captioned
    assert 2000 <= full.num_captions <= 3500
    assert full.meta["png_without_svg"] == 0
    assert full.meta["captions_from_description"] >= 400
    root = Path(full.root)
    for img in full.images[::97]:  # pairing: every PNG has its SVG at the same relative path
        assert img.startswith("png/") and (root / "svg" / img[4:]).with_suffix(".svg").is_file()
    for cap in full.captions:  # cleaned: no markup, URLs, e-mail, boilerplate, placeholders
        low = cap.lower()
        assert cap == " ".join(cap.split()) and cap
        assert not any(s in low for s in ("http", "www.", "<", "&amp;", "@", "hash(0x"))
        assert not any(s in low for s in ("public domain", "licen", "inkscape", "converted from"))
        assert not is_placeholder(cap)
    assert max(Counter(full.captions).values()) <= OPENCLIPART_MAX_SHARED
    desc = get_dataset("openclipart", "all", captions="description")
    assert 300 <= desc.num_captions < full.num_captions
    assert all(len(c.split()) >= 3 for c in desc.captions)


@NEEDS_TUXPAINT
@NEEDS_OPENCLIPART
def test_real_installed_union():
    tux = get_dataset("tuxpaint", "all")
    oc = get_dataset("openclipart", "all")
    full, tr, te = _check_split("real", 500)
    assert full.num_captions == tux.num_captions + oc.num_captions
    assert full.captions == tux.captions + oc.captions
    assert Path(full.root) == Path(os.path.commonpath([TUXPAINT_DIR, OPENCLIPART_DIR])).resolve()
    sent, _, _ = _check_split("real-sentences", 150)
    assert (
        sent.num_captions
        == tux.num_captions + get_dataset("openclipart", "all", captions="description").num_captions
    )
