"""On-disk feature cache: frozen-encoder features keyed by what produced them.

An entry is ``<cache_dir>/features/<key>.safetensors`` (one tensor, ``"features"``) plus a JSON
sidecar ``<key>.json`` holding the key parts, shape and dtype. ``key`` is the sha256 of the
canonical JSON of ``key_parts`` — typically the dataset fingerprint, the encoder id (name +
checkpoint hash), and the preprocessing parameters (image size, mean/std, pooling, augmentation
view). Any change of a part gives a new key, hence a recompute. Both files are written atomically,
tensor first, so the sidecar marks a complete entry; the sidecar records the tensor file's size
and sha256 (computed while writing it), checked, streamed, on every read. An unreadable,
inconsistent or changed entry (a flipped byte included) is recomputed with a warning naming the
file: a cache can always be rebuilt, so the right answer to damage is the recompute, never the
damaged values. Writers of one entry take its lock (:mod:`repblend_fast.locks`, waiting for each
other) and remove the temporary files a killed writer left. The cache folder defaults to
``$REPBLEND_CACHE_DIR`` or ``~/.cache/repblend_fast``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from repblend_fast.io import (
    FileDigest,
    atomic_write_json,
    load_safetensors,
    remove_stale_temps,
    safetensors_bytes,
    verify_file,
    write_atomic,
)
from repblend_fast.locks import FolderLock, LockHeldError

CACHE_FORMAT = 1
ENV_CACHE_DIR = "REPBLEND_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$REPBLEND_CACHE_DIR`` if set, else ``~/.cache/repblend_fast``."""
    env = os.environ.get(ENV_CACHE_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "repblend_fast"


def _canonical(key_parts: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(key_parts), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"key_parts must be JSON-serialisable (str/int/float/bool/None, lists, dicts): {e}"
        ) from e


def cache_key(key_parts: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of ``key_parts`` (sorted keys, no whitespace)."""
    return hashlib.sha256(_canonical(key_parts).encode("utf-8")).hexdigest()


def cache_paths(key_parts: Mapping[str, Any], cache_dir: str | Path | None = None):
    """``(tensor_path, sidecar_path)`` of the entry for ``key_parts``."""
    d = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    k = cache_key(key_parts)
    return d / "features" / f"{k}.safetensors", d / "features" / f"{k}.json"


def _try_load(tensor_path: Path, side_path: Path, canon: str, device) -> torch.Tensor | None:
    """The cached tensor, ``None`` if absent; raises ``ValueError`` if present but unusable."""
    if not side_path.exists() and not tensor_path.exists():
        return None
    if not side_path.exists():
        raise ValueError("sidecar missing (interrupted write?)")
    try:
        side = json.loads(side_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable sidecar: {e}") from e
    if side.get("format") != CACHE_FORMAT:
        raise ValueError(f"cache format {side.get('format')} != {CACHE_FORMAT}")
    if _canonical(side.get("key_parts", {})) != canon:
        raise ValueError("sidecar key parts differ from the requested ones")
    if "sha256" not in side:
        raise ValueError("its sidecar records no checksum (written by an older version)")
    verify_file(
        tensor_path,
        FileDigest.from_json({"size": side.get("size"), "sha256": side["sha256"]}, str(side_path)),
        fix="the entry is recomputed",
    )
    try:
        t = load_safetensors(tensor_path, device)["features"]
    except Exception as e:  # safetensors raises several error types on a damaged file
        raise ValueError(f"unreadable tensor file: {e}") from e
    if list(t.shape) != side.get("shape") or str(t.dtype) != side.get("dtype"):
        raise ValueError(f"tensor {tuple(t.shape)} {t.dtype} does not match its sidecar")
    return t


def cached_features(
    key_parts: Mapping[str, Any],
    compute_fn: Callable[[], torch.Tensor],
    cache_dir: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    refresh: bool = False,
) -> torch.Tensor:
    """Return the cached tensor for ``key_parts``, or ``compute_fn()`` stored under it.

    Args:
        key_parts: JSON-serialisable description of everything the features depend on, e.g.
            ``{"dataset": ds.fingerprint(), "encoder": "tf_efficientnet_lite0@<sha>",
            "size": 64, "mean": [...], "std": [...]}``.
        compute_fn: called with no arguments on a miss; returns a tensor (any shape, e.g.
            ``[N, d_f]``) that is stored on the CPU.
        cache_dir: cache root (default :func:`default_cache_dir`).
        device: where the returned tensor lives.
        refresh: recompute and overwrite even on a hit.

    A damaged entry (unreadable file, sidecar mismatch, bytes that changed since they were
    written) triggers a ``RuntimeWarning`` naming the file and a recompute. Returns the features
    tensor.
    """
    canon = _canonical(key_parts)
    tensor_path, side_path = cache_paths(key_parts, cache_dir)
    if not refresh:
        try:
            hit = _try_load(tensor_path, side_path, canon, device)
        except ValueError as e:
            warnings.warn(
                f"feature cache entry {tensor_path.name} is unusable ({e}); recomputing",
                RuntimeWarning,
                stacklevel=2,
            )
            hit = None
        if hit is not None:
            return hit
    feats = compute_fn()
    if not isinstance(feats, torch.Tensor):
        raise TypeError(f"compute_fn must return a torch.Tensor, got {type(feats).__name__}")
    feats = feats.detach()
    key = tensor_path.stem
    lock = FolderLock(tensor_path.parent, "writing a feature cache entry", name=f".{key}.lock")
    try:
        lock.acquire()
    except LockHeldError as exc:
        warnings.warn(f"{exc}: waiting for it", RuntimeWarning, stacklevel=2)
        lock.acquire(wait=True)
    try:
        remove_stale_temps(tensor_path.parent, [tensor_path.name, side_path.name])
        # Remove the sidecar first so a crash between the writes leaves no stale "complete" entry.
        side_path.unlink(missing_ok=True)
        digest = write_atomic(
            tensor_path, safetensors_bytes({"features": feats}, metadata={"key": key})
        )
        atomic_write_json(
            {
                "format": CACHE_FORMAT,
                "key": key,
                "key_parts": json.loads(canon),
                "shape": list(feats.shape),
                "dtype": str(feats.dtype),
                **digest.to_json(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            side_path,
        )
    finally:
        lock.release()
    return feats.to(device)
