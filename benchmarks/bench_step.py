"""One distillation iteration per provider and meta-gradient mode, as pytest-benchmark records.

The same runners, inputs and parity check as ``repblend_fast.bench.run_bench`` (see that package
and benchmarks/README.md), run in this process: on a GPU the memory figures are exact
(``max_memory_allocated``); on a CPU the resident-set figures share the process with earlier
benchmarks, so use ``repblend-fast bench`` (a fresh process per provider) for CPU memory.
"""

from __future__ import annotations

import gc
from dataclasses import asdict

import pytest
import torch

from benchmarks.common import git_sha, sync
from repblend_fast.bench import SHAPE_SETS, build_step_inputs, check_parity, make_runner
from repblend_fast.stats import median, quantile

RUNS = [
    ("lors-authors", "tesla"),
    ("repblend-authors", "tesla"),
    ("repblend-fast", "exact"),
    ("repblend-fast", "tesla"),
]


def cases(shapes: str) -> list[tuple[str, dict]]:
    return [(s.name, {"shape": s}) for s in SHAPE_SETS[shapes]]


@pytest.mark.parametrize("run", RUNS, ids=[f"{p}-{m}" for p, m in RUNS])
def test_step(benchmark, device, case, run):
    from repblend_fast.profiling import reset_rss_peak, rss_mib, rss_peak_mib

    provider, meta_grad = run
    shape = case["shape"]
    cuda = device.type == "cuda"
    warmup, iterations = (2, 5) if cuda else (1, 2)
    method = provider.split("-")[0]
    inputs = build_step_inputs(shape, warmup + iterations + 1, methods=(method,))
    parity = {}
    if provider.endswith("-authors"):
        parity = check_parity(inputs, [run], device)
    runner = make_runner(inputs, provider, meta_grad, device)
    del inputs
    gc.collect()
    counter = iter(range(10**6))

    def one():
        out = runner.iteration(next(counter))
        sync(device)
        return out

    if cuda:
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        before = rss_mib()
        reset_rss_peak()
    benchmark.pedantic(one, rounds=iterations, iterations=1, warmup_rounds=warmup)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20) if cuda else rss_peak_mib()
    st = benchmark.stats.stats
    benchmark.extra_info.update(
        {
            "op": "step",
            "provider": provider,
            "mode": meta_grad,
            "dtype": "float32" + ("+bf16-encoder" if cuda and provider.endswith("-fast") else ""),
            "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
            "shape": asdict(shape),
            "median_ms": median(st.data) * 1e3,
            "p20_ms": quantile(st.data, 0.2) * 1e3,
            "p80_ms": quantile(st.data, 0.8) * 1e3,
            "peak_mib": max(0.0, peak - before),
            "peak_total_mib": peak,
            "memory": "cuda max_memory_allocated" if cuda else "in-process RSS (approximate)",
            "parity_rel_err": parity.get(provider),
            "git_sha": git_sha(),
        }
    )
