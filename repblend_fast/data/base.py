"""Common structure of an image–caption split (:class:`PairDataset`) and image loading.

A split holds ``num_images`` images and ``num_captions`` captions; ``cap2img[j]`` is the image of
caption ``j``. Training splits list one entry per caption (an image may appear under several
captions); test/validation images usually carry several captions (Flickr30K 5, COCO 5 or 6),
which is what image→text retrieval (TR@K) counts over.

Images are either file paths (relative to ``root`` when it is set) or in-memory ``PIL.Image`` /
``numpy`` arrays. :meth:`PairDataset.load_images` turns them into a normalised float tensor
``[N, 3, H, W]``: RGB (RGBA and palette transparency composited on white), bicubic resize to a
square ``size × size`` (the BLIP/LoRS test transform), scaled to [0, 1], then ``(x - mean) / std``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

ImageItem = Union[str, Path, "np.ndarray", Any]  # Any: a PIL.Image.Image

# Common pixel statistics; pass the ones the image encoder was trained with (docs/algorithm.md §2).
UNIT_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # pixels in [-1, 1] (EfficientNet-Lite)
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


@dataclass
class PairDataset:
    """One split of an image–caption dataset.

    Attributes:
        name: dataset name (``"emoji"``, ``"flickr30k"``, ...).
        split: split name (``"train"``, ``"val"``, ``"test"``, ``"all"``).
        images: ``num_images`` items: paths (relative to ``root`` if set) or in-memory images.
        captions: ``num_captions`` caption strings.
        cap2img: ``[num_captions]`` long tensor, caption index -> image index.
        root: folder that relative image paths are resolved against (``None``: as given).
        image_ids: optional ``num_images`` identifiers (e.g. Karpathy ``image_id``).
        meta: free-form provenance (annotation file, licence, attribution, ...).
    """

    name: str
    split: str
    images: list[ImageItem]
    captions: list[str]
    cap2img: torch.Tensor
    root: Path | None = None
    image_ids: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cap2img = torch.as_tensor(self.cap2img, dtype=torch.long).reshape(-1)
        if self.root is not None:
            self.root = Path(self.root)
        if self.cap2img.numel() != len(self.captions):
            raise ValueError(
                f"cap2img has {self.cap2img.numel()} entries but there are "
                f"{len(self.captions)} captions"
            )
        if len(self.captions) and (
            int(self.cap2img.min()) < 0 or int(self.cap2img.max()) >= len(self.images)
        ):
            raise ValueError(f"cap2img indexes outside [0, {len(self.images)})")
        if self.image_ids is not None and len(self.image_ids) != len(self.images):
            raise ValueError("image_ids must have one entry per image")

    # ----------------------------------------------------------------------------- sizes
    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def __len__(self) -> int:
        """Number of (image, caption) pairs = number of captions."""
        return len(self.captions)

    def img2caps(self) -> list[list[int]]:
        """For each image, the indices of its captions (ascending)."""
        out: list[list[int]] = [[] for _ in range(self.num_images)]
        for j, i in enumerate(self.cap2img.tolist()):
            out[i].append(j)
        return out

    def image_path(self, i: int) -> Path:
        """Resolved path of image ``i`` (raises ``TypeError`` for in-memory images)."""
        item = self.images[i]
        if not isinstance(item, (str, Path)):
            raise TypeError(f"image {i} of {self.name}/{self.split} is in memory, not a file")
        p = Path(item)
        return p if self.root is None or p.is_absolute() else self.root / p

    # ------------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """Stable sha256 (hex) of the content: captions, ``cap2img`` and, per image, its path as
        stored (relative to ``root``) with its file size, or the raw pixels of in-memory images.

        The absolute ``root`` is deliberately left out, so the same dataset unpacked elsewhere
        keeps its fingerprint (and its feature cache entries).
        """
        h = hashlib.sha256()
        h.update(b"repblend_fast.PairDataset.v1\0")
        h.update(f"{self.num_images}\0{self.num_captions}\0".encode())
        for i, item in enumerate(self.images):
            if isinstance(item, (str, Path)):
                p = self.image_path(i)
                size = p.stat().st_size if p.exists() else -1
                h.update(f"p\0{Path(item).as_posix()}\0{size}\0".encode())
            else:
                arr = np.ascontiguousarray(np.asarray(item))
                h.update(f"a\0{arr.dtype.str}\0{arr.shape}\0".encode())
                h.update(arr.tobytes())
        for c in self.captions:
            h.update(c.encode("utf-8") + b"\0")
        h.update(self.cap2img.numpy().astype("<i8").tobytes())
        return h.hexdigest()

    # ---------------------------------------------------------------------- subsetting
    def subset_images(self, image_indices: Sequence[int], split: str | None = None) -> PairDataset:
        """The split restricted to the given images (and all their captions), in the given order."""
        caps = self.img2caps()
        images, captions, c2i, ids = [], [], [], []
        for new_i, old_i in enumerate(image_indices):
            images.append(self.images[old_i])
            if self.image_ids is not None:
                ids.append(self.image_ids[old_i])
            for j in caps[old_i]:
                captions.append(self.captions[j])
                c2i.append(new_i)
        return PairDataset(
            name=self.name,
            split=split or self.split,
            images=images,
            captions=captions,
            cap2img=torch.tensor(c2i, dtype=torch.long),
            root=self.root,
            image_ids=ids if self.image_ids is not None else None,
            meta=dict(self.meta),
        )

    # ------------------------------------------------------------------------- pixels
    def load_image(self, i: int, size: int, mean=UNIT_MEAN_STD[0], std=UNIT_MEAN_STD[1]):
        """Image ``i`` as a normalised float tensor ``[3, size, size]``."""
        return to_tensor(self._pil(i), size, mean, std)

    def _pil(self, i: int):
        item = self.images[i]
        if isinstance(item, (str, Path)):
            return open_rgb(self.image_path(i))
        return to_rgb(item)

    def iter_image_batches(
        self,
        size: int,
        mean: Sequence[float] = UNIT_MEAN_STD[0],
        std: Sequence[float] = UNIT_MEAN_STD[1],
        *,
        indices: Sequence[int] | None = None,
        batch_size: int = 256,
        progress: bool = False,
    ) -> Iterator[torch.Tensor]:
        """Yield normalised images in batches ``[b, 3, size, size]`` (float32), in ``indices``
        order (default: all images)."""
        idx = list(range(self.num_images)) if indices is None else list(indices)
        rng = range(0, len(idx), batch_size)
        if progress:
            from tqdm.auto import tqdm

            rng = tqdm(rng, desc=f"images {self.name}/{self.split}", unit="batch")
        for s in rng:
            chunk = idx[s : s + batch_size]
            yield torch.stack([self.load_image(i, size, mean, std) for i in chunk])

    def load_images(
        self,
        size: int,
        mean: Sequence[float] = UNIT_MEAN_STD[0],
        std: Sequence[float] = UNIT_MEAN_STD[1],
        *,
        indices: Sequence[int] | None = None,
        batch_size: int = 256,
        progress: bool = False,
    ) -> torch.Tensor:
        """All (or the ``indices``) images as one float32 tensor ``[N, 3, size, size]``."""
        batches = list(
            self.iter_image_batches(
                size, mean, std, indices=indices, batch_size=batch_size, progress=progress
            )
        )
        if not batches:
            return torch.empty(0, 3, size, size)
        return torch.cat(batches)


# ------------------------------------------------------------------------------ helpers
def open_rgb(path: str | os.PathLike):
    """Open an image file as RGB ``PIL.Image`` (transparency composited on white)."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {p}")
    with Image.open(p) as im:
        im.load()
        return to_rgb(im)


def to_rgb(item):
    """``PIL.Image`` or ``uint8`` array ``[H, W]``/``[H, W, 3|4]`` -> RGB ``PIL.Image``; alpha
    (including palette transparency) is composited on a white background."""
    from PIL import Image

    im = item if isinstance(item, Image.Image) else Image.fromarray(np.asarray(item))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def to_tensor(im, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB ``PIL.Image`` -> bicubic resize to ``size × size`` -> ``[3, size, size]`` float32,
    ``(x / 255 - mean) / std``."""
    from PIL import Image

    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def split_pairs(
    ds: PairDataset,
    n_test: int | float,
    seed: int = 0,
    *,
    group: str = "image",
) -> tuple[PairDataset, PairDataset]:
    """Deterministic train/test split of ``ds`` into two :class:`PairDataset` s.

    Args:
        n_test: number of test *groups* (int) or fraction of groups (float in (0, 1)).
        seed: seeds a ``torch.Generator`` permutation of the groups (same result everywhere).
        group: ``"image"`` keeps each image (with all its captions) on one side; ``"caption"``
            additionally joins images that share a caption text into one group, so the same
            caption never sits on both sides (a concept split).

    Returns ``(train, test)``; both keep the original image order.
    """
    if group not in ("image", "caption"):
        raise ValueError(f"group must be 'image' or 'caption', got {group!r}")
    n_img = ds.num_images
    parent = list(range(n_img))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    if group == "caption":
        first: dict[str, int] = {}
        for c, i in zip(ds.captions, ds.cap2img.tolist()):
            j = first.setdefault(c, i)
            ra, rb = find(i), find(j)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    roots = sorted({find(i) for i in range(n_img)})
    n_groups = len(roots)
    k = int(round(n_test * n_groups)) if isinstance(n_test, float) else int(n_test)
    if not 0 < k < n_groups:
        raise ValueError(
            f"n_test={n_test} gives {k} test groups out of {n_groups}; need 0 < n_test < {n_groups}"
        )
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n_groups, generator=g).tolist()
    test_roots = {roots[p] for p in perm[:k]}
    test_imgs = [i for i in range(n_img) if find(i) in test_roots]
    train_imgs = [i for i in range(n_img) if find(i) not in test_roots]
    return ds.subset_images(train_imgs, "train"), ds.subset_images(test_imgs, "test")
