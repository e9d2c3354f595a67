"""Expert trajectories (SPEC.md §3): training on real pairs, and the safetensors trajectory store.

Two kinds of experts, both trained with a contrastive loss against identity targets (symmetric
CLIP InfoNCE by default), batches of captions, plain SGD (momentum 0, weight decay 0):

- **RepBlend** (:func:`train_experts_symmetric`): an image head ``d_f -> dim`` and a text head
  ``d_t -> dim`` on top of frozen encoders. The encoders are frozen, so experts train on cached
  features (one encoder pass over the dataset; ``V`` cached augmented views stand in for on-the-fly
  augmentation), orders of magnitude cheaper than re-running the image encoder every batch.
- **LoRS / MTT-VL** (:func:`train_experts_lors`): the image side is the whole image encoder (its
  pooled features must have the text head's width), the text side a head ``d_t -> d_f``.

Storage (one directory): ``expert_{i:03d}.safetensors`` per expert holding both modalities'
flat parameter snapshots as 1-D tensors ``image/epoch_{t}`` and ``text/epoch_{t}`` (one file, so an
image trajectory can never be paired with another expert's text trajectory), plus
``manifest.json`` describing them (format version, flat layouts, encoder ids, dataset fingerprint,
hyper-parameters, stored epochs). All writes are atomic; the manifest is written last, so a
directory without one is an unfinished run. Nothing is pickled.

:class:`TrajectoryStore` validates a directory against its manifest and preloads the snapshots a run
needs onto the device once (the reference re-read expert files from disk every iteration).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from repblend_fast.io import atomic_save_safetensors, atomic_write_json, safetensors_metadata
from repblend_fast.models.flat import FlatSpec, functional_forward
from repblend_fast.models.heads import HeadSpec, head_forward, init_head_flat

__all__ = [
    "FORMAT_VERSION",
    "MODALITIES",
    "TrajectoryStore",
    "expert_seed",
    "tensor_fingerprint",
    "train_experts_lors",
    "train_experts_symmetric",
]

FORMAT_VERSION = 1
MODALITIES = ("image", "text")
MANIFEST = "manifest.json"


def expert_seed(seed: int, index: int) -> int:
    """The seed of expert ``index`` in a run seeded with ``seed`` (well mixed, 63-bit)."""
    digest = hashlib.sha256(f"repblend-expert:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    """``sha256:<hex>`` over the shapes, dtypes and bytes of ``tensors`` (a dataset fingerprint)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


def _key(modality: str, epoch: int) -> str:
    return f"{modality}/epoch_{epoch}"


def _file_name(index: int) -> str:
    return f"expert_{index:03d}.safetensors"


def _head_layout(spec: HeadSpec) -> dict:
    shapes = spec.shapes
    return {
        "kind": "head",
        "d_in": spec.d_in,
        "dim": spec.dim,
        "numel": spec.numel,
        "names": list(shapes),
        "shapes": [list(s) for s in shapes.values()],
    }


def _module_layout(spec: FlatSpec) -> dict:
    return {"kind": "module", "numel": spec.numel, **spec.to_json()}


def _resolve_epochs(epochs: int, keep_epochs: Iterable[int] | None) -> list[int]:
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if keep_epochs is None:
        return list(range(epochs + 1))
    keep = sorted({int(e) for e in keep_epochs})
    bad = [e for e in keep if e < 0 or e > epochs]
    if not keep or bad:
        raise ValueError(
            f"keep_epochs must be a non-empty subset of 0..{epochs} (epoch 0 = initialisation); "
            f"got {sorted(keep_epochs)}"
        )
    return keep


def _check_pairs(n_img: int, txt_feats: torch.Tensor, cap2img: torch.Tensor) -> None:
    if txt_feats.dim() != 2:
        raise ValueError(f"txt_feats must be [N_cap, d_t], got shape {tuple(txt_feats.shape)}")
    if cap2img.dim() != 1 or cap2img.dtype != torch.long:
        raise ValueError(
            f"cap2img must be a 1-D int64 tensor (image index of each caption), got "
            f"{cap2img.dtype} of shape {tuple(cap2img.shape)}"
        )
    if cap2img.numel() != txt_feats.shape[0]:
        raise ValueError(
            f"cap2img has {cap2img.numel()} entries but there are {txt_feats.shape[0]} captions"
        )
    if cap2img.numel() == 0:
        raise ValueError("no captions to train on")
    lo, hi = int(cap2img.min()), int(cap2img.max())
    if lo < 0 or hi >= n_img:
        raise ValueError(f"cap2img values must lie in [0, {n_img}), got [{lo}, {hi}]")


def _config_sha(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:24]


def _train_loop(
    *,
    img_flat: torch.Tensor,
    txt_flat: torch.Tensor,
    embed_img,
    embed_txt,
    n_cap: int,
    num_views: int,
    last_epoch: int,
    keep: list[int],
    batch_size: int,
    lr_img: float,
    lr_txt: float,
    logit_scale: float,
    loss: str,
    data_gen: torch.Generator,
    drop_gen: torch.Generator,
    bar,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Plain SGD on both flat vectors; returns ``{key: snapshot}`` (on the CPU) and mean losses.

    ``embed_img(flat, captions [B], views [B], gen) -> [B, D]`` and ``embed_txt(flat, captions,
    gen) -> [B, D]`` give the un-normalised embeddings of a batch of captions' pairs.
    """
    from repblend_fast.ops import contrastive_loss

    dev = img_flat.device
    snaps: dict[str, torch.Tensor] = {}

    def keep_snapshot(epoch: int) -> None:
        if epoch in keep:
            snaps[_key("image", epoch)] = img_flat.detach().to("cpu", copy=True)
            snaps[_key("text", epoch)] = txt_flat.detach().to("cpu", copy=True)

    keep_snapshot(0)
    losses: list[float] = []
    eyes: dict[int, torch.Tensor] = {}
    for epoch in range(1, last_epoch + 1):
        # Captions in shuffled order, one entry per caption (the reference's dataset), each
        # with one of its image's cached views drawn afresh per epoch.
        perm = torch.randperm(n_cap, generator=data_gen)
        views = (
            torch.randint(num_views, (n_cap,), generator=data_gen)
            if num_views > 1
            else torch.zeros(n_cap, dtype=torch.long)
        )
        total, count = torch.zeros((), dtype=torch.float64, device=dev), 0
        for start in range(0, n_cap, batch_size):
            caps = perm[start : start + batch_size].to(dev)
            v = views[start : start + batch_size].to(dev)
            b = caps.numel()
            ti = img_flat.detach().requires_grad_(True)
            tt = txt_flat.detach().requires_grad_(True)
            u = embed_img(ti, caps, v, drop_gen)
            w = embed_txt(tt, caps, drop_gen)
            if b not in eyes:
                eyes[b] = torch.eye(b, device=dev, dtype=u.dtype)
            ell = contrastive_loss(u, w, eyes[b], logit_scale=logit_scale, loss=loss)
            gi, gt = torch.autograd.grad(ell, [ti, tt])
            with torch.no_grad():
                img_flat = img_flat - lr_img * gi
                txt_flat = txt_flat - lr_txt * gt
            total += ell.detach().double() * b
            count += b
        mean = float(total) / count
        if not math.isfinite(mean):
            raise FloatingPointError(
                f"expert training diverged at epoch {epoch} (mean loss {mean}); lower lr"
            )
        losses.append(mean)
        keep_snapshot(epoch)
        bar.set_postfix(loss=f"{mean:.4f}")
        bar.update(1)
    return snaps, losses


def _train_and_store(
    *,
    out_dir: Path,
    manifest: dict,
    num_experts: int,
    seed: int,
    resume: bool,
    progress: bool,
    make_expert,
    last_epoch: int,
    keep: list[int],
) -> Path:
    """Train experts ``0..num_experts-1`` with ``make_expert(i, bar) -> (snaps, losses)``; write
    one file each (skipping valid files of an identical earlier run when ``resume``), then the
    manifest."""
    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in manifest.items() if k not in ("files", "losses", "expert_seeds")}
    files, all_losses, seeds = [], [], []
    want_keys = {_key(m, t) for m in MODALITIES for t in keep}
    bar = tqdm(
        total=num_experts * last_epoch,
        disable=not progress,
        desc=f"{manifest['method']} experts",
        unit="epoch",
    )
    try:
        for i in range(num_experts):
            name = _file_name(i)
            path = out_dir / name
            es = expert_seed(seed, i)
            sha = _config_sha({**config, "expert": i, "expert_seed": es})
            reused = False
            if resume and path.is_file():
                try:
                    meta = safetensors_metadata(path)
                    from safetensors import safe_open

                    with safe_open(str(path), framework="pt") as f:
                        keys = set(f.keys())
                    if meta.get("config_sha") == sha and keys == want_keys:
                        all_losses.append(json.loads(meta["losses"]))
                        reused = True
                        bar.update(last_epoch)
                except Exception:  # an unreadable leftover is simply retrained
                    reused = False
            if not reused:
                bar.set_description(f"{manifest['method']} expert {i + 1}/{num_experts}")
                snaps, losses = make_expert(i, es, bar)
                meta = {
                    "format_version": str(FORMAT_VERSION),
                    "method": manifest["method"],
                    "expert": str(i),
                    "expert_seed": str(es),
                    "config_sha": sha,
                    "losses": json.dumps(losses),
                }
                atomic_save_safetensors(snaps, path, metadata=meta)
                all_losses.append(losses)
            files.append(name)
            seeds.append(es)
    finally:
        bar.close()
    manifest = {**manifest, "files": files, "expert_seeds": seeds, "losses": all_losses}
    atomic_write_json(manifest, out_dir / MANIFEST)
    return out_dir


def _common_manifest(
    *,
    method: str,
    layouts: dict,
    num_experts: int,
    epochs: int,
    last_epoch: int,
    keep: list[int],
    dim: int,
    d_img: int,
    d_txt: int,
    image_encoder: str,
    text_encoder: str,
    dataset_fingerprint: str,
    logit_scale: float,
    loss: str,
    train: dict,
) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "method": method,
        "num_experts": num_experts,
        "epochs": keep,
        "epochs_requested": epochs,
        "epochs_trained": last_epoch,
        "modalities": layouts,
        "numel": {m: layouts[m]["numel"] for m in MODALITIES},
        "image_encoder": image_encoder,
        "text_encoder": text_encoder,
        "d_img": d_img,
        "d_txt": d_txt,
        "dim": dim,
        "dataset_fingerprint": dataset_fingerprint,
        "logit_scale": float(logit_scale),
        "loss": loss,
        "train": train,
    }


def _check_hparams(num_experts: int, batch_size: int, lr: float, dropout: float) -> None:
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def train_experts_symmetric(
    img_feats: torch.Tensor,
    txt_feats: torch.Tensor,
    cap2img: torch.Tensor,
    *,
    num_experts: int,
    epochs: int,
    dim: int,
    out_dir: str | os.PathLike,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 0.1,
    lr_txt: float | None = None,
    logit_scale: float = 1 / 0.07,
    loss: str = "infonce",
    dropout: float = 0.1,
    keep_epochs: Iterable[int] | None = None,
    image_encoder: str = "unknown",
    text_encoder: str = "unknown",
    dataset_fingerprint: str | None = None,
    device: str | torch.device | None = None,
    resume: bool = True,
    progress: bool = True,
) -> Path:
    """Train RepBlend experts (image and text heads) on cached features; returns ``out_dir``.

    Args:
        img_feats: frozen image-encoder features ``[N_img, d_f]``, or ``[V, N_img, d_f]`` for
            ``V`` cached augmented views (each caption's pair uses a random view each epoch).
        txt_feats: frozen text-encoder features ``[N_cap, d_t]``, one row per caption.
        cap2img: ``[N_cap]`` int64, the image index of each caption.
        num_experts, epochs: how many experts, and epochs per expert. Training stops after the
            last epoch in ``keep_epochs`` (later epochs could not change any stored snapshot).
        dim: head output width ``D``.
        seed: run seed; expert ``i`` uses :func:`expert_seed` ``(seed, i)`` for its head
            initialisation (image head first, then text head, from one CPU generator), its
            caption order and its dropout masks.
        lr, lr_txt: SGD learning rates of the image head and the text head (``lr_txt`` defaults
            to ``lr``); momentum 0, weight decay 0, no decay.
        logit_scale, loss: ``s = 1/τ`` and the contrastive loss (identity targets).
        dropout: head dropout during expert training (on, as in the reference).
        keep_epochs: which snapshots to store (default all ``0..epochs``; 0 = initialisation).
        image_encoder, text_encoder: encoder ids (``info.encoder_id`` / ``TextEncoder.encoder_id``).
        dataset_fingerprint: identifies the training data (default: a hash of the inputs).
        device: where to train (default: ``img_feats``'s device).
        resume: keep expert files of an identical earlier run instead of retraining them.
    """
    if img_feats.dim() == 2:
        img_feats = img_feats.unsqueeze(0)
    if img_feats.dim() != 3:
        raise ValueError(
            f"img_feats must be [N_img, d_f] or [V, N_img, d_f], got {tuple(img_feats.shape)}"
        )
    _check_pairs(img_feats.shape[1], txt_feats, cap2img)
    _check_hparams(num_experts, batch_size, lr, dropout)
    keep = _resolve_epochs(epochs, keep_epochs)
    dev = torch.device(device) if device is not None else img_feats.device
    num_views, n_img, d_f = img_feats.shape
    d_t = txt_feats.shape[1]
    if dataset_fingerprint is None:
        dataset_fingerprint = tensor_fingerprint(img_feats, txt_feats, cap2img)
    feats = img_feats.to(dev, torch.float32)
    texts = txt_feats.to(dev, torch.float32)
    c2i = cap2img.to(dev)
    ispec, tspec = HeadSpec(d_f, dim), HeadSpec(d_t, dim)
    lr_t = lr if lr_txt is None else lr_txt

    def embed_img(flat, caps, views, gen):
        h = feats[views, c2i[caps]]
        return head_forward(flat, h, ispec, dropout=dropout, generator=gen)

    def embed_txt(flat, caps, gen):
        return head_forward(flat, texts[caps], tspec, dropout=dropout, generator=gen)

    def init_img(init_gen: torch.Generator) -> torch.Tensor:
        return init_head_flat(d_f, dim, generator=init_gen)

    return _train_experts(
        method="repblend",
        layouts={"image": _head_layout(ispec), "text": _head_layout(tspec)},
        init_img=init_img,
        txt_shape=(d_t, dim),
        embed_img=embed_img,
        embed_txt=embed_txt,
        dims=(dim, d_f, d_t),
        encoder_tag="frozen",
        n_img=n_img,
        num_views=num_views,
        c2i=c2i,
        dev=dev,
        keep=keep,
        hparams=dict(batch_size=batch_size, lr=lr, lr_txt=lr_t, dropout=dropout, seed=seed),
        num_experts=num_experts,
        epochs=epochs,
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        dataset_fingerprint=dataset_fingerprint,
        logit_scale=logit_scale,
        loss=loss,
        out_dir=out_dir,
        resume=resume,
        progress=progress,
    )


def _train_experts(
    *,
    method: str,
    layouts: dict,
    init_img,
    txt_shape: tuple[int, int],
    embed_img,
    embed_txt,
    dims: tuple[int, int, int],
    encoder_tag: str,
    n_img: int,
    num_views: int,
    c2i: torch.Tensor,
    dev: torch.device,
    keep: list[int],
    hparams: dict,
    num_experts: int,
    epochs: int,
    image_encoder: str,
    text_encoder: str,
    dataset_fingerprint: str,
    logit_scale: float,
    loss: str,
    out_dir,
    resume: bool,
    progress: bool,
) -> Path:
    """What both expert kinds share: per-expert seeded initialisation and training, the manifest
    and the store. ``init_img(generator)`` draws the image side's initial flat vector (drawn
    before the text head's, from the same generator)."""
    last = max(keep)
    hp = hparams
    dim, d_img, d_txt = dims

    def make_expert(i, es, bar):
        init_gen = torch.Generator().manual_seed(es)
        img0 = init_img(init_gen)
        txt0 = init_head_flat(*txt_shape, generator=init_gen)
        data_gen = torch.Generator().manual_seed(es ^ 0x5DEECE66D)
        drop_gen = torch.Generator(device=dev).manual_seed(es ^ 0xB5297A4D)
        return _train_loop(
            img_flat=img0.to(dev),
            txt_flat=txt0.to(dev),
            embed_img=embed_img,
            embed_txt=embed_txt,
            n_cap=c2i.numel(),
            num_views=num_views,
            last_epoch=last,
            keep=keep,
            batch_size=hp["batch_size"],
            lr_img=hp["lr"],
            lr_txt=hp["lr_txt"],
            logit_scale=logit_scale,
            loss=loss,
            data_gen=data_gen,
            drop_gen=drop_gen,
            bar=bar,
        )

    manifest = _common_manifest(
        method=method,
        layouts=layouts,
        num_experts=num_experts,
        epochs=epochs,
        last_epoch=last,
        keep=keep,
        dim=dim,
        d_img=d_img,
        d_txt=d_txt,
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        dataset_fingerprint=dataset_fingerprint,
        logit_scale=logit_scale,
        loss=loss,
        train=_train_meta(
            hp["batch_size"],
            hp["lr"],
            hp["lr_txt"],
            hp["dropout"],
            hp["seed"],
            num_views,
            n_img,
            c2i.numel(),
            encoder_tag,
        ),
    )
    return _train_and_store(
        out_dir=Path(out_dir),
        manifest=manifest,
        num_experts=num_experts,
        seed=hp["seed"],
        resume=resume,
        progress=progress,
        make_expert=make_expert,
        last_epoch=last,
        keep=keep,
    )


def _train_meta(batch_size, lr_img, lr_txt, dropout, seed, views, n_img, n_cap, encoder) -> dict:
    return {
        "optimizer": "sgd",
        "batch_size": batch_size,
        "lr_img": float(lr_img),
        "lr_txt": float(lr_txt),
        "momentum": 0.0,
        "weight_decay": 0.0,
        "dropout": float(dropout),
        "seed": int(seed),
        "num_views": int(views),
        "num_images": int(n_img),
        "num_captions": int(n_cap),
        "image_encoder_mode": encoder,
        "targets": "identity",
    }


def train_experts_lors(
    encoder: nn.Module,
    images: torch.Tensor,
    txt_feats: torch.Tensor,
    cap2img: torch.Tensor,
    *,
    num_experts: int,
    epochs: int,
    out_dir: str | os.PathLike,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 0.1,
    lr_txt: float | None = None,
    logit_scale: float = 1 / 0.07,
    loss: str = "infonce",
    dropout: float = 0.1,
    keep_epochs: Iterable[int] | None = None,
    image_encoder: str = "unknown",
    text_encoder: str = "unknown",
    dataset_fingerprint: str | None = None,
    device: str | torch.device | None = None,
    resume: bool = True,
    progress: bool = True,
) -> Path:
    """Train LoRS / MTT-VL experts: the whole image encoder and a text head ``d_t -> d_f``.

    ``images`` are encoder inputs (already normalised) ``[N_img, 3, H, W]`` or
    ``[V, N_img, 3, H, W]``; ``encoder`` (the module) maps them to pooled features ``[B, d_f]``.
    Every expert starts from the encoder's current parameters (all of them, in ``named_parameters``
    order: ``FlatSpec.from_module(encoder, trainable_only=False)``) and a fresh text head. The
    encoder runs in eval mode (batch-norm statistics frozen, no dropout), consistent with the
    student in the distillation unroll; the text head keeps dropout on. Other arguments as in
    :func:`train_experts_symmetric` (``image_encoder`` is the encoder's id string).
    """
    if images.dim() == 4:
        images = images.unsqueeze(0)
    if images.dim() != 5:
        raise ValueError(
            f"images must be [N_img, C, H, W] or [V, N_img, C, H, W], got {tuple(images.shape)}"
        )
    _check_pairs(images.shape[1], txt_feats, cap2img)
    _check_hparams(num_experts, batch_size, lr, dropout)
    keep = _resolve_epochs(epochs, keep_epochs)
    dev = torch.device(device) if device is not None else images.device
    num_views, n_img = images.shape[:2]
    d_t = txt_feats.shape[1]
    if dataset_fingerprint is None:
        dataset_fingerprint = tensor_fingerprint(images, txt_feats, cap2img)

    encoder = encoder.to(dev).eval()
    ispec = FlatSpec.from_module(encoder, trainable_only=False)
    theta0 = ispec.flatten(encoder).to(dev, torch.float32)
    pix = images.to(dev, torch.float32)
    with torch.no_grad():
        probe = functional_forward(encoder, ispec, theta0, pix[0, :1])
    if probe.dim() != 2:
        raise ValueError(
            f"the image encoder must return pooled features [B, d_f]; got {tuple(probe.shape)} "
            "(build it with num_classes=0, e.g. via load_image_encoder)"
        )
    d_f = int(probe.shape[1])
    texts = txt_feats.to(dev, torch.float32)
    c2i = cap2img.to(dev)
    tspec = HeadSpec(d_t, d_f)
    lr_t = lr if lr_txt is None else lr_txt

    def embed_img(flat, caps, views, gen):
        return functional_forward(encoder, ispec, flat, pix[views, c2i[caps]])

    def embed_txt(flat, caps, gen):
        return head_forward(flat, texts[caps], tspec, dropout=dropout, generator=gen)

    return _train_experts(
        method="lors",
        layouts={"image": _module_layout(ispec), "text": _head_layout(tspec)},
        init_img=lambda init_gen: theta0.clone(),
        txt_shape=(d_t, d_f),
        embed_img=embed_img,
        embed_txt=embed_txt,
        dims=(d_f, d_f, d_t),
        encoder_tag="trained-eval",
        n_img=n_img,
        num_views=num_views,
        c2i=c2i,
        dev=dev,
        keep=keep,
        hparams=dict(batch_size=batch_size, lr=lr, lr_txt=lr_t, dropout=dropout, seed=seed),
        num_experts=num_experts,
        epochs=epochs,
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        dataset_fingerprint=dataset_fingerprint,
        logit_scale=logit_scale,
        loss=loss,
        out_dir=out_dir,
        resume=resume,
        progress=progress,
    )


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------

_REQUIRED = (
    "format_version",
    "method",
    "num_experts",
    "epochs",
    "modalities",
    "files",
    "image_encoder",
    "text_encoder",
    "dim",
    "d_img",
    "d_txt",
    "dataset_fingerprint",
)


class TrajectoryStore:
    """Validated expert trajectories, preloaded on one device.

    ``snapshot(expert, epoch, modality)`` returns a 1-D view ``[numel_m]`` of the preloaded
    ``[E, len(epochs), numel_m]`` tensor (:meth:`stacked`); no disk IO after :meth:`load`.
    """

    def __init__(
        self,
        root: Path,
        manifest: dict,
        snapshots: dict[str, torch.Tensor],
        epochs: Sequence[int],
    ):
        self.root = root
        self.manifest = manifest
        self._snaps = snapshots
        self.epochs = list(epochs)
        self._epoch_pos = {e: i for i, e in enumerate(self.epochs)}

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        epochs: Iterable[int] | None = None,
    ) -> TrajectoryStore:
        """Validate ``directory`` against its manifest and preload the snapshots of ``epochs``
        (default: all stored epochs) onto ``device`` as ``dtype``."""
        from safetensors import safe_open

        root = Path(directory)
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise FileNotFoundError(
                f"no {MANIFEST} in {root}: not an expert directory, or its training did not "
                "finish (rerun the expert training with the same settings; finished experts are "
                "kept)"
            )
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{mpath} is not valid JSON ({e}); retrain the experts") from e
        cls._validate_manifest(manifest, mpath)
        stored = [int(e) for e in manifest["epochs"]]
        if epochs is None:
            use = stored
        else:
            use = sorted({int(e) for e in epochs})
            missing = [e for e in use if e not in stored]
            if missing:
                raise ValueError(
                    f"epochs {missing} are not stored in {root} (stored: {stored}); train the "
                    "experts with these epochs in keep_epochs"
                )
        numel = {m: int(manifest["modalities"][m]["numel"]) for m in MODALITIES}
        n_exp = int(manifest["num_experts"])
        want = {_key(m, t) for m in MODALITIES for t in stored}

        # Validate every file's header before allocating or reading any tensor data.
        for name in manifest["files"]:
            path = root / name
            if not path.is_file():
                raise ValueError(
                    f"expert file {path} listed in {mpath} is missing; restore it or retrain"
                )
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = set(f.keys())
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
                dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
            counts = {m: sum(k.startswith(m + "/") for k in keys) for m in MODALITIES}
            if counts["image"] != counts["text"]:
                raise ValueError(
                    f"{path}: {counts['image']} image snapshots but {counts['text']} text "
                    "snapshots; the two trajectories of an expert must have the same epochs "
                    "(corrupt file: retrain this expert)"
                )
            if keys != want:
                lacking, extra = sorted(want - keys), sorted(keys - want)
                raise ValueError(
                    f"{path}: tensors do not match {MANIFEST}: missing {lacking[:6]}, "
                    f"unexpected {extra[:6]} (manifest epochs {stored}); retrain this expert"
                )
            for k in sorted(keys):
                m = k.split("/", 1)[0]
                n = math.prod(shapes[k])
                if len(shapes[k]) != 1 or n != numel[m]:
                    raise ValueError(
                        f"{path}: tensor {k} has shape {list(shapes[k])}, but {MANIFEST} "
                        f"declares a 1-D {m} vector of numel {numel[m]}; the file belongs to "
                        "another run: retrain this expert"
                    )
                if not dtypes[k].startswith("F") and not dtypes[k].startswith("BF"):
                    raise ValueError(f"{path}: tensor {k} has non-float dtype {dtypes[k]}")

        snaps = {
            m: torch.empty(n_exp, len(use), numel[m], dtype=dtype, device=device)
            for m in MODALITIES
        }
        for i, name in enumerate(manifest["files"]):
            with safe_open(str(root / name), framework="pt", device="cpu") as f:
                for m in MODALITIES:
                    for j, t in enumerate(use):
                        snaps[m][i, j].copy_(f.get_tensor(_key(m, t)))
        return cls(root, manifest, snaps, use)

    @staticmethod
    def _validate_manifest(man: dict, mpath: Path) -> None:
        if not isinstance(man, dict):
            raise ValueError(f"{mpath} must hold a JSON object")
        version = man.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{mpath}: format_version {version!r}, but this version of repblend_fast reads "
                f"format_version {FORMAT_VERSION}; retrain the experts with this version"
            )
        lacking = [k for k in _REQUIRED if k not in man]
        if lacking:
            raise ValueError(f"{mpath} lacks the fields {lacking}; retrain the experts")
        if man["method"] not in ("repblend", "lors"):
            raise ValueError(f"{mpath}: unknown method {man['method']!r}")
        files = man["files"]
        if not isinstance(files, list) or len(files) != int(man["num_experts"]):
            raise ValueError(
                f"{mpath}: num_experts is {man['num_experts']} but {len(files)} files are listed"
            )
        for m in MODALITIES:
            lay = man["modalities"].get(m)
            if not isinstance(lay, dict) or "numel" not in lay:
                raise ValueError(f"{mpath}: no layout for the {m} modality")
            if "shapes" in lay:
                total = sum(math.prod(s) for s in lay["shapes"])
                if total != int(lay["numel"]):
                    raise ValueError(
                        f"{mpath}: {m} layout shapes sum to {total} elements but numel is "
                        f"{lay['numel']}"
                    )
        if not man["epochs"]:
            raise ValueError(f"{mpath}: no epochs stored")
        for name in files:
            if Path(name).name != name:
                raise ValueError(f"{mpath}: expert file names must be plain names, got {name!r}")

    # --- access -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.manifest["num_experts"])

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def device(self) -> torch.device:
        return self._snaps["image"].device

    def numel(self, modality: str) -> int:
        self._check_modality(modality)
        return int(self._snaps[modality].shape[-1])

    def spec(self, modality: str) -> HeadSpec | FlatSpec:
        """The flat layout of a modality: a :class:`HeadSpec` or a :class:`FlatSpec`."""
        self._check_modality(modality)
        lay = self.manifest["modalities"][modality]
        if lay.get("kind") == "head":
            return HeadSpec(int(lay["d_in"]), int(lay["dim"]))
        return FlatSpec.from_json(lay)

    def stacked(self, modality: str) -> torch.Tensor:
        """All preloaded snapshots of a modality ``[E, len(epochs), numel]``."""
        self._check_modality(modality)
        return self._snaps[modality]

    def snapshot(self, expert: int, epoch: int, modality: str) -> torch.Tensor:
        """Flat parameters ``[numel]`` of ``expert`` after ``epoch`` epochs (0 = init)."""
        self._check_modality(modality)
        if not 0 <= int(expert) < len(self):
            raise IndexError(f"expert {expert} out of range: the store holds {len(self)} experts")
        if epoch not in self._epoch_pos:
            raise KeyError(
                f"epoch {epoch} not loaded (loaded: {self.epochs}); pass it in "
                "TrajectoryStore.load(epochs=...) or train experts storing it"
            )
        return self._snaps[modality][int(expert), self._epoch_pos[epoch]]

    def losses(self) -> list[list[float]]:
        """Mean training loss per expert and epoch (epochs 1..epochs_trained)."""
        return [list(x) for x in self.manifest.get("losses", [])]

    def _check_modality(self, modality: str) -> None:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")

    def check_compatible(
        self,
        *,
        method: str | None = None,
        image_encoder: str | None = None,
        text_encoder: str | None = None,
        dim: int | None = None,
        d_img: int | None = None,
        d_txt: int | None = None,
        dataset_fingerprint: str | None = None,
    ) -> None:
        """Raise ``ValueError`` listing every given setting that differs from the store's."""
        hints = {
            "method": "train experts with the run's method (or change the method)",
            "image_encoder": "use the image encoder the experts were trained with, or retrain",
            "text_encoder": "use the text encoder (and pooling) the experts were trained with",
            "dim": "set the head width to the experts' dim, or retrain the experts",
            "d_img": "the image features differ in width: use the experts' image encoder",
            "d_txt": "the text features differ in width: use the experts' text encoder",
            "dataset_fingerprint": "the experts were trained on other data: retrain on this one",
        }
        given = {
            "method": method,
            "image_encoder": image_encoder,
            "text_encoder": text_encoder,
            "dim": dim,
            "d_img": d_img,
            "d_txt": d_txt,
            "dataset_fingerprint": dataset_fingerprint,
        }
        problems = []
        for k, v in given.items():
            if v is None:
                continue
            have = self.manifest.get(k)
            if have != v:
                problems.append(f"{k}: store has {have!r}, run wants {v!r} ({hints[k]})")
        if problems:
            raise ValueError(
                f"expert store {self.root} is incompatible with this run:\n  "
                + "\n  ".join(problems)
            )

    def __repr__(self) -> str:
        return (
            f"TrajectoryStore({str(self.root)!r}, method={self.method!r}, experts={len(self)}, "
            f"epochs={self.epochs}, numel={{image: {self.numel('image')}, "
            f"text: {self.numel('text')}}}, device={self.device})"
        )
