"""The quality table: distillation methods and coreset baselines at several budgets and seeds.

One command runs (or continues) the study and one renders it::

    python benchmarks/quality/run.py --out benchmarks/results/quality/emoji          # run rows
    python benchmarks/quality/run.py --out benchmarks/results/quality/emoji --report # table + plot

Every row — (method, budget N, distillation seed) — is one JSON file in ``--out``; a row whose file
exists is skipped, so the study runs in as many sittings as it needs (``--methods``, ``--budgets``,
``--seeds`` pick a subset). A row records its settings, its evaluation (mean over the evaluation
seeds, and per seed), its CPU and wall time, what the guard did (the ``guard`` block of the
run's ``summary.json``: rejections, rollbacks, rows clipped, gradient checks, warnings) and, for
a run that stops (collapse, non-finite loss), the reason: no configuration is dropped silently.

Methods:

============================  ===================================================================
``random``, ``herding``,      N real pairs (coresets.py), one subset per seed; evaluated with the
``kcenter``                   symmetric InfoNCE at lr 0.1 (the stronger of the demo's two
                              random-subset protocols)
``full``                      every training pair (the upper reference; filed under each N
                              asked for, whatever N): symmetric InfoNCE, lr 0.1, ``FULL_EPOCHS``
                              normal epochs as the demo's full-data baseline; distillation seed
                              ``s`` uses evaluation seeds ``3s .. 3s + 2``
``repblend-exact``            the ``demo`` preset: RepBlend, exact meta-gradient, guard on
``repblend-tesla``            the same with the paper's TESLA meta-gradient
``repblend-noblend``          RepBlend without representation blending
``repblend-asym``             RepBlend with the image encoder as the image-side student
                              (``symmetric=False``; LoRS experts; the LoRS budget)
``lors``, ``mtt-vl``          LoRS (learned low-rank targets) and MTT-VL (identity targets),
                              the image encoder as student (the LoRS budget)
============================  ===================================================================

Distilled sets are evaluated with the docs/algorithm.md §8 protocol (fresh heads on the frozen
encoders, best epoch among the method's research-code cadence, temperature 0.07). Rows of
encoder-student methods run a reduced budget (``LORS_BUDGET``): each of their iterations
differentiates through training steps of the whole image encoder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
CORESETS = ("random", "herding", "kcenter")
DISTILLED = {
    "repblend-exact": {},
    "repblend-tesla": {"meta_grad": "tesla"},
    "repblend-noblend": {"blend": False},
    "repblend-asym": {"symmetric": False},
    "lors": {"method": "lors"},
    "mtt-vl": {"method": "mtt-vl"},
}
METHODS = (*CORESETS, "full", *DISTILLED)
FULL_EPOCHS = 10
# RepBlend rows: the demo preset at this many iterations.
REPBLEND_ITERATIONS = 300
# Encoder-student rows (LoRS, MTT-VL, asymmetric RepBlend): DistillConfig overrides, and their
# experts (the whole image encoder is trained: a forward and backward pass over every image).
LORS_BUDGET: dict[str, Any] = {"iterations": 40, "syn_steps": 4, "max_start_epoch": 1}
LORS_EXPERTS = {"num_experts": 2, "epochs": 2, "batch_size": 32}
REPBLEND_EXPERTS = {"num_experts": 5, "epochs": 2, "batch_size": 32}
NUM_EVAL = 3
DIM = 256


# ----------------------------------------------------------------------------- one row
def row_path(out: Path, method: str, n: int, seed: int) -> Path:
    return out / f"{method}_n{n}_s{seed}.json"


def _git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


class Study:
    """Data, encoders, features and expert stores shared by the rows of one run."""

    def __init__(self, dataset: str, cache_dir: str | None, progress: bool):
        from repblend_fast.data import get_dataset
        from repblend_fast.evaluate import FeaturePairs
        from repblend_fast.pipeline import (
            image_features,
            image_size_for,
            load_encoders,
            text_features,
        )

        self.dataset, self.cache_dir, self.progress = dataset, cache_dir, progress
        self.train, self.test = get_dataset(dataset, "train"), get_dataset(dataset, "test")
        self.enc = load_encoders()
        self.size = image_size_for(dataset, None, self.enc.image_info)
        kw = {"cache_dir": cache_dir}

        def pairs(ds):
            return FeaturePairs(
                image_features(ds, self.enc, self.size, **kw),
                text_features(ds, self.enc, **kw),
                ds.cap2img,
            )

        self.ftrain, self.ftest = pairs(self.train), pairs(self.test)
        self._experts: dict[str, Path] = {}

    def experts(self, kind: str) -> Path:
        """The expert store of ``kind`` (``repblend`` or ``lors``), trained once and cached."""
        if kind in self._experts:
            return self._experts[kind]
        from repblend_fast.data.cache import default_cache_dir
        from repblend_fast.methods import student_for_experts
        from repblend_fast.pipeline import train_experts

        heads = student_for_experts(kind).frozen_encoder
        recipe = REPBLEND_EXPERTS if heads else LORS_EXPERTS
        key = json.dumps(
            {"kind": kind, "data": self.train.fingerprint(), "size": self.size, **recipe},
            sort_keys=True,
        )
        root = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
        path = root / "experts" / f"study-{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        train_experts(
            self.train,
            self.enc,
            path,
            method=kind,
            dim=DIM,
            lr=0.1,
            seed=0,
            cache_dir=self.cache_dir,
            progress=self.progress,
            **recipe,
        )
        self._experts[kind] = path
        return path

    # ------------------------------------------------------------------------- rows
    def coreset_row(self, method: str, n: int, seed: int) -> dict[str, Any]:
        from repblend_fast import coresets
        from repblend_fast.evaluate import evaluate_distilled
        from repblend_fast.methods import get_method

        select = getattr(coresets, f"{method}_subset")
        img, txt, _ = select(self.ftrain, n, seed=seed)
        res = evaluate_distilled(
            img,
            txt,
            None,
            lr_img=0.1,
            lr_txt=0.1,
            test=self.ftest,
            dim=DIM,
            num_eval=NUM_EVAL,
            loss="infonce",
            eval_every=get_method("repblend").eval_every,  # RepBlend's cadence
        )
        return {"protocol": "symmetric InfoNCE, lr 0.1, identity targets", **res}

    def full_row(self, seed: int) -> dict[str, Any]:
        from repblend_fast.evaluate import evaluate_full_data

        res = evaluate_full_data(
            self.ftrain,
            self.ftest,
            dim=DIM,
            epochs=FULL_EPOCHS,
            seeds=[NUM_EVAL * seed + k for k in range(NUM_EVAL)],
        )
        return {
            "protocol": f"every training pair, symmetric InfoNCE, lr 0.1, {FULL_EPOCHS} epochs",
            "pairs_used": int(self.ftrain.txt.shape[0]),
            **res,
        }

    def distill_row(self, method: str, n: int, seed: int, workdir: Path) -> dict[str, Any]:
        from repblend_fast.config import preset
        from repblend_fast.engine.distill import DistillationStopped
        from repblend_fast.engine.guard_report import read_guard
        from repblend_fast.evaluate import evaluate_distilled_set
        from repblend_fast.pipeline import distill

        over = dict(DISTILLED[method], pairs=n, seed=seed, iterations=REPBLEND_ITERATIONS)
        cfg = preset("demo", **over)
        if not cfg.student_kind.frozen_encoder:
            cfg = preset("demo", **{**over, **LORS_BUDGET})
        store = self.experts(cfg.expert_kind)
        run_dir = workdir / f"{method}_n{n}_s{seed}"
        out: dict[str, Any] = {"config": cfg.to_dict(), "experts": str(store)}
        try:
            d = distill(
                self.train,
                self.enc,
                store,
                cfg,
                out_dir=run_dir,
                cache_dir=self.cache_dir,
                overwrite=True,
                progress=self.progress,
            )
        except DistillationStopped as exc:
            return {**out, "stopped": str(exc), "guard": read_guard(run_dir)}
        out["guard"] = read_guard(run_dir)
        res, _ = evaluate_distilled_set(
            d,
            encoders=self.enc,
            size=self.size,
            test=self.ftest,
            dim=DIM,
            num_eval=NUM_EVAL,
            loss=cfg.loss,
            eps=cfg.eps,
            eval_every=cfg.method_entry.eval_every,
        )
        return {**out, "eta_img": d.eta_img, "eta_txt": d.eta_txt, **res}


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def run_row(study: Study, method: str, n: int, seed: int, out: Path, workdir: Path) -> dict:
    load_start = _load()
    t_cpu, t_wall = time.process_time(), time.perf_counter()
    if method in CORESETS:
        body = study.coreset_row(method, n, seed)
    elif method == "full":
        body = study.full_row(seed)
    else:
        body = study.distill_row(method, n, seed, workdir)
    row = {
        "kind": "repblend_fast.quality_row",
        "dataset": study.dataset,
        "method": method,
        "pairs": n,
        "seed": seed,
        "cpu_s": round(time.process_time() - t_cpu, 1),
        "wall_s": round(time.perf_counter() - t_wall, 1),
        "threads": torch.get_num_threads(),
        "loadavg_start": load_start,  # 1, 5 and 15 min load averages before and after the row
        "loadavg_end": _load(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "git": _git_sha(),
        **body,
    }
    from repblend_fast.io import atomic_write_json

    atomic_write_json(row, row_path(out, method, n, seed))
    return row


# ----------------------------------------------------------------------------- report
def load_rows(out: Path) -> list[dict]:
    rows = []
    for p in sorted(out.glob("*_n*_s*.json")):
        r = json.loads(p.read_text(encoding="utf-8"))
        if r.get("kind") == "repblend_fast.quality_row":
            rows.append(r)
    return rows


def summarise(rows: list[dict]) -> dict[tuple[str, int], dict[str, Any]]:
    """Per (method, N): mean ± std over distillation seeds of each seed's mean over evaluation
    seeds (best epoch), the seeds, stopped runs and the mean CPU time."""
    from repblend_fast.stats import mean_std

    cells: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        c = cells.setdefault((r["method"], r["pairs"]), {"runs": [], "stopped": [], "cpu": []})
        c["cpu"].append(r["cpu_s"])
        if "best" in r:
            c["runs"].append(r["best"]["mean"])
        else:
            c["stopped"].append(r["seed"])
    for c in cells.values():
        c["summary"] = mean_std(c["runs"]) if c["runs"] else None
    return cells


def paired_differences(rows: list[dict], ref: str = "repblend-exact") -> list[dict[str, Any]]:
    """Per (method, N): ``ref`` minus the method, seed by seed, over the distillation seeds both
    ran to the end (same seed: same initial pairs and expert draws), with the mean and sample
    std of those differences (held-out mean recall, best epoch)."""
    import statistics

    best: dict[tuple[str, int, int], float] = {}
    for r in rows:
        if "best" in r:
            best[(r["method"], r["pairs"], r["seed"])] = r["best"]["mean"]["mean"]
    out = []
    for m in DISTILLED:
        if m == ref:
            continue
        for n in sorted({k[1] for k in best}):
            seeds = sorted(s for (mm, nn, s) in best if mm == m and nn == n and (ref, n, s) in best)
            if not seeds:
                continue
            d = [best[(ref, n, s)] - best[(m, n, s)] for s in seeds]
            out.append(
                {
                    "method": m,
                    "pairs": n,
                    "seeds": seeds,
                    "differences": d,
                    "mean": statistics.fmean(d),
                    "std": statistics.stdev(d) if len(d) > 1 else None,
                }
            )
    return out


def _pm(summary: dict, key: str, runs: int) -> str:
    """``mean ± std`` over distillation seeds; a single seed has no spread to show."""
    if runs < 2:
        return f"{summary['mean'][key]:.1f}"
    return f"{summary['mean'][key]:.1f} ± {summary['std'][key]:.1f}"


def report(out: Path) -> str:
    rows = load_rows(out)
    if not rows:
        raise SystemExit(f"no rows in {out}: run the study first")
    cells = summarise(rows)
    budgets = sorted({n for _, n in cells})
    lines = [
        f"Held-out mean recall (IR/TR@1/5/10) on `{rows[0]['dataset']}`: mean ± std over "
        "distillation seeds (count in brackets), each the mean over "
        f"{NUM_EVAL} evaluation seeds at the best epoch; mean CPU minutes per run below.",
        "",
        "| method | " + " | ".join(f"N = {n}" for n in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for m in METHODS:
        cols = []
        for n in budgets:
            c = cells.get((m, n))
            if c is None:
                cols.append("–")
                continue
            s = c["summary"]
            txt = f"{_pm(s, 'mean', len(c['runs']))} ({len(c['runs'])})" if s else ""
            if c["stopped"]:
                txt += f" stopped: seeds {c['stopped']}"
            cpu = sum(c["cpu"]) / len(c["cpu"]) / 60
            cols.append(f"{txt}<br>{cpu:.1f} min")
        if any(col != "–" for col in cols):
            lines.append(f"| {m} | " + " | ".join(cols) + " |")
    for k in ("IR@1", "TR@1"):
        lines += ["", f"**{k}** (same runs):", ""]
        lines.append("| method | " + " | ".join(f"N = {n}" for n in budgets) + " |")
        lines.append("|---|" + "---:|" * len(budgets))
        for m in METHODS:
            cols = []
            for n in budgets:
                c = cells.get((m, n)) or {}
                s = c.get("summary")
                cols.append(_pm(s, k, len(c["runs"])) if s else "–")
            if any(col != "–" for col in cols):
                lines.append(f"| {m} | " + " | ".join(cols) + " |")
    diffs = paired_differences(rows)
    if diffs:
        lines += [
            "",
            "**Paired differences**: repblend-exact minus the method, held-out mean recall (best "
            "epoch), seed by seed over the distillation seeds both ran; mean ± sample std.",
            "",
            "| method | N | seeds | per seed | mean ± std |",
            "|---|---:|---|---|---:|",
        ]
        for p in diffs:
            per = ", ".join(f"{x:+.1f}" for x in p["differences"])
            spread = f" ± {p['std']:.1f}" if p["std"] is not None else ""
            lines.append(
                f"| {p['method']} | {p['pairs']} | {p['seeds']} | {per} | "
                f"{p['mean']:+.1f}{spread} |"
            )
    loads = [r["loadavg_start"][0] for r in rows if r.get("loadavg_start")]
    if loads:
        lines += [
            "",
            f"Load average (1 min) at the start of the rows: {min(loads):.1f} to {max(loads):.1f}; "
            f"threads {sorted({r['threads'] for r in rows})}; {rows[0]['machine']}.",
        ]
    text = "\n".join(lines) + "\n"
    from repblend_fast.io import atomic_write_text

    atomic_write_text(text, out / "table.md")
    plot(cells, budgets, out / "quality.png", rows[0]["dataset"])
    return text


def plot(cells, budgets, path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=100)
    for m in METHODS:
        xs, ys, es = [], [], []
        for n in budgets:
            s = (cells.get((m, n)) or {}).get("summary")
            if s:
                xs.append(n)
                ys.append(s["mean"]["mean"])
                es.append(s["std"]["mean"])
        if xs:
            style = "--" if m in CORESETS else "-"
            ax.errorbar(xs, ys, yerr=es, marker="o", linestyle=style, capsize=3, label=m)
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xticks([], minor=True)  # the log axis's own minor labels would overprint N
    ax.set_xlabel("synthetic pairs N (log scale)")
    ax.set_ylabel("held-out mean recall (%)")
    ax.set_title(f"Distillation methods and coresets on {dataset} (mean ± std over seeds)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, help="folder of the row files (created)")
    ap.add_argument(
        "--dataset",
        default="emoji",
        help="emoji, or a Debian-package set: tuxpaint, openclipart, real, real-sentences "
        "(default: emoji)",
    )
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    ap.add_argument(
        "--budgets", default="99,199,499", help="comma-separated N (default: %(default)s)"
    )
    ap.add_argument("--seeds", default="0,1,2", help="distillation seeds (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    ap.add_argument("--cache-dir", default=None, help="feature and expert cache")
    ap.add_argument("--report", action="store_true", help="only render table.md and quality.png")
    ap.add_argument("--progress", action="store_true", help="progress bars")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.report:
        print(report(out))
        return 0
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        ap.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    budgets = [int(b) for b in a.budgets.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    from repblend_fast.threads import set_threads

    set_threads(a.threads)
    out.mkdir(parents=True, exist_ok=True)
    todo = [
        (m, n, s)
        for n in budgets
        for m in methods
        for s in seeds
        if not row_path(out, m, n, s).exists()
    ]
    print(f"{len(todo)} rows to run in {out}", file=sys.stderr)
    if not todo:
        return 0
    study = Study(a.dataset, a.cache_dir, a.progress)
    from repblend_fast.data.cache import default_cache_dir

    workdir = (Path(a.cache_dir) if a.cache_dir else default_cache_dir()) / "study-runs"
    for m, n, s in todo:
        t = time.perf_counter()
        row = run_row(study, m, n, s, out, workdir)
        best = row.get("best", {}).get("mean", {}).get("mean")
        what = f"{best:.1f}" if best is not None else f"stopped ({row.get('stopped', '')[:60]})"
        print(f"{m} N={n} seed {s}: {what} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
