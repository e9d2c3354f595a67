"""Loader for the CUDA extension (``csrc/``), exposed as ``torch.ops.repblend_fast.*``.

The extension is found, in order: the prebuilt ``repblend_fast._C`` (``REPBLEND_BUILD_CUDA=1 pip
install --no-build-isolation .``); else a JIT build with ninja on first use, when a CUDA device,
nvcc and ninja are present and ``REPBLEND_CUDA_JIT`` is not ``0``. Nothing here runs at import
time of the package; :func:`status` is called lazily by the dispatcher and caches its answer.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import shutil

import torch

logger = logging.getLogger("repblend_fast.ext")

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")

CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo"]
"""Compiler flags of the extension (``setup.py`` repeats them; ``tests/test_csrc_build.py`` checks
that the two agree and builds with these). No ``--use_fast_math``: it flushes denormals to zero,
swaps ``expf`` / ``logf`` / division for approximate intrinsics and lets the compiler reorder
arithmetic, which changes exactly what the kernels are written to keep (``sigmoid`` rounding like
torch's before BCE takes its log, NaN and infinity propagating as in the reference, the fp32
tolerances of docs/design.md §4). Only a GPU parity run could show it harmless, and none has been
made."""


def csrc_sources(csrc_dir: str = CSRC) -> list[str]:
    """All C++/CUDA sources of the extension, sorted (empty when ``csrc/`` is not shipped)."""
    found = glob.glob(os.path.join(csrc_dir, "*.cpp")) + glob.glob(os.path.join(csrc_dir, "*.cu"))
    return sorted(found)


def build_dir() -> str:
    root = os.environ.get("REPBLEND_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "repblend_fast"
    )
    path = os.path.join(root, "ext", f"torch{torch.__version__.replace('+', '_')}")
    os.makedirs(path, exist_ok=True)
    return path


def jit_build(verbose: bool = False) -> None:
    """Compile ``csrc/`` with ninja and load it (registers ``torch.ops.repblend_fast``)."""
    from torch.utils.cpp_extension import load

    sources = csrc_sources()
    if not sources:
        raise RuntimeError(f"no CUDA sources found under {CSRC}: install from a source checkout")
    load(
        name="repblend_fast_C",
        sources=sources,
        build_directory=build_dir(),
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS,
        is_python_module=False,
        verbose=verbose,
    )


@functools.cache
def status() -> tuple[bool, str]:
    """(available, reason) for the CUDA extension; builds it with JIT at most once per process."""
    if not torch.cuda.is_available():
        return False, "no CUDA device is available"
    try:
        import repblend_fast._C  # noqa: F401

        return True, "prebuilt repblend_fast._C"
    except ImportError:
        pass
    if os.environ.get("REPBLEND_CUDA_JIT", "1") == "0":
        return False, "repblend_fast._C is not built and REPBLEND_CUDA_JIT=0 forbids a JIT build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return False, (
            "repblend_fast._C is not built and nvcc (CUDA_HOME) was not found for a JIT build"
        )
    if shutil.which("ninja") is None:
        return False, (
            "repblend_fast._C is not built and ninja is missing for a JIT build (pip install ninja)"
        )
    try:
        logger.warning("building the repblend_fast CUDA extension with JIT (first use; ~1-2 min)")
        jit_build()
    except Exception as exc:
        return False, f"JIT build of csrc/ failed: {exc}"
    return True, "JIT-built from csrc/"
