"""Expert training (docs/algorithm.md §3): one recipe, one loop, two kinds of student.

Both kinds train with a contrastive loss against identity targets (symmetric CLIP InfoNCE by
default) on batches of captions with plain SGD (momentum 0, weight decay 0), and store their
trajectories with :class:`repblend_fast.experts.writer.StoreWriter`:

- **RepBlend** (:func:`train_experts_symmetric`): an image head ``d_f -> dim`` and a text head
  ``d_t -> dim`` on frozen encoders. The encoders are frozen, so experts train on cached features
  (one encoder pass over the dataset; ``V`` cached augmented views stand in for on-the-fly
  augmentation), orders of magnitude cheaper than re-running the image encoder every batch.
- **LoRS / MTT-VL** (:func:`train_experts_lors`): the image side is the whole image encoder (its
  pooled features must have the text head's width), the text side a head ``d_t -> d_f``.

What differs between the two is a :class:`~repblend_fast.experts.students.Student` (how each side
is initialised and embeds a batch, and how the manifest describes it;
:mod:`repblend_fast.experts.students`); the recipe is
:class:`~repblend_fast.experts.recipe.ExpertRecipe`. This module holds the loop
(:func:`_train_one`), the manifest of a build, and the build itself, in one process or spread
over the processes of a torchrun launch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from repblend_fast import distributed
from repblend_fast.experts.manifest import FORMAT_VERSION, MODALITIES, snapshot_key
from repblend_fast.experts.recipe import ExpertRecipe, expert_seed, tensor_fingerprint
from repblend_fast.experts.students import Student, lors_student, repblend_student
from repblend_fast.experts.writer import StoreWriter
from repblend_fast.models.heads import init_head_flat

__all__ = [
    "ExpertRecipe",
    "expert_seed",
    "tensor_fingerprint",
    "train_experts_lors",
    "train_experts_symmetric",
    "train_student_experts",
]


def _train_one(recipe: ExpertRecipe, student: Student, es: int, bar):
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


def _manifest(recipe: ExpertRecipe, student: Student, identity: dict[str, Any]) -> dict[str, Any]:
    keep = recipe.kept()
    # Recorded only when known (the pipeline always knows it; a library call on ready-made
    # features may not), so such stores keep the recipe they always had.
    size = {} if identity.get("image_size") is None else {"image_size": int(identity["image_size"])}
    return {
        **size,
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
    student: Student,
    out_dir: str | os.PathLike,
    identity: dict[str, Any],
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
    student: Student,
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


def train_student_experts(
    build: Callable[..., tuple[Student, str]],
    *,
    out_dir: str | os.PathLike,
    recipe: ExpertRecipe | None = None,
    image_encoder: str = "unknown",
    text_encoder: str = "unknown",
    dataset_fingerprint: str | None = None,
    image_size: int | None = None,
    device: str | torch.device | None = None,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    **recipe_kw: Any,
) -> Path:
    """Train the experts of the student ``build(dropout=, device=, dataset_fingerprint=)``
    returns (with the dataset fingerprint) and store them; returns ``out_dir``. What differs
    between the kinds of expert is their :class:`~repblend_fast.experts.students.Student`; the
    rest is this.

    Args:
        recipe: an :class:`ExpertRecipe`; its fields can also be given (or overridden) as
            keywords (``num_experts=5, epochs=3, batch_size=32, ...``).
        image_encoder, text_encoder: encoder ids (``info.encoder_id`` / ``TextEncoder.encoder_id``).
        dataset_fingerprint: identifies the training data (default: a hash of the inputs).
        image_size: the pixel size the images were encoded at, recorded in the manifest (and so
            in its recipe: a rerun at another size is another store, `distill` checks it).
        device: where to train (default: the inputs' device).
        resume: keep expert files of an identical earlier run instead of retraining them.
        overwrite: replace a finished store of other settings in ``out_dir`` (refused
            otherwise: :class:`repblend_fast.experts.store.StoreExistsError`).
    """
    recipe = ExpertRecipe.from_kwargs(recipe, recipe_kw)
    student, fingerprint = build(
        dropout=recipe.dropout, device=device, dataset_fingerprint=dataset_fingerprint
    )
    identity = {
        "image_encoder": image_encoder,
        "text_encoder": text_encoder,
        "dataset_fingerprint": fingerprint,
        "image_size": image_size,
    }
    return _train_and_store(
        recipe, student, out_dir, identity, resume=resume, progress=progress, overwrite=overwrite
    )


def train_experts_symmetric(
    img_feats: torch.Tensor,
    txt_feats: torch.Tensor,
    cap2img: torch.Tensor,
    *,
    dim: int,
    **options: Any,
) -> Path:
    """Train RepBlend experts (image and text heads) on cached features; returns ``out_dir``.

    Args:
        img_feats: frozen image-encoder features ``[N_img, d_f]``, or ``[V, N_img, d_f]`` for
            ``V`` cached augmented views (each caption's pair uses a random view each epoch).
        txt_feats: frozen text-encoder features ``[N_cap, d_t]``, one row per caption.
        cap2img: ``[N_cap]`` int64, the image index of each caption.
        dim: head output width ``D``.
        options: ``out_dir`` and the other keywords of :func:`train_student_experts`.
    """

    def build(**kw):
        return repblend_student(img_feats, txt_feats, cap2img, dim=dim, **kw)

    return train_student_experts(build, **options)


def train_experts_lors(
    encoder: nn.Module,
    images: torch.Tensor,
    txt_feats: torch.Tensor,
    cap2img: torch.Tensor,
    **options: Any,
) -> Path:
    """Train LoRS / MTT-VL experts: the whole image encoder and a text head ``d_t -> d_f``.

    ``images`` are encoder inputs (already normalised) ``[N_img, 3, H, W]`` or
    ``[V, N_img, 3, H, W]``; ``encoder`` (the module) maps them to pooled features ``[B, d_f]``.
    Every expert starts from the encoder's current parameters (all of them, in ``named_parameters``
    order: ``FlatSpec.from_module(encoder, trainable_only=False)``) and a fresh text head. The
    encoder runs in eval mode (batch-norm statistics frozen, no dropout), consistent with the
    student in the distillation unroll; the text head keeps dropout on. ``options``: ``out_dir``
    and the other keywords of :func:`train_student_experts` (``image_encoder`` is the encoder's
    id string).
    """

    def build(**kw):
        return lors_student(encoder, images, txt_feats, cap2img, **kw)

    return train_student_experts(build, **options)
