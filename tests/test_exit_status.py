"""Exit statuses of the command: a distillation stopped because it went wrong (the collapse
detector, non-finite iterations) exits 3, so that a script can tell it from bad input (2)."""

from __future__ import annotations


def test_a_stopped_run_exits_3_and_bad_input_2():
    from repblend_fast.cli import CLIError
    from repblend_fast.cli import _classify as classify
    from repblend_fast.engine.distill import CollapseError, NonFiniteLossError

    assert classify(CollapseError("stopped"))[0] == 3
    assert classify(NonFiniteLossError("stopped"))[0] == 3
    assert classify(CLIError("--pairs: bad"))[0] == 2


def test_a_collapsed_cli_run_exits_3(tiny_pairs, tmp_path, capsys):
    from test_reliability import Env

    env = Env(tmp_path, tiny_pairs)
    assert env.buffer(tmp_path / "experts") == 0
    frozen = [a for k in ("lr_img", "lr_txt", "lr_sim", "lr_lr") for a in ("--set", f"{k}=0")]
    capsys.readouterr()
    status = env.distill(
        tmp_path / "experts", tmp_path / "run", 20, *frozen, "--set", "collapse_window=3"
    )
    assert status == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no lower than" in err
    # The stopped run's guard summary is written too.
    assert (tmp_path / "run" / "summary.json").is_file()
