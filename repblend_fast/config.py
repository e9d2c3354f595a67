"""Distillation configuration, the named presets of docs/algorithm.md §12 and validation. What
each method implies (its student, experts, defaults, evaluation cadence) is its entry in
:mod:`repblend_fast.methods`.

Every field is used by :class:`repblend_fast.Distiller`; the docstring of :class:`DistillConfig`
says what each does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from typing import Any

from repblend_fast.methods import METHOD_REGISTRY, StudentKind, get_method

SIMILARITIES = ("lowrank", "full", "none")
META_GRADS = ("exact", "tesla")
AUTOCAST = ("auto", "none", "bf16", "fp16")
COMPILE = ("none", "encoder", "step")
# CLIP's logit temperature tau, stated once: logits are ``logit_scale * cos`` with ``logit_scale``
# = 1/tau. The default of distillation and expert training, and the temperature of every
# evaluation (EVAL_TEMPERATURE below).
TEMPERATURE = 0.07
# The accepted logit temperatures (CLIP clamps 1/tau at 100; the presets use 0.07 and 0.1).
TEMPERATURE_RANGE = (1e-3, 10.0)

# The evaluation protocol (docs/algorithm.md §8): a distilled set is scored on the test split
# every ``Method.eval_every`` training epochs (repblend_fast.methods: RepBlend's code every 20 of
# its 101 epochs, LoRS's every 10), with the logit temperature fixed at EVAL_TEMPERATURE whatever
# the distillation used, over EVAL_SEEDS evaluation seeds.
EVAL_TEMPERATURE = TEMPERATURE
EVAL_SEEDS = 3


def check_trajectories(num_trajectories: int, world: int) -> None:
    """``ValueError`` unless K trajectories split evenly over ``world`` processes."""
    if world > 1 and num_trajectories % world:
        raise ValueError(
            f"num_trajectories={num_trajectories} cannot be split over {world} processes: each "
            "rank unrolls num_trajectories / world-size trajectories per iteration, so set "
            f"num_trajectories to a multiple of {world} (--set num_trajectories={world}) or "
            "launch a number of processes that divides it"
        )


@dataclass
class DistillConfig:
    """Everything one distillation run needs besides data, encoders and experts.

    Attributes:
        method: ``repblend`` (heads on frozen features, blending), ``lors`` (image encoder is the
            student, learned low-rank targets) or ``mtt-vl`` (LoRS student, identity targets).
        pairs: N, the number of synthetic image-text pairs.
        iterations: outer distillation iterations.
        syn_steps: T, unrolled student steps per iteration.
        expert_epochs: M, expert epochs between start and target snapshots.
        max_start_epoch: E_max; the start epoch is drawn from ``{0 .. E_max-1}``.
        batch_size: B, the mini-batch inside the unroll.
        lr_img, lr_txt: outer learning rates of the synthetic images and texts.
        lr_lr: outer learning rate of the learnable student learning rates.
        lr_sim: outer learning rate of the similarity parameters.
        momentum: outer SGD momentum (all four groups).
        lr_init: initial student learning rate (both modalities).
        clamp_lr: if set (> 0), the student learning rates are clamped to at least this value.
        similarity: learned target ``lowrank``, ``full`` or ``none`` (identity targets).
        sim_rank, sim_alpha: rank r and scale alpha of the low-rank similarity.
        loss: contrastive loss inside the unroll (``wbce``, ``infonce``, ``cwcl``, ``bce``,
            ``mse``, ``kl``).
        eps: the log epsilon of WBCE (``0`` = exact log-sigmoid form).
        temperature: tau; logits are scaled by ``1/tau`` (accepted: 0.001 to 10).
        blend: representation blending on/off (RepBlend only).
        symmetric: RepBlend's symmetric projection trajectory matching: both projection heads are
            the students, on frozen-encoder features. ``False`` is the asymmetric ablation: the
            image encoder itself is the image-side student (as in LoRS; needs LoRS-style experts)
            and blending mixes its outputs with the texts. LoRS and MTT-VL are always asymmetric.
        blend_alpha: alpha of ``Beta(alpha, alpha)`` for the blending coefficient (``<= 0`` = off).
        blend_target: also blend the target block ``S[I, I]`` (not the reference behaviour).
        merge_loss: one normalisation ``(||.||_I^2 + ||.||_T^2) / (D_I + D_T)`` (COCO scripts).
        meta_grad: ``exact`` reverse mode or the paper's ``tesla`` two-pass form.
        share_encoder: encode the touched images once per iteration (RepBlend); ``False``
            re-encodes every step as the authors' code does.
        checkpoint_steps: gradient checkpointing per unroll step (exact mode).
        encoder_chunk: with ``share_encoder``, 0 keeps the frozen encoder's graph over all
            touched images for the one VJP (fastest); k > 0 re-encodes them k at a time during
            the VJP instead (peak memory of k images' activations, one more encoder forward).
        unroll_dropout: dropout 0.1 in the heads inside the unroll, as the reference keeps it
            (TESLA pass 2 then draws fresh masks, as the reference does). Off by default: the
            unroll is deterministic and both TESLA passes see the same function.
        parity_eta_grad: TESLA eta gradient with the per-modality normalisation even when merged
            (the reference's behaviour).
        num_trajectories: K trajectories (experts) per iteration; their gradients are averaged.
        encoder_autocast: autocast dtype of the frozen encoder (``auto`` = bf16 on CUDA, off on
            a CPU; ``none``; ``bf16`` or ``fp16`` on any device, a CPU included). Features are
            cast back to fp32; x, y, S, eta and all flat-parameter arithmetic stay fp32.
        compile: ``torch.compile`` (RepBlend's symmetric heads student): ``none``; ``encoder``
            compiles the frozen encoder's forward and its VJP (dynamic batch); ``step`` also
            compiles each unroll step (static shapes; inductor's default mode, no CUDA graphs).
            The first iterations pay the compilation (minutes on a CPU).
        memory_budget_mib: with ``share_encoder`` (RepBlend's symmetric heads), a budget in MiB
            for the tensors one iteration adds: the frozen encoder's graph is kept for as many
            touched images as fit, the others are re-encoded in chunks during the VJP, and exact
            mode checkpoints its steps when that keeps more (0 = no budget: ``encoder_chunk``
            and ``checkpoint_steps`` as set; the two cannot be combined with a budget).
        seed: seeds every random draw (one explicit generator).
        checkpoint_every: save a resumable checkpoint every k iterations (0 = only at the end).
        nan_patience: consecutive non-finite iterations tolerated before the run stops.
        guard: the robust outer optimisation of docs/algorithm.md §14 (trust region, spike
            rejection, loss-jump rollback, η momentum reset at the clamp). Off: plain SGD with
            momentum, as the research code (whose runs can collapse without a sign).
        trust_region: per-pair update bound, as a fraction of the group's RMS row norm (images,
            texts, similarity rows); 0 = no bound.
        spike_factor: an iteration whose meta-gradient norm in a group exceeds this multiple of
            its running median is not applied.
        loss_jump: a matching loss above this multiple of its running median undoes the
            previous update.
        guard_window, guard_warmup, guard_cooldown: iterations in the running medians; accepted
            iterations needed before the medians are trusted; iterations a learning rate stays
            halved after a rejection.
        grad_check_every: every k iterations (from the first) the meta-gradient is checked against
            the loss: the loss is evaluated again, on the same draws, a small step along the
            update, and a change far from what the gradient predicts is reported
            (docs/algorithm.md §14); costs one more unroll per check; 0 = never.
        collapse_window: the run stops (exit 3 from the CLI) when the median matching loss over
            the last ``collapse_window`` iterations is no lower than over the first ones, or the
            learned learning rates stay pinned at ``clamp_lr`` that long (0 = never).
        device: ``cpu`` or ``cuda``.
        threads: torch CPU threads for the run (0 = keep torch's current setting). The
            :class:`~repblend_fast.Distiller` records the count it ran with here, and a resumed
            run must use the same count: results depend on it.
    """

    method: str = "repblend"
    pairs: int = 99
    iterations: int = 3000
    syn_steps: int = 8
    expert_epochs: int = 1
    max_start_epoch: int = 2
    batch_size: int = 20
    lr_img: float = 100.0
    lr_txt: float = 100.0
    lr_lr: float = 1e-2
    lr_sim: float = 10.0
    momentum: float = 0.5
    lr_init: float = 0.1
    clamp_lr: float | None = None
    similarity: str = "lowrank"
    sim_rank: int = 10
    sim_alpha: float = 3.0
    loss: str = "wbce"
    eps: float = 1e-6
    temperature: float = TEMPERATURE
    blend: bool = True
    symmetric: bool = True
    blend_alpha: float = 1.0
    blend_target: bool = False
    merge_loss: bool = False
    meta_grad: str = "exact"
    share_encoder: bool = True
    checkpoint_steps: bool = False
    encoder_chunk: int = 0
    unroll_dropout: bool = False
    parity_eta_grad: bool = False
    num_trajectories: int = 1
    encoder_autocast: str = "auto"
    compile: str = "none"
    memory_budget_mib: int = 0
    seed: int = 0
    checkpoint_every: int = 100
    nan_patience: int = 5
    guard: bool = True
    trust_region: float = 0.1
    spike_factor: float = 10.0
    loss_jump: float = 3.0
    guard_window: int = 20
    guard_warmup: int = 3
    guard_cooldown: int = 10
    grad_check_every: int = 25
    collapse_window: int = 50
    device: str = "cpu"
    threads: int = 0

    def validate(self, world: int = 1) -> DistillConfig:
        """Raise ``ValueError`` naming the field for any inconsistent setting; returns self.

        Every field must have its declared type first (an integer field refuses ``2.5`` and
        ``True``, a boolean refuses ``1``, a number must be finite), so that no value is
        silently rounded or turned into NaN/Inf downstream; then the ranges below. ``world``:
        the number of processes the run is split over (torchrun), whose count must divide
        ``num_trajectories``.
        """
        from repblend_fast.reference.contrastive import LOSSES

        self._check_types()
        checks = [
            (self.method in METHOD_REGISTRY, "method", f"one of {tuple(METHOD_REGISTRY)}"),
            (self.similarity in SIMILARITIES, "similarity", f"one of {SIMILARITIES}"),
            (self.meta_grad in META_GRADS, "meta_grad", f"one of {META_GRADS}"),
            (self.encoder_autocast in AUTOCAST, "encoder_autocast", f"one of {AUTOCAST}"),
            (self.compile in COMPILE, "compile", f"one of {COMPILE}"),
            (self.memory_budget_mib >= 0, "memory_budget_mib", ">= 0 (0 = no budget)"),
            (self.loss in LOSSES, "loss", f"one of {LOSSES}"),
            (self.pairs >= 1, "pairs", ">= 1"),
            (self.iterations >= 0, "iterations", ">= 0"),
            (self.syn_steps >= 1, "syn_steps", ">= 1"),
            (self.expert_epochs >= 1, "expert_epochs", ">= 1"),
            (self.max_start_epoch >= 1, "max_start_epoch", ">= 1"),
            (1 <= self.batch_size <= self.pairs, "batch_size", f"between 1 and pairs={self.pairs}"),
            (
                TEMPERATURE_RANGE[0] <= self.temperature <= TEMPERATURE_RANGE[1],
                "temperature",
                f"in [{TEMPERATURE_RANGE[0]}, {TEMPERATURE_RANGE[1]}] (logits scaled by 1/tau: "
                "a smaller tau saturates every gradient, a larger one flattens the targets)",
            ),
            (self.clamp_lr is None or self.clamp_lr > 0, "clamp_lr", "> 0, or None (no clamp)"),
            (0 <= self.seed < 2**63, "seed", "in [0, 2**63)"),
            (self.eps >= 0, "eps", ">= 0"),
            (self.lr_init > 0, "lr_init", "> 0"),
            (0 <= self.momentum < 1, "momentum", "in [0, 1)"),
            (self.sim_rank >= 1, "sim_rank", ">= 1"),
            (self.num_trajectories >= 1, "num_trajectories", ">= 1"),
            (self.checkpoint_every >= 0, "checkpoint_every", ">= 0"),
            (self.encoder_chunk >= 0, "encoder_chunk", ">= 0 (0 = keep the encoder graph)"),
            (self.nan_patience >= 1, "nan_patience", ">= 1"),
            (self.trust_region >= 0, "trust_region", ">= 0 (0 = no bound)"),
            (self.spike_factor > 1, "spike_factor", "> 1"),
            (self.loss_jump > 1, "loss_jump", "> 1"),
            (self.guard_window >= 3, "guard_window", ">= 3"),
            (1 <= self.guard_warmup <= self.guard_window, "guard_warmup", "in [1, guard_window]"),
            (self.guard_cooldown >= 1, "guard_cooldown", ">= 1"),
            (self.grad_check_every >= 0, "grad_check_every", ">= 0 (0 = never check)"),
            (self.collapse_window >= 0, "collapse_window", ">= 0 (0 = never stop)"),
            (self.device.split(":")[0] in ("cpu", "cuda"), "device", "'cpu' or 'cuda[:i]'"),
            (self.threads >= 0, "threads", ">= 0 (0 = torch's current setting)"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise ValueError(f"DistillConfig.{name}={getattr(self, name)!r}: expected {want}")
        check_trajectories(self.num_trajectories, world)
        for name in ("lr_img", "lr_txt", "lr_lr", "lr_sim"):
            if getattr(self, name) < 0:
                raise ValueError(f"DistillConfig.{name} must be >= 0, got {getattr(self, name)}")
        method = METHOD_REGISTRY[self.method]
        if not method.blends and self.blend and self.blend_alpha > 0:
            # Blending mixes encoder features; the LoRS student has no frozen feature space.
            raise ValueError(
                f"method={self.method!r} does not blend representations: set blend=False "
                "(or use method='repblend')"
            )
        if not method.learns_similarity and self.similarity != "none":
            raise ValueError(f"method={self.method!r} uses identity targets: set similarity='none'")
        if self.compile != "none" and not self.student_kind.frozen_encoder:
            raise ValueError(
                f"DistillConfig.compile={self.compile!r} compiles RepBlend's frozen encoder and "
                "heads unroll; this run's image student is the encoder itself: set compile='none'"
            )
        if self.memory_budget_mib > 0:
            if not self.student_kind.frozen_encoder or not self.share_encoder:
                raise ValueError(
                    "DistillConfig.memory_budget_mib sizes the shared frozen-encoder graph of "
                    "RepBlend's heads student: it needs method='repblend', symmetric=True and "
                    "share_encoder=True (or set memory_budget_mib=0)"
                )
            if self.encoder_chunk or self.checkpoint_steps:
                raise ValueError(
                    "DistillConfig.memory_budget_mib chooses encoder_chunk and checkpoint_steps "
                    "itself: leave them at 0 / false, or set memory_budget_mib=0"
                )
        return self

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kind = str(f.type)
            if kind == "float | None" and v is None:
                continue
            if kind == "bool":
                ok, want = isinstance(v, bool), "true or false"
            elif kind == "int":
                ok = isinstance(v, numbers.Integral) and not isinstance(v, bool)
                want = "an integer"
            elif kind in ("float", "float | None"):
                ok = isinstance(v, numbers.Real) and not isinstance(v, bool)
                ok = ok and math.isfinite(v)
                want = "a finite number" + (" or None" if kind != "float" else "")
            elif kind == "str":
                ok, want = isinstance(v, str), "a string"
            else:
                continue
            if not ok:
                raise ValueError(f"DistillConfig.{f.name}={v!r}: expected {want}")

    @property
    def method_entry(self):
        """The :class:`repblend_fast.methods.Method` of ``method``."""
        return get_method(self.method)

    @property
    def student_kind(self) -> StudentKind:
        """The :class:`repblend_fast.methods.StudentKind` this run trains (its method's, or its
        asymmetric ablation's under ``symmetric=False``)."""
        return self.method_entry.student_kind(self.symmetric)

    @property
    def student(self) -> str:
        """``heads`` (symmetric RepBlend) or ``encoder`` (LoRS, MTT-VL, asymmetric ablation)."""
        return self.student_kind.name

    @property
    def expert_kind(self) -> str:
        """The experts this run matches: ``repblend`` (two heads on frozen features) for a heads
        student, ``lors`` (image encoder + text head) for an encoder student."""
        return self.student_kind.experts

    @property
    def blending(self) -> bool:
        """Whether the unroll blends representations (RepBlend with ``blend`` on)."""
        return self.method_entry.blends and self.blend

    @property
    def logit_scale(self) -> float:
        return 1.0 / self.temperature

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown DistillConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes: Any) -> DistillConfig:
        return dataclasses.replace(self, **changes)


_SHARED = dict(
    syn_steps=8,
    expert_epochs=1,
    lr_lr=1e-2,
    lr_init=0.1,
    similarity="lowrank",
    loss="wbce",
    momentum=0.5,
    iterations=3000,
    batch_size=20,
)

PRESETS: dict[str, dict[str, Any]] = {
    "flickr-100": dict(
        _SHARED,
        pairs=99,
        max_start_epoch=2,
        lr_img=100,
        lr_txt=100,
        lr_sim=10,
        sim_rank=10,
        sim_alpha=3.0,
        merge_loss=False,
    ),
    "flickr-200": dict(
        _SHARED,
        pairs=199,
        max_start_epoch=2,
        lr_img=1000,
        lr_txt=1000,
        lr_sim=10,
        sim_rank=5,
        sim_alpha=1.0,
        merge_loss=False,
    ),
    "flickr-500": dict(
        _SHARED,
        pairs=499,
        max_start_epoch=3,
        lr_img=1000,
        lr_txt=1000,
        lr_sim=100,
        sim_rank=20,
        sim_alpha=0.01,
        merge_loss=False,
    ),
    "coco-100": dict(
        _SHARED,
        pairs=99,
        max_start_epoch=2,
        lr_img=1000,
        lr_txt=1000,
        lr_sim=5,
        sim_rank=10,
        sim_alpha=1.0,
        merge_loss=True,
    ),
    "coco-200": dict(
        _SHARED,
        pairs=199,
        max_start_epoch=2,
        lr_img=1000,
        lr_txt=1000,
        lr_sim=50,
        sim_rank=20,
        sim_alpha=1.0,
        merge_loss=True,
    ),
    "coco-500": dict(
        _SHARED,
        pairs=499,
        max_start_epoch=2,
        lr_img=5000,
        lr_txt=5000,
        lr_sim=500,
        sim_rank=40,
        sim_alpha=1.0,
        merge_loss=True,
        temperature=0.1,
    ),
    # A CPU run on the embedded dataset (minutes, not hours): flickr-100's settings with a slower,
    # clamped lr_lr (at lr_lr=1e-2 the learned lrs went negative within a few iterations on
    # emoji, whose experts move little per epoch) and 300 iterations, where the held-out recall
    # of every seed tried has passed 25 (docs/algorithm.md §14, docs/demo.md).
    "demo": dict(
        _SHARED,
        pairs=99,
        iterations=300,
        max_start_epoch=2,
        lr_img=100,
        lr_txt=100,
        lr_lr=1e-3,
        clamp_lr=5e-3,
        lr_sim=10,
        sim_rank=10,
        sim_alpha=3.0,
        merge_loss=False,
        checkpoint_every=100,
    ),
}


def preset(name: str, **overrides: Any) -> DistillConfig:
    """The named preset (docs/algorithm.md §12) with ``overrides`` applied, validated.

    An overridden ``method`` brings its ``Method.defaults`` (e.g. ``method="lors"`` turns
    blending off) unless ``overrides`` sets those fields itself.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    method = overrides.get("method", PRESETS[name].get("method", "repblend"))
    if method not in METHOD_REGISTRY:
        raise ValueError(
            f"DistillConfig.method={method!r}: expected one of {tuple(METHOD_REGISTRY)}"
        )
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown DistillConfig fields {unknown}; known: {sorted(fields)}")
    return DistillConfig(
        **{**PRESETS[name], **METHOD_REGISTRY[method].defaults, **overrides}
    ).validate()
