"""Weight-standardised convolutions of a frozen encoder: the standardised weight made once.

NFNet (the paper's image encoder) is built from timm's ``ScaledStdConv2d``, whose forward
standardises its weight (``F.batch_norm`` over the weight's fan-in, times a gain) on every call,
before the convolution; so do ``StdConv2d`` and the ``...Same`` variants. The encoder is frozen
during distillation, so that tensor is the same on every call: recomputing it is work that grows
with the number of encoder calls (the authors' loop calls the encoder in every step, the shared
path once per iteration plus once per re-encoded chunk) and not with the images.

:func:`reuse_standardized_weights` runs the encoder with each such module's own forward, except
that the ``F.batch_norm`` of its own weight returns the tensor that same call computed the first
time: outputs and input gradients are bitwise those of the module. The tensor is reused only
while nothing changed: it is keyed by the versions of the module's parameters (an in-place update
or ``load_state_dict`` makes a new one), their dtype and device and the autocast state, and a
module whose parameters require a gradient is never touched (its weight gradient would be lost).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["STANDARDIZED_CONVS", "reuse_standardized_weights", "standardized_convs"]

#: timm's weight-standardised convolution classes (``timm.layers.std_conv``).
STANDARDIZED_CONVS = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")


def standardized_convs(encoder: nn.Module) -> list[nn.Conv2d]:
    """The modules of ``encoder`` that standardise their weight in every forward call."""
    return [
        m
        for m in encoder.modules()
        if isinstance(m, nn.Conv2d) and type(m).__name__ in STANDARDIZED_CONVS
    ]


def _frozen(m: nn.Module) -> bool:
    return not any(p.requires_grad for p in m.parameters(recurse=False))


def _key(m: nn.Module, device_type: str) -> tuple:
    params = tuple((n, p._version, p.dtype, p.device) for n, p in m.named_parameters(recurse=False))
    try:
        cast = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast (meta)
        return params, False, None
    return params, cast, torch.get_autocast_dtype(device_type) if cast else None


class _Reuse(TorchFunctionMode):
    """Inside one module's forward: ``F.batch_norm`` of the module's own weight returns the
    tensor cached under the module's current key (computing it the first time)."""

    def __init__(self, module: nn.Module, cache: dict):
        super().__init__()
        self.module, self.cache = module, cache

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm and args and _is_view_of(args[0], self.module.weight):
            key = _key(self.module, self.module.weight.device.type)
            hit = self.cache.get(id(self.module))
            if hit is not None and hit[0] == key:
                return hit[1]
            out = func(*args, **kwargs)
            self.cache[id(self.module)] = (key, out)
            return out
        return func(*args, **kwargs)


def _is_view_of(t, weight: torch.Tensor) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and t.numel() == weight.numel()
        and t.untyped_storage()._cdata == weight.untyped_storage()._cdata
    )


@contextmanager
def reuse_standardized_weights(encoder: nn.Module, cache: dict) -> Iterator[int]:
    """While inside, ``encoder``'s frozen weight-standardised convolutions reuse their
    standardised weight from ``cache`` (a dict the caller keeps between calls; module doc).
    Yields the number of modules it applies to."""
    mods = [m for m in standardized_convs(encoder) if _frozen(m)]
    saved = []
    for m in mods:
        own = m.__dict__.get("forward")
        inner = own if own is not None else type(m).forward.__get__(m)

        def forward(x, _m=m, _inner=inner):
            with _Reuse(_m, cache):
                return _inner(x)

        saved.append((m, own))
        m.forward = forward
    try:
        yield len(mods)
    finally:
        for m, own in saved:
            if own is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = own
