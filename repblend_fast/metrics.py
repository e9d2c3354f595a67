"""Retrieval metrics (docs/algorithm.md §8) and modality-collapse diagnostics (docs/algorithm.md
§9).

Ranks are computed vectorised as *the number of strictly greater scores* (no sorting): the rank of
the ground truth is 0 when nothing scores higher, and ties are resolved in favour of the ground
truth. Recalls are percentages (0-100), like the reference ``itm_eval``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

RECALL_KS = (1, 5, 10)


def _check_cap2img(cap2img, n_img: int, n_cap: int, device) -> torch.Tensor:
    c2i = torch.as_tensor(cap2img, dtype=torch.long, device=device).reshape(-1)
    if c2i.numel() != n_cap:
        raise ValueError(f"cap2img has {c2i.numel()} entries for {n_cap} captions")
    if n_cap == 0 or n_img == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if int(c2i.min()) < 0 or int(c2i.max()) >= n_img:
        raise ValueError(f"cap2img values must lie in [0, {n_img})")
    if torch.bincount(c2i, minlength=n_img).min() == 0:
        raise ValueError("every image needs at least one caption (cap2img misses some images)")
    return c2i


def retrieval_ranks(
    scores: torch.Tensor, cap2img, *, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth ranks from a score matrix.

    Args:
        scores: ``[N_img, N_cap]``, higher = more similar.
        cap2img: ``[N_cap]`` image index of each caption.
        chunk_size: rows/columns per block, bounding the temporary boolean block at
            ``chunk_size × max(N_img, N_cap)``.

    Returns ``(tr_rank [N_img], ir_rank [N_cap])`` (long): for image ``i`` the number of captions
    scoring strictly above its best-scoring own caption (so rank < K iff *any* of its captions is
    in the top K); for caption ``j`` the number of images scoring strictly above its image.
    A NaN ground-truth score gets the worst rank (``N_cap`` resp. ``N_img``).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [N_img, N_cap], got shape {tuple(scores.shape)}")
    n_img, n_cap = scores.shape
    c2i = _check_cap2img(cap2img, n_img, n_cap, scores.device)
    gt = scores[c2i, torch.arange(n_cap, device=scores.device)]  # [N_cap] own-image score
    best = torch.full((n_img,), float("-inf"), dtype=scores.dtype, device=scores.device)
    best = best.scatter_reduce(0, c2i, gt, reduce="amax")  # [N_img] best own-caption score
    tr = torch.cat(
        [
            (scores[s : s + chunk_size] > best[s : s + chunk_size, None]).sum(1)
            for s in range(0, n_img, chunk_size)
        ]
    )
    ir = torch.cat(
        [
            (scores[:, s : s + chunk_size] > gt[None, s : s + chunk_size]).sum(0)
            for s in range(0, n_cap, chunk_size)
        ]
    )
    # A NaN ground-truth score (a diverged model) ranks last instead of "nothing is greater".
    tr = torch.where(torch.isnan(best), torch.full_like(tr, n_cap), tr)
    ir = torch.where(torch.isnan(gt), torch.full_like(ir, n_img), ir)
    return tr, ir


def recalls_from_ranks(
    tr_rank: torch.Tensor, ir_rank: torch.Tensor, ks: Sequence[int] = RECALL_KS
) -> dict[str, float]:
    """``{"TR@K", "IR@K" for K in ks, "TR_mean", "IR_mean", "mean"}`` in percent."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"TR@{k}"] = 100.0 * (tr_rank < k).double().mean().item()
    for k in ks:
        out[f"IR@{k}"] = 100.0 * (ir_rank < k).double().mean().item()
    out["TR_mean"] = sum(out[f"TR@{k}"] for k in ks) / len(ks)
    out["IR_mean"] = sum(out[f"IR@{k}"] for k in ks) / len(ks)
    out["mean"] = 0.5 * (out["TR_mean"] + out["IR_mean"])
    return out


def retrieval_metrics(
    scores: torch.Tensor, cap2img, *, ks: Sequence[int] = RECALL_KS, chunk_size: int = 4096
) -> dict[str, float]:
    """TR@K (image→text), IR@K (text→image), their means and the overall mean, in percent.

    Args:
        scores: ``[N_img, N_cap]`` score matrix (rows = images).
        cap2img: ``[N_cap]`` image index of each caption (images may have several captions).

    TR@K: share of images with *any* of their captions among the K best-scoring captions.
    IR@K: share of captions whose image is among the K best-scoring images.
    ``TR_mean``/``IR_mean`` average over ``ks``; ``mean`` = (TR_mean + IR_mean) / 2 (the
    reference's ``r_mean``).
    """
    tr, ir = retrieval_ranks(scores, cap2img, chunk_size=chunk_size)
    return recalls_from_ranks(tr, ir, ks)


def retrieval_metrics_from_embeddings(
    img_emb: torch.Tensor,
    txt_emb: torch.Tensor,
    cap2img,
    *,
    logit_scale: float = 1.0,
    ks: Sequence[int] = RECALL_KS,
    chunk_size: int = 4096,
) -> dict[str, float]:
    """:func:`retrieval_metrics` of ``s · norm(img_emb) norm(txt_emb)ᵀ``.

    ``img_emb`` ``[N_img, D]``, ``txt_emb`` ``[N_cap, D]``. The score matrix is formed once (COCO
    5k × 25k fp32 = 0.5 GB); use :func:`retrieval_ranks` on blocks for larger sets.
    """
    u = F.normalize(img_emb.float(), dim=-1)
    v = F.normalize(txt_emb.float(), dim=-1)
    return retrieval_metrics(logit_scale * (u @ v.T), cap2img, ks=ks, chunk_size=chunk_size)


# ------------------------------------------------------------------------- diagnostics
def intra_modal_similarity(emb: torch.Tensor) -> float:
    """Mean cosine similarity over ordered pairs ``i ≠ j`` of the rows of ``emb`` ``[N, D]``.

    Computed without the N×N matrix: with ``ẑ_i = z_i/‖z_i‖`` and ``s = Σ ẑ_i``,
    ``Σ_{i≠j} cos = ‖s‖² − Σ‖ẑ_i‖²``, divided by ``N(N−1)``. Needs ``N ≥ 2``.
    """
    if emb.dim() != 2 or emb.shape[0] < 2:
        raise ValueError(f"emb must be [N >= 2, D], got shape {tuple(emb.shape)}")
    z = F.normalize(emb.double(), dim=-1)
    n = z.shape[0]
    s = z.sum(0)
    return ((s @ s - (z * z).sum()) / (n * (n - 1))).item()


def modality_gap(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> float:
    """``‖mean_i norm(img_i) − mean_j norm(txt_j)‖₂`` (Liang et al., 2022): the distance between
    the centroids of the L2-normalised image ``[N, D]`` and text ``[M, D]`` embeddings."""
    if img_emb.dim() != 2 or txt_emb.dim() != 2 or img_emb.shape[1] != txt_emb.shape[1]:
        raise ValueError(
            f"need [N, D] and [M, D] embeddings, got {tuple(img_emb.shape)} and "
            f"{tuple(txt_emb.shape)}"
        )
    gi = F.normalize(img_emb.double(), dim=-1).mean(0)
    gt = F.normalize(txt_emb.double(), dim=-1).mean(0)
    return (gi - gt).norm().item()


def concentration_ratio(emb: torch.Tensor, k: int = 1) -> float:
    """Share of the variance of the L2-normalised embeddings that lies in the top-``k`` principal
    components:

    ``CR_k = (σ_1² + … + σ_k²) / Σ_i σ_i²``, where ``σ_i`` are the singular values of
    ``Ẑ − mean(Ẑ)``, ``Ẑ`` = row-normalised ``emb`` ``[N, D]``.

    ``CR`` is 1 when all embeddings vary along a single direction (collapsed to a line or a point —
    the latter, with zero variance, is reported as 1.0) and ``k / min(N−1, D)`` for an isotropic
    cloud. Our own definition: the paper's (Random 0.42 / LoRS 0.95 / RepBlend 0.57) is not public.
    """
    if emb.dim() != 2 or emb.shape[0] < 2:
        raise ValueError(f"emb must be [N >= 2, D], got shape {tuple(emb.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    z = F.normalize(emb.double(), dim=-1)
    sv2 = torch.linalg.svdvals(z - z.mean(0)).pow(2)
    total = sv2.sum()
    if total <= 1e-24:
        return 1.0
    return (sv2[:k].sum() / total).item()


def update_norm_ratio(theta_T: torch.Tensor, theta_0: torch.Tensor) -> float:
    """``‖θ_T − θ_0‖ / ‖θ_0‖`` of flat parameter vectors (any equal shapes), in float64."""
    if theta_T.shape != theta_0.shape:
        raise ValueError(f"shape mismatch {tuple(theta_T.shape)} vs {tuple(theta_0.shape)}")
    a, b = theta_T.double(), theta_0.double()
    den = b.norm()
    if den == 0:
        raise ValueError("‖θ_0‖ = 0: the update norm ratio is undefined")
    return ((a - b).norm() / den).item()


def collapse_diagnostics(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> dict[str, float]:
    """All docs/algorithm.md §9 embedding diagnostics for one set: intra-modal similarity and
    concentration
    ratio (top-1 PC) per modality, and the modality gap."""
    return {
        "intra_sim_img": intra_modal_similarity(img_emb),
        "intra_sim_txt": intra_modal_similarity(txt_emb),
        "concentration_img": concentration_ratio(img_emb),
        "concentration_txt": concentration_ratio(txt_emb),
        "modality_gap": modality_gap(img_emb, txt_emb),
    }
