"""contrastive_loss: reference vs independent formulas, fused (Triton, CUDA) vs reference.

Tolerances are docs/design.md §4. Triton runs through the CPU interpreter here (tests/conftest.py
sets
TRITON_INTERPRET=1), and every Triton output is NaN-poisoned before the kernels write it (the
``poison`` fixture of tests/conftest.py).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from torch.func import grad, jvp, vjp, vmap

from repblend_fast.ops import contrastive as ops
from repblend_fast.ops.contrastive import contrastive_loss
from repblend_fast.reference import contrastive as ref

LOSSES = ref.LOSSES
# (loss, eps): WBCE in both of its forms, every other loss once (eps only affects WBCE).
CASES = [("wbce", 1e-6), ("wbce", 0.0)] + [(name, 1e-6) for name in LOSSES if name != "wbce"]
CASE_IDS = [f"{name}-eps{eps:g}" for name, eps in CASES]
S_PAPER = 1 / 0.07

FP32_FWD = dict(atol=1e-5, rtol=1e-5)
FP32_GRAD = dict(atol=1e-5, rtol=1e-4)
FP32_GRAD2 = dict(atol=1e-5, rtol=1e-3)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Every float torch.empty / empty_like is NaN-filled (tests/conftest.py), so an output or scratch
# element that a kernel forgets to write shows up as NaN.
pytestmark = pytest.mark.usefixtures("poison")


def _inputs(gen, b, d, k=None, dtype=torch.float64, grad_=False, target="rand"):
    lead = () if k is None else (k,)
    img = torch.randn(*lead, b, d, generator=gen, dtype=torch.float64)
    txt = torch.randn(*lead, b, d, generator=gen, dtype=torch.float64)
    if target == "rand":
        tgt = torch.rand(*lead, b, b, generator=gen, dtype=torch.float64)
    elif target == "away":  # keeps the WBCE class mask fixed under finite differences
        r = torch.rand(*lead, b, b, generator=gen, dtype=torch.float64)
        tgt = torch.where(r > 0.5, 0.6 + 0.4 * r, 0.8 * r)
    out = [t.to(dtype).requires_grad_(grad_) for t in (img, txt, tgt)]
    return out


# --------------------------------------------------------------------------------------------------
# reference vs independent float64 formulas (plain math, per element)


def _brute_one(img, txt, tgt, s, loss, eps):
    b = img.shape[0]
    u = [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in img.tolist()]
    v = [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in txt.tolist()]
    z = [[s * sum(a * c for a, c in zip(u[j], v[k])) for k in range(b)] for j in range(b)]
    S = tgt.tolist()
    zt = [[z[k][j] for k in range(b)] for j in range(b)]
    St = [[S[k][j] for k in range(b)] for j in range(b)]

    def sig(x):
        return 1.0 / (1.0 + math.exp(-x))

    def lse(row):
        m = max(row)
        return m + math.log(sum(math.exp(x - m) for x in row))

    if loss == "wbce":
        sums = {True: 0.0, False: 0.0}
        counts = {True: 0, False: 0}
        for j in range(b):
            for k in range(b):
                p, t = sig(z[j][k]), S[j][k]
                if eps > 0:
                    ell = -t * math.log(p + eps) - (1 - t) * math.log(1 - p + eps)
                else:
                    ell = -t * math.log(p) - (1 - t) * math.log(1 - p)
                sums[t > 0.5] += ell
                counts[t > 0.5] += 1
        return 0.5 * (sums[True] / (counts[True] + 1e-6) + sums[False] / (counts[False] + 1e-6))
    if loss in ("infonce", "cwcl"):

        def direction(zz, ss):
            total = 0.0
            for j in range(b):
                lj = lse(zz[j])
                term = sum(ss[j][k] * (zz[j][k] - lj) for k in range(b))
                if loss == "cwcl":  # each row divided by its target mass
                    term /= sum(ss[j]) + 1e-6
                total += term
            return -total / b

        return 0.5 * (direction(z, S) + direction(zt, St))
    if loss == "bce":
        return (
            sum(
                -(S[j][k] * math.log(sig(z[j][k])) + (1 - S[j][k]) * math.log(1 - sig(z[j][k])))
                for j in range(b)
                for k in range(b)
            )
            / b**2
        )
    if loss == "mse":
        return sum((sig(z[j][k]) - S[j][k]) ** 2 for j in range(b) for k in range(b)) / b**2
    if loss == "kl":

        def direction(zz, ss):
            total = 0.0
            for j in range(b):
                lq, lp = lse([10 * x for x in ss[j]]), lse(zz[j])
                for k in range(b):
                    logq = 10 * ss[j][k] - lq
                    total += math.exp(logq) * (logq - (zz[j][k] - lp))
            return total / b**2

        return 0.5 * (direction(z, S) + direction(zt, St))
    raise AssertionError(loss)


@pytest.mark.parametrize("loss,eps", CASES, ids=CASE_IDS)
def test_reference_matches_independent_formulas(gen, loss, eps):
    img, txt, tgt = _inputs(gen, 4, 5, k=2)
    got = ref.contrastive_loss(img, txt, tgt, logit_scale=3.0, loss=loss, eps=eps)
    want = torch.tensor(
        [_brute_one(img[i], txt[i], tgt[i], 3.0, loss, eps) for i in range(2)], dtype=torch.float64
    )
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("loss,eps", CASES, ids=CASE_IDS)
def test_reference_gradcheck_and_gradgradcheck(gen, loss, eps):
    img, txt, tgt = _inputs(gen, 3, 4, grad_=True, target="away")
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    f = lambda i, t, s, c: ref.contrastive_loss(i, t, s, logit_scale=c, loss=loss, eps=eps)
    assert torch.autograd.gradcheck(f, (img, txt, tgt, scale))
    assert torch.autograd.gradgradcheck(f, (img, txt, tgt, scale))


# --------------------------------------------------------------------------------------------------
# Triton (interpreter) vs reference


def _grads(fn, inputs, g, create_graph=False):
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, g, create_graph=create_graph)


@pytest.mark.parametrize("b,d,k", [(1, 17, None), (3, 17, 2), (20, 64, 3), (65, 33, None)])
@pytest.mark.parametrize("loss,eps", CASES, ids=CASE_IDS)
def test_triton_values_and_grads(gen, loss, eps, b, d, k):
    img, txt, tgt = _inputs(gen, b, d, k=k, dtype=torch.float32, grad_=True)
    scale = torch.tensor(S_PAPER, requires_grad=True)
    inputs = (img, txt, tgt, scale)
    g = torch.randn(() if k is None else (k,), generator=gen)
    fused = lambda i, t, s, c: contrastive_loss(
        i, t, s, logit_scale=c, loss=loss, eps=eps, impl="triton"
    )
    plain = lambda i, t, s, c: ref.contrastive_loss(i, t, s, logit_scale=c, loss=loss, eps=eps)
    out_f, grads_f = _grads(fused, inputs, g)
    out_r, grads_r = _grads(plain, inputs, g)
    assert out_f.shape == out_r.shape and out_f.dtype == out_r.dtype
    torch.testing.assert_close(out_f, out_r, **FP32_FWD)
    for name, a, r in zip(("img", "txt", "target", "logit_scale"), grads_f, grads_r):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, r, **FP32_GRAD, msg=lambda m, n=name: f"d_{n}: {m}")


@pytest.mark.parametrize("loss,eps", CASES, ids=CASE_IDS)
def test_triton_second_order(gen, loss, eps):
    img, txt, tgt = _inputs(gen, 5, 17, k=2, dtype=torch.float32, grad_=True)
    scale = torch.tensor(S_PAPER, requires_grad=True)
    inputs = (img, txt, tgt, scale)
    g = torch.randn(2, generator=gen)
    dirs = [torch.randn(t.shape, generator=gen) for t in (img, txt)]
    results = []
    for impl in ("triton", "reference"):
        out = contrastive_loss(img, txt, tgt, logit_scale=scale, loss=loss, eps=eps, impl=impl)
        gi, gt = torch.autograd.grad(out, (img, txt), g, create_graph=True)
        h = (gi * dirs[0]).sum() + (gt * dirs[1]).sum()
        results.append(torch.autograd.grad(h, inputs))
    for name, a, r in zip(("img", "txt", "target", "logit_scale"), *results):
        torch.testing.assert_close(a, r, **FP32_GRAD2, msg=lambda m, n=name: f"d2_{n}: {m}")


@pytest.mark.parametrize("loss,eps", [("wbce", 1e-6), ("infonce", 1e-6), ("kl", 1e-6)])
def test_triton_under_torch_func(gen, loss, eps):
    img, txt, tgt = _inputs(gen, 6, 17, k=3, dtype=torch.float32)

    def f(i, t, s, impl):
        return contrastive_loss(i, t, s, logit_scale=S_PAPER, loss=loss, eps=eps, impl=impl)

    def both(fn):
        return [fn("triton"), fn("reference")]

    # grad over all three inputs, vmapped over K (each sample is a [B, D] problem)
    a, r = both(
        lambda impl: vmap(grad(f, argnums=(0, 1, 2)), in_dims=(0, 0, 0, None))(img, txt, tgt, impl)
    )
    for x, y in zip(a, r):
        torch.testing.assert_close(x, y, **FP32_GRAD)
    # vmap of the forward, with the target shared (not batched)
    a, r = both(lambda impl: vmap(f, in_dims=(0, 0, None, None))(img, txt, tgt[0], impl))
    torch.testing.assert_close(a, r, **FP32_FWD)
    # vjp
    ct = torch.randn(3, generator=gen)
    a, r = both(lambda impl: vjp(lambda i: f(i, txt, tgt, impl), img)[1](ct)[0])
    torch.testing.assert_close(a, r, **FP32_GRAD)
    # jvp, and reverse-mode of a jvp (the TESLA pass-2 directional derivative)
    tan = torch.randn(img.shape, generator=gen)
    a, r = both(lambda impl: jvp(lambda i: f(i, txt, tgt, impl), (img,), (tan,))[1])
    torch.testing.assert_close(a, r, **FP32_GRAD)
    a, r = both(
        lambda impl: grad(lambda t: jvp(lambda i: f(i, t, tgt, impl).sum(), (img,), (tan,))[1])(txt)
    )
    torch.testing.assert_close(a, r, **FP32_GRAD2)
    # grad of grad
    a, r = both(
        lambda impl: grad(lambda t: (grad(lambda i: f(i, t, tgt, impl).sum())(img) * tan).sum())(
            txt
        )
    )
    torch.testing.assert_close(a, r, **FP32_GRAD2)


@pytest.mark.parametrize("loss,eps", CASES, ids=CASE_IDS)
def test_triton_batched_equals_loop(gen, loss, eps):
    img, txt, tgt = _inputs(gen, 7, 24, k=4, dtype=torch.float32)
    f = lambda i, t, s: contrastive_loss(
        i, t, s, logit_scale=S_PAPER, loss=loss, eps=eps, impl="triton"
    )
    batched = f(img, txt, tgt)
    looped = torch.stack([f(img[i], txt[i], tgt[i]) for i in range(4)])
    torch.testing.assert_close(batched, looped, atol=1e-6, rtol=1e-6)


def test_triton_strided_inputs(gen):
    img, txt, tgt = _inputs(gen, 9, 40, k=2, dtype=torch.float32)
    img_s = img[:, :, ::2]  # last-dim stride 2
    txt_s = txt[:, :, 1::2].transpose(0, 1).contiguous().transpose(0, 1)  # K not outermost
    tgt_s = tgt.mT  # column-major target
    for t in (img_s, txt_s, tgt_s):
        t.requires_grad_(True)
    inputs = (img_s, txt_s, tgt_s)
    g = torch.randn(2, generator=gen)
    fused = lambda i, t, s: contrastive_loss(
        i, t, s, logit_scale=S_PAPER, loss="cwcl", impl="triton"
    )
    plain = lambda i, t, s: ref.contrastive_loss(i, t, s, logit_scale=S_PAPER, loss="cwcl")
    out_f, grads_f = _grads(fused, inputs, g)
    out_r, grads_r = _grads(plain, inputs, g)
    torch.testing.assert_close(out_f, out_r, **FP32_FWD)
    for a, r in zip(grads_f, grads_r):
        torch.testing.assert_close(a, r, **FP32_GRAD)


@pytest.mark.parametrize("loss,eps", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_triton_extreme_logits_stay_finite(gen, loss, eps, sign):
    # |cos| -> 1 with s = 100: sigmoid(Z) saturates to 0/1 in fp32.
    b, d = 6, 32
    base = torch.randn(b, d, generator=gen)
    img = base.clone().requires_grad_(True)
    txt = (sign * base + 1e-4 * torch.randn(b, d, generator=gen)).requires_grad_(True)
    tgt = torch.rand(b, b, generator=gen).requires_grad_(True)
    inputs = (img, txt, tgt)
    fused = lambda i, t, s: contrastive_loss(
        i, t, s, logit_scale=100.0, loss=loss, eps=eps, impl="triton"
    )
    plain = lambda i, t, s: ref.contrastive_loss(i, t, s, logit_scale=100.0, loss=loss, eps=eps)
    out_f, grads_f = _grads(fused, inputs, torch.tensor(1.0))
    out_r, grads_r = _grads(plain, inputs, torch.tensor(1.0))
    assert torch.isfinite(out_f)
    assert all(torch.isfinite(x).all() for x in grads_f)
    torch.testing.assert_close(out_f, out_r, **FP32_FWD)
    for a, r in zip(grads_f, grads_r):
        torch.testing.assert_close(a, r, **FP32_GRAD)


@pytest.mark.parametrize("eps", [1e-6, 0.0])
@pytest.mark.parametrize("fill", ["all_positive", "all_negative"])
def test_triton_wbce_one_class_targets(gen, eps, fill):
    img, txt, _ = _inputs(gen, 5, 17, dtype=torch.float32, grad_=True)
    r = torch.rand(5, 5, generator=gen)
    tgt = (0.6 + 0.4 * r if fill == "all_positive" else 0.5 * r).requires_grad_(True)
    inputs = (img, txt, tgt)
    fused = lambda i, t, s: contrastive_loss(i, t, s, logit_scale=S_PAPER, eps=eps, impl="triton")
    plain = lambda i, t, s: ref.contrastive_loss(i, t, s, logit_scale=S_PAPER, eps=eps)
    out_f, grads_f = _grads(fused, inputs, torch.tensor(1.0))
    out_r, grads_r = _grads(plain, inputs, torch.tensor(1.0))
    assert torch.isfinite(out_f)
    torch.testing.assert_close(out_f, out_r, **FP32_FWD)
    for a, r_ in zip(grads_f, grads_r):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r_, **FP32_GRAD)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", ["wbce", "infonce"])
def test_triton_half_inputs(gen, dtype, loss):
    img, txt, tgt = _inputs(gen, 20, 64, k=2, dtype=dtype, grad_=True)
    g = torch.randn(2, generator=gen)
    out = contrastive_loss(img, txt, tgt, logit_scale=S_PAPER, loss=loss, impl="triton")
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, (img, txt, tgt), g.to(dtype))
    # fp32 reference on the same (rounded) inputs
    x32 = [t.detach().float().requires_grad_(True) for t in (img, txt, tgt)]
    out32 = ref.contrastive_loss(*x32, logit_scale=S_PAPER, loss=loss)
    grads32 = torch.autograd.grad(out32, x32, g)
    torch.testing.assert_close(out.float(), out32, atol=1e-2, rtol=1e-2)
    for a, r in zip(grads, grads32):
        assert a.dtype == dtype
        rel_rmse = (a.float() - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt().clamp_min(1e-12)
        assert rel_rmse <= 1e-2, float(rel_rmse)


def test_triton_large_batch_blocks(gen):
    # B > one 64-row tile: exercises the tile loops of every kernel.
    img, txt, tgt = _inputs(gen, 130, 20, dtype=torch.float32, grad_=True)
    for loss in ("infonce", "wbce"):
        out = contrastive_loss(img, txt, tgt, logit_scale=S_PAPER, loss=loss, impl="triton")
        want = ref.contrastive_loss(img, txt, tgt, logit_scale=S_PAPER, loss=loss)
        torch.testing.assert_close(out, want, **FP32_FWD)
        a = torch.autograd.grad(out, (img, txt, tgt))
        r = torch.autograd.grad(want, (img, txt, tgt))
        for x, y in zip(a, r):
            torch.testing.assert_close(x, y, **FP32_GRAD)


def test_triton_zero_row_matches_reference(gen):
    img, txt, tgt = _inputs(gen, 4, 17, dtype=torch.float32)
    img[1] = 0.0
    img.requires_grad_(True)
    txt.requires_grad_(True)
    out = contrastive_loss(img, txt, tgt, logit_scale=S_PAPER, loss="infonce", impl="triton")
    want = ref.contrastive_loss(img, txt, tgt, logit_scale=S_PAPER, loss="infonce")
    torch.testing.assert_close(out, want, **FP32_FWD)
    for a, r in zip(torch.autograd.grad(out, (img, txt)), torch.autograd.grad(want, (img, txt))):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)


def _check_non_finite_like_reference(gen, impl, device, loss, eps):
    """A NaN or an infinity in img, txt or target: the same loss value (NaN, inf, -inf or the same
    finite number) as the reference, and gradients non-finite exactly where the reference's are."""
    b, d = 3, 4
    base = [t.to(device) for t in _inputs(gen, b, d, dtype=torch.float32)]
    for where in range(3):
        for bad in (float("nan"), float("inf"), -float("inf")):
            inputs = [t.clone() for t in base]
            inputs[where][b - 1, 1] = bad
            results = []
            for fn in (
                lambda *x: contrastive_loss(*x, logit_scale=3.0, loss=loss, eps=eps, impl=impl),
                lambda *x: ref.contrastive_loss(*x, logit_scale=3.0, loss=loss, eps=eps),
            ):
                x = [t.clone().requires_grad_(True) for t in inputs]
                out = fn(*x)
                results.append((out, torch.autograd.grad(out, x)))
            (out_f, grads_f), (out_r, grads_r) = results
            case = f"{impl}: {['img', 'txt', 'target'][where]}={bad}"
            torch.testing.assert_close(out_f, out_r, equal_nan=True, **FP32_FWD, msg=case)
            for a, r in zip(grads_f, grads_r):
                assert torch.equal(torch.isfinite(a), torch.isfinite(r)), case


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("loss,eps", CASES, ids=CASE_IDS)
def test_triton_non_finite_inputs_propagate_like_the_reference(gen, loss, eps):
    _check_non_finite_like_reference(gen, "triton", "cpu", loss, eps)


# --------------------------------------------------------------------------------------------------
# dispatch and validation


def test_auto_on_cpu_is_the_reference(gen):
    img, txt, tgt = _inputs(gen, 3, 5)
    got = contrastive_loss(img, txt, tgt, logit_scale=2.0, loss="kl")
    want = ref.contrastive_loss(img, txt, tgt, logit_scale=2.0, loss="kl")
    assert torch.equal(got, want)


def test_explicit_impls_that_cannot_run_raise(gen, monkeypatch):
    img, txt, tgt = _inputs(gen, 3, 5, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="cuda"):
        contrastive_loss(img, txt, tgt, logit_scale=2.0, impl="cuda")
    with pytest.raises(RuntimeError, match="float64"):
        contrastive_loss(img.double(), txt.double(), tgt.double(), logit_scale=2.0, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="triton kernels need CUDA tensors"):
        contrastive_loss(img, txt, tgt, logit_scale=2.0, impl="triton")


def test_loss_ids_and_constants_have_one_definition():
    triton = pytest.importorskip("triton")
    from repblend_fast.kernels import contrastive as kern
    from repblend_fast.kernels import contrastive_backward as kern_bwd
    from repblend_fast.kernels import contrastive_forward as kern_fwd
    from repblend_fast.kernels import contrastive_terms as terms

    assert tuple(ref.LOSS_IDS) == LOSSES
    assert [ref.LOSS_IDS[name] for name in LOSSES] == list(range(len(LOSSES)))
    # The kernels and the ops use the reference's objects, not copies.
    assert kern.LOSS_IDS is ref.LOSS_IDS and ops.LOSS_IDS is ref.LOSS_IDS
    assert terms.SOFTMAX_LOSSES is ref.SOFTMAX_LOSSES
    assert kern.MASS_EPS is ref.MASS_EPS and kern.NORM_EPS is ref.NORM_EPS
    assert terms.MASS_EPS_C.value == ref.MASS_EPS and terms.NORM_EPS_C.value == ref.NORM_EPS
    # One named compile-time flag per loss kind, with the table's id.
    for name, i in ref.LOSS_IDS.items():
        assert getattr(terms, name.upper()).value == i, name
    # No jit function spells the constants or a loss id out as a literal.
    for mod in (kern, kern_fwd, kern_bwd, terms):
        for name in dir(mod):
            fn = getattr(mod, name)
            if isinstance(fn, triton.runtime.jit.JITFunction):
                code = "\n".join(
                    line.split("#")[0]
                    for line in fn.src.splitlines()
                    if not line.strip().startswith("#")
                )
                assert "1e-6" not in code and "1e-12" not in code, name
                assert not re.search(r"LOSS\s*[=!]=\s*\d", code), name


def _cu_source(name: str) -> str:
    with open(os.path.join(ROOT, "csrc", name)) as f:
        return f.read()


def _strip_cpp_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


def test_cuda_loss_ids_and_constants_match_the_python_definitions():
    """csrc/contrastive.cu cannot import Python: its loss constants and eps values are parsed here
    and compared with repblend_fast.reference.contrastive (the one definition)."""
    src = _strip_cpp_comments(_cu_source("contrastive.cu"))
    ids = {
        m.group(1).lower(): int(m.group(2))
        for m in re.finditer(r"constexpr\s+int\s+k([A-Z][a-z]+)\s*=\s*(\d+)\s*;", src)
        if m.group(1).lower() in ref.LOSS_IDS
    }
    assert ids == dict(ref.LOSS_IDS)
    # The host-side range check of the loss id covers exactly the ids.
    first, last = LOSSES[0].capitalize(), LOSSES[-1].capitalize()
    assert re.search(rf"loss >= k{first} && loss <= k{last}\b", src)
    assert f"loss id must be in [0, {len(LOSSES) - 1}]" in src

    def constant(name: str) -> str:
        m = re.search(rf"constexpr\s+float\s+{name}\s*=\s*([0-9.eE+-]+)f\s*;", src)
        assert m is not None, name
        return m.group(1)

    for name, value in (("kMassEps", ref.MASS_EPS), ("kNormEps", ref.NORM_EPS)):
        literal = constant(name)
        assert float(literal) == value, (name, literal, value)
        # Same float32 bits as the value the Triton kernels use.
        assert np.float32(literal) == np.float32(value), name
    # The kernels use the named constants, never the literals.
    body = re.sub(r"constexpr\s+float\s+k(MassEps|NormEps)\s*=[^;]*;", "", src)
    for literal in ("1e-6f", "1e-12f", "1e-6", "1e-12"):
        assert literal not in body, literal


def _bad_calls():
    b, d = 3, 4
    img, txt, tgt = torch.randn(b, d), torch.randn(b, d), torch.rand(b, b)
    return [
        ("img", dict(img=img.numpy()), TypeError),
        ("img must be", dict(img=torch.randn(d)), ValueError),
        ("txt must have 2 dims", dict(txt=torch.randn(1, b, d)), ValueError),
        ("target must have 2 dims", dict(target=torch.rand(b)), ValueError),
        ("txt has B=", dict(txt=torch.randn(b + 1, d)), ValueError),
        ("txt has D=", dict(txt=torch.randn(b, d + 1)), ValueError),
        ("target must be", dict(target=torch.rand(b, b + 1)), ValueError),
        (
            "txt has K=",
            dict(img=img.expand(2, b, d), txt=txt.expand(3, b, d), target=tgt.expand(2, b, b)),
            ValueError,
        ),
        (
            "target has K=",
            dict(img=img.expand(2, b, d), txt=txt.expand(2, b, d), target=tgt.expand(3, b, b)),
            ValueError,
        ),
        (
            "img must have a floating dtype",
            dict(img=torch.ones(b, d, dtype=torch.int64)),
            TypeError,
        ),
        ("txt has dtype", dict(txt=txt.double()), TypeError),
        ("target has dtype", dict(target=tgt.half()), TypeError),
        (
            "B >= 1",
            dict(img=torch.randn(0, d), txt=torch.randn(0, d), target=torch.rand(0, 0)),
            ValueError,
        ),
        ("on one device", dict(txt=txt.to("meta")), ValueError),
        ("loss must be one of", dict(loss="clip"), ValueError),
        ("eps must be finite and >= 0", dict(eps=-1e-6), ValueError),
        ("eps must be a python float", dict(eps="0"), TypeError),
        ("logit_scale must be finite", dict(logit_scale=float("inf")), ValueError),
        ("logit_scale must be finite", dict(logit_scale=torch.tensor(float("nan"))), ValueError),
        (
            "logit_scale must be a python float or a 0-d",
            dict(logit_scale=torch.ones(1)),
            ValueError,
        ),
        ("logit_scale tensor must have a floating", dict(logit_scale=torch.tensor(3)), TypeError),
        ("logit_scale must be a python float", dict(logit_scale="14"), TypeError),
        ("impl must be one of", dict(impl="fast"), ValueError),
    ]


@pytest.mark.parametrize("match,change,exc", _bad_calls(), ids=lambda x: None)
def test_bad_inputs_raise_with_the_argument_named(match, change, exc):
    b, d = 3, 4
    kwargs = dict(
        img=torch.randn(b, d),
        txt=torch.randn(b, d),
        target=torch.rand(b, b),
        logit_scale=2.0,
        loss="wbce",
        eps=1e-6,
        impl="triton",
    )
    kwargs.update(change)
    with pytest.raises(exc, match=match):
        contrastive_loss(kwargs.pop("img"), kwargs.pop("txt"), kwargs.pop("target"), **kwargs)


# --------------------------------------------------------------------------------------------------
# CUDA extension: compile check here, parity on a GPU


def _cuda_home() -> str | None:
    """A CUDA toolkit with nvcc and a linkable libcudart, or None."""
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda"]
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += (
        sorted(
            (
                os.path.join("/usr/local", n)
                for n in os.listdir("/usr/local")
                if n.startswith("cuda-")
            ),
            reverse=True,
        )
        if os.path.isdir("/usr/local")
        else []
    )
    for home in candidates:
        if not home or not os.path.isfile(os.path.join(home, "bin", "nvcc")):
            continue
        if any(os.path.exists(os.path.join(home, lib, "libcudart.so")) for lib in ("lib64", "lib")):
            return home
    return None


_BUILD_SCRIPT = r"""
import sys, torch
from torch.utils.cpp_extension import load
from repblend_fast import _ext
load(name="repblend_contrastive_check", sources=sys.argv[2:], build_directory=sys.argv[1],
     extra_cflags=_ext.CXX_FLAGS, extra_cuda_cflags=_ext.NVCC_FLAGS, is_python_module=False)
for name in ("contrastive_fwd", "contrastive_bwd"):
    print(getattr(torch.ops.repblend_fast, name).default._schema)
"""


@pytest.mark.ext
@pytest.mark.slow  # ~2.5 min of nvcc on a 2-core machine: over this file's CPU time budget
def test_cuda_extension_compiles():
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build: cannot compile the CUDA extension")
    home = _cuda_home()
    if home is None or shutil.which("ninja") is None:
        pytest.skip("nvcc with a linkable libcudart, or ninja, is missing")
    sources = [
        os.path.join(ROOT, "csrc", "contrastive.cu"),
        os.path.join(ROOT, "csrc", "module.cpp"),
    ]
    env = dict(os.environ, CUDA_HOME=home)
    # Compile for one architecture only (no GPU here to pick one; sm_90 is the H100/H200 target).
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    with tempfile.TemporaryDirectory() as tmp:
        # A child process: loading registers torch.ops.repblend_fast.*, which must not collide with
        # a full build of csrc/ loaded by another test in this process.
        proc = subprocess.run(
            [sys.executable, "-c", _BUILD_SCRIPT, tmp, *sources],
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "repblend_fast::contrastive_fwd(Tensor img" in proc.stdout
    assert "repblend_fast::contrastive_bwd(Tensor grad" in proc.stdout


def _gpu_case(k, dtype, gen_seed=0):
    g = torch.Generator(device="cuda").manual_seed(gen_seed)
    img = torch.randn(k, 20, 2304, device="cuda", generator=g).to(dtype).requires_grad_(True)
    txt = torch.randn(k, 20, 2304, device="cuda", generator=g).to(dtype).requires_grad_(True)
    tgt = torch.rand(k, 20, 20, device="cuda", generator=g).to(dtype).requires_grad_(True)
    gout = torch.randn(k, device="cuda", generator=g)
    return img, txt, tgt, gout


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("loss,eps", CASES, ids=CASE_IDS)
def test_gpu_parity(impl, dtype, k, loss, eps):
    img, txt, tgt, gout = _gpu_case(k, dtype)
    scale = torch.tensor(S_PAPER, device="cuda", requires_grad=True)
    inputs = (img, txt, tgt, scale)
    out = contrastive_loss(img, txt, tgt, logit_scale=scale, loss=loss, eps=eps, impl=impl)
    grads = torch.autograd.grad(out, inputs, gout.to(out.dtype))
    x32 = [t.detach().float().requires_grad_(True) for t in inputs]
    want = ref.contrastive_loss(*x32[:3], logit_scale=x32[3], loss=loss, eps=eps)
    want_grads = torch.autograd.grad(want, x32, gout)
    if dtype == torch.float32:
        torch.testing.assert_close(out, want, **FP32_FWD)
        for a, r in zip(grads, want_grads):
            torch.testing.assert_close(a, r, **FP32_GRAD)
        return
    # bf16: fp32 accumulation vs the fp32 reference on the same rounded inputs, and no worse than
    # twice the error of eager bf16 (docs/design.md §4).
    torch.testing.assert_close(out.float(), want, atol=1e-2, rtol=1e-2)
    xb = [t.detach().requires_grad_(True) for t in inputs[:3]]
    eager = ref.contrastive_loss(*xb, logit_scale=S_PAPER, loss=loss, eps=eps)
    eager_grads = torch.autograd.grad(eager, xb, gout.to(dtype))

    def rel_rmse(a, r):
        return float((a.float() - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt().clamp_min(1e-12))

    for a, e, r in zip(grads[:3], eager_grads, want_grads[:3]):
        err, eager_err = rel_rmse(a, r), rel_rmse(e, r)
        assert err <= 1e-2 and err <= 2 * eager_err, (err, eager_err)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("loss,eps", CASES, ids=CASE_IDS)
def test_gpu_non_finite_inputs_propagate_like_the_reference(gen, impl, loss, eps):
    _check_non_finite_like_reference(gen, impl, "cuda", loss, eps)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_gpu_second_order_and_vmap(impl):
    img, txt, tgt, gout = _gpu_case(3, torch.float32, gen_seed=1)
    a = contrastive_loss(img, txt, tgt, logit_scale=S_PAPER, impl=impl)
    r = ref.contrastive_loss(img, txt, tgt, logit_scale=S_PAPER)
    ga = torch.autograd.grad(a, img, gout, create_graph=True)[0]
    gr = torch.autograd.grad(r, img, gout, create_graph=True)[0]
    d = torch.randn_like(img)
    torch.testing.assert_close(
        torch.autograd.grad((ga * d).sum(), txt)[0],
        torch.autograd.grad((gr * d).sum(), txt)[0],
        **FP32_GRAD2,
    )
    f = lambda i, t, s, im: contrastive_loss(i, t, s, logit_scale=S_PAPER, impl=im)
    x = [t.detach() for t in (img, txt, tgt)]
    torch.testing.assert_close(
        vmap(grad(f), in_dims=(0, 0, 0, None))(*x, impl),
        vmap(grad(f), in_dims=(0, 0, 0, None))(*x, "reference"),
        **FP32_GRAD,
    )


def test_poisoning_is_active_for_triton_outputs(monkeypatch):
    """With the kernel that writes the loss skipped, the outputs it owns stay NaN."""
    from repblend_fast.kernels import contrastive as kern

    class _Skip:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(kern, "_loss_kernel", _Skip())
    img, txt, tgt = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.rand(2, 3, 3)
    out, cos, *_, rst, cst, cnt = kern.forward(img, txt, tgt, torch.ones(2), "wbce", 1e-6)
    assert torch.isfinite(cos).all()  # written by the cosine kernel
    for t in (out, rst, cst, cnt):
        assert torch.isnan(t).all()
