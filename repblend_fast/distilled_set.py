"""DistilledSet: the product of a distillation run and its safetensors file.

Written by :class:`repblend_fast.engine.distill.Distiller` (``distilled.safetensors``), read by
evaluation
and the research-script converters.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from repblend_fast.config import DistillConfig
from repblend_fast.engine.checkpoint import RunRecord

FORMAT_VERSION = 1


@dataclass
class DistilledSet:
    """The product of a run: images ``[N,3,H,W]``, texts ``[N,d_t]``, learned lrs, similarity."""

    images: torch.Tensor
    texts: torch.Tensor
    eta_img: float
    eta_txt: float
    similarity: torch.Tensor | None  # full [N, N] target, None for identity
    sim_params: dict[str, torch.Tensor]

    def save(
        self,
        path: str | os.PathLike,
        config: DistillConfig | None = None,
        *,
        record: RunRecord | None = None,
        known_fields: list[str] | None = None,
    ) -> Path:
        """Write the set (recorded in the run folder's ``record`` when given). A set holding a
        non-finite value is refused with ``ValueError``: it would train nothing, and a file that
        looks finished is worse than none. ``known_fields``: the fields of ``config`` that were
        recorded (an imported set's others are placeholders, shown as unknown by ``info``)."""
        from repblend_fast.io import safetensors_bytes, write_atomic

        tensors = {
            "images": self.images,
            "texts": self.texts,
            "eta_img": torch.tensor(self.eta_img),
            "eta_txt": torch.tensor(self.eta_txt),
        }
        if self.similarity is not None:
            tensors["similarity"] = self.similarity
        tensors.update({f"sim.{k}": v for k, v in self.sim_params.items()})
        bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(
                f"{path} not written: the distilled {', '.join(bad)} hold non-finite values (the "
                "run diverged); resume from its checkpoint with lower learning rates "
                "(--resume --set lr_img=... lr_txt=...) or set clamp_lr"
            )
        meta = {"format_version": str(FORMAT_VERSION), "kind": "repblend_fast.distilled"}
        if config is not None:
            meta["config"] = config.to_json()
        if known_fields is not None:
            meta["known_fields"] = json.dumps(sorted(known_fields))
        path = Path(path)
        data = safetensors_bytes(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta
        )
        if record is not None and path.parent.resolve() == record.folder.resolve():
            record.write(path.name, data)
        else:
            write_atomic(path, data)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> DistilledSet:
        from repblend_fast.io import load_safetensors, safetensors_metadata

        meta = safetensors_metadata(path)
        if meta.get("kind") != "repblend_fast.distilled":
            raise ValueError(f"{path} is not a distilled set written by repblend_fast")
        t = load_safetensors(path)
        sim = {k[4:]: v for k, v in t.items() if k.startswith("sim.")}
        return cls(
            t["images"],
            t["texts"],
            float(t["eta_img"]),
            float(t["eta_txt"]),
            t.get("similarity"),
            sim,
        )
