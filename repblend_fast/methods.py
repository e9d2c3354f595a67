"""The distillation methods, stated once: one :class:`Method` entry per method and one
:class:`StudentKind` per kind of student the unroll and the experts train.

A method (``DistillConfig.method``: ``repblend``, ``lors``, ``mtt-vl``) holds what choosing it
implies: its defaults, its evaluation cadence, its label, whether it blends representations or
learns a similarity, and which student it trains (RepBlend's asymmetric ablation, ``symmetric=
False``, trains the encoder student). A student kind holds what the unroll and the expert training
do with it: how the image side is specified and embedded, which images an iteration encodes once
and shares, how many trajectories one unroll call takes, which experts it matches and how they
are trained. The rest of the package asks these objects instead of comparing names.

Adding a method is one :func:`register_method` call (docs/design.md, "Adding a method"). Heavy
modules are imported inside the hooks, so importing this module loads nothing but the standard
library.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "METHOD_REGISTRY",
    "STUDENT_KINDS",
    "Method",
    "StudentKind",
    "get_method",
    "register_method",
    "register_student_kind",
    "student_for_experts",
]


# ----------------------------------------------------------------------------- student kinds
class StudentKind:
    """What one kind of student trains and how the unroll embeds its image side.

    Attributes:
        name: ``heads`` or ``encoder`` (``DistillConfig.student``).
        experts: the expert kind it matches, the ``method`` of a store's manifest and of
            ``UnrollSettings.method`` (``repblend`` or ``lors``).
        frozen_encoder: the image side is a head on a frozen encoder's features, so that an
            iteration can encode its touched images once and share them (``share_encoder``),
            compile its step and budget the encoder graph's memory.
        trajectories_per_call: the most trajectories one unroll call takes (None: any).
        description: one line for the demo's log.
    """

    name: str
    experts: str
    frozen_encoder: bool
    trajectories_per_call: int | None
    description: str

    def image_spec_type(self) -> type:
        raise NotImplementedError

    def specs(self, encoder, d_f: int, d_txt: int, head_dim):
        """``(image spec, text spec)`` of the student; ``head_dim()`` gives the heads' width."""
        raise NotImplementedError

    def image_input(self, unroller, xl, idx, shared_rows, no_grad_encode: bool):
        """One step's image-side input ``[K, B, ...]`` for batch indices ``idx`` ``[K, B]``;
        ``shared_rows``: the rows of the shared features, or None."""
        raise NotImplementedError

    def embed_image(self, unroller, th_img, img_in, y_b, perm, lam, keep):
        """``(image embeddings [K, B, D], text inputs y_b)`` of one step, blended with the batch
        permutation ``perm`` (None: no blend)."""
        raise NotImplementedError

    def shares_encoder(self, settings) -> bool:
        """Whether an iteration encodes its touched images once (the unroll reads the shared
        features)."""
        return self.frozen_encoder and settings.share_encoder

    def train_experts(self, ds, enc, size: int, txt, *, dim: int, cache_dir, progress, common):
        """Train this kind's experts on dataset ``ds`` (``common``: the trainer's keywords)."""
        raise NotImplementedError


class HeadsStudent(StudentKind):
    """RepBlend's student: image and text heads on frozen-encoder features."""

    name = "heads"
    experts = "repblend"
    frozen_encoder = True
    trajectories_per_call = None
    description = "image + text heads on cached features"

    def image_spec_type(self) -> type:
        from repblend_fast.models.heads import HeadSpec

        return HeadSpec

    def specs(self, encoder, d_f, d_txt, head_dim):
        from repblend_fast.models.heads import HeadSpec

        dim = head_dim()
        return HeadSpec(d_f, dim), HeadSpec(d_txt, dim)

    def image_input(self, unroller, xl, idx, shared_rows, no_grad_encode):
        import torch

        if shared_rows is not None:
            return shared_rows
        k, b = idx.shape
        with torch.no_grad() if no_grad_encode else nullcontext():
            return unroller.encode(xl[idx.reshape(-1)]).reshape(k, b, -1)

    def embed_image(self, unroller, th_img, img_in, y_b, perm, lam, keep):
        from repblend_fast.models.heads import head_forward
        from repblend_fast.ops import blend_pairs

        if perm is not None:
            # The plan draws valid permutations and lam in [0, 1]: skip the host-synced checks.
            img_in, y_b = blend_pairs(img_in, y_b, perm, lam, check="none", impl=unroller._impl)
        return head_forward(th_img, img_in, unroller.img_spec, keep=keep), y_b

    def train_experts(self, ds, enc, size, txt, *, dim, cache_dir, progress, common):
        from repblend_fast import experts
        from repblend_fast.pipeline import image_features

        feats = image_features(ds, enc, size, cache_dir=cache_dir, progress=progress)
        return experts.train_experts_symmetric(feats, txt, ds.cap2img, dim=dim, **common)


class EncoderStudent(StudentKind):
    """LoRS's and MTT-VL's student: the whole image encoder and a text head."""

    name = "encoder"
    experts = "lors"
    frozen_encoder = False
    trajectories_per_call = 1
    description = "whole image encoder + text head"

    def image_spec_type(self) -> type:
        from repblend_fast.models.flat import FlatSpec

        return FlatSpec

    def specs(self, encoder, d_f, d_txt, head_dim):
        from repblend_fast.models.flat import FlatSpec
        from repblend_fast.models.heads import HeadSpec

        return FlatSpec.from_module(encoder, trainable_only=False), HeadSpec(d_txt, d_f)

    def image_input(self, unroller, xl, idx, shared_rows, no_grad_encode):
        return xl[idx]

    def embed_image(self, unroller, th_img, img_in, y_b, perm, lam, keep):
        from repblend_fast.models.flat import functional_forward
        from repblend_fast.ops import blend_pairs

        e_img = functional_forward(unroller.encoder, unroller.img_spec, th_img[0], img_in[0])[None]
        if perm is not None:
            # Asymmetric ablation: blend the student encoder's outputs with the texts.
            e_img, y_b = blend_pairs(e_img, y_b, perm, lam, check="none", impl=unroller._impl)
        return e_img, y_b

    def train_experts(self, ds, enc, size, txt, *, dim, cache_dir, progress, common):
        from repblend_fast import experts
        from repblend_fast.pipeline import load_images

        images = load_images(ds, enc, size, progress=progress)
        return experts.train_experts_lors(enc.image, images, txt, ds.cap2img, **common)


STUDENT_KINDS: dict[str, StudentKind] = {}


def register_student_kind(kind: StudentKind) -> StudentKind:
    """Add ``kind`` to :data:`STUDENT_KINDS` (replacing one of the same name); returns it. Its
    ``experts`` name must be its own (a store's manifest names the kind it was trained for)."""
    for other in STUDENT_KINDS.values():
        if other.experts == kind.experts and other.name != kind.name:
            raise ValueError(f"expert kind {kind.experts!r} belongs to student {other.name!r}")
    STUDENT_KINDS[kind.name] = kind
    return kind


register_student_kind(HeadsStudent())
register_student_kind(EncoderStudent())


def student_for_experts(kind: str) -> StudentKind:
    """The student kind whose experts are of kind ``kind`` (a manifest's ``method``)."""
    for s in STUDENT_KINDS.values():
        if s.experts == kind:
            return s
    want = sorted(s.experts for s in STUDENT_KINDS.values())
    raise ValueError(f"expert kind must be one of {want}, got {kind!r}")


# ----------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """One distillation method: what choosing it implies.

    Attributes:
        name: what users pass (``method="repblend"``, ``--method repblend``).
        label: its name in tables and logs.
        student: the student kind's name (``heads`` or ``encoder``).
        ablation_student: the student of its asymmetric ablation (``symmetric=False``), or None
            where the method has none.
        defaults: the ``DistillConfig`` fields choosing it sets unless the user says otherwise.
        eval_every: the evaluation cadence of its research code, in epochs (docs/algorithm.md §8).
        blends: whether it may blend representations (``blend``).
        learns_similarity: whether it may learn a similarity (else ``similarity='none'``).
    """

    name: str
    label: str
    student: str
    ablation_student: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 10
    blends: bool = False
    learns_similarity: bool = True

    def student_kind(self, symmetric: bool = True) -> StudentKind:
        """The student a run of this method trains (``symmetric=False``: its ablation's)."""
        name = self.student if symmetric or self.ablation_student is None else self.ablation_student
        return STUDENT_KINDS[name]

    @property
    def expert_kind(self) -> str:
        """The experts its (symmetric) student matches."""
        return self.student_kind().experts


METHOD_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (replacing one of the same name); returns it."""
    if method.student not in STUDENT_KINDS:
        raise ValueError(f"Method.student must be one of {sorted(STUDENT_KINDS)}")
    METHOD_REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name`` (``ValueError`` naming the choices otherwise)."""
    try:
        return METHOD_REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {tuple(METHOD_REGISTRY)}, got {name!r}") from None


REPBLEND = register_method(
    Method(
        "repblend",
        label="RepBlend",
        student="heads",
        ablation_student="encoder",
        eval_every=20,
        blends=True,
    )
)
# LoRS and MTT-VL have no frozen feature space to blend in (their image student is the encoder
# itself); MTT-VL learns no similarity and trains with the symmetric InfoNCE of CLIP.
LORS = register_method(
    Method(
        "lors",
        label="LoRS",
        student="encoder",
        defaults={"blend": False},
    )
)
MTT_VL = register_method(
    Method(
        "mtt-vl",
        label="MTT-VL",
        student="encoder",
        defaults={"blend": False, "similarity": "none", "loss": "infonce"},
        learns_similarity=False,
    )
)
