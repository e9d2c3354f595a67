"""``--resume`` continues the run as it was saved, and every remedy a run-folder error gives works
when it is followed (docs/reliability.md).

Built on the tiny run of tests/test_reliability.py (generic dataset, random-init resnet18 at
16 px); each test copies a finished run and damages or resumes the copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_reliability import Env, _copy, _data, _err, _rewrite_tensors, _same_run

from repblend_fast.cli import main


@pytest.fixture(scope="module")
def env(tiny_pairs, tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("resume"), tiny_pairs)
    e.store = e.root / "experts"
    assert e.buffer(e.store) == 0
    return e


@pytest.fixture(scope="module")
def run4(env):
    """A finished 4-iteration run (a checkpoint every 2 iterations)."""
    out = env.root / "run4"
    assert env.distill(env.store, out, 4, "--set", "checkpoint_every=2") == 0
    return out


def _bare_resume(env, run, *extra) -> int:
    """``distill --resume`` with the data flags only: no --iterations, no --set."""
    argv = ["distill", *_data(env.ann, env.cache), "--experts", str(env.store)]
    return main([*argv, "--out", str(run), "--resume", "--no-progress", *extra])


def _config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


# ------------------------------------------------------------------- resume keeps the saved run
def test_a_bare_resume_keeps_the_saved_iterations_and_settings(env, run4, tmp_path, capsys):
    """Length field and every preset-overridden field: the saved value, not the preset's."""
    run = _copy(run4, tmp_path / "run")
    before = (run / "distilled.safetensors").read_bytes()
    capsys.readouterr()
    assert _bare_resume(env, run) == 0
    out = capsys.readouterr().out
    assert "resuming at iteration 4 of 4" in out, out
    assert "--resume: changing" not in out
    cfg = _config(run)
    assert cfg["iterations"] == 4 and cfg["pairs"] == 8 and cfg["syn_steps"] == 2
    assert cfg["lr_img"] == 1 and cfg["sim_rank"] == 2
    assert (run / "distilled.safetensors").read_bytes() == before


def test_a_resume_that_extends_the_run_says_so_and_matches_an_uninterrupted_run(
    env, run4, tmp_path, capsys
):
    run = _copy(run4, tmp_path / "run")
    capsys.readouterr()
    assert _bare_resume(env, run, "--iterations", "6") == 0
    out = capsys.readouterr().out
    assert "--resume: changing iterations 4 -> 6" in out, out
    assert "resuming at iteration 4 of 6" in out, out
    assert _config(run)["iterations"] == 6
    ref = env.root / "ref6"
    if not ref.exists():
        assert env.distill(env.store, ref, 6) == 0
    _same_run(run, ref)


def test_a_resume_that_changes_a_learning_rate_says_so(env, run4, tmp_path, capsys):
    run = _copy(run4, tmp_path / "run")
    capsys.readouterr()
    assert _bare_resume(env, run, "--iterations", "5", "--set", "lr_txt=0.5") == 0
    out = capsys.readouterr().out
    assert "lr_txt 1 -> 0.5" in out and "iterations 4 -> 5" in out, out
    cfg = _config(run)
    assert cfg["lr_txt"] == 0.5 and cfg["lr_img"] == 1 and cfg["iterations"] == 5


def test_a_resume_that_changes_a_fixed_field_is_refused(env, run4, tmp_path, capsys):
    run = _copy(run4, tmp_path / "run")
    capsys.readouterr()
    assert _bare_resume(env, run, "--syn-steps", "3") == 2
    err = _err(capsys)
    assert "syn_steps: saved 2 vs now 3" in err, err


def test_a_resume_at_another_thread_count_is_refused(env, run4, tmp_path, capsys):
    run = _copy(run4, tmp_path / "run")
    capsys.readouterr()
    assert _bare_resume(env, run, "--threads", "2") == 2
    assert "--threads 1" in _err(capsys)


# ------------------------------------------------------------------- remedies that work
def _follow(env, run, remedy: str, capsys) -> None:
    """Follow the remedy an error named: --overwrite must then start over (exit 0), --no-verify
    must resume."""
    capsys.readouterr()
    if remedy == "--overwrite":
        assert env.distill(env.store, run, 2, "--overwrite") == 0
    else:
        assert env.distill(env.store, run, 6, "--resume", remedy) == 0


def _checkpoint_dir(run: Path) -> None:
    (run / "checkpoint.safetensors").unlink()
    (run / "checkpoint.safetensors").mkdir()


def _metrics_dir(run: Path) -> None:
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()


def _checksums_dir(run: Path) -> None:
    (run / "checksums.json").unlink()
    (run / "checksums.json").mkdir()


def _huge_iteration(run: Path) -> None:
    _rewrite_tensors(run / "checkpoint.safetensors", lambda t: t["iteration"].fill_(10**12))


@pytest.mark.parametrize(
    "damage, needle, extra",
    [
        (
            lambda r: _rewrite_tensors(r / "checkpoint.safetensors", lambda t: t["x"].mul_(2)),
            "has changed since it was written",
            "",
        ),
        (
            lambda r: _rewrite_tensors(
                r / "checkpoint.safetensors", lambda t: t["bad_streak"].fill_(99)
            ),
            "bad_streak = 99 is outside",
            "--no-verify",
        ),
        (
            lambda r: _rewrite_tensors(
                r / "checkpoint.safetensors", lambda t: t["iteration"].fill_(3)
            ),
            "disagree",
            "--no-verify",
        ),
        (lambda r: (r / "metrics.jsonl").unlink(), "metrics.jsonl holds 0 bytes", ""),
        (lambda r: (r / "metrics.jsonl").write_bytes(b"\x00garbage"), "metrics.jsonl", ""),
        (_metrics_dir, "is not a file", ""),
        (lambda r: (r / "checksums.json").write_text("garbage"), "checksums.json is damaged", ""),
        (_checksums_dir, "checksums.json is damaged", ""),
        (_checkpoint_dir, "checkpoint.safetensors is not a file", ""),
    ],
    ids=[
        "changed", "bad-streak", "disagree", "metrics-missing", "metrics-garbage",
        "metrics-dir", "checksums-garbage", "checksums-dir", "checkpoint-dir",
    ],
)  # fmt: skip
def test_a_damaged_run_folder_names_a_remedy_that_works(
    env, run4, tmp_path, capsys, damage, needle, extra
):
    run = _copy(run4, tmp_path / "run")
    damage(run)
    capsys.readouterr()
    assert env.distill(env.store, run, 6, "--resume", *extra.split()) == 2
    err = _err(capsys)
    assert needle in err, err
    # --no-verify cannot help here (it would resume from the damaged state, or fail again).
    assert "--no-verify" not in err, err
    assert "--overwrite" in err, err
    _follow(env, run, "--overwrite", capsys)
    assert _config(run)["iterations"] == 2


def test_a_folder_without_checksums_resumes_with_no_verify_as_advised(env, run4, tmp_path, capsys):
    run = _copy(run4, tmp_path / "run")
    (run / "checksums.json").unlink()
    capsys.readouterr()
    assert env.distill(env.store, run, 6, "--resume") == 2
    err = _err(capsys)
    assert "has no checksums.json" in err and "--no-verify" in err, err
    _follow(env, run, "--no-verify", capsys)
    assert _config(run)["iterations"] == 6
    assert (run / "checksums.json").is_file()


def test_a_checkpoint_claiming_a_huge_iteration_fails_cleanly_when_advice_is_followed(
    env, run4, tmp_path, capsys
):
    run = _copy(run4, tmp_path / "run")
    _huge_iteration(run)
    capsys.readouterr()
    assert env.distill(env.store, run, 6, "--resume", "--no-verify") == 2
    err = _err(capsys)
    assert f"--iterations {10**12} or more" in err, err
    # Following it must not build a trillion-element list (it used to end in MemoryError).
    assert env.distill(env.store, run, 10**12, "--resume", "--no-verify") == 2
    err = _err(capsys)
    assert "disagree" in err and "--overwrite" in err, err


def test_resume_at_another_image_size_names_the_size_it_started_with(env, run4, tmp_path, capsys):
    run = _copy(run4, tmp_path / "run")
    argv = env.distill_args(env.store, run, 6, "--resume")
    argv[argv.index("--image-size") + 1] = "32"
    capsys.readouterr()
    assert main(argv) == 2
    err = _err(capsys)
    # The store records the size its experts saw (16 px): the run is refused before its
    # checkpoint is read, naming the flag, and no remedy deletes the run.
    assert "store has 16, run wants 32" in err and "--image-size" in err, err
    assert "--overwrite" not in err, err


def test_a_checkpoint_of_other_shapes_names_the_setting_to_repeat():
    """Stores of older versions record no image size: the checkpoint's shapes say it."""
    import torch

    from repblend_fast.config import preset
    from repblend_fast.engine.checkpoint import check_state

    cfg = preset("demo", pairs=4, batch_size=2)
    t = {
        "x": torch.zeros(4, 3, 64, 64),
        "y": torch.zeros(4, 8),
        "eta_img": torch.tensor(0.1),
        "eta_txt": torch.tensor(0.1),
        "rng": torch.zeros(5, dtype=torch.uint8),
        "batch_perm": torch.arange(4),
        "expert_order": torch.arange(2),
        **{k: torch.tensor(0) for k in ("iteration", "bad_streak", "batch_pos", "expert_pos")},
    }
    params = {"x": torch.zeros(4, 3, 32, 32), "y": torch.zeros(4, 8)}
    with pytest.raises(ValueError, match="resume with --image-size 64, the size it started with"):
        check_state(t, "ck", config=cfg, num_experts=2, params=params, rng_numel=5)
    params = {"x": torch.zeros(4, 3, 64, 64), "y": torch.zeros(4, 9)}
    with pytest.raises(ValueError, match=r"y has shape \[4, 8\], this run's has \[4, 9\]"):
        check_state(t, "ck", config=cfg, num_experts=2, params=params, rng_numel=5)
