"""Parity of the configuration the step benchmark times (repblend_fast/bench/parity.py).

CPU (default suite): the bf16 encoder path runs on a CPU too (``torch.autocast("cpu",
bfloat16)``), so its meta-gradient error is measured here, against the fp32 path and against
float64, at the ``tiny`` step shapes. GPU (``gpu`` marker): the benchmark's own configuration —
``impl="auto"`` (the fused CUDA / Triton ops), bf16 encoder autocast — at the ``ci`` shapes
(timm resnet18 at 64 px); ``benchmarks/gpu_check.sh`` runs the same check at the paper shapes.

Tolerances (reasons in repblend_fast/bench/parity.py):

* fp32: every meta-gradient within FP32_RTOL = 2e-3 (relative L2) of float64;
* bf16 encoder: each meta-gradient within 3x the bf16 encoder's own error measured on the same
  images (input-gradient error for x, feature error for y, S, eta), at least 2e-3 and at most
  0.5. At the ``tiny`` shapes the encoder's errors are ~2.6e-3 (features) and ~5e-3 (VJP).
"""

from __future__ import annotations

import pytest
import torch

from repblend_fast.bench import SHAPE_SETS
from repblend_fast.bench.parity import BF16_CAP, FP32_RTOL, timed_parity, tolerances

TINY = SHAPE_SETS["tiny"][0]


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("meta_grad", ["exact", "tesla"])
def test_cpu_bf16_encoder_meta_gradients_against_fp32_and_float64(meta_grad):
    rec = timed_parity(TINY, meta_grad, "cpu", autocast="bf16")
    assert rec["autocast"] == "bf16" and rec["impl"] == "reference"
    enc = rec["encoder_error"]
    # The autocast really ran in bf16 (an fp32 encoder would be ~1e-7 from fp32) and is only
    # rounded (bf16 unit roundoff 2e-3; a ~1e-1 error would mean a wrong cast).
    assert 1e-4 < enc["features"] < 2e-2 and 1e-4 < enc["vjp"] < 5e-2, enc
    for ref in ("rel_err_vs_fp32", "rel_err_vs_fp64"):
        errs = rec[ref]
        for name, err in errs.items():
            bound = rec["rtol"][name]
            assert err <= bound, (ref, name, err, bound, enc)
            assert bound <= BF16_CAP
    # The fp32 reference itself is at float64's level.
    assert rec["max_fp32_vs_fp64"] <= 1e-5
    # The image gradient carries the bf16 VJP error, so it is visibly above fp32 rounding.
    assert rec["rel_err_vs_fp32"]["x"] > 1e-4
    assert rec["ok"]


def test_cpu_fp32_configuration_matches_float64():
    rec = timed_parity(TINY, "exact", "cpu", autocast="none")
    assert rec["ok"] and rec["rtol"] == {k: FP32_RTOL for k in rec["rel_err_vs_fp32"]}
    assert max(rec["rel_err_vs_fp64"].values()) <= 1e-5
    assert rec["encoder_error"] == {"features": 0.0, "vjp": 0.0}


def test_bf16_bounds_follow_the_measured_encoder_error():
    names = ["x", "y", "eta_img", "sim.a"]
    assert tolerances(names, None) == dict.fromkeys(names, FP32_RTOL)
    b = tolerances(names, torch.bfloat16, {"features": 1e-2, "vjp": 0.1})
    assert b["x"] == pytest.approx(0.3) and b["y"] == pytest.approx(3e-2)
    tiny = tolerances(names, torch.bfloat16, {"features": 1e-5, "vjp": 1.0})
    assert tiny["y"] == FP32_RTOL and tiny["x"] == BF16_CAP
    with pytest.raises(ValueError, match="encoder error"):
        tolerances(names, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("meta_grad", ["exact", "tesla"])
def test_gpu_timed_configuration_parity(meta_grad):
    """The step benchmark's GPU configuration (fused ops, bf16 encoder) against the fp32
    reference path on the GPU and float64 on the CPU."""
    rec = timed_parity(SHAPE_SETS["ci"][0], meta_grad, "cuda")
    assert rec["autocast"] == "bf16" and rec["impl"] in ("cuda", "triton"), rec
    assert rec["max_fp32_vs_fp64"] <= FP32_RTOL, rec["fp32_vs_fp64"]
    assert rec["ok"], {k: rec[k] for k in ("rel_err_vs_fp32", "rel_err_vs_fp64", "rtol")}
