"""Expert training (docs/algorithm.md §3): one recipe, one loop, two kinds of student.

Both kinds train with a contrastive loss against identity targets (symmetric CLIP InfoNCE by
default) on batches of captions with plain SGD (momentum 0, weight decay 0), and store their
trajectories with :class:`repblend_fast.experts.store.StoreWriter`:

- **RepBlend** (:func:`train_experts_symmetric`): an image head ``d_f -> dim`` and a text head
  ``d_t -> dim`` on frozen encoders. The encoders are frozen, so experts train on cached features
  (one encoder pass over the dataset; ``V`` cached augmented views stand in for on-the-fly
  augmentation), orders of magnitude cheaper than re-running the image encoder every batch.
- **LoRS / MTT-VL** (:func:`train_experts_lors`): the image side is the whole image encoder (its
  pooled features must have the text head's width), the text side a head ``d_t -> d_f``.

What differs between the two is a :class:`_Student` (how each side is initialised and embeds a
batch, and how the manifest describes it); everything else is :class:`ExpertRecipe` and
:func:`_train_one`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from repblend_fast import distributed
from repblend_fast.experts.store import (
    FORMAT_VERSION,
    MODALITIES,
    StoreWriter,
    head_layout,
    module_layout,
    snapshot_key,
)
from repblend_fast.models.flat import FlatSpec, functional_forward
from repblend_fast.models.heads import HeadSpec, head_forward, init_head_flat

__all__ = [
    "ExpertRecipe",
    "expert_seed",
    "tensor_fingerprint",
    "train_experts_lors",
    "train_experts_symmetric",
]


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


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


@dataclass(frozen=True)
class ExpertRecipe:
    """How experts are trained, for both kinds.

    Attributes:
        num_experts, epochs: how many experts, and epochs per expert. Training stops after the
            last epoch in ``keep_epochs`` (later epochs could not change any stored snapshot).
        batch_size: captions per SGD step.
        lr, lr_txt: SGD learning rates of the image side and the text head (``lr_txt`` defaults
            to ``lr``); momentum 0, weight decay 0, no decay.
        logit_scale, loss: ``s = 1/τ`` and the contrastive loss (identity targets).
        dropout: head dropout during expert training (on, as in the research code).
        keep_epochs: which snapshots to store (default all ``0..epochs``; 0 = initialisation).
        seed: run seed; expert ``i`` uses :func:`expert_seed` ``(seed, i)`` for its
            initialisation (image side first, then text head, from one CPU generator), its
            caption order and its dropout masks.
    """

    num_experts: int
    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    lr_txt: float | None = None
    logit_scale: float = 1 / 0.07
    loss: str = "infonce"
    dropout: float = 0.1
    keep_epochs: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        # Types first: a float count or a NaN rate would otherwise train silently wrong experts.
        for name in ("num_experts", "epochs", "batch_size", "seed"):
            v = getattr(self, name)
            if not _is_int(v):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        for name in ("lr", "lr_txt", "logit_scale", "dropout"):
            v = getattr(self, name)
            if v is None and name == "lr_txt":
                continue
            if not _is_real(v) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.keep_epochs is not None:
            if not all(_is_int(e) for e in self.keep_epochs):
                raise ValueError(f"keep_epochs must be integers, got {self.keep_epochs!r}")
            object.__setattr__(self, "keep_epochs", tuple(int(e) for e in self.keep_epochs))
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_txt is not None and not self.lr_txt > 0:
            raise ValueError(f"lr_txt must be > 0, got {self.lr_txt}")
        if not 1 <= self.logit_scale <= 1000:
            raise ValueError(
                f"logit_scale must be in [1, 1000] (temperature 0.001 to 1), got {self.logit_scale}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.kept()  # validates epochs / keep_epochs

    @property
    def text_lr(self) -> float:
        return self.lr if self.lr_txt is None else self.lr_txt

    def kept(self) -> list[int]:
        """The stored epochs, sorted (``ValueError`` for an invalid ``keep_epochs``)."""
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.keep_epochs is None:
            return list(range(self.epochs + 1))
        keep = sorted(set(self.keep_epochs))
        bad = [e for e in keep if e < 0 or e > self.epochs]
        if not keep or bad:
            raise ValueError(
                f"keep_epochs must be a non-empty subset of 0..{self.epochs} (epoch 0 = "
                f"initialisation); got {sorted(self.keep_epochs)}"
            )
        return keep

    @classmethod
    def from_kwargs(cls, recipe: ExpertRecipe | None, kw: dict[str, Any]) -> ExpertRecipe:
        """``recipe`` with the keyword fields in ``kw`` applied (``TypeError`` for unknown ones)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise TypeError(f"unknown expert recipe arguments {unknown}; known: {sorted(names)}")
        if recipe is None:
            return cls(**kw)
        return dataclasses.replace(recipe, **kw)


@dataclass
class _Student:
    """What one kind of expert trains: initial flat vectors and batch embeddings of each side.

    ``embed_img(flat, captions [B], views [B], gen) -> [B, D]`` and ``embed_txt(flat, captions,
    gen) -> [B, D]`` give the un-normalised embeddings of a batch of captions' pairs.
    """

    method: str
    layouts: dict
    init_img: Callable[[torch.Generator], torch.Tensor]
    txt_spec: HeadSpec
    embed_img: Callable
    embed_txt: Callable
    dim: int
    d_img: int
    d_txt: int
    encoder_mode: str
    n_img: int
    num_views: int
    c2i: torch.Tensor
    device: torch.device


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


def _train_one(recipe: ExpertRecipe, student: _Student, es: int, bar):
    """Train one expert seeded with ``es``; returns ``({key: snapshot}, mean loss per epoch)``
    with the snapshots on the CPU."""
    from repblend_fast.ops import contrastive_loss

    dev = student.device
    keep = recipe.kept()
    init_gen = torch.Generator().manual_seed(es)
    img_flat = student.init_img(init_gen).to(dev)
    txt_flat = init_head_flat(student.txt_spec.d_in, student.txt_spec.dim, generator=init_gen)
    txt_flat = txt_flat.to(dev)
    data_gen = torch.Generator().manual_seed(es ^ 0x5DEECE66D)
    drop_gen = torch.Generator(device=dev).manual_seed(es ^ 0xB5297A4D)
    n_cap, num_views = student.c2i.numel(), student.num_views
    snaps: dict[str, torch.Tensor] = {}

    def keep_snapshot(epoch: int) -> None:
        if epoch in keep:
            snaps[snapshot_key("image", epoch)] = img_flat.detach().to("cpu", copy=True)
            snaps[snapshot_key("text", epoch)] = txt_flat.detach().to("cpu", copy=True)

    keep_snapshot(0)
    losses: list[float] = []
    eyes: dict[int, torch.Tensor] = {}
    for epoch in range(1, max(keep) + 1):
        # Captions in shuffled order, one entry per caption (the research code's dataset), each
        # with one of its image's cached views drawn afresh per epoch.
        perm = torch.randperm(n_cap, generator=data_gen)
        views = (
            torch.randint(num_views, (n_cap,), generator=data_gen)
            if num_views > 1
            else torch.zeros(n_cap, dtype=torch.long)
        )
        total, count = torch.zeros((), dtype=torch.float64, device=dev), 0
        for start in range(0, n_cap, recipe.batch_size):
            caps = perm[start : start + recipe.batch_size].to(dev)
            v = views[start : start + recipe.batch_size].to(dev)
            b = caps.numel()
            ti = img_flat.detach().requires_grad_(True)
            tt = txt_flat.detach().requires_grad_(True)
            u = student.embed_img(ti, caps, v, drop_gen)
            w = student.embed_txt(tt, caps, drop_gen)
            if b not in eyes:
                eyes[b] = torch.eye(b, device=dev, dtype=u.dtype)
            ell = contrastive_loss(u, w, eyes[b], logit_scale=recipe.logit_scale, loss=recipe.loss)
            gi, gt = torch.autograd.grad(ell, [ti, tt])
            with torch.no_grad():
                img_flat = img_flat - recipe.lr * gi
                txt_flat = txt_flat - recipe.text_lr * gt
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


def _manifest(recipe: ExpertRecipe, student: _Student, identity: dict[str, str]) -> dict[str, Any]:
    keep = recipe.kept()
    return {
        "format_version": FORMAT_VERSION,
        "method": student.method,
        "num_experts": recipe.num_experts,
        "epochs": keep,
        "epochs_requested": recipe.epochs,
        "epochs_trained": max(keep),
        "modalities": student.layouts,
        "numel": {m: student.layouts[m]["numel"] for m in MODALITIES},
        "image_encoder": identity["image_encoder"],
        "text_encoder": identity["text_encoder"],
        "d_img": student.d_img,
        "d_txt": student.d_txt,
        "dim": student.dim,
        "dataset_fingerprint": identity["dataset_fingerprint"],
        "logit_scale": float(recipe.logit_scale),
        "loss": recipe.loss,
        "train": {
            "optimizer": "sgd",
            "batch_size": recipe.batch_size,
            "lr_img": float(recipe.lr),
            "lr_txt": float(recipe.text_lr),
            "momentum": 0.0,
            "weight_decay": 0.0,
            "dropout": float(recipe.dropout),
            "seed": int(recipe.seed),
            "num_views": int(student.num_views),
            "num_images": int(student.n_img),
            "num_captions": int(student.c2i.numel()),
            "image_encoder_mode": student.encoder_mode,
            "targets": "identity",
            "threads": torch.get_num_threads(),
        },
    }


def _train_and_store(
    recipe: ExpertRecipe,
    student: _Student,
    out_dir: str | os.PathLike,
    identity: dict[str, str],
    *,
    resume: bool,
    progress: bool,
    overwrite: bool = False,
) -> Path:
    """Train experts ``0..num_experts-1`` (keeping valid files of an identical earlier run when
    ``resume``), one file each, then the manifest; the writer holds the folder's lock. Under
    torchrun the experts are spread over the processes (:func:`_train_sharded`)."""
    from tqdm.auto import tqdm

    manifest = _manifest(recipe, student, identity)
    ctx = distributed.current()
    if ctx is not None:
        return _train_sharded(
            ctx,
            recipe,
            student,
            out_dir,
            manifest,
            resume=resume,
            progress=progress,
            overwrite=overwrite,
        )
    writer = StoreWriter(out_dir, manifest, resume=resume, overwrite=overwrite)
    last = max(recipe.kept())
    keys = {snapshot_key(m, t) for m in MODALITIES for t in recipe.kept()}
    bar = tqdm(
        total=recipe.num_experts * last,
        disable=not progress,
        desc=f"{student.method} experts",
        unit="epoch",
    )
    try:
        for i in range(recipe.num_experts):
            es = expert_seed(recipe.seed, i)
            losses = writer.reusable(i, es, keys)
            if losses is not None:
                bar.update(last)
                writer.add(i, es, losses)
                continue
            bar.set_description(f"{student.method} expert {i + 1}/{recipe.num_experts}")
            snaps, losses = _train_one(recipe, student, es, bar)
            writer.add(i, es, losses, snaps)
        return writer.finish()
    finally:
        bar.close()
        writer.close()


def _train_sharded(
    ctx: distributed.Context,
    recipe: ExpertRecipe,
    student: _Student,
    out_dir: str | os.PathLike,
    manifest: dict[str, Any],
    *,
    resume: bool,
    progress: bool,
    overwrite: bool,
) -> Path:
    """:func:`_train_and_store` over the W processes of a torchrun launch: expert ``e`` on rank
    ``e mod W`` (its bytes depend only on its seed, not on the rank or on W).

    Rank 0 prepares the folder (lock, earlier manifest demoted or removed, the records of an
    interrupted build merged) and tells the other ranks which existing files they may keep;
    every rank writes its experts' files and records them as it goes (rank 0 in
    ``manifest.partial.json``, rank r in ``manifest.partial.rank{r}.json``, so a killed build
    keeps every finished expert, whatever the world size of the rerun); once every rank has
    reported, rank 0 lists all of them in the manifest. No rank reports success before the
    manifest is written.
    """
    from tqdm.auto import tqdm

    writer: StoreWriter | None = None

    def prepare() -> dict:
        nonlocal writer
        writer = StoreWriter(out_dir, manifest, resume=resume, overwrite=overwrite)
        return writer.shard_info()

    try:
        info = ctx.from_main("buffer:prepare", prepare)
        if not ctx.is_main:
            writer = StoreWriter(out_dir, manifest, resume=resume, follow=info, rank=ctx.rank)
        last = max(recipe.kept())
        keys = {snapshot_key(m, t) for m in MODALITIES for t in recipe.kept()}
        mine = ctx.shard(range(recipe.num_experts))
        bar = tqdm(
            total=len(mine) * last,
            disable=not progress or not ctx.is_main,
            desc=f"{student.method} experts",
            unit="epoch",
        )
        done: dict[str, list] = {}
        try:
            for i in mine:
                es = expert_seed(recipe.seed, i)
                losses = writer.reusable(i, es, keys)
                if losses is not None:
                    digest = writer.reused_digest(i)
                    bar.update(last)
                else:
                    bar.set_description(
                        f"{student.method} expert {i + 1}/{recipe.num_experts} "
                        f"(rank 0 of {ctx.world})"
                    )
                    snaps, losses = _train_one(recipe, student, es, bar)
                    digest = writer.write_expert(i, es, losses, snaps)
                done[str(i)] = [es, losses, digest.to_json()]
        finally:
            bar.close()
        reports: dict[str, list] = {}
        for part in ctx.exchange("buffer:experts", done):
            reports.update(part)
        if ctx.is_main:
            from repblend_fast.io import FileDigest

            for i in range(recipe.num_experts):
                es, losses, digest = reports[str(i)]
                writer.add(i, es, losses, digest=FileDigest.from_json(digest, f"expert {i}"))
            writer.finish()
        ctx.barrier("buffer:manifest")
        return Path(out_dir)
    finally:
        if writer is not None:
            writer.close()


def train_experts_symmetric(
    img_feats: torch.Tensor,
    txt_feats: torch.Tensor,
    cap2img: torch.Tensor,
    *,
    dim: int,
    out_dir: str | os.PathLike,
    recipe: ExpertRecipe | None = None,
    image_encoder: str = "unknown",
    text_encoder: str = "unknown",
    dataset_fingerprint: str | None = None,
    device: str | torch.device | None = None,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    **recipe_kw: Any,
) -> Path:
    """Train RepBlend experts (image and text heads) on cached features; returns ``out_dir``.

    Args:
        img_feats: frozen image-encoder features ``[N_img, d_f]``, or ``[V, N_img, d_f]`` for
            ``V`` cached augmented views (each caption's pair uses a random view each epoch).
        txt_feats: frozen text-encoder features ``[N_cap, d_t]``, one row per caption.
        cap2img: ``[N_cap]`` int64, the image index of each caption.
        dim: head output width ``D``.
        recipe: an :class:`ExpertRecipe`; its fields can also be given (or overridden) as
            keywords (``num_experts=5, epochs=3, batch_size=32, ...``).
        image_encoder, text_encoder: encoder ids (``info.encoder_id`` / ``TextEncoder.encoder_id``).
        dataset_fingerprint: identifies the training data (default: a hash of the inputs).
        device: where to train (default: ``img_feats``'s device).
        resume: keep expert files of an identical earlier run instead of retraining them.
        overwrite: replace a finished store of other settings in ``out_dir`` (refused
            otherwise: :class:`repblend_fast.experts.store.StoreExistsError`).
    """
    recipe = ExpertRecipe.from_kwargs(recipe, recipe_kw)
    if not _is_int(dim) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if img_feats.dim() == 2:
        img_feats = img_feats.unsqueeze(0)
    if img_feats.dim() != 3:
        raise ValueError(
            f"img_feats must be [N_img, d_f] or [V, N_img, d_f], got {tuple(img_feats.shape)}"
        )
    _check_pairs(img_feats.shape[1], txt_feats, cap2img)
    dev = torch.device(device) if device is not None else img_feats.device
    num_views, n_img, d_f = img_feats.shape
    d_t = txt_feats.shape[1]
    if dataset_fingerprint is None:
        dataset_fingerprint = tensor_fingerprint(img_feats, txt_feats, cap2img)
    feats = img_feats.to(dev, torch.float32)
    texts = txt_feats.to(dev, torch.float32)
    c2i = cap2img.to(dev)
    ispec, tspec = HeadSpec(d_f, dim), HeadSpec(d_t, dim)
    dropout = recipe.dropout

    def embed_img(flat, caps, views, gen):
        h = feats[views, c2i[caps]]
        return head_forward(flat, h, ispec, dropout=dropout, generator=gen)

    def embed_txt(flat, caps, gen):
        return head_forward(flat, texts[caps], tspec, dropout=dropout, generator=gen)

    student = _Student(
        method="repblend",
        layouts={"image": head_layout(ispec), "text": head_layout(tspec)},
        init_img=lambda g: init_head_flat(d_f, dim, generator=g),
        txt_spec=tspec,
        embed_img=embed_img,
        embed_txt=embed_txt,
        dim=dim,
        d_img=d_f,
        d_txt=d_t,
        encoder_mode="frozen",
        n_img=n_img,
        num_views=num_views,
        c2i=c2i,
        device=dev,
    )
    identity = {
        "image_encoder": image_encoder,
        "text_encoder": text_encoder,
        "dataset_fingerprint": dataset_fingerprint,
    }
    return _train_and_store(
        recipe, student, out_dir, identity, resume=resume, progress=progress, overwrite=overwrite
    )


def train_experts_lors(
    encoder: nn.Module,
    images: torch.Tensor,
    txt_feats: torch.Tensor,
    cap2img: torch.Tensor,
    *,
    out_dir: str | os.PathLike,
    recipe: ExpertRecipe | None = None,
    image_encoder: str = "unknown",
    text_encoder: str = "unknown",
    dataset_fingerprint: str | None = None,
    device: str | torch.device | None = None,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    **recipe_kw: Any,
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
    recipe = ExpertRecipe.from_kwargs(recipe, recipe_kw)
    if images.dim() == 4:
        images = images.unsqueeze(0)
    if images.dim() != 5:
        raise ValueError(
            f"images must be [N_img, C, H, W] or [V, N_img, C, H, W], got {tuple(images.shape)}"
        )
    _check_pairs(images.shape[1], txt_feats, cap2img)
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
    dropout = recipe.dropout

    def embed_img(flat, caps, views, gen):
        return functional_forward(encoder, ispec, flat, pix[views, c2i[caps]])

    def embed_txt(flat, caps, gen):
        return head_forward(flat, texts[caps], tspec, dropout=dropout, generator=gen)

    student = _Student(
        method="lors",
        layouts={"image": module_layout(ispec), "text": head_layout(tspec)},
        init_img=lambda g: theta0.clone(),
        txt_spec=tspec,
        embed_img=embed_img,
        embed_txt=embed_txt,
        dim=d_f,
        d_img=d_f,
        d_txt=d_t,
        encoder_mode="trained-eval",
        n_img=n_img,
        num_views=num_views,
        c2i=c2i,
        device=dev,
    )
    identity = {
        "image_encoder": image_encoder,
        "text_encoder": text_encoder,
        "dataset_fingerprint": dataset_fingerprint,
    }
    return _train_and_store(
        recipe, student, out_dir, identity, resume=resume, progress=progress, overwrite=overwrite
    )
