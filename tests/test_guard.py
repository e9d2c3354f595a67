"""The guard is visible and cannot hide a wrong meta-gradient (docs/algorithm.md §14).

- every intervention is in ``metrics.jsonl`` and counted in ``summary.json`` (recounted here
  from the metrics, independently), also across a resume;
- injected faults in the meta-gradient (×10, ×0.1, sign flip, one modality dropped, noise at
  10× the gradient's norm) each end in a warning within ``CAUGHT_WITHIN`` iterations of the tiny
  run, while its healthy run raises none of the gradient warnings;
- encoder sharing and per-step re-encoding (the same maths) stay within fp32 rounding of each
  other after 3 guarded iterations.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from test_distill import setup, small

from repblend_fast.engine.guard_report import CLIPPED_SHARE, WINDOW, GuardReport
from repblend_fast.engine.outer import CLIPPED_GROUPS, GROUPS

CAUGHT_WITHIN = 30


def _fault(kind: str, grads: dict[str, torch.Tensor], gen: torch.Generator) -> dict:
    """``grads`` with the simulated bug ``kind``."""
    g = dict(grads)
    if kind == "x10":
        return {n: 10 * v for n, v in g.items()}
    if kind == "x0.1":
        return {n: 0.1 * v for n, v in g.items()}
    if kind == "sign":
        return {n: -v for n, v in g.items()}
    if kind in ("drop_image", "drop_text"):
        name = "x" if kind == "drop_image" else "y"
        g[name] = torch.zeros_like(g[name])
        return g
    assert kind == "noise"
    norm = torch.sqrt(sum(v.double().pow(2).sum() for v in g.values()))
    noise = {n: torch.randn(v.shape, generator=gen, dtype=v.dtype) for n, v in g.items()}
    scale = 10 * norm / torch.sqrt(sum(v.double().pow(2).sum() for v in noise.values()))
    return {n: v + noise[n] * scale.to(v.dtype) for n, v in g.items()}


def _inject(d, kind: str) -> None:
    meta = d._meta_gradients
    gen = torch.Generator().manual_seed(5)

    def wrapped(*args, **kw):
        losses, grads = meta(*args, **kw)
        return losses, _fault(kind, grads, gen)

    d._meta_gradients = wrapped


def _warnings_until(d, kinds: set[str], limit: int) -> tuple[int | None, list[str]]:
    """Step ``d`` until the guard has warned of one of ``kinds`` (at most ``limit`` iterations):
    ``(iterations run, or None, the warnings)``."""
    for i in range(limit):
        d.step()
        if kinds & d.guard_report._kinds:
            return i + 1, d.guard_report.warnings
    return None, d.guard_report.warnings


GRADIENT_WARNINGS = {"grad_check", "zero_image", "zero_text"}


@pytest.mark.parametrize(
    "kind, warning",
    [
        ("x10", "grad_check"),
        ("x0.1", "grad_check"),
        ("sign", "grad_check"),
        ("noise", "grad_check"),
        ("drop_image", "zero_image"),
        ("drop_text", "zero_text"),
    ],
)
def test_a_wrong_meta_gradient_is_reported(kind, warning, caplog):
    # The default settings: gradient checks at iterations 0 and 25 (grad_check_every=25).
    d = setup(small(iterations=CAUGHT_WITHIN))
    assert d.cfg.grad_check_every == 25
    _inject(d, kind)
    with caplog.at_level(logging.WARNING, logger="repblend_fast.guard"):
        n, warns = _warnings_until(d, {warning}, CAUGHT_WITHIN)
    assert n is not None and n <= CAUGHT_WITHIN, (kind, warns)
    ours = [r.getMessage() for r in caplog.records if r.name == "repblend_fast.guard"]
    assert len(ours) == len(set(ours)) and len(ours) == len(warns)  # one line, once
    assert all("\n" not in m for m in ours)


def test_the_healthy_tiny_run_raises_no_gradient_warning():
    d = setup(small(iterations=CAUGHT_WITHIN, grad_check_every=5))
    n, warns = _warnings_until(d, GRADIENT_WARNINGS, CAUGHT_WITHIN)
    assert n is None, warns
    ratios = [r["grad_check"] for r in d.history if "grad_check" in r]
    assert len(ratios) == CAUGHT_WITHIN // 5
    assert all(0.9 < r < 1.1 for r in ratios), ratios  # measured: 0.999 ... 1.003


# --------------------------------------------------------------------------- the counts
def _recount(recs: list[dict]) -> dict:
    """The guard block's counts from ``metrics.jsonl`` records, computed independently."""
    its = [r for r in recs if "iteration" in r]
    streak = longest = 0
    for r in its:
        streak = streak + 1 if r.get("update_rejected") else 0
        longest = max(longest, streak)
    return {
        "iterations": len(its),
        "rejected": {g: sum(g in r.get("rejected_spike", ()) for r in its) for g in GROUPS},
        "rejected_iterations": sum(bool(r.get("update_rejected")) for r in its),
        "rolled_back": sum(bool(r.get("rolled_back")) for r in its),
        "longest_rejected_streak": longest,
        "clipped_fraction": {
            g: pytest.approx(sum(r["clipped"][g] for r in its) / len(its), abs=1e-6)
            for g in CLIPPED_GROUPS
        },
    }


def test_every_intervention_is_recorded_and_summarised(tmp_path, caplog):
    out = tmp_path / "run"
    d = setup(small(iterations=24, grad_check_every=8), out)
    with caplog.at_level(logging.INFO, logger="repblend_fast.engine.distill"):
        d.run(progress=False)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        assert set(r["clipped"]) == set(CLIPPED_GROUPS)
        assert all(0.0 <= v <= 1.0 for v in r["clipped"].values())
    assert [r["iteration"] for r in recs if "grad_check" in r] == [0, 8, 16]
    summary = json.loads((out / "summary.json").read_text())
    guard = summary["guard"]
    want = _recount(recs)
    assert {k: guard[k] for k in want} == want
    # This run does intervene (lr 10 on a 12-pair set): the counts are not trivially zero.
    assert guard["rejected_iterations"] > 0 and guard["clipped_fraction"]["text"] > CLIPPED_SHARE
    assert guard["grad_checks"] == {"run": 3, "failed": 0}
    assert guard["warnings"] and all(w.startswith("guard: ") for w in guard["warnings"])
    checksums = json.loads((out / "checksums.json").read_text())
    assert "summary.json" in json.dumps(checksums)
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("guard: ")]
    assert line and f"{guard['rejected_iterations']} of 24 iterations rejected" in line[-1]


def test_summary_of_a_resumed_run_covers_the_whole_run(tmp_path):
    cfg = small(iterations=12, checkpoint_every=4, grad_check_every=5)
    setup(cfg, tmp_path / "full").run(progress=False)
    setup(cfg.replace(iterations=8), tmp_path / "part").run(progress=False)
    resumed = setup(cfg, tmp_path / "part")
    resumed.load_checkpoint(tmp_path / "part" / "checkpoint.safetensors")
    resumed.run(progress=False)
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    part = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert part == full and full["guard"]["iterations"] == 12


def test_clipping_warning_needs_a_window_and_fires_once():
    rep = GuardReport()
    heavy = {"image": 0.9, "text": 0.0, "sim": 0.0}
    for i in range(WINDOW - 1):
        rep.add({"iteration": i, "clipped": heavy}, log=False)
    assert rep.warnings == []
    for i in range(WINDOW - 1, 3 * WINDOW):
        rep.add({"iteration": i, "clipped": heavy}, log=False)
    assert len(rep.warnings) == 1 and "90% of the image rows" in rep.warnings[0]
    assert "lower lr_img" in rep.warnings[0]


# --------------------------------------------------------------------------- smoothness
def _after(share: bool, iterations: int, **kw) -> torch.Tensor:
    if not share:
        kw.pop("encoder_chunk", None)
    d = setup(small(share_encoder=share, iterations=iterations, **kw))
    for _ in range(iterations):
        d.step()
    return torch.cat([d.x.flatten(), d.y.flatten()])


# Settings under which encoding once and re-encoding per step round differently: with
# syn_steps=6 over 12 pairs in batches of 4 every image is in two steps (the shared path sums
# the cotangents first); with encoder_chunk=1 the shared path re-encodes one image at a time.
# Measured after 3 iterations, default guard / trust_region=0: 5.8e-7 / 6.8e-5 and
# 1.4e-7 / 5.9e-6.
@pytest.mark.parametrize("kw", [dict(syn_steps=6), dict(encoder_chunk=1)])
def test_sharing_the_encoder_does_not_amplify_rounding_under_the_guard(kw):
    a, b = _after(True, 3, **kw), _after(False, 3, **kw)
    rel = float((a - b).norm() / b.norm())
    assert 0 < rel <= 1e-5, rel  # not 0: the two paths do round differently


def test_the_command_prints_the_guard_summary(tiny_pairs, tmp_path, capsys):
    from test_reliability import Env

    env = Env(tmp_path, tiny_pairs)
    assert env.buffer(tmp_path / "experts") == 0
    capsys.readouterr()
    assert env.distill(tmp_path / "experts", tmp_path / "run", 4) == 0
    guard = json.loads((tmp_path / "run" / "summary.json").read_text())["guard"]
    out = capsys.readouterr().out
    assert f"guard: {guard['rejected_iterations']} of 4 iterations rejected" in out
