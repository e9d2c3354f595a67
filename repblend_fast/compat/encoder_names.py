"""The research scripts' encoder names and the local files their code loads for them.

``--image_encoder`` names map to the timm architecture their code builds
(:data:`IMAGE_ENCODER_ALIASES`); some of those are built with their 1000-class classifier, which
repblend_fast does not reproduce (:data:`CLASSIFIER_KEPT`); and their code loads some weights
from ``./distill_utils/checkpoints`` (:func:`local_image_weights`, :func:`local_text_model`).
"""

from __future__ import annotations

from repblend_fast.compat.flag_specs import SCRIPT_FACTS

__all__ = [
    "CLASSIFIER_KEPT",
    "IMAGE_ENCODER_ALIASES",
    "local_image_weights",
    "local_text_model",
]

# Their --image_encoder names -> the timm architecture their code builds.
IMAGE_ENCODER_ALIASES = {
    "nfnet": "nfnet_l0",
    "vit": "vit_tiny_patch16_224",
    "nf_resnet50": "nf_resnet50",
    "nf_regnet": "nf_regnet_b1",
    "dinov2": "vit_base_patch16_224.dino",
}
# Names whose timm model their code builds *with* its 1000-class classifier (features are class
# logits); repblend_fast builds pooled feature extractors (num_classes=0) only.
CLASSIFIER_KEPT = {
    "repblend": {"vit"},
    "lors": {"vit", "nf_resnet50", "nf_regnet"},
    "mtt-vl": {"vit", "nf_resnet50", "nf_regnet"},
}
# Local weight files their code loads (relative to the folder it runs in).
_LOCAL_IMAGE_WEIGHTS = {
    ("repblend", "nfnet"): "distill_utils/checkpoints/nfnet_l0_ra2-45c6688d.pth",
    ("repblend", "nf_resnet50"): "distill_utils/checkpoints/nf_resnet50_ra2_in1k.pth",
    ("repblend", "nf_regnet"): "distill_utils/checkpoints/nf_regnet_b1_ra2_in1k.pth",
    ("lors", "nfnet"): "distill_utils/checkpoints/nfnet_l0_ra2-45c6688d.pth",
}
_LOCAL_TEXT_MODELS = {
    "bert": "distill_utils/checkpoints/bert-base-uncased",
    "distilbert": "distill_utils/checkpoints/distilbert-base-uncased",
    "bge": "distill_utils/checkpoints/bge-base-en-v1.5",
}


def local_image_weights(script: str, name: str) -> str | None:
    """The local weights file their code loads for ``--image_encoder name`` (None if it has
    none: their code downloads it)."""
    return _LOCAL_IMAGE_WEIGHTS.get((script, name))


def local_text_model(script: str, name: str) -> str | None:
    """The local Hugging Face folder their code loads for ``--text_encoder name``."""
    if SCRIPT_FACTS[script].text_from_hub:
        return None  # VL-distill loads bert-base-uncased from the hub
    return _LOCAL_TEXT_MODELS.get(name)
