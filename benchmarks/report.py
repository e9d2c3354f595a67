"""Render benchmark results as Markdown, and combine one run's files into a results file.

Inputs it understands (detected by content):

* pytest-benchmark JSON (``--benchmark-json``) of the op / step suites: one row per benchmark
  from its ``extra_info``, with the speed-up over the ``reference`` provider of the same case;
* the step benchmark's records (``repblend_fast.bench.run_bench`` JSON list);
* the step profiler's JSON (``run_profile``);
* ``*.skips.json`` written by ``--skips-json`` (which providers were skipped, and why);
* a combined results file made by ``--combine`` (``benchmarks/results/<date>_<gpu>_<sha>.json``).

Usage::

    python benchmarks/report.py results/2026-01-01_H100_abc123.json           # Markdown to stdout
    python benchmarks/report.py --combine out/*.json --out out/results.json --markdown out/r.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------------------------------
# loading


def kind_of(data) -> str:
    if isinstance(data, dict) and data.get("kind") == "repblend_fast.results":
        return "combined"
    if isinstance(data, dict) and "benchmarks" in data:
        return "pytest-benchmark"
    if isinstance(data, dict) and "configs" in data and "meta_grad" in data:
        return "profile"
    if isinstance(data, dict) and "skips" in data:
        return "skips"
    if isinstance(data, list) and (not data or "provider" in data[0]):
        return "step"
    return "unknown"


def combine(paths: list[str | Path]) -> dict:
    """One results document from the files of one run (unknown files are listed, not fatal)."""
    out: dict = {
        "kind": "repblend_fast.results",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {},
        "ops": [],
        "step": [],
        "profiles": [],
        "skips": [],
        "sources": [],
        "unreadable": [],
    }
    for p in paths:
        p = Path(p)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            out["unreadable"].append(f"{p.name}: {exc}")
            continue
        kind = kind_of(data)
        out["sources"].append({"file": p.name, "kind": kind})
        if kind == "pytest-benchmark":
            mi = data.get("machine_info", {})
            out["machine"].update(mi.get("repblend_fast", {}))
            for b in data["benchmarks"]:
                rec = dict(b.get("extra_info", {}))
                rec["name"] = b.get("name")
                out["ops"].append(rec)
        elif kind == "step":
            out["step"] += data
            if data:
                keys = ("device", "cpu", "cpu_count", "gpu", "cuda", "torch", "triton", "git_sha")
                out["machine"].update({k: data[0].get(k) for k in keys if k in data[0]})
        elif kind == "profile":
            out["profiles"].append(data)
        elif kind == "skips":
            out["skips"] += data["skips"]
        elif kind == "combined":
            for k in ("ops", "step", "profiles", "skips"):
                out[k] += data.get(k, [])
            out["machine"].update(data.get("machine", {}))
        else:
            out["unreadable"].append(f"{p.name}: not a benchmark result")
    return out


def results_name(doc: dict) -> str:
    """``<date>_<gpu or cpu>_<sha>.json`` for ``benchmarks/results/``."""
    m = doc.get("machine", {})
    date = doc.get("created", "")[:10] or _dt.date.today().isoformat()
    dev = m.get("gpu") or f"cpu{m.get('cpu_count') or ''}"
    dev = re.sub(r"[^A-Za-z0-9.-]+", "-", str(dev)).strip("-")
    sha = re.sub(r"[^A-Za-z0-9+]+", "", str(m.get("git_sha", "unknown")))
    return f"{date}_{dev}_{sha}.json"


# --------------------------------------------------------------------------------------------------
# rendering


def _shape(s) -> str:
    if isinstance(s, dict):
        return " ".join(f"{k}={v}" for k, v in s.items())
    return str(s)


def _num(v, fmt: str = ".3g") -> str:
    return "–" if v is None else format(v, fmt)


def ops_markdown(ops: list[dict]) -> str:
    if not ops:
        return ""
    ref = {}
    for r in ops:
        if r.get("provider") == "reference":
            key = (r.get("op"), r.get("mode"), _shape(r.get("shape")), r.get("dtype"))
            ref[key] = r.get("median_ms")
    lines = []
    for op in dict.fromkeys(r.get("op") for r in ops):
        rows = [r for r in ops if r.get("op") == op]
        lines += [f"### {op}", ""]
        lines.append(
            "| mode | shape | dtype | provider | median ms | p20–p80 ms | ÷ reference "
            "| throughput | peak MiB | max err |"
        )
        lines.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            key = (r.get("op"), r.get("mode"), _shape(r.get("shape")), r.get("dtype"))
            base = ref.get(key)
            med = r.get("median_ms")
            speed = f"{base / med:.2f}×" if base and med else "–"
            if "gbps" in r:
                thr = f"{r['gbps']:.1f} GB/s ({100 * r.get('bw_fraction', 0):.0f}% of copy)"
            elif "tflops" in r:
                thr = f"{r['tflops']:.3g} TFLOP/s"
            else:
                thr = "–"
            lines.append(
                f"| {r.get('mode')} | {_shape(r.get('shape'))} | {r.get('dtype')} | "
                f"{r.get('provider')} | {_num(med, '.4g')} | "
                f"{_num(r.get('p20_ms'), '.4g')}–{_num(r.get('p80_ms'), '.4g')} | {speed} | "
                f"{thr} | {_num(r.get('peak_mib'), '.1f')} | {_num(r.get('max_abs_err'), '.2g')} |"
            )
        lines.append("")
    return "\n".join(lines)


def skips_markdown(skips: list[dict]) -> str:
    if not skips:
        return ""
    reasons: dict[str, list[str]] = {}
    for s in skips:
        reasons.setdefault(s.get("reason", ""), []).append(s.get("test", ""))
    lines = ["### skipped", "", "| reason | benchmarks |", "|---|---:|"]
    for why, tests in reasons.items():
        lines.append(f"| {why.replace('|', '/')} | {len(tests)} |")
    return "\n".join(lines) + "\n"


def markdown(doc: dict) -> str:
    from repblend_fast.bench import format_step_table
    from repblend_fast.profiling import format_profile_table

    m = doc.get("machine", {})
    parts = ["# repblend_fast benchmark results", ""]
    if m:
        dev = m.get("gpu") or f"CPU {m.get('cpu')} ({m.get('cpu_count')} cores)"
        parts.append(
            f"{dev}; torch {m.get('torch')}, CUDA {m.get('cuda')}, triton {m.get('triton')}, "
            f"git {m.get('git_sha')}; {doc.get('created', '')}"
        )
        parts.append("")
    if doc.get("step"):
        parts += [
            "## Step benchmark (one distillation iteration)",
            "",
            format_step_table(doc["step"]),
        ]
    for prof in doc.get("profiles", []):
        parts += [f"## Step profile ({prof.get('meta_grad')})", ""]
        for c in prof.get("configs", []):
            title = f"{c['config']} on {prof.get('device')}"
            mem = "peak MiB" if prof.get("device") == "cuda" else "peak RSS MiB"
            table = format_profile_table(c["summary"], title, mem)
            parts += ["```", table, "```", ""]
    if doc.get("ops"):
        parts += ["## Op benchmarks", "", ops_markdown(doc["ops"])]
    sk = skips_markdown(doc.get("skips", []))
    if sk:
        parts += [sk]
    if doc.get("unreadable"):
        parts += ["## Unreadable inputs", ""] + [f"- {u}" for u in doc["unreadable"]] + [""]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="result JSON files")
    ap.add_argument("--combine", action="store_true", help="combine the files into one document")
    ap.add_argument(
        "--out",
        default=None,
        help="write the combined JSON here (a folder: named <date>_<gpu>_<sha>.json inside it)",
    )
    ap.add_argument("--markdown", default=None, help="write the Markdown here (default: stdout)")
    a = ap.parse_args(argv)
    doc = combine(a.files)
    if a.combine and a.out:
        out = Path(a.out)
        if out.is_dir() or a.out.endswith("/"):
            out.mkdir(parents=True, exist_ok=True)
            out = out / results_name(doc)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out}", file=sys.stderr)
    md = markdown(doc)
    if a.markdown:
        Path(a.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(a.markdown).write_text(md, encoding="utf-8")
        print(f"wrote {a.markdown}", file=sys.stderr)
    else:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
