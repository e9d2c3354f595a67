"""Atomic file writes and safetensors helpers (DESIGN.md §3: no pickle, temp file + ``os.replace``).

Every writer puts its bytes into a temporary file in the destination's directory, flushes and
fsyncs it, then renames it over the destination, so a reader never sees a half-written file and
an interrupted run leaves the previous version intact. ``safetensors`` is imported lazily so that
importing :mod:`repblend_fast` needs only torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

__all__ = [
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "load_safetensors",
    "safetensors_metadata",
]

PathLike = str | os.PathLike


def _atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then move ``tmp_path`` over ``path``; clean up on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # fsync so that the rename never exposes a file whose data is still only in the page cache.
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result ordinary permissions.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_bytes(data: bytes, path: PathLike) -> Path:
    """Write ``data`` to ``path`` atomically. Returns the path."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return _atomic_write(path, write)


def atomic_write_text(text: str, path: PathLike, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically. Returns the path."""
    return atomic_write_bytes(text.encode(encoding), path)


def atomic_write_json(obj, path: PathLike, *, indent: int | None = 2) -> Path:
    """Serialise ``obj`` as JSON (sorted keys off, trailing newline) and write it atomically.

    Raises ``TypeError`` before touching the file if ``obj`` is not JSON-serialisable.
    """
    text = json.dumps(obj, indent=indent, allow_nan=True) + "\n"
    return atomic_write_text(text, path)


def canonical_safetensors_bytes(data: bytes) -> bytes:
    """Re-serialise a safetensors header with sorted keys, so equal tensors and metadata always
    give byte-identical files (the writer's header order is not deterministic).

    The data section and its offsets are unchanged; the header is padded with spaces to a
    multiple of 8 bytes, as the format allows.
    """
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Save ``tensors`` (name -> tensor, any device) to a safetensors file atomically.

    Tensors are moved to the CPU and made contiguous first (safetensors refuses views with
    strides). ``metadata`` values must be strings (the safetensors header format). The file is
    byte-for-byte deterministic (:func:`canonical_safetensors_bytes`).
    """
    if metadata is not None:
        bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(v, str)}
        if bad:
            raise TypeError(f"safetensors metadata values must be str; got {bad}")
    cpu: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        # clone() also breaks storage sharing between entries, which safetensors rejects.
        cpu[name] = t.detach().to("cpu").contiguous().clone()

    def write(tmp: str) -> None:
        from safetensors.torch import save

        data = save(cpu, metadata=dict(metadata) if metadata is not None else None)
        with open(tmp, "wb") as fh:
            fh.write(canonical_safetensors_bytes(data))

    return _atomic_write(path, write)


def load_safetensors(
    path: PathLike, device: str | torch.device = "cpu", *, names=None
) -> dict[str, torch.Tensor]:
    """Load tensors from a safetensors file (all of them, or only ``names``) onto ``device``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = list(f.keys()) if names is None else list(names)
        available = set(f.keys())
        missing = [k for k in keys if k not in available]
        if missing:
            raise KeyError(f"{path} lacks tensors {missing[:5]}")
        for k in keys:
            out[k] = f.get_tensor(k).to(device)
    return out


def safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file's header (``{}`` when there is none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})
