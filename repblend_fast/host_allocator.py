"""The host allocator policy: keep freed memory in the process for the next iteration.

torch's CPU tensors come from the C library's ``malloc``. glibc serves every request above its
mmap threshold (which adapts, but never beyond 32 MiB on 64-bit systems) with a fresh ``mmap``
and unmaps it on ``free``, and trims the top of its heaps back to the kernel once more than the
trim threshold is free. A distillation step that holds the frozen encoder's graph for all
touched images (NFNet-L0 at 224 px: tens of MiB per image, ≈ 94 images per iteration) makes
allocations far above 32 MiB: every iteration then page-faults and zeroes its whole graph
again, kernel time that grows with the graph and is absent from the authors' loop, whose
20-image graphs are mostly reused from the heap (benchmarks/README.md, "Paper shapes").

:func:`retain_freed_memory` sets glibc's ``M_MMAP_MAX`` to 0 (no allocation is served by its
own mapping) and ``M_TRIM_THRESHOLD`` to -1 (the heap is never trimmed), both documented in
``mallopt(3)``: freed memory stays in the process and the next iteration reuses it, as the
CUDA caching allocator does on a GPU. The resident set then stays at its peak between
iterations; the peak itself is what the step needs. Process-wide and irreversible, so only the
command-line entry points call it (``--host-allocator``), never the library's classes.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["HOST_ALLOCATORS", "apply_host_allocator", "host_allocator", "retain_freed_memory"]

HOST_ALLOCATORS = ("retain", "system")
"""``retain``: :func:`retain_freed_memory`; ``system``: the C library's defaults."""

# mallopt(3) parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_state = {"policy": "system"}


def _glibc():
    """The process's glibc, or None (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    return libc if version() else None


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (no per-allocation mappings, no trimming).

    Returns True when both settings were applied, False where the C library is not glibc (the
    policy then stays ``system``). Idempotent.
    """
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    if ok:
        _state["policy"] = "retain"
    return ok


def apply_host_allocator(policy: str) -> str:
    """Apply ``policy`` (one of :data:`HOST_ALLOCATORS`) and return the policy in force."""
    if policy not in HOST_ALLOCATORS:
        raise ValueError(f"host allocator must be one of {HOST_ALLOCATORS}, got {policy!r}")
    if policy == "retain":
        retain_freed_memory()
    return host_allocator()


def host_allocator() -> str:
    """The policy in force in this process: ``retain`` or ``system``."""
    return _state["policy"]
