"""Forward kernels of the soft-target contrastive losses: cosines, then the loss and the
statistics the backward reads (the launcher and the data layout: ``kernels/contrastive.py``).

* ``_cos_kernel``, grid ``(K, B/BM, B/BN)``: ``cos = norm(img) @ norm(txt)^T`` and the row norms.
* ``_loss_kernel``: the loss of each problem. ``ROWS`` false: grid ``(K,)``, one program sweeps a
  whole problem. ``ROWS`` true (row-parallel): grid ``(K, B/BR, 2)`` (softmax losses; axis 2 is
  the direction) or ``(K, B/BR, 1)``, one program per row block, partial sums to ``[K, 4, B/BR]``,
  which ``_loss_final_kernel``, grid ``(K,)``, combines in a fixed order. Both grids run the same
  per-row-block helpers (``_softmax_rows``, ``_elem_rows``) on the same tiles.
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
    elem_loss,
    loss_value,
)


@triton.jit
def _cos_kernel(
    img_ptr,
    txt_ptr,
    cos_ptr,
    ni_ptr,
    nt_ptr,
    B,
    D,
    s_ik,
    s_ib,
    s_id,
    s_tk,
    s_tb,
    s_td,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    pm = tl.program_id(1)
    pn = tl.program_id(2)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    mm = rm < B
    mn = rn < B
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    ssa = tl.zeros([BM], dtype=tl.float32)
    ssb = tl.zeros([BN], dtype=tl.float32)
    for d0 in range(0, D, BD):
        rd = d0 + tl.arange(0, BD)
        md = rd < D
        a = tl.load(
            img_ptr + k * s_ik + rm[:, None] * s_ib + rd[None, :] * s_id,
            mask=mm[:, None] & md[None, :],
            other=0.0,
        ).to(tl.float32)
        b = tl.load(
            txt_ptr + k * s_tk + rn[:, None] * s_tb + rd[None, :] * s_td,
            mask=mn[:, None] & md[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(a, tl.trans(b), input_precision=PREC)
        ssa += tl.sum(a * a, 1)
        ssb += tl.sum(b * b, 1)
    na = tl.sqrt(ssa)
    nb = tl.sqrt(ssb)
    ra = 1.0 / tl.maximum(na, NORM_EPS_C)
    rb = 1.0 / tl.maximum(nb, NORM_EPS_C)
    cos = acc * ra[:, None] * rb[None, :]
    tl.store(
        cos_ptr + k * B * B + rm[:, None] * B + rn[None, :], cos, mask=mm[:, None] & mn[None, :]
    )
    if pn == 0:
        tl.store(ni_ptr + k * B + rm, na, mask=mm)
    if pm == 0:
        tl.store(nt_ptr + k * B + rn, nb, mask=mn)


@triton.jit
def _softmax_rows(
    cos_ptr,
    tgt_ptr,
    st_ptr,
    scale,
    B,
    r0,
    c_sr,
    c_sc,
    t_sr,
    t_sc,
    LOSS: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    """Statistics of rows ``r0 .. r0 + BR`` of one direction (columns: call with swapped strides);
    returns the rows' loss terms ``[BR]`` (InfoNCE/CWCL: the un-negated, un-scaled sums; KL: the row
    KLs; 0 outside the matrix).

    Two sweeps over the row block: the first finds ``lse(Z)`` (and ``lse(10 S)`` for KL) online,
    the second sums the reference's own elementwise terms, ``A = sum S (Z - lse)`` (InfoNCE/CWCL)
    or ``sum p (log p - log q)`` with ``p = softmax(10 S)``, ``log q = Z - lse`` (KL). The one-pass
    rewrites (``sum S Z - lse sum S``, ``E_p[10 S - Z] - lse(10 S) + lse``) are the same numbers
    for moderate inputs, but turn an infinite target into ``inf - inf = NaN`` where the reference
    gives the infinity, and cancel catastrophically for large targets.
    """
    rr = r0 + tl.arange(0, BR)
    mr = rr < B
    m = tl.full([BR], float("-inf"), tl.float32)
    lz = tl.zeros([BR], dtype=tl.float32)
    ssum = tl.zeros([BR], dtype=tl.float32)
    ms = tl.full([BR], float("-inf"), tl.float32)
    ls = tl.zeros([BR], dtype=tl.float32)
    for c0 in range(0, B, BC):
        cc = c0 + tl.arange(0, BC)
        mc = cc < B
        msk = mr[:, None] & mc[None, :]
        z = scale * tl.load(cos_ptr + rr[:, None] * c_sr + cc[None, :] * c_sc, mask=msk, other=0.0)
        s = tl.load(tgt_ptr + rr[:, None] * t_sr + cc[None, :] * t_sc, mask=msk, other=0.0).to(
            tl.float32
        )
        zm = tl.where(mc[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, 1))
        lz = lz * tl.exp(m - m_new) + tl.sum(tl.exp(zm - m_new[:, None]), 1)
        m = m_new
        ssum += tl.sum(s, 1)
        if LOSS == KL:
            x = tl.where(mc[None, :], 10.0 * s, float("-inf"))
            ms_new = tl.maximum(ms, tl.max(x, 1))
            ls = ls * tl.exp(ms - ms_new) + tl.sum(tl.exp(x - ms_new[:, None]), 1)
            ms = ms_new
    lse = m + tl.log(lz)
    if LOSS == KL:
        lse_s = ms + tl.log(ls)
    else:
        lse_s = tl.zeros([BR], dtype=tl.float32)
    a_term = tl.zeros([BR], dtype=tl.float32)
    mass = tl.zeros([BR], dtype=tl.float32)
    for c0 in range(0, B, BC):
        cc = c0 + tl.arange(0, BC)
        msk = mr[:, None] & (cc < B)[None, :]
        z = scale * tl.load(cos_ptr + rr[:, None] * c_sr + cc[None, :] * c_sc, mask=msk, other=0.0)
        s = tl.load(tgt_ptr + rr[:, None] * t_sr + cc[None, :] * t_sc, mask=msk, other=0.0).to(
            tl.float32
        )
        logq = z - lse[:, None]
        if LOSS == KL:
            logp = 10.0 * s - lse_s[:, None]
            term = tl.exp(logp) * (logp - logq)
        else:
            term = s * logq
        a_term += tl.sum(tl.where(msk, term, 0.0), 1)
        if LOSS == CWCL:
            # CWCL's row mass again, summed over the same tiles in the same order as ``ssum``
            # (the same number): Triton 3.6 cannot compile ``ssum`` with two uses (the store
            # and this division); its TritonGPUOptimizeThreadLocality pass asserts that a loop's
            # reduced result has one use, and cwcl then fails to compile for sm_90.
            mass += tl.sum(s, 1)
    if LOSS == CWCL:
        contrib = a_term / (mass + MASS_EPS_C)
    else:
        contrib = a_term
    tl.store(st_ptr + rr, lse, mask=mr)
    tl.store(st_ptr + B + rr, ssum, mask=mr)
    tl.store(st_ptr + 2 * B + rr, a_term, mask=mr)
    tl.store(st_ptr + 3 * B + rr, lse_s, mask=mr)
    return tl.where(mr, contrib, 0.0)


@triton.jit
def _softmax_dir(
    cos_ptr,
    tgt_ptr,
    st_ptr,
    scale,
    B,
    c_sr,
    c_sc,
    t_sr,
    t_sc,
    LOSS: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    """All row blocks of one direction in turn; returns the sum of the loss terms."""
    total = tl.zeros([BR], dtype=tl.float32)
    for r0 in range(0, B, BR):
        total += _softmax_rows(
            cos_ptr, tgt_ptr, st_ptr, scale, B, r0, c_sr, c_sc, t_sr, t_sc, LOSS, BR, BC
        )
    return tl.sum(total, 0)


@triton.jit
def _elem_rows(
    cos_k,
    tgt_k,
    rst_k,
    cst_k,
    scale,
    B,
    eps,
    r0,
    s_gr,
    s_gc,
    LOSS: tl.constexpr,
    LOG_EPS: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    """Rows ``r0 .. r0 + BR`` of an elementwise loss: per-row ``(positive-class sum, negative-class
    sum, positive count, negative count)`` ``[BR]`` each (BCE/MSE: everything in the first sum);
    zeroes the rows' (unused) softmax statistics."""
    rr = r0 + tl.arange(0, BR)
    mr = rr < B
    acc_p = tl.zeros([BR], dtype=tl.float32)
    acc_n = tl.zeros([BR], dtype=tl.float32)
    cnt_p = tl.zeros([BR], dtype=tl.float32)
    cnt_n = tl.zeros([BR], dtype=tl.float32)
    for c0 in range(0, B, BC):
        cc = c0 + tl.arange(0, BC)
        msk = mr[:, None] & (cc < B)[None, :]
        z = scale * tl.load(cos_k + rr[:, None] * B + cc[None, :], mask=msk, other=0.0)
        s = tl.load(tgt_k + rr[:, None] * s_gr + cc[None, :] * s_gc, mask=msk, other=0.0).to(
            tl.float32
        )
        ell = tl.where(msk, elem_loss(z, s, eps, LOSS, LOG_EPS), 0.0)
        # Class masks as the reference builds them: pos = S > 0.5, neg = 1 - pos (a NaN target is
        # negative). WBCE multiplies by the masks like the reference, so a NaN or infinite loss
        # element poisons both class sums (inf * 0 = NaN) as it does there (ell is already 0
        # outside the tile); BCE/MSE sum every element once. Two selects on one comparison:
        # negf = mask - posf crashes Triton 3.8's sm_90 lowering.
        pos = s > 0.5
        posf = tl.where(pos, 1.0, 0.0)
        negf = tl.where(pos, 0.0, 1.0)
        if LOSS == WBCE:
            acc_p += tl.sum(ell * posf, 1)
            acc_n += tl.sum(ell * negf, 1)
        else:
            acc_p += tl.sum(ell, 1)
        cnt_p += tl.sum(tl.where(msk, posf, 0.0), 1)
        cnt_n += tl.sum(tl.where(msk, negf, 0.0), 1)
    zero = tl.zeros([BR], dtype=tl.float32)
    for j in range(4):
        tl.store(rst_k + j * B + rr, zero, mask=mr)
        tl.store(cst_k + j * B + rr, zero, mask=mr)
    return acc_p, acc_n, cnt_p, cnt_n


@triton.jit
def _loss_problem(
    cos_k, tgt_k, rst_k, cst_k, cnt_k, scale, B, eps, s_gr, s_gc,
    LOSS: tl.constexpr, SOFTMAX: tl.constexpr, LOG_EPS: tl.constexpr, BR: tl.constexpr,
    BC: tl.constexpr,
):  # fmt: skip
    """One whole problem (every row block in turn): its loss; stores its class counts."""
    if SOFTMAX:
        tr = _softmax_dir(cos_k, tgt_k, rst_k, scale, B, B, 1, s_gr, s_gc, LOSS, BR, BC)
        tc = _softmax_dir(cos_k, tgt_k, cst_k, scale, B, 1, B, s_gc, s_gr, LOSS, BR, BC)
        val = loss_value(tr, tc, 0.0, 0.0, 0.0, 0.0, B, LOSS)
        tl.store(cnt_k, 0.0)
        tl.store(cnt_k + 1, 0.0)
    else:
        acc_p = tl.zeros([BR], dtype=tl.float32)
        acc_n = tl.zeros([BR], dtype=tl.float32)
        cnt_p = tl.zeros([BR], dtype=tl.float32)
        cnt_n = tl.zeros([BR], dtype=tl.float32)
        for r0 in range(0, B, BR):
            a_p, a_n, c_p, c_n = _elem_rows(
                cos_k, tgt_k, rst_k, cst_k, scale, B, eps, r0, s_gr, s_gc, LOSS, LOG_EPS, BR, BC
            )
            acc_p += a_p
            acc_n += a_n
            cnt_p += c_p
            cnt_n += c_n
        n_p = tl.sum(cnt_p, 0)
        n_n = tl.sum(cnt_n, 0)
        val = loss_value(0.0, 0.0, tl.sum(acc_p, 0), tl.sum(acc_n, 0), n_p, n_n, B, LOSS)
        tl.store(cnt_k, n_p)
        tl.store(cnt_k + 1, n_n)
    return val


@triton.jit
def _loss_block(
    cos_k, tgt_k, rst_k, cst_k, part_k, scale, B, NB, eps, pb, d, s_gr, s_gc,
    LOSS: tl.constexpr, SOFTMAX: tl.constexpr, LOG_EPS: tl.constexpr, BR: tl.constexpr,
    BC: tl.constexpr,
):  # fmt: skip
    """Row block ``pb`` of direction ``d`` (softmax losses) or of the elementwise sweep: writes
    its partial sums to ``part_k[:, pb]`` (``[4, NB]``)."""
    r0 = pb * BR
    if SOFTMAX:
        if d == 0:
            c = _softmax_rows(cos_k, tgt_k, rst_k, scale, B, r0, B, 1, s_gr, s_gc, LOSS, BR, BC)
        else:
            c = _softmax_rows(cos_k, tgt_k, cst_k, scale, B, r0, 1, B, s_gc, s_gr, LOSS, BR, BC)
        tl.store(part_k + d * NB + pb, tl.sum(c, 0))
    else:
        a_p, a_n, c_p, c_n = _elem_rows(
            cos_k, tgt_k, rst_k, cst_k, scale, B, eps, r0, s_gr, s_gc, LOSS, LOG_EPS, BR, BC
        )
        tl.store(part_k + pb, tl.sum(a_p, 0))
        tl.store(part_k + NB + pb, tl.sum(a_n, 0))
        tl.store(part_k + 2 * NB + pb, tl.sum(c_p, 0))
        tl.store(part_k + 3 * NB + pb, tl.sum(c_n, 0))


@triton.jit
def _loss_kernel(
    cos_ptr,
    tgt_ptr,
    scale_ptr,
    out_ptr,
    rst_ptr,
    cst_ptr,
    cnt_ptr,
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
    """``ROWS`` false: grid ``(K,)``, one program sweeps a whole problem and writes the loss to
    ``out[k]`` (``[K]``) and the class counts to ``cnt[k]``.

    ``ROWS`` true (row-parallel): grid ``(K, NB, 2)`` (softmax losses; axis 2 is the direction) or
    ``(K, NB, 1)`` (elementwise losses): program ``(k, b, d)`` handles row block ``b`` of direction
    ``d`` and writes its partial sums to ``out[k, :, b]`` (``[K, 4, NB]``); the loss is
    :func:`_loss_final_kernel`'s fixed-order combine of them (``cnt`` is its to write)."""
    k = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr + k).to(tl.float32)
    cos_k = cos_ptr + k * B * B
    tgt_k = tgt_ptr + k * s_gk
    rst_k = rst_ptr + k * 4 * B
    cst_k = cst_ptr + k * 4 * B
    if ROWS:
        _loss_block(
            cos_k, tgt_k, rst_k, cst_k, out_ptr + k * 4 * NB, scale, B, NB, eps,
            tl.program_id(1), tl.program_id(2), s_gr, s_gc, LOSS, SOFTMAX, LOG_EPS, BR, BC,
        )  # fmt: skip
    else:
        val = _loss_problem(
            cos_k, tgt_k, rst_k, cst_k, cnt_ptr + k * 2, scale, B, eps, s_gr, s_gc,
            LOSS, SOFTMAX, LOG_EPS, BR, BC,
        )  # fmt: skip
        tl.store(out_ptr + k, val)


@triton.jit
def _loss_final_kernel(
    part_ptr,
    loss_ptr,
    cnt_ptr,
    B,
    NB,
    LOSS: tl.constexpr,
    SOFTMAX: tl.constexpr,
    FB: tl.constexpr,
):
    """Grid ``(K,)``: the fixed-order combine of :func:`_loss_kernel`'s row-parallel partials
    (lane ``j`` sums blocks ``j, j + FB, ...``, then one tree sum), then the loss and the class
    counts."""
    k = tl.program_id(0).to(tl.int64)
    part_k = part_ptr + k * 4 * NB
    a0 = tl.zeros([FB], dtype=tl.float32)
    a1 = tl.zeros([FB], dtype=tl.float32)
    a2 = tl.zeros([FB], dtype=tl.float32)
    a3 = tl.zeros([FB], dtype=tl.float32)
    for b0 in range(0, NB, FB):
        rb = b0 + tl.arange(0, FB)
        mb = rb < NB
        a0 += tl.load(part_k + rb, mask=mb, other=0.0)
        a1 += tl.load(part_k + NB + rb, mask=mb, other=0.0)
        if not SOFTMAX:
            a2 += tl.load(part_k + 2 * NB + rb, mask=mb, other=0.0)
            a3 += tl.load(part_k + 3 * NB + rb, mask=mb, other=0.0)
    s0 = tl.sum(a0, 0)
    s1 = tl.sum(a1, 0)
    if SOFTMAX:
        val = loss_value(s0, s1, 0.0, 0.0, 0.0, 0.0, B, LOSS)
        tl.store(cnt_ptr + k * 2, 0.0)
        tl.store(cnt_ptr + k * 2 + 1, 0.0)
    else:
        n_p = tl.sum(a2, 0)
        n_n = tl.sum(a3, 0)
        val = loss_value(0.0, 0.0, s0, s1, n_p, n_n, B, LOSS)
        tl.store(cnt_ptr + k * 2, n_p)
        tl.store(cnt_ptr + k * 2 + 1, n_n)
    tl.store(loss_ptr + k, val)
