"""The research scripts' distillation parsers, flag for flag: names, types, defaults, choices.

``distill_repblend.py`` (RepBlend) is written out in full; ``distill_tesla_lors.py`` (LoRS) and
VL-distill's ``distill.py`` (MTT-VL) are derived from it, flag by flag, with their own defaults,
types and choices (:data:`PARSER_SPECS`). How each flag maps onto repblend_fast is in
:mod:`repblend_fast.compat.flag_rules`.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

__all__ = ["PARSER_SPECS", "SCRIPTS", "SCRIPT_FACTS", "ScriptFacts", "script_flags"]


@dataclass(frozen=True)
class ScriptFacts:
    """What a research script's code fixes beyond its flags (keyed by the method it runs).

    Attributes:
        file: the script.
        meta_grad: ``tesla`` (their two-pass TESLA) or ``exact`` (backpropagation through the
            whole unroll).
        needs_projection: it fails without the image projection head.
        clip_from_package: its CLIP image tower comes from the ``clip`` package, not from timm.
        text_from_hub: it loads its text encoder from the Hugging Face hub (no local folder).
    """

    file: str
    meta_grad: str = "tesla"
    needs_projection: bool = False
    clip_from_package: bool = False
    text_from_hub: bool = False


SCRIPT_FACTS = {
    "repblend": ScriptFacts("distill_repblend.py", needs_projection=True),
    "lors": ScriptFacts("distill_tesla_lors.py"),
    "mtt-vl": ScriptFacts(
        "distill.py (VL-distill)", meta_grad="exact", clip_from_package=True, text_from_hub=True
    ),
}
SCRIPTS = {name: facts.file for name, facts in SCRIPT_FACTS.items()}


# ----------------------------------------------------------------------------- parser specs
# (flag, type, default, choices) in each parser's order; type "store_true" for switches,
# bool for their type=bool flags. Defaults are theirs, except where their code replaces the
# value (RepBlend overwrites --image_root/--ann_root with placeholder text), given as None.
_NOW = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
_REPBLEND: list[tuple] = [
    ("dataset", str, "flickr", None),
    ("eval_mode", str, "S", None),
    ("num_eval", int, 1, None),
    ("eval_it", int, 150, None),
    ("epoch_eval_train", int, 100, None),
    ("Iteration", int, 3000, None),
    ("lr_img", float, 1000.0, None),
    ("lr_txt", float, 100.0, None),
    ("lr_lr", float, 1e-2, None),
    ("lr_teacher_img", float, 0.1, None),
    ("lr_teacher_txt", float, 0.1, None),
    ("loss_type", str, "WBCE", None),
    ("batch_train", int, 128, None),
    ("pix_init", str, "real", ["noise", "real"]),
    ("txt_init", str, "real", ["noise", "real"]),
    ("dsa", str, "False", ["True", "False"]),
    ("dsa_strategy", str, "color_crop_cutout_flip_scale_rotate", None),
    ("data_path", str, "", None),
    ("buffer_path", str, "", None),
    ("expert_epochs", int, 1, None),
    ("syn_steps", int, 8, None),
    ("max_start_epoch", int, 2, None),
    ("zca", "store_true", False, None),
    ("load_all", "store_true", False, None),
    ("no_aug", "store_true", False, None),
    ("texture", "store_true", False, None),
    ("canvas_size", int, 2, None),
    ("canvas_samples", int, 1, None),
    ("max_files", int, None, None),
    ("max_experts", int, None, None),
    ("force_save", bool, True, None),
    ("name", str, _NOW, None),
    ("num_queries", int, 100, None),
    ("mini_batch_size", int, 20, None),
    ("basis", bool, False, None),
    ("n_basis", int, 64, None),
    ("recursive", bool, False, None),
    ("load_npy", bool, False, None),
    ("image_size", int, 224, None),
    ("image_root", str, None, None),
    ("ann_root", str, None, None),
    ("batch_size_train", int, 128, None),
    ("batch_size_test", int, 128, None),
    ("image_encoder", str, "nfnet", None),
    ("text_encoder", str, "bert", ["bert", "clip", "distilbert", "bge"]),
    ("text_pretrained", bool, True, None),
    ("image_pretrained", bool, True, None),
    ("text_trainable", bool, False, None),
    ("image_trainable", bool, False, None),
    ("only_has_image_projection", bool, True, None),
    ("distill", bool, True, None),
    ("optimize", str, "reparam", ["reparam", "ift"]),
    ("image_only", bool, False, None),
    ("text_only", bool, False, None),
    ("draw", bool, False, None),
    ("transfer", bool, False, None),
    ("std", bool, True, None),
    ("disabled_wandb", bool, False, None),
    ("test_with_norm", bool, False, None),
    ("clamp_lr", float, None, None),
    ("resume_from", str, None, None),
    ("sim_type", str, "lowrank", ["full", "lowrank"]),
    ("sim_rank", int, 10, None),
    ("alpha", float, 3.0, None),
    ("alpha_2", float, 1.0, None),
    ("lr_sim", float, 10.0, None),
    ("temperature", float, 0.07, None),
    ("momentum_lr", float, 0.5, None),
    ("momentum_syn", float, 0.5, None),
    ("momentum_sim", float, 0.5, None),
    ("merge_loss_branches", "store_true", False, None),
]


def _derive(base: list[tuple], changes: dict[str, tuple], drop=(), insert=()) -> list[tuple]:
    out = []
    for spec in base:
        name = spec[0]
        if name in drop:
            continue
        out.append((name, *changes[name]) if name in changes else spec)
        for after, new in insert:
            if after == name:
                out.append(new)
    return out


_LORS = _derive(
    _REPBLEND,
    {
        "dataset": (str, "flickr30k", None),
        "num_eval": (int, 5, None),
        "eval_it": (int, 50, None),
        "lr_txt": (float, 1000.0, None),
        "lr_lr": (float, 1e-3, None),
        "loss_type": (str, None, None),
        "dsa": (str, "True", ["True", "False"]),
        "data_path": (str, "./data/Flickr30k/", None),
        "buffer_path": (str, "./buffers", None),
        "expert_epochs": (int, 3, None),
        "syn_steps": (int, 20, None),
        "max_start_epoch": (int, 25, None),
        "force_save": ("store_true", False, None),
        "mini_batch_size": (int, 100, None),
        "image_root": (str, "distill_utils/data/Flickr30k/", None),
        "ann_root": (str, "./data/Flickr30k_ann/", None),
        "text_encoder": (str, "bert", ["bert", "clip", "distilbert"]),
        "image_trainable": (bool, True, None),
        "only_has_image_projection": (bool, False, None),
        "sim_type": (str, "full", ["full", "lowrank"]),
        "alpha": (float, 0.1, None),
        "lr_sim": (float, 1e-3, None),
    },
    drop=("alpha_2",),
)
_MTTVL = _derive(
    _LORS,
    {
        "epoch_eval_train": (int, 50, None),
        "Iteration": (int, 50000, None),
        "batch_train": (int, 64, None),
        "no_aug": (bool, False, None),
        "image_root": (str, "./Flickr30k/flickr-image-dataset/flickr30k-images/", None),
        "ann_root": (str, "./Flickr30k/ann_file/", None),
        "image_encoder": (str, "nfnet", ["clip", "nfnet", "vit", "nf_resnet50"]),
        "text_encoder": (str, "bert", ["bert", "clip"]),
        "draw": (bool, True, None),
        "std": (bool, False, None),
    },
    drop=(
        "loss_type",
        "disabled_wandb",
        "test_with_norm",
        "clamp_lr",
        "resume_from",
        "sim_type",
        "sim_rank",
        "alpha",
        "lr_sim",
        "temperature",
        "momentum_lr",
        "momentum_syn",
        "momentum_sim",
        "merge_loss_branches",
    ),
    insert=(("dataset", ("ipc", int, 1, None)),),
)
PARSER_SPECS = {"repblend": _REPBLEND, "lors": _LORS, "mtt-vl": _MTTVL}


def script_flags(script: str) -> list[str]:
    """Every flag of ``script``'s parser, in its order (names without dashes)."""
    return [s[0] for s in PARSER_SPECS[script]]
