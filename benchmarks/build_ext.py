"""Build the CUDA extension (``csrc/``) in a stage of its own (benchmarks/gpu_check.sh).

Clears stale build locks in the extension cache first, then JIT-builds ``csrc/`` with ninja on
all cores for one GPU architecture (``--arch``, default ``9.0``: sm_90, the H100 / H200), loads it
and checks that every op registered. Writes ``--json`` when it ends, ``status`` ``ok`` or
``FAILED`` with the reason, and exits 1 on failure: a failed build is a failed stage, never a
silent fall-back to Triton (the later stages then find no extension and say so).

    python3 benchmarks/build_ext.py --json out/build_ext.json
    python3 benchmarks/build_ext.py --json out/build_ext.json --check-only   # the dry run

``--check-only`` (the CPU dry run) clears the locks and looks for the toolchain (nvcc, ninja; their
absence is recorded, not a failure, on a CPU) but compiles nothing: ``tests/test_csrc_build.py``
(``ext`` marker) builds the sources on a CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from repblend_fast import _ext  # noqa: E402
from repblend_fast.io import atomic_write_json  # noqa: E402

OPS = (
    "blend_gather",
    "blend_scatter",
    "contrastive_fwd",
    "contrastive_bwd",
    "trajectory_distance_partials",
    "trajectory_terms_partials",
    "trajectory_finalize",
)
"""The ops ``csrc/*.cu`` register under ``torch.ops.repblend_fast``."""


def clear_stale_locks(build_dir: str) -> list[str]:
    """Remove the build locks (``lock`` files of torch's ``FileBaton``) under ``build_dir``.

    A build killed mid-way (a stage's timeout) leaves its lock behind, and every later build then
    waits on it until its own timeout. gpu_check.sh runs one stage at a time, so a lock present
    when this stage starts is stale. Returns the removed paths.
    """
    removed = []
    for dirpath, _dirs, files in os.walk(build_dir):
        if "lock" in files:
            path = os.path.join(dirpath, "lock")
            os.remove(path)
            removed.append(path)
    return sorted(removed)


def _toolchain() -> dict:
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) if CUDA_HOME else None
    return {"cuda_home": CUDA_HOME, "nvcc": nvcc, "ninja": shutil.which("ninja")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="written when the stage ends")
    ap.add_argument("--arch", default="9.0", help="TORCH_CUDA_ARCH_LIST (default 9.0: sm_90)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="ninja jobs (all cores)")
    ap.add_argument("--check-only", action="store_true", help="locks and toolchain, no build")
    a = ap.parse_args(argv)
    os.environ["TORCH_CUDA_ARCH_LIST"] = a.arch
    os.environ["MAX_JOBS"] = str(a.jobs)
    bdir = _ext.build_dir()
    rec = {
        "kind": "repblend_fast.build_ext",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "arch": a.arch,
        "jobs": a.jobs,
        "build_dir": bdir,
        "stale_locks_removed": clear_stale_locks(bdir),
        **_toolchain(),
    }
    missing = [k for k in ("nvcc", "ninja") if not rec[k]]
    t0 = time.perf_counter()
    if a.check_only:
        found = f"{' and '.join(missing)} not found here" if missing else "nvcc and ninja found"
        rec.update(status="ok", reason=f"--check-only: nothing compiled; {found}")
    elif missing:
        rec.update(status="FAILED", reason=f"{' and '.join(missing)} not found")
    else:
        try:
            _ext.jit_build(verbose=True)
            have = [op for op in OPS if hasattr(torch.ops.repblend_fast, op)]
            lacking = sorted(set(OPS) - set(have))
            rec["ops"] = have
            if lacking:
                rec.update(status="FAILED", reason=f"ops not registered: {lacking}")
            else:
                rec["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - recorded as the stage's failure
            rec.update(status="FAILED", reason=f"{type(exc).__name__}: {exc}"[-2000:])
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(rec, a.json)
    print(f"build_ext {rec['status']} in {rec['seconds']} s ({rec.get('reason', bdir)})")
    return 0 if rec["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
