"""Student projection heads and frozen-encoder loaders."""

from repblend_fast.models.heads import HeadSpec, ProjectionHead, head_forward, init_head_flat

__all__ = ["HeadSpec", "ProjectionHead", "head_forward", "init_head_flat"]
from repblend_fast.models.encoders import (  # noqa: E402
    ImageEncoderInfo,
    TextEncoder,
    load_image_encoder,
    load_text_encoder,
)

__all__ += ["ImageEncoderInfo", "TextEncoder", "load_image_encoder", "load_text_encoder"]
