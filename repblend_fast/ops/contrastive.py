"""Soft-target contrastive losses (docs/algorithm.md §7) with ``impl = auto | reference | triton |
cuda``.

Three layers (docs/design.md §3):

1. kernels: ``repblend_fast.kernels.contrastive`` (Triton) and ``csrc/contrastive.cu`` (CUDA,
   ``torch.ops.repblend_fast.contrastive_fwd`` / ``contrastive_bwd``); both compute the loss with
   saved row/column statistics in one forward and the first-order gradients in one backward. For
   large ``B`` and few problems (:func:`row_parallel`) the loss and ``dL/dZ`` steps run on a grid of
   row blocks with per-block partial sums and a fixed-order combine, instead of one program per
   problem;
2. autograd: :class:`_ContrastiveFn` (forward + ``setup_context`` + ``backward`` + ``vmap`` +
   ``jvp``). Its backward is itself a Function, :class:`_ContrastiveBwdFn`, whose forward runs the
   fused backward kernels and whose backward (the double backward) is :class:`_ContrastiveBwd2Fn`:
   the VJP of the fused gradients written out analytically (:func:`_second_order`) from the saved
   statistics and the first-order outputs, so grad-of-grad costs a few ``B x B x D`` products and
   ``O(B^2)`` elementwise work instead of re-running the reference forward and backward. Its own
   backward (third order, which no training path takes) differentiates the reference's second
   order, so every order stays exact;
3. :func:`contrastive_loss`, which validates its arguments and dispatches.

Dtypes: ``img``, ``txt`` and ``target`` share one floating dtype. The fused paths accept fp32,
bf16 and fp16 (fp32 accumulation; float64 goes to the reference under ``auto`` and is refused by an
explicit fused ``impl``). As in the reference, the loss has the inputs' dtype and each gradient its
input's dtype. A private ``torch`` backend (:func:`_torch_forward`, :func:`_torch_backward`) mirrors
the kernels' formulas in any precision, so the autograd layer is checked in float64 too.
"""

from __future__ import annotations

import math

import torch

from repblend_fast.ops._dispatch import resolve_impl, values_readable
from repblend_fast.reference import contrastive as _ref
from repblend_fast.reference.contrastive import MASS_EPS, NORM_EPS

LOSSES = _ref.LOSSES
LOSS_IDS = _ref.LOSS_IDS
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OP = "contrastive_loss"

__all__ = ["LOSSES", "contrastive_loss"]


# --------------------------------------------------------------------------------------------------
# dispatch rule of the kernels' grid

ROW_PARALLEL_MIN_B = 128
"""From this batch size on, the loss and ``dL/dZ`` kernels split each problem's ``B x B`` logits
into row blocks (a grid over problems x row blocks, per-block partial sums, then a fixed-order
combine) instead of giving one program to each problem. Below it a problem is at most one 64-row
tile per direction, so splitting gains nothing and the combine is one launch more."""
ROW_PARALLEL_MAX_K = 256
"""... as long as there are fewer problems than this: with ``K`` this large the per-problem grid
already fills a GPU (about two programs per SM of an H100/H200) and the combine launch is pure
overhead."""


def row_parallel(k: int, b: int) -> bool:
    """Whether the fused kernels use the row-parallel grid for ``K`` problems of batch ``B``."""
    return b >= ROW_PARALLEL_MIN_B and k < ROW_PARALLEL_MAX_K


# --------------------------------------------------------------------------------------------------
# backends


def _fused_forward(backend: str, img, txt, target, scale, loss: str, eps: float):
    rows = row_parallel(img.shape[0], img.shape[1])
    if backend == "torch":
        return _torch_forward(img, txt, target, scale, loss, eps)
    if backend == "triton":
        from repblend_fast.kernels import contrastive as _tk

        return _tk.forward(img, txt, target, scale, loss, eps, row_parallel=rows)
    out = torch.ops.repblend_fast.contrastive_fwd(
        img, txt, target, scale.to(torch.float32), LOSS_IDS[loss], float(eps), rows
    )
    return tuple(out)


def _fused_backward(backend: str, g, img, txt, target, scale, aux, loss: str, eps: float):
    rows = row_parallel(img.shape[0], img.shape[1])
    if backend == "torch":
        return _torch_backward(g, img, txt, target, scale, aux, loss, eps)
    if backend == "triton":
        from repblend_fast.kernels import contrastive as _tk

        return _tk.backward(g, img, txt, target, scale, *aux, loss, eps, row_parallel=rows)
    out = torch.ops.repblend_fast.contrastive_bwd(
        g.to(torch.float32),
        img,
        txt,
        target,
        scale.to(torch.float32),
        *aux,
        LOSS_IDS[loss],
        float(eps),
        rows,
    )
    return tuple(out)


def _ref_loss32(img, txt, target, scale, loss: str, eps: float) -> torch.Tensor:
    """Reference loss in fp32 (fp64 stays fp64) for ``[K, B, D]`` inputs and ``scale`` ``[K]``."""
    dt = torch.promote_types(img.dtype, torch.float32)
    z = _ref.logits(img.to(dt), txt.to(dt), scale.to(dt)[:, None, None])
    return _ref.loss_from_logits(z, target.to(dt), loss=loss, eps=eps)


def _ref_grads(g, img, txt, target, scale, loss: str, eps: float):
    """Differentiable first-order gradients of the reference (used by the third order)."""
    out, vjp_fn = torch.func.vjp(
        lambda i, t, s, c: _ref_loss32(i, t, s, c, loss, eps), img, txt, target, scale
    )
    return vjp_fn(g.to(out.dtype))


# --------------------------------------------------------------------------------------------------
# the kernels' formulas in torch: dL/dZ, dL/dS from the saved statistics, their directional
# derivatives (the second order), and a float64-capable mirror of the two kernels


_SOFTMAX = ("infonce", "cwcl", "kl")


def _normalize_vjp(a, u, r, m):
    """``N a`` for the row-normaliser Jacobian ``N = r (I - m u u^T)`` (symmetric): the VJP and the
    JVP of ``F.normalize`` rows at once. ``a``, ``u`` ``[K, B, D]``; ``r``, ``m`` ``[K, B, 1]``."""
    return r * (a - torch.where(m, u * (u * a).sum(-1, keepdim=True), 0.0))


def _loss_derivs(z, s, rst, cst, cnt, loss: str, eps: float, tangent=None):
    """``G = dl/dZ`` and ``H = dl/dS`` ``[K, B, B]`` of the loss at logits ``z`` and targets ``s``,
    from the forward's saved statistics (the kernels' ``_dz`` formulas); with ``tangent = (E, F)``
    also their directional derivatives ``dG = l_ZZ E + l_ZS F`` and ``dH = l_SZ E + l_SS F``.

    The statistics are functions of ``z`` and ``s``; their tangents are formed analytically here
    (``d lse = sum p E``, ``d sum S = sum F``, ...), so nothing of the forward is recomputed."""
    b = z.shape[-1]
    if loss in _SOFTMAX:
        lse_r, sum_r, a_r, lss_r = (rst[:, i, :, None] for i in range(4))
        lse_c, sum_c, a_c, lss_c = (cst[:, i, None, :] for i in range(4))
        logp_r, logp_c = z - lse_r, z - lse_c
        p_r, p_c = torch.exp(logp_r), torch.exp(logp_c)
        if tangent is not None:
            e, f = tangent
            dlse_r = (p_r * e).sum(-1, keepdim=True)
            dlse_c = (p_c * e).sum(-2, keepdim=True)
            dp_r, dp_c = p_r * (e - dlse_r), p_c * (e - dlse_c)
        if loss == "kl":
            c0 = 0.5 / (b * b)
            logq_r, logq_c = 10.0 * s - lss_r, 10.0 * s - lss_c
            q_r, q_c = torch.exp(logq_r), torch.exp(logq_c)
            k_r, k_c = logq_r - logp_r - a_r, logq_c - logp_c - a_c
            g_ = c0 * ((p_r - q_r) + (p_c - q_c))
            h_ = (10.0 * c0) * (q_r * k_r + q_c * k_c)
            if tangent is None:
                return g_, h_
            # q = softmax(10 S): d log q = 10 F - sum q 10 F, dq = q d log q
            dlogq_r = 10.0 * f - (q_r * 10.0 * f).sum(-1, keepdim=True)
            dlogq_c = 10.0 * f - (q_c * 10.0 * f).sum(-2, keepdim=True)
            dq_r, dq_c = q_r * dlogq_r, q_c * dlogq_c
            # d KL = sum dq (log q - log p) - sum q E + d lse   (sum q = 1, so sum q d log q = 0)
            dkl_r = (dq_r * (logq_r - logp_r) - q_r * e).sum(-1, keepdim=True) + dlse_r
            dkl_c = (dq_c * (logq_c - logp_c) - q_c * e).sum(-2, keepdim=True) + dlse_c
            # k = log q - log p - KL
            dk_r = dlogq_r - (e - dlse_r) - dkl_r
            dk_c = dlogq_c - (e - dlse_c) - dkl_c
            dg = c0 * ((dp_r - dq_r) + (dp_c - dq_c))
            dh = (10.0 * c0) * (dq_r * k_r + q_r * dk_r + dq_c * k_c + q_c * dk_c)
            return g_, h_, dg, dh
        c0 = -0.5 / b
        if loss == "cwcl":
            w_r, w_c = 1.0 / (sum_r + MASS_EPS), 1.0 / (sum_c + MASS_EPS)
        else:
            w_r = w_c = 1.0
        g_ = c0 * (w_r * (s - sum_r * p_r) + w_c * (s - sum_c * p_c))
        if loss == "cwcl":
            h_ = c0 * (w_r * (logp_r - a_r * w_r) + w_c * (logp_c - a_c * w_c))
        else:
            h_ = c0 * (logp_r + logp_c)
        if tangent is None:
            return g_, h_
        dsum_r, dsum_c = f.sum(-1, keepdim=True), f.sum(-2, keepdim=True)
        dg_r = f - dsum_r * p_r - sum_r * dp_r
        dg_c = f - dsum_c * p_c - sum_c * dp_c
        if loss == "infonce":
            dg = c0 * (dg_r + dg_c)
            dh = c0 * ((e - dlse_r) + (e - dlse_c))
            return g_, h_, dg, dh
        dw_r, dw_c = -w_r * w_r * dsum_r, -w_c * w_c * dsum_c
        # A = sum S (Z - lse): dA = sum F (Z - lse) + sum S E - (sum S) d lse
        da_r = (f * logp_r + s * e).sum(-1, keepdim=True) - sum_r * dlse_r
        da_c = (f * logp_c + s * e).sum(-2, keepdim=True) - sum_c * dlse_c
        dg = c0 * (dw_r * (s - sum_r * p_r) + w_r * dg_r + dw_c * (s - sum_c * p_c) + w_c * dg_c)
        dh = c0 * (
            dw_r * (logp_r - a_r * w_r)
            + w_r * ((e - dlse_r) - da_r * w_r - a_r * dw_r)
            + dw_c * (logp_c - a_c * w_c)
            + w_c * ((e - dlse_c) - da_c * w_c - a_c * dw_c)
        )
        return g_, h_, dg, dh
    # elementwise losses: l = w * sum ell(Z, S) with constant weights w
    p = torch.sigmoid(z)
    pq = p * (1.0 - p)
    if loss == "wbce":
        w = torch.where(
            s > 0.5,
            (0.5 / (cnt[:, 0] + MASS_EPS))[:, None, None],
            (0.5 / (cnt[:, 1] + MASS_EPS))[:, None, None],
        )
    else:
        w = 1.0 / (b * b)
    h_ss = None
    if loss == "wbce" and eps > 0:
        pe, qe = p + eps, 1.0 - p + eps
        kf = -s / pe + (1.0 - s) / qe
        g1, h1 = pq * kf, -torch.log(pe) + torch.log(qe)
        g_zz = pq * ((1.0 - 2.0 * p) * kf + pq * (s / (pe * pe) + (1.0 - s) / (qe * qe)))
        g_zs = -pq * (1.0 / pe + 1.0 / qe)
    elif loss == "wbce":
        g1, h1 = p - s, -z
        g_zz, g_zs = pq, -1.0
    elif loss == "bce":
        q = 1.0 - p
        logp_raw = torch.log(torch.where(p > 0, p, 1.0))
        logq_raw = torch.log(torch.where(q > 0, q, 1.0))
        mp = (p > 0) & (logp_raw >= -100.0)
        mq = (q > 0) & (logq_raw >= -100.0)
        logp = torch.where(p > 0, logp_raw, -100.0).clamp_min(-100.0)
        logq = torch.where(q > 0, logq_raw, -100.0).clamp_min(-100.0)
        g1 = -s * torch.where(mp, 1.0 - p, 0.0) + (1.0 - s) * torch.where(mq, p, 0.0)
        # The masks zero a NaN probability's terms; the reference's sigmoid backward keeps it.
        g1 = torch.where(torch.isnan(p), p, g1)
        h1 = logq - logp
        mpf, mqf = mp.to(z.dtype), mq.to(z.dtype)
        g_zz = pq * (s * mpf + (1.0 - s) * mqf)
        g_zs = -(mpf * (1.0 - p) + mqf * p)
    else:  # mse
        g1, h1 = 2.0 * (p - s) * pq, -2.0 * (p - s)
        g_zz = 2.0 * pq * (pq + (p - s) * (1.0 - 2.0 * p))
        g_zs = -2.0 * pq
        h_ss = 2.0
    g_, h_ = w * g1, w * h1
    if tangent is None:
        return g_, h_
    e, f = tangent
    dh = g_zs * e if h_ss is None else g_zs * e + h_ss * f
    return g_, h_, w * (g_zz * e + g_zs * f), w * dh


def _unit_rows(x, n):
    """``(u, r, m)``: rows ``x / max(n, eps)``, ``r = 1 / max(n, eps)`` and ``m = n >= eps``
    (``[K, B, 1]``), from the saved row norms ``n`` ``[K, B]`` (unclamped, like the kernels')."""
    r = 1.0 / n.clamp_min(NORM_EPS)[..., None]
    return x * r, r, (n >= NORM_EPS)[..., None]


def _torch_forward(img, txt, target, scale, loss: str, eps: float):
    """The forward kernel's outputs (loss and saved statistics) in torch, in the inputs' precision
    promoted to at least fp32 (float64 stays float64): a mirror of the kernels that lets the
    autograd layer be checked in float64 (``gradcheck`` / ``gradgradcheck``)."""
    dt = torch.promote_types(img.dtype, torch.float32)
    x, y, s_ = img.to(dt), txt.to(dt), target.to(dt)
    k, b = x.shape[0], x.shape[1]
    n_i, n_t = x.square().sum(-1).sqrt(), y.square().sum(-1).sqrt()
    u, v = _unit_rows(x, n_i)[0], _unit_rows(y, n_t)[0]
    cos = u @ v.mT
    z = scale.to(dt)[:, None, None] * cos
    cnt = torch.zeros(k, 2, dtype=dt, device=x.device)
    if loss in _SOFTMAX:

        def stats(zz, ss):  # per row of zz
            lse = torch.logsumexp(zz, -1)
            logq = zz - lse[..., None]
            if loss == "kl":
                lss = torch.logsumexp(10.0 * ss, -1)
                logp = 10.0 * ss - lss[..., None]
                a = (torch.exp(logp) * (logp - logq)).sum(-1)
            else:
                lss = torch.zeros_like(lse)
                a = (ss * logq).sum(-1)
            return torch.stack([lse, ss.sum(-1), a, lss], 1)

        rst, cst = stats(z, s_), stats(z.mT, s_.mT)
        if loss == "kl":
            out = 0.5 * (rst[:, 2].sum(-1) + cst[:, 2].sum(-1)) / (b * b)
        elif loss == "cwcl":
            tr = (rst[:, 2] / (rst[:, 1] + MASS_EPS)).sum(-1)
            tc = (cst[:, 2] / (cst[:, 1] + MASS_EPS)).sum(-1)
            out = -0.5 * (tr + tc) / b
        else:
            out = -0.5 * (rst[:, 2].sum(-1) + cst[:, 2].sum(-1)) / b
        return out, cos, n_i, n_t, rst, cst, cnt
    p = torch.sigmoid(z)
    if loss == "wbce" and eps > 0:
        ell = -s_ * torch.log(p + eps) - (1 - s_) * torch.log(1 - p + eps)
    elif loss == "wbce":
        # the kernels' log-sigmoid, min(z, 0) - log1p(exp(-|z|))
        softplus = torch.log1p(torch.exp(-z.abs()))
        ell = -s_ * (torch.where(z > 0, 0.0, z) - softplus) - (1 - s_) * (
            torch.where(z < 0, 0.0, -z) - softplus
        )
    elif loss == "bce":
        q = 1 - p
        logp = torch.where(p > 0, torch.log(torch.where(p > 0, p, 1.0)), -100.0).clamp_min(-100)
        logq = torch.where(q > 0, torch.log(torch.where(q > 0, q, 1.0)), -100.0).clamp_min(-100)
        ell = -(s_ * logp + (1 - s_) * logq)
    else:
        ell = (p - s_).square()
    posf = (s_ > 0.5).to(dt)
    negf = 1 - posf
    cnt = torch.stack([posf.sum((-1, -2)), negf.sum((-1, -2))], -1)
    if loss == "wbce":
        sp, sn = (ell * posf).sum((-1, -2)), (ell * negf).sum((-1, -2))
        out = 0.5 * (sp / (cnt[:, 0] + MASS_EPS) + sn / (cnt[:, 1] + MASS_EPS))
    else:
        out = ell.sum((-1, -2)) / (b * b)
    zeros = torch.zeros(k, 4, b, dtype=dt, device=x.device)
    return out, cos, n_i, n_t, zeros, zeros.clone(), cnt


def _torch_backward(g, img, txt, target, scale, aux, loss: str, eps: float):
    """The backward kernels' outputs in torch (see :func:`_torch_forward`)."""
    cos, n_i, n_t, rst, cst, cnt = aux
    dt = cos.dtype
    x, y = img.to(dt), txt.to(dt)
    u, r_x, m_x = _unit_rows(x, n_i)
    v, r_y, m_y = _unit_rows(y, n_t)
    sk, gk = scale.to(dt)[:, None, None], g.to(dt)[:, None, None]
    g_, h_ = _loss_derivs(sk * cos, target.to(dt), rst, cst, cnt, loss, eps)
    dcos = gk * sk * g_
    d_img = _normalize_vjp(dcos @ v, u, r_x, m_x)
    d_txt = _normalize_vjp(dcos.mT @ u, v, r_y, m_y)
    d_scale = gk[:, 0, 0] * (g_ * cos).sum((-1, -2))
    return d_img.to(img.dtype), d_txt.to(txt.dtype), (gk * h_).to(target.dtype), d_scale


def _second_order(cots, g, img, txt, target, scale, d_img, d_txt, aux, loss: str, eps: float):
    """VJP of the fused first-order backward ``(g, img, txt, target, scale) -> (d_img, d_txt,
    d_target, d_scale)`` for cotangents ``cots = (a_img, a_txt, a_target, a_scale)``, written out
    from the saved statistics and the first-order outputs; nothing of the forward or the backward is
    recomputed. Returns the gradients w.r.t. ``(g, img, txt, target, scale)``.

    With ``u = norm(img)``, ``v = norm(txt)``, ``C = u v^T``, ``Z = s C``, ``P = g s dl/dZ`` and the
    row-normaliser Jacobians ``N`` (symmetric), the first order is ``d_img = N_u (P v)``,
    ``d_txt = N_v (P^T u)``, ``d_target = g dl/dS``, ``d_scale = g <dl/dZ, C>``. Its VJP:

    * ``Gamma_P = (N_u a_img) v^T + u (N_v a_txt)^T`` (the JVP of ``C`` along the cotangents);
    * ``(dG, dH)``: the loss's second derivatives along ``E = s Gamma_P + a_scale C`` and
      ``F = a_target`` (:func:`_loss_derivs`), giving the ``g``, ``target``, ``scale`` parts and
      ``Gamma_C = g (s dG + a_scale dl/dZ)``;
    * ``img``: ``N_u (P N_v a_txt + Gamma_C v)`` plus the normaliser's second derivative along
      ``a_img`` against ``P v``, which is rebuilt from ``d_img`` and ``u . (P v) = sum_l P C``
      (no product with ``v`` again); ``txt`` likewise.

    Matrix products: three ``[B, B] x [B, 2D]``-sized ones (``Gamma_P`` and the two sides), against
    the reference VJP's nine ``B x B x D`` products plus its recomputed forward and backward.
    """
    cos, n_i, n_t, rst, cst, cnt = aux
    dt = cos.dtype
    a_x, a_y, a_tgt, a_sc = (c.to(dt) for c in cots)
    x, y, s_ = img.to(dt), txt.to(dt), target.to(dt)
    u, r_x, m_x = _unit_rows(x, n_i)
    v, r_y, m_y = _unit_rows(y, n_t)
    gk, sk, ak = g.to(dt)[:, None, None], scale.to(dt)[:, None, None], a_sc[:, None, None]
    ut = _normalize_vjp(a_x, u, r_x, m_x)
    vt = _normalize_vjp(a_y, v, r_y, m_y)
    gam_p = torch.cat([ut, u], -1) @ torch.cat([v, vt], -1).mT
    e = sk * gam_p + ak * cos
    g_, h_, dg, dh = _loss_derivs(sk * cos, s_, rst, cst, cnt, loss, eps, (e, a_tgt))
    grad_g = (e * g_).sum((-1, -2)) + (a_tgt * h_).sum((-1, -2))
    grad_tgt = gk * dh
    grad_scale = gk[:, 0, 0] * ((dg * cos).sum((-1, -2)) + (gam_p * g_).sum((-1, -2)))
    p = gk * sk * g_
    gam_c = gk * (sk * dg + ak * g_)
    side_x = torch.cat([p, gam_c], -1) @ torch.cat([vt, v], -2)
    side_y = torch.cat([p.mT, gam_c.mT], -1) @ torch.cat([ut, u], -2)
    pc = p * cos
    grad_x = _normalize_vjp(side_x, u, r_x, m_x) + _normalize_hvp(
        a_x, u, r_x, m_x, d_img.to(dt), pc.sum(-1)[..., None]
    )
    grad_y = _normalize_vjp(side_y, v, r_y, m_y) + _normalize_hvp(
        a_y, v, r_y, m_y, d_txt.to(dt), pc.sum(-2)[..., None]
    )
    return (
        grad_g.to(g.dtype),
        grad_x.to(img.dtype),
        grad_y.to(txt.dtype),
        grad_tgt.to(target.dtype),
        grad_scale.to(scale.dtype),
    )


def _normalize_hvp(a, u, r, m, dx, c):
    """``d/dx <a, N(x) w>`` at fixed ``w`` (the normaliser's second derivative), with ``w`` given
    by the first-order output ``dx = N w`` and ``c = u . w``: for rows with ``||x|| >= eps``,
    ``w = ||x|| dx + c u`` and the derivative is ``-r^2 c (a - (u.a) u) - r ((a.dx) u + (u.a) dx)``;
    rows under the clamp have a constant ``N`` and contribute nothing."""
    ua = (u * a).sum(-1, keepdim=True)
    adx = (a * dx).sum(-1, keepdim=True)
    out = -(r * r * c) * (a - ua * u) - r * (adx * u + ua * dx)
    return torch.where(m, out, 0.0)


# --------------------------------------------------------------------------------------------------
# vmap helpers: the kernels take a leading K, so a vmapped dimension is folded into it


def _fold(x: torch.Tensor, bdim, size: int) -> torch.Tensor:
    x = x.expand(size, *x.shape) if bdim is None else x.movedim(bdim, 0)
    return x.reshape(size * x.shape[1], *x.shape[2:])


def _unfold(x: torch.Tensor, size: int) -> torch.Tensor:
    return x.reshape(size, x.shape[0] // size, *x.shape[1:])


# --------------------------------------------------------------------------------------------------
# autograd


class _ContrastiveFn(torch.autograd.Function):
    """``(img, txt, target, scale [K]) -> (loss [K], *saved statistics)``; only ``loss`` is
    differentiable."""

    @staticmethod
    def forward(img, txt, target, scale, loss, eps, backend):
        out = _fused_forward(backend, img, txt, target, scale, loss, eps)
        return (out[0].to(img.dtype), *out[1:])

    @staticmethod
    def setup_context(ctx, inputs, output):
        img, txt, target, scale, loss, eps, backend = inputs
        aux = output[1:]
        ctx.mark_non_differentiable(*aux)
        ctx.save_for_backward(img, txt, target, scale, *aux)
        ctx.save_for_forward(img, txt, target, scale, *aux)
        ctx.loss, ctx.eps, ctx.backend = loss, eps, backend

    @staticmethod
    def backward(ctx, g_loss, *_unused):
        img, txt, target, scale, *aux = ctx.saved_tensors
        grads = _ContrastiveBwdFn.apply(
            g_loss, img, txt, target, scale, *aux, ctx.loss, ctx.eps, ctx.backend
        )
        need = ctx.needs_input_grad
        return tuple(gr if need[i] else None for i, gr in enumerate(grads)) + (None,) * 3

    @staticmethod
    def jvp(ctx, img_t, txt_t, target_t, scale_t, *_unused):
        img, txt, target, scale, *aux = ctx.saved_tensors
        ones = torch.ones(img.shape[0], dtype=img.dtype, device=img.device)
        grads = _ContrastiveBwdFn.apply(
            ones, img, txt, target, scale, *aux, ctx.loss, ctx.eps, ctx.backend
        )
        dl = torch.zeros(img.shape[0], dtype=torch.float32, device=img.device)
        for gr, t in zip(grads, (img_t, txt_t, target_t, scale_t)):
            if t is not None:
                dl = dl + (gr.float() * t.float()).reshape(img.shape[0], -1).sum(1)
        return (dl.to(img.dtype),) + (None,) * len(aux)

    @staticmethod
    def vmap(info, in_dims, img, txt, target, scale, loss, eps, backend):
        n = info.batch_size
        args = [_fold(x, d, n) for x, d in zip((img, txt, target, scale), in_dims[:4])]
        out = _ContrastiveFn.apply(*args, loss, eps, backend)
        return tuple(_unfold(o, n) for o in out), (0,) * len(out)


class _ContrastiveBwdFn(torch.autograd.Function):
    """Fused first-order backward ``(g [K], inputs, statistics) -> (d_img, d_txt, d_target,
    d_scale)``; its own backward (the double backward) is :class:`_ContrastiveBwd2Fn`, the analytic
    VJP of these gradients from the saved statistics and the first-order outputs."""

    @staticmethod
    def forward(g, img, txt, target, scale, cos, n_i, n_t, rst, cst, cnt, loss, eps, backend):
        aux = (cos, n_i, n_t, rst, cst, cnt)
        d_img, d_txt, d_tgt, d_scale = _fused_backward(
            backend, g, img, txt, target, scale, aux, loss, eps
        )
        return d_img, d_txt, d_tgt, d_scale.to(scale.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:11], output[0], output[1])
        ctx.loss, ctx.eps = inputs[11], inputs[12]

    @staticmethod
    def backward(ctx, gg_img, gg_txt, gg_tgt, gg_scale):
        g, img, txt, target, scale, *rest = ctx.saved_tensors
        aux, d_img, d_txt = rest[:6], rest[6], rest[7]
        cot = tuple(
            torch.zeros_like(p) if c is None else c
            for c, p in zip((gg_img, gg_txt, gg_tgt, gg_scale), (img, txt, target, scale))
        )
        # d_img / d_txt are functions of the other inputs: the analytic second order accounts for
        # that dependence itself, so they enter as constants.
        grads = _ContrastiveBwd2Fn.apply(
            *cot, g, img, txt, target, scale, d_img.detach(), d_txt.detach(), *aux,
            ctx.loss, ctx.eps,
        )  # fmt: skip
        return tuple(grads) + (None,) * 9

    @staticmethod
    def vmap(info, in_dims, *args):
        n = info.batch_size
        tensors = [_fold(x, d, n) for x, d in zip(args[:11], in_dims[:11])]
        out = _ContrastiveBwdFn.apply(*tensors, *args[11:])
        return tuple(_unfold(o, n) for o in out), (0,) * len(out)


class _ContrastiveBwd2Fn(torch.autograd.Function):
    """Second order: ``(cotangents of d_img, d_txt, d_target, d_scale; g, img, txt, target, scale;
    d_img, d_txt; statistics) -> gradients w.r.t. (g, img, txt, target, scale)``, computed by
    :func:`_second_order` without a graph. Its own backward (third order, which no training path
    takes) differentiates the reference's second order, so every order stays exact."""

    @staticmethod
    def forward(a_img, a_txt, a_tgt, a_scale, g, img, txt, target, scale, d_img, d_txt, *rest):
        aux, (loss, eps) = rest[:6], rest[6:]
        cots = (a_img, a_txt, a_tgt, a_scale)
        return _second_order(cots, g, img, txt, target, scale, d_img, d_txt, aux, loss, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:9])
        ctx.loss, ctx.eps = inputs[-2], inputs[-1]

    @staticmethod
    def backward(ctx, *cots):
        primals = ctx.saved_tensors
        loss, eps = ctx.loss, ctx.eps
        cots = tuple(torch.zeros_like(p) if c is None else c for c, p in zip(cots, primals[4:]))

        def second(a_img, a_txt, a_tgt, a_scale, g, img, txt, target, scale):
            _, vjp_fn = torch.func.vjp(
                lambda *a: _ref_grads(*a, loss, eps), g, img, txt, target, scale
            )
            return vjp_fn((a_img, a_txt, a_tgt, a_scale))

        _, vjp_fn = torch.func.vjp(second, *primals)
        return tuple(vjp_fn(cots)) + (None,) * 10

    @staticmethod
    def vmap(info, in_dims, *args):
        n = info.batch_size
        tensors = [_fold(x, d, n) for x, d in zip(args[:17], in_dims[:17])]
        out = _ContrastiveBwd2Fn.apply(*tensors, *args[17:])
        return tuple(_unfold(o, n) for o in out), (0,) * len(out)


# --------------------------------------------------------------------------------------------------
# functional API


def _validate(img, txt, target, logit_scale, loss, eps) -> None:
    for name, t in (("img", img), ("txt", txt), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if img.ndim not in (2, 3):
        raise ValueError(
            f"{_OP}: img must be [B, D] or [K, B, D], got shape {tuple(img.shape)}; "
            "pass one batch of projection-head outputs, or stack K of them on dim 0"
        )
    for name, t, want in (("txt", txt, img.ndim), ("target", target, img.ndim)):
        if t.ndim != want:
            raise ValueError(
                f"{_OP}: {name} must have {want} dims like img (shape {tuple(img.shape)}), got "
                f"shape {tuple(t.shape)}; img/txt are [..., B, D] and target is [..., B, B]"
            )
    for name, t in (("img", img), ("txt", txt), ("target", target)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{_OP}: {name} must have a floating dtype, got {t.dtype}; cast it")
    for name, t in (("txt", txt), ("target", target)):
        if t.dtype != img.dtype:
            raise TypeError(
                f"{_OP}: {name} has dtype {t.dtype} but img has {img.dtype}; cast all three "
                "tensors to one dtype"
            )
    if img.ndim == 3 and txt.shape[0] != img.shape[0]:
        raise ValueError(
            f"{_OP}: txt has K={txt.shape[0]} problems but img has K={img.shape[0]}; "
            "the leading dims must match"
        )
    if img.ndim == 3 and target.shape[0] != img.shape[0]:
        raise ValueError(
            f"{_OP}: target has K={target.shape[0]} problems but img has K={img.shape[0]}; "
            "the leading dims must match"
        )
    b, d = img.shape[-2], img.shape[-1]
    if b == 0 or d == 0:
        raise ValueError(f"{_OP}: img must have B >= 1 rows and D >= 1 columns, got {b} x {d}")
    if txt.shape[-2] != b:
        raise ValueError(
            f"{_OP}: txt has B={txt.shape[-2]} rows but img has B={b}; image i pairs with text i"
        )
    if txt.shape[-1] != d:
        raise ValueError(
            f"{_OP}: txt has D={txt.shape[-1]} features but img has D={d}; both heads must "
            "project to the same dimension"
        )
    if tuple(target.shape[-2:]) != (b, b):
        raise ValueError(
            f"{_OP}: target must be [..., B, B] = [..., {b}, {b}] (rows = images), got "
            f"shape {tuple(target.shape)}"
        )
    devices = {("img", img.device), ("txt", txt.device), ("target", target.device)}
    if isinstance(logit_scale, torch.Tensor):
        devices.add(("logit_scale", logit_scale.device))
    if len({dev for _, dev in devices}) > 1:
        names = ", ".join(f"{n} on {dev}" for n, dev in sorted(devices, key=str))
        raise ValueError(f"{_OP}: all tensors must be on one device, got {names}; move them")
    if loss not in LOSSES:
        raise ValueError(f"{_OP}: loss must be one of {LOSSES}, got {loss!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{_OP}: eps must be a python float, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(
            f"{_OP}: eps must be finite and >= 0 (0 selects the exact log-sigmoid WBCE), got {eps}"
        )
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.ndim != 0:
            raise ValueError(
                f"{_OP}: logit_scale must be a python float or a 0-d tensor, got shape "
                f"{tuple(logit_scale.shape)}; for one scale per problem call the op per problem "
                "or vmap over it"
            )
        if not logit_scale.dtype.is_floating_point:
            raise TypeError(
                f"{_OP}: logit_scale tensor must have a floating dtype, got {logit_scale.dtype}"
            )
        # A finiteness check on a CUDA tensor would synchronise the device every call.
        if logit_scale.device.type == "cpu" and values_readable(logit_scale):
            if not bool(torch.isfinite(logit_scale)):
                raise ValueError(f"{_OP}: logit_scale must be finite, got {logit_scale.item()}")
    elif isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool):
        if not math.isfinite(logit_scale):
            raise ValueError(f"{_OP}: logit_scale must be finite, got {logit_scale}")
    else:
        raise TypeError(
            f"{_OP}: logit_scale must be a python float or a 0-d tensor (s = 1/tau), got "
            f"{type(logit_scale).__name__}"
        )


def contrastive_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    target: torch.Tensor,
    *,
    logit_scale: float | torch.Tensor,
    loss: str = "wbce",
    eps: float = 1e-6,
    impl: str = "auto",
) -> torch.Tensor:
    """Soft-target contrastive loss of ``Z = s * norm(img) @ norm(txt)^T`` against ``target``.

    Args:
        img: ``[B, D]`` or ``[K, B, D]`` image projection-head outputs (not normalised).
        txt: same shape as ``img``, text projection-head outputs.
        target: ``[B, B]`` or ``[K, B, B]`` soft similarity targets (rows = images).
        logit_scale: the multiplier ``s = 1/tau``, a python float or a 0-d tensor (may require
            grad).
        loss: ``wbce`` | ``infonce`` | ``cwcl`` | ``bce`` | ``mse`` | ``kl`` (docs/algorithm.md §7).
        eps: WBCE log epsilon; ``1e-6`` is the paper's formula, ``0`` the exact log-sigmoid form.
        impl: ``auto`` | ``reference`` | ``triton`` | ``cuda`` (see ``ops._dispatch``).

    Returns:
        ``[]`` for ``[B, D]`` inputs, ``[K]`` for ``[K, B, D]``, in the inputs' dtype. Twice (and
        more) differentiable w.r.t. ``img``, ``txt``, ``target`` and a tensor ``logit_scale``;
        works under ``torch.func.grad`` / ``vjp`` / ``jvp`` / ``vmap``. NaN or infinite entries
        in ``img``, ``txt`` or ``target`` are not refused: every implementation returns what the
        reference returns for them (NaN, +-inf, or the same finite value), never a finite loss
        where the reference's is NaN or infinite.
    """
    _validate(img, txt, target, logit_scale, loss, eps)
    tensors = [img, txt, target]
    if isinstance(logit_scale, torch.Tensor):
        tensors.append(logit_scale)
    chosen = resolve_impl(_OP, impl, tensors)
    if chosen != "reference" and img.dtype not in _FUSED_DTYPES:
        if impl == "auto":
            chosen = "reference"
        else:
            raise RuntimeError(
                f"{_OP}: impl={chosen!r} supports float32, bfloat16 and float16 inputs, got "
                f"{img.dtype}; use impl='reference' (or 'auto') for {img.dtype}"
            )
    if chosen == "reference":
        return _ref.contrastive_loss(img, txt, target, logit_scale=logit_scale, loss=loss, eps=eps)
    single = img.ndim == 2
    if single:
        img, txt, target = img.unsqueeze(0), txt.unsqueeze(0), target.unsqueeze(0)
    k = img.shape[0]
    if isinstance(logit_scale, torch.Tensor):
        scale = logit_scale.reshape(1).expand(k)
    else:
        scale = torch.full((k,), float(logit_scale), dtype=torch.float32, device=img.device)
    out = _ContrastiveFn.apply(img, txt, target, scale, loss, float(eps), chosen)[0]
    return out[0] if single else out
