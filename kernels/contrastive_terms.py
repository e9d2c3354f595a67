"""Loss kinds and elementwise terms shared by the contrastive loss kernels (docs/algorithm.md §7).

The loss kinds are compile-time constants: the ids of :data:`LOSS_IDS` (the one table, in
``repblend_fast.reference.contrastive``; ``csrc/contrastive.cu`` names the same ids ``kWbce`` ...
``kKl``) as ``tl.constexpr`` globals, so a kernel branches on ``LOSS == KL`` rather than on a raw
number. The launchers also pass ``SOFTMAX`` (``loss in SOFTMAX_LOSSES``), the flag of the three
row/column-softmax losses, which ``csrc/contrastive.cu`` calls ``is_softmax``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from repblend_fast.reference.contrastive import LOSS_IDS, MASS_EPS, NORM_EPS, SOFTMAX_LOSSES

# Loss kinds, with the per-element term ``ell(z, s)`` (``p = sigmoid(z)``) or the softmax form; the
# loss is their weighted sum over the ``B x B`` logits (docs/algorithm.md §7).
WBCE = tl.constexpr(LOSS_IDS["wbce"])
"""``-s log(p + eps) - (1 - s) log(1 - p + eps)``, class-weighted: ``(pos mean + neg mean) / 2``."""
INFONCE = tl.constexpr(LOSS_IDS["infonce"])
"""``-(1/2B) sum S (log_softmax_rows(Z) + log_softmax_cols(Z))``."""
CWCL = tl.constexpr(LOSS_IDS["cwcl"])
"""InfoNCE with each row's (column's) terms divided by its target mass ``sum S + MASS_EPS``."""
BCE = tl.constexpr(LOSS_IDS["bce"])
"""``mean -(s log p + (1 - s) log(1 - p))``, logs clamped at -100 (``F.binary_cross_entropy``)."""
MSE = tl.constexpr(LOSS_IDS["mse"])
"""``mean (p - s)^2``."""
KL = tl.constexpr(LOSS_IDS["kl"])
"""``(1/2) mean KL(softmax(10 S) || softmax(Z))`` over rows plus the same over columns."""

# The formula's constants as compile-time constants of the jit functions (a jit function reads only
# globals that are ``tl.constexpr``); same values, one definition in the reference.
MASS_EPS_C = tl.constexpr(MASS_EPS)
NORM_EPS_C = tl.constexpr(NORM_EPS)

__all__ = [
    "BCE", "CWCL", "INFONCE", "KL", "LOSS_IDS", "MASS_EPS_C", "MSE", "NORM_EPS_C",
    "SOFTMAX_LOSSES", "WBCE", "elem_grads", "elem_loss", "loss_value",
]  # fmt: skip


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
def elem_loss(z, s, eps, LOSS: tl.constexpr, LOG_EPS: tl.constexpr):
    p = _sigmoid(z)
    if LOSS == WBCE:
        if LOG_EPS:
            ell = -s * tl.log(p + eps) - (1.0 - s) * tl.log(1.0 - p + eps)
        else:
            ell = -s * _logsigmoid(z) - (1.0 - s) * _logsigmoid(-z)
    elif LOSS == BCE:
        q, logp, logq = _bce_logs(p)
        ell = -(s * logp + (1.0 - s) * logq)
    else:
        ell = (p - s) * (p - s)
    return ell


@triton.jit
def elem_grads(z, s, eps, LOSS: tl.constexpr, LOG_EPS: tl.constexpr):
    """(d ell / dz, d ell / ds) of the elementwise losses, unweighted."""
    p = _sigmoid(z)
    if LOSS == WBCE:
        if LOG_EPS:
            dz = p * (1.0 - p) * (-s / (p + eps) + (1.0 - s) / (1.0 - p + eps))
            ds = -tl.log(p + eps) + tl.log(1.0 - p + eps)
        else:
            dz = p - s
            ds = -z
    elif LOSS == BCE:
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


@triton.jit
def loss_value(tr, tc, sp, sn, n_p, n_n, B, LOSS: tl.constexpr):
    """The loss of one problem from its summed row/column terms (softmax losses) or class sums."""
    bf = B * 1.0
    if LOSS == KL:
        val = 0.5 * (tr + tc) / (bf * bf)
    elif (LOSS == INFONCE) or (LOSS == CWCL):
        val = -0.5 * (tr + tc) / bf
    elif LOSS == WBCE:
        val = 0.5 * (sp / (n_p + MASS_EPS_C) + sn / (n_n + MASS_EPS_C))
    else:
        val = (sp + sn) / (bf * bf)
    return val
