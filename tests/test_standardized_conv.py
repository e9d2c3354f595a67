"""Frozen weight-standardised convolutions reuse their standardised weight
(repblend_fast/models/standardized_conv.py): bitwise the module's outputs and input gradients,
the weight standardised once per parameter version, never for a trainable module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from repblend_fast.models.standardized_conv import reuse_standardized_weights, standardized_convs

timm = pytest.importorskip("timm")


class _CountBatchNorm(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.batch_norm:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _model(name="nfnet_l0"):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0).eval().requires_grad_(False)


@pytest.mark.parametrize("name", ["nfnet_l0", "resnetv2_50x1_bit"])
def test_outputs_and_input_gradients_are_bitwise_the_modules(name):
    enc = _model(name)
    assert standardized_convs(enc)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    want = enc(x)
    (gwant,) = torch.autograd.grad(want.square().sum(), x)
    cache: dict = {}
    for _ in range(2):  # the first call fills the cache, the second reuses it
        with reuse_standardized_weights(enc, cache) as n:
            got = enc(x)
            (g,) = torch.autograd.grad(got.square().sum(), x)
        assert n == len(standardized_convs(enc))
        assert torch.equal(got, want) and torch.equal(g, gwant)
    assert len(cache) == n


def test_weights_are_standardised_once_and_again_after_an_update():
    enc = _model()
    n = len(standardized_convs(enc))
    x = torch.randn(1, 3, 64, 64)
    cache: dict = {}
    counts = []
    for _ in range(3):
        with reuse_standardized_weights(enc, cache), _CountBatchNorm() as c:
            enc(x)
        counts.append(c.calls)
    assert counts[0] >= n and counts[1] == counts[0] - n and counts[2] == counts[1]
    conv = standardized_convs(enc)[3]
    with torch.no_grad():
        conv.weight.mul_(2.0)  # a new parameter version: standardised again
    with reuse_standardized_weights(enc, cache), _CountBatchNorm() as c:
        got = enc(x)
    assert c.calls == counts[1] + 1
    assert torch.equal(got, enc(x))


def test_trainable_modules_and_the_module_afterwards_are_untouched():
    enc = _model().requires_grad_(True)
    cache: dict = {}
    x = torch.randn(1, 3, 64, 64)
    with reuse_standardized_weights(enc, cache) as n:
        out = enc(x)
    assert n == 0 and cache == {}
    grads = torch.autograd.grad(out.sum(), standardized_convs(enc)[0].weight)
    assert grads[0].abs().sum() > 0
    assert all("forward" not in m.__dict__ for m in standardized_convs(enc))


def test_autocast_state_is_part_of_the_key():
    enc = _model()
    x = torch.randn(1, 3, 64, 64)
    cache: dict = {}
    with reuse_standardized_weights(enc, cache):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a = enc(x)
        b = enc(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a_plain = enc(x)
    assert torch.equal(a, a_plain) and torch.equal(b, enc(x))


def test_runs_on_a_device_without_autocast():
    """The meta device (shapes only; the step's memory and FLOPs are counted there) has no
    autocast state to read."""
    enc = _model().to("meta")
    cache: dict = {}
    with reuse_standardized_weights(enc, cache) as n:
        out = enc(torch.randn(2, 3, 64, 64, device="meta"))
    assert out.shape == (2, enc.num_features) and len(cache) == n
