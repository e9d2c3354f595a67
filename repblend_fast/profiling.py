"""Per-phase time and peak memory of distillation steps (docs/design.md §1 use 3).

The engine marks its phases with ``repblend:<phase>`` ranges (:mod:`repblend_fast.engine.ranges`:
``io``, ``encoder_forward``, ``unroll``, ``meta_gradient``, ``encoder_vjp``, ``optimiser``).
:class:`RangeProfiler` runs steps under ``torch.profiler`` (CPU activity, and CUDA on a GPU),
puts a ``repblend:step`` range around each and reads the phases back from the profiler's events:

* time: each phase's *exclusive* time (its ranges' own minus the ranges nested in them), so the
  phases of a step add up to at most the step's time and the remainder is reported as ``other``.
  On a GPU the ranges' device-side annotations are used where the trace has them (the GPU time
  of the work the phase launched), else the host ranges; the step itself is the host range,
  which :meth:`RangeProfiler.step` closes after a synchronisation;
* memory: the step's peak is the CUDA caching allocator's ``max_memory_allocated`` on a GPU and
  the process's peak resident set (``VmHWM``, reset per step through ``/proc/self/clear_refs``)
  on a CPU; a phase's peak is the allocator level at the step's start (the resident set on a CPU)
  plus the highest net allocation the profiler's memory events reach while one of its ranges is
  open.

The profiler synchronises only at step boundaries; the ranges themselves add nothing when no
profiler runs. ``export_chrome_trace`` writes the trace with the ranges in it.
"""

from __future__ import annotations

import re
import resource
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from repblend_fast.engine.ranges import PHASES, PREFIX, STEP
from repblend_fast.stats import median

__all__ = [
    "PHASES",
    "RangeProfiler",
    "StepProfile",
    "format_profile_table",
    "rss_mib",
    "rss_peak_mib",
    "reset_rss_peak",
    "steps_from_events",
    "summarise_profiles",
]


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
# results


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


# --------------------------------------------------------------------------------------------------
# phases from the profiler's events


@dataclass
class _Range:
    name: str
    start: int  # ns
    end: int
    device: bool = False


def _exclusive(ranges: list[_Range]) -> tuple[dict[str, float], dict[str, int]]:
    """Exclusive ms and the number of ranges per name, for properly nested ``ranges``."""
    order = sorted(ranges, key=lambda r: (r.start, -r.end))
    nested = [0] * len(order)
    stack: list[int] = []
    for i, r in enumerate(order):
        while stack and order[stack[-1]].end <= r.start:
            stack.pop()
        if stack:
            nested[stack[-1]] += r.end - r.start
        stack.append(i)
    ms: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for r, inner in zip(order, nested):
        ms[r.name] += max(0, r.end - r.start - inner) / 1e6
        calls[r.name] += 1
    return dict(ms), dict(calls)


def _peaks(ranges: list[_Range], mem: list[tuple[int, int]], base_mib: float) -> dict[str, float]:
    """Per name, ``base_mib`` plus the highest net allocation (memory events ``(ns, bytes)``,
    counted from the step's start) reached while one of its ranges is open."""
    peaks: dict[str, float] = {}
    for r in ranges:
        level = top = sum(b for t, b in mem if t < r.start)
        for t, b in mem:
            if r.start <= t <= r.end:
                level += b
                top = max(top, level)
        peaks[r.name] = max(peaks.get(r.name, 0.0), base_mib + top / 2**20)
    return peaks


def steps_from_events(events, marks: list[dict]) -> list[StepProfile]:
    """:class:`StepProfile` of each ``repblend:step`` range among ``events`` (a
    ``torch.profiler`` run's Kineto events, ``prof.profiler.kineto_results.events()``).

    ``marks``: per step, in order, ``{"peak_mib": measured peak, "base_mib": memory level at its
    start}``. The phases are the ``repblend:<name>`` ranges inside each step (host ranges on the
    step's thread; device-side annotations instead where there are any)."""
    host, device, mem, steps = [], [], [], []
    for e in events:
        name = e.name()
        start = e.start_ns()
        if name == "[memory]":
            mem.append((start, e.nbytes(), e.device_type() != torch.autograd.DeviceType.CPU))
            continue
        if not name.startswith(PREFIX):
            continue
        r = _Range(name[len(PREFIX) :], start, start + e.duration_ns())
        if e.device_type() == torch.autograd.DeviceType.CPU:
            (steps if r.name == STEP else host).append((r, e.start_thread_id()))
        else:
            r.device = True
            device.append(r)
    steps.sort(key=lambda x: x[0].start)
    out = []
    for (step, thread), mark in zip(steps, marks):
        inside = [r for r, th in host if th == thread and step.start <= r.start < step.end]
        dev = [r for r in device if r.name != STEP and step.start <= r.start < step.end]
        timed = dev if dev else inside
        ms, calls = _exclusive(timed)
        on_gpu = bool(dev) or any(g for _, _, g in mem)
        step_mem = [(t, b) for t, b, g in mem if g == on_gpu and step.start <= t <= step.end]
        peaks = _peaks(inside, step_mem, mark["base_mib"])
        step_ms = (step.end - step.start) / 1e6
        peak = max([mark["peak_mib"], *peaks.values()])
        out.append(StepProfile(step_ms, ms, peaks, peak, calls))
    return out


class RangeProfiler:
    """Profiles steps with ``torch.profiler`` and reads their phases from the engine's ranges.

    ``with RangeProfiler(device) as rp:`` then ``with rp.step(): ...`` around each step;
    :attr:`steps` holds one :class:`StepProfile` per step once the ``with`` block has ended, and
    :meth:`export_chrome_trace` writes the trace. Steps do not nest.
    """

    def __init__(self, device: str | torch.device = "cpu", memory: bool = True):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.memory = memory
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=acts, profile_memory=memory)
        self._marks: list[dict] = []
        self._in_step = False
        self.steps: list[StepProfile] = []

    def __enter__(self) -> RangeProfiler:
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        if exc[0] is None:
            events = self._prof.profiler.kineto_results.events()
            self.steps = steps_from_events(events, self._marks)

    def _level_mib(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device) / 2**20
        return rss_mib()

    def _reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_rss_peak()

    def _peak_mib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return rss_peak_mib()

    @contextmanager
    def step(self):
        """One profiled step (a ``repblend:step`` range, synchronised at both ends on a GPU)."""
        if self._in_step:
            raise RuntimeError("RangeProfiler.step() does not nest")
        self._in_step = True
        if self.cuda:
            torch.cuda.synchronize(self.device)
        mark = {"base_mib": self._level_mib() if self.memory else 0.0, "peak_mib": 0.0}
        if self.memory:
            self._reset_peak()
        try:
            with torch.profiler.record_function(PREFIX + STEP):
                yield self
                if self.cuda:
                    torch.cuda.synchronize(self.device)
        finally:
            self._in_step = False
            mark["peak_mib"] = self._peak_mib() if self.memory else 0.0
            self._marks.append(mark)

    def export_chrome_trace(self, path: str) -> None:
        self._prof.export_chrome_trace(str(path))


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
