"""Meta-gradients of the unroll vs independent float64 brute-force computations (docs/algorithm.md
§5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from repblend_fast.engine.unroll import StepPlan, Unroller, UnrollSettings, make_unroller_for_lors
from repblend_fast.models.heads import HeadSpec, init_head_flat

DT = torch.float64
N, B, T = 7, 3, 3
D_F, D_T, DIM = 5, 6, 4
S_SCALE = 1 / 0.07


# ----------------------------------------------------------------------------- brute force
def naive_head(theta, h, d_in, dim, mask=None):
    """The projection head written out independently of repblend_fast.models.heads (``mask``:
    a dropout keep-mask on the second linear layer's output)."""
    o = 0
    w1 = theta[o : o + dim * d_in].reshape(dim, d_in)
    o += dim * d_in
    b1 = theta[o : o + dim]
    o += dim
    w2 = theta[o : o + dim * dim].reshape(dim, dim)
    o += dim * dim
    b2 = theta[o : o + dim]
    o += dim
    gamma, beta = theta[o : o + dim], theta[o + dim : o + 2 * dim]
    p = h @ w1.T + b1
    u = (0.5 * p * (1 + torch.erf(p / 2**0.5))) @ w2.T + b2
    if mask is not None:
        u = u * mask
    r = u + p
    mu = r.mean(-1, keepdim=True)
    var = ((r - mu) ** 2).mean(-1, keepdim=True)
    return (r - mu) / torch.sqrt(var + 1e-5) * gamma + beta


def naive_wbce(a, b, s):
    z = S_SCALE * (a / a.norm(dim=-1, keepdim=True)) @ (b / b.norm(dim=-1, keepdim=True)).T
    p = torch.sigmoid(z)
    ell = -s * torch.log(p + 1e-6) - (1 - s) * torch.log(1 - p + 1e-6)
    pos = (s > 0.5).to(z.dtype)
    return 0.5 * (
        (ell * pos).sum() / (pos.sum() + 1e-6) + (ell * (1 - pos)).sum() / ((1 - pos).sum() + 1e-6)
    )


class TinySim:
    """Low-rank S = diag(a) + (alpha/r) L R^T, independent of repblend_fast.engine.similarity."""

    def __init__(self, n, r=2, alpha=0.7, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.alpha, self.r = alpha, r
        self._p = {
            "a": 1 + 0.1 * torch.randn(n, generator=g, dtype=DT),
            "L": torch.randn(n, r, generator=g, dtype=DT),
            "R": 0.3 * torch.randn(n, r, generator=g, dtype=DT),
        }

    def params(self):
        return self._p

    def block(self, idx, params=None, *, check=True):
        p = self._p if params is None else params
        return torch.diag_embed(p["a"][idx]) + self.alpha / self.r * p["L"][idx] @ p["R"][idx].mT


def make_problem(seed=0, steps=T, blend=True):
    g = torch.Generator().manual_seed(seed)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, D_F), nn.Tanh()).double()
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.5)
            p.requires_grad_(False)
    x = torch.randn(N, 2, 3, 3, generator=g, dtype=DT)
    y = torch.randn(N, D_T, generator=g, dtype=DT)
    th0 = (
        init_head_flat(D_F, DIM, generator=g, dtype=DT),
        init_head_flat(D_T, DIM, generator=g, dtype=DT),
    )
    ths = tuple(t + 0.05 * torch.randn(t.shape, generator=g, dtype=DT) for t in th0)
    batches = torch.stack([torch.randperm(N, generator=g)[:B] for _ in range(steps)])
    lams = torch.rand(steps, generator=g, dtype=DT) if blend else torch.ones(steps, dtype=DT)
    perms = torch.stack([torch.randperm(B, generator=g) for _ in range(steps)])
    plan = StepPlan(batches, lams, perms)
    eta = (torch.tensor(0.07, dtype=DT), torch.tensor(0.11, dtype=DT))
    return enc, x, y, th0, ths, plan, eta


def brute_exact(enc, x, y, sim, th0, ths, plan, eta, merge=False):
    """Reverse mode through a plainly written unroll, re-encoding every step."""
    x = x.clone().requires_grad_()
    y = y.clone().requires_grad_()
    sp = {k: v.clone().requires_grad_() for k, v in sim.params().items()}
    e1, e2 = (e.clone().requires_grad_() for e in eta)
    a, b = th0[0].clone().requires_grad_(), th0[1].clone().requires_grad_()
    for i in range(plan.steps):
        idx = plan.batches[i]
        lam, perm = plan.lams[i], plan.perms[i]
        f = enc(x[idx])
        f = lam * f + (1 - lam) * f[perm]
        t = y[idx]
        t = lam * t + (1 - lam) * t[perm]
        s = sim.block(idx, sp)
        ell = naive_wbce(naive_head(a, f, D_F, DIM), naive_head(b, t, D_T, DIM), s)
        ga, gb = torch.autograd.grad(ell, (a, b), create_graph=True)
        a, b = a - e1 * ga, b - e2 * gb
    ni, nt = (a - ths[0]).pow(2).sum(), (b - ths[1]).pow(2).sum()
    di, dt = (th0[0] - ths[0]).pow(2).sum(), (th0[1] - ths[1]).pow(2).sum()
    loss = (ni + nt) / (di + dt) if merge else ni / di + nt / dt
    gs = torch.autograd.grad(loss, [x, y, e1, e2, *sp.values()])
    out = {"x": gs[0], "y": gs[1], "eta_img": gs[2], "eta_txt": gs[3]}
    out.update({f"sim.{k}": g for k, g in zip(sp, gs[4:])})
    return loss.detach(), out


def brute_tesla(enc, x, y, sim, th0, ths, plan, eta, merge=False):
    """docs/algorithm.md §5 formulas with explicit per-step double backward."""
    e1, e2 = eta
    a, b = th0
    thetas, G1, G2 = [], torch.zeros_like(a), torch.zeros_like(b)

    def step_loss(a, b, x, y, sp, i):
        idx, lam, perm = plan.batches[i], plan.lams[i], plan.perms[i]
        f = enc(x[idx])
        f = lam * f + (1 - lam) * f[perm]
        t = y[idx]
        t = lam * t + (1 - lam) * t[perm]
        return naive_wbce(
            naive_head(a, f, D_F, DIM), naive_head(b, t, D_T, DIM), sim.block(idx, sp)
        )

    for i in range(plan.steps):
        aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
        ga, gb = torch.autograd.grad(step_loss(aa, bb, x, y, sim.params(), i), (aa, bb))
        thetas.append((a, b))
        G1, G2 = G1 + ga, G2 + gb
        a, b = a - e1 * ga, b - e2 * gb
    d1, d2 = ths[0] - th0[0], ths[1] - th0[1]
    D1, D2 = d1.pow(2).sum(), d2.pow(2).sum()
    r1, r2 = d1 + e1 * G1, d2 + e2 * G2
    loss = (
        (r1.pow(2).sum() + r2.pow(2).sum()) / (D1 + D2)
        if merge
        else r1.pow(2).sum() / D1 + r2.pow(2).sum() / D2
    )
    w1, w2 = (1 / (D1 + D2), 1 / (D1 + D2)) if merge else (1 / D1, 1 / D2)
    c1, c2 = e1 * d1 + e1**2 * G1, e2 * d2 + e2**2 * G2
    xg = x.clone().requires_grad_()
    yg = y.clone().requires_grad_()
    sp = {k: v.clone().requires_grad_() for k, v in sim.params().items()}
    total = {"x": 0, "y": 0, **{f"sim.{k}": 0 for k in sp}}
    for i in range(plan.steps):
        aa, bb = (t.clone().requires_grad_() for t in thetas[i])
        ga, gb = torch.autograd.grad(step_loss(aa, bb, xg, yg, sp, i), (aa, bb), create_graph=True)
        psi = w1 * (c1 * ga).sum() + w2 * (c2 * gb).sum()
        gs = torch.autograd.grad(2 * psi, [xg, yg, *sp.values()])
        total["x"] = total["x"] + gs[0]
        total["y"] = total["y"] + gs[1]
        for k, g in zip(sp, gs[2:]):
            total[f"sim.{k}"] = total[f"sim.{k}"] + g
    total["eta_img"] = 2 * (r1 * G1).sum() * w1
    total["eta_txt"] = 2 * (r2 * G2).sum() * w2
    return loss, total


def run_unroller(settings, enc, x, y, sim, th0, ths, plan, eta):
    u = Unroller(settings, enc, HeadSpec(D_F, DIM), HeadSpec(D_T, DIM), sim)
    return u.run(x, y, sim.params(), eta[0], eta[1], th0, ths, plan)


def assert_grads_close(got, want, rtol=1e-8, atol=1e-10):
    assert set(want) <= set(got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=f"gradient {k}")


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("merge", [False, True])
def test_exact_equals_brute_force(share, ckpt, merge):
    enc, x, y, th0, ths, plan, eta = make_problem()
    sim = TinySim(N)
    want_loss, want = brute_exact(enc, x, y, sim, th0, ths, plan, eta, merge=merge)
    s = UnrollSettings(
        meta_grad="exact", share_encoder=share, checkpoint_steps=ckpt, merge_loss=merge
    )
    got = run_unroller(s, enc, x, y, sim, th0, ths, plan, eta)
    torch.testing.assert_close(got.loss, want_loss, rtol=1e-10, atol=0)
    assert_grads_close(got.grads, want)
    assert got.grads["x"].abs().sum() > 0 and got.grads["sim.R"].abs().sum() > 0


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("merge", [False, True])
def test_tesla_equals_spec_formulas(share, merge):
    enc, x, y, th0, ths, plan, eta = make_problem(seed=1)
    sim = TinySim(N, seed=1)
    want_loss, want = brute_tesla(enc, x, y, sim, th0, ths, plan, eta, merge=merge)
    s = UnrollSettings(meta_grad="tesla", share_encoder=share, merge_loss=merge)
    got = run_unroller(s, enc, x, y, sim, th0, ths, plan, eta)
    torch.testing.assert_close(got.loss, want_loss, rtol=1e-10, atol=0)
    assert_grads_close(got.grads, want)


def test_tesla_parity_eta_grad_uses_per_modality_normalisation():
    enc, x, y, th0, ths, plan, eta = make_problem(seed=2)
    sim = TinySim(N, seed=2)
    merged = run_unroller(
        UnrollSettings(meta_grad="tesla", merge_loss=True), enc, x, y, sim, th0, ths, plan, eta
    )
    parity = run_unroller(
        UnrollSettings(meta_grad="tesla", merge_loss=True, parity_eta_grad=True),
        enc,
        x,
        y,
        sim,
        th0,
        ths,
        plan,
        eta,
    )
    _, per_mod = brute_tesla(enc, x, y, sim, th0, ths, plan, eta, merge=False)
    torch.testing.assert_close(parity.grads["eta_img"], per_mod["eta_img"])
    torch.testing.assert_close(parity.grads["eta_txt"], per_mod["eta_txt"])
    torch.testing.assert_close(parity.grads["y"], merged.grads["y"])  # data gradient unchanged
    assert not torch.allclose(parity.grads["eta_img"], merged.grads["eta_img"])


@pytest.mark.parametrize("merge", [False, True])
def test_one_step_exact_equals_tesla(merge):
    enc, x, y, th0, ths, plan, eta = make_problem(seed=3, steps=1)
    sim = TinySim(N, seed=3)
    ex = run_unroller(
        UnrollSettings(meta_grad="exact", merge_loss=merge), enc, x, y, sim, th0, ths, plan, eta
    )
    te = run_unroller(
        UnrollSettings(meta_grad="tesla", merge_loss=merge), enc, x, y, sim, th0, ths, plan, eta
    )
    torch.testing.assert_close(ex.loss, te.loss)
    assert_grads_close(ex.grads, te.grads)


def test_exact_gradcheck_wrt_texts_and_eta():
    """Finite differences of the whole unrolled loss (independent of any hand-written backward)."""
    enc, x, y, th0, ths, plan, eta = make_problem(seed=4, steps=2)
    sim = TinySim(N, seed=4)
    u = Unroller(
        UnrollSettings(meta_grad="exact"), enc, HeadSpec(D_F, DIM), HeadSpec(D_T, DIM), sim
    )
    base = u.run(x, y, sim.params(), eta[0], eta[1], th0, ths, plan)

    def loss_at(yy, e1):
        return u.run(x, yy, sim.params(), e1, eta[1], th0, ths, plan).loss

    h = 1e-6
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=DT)
    fd = (loss_at(y + h * dy, eta[0]) - loss_at(y - h * dy, eta[0])) / (2 * h)
    torch.testing.assert_close((base.grads["y"] * dy).sum(), fd, rtol=1e-6, atol=1e-9)
    fd_eta = (loss_at(y, eta[0] + h) - loss_at(y, eta[0] - h)) / (2 * h)
    torch.testing.assert_close(base.grads["eta_img"], fd_eta, rtol=1e-6, atol=1e-9)


def test_no_blending_when_lambda_is_one():
    enc, x, y, th0, ths, plan, eta = make_problem(seed=5, blend=False)
    sim = TinySim(N, seed=5)
    want_loss, want = brute_exact(enc, x, y, sim, th0, ths, plan, eta)
    got = run_unroller(UnrollSettings(meta_grad="exact"), enc, x, y, sim, th0, ths, plan, eta)
    assert_grads_close(got.grads, want)


# ----------------------------------------------------------------------------- LoRS
class LinearEncoder(nn.Module):
    def __init__(self, g):
        super().__init__()
        self.fc = nn.Linear(2 * 3 * 3, DIM).double()
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(DIM, 18, generator=g, dtype=DT) * 0.3)
            self.fc.bias.copy_(torch.randn(DIM, generator=g, dtype=DT) * 0.1)

    def forward(self, x):
        return torch.tanh(self.fc(x.flatten(1)))


@pytest.mark.parametrize("mode", ["exact", "tesla"])
def test_lors_differentiates_through_the_encoder_parameters(mode):
    g = torch.Generator().manual_seed(6)
    enc = LinearEncoder(g)
    for p in enc.parameters():
        p.requires_grad_(False)
    _, x, y, _, _, plan, eta = make_problem(seed=6, blend=False)
    th0_img = torch.cat([enc.fc.weight.reshape(-1), enc.fc.bias]).clone()
    th0 = (th0_img, init_head_flat(D_T, DIM, generator=g, dtype=DT))
    ths = tuple(t + 0.05 * torch.randn(t.shape, generator=g, dtype=DT) for t in th0)
    sim = TinySim(N, seed=6)

    def f_img(theta, imgs):
        w, b = theta[: DIM * 18].reshape(DIM, 18), theta[DIM * 18 :]
        return torch.tanh(imgs.flatten(1) @ w.T + b)

    # Brute force: exact reverse mode with the encoder written out by hand.
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    e1, e2 = (e.clone().requires_grad_() for e in eta)
    a, b = th0[0].clone().requires_grad_(), th0[1].clone().requires_grad_()
    if mode == "exact":
        for i in range(plan.steps):
            idx = plan.batches[i]
            ell = naive_wbce(f_img(a, xg[idx]), naive_head(b, yg[idx], D_T, DIM), sim.block(idx))
            ga, gb = torch.autograd.grad(ell, (a, b), create_graph=True)
            a, b = a - e1 * ga, b - e2 * gb
        loss = (a - ths[0]).pow(2).sum() / (th0[0] - ths[0]).pow(2).sum()
        loss = loss + (b - ths[1]).pow(2).sum() / (th0[1] - ths[1]).pow(2).sum()
        want_x, want_y = torch.autograd.grad(loss, [xg, yg])
    settings = UnrollSettings(method="lors", meta_grad=mode)
    u = make_unroller_for_lors(settings, enc, HeadSpec(D_T, DIM), sim)
    got = u.run(x, y, sim.params(), eta[0], eta[1], th0, ths, plan)
    assert got.grads["x"].abs().sum() > 0
    if mode == "exact":
        torch.testing.assert_close(got.grads["x"], want_x, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(got.grads["y"], want_y, rtol=1e-8, atol=1e-10)
    else:
        one = make_problem(seed=6, steps=1, blend=False)[5]
        ex1 = make_unroller_for_lors(
            UnrollSettings(method="lors", meta_grad="exact"), enc, HeadSpec(D_T, DIM), sim
        )
        te1 = make_unroller_for_lors(
            UnrollSettings(method="lors", meta_grad="tesla"), enc, HeadSpec(D_T, DIM), sim
        )
        a1 = ex1.run(x, y, sim.params(), eta[0], eta[1], th0, ths, one)
        b1 = te1.run(x, y, sim.params(), eta[0], eta[1], th0, ths, one)
        assert_grads_close(b1.grads, a1.grads)


def test_bad_spec_for_method_is_rejected():
    enc = make_problem()[0]
    with pytest.raises(ValueError, match="FlatSpec"):
        Unroller(UnrollSettings(method="lors"), enc, HeadSpec(D_F, DIM), HeadSpec(D_T, DIM))
    with pytest.raises(ValueError, match="meta_grad"):
        enc, x, y, th0, ths, plan, eta = make_problem()
        run_unroller(UnrollSettings(meta_grad="nope"), enc, x, y, TinySim(N), th0, ths, plan, eta)


def test_identity_targets_without_similarity():
    enc, x, y, th0, ths, plan, eta = make_problem(seed=7)
    u = Unroller(
        UnrollSettings(meta_grad="exact", loss="infonce"),
        enc,
        HeadSpec(D_F, DIM),
        HeadSpec(D_T, DIM),
    )
    r = u.run(x, y, {}, eta[0], eta[1], th0, ths, plan)
    assert torch.isfinite(r.loss) and r.grads["y"].abs().sum() > 0
    assert not any(k.startswith("sim.") for k in r.grads)


@pytest.mark.parametrize("mode", ["exact", "tesla"])
@pytest.mark.parametrize("merge", [False, True])
def test_k_batched_trajectories_equal_k_separate_ones(mode, merge):
    problems = [make_problem(seed=20 + j) for j in range(3)]
    enc, x, y = problems[0][:3]
    sim = TinySim(N, seed=20)
    u = Unroller(
        UnrollSettings(meta_grad=mode, merge_loss=merge, blend_target=True),
        enc,
        HeadSpec(D_F, DIM),
        HeadSpec(D_T, DIM),
        sim,
    )
    eta = problems[0][6]
    singles = [u.run(x, y, sim.params(), eta[0], eta[1], p[3], p[4], p[5]) for p in problems]
    start = tuple(torch.stack([p[3][m] for p in problems]) for m in range(2))
    target = tuple(torch.stack([p[4][m] for p in problems]) for m in range(2))
    plan = StepPlan.stack([p[5] for p in problems])
    batched = u.run(x, y, sim.params(), eta[0], eta[1], start, target, plan)
    torch.testing.assert_close(batched.loss, sum(r.loss for r in singles) / 3)
    torch.testing.assert_close(batched.loss_img, sum(r.loss_img for r in singles) / 3)
    for name in singles[0].grads:
        want = sum(r.grads[name] for r in singles) / 3
        torch.testing.assert_close(batched.grads[name], want, rtol=1e-9, atol=1e-11, msg=name)


def test_blend_target_matches_brute_force():
    enc, x, y, th0, ths, plan, eta = make_problem(seed=8)
    sim = TinySim(N, seed=8)

    class BlendedSim(TinySim):
        """Brute force: blend S[I, I] inside the block with the step's permutation."""

    calls = iter(range(plan.steps))

    def block(idx, params=None, *, check=True, _orig=sim.block):
        s = _orig(idx, params, check=check)
        i = next(calls)
        lam, perm = plan.lams[i], plan.perms[i]
        return lam * s + (1 - lam) * s[perm][:, perm]

    sim_b = BlendedSim(N, seed=8)
    sim_b.block = block
    _, want = brute_exact(enc, x, y, sim_b, th0, ths, plan, eta)
    got = run_unroller(
        UnrollSettings(meta_grad="exact", blend_target=True), enc, x, y, sim, th0, ths, plan, eta
    )
    assert_grads_close(got.grads, want)
    plain = run_unroller(UnrollSettings(meta_grad="exact"), enc, x, y, sim, th0, ths, plan, eta)
    assert not torch.allclose(plain.grads["y"], got.grads["y"])


def test_lors_rejects_several_trajectories_per_call():
    g = torch.Generator().manual_seed(0)
    enc = LinearEncoder(g)
    u = make_unroller_for_lors(UnrollSettings(method="lors"), enc, HeadSpec(D_T, DIM))
    _, x, y, _, _, plan, eta = make_problem(blend=False)
    th = (torch.zeros(2, DIM * 19, dtype=DT), torch.zeros(2, HeadSpec(D_T, DIM).numel, dtype=DT))
    with pytest.raises(ValueError, match="K=1"):
        u.run(x, y, {}, eta[0], eta[1], th, th, StepPlan.stack([plan, plan]))


def _masks(seed, steps=T):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        (torch.rand(steps, B, DIM, generator=g, dtype=DT) >= 0.1).to(DT) / 0.9 for _ in range(2)
    )


def test_unroll_dropout_masks_match_brute_force_exact():
    enc, x, y, th0, ths, plan, eta = make_problem(seed=11)
    sim = TinySim(N, seed=11)
    ki, kt = _masks(0)
    plan.keep_img, plan.keep_txt = ki, kt
    step = iter(range(plan.steps))
    orig = naive_head

    def masked_head(theta, h, d_in, dim):
        i = current[0]
        return orig(theta, h, d_in, dim, mask=ki[i] if d_in == D_F else kt[i])

    current = [0]

    class StepSim(TinySim):
        def block(self, idx, params=None, *, check=True):
            current[0] = next(step)
            return TinySim.block(self, idx, params)

    sim_s = StepSim(N, seed=11)
    globals()["naive_head"] = masked_head
    try:
        _, want = brute_exact(enc, x, y, sim_s, th0, ths, plan, eta)
    finally:
        globals()["naive_head"] = orig
    got = run_unroller(UnrollSettings(meta_grad="exact"), enc, x, y, sim, th0, ths, plan, eta)
    assert_grads_close(got.grads, want)


def test_unroll_dropout_tesla_pass_two_masks_are_used():
    enc, x, y, th0, ths, plan, eta = make_problem(seed=12)
    sim = TinySim(N, seed=12)
    plan.keep_img, plan.keep_txt = _masks(1)
    same = run_unroller(UnrollSettings(meta_grad="tesla"), enc, x, y, sim, th0, ths, plan, eta)
    plan.keep_img2, plan.keep_txt2 = _masks(2)
    fresh = run_unroller(UnrollSettings(meta_grad="tesla"), enc, x, y, sim, th0, ths, plan, eta)
    # Pass 1 (loss, eta gradient) is unchanged; the data gradient uses the new masks.
    torch.testing.assert_close(same.loss, fresh.loss)
    torch.testing.assert_close(same.grads["eta_img"], fresh.grads["eta_img"])
    assert not torch.allclose(same.grads["y"], fresh.grads["y"])
    ones = tuple(torch.ones(T, B, DIM, dtype=DT) for _ in range(2))
    plan.keep_img, plan.keep_txt = ones
    plan.keep_img2 = plan.keep_txt2 = None
    with_ones = run_unroller(UnrollSettings(meta_grad="tesla"), enc, x, y, sim, th0, ths, plan, eta)
    _, want = brute_tesla(enc, x, y, sim, th0, ths, plan, eta)
    assert_grads_close(with_ones.grads, want)


@pytest.mark.parametrize("mode", ["exact", "tesla"])
@pytest.mark.parametrize("chunk", [1, 2, 100])
def test_chunked_encoder_vjp_equals_brute_force(mode, chunk):
    enc, x, y, th0, ths, plan, eta = make_problem(seed=13)
    sim = TinySim(N, seed=13)
    brute = brute_exact if mode == "exact" else brute_tesla
    _, want = brute(enc, x, y, sim, th0, ths, plan, eta)
    s = UnrollSettings(meta_grad=mode, encoder_chunk=chunk)
    got = run_unroller(s, enc, x, y, sim, th0, ths, plan, eta)
    assert_grads_close(got.grads, want)


def test_asymmetric_blending_through_the_encoder_student_matches_brute_force():
    """symmetric=False: the encoder is the student and its outputs are blended with the texts."""
    g = torch.Generator().manual_seed(14)
    enc = LinearEncoder(g)
    for p in enc.parameters():
        p.requires_grad_(False)
    _, x, y, _, _, plan, eta = make_problem(seed=14)  # with blending
    th0 = (
        torch.cat([enc.fc.weight.reshape(-1), enc.fc.bias]).clone(),
        init_head_flat(D_T, DIM, generator=g, dtype=DT),
    )
    ths = tuple(t + 0.05 * torch.randn(t.shape, generator=g, dtype=DT) for t in th0)
    sim = TinySim(N, seed=14)
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    a, b = th0[0].clone().requires_grad_(), th0[1].clone().requires_grad_()
    for i in range(plan.steps):
        idx, lam, perm = plan.batches[i], plan.lams[i], plan.perms[i]
        w, bias = a[: DIM * 18].reshape(DIM, 18), a[DIM * 18 :]
        f = torch.tanh(xg[idx].flatten(1) @ w.T + bias)
        f = lam * f + (1 - lam) * f[perm]
        t = yg[idx]
        t = lam * t + (1 - lam) * t[perm]
        ell = naive_wbce(f, naive_head(b, t, D_T, DIM), sim.block(idx))
        ga, gb = torch.autograd.grad(ell, (a, b), create_graph=True)
        a, b = a - eta[0] * ga, b - eta[1] * gb
    loss = (a - ths[0]).pow(2).sum() / (th0[0] - ths[0]).pow(2).sum()
    loss = loss + (b - ths[1]).pow(2).sum() / (th0[1] - ths[1]).pow(2).sum()
    want_x, want_y = torch.autograd.grad(loss, [xg, yg])
    u = make_unroller_for_lors(UnrollSettings(method="lors"), enc, HeadSpec(D_T, DIM), sim)
    got = u.run(x, y, sim.params(), eta[0], eta[1], th0, ths, plan)
    torch.testing.assert_close(got.grads["x"], want_x, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(got.grads["y"], want_y, rtol=1e-8, atol=1e-10)
