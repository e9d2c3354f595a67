"""One distillation iteration per provider and meta-gradient mode, as pytest-benchmark records.

The same runners, inputs and parity checks as ``repblend_fast.bench.run_bench`` (see that package
and benchmarks/README.md), run in this process: on a GPU the memory figures are exact
(``max_memory_allocated``); on a CPU the resident-set figures share the process with earlier
benchmarks, so use ``repblend-fast bench`` (a fresh process per provider) for CPU memory.

Rows and what they are compared with (``role`` in ``extra_info``, read by benchmarks/report.py):

* ``repblend-authors`` (and ``lors-authors``): the eager fp32 torch loop a user would otherwise
  run; ``repblend-authors`` is the ``eager`` baseline of every RepBlend row of its shape;
* ``repblend-fast`` exact / tesla: the fast path as ``DistillConfig`` runs it (fused ops, bf16
  encoder autocast on a GPU);
* ``repblend-fast`` with ``compile=step``: ``torch.compile`` of the encoder and of every unroll
  step (plain-torch ops inside the graph), the ``compile`` baseline of its mode (on a CPU only
  with ``REPBLEND_BENCH_COMPILE=1``, like the op benchmarks).

Parity before speed: the baselines against the fp32 reference TESLA path
(:func:`repblend_fast.bench.check_parity`), every fast row — the configuration that is timed —
against the fp32 reference path of its mode (:func:`repblend_fast.bench.parity.check_against`,
tolerances in repblend_fast/bench/parity.py). A row that fails records no time.
"""

from __future__ import annotations

import gc
from dataclasses import asdict

import pytest
import torch

from benchmarks.common import _compile_allowed, git_sha, sync
from repblend_fast.bench import SHAPE_SETS, build_step_inputs, check_parity, make_runner
from repblend_fast.bench.parity import check_against, reference_grads
from repblend_fast.stats import median, quantile

RUNS = [
    ("lors-authors", "tesla", "none"),
    ("repblend-authors", "tesla", "none"),
    ("repblend-fast", "exact", "none"),
    ("repblend-fast", "tesla", "none"),
    ("repblend-fast", "exact", "step"),
    ("repblend-fast", "tesla", "step"),
]


def cases(shapes: str) -> list[tuple[str, dict]]:
    # ``check`` (the GPU script's reduced op set) times the step at the paper shapes.
    return [(s.name, {"shape": s}) for s in SHAPE_SETS["paper" if shapes == "check" else shapes]]


def _role(provider: str, compile: str) -> str | None:
    if provider == "repblend-authors":
        return "eager"
    if provider == "repblend-fast" and compile != "none":
        return "compile"
    return None


@pytest.mark.parametrize(
    "run", RUNS, ids=[f"{p}-{m}" + ("" if c == "none" else f"-compile_{c}") for p, m, c in RUNS]
)
def test_step(benchmark, device, case, run):
    from repblend_fast.profiling import reset_rss_peak, rss_mib, rss_peak_mib

    provider, meta_grad, compile = run
    if compile != "none":
        ok, why = _compile_allowed(device)
        if not ok:
            pytest.skip(f"compile: {why}")
    shape = case["shape"]
    cuda = device.type == "cuda"
    warmup, iterations = (2, 5) if cuda else (1, 2)
    if compile != "none":
        warmup = max(warmup, 3 if cuda else 1)  # the first calls compile: never timed
    method = provider.split("-")[0]
    inputs = build_step_inputs(shape, warmup + iterations + 1, methods=(method,))
    parity: dict = {}
    if provider.endswith("-authors"):
        err = check_parity(inputs, [run[:2]], device)[provider]
        parity = {"max_rel_err": err, "ok": True}
    kw = {"compile": compile} if provider.endswith("-fast") else {}
    runner = make_runner(inputs, provider, meta_grad, device, **kw)
    if provider == "repblend-fast":
        parity = check_against(runner, reference_grads(inputs, meta_grad, device))
        if not parity["ok"]:
            w = parity["worst"]
            raise AssertionError(
                f"{provider} ({meta_grad}, compile={compile}): {w} relative error "
                f"{parity['rel_err'][w]:.3g} > {parity['rtol'][w]:.3g} against the fp32 "
                "reference path — no timing is recorded"
            )
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
    fast_bf16 = cuda and provider.endswith("-fast")
    benchmark.extra_info.update(
        {
            "op": "step",
            "provider": provider if compile == "none" else f"{provider}+compile",
            "mode": meta_grad,
            "role": _role(provider, compile),
            # The authors' loop is TESLA only; it is the eager baseline of both fast modes.
            "baseline_modes": ["exact", "tesla"] if provider == "repblend-authors" else None,
            "compile": compile,
            "dtype": "float32" + ("+bf16-encoder" if fast_bf16 else ""),
            "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
            "shape": asdict(shape),
            "median_ms": median(st.data) * 1e3,
            "p20_ms": quantile(st.data, 0.2) * 1e3,
            "p80_ms": quantile(st.data, 0.8) * 1e3,
            "peak_mib": max(0.0, peak - before),
            "peak_total_mib": peak,
            "memory": "cuda max_memory_allocated" if cuda else "in-process RSS (approximate)",
            "parity_rel_err": parity.get("max_rel_err"),
            "parity": parity,
            "git_sha": git_sha(),
        }
    )
