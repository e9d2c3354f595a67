"""The Distiller's resumable state and run folder: :class:`DistillerState`.

What a run saves and restores to continue bit-for-bit (:meth:`~DistillerState.state_tensors`,
:meth:`~DistillerState.save_checkpoint`, :meth:`~DistillerState.load_checkpoint`) and what it
writes into its folder besides (``config.json``, ``metrics.jsonl``, ``checksums.json``; the
Distiller adds ``summary.json`` at the end). The file formats and their checks are
:mod:`repblend_fast.engine.checkpoint`'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from repblend_fast.engine.checkpoint import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    RECORDED_CHANGES,
    MetricsLog,
    RunRecord,
    check_state,
    open_checkpoint,
    read_metrics_for_resume,
    write_checkpoint,
)
from repblend_fast.engine.guard_report import GuardReport


class DistillerState:
    """Checkpoint and run-folder methods of :class:`repblend_fast.engine.distill.Distiller`.

    A mixin: it reads the distiller's ``cfg``, ``out_dir``, ``store``, leaves (``x``, ``y``,
    ``eta_img``, ``eta_txt``, ``sim_params``, ``_params()``), generator ``g``, ``sampler``,
    optimiser ``opt`` and counters (``iteration``, ``bad_streak``, ``collapse_losses``,
    ``collapse_pinned``).
    """

    def _open_outputs(self) -> None:
        """Start writing ``out_dir``: stale temporary files go, ``config.json`` is (re)written
        and recorded, ``metrics.jsonl`` is cut to what this run continues, and the learning-rate
        changes of a resume are logged as a config-change record."""
        from repblend_fast.io import remove_stale_temps

        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.out_dir)
        record = self._run_record()
        if getattr(self, "_resumed_from", None) is None and self.iteration == 0:
            record.forget(*[n for n in list(record.files) if n != CONFIG])
        record.write(CONFIG, (self.cfg.to_json() + "\n").encode("utf-8"))
        log = self._metrics_log()
        log.open()
        changes = getattr(self, "_config_changes", None)
        if changes:
            log.append({"event": "config_change", "at_iteration": self.iteration, **changes})
            self._config_changes = None

    def _run_record(self) -> RunRecord:
        record = getattr(self, "_checksums", None)
        if record is None:
            record = self._checksums = RunRecord(self.out_dir)
        return record

    def _metrics_log(self) -> MetricsLog:
        log = getattr(self, "_mlog", None)
        if log is None:
            log = self._mlog = MetricsLog(self.out_dir / METRICS)
        return log

    def _log(self, rec: dict) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._metrics_log().append(rec)

    def _restore(self, t: dict[str, torch.Tensor]) -> None:
        """Set the state to :meth:`state_tensors` ``t`` (already validated)."""
        # In place: the optimiser holds these leaves.
        for name, p in self._params().items():
            p.copy_(t[name].to(p.device, p.dtype))
        self.g.set_state(t["rng"])
        self.sampler.load_state_tensors(t)
        self.iteration, self.bad_streak = int(t["iteration"]), int(t["bad_streak"])
        self.opt.load_state_tensors(t)
        if "collapse.losses" in t:
            self.collapse_losses = t["collapse.losses"].tolist()
            self.collapse_pinned = int(t["collapse.pinned"])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to continue bit-for-bit, as named tensors."""
        t = {
            "x": self.x,
            "y": self.y,
            "eta_img": self.eta_img,
            "eta_txt": self.eta_txt,
            "rng": self.g.get_state(),
            **self.sampler.state_tensors(),
            "iteration": torch.tensor(self.iteration),
            "bad_streak": torch.tensor(self.bad_streak),
        }
        t.update({f"sim.{k}": v for k, v in self.sim_params.items()})
        t.update(self.opt.state_tensors())
        if self.cfg.collapse_window:
            t["collapse.losses"] = torch.tensor(self.collapse_losses, dtype=torch.float64)
            t["collapse.pinned"] = torch.tensor(self.collapse_pinned)
        return {k: v.detach().cpu().contiguous() for k, v in t.items()}

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write :meth:`state_tensors` (default: ``out_dir/checkpoint.safetensors``), with the
        store's manifest sha256 and the state of ``metrics.jsonl`` in its header."""
        if path is None:
            if self.out_dir is None:
                return None
            path = self.out_dir / CHECKPOINT
        out = self.out_dir is not None
        return write_checkpoint(
            path,
            self.state_tensors(),
            self.cfg,
            store_sha256=getattr(self.store, "manifest_sha256", None),
            metrics=self._metrics_log().state() if out else None,
            record=self._run_record() if out else None,
        )

    def load_checkpoint(self, path: str | os.PathLike, *, verify: bool = True) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint`.

        The config must continue the saved one (only ``RESUMABLE_CHANGES`` may differ), the
        store must be the one it ran against, its counters must be in range and agree with
        ``metrics.jsonl``; with ``verify`` its bytes must match the run folder's
        ``checksums.json``. ``ValueError`` (``IntegrityError``) naming the file otherwise, and
        nothing is changed.
        """
        path = Path(path)
        inside = self.out_dir is not None and path.parent.resolve() == self.out_dir.resolve()
        ck = open_checkpoint(
            path,
            self.cfg,
            store_sha256=getattr(self.store, "manifest_sha256", None),
            record=self._run_record() if inside else None,
            verify=verify,
        )
        t = ck.tensors
        check_state(
            t,
            path,
            config=self.cfg,
            num_experts=len(self.store),
            params=self._params(),
            rng_numel=self.g.get_state().numel(),
        )
        keep = None
        if self.out_dir is not None:
            keep = read_metrics_for_resume(
                self.out_dir / METRICS, int(t["iteration"]), ck.metrics, verify=verify
            )
        self._restore(t)
        if keep is not None:
            self._mlog = MetricsLog(self.out_dir / METRICS, keep)
            # The guard's tallies cover the whole run: recount the iterations already done.
            self.guard_report = GuardReport(json.loads(x) for x in keep.splitlines() if x.strip())
        self._resumed_from = path
        changes = {
            k: [getattr(ck.config, k), getattr(self.cfg, k)]
            for k in RECORDED_CHANGES
            if getattr(ck.config, k) != getattr(self.cfg, k)
        }
        self._config_changes = {"changes": changes} if changes else None
