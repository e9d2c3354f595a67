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
   Row-parallel variant (``row_parallel=True``: large ``B``, few problems): ``_loss_rows_kernel``,
   grid ``(K, B/BR, 2)`` (direction on axis 2; ``(K, B/BR, 1)`` for the elementwise losses), does
   one row block's share of the same work and writes its partial sums to ``[K, 4, B/BR]``;
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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from repblend_fast.reference.contrastive import LOSS_IDS, MASS_EPS, NORM_EPS

NSTAT = 4
FINAL_BLOCK = 64
"""Lanes of the fixed-order combine of the row-parallel partials."""
_SOFTMAX = ("infonce", "cwcl", "kl")
# The formula's constants as compile-time constants of the jit functions (a jit function reads only
# globals that are ``tl.constexpr``); same values, one definition in the reference.
_MASS_EPS = tl.constexpr(MASS_EPS)
_NORM_EPS = tl.constexpr(NORM_EPS)

__all__ = ["LOSS_IDS", "MASS_EPS", "NORM_EPS", "backward", "forward"]


def _block(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _precision() -> str:
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


# --------------------------------------------------------------------------------------------------
# elementwise helpers


@triton.jit
def _sigmoid(z):
    # torch's formula 1 / (1 + exp(-z)), including its flush to exactly 0 where exp(-z) overflows
    # fp32 (z < -88.72): BCE takes logs of these rounded probabilities, so the kernels must round
    # like the reference. The clamp only avoids an overflow warning, not a different value; it is a
    # where, not tl.minimum, because tl.minimum drops a NaN (sigmoid(NaN) must be NaN).
    t = -z
    return tl.where(t > 88.72283, 0.0, 1.0 / (1.0 + tl.exp(tl.where(t > 88.72283, 88.72283, t))))


@triton.jit
def _logsigmoid(z):
    # min(z, 0) as a where: tl.minimum would turn a NaN into 0.
    return tl.where(z > 0.0, 0.0, z) - tl.log(1.0 + tl.exp(-tl.abs(z)))


@triton.jit
def _bce_logs(p):
    # F.binary_cross_entropy semantics: logs of the rounded probabilities, clamped at -100.
    q = 1.0 - p
    logp = tl.maximum(tl.where(p > 0, tl.log(tl.where(p > 0, p, 1.0)), -100.0), -100.0)
    logq = tl.maximum(tl.where(q > 0, tl.log(tl.where(q > 0, q, 1.0)), -100.0), -100.0)
    return q, logp, logq


@triton.jit
def _elem_loss(z, s, eps, LOSS: tl.constexpr, LOG_EPS: tl.constexpr):
    p = _sigmoid(z)
    if LOSS == 0:
        if LOG_EPS:
            ell = -s * tl.log(p + eps) - (1.0 - s) * tl.log(1.0 - p + eps)
        else:
            ell = -s * _logsigmoid(z) - (1.0 - s) * _logsigmoid(-z)
    elif LOSS == 3:
        q, logp, logq = _bce_logs(p)
        ell = -(s * logp + (1.0 - s) * logq)
    else:
        ell = (p - s) * (p - s)
    return ell


@triton.jit
def _elem_grads(z, s, eps, LOSS: tl.constexpr, LOG_EPS: tl.constexpr):
    """(d ell / dz, d ell / ds) of the elementwise losses, unweighted."""
    p = _sigmoid(z)
    if LOSS == 0:
        if LOG_EPS:
            dz = p * (1.0 - p) * (-s / (p + eps) + (1.0 - s) / (1.0 - p + eps))
            ds = -tl.log(p + eps) + tl.log(1.0 - p + eps)
        else:
            dz = p - s
            ds = -z
    elif LOSS == 3:
        q, logp, logq = _bce_logs(p)
        mp = (p > 0) & (tl.log(tl.where(p > 0, p, 1.0)) >= -100.0)
        mq = (q > 0) & (tl.log(tl.where(q > 0, q, 1.0)) >= -100.0)
        dz = -s * tl.where(mp, 1.0 - p, 0.0) + (1.0 - s) * tl.where(mq, p, 0.0)
        # The masks zero a NaN probability's terms; the reference's sigmoid backward still
        # multiplies by p (1 - p) = NaN there.
        dz = tl.where(p != p, p, dz)
        ds = logq - logp
    else:
        dz = 2.0 * (p - s) * p * (1.0 - p)
        ds = -2.0 * (p - s)
    return dz, ds


# --------------------------------------------------------------------------------------------------
# forward


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
    ra = 1.0 / tl.maximum(na, _NORM_EPS)
    rb = 1.0 / tl.maximum(nb, _NORM_EPS)
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
        if LOSS == 5:
            x = tl.where(mc[None, :], 10.0 * s, float("-inf"))
            ms_new = tl.maximum(ms, tl.max(x, 1))
            ls = ls * tl.exp(ms - ms_new) + tl.sum(tl.exp(x - ms_new[:, None]), 1)
            ms = ms_new
    lse = m + tl.log(lz)
    if LOSS == 5:
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
        if LOSS == 5:
            logp = 10.0 * s - lse_s[:, None]
            term = tl.exp(logp) * (logp - logq)
        else:
            term = s * logq
        a_term += tl.sum(tl.where(msk, term, 0.0), 1)
        if LOSS == 2:
            # CWCL's row mass again, summed over the same tiles in the same order as ``ssum``
            # (the same number): Triton 3.6 cannot compile ``ssum`` with two uses (the store
            # and this division); its TritonGPUOptimizeThreadLocality pass asserts that a loop's
            # reduced result has one use, and cwcl then fails to compile for sm_90.
            mass += tl.sum(s, 1)
    if LOSS == 2:
        contrib = a_term / (mass + _MASS_EPS)
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
        ell = tl.where(msk, _elem_loss(z, s, eps, LOSS, LOG_EPS), 0.0)
        # Class masks as the reference builds them: pos = S > 0.5, neg = 1 - pos (a NaN target is
        # negative). WBCE multiplies by the masks like the reference, so a NaN or infinite loss
        # element poisons both class sums (inf * 0 = NaN) as it does there (ell is already 0
        # outside the tile); BCE/MSE sum every element once. Two selects on one comparison:
        # negf = mask - posf crashes Triton 3.8's sm_90 lowering.
        pos = s > 0.5
        posf = tl.where(pos, 1.0, 0.0)
        negf = tl.where(pos, 0.0, 1.0)
        if LOSS == 0:
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
def _loss_value(tr, tc, sp, sn, n_p, n_n, B, LOSS: tl.constexpr):
    """The loss of one problem from its summed row/column terms (softmax losses) or class sums."""
    bf = B * 1.0
    if LOSS == 5:
        val = 0.5 * (tr + tc) / (bf * bf)
    elif (LOSS == 1) or (LOSS == 2):
        val = -0.5 * (tr + tc) / bf
    elif LOSS == 0:
        val = 0.5 * (sp / (n_p + _MASS_EPS) + sn / (n_n + _MASS_EPS))
    else:
        val = (sp + sn) / (bf * bf)
    return val


@triton.jit
def _loss_kernel(
    cos_ptr,
    tgt_ptr,
    scale_ptr,
    loss_ptr,
    rst_ptr,
    cst_ptr,
    cnt_ptr,
    B,
    eps,
    s_gk,
    s_gr,
    s_gc,
    LOSS: tl.constexpr,
    LOG_EPS: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    """Grid ``(K,)``: one program sweeps a whole problem."""
    k = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr + k).to(tl.float32)
    cos_k = cos_ptr + k * B * B
    tgt_k = tgt_ptr + k * s_gk
    rst_k = rst_ptr + k * 4 * B
    cst_k = cst_ptr + k * 4 * B
    if (LOSS == 1) or (LOSS == 2) or (LOSS == 5):
        tr = _softmax_dir(cos_k, tgt_k, rst_k, scale, B, B, 1, s_gr, s_gc, LOSS, BR, BC)
        tc = _softmax_dir(cos_k, tgt_k, cst_k, scale, B, 1, B, s_gc, s_gr, LOSS, BR, BC)
        val = _loss_value(tr, tc, 0.0, 0.0, 0.0, 0.0, B, LOSS)
        tl.store(cnt_ptr + k * 2, 0.0)
        tl.store(cnt_ptr + k * 2 + 1, 0.0)
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
        val = _loss_value(0.0, 0.0, tl.sum(acc_p, 0), tl.sum(acc_n, 0), n_p, n_n, B, LOSS)
        tl.store(cnt_ptr + k * 2, n_p)
        tl.store(cnt_ptr + k * 2 + 1, n_n)
    tl.store(loss_ptr + k, val)


@triton.jit
def _loss_rows_kernel(
    cos_ptr,
    tgt_ptr,
    scale_ptr,
    part_ptr,
    rst_ptr,
    cst_ptr,
    B,
    NB,
    eps,
    s_gk,
    s_gr,
    s_gc,
    LOSS: tl.constexpr,
    LOG_EPS: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    """Row-parallel forward, grid ``(K, NB, 2)`` (softmax losses; axis 2 is the direction) or
    ``(K, NB, 1)`` (elementwise losses): program ``(k, b, d)`` handles row block ``b`` of direction
    ``d`` and writes its partial sums to ``part[k, :, b]`` (``[K, 4, NB]``); the loss is
    :func:`_loss_final_kernel`'s fixed-order combine of them."""
    k = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1)
    d = tl.program_id(2)
    r0 = pb * BR
    scale = tl.load(scale_ptr + k).to(tl.float32)
    cos_k = cos_ptr + k * B * B
    tgt_k = tgt_ptr + k * s_gk
    rst_k = rst_ptr + k * 4 * B
    cst_k = cst_ptr + k * 4 * B
    part_k = part_ptr + k * 4 * NB
    if (LOSS == 1) or (LOSS == 2) or (LOSS == 5):
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
def _loss_final_kernel(
    part_ptr,
    loss_ptr,
    cnt_ptr,
    B,
    NB,
    LOSS: tl.constexpr,
    FB: tl.constexpr,
):
    """Grid ``(K,)``: the fixed-order combine of :func:`_loss_rows_kernel`'s partials (lane ``j``
    sums blocks ``j, j + FB, ...``, then one tree sum), then the loss and the class counts."""
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
        if (LOSS == 0) or (LOSS == 3) or (LOSS == 4):
            a2 += tl.load(part_k + 2 * NB + rb, mask=mb, other=0.0)
            a3 += tl.load(part_k + 3 * NB + rb, mask=mb, other=0.0)
    s0 = tl.sum(a0, 0)
    s1 = tl.sum(a1, 0)
    if (LOSS == 1) or (LOSS == 2) or (LOSS == 5):
        val = _loss_value(s0, s1, 0.0, 0.0, 0.0, 0.0, B, LOSS)
        tl.store(cnt_ptr + k * 2, 0.0)
        tl.store(cnt_ptr + k * 2 + 1, 0.0)
    else:
        n_p = tl.sum(a2, 0)
        n_n = tl.sum(a3, 0)
        val = _loss_value(0.0, 0.0, s0, s1, n_p, n_n, B, LOSS)
        tl.store(cnt_ptr + k * 2, n_p)
        tl.store(cnt_ptr + k * 2 + 1, n_n)
    tl.store(loss_ptr + k, val)


# --------------------------------------------------------------------------------------------------
# backward


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
        if (LOSS == 1) or (LOSS == 2) or (LOSS == 5):
            c_lse = tl.load(cst_k + cc, mask=mc, other=0.0)
            c_sum = tl.load(cst_k + B + cc, mask=mc, other=0.0)
            c_a = tl.load(cst_k + 2 * B + cc, mask=mc, other=0.0)
            c_lss = tl.load(cst_k + 3 * B + cc, mask=mc, other=0.0)
            p_r = tl.exp(z - r_lse[:, None])
            p_c = tl.exp(z - c_lse[None, :])
            if LOSS == 5:
                c0f = 0.5 / (bf * bf)
                t_r = tl.exp(10.0 * s - r_lss[:, None])
                t_c = tl.exp(10.0 * s - c_lss[None, :])
                dz = c0f * ((p_r - t_r) + (p_c - t_c))
                a_r = (10.0 * s - r_lss[:, None]) - (z - r_lse[:, None]) - r_a[:, None]
                a_c = (10.0 * s - c_lss[None, :]) - (z - c_lse[None, :]) - c_a[None, :]
                dsv = c0f * 10.0 * (t_r * a_r + t_c * a_c)
            elif LOSS == 2:
                c0f = -0.5 / bf
                w_r = 1.0 / (r_sum + _MASS_EPS)
                w_c = 1.0 / (c_sum + _MASS_EPS)
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
            dz, dsv = _elem_grads(z, s, eps, LOSS, LOG_EPS)
            if LOSS == 0:
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
    w_p = 0.5 / (tl.load(cnt_ptr + k * 2) + _MASS_EPS)
    w_n = 0.5 / (tl.load(cnt_ptr + k * 2 + 1) + _MASS_EPS)
    if ROWS:
        pb = tl.program_id(1)
        ds = _dz_rows(
            cos_k, tgt_k, rst_k, cst_k, dcos_k, dtgt_k, g, scale, w_p, w_n, B, eps, pb * BR,
            s_gr, s_gc, LOSS, LOG_EPS, BR, BC,
        )  # fmt: skip
        tl.store(dscale_ptr + k * NB + pb, tl.sum(ds, 0))
    else:
        ds_acc = tl.zeros([BR], dtype=tl.float32)
        for r0 in range(0, B, BR):
            ds_acc += _dz_rows(
                cos_k, tgt_k, rst_k, cst_k, dcos_k, dtgt_k, g, scale, w_p, w_n, B, eps, r0,
                s_gr, s_gc, LOSS, LOG_EPS, BR, BC,
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
        y = y * (1.0 / tl.maximum(ny, _NORM_EPS))[:, None]
        acc += tl.dot(dc, y, input_precision=PREC)
    nx = tl.load(nx_ptr + k * B + rm, mask=mm, other=1.0)
    rx = 1.0 / tl.maximum(nx, _NORM_EPS)
    x = tl.load(
        x_ptr + k * s_xk + rm[:, None] * s_xb + rd[None, :] * s_xd,
        mask=mm[:, None] & md[None, :],
        other=0.0,
    ).to(tl.float32)
    u = x * rx[:, None]
    proj = tl.where(nx >= _NORM_EPS, proj, 0.0)
    dx = rx[:, None] * (acc - u * proj[:, None])
    tl.store(
        dx_ptr + k * B * D + rm[:, None] * D + rd[None, :],
        dx.to(dx_ptr.dtype.element_ty),
        mask=mm[:, None] & md[None, :],
    )


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
    consts = dict(LOSS=LOSS_IDS[loss], LOG_EPS=eps > 0, BR=bm, BC=bm)
    if not row_parallel:
        _loss_kernel[(K,)](
            cos, target, scale, out, rst, cst, cnt, B, float(eps), *target.stride(), **consts
        )
        return out, cos, n_i, n_t, rst, cst, cnt
    nb = triton.cdiv(B, bm)
    # Every partial slot a loss reads is written by exactly one program.
    part = torch.empty((K, 4, nb), dtype=f32, device=dev)
    ndir = 2 if loss in _SOFTMAX else 1
    _loss_rows_kernel[(K, nb, ndir)](
        cos, target, scale, part, rst, cst, B, nb, float(eps), *target.stride(), **consts
    )
    _loss_final_kernel[(K,)](part, out, cnt, B, nb, LOSS=LOSS_IDS[loss], FB=FINAL_BLOCK)
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
    consts = dict(LOSS=LOSS_IDS[loss], LOG_EPS=eps > 0, BR=bm, BC=bm, ROWS=row_parallel)
    args = (cos, target, scale, rst, cst, cnt, dcos, dtgt)
    if row_parallel:
        part = torch.empty((K, nb), dtype=f32, device=dev)
        _dz_kernel[(K, nb)](gout, *args, part, B, nb, float(eps), *target.stride(), **consts)
        _dscale_final_kernel[(K,)](gout, part, dscale, nb, FB=FINAL_BLOCK)
    else:
        _dz_kernel[(K,)](gout, *args, dscale, B, nb, float(eps), *target.stride(), **consts)
    grid = (K, triton.cdiv(B, bm), triton.cdiv(D, bd))
    prec = _precision()
    _dx_kernel[grid](
        dcos,
        cos,
        img,
        n_i,
        txt,
        n_t,
        d_img,
        B,
        D,
        B,
        1,
        *img.stride(),
        *txt.stride(),
        BM=bm,
        BL=bm,
        BD=bd,
        PREC=prec,
    )
    _dx_kernel[grid](
        dcos,
        cos,
        txt,
        n_t,
        img,
        n_i,
        d_txt,
        B,
        D,
        1,
        B,
        *txt.stride(),
        *img.stride(),
        BM=bm,
        BL=bm,
        BD=bd,
        PREC=prec,
    )
    return d_img, d_txt, dtgt, dscale
