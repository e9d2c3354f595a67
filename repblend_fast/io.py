"""Atomic file writes and safetensors helpers (docs/design.md §3: no pickle, temp file +
``os.replace``).

Every writer puts its bytes into a temporary file in the destination's directory, flushes and
fsyncs it, then renames it over the destination, so a reader never sees a half-written file and
an interrupted run leaves the previous version intact. ``safetensors`` is imported lazily so that
importing :mod:`repblend_fast` needs only torch.
"""

from __future__ import annotations

import json
import math
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
    "read_safetensors_header",
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


_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_MAX_HEADER = 100 * 2**20


def read_safetensors_header(path: PathLike) -> dict:
    """The parsed header of a safetensors file, after checking the whole file's structure.

    Checks, reading only the header: the 8-byte length prefix, a JSON object of that length,
    every tensor's dtype, shape and byte range, and that the ranges tile the data section, which
    must end exactly at the end of the file. A truncated, garbled or non-safetensors file raises
    ``ValueError`` with one line saying what is wrong (tensor *values* are not checked here; see
    the integrity checks of the stores and runs). Returns ``{name: {"dtype", "shape",
    "data_offsets"}, "__metadata__": {...}}``.
    """
    import struct

    path = Path(path)
    size = path.stat().st_size
    what = f"{path}: not a safetensors file"
    if size < 8:
        raise ValueError(f"{what} ({size} bytes; a safetensors file starts with an 8-byte length)")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n < 2 or n > _MAX_HEADER:
            raise ValueError(f"{what} (it does not start with a safetensors header)")
        if 8 + n > size:
            raise ValueError(
                f"{path}: truncated safetensors file (its header alone needs {8 + n} bytes, the "
                f"file holds {size})"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} (its header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{what} (its header is not a JSON object)")
    data = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = info["dtype"], info["shape"], info["data_offsets"]
            want = _DTYPE_BYTES[dtype] * math.prod(int(d) for d in shape)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if not (0 <= lo <= hi) or hi - lo != want:
            raise ValueError(
                f"{path}: corrupt safetensors header: tensor {name!r} ({dtype} {shape}) spans "
                f"bytes [{lo}, {hi})"
            )
        spans.append((lo, hi))
    end = 0
    for lo, hi in sorted(spans):
        if lo != end:
            raise ValueError(f"{path}: corrupt safetensors header: tensor byte ranges overlap")
        end = hi
    if end != data:
        state = "truncated" if end > data else "has trailing bytes"
        raise ValueError(
            f"{path}: {state} safetensors file (its header describes {end} bytes of tensor data, "
            f"the file holds {data}); it was damaged or not completely written"
        )
    return header
