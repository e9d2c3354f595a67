"""The ``poison`` fixture of tests/conftest.py: it must really NaN-fill what the ops allocate, so a
kernel that forgets to write an element is caught."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_float_allocations_come_back_nan(poison, dtype):
    assert torch.isnan(torch.empty(3, dtype=dtype)).all()
    assert torch.isnan(torch.empty((2, 5), dtype=dtype)).all()
    like = torch.zeros(4, 2, dtype=dtype)
    assert torch.isnan(torch.empty_like(like)).all()
    assert torch.isnan(like.new_empty((3, 3))).all()
    assert torch.isnan(torch.empty_like(torch.zeros(2), dtype=dtype)).all()


def test_default_dtype_and_grad_leaves_are_poisoned(poison):
    assert torch.isnan(torch.empty(3)).all()  # the default dtype is floating
    leaf = torch.empty(2, requires_grad=True)
    assert leaf.is_leaf and leaf.requires_grad and torch.isnan(leaf).all()


def test_integer_and_bool_allocations_are_left_alone(poison):
    for dtype in (torch.int64, torch.int32, torch.bool):
        t = torch.empty(4, dtype=dtype)
        assert t.dtype == dtype and t.shape == (4,)
        assert torch.empty_like(t).dtype == dtype


def test_a_kernel_that_forgets_an_element_is_caught(poison):
    """A launcher that allocates with torch.empty and writes all but one element: the hole is NaN,
    so a finiteness check on the result fails."""

    def forgetful_add_one(x):
        out = torch.empty_like(x)
        out.view(-1)[1:] = x.view(-1)[1:] + 1  # element 0 is never written
        return out

    out = forgetful_add_one(torch.zeros(2, 3))
    assert torch.isnan(out.view(-1)[0])
    assert torch.isfinite(out.view(-1)[1:]).all()
    assert not torch.isfinite(out).all()


def test_without_the_fixture_nothing_is_patched():
    # Plain torch functions again (monkeypatch undid the fixture after the tests above).
    for fn in (torch.empty, torch.empty_like, torch.Tensor.new_empty):
        assert "poison" not in getattr(fn, "__qualname__", "")
    assert "new_empty" not in torch.Tensor.__dict__
