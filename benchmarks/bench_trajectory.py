"""trajectory_distance and trajectory_terms (docs/algorithm.md §4 step 4, §5, §11e) on flat
parameters.

Sizes: 17,713,152 elements is RepBlend's θ^I + θ^T at paper settings (10,626,048 + 7,087,104);
39.9M is the LoRS student's (NFNet-L0 encoder + text head). Memory-bound; byte model in fp32:
``trajectory_distance`` forward reads student, start and target (12 B/element), forward+backward
also reads student and target again and writes the gradient (24 B/element); ``trajectory_terms``
reads start, target and G and writes the pass-2 direction (16 B/element). GB/s are compared with
this machine's measured ``copy_`` bandwidth (``bw_fraction``).

Parity: rtol 1e-5 against the float64-accumulating reference (docs/design.md §4, N ≥ 1e6), and a
fused
provider must be bit-identical across two runs.
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
        "tiny": [100_000, 1_000_000],
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


def _fns(provider: str, mode: str):
    if provider == "reference":
        return reference.trajectory_distance, reference.trajectory_terms
    if provider == "compile":
        return (
            compiled("trajectory_distance", reference.trajectory_distance, mode),
            compiled("trajectory_terms", reference.trajectory_terms, mode),
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
        tensors=[start, target, grad_sum],
        order=0,
        tol=TOL,
        deterministic=True,
        bytes_moved=float(16 * n),
    )
