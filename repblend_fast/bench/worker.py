"""Subprocess entry of the step benchmark: ``python -m repblend_fast.bench.worker '<json spec>'``.

A fresh interpreter per provider gives each its own resident set, so that CPU peak memory is the
provider's and not what earlier providers left in the allocator. The spec carries every
parameter (:func:`repblend_fast.bench.measure.run_in_subprocess` writes it); the result is one
stdout line tagged with ``RESULT_TAG``, so that anything else printed (warnings) cannot be
mistaken for it.
"""

from __future__ import annotations

import json
import sys

import torch

from repblend_fast.bench.measure import RESULT_TAG, run_one
from repblend_fast.bench.shapes import StepShape
from repblend_fast.host_allocator import apply_host_allocator, host_allocator
from repblend_fast.threads import set_threads


def main(argv: list[str] | None = None) -> int:
    """Run the spec in ``argv[0]`` and print its result; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m repblend_fast.bench.worker '<json spec>'", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    set_threads(spec.get("threads"))
    apply_host_allocator(spec.get("host_allocator", "system"))
    out = run_one(
        StepShape(**spec["shape"]),
        spec["provider"],
        spec["meta_grad"],
        torch.device(spec["device"]),
        spec["seed"],
        spec["warmup"],
        spec["iterations"],
        spec.get("encoder_chunk"),
        compile=spec.get("compile", "none"),
        memory_budget_mib=spec.get("memory_budget_mib", 0),
        autocast=spec.get("autocast", "auto"),
        reference=spec.get("reference"),
    )
    out["host_allocator"] = host_allocator()  # the policy in force, not only the one asked for
    print(RESULT_TAG + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
