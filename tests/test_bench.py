"""The step benchmark's library side (``repblend-fast bench``) on the tiny shape set."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from repblend_fast.bench import SHAPE_SETS, format_step_table, parse_providers, run_bench
from repblend_fast.host_allocator import _glibc

ROOT = Path(__file__).resolve().parents[1]

ALL = "lors-authors,repblend-authors,repblend-fast,lors-fast"
REQUIRED = {
    "provider",
    "meta_grad",
    "shapes",
    "config",
    "shape",
    "ms_per_iter",
    "ms_all",
    "peak_mib",
    "peak_total_mib",
    "setup_mib",
    "memory_method",
    "device",
    "torch",
    "git_sha",
    "cpu",
}


def test_run_bench_inprocess_records_and_json(tmp_path):
    out = tmp_path / "sub" / "bench.json"
    recs = run_bench(
        "tiny",
        str(out),
        ALL,
        iterations=2,
        device="cpu",
        warmup=1,
        isolate="inprocess",
        threads=1,
        verbose=False,
    )
    keys = [(r["provider"], r["meta_grad"]) for r in recs]
    assert keys == [
        ("lors-authors", "tesla"),
        ("repblend-authors", "tesla"),
        ("repblend-fast", "exact"),
        ("repblend-fast", "tesla"),
        ("lors-fast", "tesla"),
    ]
    for r in recs:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["device"] == "cpu" and r["shapes"] == "tiny" and r["config"] == "tiny"
        assert len(r["ms_all"]) == 2 and r["ms_per_iter"] > 0
        assert r["peak_total_mib"] > 0 and r["peak_mib"] >= 0
        assert r["time_ratio_to_fast_tesla"] > 0 and r["time_ratio_to_fast_exact"] > 0
        assert all(math.isfinite(v) for v in r["losses"]), r["losses"]
    fast = {r["meta_grad"]: r for r in recs if r["provider"] == "repblend-fast"}
    assert fast["tesla"]["time_ratio_to_fast_tesla"] == pytest.approx(1.0)
    for r in recs:
        if r["provider"].endswith("-authors"):
            assert 0 <= r["parity_rel_err"] < 2e-3
    assert json.loads(out.read_text()) == json.loads(json.dumps(recs))
    table = format_step_table(recs)
    assert "| repblend-fast | tesla | fp32 |" in table and "lors-authors" in table


def test_run_bench_subprocess_isolation(tmp_path):
    recs = run_bench(
        "tiny",
        None,
        "repblend-fast:tesla",
        iterations=1,
        device="cpu",
        warmup=1,
        isolate="subprocess",
        threads=1,
        verbose=False,
        host_allocator="retain",
    )
    (r,) = recs
    assert r["isolation"] == "subprocess" and r["ms_per_iter"] > 0
    assert "VmHWM" in r["memory_method"] or "ru_maxrss" in r["memory_method"]
    assert r["peak_total_mib"] >= r["setup_mib"] > 0
    # The worker reports the host allocator policy in force there (only glibc can apply retain).
    assert r["host_allocator"] == ("retain" if _glibc() is not None else "system")


def _cli(argv: list[str]) -> int:
    from repblend_fast.cli import main

    return main(argv)


def test_main_bench_cli(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = _cli(
        [
            "bench",
            "--shapes",
            "tiny",
            "--providers",
            "repblend-fast:exact",
            "--iterations",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--isolate",
            "inprocess",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    assert json.loads(out.read_text())[0]["meta_grad"] == "exact"
    assert "repblend-fast" in capsys.readouterr().out


def test_bench_cli_user_errors_name_the_flag(capsys):
    base = ["bench", "--shapes", "tiny", "--device", "cpu"]
    cases = [
        (["--providers", "mtt"], "--providers"),
        (["--iterations", "0"], "--iterations"),
        (["--encoder-chunk", "-1"], "--encoder-chunk"),
        (["--threads", "many"], "--threads"),
    ]
    import torch

    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda"))
    for extra, flag in cases:
        assert _cli(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and flag in err and "error:" in err, err


def test_bench_and_profile_flags_have_help():
    import argparse

    from repblend_fast.cli import bench as cli_bench

    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    cli_bench.register(sub)
    for name in ("bench", "profile"):
        parser = sub.choices[name]
        assert parser.get_default("func") is not None
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, (name, action.option_strings)
            if action.default is None:
                text = action.help.lower()
                assert "without it" in text or "default" in text, (name, action.option_strings)


def test_package_sources_never_import_benchmarks_or_edit_sys_path():
    """One-way dependencies: ``benchmarks/`` uses the package, never the reverse."""
    bad = re.compile(r"^\s*(from\s+benchmarks[.\s]|import\s+benchmarks\b)", re.MULTILINE)
    sources = sorted((ROOT / "repblend_fast").rglob("*.py"))
    assert any(p.parent.name == "bench" for p in sources)
    for path in sources:
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        assert not bad.search(text), f"{rel} imports benchmarks"
        assert "sys.path" not in text, f"{rel} touches sys.path"
        assert "PYTHONPATH" not in text, f"{rel} relies on PYTHONPATH"


def test_run_bench_from_outside_the_checkout(tmp_path):
    """The package (and its subprocess worker) runs with the checkout neither on sys.path nor
    the working directory, and never loads ``benchmarks``; encoder_chunk travels to the worker."""
    script = textwrap.dedent(
        """
        import json, os, sys
        root = os.path.realpath(sys.argv[1])
        try:
            import repblend_fast
        except ImportError:
            print("NOT-INSTALLED")
            sys.exit(0)
        from repblend_fast.bench import run_bench
        recs = run_bench("tiny", providers="repblend-authors,repblend-fast", device="cpu",
                         isolate="subprocess", iterations=1, warmup=0, threads=1,
                         verbose=False, encoder_chunk=3)
        assert "benchmarks" not in sys.modules, "benchmarks was imported"
        assert all(os.path.realpath(p or ".") != root for p in sys.path), sys.path
        print("RESULT " + json.dumps(recs))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(ROOT)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    if "NOT-INSTALLED" in proc.stdout:
        pytest.skip("repblend_fast is importable here only through PYTHONPATH (not installed)")
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    recs = json.loads(line[len("RESULT ") :])
    assert [(r["provider"], r["meta_grad"]) for r in recs] == [
        ("repblend-authors", "tesla"),
        ("repblend-fast", "exact"),
        ("repblend-fast", "tesla"),
    ]
    for r in recs:
        assert r["isolation"] == "subprocess" and r["ms_per_iter"] > 0
        assert "skipped" not in r
    assert 0 <= recs[0]["parity_rel_err"] < 2e-3
    assert [r["encoder_chunk"] for r in recs[1:]] == [3, 3]


def test_provider_parsing_and_validation():
    assert parse_providers("repblend-fast") == [
        ("repblend-fast", "exact"),
        ("repblend-fast", "tesla"),
    ]
    assert parse_providers(["lors-authors", "repblend-fast:tesla"]) == [
        ("lors-authors", "tesla"),
        ("repblend-fast", "tesla"),
    ]
    with pytest.raises(ValueError, match="unknown provider"):
        parse_providers("mtt")
    with pytest.raises(ValueError, match="TESLA only"):
        parse_providers("repblend-authors:exact")
    with pytest.raises(ValueError, match="shapes must be one of"):
        run_bench("huge", verbose=False)
    assert {"tiny", "ci", "paper", "scale"} <= set(SHAPE_SETS)
    ci = SHAPE_SETS["ci"][0]
    assert (ci.encoder, ci.image_size, ci.pairs, ci.batch, ci.steps, ci.d_txt, ci.dim) == (
        "resnet18",
        64,
        99,
        20,
        8,
        768,
        512,
    )


def test_report_combines_and_renders(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from benchmarks import report

    step = tmp_path / "step.json"
    run_bench(
        "tiny",
        str(step),
        "repblend-fast",
        iterations=1,
        device="cpu",
        warmup=0,
        isolate="inprocess",
        threads=1,
        verbose=False,
    )
    ops = tmp_path / "ops.json"
    info = {"op": "blend_pairs", "mode": "fwd", "shape": {"B": 20}, "dtype": "float32"}
    ops.write_text(
        json.dumps(
            {
                "machine_info": {"repblend_fast": {"gpu": "Test GPU", "git_sha": "abc"}},
                "benchmarks": [
                    {
                        "name": "a",
                        "extra_info": {
                            **info,
                            "provider": "reference",
                            "median_ms": 2.0,
                            "gbps": 10.0,
                            "bw_fraction": 0.5,
                        },
                    },
                    {
                        "name": "b",
                        "extra_info": {
                            **info,
                            "provider": "triton",
                            "median_ms": 0.5,
                            "gbps": 40.0,
                            "bw_fraction": 0.9,
                        },
                    },
                ],
            }
        )
    )
    skips = tmp_path / "ops.skips.json"
    skips.write_text(json.dumps({"skips": [{"test": "t", "reason": "cuda: no CUDA device"}]}))
    out_dir = tmp_path / "results"
    md = tmp_path / "r.md"
    rc = report.main(
        [
            str(step),
            str(ops),
            str(skips),
            "--combine",
            "--out",
            f"{out_dir}/",
            "--markdown",
            str(md),
        ]
    )
    assert rc == 0
    (res,) = list(out_dir.glob("*.json"))
    assert "_Test-GPU_" in res.name or "_cpu" in res.name
    doc = json.loads(res.read_text())
    assert len(doc["step"]) == 2 and len(doc["ops"]) == 2 and doc["skips"]
    text = md.read_text()
    assert "| repblend-fast | exact |" in text and "### blend_pairs" in text
    assert "4.00×" in text  # triton vs reference speed-up
    assert "no CUDA device" in text
    # The GPU script parses, and its help works without running anything.
    sh = root / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(sh)]).returncode == 0
    assert (
        "dry-run"
        in subprocess.run(["bash", str(sh), "--help"], capture_output=True, text=True).stdout
    )


def test_a_configuration_whose_parity_fails_records_no_time(tmp_path, monkeypatch):
    """The timed configuration's own meta-gradients are checked against its reference path in
    the same precision; with a wrong gradient (x1.25) injected into the bf16 row's timed path,
    that row keeps its errors and a reason but no time or memory, the fp32 row is timed, the
    JSON is written, and the run ends in ParityError."""
    from repblend_fast.bench import ParityError
    from repblend_fast.bench.runners import FastRunner

    real = FastRunner.grads_at_start

    def wrong_when_bf16(self, plan):
        grads = real(self, plan)
        timed = self.unroller is not self._reference
        if timed and self.autocast is not None:
            grads = {k: 1.25 * v for k, v in grads.items()}
        return grads

    monkeypatch.setattr(FastRunner, "grads_at_start", wrong_when_bf16)
    out = tmp_path / "bench.json"
    with pytest.raises(ParityError, match="bf16 encoder"):
        run_bench(
            "tiny",
            str(out),
            "repblend-fast:tesla",
            iterations=1,
            device="cpu",
            warmup=0,
            isolate="inprocess",
            threads=1,
            verbose=False,
            autocast=("none", "bf16"),
        )
    fp32, bf16 = json.loads(out.read_text())
    assert fp32["autocast"] == "none" and fp32["ms_per_iter"] > 0 and fp32["parity"]["ok"]
    assert bf16["autocast"] == "bf16" and bf16["parity_failed"]
    assert "ms_per_iter" not in bf16 and "peak_mib" not in bf16
    assert "parity failed" in bf16["skipped"] and bf16["parity"]["rel_err"]["x"] > 0.2
    assert "skipped: parity failed" in format_step_table([fp32, bf16])


def test_the_fast_path_gets_an_fp32_row_beside_the_bf16_one_on_cuda():
    """By default the step benchmark times the shipped setting and fp32 (one row on a CPU,
    where both are fp32), and the table names each row's precision."""
    from repblend_fast.bench.runners import DEFAULT_AUTOCAST, precision_rows
    from repblend_fast.bench.table import precision_text

    assert precision_rows(DEFAULT_AUTOCAST, "cuda") == ("auto", "none")
    assert precision_rows(DEFAULT_AUTOCAST, "cpu") == ("auto",)
    assert precision_rows(("bf16", "auto", "none"), "cuda") == ("bf16", "none")
    fast = {"provider": "repblend-fast", "meta_grad": "exact"}
    assert precision_text({**fast, "autocast": "bf16"}) == "bf16 encoder"
    assert precision_text({**fast, "autocast": "none"}) == "fp32"
    assert precision_text({"provider": "repblend-authors", "autocast": "none"}) == "fp32"
