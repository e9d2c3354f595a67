"""Learned soft similarity targets S (LoRS, docs/algorithm.md §6): low-rank and full generators.

Rows of S index synthetic images, columns synthetic texts. The distillation step only ever needs
the batch block ``S[I, I]``; autograd through the gather scatter-adds its gradient into rows ``I``
of the low-rank factors (or into the block ``[I, I]`` of the full matrix), so one step never
touches more than the touched rows. Evaluation uses :meth:`full`.

Both generators keep their parameters as fp32 leaf tensors (docs/design.md §3) that the outer
optimiser
updates in place; :meth:`block` and :meth:`full` also accept a ``params`` dict, so they compose
with ``torch.func`` transforms (pass the functional copies instead of the leaves).
"""

from __future__ import annotations

import torch

from repblend_fast.ops._dispatch import values_readable

__all__ = [
    "FullSimilarity",
    "LowRankSimilarity",
    "SimilarityGenerator",
    "make_similarity",
    "similarity_from_state",
]


class SimilarityGenerator:
    """Common interface: ``params()``, ``block(indices)``, ``full()``, ``state_dict()``."""

    kind: str = ""
    n: int

    def params(self) -> dict[str, torch.Tensor]:
        """The leaf tensors the outer optimiser updates, by name."""
        raise NotImplementedError

    def block(
        self,
        indices: torch.Tensor,
        params: dict[str, torch.Tensor] | None = None,
        *,
        check: bool = True,
    ) -> torch.Tensor:
        raise NotImplementedError

    def full(self, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def config(self) -> dict:
        """JSON-serialisable constructor arguments (saved next to the tensors)."""
        raise NotImplementedError

    # --- shared helpers -----------------------------------------------------------------------

    def _check_indices(self, indices: torch.Tensor, check: bool) -> None:
        if not isinstance(indices, torch.Tensor):
            raise TypeError(
                f"indices must be a torch.Tensor of int64, got {type(indices).__name__}"
            )
        if indices.dtype != torch.long:
            raise ValueError(
                f"indices must be int64 (torch.long), got {indices.dtype}; "
                "use indices.long() or torch.randperm(...)"
            )
        if indices.dim() not in (1, 2):
            raise ValueError(f"indices must be [B] or [K, B], got shape {tuple(indices.shape)}")
        if indices.shape[-1] == 0:
            raise ValueError("indices must select at least one item")
        # A range check reads the values (one device sync on GPU); pass check=False in hot loops
        # whose indices come from a validated permutation.
        if check and values_readable(indices):
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= self.n:
                raise ValueError(f"indices must lie in [0, {self.n}); got values in [{lo}, {hi}]")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Detached copies of the parameters (safetensors-compatible: contiguous, no sharing)."""
        return {k: v.detach().clone().contiguous() for k, v in self.params().items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> SimilarityGenerator:
        """Copy ``state`` into the existing leaves in place (optimiser references stay valid)."""
        own = self.params()
        if set(state) != set(own):
            raise ValueError(
                f"{self.kind} similarity state must hold exactly {sorted(own)}; got {sorted(state)}"
            )
        for k, v in own.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise ValueError(
                    f"{self.kind} similarity tensor {k!r} must have shape {tuple(v.shape)}, "
                    f"got {tuple(state[k].shape)} (was it saved with another n or rank?)"
                )
            v.copy_(state[k])
        return self

    def to(self, device: str | torch.device) -> SimilarityGenerator:
        """Move the leaves to ``device`` (new leaves: build the optimiser afterwards)."""
        for k, v in self.params().items():
            setattr(self, k, v.detach().to(device).requires_grad_(v.requires_grad))
        return self

    def metadata(self) -> dict[str, str]:
        """String metadata for a safetensors header."""
        return {k: str(v) for k, v in self.config().items()}


class LowRankSimilarity(SimilarityGenerator):
    """``S = diag(a) + (alpha / r) L Rᵀ``: ``a [N]`` = 1, ``L [N, r]`` ~ N(0, 1), ``R [N, r]`` = 0.

    So ``S = I`` at initialisation and only ``R``'s updates (then ``L``'s) move it away.
    """

    kind = "lowrank"

    def __init__(
        self,
        n: int,
        rank: int,
        alpha: float,
        generator: torch.Generator | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if n < 1 or rank < 1:
            raise ValueError(f"need n >= 1 and rank >= 1, got n={n}, rank={rank}")
        self.n, self.rank, self.alpha = int(n), int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        # Draw on the CPU so a given seed gives the same S on every device.
        L = torch.randn(self.n, self.rank, generator=generator, dtype=dtype)
        self.a = torch.ones(self.n, dtype=dtype, device=device).requires_grad_(True)
        self.L = L.to(device).requires_grad_(True)
        self.R = torch.zeros(self.n, self.rank, dtype=dtype, device=device).requires_grad_(True)

    def params(self) -> dict[str, torch.Tensor]:
        return {"a": self.a, "L": self.L, "R": self.R}

    def config(self) -> dict:
        return {"kind": self.kind, "n": self.n, "rank": self.rank, "alpha": self.alpha}

    def block(self, indices, params=None, *, check=True):
        """``S[I, I] = diag(a_I) + (alpha/r) L_I R_Iᵀ``: ``[B]`` -> ``[B, B]``, ``[K, B]`` ->
        ``[K, B, B]``; differentiable w.r.t. ``params`` (default: the leaves)."""
        self._check_indices(indices, check)
        p = self.params() if params is None else params
        a, L, R = p["a"], p["L"], p["R"]
        LI, RI = L[indices], R[indices]  # [..., B, r]
        return torch.diag_embed(a[indices]) + self.scale * (LI @ RI.transpose(-1, -2))

    def full(self, params=None):
        """The whole ``[N, N]`` matrix."""
        p = self.params() if params is None else params
        return torch.diag(p["a"]) + self.scale * (p["L"] @ p["R"].T)


class FullSimilarity(SimilarityGenerator):
    """A free ``[N, N]`` matrix, initialised to the identity."""

    kind = "full"

    def __init__(
        self,
        n: int,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if n < 1:
            raise ValueError(f"need n >= 1, got n={n}")
        self.n = int(n)
        self.S = torch.eye(self.n, dtype=dtype, device=device).requires_grad_(True)

    def params(self) -> dict[str, torch.Tensor]:
        return {"S": self.S}

    def config(self) -> dict:
        return {"kind": self.kind, "n": self.n}

    def block(self, indices, params=None, *, check=True):
        """``S[I, I]``: ``[B]`` -> ``[B, B]``, ``[K, B]`` -> ``[K, B, B]``."""
        self._check_indices(indices, check)
        S = (self.params() if params is None else params)["S"]
        return S[indices.unsqueeze(-1), indices.unsqueeze(-2)]

    def full(self, params=None):
        """The whole ``[N, N]`` matrix (the leaf itself when ``params`` is None)."""
        return (self.params() if params is None else params)["S"]


def make_similarity(
    kind: str,
    n: int,
    *,
    rank: int = 10,
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SimilarityGenerator:
    """Build a generator by ``kind`` (``"lowrank"`` or ``"full"``); ``rank``/``alpha`` are for
    the low-rank one."""
    if kind == "lowrank":
        return LowRankSimilarity(n, rank, alpha, generator, device=device, dtype=dtype)
    if kind == "full":
        return FullSimilarity(n, device=device, dtype=dtype)
    raise ValueError(f"similarity kind must be 'lowrank' or 'full', got {kind!r}")


def similarity_from_state(
    config: dict, state: dict[str, torch.Tensor], *, device: str | torch.device = "cpu"
) -> SimilarityGenerator:
    """Rebuild a generator from :meth:`SimilarityGenerator.config` (or its string metadata form)
    and a :meth:`SimilarityGenerator.state_dict`."""
    kind = config.get("kind")
    n = int(config["n"])
    if kind == "lowrank":
        # A throwaway generator: L is overwritten, and the global RNG stream must not move.
        g = torch.Generator().manual_seed(0)
        gen = LowRankSimilarity(n, int(config["rank"]), float(config["alpha"]), g, device=device)
    elif kind == "full":
        gen = FullSimilarity(n, device=device)
    else:
        raise ValueError(f"unknown similarity kind {kind!r} in saved config")
    return gen.load_state_dict({k: v.to(device) for k, v in state.items()})
