"""Host-to-device transfers that never block the host.

A plain ``tensor.to("cuda")`` from pageable host memory is a synchronous copy: the host waits for
the device queue to drain, which stalls the step as surely as reading a value back. Every tensor an
iteration sends to the device (the unroll plan, the expert snapshots) goes through
:func:`to_device` instead: on CUDA it is copied into page-locked (pinned) memory first and then
sent with ``non_blocking=True`` (the copy is queued behind the work already on the stream, and the
caching host allocator keeps the pinned buffer alive until the copy has run). Other targets get the
same ``non_blocking=True`` request (a no-op between host tensors). The values are the same as a
plain ``.to``: a dtype change happens on the host, before the copy.
"""

from __future__ import annotations

import torch

__all__ = ["to_device"]


def to_device(
    t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``t`` on ``device`` (in ``dtype`` if given), sent without blocking the host."""
    device = torch.device(device)
    if dtype is not None:
        t = t.to(dtype)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
