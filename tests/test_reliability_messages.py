"""Errors that say the next step (docs/reliability.md §7): one line, exit 2, the flag or file named,
and a remedy that works when it is followed; ``export`` and ``import-distilled`` check what they
copy. Built on the tiny run of tests/test_reliability.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_reliability import Env, _copy, _err, _overwrite_floats, _rewrite_tensors

from repblend_fast.cli import main


@pytest.fixture(scope="module")
def env(tiny_pairs, tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("messages"), tiny_pairs)
    e.store = e.root / "experts"
    assert e.buffer(e.store) == 0
    e.run = e.root / "run2"
    assert e.distill(e.store, e.run, 2) == 0
    return e


# ------------------------------------------------------------------- export checks the set
def test_export_refuses_a_set_whose_bytes_changed(env, tmp_path, capsys):
    run = _copy(env.run, tmp_path / "run")
    _overwrite_floats(run / "distilled.safetensors")
    capsys.readouterr()
    assert main(["export", "--distilled", str(run), "--out", str(tmp_path / "d.pt")]) == 2
    err = _err(capsys)
    assert "--distilled" in err and "has changed since it was written" in err, err
    assert not (tmp_path / "d.pt").exists()


def test_export_refuses_a_non_finite_set(env, tmp_path, capsys):
    from repblend_fast.engine.distill import DistilledSet

    d = DistilledSet.load(env.run / "distilled.safetensors")
    path = tmp_path / "nan.safetensors"
    d.images[0, 0, 0, 0] = float("nan")
    # Written around the guard of DistilledSet.save, as a foreign tool could.
    _write_like(env.run / "distilled.safetensors", path, images=d.images)
    capsys.readouterr()
    assert main(["export", "--distilled", str(path), "--out", str(tmp_path / "d.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("note:") and "no checksums.json" in err[0], err
    assert len(err) == 2 and "--distilled" in err[1] and "non-finite" in err[1], err
    assert not (tmp_path / "d.pt").exists()


def test_export_of_a_truncated_set_names_the_flag(env, tmp_path, capsys):
    path = tmp_path / "cut.safetensors"
    path.write_bytes((env.run / "distilled.safetensors").read_bytes()[:200])
    capsys.readouterr()
    assert main(["export", "--distilled", str(path), "--out", str(tmp_path / "d.pt")]) == 2
    err = _err(capsys)
    assert err.startswith("repblend-fast export: error: --distilled") and "truncated" in err, err


def test_export_of_an_intact_set_still_works(env, tmp_path):
    assert main(["export", "--distilled", str(env.run), "--out", str(tmp_path / "d.pt")]) == 0
    assert (tmp_path / "d.pt").is_file()


def _write_like(src, dst, **replace) -> None:
    from repblend_fast.io import load_safetensors, read_safetensors_header, safetensors_bytes

    meta = read_safetensors_header(src).get("__metadata__")
    t = {**load_safetensors(src), **replace}
    dst.write_bytes(safetensors_bytes(t, meta))


# ------------------------------------------------------------------- import-distilled
def _authors_pt(env, path, *, nan: bool = False) -> None:
    """A research script's distilled_<it>.pt (made by ``export``), its image NaN if ``nan``."""
    assert main(["export", "--distilled", str(env.run), "--out", str(path)]) == 0
    if nan:
        d = torch.load(str(path), weights_only=True)
        d["image"][0] = float("nan")
        torch.save(d, str(path))


def test_import_distilled_of_a_nan_set_gives_a_next_step(env, tmp_path, capsys):
    src = tmp_path / "distilled_5.pt"
    _authors_pt(env, src, nan=True)
    capsys.readouterr()
    out = tmp_path / "x.safetensors"
    assert main(["import-distilled", "--src", str(src), "--out", str(out)]) == 2
    err = _err(capsys)
    assert "--src" in err and "NaN" in err and "earlier iteration" in err, err
    assert "resume" not in err  # an imported file has no checkpoint to resume from
    assert not out.exists()


def test_import_distilled_never_replaces_a_runs_set(env, tmp_path, capsys):
    run = _copy(env.run, tmp_path / "run")
    before = (run / "distilled.safetensors").read_bytes()
    src = tmp_path / "distilled_5.pt"
    _authors_pt(env, src)
    capsys.readouterr()
    argv = ["import-distilled", "--src", str(src), "--out", str(run / "distilled.safetensors")]
    assert main(argv) == 2
    assert "run folder" in _err(capsys)
    assert (run / "distilled.safetensors").read_bytes() == before


def test_import_distilled_takes_the_folders_lock(env, tmp_path, capsys):
    from repblend_fast.locks import FolderLock

    src = tmp_path / "distilled_5.pt"
    _authors_pt(env, src)
    folder = tmp_path / "imported"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        argv = ["import-distilled", "--src", str(src), "--out", str(folder / "d.safetensors")]
        assert main(argv) == 2
        assert "in use by process" in _err(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 0
    with FolderLock(folder, "test"):
        pass


_HOLD_LOCK = (
    "import sys, time\n"
    "from repblend_fast.locks import FolderLock\n"
    "l = FolderLock(sys.argv[1], 'holder'); l.acquire(); print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


# ------------------------------------------------------------------- flags named, next step
def test_out_pointing_at_a_file_names_the_flag(env, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    capsys.readouterr()
    assert env.distill(env.store, f, 2) == 2
    err = _err(capsys)
    assert "--out" in err and "is a file" in err and "Errno" not in err, err
    assert env.buffer(f) == 2
    assert "--out" in _err(capsys)


def test_distill_into_an_existing_run_is_refused_before_loading(env, capsys, monkeypatch):
    import repblend_fast.cli.run as run_cli

    def no_load(*a, **k):
        raise AssertionError("the dataset was loaded before the folder was checked")

    monkeypatch.setattr(run_cli, "dataset_from_args", no_load)
    capsys.readouterr()
    assert env.distill(env.store, env.run, 2) == 2
    assert "already holds a run" in _err(capsys)


def test_evaluate_json_pointing_at_a_folder_names_the_flag_first(env, tmp_path, capsys):
    capsys.readouterr()
    argv = ["evaluate", "--distilled", str(env.run), "--json", str(tmp_path)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before the evaluation, not after its table
    assert "--json" in captured.err and "is a folder" in captured.err, captured.err


@pytest.mark.parametrize("content", [b"hello, this is text\n" * 10, b""])
def test_evaluate_on_a_non_set_is_one_line_and_quick(env, tmp_path, capsys, content):
    path = tmp_path / "notes.safetensors"
    path.write_bytes(content)
    capsys.readouterr()
    t0 = time.perf_counter()
    assert main(["evaluate", "--distilled", str(path)]) == 2
    assert time.perf_counter() - t0 < 5
    err = _err(capsys)
    assert "--distilled" in err and "not a safetensors file" in err, err


def test_evaluate_of_a_missing_file_is_refused_quickly(capsys):
    t0 = time.perf_counter()
    assert main(["evaluate", "--distilled", "missing.safetensors"]) == 2
    assert time.perf_counter() - t0 < 5
    assert "--distilled missing.safetensors: file not found" in _err(capsys)


def test_a_set_typo_suggests_the_nearest_field(capsys):
    argv = ["distill", "--experts", "E", "--out", "O", "--set", "lr_imgg=10"]
    assert main(argv) == 2
    err = _err(capsys)
    assert "did you mean --set lr_img=10?" in err, err
    assert "sim_alpha" not in err  # not the list of every field


def test_an_unknown_field_far_from_any_lists_the_fields(capsys):
    assert main(["distill", "--experts", "E", "--out", "O", "--set", "zzzzzz=1"]) == 2
    assert "lr_img" in _err(capsys)


def test_argparse_errors_are_one_line_with_a_help_hint(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--pairs", "many"])
    assert exc.value.code == 2
    err = _err(capsys)
    assert "see `repblend-fast distill --help`" in err and "usage:" not in err, err


def test_an_image_checkpoint_that_is_a_pickle_is_refused_without_torchs_advice(
    env, tmp_path, capsys
):
    bad = tmp_path / "evil.pt"
    bad.write_bytes(b"\x80\x04cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.")
    garbage = tmp_path / "noise.pth"
    garbage.write_bytes(os.urandom(300))
    for path in (bad, garbage):
        argv = env.distill_args(env.store, tmp_path / "run", 1)
        i = argv.index("--random-init-encoder")
        argv[i : i + 1] = ["--image-checkpoint", str(path)]
        capsys.readouterr()
        assert main(argv) == 2
        err = _err(capsys)
        assert str(path) in err and "weights_only set to False" not in err, err
        assert "safetensors" in err, err


# ------------------------------------------------------------------- interruptions
def test_a_second_signal_exits_128_plus_its_number():
    from repblend_fast.cli import _classify
    from repblend_fast.engine.checkpoint import StopOnSignal, StoppedAtOnce

    with pytest.raises(StoppedAtOnce) as exc:
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signum == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
    status, message = _classify(exc.value, "distill")
    assert status == 143, message
    assert "--resume" in message


def test_an_interrupted_buffer_says_the_next_step():
    from repblend_fast.cli import _classify

    status, message = _classify(KeyboardInterrupt(), "buffer")
    assert status == 130
    assert "rerun the same command" in message and "kept" in message, message


def test_a_buffer_rerun_says_it_kept_the_finished_experts(env, tmp_path, caplog):
    store = _copy(env.store, tmp_path / "experts")
    caplog.clear()
    assert env.buffer(store) == 0
    assert "kept 2 finished expert(s)" in caplog.text and "trained 0" in caplog.text


def test_a_changed_checkpoint_never_advises_no_verify(env, tmp_path, capsys):
    run = _copy(env.run, tmp_path / "run")
    _rewrite_tensors(run / "checkpoint.safetensors", lambda t: t["x"].mul_(2))
    capsys.readouterr()
    assert env.distill(env.store, run, 4, "--resume") == 2
    err = _err(capsys)
    assert "--no-verify" not in err and "--overwrite" in err, err


# ------------------------------------------------------------------- info a person can read
def _info(path, capsys, *flags) -> str:
    capsys.readouterr()
    assert main(["info", *flags, str(path)]) == 0
    return capsys.readouterr().out


def test_info_of_a_run_is_a_short_summary_with_the_json_on_request(env, capsys):
    out = _info(env.run, capsys)
    lines = out.strip().splitlines()
    assert len(lines) <= 12, out
    assert "repblend_fast.run" in lines[0]
    assert "method repblend, 8 pairs" in out, out
    assert "2 done of 2 planned" in out, out
    # The run's summary.json holds the guard's counts (docs/algorithm.md §14).
    assert "guard        2 iterations, rejected image 0" in out, out
    assert "distilled.safetensors ok" in out and "checkpoint.safetensors ok" in out, out
    assert f"repblend-fast info --json {env.run}" in out
    full = json.loads(_info(env.run, capsys, "--json"))
    assert full["iterations_logged"] == 2 and full["config"]["iterations"] == 2


def test_info_shows_the_guard_block_of_summary_json(env, tmp_path, capsys):
    run = _copy(env.run, tmp_path / "run")
    guard = {
        "iterations": 2,
        "rejected": {"img": 3, "txt": 1},
        "rolled_back": 1,
        "longest_rejected_streak": 2,
        "clipped_fraction": {"img": 0.25},
        "warnings": ["img rejected 3 times"],
    }
    (run / "summary.json").write_text(json.dumps({"guard": guard}))
    out = _info(run, capsys)
    assert "rejected img 3, txt 1, rolled back 1, longest rejected streak 2" in out, out
    assert "clipped img 25.0%" in out and "1 warning(s): img rejected 3 times" in out, out
    assert json.loads(_info(run, capsys, "--json"))["guard"] == guard


def test_info_marks_a_changed_file(env, tmp_path, capsys):
    run = _copy(env.run, tmp_path / "run")
    _overwrite_floats(run / "distilled.safetensors")
    assert "distilled.safetensors changed" in _info(run, capsys)


def test_info_of_an_imported_set_says_unknown_for_what_was_never_recorded(env, tmp_path, capsys):
    src = tmp_path / "distilled_5.pt"
    _authors_pt(env, src)
    out = tmp_path / "imported.safetensors"
    assert main(["import-distilled", "--src", str(src), "--out", str(out)]) == 0
    text = _info(out, capsys)
    assert "8 pairs" in text and "loss unknown" in text, text
    assert "iterations   unknown planned" in text, text
    cfg = json.loads(_info(out, capsys, "--json"))["config"]
    assert cfg["iterations"] == "unknown" and cfg["lr_lr"] == "unknown" and cfg["pairs"] == 8


def test_info_of_a_store_names_its_image_size(env, capsys):
    out = _info(env.store, capsys)
    assert "2 experts" in out and "image size 16 px" in out and "checksums recorded" in out, out


# ------------------------------------------------------------------- defaults and help
def test_buffer_defaults_to_the_demos_batch_size():
    from repblend_fast.cli import build_parser

    args = build_parser().parse_args(["buffer", "--out", "x"])
    assert args.batch_size == 32


def test_distill_help_shows_the_preset_values(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: preset)" not in out
    assert "N synthetic pairs (default: the preset's, 99 for demo)" in out, out
    assert "outer iterations (default: the preset's, 300 for demo" in out, out


def test_the_demos_output_folder_is_ignored_by_git():
    from pathlib import Path

    ignore = (Path(__file__).parent.parent / ".gitignore").read_text().split()
    assert "/demo_out/" in ignore


def test_the_migration_guide_describes_vl_distill_as_its_script_behaves():
    """VL-distill's distill.py pairs buffers by number up to the first gap and saves no
    distilled_<it>.pt: the guide and the flag table say so (they used to say otherwise)."""
    from pathlib import Path

    from repblend_fast.compat.flag_rules import RULES

    doc = " ".join((Path(__file__).parent.parent / "docs" / "migrating.md").read_text().split())
    assert "VL-distill code zip two unsorted globs" not in doc
    assert "stops at the first missing number" in doc
    assert "VL-distill's `distill.py` writes no distilled set at all" in doc
    assert "VL-distill's script saves no set at it" in RULES["eval_it"].note


# ------------------------------------------------------------------- README figures by script
def _suite_timing():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "suite_timing.py"
    spec = importlib.util.spec_from_file_location("suite_timing", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_readme_test_figures_are_written_by_the_timing_script(tmp_path):
    mod = _suite_timing()
    text = mod.README.read_text()
    assert mod.readme_test_command(text) == "python -m pytest -q"
    assert text.count(mod.START) == 1 and text.count(mod.END) == 1
    readme = tmp_path / "README.md"
    readme.write_text(text)
    fake = f"{sys.executable} -c \"print('12 passed, 3 skipped, 1 deselected in 4.56s')\""
    assert mod.main(["--command", fake, "--readme", str(readme)]) == 0
    new = readme.read_text()
    inside = new[new.index(mod.START) : new.index(mod.END)]
    assert "(12 passed, 3 skipped; measured by `python benchmarks/suite_timing.py`" in inside
    assert "-core machine with load" in inside
    # Only the marked sentence changed.
    assert new[: new.index(mod.START)] == text[: text.index(mod.START)]
    assert new[new.index(mod.END) :] == text[text.index(mod.END) :]


def test_experts_says_whether_it_is_a_count_or_a_folder(capsys):
    for command, shown in (("buffer", "--experts N"), ("distill", "--experts DIR")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert shown in out, (command, out)
