"""contrastive_loss, second order: the analytic VJP of the fused first-order backward.

``_ContrastiveBwdFn.backward`` (grad-of-grad, the exact meta-gradient's hot path) is
``_second_order``: written out from the forward's saved statistics and the first-order outputs,
without re-running the reference. Checked here

* in float64, through ``impl="torch"`` (the kernels' formulas in torch, so the
  autograd layer runs in any precision): ``gradcheck`` / ``gradgradcheck`` with random upstream
  gradients, and the second (and third) order against the reference's autograd, for every loss,
  odd shapes (B = 1, 3, 20, 65; D = 17), K-batched and under ``torch.func`` (grad of grad, vmap);
* in fp32 with the Triton kernels (interpreter) as the first order, against the reference
  (docs/design.md §4: second order rtol 1e-3);
* for cost: one forward and one backward kernel call per double backward, no reference call, and
  three batched matrix products.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap
from torch.utils._python_dispatch import TorchDispatchMode

from repblend_fast.ops import contrastive as ops
from repblend_fast.reference import contrastive as ref

CASES = [("wbce", 1e-6), ("wbce", 0.0)] + [(n, 1e-6) for n in ref.LOSSES if n != "wbce"]
CASE_IDS = [f"{name}-eps{eps:g}" for name, eps in CASES]
FP32_GRAD2 = dict(atol=1e-5, rtol=1e-3)
# float64 against the reference's autograd: the same derivatives in another arrangement of the
# arithmetic, so they agree to rounding (a few ulps times the condition of the sums).
F64 = dict(atol=1e-12, rtol=1e-9)
S = 1 / 0.07

pytestmark = pytest.mark.usefixtures("poison")


def _inputs(gen, b, d, k, dtype=torch.float64, target="away"):
    lead = () if k is None else (k,)
    img = torch.randn(*lead, b, d, generator=gen, dtype=torch.float64)
    txt = torch.randn(*lead, b, d, generator=gen, dtype=torch.float64)
    r = torch.rand(*lead, b, b, generator=gen, dtype=torch.float64)
    # "away": targets kept off the WBCE class boundary 0.5, so finite differences do not flip a
    # class mask (the loss is only piecewise smooth there).
    tgt = torch.where(r > 0.5, 0.6 + 0.4 * r, 0.8 * r) if target == "away" else r
    return [t.to(dtype).requires_grad_(True) for t in (img, txt, tgt)]


def _fused(backend, loss, eps):
    """``contrastive_loss`` through the fused autograd layer with ``backend`` (``torch``: the
    kernels' formulas in torch, any dtype; ``triton``: the kernels)."""

    def f(img, txt, tgt, scale):
        single = img.ndim == 2
        if single:
            img, txt, tgt = img[None], txt[None], tgt[None]
        k = img.shape[0]
        sc = scale.reshape(1).expand(k) if isinstance(scale, torch.Tensor) else scale
        if not isinstance(sc, torch.Tensor):
            sc = torch.full((k,), float(sc), dtype=torch.float32)
        out = ops._ContrastiveFn.apply(img, txt, tgt, sc, loss, eps, backend)[0]
        return out[0] if single else out

    return f


def _plain(loss, eps):
    return lambda i, t, s, c: ref.contrastive_loss(i, t, s, logit_scale=c, loss=loss, eps=eps)


def _second_order(fn, inputs, g, dirs):
    """d/d(inputs, g) of <first-order grads, dirs> with upstream gradient ``g``."""
    g = g.clone().requires_grad_(True)
    out = fn(*inputs)
    first = torch.autograd.grad(out, inputs, g, create_graph=True)
    h = sum((a * d).sum() for a, d in zip(first, dirs))
    return torch.autograd.grad(h, (*inputs, g))


# --------------------------------------------------------------------------------------------------
# float64


@pytest.mark.parametrize("loss,eps", CASES, ids=CASE_IDS)
def test_float64_gradcheck_and_gradgradcheck(gen, loss, eps):
    f = _fused("torch", loss, eps)
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    # Full Jacobians on small problems (D = 3 keeps them to a few hundred entries): one pair, and
    # K = 2 problems of B = 3. gradgradcheck draws random upstream gradients for both orders.
    for b, d, k in ((1, 17, None), (3, 3, 2)):
        img, txt, tgt = _inputs(gen, b, d, k)
        assert torch.autograd.gradcheck(f, (img, txt, tgt, scale))
        assert torch.autograd.gradgradcheck(f, (img, txt, tgt, scale))
    # B = 20, D = 17, K = 2 with random projections of the Jacobians (fast_mode; the full ones
    # have 10^6 entries).
    img, txt, tgt = _inputs(gen, 20, 17, 2)
    assert torch.autograd.gradgradcheck(f, (img, txt, tgt, scale), fast_mode=True)


@pytest.mark.parametrize("b,k", [(1, None), (3, 2), (20, None), (65, 3)])
@pytest.mark.parametrize("loss,eps", CASES, ids=CASE_IDS)
def test_float64_second_order_equals_the_reference(gen, loss, eps, b, k):
    img, txt, tgt = _inputs(gen, b, 17, k, target="rand")
    scale = torch.tensor(S, dtype=torch.float64, requires_grad=True)
    inputs = (img, txt, tgt, scale)
    g = torch.randn(() if k is None else (k,), generator=gen, dtype=torch.float64)
    dirs = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in inputs]
    got = _second_order(_fused("torch", loss, eps), inputs, g, dirs)
    want = _second_order(_plain(loss, eps), inputs, g, dirs)
    for name, a, r in zip(("img", "txt", "target", "logit_scale", "g"), got, want):
        torch.testing.assert_close(a, r, **F64, msg=lambda m, n=name: f"d2_{n}: {m}")


@pytest.mark.parametrize("loss,eps", [("wbce", 1e-6), ("cwcl", 1e-6), ("kl", 1e-6)])
def test_float64_third_order_equals_the_reference(gen, loss, eps):
    img, txt, tgt = _inputs(gen, 4, 5, 2, target="rand")
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    inputs = (img, txt, tgt, scale)
    res = []
    for fn in (_fused("torch", loss, eps), _plain(loss, eps)):
        g1 = torch.autograd.grad(fn(*inputs).sum(), (img, txt), create_graph=True)
        h1 = (g1[0] * torch.sin(img)).sum() + g1[1].square().sum()
        g2 = torch.autograd.grad(h1, inputs, create_graph=True)
        g3 = torch.autograd.grad(sum(x.square().sum() for x in g2), inputs)
        res.append(g2 + g3)
    for a, r in zip(*res):
        torch.testing.assert_close(a, r, **F64)


@pytest.mark.parametrize("loss,eps", CASES, ids=CASE_IDS)
def test_float64_under_torch_func(gen, loss, eps):
    img, txt, tgt = (t.detach() for t in _inputs(gen, 6, 17, 3, target="rand"))
    tan = torch.randn(img.shape, generator=gen, dtype=torch.float64)

    def f(fn, i, t, s):
        return fn(i, t, s, 2.5)

    def grad_of_grad(fn):
        # d/dtxt <d loss / d img, tan>, per problem (vmapped over K), and over the batch
        def one(i, t, s):
            return (grad(lambda i_: f(fn, i_, t, s))(i) * tan[0]).sum()

        per_problem = vmap(grad(one, argnums=(0, 1, 2)))(img, txt, tgt)
        batched = grad(lambda t: (grad(lambda i: f(fn, i, t, tgt).sum())(img) * tan).sum())(txt)
        return (*per_problem, batched)

    fused = _fused("torch", loss, eps)
    plain = lambda i, t, s, c: ref.contrastive_loss(i, t, s, logit_scale=c, loss=loss, eps=eps)
    for a, r in zip(grad_of_grad(fused), grad_of_grad(plain)):
        torch.testing.assert_close(a, r, **F64)


def test_float64_zero_row_second_order_is_finite(gen):
    """A zero feature row sits under the normaliser's clamp, where ``N = I / eps`` is constant: its
    second-derivative term is zero, and the result stays finite (torch's norm double backward at 0
    gives NaN in the reference, so only finiteness and the other rows' values are checked)."""
    img, txt, tgt = (t.detach() for t in _inputs(gen, 4, 5, None, target="rand"))
    img[1] = 0.0
    inputs = [t.requires_grad_(True) for t in (img, txt, tgt)]
    g = torch.tensor(0.7, dtype=torch.float64)
    dirs = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in inputs]
    fused = lambda i, t, s: _fused("torch", "infonce", 1e-6)(i, t, s, 2.5)
    got = _second_order(fused, inputs, g, dirs)
    assert all(torch.isfinite(x).all() for x in got)


# --------------------------------------------------------------------------------------------------
# fp32, Triton kernels (interpreter) as the first order


@pytest.mark.parametrize("b,k", [(1, None), (65, 2)])  # B = 5, K = 2: tests/test_contrastive.py
@pytest.mark.parametrize("loss,eps", CASES, ids=CASE_IDS)
def test_triton_second_order_odd_shapes(gen, loss, eps, b, k):
    pytest.importorskip("triton")
    img, txt, tgt = _inputs(gen, b, 17, k, dtype=torch.float32, target="rand")
    scale = torch.tensor(S, requires_grad=True)
    inputs = (img, txt, tgt, scale)
    g = torch.randn(() if k is None else (k,), generator=gen)
    dirs = [torch.randn(x.shape, generator=gen) for x in inputs]
    got = _second_order(_fused("triton", loss, eps), inputs, g, dirs)
    want = _second_order(_plain(loss, eps), inputs, g, dirs)
    for name, a, r in zip(("img", "txt", "target", "logit_scale", "g"), got, want):
        torch.testing.assert_close(a, r, **FP32_GRAD2, msg=lambda m, n=name: f"d2_{n}: {m}")


# --------------------------------------------------------------------------------------------------
# cost


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("loss,eps", CASES, ids=CASE_IDS)
def test_double_backward_reruns_neither_forward_nor_backward(gen, loss, eps, monkeypatch):
    img, txt, tgt = _inputs(gen, 7, 17, 2, dtype=torch.float32, target="rand")
    calls = {"forward": 0, "backward": 0}
    real_fwd, real_bwd = ops._fused_forward, ops._fused_backward

    def fwd(*a, **kw):
        calls["forward"] += 1
        return real_fwd(*a, **kw)

    def bwd(*a, **kw):
        calls["backward"] += 1
        return real_bwd(*a, **kw)

    def no_reference(*a, **kw):
        raise AssertionError("the double backward ran the reference")

    monkeypatch.setattr(ops, "_fused_forward", fwd)
    monkeypatch.setattr(ops, "_fused_backward", bwd)
    monkeypatch.setattr(ops, "_ref_loss32", no_reference)
    out = _fused("torch", loss, eps)(img, txt, tgt, S)
    gi, gt = torch.autograd.grad(out.sum(), (img, txt), create_graph=True)
    h = (gi * torch.randn(gi.shape, generator=gen)).sum() + (gt * gt).sum()
    with _CountOps() as counter:
        d2 = torch.autograd.grad(h, (img, txt, tgt))
    assert calls == {"forward": 1, "backward": 1}
    assert all(torch.isfinite(x).all() for x in d2)
    # Gamma_P and the two sides: three batched products, each [B, B] x [B, 2D]-sized.
    products = [o for o in counter.ops if o in ("mm", "bmm", "matmul", "addmm", "baddbmm")]
    assert len(products) == 3, counter.ops
