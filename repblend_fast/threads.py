"""CPU thread policy: what ``--threads`` means, in one place.

Results depend on torch's intra-op thread count (reductions are split differently), so a run
records the count it used and a resumed run reuses it. The default is one thread per CPU core,
which does not depend on what else runs on the machine; the load-aware choice
(:func:`auto_threads`) is only taken when asked for explicitly, because the result then depends
on the load.
"""

from __future__ import annotations

import os

__all__ = ["auto_threads", "load_average", "resolve_threads"]


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages, or None where the platform has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def auto_threads() -> int:
    """All cores, minus those the load average says other processes keep busy (at least 1).

    With OpenMP's default (active) wait policy, threads that share cores with other processes
    spin against them: small kernels then run an order of magnitude slower than with fewer
    threads.
    """
    cores = os.cpu_count() or 1
    load = load_average()
    busy = load[0] if load else 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def resolve_threads(value: str | int | None, default: int | None = None) -> int:
    """The thread count a ``--threads`` value asks for: ``None`` -> ``default`` (else one per
    core), ``"auto"`` -> :func:`auto_threads`, a positive integer as given (``ValueError``
    otherwise)."""
    if value is None:
        return int(default) if default else (os.cpu_count() or 1)
    if isinstance(value, str) and value.strip().lower() == "auto":
        return auto_threads()
    if isinstance(value, bool):
        raise ValueError(f"threads={value!r}: expected a positive integer or 'auto'")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"threads={value!r}: expected a positive integer or 'auto'") from None
    if n < 1 or str(value).strip() != str(n):
        raise ValueError(f"threads={value!r}: expected a positive integer or 'auto'")
    return n
