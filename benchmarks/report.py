"""Render benchmark results as Markdown, and combine one run's files into a results file.

Inputs it understands (detected by content):

* pytest-benchmark JSON (``--benchmark-json``) of the op / step suites: one row per benchmark
  from its ``extra_info``, with its speed-up over the fp32 eager torch row (``reference``; the
  step suite: ``repblend-authors``) and over that row's ``torch.compile`` (``compile``; the step
  suite: the fast path with ``compile=step``) of the same case (``÷ eager``, ``÷ compile``);
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
    if isinstance(data, dict) and "op_records" in data:
        return "op-records"
    if isinstance(data, dict) and data.get("kind") in (
        "repblend_fast.smoke",
        "repblend_fast.parity",
    ):
        return data["kind"].split(".")[1]
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
        "smoke": [],
        "parity": [],
        "sources": [],
        "unreadable": [],
    }
    for p in paths:
        p = Path(p)
        try:
            text = p.read_text(encoding="utf-8")
            if p.suffix == ".jsonl":
                data = {"op_records": [json.loads(line) for line in text.splitlines() if line]}
            else:
                data = json.loads(text)
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
        elif kind == "op-records":
            out["ops"] += data["op_records"]
        elif kind in ("smoke", "parity"):
            out[kind] += data["records"]
        elif kind == "profile":
            out["profiles"].append(data)
        elif kind == "skips":
            out["skips"] += data["skips"]
        elif kind == "combined":
            for k in ("ops", "step", "profiles", "skips", "smoke", "parity"):
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
    if isinstance(s, dict) and "name" in s:  # a step-benchmark configuration
        return str(s["name"])
    if isinstance(s, dict):
        return " ".join(f"{k}={v}" for k, v in s.items())
    return str(s)


def _num(v, fmt: str = ".3g") -> str:
    return "–" if v is None else format(v, fmt)


def _role(r: dict) -> str | None:
    """``eager`` (the fp32 eager torch row a speed-up is measured against), ``compile`` (its
    ``torch.compile``) or None; op benchmarks name them by provider, the step benchmark by
    ``role``."""
    if "role" in r:
        return r["role"]
    return {"reference": "eager", "compile": "compile"}.get(r.get("provider"))


def _case_key(r: dict, mode=None) -> tuple:
    # The step's fast rows run a bf16 encoder on a GPU ("float32+bf16-encoder"): same case.
    dtype = str(r.get("dtype", "")).split("+")[0]
    return (r.get("op"), mode or r.get("mode"), _shape(r.get("shape")), dtype)


def baselines(ops: list[dict]) -> dict[str, dict[tuple, float]]:
    """``{"eager": {case: ms}, "compile": {case: ms}}`` of the rows that are baselines."""
    out: dict[str, dict[tuple, float]] = {"eager": {}, "compile": {}}
    for r in ops:
        role = _role(r)
        if role not in out or r.get("median_ms") is None:
            continue
        for mode in r.get("baseline_modes") or [r.get("mode")]:
            out[role][_case_key(r, mode)] = r["median_ms"]
    return out


def _ratio(base: float | None, ms: float | None) -> str:
    return f"{base / ms:.2f}×" if base and ms else "–"


def ops_markdown(ops: list[dict]) -> str:
    """One table per op; ``÷ eager`` and ``÷ compile`` are the baseline's time divided by the
    row's (the speed-up over the fp32 eager torch row and over its ``torch.compile``, same case
    and run; the float64 reference is only an accuracy yardstick)."""
    if not ops:
        return ""
    base = baselines(ops)
    lines = []
    for op in dict.fromkeys(r.get("op") for r in ops):
        rows = [r for r in ops if r.get("op") == op]
        lines += [f"### {op}", ""]
        lines.append(
            "| mode | shape | dtype | provider | median ms | p20–p80 ms | ÷ eager | ÷ compile "
            "| throughput | peak MiB | max err |"
        )
        lines.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            key = _case_key(r)
            med = r.get("median_ms")
            eager = _ratio(base["eager"].get(key), med)
            comp = _ratio(base["compile"].get(key), med)
            if op == "step" and not str(r.get("provider")).startswith("repblend"):
                eager = comp = "–"  # the step's baselines are RepBlend's; LoRS has none here
            if "gbps" in r:
                thr = f"{r['gbps']:.1f} GB/s ({100 * r.get('bw_fraction', 0):.0f}% of copy"
                thr += f" {r['copy_gbps']:.0f} GB/s)" if r.get("copy_gbps") else ")"
            elif "tflops" in r:
                thr = f"{r['tflops']:.3g} TFLOP/s"
            else:
                thr = "–"
            err = r.get("max_abs_err", r.get("parity_rel_err"))
            lines.append(
                f"| {r.get('mode')} | {_shape(r.get('shape'))} | {r.get('dtype')} | "
                f"{r.get('provider')} | {_num(med, '.4g')} | "
                f"{_num(r.get('p20_ms'), '.4g')}–{_num(r.get('p80_ms'), '.4g')} | {eager} | "
                f"{comp} | {thr} | {_num(r.get('peak_mib'), '.1f')} | {_num(err, '.2g')} |"
            )
        lines.append("")
    return "\n".join(lines)


def smoke_markdown(recs: list[dict]) -> str:
    if not recs:
        return ""
    lines = [
        "| op | impl | status | first call s | call ms | rel. err | reason |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in recs:
        lines.append(
            f"| {r.get('op')} | {r.get('impl')} | {r.get('status')} | "
            f"{_num(r.get('first_call_s'), '.3g')} | {_num(r.get('call_ms'), '.3g')} | "
            f"{_num(r.get('rel_err'), '.2g')} | {str(r.get('reason', '')).replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def parity_markdown(recs: list[dict]) -> str:
    """Per configuration and meta-gradient: the verdict (the worst gradient's error against the
    reference path in the same precision, and its bound), then the precision cost — the x and
    worst errors against the fp32 reference and float64, and the bf16 encoder's own error —
    reported, not bounded. Older records (before the same-precision check) show their fields
    against fp32 under the same columns."""
    if not recs:
        return ""
    lines = [
        "| shape | meta-grad | autocast | impl | compile | verdict | worst | same precision "
        "| bound | x cost vs fp32 | worst cost vs fp32 | vs float64 | bf16 encoder (features / "
        "VJP) | fp32 vs float64 |",
        "|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in recs:
        w = r.get("worst")
        same = r.get("rel_err", r.get("rel_err_vs_fp32", {}))
        cost = r.get("precision_cost", r.get("rel_err_vs_fp32", {}))
        e64, enc = r.get("rel_err_vs_fp64", {}), r.get("encoder_error", {})
        worst_cost = max(cost.values()) if cost else None
        lines.append(
            f"| {r.get('shape')} | {r.get('meta_grad')} | {r.get('autocast')} | {r.get('impl')} "
            f"| {r.get('compile')} | {'ok' if r.get('ok') else 'FAILED'} | {w} | "
            f"{_num(same.get(w), '.2g')} | {_num(r.get('rtol', {}).get(w), '.2g')} | "
            f"{_num(cost.get('x'), '.2g')} | {_num(worst_cost, '.2g')} | "
            f"{_num(max(e64.values()) if e64 else None, '.2g')} | "
            f"{_num(enc.get('features'), '.2g')} / {_num(enc.get('vjp'), '.2g')} | "
            f"{_num(r.get('max_fp32_vs_fp64'), '.2g')} |"
        )
    return "\n".join(lines) + "\n"


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
    from repblend_fast.bench.table import add_ratios, format_accounting_table
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
    if doc.get("smoke"):
        parts += [
            "## Smoke (fused kernels compile, run and match)",
            "",
            smoke_markdown(doc["smoke"]),
        ]
    if doc.get("parity"):
        parts += [
            "## Parity at the timed settings",
            "",
            parity_markdown(doc["parity"]),
        ]
    if doc.get("step"):
        # Records of several step files of one run (e.g. gpu_check.sh's per-shape and compile
        # stages): ratios to the default fast rows of the same configuration across them.
        add_ratios(doc["step"])
        parts += [
            "## Step benchmark (one distillation iteration)",
            "",
            format_step_table(doc["step"]),
        ]
        accounting = format_accounting_table(doc["step"])
        if accounting:
            parts += [
                "## Memory a device would see, and the step's FLOP rate",
                "",
                accounting,
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
