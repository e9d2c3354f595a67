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
   the VJP of the fused gradients written out analytically (``second_order`` in
   :mod:`repblend_fast.ops.contrastive_derivs`) from the saved statistics and the first-order
   outputs, so grad-of-grad costs a few ``B x B x D`` products and ``O(B^2)`` elementwise work
   instead of re-running the reference forward and backward. Its own
   backward (third order, which no training path takes) differentiates the reference's second
   order, so every order stays exact;
3. :func:`contrastive_loss`, which validates its arguments and dispatches.

Dtypes: ``img``, ``txt`` and ``target`` share one floating dtype. The fused paths accept fp32,
bf16 and fp16 (fp32 accumulation; float64 goes to the reference under ``auto`` and is refused by an
explicit fused ``impl``). As in the reference, the loss has the inputs' dtype and each gradient its
input's dtype. ``impl="torch"`` (:mod:`repblend_fast.ops.contrastive_torch`, never chosen by
``auto``) runs the kernels' formulas in plain torch ops in any floating dtype, through the same
autograd Functions, so the autograd layer is checked in float64 too.

This module holds the grid rule and the calls into the backends (layer 1's entry points), the
autograd Functions (layer 2) and the functional API (layer 3). The derivative math (``dl/dZ``,
``dl/dS`` and their directional derivatives, the normaliser's, the analytic second order) is
:mod:`repblend_fast.ops.contrastive_derivs`.
"""

from __future__ import annotations

import math

import torch

from repblend_fast.ops._dispatch import resolve_impl, values_readable
from repblend_fast.ops.contrastive_derivs import second_order as _second_order
from repblend_fast.ops.contrastive_torch import torch_backward as _torch_backward
from repblend_fast.ops.contrastive_torch import torch_forward as _torch_forward
from repblend_fast.reference import contrastive as _ref

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


def _nan_rows(d: torch.Tensor) -> torch.Tensor:
    """NaN for every row of an embedding gradient ``[K, B, D]`` holding a non-finite entry, as
    the reference gives: its normalisation's backward takes a dot product over the row, which any
    inf or NaN makes NaN for the whole row (the fused kernels otherwise leave a lone +-inf)."""
    return torch.where(torch.isfinite(d).all(-1, keepdim=True), d, torch.full_like(d, math.nan))


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
# vmap support: the kernels take a leading K, so a vmapped dimension is folded into it


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
        return _nan_rows(d_img), _nan_rows(d_txt), d_tgt, d_scale.to(scale.dtype)

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
        impl: ``auto`` | ``reference`` | ``triton`` | ``cuda`` | ``torch`` (see ``ops._dispatch``
            and ``ops.registry``; ``torch``: the fused formulas in plain torch, any dtype).

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
    if chosen in ("triton", "cuda") and img.dtype not in _FUSED_DTYPES:
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
    if loss == "kl":
        target = _kl_shift(target)
    out = _ContrastiveFn.apply(img, txt, target, scale, loss, float(eps), chosen)[0]
    return out[0] if single else out


KL_SHIFT_FROM = 8.0
"""Targets whose largest finite entry exceeds this in magnitude are shifted before the fused KL
(:func:`_kl_shift`); below it the fused paths see the targets unchanged."""


def _kl_shift(target: torch.Tensor) -> torch.Tensor:
    """``target - c`` per problem, ``c`` its largest entry where that is finite and above
    :data:`KL_SHIFT_FROM` in magnitude (else 0).

    Both softmaxes of the KL loss are shift-invariant, so the loss and every gradient are those
    of ``target``; but the kernels keep ``lse(10 S) = max + log(sum)`` as one fp32 statistic,
    which for entries of magnitude 1e5 and more rounds the log away (the reference's
    ``log_softmax`` never forms that sum). ``c`` is a constant (detached) and computed without a
    host sync."""
    c = target.detach().amax(dim=(-1, -2), keepdim=True)
    big = torch.isfinite(c) & (c.abs() > KL_SHIFT_FROM)
    return target - torch.where(big, c, torch.zeros_like(c))
