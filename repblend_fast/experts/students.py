"""The two kinds of expert student (docs/algorithm.md §3): what each trains, how each side is
initialised and embeds a batch, and how the store's manifest describes it.

- **RepBlend** (:func:`repblend_student`): an image head ``d_f -> dim`` and a text head
  ``d_t -> dim`` on frozen encoders, trained on cached features (``V`` cached augmented views stand
  in for on-the-fly augmentation).
- **LoRS / MTT-VL** (:func:`lors_student`): the image side is the whole image encoder (its pooled
  features must have the text head's width), the text side a head ``d_t -> d_f``.

Each builder checks its inputs and returns a :class:`Student` plus the dataset fingerprint; the
training loop (:mod:`repblend_fast.experts.train`) is the same for both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from repblend_fast.experts.manifest import head_layout, module_layout
from repblend_fast.experts.recipe import is_integer, tensor_fingerprint
from repblend_fast.models.flat import FlatSpec, functional_forward
from repblend_fast.models.heads import HeadSpec, head_forward, init_head_flat

__all__ = ["Student", "lors_student", "repblend_student"]


@dataclass
class Student:
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


def repblend_student(
    img_feats: torch.Tensor,
    txt_feats: torch.Tensor,
    cap2img: torch.Tensor,
    *,
    dim: int,
    dropout: float,
    device: str | torch.device | None,
    dataset_fingerprint: str | None,
) -> tuple[Student, str]:
    """The RepBlend student (two heads of width ``dim`` with head ``dropout``) on features
    ``[N_img, d_f]`` or ``[V, N_img, d_f]``, and the dataset fingerprint (``dataset_fingerprint``
    or a hash of the inputs). Arguments as in
    :func:`repblend_fast.experts.train.train_experts_symmetric`."""
    if not is_integer(dim) or dim < 1:
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

    def embed_img(flat, caps, views, gen):
        h = feats[views, c2i[caps]]
        return head_forward(flat, h, ispec, dropout=dropout, generator=gen)

    def embed_txt(flat, caps, gen):
        return head_forward(flat, texts[caps], tspec, dropout=dropout, generator=gen)

    student = Student(
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
    return student, dataset_fingerprint


def lors_student(
    encoder: nn.Module,
    images: torch.Tensor,
    txt_feats: torch.Tensor,
    cap2img: torch.Tensor,
    *,
    dropout: float,
    device: str | torch.device | None,
    dataset_fingerprint: str | None,
) -> tuple[Student, str]:
    """The LoRS / MTT-VL student (the whole ``encoder``, moved to the device in eval mode, and a
    text head with ``dropout``) on encoder inputs ``[N_img, C, H, W]`` or ``[V, N_img, C, H, W]``,
    and the dataset fingerprint. Arguments as in
    :func:`repblend_fast.experts.train.train_experts_lors`."""
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

    def embed_img(flat, caps, views, gen):
        return functional_forward(encoder, ispec, flat, pix[views, c2i[caps]])

    def embed_txt(flat, caps, gen):
        return head_forward(flat, texts[caps], tspec, dropout=dropout, generator=gen)

    student = Student(
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
    return student, dataset_fingerprint
