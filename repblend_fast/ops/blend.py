"""Representation blending with implementation dispatch (docs/algorithm.md §4 step 3, §11a).

``blend_pairs`` mixes each row with another row of the same batch, with one permutation and one
coefficient shared by both modalities: ``lam * x + (1 - lam) * x[perm]``. The op is linear in
``x``; its gradient is the transpose ``lam * g + (1 - lam) * scatter_add(g, perm)``, and the
gradient of the transpose is the blend again, so the fused path is two ``autograd.Function`` s that
are each other's backward: differentiable to any order, and usable under ``torch.func.grad`` /
``vjp`` / ``vmap`` (each Function has a ``vmap`` rule that folds the mapped dimension into the ``K``
batch dimension).
"""

from __future__ import annotations

import math

import torch

from repblend_fast.ops._dispatch import resolve_impl, values_readable
from repblend_fast.reference import blend as _ref

__all__ = ["blend_pairs"]

_CHECKS = ("none", "bounds", "full")

# --------------------------------------------------------------------------------------------------
# kernels (Triton or the CUDA extension) on [K, B, D] / [K, B] / [1 | K]


def _lam_tensor(lam: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Coefficient as a ``[1]`` or ``[K]`` tensor in the kernels' accumulation dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(lam, torch.Tensor):
        return lam.detach().reshape(-1).to(device=x.device, dtype=acc).contiguous()
    return torch.full((1,), float(lam), dtype=acc, device=x.device)


def _cuda_ops():
    """The compiled ops (``csrc/blend.cu``); one indirection so tests can stand in for them."""
    return torch.ops.repblend_fast


def _run_kernel(which: str, impl: str, x: torch.Tensor, perm: torch.Tensor, lam) -> torch.Tensor:
    lam_t = _lam_tensor(lam, x)
    x, perm = x.contiguous(), perm.contiguous()
    # Every element is written by the kernel (the tests' ``poison`` fixture checks that).
    out = torch.empty_like(x)
    if impl == "triton":
        from repblend_fast.kernels import blend as kb

        fn = kb.blend_gather if which == "gather" else kb.blend_scatter
        return fn(x, perm, lam_t, out)
    if impl == "cuda":
        getattr(_cuda_ops(), f"blend_{which}")(x, perm, lam_t, out)
        return out
    raise AssertionError(f"unexpected impl {impl!r}")


def _gather_rows(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, -2, perm.unsqueeze(-1).expand(x.shape))


def _lam_view(lam: torch.Tensor) -> torch.Tensor:
    """``[1]`` / ``[K]`` coefficient as ``[K, 1, 1]`` to broadcast on ``[K, B, D]``."""
    return lam.reshape(-1, 1, 1)


def _lam_grad(prod: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Reduce ``prod`` ``[K, B, D]`` to ``lam``'s shape (``[1]`` or ``[K]``) in fp32 or better."""
    acc = torch.float64 if prod.dtype == torch.float64 else torch.float32
    per_k = prod.to(acc).sum(dim=(-2, -1))
    out = per_k.sum().reshape(1) if lam.shape[0] == 1 else per_k
    return out.to(lam.dtype)


def _to_front(t: torch.Tensor, bdim: int | None, size: int) -> torch.Tensor:
    if bdim is None:
        return t.unsqueeze(0).expand(size, *t.shape)
    return t.movedim(bdim, 0)


def _vmap_fold(info, in_dims, x, perm, lam):
    """Fold the vmapped dimension into K: ``x [V, K, B, D] -> [V*K, B, D]`` and alike."""
    V = info.batch_size
    x_d, p_d, l_d = in_dims[:3]
    x = _to_front(x, x_d, V)
    perm = _to_front(perm, p_d, V)
    K, B, D = x.shape[1:]
    x = x.reshape(V * K, B, D)
    perm = perm.expand(V, K, B).reshape(V * K, B)
    if isinstance(lam, torch.Tensor) and not (l_d is None and lam.shape[0] == 1):
        lam = _to_front(lam, l_d, V).expand(V, K).reshape(V * K)
    return V, K, x, perm, lam


class _PermBlendFn(torch.autograd.Function):
    """What :class:`_Gather` and :class:`_Scatter` share: each is the other's transpose, so the
    backward of one applies the other (:attr:`DUAL`), and both are linear in their first input with
    a ``lam`` term of the same form (:meth:`lam_tangent`, :meth:`lam_cotangent`).

    Inputs ``(x, perm, lam, impl)``: ``x [K, B, D]``, ``perm [K, B]``, ``lam`` a float or ``[1]`` /
    ``[K]`` tensor, ``impl`` the kernel to run (``triton`` / ``cuda``)."""

    DUAL: type[_PermBlendFn]
    """Its transpose (set below)."""

    @staticmethod
    def lam_tangent(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """``d out / d lam`` at ``x``."""
        raise NotImplementedError

    @staticmethod
    def lam_cotangent(x: torch.Tensor, g: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """The elementwise product whose sum is ``<g, d out / d lam>`` at ``x``."""
        raise NotImplementedError

    @classmethod
    def setup_context(cls, ctx, inputs, output):
        x, perm, lam, impl = inputs
        ctx.impl = impl
        ctx.lam_is_tensor = isinstance(lam, torch.Tensor)
        ctx.lam_float = None if ctx.lam_is_tensor else lam
        need_lam = ctx.lam_is_tensor and ctx.needs_input_grad[2]
        ctx.save_for_backward(perm, lam if ctx.lam_is_tensor else None, x if need_lam else None)
        ctx.save_for_forward(x, perm, lam if ctx.lam_is_tensor else None)

    @classmethod
    def jvp(cls, ctx, x_t, _perm_t, lam_t, _impl_t):
        x, perm, lam_saved = ctx.saved_tensors
        lam = lam_saved if ctx.lam_is_tensor else ctx.lam_float
        out_t = cls.apply(x_t, perm, lam, ctx.impl) if x_t is not None else torch.zeros_like(x)
        if lam_t is not None:
            out_t = out_t + _lam_view(lam_t) * cls.lam_tangent(x, perm)
        return out_t

    @classmethod
    def backward(cls, ctx, g):
        perm, lam_t, x = ctx.saved_tensors
        lam = lam_t if ctx.lam_is_tensor else ctx.lam_float
        gx = glam = None
        if ctx.needs_input_grad[0]:
            gx = cls.DUAL.apply(g, perm, lam, ctx.impl)
        if ctx.lam_is_tensor and ctx.needs_input_grad[2]:
            glam = _lam_grad(cls.lam_cotangent(x, g, perm), lam_t)
        return gx, None, glam, None

    @classmethod
    def vmap(cls, info, in_dims, x, perm, lam, impl):
        V, K, x, perm, lam = _vmap_fold(info, in_dims, x, perm, lam)
        out = cls.apply(x, perm, lam, impl)
        return out.reshape(V, K, *out.shape[1:]), 0


class _Gather(_PermBlendFn):
    """``out = lam * x + (1 - lam) * x[perm]`` on ``x [K, B, D]``, ``perm [K, B]``, lam float or
    ``[1]`` / ``[K]``."""

    @staticmethod
    def forward(x, perm, lam, impl):
        return _run_kernel("gather", impl, x, perm, lam)

    @staticmethod
    def lam_tangent(x, perm):
        return x - _gather_rows(x, perm)

    @staticmethod
    def lam_cotangent(x, g, perm):
        return g * (x - _gather_rows(x, perm))


class _Scatter(_PermBlendFn):
    """Transpose of :class:`_Gather`: ``out = lam * g + (1 - lam) * scatter_add(g, perm)``."""

    @staticmethod
    def forward(g, perm, lam, impl):
        return _run_kernel("scatter", impl, g, perm, lam)

    @staticmethod
    def lam_tangent(g, perm):
        return g - torch.zeros_like(g).scatter_add(-2, perm.unsqueeze(-1).expand(g.shape), g)

    @staticmethod
    def lam_cotangent(g, gg, perm):
        # d out / d lam = g - scatter_add(g, perm); <gg, scatter_add(g, perm)> = <gg[perm], g>.
        return g * (gg - _gather_rows(gg, perm))


_Gather.DUAL, _Scatter.DUAL = _Scatter, _Gather


# --------------------------------------------------------------------------------------------------
# validation


def _validate(img, txt, perm, lam, check: str) -> None:
    for name, x in (("img", img), ("txt", txt)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"blend_pairs: {name} must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"blend_pairs: {name} must be a floating tensor, got {x.dtype}")
        if x.dim() not in (2, 3):
            raise ValueError(
                f"blend_pairs: {name} must be [B, D] or [K, B, D], got shape {tuple(x.shape)}"
            )
    if img.dim() != txt.dim() or img.shape[:-1] != txt.shape[:-1]:
        raise ValueError(
            "blend_pairs: img and txt must share their leading dims ([B] or [K, B]), got "
            f"{tuple(img.shape)} and {tuple(txt.shape)}"
        )
    batched = img.dim() == 3
    K = img.shape[0] if batched else None
    B = img.shape[-2]
    if not isinstance(perm, torch.Tensor):
        raise ValueError(
            f"blend_pairs: perm must be a torch.long tensor, got {type(perm).__name__}"
        )
    if perm.dtype != torch.long:
        raise ValueError(f"blend_pairs: perm must have dtype torch.long (int64), got {perm.dtype}")
    if perm.dim() not in (1, 2) or perm.shape[-1] != B:
        raise ValueError(
            f"blend_pairs: perm must be [B] or [K, B] with B={B}, got {tuple(perm.shape)}"
        )
    if perm.dim() == 2 and (not batched or perm.shape[0] != K):
        want = f"[{K}, {B}] or [{B}]" if batched else f"[{B}] (img and txt are not batched)"
        raise ValueError(f"blend_pairs: perm must be {want}, got {tuple(perm.shape)}")
    if isinstance(lam, torch.Tensor):
        if not lam.is_floating_point():
            raise ValueError(f"blend_pairs: lam must be a floating tensor, got {lam.dtype}")
        if lam.dim() > 1 or (lam.dim() == 1 and (not batched or lam.shape[0] != K)):
            want = f"[] or [{K}]" if batched else "[] (img and txt are not batched)"
            raise ValueError(
                f"blend_pairs: lam must be a float or a tensor {want}, got {tuple(lam.shape)}"
            )
    elif isinstance(lam, (int, float)) and not isinstance(lam, bool):
        if not (math.isfinite(lam) and 0.0 <= lam <= 1.0):
            raise ValueError(f"blend_pairs: lam must lie in [0, 1], got {lam}")
    else:
        raise ValueError(f"blend_pairs: lam must be a float or a tensor, got {type(lam).__name__}")
    tensors = {"img": img, "txt": txt, "perm": perm}
    if isinstance(lam, torch.Tensor):
        tensors["lam"] = lam
    devices = {n: t.device for n, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"blend_pairs: all tensors must be on one device, got {listing}")
    if check not in _CHECKS:
        raise ValueError(f"blend_pairs: check must be one of {_CHECKS}, got {check!r}")
    _check_values(perm, lam, B, check)


def _check_values(perm: torch.Tensor, lam, B: int, check: str) -> None:
    """Range checks that read tensor values: one host sync for all of them together."""
    if check == "none":
        return
    flags, names = [], []
    if perm.numel() > 0 and values_readable(perm):
        if check == "full":
            ar = torch.arange(B, device=perm.device)
            flags.append((torch.sort(perm, dim=-1).values != ar).any())
        else:
            flags.append((perm.min() < 0) | (perm.max() >= B))
        names.append("perm")
    if isinstance(lam, torch.Tensor) and lam.numel() > 0 and values_readable(lam):
        lam_d = lam.detach()
        flags.append(~((lam_d >= 0) & (lam_d <= 1)).all())
        names.append("lam")
    if not flags:
        return
    bad = torch.stack(flags).tolist()
    for name, is_bad in zip(names, bad):
        if not is_bad:
            continue
        if name == "lam":
            raise ValueError(
                f"blend_pairs: lam must lie in [0, 1], got {lam.detach().cpu().tolist()}"
            )
        if check == "full":
            raise ValueError(f"blend_pairs: perm must hold a permutation of 0..{B - 1} in each row")
        raise ValueError(f"blend_pairs: perm values must lie in [0, {B}) (B={B})")


# --------------------------------------------------------------------------------------------------
# public API


def _blend_fused(x: torch.Tensor, perm: torch.Tensor, lam, impl: str) -> torch.Tensor:
    batched = x.dim() == 3
    x3 = x if batched else x.unsqueeze(0)
    K, B = x3.shape[:2]
    perm2 = perm.expand(K, B) if perm.dim() == 1 else perm
    lam_a = lam.reshape(-1) if isinstance(lam, torch.Tensor) else float(lam)
    out = _Gather.apply(x3, perm2, lam_a, impl)
    return out if batched else out.squeeze(0)


def blend_pairs(
    img: torch.Tensor,
    txt: torch.Tensor,
    perm: torch.Tensor,
    lam: float | torch.Tensor,
    *,
    impl: str = "auto",
    check: str = "bounds",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend image and text representations with one shared permutation and coefficient.

    ``out = lam * x + (1 - lam) * x[perm]`` for ``x`` in (img, txt), along the batch dim ``B``.

    Args:
        img: ``[B, Di]`` or ``[K, B, Di]`` image features (K independent batches).
        txt: ``[B, Dt]`` or ``[K, B, Dt]`` text embeddings, same leading dims as ``img``.
        perm: ``[B]`` (shared by all K) or ``[K, B]`` int64, a permutation of ``0..B-1`` per row.
        lam: python float in ``[0, 1]``, or a tensor ``[]`` / ``[K]`` with values in ``[0, 1]``;
            a tensor that requires grad receives a gradient.
        impl: ``auto`` | ``reference`` | ``triton`` | ``cuda`` (``repblend_fast.ops._dispatch``).
        check: value checks, together one host sync: ``bounds`` (default; perm in ``[0, B)``
            and a tensor lam in ``[0, 1]``), ``full`` (also: each perm row is a permutation), or
            ``none`` (no value checks and no sync: hot loops that draw perm and lam themselves,
            CUDA-graph capture). Values of tensors batched by ``torch.func.vmap`` are never read.

    Returns:
        ``(img_blended, txt_blended)`` with the shapes and dtypes of ``img`` and ``txt``;
        differentiable (to any order) in img, txt and a tensor lam.

    The gradient is the exact transpose ``lam * g + (1 - lam) * scatter_add(g, perm)``, so it is
    also right for an index row with repeats (which only ``check="full"`` rejects).
    """
    _validate(img, txt, perm, lam, check)
    tensors = [img, txt, perm] + ([lam] if isinstance(lam, torch.Tensor) else [])
    which = resolve_impl("blend_pairs", impl, tensors)
    if which == "reference":
        return _ref.blend_pairs(img, txt, perm, lam)
    return _blend_fused(img, perm, lam, which), _blend_fused(txt, perm, lam, which)
