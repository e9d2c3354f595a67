"""Shared test setup: Triton kernels run through the CPU interpreter unless a GPU is present."""

from __future__ import annotations

import os

# Must happen before any triton kernel module is imported (DESIGN.md §3).
if os.environ.get("REPBLEND_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    skip_gpu = pytest.mark.skip(
        reason="needs a CUDA device (run with REPBLEND_TEST_GPU=1 on a GPU)"
    )
    run_slow = "slow" in (config.getoption("-m") or "") or os.environ.get("REPBLEND_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow check: run with -m slow or REPBLEND_SLOW=1")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


@pytest.fixture
def gen():
    """A seeded CPU generator, fresh per test."""
    return torch.Generator().manual_seed(1234)
