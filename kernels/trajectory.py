"""Triton kernels for the flattened-parameter trajectory reductions (docs/algorithm.md §4 step 4,
§11e).

A parameter vector is a list of pieces (1-D views of one flattened vector). Every reduction is a
fixed two-stage sum, so results are bit-identical from run to run (no atomics):

1. one launch per piece: program ``p`` reduces its own ``CHUNK = BLOCK * ITERS`` elements into a
   ``[BLOCK]`` accumulator, sums it with ``tl.sum`` and writes one partial per channel into column
   ``offset + p`` of a ``[C, P]`` buffer shared by all pieces;
2. one launch of a single program that sums the ``[C, P]`` buffer in a fixed order.

Loads are cast to fp32 right after ``tl.load`` (fp64 for fp64 inputs) and all accumulation happens
in that type. Outputs and partials are allocated with ``torch.empty``: every column of the partials
is written by exactly one block (the tests NaN-fill every ``torch.empty`` to check that).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

BLOCK = 1024
ITERS = 8
CHUNK = BLOCK * ITERS
FINAL_BLOCK = 1024


@triton.jit
def _dist_partial_kernel(
    s_ptr,
    a_ptr,
    t_ptr,
    part_ptr,
    n,
    P,
    offset,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    FP64: tl.constexpr,
):
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * (BLOCK * ITERS)
    if FP64:
        acc_num = tl.zeros([BLOCK], dtype=tl.float64)
        acc_den = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc_num = tl.zeros([BLOCK], dtype=tl.float32)
        acc_den = tl.zeros([BLOCK], dtype=tl.float32)
    for it in range(ITERS):
        offs = base + it * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        s = tl.load(s_ptr + offs, mask=m, other=0.0).to(acc_num.dtype)
        a = tl.load(a_ptr + offs, mask=m, other=0.0).to(acc_num.dtype)
        t = tl.load(t_ptr + offs, mask=m, other=0.0).to(acc_num.dtype)
        d_num = s - t
        d_den = a - t
        acc_num += d_num * d_num
        acc_den += d_den * d_den
    col = offset + pid
    tl.store(part_ptr + col, tl.sum(acc_num, axis=0))
    tl.store(part_ptr + P + col, tl.sum(acc_den, axis=0))


@triton.jit
def _terms_partial_kernel(
    a_ptr,
    t_ptr,
    g_ptr,
    lr_ptr,
    dir_ptr,
    part_ptr,
    n,
    P,
    offset,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    FP64: tl.constexpr,
):
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * (BLOCK * ITERS)
    if FP64:
        acc_den = tl.zeros([BLOCK], dtype=tl.float64)
        acc_num = tl.zeros([BLOCK], dtype=tl.float64)
        acc_dot = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc_den = tl.zeros([BLOCK], dtype=tl.float32)
        acc_num = tl.zeros([BLOCK], dtype=tl.float32)
        acc_dot = tl.zeros([BLOCK], dtype=tl.float32)
    lr = tl.load(lr_ptr).to(acc_den.dtype)
    for it in range(ITERS):
        offs = base + it * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        a = tl.load(a_ptr + offs, mask=m, other=0.0).to(acc_den.dtype)
        t = tl.load(t_ptr + offs, mask=m, other=0.0).to(acc_den.dtype)
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(acc_den.dtype)
        delta = t - a
        r = delta + lr * g
        acc_den += delta * delta
        acc_num += r * r
        acc_dot += r * g
        tl.store(dir_ptr + offs, (lr * r).to(dir_ptr.dtype.element_ty), mask=m)
    col = offset + pid
    tl.store(part_ptr + col, tl.sum(acc_den, axis=0))
    tl.store(part_ptr + P + col, tl.sum(acc_num, axis=0))
    tl.store(part_ptr + 2 * P + col, tl.sum(acc_dot, axis=0))


@triton.jit
def _final_kernel(
    part_ptr,
    out_ptr,
    P,
    NCH: tl.constexpr,
    CH_PAD: tl.constexpr,
    RATIO: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program, fixed order: lane j of channel c sums columns j, j + BLOCK, ... then a tree.
    ch = tl.arange(0, CH_PAD)
    acc = tl.zeros([CH_PAD, BLOCK], dtype=part_ptr.dtype.element_ty)
    for start in range(0, P, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        m = (ch[:, None] < NCH) & (cols[None, :] < P)
        acc += tl.load(part_ptr + ch[:, None] * P + cols[None, :], mask=m, other=0.0)
    sums = tl.sum(acc, axis=1)
    tl.store(out_ptr + ch, sums, mask=ch < NCH)
    if RATIO:
        num = tl.sum(tl.where(ch == 0, sums, 0.0), axis=0)
        den = tl.sum(tl.where(ch == 1, sums, 0.0), axis=0)
        tl.store(out_ptr + NCH, num / den)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and scalar result) dtype for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _n_blocks(n: int) -> int:
    return triton.cdiv(n, CHUNK)


def _partials(nch: int, pieces: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    offsets, total = [], 0
    for p in pieces:
        offsets.append(total)
        total += _n_blocks(p.numel())
    shape = (nch, max(total, 1))
    dtype, device = acc_dtype(pieces[0].dtype), pieces[0].device
    if total == 0:  # every piece is empty: no partial kernel runs and the sums are zero
        return torch.zeros(shape, dtype=dtype, device=device), offsets
    return torch.empty(shape, dtype=dtype, device=device), offsets


def _finalize(part: torch.Tensor, nch: int, ratio: bool) -> torch.Tensor:
    out = torch.empty((nch + int(ratio),), dtype=part.dtype, device=part.device)
    _final_kernel[(1,)](
        part,
        out,
        part.shape[1],
        NCH=nch,
        CH_PAD=triton.next_power_of_2(nch),
        RATIO=ratio,
        BLOCK=FINAL_BLOCK,
    )
    return out


def distance_sums(
    student: Sequence[torch.Tensor], start: Sequence[torch.Tensor], target: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``[num, den, num / den]``: ``num = ||student - target||^2``, ``den = ||start - target||^2``.

    Args:
        student, start, target: matching lists of contiguous 1-D pieces, one dtype.

    Returns:
        ``[3]`` tensor in :func:`acc_dtype` of the inputs.
    """
    part, offsets = _partials(2, student)
    P = part.shape[1]
    fp64 = student[0].dtype == torch.float64
    for s, a, t, off in zip(student, start, target, offsets):
        n = s.numel()
        if n == 0:
            continue
        _dist_partial_kernel[(_n_blocks(n),)](
            s, a, t, part, n, P, off, BLOCK=BLOCK, ITERS=ITERS, FP64=fp64
        )
    return _finalize(part, 2, ratio=True)


def terms(
    start: Sequence[torch.Tensor],
    target: Sequence[torch.Tensor],
    grad_sum: Sequence[torch.Tensor],
    lr: torch.Tensor,
    direction: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One pass: ``[denom, num, dot]`` and the direction pieces ``lr * (target - start + lr * G)``.

    Args:
        start, target, grad_sum: matching lists of contiguous 1-D pieces, one dtype.
        lr: ``[1]`` tensor on the pieces' device.
        direction: optional output pieces (contiguous, like ``grad_sum``); allocated when None.

    Returns:
        ``([3] tensor in acc dtype, direction pieces in grad_sum's dtype)``.
    """
    part, offsets = _partials(3, start)
    P = part.shape[1]
    fp64 = start[0].dtype == torch.float64
    if direction is None:
        direction = [torch.empty_like(g) for g in grad_sum]
    direction = list(direction)
    for a, t, g, d, off in zip(start, target, grad_sum, direction, offsets):
        n = g.numel()
        if n == 0:
            continue
        _terms_partial_kernel[(_n_blocks(n),)](
            a, t, g, lr, d, part, n, P, off, BLOCK=BLOCK, ITERS=ITERS, FP64=fp64
        )
    return _finalize(part, 3, ratio=False), direction
