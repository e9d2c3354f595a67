"""StepPlan: the random draws of one iteration, as the unroll reads them (docs/algorithm.md §4).

Drawn by :class:`repblend_fast.engine.sampling.IterationSampler`, unrolled by
:class:`repblend_fast.engine.unroll.Unroller`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from repblend_fast.engine.transfer import to_device


@dataclass
class StepPlan:
    """The random draws of one iteration (everything the unroll needs besides tensors).

    batches: ``[T, B]`` long indices into the N synthetic pairs (``[K, T, B]`` for K trajectories).
    lams: ``[T]`` (or ``[K, T]``) blending coefficients (1.0 = no blending).
    perms: ``[T, B]`` (or ``[K, T, B]``) long, the within-batch permutation of each step.
    keep_img, keep_txt: optional rescaled dropout keep-masks of the heads, ``[(K,) T, B, D]``
        (``unroll_dropout``); ``keep_img2``/``keep_txt2`` are TESLA pass 2's masks (the
        reference resamples dropout there; ``None`` reuses pass 1's).
    blend: whether the steps blend (``None``: decided by reading ``lams``, one host read per
        step; plans from :class:`repblend_fast.engine.sampling.IterationSampler` say it).
    touched, inverse: the sorted distinct pair indices of ``batches`` ``[U]`` and each batch
        entry's position among them (shaped like ``batches``), computed on the host by
        :meth:`with_touched` (``None``: the unroll computes them, which reads the device).
    """

    batches: torch.Tensor
    lams: torch.Tensor
    perms: torch.Tensor
    keep_img: torch.Tensor | None = None
    keep_txt: torch.Tensor | None = None
    keep_img2: torch.Tensor | None = None
    keep_txt2: torch.Tensor | None = None
    blend: bool | None = None
    touched: torch.Tensor | None = None
    inverse: torch.Tensor | None = None

    _FIELDS = ("batches", "lams", "perms", "keep_img", "keep_txt", "keep_img2", "keep_txt2")

    @property
    def steps(self) -> int:
        return int(self.batches.shape[-2])

    @property
    def k(self) -> int:
        return int(self.batches.shape[0]) if self.batches.dim() == 3 else 1

    def batched(self) -> StepPlan:
        """The same plan with a leading K dimension."""
        if self.batches.dim() == 3:
            return self
        vals = [getattr(self, f) for f in self._FIELDS]
        inv = None if self.inverse is None else self.inverse[None]
        return StepPlan(
            *[None if v is None else v[None] for v in vals],
            blend=self.blend,
            touched=self.touched,
            inverse=inv,
        )

    def to(self, device: torch.device | str) -> StepPlan:
        """The same plan with every tensor on ``device``, sent without blocking the host
        (:func:`repblend_fast.engine.transfer.to_device`: pinned, non-blocking copies on CUDA)."""
        vals = [getattr(self, f) for f in self._FIELDS] + [self.touched, self.inverse]
        moved = [None if v is None else to_device(v, device) for v in vals]
        return StepPlan(*moved[:-2], blend=self.blend, touched=moved[-2], inverse=moved[-1])

    def with_touched(self) -> StepPlan:
        """The same plan with ``touched``/``inverse`` filled in (read ``batches`` here: do it
        while the plan is on the host)."""
        touched, inverse = torch.unique(self.batches, return_inverse=True)
        return dataclasses.replace(self, touched=touched, inverse=inverse)

    @staticmethod
    def stack(plans: list[StepPlan]) -> StepPlan:
        """K single-trajectory plans as one ``[K, ...]`` plan (``touched`` is not carried over:
        call :meth:`with_touched` on the result)."""
        out = []
        for f in StepPlan._FIELDS:
            vals = [getattr(p, f) for p in plans]
            out.append(None if vals[0] is None else torch.stack(vals))
        blends = {p.blend for p in plans}
        return StepPlan(*out, blend=blends.pop() if len(blends) == 1 else None)

    def keep(self, i: int, second_pass: bool = False):
        """Step i's keep-masks ``([K, B, D] or None, [K, B, D] or None)``."""
        ki, kt = self.keep_img, self.keep_txt
        if second_pass and self.keep_img2 is not None:
            ki = self.keep_img2
        if second_pass and self.keep_txt2 is not None:
            kt = self.keep_txt2
        return (None if ki is None else ki[:, i]), (None if kt is None else kt[:, i])
