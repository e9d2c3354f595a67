"""No silent wrong result (docs/reliability.md): every damaged, foreign or inconsistent input is
refused with exit status 2 and one line naming the file or flag, and every interruption can be
recovered to the bytes of an uninterrupted run.

The tests drive the ``repblend-fast`` command (in process where they can, as subprocesses where a
second process or a signal is the point) on the tiny generic dataset with a random-init resnet18
at 16 px, as tests/test_cli.py does.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repblend_fast.cli import main
from repblend_fast.io import load_safetensors, read_safetensors_header, safetensors_bytes

# Settings under which the tiny run is stable (no non-finite iterations) for 50+ iterations.
STABLE = [
    "--pairs", "8", "--batch-size", "4", "--syn-steps", "2", "--threads", "1",
    "--set", "sim_rank=2", "--set", "lr_lr=1e-4", "--set", "max_start_epoch=1",
    "--set", "lr_img=1", "--set", "lr_txt=1", "--set", "lr_sim=0.1", "--no-progress",
]  # fmt: skip


def _data(ann, cache) -> list[str]:
    return [
        "--dataset", "generic", "--annotations", str(ann), "--image-encoder", "resnet18",
        "--random-init-encoder", "--image-size", "16", "--cache-dir", str(cache),
    ]  # fmt: skip


def _buffer_args(ann, cache, out, *extra) -> list[str]:
    return [
        "buffer", *_data(ann, cache), "--experts", "2", "--epochs", "2", "--dim", "16",
        "--batch-size", "8", "--threads", "1", "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


class Env:
    """The module's shared data: a cache, stores and reference runs, built once."""

    def __init__(self, root: Path, ann: Path):
        self.root, self.ann, self.cache = root, ann, root / "cache"
        self._refs: dict[int, Path] = {}

    def buffer(self, out, *extra) -> int:
        return main(_buffer_args(self.ann, self.cache, out, *extra))

    def distill_args(self, experts, out, iterations, *extra) -> list[str]:
        return [
            "distill", *_data(self.ann, self.cache), "--experts", str(experts), "--out", str(out),
            "--iterations", str(iterations), *STABLE, *extra,
        ]  # fmt: skip

    def distill(self, experts, out, iterations, *extra) -> int:
        return main(self.distill_args(experts, out, iterations, *extra))

    def reference(self, iterations: int) -> Path:
        """An uninterrupted run of ``iterations`` on the seed-0 store."""
        if iterations not in self._refs:
            out = self.root / f"ref{iterations}"
            assert self.distill(self.store, out, iterations) == 0
            self._refs[iterations] = out
        return self._refs[iterations]


@pytest.fixture(scope="module")
def env(tiny_pairs, tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("reliability"), tiny_pairs)
    e.store = e.root / "experts"
    assert e.buffer(e.store) == 0
    e.store1 = e.root / "experts_seed1"
    assert e.buffer(e.store1, "--seed", "1") == 0
    return e


def _err(capsys) -> str:
    """stderr of the last command, checked to be one line without a traceback."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("WARNING", "INFO"))]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


def _same_run(a: Path, b: Path) -> None:
    """Bit-identical distilled tensors and the same per-iteration losses.

    The files' metadata records each run's own settings (``checkpoint_every``
    differs between a resumed run and its reference), so the tensors are compared.
    """
    from safetensors.torch import load_file

    ta, tb = load_file(a / "distilled.safetensors"), load_file(b / "distilled.safetensors")
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert ta[k].numpy().tobytes() == tb[k].numpy().tobytes(), k

    def losses(run):
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["iteration"], r["loss"]) for r in recs if "iteration" in r]

    assert losses(a) == losses(b)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _spawn(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "repblend_fast", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _rewrite_tensors(path: Path, change) -> None:
    """Rewrite a safetensors file with ``change(tensors)`` applied, keeping its metadata (what
    a user editing a file by hand would do)."""
    meta = read_safetensors_header(path).get("__metadata__")
    t = load_safetensors(path)
    change(t)
    path.write_bytes(safetensors_bytes(t, meta))


# ------------------------------------------------------------------- finding 1: changed bytes
def _overwrite_floats(path: Path) -> None:
    """Replace 4,096 floats inside the data section by other finite values (same size)."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little") + 64
    data[start : start + 4 * 4096] = torch.full((4096,), 0.25).numpy().tobytes()
    path.write_bytes(bytes(data))


def _link_outside(store: Path, env) -> None:
    target = env.root / "outside.safetensors"
    shutil.copy(store / "expert_001.safetensors", target)
    (store / "expert_001.safetensors").unlink()
    (store / "expert_001.safetensors").symlink_to(target)


def _null_file(store: Path, env) -> None:
    man = json.loads((store / "manifest.json").read_text())
    man["files"] = [None, man["files"][1]]
    (store / "manifest.json").write_text(json.dumps(man))


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda s, e: _overwrite_floats(s / "expert_000.safetensors"), "has changed since"),
        (
            lambda s, e: (s / "expert_000.safetensors").write_bytes(
                (s / "expert_000.safetensors").read_bytes()[:-100]
            ),
            "truncated safetensors file",
        ),
        (
            lambda s, e: (s / "expert_001.safetensors").write_bytes(b"\x07" * 64 + b"garbage"),
            "not a safetensors file",
        ),
        # finding 2: an expert file of a store built with other settings (seed 1)
        (
            lambda s, e: shutil.copy(e.store1 / "expert_000.safetensors", s),
            "trained with other settings",
        ),
        # finding 11: a symbolic link leaving the store
        (_link_outside, "outside the store"),
        # finding 10: files: [null]
        (_null_file, "plain names"),
    ],
    ids=["floats", "truncated", "garbled", "foreign-expert", "symlink", "null-file"],
)
def test_a_damaged_or_foreign_expert_store_is_refused(env, tmp_path, capsys, damage, needle):
    store = _copy(env.store, tmp_path / "experts")
    damage(store, env)
    capsys.readouterr()
    assert env.distill(store, tmp_path / "run", 2) == 2
    err = _err(capsys)
    assert needle in err and str(store) in err, err
    assert not (tmp_path / "run" / "distilled.safetensors").exists()


def test_no_verify_skips_only_the_sha256(env, tmp_path, capsys, caplog):
    store = _copy(env.store, tmp_path / "experts")
    _overwrite_floats(store / "expert_000.safetensors")
    assert env.distill(store, tmp_path / "run", 1, "--no-verify") == 0
    assert "--no-verify" in caplog.text
    (store / "expert_000.safetensors").write_bytes(
        (store / "expert_000.safetensors").read_bytes() + b"\0" * 8
    )
    capsys.readouterr()
    assert env.distill(store, tmp_path / "run2", 1, "--no-verify") == 2
    assert "trailing bytes" in _err(capsys)


def test_flipped_bytes_in_the_feature_cache_are_recomputed(env, tmp_path):
    cache = _copy(env.cache, tmp_path / "cache")
    entries = sorted((cache / "features").glob("*.safetensors"))
    assert entries
    for p in entries:
        data = bytearray(p.read_bytes())
        data[-40:-20] = bytes(b ^ 0xFF for b in data[-40:-20])
        p.write_bytes(bytes(data))
    out = tmp_path / "experts"
    with pytest.warns(RuntimeWarning, match=r"unusable \(.*has changed since") as rec:
        assert main(_buffer_args(env.ann, cache, out)) == 0
    assert any(entries[0].name in str(w.message) for w in rec)
    for name in ("expert_000.safetensors", "expert_001.safetensors"):
        assert (out / name).read_bytes() == (env.store / name).read_bytes()


@pytest.fixture(scope="module")
def run4(env):
    """A finished 4-iteration run with a checkpoint every 2 iterations."""
    out = env.root / "run4"
    assert env.distill(env.store, out, 4, "--set", "checkpoint_every=2") == 0
    return out


def test_a_changed_checkpoint_is_refused(env, run4, tmp_path, capsys):
    run = _copy(run4, tmp_path / "run")
    _rewrite_tensors(run / "checkpoint.safetensors", lambda t: t["x"].mul_(1.5))
    capsys.readouterr()
    assert env.distill(env.store, run, 6, "--resume") == 2
    err = _err(capsys)
    assert "checkpoint.safetensors has changed since it was written" in err, err


def test_a_checkpoint_counter_out_of_range_is_refused(env, run4, tmp_path, capsys):
    run = _copy(run4, tmp_path / "run")
    capsys.readouterr()
    assert env.distill(env.store, run, 3, "--resume") == 2  # the checkpoint is at iteration 4
    assert "past iterations=3" in _err(capsys)
    _rewrite_tensors(run / "checkpoint.safetensors", lambda t: t["iteration"].fill_(-5))
    capsys.readouterr()
    assert env.distill(env.store, run, 6, "--resume") == 2
    assert "checkpoint.safetensors" in _err(capsys)
    # Unverified, the counter itself is still checked.
    assert env.distill(env.store, run, 6, "--resume", "--no-verify") == 2
    assert "iteration = -5 is outside" in _err(capsys)
    # A checkpoint moved back by an iteration disagrees with metrics.jsonl.
    _rewrite_tensors(run / "checkpoint.safetensors", lambda t: t["iteration"].fill_(3))
    assert env.distill(env.store, run, 6, "--resume", "--no-verify") == 2
    assert "metrics.jsonl and the checkpoint disagree" in _err(capsys)
    (run / "checkpoint.safetensors").write_bytes(b"\x00" * 16)
    assert env.distill(env.store, run, 6, "--resume", "--no-verify") == 2
    assert "not a safetensors file" in _err(capsys)


# ------------------------------------------------------------------- finding 2: foreign inputs
def test_experts_of_another_dataset_are_refused(env, tmp_path, capsys):
    other = tmp_path / "other.jsonl"
    rows = env.ann.read_text().splitlines()[:20]
    other.write_text("\n".join(rows) + "\n")
    store = tmp_path / "experts"
    assert main(_buffer_args(other, env.cache, store, "--image-root", str(env.ann.parent))) == 0
    capsys.readouterr()
    assert env.distill(store, tmp_path / "run", 1) == 2
    err = capsys.readouterr().err
    assert "dataset_fingerprint" in err and "trained on other data" in err, err


def test_resume_against_another_store_is_refused(env, run4, tmp_path, capsys):
    run = _copy(run4, tmp_path / "run")
    capsys.readouterr()
    assert env.distill(env.store1, run, 6, "--resume") == 2
    assert "continues a run on the expert store" in _err(capsys)


# ------------------------------------------------------------------- finding 3: store builds
def test_a_rerun_with_other_settings_never_mixes_with_a_finished_store(
    env, tmp_path, capsys, monkeypatch
):
    from repblend_fast.experts.store import StoreWriter

    store = _copy(env.store, tmp_path / "experts")
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    capsys.readouterr()
    assert env.buffer(store, "--seed", "1") == 2
    err = _err(capsys)
    assert "built with other settings" in err and "train.seed: 0 -> 1" in err, err
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before
    # --overwrite, killed after the first expert file: the old manifest is already gone.
    add = StoreWriter.add

    def add_then_die(self, index, *a, **kw):
        add(self, index, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(StoreWriter, "add", add_then_die)
    assert env.buffer(store, "--seed", "1", "--overwrite") == 130
    monkeypatch.undo()
    assert not (store / "manifest.json").exists()
    capsys.readouterr()
    assert env.distill(store, tmp_path / "run", 1) == 2
    assert "unfinished expert store" in _err(capsys)
    # The same command finishes it, keeping the expert already written.
    assert env.buffer(store, "--seed", "1", "--overwrite") == 0
    for name in ("manifest.json", "expert_000.safetensors", "expert_001.safetensors"):
        assert (store / name).read_bytes() == (env.store1 / name).read_bytes()
    assert sorted(p.name for p in store.iterdir()) == sorted(p.name for p in env.store1.iterdir())


_HOLD = (
    "import sys, time\n"
    "from repblend_fast.locks import FolderLock\n"
    "lock = FolderLock(sys.argv[1], sys.argv[2]).acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


def test_a_second_buffer_writer_is_refused_until_the_first_dies(env, tmp_path, capsys):
    store = _copy(env.store, tmp_path / "experts")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(store), "buffer: writing an expert store"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.stdout.close()
        capsys.readouterr()
        assert env.buffer(store) == 2
        err = _err(capsys)
        assert f"in use by process {holder.pid} (buffer: writing an expert store)" in err, err
    finally:
        holder.kill()  # SIGKILL: the operating system releases the lock
        holder.wait()
    assert env.buffer(store) == 0


# ------------------------------------------------------------------- finding 4: non-finite values
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--set", "lr_img=NaN"], "--set lr_img=NaN: DistillConfig.lr_img=nan: expected a finite"),
        (["--set", "lr_txt=Infinity"], "--set lr_txt=Infinity"),
        (["--set", "syn_steps=2.5"], "DistillConfig.syn_steps=2.5: expected an integer"),
        (["--set", "iterations=2.5"], "DistillConfig.iterations=2.5: expected an integer"),
        (["--set", "batch_size=true"], "DistillConfig.batch_size=True: expected an integer"),
        (["--set", "blend=1"], "DistillConfig.blend=1: expected true or false"),
        (["--set", "clamp_lr=-1"], "DistillConfig.clamp_lr=-1: expected > 0"),
        (["--set", "temperature=1e-30"], "DistillConfig.temperature=1e-30: expected in [0.001"),
        (["--set", "lr_sim=-1"], "lr_sim must be >= 0"),
        (["--batch-size", "0"], "DistillConfig.batch_size=0"),
    ],
)
def test_bad_distill_settings_are_refused(argv, needle, capsys):
    assert main(["distill", "--experts", "e", "--out", "o", *argv]) == 2
    assert needle in _err(capsys)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--lr", "0"], "--lr must be a finite number > 0"),
        (["--lr", "-1"], "--lr must be a finite number > 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--dim", "0"], "--dim must be >= 1"),
        (["--seed", "-1"], "--seed must be >= 0"),
    ],
)
def test_bad_buffer_settings_are_refused(argv, needle, capsys):
    assert main(["buffer", "--out", "o", *argv]) == 2
    assert needle in _err(capsys)


def test_a_non_finite_set_is_neither_written_nor_evaluated(env, tmp_path, capsys):
    from repblend_fast.engine.distill import DistilledSet
    from repblend_fast.io import atomic_save_safetensors

    images = torch.full((4, 3, 16, 16), float("nan"))
    texts = torch.zeros(4, 384)
    with pytest.raises(ValueError, match="not written: the distilled images hold non-finite"):
        DistilledSet(images, texts, 0.1, 0.1, None, {}).save(tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()
    meta = {"format_version": "1", "kind": "repblend_fast.distilled"}
    t = {"images": images, "texts": texts}
    t.update({"eta_img": torch.tensor(0.1), "eta_txt": torch.tensor(0.1)})
    atomic_save_safetensors(t, tmp_path / "nan.safetensors", metadata=meta)
    capsys.readouterr()
    rc = main(
        ["evaluate", "--distilled", str(tmp_path / "nan.safetensors"), *_data(env.ann, env.cache)]
        + ["--num-eval", "1", "--epochs", "1", "--threads", "1"]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "holds non-finite values (images 100% NaN/Inf)" in err and "Traceback" not in err


# ------------------------------------------------------------------- finding 5: concurrent runs
def _ckpt_iteration(run: Path) -> int:
    return int(load_safetensors(run / "checkpoint.safetensors")["iteration"])


def test_a_second_distill_is_refused_and_kill_9_resumes_bit_for_bit(env, tmp_path, capsys):
    run = tmp_path / "run"
    argv = env.distill_args(env.store, run, 100000, "--set", "checkpoint_every=2")[:]
    proc = _spawn(argv)
    try:
        _wait_for(lambda: _lines(run / "metrics.jsonl") >= 6, proc)
        capsys.readouterr()
        assert env.distill(env.store, run, 5, "--resume") == 2
        err = _err(capsys)
        assert f"in use by process {proc.pid} (distill run)" in err, err
        assert env.distill(env.store, run, 5, "--overwrite") == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # Killed at an arbitrary point: --resume continues to the bytes of an uninterrupted run.
    k = _ckpt_iteration(run)
    assert env.distill(env.store, run, k + 3, "--resume") == 0
    _same_run(run, env.reference(k + 3))


# ------------------------------------------------------------------- finding 6: no checkpoint yet
def _stopped_before_first_checkpoint(env, out: Path, monkeypatch) -> None:
    from repblend_fast.engine.distill import Distiller

    step = Distiller.step

    def step_then_die(self):
        rec = step(self)
        if self.iteration == 3:
            raise KeyboardInterrupt
        return rec

    monkeypatch.setattr(Distiller, "step", step_then_die)
    assert env.distill(env.store, out, 6, "--set", "checkpoint_every=0") == 130
    monkeypatch.undo()
    assert _lines(out / "metrics.jsonl") == 3 and not (out / "checkpoint.safetensors").exists()


def test_a_run_stopped_before_its_first_checkpoint_can_be_resumed_or_overwritten(
    env, tmp_path, capsys, caplog, monkeypatch
):
    ref = env.reference(6)
    a, b = tmp_path / "a", tmp_path / "b"
    _stopped_before_first_checkpoint(env, a, monkeypatch)
    capsys.readouterr()
    assert env.distill(env.store, a, 6, "--set", "checkpoint_every=0") == 2
    err = _err(capsys)
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err, err
    assert env.distill(env.store, a, 6, "--set", "checkpoint_every=0", "--resume") == 0
    assert "stopped before its first checkpoint; starting it over" in caplog.text
    _same_run(a, ref)
    _stopped_before_first_checkpoint(env, b, monkeypatch)
    assert env.distill(env.store, b, 6, "--overwrite") == 0
    _same_run(b, ref)


def test_sigterm_writes_a_checkpoint_and_resume_continues(env, tmp_path):
    run = tmp_path / "run"
    proc = _spawn(env.distill_args(env.store, run, 100000, "--set", "checkpoint_every=0"))
    _wait_for(lambda: _lines(run / "metrics.jsonl") >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    k = _ckpt_iteration(run)
    assert f"interrupted by signal {int(signal.SIGTERM)} at iteration {k}" in err, err
    assert "--resume" in err
    assert env.distill(env.store, run, k + 2, "--resume") == 0
    _same_run(run, env.reference(k + 2))


# ------------------------------------------------------------------- finding 7: torn metrics line
def test_a_torn_metrics_line_is_dropped_with_a_message(env, run4, tmp_path, caplog):
    run = _copy(run4, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"iteration": 4, "loss": 1.2')
    assert env.distill(env.store, run, 6, "--resume") == 0
    assert "metrics.jsonl: dropped a torn last line" in caplog.text
    _same_run(run, env.reference(6))


def test_disk_full_while_logging_leaves_no_torn_line(env, tmp_path, capsys, monkeypatch):
    import repblend_fast.engine.checkpoint as ck

    run = tmp_path / "run"
    real_open = open
    calls = {"n": 0}

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            self.fh.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass

    def fake_open(path, mode="r", *a, **kw):
        fh = real_open(path, mode, *a, **kw)
        if mode == "ab" and Path(path).name == "metrics.jsonl":
            calls["n"] += 1
            if calls["n"] == 4:
                return Full(fh)
        return fh

    monkeypatch.setattr(ck, "open", fake_open, raising=False)
    capsys.readouterr()
    assert env.distill(env.store, run, 6, "--set", "checkpoint_every=2") == 2
    monkeypatch.undo()
    err = _err(capsys)
    assert "No space left on device" in err and str(run / "metrics.jsonl") in err, err
    text = (run / "metrics.jsonl").read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 3
    # (checkpoint_every may change on resume; the reference ran with the preset's 0)
    assert env.distill(env.store, run, 6, "--resume") == 0
    _same_run(run, env.reference(6))


# ------------------------------------------------------------------- finding 9: followable advice
def test_resume_may_change_the_learning_rates_and_records_it(env, run4, tmp_path, capsys):
    from repblend_fast.engine.checkpoint import RESUMABLE_CHANGES

    assert {"lr_img", "lr_txt", "lr_lr", "lr_sim", "clamp_lr"} <= set(RESUMABLE_CHANGES)
    run = _copy(run4, tmp_path / "run")
    assert env.distill(env.store, run, 6, "--resume", "--set", "lr_img=0.5") == 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    change = [r for r in recs if r.get("event") == "config_change"]
    assert change == [
        {"event": "config_change", "at_iteration": 4, "changes": {"lr_img": [1, 0.5]}}
    ]
    assert [r["iteration"] for r in recs if "iteration" in r] == list(range(6))
    assert json.loads((run / "config.json").read_text())["lr_img"] == 0.5
    capsys.readouterr()
    assert env.distill(env.store, run, 8, "--resume", "--set", "lr_init=0.2") == 2
    assert "lr_init: saved 0.1 vs now 0.2" in _err(capsys)


# ------------------------------------------------------------------- finding 10: one-line errors
def test_an_unwritable_out_is_one_line(env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "readonly"
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o555)
    else:  # root ignores permissions: refuse the write the way the kernel would
        import repblend_fast.locks as locks

        real = os.open

        def deny(path, *a, **kw):
            if str(path).startswith(str(out)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real(path, *a, **kw)

        monkeypatch.setattr(locks.os, "open", deny)
    try:
        capsys.readouterr()
        assert env.distill(env.store, out, 2) == 2
    finally:
        out.chmod(0o755)
    err = _err(capsys)
    assert "Permission denied" in err and str(out) in err, err


def test_an_unexpected_error_is_one_line_unless_debug(monkeypatch, capsys):
    import repblend_fast.cli.run as run_cli

    def boom(args):
        raise KeyError("surprise")

    monkeypatch.setattr(run_cli, "cmd_info", boom)
    assert main(["info", "x"]) == 1
    err = _err(capsys)
    assert "internal error: KeyError" in err and "--debug" in err
    assert main(["--debug", "info", "x"]) == 1
    assert "Traceback" in capsys.readouterr().err


# ------------------------------------------------------------------- finding 11: stale temp files
def test_stale_temporary_files_are_removed(env, run4, tmp_path):
    store = _copy(env.store, tmp_path / "experts")
    (store / ".expert_000.safetensors.abcd1234.tmp").write_bytes(b"half")
    assert env.buffer(store) == 0
    assert not list(store.glob(".*.tmp"))
    run = _copy(run4, tmp_path / "run")
    (run / ".checkpoint.safetensors.zzzz9999.tmp").write_bytes(b"half")
    assert env.distill(env.store, run, 5, "--resume") == 0
    assert not list(run.glob(".*.tmp"))
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["checkpoint.safetensors", "checksums.json", "config.json", "distilled.safetensors"]
        + ["metrics.jsonl", "summary.json"]
    )
