"""What is at a path: the ``repblend-fast info`` command's library side.

:func:`describe` recognises everything the library writes — an expert store (``manifest.json``), a
distillation run folder (``config.json``), a demo run folder (``metrics.json``), and any
``.safetensors`` file (a distilled set, a checkpoint, an expert file, a feature cache entry) — and
returns a JSON-serialisable summary with a ``kind`` and the tensors' shapes. Anything else raises
``ValueError`` with one line saying what the path is and what was expected. :func:`summary` turns
that description into the few lines ``info`` prints first (kind, method, pairs, iterations done
and planned, the outer guard's counts, files and their check status).

A value a file never recorded is shown as ``unknown``: a set imported from the research scripts
lists the config fields it knows (``known_fields`` in its metadata); the others hold defaults
only so that ``evaluate`` can read the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from repblend_fast.io import read_safetensors_header

__all__ = ["describe", "summary"]

UNKNOWN = "unknown"

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
        out[k] = _maybe_json(v) if k in ("config", "losses", "metrics", "known_fields") else v
    known = out.pop("known_fields", None)
    if isinstance(known, list) and isinstance(out.get("config"), dict):
        out["config"] = {k: (v if k in known else UNKNOWN) for k, v in out["config"].items()}
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
    from repblend_fast.engine.checkpoint import SUMMARY  # the end-of-run record (its "guard" block)

    if (d / SUMMARY).is_file():
        rec = _read_json(d / SUMMARY)
        if isinstance(rec, dict) and isinstance(rec.get("guard"), dict):
            out["guard"] = rec["guard"]
    return out


def _run_integrity(d: Path) -> dict[str, str]:
    """``{file: "ok" | "changed since written" | "not recorded"}`` for a run folder's files,
    checked against its ``checksums.json`` (run files are small enough to hash here)."""
    from repblend_fast.engine.checkpoint import CHECKSUMS, CONFIG, RunRecord
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


# --------------------------------------------------------------------------- the human summary
def summary(info: dict[str, Any], path: str) -> str:
    """The lines ``info`` prints before (or instead of) the JSON of :func:`describe`."""
    kind = str(info.get("kind", "?"))
    head = {
        "repblend_fast.experts": _store_lines,
        "repblend_fast.run": _run_lines,
        "repblend_fast.demo": _demo_lines,
        "repblend_fast.distilled": _set_lines,
        "repblend_fast.checkpoint": _set_lines,
    }.get(kind, _other_lines)(info)
    return "\n".join([f"{path}: {kind}", *head, f"all fields: repblend-fast info --json {path}"])


def _show(v: Any) -> str:
    return UNKNOWN if v is None else str(v)


def _config_line(cfg: Any) -> str:
    if not isinstance(cfg, dict):
        return "  config       not recorded"
    parts = [
        f"method {_show(cfg.get('method'))}",
        f"{_show(cfg.get('pairs'))} pairs",
        f"similarity {_show(cfg.get('similarity'))}",
        f"loss {_show(cfg.get('loss'))}",
    ]
    return "  config       " + ", ".join(parts)


def _store_lines(info: dict[str, Any]) -> list[str]:
    train = info.get("train") if isinstance(info.get("train"), dict) else {}
    return [
        f"  method       {_show(info.get('method'))}, {_show(info.get('num_experts'))} experts, "
        f"epochs {_show(info.get('epochs'))}, image size {_show(info.get('image_size'))} px",
        f"  encoders     {_show(info.get('image_encoder'))} / {_show(info.get('text_encoder'))}",
        f"  training     batch {_show(train.get('batch_size'))}, lr {_show(train.get('lr_img'))}, "
        f"seed {_show(train.get('seed'))}",
        f"  files        {len(info.get('files') or [])} expert files, "
        f"{'checksums recorded' if info.get('integrity') else 'no checksums recorded'}",
    ]


def _run_lines(info: dict[str, Any]) -> list[str]:
    cfg = info.get("config")
    planned = cfg.get("iterations") if isinstance(cfg, dict) else None
    files = info.get("integrity") or {}
    return [
        _config_line(cfg),
        f"  iterations   {_show(info.get('iterations_logged'))} done of {_show(planned)} planned",
        f"  guard        {_guard_text(info.get('guard'))}",
        "  files        " + (", ".join(f"{k} {v}" for k, v in files.items()) or "none"),
    ]


def _guard_text(g: Any) -> str:
    if not isinstance(g, dict):
        return "not recorded"
    rejected = g.get("rejected") or {}
    clipped = g.get("clipped_fraction") or {}
    text = (
        f"{_show(g.get('iterations'))} iterations, rejected "
        + (", ".join(f"{k} {v}" for k, v in rejected.items()) or "none")
        + f", rolled back {_show(g.get('rolled_back'))}, longest rejected streak "
        + _show(g.get("longest_rejected_streak"))
    )
    if clipped:
        text += ", clipped " + ", ".join(f"{k} {100 * float(v):.1f}%" for k, v in clipped.items())
    warnings = g.get("warnings") or []
    if warnings:
        text += f"; {len(warnings)} warning(s): {warnings[0]}"
    return text


def _set_lines(info: dict[str, Any]) -> list[str]:
    cfg = info.get("config")
    tensors = info.get("tensors") or {}
    images = (tensors.get("images") or tensors.get("x") or {}).get("shape")
    iterations = cfg.get("iterations") if isinstance(cfg, dict) else None
    lines = [_config_line(cfg), f"  iterations   {_show(iterations)} planned"]
    if images:
        lines.append(f"  images       {images[0]} of {images[2]}x{images[3]} px")
    return lines


def _other_lines(info: dict[str, Any]) -> list[str]:
    if "note" in info:
        return [f"  {info['note']}"]
    return [f"  {len(info.get('tensors') or {})} tensors"]


def _demo_lines(info: dict[str, Any]) -> list[str]:
    lines = [f"  dataset      {_show(info.get('dataset'))}"]
    for name, m in (info.get("methods") or {}).items():
        mean, std = m.get("mean_recall_best"), m.get("std_best")
        score = UNKNOWN if mean is None else f"{mean:.1f} ± {std or 0:.1f}"
        lines.append(f"  {name:<12} {_show(m.get('pairs'))} pairs, mean recall {score}")
    for name, run in (info.get("runs") or {}).items():
        cfg = run.get("config") if isinstance(run.get("config"), dict) else {}
        files = run.get("integrity") or {}
        status = "ok" if files and all(v == "ok" for v in files.values()) else "see --json"
        lines.append(
            f"  run {name:<8} {_show(run.get('iterations_logged'))} of "
            f"{_show(cfg.get('iterations'))} iterations, guard "
            f"{_guard_text(run.get('guard'))}, files {status}"
        )
    return lines
