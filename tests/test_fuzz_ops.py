"""Property-based fuzzing of the three fused ops (Triton through the CPU interpreter) against the
plain-torch reference: ``contrastive_loss`` (every loss), ``blend_pairs``, ``trajectory_distance``
and ``trajectory_terms``.

Properties, for every generated input:

- nothing but ``ValueError`` / ``TypeError`` / ``RuntimeError`` with a message ever escapes, and
  well-formed inputs never raise;
- NaN and infinity come out where, and as, the reference gives them (never a finite value where
  the reference is NaN/inf, nor the other way round);
- finite results equal the reference's within the fp32 tolerances of docs/design.md §4 (forward
  atol 1e-5, rtol 1e-5; gradients atol 1e-5, rtol 1e-4). Signed sums (a ``lam`` gradient,
  ``dot``) are compared relative to the sum of their terms' magnitudes, the error bound of any
  fp32 summation; contrastive gradients are compared in value for feature rows of norm >= 1/4
  (see the test).

Value ranges: features and parameters are 0 or of magnitude 2^-10..2^10 (plus injected NaN/inf),
targets lie in [0, 1], ``|logit_scale| <= 4``. Outside these, two correct fp32 implementations
differ by more than the tolerances for reasons of the formulas, not of the kernels: for ``z > 8``
the reference's own ``1 - sigmoid(z)`` (BCE, WBCE with eps) keeps only a few digits, so one ulp of
difference in ``exp`` shows; squares of features beyond ~1e19 overflow fp32 (the fused cosine is
then NaN where the reference divides by an infinite norm and gets 0). Large logit scales are
covered by the deterministic extreme-logit tests of tests/test_contrastive.py.

Examples are derandomised (the same ones every run, no example database): set
``REPBLEND_FUZZ_EXAMPLES`` to run more of them, ``REPBLEND_FUZZ_RANDOM=1`` for fresh ones.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from repblend_fast.ops import blend_pairs, contrastive_loss, trajectory_distance, trajectory_terms
from repblend_fast.ops._dispatch import triton_interpret
from repblend_fast.reference import blend as ref_blend
from repblend_fast.reference import contrastive as ref_con
from repblend_fast.reference import trajectory as ref_traj

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not triton_interpret(), reason="fuzzes the Triton interpreter on CPU"),
    # numpy inside the interpreter warns about the NaN/inf the inputs carry on purpose
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

FWD = dict(atol=1e-5, rtol=1e-5)
GRAD = dict(atol=1e-5, rtol=1e-4)
CLEAN_ERRORS = (ValueError, TypeError, RuntimeError)
SPECIALS = (float("nan"), float("inf"), -float("inf"))


def _fuzz(max_examples: int):
    return settings(
        max_examples=int(os.environ.get("REPBLEND_FUZZ_EXAMPLES", max_examples)),
        deadline=None,
        derandomize=os.environ.get("REPBLEND_FUZZ_RANDOM") != "1",
        database=None,
        # `poison` is stateless between examples: it only NaN-fills fresh allocations.
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )


# --------------------------------------------------------------------------------------------------
# strategies


def _finite(lo: float, hi: float, zeros: bool = True):
    nonzero = [st.floats(lo, hi, width=32), st.floats(-hi, -lo, width=32)]
    return st.one_of(st.just(0.0), *nonzero) if zeros else st.one_of(*nonzero)


@st.composite
def _array(draw, shape, elements, specials: bool) -> torch.Tensor:
    arr = draw(hnp.arrays(np.float32, shape, elements=elements))
    if specials and arr.size:
        flat = arr.reshape(-1)
        for _ in range(draw(st.integers(1, min(3, arr.size)))):
            flat[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from(SPECIALS))
    return torch.from_numpy(arr.copy())


def _features(shape, specials, zeros=True):
    return _array(shape, _finite(2.0**-10, 2.0**10, zeros), specials)


def _unit(shape, specials):
    return _array(shape, st.floats(0.0, 1.0, width=32), specials)


# --------------------------------------------------------------------------------------------------
# comparison helpers


def _same(got: torch.Tensor, want: torch.Tensor, tol: dict, what: str) -> None:
    """Same shape and dtype; NaN where the reference has NaN, the same signed infinities; finite
    values within ``tol``."""
    assert got.shape == want.shape and got.dtype == want.dtype, what
    torch.testing.assert_close(got, want, equal_nan=True, **tol, msg=lambda m: f"{what}: {m}")


def _same_signed_sum(got, want, magnitude, tol: dict, what: str) -> None:
    """A signed sum: non-finite like the reference; finite within ``atol + rtol * magnitude`` where
    ``magnitude`` is the sum of the absolute values of its terms."""
    got, want = float(got), float(want)
    if not math.isfinite(want) or not math.isfinite(got):
        assert (math.isnan(got) and math.isnan(want)) or got == want, (what, got, want)
        return
    assert abs(got - want) <= tol["atol"] + tol["rtol"] * float(magnitude), (what, got, want)


def _clean_error(exc: BaseException) -> None:
    assert isinstance(exc, CLEAN_ERRORS), f"{type(exc).__name__}: {exc}"
    assert str(exc).strip(), f"{type(exc).__name__} without a message"


# --------------------------------------------------------------------------------------------------
# contrastive_loss


@st.composite
def _contrastive_case(draw):
    k = draw(st.one_of(st.none(), st.integers(1, 3)))
    b, d = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    lead = () if k is None else (k,)
    specials = draw(st.sampled_from([False, False, True]))  # NaN/inf in a third of the cases
    zeros = draw(st.booleans())  # zero entries, and with them zero rows (the norm clamp)
    img = draw(_features(lead + (b, d), specials and draw(st.booleans()), zeros))
    txt = draw(_features(lead + (b, d), specials and draw(st.booleans()), zeros))
    target = draw(_unit(lead + (b, b), specials and draw(st.booleans())))
    loss = draw(st.sampled_from(ref_con.LOSSES))
    eps = draw(st.sampled_from([1e-6, 0.0, 1e-3])) if loss == "wbce" else 1e-6
    scale = draw(st.floats(-4.0, 4.0, width=32))
    if draw(st.booleans()):
        scale = torch.tensor(scale)
    return img, txt, target, scale, loss, eps


@_fuzz(60)
@given(case=_contrastive_case())
def test_contrastive_fuzz_matches_reference(poison, case):
    img, txt, target, scale, loss, eps = case
    results = []
    for impl in ("triton", "reference"):
        x = [t.clone().requires_grad_(True) for t in (img, txt, target)]
        out = contrastive_loss(*x, logit_scale=scale, loss=loss, eps=eps, impl=impl)
        results.append((out, torch.autograd.grad(out.sum(), x)))
    (out_f, grads_f), (out_r, grads_r) = results
    _same(out_f, out_r, FWD, f"{loss} loss")
    # Gradient values are compared where they are well-conditioned: finite inputs and feature rows
    # of norm >= 1/4. d/dx of x / max(||x||, 1e-12) multiplies the fp32 rounding of dL/dZ (about
    # 1e-7 |s|) by 1 / ||x||, 1e12 for a zero row, so for short rows the reference's own rounding
    # noise dominates (e.g. uniform targets and a zero row: dL/dZ = 0 up to rounding, and the
    # reference returns 1e12 times that noise). Elsewhere the gradients must be finite exactly
    # where the reference's are.
    compare = all(torch.isfinite(t).all() for t in (img, txt, target)) and all(
        bool((torch.linalg.vector_norm(t.double(), dim=-1) >= 0.25).all()) for t in (img, txt)
    )
    event(f"loss finite: {bool(torch.isfinite(out_r).all())}; gradient values compared: {compare}")
    for name, a, r in zip(("img", "txt", "target"), grads_f, grads_r):
        if compare:
            _same(a, r, GRAD, f"{loss} d_{name}")
        else:
            assert torch.equal(torch.isfinite(a), torch.isfinite(r)), f"{loss} d_{name}"


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool]


@st.composite
def _shape(draw, max_rank=3):
    return tuple(draw(st.lists(st.integers(0, 4), max_size=max_rank)))


def _mutate_tensor(draw, t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One way of making a tensor argument wrong (or odd): shape, dtype, device or a non-tensor."""
    how = draw(st.sampled_from(["shape", "dtype", "meta", "numpy", "list", "transpose", "empty"]))
    if how == "shape":
        return torch.randn(draw(_shape(4)), generator=g)
    if how == "dtype":
        return t.to(draw(st.sampled_from(_DTYPES)))
    if how == "meta":
        return t.to("meta")
    if how == "numpy":
        return t.numpy()
    if how == "list":
        return t.tolist()
    if how == "transpose":
        return t.transpose(-1, -2) if t.dim() >= 2 else t
    return t.reshape(-1)[:0] if t.dim() == 0 else t[..., :0]


@st.composite
def _contrastive_call(draw):
    """A valid call with 0-3 arguments made wrong; returns (args, kwargs, n_mutations)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    k = draw(st.one_of(st.none(), st.integers(1, 3)))
    b, d = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    lead = () if k is None else (k,)
    args = [
        torch.randn(lead + (b, d), generator=g),
        torch.randn(lead + (b, d), generator=g),
        torch.rand(lead + (b, b), generator=g),
    ]
    kwargs = dict(logit_scale=2.0, loss=draw(st.sampled_from(ref_con.LOSSES)), eps=1e-6)
    bad_values = {
        "logit_scale": [
            float("nan"),
            float("inf"),
            torch.tensor(float("nan")),
            torch.ones(2),
            torch.tensor(3),
            "2",
            None,
            True,
        ],
        "loss": ["clip", "", None, 3],
        "eps": [-1.0, float("nan"), float("inf"), True, None, "0"],
        "impl": ["fast", None, "cuda"],
    }
    targets = draw(st.lists(st.sampled_from([0, 1, 2, *bad_values]), max_size=3, unique=True))
    for what in targets:
        if isinstance(what, int):
            args[what] = _mutate_tensor(draw, args[what], g)
        else:
            kwargs[what] = draw(st.sampled_from(bad_values[what]))
    return args, kwargs, len(targets)


@_fuzz(60)
@given(call=_contrastive_call())
def test_contrastive_fuzz_malformed_inputs_fail_cleanly(call):
    args, kwargs, n_bad = call
    kwargs.setdefault("impl", "triton")
    try:
        out = contrastive_loss(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the property is about which exceptions escape
        _clean_error(exc)
        assert n_bad > 0, f"a well-formed call raised {exc!r}"
        return
    assert isinstance(out, torch.Tensor)


# --------------------------------------------------------------------------------------------------
# blend_pairs


@st.composite
def _blend_case(draw):
    k = draw(st.one_of(st.none(), st.integers(1, 3)))
    b = draw(st.integers(1, 16))
    di, dt = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    lead = () if k is None else (k,)
    specials = draw(st.sampled_from([False, False, True]))  # NaN/inf in a third of the cases
    img = draw(_features(lead + (b, di), specials and draw(st.booleans())))
    txt = draw(_features(lead + (b, dt), specials and draw(st.booleans())))
    rows = 1 if k is None or draw(st.booleans()) else k
    if draw(st.booleans()):  # permutations
        perm = torch.stack([torch.tensor(draw(st.permutations(range(b)))) for _ in range(rows)])
    else:  # any in-range index rows (repeats allowed by check="bounds")
        perm = torch.tensor(
            draw(
                st.lists(
                    st.lists(st.integers(0, b - 1), min_size=b, max_size=b),
                    min_size=rows,
                    max_size=rows,
                )
            )
        )
    if k is None or rows == 1:
        perm = perm[0]
    lam_values = st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0, width=32))
    kind = draw(st.sampled_from(["float", "scalar", "vector"] if k else ["float", "scalar"]))
    if kind == "float":
        lam = draw(lam_values)
    elif kind == "scalar":
        lam = torch.tensor(draw(lam_values))
    else:
        lam = torch.tensor(draw(st.lists(lam_values, min_size=k, max_size=k)))
    return img, txt, perm, lam, draw(st.integers(0, 2**16))


@_fuzz(40)
@given(case=_blend_case())
def test_blend_fuzz_matches_reference(poison, case):
    img, txt, perm, lam, seed = case
    g = torch.Generator().manual_seed(seed)
    cot = (torch.randn(img.shape, generator=g), torch.randn(txt.shape, generator=g))
    results = []
    for impl in ("triton", "reference"):
        x = [img.clone().requires_grad_(True), txt.clone().requires_grad_(True)]
        lm = lam.clone().requires_grad_(True) if isinstance(lam, torch.Tensor) else lam
        outs = blend_pairs(*x, perm, lm, impl=impl)
        wrt = x + ([lm] if isinstance(lm, torch.Tensor) else [])
        results.append((outs, torch.autograd.grad(outs, wrt, cot)))
    (outs_f, grads_f), (outs_r, grads_r) = results
    for name, a, r in zip(("img", "txt"), outs_f, outs_r):
        _same(a, r, FWD, f"blended {name}")
    for name, a, r in zip(("img", "txt"), grads_f, grads_r):
        _same(a, r, GRAD, f"d_{name}")
    if isinstance(lam, torch.Tensor):
        # d lam = sum over (b, d) of g (x - x[perm]), per K or in total: a signed sum
        mags = []
        for x, c in zip((img, txt), cot):
            mag = (
                ref_blend.blend_one(x, perm, 1.0).double().abs()
                + ref_blend.blend_one(x, perm, 0.0).double().abs()
            )
            mag = (mag * c.double().abs()).sum((-2, -1))
            mags.append(mag)
        magnitude = mags[0] + mags[1]
        if lam.dim() == 0:
            magnitude = magnitude.sum().reshape(())
        for i, (a, r) in enumerate(zip(grads_f[2].reshape(-1), grads_r[2].reshape(-1))):
            _same_signed_sum(a, r, magnitude.reshape(-1)[i], GRAD, "d_lam")


@st.composite
def _blend_call(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    k = draw(st.one_of(st.none(), st.integers(1, 3)))
    b = draw(st.integers(1, 6))
    lead = () if k is None else (k,)
    args = [
        torch.randn(lead + (b, draw(st.integers(1, 6))), generator=g),
        torch.randn(lead + (b, draw(st.integers(1, 6))), generator=g),
        torch.randperm(b, generator=g),
        0.5,
    ]
    kwargs = dict(check=draw(st.sampled_from(["bounds", "full"])))
    bad_values = {
        "perm": [
            lambda p: p + b,
            lambda p: p - 1,
            lambda p: p.float(),
            lambda p: p.tolist(),
            lambda p: p.int(),
            lambda p: p[None].expand(5, b),
            lambda p: p[:0],
            lambda p: torch.zeros_like(p),
        ],
        "lam": [
            1.5,
            -0.1,
            float("nan"),
            float("inf"),
            torch.tensor(float("nan")),
            torch.tensor([0.2, 2.0]),
            torch.tensor(1),
            "x",
            None,
            True,
            torch.rand(7),
        ],
        "check": ["maybe", None, "none "],
        "impl": ["fast", None, "cuda"],
    }
    targets = draw(st.lists(st.sampled_from([0, 1, *bad_values]), max_size=3, unique=True))
    for what in targets:
        if isinstance(what, int):
            args[what] = _mutate_tensor(draw, args[what], g)
        elif what == "perm":
            args[2] = draw(st.sampled_from(bad_values["perm"]))(args[2])
        elif what == "lam":
            args[3] = draw(st.sampled_from(bad_values["lam"]))
        else:
            kwargs[what] = draw(st.sampled_from(bad_values[what]))
    # A zero-filled perm (repeated index 0) is valid unless check="full".
    return args, kwargs, len(targets)


@_fuzz(60)
@given(call=_blend_call())
def test_blend_fuzz_malformed_inputs_fail_cleanly(call):
    args, kwargs, n_bad = call
    kwargs.setdefault("impl", "triton")
    try:
        out = blend_pairs(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the property is about which exceptions escape
        _clean_error(exc)
        assert n_bad > 0, f"a well-formed call raised {exc!r}"
        return
    assert all(isinstance(o, torch.Tensor) for o in out)


# --------------------------------------------------------------------------------------------------
# trajectory_distance / trajectory_terms


@st.composite
def _vectors(draw, count: int):
    """``count`` vectors of one structure: one tensor, or a list of 1-3 pieces (0-d to 2-d, some
    empty), at most 16 x 16 elements in all."""
    single = draw(st.booleans())
    shapes = draw(
        st.lists(
            st.lists(st.integers(0, 16), max_size=2).map(tuple),
            min_size=1,
            max_size=1 if single else 3,
        ).filter(lambda s: 0 < sum(math.prod(x) for x in s) <= 256)
    )
    specials = draw(st.sampled_from([False, False, True]))  # NaN/inf in a third of the cases
    vecs = []
    for _ in range(count):
        pieces = [draw(_features(sh, specials and draw(st.booleans()))) for sh in shapes]
        vecs.append(pieces[0] if single else pieces)
    return vecs


def _pieces(v):
    return [v] if isinstance(v, torch.Tensor) else list(v)


@_fuzz(40)
@given(vecs=_vectors(3), check=st.booleans(), seed=st.integers(0, 2**16))
def test_trajectory_distance_fuzz_matches_reference(poison, vecs, check, seed):
    student, start, target = vecs
    up = torch.randn((), generator=torch.Generator().manual_seed(seed))
    results = []
    for impl in ("triton", "reference"):
        s = [p.clone().requires_grad_(True) for p in _pieces(student)]
        arg = s[0] if isinstance(student, torch.Tensor) else s
        try:
            out = trajectory_distance(arg, start, target, impl=impl, check=check)
        except ValueError as exc:
            results.append(exc)
            continue
        results.append((out, torch.autograd.grad(out, s, up)))
    got, want = results
    if isinstance(want, ValueError):  # start == target: both refuse, with the same message
        assert isinstance(got, ValueError) and str(got) == str(want)
        return
    assert not isinstance(got, ValueError), got
    (out_f, grads_f), (out_r, grads_r) = got, want
    _same(out_f, out_r, FWD, "distance")
    for a, r in zip(grads_f, grads_r):
        _same(a, r, GRAD, "d_student")


@_fuzz(40)
@given(
    vecs=_vectors(3),
    lr=st.floats(-1.0, 1.0, width=32),
    lr_kind=st.sampled_from(["float", "0-d", "[1]"]),
)
def test_trajectory_terms_fuzz_matches_reference(poison, vecs, lr, lr_kind):
    start, target, grad_sum = vecs
    lr_arg = {"float": lr, "0-d": torch.tensor(lr), "[1]": torch.tensor([lr])}[lr_kind]
    got = trajectory_terms(start, target, grad_sum, lr_arg, impl="triton")
    want = ref_traj.trajectory_terms(start, target, grad_sum, torch.tensor(lr))
    _same(got.denom, want.denom, FWD, "denom")
    _same(got.num, want.num, FWD, "num")
    a, t, g = (torch.cat([p.double().reshape(-1) for p in _pieces(v)]) for v in vecs)
    dot_terms = ((t - a + lr * g) * g).abs()
    _same_signed_sum(got.dot, want.dot, dot_terms.sum(), FWD, "dot")
    for x, y in zip(_pieces(got.direction), _pieces(want.direction)):
        _same(x, y, FWD, "direction")


@st.composite
def _trajectory_call(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    single = draw(st.booleans())
    shapes = [draw(_shape(2)) for _ in range(1 if single else draw(st.integers(1, 3)))]
    vecs = [[torch.randn(sh, generator=g) for sh in shapes] for _ in range(3)]
    vecs[1] = [a + 1 for a in vecs[2]]  # start != target wherever there are elements
    lr = draw(st.sampled_from([0.1, torch.tensor(0.1), torch.tensor([0.1])]))
    empty = sum(math.prod(sh) for sh in shapes) == 0  # the distance refuses empty vectors
    bad_lr = [
        float("nan"),
        float("inf"),
        torch.tensor(float("nan")),
        torch.ones(2),
        None,
        "0.1",
        True,
        torch.tensor(0.1, device="meta"),
    ]
    targets = draw(
        st.lists(st.sampled_from([0, 1, 2, "lr", "structure", "impl"]), max_size=3, unique=True)
    )
    for what in sorted(targets, key=lambda w: w == "structure"):  # the pieces first
        if isinstance(what, int):
            i = draw(st.integers(0, len(shapes) - 1))
            vecs[what][i] = _mutate_tensor(draw, vecs[what][i], g)
        elif what == "lr":
            lr = draw(st.sampled_from(bad_lr))
        elif what == "structure":
            vecs[draw(st.integers(0, 2))] = draw(st.sampled_from([[], 3.0, "x", None]))
    impl = draw(st.sampled_from(["fast", None, "cuda"])) if "impl" in targets else "triton"
    if single:
        vecs = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in vecs]
    return vecs, lr, impl, len(targets), empty


@_fuzz(60)
@given(call=_trajectory_call(), check=st.booleans())
def test_trajectory_fuzz_malformed_inputs_fail_cleanly(call, check):
    vecs, lr, impl, n_bad, empty = call
    for name, fn, may_refuse in (
        ("distance", lambda: trajectory_distance(*vecs, impl=impl, check=check), empty),
        ("terms", lambda: trajectory_terms(*vecs, lr, impl=impl), False),
    ):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the property is about which exceptions escape
            _clean_error(exc)
            assert n_bad > 0 or may_refuse, f"{name}: a well-formed call raised {exc!r}"
