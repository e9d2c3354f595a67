"""The step profiler: the engine's phase ranges, read back from torch.profiler (time, memory),
and a profiled unroll that equals an unprofiled one."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn as nn

from repblend_fast.bench import run_profile
from repblend_fast.engine import ranges
from repblend_fast.engine.unroll import StepPlan, Unroller, UnrollSettings
from repblend_fast.models.heads import HeadSpec, init_head_flat
from repblend_fast.profiling import (
    PHASES,
    RangeProfiler,
    format_profile_table,
    reset_rss_peak,
    rss_mib,
    rss_peak_mib,
    summarise_profiles,
)

DT = torch.float64
N, B, T, D_F, D_T, DIM = 8, 3, 3, 5, 6, 4


class Sim:
    def __init__(self, g):
        self.p = {
            "a": 1 + 0.1 * torch.randn(N, generator=g, dtype=DT),
            "L": torch.randn(N, 2, generator=g, dtype=DT),
            "R": 0.3 * torch.randn(N, 2, generator=g, dtype=DT),
        }

    def params(self):
        return self.p

    def block(self, idx, params=None, *, check=True):
        p = self.p if params is None else params
        # idx [B] or [K, B] -> [B, B] or [K, B, B]
        return torch.diag_embed(p["a"][idx]) + 0.35 * p["L"][idx] @ p["R"][idx].transpose(-1, -2)


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(12, D_F), nn.Tanh()).double().requires_grad_(False)
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=DT))
    x = torch.randn(N, 3, 2, 2, generator=g, dtype=DT)
    y = torch.randn(N, D_T, generator=g, dtype=DT)
    th0 = (
        init_head_flat(D_F, DIM, generator=g, dtype=DT),
        init_head_flat(D_T, DIM, generator=g, dtype=DT),
    )
    th1 = tuple(t + 0.05 * torch.randn(t.shape, generator=g, dtype=DT) for t in th0)
    plan = StepPlan(
        torch.stack([torch.randperm(N, generator=g)[:B] for _ in range(T)]),
        torch.rand(T, generator=g, dtype=DT),
        torch.stack([torch.randperm(B, generator=g) for _ in range(T)]),
    )
    eta = (torch.tensor(0.07, dtype=DT), torch.tensor(0.11, dtype=DT))
    return enc, x, y, Sim(g), th0, th1, plan, eta


@pytest.mark.parametrize("mode", ["exact", "tesla"])
@pytest.mark.parametrize("share", [True, False])
def test_profiled_unroll_equals_unroll_and_marks_its_phases(mode, share):
    enc, x, y, sim, th0, th1, plan, eta = _problem()
    s = UnrollSettings(meta_grad=mode, share_encoder=share, checkpoint_steps=(mode == "exact"))
    specs = (HeadSpec(D_F, DIM), HeadSpec(D_T, DIM))
    unroller = Unroller(s, enc, *specs, sim)
    want = unroller.run(x, y, sim.params(), *eta, th0, th1, plan)
    with RangeProfiler("cpu") as prof:
        with prof.step():
            got = unroller.run(x, y, sim.params(), *eta, th0, th1, plan)
    # The ranges change nothing: the same numbers, to the bit.
    assert torch.equal(got.loss, want.loss)
    for k, v in want.grads.items():
        assert torch.equal(got.grads[k], v), k
    (step,) = prof.steps
    expected = {"encoder_forward", "unroll", "meta_gradient"} | (
        {"encoder_vjp"} if share else set()
    )
    assert expected <= set(step.phases_ms) <= set(PHASES)
    assert all(v >= 0 for v in step.phases_ms.values())
    assert sum(step.phases_ms.values()) <= step.step_ms + 1e-6
    assert step.calls["unroll"] == 1


def test_ranges_are_free_without_a_profiler():
    assert ranges.phase("unroll") is ranges.phase("io")  # one shared no-op context
    with RangeProfiler("cpu", memory=False):
        ctx = ranges.phase("unroll")
        assert isinstance(ctx, torch.profiler.record_function)


def test_range_profiler_exclusive_times_and_memory(tmp_path):
    with RangeProfiler("cpu") as prof:
        with ranges.phase("outside"):  # not inside a step: not counted
            pass
        t0 = time.perf_counter()
        with prof.step():
            with ranges.phase("outer"):
                a = time.perf_counter()
                time.sleep(0.02)
                with ranges.phase("inner"):
                    b = time.perf_counter()
                    buf = torch.ones(8 * 2**20)  # 32 MiB
                    time.sleep(0.03)
                    del buf
                    inner_ms = (time.perf_counter() - b) * 1e3
                outer_ms = (time.perf_counter() - a) * 1e3
            with ranges.phase("inner"):
                time.sleep(0.01)
        wall = (time.perf_counter() - t0) * 1e3
        with pytest.raises(RuntimeError, match="nest"):
            with prof.step():
                with prof.step():
                    pass
    s = prof.steps[0]
    assert set(s.phases_ms) == {"outer", "inner"}
    assert s.calls == {"outer": 1, "inner": 2}
    # Exclusive: the outer phase's own time, without the nested inner one.
    assert abs(s.phases_ms["outer"] - (outer_ms - inner_ms)) < 3.0
    assert s.phases_ms["inner"] >= inner_ms + 9.0
    assert sum(s.phases_ms.values()) <= s.step_ms <= wall + 1e-6
    assert s.other_ms >= 0
    # The 32 MiB buffer lifts the inner phase's (and the enclosing outer one's) peak.
    assert s.peak_mib >= s.phases_peak_mib["inner"] >= s.phases_peak_mib["outer"] - 1e-9
    assert s.phases_peak_mib["inner"] >= 32
    summary = summarise_profiles(prof.steps[:1])
    table = format_profile_table(summary, "t")
    assert "outer" in table and "inner" in table and "step" in table
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"repblend:step", "repblend:outer", "repblend:inner"} <= names


def test_rss_helpers():
    assert rss_mib() > 10
    reset_rss_peak()
    assert rss_peak_mib() >= rss_mib() * 0.9


@pytest.mark.parametrize("mode", ["exact", "tesla"])
def test_run_profile_reports_every_phase(tmp_path, mode):
    out = tmp_path / "prof.json"
    trace = tmp_path / "trace.json" if mode == "tesla" else None
    res = run_profile(
        "tiny",
        meta_grad=mode,
        iterations=2,
        warmup=1,
        device="cpu",
        trace=trace,
        json_path=str(out),
        threads=1,
        verbose=False,
    )
    (cfg,) = res["configs"]
    for step in cfg["steps"]:
        assert set(PHASES) <= set(step["phases_ms"]), step["phases_ms"].keys()
        assert all(v >= 0 for v in step["phases_ms"].values())
        assert sum(step["phases_ms"].values()) <= step["step_ms"] + 1e-6
        assert step["peak_mib"] > 0
    assert cfg["summary"]["steps"] == 2
    assert json.loads(out.read_text())["configs"][0]["config"] == "tiny"
    if trace is not None:
        events = json.loads(trace.read_text())["traceEvents"]
        assert any("repblend:unroll" in str(e.get("name")) for e in events)


def _cli(argv: list[str]) -> int:
    from repblend_fast.cli import main

    return main(argv)


def _write_config(tmp_path, **extra):
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "pairs": 11,
                "batch_size": 4,
                "syn_steps": 2,
                "sim_rank": 2,
                "sim_alpha": 1.0,
                "meta_grad": "exact",
                "encoder_chunk": 3,
                **extra,
            }
        )
    )
    return cfg


def test_profile_cli_takes_a_distill_config(tmp_path, capsys):
    cfg = _write_config(tmp_path)
    out = tmp_path / "profile.json"
    assert (
        _cli(
            [
                "profile",
                "--shapes",
                "tiny",
                "--config",
                str(cfg),
                "--steps",
                "1",
                "--warmup",
                "0",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "N=11, B=4, T=2" in text and "(exact)" in text
    assert out.exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"pairs": 0}))
    assert _cli(["profile", "--shapes", "tiny", "--config", str(bad)]) == 2
    assert "pairs" in capsys.readouterr().err
    assert _cli(["profile", "--shapes", "tiny", "--config", str(tmp_path / "missing.json")]) == 2
    assert "--config" in capsys.readouterr().err


@pytest.mark.parametrize("flag_chunk", [None, 5])
def test_profile_config_applies_sizes_and_chunk_without_touching_shape_sets(
    tmp_path, monkeypatch, capsys, flag_chunk
):
    import dataclasses
    import os

    from repblend_fast.bench import SHAPE_SETS, drivers

    before = {k: [dataclasses.astuple(s) for s in v] for k, v in SHAPE_SETS.items()}
    seen = []
    real = drivers.make_runner

    def spy(*args, **kwargs):
        runner = real(*args, **kwargs)
        seen.append((runner.unroller.s.encoder_chunk, runner.x.shape[0], runner.plans[0]))
        return runner

    monkeypatch.setattr(drivers, "make_runner", spy)
    out = tmp_path / "profile.json"
    # Sizes unlike the tiny set's own (N=11, B=4, T=2, r=2, alpha=1), so that applying them shows.
    cfg_file = _write_config(
        tmp_path, pairs=13, batch_size=5, syn_steps=3, sim_rank=3, sim_alpha=0.5
    )
    argv = ["profile", "--shapes", "tiny", "--config", str(cfg_file)]
    argv += ["--steps", "1", "--warmup", "0", "--threads", "1", "--json", str(out)]
    if flag_chunk is not None:
        argv += ["--encoder-chunk", str(flag_chunk)]
    assert _cli(argv) == 0
    capsys.readouterr()
    ((chunk, pairs, plan),) = seen
    assert chunk == (3 if flag_chunk is None else flag_chunk)
    assert pairs == 13 and tuple(plan.batches.shape) == (3, 5)
    res = json.loads(out.read_text())
    assert res["shapes"] == "tiny+config" and res["meta_grad"] == "exact"
    (cfg,) = res["configs"]
    assert cfg["config"] == "tiny+config"
    assert (cfg["shape"]["pairs"], cfg["shape"]["batch"], cfg["shape"]["steps"]) == (13, 5, 3)
    assert (cfg["shape"]["rank"], cfg["shape"]["alpha"]) == (3, 0.5)
    # The global table is untouched and nothing travels through the environment.
    assert {k: [dataclasses.astuple(s) for s in v] for k, v in SHAPE_SETS.items()} == before
    assert not any("ENCODER_CHUNK" in k for k in os.environ)


def test_profile_cli_writes_a_chrome_trace_with_the_phase_ranges(tmp_path, capsys):
    trace = tmp_path / "sub" / "trace.json"
    argv = ["profile", "--shapes", "tiny", "--steps", "1", "--warmup", "0", "--threads", "1"]
    assert _cli([*argv, "--meta-grad", "exact", "--trace", str(trace)]) == 0
    assert "encoder_vjp" in capsys.readouterr().out
    names = {str(e.get("name")) for e in json.loads(trace.read_text())["traceEvents"]}
    assert {f"repblend:{p}" for p in PHASES} | {"repblend:step"} <= names
