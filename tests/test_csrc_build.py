"""Compile check of the whole CUDA extension: every ``csrc/*.cu`` plus ``csrc/module.cpp``, built
together with ``torch.utils.cpp_extension.load`` into a temporary directory and loaded (so duplicate
op registrations or unresolved symbols fail too). No kernel runs: this works without a GPU."""

from __future__ import annotations

import ast
import glob
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from repblend_fast.ops import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# Ops that csrc/*.cu must register: the ops' list (repblend_fast.ops.registry).
EXPECTED_OPS = list(registry.cuda_ops())


def _cuda_home() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


def _skip_reason() -> str | None:
    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    if shutil.which("nvcc") is None and _cuda_home() is None:
        return "nvcc is not installed"
    if shutil.which("ninja") is None:
        return "ninja is not installed (pip install ninja)"
    if not glob.glob(os.path.join(CSRC, "*.cu")):
        return "no CUDA sources under csrc/"
    return None


def _cudart_dirs() -> list[str]:
    """Directories holding ``libcudart.so``: CUDA_HOME's lib dirs, then toolkits beside nvcc.

    torch derives CUDA_HOME from the nvcc on PATH; when that nvcc is a wrapper script outside the
    toolkit, the linker needs the toolkit's library directory spelled out.
    """
    homes = [h for h in (os.environ.get("CUDA_HOME"), _cuda_home()) if h]
    homes += sorted(glob.glob("/usr/local/cuda*"))
    dirs = []
    for home in homes:
        for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
            d = os.path.join(home, sub)
            if os.path.exists(os.path.join(d, "libcudart.so")) and d not in dirs:
                dirs.append(d)
    return dirs


BUILD_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from torch.utils.cpp_extension import load
    from repblend_fast import _ext

    build_dir, ldirs, expected = sys.argv[1], sys.argv[2], sys.argv[3]
    t0 = time.time()
    load(
        name="repblend_fast_buildcheck",
        sources=_ext.csrc_sources(),
        build_directory=build_dir,
        extra_cflags=_ext.CXX_FLAGS,
        extra_cuda_cflags=_ext.NVCC_FLAGS,
        extra_ldflags=["-L" + d for d in ldirs.split(":") if d],
        is_python_module=False,
        verbose=False,
    )
    missing = [n for n in expected.split(",") if not hasattr(torch.ops.repblend_fast, n)]
    assert not missing, f"ops not registered: {missing}"
    for name in expected.split(","):
        print("SCHEMA", getattr(torch.ops.repblend_fast, name).default._schema)
    print(f"built in {time.time() - t0:.0f} s")
    """
)


@pytest.mark.ext
def test_csrc_compiles_and_registers_ops(tmp_path):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ)
    # One architecture keeps the check to a few minutes; sm_90 is the H100/H200 target.
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    env.setdefault("MAX_JOBS", "2")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            BUILD_SCRIPT,
            str(tmp_path),
            ":".join(_cudart_dirs()),
            ",".join(EXPECTED_OPS),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    schemas = [line[7:] for line in proc.stdout.splitlines() if line.startswith("SCHEMA ")]
    # The dispatcher passes the row-parallel choice of repblend_fast.ops.contrastive.row_parallel
    # to both contrastive ops (the row-parallel kernels are compiled above with the rest).
    for name in ("contrastive_fwd", "contrastive_bwd"):
        (schema,) = [s for s in schemas if s.startswith(f"repblend_fast::{name}(")]
        assert "bool row_parallel)" in schema, schema
    # Every kernel template of csrc/ is instantiated for every dtype the ops dispatch on
    # (AT_DISPATCH_FLOATING_TYPES_AND2: float, double, half, bfloat16), so the build covers them.
    for path in glob.glob(os.path.join(CSRC, "*.cu")):
        with open(path) as f:
            src = f.read()
        assert "AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16" in src, path


def test_build_flags_are_one_definition_without_fast_math():
    """setup.py and the JIT build compile with the same flags, and neither with --use_fast_math
    (approximate exp/log/division and flushed denormals would change what the GPU parity tests
    pin; no GPU run has shown it harmless)."""
    from repblend_fast import _ext

    assert "--use_fast_math" not in _ext.NVCC_FLAGS + _ext.CXX_FLAGS
    with open(os.path.join(ROOT, "setup.py")) as f:
        setup_src = f.read()
    code = "\n".join(line.split("#")[0] for line in setup_src.splitlines())
    assert "fast_math" not in code
    m = re.search(r'extra_compile_args=\{"cxx": (\[[^\]]*\]), "nvcc": (\[[^\]]*\])\}', code)
    assert m is not None, "setup.py: extra_compile_args not found"
    assert ast.literal_eval(m.group(1)) == _ext.CXX_FLAGS
    assert ast.literal_eval(m.group(2)) == _ext.NVCC_FLAGS


def test_every_op_source_registers_with_the_shared_library():
    """Cheap static check: each .cu registers into the shared ``repblend_fast`` namespace."""
    for path in glob.glob(os.path.join(CSRC, "*.cu")):
        with open(path) as f:
            src = f.read()
        name = os.path.basename(path)
        assert "TORCH_LIBRARY_FRAGMENT(repblend_fast, m)" in src, name
        assert "TORCH_LIBRARY_IMPL(repblend_fast, CUDA, m)" in src, name
        assert "TORCH_LIBRARY(" not in src, f"{name}: use TORCH_LIBRARY_FRAGMENT, not TORCH_LIBRARY"
