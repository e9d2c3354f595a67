"""The contrastive loss's derivatives in torch, from the forward's saved statistics: the kernels'
formulas for ``dl/dZ`` and ``dl/dS`` (:func:`loss_derivs`), their directional derivatives (the
loss's second order along a tangent), the row normaliser's Jacobian and second derivative
(:func:`normalize_vjp`, :func:`normalize_hvp`), and the analytic VJP of the fused first-order
backward (:func:`second_order`), the double backward of :mod:`repblend_fast.ops.contrastive`.

Everything here is plain torch in the inputs' precision: no kernel launch, no autograd graph. The
statistics are functions of ``Z`` and ``S``; their tangents are formed analytically, so nothing of
the forward is recomputed. Shapes: ``z``, ``s`` ``[K, B, B]``; row statistics ``rst`` and column
statistics ``cst`` ``[K, 4, B]`` (``lse``, ``sum S``, ``A``, ``lse of 10 S``); ``cnt`` ``[K, 2]``
(positive and negative target counts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from repblend_fast.reference.contrastive import MASS_EPS, NORM_EPS

__all__ = [
    "SOFTMAX_LOSSES",
    "loss_derivs",
    "normalize_hvp",
    "normalize_vjp",
    "second_order",
    "unit_rows",
]

SOFTMAX_LOSSES = ("infonce", "cwcl", "kl")
"""The losses built from row and column softmaxes (the others are elementwise in ``Z``)."""


def normalize_vjp(a, u, r, m):
    """``N a`` for the row-normaliser Jacobian ``N = r (I - m u u^T)`` (symmetric): the VJP and the
    JVP of ``F.normalize`` rows at once. ``a``, ``u`` ``[K, B, D]``; ``r``, ``m`` ``[K, B, 1]``."""
    return r * (a - torch.where(m, u * (u * a).sum(-1, keepdim=True), 0.0))


def normalize_hvp(a, u, r, m, dx, c):
    """``d/dx <a, N(x) w>`` at fixed ``w`` (the normaliser's second derivative), with ``w`` given
    by the first-order output ``dx = N w`` and ``c = u . w``: for rows with ``||x|| >= eps``,
    ``w = ||x|| dx + c u`` and the derivative is ``-r^2 c (a - (u.a) u) - r ((a.dx) u + (u.a) dx)``;
    rows under the clamp have a constant ``N`` and contribute nothing."""
    ua = (u * a).sum(-1, keepdim=True)
    adx = (a * dx).sum(-1, keepdim=True)
    out = -(r * r * c) * (a - ua * u) - r * (adx * u + ua * dx)
    return torch.where(m, out, 0.0)


def unit_rows(x, n):
    """``(u, r, m)``: rows ``x / max(n, eps)``, ``r = 1 / max(n, eps)`` and ``m = n >= eps``
    (``[K, B, 1]``), from the saved row norms ``n`` ``[K, B]`` (unclamped, like the kernels')."""
    r = 1.0 / n.clamp_min(NORM_EPS)[..., None]
    return x * r, r, (n >= NORM_EPS)[..., None]


def loss_derivs(z, s, rst, cst, cnt, loss: str, eps: float, tangent=None):
    """``G = dl/dZ`` and ``H = dl/dS`` ``[K, B, B]`` of the loss at logits ``z`` and targets ``s``,
    from the forward's saved statistics (the kernels' ``_dz`` formulas); with ``tangent = (E, F)``
    also their directional derivatives ``dG = l_ZZ E + l_ZS F`` and ``dH = l_SZ E + l_SS F``.

    The statistics are functions of ``z`` and ``s``; their tangents are formed analytically here
    (``d lse = sum p E``, ``d sum S = sum F``, ...), so nothing of the forward is recomputed."""
    if loss in SOFTMAX_LOSSES:
        e = None if tangent is None else tangent[0]
        rows, cols = _Side.of(z, rst, -1, e), _Side.of(z, cst, -2, e)
        if loss == "kl":
            return _kl_derivs(s, rows, cols, z.shape[-1], tangent)
        return _softmax_derivs(s, rows, cols, z.shape[-1], loss, tangent)
    return _elementwise_derivs(z, s, cnt, loss, eps, tangent)


@dataclass
class _Side:
    """One direction of a softmax loss (rows: ``dim=-1``, columns: ``dim=-2``): its saved
    statistics broadcast against ``Z`` (``lse``, ``total`` = sum S, ``a`` = A, ``lss``), the
    log-probabilities ``logp`` and probabilities ``p`` ``[K, B, B]``, and along a tangent ``E``
    ``dlse = sum p E`` and ``dp = p (E - dlse)`` (``None`` without one)."""

    dim: int
    lse: torch.Tensor
    total: torch.Tensor
    a: torch.Tensor
    lss: torch.Tensor
    logp: torch.Tensor
    p: torch.Tensor
    dlse: torch.Tensor | None
    dp: torch.Tensor | None

    @classmethod
    def of(cls, z, st, dim: int, e) -> _Side:
        if dim == -1:
            lse, total, a, lss = (st[:, i, :, None] for i in range(4))
        else:
            lse, total, a, lss = (st[:, i, None, :] for i in range(4))
        logp = z - lse
        p = torch.exp(logp)
        dlse = dp = None
        if e is not None:
            dlse = (p * e).sum(dim, keepdim=True)
            dp = p * (e - dlse)
        return cls(dim, lse, total, a, lss, logp, p, dlse, dp)


def _kl_derivs(s, r: _Side, c: _Side, b: int, tangent):
    """:func:`loss_derivs` of the KL loss (targets ``softmax(10 S)``)."""
    c0 = 0.5 / (b * b)
    logq_r, logq_c = 10.0 * s - r.lss, 10.0 * s - c.lss
    q_r, q_c = torch.exp(logq_r), torch.exp(logq_c)
    k_r, k_c = logq_r - r.logp - r.a, logq_c - c.logp - c.a
    g_ = c0 * ((r.p - q_r) + (c.p - q_c))
    h_ = (10.0 * c0) * (q_r * k_r + q_c * k_c)
    if tangent is None:
        return g_, h_
    e, f = tangent
    # q = softmax(10 S): d log q = 10 F - sum q 10 F, dq = q d log q
    dlogq_r = 10.0 * f - (q_r * 10.0 * f).sum(-1, keepdim=True)
    dlogq_c = 10.0 * f - (q_c * 10.0 * f).sum(-2, keepdim=True)
    dq_r, dq_c = q_r * dlogq_r, q_c * dlogq_c
    # d KL = sum dq (log q - log p) - sum q E + d lse   (sum q = 1, so sum q d log q = 0)
    dkl_r = (dq_r * (logq_r - r.logp) - q_r * e).sum(-1, keepdim=True) + r.dlse
    dkl_c = (dq_c * (logq_c - c.logp) - q_c * e).sum(-2, keepdim=True) + c.dlse
    # k = log q - log p - KL
    dk_r = dlogq_r - (e - r.dlse) - dkl_r
    dk_c = dlogq_c - (e - c.dlse) - dkl_c
    dg = c0 * ((r.dp - dq_r) + (c.dp - dq_c))
    dh = (10.0 * c0) * (dq_r * k_r + q_r * dk_r + dq_c * k_c + q_c * dk_c)
    return g_, h_, dg, dh


def _softmax_derivs(s, r: _Side, c: _Side, b: int, loss: str, tangent):
    """:func:`loss_derivs` of InfoNCE and CWCL (CWCL weighs each row and column by
    ``1 / (sum S + MASS_EPS)``)."""
    c0 = -0.5 / b
    if loss == "cwcl":
        w_r, w_c = 1.0 / (r.total + MASS_EPS), 1.0 / (c.total + MASS_EPS)
    else:
        w_r = w_c = 1.0
    g_ = c0 * (w_r * (s - r.total * r.p) + w_c * (s - c.total * c.p))
    if loss == "cwcl":
        h_ = c0 * (w_r * (r.logp - r.a * w_r) + w_c * (c.logp - c.a * w_c))
    else:
        h_ = c0 * (r.logp + c.logp)
    if tangent is None:
        return g_, h_
    e, f = tangent
    dsum_r, dsum_c = f.sum(-1, keepdim=True), f.sum(-2, keepdim=True)
    dg_r = f - dsum_r * r.p - r.total * r.dp
    dg_c = f - dsum_c * c.p - c.total * c.dp
    if loss == "infonce":
        dg = c0 * (dg_r + dg_c)
        dh = c0 * ((e - r.dlse) + (e - c.dlse))
        return g_, h_, dg, dh
    dw_r, dw_c = -w_r * w_r * dsum_r, -w_c * w_c * dsum_c
    # A = sum S (Z - lse): dA = sum F (Z - lse) + sum S E - (sum S) d lse
    da_r = (f * r.logp + s * e).sum(-1, keepdim=True) - r.total * r.dlse
    da_c = (f * c.logp + s * e).sum(-2, keepdim=True) - c.total * c.dlse
    dg = c0 * (dw_r * (s - r.total * r.p) + w_r * dg_r + dw_c * (s - c.total * c.p) + w_c * dg_c)
    dh = c0 * (
        dw_r * (r.logp - r.a * w_r)
        + w_r * ((e - r.dlse) - da_r * w_r - r.a * dw_r)
        + dw_c * (c.logp - c.a * w_c)
        + w_c * ((e - c.dlse) - da_c * w_c - c.a * dw_c)
    )
    return g_, h_, dg, dh


def _elementwise_derivs(z, s, cnt, loss: str, eps: float, tangent):
    """:func:`loss_derivs` of the elementwise losses (WBCE, BCE, MSE): ``l = w * sum ell(Z, S)``
    with constant weights ``w``."""
    b = z.shape[-1]
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


def second_order(cots, g, img, txt, target, scale, d_img, d_txt, aux, loss: str, eps: float):
    """VJP of the fused first-order backward ``(g, img, txt, target, scale) -> (d_img, d_txt,
    d_target, d_scale)`` for cotangents ``cots = (a_img, a_txt, a_target, a_scale)``, written out
    from the saved statistics and the first-order outputs; nothing of the forward or the backward is
    recomputed. Returns the gradients w.r.t. ``(g, img, txt, target, scale)``.

    With ``u = norm(img)``, ``v = norm(txt)``, ``C = u v^T``, ``Z = s C``, ``P = g s dl/dZ`` and the
    row-normaliser Jacobians ``N`` (symmetric), the first order is ``d_img = N_u (P v)``,
    ``d_txt = N_v (P^T u)``, ``d_target = g dl/dS``, ``d_scale = g <dl/dZ, C>``. Its VJP:

    * ``Gamma_P = (N_u a_img) v^T + u (N_v a_txt)^T`` (the JVP of ``C`` along the cotangents);
    * ``(dG, dH)``: the loss's second derivatives along ``E = s Gamma_P + a_scale C`` and
      ``F = a_target`` (:func:`loss_derivs`), giving the ``g``, ``target``, ``scale`` parts and
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
    u, r_x, m_x = unit_rows(x, n_i)
    v, r_y, m_y = unit_rows(y, n_t)
    gk, sk, ak = g.to(dt)[:, None, None], scale.to(dt)[:, None, None], a_sc[:, None, None]
    ut = normalize_vjp(a_x, u, r_x, m_x)
    vt = normalize_vjp(a_y, v, r_y, m_y)
    gam_p = torch.cat([ut, u], -1) @ torch.cat([v, vt], -1).mT
    e = sk * gam_p + ak * cos
    g_, h_, dg, dh = loss_derivs(sk * cos, s_, rst, cst, cnt, loss, eps, (e, a_tgt))
    grad_g = (e * g_).sum((-1, -2)) + (a_tgt * h_).sum((-1, -2))
    grad_tgt = gk * dh
    grad_scale = gk[:, 0, 0] * ((dg * cos).sum((-1, -2)) + (gam_p * g_).sum((-1, -2)))
    p = gk * sk * g_
    gam_c = gk * (sk * dg + ak * g_)
    side_x = torch.cat([p, gam_c], -1) @ torch.cat([vt, v], -2)
    side_y = torch.cat([p.mT, gam_c.mT], -1) @ torch.cat([ut, u], -2)
    pc = p * cos
    grad_x = normalize_vjp(side_x, u, r_x, m_x) + normalize_hvp(
        a_x, u, r_x, m_x, d_img.to(dt), pc.sum(-1)[..., None]
    )
    grad_y = normalize_vjp(side_y, v, r_y, m_y) + normalize_hvp(
        a_y, v, r_y, m_y, d_txt.to(dt), pc.sum(-2)[..., None]
    )
    return (
        grad_g.to(g.dtype),
        grad_x.to(img.dtype),
        grad_y.to(txt.dtype),
        grad_tgt.to(target.dtype),
        grad_scale.to(scale.dtype),
    )
