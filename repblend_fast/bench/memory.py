"""Memory a device would see, counted on any device: tensors saved for backward and the state.

A CPU's resident set adds the allocator's own overhead and code pages, so it is the wrong
yardstick for a GPU claim. What a step needs on any device is counted exactly instead:

* :class:`SavedTensorMeter`: the bytes of tensors saved for backward
  (``torch.autograd.graph.saved_tensors_hooks``), live at each moment and at their peak, each
  storage counted once however many graph nodes save it; storages of the state are not counted
  again (they are resident anyway);
* :func:`state_bytes`: the bytes of every tensor a provider holds between iterations (encoder
  weights and buffers, synthetic data, similarity, expert snapshots, optimiser state), each
  storage once;
* :func:`predicted_peak_mib`: ``state + peak saved`` — a lower bound of the device peak: it
  leaves out the transient buffers of single operations (outputs not saved, workspaces) and the
  meta-gradients. On CUDA the benchmark records ``max_memory_allocated`` beside it, so the
  prediction is checked the day a GPU runs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

__all__ = ["SavedTensorMeter", "predicted_peak_mib", "state_bytes", "state_tensors"]

MIB = float(2**20)


def _key(t: torch.Tensor) -> int:
    """A storage's identity (its StorageImpl), valid on every device including ``meta``."""
    return t.untyped_storage()._cdata


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


class _Saved:
    """What the pack hook returns in place of a saved tensor: releases its count when the
    graph node that saved it is freed."""

    __slots__ = ("key", "meter", "t")

    def __init__(self, meter: SavedTensorMeter, key: int, t: torch.Tensor):
        self.meter, self.key, self.t = meter, key, t

    def __del__(self):
        self.meter._release(self.key)


class SavedTensorMeter:
    """Counts the bytes of tensors saved for backward inside ``with meter:``.

    ``live_bytes`` is what the saved tensors hold now, ``peak_bytes`` the most they held at once,
    ``total_bytes`` the bytes saved in all (a storage counts again each time it is saved after
    the graphs that saved it were freed: several graphs one after another add up).
    ``exclude``: tensors whose storages are not counted (the state, resident whatever the graph
    does). Tensors saved inside
    a region with its own hooks (non-reentrant checkpointing) are not seen: they are recomputed,
    not kept.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {_key(t) for t in exclude}
        self._refs: dict[int, int] = {}
        self._bytes: dict[int, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.total_bytes = 0
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        key = _key(t)
        if key in self._excluded or _nbytes(t) == 0:
            return t
        n = self._refs.get(key, 0)
        if n == 0:
            size = _nbytes(t)
            self._bytes[key] = size
            self.live_bytes += size
            self.total_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._refs[key] = n + 1
        return _Saved(self, key, t)

    @staticmethod
    def _unpack(obj):
        return obj.t if isinstance(obj, _Saved) else obj

    def _release(self, key: int) -> None:
        n = self._refs[key] - 1
        if n:
            self._refs[key] = n
            return
        del self._refs[key]
        self.live_bytes -= self._bytes.pop(key)

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None

    def record(self) -> dict[str, float]:
        return {
            "saved_peak_mib": self.peak_bytes / MIB,
            "saved_total_mib": self.total_bytes / MIB,
        }


def state_tensors(obj, _seen: set[int] | None = None) -> list[torch.Tensor]:
    """Every tensor reachable from ``obj`` through attributes, lists, tuples, dicts and modules'
    parameters and buffers (what a provider holds between iterations)."""
    seen = set() if _seen is None else _seen
    out: list[torch.Tensor] = []
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, nn.Module):
            out.extend(o.parameters())
            out.extend(o.buffers())
            stack.extend(v for v in vars(o).values() if not isinstance(v, dict))
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif hasattr(o, "__dict__") and not isinstance(o, type) and _is_ours(o):
            stack.extend(vars(o).values())
        elif hasattr(o, "__slots__") and _is_ours(o):
            stack.extend(getattr(o, s, None) for s in o.__slots__)
    return out


def _is_ours(o) -> bool:
    """Objects of this package, torch.optim and plain containers are walked; others (modules of
    third parties held as attributes: loggers, generators) are not."""
    mod = type(o).__module__ or ""
    return mod.startswith(("repblend_fast", "torch.optim"))


def state_bytes(obj) -> int:
    """Bytes of the distinct storages of :func:`state_tensors` (``obj``)."""
    sizes = {_key(t): _nbytes(t) for t in state_tensors(obj)}
    return sum(sizes.values())


def predicted_peak_mib(state_mib: float, saved_peak_mib: float) -> float:
    """The device peak an iteration cannot go below: the state plus the peak of the tensors
    saved for backward (module doc: transient buffers and the meta-gradients are not in it)."""
    return state_mib + saved_peak_mib
