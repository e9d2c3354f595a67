"""A folder of the research scripts' expert buffers, written into an expert store.

The files are read and checked by :mod:`repblend_fast.compat.buffers` (paired by number, every
tensor's shape checked, ``torch.load(weights_only=True)`` one pair at a time); this module writes
them with the :class:`~repblend_fast.experts.store.StoreWriter` under a manifest that
:meth:`TrajectoryStore.load` accepts. An interrupted import continues where it stopped: finished
experts are kept, and their pairs are not read again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# ``buffers._experts_of`` is looked up on the module at call time, so a stand-in set there is used.
from repblend_fast.compat import buffers
from repblend_fast.compat.buffers import (
    AuthorsBufferError,
    BufferLayout,
    ImportReport,
    find_buffer_pairs,
    scan_authors_buffers,
)
from repblend_fast.config import TEMPERATURE
from repblend_fast.experts.store import (
    FORMAT_VERSION,
    MANIFEST,
    MODALITIES,
    StoreWriter,
    snapshot_key,
)
from repblend_fast.models.heads import HeadSpec

__all__ = ["import_authors_buffers"]


def _expert_seed(pair_key: str, index: int) -> int:
    """A per-expert identifier bound to its source files (the store's ``expert_seeds``): a
    finished expert file is reused only for the same source expert."""
    digest = hashlib.sha256(f"authors-expert:{pair_key}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def import_authors_buffers(
    src: str | os.PathLike,
    out: str | os.PathLike | None,
    fmt: str,
    layout: BufferLayout,
    *,
    image_encoder: str,
    text_encoder: str,
    epochs: int | None = None,
    lr_img: float = 0.1,
    lr_txt: float = 0.1,
    dataset: str = "unknown",
    dry_run: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> ImportReport:
    """Import a research buffer folder into an expert store at ``out``.

    First every pair is scanned (memory-mapped: structure, expert counts and every tensor's
    shape against ``layout``), so a bad file fails before anything is written and the manifest is
    known in full; then pairs are copied one at a time. The store's manifest is one
    :meth:`TrajectoryStore.load` accepts: method ``repblend`` (two heads) or ``lors`` (image
    encoder + text head, for ``--method lors`` and ``mtt-vl``), the layouts of ``layout``, the
    encoder ids ``image_encoder`` / ``text_encoder`` (what ``repblend-fast distill`` computes for
    the encoders it loads, so it accepts the store), the experts' learning rates ``lr_img`` /
    ``lr_txt`` (their buffer script's ``--lr_teacher_*``, which the files do not hold) and
    ``source`` (each pair's file names, a hash of their sizes and modification times, and
    expert count).

    ``epochs``: store snapshots 0..epochs (default: all that every expert has). Resumable: an
    interrupted import, rerun with the same arguments, keeps the expert files it finished and
    does not read their pairs again. A finished store built from other files or settings is
    replaced only with ``overwrite``. ``dry_run`` returns the scan without writing anything.
    """
    scan = scan_authors_buffers(src, fmt, layout)
    last = scan.epochs[-1] if epochs is None else int(epochs)
    if last < 0:
        raise AuthorsBufferError(f"epochs must be >= 0, got {last}")
    if last > scan.epochs[-1]:
        raise AuthorsBufferError(
            f"{src}: epochs {last} asked, but some experts stop at epoch {scan.epochs[-1]}; "
            f"lower --epochs to at most {scan.epochs[-1]}"
        )
    kept = list(range(last + 1))
    scan.epochs = kept
    if dry_run:
        return scan
    out = Path(out)
    manifest = _import_manifest(
        layout, fmt, kept, image_encoder, text_encoder, lr_img, lr_txt, dataset, scan
    )
    _clear_other_store(out, manifest, overwrite)
    report = ImportReport(scan.source, out, fmt, epochs=kept, shapes=scan.shapes)
    want = {snapshot_key(m, t) for m in MODALITIES for t in kept}
    pairs = find_buffer_pairs(src)
    from tqdm.auto import tqdm

    writer = StoreWriter(out, manifest, resume=True)
    try:
        index = 0
        for pair, info in tqdm(
            list(zip(pairs, scan.pairs)),
            disable=not progress,
            desc=f"import {fmt} buffers",
            unit="pair",
        ):
            seeds = [_expert_seed(info["key"], j) for j in range(info["experts"])]
            reuse = [writer.reusable(index + j, s, want) is not None for j, s in enumerate(seeds)]
            fresh = 0
            if all(reuse):  # finished by an earlier run: the source pair is not read again
                for j, s in enumerate(seeds):
                    writer.add(index + j, s, [])
            else:
                for e in buffers._experts_of(pair, layout, last):
                    j = e.index
                    if reuse[j]:
                        writer.add(index + j, seeds[j], [])
                        continue
                    snaps = {snapshot_key("image", t): e.image[t] for t in kept}
                    snaps.update({snapshot_key("text", t): e.text[t] for t in kept})
                    writer.add(index + j, seeds[j], [], snaps)
                    fresh += 1
            index += info["experts"]
            report.imported += fresh
            report.reused += info["experts"] - fresh
            report.pairs.append({**info, "imported": fresh})
        writer.finish()
    finally:
        close = getattr(writer, "close", None)
        if close is not None:
            close()
    return report


def _recipe_matches(path: Path, manifest: dict) -> bool:
    """Whether the finished store at ``path`` was imported with exactly ``manifest``'s
    settings and source (every field this import writes up front is equal)."""
    try:
        old = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(old, dict) and all(old.get(k) == v for k, v in manifest.items())


def _clear_other_store(out: Path, manifest: dict, overwrite: bool) -> None:
    """Refuse (or, with ``overwrite``, demote) a finished store at ``out`` built otherwise."""
    if not (out / MANIFEST).is_file() or _recipe_matches(out, manifest):
        return
    if not overwrite:
        raise AuthorsBufferError(
            f"{out} holds a finished expert store built from other files or settings; pass "
            "--overwrite to replace it, or choose another --out"
        )
    # Without the manifest the folder is an unfinished store: expert files whose recipe hash
    # differs are rewritten by the writer.
    (out / MANIFEST).unlink()


def _import_manifest(
    layout: BufferLayout,
    fmt: str,
    kept: list[int],
    image_encoder: str,
    text_encoder: str,
    lr_img: float,
    lr_txt: float,
    dataset: str,
    scan: ImportReport,
) -> dict:
    """The manifest of an imported store (everything but what the writer adds at the end)."""
    layouts = layout.manifest_layouts()
    d_img = layout.image.d_in if isinstance(layout.image, HeadSpec) else layout.text.dim
    return {
        "format_version": FORMAT_VERSION,
        "method": layout.method,
        "num_experts": scan.num_experts,
        "epochs": kept,
        "epochs_requested": kept[-1],
        "epochs_trained": kept[-1],
        "modalities": layouts,
        "numel": {m: layouts[m]["numel"] for m in MODALITIES},
        "image_encoder": image_encoder,
        "text_encoder": text_encoder,
        "d_img": int(d_img),
        "d_txt": int(layout.text.d_in),
        "dim": int(layout.text.dim),
        "dataset_fingerprint": f"authors:{fmt}:{dataset}",
        # Their buffer scripts train with s = exp(log(1/0.07)) and symmetric InfoNCE.
        "logit_scale": 1 / TEMPERATURE,
        "loss": "infonce",
        "train": {
            "optimizer": "sgd",
            "lr_img": float(lr_img),
            "lr_txt": float(lr_txt),
            "momentum": 0.0,
            "weight_decay": 0.0,
            "dropout": 0.1,
            "imported_from": fmt,
        },
        "source": {
            "format": fmt,
            "pairs": [{k: p[k] for k in ("n", "img", "txt", "key", "experts")} for p in scan.pairs],
        },
    }
