"""The step benchmark's providers behind one interface: ``iteration(i)`` runs the ``i``-th outer
iteration (meta-gradients and the optimiser step), ``grads(plan)`` only the meta-gradients (for
the parity check).

* ``lors-authors`` / ``repblend-authors``: :mod:`repblend_fast.bench.baselines`;
* ``repblend-fast`` / ``lors-fast``: :class:`repblend_fast.engine.unroll.Unroller` with
  ``share_encoder=True``, snapshots preloaded on the device, bf16 autocast of the encoder on CUDA,
  optionally ``torch.compile`` (``compile``) and a memory budget (``memory_budget_mib``).

``FastRunner.grads_at_start(plan)`` computes the meta-gradients of the runner's own configuration
at the state it was built with, so that the configuration that is timed is the one whose parity
is checked (:mod:`repblend_fast.bench.parity`), before or after the timed iterations.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable

import torch

from repblend_fast.bench import baselines as authors
from repblend_fast.bench.inputs import StepInputs, plan_to
from repblend_fast.bench.shapes import default_encoder_chunk
from repblend_fast.engine.ranges import phase
from repblend_fast.engine.unroll import StepPlan, Unroller, UnrollSettings, make_unroller_for_lors
from repblend_fast.methods import student_for_experts
from repblend_fast.models.heads import HeadSpec

__all__ = [
    "DEFAULT_AUTOCAST",
    "DEFAULT_PROVIDERS",
    "PROVIDERS",
    "AuthorsRunner",
    "FastRunner",
    "default_autocast",
    "make_runner",
    "parse_providers",
    "precision_rows",
]

PROVIDERS = ("lors-authors", "repblend-authors", "repblend-fast", "lors-fast")
_AUTOCAST_NAMES = {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}
DEFAULT_PROVIDERS = ("lors-authors", "repblend-authors", "repblend-fast")
#: The fast path's precision rows by default: the shipped setting (``auto``: bf16 encoder on CUDA)
#: and fp32, so that a GPU speed-up is reported fp32 vs fp32 as well as bf16 vs fp32 (the
#: baselines run fp32). On a CPU both are fp32: one row (:func:`precision_rows`).
DEFAULT_AUTOCAST = ("auto", "none")
_AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class FastRunner:
    """repblend_fast's path: Unroller + SGD-momentum, snapshots preloaded on the device.

    The step's phases are the engine's ranges (:mod:`repblend_fast.engine.ranges`; this runner adds
    ``io`` and ``optimiser``), which :class:`repblend_fast.profiling.RangeProfiler` reads, so the
    profiler times the very code the benchmark does. ``encoder_chunk`` defaults to
    ``DistillConfig``'s. ``compile`` and ``memory_budget_mib`` are ``DistillConfig``'s fields.
    ``dtype``: the runner's working precision (float64 for the parity yardstick; the encoder is
    then a float64 copy, the inputs' own stays as it is).
    """

    def __init__(
        self,
        inputs: StepInputs,
        method: str,
        meta_grad: str,
        device: torch.device,
        autocast: torch.dtype | None,
        encoder_chunk: int | None = None,
        *,
        compile: str = "none",
        memory_budget_mib: float = 0,
        dtype: torch.dtype = torch.float32,
    ):
        from repblend_fast.engine.similarity import LowRankSimilarity

        sh = inputs.shape
        self.provider = f"{method}-fast"
        self.meta_grad = meta_grad
        self.device = device
        self.method = method
        self.kind = student_for_experts(method)
        self.autocast = autocast
        self.compile = compile
        self.memory_budget_mib = memory_budget_mib
        self.dtype = dtype
        if dtype == torch.float32:
            self.encoder = inputs.encoder.to(device)
        else:
            self.encoder = copy.deepcopy(inputs.encoder).to(device, dtype)
        self.encoder_chunk = default_encoder_chunk() if encoder_chunk is None else encoder_chunk
        settings = UnrollSettings(
            method=method,
            meta_grad=meta_grad,
            share_encoder=True,
            encoder_autocast=autocast,
            encoder_chunk=self.encoder_chunk,
            compile=compile,
            memory_budget_mib=float(memory_budget_mib),
        )
        self._sim = LowRankSimilarity(sh.pairs, sh.rank, sh.alpha, device=device)
        self._specs = (HeadSpec(inputs.d_feat, sh.dim), HeadSpec(sh.d_txt, sh.dim))
        if not self.kind.frozen_encoder:
            self._specs = (None, HeadSpec(sh.d_txt, inputs.d_feat))
        self.unroller = self._make_unroller(settings)
        self._reference: Unroller | None = None
        if self.kind.frozen_encoder:
            snaps = inputs.repblend
            self.plans = inputs.plans_repblend
        else:
            snaps = inputs.lors
            self.plans = inputs.plans_lors
        to = dict(device=device, dtype=dtype)
        self.start = tuple(t.to(**to) for t in snaps[0])
        self.target = tuple(t.to(**to) for t in snaps[1])
        self.x = inputs.images.to(**to).clone()
        self.y = inputs.texts.to(**to).clone()
        self.eta_img = torch.tensor(0.1, **to)
        self.eta_txt = torch.tensor(0.1, **to)
        self.sim = {k: v.to(**to).clone() for k, v in inputs.sim.items()}
        self.momentum: dict[str, torch.Tensor] = {}
        self.lrs = {"x": sh.lr_img, "y": sh.lr_txt, "eta_img": sh.lr_lr, "eta_txt": sh.lr_lr}
        self.lrs.update({f"sim.{k}": sh.lr_sim for k in self.sim})
        # The state the runner starts from (the parity check's point; the iterations move it).
        self._initial = {
            "x": self.x.clone(),
            "y": self.y.clone(),
            "sim": {k: v.clone() for k, v in self.sim.items()},
        }

    def _make_unroller(self, settings: UnrollSettings) -> Unroller:
        if not self.kind.frozen_encoder:
            return make_unroller_for_lors(settings, self.encoder, self._specs[1], self._sim)
        return Unroller(settings, self.encoder, *self._specs, self._sim)

    def settings(self) -> dict:
        """The configuration as the benchmark records it."""
        return {
            "autocast": _AUTOCAST_NAMES.get(self.autocast, str(self.autocast)),
            "compile": self.compile,
            "encoder_chunk": self.encoder_chunk,
            "memory_budget_mib": self.memory_budget_mib,
        }

    def _phase(self, name: str):
        return phase(name)

    def grads(self, plan: StepPlan) -> dict[str, torch.Tensor]:
        plan = plan_to(plan, self.device)
        r = self.unroller.run(
            self.x, self.y, self.sim, self.eta_img, self.eta_txt, self.start, self.target, plan
        )
        return r.grads

    def grads_at_start(self, plan: StepPlan) -> dict[str, torch.Tensor]:
        """Meta-gradients of ``plan`` at the state the runner was built with (learning rates
        0.1), whatever iterations have run since."""
        init = self._initial
        eta = torch.tensor(0.1, device=self.device, dtype=self.dtype)
        r = self.unroller.run(
            init["x"],
            init["y"],
            init["sim"],
            eta,
            eta.clone(),
            self.start,
            self.target,
            plan_to(plan, self.device),
        )
        return r.grads

    def reference_grads_at_start(self, plan: StepPlan) -> dict[str, torch.Tensor]:
        """:meth:`grads_at_start` of the reference path in this runner's precision: the same
        encoder autocast and dtype, but eager, the whole encoder graph kept (no chunking, no
        memory budget) and the plain-torch ops (``REPBLEND_IMPL=reference``, TF32 off): what
        the fused configuration must match to the same-precision bound
        (:mod:`repblend_fast.bench.parity`)."""
        from repblend_fast.bench.parity import reference_ops

        if self._reference is None:
            s = dataclasses.replace(
                self.unroller.s, compile="none", encoder_chunk=0, memory_budget_mib=0.0
            )
            self._reference = self._make_unroller(s)
        fast, self.unroller = self.unroller, self._reference
        try:
            with reference_ops():
                return self.grads_at_start(plan)
        finally:
            self.unroller = fast

    def iteration(self, i: int) -> float:
        with self._phase("io"):
            plan = plan_to(self.plans[i], self.device)
            start, target = self.start, self.target
        r = self.unroller.run(
            self.x, self.y, self.sim, self.eta_img, self.eta_txt, start, target, plan
        )
        with self._phase("optimiser"):
            params = {"x": self.x, "y": self.y, "eta_img": self.eta_img, "eta_txt": self.eta_txt}
            params.update({f"sim.{k}": v for k, v in self.sim.items()})
            with torch.no_grad():
                for name, p in params.items():
                    g = r.grads[name].to(p.dtype)
                    buf = self.momentum.get(name)
                    buf = g.clone() if buf is None else buf.mul_(0.5).add_(g)
                    self.momentum[name] = buf
                    p.sub_(self.lrs[name] * buf)
        return float(r.loss)


class AuthorsRunner:
    """One of the authors-style baselines behind the runner interface."""

    def __init__(self, inputs: StepInputs, method: str, device: torch.device):
        sh = inputs.shape
        self.provider = f"{method}-authors"
        self.meta_grad = "tesla"
        self.device = device
        settings = authors.AuthorsSettings(
            lr_img=sh.lr_img, lr_txt=sh.lr_txt, lr_lr=sh.lr_lr, lr_sim=sh.lr_sim
        )
        enc = copy.deepcopy(inputs.encoder).cpu()
        if student_for_experts(method).frozen_encoder:
            model = authors.RepBlendModel(enc, inputs.d_feat, sh.d_txt, sh.dim)
            snaps, cls = inputs.repblend, authors.RepBlendAuthors
            parts = (model.image_head, model.text_head)
            self.plans = inputs.plans_repblend
        else:
            model = authors.LoRSModel(enc, sh.d_txt, inputs.d_feat)
            snaps, cls = inputs.lors, authors.LoRSAuthors
            parts = (model.image_encoder, model.text_head)
            self.plans = inputs.plans_lors
        buffer = {
            "image": [authors.split_pieces(parts[0], s[0]) for s in snaps],
            "text": [authors.split_pieces(parts[1], s[1]) for s in snaps],
        }
        sim = authors.LowRankSim(sh.pairs, sh.rank, sh.alpha).load_params(inputs.sim)
        self.loop = cls(model, inputs.images, inputs.texts, sim, buffer, settings, device)

    def grads(self, plan: StepPlan) -> dict[str, torch.Tensor]:
        self.loop.optimizer.zero_grad(set_to_none=True)
        self.loop.meta_grads(plan_to(plan, self.device))
        return {k: v.detach().clone() for k, v in self.loop.grads().items() if v is not None}

    def iteration(self, i: int) -> float:
        return self.loop.iteration(plan_to(self.plans[i], self.device))


def parse_providers(providers: str | Iterable[str]) -> list[tuple[str, str]]:
    """``"a,b"`` or a list -> ``[(provider, meta_grad)]``; ``repblend-fast`` means both modes.

    Raises ``ValueError`` naming the bad entry.
    """
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    runs: list[tuple[str, str]] = []
    for p in providers:
        name, _, mode = p.partition(":")
        if name not in PROVIDERS:
            raise ValueError(f"unknown provider {name!r}: choose from {', '.join(PROVIDERS)}")
        if name.endswith("-authors"):
            if mode not in ("", "tesla"):
                raise ValueError(f"{name} runs TESLA only (the authors' method), got :{mode}")
            modes = ["tesla"]
        elif mode:
            if mode not in ("exact", "tesla"):
                raise ValueError(f"meta-gradient mode must be exact or tesla, got {p!r}")
            modes = [mode]
        else:
            modes = ["exact", "tesla"] if name == "repblend-fast" else ["tesla"]
        runs += [(name, m) for m in modes if (name, m) not in runs]
    if not runs:
        raise ValueError("no providers given")
    return runs


def default_autocast(device: torch.device) -> torch.dtype | None:
    """The fast path's encoder autocast as ``DistillConfig(encoder_autocast="auto")`` sets it:
    bf16 on CUDA, none on a CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else None


def _autocast_dtype(autocast: str, device: torch.device) -> torch.dtype | None:
    if autocast == "auto":
        return default_autocast(device)
    if autocast not in _AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be auto, none, bf16 or fp16, got {autocast!r}")
    return _AUTOCAST_DTYPES[autocast]


def precision_rows(autocast: Iterable[str], device: str | torch.device) -> tuple[str, ...]:
    """The ``autocast`` values that give distinct precisions on ``device``, in order (``auto``
    and ``none`` are one row on a CPU, two on CUDA)."""
    device = torch.device(device)
    seen: set = set()
    out = []
    for a in autocast:
        dtype = _autocast_dtype(a, device)
        if dtype not in seen:
            seen.add(dtype)
            out.append(a)
    return tuple(out)


def make_runner(
    inputs: StepInputs,
    provider: str,
    meta_grad: str,
    device: str | torch.device,
    encoder_chunk: int | None = None,
    *,
    compile: str = "none",
    memory_budget_mib: float = 0,
    autocast: str = "auto",
) -> FastRunner | AuthorsRunner:
    """Build the runner of ``provider``.

    ``encoder_chunk``, ``compile``, ``memory_budget_mib`` and ``autocast`` (``auto``: bf16 on
    CUDA, none on a CPU; ``none``, ``bf16``, ``fp16`` anywhere) only affect the fast path (the
    baselines encode per step, eagerly, in fp32).
    """
    device = torch.device(device)
    method = provider.split("-")[0]
    if provider.endswith("-authors"):
        return AuthorsRunner(inputs, method, device)
    return FastRunner(
        inputs,
        method,
        meta_grad,
        device,
        _autocast_dtype(autocast, device),
        encoder_chunk,
        compile=compile,
        memory_budget_mib=memory_budget_mib,
    )
