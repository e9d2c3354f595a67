"""Karpathy-split annotation JSON (the BLIP/LAVIS format, docs/algorithm.md §13) for Flickr30K and
COCO.

* train: a JSON list of ``{"image": relative path, "caption": str, "image_id": str}``, one entry per
  caption (entries of one image share ``"image"``);
* val / test: a JSON list of ``{"image": relative path, "caption": [str, ...]}``, one entry per
  image.

Both shapes are accepted in any split (an entry's ``"caption"`` decides); images are grouped by
their path in first-appearance order, so ``cap2img`` maps every caption to its image.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from repblend_fast.data.base import PairDataset

# BLIP's pre_caption punctuation set (docs/algorithm.md §13).
_PUNCT = re.compile(r"[.!\"()*#:;~]")
_WS = re.compile(r"\s+")

# Default annotation file names when a folder is given (the BLIP release names).
ANNOTATION_FILES = {
    "flickr30k": "flickr30k_{split}.json",
    "coco": "coco_karpathy_{split}.json",
}


def normalize_caption(caption: str, max_words: int | None = 30) -> str:
    """docs/algorithm.md §13: lowercase; replace ``. ! " ( ) * # : ; ~`` with spaces; collapse
    whitespace;
    strip; keep at most ``max_words`` words (``None``: no limit)."""
    c = _WS.sub(" ", _PUNCT.sub(" ", caption.lower())).strip()
    if max_words is not None:
        words = c.split(" ")
        if len(words) > max_words:
            c = " ".join(words[:max_words])
    return c


def read_json(path: str | Path):
    """Parse a JSON file; malformed JSON raises ``ValueError`` naming the file, line and column."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"annotation file not found: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        msg = f"{p}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        raise ValueError(msg) from e


def load_karpathy(
    annotation_json: str | Path,
    image_root: str | Path,
    split: str,
    max_words: int | None = 30,
    check_images: bool = True,
    *,
    name: str = "karpathy",
) -> PairDataset:
    """Load one split of a Karpathy-format annotation file.

    Args:
        annotation_json: the split's JSON file.
        image_root: folder the entries' ``"image"`` paths are relative to.
        split: split name recorded on the result (``"train"``, ``"val"``, ``"test"``).
        max_words: caption word limit after normalisation (30; RepBlend's Flickr code uses 60).
        check_images: raise ``FileNotFoundError`` (file + entry index) for a missing image.

    Returns a :class:`PairDataset`: ``images`` relative paths under ``root = image_root``,
    ``captions`` normalised, ``cap2img`` ``[num_captions]``, ``image_ids`` when the file has them.

    Raises ``ValueError`` naming the file and entry index for a wrong entry type, a missing key or a
    caption that is empty after normalisation; malformed JSON names line and column.
    """
    path = Path(annotation_json)
    root = Path(image_root)
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    img_index: dict[str, int] = {}
    images: list[str] = []
    ids: list[str] = []
    has_ids = True
    captions: list[str] = []
    cap2img: list[int] = []
    for k, entry in enumerate(data):
        where = f"{path}: entry {k}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
        img = entry.get("image")
        if not isinstance(img, str) or not img:
            raise ValueError(f"{where}: 'image' must be a non-empty string, got {img!r}")
        if "caption" not in entry:
            raise ValueError(f"{where}: missing 'caption'")
        raw = entry["caption"]
        if isinstance(raw, str):
            raws = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(c, str) for c in raw):
            raws = raw
        else:
            raise ValueError(
                f"{where}: 'caption' must be a string (train) or a non-empty list of strings "
                f"(val/test), got {type(raw).__name__}"
            )
        i = img_index.get(img)
        if i is None:
            if check_images and not (root / img).is_file():
                raise FileNotFoundError(f"{where}: image file not found: {root / img}")
            i = img_index[img] = len(images)
            images.append(img)
            iid = entry.get("image_id")
            has_ids = has_ids and iid is not None
            ids.append(str(iid))
        for c_idx, c in enumerate(raws):
            norm = normalize_caption(c, max_words)
            if not norm:
                sub = f" caption {c_idx}" if isinstance(raw, list) else " caption"
                raise ValueError(f"{where}:{sub} is empty after normalisation: {c!r}")
            captions.append(norm)
            cap2img.append(i)
    return PairDataset(
        name=name,
        split=split,
        images=images,
        captions=captions,
        cap2img=torch.tensor(cap2img, dtype=torch.long),
        root=root,
        image_ids=ids if has_ids else None,
        meta={"annotation": str(path), "max_words": max_words, "format": "karpathy"},
    )


def _resolve(annotation: str | Path, name: str, split: str) -> Path:
    p = Path(annotation)
    return p / ANNOTATION_FILES[name].format(split=split) if p.is_dir() else p


def load_flickr30k(
    annotation: str | Path,
    image_root: str | Path,
    split: str = "train",
    max_words: int | None = 30,
    check_images: bool = True,
) -> PairDataset:
    """Flickr30K Karpathy split; ``annotation`` is the JSON file or a folder holding
    ``flickr30k_{split}.json``."""
    return load_karpathy(
        _resolve(annotation, "flickr30k", split),
        image_root,
        split,
        max_words,
        check_images,
        name="flickr30k",
    )


def load_coco(
    annotation: str | Path,
    image_root: str | Path,
    split: str = "train",
    max_words: int | None = 30,
    check_images: bool = True,
) -> PairDataset:
    """COCO Karpathy split; ``annotation`` is the JSON file or a folder holding
    ``coco_karpathy_{split}.json``."""
    return load_karpathy(
        _resolve(annotation, "coco", split),
        image_root,
        split,
        max_words,
        check_images,
        name="coco",
    )
