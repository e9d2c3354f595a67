"""The repblend-fast command end to end on a tiny generic dataset (random-init encoder)."""

from __future__ import annotations

import json

import pytest

from repblend_fast.cli import main
from repblend_fast.engine.distill import DistilledSet


def _common(ann, cache):
    return [
        "--dataset",
        "generic",
        "--annotations",
        str(ann),
        "--image-encoder",
        "resnet18",
        "--random-init-encoder",
        "--image-size",
        "16",
        "--cache-dir",
        str(cache),
    ]


def test_buffer_distill_info_end_to_end(tiny_pairs, tmp_path, capsys):
    cache = tmp_path / "cache"
    experts = tmp_path / "experts"
    rc = main(
        [
            "buffer",
            *_common(tiny_pairs, cache),
            "--experts",
            "2",
            "--epochs",
            "2",
            "--dim",
            "16",
            "--batch-size",
            "8",
            "--out",
            str(experts),
            "--no-progress",
        ]
    )
    assert rc == 0
    assert (experts / "manifest.json").exists()
    run = tmp_path / "run"
    args = [
        "distill",
        *_common(tiny_pairs, cache),
        "--experts",
        str(experts),
        "--out",
        str(run),
        "--pairs",
        "8",
        "--batch-size",
        "4",
        "--syn-steps",
        "2",
        "--iterations",
        "3",
        "--set",
        "sim_rank=2",
        "--set",
        "lr_lr=1e-4",
        "--no-progress",
    ]
    assert main(args) == 0
    out = DistilledSet.load(run / "distilled.safetensors")
    assert out.images.shape == (8, 3, 16, 16) and out.texts.shape[0] == 8
    assert out.similarity.shape == (8, 8)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["pairs"] == 8 and cfg["lr_lr"] == 1e-4 and cfg["sim_rank"] == 2
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs] == [0, 1, 2]
    # Same run again without --resume refuses to mix two runs in one directory.
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    # --resume with more iterations continues from the checkpoint.
    more = [a if a != "3" else "4" for a in args] + ["--resume"]
    assert main(more) == 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs] == [0, 1, 2, 3]
    capsys.readouterr()
    assert main(["info", "--json", str(run / "distilled.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "repblend_fast.distilled"
    assert info["tensors"]["images"] == {"dtype": "F32", "shape": [8, 3, 16, 16]}
    assert main(["info", "--json", str(experts)]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "repblend"
    # A run folder: its config, how far it got, and the shapes of what it wrote.
    assert main(["info", "--json", str(run)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "repblend_fast.run" and info["iterations_logged"] == 4
    assert info["config"]["pairs"] == 8
    assert info["checkpoint.safetensors"]["tensors"]["x"]["shape"] == [8, 3, 16, 16]
    assert info["distilled.safetensors"]["tensors"]["texts"]["shape"][0] == 8
    # Experts of one method cannot drive another.
    bad = [
        "distill",
        *_common(tiny_pairs, cache),
        "--experts",
        str(experts),
        "--out",
        str(tmp_path / "lors"),
        "--method",
        "lors",
        "--pairs",
        "8",
        "--batch-size",
        "4",
        "--iterations",
        "1",
        "--no-progress",
    ]
    assert main(bad) == 2
    assert "method" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["distill", "--experts", "/nonexistent", "--out", "x"], "manifest.json"),
        (["distill", "--experts", ".", "--out", "x", "--set", "nope"], "FIELD=VALUE"),
        (["distill", "--experts", ".", "--out", "x", "--set", "unknown_field=1"], "unknown"),
        (["distill", "--experts", ".", "--out", "x", "--pairs", "0"], "pairs"),
        (["buffer", "--dataset", "flickr30k", "--out", "x"], "--annotation"),
        (["info", "/nonexistent/file.safetensors"], "does not exist"),
    ],
)
def test_bad_flags_fail_with_a_message(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_info_answers_any_path_with_one_line(tmp_path, capsys):
    """A text file, a truncated or garbled .safetensors file and an unknown folder each get exit
    2 and one line saying what the path is and what was expected; no traceback."""
    import torch
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(6.0)}, str(good))
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3 + b"garbage" * 10)
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "empty").mkdir()
    cases = {
        "notes.txt": "not a safetensors file",
        "cut.safetensors": "truncated safetensors file",
        "junk.safetensors": "not a safetensors file",
        "empty": "without manifest.json, config.json or metrics.json",
        "missing": "does not exist",
    }
    for name, needle in cases.items():
        assert main(["info", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err
        assert needle in err, (name, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert main(["info", "--json", str(good)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tensors"] == {"a": {"dtype": "F32", "shape": [6]}}


def test_version_and_help_show_defaults(capsys):
    from repblend_fast import __version__
    from repblend_fast.cli import build_parser

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out
    # Every flag of every subcommand has help text, and its default is stated (by the formatter
    # for value defaults, in the help text itself for flags whose default is None).
    ap = build_parser()
    sub = next(a for a in ap._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) >= {"buffer", "distill", "info", "evaluate", "demo", "report"}
    for name, p in sub.choices.items():
        text = p.format_help()
        for a in p._actions:
            if not a.option_strings or a.dest == "help":
                continue
            assert a.help, (name, a.option_strings)
            if a.default is None and a.nargs != 0 and not a.required:
                words = a.help.lower()
                assert any(w in words for w in ("default", "required", "without it")), (
                    name,
                    a.option_strings,
                )
        valued = [a for a in p._actions if a.option_strings and a.dest != "help"]
        if any(a.default is not None and a.default is not False for a in valued):
            assert "(default:" in text, name


def test_preset_flags_override_preset(tmp_path):
    from repblend_fast.cli import build_parser
    from repblend_fast.cli.run import config_from_args

    a = build_parser().parse_args(
        [
            "distill",
            "--experts",
            "e",
            "--out",
            "o",
            "--preset",
            "coco-500",
            "--meta-grad",
            "tesla",
            "--syn-steps",
            "4",
        ]
    )
    cfg = config_from_args(a)
    assert cfg.pairs == 499 and cfg.temperature == 0.1 and cfg.meta_grad == "tesla"
    assert cfg.syn_steps == 4
    m = build_parser().parse_args(["distill", "--experts", "e", "--out", "o", "--method", "mtt-vl"])
    mc = config_from_args(m)
    assert (mc.similarity, mc.loss, mc.blend) == ("none", "infonce", False)


def test_cuda_without_a_gpu_is_a_clear_error(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["distill", "--experts", ".", "--out", "x", "--device", "cuda"]) == 2
    assert "--device cpu" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lors", "mtt-vl"])
def test_lors_and_mttvl_from_the_command_line(tiny_pairs, tmp_path, method):
    cache = tmp_path / "cache"
    experts = tmp_path / "experts"
    assert (
        main(
            [
                "buffer",
                *_common(tiny_pairs, cache),
                "--method",
                "lors",
                "--experts",
                "1",
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--out",
                str(experts),
                "--no-progress",
            ]
        )
        == 0
    )
    run = tmp_path / "run"
    assert (
        main(
            [
                "distill",
                *_common(tiny_pairs, cache),
                "--experts",
                str(experts),
                "--out",
                str(run),
                "--method",
                method,
                "--pairs",
                "8",
                "--batch-size",
                "4",
                "--syn-steps",
                "2",
                "--iterations",
                "2",
                "--set",
                "sim_rank=2",
                "--set",
                "lr_lr=1e-4",
                "--set",
                "max_start_epoch=1",
                "--no-progress",
            ]
        )
        == 0
    )
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"] == method and cfg["blend"] is False
    assert cfg["similarity"] == ("none" if method == "mtt-vl" else "lowrank")
    out = DistilledSet.load(run / "distilled.safetensors")
    assert (out.similarity is None) == (method == "mtt-vl")
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(r["loss"] > 0 for r in recs)


def test_distill_speed_and_memory_flags(capsys):
    """``--compile`` and ``--memory-budget-mib`` are listed with their defaults, reach the
    config, and a bad value is one line naming the flag, exit status 2, before anything loads."""
    from repblend_fast.cli import build_parser
    from repblend_fast.cli.run import config_from_args

    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--compile {none,encoder,step}" in text
    assert "(default: the preset's, none for demo)" in text
    assert "--memory-budget-mib MIB" in text
    assert "(default: the preset's, 0 for demo; 0 = no budget)" in text
    base = ["distill", "--experts", ".", "--out", "x"]
    args = build_parser().parse_args(base + ["--compile", "encoder", "--memory-budget-mib", "64"])
    cfg = config_from_args(args)
    assert cfg.compile == "encoder" and cfg.memory_budget_mib == 64
    for extra, flag in [
        (["--compile", "fast"], "--compile 'fast'"),
        (["--memory-budget-mib", "-5"], "--memory-budget-mib '-5'"),
        (["--memory-budget-mib", "1.5GB"], "--memory-budget-mib '1.5GB'"),
        (["--method", "lors", "--compile", "step"], "compile"),
        (["--memory-budget-mib", "64", "--set", "encoder_chunk=4"], "memory_budget_mib"),
    ]:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and flag in err and "error:" in err, err
