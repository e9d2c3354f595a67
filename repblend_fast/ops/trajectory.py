"""Trajectory distance and the fused TESLA terms, with impl dispatch (docs/algorithm.md §4.4, §5,
§11e).

A parameter vector is one tensor or a sequence of pieces (e.g. a head's W1, b1, W2, b2, gamma, beta)
that together form one flattened vector; the pieces are reduced in place, never concatenated.
The fused paths (Triton, CUDA) make one pass over the inputs and accumulate in fp32 (fp64 for fp64
inputs) with a fixed two-stage reduction (per-block partials, then one fixed-order sum): the results
are bit-identical from run to run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from repblend_fast.ops._dispatch import resolve_impl, values_readable
from repblend_fast.reference import trajectory as _ref
from repblend_fast.reference.trajectory import TrajectoryTerms

__all__ = ["TrajectoryTerms", "trajectory_distance", "trajectory_terms"]

CUDA_CHUNK = 8192
"""Elements per thread block of the CUDA partial-sum kernels (``kChunk`` in csrc/trajectory.cu)."""

Vector = torch.Tensor | Sequence[torch.Tensor]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# validation


def _pieces(op: str, name: str, x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        pieces = [x]
    elif isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        pieces = list(x)
    else:
        raise ValueError(
            f"{op}: {name} must be a tensor or a sequence of tensors, got {type(x).__name__}"
        )
    if not pieces:
        raise ValueError(f"{op}: {name} is an empty sequence; pass at least one tensor")
    for i, p in enumerate(pieces):
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"{op}: {name}[{i}] must be a tensor, got {type(p).__name__}")
        if not p.is_floating_point():
            raise ValueError(f"{op}: {name}[{i}] must be a floating tensor, got {p.dtype}")
    return pieces


def _validate(op: str, named: dict[str, object]) -> list[list[torch.Tensor]]:
    """Pieces of every argument; checks counts, shapes, one dtype and one device."""
    lists = {name: _pieces(op, name, x) for name, x in named.items()}
    (first, ref), *rest = lists.items()
    single = {name: isinstance(named[name], torch.Tensor) for name in named}
    for name, pieces in rest:
        if single[name] != single[first] or len(pieces) != len(ref):
            raise ValueError(
                f"{op}: {name} must have the same structure as {first} (one tensor, or a sequence "
                f"of the same length); got {len(pieces)} piece(s) vs {len(ref)}"
            )
        for i, (p, q) in enumerate(zip(pieces, ref)):
            if p.shape != q.shape:
                raise ValueError(
                    f"{op}: {name}[{i}] has shape {tuple(p.shape)} but {first}[{i}] "
                    f"has {tuple(q.shape)}"
                )
    dtype, device = ref[0].dtype, ref[0].device
    for name, pieces in lists.items():
        for i, p in enumerate(pieces):
            if p.dtype != dtype:
                raise ValueError(
                    f"{op}: {name}[{i}] has dtype {p.dtype} but {first}[0] has {dtype}; "
                    "cast all vectors to one dtype"
                )
            if p.device != device:
                raise ValueError(
                    f"{op}: {name}[{i}] is on {p.device} but {first}[0] is on {device}"
                )
    return list(lists.values())


def _flat(pieces: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    # A view for contiguous pieces; a non-contiguous piece is copied (the kernels read 1-D memory).
    return [p.detach().reshape(-1).contiguous() for p in pieces]


def _identical_error(op: str) -> ValueError:
    return ValueError(
        f"{op}: start and target are identical (||start - target||^2 = 0), so the normalised "
        "distance is undefined; pick expert epochs that differ"
    )


# --------------------------------------------------------------------------------------------------
# fused launchers: lists of contiguous 1-D pieces in, fp32/fp64 scalars out


def _cuda_ops():
    """The compiled ops (``csrc/trajectory.cu``); one indirection so tests can stand in for them."""
    return torch.ops.repblend_fast


def _cuda_partials(nch: int, pieces: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    offsets, total = [], 0
    for p in pieces:
        offsets.append(total)
        total += -(-p.numel() // CUDA_CHUNK)
    shape = (nch, max(total, 1))
    dtype, device = _acc_dtype(pieces[0].dtype), pieces[0].device
    if total == 0:  # every piece is empty: no kernel runs and the sums are zero
        return torch.zeros(shape, dtype=dtype, device=device), offsets
    # Every column is written by one block of the partial kernels (the tests' ``poison`` fixture
    # checks that).
    return torch.empty(shape, dtype=dtype, device=device), offsets


def _distance_sums(impl: str, s, a, t) -> torch.Tensor:
    """``[num, den, num / den]`` in the accumulation dtype."""
    if impl == "triton":
        from repblend_fast.kernels import trajectory as kt

        return kt.distance_sums(s, a, t)
    part, offsets = _cuda_partials(2, s)
    for si, ai, ti, off in zip(s, a, t, offsets):
        if si.numel():
            _cuda_ops().trajectory_distance_partials(si, ai, ti, part, off)
    return _cuda_ops().trajectory_finalize(part, True)


def _terms(impl: str, a, t, g, lr: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    direction = [torch.empty_like(gi) for gi in g]
    if impl == "triton":
        from repblend_fast.kernels import trajectory as kt

        return kt.terms(a, t, g, lr, direction)
    part, offsets = _cuda_partials(3, a)
    for ai, ti, gi, d, off in zip(a, t, g, direction, offsets):
        if gi.numel():
            _cuda_ops().trajectory_terms_partials(ai, ti, gi, lr, d, part, off)
    return _cuda_ops().trajectory_finalize(part, False), direction


class _Distance(torch.autograd.Function):
    """``(num / den, den)`` with ``num = ||s - t||^2``, ``den = ||a - t||^2`` over ``n`` pieces each
    of s, a, t (passed flat as ``tensors``). ``den`` is not differentiable.

    Differentiable w.r.t. the student pieces only; the backward ``2 g (s - t) / den`` is made of
    torch ops, so it is differentiable again (twice differentiable overall).
    """

    @staticmethod
    def forward(impl, check, n, *tensors):
        s, a, t = (_flat(tensors[i * n : (i + 1) * n]) for i in range(3))
        sums = _distance_sums(impl, s, a, t)
        if check and sums[1].item() == 0:
            raise _identical_error("trajectory_distance")
        return sums[2].clone(), sums[1].clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        impl, check, n, *tensors = inputs
        ctx.n = n
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(*tensors[:n], *tensors[2 * n :], output[1])

    @staticmethod
    def backward(ctx, grad, _grad_den):
        n = ctx.n
        saved = ctx.saved_tensors
        s, t, den = saved[:n], saved[n : 2 * n], saved[2 * n]
        grads = [None] * n
        coef = 2 * grad / den
        for i, (si, ti) in enumerate(zip(s, t)):
            if ctx.needs_input_grad[3 + i]:
                grads[i] = (coef * (si.to(coef.dtype) - ti.to(coef.dtype))).to(si.dtype)
        return (None, None, None, *grads) + (None,) * (2 * n)

    @staticmethod
    def vmap(info, in_dims, impl, check, n, *tensors):
        ratios, dens = [], []
        for v in range(info.batch_size):
            args = [x if d is None else x.select(d, v) for x, d in zip(tensors, in_dims[3:])]
            r, d = _Distance.apply(impl, check, n, *args)
            ratios.append(r)
            dens.append(d)
        return (torch.stack(ratios), torch.stack(dens)), (0, 0)


# --------------------------------------------------------------------------------------------------
# public API


def trajectory_distance(
    student: Vector,
    start: Vector,
    target: Vector,
    *,
    impl: str = "auto",
    check: bool = True,
) -> torch.Tensor:
    """Normalised matching loss ``||student - target||^2 / ||start - target||^2`` (docs/algorithm.md
    §4.4).

    Args:
        student: the unrolled student parameters: a tensor (usually 1-D ``[P]``) or a sequence of
            pieces forming one flattened vector (summed over pieces, never concatenated).
        start: the expert's start parameters ``theta0``, same structure, shapes and dtype.
        target: the expert's target parameters ``theta*``, same structure, shapes and dtype.
        impl: ``auto`` | ``reference`` | ``triton`` | ``cuda``.
        check: raise ``ValueError`` when ``start`` equals ``target`` (costs one host sync on a
            scalar; pass False inside CUDA-graph capture, the result is then inf or nan).

    Returns:
        0-d tensor: float32 for bf16/fp16/fp32 inputs (fp32 accumulation), float64 for float64.
        Differentiable (twice) w.r.t. ``student``; ``start`` and ``target`` are constants (the fused
        paths raise if they require grad; use ``impl="reference"`` to differentiate through them).

    Raises:
        ValueError: for vectors with no elements at all (every piece empty), whatever ``check``
            says: the ratio is ``0 / 0``, undefined, and no expert epochs are that short. It is a
            shape check, so it costs no sync. Individual empty pieces are fine (they add zero).
            NaN or infinite inputs are not refused: they propagate into the result as in the
            reference.
    """
    op = "trajectory_distance"
    s, a, t = _validate(op, {"student": student, "start": start, "target": target})
    if sum(p.numel() for p in s) == 0:
        shapes = ", ".join(str(tuple(p.shape)) for p in s)
        raise ValueError(
            f"{op}: student, start and target have no elements (piece shapes {shapes}), so the "
            "normalised distance ||student - target||^2 / ||start - target||^2 = 0 / 0 is "
            "undefined; pass non-empty parameter vectors"
        )
    which = resolve_impl(op, impl, s + a + t)
    if which == "reference":
        out = _ref.trajectory_distance(s, a, t)
        if check and values_readable(out) and not torch.isfinite(out).item():
            den = sum(((ai.double() - ti.double()) ** 2).sum() for ai, ti in zip(a, t))
            if den.item() == 0:
                raise _identical_error(op)
        return out
    for name, pieces in (("start", a), ("target", t)):
        if any(p.requires_grad for p in pieces):
            raise ValueError(
                f"{op}: {name} requires grad, but impl={which!r} differentiates w.r.t. student "
                f"only; detach {name} or use impl='reference'"
            )
    ratio, _ = _Distance.apply(which, check, len(s), *s, *a, *t)
    return ratio


def trajectory_terms(
    start: Vector,
    target: Vector,
    grad_sum: Vector,
    lr: float | torch.Tensor,
    *,
    impl: str = "auto",
    check: bool = True,
) -> TrajectoryTerms:
    """One pass over (theta0, theta*, G) for the TESLA meta-gradient (docs/algorithm.md §5, §11e).

    With ``Delta = target - start`` and ``r = Delta + lr * G``: ``denom = ||Delta||^2``,
    ``num = ||r||^2`` (the unnormalised matching loss of ``theta_T = theta0 - lr G``),
    ``dot = r^T G`` and ``direction = lr * r``.

    Args:
        start: ``theta0``: a tensor (usually 1-D ``[P]``) or a sequence of pieces of one vector.
        target: ``theta*``, same structure, shapes and dtype as ``start``.
        grad_sum: ``G``, the sum of the unroll's parameter gradients, same structure.
        lr: the student learning rate: a python float or a 0-d (or one-element) tensor. It must be
            finite: a non-finite float is refused, and so is a non-finite CPU tensor (outside
            ``vmap``, where its value can be read). A CUDA tensor is not checked, since reading
            it would synchronise the device every call: a NaN or infinite CUDA ``lr`` turns the
            results into NaN / inf instead.
        impl: ``auto`` | ``reference`` | ``triton`` | ``cuda``.
        check: check a CPU tensor ``lr`` for finiteness (reads its value; pass False in a loop
            that must not read values, e.g. the unroll, whose caller checks the results).

    Returns:
        :class:`TrajectoryTerms` ``(denom, num, dot, direction)``: three 0-d tensors (float32 for
        bf16/fp16/fp32 inputs, accumulated in fp32; float64 for float64 inputs) and the direction in
        ``grad_sum``'s dtype with its structure (one tensor, or a list of pieces).
        Nothing is differentiable: the op runs under ``torch.no_grad`` (the TESLA pass 2 uses the
        direction as a constant; the η gradient ``2 dot / denom`` is formed by the caller).
        Vectors with no elements are fine here (unlike :func:`trajectory_distance`, nothing is
        divided): the three sums are 0 and the direction is empty, as in the reference.
    """
    op = "trajectory_terms"
    a, t, g = _validate(op, {"start": start, "target": target, "grad_sum": grad_sum})
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or lr.dim() > 1:
            raise ValueError(
                f"{op}: lr must be a float or a 0-d tensor, got shape {tuple(lr.shape)}"
            )
        if lr.device != a[0].device:
            raise ValueError(f"{op}: lr is on {lr.device} but start is on {a[0].device}")
        # No finiteness check on CUDA: reading the value would synchronise the device.
        if check and lr.device.type == "cpu" and values_readable(lr):
            if not bool(torch.isfinite(lr.detach()).all()):
                raise ValueError(f"{op}: lr must be finite, got {lr.detach().reshape(()).item()}")
    elif isinstance(lr, (int, float)) and not isinstance(lr, bool):
        if not math.isfinite(lr):
            raise ValueError(f"{op}: lr must be finite, got {lr}")
    else:
        raise ValueError(f"{op}: lr must be a float or a 0-d tensor, got {type(lr).__name__}")
    which = resolve_impl(op, impl, a + t + g)
    with torch.no_grad():
        if which == "reference":
            lr_ref = lr.detach().reshape(()) if isinstance(lr, torch.Tensor) else lr
            out = _ref.trajectory_terms(a, t, g, lr_ref)
            direction = out.direction
        else:
            acc = _acc_dtype(a[0].dtype)
            if isinstance(lr, torch.Tensor):
                lr_t = lr.detach().reshape(1).to(acc).contiguous()
            else:
                lr_t = torch.full((1,), float(lr), dtype=acc, device=a[0].device)
            sums, flat_dir = _terms(which, _flat(a), _flat(t), _flat(g), lr_t)
            direction = [d.view(gi.shape) for d, gi in zip(flat_dir, g)]
            out = TrajectoryTerms(sums[0], sums[1], sums[2], direction)
    if isinstance(start, torch.Tensor):
        direction = direction[0] if isinstance(direction, list) else direction
    return TrajectoryTerms(out.denom, out.num, out.dot, direction)
