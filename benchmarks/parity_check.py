"""Parity at the timed settings (a stage of benchmarks/gpu_check.sh): one distillation iteration
in exactly the configuration the step benchmark times — ``impl="auto"`` (the fused kernels on a
GPU), the frozen encoder under bf16 autocast on a GPU (``--autocast none``: the fp32 row) —
against the reference path in the same precision (the verdict, relative error <= 1e-3 on every
meta-gradient), and, reported as the precision cost, against the fp32 reference path and
float64 on the CPU, for each meta-gradient mode, with a non-zero low-rank similarity
(:func:`repblend_fast.bench.parity.timed_parity`; the bound and its reasons there).

    python benchmarks/parity_check.py --shapes paper --configs paper-n99 --json out/parity.json

Writes the records after every configuration (a stage cut short keeps what it checked) and exits
with status 1 when one of them fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from repblend_fast.bench import SHAPE_SETS  # noqa: E402
from repblend_fast.bench.parity import timed_parity  # noqa: E402
from repblend_fast.io import atomic_write_json  # noqa: E402
from repblend_fast.threads import set_threads  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="paper", choices=sorted(SHAPE_SETS))
    ap.add_argument("--configs", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--meta-grad", default="exact,tesla", help="comma-separated modes")
    ap.add_argument(
        "--autocast", default="auto", help="auto (bf16 on CUDA, none on a CPU), none, bf16"
    )
    ap.add_argument("--compile", default="none", help="the fast path's compile setting")
    ap.add_argument(
        "--impl",
        default=None,
        choices=("reference", "triton", "cuda"),
        help="run the fused ops with this implementation (REPBLEND_IMPL; default: the device's "
        "choice, the plain-torch reference on a CPU; triton on a CPU needs TRITON_INTERPRET=1)",
    )
    ap.add_argument("--no-float64", dest="float64", action="store_false")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    set_threads(a.threads)
    shapes = SHAPE_SETS[a.shapes]
    if a.configs:
        want = a.configs.split(",")
        shapes = [s for s in shapes if s.name in want]
        if len(shapes) != len(want):
            names = [s.name for s in SHAPE_SETS[a.shapes]]
            ap.error(f"--configs {a.configs}: the {a.shapes} set has {names}")
    records: list[dict] = []
    failed = 0
    for shape in shapes:
        for mode in a.meta_grad.split(","):
            t0 = time.perf_counter()
            rec = timed_parity(
                shape,
                mode,
                a.device,
                autocast=a.autocast,
                compile=a.compile,
                impl=a.impl,
                float64=a.float64,
            )
            rec["seconds"] = time.perf_counter() - t0
            records.append(rec)
            atomic_write_json({"kind": "repblend_fast.parity", "records": records}, a.json)
            failed += not rec["ok"]
            w = rec["worst"]
            cost = rec["precision_cost"]
            print(
                f"{shape.name} {mode} autocast={rec['autocast']} impl={rec['impl']}: "
                f"{'ok' if rec['ok'] else 'FAILED'}; worst {w}: {rec['rel_err'][w]:.3g} vs the "
                f"same precision (bound {rec['rtol'][w]:.3g}); precision cost vs fp32: x "
                f"{cost['x']:.3g}, worst {max(cost.values()):.3g}; encoder error "
                f"{json.dumps({k: float(f'{v:.2g}') for k, v in rec['encoder_error'].items()})}; "
                f"{rec['seconds']:.1f} s",
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
