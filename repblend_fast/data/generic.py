"""Generic format for users' own data (docs/algorithm.md §13): a folder of images plus a JSONL or
CSV file of
(image path, caption) rows. Several rows may share an image; images are grouped by path in
first-appearance order. Split with :func:`repblend_fast.data.base.split_pairs`.

* JSONL: one JSON object per line, ``{"image": "relative/path.png", "caption": "a red car"}``; blank
  lines are skipped.
* CSV: a header row naming the columns (default ``image`` and ``caption``), then one row per pair.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from repblend_fast.data.base import PairDataset, split_pairs
from repblend_fast.data.karpathy import normalize_caption

__all__ = ["load_generic", "split_pairs"]


def _rows_jsonl(path: Path, image_key: str, caption_key: str):
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}: malformed JSON at line {lineno}, column {e.colno}: {e.msg}"
                ) from e
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            yield lineno, obj.get(image_key), obj.get(caption_key)


def _rows_csv(path: Path, image_key: str, caption_key: str, delimiter: str = ","):
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        fields = reader.fieldnames or []
        for key in (image_key, caption_key):
            if key not in fields:
                raise ValueError(f"{path}: line 1: CSV header {fields} lacks the column {key!r}")
        for row in reader:
            yield reader.line_num, row.get(image_key), row.get(caption_key)


def load_generic(
    annotations: str | Path,
    image_root: str | Path | None = None,
    *,
    name: str = "generic",
    split: str = "all",
    image_key: str = "image",
    caption_key: str = "caption",
    normalize: bool = True,
    max_words: int | None = 30,
    check_images: bool = True,
) -> PairDataset:
    """Load a JSONL (``.jsonl``/``.ndjson``) or CSV (``.csv``/``.tsv`` by extension) pair file.

    Args:
        annotations: the pair file.
        image_root: folder image paths are relative to (default: the pair file's folder).
        normalize: apply the docs/algorithm.md §13 caption normalisation (else only strip
        whitespace).
        max_words: word limit of the normalisation.
        check_images: raise ``FileNotFoundError`` (file + line) for a missing image.

    Returns a :class:`PairDataset` with one caption per row and ``cap2img`` ``[num_rows]``.
    Wrong value types or captions empty after normalisation raise ``ValueError`` with the line.
    """
    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"pair file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    ext = path.suffix.lower()
    if ext in (".jsonl", ".ndjson"):
        rows = _rows_jsonl(path, image_key, caption_key)
    elif ext in (".csv", ".tsv"):
        rows = _rows_csv(path, image_key, caption_key, "\t" if ext == ".tsv" else ",")
    else:
        raise ValueError(f"{path}: unknown pair-file type {ext!r}; use .jsonl or .csv")
    index: dict[str, int] = {}
    images: list[str] = []
    captions: list[str] = []
    cap2img: list[int] = []
    for lineno, img, cap in rows:
        where = f"{path}: line {lineno}"
        if not isinstance(img, str) or not img.strip():
            raise ValueError(f"{where}: {image_key!r} must be a non-empty string, got {img!r}")
        if not isinstance(cap, str):
            raise ValueError(f"{where}: {caption_key!r} must be a string, got {cap!r}")
        img = img.strip()
        c = normalize_caption(cap, max_words) if normalize else " ".join(cap.split())
        if not c:
            raise ValueError(f"{where}: caption is empty after normalisation: {cap!r}")
        i = index.get(img)
        if i is None:
            if check_images and not (root / img).is_file():
                raise FileNotFoundError(f"{where}: image file not found: {root / img}")
            i = index[img] = len(images)
            images.append(img)
        captions.append(c)
        cap2img.append(i)
    if not captions:
        raise ValueError(f"{path}: no (image, caption) rows")
    return PairDataset(
        name=name,
        split=split,
        images=images,
        captions=captions,
        cap2img=torch.tensor(cap2img, dtype=torch.long),
        root=root,
        meta={"annotation": str(path), "format": ext.lstrip(".")},
    )
