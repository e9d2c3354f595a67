"""The demo's evaluation stages: every distilled set and every baseline under the
docs/algorithm.md §8 protocol, and the modality-collapse diagnostics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from repblend_fast.demo.settings import LABELS
from repblend_fast.demo.state import DemoRun


# ----------------------------------------------------------------------------- evaluation
def stage_evaluate(run: DemoRun) -> None:
    """docs/algorithm.md §8 evaluation of every distilled set and every baseline."""
    _evaluate_distilled_sets(run)
    _evaluate_subsets(run)
    _evaluate_full(run)


def eval_protocol(run: DemoRun, method: str) -> dict[str, Any]:
    """The evaluation protocol of ``method``'s set (baselines use RepBlend's)."""
    s = run.settings
    return {
        "test": run.ftest,
        "dim": s.dim,
        "epochs": s.eval_epochs,
        "eval_every": s.every(method),
        "logit_scale": 1.0 / s.eval_temperature,
    }


def _evaluate_distilled_sets(run: DemoRun) -> None:
    from repblend_fast.evaluate import evaluate_distilled_set

    s = run.settings
    for method, d in run.distilled.items():
        cfg = run.configs[method]
        run.clock.note(f"evaluating {LABELS[method]} ({s.num_eval} seeds)")
        caps, sims = nearest_captions(d.texts, run.ftrain.txt, run.train.captions)
        entry = {
            "label": LABELS[method],
            "kind": "distilled",
            "pairs": int(d.texts.shape[0]),
            "distilled": f"{method}/distilled.safetensors",
            "nearest_captions": caps,
            "nearest_similarity": sims,
        }
        try:
            res, img = evaluate_distilled_set(
                d,
                encoders=run.enc,
                size=run.size,
                num_eval=s.num_eval,
                loss=cfg.loss,
                eps=cfg.eps,
                **eval_protocol(run, method),
            )
        except ValueError as exc:  # e.g. a learned lr that went negative: report, go on
            run.methods[method] = {**entry, "error": str(exc), "note": f"evaluation failed: {exc}"}
            run.clock.note(f"{LABELS[method]} evaluation failed: {exc}")
            continue
        run.sets[method] = (img, d.texts.float(), d.similarity, d.eta_img, d.eta_txt)
        resized = run.sizes[method] != run.size
        run.methods[method] = {
            **entry,
            **res,
            "note": (
                f"distilled set; fresh heads trained with {cfg.loss.upper()} against its "
                "learned similarity S at its learned learning rates"
                + (f"; images resized {run.sizes[method]}→{run.size} px" if resized else "")
            ),
        }


_SUBSET_NOTES = {
    "random": "{n} random real pairs (distinct images, a new subset per seed), ",
    "random_infonce": "{n} random real pairs (distinct images, a new subset per seed), ",
    "kcenter": "{n} real pairs chosen by greedy k-center on joint normalised image+text features "
    "(random start and caption draw per seed), ",
    "herding": "{n} real pairs chosen by herding (greedy mean matching) on joint normalised "
    "image+text features (caption draw per seed), ",
}


def _evaluate_subsets(run: DemoRun) -> None:
    """Random subsets (a different subset per evaluation seed, so the spread includes the
    subset's) with two protocols — the distilled sets' own (their loss, S = I, η at its initial
    value) and docs/design.md §6's calibration (symmetric InfoNCE, lr 0.1) — and the k-center and
    herding coresets (joint image+text feature space) with the InfoNCE protocol."""
    from repblend_fast.coresets import herding_subset, kcenter_subset, random_subset
    from repblend_fast.evaluate import evaluate_distilled
    from repblend_fast.stats import mean_std

    s, rb = run.settings, run.configs["repblend"]
    n = rb.pairs
    for name, loss, lr, select in (
        ("random", rb.loss, rb.lr_init, random_subset),
        ("random_infonce", "infonce", 0.1, random_subset),
        ("kcenter", "infonce", 0.1, kcenter_subset),
        ("herding", "infonce", 0.1, herding_subset),
    ):
        run.clock.note(f"evaluating {LABELS[name]} ({s.num_eval} subsets of {n} pairs)")
        per_seed = []
        for k in range(s.num_eval):
            img, txt, _ = select(run.ftrain, n, seed=s.seed + k)
            if name == "random" and k == 0:
                run.sets["random"] = (img, txt, None, lr, lr)
            r = evaluate_distilled(
                img,
                txt,
                None,
                lr_img=lr,
                lr_txt=lr,
                seeds=[k],
                loss=loss,
                eps=rb.eps,
                **eval_protocol(run, "repblend"),
            )
            per_seed.append({**r["per_seed"][0], "subset_seed": s.seed + k})
        protocol = (
            f"{loss.upper()} vs identity targets at lr {lr:g} (= η init): the distilled sets' "
            "evaluation with the learned parts removed"
            if name == "random"
            else f"symmetric InfoNCE at lr {lr:g} (docs/design.md §6's protocol)"
        )
        run.methods[name] = {
            "label": LABELS[name],
            "kind": "baseline",
            "pairs": n,
            "per_seed": per_seed,
            "best": mean_std([p["best"] for p in per_seed]),
            "last": mean_std([p["last"] for p in per_seed]),
            "lr_img": lr,
            "lr_txt": lr,
            "note": _SUBSET_NOTES[name].format(n=n) + protocol,
        }


def _evaluate_full(run: DemoRun) -> None:
    from repblend_fast.evaluate import evaluate_full_data

    s = run.settings
    run.clock.note(f"evaluating {LABELS['full']} ({s.num_eval} seeds, {s.full_epochs} epochs)")
    full = evaluate_full_data(
        run.ftrain,
        run.ftest,
        dim=s.dim,
        epochs=s.full_epochs,
        num_eval=s.num_eval,
        logit_scale=1.0 / s.eval_temperature,
    )
    calibration = (
        " (docs/design.md §6 calibration: 39.9 ± 0.7)" if run.train.name == "emoji" else ""
    )
    run.methods["full"] = {
        "label": LABELS["full"],
        "kind": "baseline",
        "pairs": int(run.ftrain.txt.shape[0]),
        **full,
        "note": f"every training pair, symmetric InfoNCE, SGD lr 0.1, {s.full_epochs} normal "
        "epochs" + calibration,
    }


def nearest_captions(
    texts: torch.Tensor, caption_feats: torch.Tensor, captions: Sequence[str]
) -> tuple[list[str], list[float]]:
    """For each distilled text ``[N, d_t]``, the caption whose embedding (``[M, d_t]``) is most
    cosine-similar, and that cosine."""
    import torch.nn.functional as F

    a = F.normalize(texts.float(), dim=-1)
    b = F.normalize(caption_feats.float().to(a.device), dim=-1)
    sim, idx = (a @ b.T).max(dim=1)
    return [captions[int(i)] for i in idx], [round(float(s), 4) for s in sim]


# ----------------------------------------------------------------------------- diagnostics
def stage_diagnostics(run: DemoRun) -> dict[str, torch.Tensor]:
    """Collapse diagnostics of the random subset and each distilled set, each embedded by heads
    trained on it (seed 0); returns the embeddings."""
    from repblend_fast.evaluate import embed, train_on_pairs
    from repblend_fast.metrics import collapse_diagnostics

    s, rb = run.settings, run.configs["repblend"]
    emb: dict[str, torch.Tensor] = {}
    for name in ("random", "lors", "repblend"):
        if name not in run.sets:
            continue
        img, txt, target, lr_i, lr_t = run.sets[name]
        cfg = run.configs.get(name, rb)
        res = train_on_pairs(
            img,
            txt,
            target,
            lr_img=lr_i,
            lr_txt=lr_t,
            dim=s.dim,
            seed=0,
            epochs=s.eval_epochs,
            loss=cfg.loss if name != "random" else rb.loss,
            eps=cfg.eps,
            logit_scale=1.0 / s.eval_temperature,
        )
        u = embed(res.img_params, img, res.img_spec)
        v = embed(res.txt_params, txt, res.txt_spec)
        run.diagnostics[name] = collapse_diagnostics(u, v)
        emb[f"{name}.image"], emb[f"{name}.text"] = u.float(), v.float()
    return emb
