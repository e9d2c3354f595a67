"""Expert trajectories (docs/algorithm.md §3): training (:mod:`.train`) and the safetensors store
(:mod:`.store`)."""

from repblend_fast.experts.store import (
    FORMAT_VERSION,
    MANIFEST,
    MODALITIES,
    StoreWriter,
    TrajectoryStore,
)
from repblend_fast.experts.train import (
    ExpertRecipe,
    expert_seed,
    tensor_fingerprint,
    train_experts_lors,
    train_experts_symmetric,
)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "MODALITIES",
    "ExpertRecipe",
    "StoreWriter",
    "TrajectoryStore",
    "expert_seed",
    "tensor_fingerprint",
    "train_experts_lors",
    "train_experts_symmetric",
]
