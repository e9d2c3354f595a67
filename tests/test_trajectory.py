"""trajectory_distance / trajectory_terms: reference vs independent float64 sums, fused (Triton
interpreter) vs reference, fp32 accumulation for low-precision inputs, determinism, autograd,
torch.func, validation and dispatch (docs/design.md §4)."""

from __future__ import annotations

import pytest
import torch

from repblend_fast.ops import TrajectoryTerms, trajectory_distance, trajectory_terms
from repblend_fast.ops._dispatch import triton_interpret
from repblend_fast.reference import trajectory as ref

# CPU tests run the Triton kernels through the interpreter; on a GPU run (REPBLEND_TEST_GPU=1)
# the interpreter is off and the gpu-marked tests cover the fused paths instead.
FUSED = ["triton"] if triton_interpret() else []
# Pieces of different lengths (odd sizes, one 2-D piece, a single element).
PIECE_SHAPES = [(3, 5), (17,), (1000,), (4099,), (1,)]


# The direction output and the partial-sum buffers are NaN-filled before the kernels write them
# (every float torch.empty / empty_like is, through the ``poison`` fixture of tests/conftest.py).
pytestmark = pytest.mark.usefixtures("poison")


def _vec(gen, shapes, dtype=torch.float32, scale=1.0):
    return [(scale * torch.randn(s, generator=gen)).to(dtype) for s in shapes]


def _triple(gen, shapes, dtype=torch.float32):
    start = _vec(gen, shapes, dtype)
    target = [a + 0.5 * torch.randn(a.shape, generator=gen).to(dtype) for a in start]
    student = [a + 0.3 * torch.randn(a.shape, generator=gen).to(dtype) for a in start]
    return student, start, target


def _flat64(pieces) -> torch.Tensor:
    return torch.cat([p.double().reshape(-1) for p in pieces])


def _truth_distance(student, start, target) -> float:
    s, a, t = _flat64(student), _flat64(start), _flat64(target)
    return float(torch.dot(s - t, s - t) / torch.dot(a - t, a - t))


def _truth_terms(start, target, grad, lr: float):
    a, t, g = _flat64(start), _flat64(target), _flat64(grad)
    delta = t - a
    r = delta + lr * g
    return float(delta @ delta), float(r @ r), float(r @ g), lr * r


# --------------------------------------------------------------------------------------------------
# reference


@pytest.mark.parametrize("pieces", [False, True])
def test_reference_matches_float64_truth(gen, pieces):
    shapes = PIECE_SHAPES if pieces else [(513,)]
    s, a, t = _triple(gen, shapes, torch.float64)
    args = (s, a, t) if pieces else (s[0], a[0], t[0])
    got = ref.trajectory_distance(*args)
    assert got.dtype == torch.float64
    assert abs(float(got) - _truth_distance(s, a, t)) <= 1e-12 * _truth_distance(s, a, t)
    g = _vec(gen, shapes, torch.float64)
    terms = ref.trajectory_terms(
        a if pieces else a[0], t if pieces else t[0], g if pieces else g[0], 0.1
    )
    den, num, dot, direction = _truth_terms(a, t, g, 0.1)
    torch.testing.assert_close(terms.denom.item(), den, rtol=1e-12, atol=0)
    torch.testing.assert_close(terms.num.item(), num, rtol=1e-12, atol=0)
    torch.testing.assert_close(terms.dot.item(), dot, rtol=1e-12, atol=1e-12)
    got_dir = _flat64(terms.direction if pieces else [terms.direction])
    torch.testing.assert_close(got_dir, direction, rtol=1e-12, atol=1e-14)


def test_reference_gradcheck_and_gradgradcheck(gen):
    s, a, t = _triple(gen, [(3, 2), (5,)], torch.float64)
    s = [p.requires_grad_() for p in s]
    fn = lambda *st: ref.trajectory_distance(list(st), a, t)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(s))
    assert torch.autograd.gradgradcheck(fn, tuple(s))


# --------------------------------------------------------------------------------------------------
# fused vs reference


@pytest.mark.parametrize("impl", FUSED)
def test_fused_gradcheck_and_gradgradcheck_float64(gen, impl):
    s, a, t = _triple(gen, [(3, 2), (5,), (1,)], torch.float64)
    s = [p.requires_grad_() for p in s]
    fn = lambda *st: trajectory_distance(list(st), a, t, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(s))
    assert torch.autograd.gradgradcheck(fn, tuple(s))


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("shapes", [[(1,)], [(17,)], [(1000,)], [(4099,)], PIECE_SHAPES])
def test_fused_distance_matches_reference_values_and_grads(gen, impl, shapes):
    s, a, t = _triple(gen, shapes)
    single = len(shapes) == 1
    pack = (lambda v: v[0]) if single else (lambda v: v)
    s_f = [p.clone().requires_grad_() for p in s]
    s_r = [p.clone().requires_grad_() for p in s]
    got = trajectory_distance(pack(s_f), pack(a), pack(t), impl=impl)
    want = ref.trajectory_distance(pack(s_r), pack(a), pack(t))
    assert got.dtype == want.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    up = torch.randn((), generator=gen)
    got_g = torch.autograd.grad(got, s_f, up)
    want_g = torch.autograd.grad(want, s_r, up)
    for x, y, p in zip(got_g, want_g, s):
        assert x.shape == p.shape and x.dtype == p.dtype
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", FUSED)
def test_fused_second_order(gen, impl):
    s, a, t = _triple(gen, [(7, 3), (40,)])
    v = _vec(gen, [(7, 3), (40,)])

    def hvp(fn):
        st = [p.clone().requires_grad_() for p in s]
        loss = fn(st, a, t) ** 2
        gs = torch.autograd.grad(loss, st, create_graph=True)
        return torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(gs, v)), st)

    got = hvp(lambda *x: trajectory_distance(*x, impl=impl))
    want = hvp(ref.trajectory_distance)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("shapes", [[(4099,)], PIECE_SHAPES])
def test_fused_terms_match_reference(gen, impl, lr_kind, shapes):
    _, a, t = _triple(gen, shapes)
    g = _vec(gen, shapes, scale=2.0)
    lr = 0.0731 if lr_kind == "float" else torch.tensor(0.0731)
    single = len(shapes) == 1
    pack = (lambda v: v[0]) if single else (lambda v: v)
    got = trajectory_terms(pack(a), pack(t), pack(g), lr, impl=impl)
    want = ref.trajectory_terms(pack(a), pack(t), pack(g), lr)
    assert isinstance(got, TrajectoryTerms)
    for name in ("denom", "num", "dot"):
        x, y = getattr(got, name), getattr(want, name)
        assert x.dtype == y.dtype == torch.float32 and x.shape == ()
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    if single:
        assert isinstance(got.direction, torch.Tensor)
        got_dir, want_dir = [got.direction], [want.direction]
    else:
        assert isinstance(got.direction, list) and len(got.direction) == len(shapes)
        got_dir, want_dir = got.direction, want.direction
    for x, y, p in zip(got_dir, want_dir, g):
        assert x.shape == p.shape and x.dtype == p.dtype
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", *FUSED])
def test_terms_are_not_differentiable(gen, impl):
    _, a, t = _triple(gen, [(33,)])
    g = _vec(gen, [(33,)])[0].requires_grad_()
    lr = torch.tensor(0.1, requires_grad=True)
    out = trajectory_terms(a[0], t[0], g, lr, impl=impl)
    assert not any(x.requires_grad for x in (out.denom, out.num, out.dot, out.direction))


@pytest.mark.parametrize("impl", FUSED)
def test_float64_inputs_give_float64(gen, impl):
    s, a, t = _triple(gen, PIECE_SHAPES, torch.float64)
    got = trajectory_distance(s, a, t, impl=impl)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.item(), _truth_distance(s, a, t), rtol=1e-12, atol=0)
    g = _vec(gen, PIECE_SHAPES, torch.float64)
    terms = trajectory_terms(a, t, g, 0.1, impl=impl)
    den, num, dot, direction = _truth_terms(a, t, g, 0.1)
    assert terms.denom.dtype == torch.float64 and terms.direction[0].dtype == torch.float64
    torch.testing.assert_close(terms.num.item(), num, rtol=1e-12, atol=0)
    torch.testing.assert_close(_flat64(terms.direction), direction, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------------
# accumulation precision, determinism, poisoning

N_BIG = 150_001  # ~1.5e5 elements: the interpreter stays fast, fp32 summation error is visible


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp32_accumulation_against_float64_truth(gen, impl, dtype):
    # Pieces of uneven lengths summing to N_BIG; truth is float64 over the (rounded) input values,
    # so only the accumulation error is measured: fp32 accumulation meets 1e-5, bf16 would not.
    shapes = [(N_BIG - 70_000 - 3,), (70_000,), (3,)]
    s, a, t = _triple(gen, shapes, dtype)
    got = trajectory_distance(s, a, t, impl=impl)
    assert got.dtype == torch.float32
    truth = _truth_distance(s, a, t)
    assert abs(got.item() - truth) <= 1e-5 * abs(truth)
    g = _vec(gen, shapes, dtype)
    terms = trajectory_terms(a, t, g, 0.25, impl=impl)
    den, num, dot, _ = _truth_terms(a, t, g, 0.25)
    assert abs(terms.denom.item() - den) <= 1e-5 * abs(den)
    assert abs(terms.num.item() - num) <= 1e-5 * abs(num)
    # dot is a signed sum: scale its tolerance by the sum of absolute terms
    r = _flat64(t) - _flat64(a) + 0.25 * _flat64(g)
    assert abs(terms.dot.item() - dot) <= 1e-5 * float((r * _flat64(g)).abs().sum())
    assert all(d.dtype == dtype for d in terms.direction)


@pytest.mark.parametrize("impl", FUSED)
def test_bit_identical_across_runs(gen, impl):
    s, a, t = _triple(gen, [(N_BIG,), (4099,)])
    g = _vec(gen, [(N_BIG,), (4099,)])
    d1 = trajectory_distance(s, a, t, impl=impl)
    d2 = trajectory_distance(s, a, t, impl=impl)
    assert torch.equal(d1.view(torch.int32), d2.view(torch.int32))
    t1 = trajectory_terms(a, t, g, 0.1, impl=impl)
    t2 = trajectory_terms(a, t, g, 0.1, impl=impl)
    for x, y in zip(t1[:3], t2[:3]):
        assert torch.equal(x.view(torch.int32), y.view(torch.int32))
    for x, y in zip(t1.direction, t2.direction):
        assert torch.isfinite(x).all()
        assert torch.equal(x, y)


@pytest.mark.skipif(not triton_interpret(), reason="runs Triton on CPU tensors (interpreter)")
def test_partials_are_poisoned_before_the_kernels_write_them(monkeypatch):
    from repblend_fast.kernels import trajectory as kt

    pieces = [torch.randn(kt.CHUNK + 1), torch.randn(5)]
    buf, offsets = kt._partials(3, pieces)
    assert buf.shape == (3, 3) and offsets == [0, 2]
    assert torch.isnan(buf).all()
    # A block that is never written shows up as NaN in the result, not as stale memory.
    assert torch.isnan(kt._finalize(buf, 3, ratio=False)).all()

    # With the partial kernel skipped, the op's sums and direction stay NaN.
    class _Skip:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(kt, "_terms_partial_kernel", _Skip())
    out = trajectory_terms(pieces, pieces, pieces, 0.1, impl="triton")
    assert torch.isnan(out.denom) and torch.isnan(out.num) and torch.isnan(out.dot)
    assert all(torch.isnan(d).all() for d in out.direction)


def test_all_empty_partials_are_zero_not_poison():
    from repblend_fast.ops import trajectory as ops_traj

    buf, offsets = ops_traj._cuda_partials(2, [torch.empty(0), torch.empty(0)])
    assert buf.shape == (2, 1) and offsets == [0, 0] and torch.equal(buf, torch.zeros(2, 1))


@pytest.mark.parametrize("impl", ["reference", *FUSED])
@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize("shapes", [[(0,)], [(0, 3), (0,)]])
def test_empty_vectors_are_refused_by_the_distance(impl, check, shapes):
    # 0 / 0 is undefined: a ValueError that names the arguments, not "start and target are
    # identical" (the two are empty, not equal expert epochs), whatever check says.
    s, a, t = ([torch.empty(sh) for sh in shapes] for _ in range(3))
    pack = (lambda v: v[0]) if len(shapes) == 1 else (lambda v: v)
    with pytest.raises(ValueError, match="student, start and target have no elements"):
        trajectory_distance(pack(s), pack(a), pack(t), impl=impl, check=check)


@pytest.mark.parametrize("impl", ["reference", *FUSED])
def test_empty_vectors_give_zero_terms(impl):
    # The terms are sums with nothing divided: zeros and an empty direction, as in the reference.
    a, t, g = (torch.empty(0) for _ in range(3))
    got = trajectory_terms(a, t, g, 0.1, impl=impl)
    want = ref.trajectory_terms(a, t, g, 0.1)
    for name in ("denom", "num", "dot"):
        x, y = getattr(got, name), getattr(want, name)
        assert x.dtype == y.dtype == torch.float32 and x.item() == y.item() == 0.0
    assert got.direction.shape == (0,)


@pytest.mark.parametrize("impl", ["reference", *FUSED])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_tensor_lr_is_refused(gen, impl, bad):
    _, a, t = _triple(gen, [(6,)])
    with pytest.raises(ValueError, match="lr must be finite"):
        trajectory_terms(a, t, a, torch.tensor(bad), impl=impl)
    with pytest.raises(ValueError, match="lr must be finite"):
        trajectory_terms(a, t, a, torch.tensor([bad], requires_grad=True), impl=impl)


def test_tensor_lr_values_are_not_read_under_vmap_or_off_the_cpu():
    a, t, g = torch.zeros(3), torch.ones(3), torch.ones(3)
    # Under vmap the value cannot be read: a NaN lr propagates instead of raising.
    num = torch.func.vmap(lambda lr: trajectory_terms(a, t, g, lr, impl="reference").num)(
        torch.tensor([0.5, float("nan")])
    )
    assert num[0].item() == pytest.approx(3 * 1.5**2) and torch.isnan(num[1])
    # Off the CPU no value is read (on CUDA that would be a sync): a meta lr, whose value cannot
    # be read at all, goes through.
    out = trajectory_terms(*(x.to("meta") for x in (a, t, g)), torch.tensor(0.5, device="meta"))
    assert out.num.device.type == "meta"


def test_empty_pieces_contribute_zero(gen):
    s, a, t = _triple(gen, [(0,), (9,)])
    for impl in ["reference", *FUSED]:
        got = trajectory_distance(s, a, t, impl=impl)
        torch.testing.assert_close(got.item(), _truth_distance(s, a, t), rtol=1e-5, atol=0)
        terms = trajectory_terms(a, t, s, 0.1, impl=impl)
        assert terms.direction[0].shape == (0,)


# --------------------------------------------------------------------------------------------------
# torch.func


@pytest.mark.parametrize("impl", FUSED)
def test_torch_func_grad_and_vmap(gen, impl):
    K, P = 3, 257
    start = torch.randn(P, generator=gen)
    target = start + torch.randn(P, generator=gen)
    students = start + 0.5 * torch.randn(K, P, generator=gen)
    got = torch.func.vmap(lambda x: trajectory_distance(x, start, target, impl=impl))(students)
    want = torch.stack([ref.trajectory_distance(x, start, target) for x in students])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    fused = lambda x: trajectory_distance(x, start, target, impl=impl)  # noqa: E731
    plain = lambda x: ref.trajectory_distance(x, start, target)  # noqa: E731
    torch.testing.assert_close(
        torch.func.grad(fused)(students[0]),
        torch.func.grad(plain)(students[0]),
        rtol=1e-4,
        atol=1e-6,
    )
    torch.testing.assert_close(
        torch.func.vmap(torch.func.grad(fused))(students),
        torch.func.vmap(torch.func.grad(plain))(students),
        rtol=1e-4,
        atol=1e-6,
    )
    # grad of grad (the exact meta-gradient differentiates through the student's gradient)
    v = torch.randn(P, generator=gen)
    hv = torch.func.grad(lambda x: (torch.func.grad(fused)(x) * v).sum())(students[0])
    hv_ref = torch.func.grad(lambda x: (torch.func.grad(plain)(x) * v).sum())(students[0])
    torch.testing.assert_close(hv, hv_ref, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# validation and dispatch


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("impl", ["reference", *FUSED])
def test_identical_start_and_target_raise(gen, impl):
    s, a, _ = _triple(gen, [(10,), (3,)])
    with pytest.raises(ValueError, match="start and target are identical"):
        trajectory_distance(s, a, [p.clone() for p in a], impl=impl)
    # check=False skips the host sync and returns the (inf) ratio
    out = trajectory_distance(s, a, [p.clone() for p in a], impl=impl, check=False)
    assert torch.isinf(out)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s, a, t: trajectory_distance(s[:1], a, t), "start must have the same structure"),
        (lambda s, a, t: trajectory_distance(s, a[0], t), "start must have the same structure"),
        (
            lambda s, a, t: trajectory_distance(s, a, [t[0], t[1][:2]]),
            r"target\[1\] has shape \(2,\) but student\[1\] has \(5,\)",
        ),
        (
            lambda s, a, t: trajectory_distance(s, [a[0].double(), a[1]], t),
            r"start\[0\] has dtype torch.float64",
        ),
        (lambda s, a, t: trajectory_distance([], a, t), "student is an empty sequence"),
        (lambda s, a, t: trajectory_distance(3.0, a, t), "student must be a tensor or a sequence"),
        (lambda s, a, t: trajectory_distance(s, a, [t[0], 1.0]), r"target\[1\] must be a tensor"),
        (
            lambda s, a, t: trajectory_distance(s, a, [p.long() for p in t]),
            r"target\[0\] must be a floating tensor",
        ),
        (
            lambda s, a, t: trajectory_distance(s, a, [t[0], t[1].to("meta")]),
            r"target\[1\] is on meta",
        ),
        (lambda s, a, t: trajectory_distance(s, a, t, impl="gpu"), "impl must be one of"),
        (lambda s, a, t: trajectory_terms(a, t, s[:1], 0.1), "grad_sum must have the same"),
        (lambda s, a, t: trajectory_terms(a, t, s, torch.ones(2)), "lr must be a float or a 0-d"),
        (lambda s, a, t: trajectory_terms(a, t, s, "0.1"), "lr must be a float or a 0-d"),
        (lambda s, a, t: trajectory_terms(a, t, s, float("inf")), "lr must be finite"),
        (
            lambda s, a, t: trajectory_terms(a, t, s, torch.tensor(float("nan"))),
            "lr must be finite",
        ),
        (
            lambda s, a, t: trajectory_terms(a, t, s, torch.tensor([-float("inf")])),
            "lr must be finite",
        ),
        (
            lambda s, a, t: trajectory_terms(a, t, s, torch.tensor(0.1, device="meta")),
            "lr is on meta",
        ),
    ],
)
def test_bad_inputs_raise_naming_the_argument(gen, call, match):
    s, a, t = _triple(gen, [(4, 2), (5,)])
    with pytest.raises(ValueError, match=match):
        call(s, a, t)


@pytest.mark.parametrize("impl", FUSED)
def test_fused_refuses_grad_through_start_or_target(gen, impl):
    s, a, t = _triple(gen, [(8,)])
    a0 = a[0].clone().requires_grad_()
    with pytest.raises(ValueError, match="start requires grad"):
        trajectory_distance(s[0], a0, t[0], impl=impl)
    # the reference differentiates through everything
    trajectory_distance(s[0], a0, t[0], impl="reference").backward()
    assert a0.grad is not None


def test_cuda_impl_on_cpu_raises_with_reason(gen):
    s, a, t = _triple(gen, [(8,)])
    for call in (
        lambda: trajectory_distance(s, a, t, impl="cuda"),
        lambda: trajectory_terms(a, t, s, 0.1, impl="cuda"),
    ):
        with pytest.raises(RuntimeError, match="impl='cuda' cannot run: the CUDA extension needs"):
            call()


def test_cuda_chunk_matches_the_kernel_source():
    import os
    import re

    from repblend_fast.ops import trajectory as ops_traj

    src = os.path.join(os.path.dirname(__file__), "..", "csrc", "trajectory.cu")
    with open(src) as f:
        m = re.search(r"constexpr int64_t kChunk = (\d+);", f.read())
    assert m is not None and int(m.group(1)) == ops_traj.CUDA_CHUNK


# --------------------------------------------------------------------------------------------------
# GPU parity at the paper's sizes, skipped without a CUDA device

# Both heads of docs/algorithm.md §1 (D = 2304, d_f = 2304, d_t = 768): W1, b1, W2, b2, gamma, beta
# each.
HEAD_PIECES = [(2304, 2304), (2304,), (2304, 2304), (2304,), (2304,), (2304,)] + [
    (2304, 768),
    (2304,),
    (2304, 2304),
    (2304,),
    (2304,),
    (2304,),
]  # 17,713,152 elements


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["heads-17.7M", "flat-39.9M"])
def test_gpu_parity_paper_sizes(impl, dtype, layout):
    gen = torch.Generator(device="cuda").manual_seed(7)
    shapes = HEAD_PIECES if layout.startswith("heads") else [(39_900_017,)]

    def vec(scale=1.0):
        return [(scale * torch.randn(sh, device="cuda", generator=gen)).to(dtype) for sh in shapes]

    a = vec()
    t = [x + (0.01 * torch.randn(x.shape, device="cuda", generator=gen)).to(dtype) for x in a]
    s = [x + (0.01 * torch.randn(x.shape, device="cuda", generator=gen)).to(dtype) for x in a]
    g = vec(0.1)
    got = trajectory_distance(s, a, t, impl=impl)
    assert got.dtype == torch.float32
    s64 = sum(((x.double() - y.double()) ** 2).sum() for x, y in zip(s, t))
    d64 = sum(((x.double() - y.double()) ** 2).sum() for x, y in zip(a, t))
    assert abs(got.item() - (s64 / d64).item()) <= 1e-5 * abs((s64 / d64).item())
    again = trajectory_distance(s, a, t, impl=impl)
    assert torch.equal(got.view(torch.int32), again.view(torch.int32))
    terms = trajectory_terms(a, t, g, 0.1, impl=impl)
    want = ref.trajectory_terms(a, t, g, 0.1)
    for name in ("denom", "num"):
        x, y = getattr(terms, name).item(), getattr(want, name).item()
        assert abs(x - y) <= 1e-5 * abs(y), name
    abs_dot = sum(
        ((y.double() - x.double() + 0.1 * z.double()) * z.double()).abs().sum()
        for x, y, z in zip(a, t, g)
    ).item()
    assert abs(terms.dot.item() - want.dot.item()) <= 1e-5 * abs_dot
    for x, y in zip(terms.direction, want.direction):
        torch.testing.assert_close(
            x.float(),
            y.float(),
            rtol=1e-5 if dtype == torch.float32 else 1e-2,
            atol=1e-7 if dtype == torch.float32 else 1e-4,
        )
    terms2 = trajectory_terms(a, t, g, 0.1, impl=impl)
    for x, y in zip(terms[:3], terms2[:3]):
        assert torch.equal(x, y)
    assert all(torch.equal(x, y) for x, y in zip(terms.direction, terms2.direction))


# --------------------------------------------------------------------------------------------------
# The Python side of impl="cuda" (argument order, per-piece offsets, buffer sizes and dtypes),
# against a CPU stand-in that follows the contract of csrc/trajectory.cu.


class _CudaTrajectoryStandIn:
    """CPU emulation of torch.ops.repblend_fast.trajectory_* with their TORCH_CHECKs."""

    CHUNK = 8192

    @classmethod
    def _check(cls, vectors, part, nch, offset):
        ref0 = vectors[0]
        for v in vectors:
            assert v.is_contiguous() and v.dtype == ref0.dtype and v.numel() == ref0.numel()
        acc = torch.float64 if ref0.dtype == torch.float64 else torch.float32
        assert part.dtype == acc and part.dim() == 2 and part.shape[0] == nch
        blocks = -(-ref0.numel() // cls.CHUNK)
        assert offset >= 0 and offset + blocks <= part.shape[1]
        return acc, blocks

    @classmethod
    def trajectory_distance_partials(cls, s, a, t, part, offset):
        acc, blocks = cls._check([s, a, t], part, 2, offset)
        for p in range(blocks):
            sl = slice(p * cls.CHUNK, (p + 1) * cls.CHUNK)
            si, ai, ti = (v.reshape(-1)[sl].to(acc) for v in (s, a, t))
            part[0, offset + p] = ((si - ti) ** 2).sum()
            part[1, offset + p] = ((ai - ti) ** 2).sum()

    @classmethod
    def trajectory_terms_partials(cls, a, t, g, lr, d, part, offset):
        acc, blocks = cls._check([a, t, g, d], part, 3, offset)
        assert lr.numel() == 1 and lr.dtype == acc
        for p in range(blocks):
            sl = slice(p * cls.CHUNK, (p + 1) * cls.CHUNK)
            ai, ti, gi = (v.reshape(-1)[sl].to(acc) for v in (a, t, g))
            delta = ti - ai
            r = delta + lr * gi
            part[0, offset + p] = (delta * delta).sum()
            part[1, offset + p] = (r * r).sum()
            part[2, offset + p] = (r * gi).sum()
            d.reshape(-1)[sl] = (lr * r).to(d.dtype)

    @staticmethod
    def trajectory_finalize(part, ratio):
        sums = part.sum(1)
        return torch.cat([sums, (sums[0] / sums[1]).reshape(1)]) if ratio else sums


def test_cuda_glue_against_a_stand_in(gen, monkeypatch):
    from repblend_fast.ops import trajectory as ops_traj

    monkeypatch.setattr(ops_traj, "_cuda_ops", lambda: _CudaTrajectoryStandIn)
    shapes = [(3, 5), (8192,), (8193,), (0,), (20_000,)]
    s, a, t = _triple(gen, shapes)
    sums = ops_traj._distance_sums("cuda", *(ops_traj._flat(v) for v in (s, a, t)))
    assert not torch.isnan(sums).any()  # every partial column was written
    assert abs(sums[2].item() - _truth_distance(s, a, t)) <= 1e-5 * _truth_distance(s, a, t)
    # through the autograd Function, gradients included
    s_req = [p.clone().requires_grad_() for p in s]
    ratio, den = ops_traj._Distance.apply("cuda", True, len(s), *s_req, *a, *t)
    torch.testing.assert_close(ratio, ref.trajectory_distance(s, a, t), rtol=1e-5, atol=0)
    grads = torch.autograd.grad(ratio, s_req)
    want = torch.autograd.grad(ref.trajectory_distance(s_req, a, t), s_req)
    for x, y in zip(grads, want):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    g = _vec(gen, shapes)
    lr = torch.tensor([0.1])
    sums, direction = ops_traj._terms("cuda", *(ops_traj._flat(v) for v in (a, t, g)), lr)
    den_, num, dot, dir_truth = _truth_terms(a, t, g, 0.1)
    torch.testing.assert_close(sums.tolist(), [den_, num, dot], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(_flat64(direction), dir_truth, rtol=1e-5, atol=1e-6)
