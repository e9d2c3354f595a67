"""trajectory_distance and trajectory_terms (docs/algorithm.md §4 step 4, §5, §11e) on flat
parameters.

Sizes: 17,713,152 elements is RepBlend's θ^I + θ^T at paper settings (10,626,048 + 7,087,104);
39.9M is the LoRS student's (NFNet-L0 encoder + text head). Memory-bound; byte model in fp32:
``trajectory_distance`` forward reads student, start and target (12 B/element), forward+backward
also reads student and target again and writes the gradient (24 B/element); ``trajectory_terms``
reads start, target and G and writes the pass-2 direction (16 B/element). GB/s are also reported as
a fraction of a ``dst.copy_(src)`` moving the same number of bytes, timed in the same run
(``bw_fraction``).

Baselines: ``reference`` is what a user would otherwise write, plain fp32 eager torch
(``((s - t)**2).sum() / ((a - t)**2).sum()``, and the TESLA terms as four fp32 expressions);
``compile`` is ``torch.compile`` of that code. The float64-accumulating
``repblend_fast.reference`` is only the accuracy yardstick: every provider (the eager baseline
too) must match it within rtol 1e-5 (docs/design.md §4, N >= 1e6) before it is timed, and a fused
provider must give the same bits in two runs.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import PROVIDERS, compiled, run_case
from repblend_fast import reference
from repblend_fast.ops import trajectory_distance, trajectory_terms

TOL = {"atol": 1e-6, "rtol": 1e-5, "rel_rmse": 1e-5}


def cases(shapes: str) -> list[tuple[str, dict]]:
    sizes = {
        "ci": [100_000, 1_000_000],
        "tiny": [100_000],
        "check": [17_713_152, 39_900_000],
        "paper": [17_713_152, 39_900_000],
        "scale": [39_900_000, 100_000_000],
    }[shapes]
    return [(f"N{n}", {"N": n}) for n in sizes]


def _inputs(n: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(n % 9973)
    start = torch.randn(n, generator=g)
    target = start + 1e-2 * torch.randn(n, generator=g)
    grad_sum = 1e-2 * torch.randn(n, generator=g)
    student = start - 0.1 * grad_sum
    return [t.to(device) for t in (student, start, target, grad_sum)]


def eager_distance(student, start, target):
    """The distance as a user writes it: fp32 eager torch, no float64 accumulation."""
    return ((student - target) ** 2).sum() / ((start - target) ** 2).sum()


def eager_terms(start, target, grad_sum, lr):
    """The one-pass TESLA terms as a user writes them (fp32 eager torch)."""
    delta = target - start
    r = delta + lr * grad_sum
    return (delta * delta).sum(), (r * r).sum(), (r * grad_sum).sum(), lr * r


def _fns(provider: str, mode: str):
    if provider == "reference":
        return eager_distance, eager_terms
    if provider == "compile":
        return (
            compiled("trajectory_distance", eager_distance, mode),
            compiled("trajectory_terms", eager_terms, mode),
        )
    return (
        lambda s, a, t: trajectory_distance(s, a, t, impl=provider),
        lambda a, t, g, lr: trajectory_terms(a, t, g, lr, impl=provider),
    )


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_trajectory_distance(benchmark, device, case, provider, mode):
    student, start, target, _ = _inputs(case["N"], device)

    def make_fn(p):
        dist = _fns(p, mode)[0]
        if mode == "fwd":
            return lambda: dist(student, start, target)
        s = student.detach().requires_grad_(True)
        return lambda: torch.autograd.grad(dist(s, start, target), [s])[0]

    def yardstick():  # float64 accumulation; never timed
        if mode == "fwd":
            return reference.trajectory_distance(student, start, target)
        s = student.detach().requires_grad_(True)
        return torch.autograd.grad(reference.trajectory_distance(s, start, target), [s])[0]

    n = case["N"]
    run_case(
        benchmark,
        op="trajectory_distance",
        provider=provider,
        mode=mode,
        dtype=start.dtype,
        device=device,
        shape={"N": n},
        make_fn=make_fn,
        make_ref=yardstick,
        tensors=[student, start, target],
        order=0,
        tol=TOL,
        deterministic=True,
        bytes_moved=float((12 if mode == "fwd" else 24) * n),
    )


@pytest.mark.parametrize("provider", PROVIDERS)
def test_trajectory_terms(benchmark, device, case, provider):
    _, start, target, grad_sum = _inputs(case["N"], device)
    lr = torch.tensor(0.1, device=device)

    def make_fn(p):
        terms = _fns(p, "fwd")[1]
        return lambda: tuple(terms(start, target, grad_sum, lr))

    def yardstick():  # float64 accumulation; never timed
        return tuple(reference.trajectory_terms(start, target, grad_sum, lr))

    n = case["N"]
    run_case(
        benchmark,
        op="trajectory_terms",
        provider=provider,
        mode="fwd",
        dtype=start.dtype,
        device=device,
        shape={"N": n},
        make_fn=make_fn,
        make_ref=yardstick,
        tensors=[start, target, grad_sum],
        order=0,
        tol=TOL,
        deterministic=True,
        bytes_moved=float(16 * n),
    )
