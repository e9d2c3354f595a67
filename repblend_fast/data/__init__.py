"""Datasets: annotation loaders (Karpathy JSON, generic JSONL/CSV), embedded offline datasets
(emoji, Tux Paint, Open Clip Art) and the on-disk feature cache.

``get_dataset(name, split, **kw)`` is the single entry point:

=============  ==============================================================================
name           keyword arguments
=============  ==============================================================================
emoji          ``n_test=300, seed=0``
tuxpaint       ``n_test=100, seed=0, root=None, letters=False``
openclipart    ``n_test=500, seed=0, root=None, captions="any"``
real           ``n_test=500, seed=0, captions="any"``: tuxpaint + openclipart
real-sentences ``n_test=150, seed=0``: tuxpaint + openclipart's sentence-like descriptions
flickr30k      ``annotation`` (file or folder), ``image_root``, ``max_words=30, check_images``
coco           same as flickr30k
generic        ``annotations``, ``image_root=None``, ``n_test=None, seed=0``, loader options
=============  ==============================================================================
"""

from __future__ import annotations

from typing import Any

from repblend_fast.data.base import (
    CLIP_MEAN_STD,
    IMAGENET_MEAN_STD,
    UNIT_MEAN_STD,
    PairDataset,
    split_pairs,
)
from repblend_fast.data.cache import cache_key, cached_features, default_cache_dir
from repblend_fast.data.embedded import (
    load_embedded_images,
    load_emoji,
    load_openclipart,
    load_real,
    load_real_sentences,
    load_tuxpaint,
)
from repblend_fast.data.generic import load_generic
from repblend_fast.data.karpathy import load_coco, load_flickr30k, load_karpathy, normalize_caption

DATASETS = (
    "emoji",
    "tuxpaint",
    "openclipart",
    "real",
    "real-sentences",
    "flickr30k",
    "coco",
    "generic",
)


def get_dataset(name: str, split: str = "train", **kw: Any) -> PairDataset:
    """Load split ``split`` of dataset ``name`` (one of :data:`DATASETS`); see the module table
    for each name's keyword arguments. ``generic`` with ``split="all"`` (or ``n_test=None``)
    returns every row; with ``n_test`` it returns the ``train``/``test`` side of
    :func:`split_pairs` (``group="image"`` unless ``group=`` is given)."""
    if name == "emoji":
        return load_emoji(split, **kw)
    if name == "tuxpaint":
        return load_tuxpaint(split, **kw)
    if name == "openclipart":
        return load_openclipart(split, **kw)
    if name == "real":
        return load_real(split, **kw)
    if name == "real-sentences":
        return load_real_sentences(split, **kw)
    if name in ("flickr30k", "coco"):
        for req in ("annotation", "image_root"):
            if req not in kw:
                raise ValueError(f"{name} needs {req}=... (local files; nothing is downloaded)")
        loader = load_flickr30k if name == "flickr30k" else load_coco
        return loader(kw.pop("annotation"), kw.pop("image_root"), split, **kw)
    if name == "generic":
        if "annotations" not in kw:
            raise ValueError("generic needs annotations=<pairs .jsonl/.csv>")
        n_test = kw.pop("n_test", None)
        seed = kw.pop("seed", 0)
        group = kw.pop("group", "image")
        ds = load_generic(kw.pop("annotations"), **kw)
        if n_test is None or split == "all":
            return ds
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        train, test = split_pairs(ds, n_test, seed, group=group)
        return train if split == "train" else test
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


__all__ = [
    "CLIP_MEAN_STD",
    "DATASETS",
    "IMAGENET_MEAN_STD",
    "UNIT_MEAN_STD",
    "PairDataset",
    "cache_key",
    "cached_features",
    "default_cache_dir",
    "get_dataset",
    "load_coco",
    "load_embedded_images",
    "load_emoji",
    "load_flickr30k",
    "load_generic",
    "load_karpathy",
    "load_openclipart",
    "load_real",
    "load_real_sentences",
    "load_tuxpaint",
    "normalize_caption",
    "split_pairs",
]
