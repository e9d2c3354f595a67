"""Implementation dispatch for the fused ops: ``impl = auto | reference | triton | cuda`` (and
``torch`` for ``contrastive_loss``; each op's list is ``repblend_fast.ops.registry``).

``auto`` picks, in order, the CUDA extension, the Triton kernel, the plain-torch reference, by what
can run on the given tensors, and logs its reason once per (op, choice). An explicit ``impl`` that
cannot run raises ``RuntimeError`` with the reason: there is never a silent fallback.
``REPBLEND_IMPL`` overrides ``auto`` (not an explicit choice). Nothing here probes the GPU at
import time.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Iterable

import torch

from repblend_fast.known_faults import installed_version, triton_interpreter_fault
from repblend_fast.ops import registry

logger = logging.getLogger("repblend_fast.dispatch")

IMPLS = registry.IMPLS
"""Every implementation some op accepts (:data:`registry.IMPLS`); an op's own are its
``registry.op(name).impls``."""
_LOGGED: set[tuple[str, str, str]] = set()


def triton_interpret() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_importable() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "the triton package is not installed"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - broken installs
        return False, f"importing triton failed: {exc}"
    # Triton being importable is not enough: the kernel modules themselves must import (a checkout
    # without repblend_fast.kernels on its path, or a kernel module this Triton cannot parse).
    from repblend_fast.kernels import MODULES

    for name in MODULES:
        try:
            importlib.import_module(f"repblend_fast.kernels.{name}")
        except Exception as exc:
            return False, f"importing repblend_fast.kernels.{name} failed: {exc}"
    return True, "triton and repblend_fast.kernels are importable"


def _interpreter_fault() -> str | None:
    """A known fault of this Triton's interpreter under this numpy (``known_faults``), or None."""
    triton_v, numpy_v = installed_version("triton"), installed_version("numpy")
    if triton_v is None or numpy_v is None:
        return None
    return triton_interpreter_fault(triton_v, numpy_v)


def triton_status(device: torch.device) -> tuple[bool, str]:
    """Whether Triton kernels can run on ``device``, and why (not)."""
    ok, why = _triton_importable()
    if not ok:
        return False, why
    if device.type == "cuda":
        if triton_interpret():
            return False, "TRITON_INTERPRET=1 runs kernels on CPU tensors only, these are on CUDA"
        return True, "triton on CUDA"
    if device.type == "cpu":
        if triton_interpret():
            fault = _interpreter_fault()
            if fault is not None:
                return False, fault
            return True, "triton through the CPU interpreter (TRITON_INTERPRET=1)"
        return False, "triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)"
    return False, f"triton does not support device type {device.type!r}"


def cuda_status(device: torch.device) -> tuple[bool, str]:
    """Whether the compiled CUDA extension can run on ``device``, and why (not)."""
    if device.type != "cuda":
        return False, f"the CUDA extension needs CUDA tensors, got {device.type!r}"
    from repblend_fast import _ext

    return _ext.status()


def values_readable(t: torch.Tensor) -> bool:
    """Whether host code may read ``t``'s values here (``.item()``, ``bool(t)``, ``.tolist()``).

    False inside ``torch.func.vmap`` when ``t`` is batched at any level (a BatchedTensor holds one
    value per mapped sample, so there is no single value to read, and reading raises). True for
    plain tensors and for tensors wrapped only by ``torch.func.grad`` / ``vjp`` / ``jvp`` layers:
    those wrappers are peeled off and the value underneath is an ordinary tensor. Says nothing about
    the device: callers that must not synchronise a CUDA stream check ``t.device`` themselves.
    """
    try:
        from torch._C import _functorch

        wrapped = _functorch.is_functorch_wrapped_tensor
        batched = _functorch.is_batchedtensor
        unwrap = _functorch.get_unwrapped
    except (ImportError, AttributeError):  # pragma: no cover - torch without functorch
        return True
    while wrapped(t):
        if batched(t):
            return False
        t = unwrap(t)
    return True


def _common_device(tensors: Iterable[torch.Tensor], op: str) -> torch.device:
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        names = ", ".join(sorted(str(d) for d in devices))
        raise ValueError(f"{op}: all tensor arguments must be on one device, got {names}")
    return devices.pop() if devices else torch.device("cpu")


def resolve_impl(op: str, impl: str, tensors: Iterable[torch.Tensor]) -> str:
    """Return the concrete implementation (``reference``, ``triton``, ``cuda``, or ``torch`` where
    the op has it) for ``op``.

    Args:
        op: op name (a :mod:`registry` op's name).
        impl: the caller's choice; ``auto`` may be overridden by ``REPBLEND_IMPL``.
        tensors: the op's tensor arguments (their common device decides what can run).
    """
    impls = registry.op(op).impls
    if impl not in impls:
        raise ValueError(f"{op}: impl must be one of {impls}, got {impl!r}")
    device = _common_device(tensors, op)
    if impl == "auto":
        env = os.environ.get("REPBLEND_IMPL", "auto")
        if env not in impls:
            raise ValueError(f"REPBLEND_IMPL must be one of {impls} for {op}, got {env!r}")
        if env != "auto":
            return resolve_impl(op, env, [torch.empty(0, device=device)])
        if device.type == "cuda":
            for name, status in (("cuda", cuda_status), ("triton", triton_status)):
                ok, why = status(device)
                if ok:
                    _log_once(op, name, why)
                    return name
            _log_once(op, "reference", "no fused implementation can run on CUDA here")
            return "reference"
        _log_once(op, "reference", f"tensors on {device.type}: the reference is the fast path")
        return "reference"
    if impl in ("reference", "torch"):
        return impl
    status = triton_status if impl == "triton" else cuda_status
    ok, why = status(device)
    if not ok:
        raise RuntimeError(f"{op}: impl={impl!r} cannot run: {why}")
    return impl


def _log_once(op: str, impl: str, why: str) -> None:
    key = (op, impl, why)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info("%s: impl=auto chose %s (%s)", op, impl, why)
