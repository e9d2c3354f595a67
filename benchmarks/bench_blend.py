"""blend_pairs (docs/algorithm.md §4 step 3): forward and forward+backward of ``lam·x +
(1−lam)·x[perm]``.

Byte model (memory-bound; the gathered rows are re-read from cache, counted once): forward reads
both inputs and writes both outputs, ``2·(|img| + |txt|)`` elements; forward+backward adds the
upstream gradients read and the input gradients written, ``4·(|img| + |txt|)``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import PROVIDERS, compiled, run_case
from repblend_fast import reference
from repblend_fast.ops import blend_pairs

MODES = ("fwd", "fwd+bwd")


def cases(shapes: str) -> list[tuple[str, dict]]:
    if shapes == "tiny":
        grid, dtypes = [(20, 8, 256, 192)], ["float32"]
    elif shapes == "ci":
        grid, dtypes = [(20, k, 256, 192) for k in (1, 8)], ["float32"]
    elif shapes == "check":
        grid, dtypes = [(20, 8, 2304, 768)], ["float32", "bfloat16"]
    elif shapes == "paper":
        grid = [(b, k, 2304, 768) for b in (20, 128) for k in (1, 8)]
        dtypes = ["float32", "bfloat16"]
    else:
        grid, dtypes = [(512, 64, 2304, 768), (2048, 16, 2304, 768)], ["float32", "bfloat16"]
    return [
        (f"B{b}-K{k}-Di{di}-Dt{dt_}-{dt}", {"B": b, "K": k, "Di": di, "Dt": dt_, "dtype": dt})
        for b, k, di, dt_ in grid
        for dt in dtypes
    ]


def _inputs(case: dict, device: torch.device):
    g = torch.Generator().manual_seed(case["B"] + 7 * case["K"])
    K, B = case["K"], case["B"]
    lead = (K,) if K > 1 else ()
    dtype = getattr(torch, case["dtype"])
    img = torch.randn(*lead, B, case["Di"], generator=g)
    txt = torch.randn(*lead, B, case["Dt"], generator=g)
    perm = torch.stack([torch.randperm(B, generator=g) for _ in range(max(K, 1))])
    perm = perm if K > 1 else perm[0]
    g_img = torch.randn(img.shape, generator=g)
    g_txt = torch.randn(txt.shape, generator=g)
    to = dict(device=device, dtype=dtype)
    return img.to(**to), txt.to(**to), perm.to(device), g_img.to(**to), g_txt.to(**to)


def _blend(provider: str, mode: str):
    if provider == "reference":
        return reference.blend_pairs
    if provider == "compile":
        return compiled("blend", reference.blend_pairs, mode)
    return lambda i, t, p, lam: blend_pairs(i, t, p, lam, impl=provider)


def _mode_fn(fn, mode, img, txt, perm, g_img, g_txt, lam=0.37):
    if mode == "fwd":

        def run():
            with torch.no_grad():
                return fn(img, txt, perm, lam)

        return run
    a = img.detach().requires_grad_(True)
    b = txt.detach().requires_grad_(True)

    def run():
        oi, ot = fn(a, b, perm, lam)
        return torch.autograd.grad((oi, ot), (a, b), (g_img, g_txt))

    return run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_blend(benchmark, device, case, provider, mode):
    img, txt, perm, g_img, g_txt = _inputs(case, device)
    fp32 = [t.float() for t in (img, txt)]
    elt = img.element_size()
    n = img.numel() + txt.numel()
    run_case(
        benchmark,
        op="blend_pairs",
        provider=provider,
        mode=mode,
        dtype=img.dtype,
        device=device,
        shape={k: case[k] for k in ("K", "B", "Di", "Dt")},
        make_fn=lambda p: _mode_fn(_blend(p, mode), mode, img, txt, perm, g_img, g_txt),
        make_ref=_mode_fn(reference.blend_pairs, mode, *fp32, perm, g_img.float(), g_txt.float()),
        tensors=[img, txt, perm],
        order=MODES.index(mode),
        bytes_moved=float((2 if mode == "fwd" else 4) * n * elt),
    )
