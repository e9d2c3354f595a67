"""The fast path's device memory and FLOPs counted on the ``meta`` device: shapes only, no
arithmetic, so any configuration (paper shapes, N = 499, any memory budget) is counted in seconds
on any machine.

    python benchmarks/device_memory.py --shapes paper --memory-budget-mib 0,2500,1000

For each configuration, meta-gradient mode and budget: the state (every tensor the runner holds),
the tensors saved for backward at their peak, the predicted device peak (their sum, a lower
bound: repblend_fast/bench/memory.py) and the FLOPs of one iteration by torch's formulas
(repblend_fast/bench/flops.py), counted exactly as ``repblend-fast bench`` counts them on its
last warm-up iteration. The authors' loops read values on the host every step, so they cannot
run on ``meta``: their rows come from ``repblend-fast bench``. fp32 only (autocast has no meta
device).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from repblend_fast.bench import SHAPE_SETS  # noqa: E402
from repblend_fast.bench.inputs import build_step_inputs, plan_to  # noqa: E402
from repblend_fast.bench.measure import account_iteration  # noqa: E402
from repblend_fast.bench.runners import make_runner  # noqa: E402

META = torch.device("meta")


def count(shape, meta_grad: str, budget: float, seed: int = 0) -> dict:
    """One fast-path iteration of ``shape`` on the meta device, counted."""
    inputs = build_step_inputs(shape, 1, seed, methods=("repblend",))
    runner = make_runner(
        inputs, "repblend-fast", meta_grad, META, autocast="none", memory_budget_mib=budget
    )
    del inputs
    counted: dict = {}
    account_iteration(
        runner,
        0,
        counted,
        step=lambda: runner.unroller.run(
            runner.x,
            runner.y,
            runner.sim,
            runner.eta_img,
            runner.eta_txt,
            runner.start,
            runner.target,
            plan_to(runner.plans[0], META),
        ),
    )
    plan = runner.unroller.last_memory_plan
    rec = {
        "config": shape.name,
        "meta_grad": meta_grad,
        "memory_budget_mib": budget,
        **counted,
    }
    if plan is not None:
        rec["memory_plan"] = plan.to_dict()
    return rec


def table(records: list[dict]) -> str:
    lines = [
        "| config | meta-grad | budget MiB | plan | state MiB | saved peak MiB | predicted device "
        "peak MiB | GFLOP/iter |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in records:
        p = r.get("memory_plan") or {}
        plan = f"keep {p['keep']}, chunk {p['chunk']}" if r["memory_budget_mib"] and p else "all"
        if p.get("checkpoint_steps"):
            plan += ", ckpt steps"
        lines.append(
            f"| {r['config']} | {r['meta_grad']} | {r['memory_budget_mib']:g} | {plan} | "
            f"{r['state_mib']:.0f} | {r['saved_peak_mib']:.0f} | {r['predicted_peak_mib']:.0f} | "
            f"{r['flops'] / 1e9:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="paper", choices=sorted(SHAPE_SETS))
    ap.add_argument("--configs", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--meta-grad", default="exact,tesla", help="comma-separated modes")
    ap.add_argument("--memory-budget-mib", default="0", help="comma-separated MiB (0: none)")
    ap.add_argument("--json", default=None, help="write the records here")
    args = ap.parse_args(argv)
    shapes = SHAPE_SETS[args.shapes]
    if args.configs:
        names = args.configs.split(",")
        unknown = sorted(set(names) - {s.name for s in shapes})
        if unknown:
            ap.error(f"--configs: unknown {unknown}; {args.shapes} has {[s.name for s in shapes]}")
        shapes = [s for s in shapes if s.name in names]
    modes = args.meta_grad.split(",")
    if not set(modes) <= {"exact", "tesla"}:
        ap.error(f"--meta-grad: expected exact and/or tesla, got {args.meta_grad!r}")
    try:
        budgets = [float(b) for b in args.memory_budget_mib.split(",")]
    except ValueError:
        ap.error(f"--memory-budget-mib: expected comma-separated MiB, got {args.memory_budget_mib}")
    records = [count(s, m, b) for s in shapes for m in modes for b in budgets]
    print(table(records))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
