"""Parity of the configuration that is timed (docs/design.md §4, §5).

One distillation iteration's meta-gradients (x, y, the similarity parameters, eta) of the fast
path exactly as the step benchmark times it — fused ops through ``impl="auto"``, the frozen
encoder under bf16 autocast on CUDA (or wherever ``autocast`` asks for it), ``compile`` and
``memory_budget_mib`` as given — against

* the **fp32 reference path** on the same device: no autocast, ``REPBLEND_IMPL=reference`` (the
  plain-torch ops), eager, the whole encoder graph kept, TF32 off;
* **float64 on the CPU** (the same computation in float64; ``float64_chunk`` re-encodes the
  touched images in chunks where the encoder graph would not fit), which also checks the fp32
  reference itself.

Errors are relative L2 errors per gradient, ``||got - want|| / ||want||``.

Tolerances (why these numbers):

* fp32 configurations: :data:`FP32_RTOL` = 2e-3 for every gradient, the step benchmark's bound
  for two fp32 summation orders over T = 8 steps (TF32 allowed in the fused GPU kernels: design.md
  §4's TF32 row). Measured on the CPU: <= 8.4e-7 against float64 at the ``ci`` shapes.
* bf16 encoder autocast: the error is the encoder's own rounding, so the bound is measured in
  the same check: the bf16 encoder against its fp32 self on the plan's touched images
  (:func:`encoder_error`: relative error of the features, and of the input gradient for one
  fixed random cotangent). Each meta-gradient may be at most :data:`BF16_FACTOR` = 3 times the
  encoder error that feeds it — the VJP error for x (it is that VJP applied to the feature
  cotangent), the feature error for y, S and eta (they see the encoder only through its
  features) — and never more than :data:`BF16_CAP` = 0.5 (beyond that it is not rounding).
  Measured on the 2-core CPU (``torch.autocast("cpu", bfloat16)``, timm resnet18 at the ``ci``
  shapes, benchmarks/README.md): bf16 encoder features 3.5e-3, VJP 9.8e-2; meta-gradients x
  0.114 (exact) / 0.104 (TESLA), y 3.8e-3 / 3.7e-3, S 2.7e-3 / 2.3e-3, eta 5.3e-4 / 4.8e-4, the
  same against float64 to two digits (the fp32 path is 8e-7 from it). So the meta-gradient
  error is the encoder's, carried through at 0.1-1.2x: 3x leaves room for another cotangent
  and encoder, while a lost term or scale (an error of order 1, or 10x the encoder's) fails.
  Bf16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3) and the input gradient of a
  ~20-layer network accumulates that in every layer's backward, which is why x is the
  loosest. The GPU check records the errors at the paper shapes (NFNet-L0).
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager, nullcontext

import torch

from repblend_fast.bench.inputs import StepInputs, build_step_inputs
from repblend_fast.bench.runners import FastRunner, make_runner
from repblend_fast.bench.shapes import StepShape

__all__ = [
    "BF16_CAP",
    "BF16_FACTOR",
    "FP32_RTOL",
    "check_against",
    "encoder_error",
    "reference_grads",
    "reference_ops",
    "rel_errors",
    "timed_parity",
    "tolerances",
]

FP32_RTOL = 2e-3
BF16_FACTOR = 3.0
BF16_CAP = 0.5


def rel_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{name: ||got - want|| / ||want||}`` (float64, on the CPU) over ``want``'s gradients."""
    out = {}
    for k, w in want.items():
        a, b = got[k].detach().double().cpu(), w.detach().double().cpu()
        out[k] = float((a - b).norm() / b.norm().clamp_min(1e-30))
    return out


@contextmanager
def reference_ops():
    """The fp32 reference setting: ``REPBLEND_IMPL=reference`` (``impl="auto"`` picks the
    plain-torch ops) and TF32 off, restored afterwards."""
    old_env = os.environ.get("REPBLEND_IMPL")
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    os.environ["REPBLEND_IMPL"] = "reference"
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("REPBLEND_IMPL", None)
        else:
            os.environ["REPBLEND_IMPL"] = old_env
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _auto_impl(device: torch.device) -> str:
    from repblend_fast.ops._dispatch import resolve_impl

    return resolve_impl("contrastive_loss", "auto", [torch.empty(0, device=device)])


def _cpu64(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float64) for k, v in grads.items() if v is not None}


def reference_grads(
    inputs: StepInputs,
    meta_grad: str,
    device: str | torch.device,
    *,
    dtype: torch.dtype = torch.float32,
    encoder_chunk: int = 0,
    plan_index: int = 0,
) -> dict[str, torch.Tensor]:
    """The reference path's meta-gradients of plan ``plan_index`` (CPU float64 tensors): eager,
    no autocast, the plain-torch ops, TF32 off, in ``dtype`` on ``device``."""
    with reference_ops():
        runner = FastRunner(
            inputs,
            "repblend",
            meta_grad,
            torch.device(device),
            None,
            encoder_chunk=encoder_chunk,
            dtype=dtype,
        )
        out = _cpu64(runner.grads_at_start(inputs.plans_repblend[plan_index]))
    del runner
    gc.collect()
    return out


def encoder_error(
    encoder: torch.nn.Module,
    images: torch.Tensor,
    autocast: torch.dtype | None,
    seed: int = 0,
) -> dict[str, float]:
    """Relative error of the encoder under ``autocast`` against its fp32 self on ``images``
    ``[n, 3, H, W]``: ``{"features": ..., "vjp": ...}`` (the input gradient for one random
    cotangent, seeded), 0 without autocast. TF32 is off for the fp32 pass."""
    if autocast is None:
        return {"features": 0.0, "vjp": 0.0}
    dev = images.device

    def run(dtype):
        xi = images.detach().float().requires_grad_(True)
        ctx = torch.autocast(dev.type, dtype=dtype) if dtype is not None else nullcontext()
        with torch.enable_grad():
            with ctx:
                f = encoder(xi)
            f = f.float()
            g = torch.Generator().manual_seed(seed)
            cot = torch.randn(f.shape, generator=g).to(dev)
            (gx,) = torch.autograd.grad(f, xi, cot)
        return f.detach(), gx

    with reference_ops():
        f32, g32 = run(None)
    fb, gb = run(autocast)
    err = rel_errors({"features": fb, "vjp": gb}, {"features": f32, "vjp": g32})
    return err


def tolerances(
    names, autocast: torch.dtype | None, enc_err: dict[str, float] | None = None
) -> dict[str, float]:
    """Relative L2 bound per meta-gradient ``name`` (module docstring): :data:`FP32_RTOL`
    without autocast; with it :data:`BF16_FACTOR` x the encoder error that feeds the gradient
    (the VJP error for ``x``, the feature error otherwise), at least :data:`FP32_RTOL`, at most
    :data:`BF16_CAP`."""
    if autocast is None:
        return {k: FP32_RTOL for k in names}
    if enc_err is None:
        raise ValueError("a bf16 configuration's bound needs the measured encoder error")
    out = {}
    for k in names:
        e = enc_err["vjp"] if k == "x" else enc_err["features"]
        out[k] = min(BF16_CAP, max(FP32_RTOL, BF16_FACTOR * e))
    return out


def _touched_images(runner: FastRunner, plan_index: int) -> torch.Tensor:
    plan = runner.plans[plan_index]
    idx = torch.unique(plan.batches).to(runner.device)
    return runner._initial["x"][idx]


def _verdict(errs: dict[str, float], bounds: dict[str, float]) -> dict:
    worst = max(errs, key=lambda k: errs[k] / bounds[k])
    return {
        "max_rel_err": max(errs.values()),
        "worst": worst,
        "worst_ratio": errs[worst] / bounds[worst],
        "ok": all(errs[k] <= bounds[k] for k in errs),
    }


def check_against(
    runner: FastRunner, reference: dict[str, torch.Tensor], plan_index: int = 0
) -> dict:
    """The timed ``runner``'s own meta-gradients (at its starting state) against ``reference``:
    ``{"rel_err": {...}, "rtol": {...}, "encoder_error", "max_rel_err", "worst", "worst_ratio",
    "ok"}``."""
    plan = runner.plans[plan_index]
    got = _cpu64(runner.grads_at_start(plan))
    errs = rel_errors(got, reference)
    enc = encoder_error(runner.encoder, _touched_images(runner, plan_index), runner.autocast)
    bounds = tolerances(errs, runner.autocast, enc)
    return {"rel_err": errs, "rtol": bounds, "encoder_error": enc, **_verdict(errs, bounds)}


def timed_parity(
    shape: StepShape,
    meta_grad: str,
    device: str | torch.device,
    *,
    compile: str = "none",
    memory_budget_mib: float = 0,
    encoder_chunk: int | None = None,
    autocast: str = "auto",
    seed: int = 0,
    float64: bool = True,
    float64_chunk: int = 0,
) -> dict:
    """Meta-gradients of the timed configuration against the fp32 reference path (same device)
    and float64 on the CPU, on the benchmark's own first plan.

    Returns a record: the configuration, ``rel_err_vs_fp32`` / ``rel_err_vs_fp64`` per gradient,
    ``fp32_vs_fp64`` (the reference against float64), their maxima, ``rtol`` and ``ok`` (every
    timed-vs-reference error within ``rtol`` and the fp32 reference within :data:`FP32_RTOL` of
    float64). Nothing is raised: the caller decides (the benchmark records no time when not ok).
    """
    device = torch.device(device)
    inputs = build_step_inputs(shape, 1, seed, methods=("repblend",))
    timed = make_runner(
        inputs,
        "repblend-fast",
        meta_grad,
        device,
        encoder_chunk=encoder_chunk,
        compile=compile,
        memory_budget_mib=memory_budget_mib,
        autocast=autocast,
    )
    rec = {
        "shape": shape.name,
        "meta_grad": meta_grad,
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        # What impl="auto" runs the fused ops with on this device (a compiled step uses the
        # plain-torch ops inside its graph).
        "impl": "reference (compiled)" if compile == "step" else _auto_impl(device),
        **timed.settings(),
    }
    got = _cpu64(timed.grads_at_start(inputs.plans_repblend[0]))
    plan = timed.unroller.last_memory_plan
    if plan is not None:
        rec["memory_plan"] = plan.to_dict()
    rec["encoder_error"] = encoder_error(timed.encoder, _touched_images(timed, 0), timed.autocast)
    bounds = tolerances(got, timed.autocast, rec["encoder_error"])
    del timed
    gc.collect()
    ref32 = reference_grads(inputs, meta_grad, device)
    rec["rel_err_vs_fp32"] = rel_errors(got, ref32)
    verdict = _verdict(rec["rel_err_vs_fp32"], bounds)
    ok = verdict["ok"]
    if float64:
        ref64 = reference_grads(
            inputs, meta_grad, "cpu", dtype=torch.float64, encoder_chunk=float64_chunk
        )
        rec["rel_err_vs_fp64"] = rel_errors(got, ref64)
        rec["fp32_vs_fp64"] = rel_errors(ref32, ref64)
        rec["max_fp32_vs_fp64"] = max(rec["fp32_vs_fp64"].values())
        v64 = _verdict(rec["rel_err_vs_fp64"], bounds)
        ok = ok and v64["ok"] and rec["max_fp32_vs_fp64"] <= FP32_RTOL
        if v64["worst_ratio"] > verdict["worst_ratio"]:
            verdict = v64
    rec["rtol"] = bounds
    rec["max_rel_err"] = max(
        v for key in ("rel_err_vs_fp32", "rel_err_vs_fp64") for v in rec.get(key, {}).values()
    )
    rec["worst"], rec["worst_ratio"] = verdict["worst"], verdict["worst_ratio"]
    rec["ok"] = bool(ok)
    return rec
