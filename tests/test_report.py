"""report.md and the figures of a demo run, rendered from a small synthetic run folder: caption
and label sizes at the PNGs' native pixel size, axis labels, reference lines of the loss plot,
number formatting (no negative zero) and the verdict list."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

pytest.importorskip("matplotlib")

from matplotlib.font_manager import FontProperties  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.textpath import TextPath  # noqa: E402

from repblend_fast import report  # noqa: E402
from repblend_fast.io import atomic_save_safetensors  # noqa: E402

CAPTIONS = [
    "red square",
    "St. Helena Ascension & Tristan da Cunha",
    "a very long caption that goes on and on well past anything three short lines could hold",
    "supercalifragilisticexpialidociousnessitudeness",
    "dollar $x$ sign",
    "blue circle",
    "cat",
]
NEG_ZERO = re.compile(r"(?<![\d.])-0(?:\.0+)?(?![.\d])")


# A summary.json guard block (repblend_fast.engine.guard_report.GuardReport.summary).
GUARD = {
    "iterations": 6,
    "rejected": {"image": 1, "text": 0, "eta": 0, "sim": 0},
    "rejected_iterations": 2,
    "rolled_back": 1,
    "longest_rejected_streak": 2,
    "clipped_fraction": {"image": 0.125, "text": 0.5, "sim": 0.0},
    "grad_checks": {"run": 1, "failed": 0},
    "warnings": ["guard: the trust region scaled down 60% of the text rows (a test warning)"],
}


def _summary(mean: float, std: float) -> dict:
    keys = ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "mean")
    return {"mean": dict.fromkeys(keys, mean), "std": dict.fromkeys(keys, std)}


def _records(n: int, scale: float) -> list[dict]:
    out = []
    for i in range(n):
        li, lt = 1.0 - scale * i, 1.02 - scale * i
        out.append(
            {
                "iteration": i,
                "loss": li + lt,
                "loss_img": li,
                "loss_txt": lt,
                "eta_img": 0.1 - 0.001 * i,
                "eta_txt": 0.1 + 0.001 * i,
                "ms": 10.0,
            }
        )
    return out


def _method(label: str, mean: float, std: float, **extra) -> dict:
    return {"label": label, "pairs": 7, "best": _summary(mean, std), "last": _summary(mean, std),
            **extra}  # fmt: skip


def make_run(root, verdict="list", merge_loss=False):
    """A small but complete demo run folder: 7 distilled 8-px images per distilled method."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    distilled = {}
    for name in ("repblend", "lors"):
        (root / name).mkdir()
        atomic_save_safetensors(
            {"images": torch.rand(7, 3, 8, 8, generator=g)}, root / name / "distilled.safetensors"
        )
        recs = _records(6 if name == "repblend" else 3, 0.01)
        (root / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        distilled[name] = {
            "nearest_captions": CAPTIONS,
            "nearest_similarity": [0.9, 0.8, -0.0001, 0.7, 0.6, 0.5, 1.0],
            "distilled": f"{name}/distilled.safetensors",
            "lr_img": 0.05,
            "lr_txt": -0.0,
            "note": "distilled set",
        }
    methods = {
        "repblend": _method("RepBlend", 20.0, 1.0, **distilled["repblend"]),
        "lors": _method("LoRS", 12.98, 0.5, **distilled["lors"]),
        "random": _method("Random subset", 13.0, 2.0, lr_img=0.1, lr_txt=0.1),
        "kcenter": _method("k-center coreset (InfoNCE)", -0.0004, 0.0, lr_img=0.1, lr_txt=0.1),
        "full": {"label": "Full data", "pairs": 32, "error": "diverged"},
    }
    diag = {
        name: {
            "intra_sim_img": v,
            "intra_sim_txt": -0.0004,
            "modality_gap": 0.5,
            "concentration_img": 0.2,
            "concentration_txt": -0.0,
        }
        for name, v in (("random", 0.3), ("lors", -0.0004), ("repblend", -0.2))
    }
    emb = {}
    for name in diag:
        emb[f"{name}.image"] = torch.randn(7, 5, generator=g)
        emb[f"{name}.text"] = torch.randn(7, 5, generator=g) + 1.0
    atomic_save_safetensors(emb, root / "embeddings.safetensors")
    cfg = {"pairs": 7, "iterations": 6, "lr_img": 100.0, "merge_loss": merge_loss}
    metrics = {
        "kind": "repblend_fast.demo",
        "dataset": {"name": "synthetic", "image_size": 8},
        "evaluation": {"num_eval": 2, "epochs": 11, "eval_every": 5, "dim": 4},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.25, 0.25, 0.25],
        "methods": methods,
        "distillation": {
            "repblend": {
                "iterations": 6,
                "loss_start": 2.0,
                "loss_end": -0.0001,
                "eta_img": 0.05,
                "eta_txt": -0.0,
                "sec_per_iter": 0.01,
                "config": cfg,
                "metrics_jsonl": "repblend/metrics.jsonl",
                "guard": GUARD,
            },
            "lors": {
                "iterations": 3,
                "loss_start": 2.0,
                "loss_end": 1.9,
                "reductions": "fewer",
                "metrics_jsonl": "lors/metrics.jsonl",
            },
        },  # fmt: skip
        "experts": {"repblend": {"num_experts": 2, "epochs": 1, "batch_size": 4, "lr": 0.1}},
        "diagnostics": diag,
        "timings": {
            "total_s": 12.3,
            "stages": [{"stage": "report", "seconds": 0.04}],
            "load_start": [0.5, -0.0, 0.25],
            "load_end": [1.0, 1.0, 1.0],
            "host": "test",
        },
    }
    if verdict == "list":
        metrics["verdict"] = report.verdict_lines(methods)
    elif verdict == "string":
        metrics["verdict"] = "RepBlend is 7.0 points above random subset (old form)."
    (root / "metrics.json").write_text(json.dumps(metrics))
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("report") / "run")


@pytest.fixture(scope="module")
def figures(run):
    import matplotlib.pyplot as plt

    figs = report.run_figures(run)
    yield figs
    for fig in figs.values():
        plt.close(fig)


def _texts(fig) -> list[Text]:
    return [
        t
        for t in fig.findobj(Text)
        if t.get_visible() and t.get_text().strip() and t.get_figure() is not None
    ]


def _cap_height_px(text: Text, dpi: float) -> float:
    """Rendered height of a capital H in the text's font and size, in pixels at ``dpi``."""
    prop = FontProperties(family=text.get_fontfamily(), size=text.get_fontsize() * dpi / 72)
    return TextPath((0, 0), "H", prop=prop).get_extents().height


def test_render_run_writes_everything(run):
    written = report.render_run(run)
    names = {"report.md", "loss_curves.png", "collapse.png"}
    names |= {report.grid_png(m) for m in ("repblend", "lors")}
    assert set(written) == names
    for name in names - {"report.md"}:
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_shows_what_the_guard_did(run):
    report.render_run(run)
    md = (run / "report.md").read_text()
    assert "| RepBlend | 6 | 2 | 1 | 2 | 12.5% / 50.0% / 0.0% | 0 of 1 |" in md
    assert GUARD["warnings"][0] in md


def test_grid_captions_are_readable_at_native_size(figures, run):
    from PIL import Image

    fig = figures[report.grid_png("repblend")]
    dpi = fig.dpi
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    caps = [ax.title for ax in fig.axes if ax.title.get_text()]
    assert len(caps) == len(CAPTIONS)
    cell_px = None
    boxes = []
    for cap, ax in zip(caps, fig.axes):
        assert cap.get_fontsize() * dpi / 72 >= 11
        assert _cap_height_px(cap, dpi) >= 8
        box = cap.get_window_extent(renderer)
        lines = cap.get_text().count("\n") + 1
        assert lines <= report.CAPTION_LINES
        assert box.height / lines >= 11  # line height in px, as drawn
        img = ax.get_window_extent(renderer)
        assert img.width >= 64 and img.height >= 64  # the 8-px images are drawn enlarged
        cell_px = cell_px or img.width
        assert box.width <= img.width + 0.16 * dpi  # no wider than its grid cell
        boxes.append(box)
    for i, a in enumerate(boxes):  # captions do not overlap each other
        assert not any(a.overlaps(b) for b in boxes[i + 1 :])
    fw, fh = fig.get_size_inches() * dpi
    assert all(0 <= b.x0 and b.x1 <= fw and 0 <= b.y0 and b.y1 <= fh for b in boxes)
    # Long captions are cut with an ellipsis; short ones are kept whole; "$" is not math.
    # Each caption follows its cosine; one below WEAK_MATCH is marked "?".
    texts = [c.get_text() for c in caps]
    assert texts[0] == "0.90 · red square" and texts[-1] == "1.00 · cat"
    assert texts[2].startswith("? 0.00 · ")  # never "-0.00"
    assert texts[2].endswith("…") and texts[2].count("\n") == report.CAPTION_LINES - 1
    assert texts[3].replace("\n", " ").startswith("0.70 · supercalifragilistic")
    assert texts[4].replace("\n", " ") == "0.60 · dollar $x$ sign"  # "$" is not math
    assert texts[5].replace("\n", " ") == "0.50 · " + CAPTIONS[5]  # at the threshold: unmarked
    # The PNG on disk has the figure's pixel size, so the sizes above hold at native size.
    with Image.open(run / report.grid_png("repblend")) as im:
        assert abs(im.size[0] - fw) <= 1 and abs(im.size[1] - fh) <= 1


def test_no_small_text_in_any_figure(figures):
    for name, fig in figures.items():
        for t in _texts(fig):
            px = t.get_fontsize() * fig.dpi / 72
            assert px >= 11, (name, t.get_text(), px)
            assert _cap_height_px(t, fig.dpi) >= 8, (name, t.get_text())


def test_every_axes_has_labels(figures):
    for name in (report.LOSS_PNG, report.COLLAPSE_PNG):
        fig = figures[name]
        assert fig.axes
        for ax in fig.axes:
            assert ax.get_xlabel().strip() and ax.get_ylabel().strip(), (name, ax.get_title())
            assert ax.get_title().strip(), name
    pca = [ax for ax in figures[report.COLLAPSE_PNG].axes if "PCA" in ax.get_title()]
    assert len(pca) == 3
    for ax in pca:
        assert re.fullmatch(r"PC 1 \(\d+% of variance\)", ax.get_xlabel())
        assert re.fullmatch(r"PC 2 \(\d+% of variance\)", ax.get_ylabel())
    for name, fig in figures.items():
        if name.startswith("distilled_"):  # image grids: images only, no axes to label
            assert all(not ax.axison for ax in fig.axes)


def _hlines(ax) -> set[float]:
    out = set()
    for line in ax.get_lines():
        y = line.get_ydata()
        if len(y) == 2 and y[0] == y[1] and tuple(line.get_xdata()) == (0, 1):
            out.add(float(y[0]))
    return out


def _loss_axes(fig):
    """The loss figure's axes by the first word of their title."""
    return {ax.get_title().split()[0]: ax for ax in fig.axes}


def test_loss_plot_reference_lines_match_what_is_plotted(figures, tmp_path):
    import matplotlib.pyplot as plt

    by = _loss_axes(figures[report.LOSS_PNG])
    assert set(by) == {"image", "text", "total", "learned"}
    for key in ("image", "text"):
        assert _hlines(by[key]) == {1.0} and "at 1" in by[key].get_title()
    assert _hlines(by["total"]) == {2.0} and "at 2" in by["total"].get_title()
    assert "image + text" in by["total"].get_title()
    # The plotted total is the sum of the plotted per-modality curves, and sits near 2.
    total = [ln for ln in by["total"].get_lines() if len(ln.get_ydata()) > 2]
    assert total and all(float(ln.get_ydata()[0]) == pytest.approx(2.02) for ln in total)
    # With one merged normalisation the total of a student that does not move is 1.
    merged = make_run(tmp_path / "merged", merge_loss=True)
    figs = report.run_figures(merged)
    try:
        by = _loss_axes(figs[report.LOSS_PNG])
        assert _hlines(by["total"]) == {1.0, 2.0} and "at 1 and 2" in by["total"].get_title()
    finally:
        for fig in figs.values():
            plt.close(fig)


def test_collapse_bar_labels_never_show_negative_zero(figures):
    labels = [t.get_text() for t in _texts(figures[report.COLLAPSE_PNG])]
    assert "0.000" in labels and "-0.200" in labels  # as in the report.md table
    assert not any(NEG_ZERO.search(s.replace("\u2212", "-")) for s in labels)


def test_report_md_marks_weak_caption_matches(run):
    report.render_run(run)
    rows = [ln for ln in (run / "report.md").read_text().splitlines() if ln.startswith("| ")]
    marked = [ln for ln in rows if "(weak match)" in ln]
    # One per method's table: row 3 (cosine -0.0001); 0.5 (row 6) is not below the threshold.
    assert len(marked) == 2 and all(ln.startswith("| 3 |") for ln in marked), marked


def test_report_md_has_no_negative_zero(run):
    report.render_run(run, figures=False)
    text = (run / "report.md").read_text()
    assert "-0.00" not in text
    assert not NEG_ZERO.search(text), NEG_ZERO.findall(text)
    assert "| RepBlend | 7 | **20.0 ± 1.0** |" in text
    assert "0.05 / 0" in text  # eval lr of -0.0 prints as 0
    assert "| k-center coreset (InfoNCE) | 7 | **0.0 ± 0.0** |" in text
    assert "| Full data | 32 | failed: diverged |" in text
    assert "| -0.200 |" in text and "| 0.000 |" in text
    assert "0.50 / 0.00 / 0.25" in text


@pytest.mark.parametrize(
    "x, digits, sign, want",
    [
        (-0.0, 2, False, "0.00"),
        (-0.004, 2, False, "0.00"),
        (-0.006, 2, False, "-0.01"),
        (-0.04, 1, True, "0.0"),
        (0.04, 1, True, "0.0"),
        (2.25, 1, True, "+2.2"),
        (-7.0, 1, True, "-7.0"),
        (None, 1, False, "–"),
        (math.nan, 1, False, "nan"),
        (-math.inf, 1, False, "-inf"),
    ],
)
def test_fmt(x, digits, sign, want):
    assert report.fmt(x, digits, sign=sign) == want


def test_fmt_g_and_pm():
    assert report.fmt_g(-0.0) == "0" and report.fmt_g(-1e-30, 2) == "-1e-30"
    assert report.fmt_g(0.061185013) == "0.06119"
    s = {"mean": {"mean": -0.01}, "std": {"mean": -0.0}}
    assert report.pm(s) == "0.0 ± 0.0"


def test_verdict_lines():
    methods = {
        "repblend": {"best": {"mean": {"mean": 20.0}, "std": {"mean": 1.0}}},
        "random": {"best": {"mean": {"mean": 13.0}, "std": {"mean": 2.0}}},
        "kcenter": {"label": "k-center", "best": {"mean": {"mean": 19.0}, "std": {"mean": 1.5}}},
        "lors": {"best": {"mean": {"mean": 13.02}, "std": {"mean": 0.5}}},
        "herding": {"error": "failed"},
    }
    assert report.verdict_lines(methods) == [
        "RepBlend vs Random subset: +7.0 points of mean recall (more than the summed std 3.0)",
        "RepBlend vs k-center: +1.0 points of mean recall (within the summed std 2.5)",
        "LoRS vs Random subset: 0.0 points of mean recall (within the summed std 2.5)",
        "LoRS vs k-center: -6.0 points of mean recall (more than the summed std 2.0)",
        "RepBlend vs LoRS: +7.0 points of mean recall (more than the summed std 1.5)",
    ]
    assert report.verdict_lines({"random": methods["random"]}) == []


def _verdict_bullets(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, s in enumerate(lines) if s.startswith("**Verdict**"))
    out = []
    for s in lines[start + 2 :]:
        if not s.startswith("- "):
            break
        out.append(s[2:])
    return out


@pytest.mark.parametrize("form", ["list", "string", "missing"])
def test_verdict_renders_as_a_bullet_list(tmp_path, form):
    run = make_run(tmp_path / "run", verdict=form)
    report.render_run(run, figures=False)
    text = (run / "report.md").read_text()
    bullets = _verdict_bullets(text)
    metrics = json.loads((run / "metrics.json").read_text())
    assert bullets == report.verdict_lines(metrics["methods"])
    assert len(bullets) == 5  # RepBlend and LoRS vs two baselines each, and RepBlend vs LoRS
    assert bullets[0].startswith("RepBlend vs Random subset: +7.0 points")
    assert "(old form)" not in text


def test_verdict_old_string_without_computable_lines(tmp_path):
    run = make_run(tmp_path / "run", verdict="string")
    m = json.loads((run / "metrics.json").read_text())
    for name in ("repblend", "lors"):
        m["methods"][name].pop("best")
    (run / "metrics.json").write_text(json.dumps(m))
    report.render_run(run, figures=False)
    text = (run / "report.md").read_text()
    assert _verdict_bullets(text) == [m["verdict"]]
