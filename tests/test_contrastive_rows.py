"""contrastive_loss, row-parallel kernels (large B, few problems).

``repblend_fast.ops.contrastive.row_parallel(K, B)`` sends a call to the row-parallel grid (row
blocks x problems, per-block partial sums, one fixed-order combine) from ``ROW_PARALLEL_MIN_B``
rows on, while ``K < ROW_PARALLEL_MAX_K``. Checked here through the Triton interpreter (CPU):

* the rule and that both launchers receive it;
* every loss, values and first/second-order gradients against the reference, with the threshold
  lowered so that odd small shapes (B = 1, 3, 65, 130) take the row-parallel path, outputs
  NaN-poisoned (``poison`` fixture) so a slot no program writes shows up;
* non-finite inputs propagate as in the reference on this path too;
* B = 512 (and 1,024, ``slow``) at the real threshold: parity with the reference and the same bits
  in two runs.

GPU parity of both fused backends on this path is in the ``gpu`` tests at the end.
"""

from __future__ import annotations

import pytest
import torch

from repblend_fast.ops import contrastive as ops
from repblend_fast.ops.contrastive import contrastive_loss
from repblend_fast.reference import contrastive as ref

pytest.importorskip("triton")

CASES = [("wbce", 1e-6), ("wbce", 0.0)] + [(n, 1e-6) for n in ref.LOSSES if n != "wbce"]
CASE_IDS = [f"{name}-eps{eps:g}" for name, eps in CASES]
FP32_FWD = dict(atol=1e-5, rtol=1e-5)
FP32_GRAD = dict(atol=1e-5, rtol=1e-4)
FP32_GRAD2 = dict(atol=1e-5, rtol=1e-3)
S = 1 / 0.07

pytestmark = pytest.mark.usefixtures("poison")


@pytest.fixture
def rows_always(monkeypatch):
    """Every call takes the row-parallel path, whatever its B."""
    monkeypatch.setattr(ops, "ROW_PARALLEL_MIN_B", 1)


def _inputs(gen, b, d, k=None, dtype=torch.float32):
    lead = () if k is None else (k,)
    img = torch.randn(*lead, b, d, generator=gen)
    txt = torch.randn(*lead, b, d, generator=gen)
    tgt = torch.rand(*lead, b, b, generator=gen)
    return [t.to(dtype).requires_grad_(True) for t in (img, txt, tgt)]


def _both(inputs, g, loss, eps, impl="triton", order=1, dirs=None):
    """(value, first-order grads[, second-order grads]) for ``impl`` and for the reference."""
    results = []
    for which in (impl, "reference"):
        out = contrastive_loss(*inputs, logit_scale=S, loss=loss, eps=eps, impl=which)
        grads = torch.autograd.grad(out, inputs, g, create_graph=order > 1)
        res = [out.detach(), [x.detach() for x in grads]]
        if order > 1:
            h = sum((a * d).sum() for a, d in zip(grads, dirs))
            res.append(torch.autograd.grad(h, inputs))
        results.append(res)
    return results


# --------------------------------------------------------------------------------------------------
# the rule


def test_rule_and_threshold():
    assert ops.ROW_PARALLEL_MIN_B == 128 and ops.ROW_PARALLEL_MAX_K == 256
    assert not ops.row_parallel(1, 127)
    assert ops.row_parallel(1, 128) and ops.row_parallel(8, 2048)
    assert ops.row_parallel(255, 512) and not ops.row_parallel(256, 512)


@pytest.mark.parametrize("b,want", [(20, False), (128, True)])
def test_both_launchers_get_the_rule(gen, monkeypatch, b, want):
    from repblend_fast.kernels import contrastive as kern

    seen = []
    for name in ("forward", "backward"):
        real = getattr(kern, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, kwargs["row_parallel"]))
            return _real(*args, **kwargs)

        monkeypatch.setattr(kern, name, spy)
    img, txt, tgt = _inputs(gen, b, 4, k=2)
    out = contrastive_loss(img, txt, tgt, logit_scale=S, impl="triton")
    torch.autograd.grad(out.sum(), (img, txt))
    assert seen == [("forward", want), ("backward", want)]


# --------------------------------------------------------------------------------------------------
# small shapes on the row-parallel path


@pytest.mark.parametrize("b,d,k", [(1, 17, None), (3, 17, 2), (65, 17, None), (130, 9, 2)])
@pytest.mark.parametrize("loss,eps", CASES, ids=CASE_IDS)
def test_values_and_grads(gen, rows_always, loss, eps, b, d, k):
    inputs = _inputs(gen, b, d, k)
    g = torch.randn(() if k is None else (k,), generator=gen)
    (out_f, grads_f), (out_r, grads_r) = _both(inputs, g, loss, eps)
    torch.testing.assert_close(out_f, out_r, **FP32_FWD)
    for name, a, r in zip(("img", "txt", "target"), grads_f, grads_r):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, r, **FP32_GRAD, msg=lambda m, n=name: f"d_{n}: {m}")


@pytest.mark.parametrize("loss,eps", [("wbce", 1e-6), ("cwcl", 1e-6), ("kl", 1e-6)])
def test_second_order(gen, rows_always, loss, eps):
    inputs = _inputs(gen, 70, 17, k=2)
    g = torch.randn(2, generator=gen)
    dirs = [torch.randn(x.shape, generator=gen) for x in inputs]
    (_, _, d2_f), (_, _, d2_r) = _both(inputs, g, loss, eps, order=2, dirs=dirs)
    for a, r in zip(d2_f, d2_r):
        torch.testing.assert_close(a, r, **FP32_GRAD2)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("loss,eps", CASES, ids=CASE_IDS)
def test_non_finite_inputs_propagate_like_the_reference(gen, rows_always, loss, eps):
    b, d = 3, 4
    base = [t.detach() for t in _inputs(gen, b, d)]
    for where in range(3):
        for bad in (float("nan"), float("inf"), -float("inf")):
            inputs = [t.clone() for t in base]
            inputs[where][b - 1, 1] = bad
            inputs = [t.requires_grad_(True) for t in inputs]
            (out_f, grads_f), (out_r, grads_r) = _both(inputs, torch.tensor(1.0), loss, eps)
            case = f"{['img', 'txt', 'target'][where]}={bad}"
            torch.testing.assert_close(out_f, out_r, equal_nan=True, **FP32_FWD, msg=case)
            for a, r in zip(grads_f, grads_r):
                assert torch.equal(torch.isfinite(a), torch.isfinite(r)), case


def test_partials_are_poisoned_until_the_combine_writes(monkeypatch):
    """With the combine skipped, the loss and the counts stay NaN: nothing but the combine writes
    them, and the partial buffer starts as poison too."""
    from repblend_fast.kernels import contrastive as kern

    class _Skip:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(kern, "_loss_final_kernel", _Skip())
    img, txt, tgt = torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.rand(2, 5, 5)
    for loss in ("wbce", "infonce"):
        out, *_, cnt = kern.forward(img, txt, tgt, torch.ones(2), loss, 1e-6, row_parallel=True)
        assert torch.isnan(out).all() and torch.isnan(cnt).all()


# --------------------------------------------------------------------------------------------------
# large B at the real threshold (interpreter; small D keeps it to seconds)


def _parity_and_bits(gen, b, loss, eps):
    assert ops.row_parallel(1, b)
    inputs = _inputs(gen, b, 8)
    g = torch.tensor(0.7)
    (out_f, grads_f), (out_r, grads_r) = _both(inputs, g, loss, eps)
    torch.testing.assert_close(out_f, out_r, **FP32_FWD)
    for a, r in zip(grads_f, grads_r):
        torch.testing.assert_close(a, r, **FP32_GRAD)
    out = contrastive_loss(*inputs, logit_scale=S, loss=loss, eps=eps, impl="triton")
    again = torch.autograd.grad(out, inputs, g)
    assert torch.equal(out.detach(), out_f)
    for a, b_ in zip(again, grads_f):
        assert torch.equal(a, b_), "two runs differ"


@pytest.mark.parametrize("loss,eps", [("infonce", 1e-6), ("wbce", 1e-6)])
def test_b512_parity_and_bit_identical(gen, loss, eps):
    _parity_and_bits(gen, 512, loss, eps)


@pytest.mark.slow  # 20-30 s per loss in the interpreter on a loaded 2-core machine
@pytest.mark.parametrize("loss,eps", CASES, ids=CASE_IDS)
def test_b1024_parity_and_bit_identical(gen, loss, eps):
    _parity_and_bits(gen, 1024, loss, eps)


# --------------------------------------------------------------------------------------------------
# GPU: both fused backends, both grids, against the reference


# fp32 at B = 512 (K = 1) and 1,024 (K = 3) for every loss; bf16 for one softmax and one
# elementwise loss.
_GPU = [(torch.float32, 512, 1, *c) for c in CASES] + [(torch.float32, 1024, 3, *c) for c in CASES]
_GPU += [(torch.bfloat16, 1024, 1, n, 1e-6) for n in ("wbce", "infonce")]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize(
    "dtype,b,k,loss,eps",
    _GPU,
    ids=[f"{str(c[0])[6:]}-B{c[1]}-K{c[2]}-{c[3]}-{c[4]:g}" for c in _GPU],
)
def test_gpu_row_parallel_parity_and_bits(impl, dtype, b, k, loss, eps):
    assert ops.row_parallel(k, b)
    g = torch.Generator(device="cuda").manual_seed(b + k)
    x = [
        torch.randn(k, b, 256, device="cuda", generator=g),
        torch.randn(k, b, 256, device="cuda", generator=g),
        torch.rand(k, b, b, device="cuda", generator=g),
    ]
    inputs = [t.to(dtype).requires_grad_(True) for t in x]
    gout = torch.randn(k, device="cuda", generator=g)
    out = contrastive_loss(*inputs, logit_scale=S, loss=loss, eps=eps, impl=impl)
    grads = torch.autograd.grad(out, inputs, gout.to(out.dtype))
    x32 = [t.detach().float().requires_grad_(True) for t in inputs]
    want = ref.contrastive_loss(*x32, logit_scale=S, loss=loss, eps=eps)
    want_grads = torch.autograd.grad(want, x32, gout)
    if dtype == torch.float32:
        # TF32 is off by default for matmuls, so the IEEE fp32 rows of docs/design.md §4 apply.
        torch.testing.assert_close(out, want, **FP32_FWD)
        for a, r in zip(grads, want_grads):
            torch.testing.assert_close(a, r, **FP32_GRAD)
    else:
        torch.testing.assert_close(out.float(), want, atol=1e-2, rtol=1e-2)
        for a, r in zip(grads, want_grads):
            err = (a.float() - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt().clamp_min(1e-12)
            assert err <= 1e-2, float(err)
    out2 = contrastive_loss(*inputs, logit_scale=S, loss=loss, eps=eps, impl=impl)
    grads2 = torch.autograd.grad(out2, inputs, gout.to(out.dtype))
    assert torch.equal(out, out2)
    for a, b_ in zip(grads, grads2):
        assert torch.equal(a, b_), "two runs differ"


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("loss,eps", CASES, ids=CASE_IDS)
def test_gpu_row_parallel_equals_per_problem_grid(monkeypatch, impl, loss, eps):
    """The two grids compute the same numbers (up to the order of the final sums)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    inputs = [
        torch.randn(2, 300, 64, device="cuda", generator=g).requires_grad_(True),
        torch.randn(2, 300, 64, device="cuda", generator=g).requires_grad_(True),
        torch.rand(2, 300, 300, device="cuda", generator=g).requires_grad_(True),
    ]
    res = []
    for min_b in (1, 10**9):
        monkeypatch.setattr(ops, "ROW_PARALLEL_MIN_B", min_b)
        out = contrastive_loss(*inputs, logit_scale=S, loss=loss, eps=eps, impl=impl)
        res.append((out, *torch.autograd.grad(out.sum(), inputs)))
    for a, b_ in zip(*res):
        torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-5)
