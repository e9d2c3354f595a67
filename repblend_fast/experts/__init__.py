"""Expert trajectories (docs/algorithm.md §3): the recipe (:mod:`.recipe`), the two kinds of
student (:mod:`.students`), training (:mod:`.train`), and the safetensors store: its manifest
(:mod:`.manifest`), its writer (:mod:`.writer`) and its reader (:mod:`.store`)."""

from repblend_fast.experts.recipe import ExpertRecipe, expert_seed, tensor_fingerprint
from repblend_fast.experts.store import (
    FORMAT_VERSION,
    MANIFEST,
    MODALITIES,
    StoreWriter,
    TrajectoryStore,
)
from repblend_fast.experts.train import (
    train_experts_lors,
    train_experts_symmetric,
    train_student_experts,
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
    "train_student_experts",
]
