"""Atomic file writes, file digests and safetensors helpers (docs/design.md §3: no pickle, temp
file + ``os.replace``; docs/reliability.md: every file is recorded with its size and sha256).

Every writer puts its bytes into a temporary file ``.<name>.<random>.tmp`` in the destination's
directory, flushes and fsyncs it, then renames it over the destination, so a reader never sees a
half-written file and an interrupted run leaves the previous version intact. The sha256 of the
bytes is computed while they are written (:func:`write_atomic` returns it as a
:class:`FileDigest`), so a store, a cache entry or a run can list what it wrote and check it when
it reads it back (:func:`verify_file`, streamed). A writer killed between creating its temporary
file and the rename leaves that file behind; whoever next holds the folder's lock removes it
(:func:`remove_stale_temps`). ``safetensors`` is imported lazily so that importing
:mod:`repblend_fast` needs only torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "FileDigest",
    "IntegrityError",
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "file_digest",
    "fsync_dir",
    "json_bytes",
    "load_safetensors",
    "read_safetensors_header",
    "remove_stale_temps",
    "safetensors_bytes",
    "safetensors_metadata",
    "verify_file",
    "write_atomic",
]

PathLike = str | os.PathLike
_CHUNK = 8 * 2**20


class IntegrityError(ValueError):
    """A file does not match the size and sha256 recorded when it was written (or has no such
    record where one is required). The message names the file and what to do."""


@dataclass(frozen=True)
class FileDigest:
    """Size in bytes and sha256 (hex) of a file's content, as recorded beside it."""

    size: int
    sha256: str

    def to_json(self) -> dict[str, int | str]:
        return {"size": self.size, "sha256": self.sha256}

    @classmethod
    def from_json(cls, obj: object, where: str) -> FileDigest:
        """Parse a ``{"size", "sha256"}`` record; ``IntegrityError`` naming ``where`` if it is
        malformed (a hand-edited or damaged record cannot vouch for anything)."""
        ok = (
            isinstance(obj, dict)
            and isinstance(obj.get("size"), int)
            and not isinstance(obj.get("size"), bool)
            and obj["size"] >= 0
            and isinstance(obj.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", obj["sha256"]) is not None
        )
        if not ok:
            raise IntegrityError(f"{where}: malformed checksum record {obj!r}")
        return cls(int(obj["size"]), str(obj["sha256"]))

    @classmethod
    def of_bytes(cls, data: bytes) -> FileDigest:
        return cls(len(data), hashlib.sha256(data).hexdigest())

    def short(self) -> str:
        return f"{self.size} bytes, sha256 {self.sha256[:12]}…"


def file_digest(path: PathLike) -> FileDigest:
    """Size and sha256 of the file at ``path``, read in 8 MiB chunks (any file size)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return FileDigest(size, h.hexdigest())


def verify_file(
    path: PathLike, expected: FileDigest | Sequence[FileDigest], *, fix: str
) -> FileDigest:
    """Check that ``path`` has one of the ``expected`` digests; returns the matching one.

    The size is compared first (a truncated or extended file fails without being read), then
    the sha256, streamed. ``IntegrityError`` names the file, what differs and ``fix`` (what the
    user can do about it).
    """
    path = Path(path)
    wanted = [expected] if isinstance(expected, FileDigest) else list(expected)
    if not path.is_file():
        what = "is not a file (a folder?)" if path.exists() else "is missing"
        raise IntegrityError(f"{path} {what}; {fix}")
    size = path.stat().st_size
    if all(size != w.size for w in wanted):
        raise IntegrityError(
            f"{path} has {size} bytes but {wanted[0].size} were written (it was truncated, "
            f"extended or replaced since); {fix}"
        )
    got = file_digest(path)
    for w in wanted:
        if got == w:
            return w
    raise IntegrityError(
        f"{path} has changed since it was written (sha256 {got.sha256[:12]}…, recorded "
        f"{wanted[0].sha256[:12]}…): its bytes were modified or it was replaced by another "
        f"file; {fix}"
    )


def fsync_dir(path: PathLike) -> None:
    """fsync a directory, so that renames and removals in it are on disk before what follows
    (a store's old manifest is gone before new expert files appear)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


# mkstemp names: the prefix, 8 characters of [a-z0-9_], the suffix.
_TEMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


def remove_stale_temps(folder: PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Remove the temporary files that killed writers left in ``folder`` (``.<name>.*.tmp``,
    for the given destination ``names`` or any); returns what was removed.

    Call it only while holding the folder's lock (:mod:`repblend_fast.locks`): a temporary file
    of a live writer is indistinguishable from a stale one.
    """
    folder = Path(folder)
    wanted = set(names) if names is not None else None
    removed = []
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return removed
    for p in entries:
        m = _TEMP.match(p.name)
        if m and (wanted is None or m["name"] in wanted) and p.is_file() and not p.is_symlink():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def write_atomic(path: PathLike, data: bytes) -> FileDigest:
    """Write ``data`` to ``path`` atomically; returns the size and sha256 of what was written,
    computed while writing.

    An ``OSError`` (disk full, permission, read-only file system) names ``path`` and leaves the
    previous content of ``path`` and no temporary file behind.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _named(exc, path.parent) from None
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as fh:
            view = memoryview(data)
            for start in range(0, len(view), _CHUNK):
                chunk = view[start : start + _CHUNK]
                h.update(chunk)
                fh.write(chunk)
            fh.flush()
            # fsync so that the rename never exposes a file whose data is only in the page cache.
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the result ordinary permissions.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise _named(exc, path) from None
        raise
    return FileDigest(len(data), h.hexdigest())


def _named(exc: OSError, path: Path) -> OSError:
    """``exc`` with ``path`` as its file name when it has none (``write`` errors carry none)."""
    if exc.filename is None and exc.errno is not None:
        return type(exc)(exc.errno, exc.strerror, str(path))
    return exc


def json_bytes(obj, *, indent: int | None = 2) -> bytes:
    """``obj`` as the JSON bytes :func:`atomic_write_json` writes (trailing newline)."""
    return (json.dumps(obj, indent=indent, allow_nan=True) + "\n").encode("utf-8")


def atomic_write_bytes(data: bytes, path: PathLike) -> Path:
    """Write ``data`` to ``path`` atomically. Returns the path (:func:`write_atomic` returns the
    digest)."""
    write_atomic(path, data)
    return Path(path)


def atomic_write_text(text: str, path: PathLike, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically. Returns the path."""
    return atomic_write_bytes(text.encode(encoding), path)


def atomic_write_json(obj, path: PathLike, *, indent: int | None = 2) -> Path:
    """Serialise ``obj`` as JSON (sorted keys off, trailing newline) and write it atomically.

    Raises ``TypeError`` before touching the file if ``obj`` is not JSON-serialisable.
    """
    return atomic_write_bytes(json_bytes(obj, indent=indent), path)


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


def safetensors_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` (name -> tensor, any device).

    Tensors are moved to the CPU and made contiguous first (safetensors refuses views with
    strides). ``metadata`` values must be strings (the safetensors header format). The bytes
    are deterministic (:func:`canonical_safetensors_bytes`).
    """
    from safetensors.torch import save

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
    data = save(cpu, metadata=dict(metadata) if metadata is not None else None)
    return canonical_safetensors_bytes(data)


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Save ``tensors`` to a safetensors file atomically (:func:`safetensors_bytes`); returns
    the path. Use :func:`write_atomic` with :func:`safetensors_bytes` to get the digest."""
    write_atomic(path, safetensors_bytes(tensors, metadata))
    return Path(path)


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
