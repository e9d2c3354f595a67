"""The random draws of the outer loop, all from one seeded ``torch.Generator`` on the host.

:class:`IterationSampler` draws, per trajectory of an iteration, the expert (a shuffled cycle over
the experts), the start epoch, the unroll's batches (a permutation of the N pairs consumed in
chunks of B), the blending coefficients and within-batch permutations, and the dropout keep-masks
when the unroll keeps dropout. It makes every draw on the CPU before any device work, in a fixed
order, so a run is a function of its seed, and its state (the generator's plus the two cyclic
samplers') goes into checkpoints for a bit-identical resume. Values are read from the host tensors
with ``tolist`` (a plain copy, no dispatch of a device read).
"""

from __future__ import annotations

import math

import torch

from repblend_fast.config import DistillConfig
from repblend_fast.engine.step_plan import StepPlan

__all__ = ["BatchSampler", "ExpertSampler", "IterationSampler", "sample_beta"]


def sample_beta(alpha: float, generator: torch.Generator) -> float:
    """One draw of ``Beta(alpha, alpha)`` from ``generator`` (``alpha <= 0`` gives 1.0).

    ``torch.distributions`` takes no generator, so this uses two Marsaglia-Tsang gamma draws.
    """
    if alpha <= 0:
        return 1.0
    if alpha == 1.0:
        return torch.rand((), generator=generator, dtype=torch.float64).tolist()
    a = _gamma(alpha, generator)
    b = _gamma(alpha, generator)
    return a / (a + b)


def _gamma(k: float, g: torch.Generator) -> float:
    if k < 1:
        u = torch.rand((), generator=g, dtype=torch.float64).tolist()
        return _gamma(k + 1, g) * u ** (1 / k)
    d = k - 1 / 3
    c = 1 / math.sqrt(9 * d)
    while True:
        z = torch.randn((), generator=g, dtype=torch.float64).tolist()
        v = (1 + c * z) ** 3
        if v <= 0:
            continue
        u = torch.rand((), generator=g, dtype=torch.float64).tolist()
        if math.log(u) < 0.5 * z * z + d - d * v + d * math.log(v):
            return d * v


class BatchSampler:
    """Consumes a permutation of ``{0..N-1}`` in chunks of B; a chunk that would overflow the
    permutation triggers a fresh one (docs/algorithm.md §4 step 2)."""

    def __init__(self, n: int, batch: int, generator: torch.Generator):
        self.n, self.batch, self.g = n, batch, generator
        self.perm = torch.randperm(n, generator=generator)
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > self.n:
            self.perm = torch.randperm(self.n, generator=self.g)
            self.pos = 0
        out = self.perm[self.pos : self.pos + self.batch].clone()
        self.pos += self.batch
        return out


class ExpertSampler:
    """Cycles through a shuffled order of the experts; reshuffles at the end of each cycle."""

    def __init__(self, num_experts: int, generator: torch.Generator):
        self.n, self.g = num_experts, generator
        self.order = torch.randperm(num_experts, generator=generator)
        self.pos = 0

    def next(self) -> int:
        if self.pos >= self.n:
            self.order = torch.randperm(self.n, generator=self.g)
            self.pos = 0
        e = self.order[self.pos].tolist()
        self.pos += 1
        return e


class IterationSampler:
    """The draws of each iteration (see the module docstring).

    Args:
        config: the run's config (``num_trajectories``, ``syn_steps``, ``batch_size``,
            ``max_start_epoch``, blending and dropout settings).
        num_experts: experts in the store.
        generator: the run's generator; constructing the sampler draws the first batch
            permutation and the first expert order from it.
        img_dim, txt_dim: widths of the image and text heads (dropout keep-masks); ``img_dim``
            is None when the image student is an encoder (no image head).
        dtype: dtype of the blending coefficients and keep-masks.
    """

    def __init__(
        self,
        config: DistillConfig,
        num_experts: int,
        generator: torch.Generator,
        img_dim: int | None,
        txt_dim: int,
        dtype: torch.dtype = torch.float32,
    ):
        self.cfg, self.g = config, generator
        self.img_dim, self.txt_dim, self.dtype = img_dim, txt_dim, dtype
        self.batches = BatchSampler(config.pairs, config.batch_size, generator)
        self.experts = ExpertSampler(num_experts, generator)

    def draw(self) -> list[tuple[int, int, StepPlan]]:
        """``[(expert, start epoch, plan on the CPU)]``, one per trajectory of the iteration."""
        out = []
        for _ in range(self.cfg.num_trajectories):
            e = self.experts.next()
            t = torch.randint(0, self.cfg.max_start_epoch, (), generator=self.g).tolist()
            out.append((e, t, self._plan()))
        return out

    def _plan(self) -> StepPlan:
        cfg = self.cfg
        batches, lams, perms = [], [], []
        for _ in range(cfg.syn_steps):
            batches.append(self.batches.next())
            if cfg.blending:
                lams.append(sample_beta(cfg.blend_alpha, self.g))
                perms.append(torch.randperm(cfg.batch_size, generator=self.g))
            else:
                lams.append(1.0)
                perms.append(torch.arange(cfg.batch_size))
        plan = StepPlan(
            torch.stack(batches),
            torch.tensor(lams, dtype=self.dtype),
            torch.stack(perms),
            blend=cfg.blending and cfg.blend_alpha > 0,
        )
        if cfg.unroll_dropout:
            plan.keep_img, plan.keep_txt = self._keep_masks()
            if cfg.meta_grad == "tesla":
                plan.keep_img2, plan.keep_txt2 = self._keep_masks()
        return plan

    def _keep_masks(self, rate: float = 0.1):
        """Rescaled dropout keep-masks ``[T, B, D]`` of the image (if it has a head) and text
        heads."""
        t, b = self.cfg.syn_steps, self.cfg.batch_size

        def draw(dim):
            keep = torch.rand((t, b, dim), generator=self.g) >= rate
            return keep.to(self.dtype) / (1 - rate)

        img = draw(self.img_dim) if self.img_dim is not None else None
        return img, draw(self.txt_dim)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The cyclic samplers' state (the generator's state is the caller's to save)."""
        return {
            "batch_perm": self.batches.perm,
            "batch_pos": torch.tensor(self.batches.pos),
            "expert_order": self.experts.order,
            "expert_pos": torch.tensor(self.experts.pos),
        }

    def load_state_tensors(self, t: dict[str, torch.Tensor]) -> None:
        self.batches.perm, self.batches.pos = t["batch_perm"], int(t["batch_pos"])
        self.experts.order, self.experts.pos = t["expert_order"], int(t["expert_pos"])
