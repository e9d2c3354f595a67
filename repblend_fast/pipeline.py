"""Glue from datasets and encoders to cached features, expert trajectories and distillation.

The CLI and the demo call these functions; they are also the simplest way to use the library from
Python with one of the registered datasets (:func:`repblend_fast.data.get_dataset`).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from repblend_fast.config import DistillConfig

logger = logging.getLogger("repblend_fast.pipeline")

DEFAULT_IMAGE_SIZE = {
    "emoji": 64,
    "tuxpaint": 96,
    "openclipart": 96,
    "real": 96,
    "real-sentences": 96,
}


@dataclass
class Encoders:
    """The frozen image encoder (with its preprocessing info) and the text encoder."""

    image: nn.Module
    image_info: Any  # repblend_fast.models.encoders.ImageEncoderInfo
    text: Any  # repblend_fast.models.encoders.TextEncoder

    @property
    def image_id(self) -> str:
        return self.image_info.encoder_id

    @property
    def text_id(self) -> str:
        return self.text.info()["encoder_id"]


def load_encoders(
    image_encoder: str = "efficientnet_lite0",
    text_encoder: str = "minilm",
    *,
    image_checkpoint: str | os.PathLike | None = None,
    random_init: bool = False,
    device: str = "cpu",
) -> Encoders:
    """Load both frozen encoders from local files (nothing is downloaded)."""
    from repblend_fast.models.encoders import load_image_encoder, load_text_encoder

    img, info = load_image_encoder(
        image_encoder, image_checkpoint, random_init=random_init, device=device
    )
    txt = load_text_encoder(text_encoder, device=device)
    return Encoders(img, info, txt)


def image_size_for(dataset: str, image_size: int | None, info) -> int:
    """The image resolution: explicit, else the dataset's default, else the encoder's."""
    if image_size is not None:
        return int(image_size)
    if dataset in DEFAULT_IMAGE_SIZE:
        return DEFAULT_IMAGE_SIZE[dataset]
    return int(info.input_size[-1])


def load_images(ds, enc: Encoders, size: int, indices=None, progress: bool = False):
    """Images of ``ds`` in the encoder's input space ``[n, 3, size, size]``."""
    return ds.load_images(
        size, enc.image_info.mean, enc.image_info.std, indices=indices, progress=progress
    )


@torch.no_grad()
def image_features(
    ds, enc: Encoders, size: int, *, cache_dir=None, progress: bool = False, batch_size: int = 128
) -> torch.Tensor:
    """Frozen-encoder features of every image of ``ds`` ``[N_img, d_f]`` (cached on disk)."""
    from repblend_fast.data.cache import cached_features

    def compute() -> torch.Tensor:
        dev = next(enc.image.parameters()).device
        out = [
            enc.image(b.to(dev)).float().cpu()
            for b in ds.iter_image_batches(
                size,
                enc.image_info.mean,
                enc.image_info.std,
                batch_size=batch_size,
                progress=progress,
            )
        ]
        return torch.cat(out) if out else torch.empty(0, enc.image_info.feature_dim)

    key = {
        "kind": "image_features",
        "dataset": ds.fingerprint(),
        "encoder": enc.image_id,
        "size": size,
        "mean": list(enc.image_info.mean),
        "std": list(enc.image_info.std),
    }
    return cached_features(key, compute, cache_dir)


@torch.no_grad()
def encode_images(enc: Encoders, images: torch.Tensor, size: int, batch_size: int = 128):
    """Frozen-encoder features ``[N, d_f]`` of encoder-space images ``[N, 3, h, w]`` (e.g. a
    distilled set's), resized (bilinear, antialiased) to ``size`` first when ``h, w != size``."""
    import torch.nn.functional as F

    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got {tuple(images.shape)}")
    dev = next(enc.image.parameters()).device
    enc.image.eval()
    out = []
    for s in range(0, images.shape[0], batch_size):
        x = images[s : s + batch_size].to(dev, torch.float32)
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        out.append(enc.image(x).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def text_features(ds, enc: Encoders, *, cache_dir=None, progress: bool = False) -> torch.Tensor:
    """Text-encoder embeddings of every caption of ``ds`` ``[N_cap, d_t]`` (cached on disk)."""
    from repblend_fast.data.cache import cached_features

    key = {"kind": "text_features", "dataset": ds.fingerprint(), "encoder": enc.text_id}
    return cached_features(
        key, lambda: enc.text.encode(ds.captions, progress=progress).cpu(), cache_dir
    )


def train_experts(
    ds,
    enc: Encoders,
    out_dir: str | os.PathLike,
    *,
    method: str = "repblend",
    num_experts: int = 5,
    epochs: int = 3,
    dim: int = 256,
    image_size: int | None = None,
    batch_size: int = 128,
    lr: float = 0.1,
    seed: int = 0,
    cache_dir=None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Train and store expert trajectories on the training split ``ds`` (docs/algorithm.md §3):
    ``method="repblend"`` trains both heads on cached frozen-encoder features, ``"lors"`` the
    image encoder and the text head.

    ``out_dir`` is locked while it is written; a finished store of other settings there is
    refused (``StoreExistsError``) unless ``overwrite``, an identical one keeps its experts.
    """
    from repblend_fast import experts
    from repblend_fast.methods import student_for_experts

    kind = student_for_experts(method)
    recipe = experts.ExpertRecipe(
        num_experts=num_experts, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed
    )
    size = image_size_for(ds.name, image_size, enc.image_info)
    txt = text_features(ds, enc, cache_dir=cache_dir, progress=progress)
    common = dict(
        recipe=recipe,
        out_dir=out_dir,
        image_encoder=enc.image_id,
        text_encoder=enc.text_id,
        dataset_fingerprint=ds.fingerprint(),
        image_size=size,
        progress=progress,
        overwrite=overwrite,
    )
    out = kind.train_experts(
        ds, enc, size, txt, dim=dim, cache_dir=cache_dir, progress=progress, common=common
    )
    return Path(out)


def initial_pairs(ds, enc: Encoders, n: int, size: int, seed: int, *, cache_dir=None):
    """N random real pairs (distinct images, one caption each) to start the synthetic set from.

    Returns ``(images [n, 3, size, size], texts [n, d_t], caption_indices [n])``.
    """
    if n > ds.num_images:
        raise ValueError(
            f"pairs={n} is larger than the {ds.num_images} training images of {ds.name!r}: "
            "lower --pairs"
        )
    g = torch.Generator().manual_seed(seed)
    img_idx = torch.randperm(ds.num_images, generator=g)[:n]
    caps_of = ds.img2caps()
    cap_idx = torch.tensor(
        [
            caps_of[int(i)][int(torch.randint(len(caps_of[int(i)]), (), generator=g))]
            for i in img_idx
        ]
    )
    txt = text_features(ds, enc, cache_dir=cache_dir)[cap_idx]
    images = load_images(ds, enc, size, indices=img_idx.tolist())
    return images, txt, cap_idx


def distill(
    ds,
    enc: Encoders,
    experts_dir: str | os.PathLike,
    config: DistillConfig,
    *,
    out_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    verify: bool = True,
    cache_dir=None,
    progress: bool = True,
    on_iteration=None,
    note=None,
):
    """Distil ``config.pairs`` pairs from ``ds`` against the experts in ``experts_dir``
    (``on_iteration``: see :meth:`repblend_fast.engine.distill.Distiller.run`; ``note``: called with
    a line saying where a resumed run continues).

    ``out_dir`` is locked for the whole call (a second run into it gets ``LockHeldError``).
    A folder that already holds a run is refused unless ``resume`` (continue it from its
    checkpoint; one interrupted before its first checkpoint starts over, saying so) or
    ``overwrite`` (its run files are removed first). The store must have been trained on ``ds``
    with these encoders; ``verify=False`` skips the sha256 of the store's files and of the
    checkpoint (sizes, structure and counters are still checked).
    """
    from repblend_fast.engine.checkpoint import CHECKPOINT, CONFIG, METRICS, check_run_folder
    from repblend_fast.engine.distill import Distiller
    from repblend_fast.experts import TrajectoryStore
    from repblend_fast.io import remove_stale_temps
    from repblend_fast.locks import FolderLock

    config.validate()
    out = Path(out_dir) if out_dir is not None else None
    lock = FolderLock(out, "distill run") if out is not None else None
    if lock is not None:
        lock.acquire()
    try:
        restart = False
        if out is not None:
            remove_stale_temps(out)
            present, restart = check_run_folder(out, resume=resume, overwrite=overwrite)
            if restart and (out / CONFIG).exists():
                _check_restart_config(out, config, verify)
        store = TrajectoryStore.load(experts_dir, device=config.device, verify=verify)
        if not verify:
            logger.warning(
                "--no-verify: the sha256 of the expert files and of the checkpoint are not "
                "checked (sizes, structure, counters and the store's recipe still are)"
            )
        size = image_size_for(ds.name, image_size, enc.image_info)
        _check_store_matches(store, config, enc, ds, size)
        images, texts, _ = initial_pairs(
            ds, enc, config.pairs, size, config.seed, cache_dir=cache_dir
        )
        d = Distiller(
            config,
            encoder=enc.image,
            store=store,
            init_images=images,
            init_texts=texts,
            out_dir=out,
        )
        # Only now, with every input checked, may an earlier run's files go.
        if overwrite and out is not None:
            for n in present:
                _remove(out / n)
        elif restart:
            logger.warning(
                "%s: the run stopped before its first checkpoint; starting it over from "
                "iteration 0",
                out,
            )
            for n in (METRICS, CHECKPOINT, "distilled.safetensors"):
                (out / n).unlink(missing_ok=True)
        elif resume:
            d.load_checkpoint(out / CHECKPOINT, verify=verify)
            at = f"resuming at iteration {d.iteration} of {config.iterations}"
            (note or logger.info)(f"{at} ({out / CHECKPOINT})")
        return d.run(progress=progress, on_iteration=on_iteration)
    finally:
        if lock is not None:
            lock.release()


def _remove(path: Path) -> None:
    """Remove a run file, or a folder standing where one belongs (``--overwrite`` after such a
    damage must work as its message promises)."""
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# PairDataset.fingerprint(): a 64-digit sha256. Stores that record something else (imported
# from another code base) cannot be compared with the data.
_DATASET_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def _check_store_matches(store, config: DistillConfig, enc: Encoders, ds, size: int) -> None:
    """``ValueError`` listing what differs between the store and this run (method, encoders,
    training data, image size)."""
    fp = store.manifest.get("dataset_fingerprint")
    check_data = isinstance(fp, str) and _DATASET_FINGERPRINT.fullmatch(fp) is not None
    if not check_data:
        logger.warning(
            "expert store %s records dataset %r, not a fingerprint of a dataset: the training "
            "data of its experts is not checked",
            store.root,
            fp,
        )
    store.check_compatible(
        method=config.expert_kind,
        image_encoder=enc.image_id,
        text_encoder=enc.text_id,
        dataset_fingerprint=ds.fingerprint() if check_data else None,
        image_size=size,
    )


def _check_restart_config(out: Path, config: DistillConfig, verify: bool) -> None:
    """Before a run without a checkpoint starts over under ``--resume``: its ``config.json``
    (checked against ``checksums.json``) must be continued by ``config``."""
    import json

    from repblend_fast.engine.checkpoint import CONFIG, RunRecord, check_continues

    path = out / CONFIG
    if verify:
        RunRecord(out).verify(CONFIG)
    try:
        saved = DistillConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{path} is unreadable ({exc}); start over with --overwrite instead of --resume"
        ) from None
    check_continues(saved, config, path)
