"""Triton kernels for representation blending (docs/algorithm.md §4 step 3) and its transpose.

Both kernels work on a batch of ``K`` blends of ``B`` rows each, stored row-major as ``[K, B, D]``
(contiguous), with one index row ``perm[k]`` (``[K, B]`` int64) and one coefficient ``lam[k]`` read
through ``lam_stride`` (0 broadcasts one coefficient to all ``K``):

- gather (forward): ``out[k, b] = lam[k] * x[k, b] + (1 - lam[k]) * x[k, perm[k, b]]``
- scatter (transpose):
  ``out[k, j] = lam[k] * g[k, j] + (1 - lam[k]) * sum_{i: perm[k, i] = j} g[k, i]``

The scatter kernel loops over the ``B`` source rows in a fixed order instead of using atomics, so it
is deterministic and exact for any in-range index row (a permutation touches each row once; a
repeated index simply sums). Loads are cast to fp32 (fp64 for fp64 inputs) right after ``tl.load``;
the result is rounded once to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D = 256


@triton.jit
def _blend_gather_kernel(
    x_ptr,
    perm_ptr,
    lam_ptr,
    out_ptr,
    B,
    D,
    lam_stride,
    BLOCK: tl.constexpr,
    FP64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # k * B + b
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    k = row // B
    src = k * B + tl.load(perm_ptr + row)
    if FP64:
        lam = tl.load(lam_ptr + k * lam_stride).to(tl.float64)
        x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float64)
        xp = tl.load(x_ptr + src * D + cols, mask=mask, other=0.0).to(tl.float64)
    else:
        lam = tl.load(lam_ptr + k * lam_stride).to(tl.float32)
        x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(x_ptr + src * D + cols, mask=mask, other=0.0).to(tl.float32)
    out = lam * x + (1.0 - lam) * xp
    tl.store(out_ptr + row * D + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _blend_scatter_kernel(
    g_ptr,
    perm_ptr,
    lam_ptr,
    out_ptr,
    B,
    D,
    lam_stride,
    BLOCK: tl.constexpr,
    FP64: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # k * B + j: the destination row
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    k = row // B
    j = row - k * B
    if FP64:
        lam = tl.load(lam_ptr + k * lam_stride).to(tl.float64)
        g = tl.load(g_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float64)
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        lam = tl.load(lam_ptr + k * lam_stride).to(tl.float32)
        g = tl.load(g_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, B):
        src = k * B + i
        hit = tl.load(perm_ptr + src) == j
        # A masked-off load reads no memory: only the rows that map to j cost bandwidth.
        gi = tl.load(g_ptr + src * D + cols, mask=mask & hit, other=0.0)
        acc += gi.to(acc.dtype)
    out = lam * g + (1.0 - lam) * acc
    tl.store(out_ptr + row * D + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(
    kernel, x: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor, out: torch.Tensor | None
) -> torch.Tensor:
    if x.dim() != 3 or perm.shape != x.shape[:2]:
        raise ValueError(
            f"expected x [K, B, D] and perm [K, B], got {tuple(x.shape)}, {tuple(perm.shape)}"
        )
    if lam.dim() != 1 or lam.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"expected lam [1] or [K], got {tuple(lam.shape)}")
    x = x.contiguous()
    perm = perm.contiguous()
    K, B, D = x.shape
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor with x's shape and dtype")
    if out.numel() == 0:
        return out
    lam_stride = 0 if lam.shape[0] == 1 else lam.stride(0)
    grid = (K * B, triton.cdiv(D, BLOCK_D))
    kernel[grid](x, perm, lam, out, B, D, lam_stride, BLOCK=BLOCK_D, FP64=x.dtype == torch.float64)
    return out


def blend_gather(
    x: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``lam * x + (1 - lam) * x[perm]`` per batch entry.

    Args:
        x: ``[K, B, D]`` float tensor.
        perm: ``[K, B]`` int64, values in ``[0, B)`` (not checked here).
        lam: ``[1]`` or ``[K]`` float tensor on ``x``'s device.
        out: optional ``[K, B, D]`` contiguous output buffer (allocated when None).

    Returns:
        ``[K, B, D]`` in ``x.dtype``.
    """
    return _launch(_blend_gather_kernel, x, perm, lam, out)


def blend_scatter(
    g: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Transpose of :func:`blend_gather` applied to ``g``: ``lam*g + (1-lam)*scatter_add(g, perm)``.

    Args:
        g: ``[K, B, D]`` float tensor.
        perm: ``[K, B]`` int64, values in ``[0, B)`` (not checked here).
        lam: ``[1]`` or ``[K]`` float tensor on ``g``'s device.
        out: optional ``[K, B, D]`` contiguous output buffer (allocated when None).

    Returns:
        ``[K, B, D]`` in ``g.dtype``.
    """
    return _launch(_blend_scatter_kernel, g, perm, lam, out)
