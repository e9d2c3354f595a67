"""How each of the research scripts' distillation flags maps onto repblend_fast.

Every flag has one :class:`FlagRule` in :data:`RULES`, of one kind (:data:`FLAG_KINDS`):

- ``field``: sets a :class:`~repblend_fast.config.DistillConfig` field (with a conversion where
  the meaning differs);
- ``setting``: sets something of the run outside the config (data, encoders, paths);
- ``logging``: only feeds their wandb logging, figures or in-loop evaluation; accepted, and a
  flag given on the command line is warned about once;
- ``ignored``: parsed but without effect in their distillation loop; accepted, warned about
  once when given;
- ``refused``: semantics this library does not reproduce; giving it is an error with the reason.

A rule's ``convert`` raises :class:`RefusedValue` for the values it does not take
(``--pix_init noise``, unequal ``--momentum_*``, ``--max_files 1``, ...).
:func:`implied_fields` lists the config fields each script's code fixes rather than a flag, and
:func:`flag_table` joins the rules with each script's parser (:mod:`.flag_specs`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from repblend_fast.compat.encoder_names import CLASSIFIER_KEPT, IMAGE_ENCODER_ALIASES
from repblend_fast.compat.flag_specs import PARSER_SPECS, SCRIPT_FACTS, SCRIPTS

__all__ = [
    "FLAG_KINDS",
    "MTTVL_TEMPERATURE",
    "RULES",
    "FlagRule",
    "RefusedValue",
    "flag_table",
    "implied_fields",
]

FLAG_KINDS = ("field", "setting", "logging", "ignored", "refused")
_LOSSES = {
    "WBCE": "wbce",
    "BalanceBCE": "wbce",
    "InfoNCE": "infonce",
    "NCE": "infonce",
    "CWCL": "cwcl",
    "BCE": "bce",
    "MSE": "mse",
    "KL": "kl",
}
# VL-distill multiplies the logits by log(1/0.07) ≈ 2.66 without exponentiating it: its
# distillation runs at temperature 1/log(1/0.07), not 0.07.
MTTVL_TEMPERATURE = 1.0 / math.log(1.0 / 0.07)


class RefusedValue(Exception):
    """Raised by a rule's ``convert`` for a value it does not take; the message says why
    (:func:`~repblend_fast.compat.flags.parse_authors_flags` names the flag)."""


@dataclass(frozen=True)
class FlagRule:
    """How one of their flags maps: ``kind`` (see :data:`FLAG_KINDS`), ``target`` (a
    DistillConfig field or setting name), ``note`` (the conversion or the reason), and
    ``convert(value, values, script) -> target value`` (raises ``RefusedValue`` for values it does
    not take)."""

    kind: str
    target: str = ""
    note: str = ""
    convert: Callable[[Any, dict, str], Any] | None = None
    refuses: str = ""  # which values are refused, for the table


def _same(v, values, script):
    return v


def _loss(v, values, script):
    if v is None:
        raise RefusedValue(
            "their script has no default loss: without --loss_type it stops at the first "
            "iteration (NotImplementedError); pass --loss_type WBCE as their published scripts do"
        )
    if v not in _LOSSES:
        raise RefusedValue(
            f"their loss module knows {sorted(_LOSSES)} and raises for anything else"
        )
    return _LOSSES[v]


def _equal_pair(names: tuple[str, ...], what: str):
    def conv(v, values, script):
        vals = {n: values[n] for n in names}
        if len(set(vals.values())) != 1:
            shown = ", ".join(f"--{k} {x}" for k, x in vals.items())
            raise RefusedValue(
                f"{shown}: repblend_fast has one {what} for all of them; make them equal"
            )
        return v

    return conv


def _clamp(v, values, script):
    return float(v) if v else None  # their `if args.clamp_lr:` treats 0 as off


def _checkpoint_every(v, values, script):
    return int(v) if v and v > 0 else 0


def _real_only(v, values, script):
    if v == "noise":
        raise RefusedValue("repblend_fast starts from random real pairs only (their 'real')")
    return "real pairs"


def _dataset(v, values, script):
    return {"flickr": "flickr30k", "flickr30k": "flickr30k", "coco": "coco"}.get(v, v)


def _image_encoder(v, values, script):
    if v == "clip":
        if SCRIPT_FACTS[script].clip_from_package:
            raise RefusedValue("its CLIP image tower comes from the `clip` package, not from timm")
        raise RefusedValue(
            "their code raises NotImplementedError for it (pretrained CLIP is unfair)"
        )
    if v in CLASSIFIER_KEPT[script]:
        raise RefusedValue(
            f"their script builds {IMAGE_ENCODER_ALIASES.get(v, v)} with its 1000-class "
            "classifier, so its features are class logits; repblend_fast builds pooled feature "
            "extractors (num_classes=0) only"
        )
    return IMAGE_ENCODER_ALIASES.get(v, v)


def _text_encoder(v, values, script):
    if v == "clip":
        raise RefusedValue(
            "the CLIP text tower comes from the `clip` package, not a Hugging Face folder; use "
            "a Hugging Face text encoder (bert, distilbert, bge)"
        )
    return v


def _pretrained_text(v, values, script):
    if not v:
        raise RefusedValue(
            "a randomly initialised text encoder for the initial texts is not supported"
        )
    return v


def _random_init(v, values, script):
    return not v


def _projection(v, values, script):
    if SCRIPT_FACTS[script].needs_projection and not v:
        raise RefusedValue(
            "their RepBlend script needs the image projection head and fails without it"
        )
    return v


def _max_files(v, values, script):
    if v == 1:
        raise RefusedValue(
            "with --max_files 1 their script cycles the experts of one randomly chosen file; "
            "import only that file pair instead"
        )
    return v


def _zca(v, values, script):
    if v:
        raise RefusedValue("ZCA whitening of the images is not supported")
    return v


_EVAL = "their in-loop evaluation, whose results only go to wandb: run `repblend-fast evaluate`"
RULES: dict[str, FlagRule] = {
    # --- DistillConfig fields
    "Iteration": FlagRule(
        "field",
        "iterations",
        "their loop applies one more, never saved, update after the last save; "
        "distilled_<Iteration>.pt is the state after Iteration updates in both",
        _same,
    ),
    "lr_img": FlagRule("field", "lr_img", "", _same),
    "lr_txt": FlagRule("field", "lr_txt", "", _same),
    "lr_lr": FlagRule("field", "lr_lr", "", _same),
    "lr_sim": FlagRule("field", "lr_sim", "", _same),
    "lr_teacher_img": FlagRule(
        "field",
        "lr_init",
        "their initial learnable student lr; also recorded as the experts' lr on import",
        _equal_pair(("lr_teacher_img", "lr_teacher_txt"), "initial student lr (lr_init)"),
        "a value different from --lr_teacher_txt",
    ),
    "lr_teacher_txt": FlagRule(
        "field",
        "lr_init",
        "see --lr_teacher_img",
        _equal_pair(("lr_teacher_img", "lr_teacher_txt"), "initial student lr (lr_init)"),
        "a value different from --lr_teacher_img",
    ),
    "syn_steps": FlagRule("field", "syn_steps", "", _same),
    "expert_epochs": FlagRule("field", "expert_epochs", "", _same),
    "max_start_epoch": FlagRule("field", "max_start_epoch", "", _same),
    "num_queries": FlagRule("field", "pairs", "", _same),
    "mini_batch_size": FlagRule("field", "batch_size", "", _same),
    "loss_type": FlagRule(
        "field",
        "loss",
        "WBCE/BalanceBCE -> wbce, InfoNCE/NCE -> infonce, CWCL, BCE, MSE, KL -> lower case",
        _loss,
        "none given (LoRS has no default), or a name their loss module does not know",
    ),
    "sim_type": FlagRule("field", "similarity", "", _same),
    "sim_rank": FlagRule("field", "sim_rank", "", _same),
    "alpha": FlagRule(
        "field", "sim_alpha", "the low-rank scale α of S = diag(a) + α/r L Rᵀ", _same
    ),
    "alpha_2": FlagRule(
        "field", "blend_alpha", "λ ~ Beta(α, α) of the blending; α <= 0: λ = 1", _same
    ),
    "temperature": FlagRule("field", "temperature", "", _same),
    "merge_loss_branches": FlagRule("field", "merge_loss", "", _same),
    "clamp_lr": FlagRule("field", "clamp_lr", "0 means off, as their `if args.clamp_lr:`", _clamp),
    "momentum_syn": FlagRule(
        "field",
        "momentum",
        "one momentum for all four groups",
        _equal_pair(("momentum_syn", "momentum_lr", "momentum_sim"), "outer momentum"),
        "values that differ between the three --momentum_* flags",
    ),
    "momentum_lr": FlagRule(
        "field",
        "momentum",
        "see --momentum_syn",
        _equal_pair(("momentum_syn", "momentum_lr", "momentum_sim"), "outer momentum"),
        "values that differ between the three --momentum_* flags",
    ),
    "momentum_sim": FlagRule(
        "field",
        "momentum",
        "see --momentum_syn",
        _equal_pair(("momentum_syn", "momentum_lr", "momentum_sim"), "outer momentum"),
        "values that differ between the three --momentum_* flags",
    ),
    "eval_it": FlagRule(
        "field",
        "checkpoint_every",
        "RepBlend's and LoRS's save cadence (VL-distill's script saves no set at it); the "
        "in-loop evaluation is not run (use `repblend-fast evaluate`) and only the final "
        "distilled_<Iteration>.pt is written",
        _checkpoint_every,
    ),
    # --- run settings
    "dataset": FlagRule(
        "setting",
        "dataset",
        "flickr -> flickr30k, coco -> coco; repblend_fast's own names (emoji, generic, ...) "
        "also work; names the output folder logged_files/<dataset>/<name>",
        _dataset,
    ),
    "buffer_path": FlagRule(
        "setting",
        "buffer_path",
        "an expert store (manifest.json), or their buffer folder, imported once into "
        "<buffer_path>.repblend_fast beside it",
        _same,
    ),
    "image_root": FlagRule(
        "setting", "image_root", "the image folder (flickr30k, coco, generic)", _same
    ),
    "ann_root": FlagRule(
        "setting", "annotation", "the Karpathy-split annotation folder (flickr30k, coco)", _same
    ),
    "image_size": FlagRule("setting", "image_size", "", _same),
    "image_encoder": FlagRule(
        "setting",
        "image_encoder",
        "nfnet -> timm nfnet_l0, nf_resnet50, nf_regnet -> nf_regnet_b1, dinov2, other timm names",
        _image_encoder,
        "clip, and the names their script builds with a classifier",
    ),
    "text_encoder": FlagRule(
        "setting",
        "text_encoder",
        "a local Hugging Face folder: their ./distill_utils/checkpoints/<model> when present, "
        "else --text-encoder-path",
        _text_encoder,
        "clip",
    ),
    "image_pretrained": FlagRule(
        "setting",
        "random_init_encoder",
        "False: a randomly initialised image encoder",
        _random_init,
    ),
    "name": FlagRule("setting", "name", "the output folder logged_files/<dataset>/<name>", _same),
    "resume_from": FlagRule(
        "setting",
        "resume_from",
        "continues the repblend_fast run in that file's folder (bit for bit, from its "
        "checkpoint.safetensors)",
        _same,
        "a file without a repblend_fast run beside it",
    ),
    "pix_init": FlagRule("setting", "init", "real: random real pairs", _real_only, "noise"),
    "txt_init": FlagRule("setting", "init", "real: random real pairs", _real_only, "noise"),
    "text_pretrained": FlagRule(
        "setting", "text_pretrained", "", _pretrained_text, "False (only an empty string is False)"
    ),
    "only_has_image_projection": FlagRule(
        "setting",
        "image_projection",
        "RepBlend's two projection heads (symmetric matching); unused by LoRS and MTT-VL",
        _projection,
        "False in RepBlend",
    ),
    "max_files": FlagRule(
        "ignored", "", "no effect in their loop except the value 1", _max_files, "1"
    ),
    "zca": FlagRule("refused", "", "", _zca, "given"),
    # --- logging only
    "num_eval": FlagRule("logging", "", _EVAL),
    "epoch_eval_train": FlagRule("logging", "", _EVAL),
    "batch_train": FlagRule("logging", "", _EVAL),
    "batch_size_train": FlagRule("logging", "", "their data loaders for the in-loop evaluation"),
    "batch_size_test": FlagRule("logging", "", "their data loaders for the in-loop evaluation"),
    "transfer": FlagRule("logging", "", _EVAL),
    "test_with_norm": FlagRule("logging", "", _EVAL),
    "std": FlagRule("logging", "", "how the in-loop evaluation is logged to wandb"),
    "draw": FlagRule("logging", "", "wandb images and histograms"),
    "force_save": FlagRule("logging", "", "image grids saved with --draw"),
    "ipc": FlagRule("logging", "", "only read when drawing"),
    "disabled_wandb": FlagRule("logging", "", "wandb; repblend_fast writes metrics.jsonl"),
    # --- parsed but without effect in their distillation loop
    "eval_mode": FlagRule("ignored", "", "never read"),
    "dsa": FlagRule("ignored", "", "their loop never applies DSA (a string, never == True)"),
    "dsa_strategy": FlagRule("ignored", "", "their loop never applies DSA"),
    "data_path": FlagRule("ignored", "", "never read (--image_root/--ann_root are the data)"),
    "load_all": FlagRule("ignored", "", "never read; repblend_fast always preloads the experts"),
    "no_aug": FlagRule(
        "ignored",
        "",
        "repblend_fast never augments the initial pairs (their script without --no_aug draws "
        "them through its training augmentation)",
    ),
    "texture": FlagRule("ignored", "", "only prints a warning in their script"),
    "canvas_size": FlagRule("ignored", "", "never read"),
    "canvas_samples": FlagRule("ignored", "", "never read"),
    "max_experts": FlagRule("ignored", "", "only multiplied into an unused total"),
    "basis": FlagRule("ignored", "", "never read"),
    "n_basis": FlagRule("ignored", "", "never read"),
    "recursive": FlagRule("ignored", "", "never read"),
    "load_npy": FlagRule("ignored", "", "never read by the distillation"),
    "text_trainable": FlagRule("ignored", "", "the text encoder is not part of the distillation"),
    "image_trainable": FlagRule(
        "ignored", "", "the student's parameters are passed explicitly; requires_grad is moot"
    ),
    "distill": FlagRule("ignored", "", "only read by their evaluation model"),
    "optimize": FlagRule("ignored", "", "never read"),
    "image_only": FlagRule("ignored", "", "never read"),
    "text_only": FlagRule("ignored", "", "never read"),
}


def implied_fields(script: str) -> list[tuple[str, Any, str]]:
    """Config fields fixed by each script's code rather than by a flag: ``(field, value, why)``."""
    common = [
        ("unroll_dropout", True, "their student heads run in train mode (dropout 0.1 on)"),
        ("seed", 0, "their runs are unseeded; repblend_fast seeds every draw"),
    ]
    tesla = [
        ("meta_grad", "tesla", "their two-pass TESLA meta-gradient"),
        ("parity_eta_grad", True, "their eta gradient uses the per-modality normalisation"),
        ("eps", 1e-6, "their WBCE's log epsilon"),
    ]
    if SCRIPT_FACTS[script].meta_grad == "tesla":
        return [("method", script, SCRIPTS[script]), *tesla, *common]
    return [
        ("method", script, SCRIPTS[script]),
        ("meta_grad", "exact", "VL-distill backpropagates through the whole unroll"),
        ("similarity", "none", "identity targets"),
        ("loss", "infonce", "CLIP's symmetric cross-entropy"),
        ("momentum", 0.5, "hard-coded in its three SGD optimisers"),
        (
            "temperature",
            MTTVL_TEMPERATURE,
            "its logits are scaled by log(1/0.07) ≈ 2.66 without exp(): temperature "
            "1/log(1/0.07) ≈ 0.376, reproduced",
        ),
        *common,
    ]


def flag_table(script: str) -> list[dict]:
    """One row per flag of ``script``: name, default, kind, target, note, refused values."""
    rows = []
    for name, typ, default, choices in PARSER_SPECS[script]:
        r = RULES[name]
        rows.append(
            {
                "flag": f"--{name}",
                "type": "switch" if typ == "store_true" else getattr(typ, "__name__", str(typ)),
                "default": default,
                "choices": choices,
                "kind": r.kind,
                "target": r.target,
                "note": r.note,
                "refuses": r.refuses,
            }
        )
    return rows
