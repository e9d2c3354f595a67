"""Smoke check of the fused kernels: each op and implementation compiles, runs once on small
inputs and matches the reference (the first stage of benchmarks/gpu_check.sh).

For every op (contrastive loss forward + backward + double backward, blend forward + backward,
trajectory distance forward + backward, TESLA terms) and every fused implementation (``triton``,
``cuda``) that can run on the device (the dispatcher's reason otherwise; an implementation named
in ``--require`` that cannot run is a failure, not a skip): the first call's
seconds (JIT compilation included; the CUDA extension is built on first use), one more call's
milliseconds, and the largest relative error against the reference (fp32 tolerances of
docs/design.md §4, TF32 row on a GPU). Writes a JSON record after every case, so a stage cut
short keeps what it checked.

    python3 benchmarks/smoke.py --device cuda --require triton,cuda --json out/smoke.json
    TRITON_INTERPRET=1 python3 benchmarks/smoke.py --device cpu --require triton \
        --json out/smoke.json   # dry run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from repblend_fast import reference  # noqa: E402
from repblend_fast.config import TEMPERATURE  # noqa: E402
from repblend_fast.io import atomic_write_json  # noqa: E402
from repblend_fast.ops import (  # noqa: E402
    blend_pairs,
    contrastive_loss,
    registry,
    trajectory_distance,
    trajectory_terms,
)
from repblend_fast.ops._dispatch import cuda_status, triton_status  # noqa: E402

S = 1 / TEMPERATURE


def _cases(device: torch.device, big: bool):
    """``{name: (fused(impl) -> tensors, reference() -> tensors, inputs)}`` on random inputs, one
    per op of ``repblend_fast.ops.registry`` (:func:`main` refuses a list that differs)."""
    g = torch.Generator().manual_seed(0)
    k, b, d = (8, 20, 2304) if big else (2, 5, 17)
    n = 1_000_003 if big else 1_003

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    img, txt = rnd(k, b, d), rnd(k, b, d)
    tgt = torch.rand(k, b, b, generator=g).to(device)
    v_img, v_txt = rnd(k, b, d), rnd(k, b, d)
    perm = torch.stack([torch.randperm(b, generator=g) for _ in range(k)]).to(device)
    g_img, g_txt = rnd(k, b, d), rnd(k, b, d // 2 + 1)
    txt_b = rnd(k, b, d // 2 + 1)
    start = rnd(n)
    target = start + 1e-2 * rnd(n)
    gsum = 1e-2 * rnd(n)
    student = start - 0.1 * gsum
    lr = torch.tensor(0.1, device=device)

    def contrastive(fn):
        a, c = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        loss = fn(a, c, tgt)
        ga, gc = torch.autograd.grad(loss.sum(), [a, c], create_graph=True)
        hvp = torch.autograd.grad((ga * v_img).sum() + (gc * v_txt).sum(), [a, c])
        return [loss, ga, gc, *hvp]

    def blend(fn):
        a, c = img.clone().requires_grad_(True), txt_b.clone().requires_grad_(True)
        oi, ot = fn(a, c, perm, 0.37)
        return [oi, ot, *torch.autograd.grad((oi, ot), (a, c), (g_img, g_txt))]

    def distance(fn):
        s = student.clone().requires_grad_(True)
        out = fn(s, start, target)
        return [out, *torch.autograd.grad(out, [s])]

    def ref_contrastive(i, t, s):
        return reference.contrastive_loss(i, t, s, logit_scale=S, loss="wbce")

    return {
        "contrastive_loss": (
            lambda impl: contrastive(
                lambda i, t, s: contrastive_loss(i, t, s, logit_scale=S, loss="wbce", impl=impl)
            ),
            lambda: contrastive(ref_contrastive),
            [img, txt, tgt],
        ),
        "blend_pairs": (
            lambda impl: blend(lambda i, t, p, lam: blend_pairs(i, t, p, lam, impl=impl)),
            lambda: blend(reference.blend_pairs),
            [img, txt_b, perm],
        ),
        "trajectory_distance": (
            lambda impl: distance(lambda s, a, t: trajectory_distance(s, a, t, impl=impl)),
            lambda: distance(reference.trajectory_distance),
            [student, start, target],
        ),
        "trajectory_terms": (
            lambda impl: list(trajectory_terms(start, target, gsum, lr, impl=impl)),
            lambda: list(reference.trajectory_terms(start, target, gsum, lr)),
            [start, target, gsum],
        ),
    }


def _rel_err(got, want) -> float:
    return max(
        float(
            (a.detach().double() - b.detach().double()).norm()
            / b.detach().double().norm().clamp_min(1e-30)
        )
        for a, b in zip(got, want)
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", required=True, help="records are written here after every case")
    ap.add_argument(
        "--big",
        action="store_true",
        help="paper-sized inputs (K=8, B=20, D=2304; 1e6-element trajectories) instead of tiny",
    )
    ap.add_argument(
        "--require",
        default="",
        help="comma-separated implementations (triton, cuda) that must run here: one that "
        "cannot is recorded as UNAVAILABLE and fails the check (default: none required)",
    )
    a = ap.parse_args(argv)
    required = {r for r in a.require.split(",") if r}
    if required - {"triton", "cuda"}:
        ap.error(f"--require {a.require}: expected a comma-separated subset of triton,cuda")
    device = torch.device(a.device)
    # design.md §4: fp32 gradients rtol 1e-4 (IEEE dots) / relative RMS 2e-3 (TF32 on a GPU).
    rtol = 2e-3 if device.type == "cuda" else 1e-4
    records: list[dict] = []
    failed = 0
    statuses = {"triton": triton_status(device), "cuda": cuda_status(device)}
    cases = _cases(device, a.big)
    if set(cases) != set(registry.names()):
        raise SystemExit(f"smoke.py checks {sorted(cases)}, the ops are {registry.names()}")
    for name in registry.names():
        fused, ref, _ = cases[name]
        want = ref()
        for impl, (ok, why) in statuses.items():
            rec = {"op": name, "impl": impl, "device": device.type, "rtol": rtol}
            if not ok:
                rec.update(status="UNAVAILABLE" if impl in required else "skipped", reason=why)
            else:
                try:
                    t0 = time.perf_counter()
                    got = fused(impl)
                    _sync(device)
                    rec["first_call_s"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    fused(impl)
                    _sync(device)
                    rec["call_ms"] = (time.perf_counter() - t0) * 1e3
                    rec["rel_err"] = _rel_err(got, want)
                    rec["status"] = "ok" if rec["rel_err"] <= rtol else "MISMATCH"
                except Exception as exc:  # noqa: BLE001 - recorded, then the next case runs
                    rec.update(status="ERROR", reason=f"{type(exc).__name__}: {exc}"[:500])
            failed += rec["status"] in ("MISMATCH", "ERROR", "UNAVAILABLE")
            records.append(rec)
            atomic_write_json({"kind": "repblend_fast.smoke", "records": records}, a.json)
            extra = rec.get("reason") or f"rel_err {rec['rel_err']:.2g}"
            print(f"{name:20s} {impl:7s} {rec['status']:9s} {extra}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
