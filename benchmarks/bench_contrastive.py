"""contrastive_loss (docs/algorithm.md §7, WBCE): forward, forward+backward and double backward.

FLOP model (matmuls only; the elementwise loss is O(B²) and the normalisation O(BD)):
forward ``2·K·B²·D`` (the logits), forward+backward ``3×`` that (two more ``B×B×D`` products),
double backward ``6×`` (the backward's products and their VJPs).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import PROVIDERS, compiled, run_case
from repblend_fast import reference
from repblend_fast.ops import contrastive_loss

SCALE = 1 / 0.07
MODES = ("fwd", "fwd+bwd", "double-bwd")
FLOP_FACTOR = {"fwd": 1, "fwd+bwd": 3, "double-bwd": 6}


def cases(shapes: str) -> list[tuple[str, dict]]:
    if shapes in ("ci", "tiny"):
        grid, dtypes = [(b, k, 256) for b in (20, 40) for k in (1, 8)], ["float32"]
    elif shapes == "paper":
        grid = [(b, k, 2304) for b in (20, 40, 128, 512) for k in (1, 8)]
        dtypes = ["float32", "bfloat16"]
    else:
        grid = [(b, k, 2304) for b in (1024, 2048) for k in (1, 8)]
        dtypes = ["float32", "bfloat16"]
    return [
        (f"B{b}-K{k}-D{d}-{dt}", {"B": b, "K": k, "D": d, "dtype": dt})
        for b, k, d in grid
        for dt in dtypes
    ]


def _inputs(case: dict, device: torch.device):
    g = torch.Generator().manual_seed(case["B"] * 31 + case["K"])
    K, B, D = case["K"], case["B"], case["D"]
    lead = (K,) if K > 1 else ()
    dtype = getattr(torch, case["dtype"])
    img = torch.randn(*lead, B, D, generator=g)
    txt = torch.randn(*lead, B, D, generator=g)
    # A learned-looking soft target: identity plus a small symmetric low-rank part.
    low = 0.1 * torch.randn(*lead, B, 3, generator=g)
    target = (torch.eye(B) + low @ low.transpose(-1, -2)).clamp(0, 1)
    v_img = torch.randn(*lead, B, D, generator=g)
    v_txt = torch.randn(*lead, B, D, generator=g)
    to = dict(device=device, dtype=dtype)
    return [t.to(**to) for t in (img, txt, target, v_img, v_txt)]


def _mode_fn(loss_fn, mode, img, txt, target, v_img, v_txt):
    if mode == "fwd":

        def fn():
            with torch.no_grad():
                return loss_fn(img, txt, target)

        return fn
    a = img.detach().requires_grad_(True)
    b = txt.detach().requires_grad_(True)
    if mode == "fwd+bwd":

        def fn():
            return torch.autograd.grad(loss_fn(a, b, target).sum(), [a, b])

        return fn

    def fn():
        ga, gb = torch.autograd.grad(loss_fn(a, b, target).sum(), [a, b], create_graph=True)
        return torch.autograd.grad((ga * v_img).sum() + (gb * v_txt).sum(), [a, b])

    return fn


def _loss(provider: str, mode: str):
    def ref(i, t, s):
        return reference.contrastive_loss(i, t, s, logit_scale=SCALE, loss="wbce")

    if provider == "reference":
        return ref
    if provider == "compile":
        return compiled("contrastive", ref, mode)
    return lambda i, t, s: contrastive_loss(i, t, s, logit_scale=SCALE, loss="wbce", impl=provider)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_contrastive(benchmark, device, case, provider, mode):
    tensors = _inputs(case, device)
    fp32 = [t.float() for t in tensors]

    def make_fn(p):
        return _mode_fn(_loss(p, mode), mode, *tensors)

    K, B, D = case["K"], case["B"], case["D"]
    run_case(
        benchmark,
        op="contrastive_loss",
        provider=provider,
        mode=mode,
        dtype=tensors[0].dtype,
        device=device,
        shape={"K": K, "B": B, "D": D},
        make_fn=make_fn,
        make_ref=_mode_fn(_loss("reference", mode), mode, *fp32),
        tensors=tensors[:3],
        order=MODES.index(mode),
        flops=2.0 * K * B * B * D * FLOP_FACTOR[mode],
    )
