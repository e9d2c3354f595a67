"""Named ranges of the distillation engine's phases.

The engine marks its phases with ``torch.profiler.record_function`` ranges named
``repblend:<phase>`` (:func:`phase`): under ``torch.profiler`` they are the trace's user
annotations (on CUDA also on the device timeline), under Nsight Systems NVTX ranges (with
``torch.autograd.profiler.emit_nvtx``).
:mod:`repblend_fast.profiling` reads the per-phase times back from a ``torch.profiler`` run.

The phases (:data:`PHASES`): ``io`` (plans and expert snapshots to the device), ``encoder_forward``
(the frozen encoder), ``unroll`` (the T student steps: exact mode's forward, TESLA's pass 1; what
else the unroll does, outside the other phases), ``meta_gradient`` (the matching loss and the
reverse pass, or TESLA's terms and pass 2), ``encoder_vjp`` (the pull-back of the summed feature
cotangents through the encoder) and ``optimiser`` (the outer update). Ranges nest (an encoder
forward inside the unroll); a profile counts each phase's exclusive time.

With no profiler running, :func:`phase` is a shared no-op context: the check is one call into
torch, there is no synchronisation and nothing is recorded.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

PREFIX = "repblend:"
"""Prefix of every range name."""
STEP = "step"
"""The range a profiler puts around one outer iteration (not an engine phase)."""
PHASES = ("io", "encoder_forward", "unroll", "meta_gradient", "encoder_vjp", "optimiser")

_NOOP = nullcontext()


def _enabled() -> bool:
    return torch._C._autograd._profiler_enabled()


def phase(name: str) -> AbstractContextManager:
    """``with phase("unroll"): ...``: a ``repblend:unroll`` range while a profiler runs."""
    if not _enabled():
        return _NOOP
    return torch.profiler.record_function(PREFIX + name)
