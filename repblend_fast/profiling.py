"""Per-phase time and peak memory of distillation steps (docs/design.md §1 use 3).

:class:`PhaseTimer` times named phases of a step (``with timer.phase("unroll"): ...``): CUDA events
on a GPU (read after one synchronisation at the end of the step, so timing adds no syncs inside
the step), ``time.perf_counter`` on a CPU. Phases may nest; each phase reports its *exclusive*
time (its own minus its children's), so the phases of a step add up to at most the step's wall
time, and the remainder is reported as ``other``. Phases can also be marked at boundaries
(``timer.switch("unroll")``), for code instrumented through hooks. Peak memory per phase is the
CUDA caching allocator's ``max_memory_allocated`` on a GPU and the process's peak resident set
(``VmHWM``, reset per phase through ``/proc/self/clear_refs``) on a CPU.

:class:`ProfiledUnroller` is an :class:`repblend_fast.unroll.Unroller` that marks the phases
``encoder_forward`` (the frozen encoder, or the shared one-pass features), ``unroll`` (the T student
steps), ``meta_gradient`` (TESLA pass 2, or the reverse pass through the unroll) and
``encoder_vjp`` (the pull-back of the summed feature cotangents through the encoder) from the pieces
the Unroller calls; its results are the plain Unroller's (``tests/test_profiling.py``). The outer
loop adds ``io`` (plan and expert snapshots to the device) and ``optimiser``.
"""

from __future__ import annotations

import inspect
import re
import resource
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from repblend_fast.stats import median
from repblend_fast.unroll import Unroller

__all__ = [
    "PHASES",
    "PhaseTimer",
    "ProfiledUnroller",
    "StepProfile",
    "format_profile_table",
    "rss_mib",
    "rss_peak_mib",
    "reset_rss_peak",
    "summarise_profiles",
]

PHASES = ("io", "encoder_forward", "unroll", "meta_gradient", "encoder_vjp", "optimiser")


# --------------------------------------------------------------------------------------------------
# resident-set size (Linux /proc; getrusage elsewhere)


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", fh.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def rss_mib() -> float:
    """Current resident set of this process in MiB (0 where it cannot be read)."""
    kib = _status_kib("VmRSS")
    return (kib or 0) / 1024


def rss_peak_mib() -> float:
    """Peak resident set since the last :func:`reset_rss_peak` (or process start), in MiB."""
    kib = _status_kib("VmHWM")
    if kib is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kib / 1024


def reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0). False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# the timer


@dataclass
class StepProfile:
    """One step: exclusive ms and peak MiB per phase, the step's wall ms and peak MiB."""

    step_ms: float
    phases_ms: dict[str, float]
    phases_peak_mib: dict[str, float]
    peak_mib: float
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def other_ms(self) -> float:
        return max(0.0, self.step_ms - sum(self.phases_ms.values()))

    def to_dict(self) -> dict:
        return {
            "step_ms": self.step_ms,
            "phases_ms": dict(self.phases_ms),
            "other_ms": self.other_ms,
            "phases_peak_mib": dict(self.phases_peak_mib),
            "peak_mib": self.peak_mib,
            "calls": dict(self.calls),
        }


@dataclass
class _Rec:
    name: str
    parent: int | None
    start: object = None
    end: object = None
    peak: float = 0.0
    children: list[int] = field(default_factory=list)


class PhaseTimer:
    """Times named, possibly nested phases of one step at a time.

    Args:
        device: where the step runs (``cuda`` uses CUDA events and allocator statistics).
        memory: also record per-phase peak memory.
        record_functions: mark each phase with ``torch.profiler.record_function`` (so phases show
            in a chrome trace).

    Use ``with timer.step(): ...`` around a step and ``with timer.phase(name): ...`` inside it;
    :attr:`steps` collects one :class:`StepProfile` per step. Phases outside a step are ignored.
    """

    def __init__(
        self, device: str | torch.device = "cpu", memory: bool = True, record_functions: bool = True
    ):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.memory = memory
        self.record_functions = record_functions
        self.steps: list[StepProfile] = []
        self._recs: list[_Rec] | None = None
        self._stack: list[int] = []
        self._switched: int | None = None
        self._switched_rf = None
        self._owner = threading.get_ident()
        self._rss_reset_ok = True

    # ------------------------------------------------------------------ clock and memory
    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _elapsed_ms(self, a, b) -> float:
        if self.cuda:
            return float(a.elapsed_time(b))
        return (b - a) * 1e3

    def _mem_peak(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return rss_peak_mib()

    def _mem_reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._rss_reset_ok:
            self._rss_reset_ok = reset_rss_peak()

    def _fold_peak(self) -> None:
        """Fold the peak since the last reset into every open phase, then reset the counter."""
        if not self.memory:
            return
        peak = self._mem_peak()
        self._step_peak = max(self._step_peak, peak)
        for i in self._stack:
            self._recs[i].peak = max(self._recs[i].peak, peak)
        self._mem_reset()

    # ------------------------------------------------------------------ context managers
    @contextmanager
    def step(self):
        """Profile one step; appends a :class:`StepProfile` to :attr:`steps` on exit."""
        if self._recs is not None:
            raise RuntimeError("PhaseTimer.step() does not nest")
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._recs, self._stack, self._step_peak = [], [], 0.0
        self._switched = None
        self._owner = threading.get_ident()
        if self.memory:
            self._mem_reset()
        t0 = self._now()
        try:
            yield self
        finally:
            self.switch(None)
            t1 = self._now()
            self._fold_peak()
            if self.cuda:
                torch.cuda.synchronize(self.device)
            self.steps.append(self._collect(t0, t1))
            self._recs, self._stack = None, []

    @contextmanager
    def phase(self, name: str):
        """Time ``name`` (exclusive of nested phases) within the current step."""
        if self._recs is None:
            yield
            return
        self._fold_peak()
        parent = self._stack[-1] if self._stack else None
        idx = len(self._recs)
        self._recs.append(_Rec(name, parent))
        if parent is not None:
            self._recs[parent].children.append(idx)
        self._stack.append(idx)
        rf = (
            torch.profiler.record_function(f"repblend:{name}")
            if self.record_functions
            else nullcontext()
        )
        with rf:
            self._recs[idx].start = self._now()
            try:
                yield
            finally:
                self._recs[idx].end = self._now()
                self._fold_peak()
                self._stack.pop()

    @property
    def current(self) -> str | None:
        """Name of the phase opened by :meth:`switch` (None if none is open)."""
        if self._recs is None or self._switched is None:
            return None
        return self._recs[self._switched].name

    def switch(self, name: str | None) -> None:
        """End the phase opened by the previous ``switch`` and start ``name`` (``None``: none).

        For code whose phases are marked at boundaries (hooks) rather than by ``with`` blocks.
        The new phase nests in the innermost open ``phase()`` block, if any.
        """
        if self._recs is None:
            return
        # Trace ranges only from the step's own thread: on a GPU, autograd hooks run on the
        # device thread, and a range must begin and end on one thread (there, a switch made by a
        # hook is timed but its trace range folds into the previous one).
        own = threading.get_ident() == self._owner
        if self._switched is not None:
            if self._recs[self._switched].name == name:
                return
            self._fold_peak()
            self._recs[self._switched].end = self._now()
            self._stack.remove(self._switched)
            self._switched = None
            if own and self._switched_rf is not None:
                self._switched_rf.__exit__(None, None, None)
                self._switched_rf = None
        if name is None:
            return
        if own and self.record_functions and self._switched_rf is None:
            self._switched_rf = torch.profiler.record_function(f"repblend:{name}")
            self._switched_rf.__enter__()
        self._fold_peak()
        parent = self._stack[-1] if self._stack else None
        idx = len(self._recs)
        self._recs.append(_Rec(name, parent))
        if parent is not None:
            self._recs[parent].children.append(idx)
        self._stack.append(idx)
        self._switched = idx
        self._recs[idx].start = self._now()

    # ------------------------------------------------------------------ results
    def _collect(self, t0, t1) -> StepProfile:
        recs = self._recs
        incl = [self._elapsed_ms(r.start, r.end) for r in recs]
        ms: dict[str, float] = {}
        peak: dict[str, float] = {}
        calls: dict[str, int] = {}
        for i, r in enumerate(recs):
            excl = incl[i] - sum(incl[c] for c in r.children)
            ms[r.name] = ms.get(r.name, 0.0) + max(0.0, excl)
            peak[r.name] = max(peak.get(r.name, 0.0), r.peak)
            calls[r.name] = calls.get(r.name, 0) + 1
        return StepProfile(self._elapsed_ms(t0, t1), ms, peak, self._step_peak, calls)


def summarise_profiles(steps: list[StepProfile]) -> dict:
    """Median over steps of the step time and of each phase's time; max of the peaks."""
    names = [p for p in PHASES if any(p in s.phases_ms for s in steps)]
    names += sorted({k for s in steps for k in s.phases_ms} - set(names))
    return {
        "step_ms": median([s.step_ms for s in steps]),
        "phases_ms": {k: median([s.phases_ms.get(k, 0.0) for s in steps]) for k in names},
        "other_ms": median([s.other_ms for s in steps]),
        "phases_peak_mib": {k: max(s.phases_peak_mib.get(k, 0.0) for s in steps) for k in names},
        "peak_mib": max(s.peak_mib for s in steps),
        "steps": len(steps),
    }


def format_profile_table(summary: dict, title: str = "", memory_label: str = "peak MiB") -> str:
    """A fixed-width table of :func:`summarise_profiles` output."""
    step = summary["step_ms"] or float("nan")
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'phase':<16} {'ms':>10} {'share':>7} {memory_label:>12}")
    lines.append("-" * 48)
    for name, ms in summary["phases_ms"].items():
        mib = summary["phases_peak_mib"].get(name, 0.0)
        lines.append(f"{name:<16} {ms:>10.1f} {100 * ms / step:>6.1f}% {mib:>12.1f}")
    lines.append(
        f"{'other':<16} {summary['other_ms']:>10.1f} {100 * summary['other_ms'] / step:>6.1f}%"
    )
    lines.append("-" * 48)
    lines.append(
        f"{'step':<16} {summary['step_ms']:>10.1f} {'100.0%':>7} {summary['peak_mib']:>12.1f}"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# the unroll, piece by piece


class ProfiledUnroller(Unroller):
    """:class:`Unroller` that reports its phases to a :class:`PhaseTimer` (identical results).

    It does not re-implement the unroll: it marks phase boundaries from the pieces the Unroller
    calls, so it follows the Unroller as that changes.

    * ``encode`` -> ``encoder_forward`` (the shared one-pass features, or per-step encodes);
    * ``_step_grads`` -> ``unroll`` (every exact step, TESLA pass 1) or ``meta_gradient`` (TESLA
      pass 2, where the ``psi`` backward that follows is included);
    * ``_matching`` (the exact mode's final loss) -> ``meta_gradient`` (the reverse pass);
    * a gradient hook on the encoder's output -> ``encoder_vjp``: everything autograd does after
      the features' cotangent is complete, i.e. the pull-back through the encoder.

    Args:
        timer: the :class:`PhaseTimer` that receives the phases (others as for Unroller).
    """

    def __init__(self, settings, encoder, img_spec, txt_spec, similarity=None, *, timer=None):
        super().__init__(settings, encoder, img_spec, txt_spec, similarity)
        self.timer = timer if timer is not None else PhaseTimer("cpu", memory=False)

    def run(self, *args, **kwargs):
        self.timer.switch("unroll")
        try:
            return super().run(*args, **kwargs)
        finally:
            self.timer.switch(None)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        prev = self.timer.current
        self.timer.switch("encoder_forward")
        out = super().encode(images)
        if out.requires_grad:
            out.register_hook(self._encoder_vjp_starts)
        self.timer.switch(prev)
        return out

    def _encoder_vjp_starts(self, grad):
        self.timer.switch("encoder_vjp")

    def _step_grads(self, *args, **kwargs):
        # Passed through untouched (the Unroller's signature may grow); only create_graph is read.
        bound = inspect.signature(super()._step_grads).bind(*args, **kwargs)
        pass2 = self.s.meta_grad == "tesla" and bool(bound.arguments.get("create_graph"))
        self.timer.switch("meta_gradient" if pass2 else "unroll")
        return super()._step_grads(*args, **kwargs)

    def _matching(self, *args, **kwargs):
        self.timer.switch("meta_gradient")
        return super()._matching(*args, **kwargs)
