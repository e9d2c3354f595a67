"""What is at a path: the ``repblend-fast info`` command's library side.

:func:`describe` recognises everything the library writes — an expert store (``manifest.json``), a
distillation run folder (``config.json``), a demo run folder (``metrics.json``), and any
``.safetensors`` file (a distilled set, a checkpoint, an expert file, a feature cache entry) — and
returns a JSON-serialisable summary with a ``kind`` and the tensors' shapes. Anything else raises
``ValueError`` with one line saying what the path is and what was expected.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from repblend_fast.io import read_safetensors_header

__all__ = ["describe"]

EXPECTED = "an expert store, a run or demo folder, or a .safetensors file written by repblend-fast"


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """A summary of ``path`` (see the module docstring); ``FileNotFoundError`` / ``ValueError``
    with a one-line reason for anything else."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist (expected {EXPECTED})")
    if p.is_dir():
        return _describe_dir(p)
    return describe_safetensors(p)


def describe_safetensors(path: Path) -> dict[str, Any]:
    """Kind, metadata and tensor shapes of one safetensors file (structure checked first)."""
    try:
        header = read_safetensors_header(path)
    except ValueError as exc:
        raise ValueError(f"{exc} (expected {EXPECTED})") from None
    meta = dict(header.get("__metadata__") or {})
    out: dict[str, Any] = {"kind": meta.pop("kind", _guess_kind(path, header)), "path": str(path)}
    for k, v in sorted(meta.items()):
        out[k] = _maybe_json(v) if k in ("config", "losses", "metrics") else v
    out["tensors"] = {
        k: {"dtype": v["dtype"], "shape": list(v["shape"])}
        for k, v in sorted(header.items())
        if k != "__metadata__"
    }
    return out


def _guess_kind(path: Path, header: dict) -> str:
    names = set(header) - {"__metadata__"}
    if names and all(n.startswith(("image/epoch_", "text/epoch_")) for n in names):
        return "repblend_fast.expert"
    return "safetensors"


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except (TypeError, json.JSONDecodeError):
        return value


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def _describe_dir(d: Path) -> dict[str, Any]:
    if (d / "manifest.json").is_file():
        man = _read_json(d / "manifest.json")
        if not isinstance(man, dict):
            raise ValueError(f"{d / 'manifest.json'}: not an expert-store manifest")
        return {"kind": "repblend_fast.experts", "path": str(d), **man}
    if (d / "config.json").is_file():
        return _describe_run(d)
    if (d / "metrics.json").is_file():
        return _describe_demo(d)
    if (d / "manifest.partial.json").is_file():
        part = _read_json(d / "manifest.partial.json")
        files = part.get("files") if isinstance(part, dict) else None
        return {
            "kind": "repblend_fast.experts-unfinished",
            "path": str(d),
            "experts_written": len(files) if isinstance(files, dict) else None,
            "num_experts": part.get("num_experts") if isinstance(part, dict) else None,
            "note": "its `buffer` run was interrupted or is running; rerun the same command to "
            "finish it",
        }
    raise ValueError(
        f"{d}: a folder without manifest.json, config.json or metrics.json (expected {EXPECTED})"
    )


def _describe_run(d: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": "repblend_fast.run",
        "path": str(d),
        "config": _read_json(d / "config.json"),
    }
    metrics = d / "metrics.jsonl"
    if metrics.is_file():
        # Count iteration records (not config-change records); a torn last line is not one.
        count = 0
        for ln in metrics.read_bytes().splitlines():
            try:
                rec = json.loads(ln)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            count += isinstance(rec, dict) and "iteration" in rec
        out["iterations_logged"] = count
    for name in ("distilled.safetensors", "checkpoint.safetensors"):
        if (d / name).is_file():
            info = describe_safetensors(d / name)
            info.pop("config", None)  # the folder's config.json says it
            out[name] = info
    out["integrity"] = _run_integrity(d)
    return out


def _run_integrity(d: Path) -> dict[str, str]:
    """``{file: "ok" | "changed since written" | "not recorded"}`` for a run folder's files,
    checked against its ``checksums.json`` (run files are small enough to hash here)."""
    from repblend_fast.checkpoint import CHECKSUMS, CONFIG, RunRecord
    from repblend_fast.io import IntegrityError

    if not (d / CHECKSUMS).is_file():
        return {"checksums.json": "absent (written by an older version)"}
    try:
        record = RunRecord(d)
    except IntegrityError:
        return {"checksums.json": "damaged"}
    out = {}
    for name in (CONFIG, "checkpoint.safetensors", "distilled.safetensors"):
        if not (d / name).is_file():
            continue
        try:
            record.verify(name)
            out[name] = "ok"
        except IntegrityError as exc:
            out[name] = "not recorded" if "records no checksum" in str(exc) else "changed"
    return out


def _describe_demo(d: Path) -> dict[str, Any]:
    m = _read_json(d / "metrics.json")
    if not isinstance(m, dict) or m.get("kind") != "repblend_fast.demo":
        raise ValueError(f"{d / 'metrics.json'}: not a repblend-fast demo metrics file")
    methods = {}
    for name, entry in (m.get("methods") or {}).items():
        best = entry.get("best") or {}
        methods[name] = {
            "label": entry.get("label", name),
            "pairs": entry.get("pairs"),
            "mean_recall_best": (best.get("mean") or {}).get("mean"),
            "std_best": (best.get("std") or {}).get("mean"),
        }
    runs = {}
    for sub in sorted(p for p in d.iterdir() if p.is_dir() and (p / "config.json").is_file()):
        runs[sub.name] = _describe_run(sub)
    return {
        "kind": "repblend_fast.demo",
        "path": str(d),
        "dataset": m.get("dataset"),
        "encoders": m.get("encoders"),
        "methods": methods,
        "runs": runs,
        "total_s": (m.get("timings") or {}).get("total_s"),
    }
