"""pytest setup of the benchmark suites (``python -m pytest benchmarks --shapes ci``).

* collects ``bench_*.py`` (the default test paths stay ``tests/``, so a plain ``python -m pytest``
  never runs these);
* ``--shapes {tiny,ci,check,paper,scale}`` picks the shape set each ``bench_<op>.py``
  parametrises over (via its ``cases(shapes)`` function);
* adds the machine description (GPU, CUDA, torch, triton, CPU, git sha) to the JSON's
  ``machine_info``;
* ``--skips-json PATH`` records which providers were skipped and why (for ``report.py``);
* ``--records-jsonl PATH`` appends each benchmark's ``extra_info`` as it finishes (for
  ``report.py``; kept when a timeout stops the run before pytest-benchmark writes its JSON);
* ``REPBLEND_BENCH_THREADS=n`` sets torch's CPU threads (1 keeps a shared 2-core machine's OpenMP
  barriers from stalling behind other processes).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = ("ci", "check", "paper", "scale")


def pytest_configure(config):
    threads = int(os.environ.get("REPBLEND_BENCH_THREADS", "0") or 0)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def pytest_addoption(parser):
    parser.addoption(
        "--shapes",
        choices=SHAPES + ("tiny",),
        default="ci",
        help="benchmark shape set: ci (CPU, seconds), check (a few paper-sized cases per op: "
        "the GPU script's), paper (RepBlend's sizes), scale (up to memory); tiny (one small "
        "case per op, the step benchmark's unit-test size: the GPU script's dry run)",
    )

    parser.addoption(
        "--skips-json",
        default=None,
        help="write the skipped benchmarks and their reasons to this JSON file",
    )
    parser.addoption(
        "--records-jsonl",
        default=None,
        help="append each benchmark's extra_info to this JSON-lines file as soon as it finishes "
        "(a run stopped by a timeout keeps what it measured; pytest-benchmark's own JSON is "
        "written only at the end)",
    )


_SKIPS: list[dict] = []


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        lr = report.longrepr
        reason = lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)
        _SKIPS.append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    path = item.config.getoption("--records-jsonl")
    if not path or report.when != "call" or not report.passed:
        return
    bench = getattr(item, "funcargs", {}).get("benchmark")
    info = dict(getattr(bench, "extra_info", None) or {})
    if "median_ms" not in info:
        return
    info["name"] = item.name
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(info) + "\n")
        fh.flush()


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--skips-json")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"skips": _SKIPS}, indent=1) + "\n", encoding="utf-8")


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest's python plugin already.
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def shape_set(config) -> str:
    return config.getoption("--shapes")


def pytest_generate_tests(metafunc):
    """``case`` is parametrised by the module's ``cases(shapes)`` (a list of (id, dict))."""
    if "case" in metafunc.fixturenames:
        cases_fn = getattr(metafunc.module, "cases", None)
        if cases_fn is None:
            raise pytest.UsageError(f"{metafunc.module.__name__} uses 'case' but has no cases()")
        items = cases_fn(shape_set(metafunc.config))
        metafunc.parametrize("case", [c for _, c in items], ids=[i for i, _ in items])


def pytest_benchmark_update_machine_info(config, machine_info):
    from benchmarks.common import bench_device
    from repblend_fast.bench import machine_info as _info

    machine_info["repblend_fast"] = _info(bench_device())
    machine_info["shapes"] = shape_set(config)


@pytest.fixture(scope="session")
def device():
    from benchmarks.common import bench_device

    return bench_device()


@pytest.fixture(scope="session")
def shapes(request):
    return shape_set(request.config)
