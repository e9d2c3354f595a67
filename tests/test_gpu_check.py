"""``benchmarks/gpu_check.sh``: its arguments, its exit status, the summary, the extension stage's
lock clearing, and (``slow``) the whole ``--dry-run``: the GPU script's stages end to end on a CPU
(tiny shapes, CPU device, the same stages and output files as on a GPU).

The script runs with ``python3`` from a bare checkout (no ``python`` on PATH, the project on
PYTHONPATH), as on the GPU machine; ``.ci/gpu_image_rehearsal.sh`` runs the slow test with the GPU
image's versions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from repblend_fast.ops import registry

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = [
    "build_ext",
    "smoke",
    "parity",
    "step_n99",
    "gpu_tests",
    # one op benchmark stage per kernel stem of the ops' list
    *(f"ops_{stem}" for stem in registry.stems()),
    "step_compile",
    "report",
]


def _python3_only_env(tmp_path: Path, **extra) -> dict:
    """The environment of a bare checkout on the GPU machine: a PATH with ``python3`` (this
    interpreter) and no ``python``, the project not on PYTHONPATH (the script puts it there)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "python3"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    dirs = [d for d in os.environ["PATH"].split(os.pathsep) if d and not Path(d, "python").exists()]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(PATH=os.pathsep.join([str(bin_dir), *dirs]), OUT=str(tmp_path / "out"), **extra)
    return env


def _summary(out: Path) -> tuple[dict, dict, str]:
    """``({stage: status}, {stage: row}, total line)`` of ``summary.txt``."""
    lines = (out / "summary.txt").read_text().splitlines()
    assert lines[0].split() == ["stage", "status", "wall_s", "cpu_s", "limit_s", "h100_exp_s"]
    assert lines[-1].startswith("total ")
    rows = {ln.split()[0]: ln.split() for ln in lines[1:-1]}
    return {k: v[1] for k, v in rows.items()}, rows, lines[-1]


def test_gpu_check_parses_and_refuses_unknown_arguments():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    out = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--dry-run" in out.stdout and "--stages" in out.stdout
    bad = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


def test_gpu_check_refuses_a_missing_interpreter(tmp_path):
    env = _python3_only_env(tmp_path, PYTHON="no-such-python3")
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "no 'no-such-python3' on PATH" in proc.stderr


def test_gpu_check_exits_nonzero_when_a_stage_fails(tmp_path):
    """A failing stage (here the interpreter is `false`) is FAILED in the summary and the script
    exits 1, after writing the summary."""
    env = _python3_only_env(tmp_path, PYTHON="false")
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--stages", "report"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    status, _, _ = _summary(tmp_path / "out")
    assert status == {"report": "FAILED(rc=1)"}
    assert "not ok: report" in proc.stderr and "FAILED(rc=1)" in proc.stdout


def test_build_stage_clears_stale_locks_with_python3_only(tmp_path):
    """The extension stage runs with `python3` only and the project not installed, clears a lock
    left by a killed build, records its CPU time, and writes its file."""
    cache = tmp_path / "cache"
    env = _python3_only_env(tmp_path, REPBLEND_CACHE_DIR=str(cache))
    probe = "import torch; print(torch.__version__.replace('+', '_'))"
    version = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    lock = cache / "ext" / f"torch{version}" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--stages", "build_ext"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not lock.exists()
    rec = json.loads((tmp_path / "out" / "build_ext.json").read_text())
    assert rec["status"] == "ok" and rec["stale_locks_removed"] == [str(lock)]
    status, rows, total = _summary(tmp_path / "out")
    assert status == {"build_ext": "ok"}
    # importing torch alone costs over a CPU second; the expected H100 time is the plan's
    assert float(rows["build_ext"][3]) >= 1 and rows["build_ext"][5] == "60", rows
    assert "dry run" in total


def test_stage_plan_fits_the_gpu_budget():
    """The expected H100 seconds stated in the script: the stages before step_compile plan at most
    6 minutes, so the 470 s budget (under 8 minutes) keeps 2 minutes to spare for step_compile,
    which runs last; every expected time is within its stage's limit."""
    show = (
        f'source <(sed -n "/^declare -A EXPECT/,/^)/p; /^declare -A LIMIT_GPU/,/^)/p" {SCRIPT}); '
        'for k in "${!EXPECT[@]}"; do echo "$k ${EXPECT[$k]} ${LIMIT_GPU[$k]}"; done'
    )
    out = subprocess.run(["bash", "-c", show], capture_output=True, text=True, check=True).stdout
    plan = {ln.split()[0]: (int(ln.split()[1]), int(ln.split()[2])) for ln in out.splitlines()}
    assert set(plan) == set(STAGES) | {"step_n499"}
    assert sum(e for k, (e, _) in plan.items() if k != "step_compile") <= 360
    assert all(e <= lim for e, lim in plan.values()), plan
    assert "BUDGET=${REPBLEND_CHECK_BUDGET:-470}" in SCRIPT.read_text()


@pytest.mark.slow  # ~4 min on 2 cores (inductor compiles the tiny step in the compile stage)
def test_gpu_check_dry_run_end_to_end(tmp_path):
    env = _python3_only_env(tmp_path, REPBLEND_CACHE_DIR=str(tmp_path / "cache"))
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status, rows, _ = _summary(out)
    assert list(status) == STAGES and set(status.values()) == {"ok"}, status
    for name in (
        "build_ext.json",
        "smoke.json",
        "parity.json",
        "gpu_tests.xml",
        "step_n99.json",
        "step_compile.json",
        "ops_contrastive.jsonl",
        "ops_contrastive.json",
        "logs.tar.gz",
    ):
        assert (out / name).is_file(), name
    smoke = json.loads((out / "smoke.json").read_text())["records"]
    assert {r["status"] for r in smoke if r["impl"] == "triton"} == {"ok"}, smoke
    parity = json.loads((out / "parity.json").read_text())["records"]
    assert [r["meta_grad"] for r in parity] == ["exact", "tesla"] and all(r["ok"] for r in parity)
    compiled = json.loads((out / "step_compile.json").read_text())
    assert {r["compile"] for r in compiled} == {"step"} and all(
        "ms_per_iter" in r for r in compiled
    )
    (res,) = (out / "results").glob("*.json")
    doc = json.loads(res.read_text())
    assert doc["smoke"] and doc["parity"] and doc["step"] and doc["ops"]
    md = (out / "results" / "results.md").read_text()
    for title in ("## Smoke", "## Parity at the timed settings", "## Step benchmark", "÷ compile"):
        assert title in md, title


def test_smoke_fails_when_a_required_implementation_cannot_run(tmp_path):
    """On the GPU the smoke stage requires both fused implementations: one that cannot run (here:
    the CUDA extension on a CPU) is UNAVAILABLE and fails the stage instead of being skipped."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    smoke = [sys.executable, str(ROOT / "benchmarks" / "smoke.py"), "--device", "cpu"]
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [*smoke, "--require", "cuda", "--json", str(out)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    recs = json.loads(out.read_text())["records"]
    assert {r["status"] for r in recs if r["impl"] == "cuda"} == {"UNAVAILABLE"}
    assert {r["status"] for r in recs if r["impl"] == "triton"} == {"skipped"}
    free = subprocess.run([*smoke, "--json", str(out)], env=env, capture_output=True, text=True)
    assert free.returncode == 0, free.stdout + free.stderr
    bad = subprocess.run([*smoke, "--require", "cdua", "--json", str(out)], capture_output=True)
    assert bad.returncode == 2 and b"expected a comma-separated subset" in bad.stderr


def test_setup_ranges_admit_the_gpu_image_pins():
    """Every package setup.py names that the GPU image's constraints pin is admitted at the pinned
    version (so the project supports both version sets)."""
    import ast

    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / ".ci" / "constraints-gpu-image.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    reqs = [
        Requirement(node.value)
        for node in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value[:1].isalpha()
        and any(op in node.value for op in (">=", "==", "<"))
        and " " not in node.value.split(";")[0]
    ]
    checked = {r.name.lower() for r in reqs if r.name.lower() in pins}
    assert {"torch", "numpy", "safetensors", "timm", "transformers", "triton"} <= checked
    for r in reqs:
        if r.name.lower() in pins:
            assert r.specifier.contains(pins[r.name.lower()], prereleases=True), (r, pins)
