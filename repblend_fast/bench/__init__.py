"""Step benchmark and step profiler: the library side of ``repblend-fast bench`` / ``profile``.

Modules, each depending only on those above it:

=================  ==================================================================
``shapes``         :class:`StepShape`, :data:`SHAPE_SETS`, the stand-in encoder
``baselines``      the LoRS and RepBlend loops as their authors run them
``inputs``         random stand-in data, expert snapshots and plans
``runners``        the providers behind one interface, provider parsing
``measure``        timing, memory, parity, one provider in a fresh process, machine info
``parity``         the timed configuration against the fp32 reference path and float64
``worker``         the subprocess entry (``python -m repblend_fast.bench.worker``)
``table``          the results table: ratios between records, markdown
``drivers``        :func:`run_bench`, :func:`run_profile`
=================  ==================================================================

The command line lives in :mod:`repblend_fast.cli.bench`.
"""

from __future__ import annotations

from repblend_fast.bench.drivers import (
    FastVariant,
    fast_variants,
    format_step_table,
    run_bench,
    run_profile,
)
from repblend_fast.bench.inputs import StepInputs, build_step_inputs
from repblend_fast.bench.measure import (
    PARITY_RTOL,
    ParityError,
    check_parity,
    git_sha,
    machine_info,
)
from repblend_fast.bench.runners import (
    DEFAULT_PROVIDERS,
    PROVIDERS,
    make_runner,
    parse_providers,
)
from repblend_fast.bench.shapes import SHAPE_SETS, StepShape, shapes_with_config

__all__ = [
    "DEFAULT_PROVIDERS",
    "PARITY_RTOL",
    "FastVariant",
    "ParityError",
    "PROVIDERS",
    "SHAPE_SETS",
    "StepInputs",
    "StepShape",
    "build_step_inputs",
    "check_parity",
    "fast_variants",
    "format_step_table",
    "git_sha",
    "machine_info",
    "make_runner",
    "parse_providers",
    "run_bench",
    "run_profile",
    "shapes_with_config",
]
