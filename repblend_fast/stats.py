"""Small summary statistics shared by the evaluation, the benchmarks and the profiler.

One definition each, so that a median printed by the step benchmark, the profiler and the op
benchmarks means the same thing:

* :func:`quantile`: linear interpolation between the two nearest order statistics (numpy's
  default, "type 7"); ``quantile(v, 0.5)`` is the usual median (the mean of the two middle values
  for an even count).
* :func:`mean_std`: per-key mean and *population* standard deviation over runs (``ddof = 0``, as
  the research code reports ``np.std`` over its evaluation runs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["mean_std", "median", "quantile"]


def quantile(values: Iterable[float], q: float) -> float:
    """The ``q``-quantile (``0 <= q <= 1``) of ``values`` by linear interpolation.

    Raises ``ValueError`` for an empty sequence or ``q`` outside ``[0, 1]``.
    """
    s = sorted(float(v) for v in values)
    if not s:
        raise ValueError("quantile of an empty sequence")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must lie in [0, 1], got {q}")
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float:
    """``quantile(values, 0.5)``."""
    return quantile(values, 0.5)


def mean_std(rows: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """``{"mean": {key: ...}, "std": {key: ...}}`` over ``rows`` (population std; 0 for one row).

    Every row must hold the keys of the first one.
    """
    if not rows:
        raise ValueError("mean_std of no rows")
    out: dict[str, dict[str, float]] = {"mean": {}, "std": {}}
    n = len(rows)
    for k in rows[0]:
        v = [float(r[k]) for r in rows]
        m = math.fsum(v) / n
        out["mean"][k] = m
        out["std"][k] = math.sqrt(math.fsum((x - m) ** 2 for x in v) / n) if n > 1 else 0.0
    return out
