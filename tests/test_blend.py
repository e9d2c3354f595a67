"""blend_pairs: reference vs an independent float64 loop, fused (Triton interpreter) vs reference,
autograd to second order, torch.func transforms, validation and dispatch (docs/design.md §4)."""

from __future__ import annotations

import pytest
import torch

from repblend_fast.ops import blend_pairs
from repblend_fast.ops._dispatch import triton_interpret
from repblend_fast.reference import blend as ref

# CPU tests run the Triton kernels through the interpreter; on a GPU run (REPBLEND_TEST_GPU=1)
# the interpreter is off and the gpu-marked tests cover the fused paths instead.
FUSED = ["triton"] if triton_interpret() else []


# Fused outputs are NaN-filled before the kernels write them (every float torch.empty / empty_like
# is, through the ``poison`` fixture of tests/conftest.py), so a missed element shows.
pytestmark = pytest.mark.usefixtures("poison")


def _perm(gen: torch.Generator, K: int | None, B: int) -> torch.Tensor:
    if K is None:
        return torch.randperm(B, generator=gen)
    return torch.stack([torch.randperm(B, generator=gen) for _ in range(K)])


def _inputs(gen, K, B, Di, Dt, dtype=torch.float32, lam_kind="float"):
    lead = (B,) if K is None else (K, B)
    img = torch.randn(*lead, Di, generator=gen).to(dtype)
    txt = torch.randn(*lead, Dt, generator=gen).to(dtype)
    perm = _perm(gen, K, B)
    lam_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if lam_kind == "float":
        lam = float(torch.rand((), generator=gen))
    elif lam_kind == "scalar":
        lam = torch.rand((), generator=gen, dtype=lam_dtype)
    else:
        lam = torch.rand(K, generator=gen, dtype=lam_dtype)
    return img, txt, perm, lam


def _truth(x: torch.Tensor, perm: torch.Tensor, lam) -> torch.Tensor:
    """Row-by-row float64 blend, written independently of the library."""
    x64 = x.double()
    out = torch.empty_like(x64)
    if x.dim() == 2:
        lam_k = float(lam)
        for b in range(x.shape[0]):
            out[b] = lam_k * x64[b] + (1 - lam_k) * x64[int(perm[b])]
        return out
    for k in range(x.shape[0]):
        p = perm if perm.dim() == 1 else perm[k]
        if isinstance(lam, torch.Tensor) and lam.dim() == 1:
            lam_k = float(lam[k])
        else:
            lam_k = float(lam)
        for b in range(x.shape[1]):
            out[k, b] = lam_k * x64[k, b] + (1 - lam_k) * x64[k, int(p[b])]
    return out


CASES = [
    # K, B, Di, Dt, lam kind
    (None, 1, 17, 5, "float"),
    (None, 3, 17, 300, "scalar"),
    (1, 65, 17, 9, "vector"),
    (3, 20, 300, 17, "float"),
]


@pytest.mark.parametrize("K,B,Di,Dt,lam_kind", CASES)
def test_reference_matches_float64_loop(gen, K, B, Di, Dt, lam_kind):
    img, txt, perm, lam = _inputs(gen, K, B, Di, Dt, torch.float64, lam_kind)
    out_i, out_t = ref.blend_pairs(img, txt, perm, lam)
    torch.testing.assert_close(out_i, _truth(img, perm, lam), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_t, _truth(txt, perm, lam), rtol=1e-12, atol=1e-12)


def test_reference_shared_perm_broadcasts_over_k(gen):
    img, txt, _, lam = _inputs(gen, 3, 6, 5, 4, torch.float64, "vector")
    perm = torch.randperm(6, generator=gen)
    out_i, _ = ref.blend_pairs(img, txt, perm, lam)
    torch.testing.assert_close(out_i, _truth(img, perm, lam), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", *FUSED])
def test_gradcheck_and_gradgradcheck_float64(gen, impl):
    img, txt, perm, lam = _inputs(gen, 2, 5, 7, 3, torch.float64, "vector")
    img.requires_grad_()
    txt.requires_grad_()
    lam.requires_grad_()
    fn = lambda i, t, lm: blend_pairs(i, t, perm, lm, impl=impl)  # noqa: E731
    # fast_mode (random projections) for the fused path: every interpreted launch costs ~20 ms.
    fast = impl != "reference"
    assert torch.autograd.gradcheck(fn, (img, txt, lam), fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, (img, txt, lam), fast_mode=fast)


@pytest.mark.parametrize("impl", FUSED)
def test_fused_forward_mode_and_fwd_over_rev_float64(gen, impl):
    img, _, perm, lam = _inputs(gen, 2, 4, 6, 3, torch.float64, "vector")
    img.requires_grad_()
    lam.requires_grad_()
    fn = lambda i, lm: blend_pairs(i, i[..., :3], perm, lm, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (img, lam), check_forward_ad=True, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (img, lam), check_fwd_over_rev=True, fast_mode=True)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("K,B,Di,Dt,lam_kind", CASES)
def test_fused_matches_reference_values_and_grads(gen, impl, K, B, Di, Dt, lam_kind):
    img, txt, perm, lam = _inputs(gen, K, B, Di, Dt, torch.float32, lam_kind)
    args = {}
    for name in ("ref", "fused"):
        i = img.clone().requires_grad_()
        t = txt.clone().requires_grad_()
        lm = lam.clone().requires_grad_() if isinstance(lam, torch.Tensor) else lam
        args[name] = (i, t, lm)
    gi = torch.randn(img.shape, generator=gen)
    gt = torch.randn(txt.shape, generator=gen)
    out_r = ref.blend_pairs(args["ref"][0], args["ref"][1], perm, args["ref"][2])
    out_f = blend_pairs(*args["fused"][:2], perm, args["fused"][2], impl=impl)
    for a, b in zip(out_f, out_r):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.autograd.backward(out_r, (gi, gt))
    torch.autograd.backward(out_f, (gi, gt))
    for a, b in zip(args["fused"], args["ref"]):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", FUSED)
def test_fused_second_order_matches_reference(gen, impl):
    img, txt, perm, lam = _inputs(gen, 2, 9, 17, 5, torch.float32, "vector")
    v = torch.randn(img.shape, generator=gen)

    def hvp(fn):
        i = img.clone().requires_grad_()
        lm = lam.clone().requires_grad_()
        out_i, out_t = fn(i, txt, perm, lm)
        loss = (out_i.tanh() ** 2).sum() + (out_t * out_t.sum()).sum()
        gi, gl = torch.autograd.grad(loss, (i, lm), create_graph=True)
        return torch.autograd.grad((gi * v).sum() + gl.sum(), (i, lm))

    got = hvp(lambda *a: blend_pairs(*a, impl=impl))
    want = hvp(ref.blend_pairs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", *FUSED])
@pytest.mark.parametrize("lam_kind", ["float", "vector"])
def test_batched_equals_loop(gen, impl, lam_kind):
    K = 4
    img, txt, perm, lam = _inputs(gen, K, 11, 19, 6, torch.float32, lam_kind)
    out_i, out_t = blend_pairs(img, txt, perm, lam, impl=impl)
    for k in range(K):
        lam_k = lam[k] if isinstance(lam, torch.Tensor) else lam
        want_i, want_t = blend_pairs(img[k], txt[k], perm[k], lam_k, impl=impl)
        assert torch.equal(out_i[k], want_i)
        assert torch.equal(out_t[k], want_t)


@pytest.mark.parametrize("impl", ["reference", *FUSED])
def test_shared_perm_for_all_k(gen, impl):
    img, txt, _, lam = _inputs(gen, 3, 7, 9, 4, torch.float32, "vector")
    perm = torch.randperm(7, generator=gen)
    out_i, out_t = blend_pairs(img, txt, perm, lam, impl=impl)
    torch.testing.assert_close(out_i, _truth(img, perm, lam).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_t, _truth(txt, perm, lam).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", FUSED)
def test_torch_func_grad_vjp_vmap_jvp(gen, impl):
    V = 3
    img, txt, perm, lam = _inputs(gen, V, 6, 10, 4, torch.float32, "vector")

    def loss(fn):
        def f(i, t, p, lm):
            out_i, out_t = fn(i, t, p, lm)
            return (out_i.sin()).sum() + (out_t**2).sum()

        return f

    fused = loss(lambda *a: blend_pairs(*a, impl=impl))
    plain = loss(ref.blend_pairs)
    # grad w.r.t. img, txt and a 0-d lam
    g_f = torch.func.grad(fused, argnums=(0, 1, 3))(img[0], txt[0], perm[0], lam[0])
    g_r = torch.func.grad(plain, argnums=(0, 1, 3))(img[0], txt[0], perm[0], lam[0])
    for a, b in zip(g_f, g_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # vmap over independent batches (perm and lam mapped too), and vmap of grad
    o_f = torch.func.vmap(lambda *a: blend_pairs(*a, impl=impl))(img, txt, perm, lam)
    o_r = blend_pairs(img, txt, perm, lam, impl="reference")
    for a, b in zip(o_f, o_r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    vg_f = torch.func.vmap(torch.func.grad(fused, argnums=(0, 3)))(img, txt, perm, lam)
    vg_r = torch.func.vmap(torch.func.grad(plain, argnums=(0, 3)))(img, txt, perm, lam)
    for a, b in zip(vg_f, vg_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # vmap with unmapped perm / lam, mapped inputs
    o_f = torch.func.vmap(lambda i, t: blend_pairs(i, t, perm[0], 0.3, impl=impl))(img, txt)
    o_r = ref.blend_pairs(img, txt, perm[0], 0.3)
    torch.testing.assert_close(o_f[0], o_r[0], rtol=1e-5, atol=1e-5)
    # vjp with a random cotangent, jvp with random tangents
    ci, ct = torch.randn(img[0].shape, generator=gen), torch.randn(txt[0].shape, generator=gen)
    _, vjp_f = torch.func.vjp(
        lambda i, t: blend_pairs(i, t, perm[0], lam[0], impl=impl), img[0], txt[0]
    )
    _, vjp_r = torch.func.vjp(lambda i, t: ref.blend_pairs(i, t, perm[0], lam[0]), img[0], txt[0])
    for a, b in zip(vjp_f((ci, ct)), vjp_r((ci, ct))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    tangents = (ci, ct, torch.randn((), generator=gen))
    _, t_f = torch.func.jvp(
        lambda i, t, lm: blend_pairs(i, t, perm[0], lm, impl=impl),
        (img[0], txt[0], lam[0]),
        tangents,
    )
    _, t_r = torch.func.jvp(
        lambda i, t, lm: ref.blend_pairs(i, t, perm[0], lm), (img[0], txt[0], lam[0]), tangents
    )
    for a, b in zip(t_f, t_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", FUSED)
def test_repeated_index_gradient_is_scatter_add(gen, impl):
    """An in-range index row with repeats still gets the exact transpose as its gradient."""
    img, txt, _, lam = _inputs(gen, 2, 5, 8, 3, torch.float64, "vector")
    perm = torch.tensor([[0, 0, 1, 4, 4], [3, 3, 3, 2, 1]])
    img.requires_grad_()
    fn = lambda i: blend_pairs(i, txt, perm, lam, impl=impl)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (img,), fast_mode=True)
    g = torch.randn(img.shape, generator=gen, dtype=torch.float64)
    (got,) = torch.autograd.grad(fn(img), img, g)
    (want,) = torch.autograd.grad(ref.blend_pairs(img, txt, perm, lam)[0], img, g)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(gen, impl, dtype):
    img, txt, perm, lam = _inputs(gen, 3, 13, 33, 17, dtype, "vector")
    out_i, out_t = blend_pairs(img, txt, perm, lam, impl=impl)
    assert out_i.dtype == dtype and out_t.dtype == dtype
    # fp32 arithmetic, one rounding to the output dtype
    torch.testing.assert_close(out_i.double(), _truth(img, perm, lam), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out_t.double(), _truth(txt, perm, lam), rtol=1e-2, atol=1e-2)
    want = _truth(img, perm, lam).to(dtype)
    assert (out_i.float() - want.float()).abs().max() <= (want.float().abs().max() * 2**-7)


@pytest.mark.parametrize("impl", FUSED)
def test_bit_identical_across_runs_and_no_poison_left(gen, impl):
    img, txt, perm, lam = _inputs(gen, 2, 33, 301, 17, torch.float32, "vector")
    a = blend_pairs(img, txt, perm, lam, impl=impl)
    b = blend_pairs(img, txt, perm, lam, impl=impl)
    for x, y in zip(a, b):
        assert torch.isfinite(x).all()
        assert torch.equal(x, y)


@pytest.mark.parametrize("impl", FUSED)
def test_poisoned_allocation_is_the_launcher_path(gen, impl, monkeypatch):
    """With the gather kernel skipped, the launcher's output is all NaN: the fixture reaches it."""
    from repblend_fast.kernels import blend as kb

    class _Skip:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(kb, "_blend_gather_kernel", _Skip())
    img, txt, perm, lam = _inputs(gen, 2, 5, 6, 3, torch.float32, "vector")
    out_i, out_t = blend_pairs(img, txt, perm, lam, impl=impl)
    assert torch.isnan(out_i).all() and torch.isnan(out_t).all()


def test_lam_endpoints_are_exact(gen):
    img, txt, perm, _ = _inputs(gen, None, 6, 9, 4)
    for impl in ["reference", *FUSED]:
        one_i, _ = blend_pairs(img, txt, perm, 1.0, impl=impl)
        zero_i, _ = blend_pairs(img, txt, perm, 0.0, impl=impl)
        assert torch.equal(one_i, img)
        assert torch.equal(zero_i, img[perm])


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(perm=a["perm"].int()), "perm must have dtype torch.long"),
        (lambda a: a.update(perm=a["perm"].tolist()), "perm must be a torch.long tensor"),
        (lambda a: a.update(perm=a["perm"][:, :3]), "perm must be"),
        (lambda a: a.update(perm=a["perm"][:1]), r"perm must be \[2, 5\] or \[5\]"),
        (lambda a: a["perm"].__setitem__((0, 0), 5), r"perm values must lie in \[0, 5\)"),
        (lambda a: a["perm"].__setitem__((1, 2), -1), r"perm values must lie in \[0, 5\)"),
        (lambda a: a.update(lam=1.5), r"lam must lie in \[0, 1\]"),
        (lambda a: a.update(lam=float("nan")), r"lam must lie in \[0, 1\]"),
        (lambda a: a.update(lam=torch.tensor([0.2, -0.1])), r"lam must lie in \[0, 1\]"),
        (lambda a: a.update(lam=torch.rand(3)), "lam must be a float or a tensor"),
        (lambda a: a.update(lam=torch.tensor(1)), "lam must be a floating tensor"),
        (lambda a: a.update(lam=True), "lam must be a float or a tensor"),
        (lambda a: a.update(lam="0.5"), "lam must be a float or a tensor"),
        (lambda a: a.update(txt=a["txt"][:, :4]), "img and txt must share their leading dims"),
        (lambda a: a.update(txt=a["txt"][0]), "img and txt must share their leading dims"),
        (lambda a: a.update(img=a["img"].long()), "img must be a floating tensor"),
        (lambda a: a.update(img=a["img"][None]), r"img must be \[B, D\] or \[K, B, D\]"),
        (lambda a: a.update(txt=None), "txt must be a tensor"),
        (lambda a: a.update(impl="fast"), "impl must be one of"),
        (lambda a: a.update(check="maybe"), "check must be one of"),
    ],
)
@pytest.mark.parametrize("impl", ["reference", *FUSED])
def test_bad_inputs_raise_naming_the_argument(gen, impl, change, match):
    img, txt, perm, _ = _inputs(gen, 2, 5, 6, 3)
    args = {"img": img, "txt": txt, "perm": perm, "lam": 0.5, "impl": impl}
    change(args)
    with pytest.raises(ValueError, match=match):
        blend_pairs(**args)


def test_unbatched_inputs_reject_batched_perm_and_lam(gen):
    img, txt, perm, _ = _inputs(gen, None, 5, 6, 3)
    with pytest.raises(ValueError, match="perm must be"):
        blend_pairs(img, txt, perm[None], 0.5)
    with pytest.raises(ValueError, match="lam must be a float or a tensor"):
        blend_pairs(img, txt, perm, torch.rand(1))


def test_full_permutation_check(gen):
    img, txt, perm, _ = _inputs(gen, 2, 5, 6, 3)
    perm[1] = torch.tensor([0, 1, 1, 2, 3])
    blend_pairs(img, txt, perm, 0.5)  # in range: the default bounds check accepts it
    with pytest.raises(ValueError, match="perm must hold a permutation"):
        blend_pairs(img, txt, perm, 0.5, check="full")
    blend_pairs(img, txt, perm, torch.tensor([0.5, 2.0]), check="none")  # no value checks at all
    perm[1, 0] = 99
    with pytest.raises(ValueError, match=r"perm must hold a permutation of 0..4"):
        blend_pairs(img, txt, perm, 0.5, check="full")


def test_device_mismatch_is_named(gen):
    img, txt, perm, _ = _inputs(gen, None, 5, 6, 3)
    with pytest.raises(ValueError, match="img on cpu, txt on meta"):
        blend_pairs(img, txt.to("meta"), perm, 0.5)


def test_cuda_impl_on_cpu_raises_with_reason(gen):
    img, txt, perm, _ = _inputs(gen, None, 5, 6, 3)
    with pytest.raises(RuntimeError, match="impl='cuda' cannot run: the CUDA extension needs CUDA"):
        blend_pairs(img, txt, perm, 0.5, impl="cuda")


# --------------------------------------------------------------------------------------------------
# GPU parity at the paper's sizes (B = 20, D = 2304), skipped without a CUDA device


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 2, 3, 5, 8])
def test_gpu_parity_paper_sizes(impl, dtype, K):
    gen = torch.Generator(device="cuda").manual_seed(K)
    B, Di, Dt = 20, 2304, 768
    img = torch.randn(K, B, Di, device="cuda", generator=gen).to(dtype).requires_grad_()
    txt = torch.randn(K, B, Dt, device="cuda", generator=gen).to(dtype).requires_grad_()
    perm = torch.stack([torch.randperm(B, device="cuda", generator=gen) for _ in range(K)])
    lam = torch.rand(K, device="cuda", generator=gen).requires_grad_()
    gi = torch.randn(img.shape, device="cuda", generator=gen).to(dtype)
    gt = torch.randn(txt.shape, device="cuda", generator=gen).to(dtype)
    out = blend_pairs(img, txt, perm, lam, impl=impl)
    grads = torch.autograd.grad(out, (img, txt, lam), (gi, gt))
    # reference in fp32 on the same (possibly bf16-rounded) values
    i32, t32 = (x.detach().float().requires_grad_() for x in (img, txt))
    l32 = lam.detach().clone().requires_grad_()
    want = ref.blend_pairs(i32, t32, perm, l32)
    want_g = torch.autograd.grad(want, (i32, t32, l32), (gi.float(), gt.float()))
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for a, b in zip(out, want):
        torch.testing.assert_close(a.float(), b, **tol)
    for a, b in zip(grads[:2], want_g[:2]):
        torch.testing.assert_close(a.float(), b, **tol)
    torch.testing.assert_close(
        grads[2], want_g[2], rtol=1e-4 if dtype == torch.float32 else 1e-2, atol=1e-3
    )
    again = blend_pairs(img, txt, perm, lam, impl=impl)
    assert all(torch.equal(a, b) for a, b in zip(out, again))


# --------------------------------------------------------------------------------------------------
# The Python side of impl="cuda" (argument order, dtypes, buffers), against a CPU stand-in that
# follows the contract of csrc/blend.cu; the kernels themselves are checked by the gpu tests.


class _CudaBlendStandIn:
    """CPU emulation of torch.ops.repblend_fast.blend_{gather,scatter} with their TORCH_CHECKs."""

    @staticmethod
    def _check(x, perm, lam, out):
        assert x.dim() == 3 and x.is_contiguous()
        assert perm.dtype == torch.long and perm.shape == x.shape[:2] and perm.is_contiguous()
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        assert lam.dtype == acc and lam.dim() == 1 and lam.shape[0] in (1, x.shape[0])
        assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
        return lam.reshape(-1, 1, 1), x.to(acc)

    @classmethod
    def blend_gather(cls, x, perm, lam, out):
        lam_v, xa = cls._check(x, perm, lam, out)
        xp = torch.gather(xa, 1, perm[..., None].expand(xa.shape))
        out.copy_(lam_v * xa + (1 - lam_v) * xp)

    @classmethod
    def blend_scatter(cls, g, perm, lam, out):
        lam_v, ga = cls._check(g, perm, lam, out)
        sc = torch.zeros_like(ga).scatter_add(1, perm[..., None].expand(ga.shape), ga)
        out.copy_(lam_v * ga + (1 - lam_v) * sc)


def test_cuda_glue_against_a_stand_in(gen, monkeypatch):
    from repblend_fast.ops import blend as ops_blend

    monkeypatch.setattr(ops_blend, "_cuda_ops", lambda: _CudaBlendStandIn)
    img, txt, perm, lam = _inputs(gen, 3, 7, 9, 4, torch.float64, "vector")
    img.requires_grad_()
    lam.requires_grad_()
    fn = lambda i, lm: ops_blend._blend_fused(i, perm[0], lm, "cuda")  # noqa: E731
    torch.testing.assert_close(fn(img, lam), _truth(img, perm[0], lam.detach()))
    assert torch.autograd.gradcheck(fn, (img, lam))
    assert torch.autograd.gradgradcheck(fn, (img, lam))
    x = txt.float()[0]
    torch.testing.assert_close(
        ops_blend._blend_fused(x, perm[1], 0.25, "cuda"), _truth(x, perm[1], 0.25).float()
    )
