"""The step benchmark's results table: ratios between records and the markdown table.

:func:`add_ratios` relates every timed record to the default ``repblend-fast`` rows of its
configuration and the fast rows to the authors' baselines; :func:`format_step_table` prints them,
one table per configuration. Records are the dicts :func:`repblend_fast.bench.drivers.run_bench`
returns (and writes to its JSON file), so a saved results file can be tabulated again.
"""

from __future__ import annotations

from repblend_fast.bench.shapes import StepShape

__all__ = [
    "add_ratios",
    "format_accounting_table",
    "format_step_table",
    "precision_text",
    "record_label",
]


def record_label(r: dict) -> str:
    """``provider (mode, precision[, settings])`` of a record, for messages and the table."""
    s = _settings_text(r)
    return f"{r['provider']} ({r['meta_grad']}, {precision_text(r)}{', ' + s if s != '–' else ''})"


def _settings_text(r: dict) -> str:
    if not r["provider"].endswith("-fast"):
        return "–"
    parts = []
    if r.get("compile", "none") != "none":
        parts.append(f"compile={r['compile']}")
    plan = r.get("memory_plan") or {}
    if r.get("memory_budget_mib"):
        text = f"budget {r['memory_budget_mib']:g} MiB"
        if plan:
            text += f": keep {plan['keep']}, chunk {plan['chunk']}"
            text += ", ckpt steps" if plan.get("checkpoint_steps") else ""
        parts.append(text)
    elif r.get("encoder_chunk"):
        parts.append(f"chunk {r['encoder_chunk']}")
    return ", ".join(parts) or "default"


def precision_text(r: dict) -> str:
    """A record's precision: ``fp32``, or the frozen encoder's autocast (``bf16 encoder``; the
    rest of the step is fp32). The baselines run fp32."""
    cast = r.get("autocast")
    return f"{cast} encoder" if cast not in (None, "none", "auto") else "fp32"


def _is_default_fast(r: dict) -> bool:
    return (
        r.get("provider") == "repblend-fast"
        and r.get("compile", "none") == "none"
        and not r.get("memory_budget_mib")
        and r.get("autocast_requested", "auto") == "auto"
    )


def add_ratios(records: list[dict]) -> None:
    """Time and memory ratios of every timed record to the default ``repblend-fast`` rows of its
    configuration (``time_ratio_to_fast_<mode>``, ``mem_ratio_to_fast_<mode>``), and of the
    baselines to it (``speedup_vs_<baseline>``, ``mem_ratio_to_<baseline>``)."""
    by_cfg: dict[str, dict[str, dict]] = {}
    base: dict[str, dict[str, dict]] = {}
    for r in records:
        if "ms_per_iter" not in r:
            continue
        if _is_default_fast(r):
            by_cfg.setdefault(r["config"], {})[r["meta_grad"]] = r
        if r.get("provider", "").endswith("-authors"):
            base.setdefault(r["config"], {})[r["provider"]] = r
    for r in records:
        if "ms_per_iter" not in r:
            continue
        for mode, ref in by_cfg.get(r["config"], {}).items():
            r[f"time_ratio_to_fast_{mode}"] = r["ms_per_iter"] / ref["ms_per_iter"]
            # A sub-MiB reference (tiny shapes) has no meaningful memory ratio.
            if ref["peak_mib"] >= 1.0:
                r[f"mem_ratio_to_fast_{mode}"] = r["peak_mib"] / ref["peak_mib"]
        if not r.get("provider", "").endswith("-fast"):
            continue
        for name, b in base.get(r["config"], {}).items():
            key = name.replace("-", "_")
            r[f"speedup_vs_{key}"] = b["ms_per_iter"] / r["ms_per_iter"]
            if b["peak_mib"] >= 1.0:
                r[f"mem_ratio_to_{key}"] = r["peak_mib"] / b["peak_mib"]


def format_step_table(records: list[dict]) -> str:
    """Markdown table: ms/iteration, peak MiB and ratios to ``repblend-fast`` per configuration.

    Records without a time (``skipped``: a parity failure, or a provider that could not run)
    get a row with the reason.
    """
    lines: list[str] = []
    configs = list(dict.fromkeys(r["config"] for r in records))
    for cfg in configs:
        rows = [r for r in records if r["config"] == cfg]
        r0 = rows[0]
        dev = r0.get("gpu") or f"{r0.get('cpu')} ({r0.get('cpu_count')} cores)"
        shape = StepShape(**r0["shape"]).describe() if "shape" in r0 else cfg
        mem = next((r.get("memory_method") for r in rows if r.get("memory_method")), "")
        lines.append(
            f"**{cfg}** — {shape}; {r0.get('device')}: {dev}; torch {r0.get('torch')}, "
            f"git {r0.get('git_sha')}; {mem}"
        )
        lines.append("")
        lines.append(
            "| provider | meta-grad | precision | settings | ms/iter | peak MiB (iteration) "
            "| peak MiB (total) | time ÷ fast-exact | time ÷ fast-tesla | mem ÷ fast-exact "
            "| mem ÷ fast-tesla | repblend-authors (fp32) ÷ this | parity rel. err |"
        )
        lines.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            err = r.get("parity_rel_err")
            err_s = f"{err:.2g}" if err is not None else "–"
            if "ms_per_iter" not in r:
                lines.append(
                    f"| {r['provider']} | {r['meta_grad']} | {precision_text(r)} | "
                    f"{_settings_text(r)} | skipped: {r.get('skipped')} | | | | | | | | {err_s} |"
                )
                continue

            def ratio(key: str, r=r) -> str:
                v = r.get(key)
                return f"{v:.2f}×" if v is not None else "–"

            lines.append(
                f"| {r['provider']} | {r['meta_grad']} | {precision_text(r)} | "
                f"{_settings_text(r)} | {r['ms_per_iter']:.1f} | {r['peak_mib']:.0f} | "
                f"{r['peak_total_mib']:.0f} | "
                f"{ratio('time_ratio_to_fast_exact')} | {ratio('time_ratio_to_fast_tesla')} | "
                f"{ratio('mem_ratio_to_fast_exact')} | {ratio('mem_ratio_to_fast_tesla')} | "
                f"{ratio('speedup_vs_repblend_authors')} | {err_s} |"
            )
        lines.append("")
    return "\n".join(lines)


def format_accounting_table(records: list[dict]) -> str:
    """Markdown table per configuration: the memory a device would see (state, peak of the
    tensors saved for backward, their sum as the predicted device peak; the measured peak beside
    it) and the step's FLOP rate against the machine's matmul rate (docs in
    :mod:`repblend_fast.bench.memory` and :mod:`repblend_fast.bench.flops`). Records without
    accounting (no warm-up, skipped) are left out; empty when none has it."""
    lines: list[str] = []
    for cfg in dict.fromkeys(r["config"] for r in records):
        rows = [r for r in records if r["config"] == cfg and "predicted_peak_mib" in r]
        if not rows:
            continue
        lines.append(f"**{cfg}** — memory a device would see, and the distance to the limit")
        lines.append("")
        lines.append(
            "| provider | meta-grad | precision | settings | state MiB | saved for backward, "
            "peak MiB | predicted device peak MiB | measured peak MiB (total) | GFLOP/iter "
            "| GFLOP/s | matmul GFLOP/s | fraction of matmul rate |"
        )
        lines.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            rate = (
                r.get("matmul_bf16_flops_per_s")
                if r.get("autocast") == "bf16"
                else r.get("matmul_fp32_flops_per_s")
            )
            step = r.get("step_flops_per_s")
            frac = r.get("peak_fraction")
            lines.append(
                f"| {r['provider']} | {r['meta_grad']} | {precision_text(r)} | "
                f"{_settings_text(r)} | {r['state_mib']:.0f} | {r['saved_peak_mib']:.0f} | "
                f"{r['predicted_peak_mib']:.0f} | {r.get('peak_total_mib', float('nan')):.0f} | "
                f"{r['flops'] / 1e9:.1f} | {step / 1e9 if step else float('nan'):.1f} | "
                f"{rate / 1e9 if rate else float('nan'):.0f} | "
                f"{f'{frac:.1%}' if frac is not None else '–'} |"
            )
        lines.append("")
    return "\n".join(lines)
