"""Distilled sets in the research scripts' checkpoint format, both ways.

RepBlend's and LoRS's distillation scripts save ``distilled_<it>.pt`` with ``torch.save`` of a dict
that their evaluation (and their ``--resume_from``) reads back:

==================== ===========================================================================
``image``            ``[N, 3, H, W]`` synthetic images in the encoder's input space
``text``             ``[N, d_t]`` synthetic text embeddings
``similarity_params`` the similarity generator's parameters in its order: low-rank
                     ``[diag_weight [N], left [N, r], right [N, r]]`` (``S = diag(a) + L Rᵀ α/r``),
                     full ``[sim_mat [N, N]]``
``similarity_mat``   ``[N, N]`` the full target S (rows = images)
``syn_lr_img``,      0-d tensors, the learned student learning rates
``syn_lr_txt``
==================== ===========================================================================

Our low-rank generator keeps the same three tensors under the names ``a``, ``L``, ``R`` (same
formula, same initialisation), the full one ``S``; identity targets (MTT-VL) have no parameters,
so the exported file omits ``similarity_params`` (their resume code warns and continues) and
carries ``similarity_mat = I``. :func:`import_distilled` reads such files with
``weights_only=True`` only; ``import_distilled(export_authors_checkpoint(d, f))`` gives back ``d``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from repblend_fast.compat.buffers import AuthorsBufferError, safe_torch_load
from repblend_fast.engine.distill import DistilledSet

__all__ = [
    "AUTHORS_CHECKPOINT_KEYS",
    "authors_checkpoint_dict",
    "export_authors_checkpoint",
    "import_distilled",
]

AUTHORS_CHECKPOINT_KEYS = (
    "image",
    "text",
    "similarity_params",
    "similarity_mat",
    "syn_lr_img",
    "syn_lr_txt",
)
# Our generator parameter names in their generator's order.
_SIM_ORDER = {3: ("a", "L", "R"), 1: ("S",)}


def authors_checkpoint_dict(distilled: DistilledSet) -> dict:
    """The dict their scripts save for ``distilled`` (CPU tensors, their key names)."""
    n = distilled.images.shape[0]
    names = tuple(distilled.sim_params)
    if names and set(names) not in ({"a", "L", "R"}, {"S"}):
        raise ValueError(
            f"similarity parameters {sorted(names)}: expected a, L, R (low-rank) or S (full)"
        )
    order = _SIM_ORDER[3] if "a" in names else _SIM_ORDER[1]
    sim_mat = distilled.similarity
    if sim_mat is None:
        sim_mat = torch.eye(n, dtype=distilled.texts.dtype)
    out = {
        "image": distilled.images.detach().cpu(),
        "text": distilled.texts.detach().cpu(),
        "similarity_mat": sim_mat.detach().cpu(),
        "syn_lr_img": torch.tensor(float(distilled.eta_img), dtype=torch.float32),
        "syn_lr_txt": torch.tensor(float(distilled.eta_txt), dtype=torch.float32),
    }
    if names:
        out["similarity_params"] = [distilled.sim_params[k].detach().cpu() for k in order]
    return out


def export_authors_checkpoint(distilled: DistilledSet, out: str | os.PathLike) -> Path:
    """Write ``distilled`` as their ``distilled_<it>.pt`` (``torch.save`` of plain tensors and a
    list, so ``torch.load(weights_only=True)`` reads it); atomic. Returns the path."""
    from repblend_fast.io import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(authors_checkpoint_dict(distilled), buf)
    return atomic_write_bytes(buf.getvalue(), out)


def _tensor(ckpt: dict, key: str, path: Path, dims: int) -> torch.Tensor:
    v = ckpt.get(key)
    if not isinstance(v, torch.Tensor) or v.dim() != dims:
        got = f"shape {list(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
        raise AuthorsBufferError(f"{path}: {key!r} must be a {dims}-D tensor, found {got}")
    return v


def import_distilled(path: str | os.PathLike) -> DistilledSet:
    """Read their ``distilled_<it>.pt`` (``weights_only=True``) into a :class:`DistilledSet`.

    ``similarity`` is their ``similarity_mat``; the generator parameters are named as ours
    (``a``, ``L``, ``R`` or ``S``). A file without ``similarity_params`` whose matrix is the
    identity comes back with identity targets (``similarity=None``), as exported for MTT-VL.
    Raises :class:`AuthorsBufferError` naming the file and the key for anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise AuthorsBufferError(f"{path}: no such file (expected a distilled_<it>.pt)")
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict):
        raise AuthorsBufferError(
            f"{path}: holds a {type(ckpt).__name__}, not the dict of a distilled_<it>.pt"
        )
    missing = [k for k in AUTHORS_CHECKPOINT_KEYS if k not in ckpt and k != "similarity_params"]
    if missing:
        raise AuthorsBufferError(
            f"{path}: lacks {missing}; a distilled_<it>.pt holds {list(AUTHORS_CHECKPOINT_KEYS)}"
        )
    images = _tensor(ckpt, "image", path, 4)
    texts = _tensor(ckpt, "text", path, 2)
    n = images.shape[0]
    if texts.shape[0] != n:
        raise AuthorsBufferError(f"{path}: {n} images but {texts.shape[0]} texts")
    sim_mat = _tensor(ckpt, "similarity_mat", path, 2)
    if tuple(sim_mat.shape) != (n, n):
        raise AuthorsBufferError(
            f"{path}: similarity_mat has shape {list(sim_mat.shape)}, expected [{n}, {n}]"
        )
    etas = []
    for key in ("syn_lr_img", "syn_lr_txt"):
        v = ckpt[key]
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            etas.append(float(v.reshape(())))
        elif isinstance(v, (int, float)):
            etas.append(float(v))
        else:
            raise AuthorsBufferError(f"{path}: {key!r} must be a scalar, found {type(v).__name__}")
    params = ckpt.get("similarity_params")
    sim_params: dict[str, torch.Tensor] = {}
    similarity: torch.Tensor | None = sim_mat
    if params is None or (isinstance(params, (list, tuple)) and not params):
        if torch.equal(sim_mat, torch.eye(n, dtype=sim_mat.dtype)):
            similarity = None
    else:
        if not isinstance(params, (list, tuple)) or len(params) not in _SIM_ORDER:
            raise AuthorsBufferError(
                f"{path}: similarity_params must be a list of 3 (low-rank) or 1 (full) tensors"
            )
        want = {"a": (n,), "L": (n, -1), "R": (n, -1), "S": (n, n)}
        for name, t in zip(_SIM_ORDER[len(params)], params):
            shape = want[name]
            ok = isinstance(t, torch.Tensor) and t.dim() == len(shape)
            ok = ok and all(w in (-1, s) for w, s in zip(shape, t.shape))
            if not ok:
                raise AuthorsBufferError(
                    f"{path}: similarity parameter {name} has the wrong shape "
                    f"({list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__})"
                )
            sim_params[name] = t.detach().clone()
        if len(params) == 3 and sim_params["L"].shape != sim_params["R"].shape:
            raise AuthorsBufferError(f"{path}: similarity left/right factors differ in shape")
    return DistilledSet(
        images.detach().clone(),
        texts.detach().clone(),
        etas[0],
        etas[1],
        None if similarity is None else similarity.detach().clone(),
        sim_params,
    )
