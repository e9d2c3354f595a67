"""What a demo run directory holds: the file names, ``metrics.json`` and the ``metrics.jsonl``
records of each distillation, and the loss a student that does not move scores in them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
LOSS_PNG = "loss_curves.png"
COLLAPSE_PNG = "collapse.png"


def grid_png(method: str) -> str:
    """File name of the distilled-image grid of ``method``."""
    return f"distilled_{method}.png"


def load_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``metrics.json`` of a demo run; ``FileNotFoundError`` / ``ValueError`` with the reason."""
    path = Path(run_dir) / METRICS_FILE
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"{run_dir} is not a directory (expected a demo run directory)")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: not a demo run directory, or the run did not finish "
            "(run `repblend-fast demo --out DIR` first)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("kind") != "repblend_fast.demo":
        raise ValueError(f"{path} is not a repblend_fast demo metrics file")
    if not isinstance(data.get("methods"), dict) or not data["methods"]:
        raise ValueError(f"{path} holds no evaluated methods")
    return data


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (blank lines skipped)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                out.append(json.loads(line))
    return out


def loss_reference(config: dict[str, Any] | None, records: list[dict[str, Any]]) -> float:
    """Total matching loss of a student that does not move: 2 for the sum of the two
    per-modality normalised distances, 1 with ``merge_loss`` (one joint normalisation)."""
    if config and "merge_loss" in config:
        return 1.0 if config["merge_loss"] else 2.0
    for r in records:  # no config: whether the logged total is the sum of the two
        t, i, x = r.get("loss"), r.get("loss_img"), r.get("loss_txt")
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in (t, i, x)):
            return 2.0 if abs(t - (i + x)) <= 1e-3 * max(1.0, abs(t)) else 1.0
    return 2.0
