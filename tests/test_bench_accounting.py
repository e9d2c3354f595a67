"""What the step benchmark counts besides time: tensors saved for backward, the state, the
predicted device peak (repblend_fast/bench/memory.py) and FLOPs against the matmul rate
(repblend_fast/bench/flops.py). Each count is checked against a hand count of a graph whose
saved tensors and products are known."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from repblend_fast.bench import run_bench
from repblend_fast.bench.flops import count_flops, matmul_rate, peak_fraction
from repblend_fast.bench.memory import (
    SavedTensorMeter,
    predicted_peak_mib,
    state_bytes,
    state_tensors,
)
from repblend_fast.bench.table import format_accounting_table

F32 = 4


def test_meter_counts_each_saved_storage_once_and_releases_after_backward():
    w = torch.randn(256)  # not excluded: counted when saved
    x = torch.randn(1000, 256, requires_grad=True)
    with SavedTensorMeter() as m:
        # mul saves each factor whose partner needs a gradient: w (x needs one), not x.
        y = x * w
        z = y.exp()  # saves its output (1000 x 256)
        u = z * w  # saves w again (counted once), not z (w needs no gradient)
        live_before = m.live_bytes
        u.sum().backward()
    want = (256 + 1000 * 256) * F32
    assert live_before == want
    assert m.peak_bytes == want and m.total_bytes == want
    del y, z, u
    gc.collect()
    assert m.live_bytes == 0


def test_meter_excludes_the_state_and_tracks_the_peak_not_the_sum():
    w = torch.randn(512, 512, requires_grad=True)
    x = torch.randn(64, 512, requires_grad=True)
    with SavedTensorMeter(exclude=[w]) as m:
        for _ in range(3):  # three graphs one after the other, each freed by its backward
            h = (x @ w).tanh()  # mm saves x and w (excluded); tanh its output
            h.sum().backward()
            del h
    one = (64 * 512 + 64 * 512) * F32
    assert m.peak_bytes == one
    assert m.total_bytes == 3 * one  # each graph saves x and its output anew
    assert m.live_bytes == 0


def test_meter_gives_the_same_gradients():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(8, 32, requires_grad=True)
    (g0,) = torch.autograd.grad(lin(x).sin().sum(), x)
    with SavedTensorMeter():
        (g1,) = torch.autograd.grad(lin(x).sin().sum(), x)
    assert torch.equal(g0, g1)


def test_state_walks_modules_containers_and_objects_counting_storages_once():
    class Holder:  # a repblend_fast-like object holding a module, a view and a dict
        pass

    Holder.__module__ = "repblend_fast.test"
    lin = torch.nn.Linear(10, 20)  # 200 + 20 floats
    h = Holder()
    h.enc = lin
    h.x = torch.zeros(7, 3)
    h.view = h.x[1:]  # same storage as x
    h.d = {"a": torch.zeros(5), "t": (torch.zeros(2), [torch.zeros(1)])}
    assert len(state_tensors(h)) == 7
    assert state_bytes(h) == (220 + 21 + 5 + 2 + 1) * F32


def test_predicted_peak_is_state_plus_saved_peak():
    assert predicted_peak_mib(10.0, 2.5) == 12.5


def test_flops_of_a_product_and_a_convolution_by_hand():
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    with count_flops() as c:
        a @ b
    assert c["flops"] == 2 * 64 * 32 * 16
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    w = torch.randn(8, 3, 3, 3)
    with count_flops() as c:
        y = F.conv2d(x, w, padding=1)  # 2 * out elements * (Cin * k * k)
        (g,) = torch.autograd.grad(y.sum(), x)  # input gradient only: the same count again
    fwd = 2 * (2 * 8 * 10 * 10) * (3 * 3 * 3)
    assert c["by_op"]["convolution"] == fwd
    assert c["flops"] == 2 * fwd


def test_flops_under_autograd_grad_on_leaves():
    """torch's FlopCounterMode fails here (its module hooks); the benchmark's loops do this."""
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    with count_flops() as c:
        torch.autograd.grad((x @ w).sum(), [x, w])
    assert c["flops"] == 3 * 2 * 4 * 8 * 8  # forward, and one product per input gradient


def test_matmul_rate_and_fraction():
    r = matmul_rate("cpu", n=128, seconds=0.05)
    assert r["flops_per_s"] > 0 and r["n"] == 128 and r["dtype"] == "float32"
    assert peak_fraction(2e9, 1.0, 4e9) == 0.5


def test_bench_records_accounting_from_a_warmup_iteration(tmp_path):
    recs = run_bench(
        "tiny",
        str(tmp_path / "b.json"),
        "repblend-authors,repblend-fast",
        iterations=2,
        device="cpu",
        warmup=1,
        isolate="inprocess",
        threads=1,
        verbose=False,
    )
    for r in recs:
        assert len(r["ms_all"]) == 2  # the accounted warm-up iteration is not timed
        assert r["saved_peak_mib"] > 0 and r["state_mib"] > 0
        assert r["predicted_peak_mib"] == pytest.approx(r["state_mib"] + r["saved_peak_mib"])
        assert r["flops"] > 0 and r["flops"] == sum(r["flops_by_op"].values())
        assert r["matmul_fp32_flops_per_s"] > 0 and 0 < r["peak_fraction"]
        assert r["peak_fraction"] == pytest.approx(
            r["flops"] / (r["ms_per_iter"] / 1e3) / r["matmul_fp32_flops_per_s"]
        )
    table = format_accounting_table(recs)
    assert table.count("| repblend-fast |") == 2 and "| repblend-authors |" in table
    # The fast path's frozen encoder runs once over the touched images and once backward; the
    # authors' loop runs it forward in both passes: fewer FLOPs per iteration.
    fast = min(r["flops"] for r in recs if r["provider"] == "repblend-fast")
    authors = next(r["flops"] for r in recs if r["provider"] == "repblend-authors")
    assert fast < authors


def test_no_accounting_without_a_warmup(tmp_path):
    recs = run_bench(
        "tiny",
        str(tmp_path / "b.json"),
        "repblend-fast:tesla",
        iterations=1,
        device="cpu",
        warmup=0,
        isolate="inprocess",
        threads=1,
        verbose=False,
    )
    assert "saved_peak_mib" not in recs[0] and "flops" not in recs[0]
    assert format_accounting_table(recs) == ""
