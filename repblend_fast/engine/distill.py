"""The outer distillation loop (docs/algorithm.md §4): :class:`Distiller`.

One iteration: pick a trajectory (expert, start epoch), draw the unroll's batches, blending
coefficients and permutations, run :class:`repblend_fast.engine.unroll.Unroller`, and take one
SGD-momentum
step on the synthetic images, texts, student learning rates and similarity parameters.

Every random draw comes from one explicit ``torch.Generator`` seeded from the config; its state,
the batch sampler, the expert order and the momentum buffers are all in the checkpoint, so a
resumed run continues bit-for-bit. Saving and restoring that state, and the run folder's other
files, are :class:`repblend_fast.engine.distill_state.DistillerState`'s; the product of a run,
:class:`DistilledSet`, is :mod:`repblend_fast.distilled_set`'s (importable from here too).
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from repblend_fast import distributed
from repblend_fast.config import DistillConfig
from repblend_fast.distilled_set import DistilledSet
from repblend_fast.engine.checkpoint import DISTILLED, SUMMARY, RunInterrupted, StopOnSignal
from repblend_fast.engine.distill_state import DistillerState
from repblend_fast.engine.guard_report import GuardReport, probe_point
from repblend_fast.engine.outer import CLIPPED_GROUPS, GROUPS, OuterOptimizer
from repblend_fast.engine.ranges import phase
from repblend_fast.engine.sampling import IterationSampler
from repblend_fast.engine.transfer import to_device
from repblend_fast.engine.unroll import StepPlan, Unroller, UnrollSettings
from repblend_fast.io import json_bytes
from repblend_fast.models.heads import HeadSpec
from repblend_fast.stats import median
from repblend_fast.threads import set_threads

logger = logging.getLogger("repblend_fast.engine.distill")

_AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class DistillationStopped(RuntimeError):
    """The run stopped before writing a distilled set; the last good state is checkpointed."""


class NonFiniteLossError(DistillationStopped):
    """Raised after ``nan_patience`` consecutive non-finite iterations (last good state kept)."""


class CollapseError(DistillationStopped):
    """Raised when the collapse detector (``collapse_window``) sees a run stop learning."""


# --------------------------------------------------------------------------- distiller
class Distiller(DistillerState):
    """RepBlend / LoRS / MTT-VL distillation of N synthetic pairs against expert trajectories.

    Args:
        config: the run's :class:`DistillConfig` (validated here).
        encoder: the image encoder (frozen feature extractor for RepBlend; the student for LoRS),
            mapping ``[B, 3, H, W]`` images to ``[B, d_f]`` features.
        store: expert trajectories (:class:`repblend_fast.experts.TrajectoryStore` or any object
            with ``len()``, ``snapshot(expert, epoch, modality)`` and ``manifest``).
        init_images: ``[N, 3, H, W]`` initial synthetic images (usually random real ones).
        init_texts: ``[N, d_t]`` initial synthetic texts (their caption embeddings).
        out_dir: where checkpoints, ``metrics.jsonl``, ``config.json`` and
            ``distilled.safetensors`` go (``None``: nothing is written). Under torchrun only
            rank 0 writes it (docs/distributed.md).
    """

    def __init__(
        self,
        config: DistillConfig,
        *,
        encoder: nn.Module,
        store,
        init_images: torch.Tensor,
        init_texts: torch.Tensor,
        out_dir: str | os.PathLike | None = None,
    ):
        config.validate(world=distributed.world_size())
        # Several processes (torchrun): each unrolls its share of the K trajectories; one process:
        # a LocalSync whose collective operations do nothing.
        self._dist = distributed.step_sync(config.num_trajectories)
        # Results depend on the CPU thread count: run with the configured one, or record the
        # one in use, so that config.json and every checkpoint say which it was.
        threads = set_threads(config.threads)
        if not config.threads:
            config = config.replace(threads=threads)
        self.cfg = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                "DistillConfig.device='cuda' but no CUDA device is available: use 'cpu'"
            )
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if not self._dist.is_main:
            self.out_dir = None  # rank 0 writes the run folder
        n = config.pairs
        if init_images.dim() != 4 or init_images.shape[0] != n:
            raise ValueError(
                f"init_images must be [pairs={n}, C, H, W], got {tuple(init_images.shape)}"
            )
        if init_texts.dim() != 2 or init_texts.shape[0] != n:
            raise ValueError(f"init_texts must be [pairs={n}, d_t], got {tuple(init_texts.shape)}")
        if len(store) < 1:
            raise ValueError("the expert store holds no experts: train some with `buffer` first")
        self.store = store
        self.encoder = encoder.to(self.device).eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        dtype = init_texts.dtype if init_texts.dtype == torch.float64 else torch.float32
        self.dtype = dtype
        self.x = init_images.detach().to(self.device, dtype).clone()
        self.y = init_texts.detach().to(self.device, dtype).clone()
        self.eta_img = torch.tensor(config.lr_init, dtype=dtype, device=self.device)
        self.eta_txt = torch.tensor(config.lr_init, dtype=dtype, device=self.device)
        self.g = torch.Generator().manual_seed(config.seed)
        self.similarity = self._make_similarity()
        self.sim_params = (
            {
                k: v.detach().to(self.device, dtype).clone()
                for k, v in self.similarity.params().items()
            }
            if self.similarity is not None
            else {}
        )
        self.unroller = self._make_unroller(init_texts.shape[1])
        self._check_store()
        img_dim = self.img_spec.dim if isinstance(self.img_spec, HeadSpec) else None
        self.sampler = IterationSampler(
            config, len(store), self.g, img_dim, self.txt_spec.dim, dtype
        )
        self.opt = OuterOptimizer(config, self._params())
        self.collapse_losses: list[float] = []
        self.collapse_pinned = 0
        self.iteration = 0
        self.bad_streak = 0
        self.history: list[dict] = []
        self.guard_report = GuardReport()

    # ----------------------------------------------------------------- construction
    def _make_similarity(self):
        cfg = self.cfg
        if cfg.similarity == "none":
            return None
        from repblend_fast.engine.similarity import FullSimilarity, LowRankSimilarity

        if cfg.similarity == "lowrank":
            return LowRankSimilarity(cfg.pairs, cfg.sim_rank, cfg.sim_alpha, generator=self.g)
        return FullSimilarity(cfg.pairs)

    def _autocast_dtype(self) -> torch.dtype | None:
        """The frozen encoder's autocast dtype: ``auto`` is bf16 on CUDA (RepBlend's frozen
        encoder only; a LoRS student encoder stays fp32) and none on a CPU; an explicit ``bf16``
        or ``fp16`` applies on any device (``torch.autocast("cpu", ...)`` on a CPU), which is how
        the CPU tests measure the bf16 encoder's meta-gradient error."""
        choice = self.cfg.encoder_autocast
        if choice == "auto":
            frozen = self.cfg.student_kind.frozen_encoder
            return torch.bfloat16 if self.device.type == "cuda" and frozen else None
        return _AUTOCAST[choice]

    def _manifest(self) -> dict:
        return dict(getattr(self.store, "manifest", {}) or {})

    def _make_unroller(self, d_txt: int) -> Unroller:
        cfg = self.cfg
        settings = UnrollSettings.from_config(cfg, encoder_autocast=self._autocast_dtype())
        with torch.no_grad():
            d_f = int(self.encoder(self.x[:1]).shape[-1])

        def head_dim() -> int:
            return int(self._manifest().get("dim", 0)) or _infer_dim(self.store, d_f)

        img_spec, txt_spec = cfg.student_kind.specs(self.encoder, d_f, d_txt, head_dim)
        self.img_spec, self.txt_spec = img_spec, txt_spec
        return Unroller(settings, self.encoder, img_spec, txt_spec, self.similarity)

    def _check_store(self) -> None:
        man = self._manifest()
        want = self.cfg.expert_kind
        got = man.get("method")
        if got is not None and got != want:
            raise ValueError(
                f"the expert store was trained with method={got!r} but DistillConfig(method="
                f"{self.cfg.method!r}, symmetric={self.cfg.symmetric}) needs {want!r} experts: "
                "train matching experts with "
                f"`repblend-fast buffer --method {want}`"
            )
        e_max, m = self.cfg.max_start_epoch, self.cfg.expert_epochs
        need = set(range(e_max)) | {t + m for t in range(e_max)}
        epochs = getattr(self.store, "epochs", None)
        have = sorted(int(e) for e in epochs) if epochs is not None else sorted(need)
        missing = sorted(need - set(have))
        if missing:
            raise ValueError(
                f"max_start_epoch={e_max} and expert_epochs={m} need expert snapshots of epochs "
                f"{sorted(need)}, but the store has epochs {have} (missing {missing}): train "
                "longer experts, store more epochs, or lower max_start_epoch/expert_epochs"
            )
        for modality, spec in (("image", self.img_spec), ("text", self.txt_spec)):
            n = self.store.snapshot(0, have[0], modality).numel()
            if n != spec.numel:
                raise ValueError(
                    f"expert {modality} snapshots have {n} parameters but this encoder/text width "
                    f"needs {spec.numel}: the experts were made with another encoder or head width"
                )

    # ----------------------------------------------------------------- one iteration
    def _params(self) -> dict[str, torch.Tensor]:
        """The leaves the outer optimiser updates, by name."""
        p = {"x": self.x, "y": self.y, "eta_img": self.eta_img, "eta_txt": self.eta_txt}
        p.update({f"sim.{k}": v for k, v in self.sim_params.items()})
        return p

    def _snapshots(self, e: int, t: int):
        """``(start, target)`` flat parameters of expert ``e`` from start epoch ``t``."""

        def snap(epoch, modality):
            return to_device(self.store.snapshot(e, epoch, modality), self.device, self.dtype)

        m = self.cfg.expert_epochs
        return (snap(t, "image"), snap(t, "text")), (snap(t + m, "image"), snap(t + m, "text"))

    def step(self) -> dict:
        """Run one iteration; returns its metrics (also appended to ``metrics.jsonl``).

        All random draws are made on the host first; the update is decided on the device and
        the iteration's numbers are read back once, together.
        """
        cfg = self.cfg
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        draws = self.sampler.draw()  # all K trajectories, on every rank
        picks = [(e, t) for e, t, _ in draws]
        starts, targets, plans = [], [], []
        with phase("io"):
            for e, t, plan in self._dist.mine(draws):  # this rank's share (torchrun)
                start, target = self._snapshots(e, t)
                starts.append(start)
                targets.append(target)
                plans.append(plan)
        losses, grads = self._meta_gradients(starts, targets, plans)
        # Under torchrun, one all-reduce: the means over all K trajectories.
        losses, grads, synced = self._dist.average(losses, grads)
        loss, loss_img, loss_txt = losses
        check = self._grad_check(loss, grads, starts, targets, plans)
        with phase("optimiser"):
            stats = self.opt.step(grads, loss)
        vals = read_back(
            {
                "loss": loss,
                "loss_img": loss_img,
                "loss_txt": loss_txt,
                "eta_img": self.eta_img,
                "eta_txt": self.eta_txt,
                **stats,
                **synced,
                **check,
            }
        )
        self._dist.after_step(self, vals)
        rec = self._record(picks, vals)
        rec["ms"] = (time.perf_counter() - t0) * 1e3
        if self.device.type == "cuda":
            rec["peak_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            rec["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.iteration += 1
        self.history.append(rec)
        self._log(rec)
        self.guard_report.add(rec)
        self._check_collapse(rec)
        if self.bad_streak >= cfg.nan_patience:
            self.save_checkpoint()
            raise NonFiniteLossError(
                f"{self.bad_streak} consecutive iterations had non-finite losses or gradients "
                f"(last at iteration {self.iteration - 1}, {_picks_text(picks)}); the last "
                "finite state is saved. Lower lr_img/lr_txt/lr_sim or set clamp_lr, then resume."
            )
        return rec

    def _check_collapse(self, rec: dict) -> None:
        """Stop a run that has stopped learning (``collapse_window`` = W > 0): the median matching
        loss of the last W accepted iterations is no lower than that of the first W, or both
        learned learning rates have sat at ``clamp_lr`` for W iterations in a row."""
        w = self.cfg.collapse_window
        if not w:
            return
        if not rec.get("skipped_non_finite") and not rec.get("update_rejected"):
            self.collapse_losses.append(rec["loss"])
        clamp = self.cfg.clamp_lr
        at_clamp = clamp is not None and max(rec["eta_img"], rec["eta_txt"]) <= clamp * (1 + 1e-6)
        self.collapse_pinned = self.collapse_pinned + 1 if at_clamp else 0
        losses = self.collapse_losses
        reason = None
        if len(losses) >= 2 * w and median(losses[-w:]) >= median(losses[:w]):
            reason = (
                f"the median matching loss of the last {w} iterations ({median(losses[-w:]):.4g}) "
                f"is no lower than that of the first {w} ({median(losses[:w]):.4g})"
            )
        elif self.collapse_pinned >= w:
            reason = f"both learned learning rates have sat at clamp_lr={clamp} for {w} iterations"
        if reason is None:
            return
        self.save_checkpoint()
        raise CollapseError(
            f"distillation stopped at iteration {self.iteration}: {reason}, so the synthetic set "
            "has stopped improving (a collapse); no distilled set was written. Its last state is "
            "in the checkpoint. Try another seed, meta_grad='tesla', lower lr_img/lr_txt, or "
            "guard=true (docs/algorithm.md §14)."
        )

    def _grad_check(self, loss, grads, starts, targets, plans) -> dict[str, torch.Tensor]:
        """On the iterations ``grad_check_every`` picks: ``{"grad_check": ratio}``, the loss
        change along a small step of the update (same draws) over the change the meta-gradient
        predicts (1 for a correct gradient; docs/algorithm.md §14). ``{}`` otherwise, and under
        torchrun (each rank holds only its share of the trajectories)."""
        every = self.cfg.grad_check_every
        if not every or self.iteration % every or not self._dist.whole:
            return {}
        params = self._params()
        shifted, predicted = probe_point(params, grads, self.opt.lr, loss)
        at = (shifted["x"], shifted["y"], {k: shifted[f"sim.{k}"] for k in self.sim_params})
        (moved, _, _), _ = self._meta_gradients(
            starts, targets, plans, at=(*at, shifted["eta_img"], shifted["eta_txt"])
        )
        return {"grad_check": (moved.double() - loss.double()) / predicted}

    def _meta_gradients(self, starts, targets, plans, at=None):
        """``((loss, loss_img, loss_txt), grads)`` of the iteration's K trajectories (means), at
        the current leaves or at ``at = (x, y, sim_params, eta_img, eta_txt)``."""
        args = at or (self.x, self.y, self.sim_params, self.eta_img, self.eta_txt)
        if self.cfg.student_kind.trajectories_per_call is None:
            # The K trajectories run batched in one unroll (mean loss and gradients).
            stack = lambda pairs, m: torch.stack([p[m] for p in pairs])  # noqa: E731
            r = self.unroller.run(
                *args,
                (stack(starts, 0), stack(starts, 1)),
                (stack(targets, 0), stack(targets, 1)),
                StepPlan.stack(plans).with_touched().to(self.device),
            )
            return (r.loss, r.loss_img, r.loss_txt), r.grads
        plans = [p.with_touched().to(self.device) for p in plans]
        results = [
            self.unroller.run(*args, st, tg, pl) for st, tg, pl in zip(starts, targets, plans)
        ]
        k = len(results)
        grads = {name: sum(r.grads[name] for r in results) / k for name in results[0].grads}
        losses = tuple(
            torch.stack([getattr(r, f) for r in results]).mean()
            for f in ("loss", "loss_img", "loss_txt")
        )
        return losses, grads

    def _record(self, picks, vals: dict[str, float]) -> dict:
        """The metrics record of an iteration from its read-back values; counts non-finite
        iterations for the NaN guard."""
        cfg = self.cfg
        rec = {
            "iteration": self.iteration,
            "expert": [e for e, _ in picks] if len(picks) > 1 else picks[0][0],
            "start_epoch": [t for _, t in picks] if len(picks) > 1 else picks[0][1],
            "loss": vals["loss"],
            "loss_img": vals["loss_img"],
            "loss_txt": vals["loss_txt"],
        }
        finite = bool(vals["finite"]) and bool(vals["update_finite"])
        if finite:
            self.bad_streak = 0
        else:
            self.bad_streak += 1
            rec["skipped_non_finite"] = True
            what = "loss or meta-gradient" if not vals["finite"] else "update"
            logger.warning(
                "iteration %d: non-finite %s (%s), update skipped (%d/%d)",
                self.iteration,
                what,
                _picks_text(picks),
                self.bad_streak,
                cfg.nan_patience,
            )
        rec.update(
            {
                "eta_img": vals["eta_img"],
                "eta_txt": vals["eta_txt"],
                "grad_norm_x": vals["grad_norm_image"],
                "grad_norm_y": vals["grad_norm_text"],
            }
        )
        if self.sim_params:
            rec["grad_norm_sim"] = vals["grad_norm_sim"]
        if cfg.guard:
            rec["grad_norm_eta"] = vals["grad_norm_eta"]
            spikes = [g for g in GROUPS if vals[f"spike_{g}"]]
            if spikes:
                rec["rejected_spike"] = spikes
            if vals["rollback"]:
                rec["rolled_back"] = True
            scales = {g: vals[f"lr_scale_{g}"] for g in GROUPS if vals[f"lr_scale_{g}"] != 1.0}
            if scales:
                rec["lr_scale"] = scales
            rec["clipped"] = {g: vals[f"clipped_{g}"] for g in CLIPPED_GROUPS}
        if "grad_check" in vals:
            rec["grad_check"] = vals["grad_check"]
        if not vals["accepted"] and finite:
            rec["update_rejected"] = True
        return rec

    # ----------------------------------------------------------------- run / output
    def run(
        self, progress: bool = True, on_iteration: Callable[[Distiller], None] | None = None
    ) -> DistilledSet:
        """Run the remaining iterations (checkpointing as configured) and write the outputs.

        ``on_iteration(distiller)`` is called before the first remaining iteration and after
        each one (e.g. to evaluate the set at a few iteration counts; it must not change the
        distiller's state).

        With an ``out_dir``, the run holds the folder's lock (a second writer gets
        ``LockHeldError``), removes temporary files a killed writer left, and records every file
        it writes in ``checksums.json``. SIGINT/SIGTERM let the current iteration finish, write
        a checkpoint and raise :class:`~repblend_fast.engine.checkpoint.RunInterrupted`
        (``--resume``
        continues bit for bit); a second signal stops at once.
        """
        from tqdm.auto import tqdm

        from repblend_fast.locks import FolderLock

        cfg = self.cfg
        lock = FolderLock(self.out_dir, "distill run") if self.out_dir is not None else None
        if lock is not None:
            lock.acquire()
        try:
            self._dist.start(self)  # under torchrun every rank starts from rank 0's state
            if self.out_dir is not None:
                self._open_outputs()
            bar = tqdm(
                total=cfg.iterations,
                initial=self.iteration,
                disable=not progress or not self._dist.is_main,
                desc=f"distill[{cfg.method}]",
                unit="it",
            )
            if on_iteration is not None:
                on_iteration(self)
            with StopOnSignal() as stop:
                self._dist.stop_source = stop  # under torchrun ranks stop after the same iteration
                while self.iteration < cfg.iterations:
                    try:
                        rec = self.step()
                    except DistillationStopped:
                        bar.close()
                        self._summarise()
                        raise
                    if on_iteration is not None:
                        on_iteration(self)
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", ms=f"{rec['ms']:.0f}")
                    if cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                    if (signum := self._dist.stop_signum) is not None:
                        bar.close()
                        raise RunInterrupted(signum, self.iteration, self.save_checkpoint())
            bar.close()
            self._summarise()
            result = self.result()
            if self.out_dir is not None:
                self.save_checkpoint()
                result.save(self.out_dir / DISTILLED, cfg, record=self._run_record())
            self._dist.finish()
            return result
        finally:
            if lock is not None:
                lock.release()

    def _summarise(self) -> None:
        """Log the guard's run summary and write ``summary.json`` (atomically, recorded in
        ``checksums.json``) with its ``guard`` block."""
        if not self._dist.is_main:
            return
        logger.info("%s", self.guard_report.line())
        if self.out_dir is not None:
            summary = {"guard": self.guard_report.summary()}
            self._run_record().write(SUMMARY, json_bytes(summary))

    def result(self) -> DistilledSet:
        sim_full = None
        if self.similarity is not None:
            with torch.no_grad():
                sim_full = self.similarity.full(self.sim_params).detach().cpu()
        return DistilledSet(
            self.x.detach().cpu().clone(),
            self.y.detach().cpu().clone(),
            float(self.eta_img),
            float(self.eta_txt),
            sim_full,
            {k: v.detach().cpu().clone() for k, v in self.sim_params.items()},
        )


def read_back(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """All 0-d ``values`` as Python floats with one device-to-host transfer."""
    flat = torch.stack([v.detach().reshape(()).to(torch.float64) for v in values.values()])
    return dict(zip(values, flat.tolist()))


def _picks_text(picks: list[tuple[int, int]]) -> str:
    return ", ".join(f"expert {e} from epoch {t}" for e, t in picks)


def _infer_dim(store, d_f: int) -> int:
    """Head width D from an image-head snapshot: numel = D*d_f + D^2 + 4D."""
    epochs = getattr(store, "epochs", None) or [0]
    n = store.snapshot(0, int(min(epochs)), "image").numel()
    b = d_f + 4
    dim = int(round((-b + math.sqrt(b * b + 4 * n)) / 2))
    if dim * d_f + dim * dim + 4 * dim != n:
        raise ValueError(
            f"image-head snapshots have {n} parameters, which no head on {d_f}-d features has: "
            "the experts were trained with another image encoder"
        )
    return dim
