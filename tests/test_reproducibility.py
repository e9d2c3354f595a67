"""Seeded runs give the same bytes whatever else runs on the machine.

Results depend on torch's CPU thread count, so ``distill`` runs with a fixed count (one per core
unless ``--threads`` says otherwise), records it in the run's config and reuses it on
``--resume``. These tests load the cores with busy processes during a run and during a resume
and compare the written tensors with an undisturbed run's.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

import pytest
import torch
from test_cli import _common

from repblend_fast.cli import main
from repblend_fast.io import load_safetensors


def _spin(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


class _Load:
    """``n`` busy processes for the duration of a ``with`` block."""

    def __init__(self, n: int = 2):
        self.n = n

    def __enter__(self):
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_spin, args=(time.time() + 600,)) for _ in range(self.n)]
        for p in self.procs:
            p.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.terminate()
            p.join()


def _distill(tiny_pairs, experts, out, iterations, *extra):
    return main(
        [
            "distill",
            *_common(tiny_pairs, out.parent / "cache"),
            "--experts",
            str(experts),
            "--out",
            str(out),
            "--pairs",
            "8",
            "--batch-size",
            "4",
            "--syn-steps",
            "2",
            "--iterations",
            str(iterations),
            "--set",
            "sim_rank=2",
            "--set",
            "checkpoint_every=0",
            "--no-progress",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def experts(tiny_pairs, tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    out = root / "experts"
    rc = main(
        [
            "buffer",
            *_common(tiny_pairs, root / "cache"),
            "--experts",
            "2",
            "--epochs",
            "2",
            "--dim",
            "16",
            "--batch-size",
            "8",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    return out


def _tensors(run):
    return load_safetensors(run / "distilled.safetensors")


def _same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].reshape(-1).view(torch.uint8).equal(b[k].reshape(-1).view(torch.uint8)), k


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores to run two threads")
def test_same_bytes_under_load_and_after_a_resume_under_load(tiny_pairs, experts, tmp_path):
    quiet = tmp_path / "quiet"
    assert _distill(tiny_pairs, experts, quiet, 4, "--threads", "2") == 0
    cfg = json.loads((quiet / "config.json").read_text())
    assert cfg["threads"] == 2
    with _Load():
        loaded = tmp_path / "loaded"
        assert _distill(tiny_pairs, experts, loaded, 4, "--threads", "2") == 0
    _same(_tensors(quiet), _tensors(loaded))
    # Half the run quietly, the rest after --resume on a loaded machine, without --threads: the
    # resumed run takes the count recorded in the checkpoint.
    split = tmp_path / "split"
    assert _distill(tiny_pairs, experts, split, 2, "--threads", "2") == 0
    with _Load():
        assert _distill(tiny_pairs, experts, split, 4, "--resume") == 0
    _same(_tensors(quiet), _tensors(split))
    assert json.loads((split / "config.json").read_text())["threads"] == 2


def test_resume_with_another_thread_count_is_refused(tiny_pairs, experts, tmp_path, capsys):
    run = tmp_path / "run"
    assert _distill(tiny_pairs, experts, run, 1, "--threads", "1") == 0
    capsys.readouterr()
    assert _distill(tiny_pairs, experts, run, 2, "--resume", "--threads", "2") == 2
    err = capsys.readouterr().err
    assert "thread" in err and "--threads 1" in err
