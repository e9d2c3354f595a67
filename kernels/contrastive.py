"""Triton kernels for the soft-target contrastive losses (docs/algorithm.md §7) and their backward.

Everything works on ``K`` independent problems: ``img``/``txt`` ``[K, B, D]`` (any strides),
``target`` ``[K, B, B]`` (rows = images), ``scale`` ``[K]`` (the logit multiplier ``s``). Loads are
cast to fp32 right after ``tl.load``; all accumulation is fp32.

Forward (:func:`forward`):

1. ``_cos_kernel``, grid ``(K, B/BM, B/BN)``: ``cos = norm(img) @ norm(txt)^T`` tile by tile with a
   loop over ``D`` chunks; also the row norms ``||img_j||`` and ``||txt_k||`` (kept unclamped, the
   clamp at 1e-12 of ``F.normalize`` is applied where they are used).
2. ``_loss_kernel``, grid ``(K,)``: one program per problem sweeps the ``B x B`` logits in tiles.
   Softmax losses (InfoNCE, CWCL, KL) find the row and column log-sum-exps online (flash-style),
   then sweep the row block once more to sum the reference's elementwise terms; the column pass is
   the row pass with the strides swapped. Elementwise losses (WBCE, BCE, MSE) are one pass. It
   stores what the backward needs: per direction and row ``[lse(Z), sum(S), A, lse(10S)]``
   (``A = sum S (Z - lse)`` for InfoNCE/CWCL, the row KL for KL) and the WBCE class counts.
   Row-parallel (``row_parallel=True``: large ``B``, few problems): the same kernel compiled with
   ``ROWS=True``, grid ``(K, B/BR, 2)`` (direction on axis 2; ``(K, B/BR, 1)`` for the elementwise
   losses), does one row block's share of the same work and writes its partial sums to
   ``[K, 4, B/BR]``;
   ``_loss_final_kernel``, grid ``(K,)``, combines them in a fixed order (no atomics, so the result
   is the same bits from run to run).

NaN and infinity propagate as in the reference: the kernels use ``tl.where`` rather than
``tl.minimum`` / ``tl.maximum`` where a NaN operand must survive (those two return the other
operand), build the WBCE class masks as the reference does and multiply by them, and sum the
reference's elementwise terms rather than algebraic rewrites that turn an infinity into NaN.

Backward (:func:`backward`), given the upstream gradient ``g`` ``[K]``:

3. ``_dz_kernel``, grid ``(K,)``: ``dL/dZ`` and ``dL/dS`` elementwise from the saved statistics;
   writes ``dcos = g * s * dL/dZ`` (fp32 scratch), ``dtarget`` and ``dscale = g * sum(dL/dZ cos)``.
   Row-parallel: grid ``(K, B/BR)`` with per-block partials of ``dscale`` combined in a fixed order
   by ``_dscale_final_kernel``.
4. ``_dx_kernel``, grid ``(K, B/BM, D/BD)``, run once per side (the text side reads ``dcos``
   transposed): ``dx_j = r_j (du_j - [||x_j|| >= 1e-12] u_j (u_j . du_j))`` with
   ``du = dcos @ norm(y)``; ``u_j . du_j = sum_l dcos_jl cos_jl`` is a ``B``-length reduction, so
   there is no second pass over ``D``.

The matrix products use ``tl.dot`` with IEEE fp32 unless ``torch.backends.cuda.matmul.allow_tf32``
is set (the same switch that governs the reference's matmul). One configuration per kernel (no
autotuning), so the kernels also run under ``TRITON_INTERPRET=1`` on CPU.

Modules: the loss kinds (``tl.constexpr`` flags named after :data:`LOSS_IDS`) and the elementwise
terms are ``contrastive_terms``, the forward kernels ``contrastive_forward``, the backward kernels
``contrastive_backward``; this module holds the launchers.
"""

from __future__ import annotations

import torch
import triton
from repblend_fast.kernels.contrastive_backward import (
    _dscale_final_kernel,
    _dx_kernel,
    _dz_kernel,
)
from repblend_fast.kernels.contrastive_forward import _cos_kernel, _loss_final_kernel, _loss_kernel
from repblend_fast.kernels.contrastive_terms import (
    LOSS_IDS,
    MASS_EPS,
    NORM_EPS,
    SOFTMAX_LOSSES,
)

NSTAT = 4
FINAL_BLOCK = 64
"""Lanes of the fixed-order combine of the row-parallel partials."""

__all__ = ["LOSS_IDS", "MASS_EPS", "NORM_EPS", "backward", "forward"]


def _block(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _precision() -> str:
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _loss_consts(loss: str, eps: float, bm: int, rows: bool) -> dict:
    """The compile-time flags of the loss and ``dL/dZ`` kernels."""
    return dict(
        LOSS=LOSS_IDS[loss], SOFTMAX=loss in SOFTMAX_LOSSES, LOG_EPS=eps > 0, BR=bm, BC=bm,
        ROWS=rows,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# launchers


def forward(
    img: torch.Tensor,
    txt: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor,
    loss: str,
    eps: float,
    *,
    row_parallel: bool = False,
):
    """Loss and saved statistics.

    Args:
        img, txt: ``[K, B, D]`` (fp32/bf16/fp16, any strides), not normalised.
        target: ``[K, B, B]``, same dtype.
        scale: ``[K]`` logit multipliers.
        row_parallel: split each problem into row blocks (grid ``K x B/64 x 2`` plus a combine
            launch) instead of one program per problem; ``repblend_fast.ops.contrastive`` decides
            (``row_parallel(K, B)``).
    Returns:
        ``(loss [K] fp32, cos [K, B, B] fp32, n_img [K, B], n_txt [K, B], row_stats [K, 4, B],
        col_stats [K, 4, B], counts [K, 2])``, all fp32 and contiguous.
    """
    K, B, D = img.shape
    dev = img.device
    f32 = torch.float32
    scale = scale.to(f32).contiguous()
    cos = torch.empty((K, B, B), dtype=f32, device=dev)
    n_i = torch.empty((K, B), dtype=f32, device=dev)
    n_t = torch.empty((K, B), dtype=f32, device=dev)
    out = torch.empty((K,), dtype=f32, device=dev)
    rst = torch.empty((K, NSTAT, B), dtype=f32, device=dev)
    cst = torch.empty((K, NSTAT, B), dtype=f32, device=dev)
    cnt = torch.empty((K, 2), dtype=f32, device=dev)
    bm = _block(B)
    bd = _block(D, 16, 64)
    grid = (K, triton.cdiv(B, bm), triton.cdiv(B, bm))
    _cos_kernel[grid](
        img,
        txt,
        cos,
        n_i,
        n_t,
        B,
        D,
        *img.stride(),
        *txt.stride(),
        BM=bm,
        BN=bm,
        BD=bd,
        PREC=_precision(),
    )
    consts = _loss_consts(loss, eps, bm, row_parallel)
    nb = triton.cdiv(B, bm)
    args = (cos, target, scale)
    if not row_parallel:
        _loss_kernel[(K,)](*args, out, rst, cst, cnt, B, nb, float(eps), *target.stride(), **consts)
        return out, cos, n_i, n_t, rst, cst, cnt
    # Every partial slot a loss reads is written by exactly one program.
    part = torch.empty((K, 4, nb), dtype=f32, device=dev)
    ndir = 2 if consts["SOFTMAX"] else 1
    _loss_kernel[(K, nb, ndir)](
        *args, part, rst, cst, cnt, B, nb, float(eps), *target.stride(), **consts
    )
    _loss_final_kernel[(K,)](
        part, out, cnt, B, nb, LOSS=consts["LOSS"], SOFTMAX=consts["SOFTMAX"], FB=FINAL_BLOCK
    )
    return out, cos, n_i, n_t, rst, cst, cnt


def backward(
    gout: torch.Tensor,
    img: torch.Tensor,
    txt: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor,
    cos: torch.Tensor,
    n_i: torch.Tensor,
    n_t: torch.Tensor,
    rst: torch.Tensor,
    cst: torch.Tensor,
    cnt: torch.Tensor,
    loss: str,
    eps: float,
    *,
    row_parallel: bool = False,
):
    """First-order gradients for upstream ``gout`` ``[K]`` (``row_parallel`` as in
    :func:`forward`).

    Returns ``(d_img [K, B, D] img.dtype, d_txt [K, B, D] txt.dtype, d_target [K, B, B]
    target.dtype, d_scale [K] fp32)``.
    """
    K, B, D = img.shape
    dev = img.device
    f32 = torch.float32
    gout = gout.to(f32).contiguous()
    scale = scale.to(f32).contiguous()
    dcos = torch.empty((K, B, B), dtype=f32, device=dev)
    dtgt = torch.empty((K, B, B), dtype=target.dtype, device=dev)
    dscale = torch.empty((K,), dtype=f32, device=dev)
    d_img = torch.empty((K, B, D), dtype=img.dtype, device=dev)
    d_txt = torch.empty((K, B, D), dtype=txt.dtype, device=dev)
    bm = _block(B)
    bd = _block(D, 16, 64)
    nb = triton.cdiv(B, bm)
    consts = _loss_consts(loss, eps, bm, row_parallel)
    args = (cos, target, scale, rst, cst, cnt, dcos, dtgt)
    if row_parallel:
        part = torch.empty((K, nb), dtype=f32, device=dev)
        _dz_kernel[(K, nb)](gout, *args, part, B, nb, float(eps), *target.stride(), **consts)
        _dscale_final_kernel[(K,)](gout, part, dscale, nb, FB=FINAL_BLOCK)
    else:
        _dz_kernel[(K,)](gout, *args, dscale, B, nb, float(eps), *target.stride(), **consts)
    grid = (K, triton.cdiv(B, bm), triton.cdiv(D, bd))
    blocks = dict(BM=bm, BL=bm, BD=bd, PREC=_precision())
    # The text side reads dcos transposed (strides (1, B) instead of (B, 1)).
    _dx_kernel[grid](
        dcos, cos, img, n_i, txt, n_t, d_img, B, D, B, 1, *img.stride(), *txt.stride(), **blocks
    )
    _dx_kernel[grid](
        dcos, cos, txt, n_t, img, n_i, d_txt, B, D, 1, B, *txt.stride(), *img.stride(), **blocks
    )
    return d_img, d_txt, dtgt, dscale
