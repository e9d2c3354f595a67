"""Shared test setup: Triton kernels run through the CPU interpreter unless a GPU is present."""

from __future__ import annotations

import os

# Must happen before any triton kernel module is imported (docs/design.md §3).
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


def _nan_filled(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        with torch.no_grad():
            t.fill_(float("nan"))
    return t


@pytest.fixture
def poison(monkeypatch):
    """For the test's duration every floating ``torch.empty`` / ``torch.empty_like`` /
    ``Tensor.new_empty`` comes back NaN-filled, so an output element (or a partial-sum slot) that a
    kernel forgets to write shows up as NaN instead of whatever the allocator left there.

    Integer and bool allocations are left alone (there is no NaN to fill them with). Tensors the
    C++ side allocates itself (``at::empty`` in ``csrc/``) are not affected.
    """
    real_empty = torch.empty
    real_empty_like = torch.empty_like
    real_new_empty = torch.Tensor.new_empty

    def empty(*args, **kwargs):
        return _nan_filled(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _nan_filled(real_empty_like(*args, **kwargs))

    def new_empty(self, *args, **kwargs):
        return _nan_filled(real_new_empty(self, *args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
    yield


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory):
    """A generic pairs file of 30 random 16-px images with distinct captions."""
    import json

    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow", "black", "white"]
    shapes = ["square", "circle", "stripe", "dot", "cross"]
    rows = []
    for i in range(30):
        arr = (rng.random((16, 16, 3)) * 255).astype("uint8")
        Image.fromarray(arr).save(root / f"img{i:02d}.png")
        cap = f"a {colours[i % 6]} {shapes[i % 5]} number {i}"
        rows.append({"image": f"img{i:02d}.png", "caption": cap})
    ann = root / "pairs.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ann
