"""``impl="torch"`` of the contrastive loss (``repblend_fast.ops.registry``): the fused kernels'
forward (loss and saved statistics) and first-order backward written in torch, in the inputs'
precision promoted to at least fp32 (float64 stays float64). It mirrors
``repblend_fast.kernels.contrastive`` and ``csrc/contrastive.cu`` output for output, so the
autograd layer of :mod:`repblend_fast.ops.contrastive` can be checked in float64 (``gradcheck`` /
``gradgradcheck``); the derivative formulas are :mod:`repblend_fast.ops.contrastive_derivs`.
"""

from __future__ import annotations

import torch

from repblend_fast.ops.contrastive_derivs import (
    SOFTMAX_LOSSES,
    loss_derivs,
    normalize_vjp,
    unit_rows,
)
from repblend_fast.reference.contrastive import MASS_EPS

__all__ = ["torch_backward", "torch_forward"]


def torch_forward(img, txt, target, scale, loss: str, eps: float):
    """The forward kernel's outputs (loss and saved statistics) in torch, in the inputs' precision
    promoted to at least fp32 (float64 stays float64): a mirror of the kernels that lets the
    autograd layer be checked in float64 (``gradcheck`` / ``gradgradcheck``)."""
    dt = torch.promote_types(img.dtype, torch.float32)
    x, y, s_ = img.to(dt), txt.to(dt), target.to(dt)
    k, b = x.shape[0], x.shape[1]
    n_i, n_t = x.square().sum(-1).sqrt(), y.square().sum(-1).sqrt()
    u, v = unit_rows(x, n_i)[0], unit_rows(y, n_t)[0]
    cos = u @ v.mT
    z = scale.to(dt)[:, None, None] * cos
    cnt = torch.zeros(k, 2, dtype=dt, device=x.device)
    if loss in SOFTMAX_LOSSES:

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


def torch_backward(g, img, txt, target, scale, aux, loss: str, eps: float):
    """The backward kernels' outputs in torch (see :func:`torch_forward`)."""
    cos, n_i, n_t, rst, cst, cnt = aux
    dt = cos.dtype
    x, y = img.to(dt), txt.to(dt)
    u, r_x, m_x = unit_rows(x, n_i)
    v, r_y, m_y = unit_rows(y, n_t)
    sk, gk = scale.to(dt)[:, None, None], g.to(dt)[:, None, None]
    g_, h_ = loss_derivs(sk * cos, target.to(dt), rst, cst, cnt, loss, eps)
    dcos = gk * sk * g_
    d_img = normalize_vjp(dcos @ v, u, r_x, m_x)
    d_txt = normalize_vjp(dcos.mT @ u, v, r_y, m_y)
    d_scale = gk[:, 0, 0] * (g_ * cos).sum((-1, -2))
    return d_img.to(img.dtype), d_txt.to(txt.dtype), (gk * h_).to(target.dtype), d_scale
