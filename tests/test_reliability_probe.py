"""A probe of the command as a user meets it: every fault and bad-input case the reliability
work found, replayed end to end through ``python -m repblend_fast`` in a fresh process (exit
status, one line on stderr without a traceback, the flag or file named, the next step), plus a
check that every guarantee docs/reliability.md lists names a test that exists.

Slow (each case starts a process that imports torch): run with ``-m slow`` or
``REPBLEND_SLOW=1``. The faster in-process tests of the same cases are
tests/test_reliability*.py; this module is what a release replays.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_reliability import STABLE, _buffer_args, _data, _overwrite_floats, _rewrite_tensors

from repblend_fast.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def cli(*argv, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "repblend_fast", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def one_line(proc: subprocess.CompletedProcess, status: int = 2) -> str:
    """The error line of a refused command: exit ``status``, one line, no traceback."""
    lines = [
        ln for ln in proc.stderr.strip().splitlines() if not ln.startswith(("WARNING", "note:"))
    ]
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def world(tiny_pairs, tmp_path_factory):
    """A store, a finished 4-iteration run (checkpoint every 2) and its exported .pt."""
    w = type("World", (), {})()
    w.root = tmp_path_factory.mktemp("probe")
    w.ann, w.cache = tiny_pairs, w.root / "cache"
    w.data = _data(w.ann, w.cache)
    w.store = w.root / "experts"
    assert main(_buffer_args(w.ann, w.cache, w.store)) == 0
    w.run = w.root / "run4"
    argv = ["distill", *w.data, "--experts", w.store, "--out", w.run, "--iterations", "4"]
    assert main([*map(str, argv), *STABLE, "--set", "checkpoint_every=2"]) == 0
    w.pt = w.root / "distilled_4.pt"
    assert main(["export", "--distilled", str(w.run), "--out", str(w.pt)]) == 0
    return w


def copy_run(w, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(w.run, tmp_path / "run"))


def distill_argv(w, run, *extra) -> list:
    return ["distill", *w.data, "--experts", w.store, "--out", run, *STABLE, *extra]


# ------------------------------------------------------------------- silent different results
def test_a_bare_resume_keeps_the_saved_iteration_count(world, tmp_path):
    run = copy_run(world, tmp_path)
    p = cli("distill", *world.data, "--experts", world.store, "--out", run, "--resume")
    assert p.returncode == 0, p.stderr
    assert "resuming at iteration 4 of 4" in p.stdout
    assert json.loads((run / "config.json").read_text())["iterations"] == 4


def test_export_of_a_changed_or_nan_set_is_refused(world, tmp_path):
    run = copy_run(world, tmp_path)
    _overwrite_floats(run / "distilled.safetensors")
    assert "has changed since" in one_line(cli("export", "--distilled", run, "--out", "a.pt"))
    nan = tmp_path / "nan.safetensors"
    _rewrite_tensors_to(world.run / "distilled.safetensors", nan)
    assert "non-finite" in one_line(cli("export", "--distilled", nan, "--out", tmp_path / "b.pt"))


def _rewrite_tensors_to(src: Path, dst: Path) -> None:
    import shutil

    shutil.copy(src, dst)
    _rewrite_tensors(dst, lambda t: t["images"].view(-1)[0].fill_(float("nan")))


def test_another_image_size_is_refused_by_buffer_and_distill(world, tmp_path):
    import shutil

    store = Path(shutil.copytree(world.store, tmp_path / "experts"))
    argv = _buffer_args(world.ann, world.cache, store)
    argv[argv.index("--image-size") + 1] = "32"
    p = cli(*argv)
    assert p.returncode == 2 and "image_size: 16 -> 32" in p.stderr, p.stderr
    argv = [str(a) for a in distill_argv(world, tmp_path / "r", "--iterations", "1")]
    argv[argv.index("--image-size") + 1] = "32"
    p = cli(*argv)
    assert p.returncode == 2 and "image_size: store has 16, run wants 32" in p.stderr, p.stderr


def test_removing_expert_seeds_is_refused(world, tmp_path):
    import shutil

    store = Path(shutil.copytree(world.store, tmp_path / "experts"))
    man = json.loads((store / "manifest.json").read_text())
    del man["expert_seeds"]
    man["files"] = man["files"][::-1]
    (store / "manifest.json").write_text(json.dumps(man))
    argv = ["distill", *world.data, "--experts", store, "--out", tmp_path / "r", *STABLE]
    assert "lacks expert_seeds" in one_line(cli(*argv, "--iterations", "1"))


# ------------------------------------------------------------------- remedies that work
def test_a_changed_checkpoint_advises_overwrite_and_overwrite_works(world, tmp_path):
    run = copy_run(world, tmp_path)
    _rewrite_tensors(run / "checkpoint.safetensors", lambda t: t["x"].mul_(2))
    line = one_line(cli(*distill_argv(world, run, "--iterations", "6", "--resume")))
    assert "--overwrite" in line and "--no-verify" not in line, line
    assert cli(*distill_argv(world, run, "--iterations", "2", "--overwrite")).returncode == 0


def test_a_trillion_iteration_checkpoint_fails_cleanly_when_its_advice_is_followed(world, tmp_path):
    run = copy_run(world, tmp_path)
    _rewrite_tensors(run / "checkpoint.safetensors", lambda t: t["iteration"].fill_(10**12))
    base = distill_argv(world, run, "--resume", "--no-verify")
    assert f"--iterations {10**12} or more" in one_line(cli(*base, "--iterations", "6"))
    assert "disagree" in one_line(cli(*base, "--iterations", str(10**12)))


def test_resume_at_another_image_size_names_the_saved_one(world, tmp_path):
    run = copy_run(world, tmp_path)
    argv = [str(a) for a in distill_argv(world, run, "--iterations", "6", "--resume")]
    argv[argv.index("--image-size") + 1] = "32"
    line = one_line(cli(*argv))
    assert "store has 16, run wants 32" in line and "--image-size" in line, line
    assert "--overwrite" not in line, line


# ------------------------------------------------------------------- one line, the flag named
def test_bad_files_and_flags_are_one_line_naming_them(world, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((world.run / "distilled.safetensors").read_bytes()[:100])
    text = tmp_path / "notes.safetensors"
    text.write_text("hello\n" * 50)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(b"\x80\x04cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.")
    afile = tmp_path / "afile"
    afile.write_text("x")
    nan_pt = tmp_path / "distilled_9.pt"
    d = torch.load(world.pt, weights_only=True)
    d["image"][0] = float("nan")
    torch.save(d, nan_pt)
    data = [str(a) for a in world.data]
    i = data.index("--random-init-encoder")
    with_ckpt = [*data[:i], "--image-checkpoint", str(evil), *data[i + 1 :]]
    cases = [
        (["export", "--distilled", cut, "--out", tmp_path / "c.pt"], "--distilled"),
        (["evaluate", "--distilled", text], "not a safetensors file"),
        (["evaluate", "--distilled", "missing.safetensors"], "file not found"),
        (["evaluate", "--distilled", world.run, "--json", tmp_path], "--json"),
        (["import-distilled", "--src", nan_pt, "--out", tmp_path / "n.safetensors"], "NaN"),
        (
            ["import-distilled", "--src", world.pt, "--out", world.run / "distilled.safetensors"],
            "run folder",
        ),
        (distill_argv(world, afile, "--iterations", "1"), "--out"),
        (["buffer", *data, "--out", afile], "--out"),
        (distill_argv(world, world.run, "--iterations", "1"), "already holds a run"),
        (["distill", "--experts", "E", "--out", "O", "--set", "lr_imgg=10"], "did you mean"),
        (["distill", "--pairs", "many"], "--help"),
        (
            ["distill", *with_ckpt, "--experts", world.store, "--out", tmp_path / "r2", *STABLE],
            str(evil),
        ),
    ]
    for argv, needle in cases:
        p = cli(*argv)
        line = one_line(p)
        assert needle in line, (argv, line)
        assert "weights_only set to False" not in line and "Errno" not in line, line
        if argv[0] == "evaluate" and "--json" in argv:
            assert p.stdout == "", p.stdout  # refused before the table, not after it


def test_user_errors_need_no_heavy_work(world, tmp_path):
    """Each refusal takes no longer than starting the command at all, plus 2 s (the machine's
    load sets the base: ``repblend-fast --version`` is timed in the same run)."""
    t0 = time.perf_counter()
    assert cli("--version").returncode == 0
    base = time.perf_counter() - t0
    for argv in (
        ["evaluate", "--distilled", "missing.safetensors"],
        distill_argv(world, world.run, "--iterations", "1"),
        ["distill", "--experts", "E", "--out", "O", "--set", "lr_imgg=10"],
    ):
        t0 = time.perf_counter()
        assert cli(*argv).returncode == 2
        assert time.perf_counter() - t0 < base + 2.0, argv


# ------------------------------------------------------------------- interruptions
def test_a_second_sigterm_exits_143(world, tmp_path):
    run = tmp_path / "long"
    argv = distill_argv(world, run, "--iterations", "400", "--set", "checkpoint_every=1000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "repblend_fast", *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        _wait(lambda: (run / "metrics.jsonl").is_file(), proc)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "--resume" in err.strip().splitlines()[-1], err


def test_an_interrupted_buffer_names_the_next_step_and_the_rerun_what_it_kept(world, tmp_path):
    store = tmp_path / "experts"
    argv = _buffer_args(world.ann, world.cache, store)
    argv[argv.index("--experts") + 1] = "12"
    proc = subprocess.Popen(
        [sys.executable, "-m", "repblend_fast", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        _wait(lambda: (store / "expert_001.safetensors").is_file(), proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "rerun the same command" in err.strip().splitlines()[-1], err
    p = cli(*argv)  # the same command
    assert p.returncode == 0, p.stderr
    assert re.search(r"kept [1-9]\d* finished expert\(s\)", p.stderr), p.stderr


def _wait(cond, proc, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"ended early: {proc.communicate()}")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.02)


# ------------------------------------------------------------------- reading results
def test_info_fits_a_screen_and_imported_sets_say_unknown(world, tmp_path):
    p = cli("info", world.run)
    assert p.returncode == 0 and len(p.stdout.splitlines()) <= 12, p.stdout
    assert "4 done of 4 planned" in p.stdout and "guard" in p.stdout
    out = tmp_path / "imported.safetensors"
    assert cli("import-distilled", "--src", world.pt, "--out", out).returncode == 0
    p = cli("info", out)
    assert "unknown" in p.stdout, p.stdout
    full = json.loads(cli("info", "--json", out).stdout)
    assert full["config"]["iterations"] == "unknown"


# ------------------------------------------------------------------- the document's guarantees
def test_every_guarantee_of_the_reliability_document_names_an_existing_test():
    doc = (ROOT / "docs" / "reliability.md").read_text()
    section = doc[doc.index("## 8.") :]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and "`" in ln]
    sources = {p.name: p.read_text() for p in (ROOT / "tests").glob("test_*.py")}
    named = 0
    for row in rows:
        cell = row.strip("|").split("|")[-1]
        for name in re.findall(r"`(test_\w+?)(?:_…)?`", cell):
            named += 1
            assert any(f"def {name}" in s for s in sources.values()), (name, row)
        for module in re.findall(r"tests/(test_\w+\.py)", cell):
            assert module in sources, (module, row)
    assert named >= 20, named
