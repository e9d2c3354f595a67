"""Student projection heads and frozen-encoder loaders."""

from repblend_fast.models.heads import HeadSpec, ProjectionHead, head_forward, init_head_flat

__all__ = ["HeadSpec", "ProjectionHead", "head_forward", "init_head_flat"]
