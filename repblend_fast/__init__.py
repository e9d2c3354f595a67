"""repblend_fast: fast multimodal (image-text) dataset distillation.

RepBlend (representation blending + symmetric trajectory matching) with LoRS and MTT-VL as baselines
in the same engine. Importing the package needs only torch and probes no device.
"""

from repblend_fast.ops import blend_pairs, contrastive_loss, trajectory_distance, trajectory_terms

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "blend_pairs",
    "contrastive_loss",
    "trajectory_distance",
    "trajectory_terms",
]
