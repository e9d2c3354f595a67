"""``benchmarks/gpu_check.sh --dry-run``: the GPU script's stages end to end on a CPU (tiny shapes,
CPU device, the same stages and output files as on a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = [
    "smoke",
    "gpu_tests",
    "parity",
    "step_n99",
    "step_compile",
    "ops_trajectory",
    "ops_blend",
    "ops_contrastive",
    "report",
]


def test_gpu_check_parses_and_refuses_unknown_arguments():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    out = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--dry-run" in out.stdout and "--stages" in out.stdout
    bad = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


@pytest.mark.slow  # ~2 min on 2 cores (inductor compiles the tiny step in the compile stage)
def test_gpu_check_dry_run_end_to_end(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)  # the script sets it for its dry run
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    status = {line.split()[0]: line.split()[1] for line in summary if not line.startswith("total")}
    assert list(status) == STAGES and set(status.values()) == {"ok"}, summary
    for name in (
        "smoke.json",
        "parity.json",
        "gpu_tests.xml",
        "step_n99.json",
        "step_compile.json",
        "ops_contrastive.jsonl",
        "ops_contrastive.json",
        "logs.tar.gz",
    ):
        assert (tmp_path / name).is_file(), name
    parity = json.loads((tmp_path / "parity.json").read_text())["records"]
    assert [r["meta_grad"] for r in parity] == ["exact", "tesla"] and all(r["ok"] for r in parity)
    compiled = json.loads((tmp_path / "step_compile.json").read_text())
    assert {r["compile"] for r in compiled} == {"step"} and all(
        "ms_per_iter" in r for r in compiled
    )
    (res,) = (tmp_path / "results").glob("*.json")
    doc = json.loads(res.read_text())
    assert doc["smoke"] and doc["parity"] and doc["step"] and doc["ops"]
    md = (tmp_path / "results" / "results.md").read_text()
    for title in ("## Smoke", "## Parity at the timed settings", "## Step benchmark", "÷ compile"):
        assert title in md, title
