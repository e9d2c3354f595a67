"""Backward kernels of the soft-target contrastive losses, given the upstream gradient ``g``
``[K]`` and the forward's saved statistics (the launcher: ``kernels/contrastive.py``).

* ``_dz_kernel``: ``dL/dZ`` and ``dL/dS`` elementwise; writes ``dcos = g s dL/dZ``, ``dtarget`` and
  ``dscale``. ``ROWS`` false: grid ``(K,)``; ``ROWS`` true: grid ``(K, B/BR)`` with per-block
  partials of ``dscale`` combined in a fixed order by ``_dscale_final_kernel``.
* ``_dx_kernel``, grid ``(K, B/BM, D/BD)``, once per side: the normaliser's backward
  ``dx_j = r_j (du_j - [||x_j|| >= 1e-12] u_j (u_j . du_j))`` with ``du = dcos @ norm(y)``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from repblend_fast.kernels.contrastive_terms import (
    CWCL,
    KL,
    MASS_EPS_C,
    NORM_EPS_C,
    WBCE,
    elem_grads,
)


@triton.jit
def _dz_rows(
    cos_k,
    tgt_k,
    rst_k,
    cst_k,
    dcos_k,
    dtgt_k,
    g,
    scale,
    w_p,
    w_n,
    B,
    eps,
    r0,
    s_gr,
    s_gc,
    LOSS: tl.constexpr,
    SOFTMAX: tl.constexpr,
    LOG_EPS: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    """Rows ``r0 .. r0 + BR`` of ``dL/dZ`` and ``dL/dS``: writes ``dcos = g s dL/dZ`` and
    ``dtarget = g dL/dS`` and returns the rows' ``sum_l dL/dZ cos`` ``[BR]`` (for ``dscale``)."""
    bf = B * 1.0
    rr = r0 + tl.arange(0, BR)
    mr = rr < B
    r_lse = tl.load(rst_k + rr, mask=mr, other=0.0)
    r_sum = tl.load(rst_k + B + rr, mask=mr, other=0.0)
    r_a = tl.load(rst_k + 2 * B + rr, mask=mr, other=0.0)
    r_lss = tl.load(rst_k + 3 * B + rr, mask=mr, other=0.0)
    ds_acc = tl.zeros([BR], dtype=tl.float32)
    for c0 in range(0, B, BC):
        cc = c0 + tl.arange(0, BC)
        mc = cc < B
        msk = mr[:, None] & mc[None, :]
        cs = tl.load(cos_k + rr[:, None] * B + cc[None, :], mask=msk, other=0.0)
        z = scale * cs
        s = tl.load(tgt_k + rr[:, None] * s_gr + cc[None, :] * s_gc, mask=msk, other=0.0).to(
            tl.float32
        )
        if SOFTMAX:
            c_lse = tl.load(cst_k + cc, mask=mc, other=0.0)
            c_sum = tl.load(cst_k + B + cc, mask=mc, other=0.0)
            c_a = tl.load(cst_k + 2 * B + cc, mask=mc, other=0.0)
            c_lss = tl.load(cst_k + 3 * B + cc, mask=mc, other=0.0)
            p_r = tl.exp(z - r_lse[:, None])
            p_c = tl.exp(z - c_lse[None, :])
            if LOSS == KL:
                c0f = 0.5 / (bf * bf)
                t_r = tl.exp(10.0 * s - r_lss[:, None])
                t_c = tl.exp(10.0 * s - c_lss[None, :])
                dz = c0f * ((p_r - t_r) + (p_c - t_c))
                a_r = (10.0 * s - r_lss[:, None]) - (z - r_lse[:, None]) - r_a[:, None]
                a_c = (10.0 * s - c_lss[None, :]) - (z - c_lse[None, :]) - c_a[None, :]
                dsv = c0f * 10.0 * (t_r * a_r + t_c * a_c)
            elif LOSS == CWCL:
                c0f = -0.5 / bf
                w_r = 1.0 / (r_sum + MASS_EPS_C)
                w_c = 1.0 / (c_sum + MASS_EPS_C)
                dz = c0f * (
                    w_r[:, None] * (s - r_sum[:, None] * p_r)
                    + w_c[None, :] * (s - c_sum[None, :] * p_c)
                )
                dsv = c0f * (
                    w_r[:, None] * ((z - r_lse[:, None]) - (r_a * w_r)[:, None])
                    + w_c[None, :] * ((z - c_lse[None, :]) - (c_a * w_c)[None, :])
                )
            else:
                c0f = -0.5 / bf
                dz = c0f * ((s - r_sum[:, None] * p_r) + (s - c_sum[None, :] * p_c))
                dsv = c0f * ((z - r_lse[:, None]) + (z - c_lse[None, :]))
        else:
            dz, dsv = elem_grads(z, s, eps, LOSS, LOG_EPS)
            if LOSS == WBCE:
                w = tl.where(s > 0.5, w_p, w_n)
            else:
                w = 1.0 / (bf * bf)
            dz = w * dz
            dsv = w * dsv
        dz = tl.where(msk, dz, 0.0)
        ds_acc += tl.sum(dz * cs, 1)
        tl.store(dcos_k + rr[:, None] * B + cc[None, :], g * scale * dz, mask=msk)
        tl.store(
            dtgt_k + rr[:, None] * B + cc[None, :],
            (g * dsv).to(dtgt_k.dtype.element_ty),
            mask=msk,
        )
    return ds_acc


@triton.jit
def _dz_kernel(
    gout_ptr,
    cos_ptr,
    tgt_ptr,
    scale_ptr,
    rst_ptr,
    cst_ptr,
    cnt_ptr,
    dcos_ptr,
    dtgt_ptr,
    dscale_ptr,
    B,
    NB,
    eps,
    s_gk,
    s_gr,
    s_gc,
    LOSS: tl.constexpr,
    SOFTMAX: tl.constexpr,
    LOG_EPS: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    ROWS: tl.constexpr,
):
    """``ROWS`` false: grid ``(K,)``, one program per problem, writes ``dscale`` itself.
    ``ROWS`` true: grid ``(K, NB)``, program ``(k, b)`` handles row block ``b`` and writes its
    partial of ``sum dL/dZ cos`` to ``dscale_ptr[k, b]`` (``[K, NB]``) for
    :func:`_dscale_final_kernel`."""
    k = tl.program_id(0).to(tl.int64)
    g = tl.load(gout_ptr + k).to(tl.float32)
    scale = tl.load(scale_ptr + k).to(tl.float32)
    cos_k = cos_ptr + k * B * B
    tgt_k = tgt_ptr + k * s_gk
    rst_k = rst_ptr + k * 4 * B
    cst_k = cst_ptr + k * 4 * B
    dcos_k = dcos_ptr + k * B * B
    dtgt_k = dtgt_ptr + k * B * B
    w_p = 0.5 / (tl.load(cnt_ptr + k * 2) + MASS_EPS_C)
    w_n = 0.5 / (tl.load(cnt_ptr + k * 2 + 1) + MASS_EPS_C)
    if ROWS:
        pb = tl.program_id(1)
        ds = _dz_rows(
            cos_k, tgt_k, rst_k, cst_k, dcos_k, dtgt_k, g, scale, w_p, w_n, B, eps, pb * BR,
            s_gr, s_gc, LOSS, SOFTMAX, LOG_EPS, BR, BC,
        )  # fmt: skip
        tl.store(dscale_ptr + k * NB + pb, tl.sum(ds, 0))
    else:
        ds_acc = tl.zeros([BR], dtype=tl.float32)
        for r0 in range(0, B, BR):
            ds_acc += _dz_rows(
                cos_k, tgt_k, rst_k, cst_k, dcos_k, dtgt_k, g, scale, w_p, w_n, B, eps, r0,
                s_gr, s_gc, LOSS, SOFTMAX, LOG_EPS, BR, BC,
            )  # fmt: skip
        tl.store(dscale_ptr + k, g * tl.sum(ds_acc, 0))


@triton.jit
def _dscale_final_kernel(gout_ptr, part_ptr, dscale_ptr, NB, FB: tl.constexpr):
    """Grid ``(K,)``: ``dscale[k] = g[k] * sum_b part[k, b]`` in a fixed order."""
    k = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([FB], dtype=tl.float32)
    for b0 in range(0, NB, FB):
        rb = b0 + tl.arange(0, FB)
        acc += tl.load(part_ptr + k * NB + rb, mask=rb < NB, other=0.0)
    g = tl.load(gout_ptr + k).to(tl.float32)
    tl.store(dscale_ptr + k, g * tl.sum(acc, 0))


@triton.jit
def _dx_kernel(
    dcos_ptr,
    cos_ptr,
    x_ptr,
    nx_ptr,
    y_ptr,
    ny_ptr,
    dx_ptr,
    B,
    D,
    c_sr,
    c_sc,
    s_xk,
    s_xb,
    s_xd,
    s_yk,
    s_yb,
    s_yd,
    BM: tl.constexpr,
    BL: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rd = tl.program_id(2) * BD + tl.arange(0, BD)
    mm = rm < B
    md = rd < D
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    proj = tl.zeros([BM], dtype=tl.float32)
    for l0 in range(0, B, BL):
        rl = l0 + tl.arange(0, BL)
        ml = rl < B
        msk = mm[:, None] & ml[None, :]
        off = k * B * B + rm[:, None] * c_sr + rl[None, :] * c_sc
        dc = tl.load(dcos_ptr + off, mask=msk, other=0.0)
        cs = tl.load(cos_ptr + off, mask=msk, other=0.0)
        proj += tl.sum(dc * cs, 1)
        ny = tl.load(ny_ptr + k * B + rl, mask=ml, other=1.0)
        y = tl.load(
            y_ptr + k * s_yk + rl[:, None] * s_yb + rd[None, :] * s_yd,
            mask=ml[:, None] & md[None, :],
            other=0.0,
        ).to(tl.float32)
        y = y * (1.0 / tl.maximum(ny, NORM_EPS_C))[:, None]
        acc += tl.dot(dc, y, input_precision=PREC)
    nx = tl.load(nx_ptr + k * B + rm, mask=mm, other=1.0)
    rx = 1.0 / tl.maximum(nx, NORM_EPS_C)
    x = tl.load(
        x_ptr + k * s_xk + rm[:, None] * s_xb + rd[None, :] * s_xd,
        mask=mm[:, None] & md[None, :],
        other=0.0,
    ).to(tl.float32)
    u = x * rx[:, None]
    proj = tl.where(nx >= NORM_EPS_C, proj, 0.0)
    dx = rx[:, None] * (acc - u * proj[:, None])
    tl.store(
        dx_ptr + k * B * D + rm[:, None] * D + rd[None, :],
        dx.to(dx_ptr.dtype.element_ty),
        mask=mm[:, None] & md[None, :],
    )
