"""CPU thread policy: what ``--threads`` means, in one place.

:func:`resolve_threads` turns a ``--threads`` value into a count, :func:`agreed_threads` does so
once for all torchrun processes, and :func:`set_threads` (or :func:`threads_scope` for a block)
is the only place the library sets torch's intra-op thread count.

Results depend on torch's intra-op thread count (reductions are split differently), so a run
records the count it used and a resumed run reuses it. The default is one thread per CPU core,
which does not depend on what else runs on the machine; the load-aware choice
(:func:`auto_threads`) is only taken when asked for explicitly, because the result then depends
on the load.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = [
    "agreed_threads",
    "auto_threads",
    "load_average",
    "resolve_threads",
    "set_threads",
    "threads_scope",
]


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


def agreed_threads(value: str | int | None, default: int | Callable[[], int | None] | None = None):
    """:func:`resolve_threads` of ``value``; under torchrun rank 0 resolves it and every rank uses
    its count (``auto`` reads the load, which differs between processes, and results depend on
    the count). ``default`` may be a callable, then called where the count is resolved."""
    from repblend_fast import distributed

    def resolve() -> int:
        return resolve_threads(value, default() if callable(default) else default)

    ctx = distributed.current()
    return resolve() if ctx is None else ctx.from_main("threads", resolve)


def set_threads(n: int | None) -> int:
    """Set torch's intra-op thread count to ``n`` (``None`` or 0 keeps the current one); returns
    the count in use."""
    import torch

    if n:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


@contextmanager
def threads_scope(n: int | None) -> Iterator[int]:
    """:func:`set_threads` for the duration of a ``with`` block, the previous count restored
    after it; yields the count in use."""
    import torch

    old = torch.get_num_threads()
    try:
        yield set_threads(n)
    finally:
        set_threads(old)
