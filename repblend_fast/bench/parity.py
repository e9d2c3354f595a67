"""Parity of the configuration that is timed (docs/design.md §4, §5).

One distillation iteration's meta-gradients (x, y, the similarity parameters, eta) of the fast
path exactly as the step benchmark times it (fused ops through ``impl="auto"``, or the ``impl``
asked for; the frozen encoder under the autocast it is timed with; ``compile`` and
``memory_budget_mib`` as given), checked in two separate ways:

* **parity** (pass/fail): against the **reference path in the same precision** — the same
  encoder autocast, but eager, the whole encoder graph kept and the plain-torch ops
  (``REPBLEND_IMPL=reference``); TF32 is off in both. The two then differ only in the order of
  fp32 sums, so every meta-gradient must be within :data:`RTOL` = 1e-3 (relative L2,
  ``||got - want|| / ||want||``) of it; with a bf16 encoder the x-gradient within
  :data:`BF16_X_RTOL` = 1e-2 (:func:`tolerances`). The reference in fp32 is itself checked
  against **float64 on the CPU** (``float64_chunk`` re-encodes the touched images in chunks
  where the encoder graph would not fit) to :data:`RTOL`.
* **precision cost** (reported, never a bound): the timed configuration against the fp32
  reference and against float64, and the bf16 encoder's own error on the touched images
  (:func:`encoder_error`). Bf16 autocast of the frozen encoder (the default on CUDA) costs
  11-12% relative error on the x meta-gradient at the ``ci`` shapes — a documented precision
  choice, not a tolerance that grows with the error it measures.

Why these bounds: docs/design.md §4 allows fp32 gradients rtol 1e-4 per op and 1e-3 for a
second-order quantity, which a meta-gradient is; and 1e-2 for gradients with bf16 inputs. Only x
passes through the bf16 encoder's backward, where the fp32 rounding differences of its cotangent
flip bf16 roundings layer after layer; every other meta-gradient sees the encoder's features
only, which both paths compute identically. Measured on the 2-core CPU (fused = the Triton
kernels through ``TRITON_INTERPRET=1``, reference = the plain-torch ops; benchmarks/README.md):
largest same-precision error 1.1e-6 (fp32) and 8.3e-7 (both bf16) at the ``tiny`` shapes; 7.9e-7
(fp32) and, for x with both bf16, 2.1e-4 at the ``ci`` shapes (every other gradient <= 1e-6);
fp32 reference vs float64 <= 3e-6. Every wrong gradient the tests inject is >= 20x above the
bound it meets: a meta-gradient scaled by 1.25 or 0.75 (0.25), the x-gradient zeroed for 7 of
99 images (0.26), one image's gradient sign-flipped (0.23), a x1.5 bug in the Triton backward
(0.27 exact, 1.0 TESLA).

The parity point has a non-zero low-rank similarity (``sim_r_std``: ``R`` drawn random; at
``R = 0`` the gradient of ``L`` is exactly zero in both paths and its check vacuous); a
reference gradient that is exactly zero fails the check (``zero_in_reference``).
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
    "BF16_X_RTOL",
    "RTOL",
    "SIM_R_STD",
    "check_against",
    "encoder_error",
    "implementation",
    "reference_grads",
    "reference_ops",
    "rel_errors",
    "timed_parity",
    "tolerances",
]

RTOL = 1e-3
BF16_X_RTOL = 1e-2
SIM_R_STD = 0.1


def rel_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{name: ||got - want|| / ||want||}`` (float64, on the CPU) over ``want``'s gradients."""
    out = {}
    for k, w in want.items():
        a, b = got[k].detach().double().cpu(), w.detach().double().cpu()
        out[k] = float((a - b).norm() / b.norm().clamp_min(1e-30))
    return out


@contextmanager
def implementation(impl: str | None = None):
    """TF32 off and, unless ``impl`` is None, ``REPBLEND_IMPL=impl`` (what ``impl="auto"``
    runs the fused ops with); both restored afterwards."""
    old_env = os.environ.get("REPBLEND_IMPL")
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if impl is not None:
        os.environ["REPBLEND_IMPL"] = impl
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("REPBLEND_IMPL", None)
        else:
            os.environ["REPBLEND_IMPL"] = old_env
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def reference_ops():
    """The reference setting: the plain-torch ops (``REPBLEND_IMPL=reference``), TF32 off."""
    return implementation("reference")


def _impl_name(device: torch.device) -> str:
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
    """The fp32 reference path's meta-gradients of plan ``plan_index`` (CPU float64 tensors):
    eager, no autocast, the plain-torch ops, TF32 off, in ``dtype`` on ``device``."""
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
    return rel_errors({"features": fb, "vjp": gb}, {"features": f32, "vjp": g32})


def _touched_images(runner: FastRunner, plan_index: int) -> torch.Tensor:
    plan = runner.plans[plan_index]
    idx = torch.unique(plan.batches).to(runner.device)
    return runner._initial["x"][idx]


def tolerances(names, autocast: torch.dtype | None) -> dict[str, float]:
    """The same-precision bound of each meta-gradient ``name`` (module docstring): :data:`RTOL`,
    and :data:`BF16_X_RTOL` for ``x`` when the encoder runs under a reduced-precision
    ``autocast`` (the only meta-gradient that passes through the encoder's backward)."""
    return {k: BF16_X_RTOL if autocast is not None and k == "x" else RTOL for k in names}


def _verdict(
    errs: dict[str, float], want: dict[str, torch.Tensor], autocast, nonzero: bool
) -> dict:
    """The parity verdict of ``errs`` (same-precision errors) against :func:`tolerances`; with
    ``nonzero`` a gradient that is exactly zero in the reference ``want`` fails it too."""
    bounds = tolerances(errs, autocast)
    worst = max(errs, key=lambda k: errs[k] / bounds[k])
    zero = sorted(k for k, w in want.items() if not bool(w.ne(0).any()))
    return {
        "rtol": bounds,
        "max_rel_err": max(errs.values()),
        "worst": worst,
        "worst_ratio": errs[worst] / bounds[worst],
        "zero_in_reference": zero,
        "ok": all(errs[k] <= bounds[k] for k in errs) and not (nonzero and zero),
    }


def check_against(
    runner: FastRunner,
    reference: dict[str, torch.Tensor],
    plan_index: int = 0,
    *,
    impl: str | None = None,
) -> dict:
    """The timed ``runner``'s meta-gradients (at its starting state, TF32 off, with
    ``REPBLEND_IMPL=impl`` when given) against its own reference path in the same precision
    (:meth:`FastRunner.reference_grads_at_start`; ``reference`` itself for an fp32 runner), to
    :func:`tolerances`; and, reported only, against ``reference`` (the fp32 reference path's
    gradients of the runner's first plan: the precision cost). Returns ``{"rel_err": {...}, "rtol":
    {...}, "max_rel_err", "worst", "worst_ratio", "zero_in_reference", "ok", "precision_cost":
    {...}, "encoder_error"}``; nothing is raised. The benchmark's inputs start at ``R = 0``,
    where the gradient of ``L`` is zero in both paths: listed in ``zero_in_reference``, not a
    failure here (:func:`timed_parity` checks a point with ``R != 0``)."""
    plan = runner.plans[plan_index]
    with implementation(impl):
        got = _cpu64(runner.grads_at_start(plan))
    # An fp32 runner's same-precision reference is the fp32 reference path given.
    fp32 = runner.autocast is None and runner.dtype == torch.float32
    same = reference if fp32 else _cpu64(runner.reference_grads_at_start(plan))
    errs = rel_errors(got, same)
    return {
        "rel_err": errs,
        **_verdict(errs, same, runner.autocast, nonzero=False),
        "precision_cost": rel_errors(got, reference),
        "encoder_error": encoder_error(
            runner.encoder, _touched_images(runner, plan_index), runner.autocast
        ),
    }


def _with_similarity(inputs: StepInputs, std: float, seed: int) -> StepInputs:
    """``inputs`` with ``R`` of the low-rank similarity drawn ``N(0, std^2)`` (0: kept)."""
    if std:
        g = torch.Generator().manual_seed(seed + 3)
        r = inputs.sim["R"]
        inputs.sim["R"] = std * torch.randn(r.shape, generator=g, dtype=r.dtype)
    return inputs


def timed_parity(
    shape: StepShape,
    meta_grad: str,
    device: str | torch.device,
    *,
    compile: str = "none",
    memory_budget_mib: float = 0,
    encoder_chunk: int | None = None,
    autocast: str = "auto",
    impl: str | None = None,
    seed: int = 0,
    float64: bool = True,
    float64_chunk: int = 0,
    sim_r_std: float = SIM_R_STD,
) -> dict:
    """Meta-gradients of the timed configuration against the reference path in the same
    precision (the verdict) and, as its precision cost, against the fp32 reference path and
    float64 on the CPU, on the benchmark's own first plan, with a non-zero similarity ``R``
    (``sim_r_std``). ``impl``: what ``impl="auto"`` runs the fused ops with (``REPBLEND_IMPL``;
    None: the device's choice, e.g. ``"triton"`` under ``TRITON_INTERPRET=1`` on a CPU).

    Returns a record: the configuration; ``rel_err`` (vs the same-precision reference) with
    ``rtol``, ``max_rel_err``, ``worst``, ``worst_ratio`` and ``zero_in_reference``;
    ``precision_cost`` (vs the fp32 reference) and ``rel_err_vs_fp64``; ``fp32_vs_fp64`` (the
    fp32 reference against float64) and its maximum; ``encoder_error``; ``ok`` (same-precision
    errors within :func:`tolerances`, the fp32 reference's within :data:`RTOL`, no reference
    gradient exactly zero: ``sim_r_std=0`` fails, the gradient of ``L`` being zero then).
    Nothing is raised.
    """
    device = torch.device(device)
    inputs = _with_similarity(
        build_step_inputs(shape, 1, seed, methods=("repblend",)), sim_r_std, seed
    )
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
    with implementation(impl):
        used = "reference (compiled)" if compile == "step" else _impl_name(device)
    rec = {
        "shape": shape.name,
        "meta_grad": meta_grad,
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        # What impl="auto" runs the fused ops with on this device (a compiled step uses the
        # plain-torch ops inside its graph).
        "impl": used,
        "sim_r_std": sim_r_std,
        **timed.settings(),
    }
    plan = inputs.plans_repblend[0]
    with implementation(impl):
        got = _cpu64(timed.grads_at_start(plan))
    if timed.unroller.last_memory_plan is not None:
        rec["memory_plan"] = timed.unroller.last_memory_plan.to_dict()
    same = _cpu64(timed.reference_grads_at_start(plan))
    rec["rel_err"] = rel_errors(got, same)
    rec.update(_verdict(rec["rel_err"], same, timed.autocast, nonzero=True))
    rec["encoder_error"] = encoder_error(timed.encoder, _touched_images(timed, 0), timed.autocast)
    autocast_used = timed.autocast
    del timed
    gc.collect()
    ref32 = same if autocast_used is None else reference_grads(inputs, meta_grad, device)
    rec["precision_cost"] = rel_errors(got, ref32)
    ok = rec["ok"]
    if float64:
        ref64 = reference_grads(
            inputs, meta_grad, "cpu", dtype=torch.float64, encoder_chunk=float64_chunk
        )
        rec["rel_err_vs_fp64"] = rel_errors(got, ref64)
        rec["fp32_vs_fp64"] = rel_errors(ref32, ref64)
        rec["max_fp32_vs_fp64"] = max(rec["fp32_vs_fp64"].values())
        ok = ok and rec["max_fp32_vs_fp64"] <= RTOL
    rec["ok"] = bool(ok)
    return rec
