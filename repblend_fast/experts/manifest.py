"""The expert store's on-disk schema: file names, the manifest's fields and their validation.

Layout of a store directory:

* ``expert_{i:03d}.safetensors``: both modalities' flat parameter snapshots of expert ``i`` as 1-D
  tensors ``image/epoch_{t}`` and ``text/epoch_{t}`` (one file, so an image trajectory can never be
  paired with another expert's text trajectory — the mismatch the LoRS scripts allow), with the
  expert's recipe hash (``config_sha``), seed and per-epoch losses in its header metadata;
* ``manifest.json``, written last: format version, the flat layout of each modality, encoder ids,
  dataset fingerprint, training recipe, its hash (``recipe_sha``) and seed, stored epochs, file
  names, expert seeds and losses, and the size and sha256 of every expert file (``integrity``).
  A directory without a manifest is an unfinished run;
* ``manifest.partial.json`` while a build is unfinished: the recipe hash and the digests of the
  expert files written so far, so that a rerun with the same settings keeps (after checking
  them) exactly those files. In a build spread over several processes (torchrun) rank 0 owns
  the lock, this record and the manifest, and every other rank ``r`` records the files it
  writes in its own ``manifest.partial.rank{r}.json``; the next writer of the folder merges
  those records into ``manifest.partial.json`` whatever its number of processes.

This module holds what both sides agree on: the names above, the manifest's description of a
flat layout (:func:`head_layout`, :func:`module_layout`), the recipe and its hash
(:func:`recipe_of`, :func:`hash_config`), the check of a manifest's fields
(:func:`validate_manifest`) and of its file records (:func:`integrity_records`). The writer is
:mod:`repblend_fast.experts.writer`, the reader :mod:`repblend_fast.experts.store`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from repblend_fast.io import FileDigest, IntegrityError
from repblend_fast.methods import STUDENT_KINDS
from repblend_fast.models.flat import FlatSpec
from repblend_fast.models.heads import HeadSpec

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "MODALITIES",
    "PARTIAL",
    "PARTIAL_RANK",
    "expert_file_name",
    "file_digests",
    "hash_config",
    "head_layout",
    "integrity_records",
    "module_layout",
    "read_json",
    "recipe_diff",
    "recipe_of",
    "snapshot_key",
    "validate_manifest",
]

FORMAT_VERSION = 1
MODALITIES = ("image", "text")
MANIFEST = "manifest.json"
PARTIAL = "manifest.partial.json"
PARTIAL_RANK = "manifest.partial.rank{}.json"  # a rank > 0's record in a distributed build
RANK_PARTIAL = re.compile(r"^manifest\.partial\.rank\d+\.json$")
EXPERT_FILE = re.compile(r"^expert_\d{3,}\.safetensors$")
# Manifest fields that describe the finished build rather than its recipe.
_BUILD_FIELDS = ("files", "losses", "expert_seeds", "integrity", "recipe_sha", "seed")
_REQUIRED = (
    "format_version",
    "method",
    "num_experts",
    "epochs",
    "modalities",
    "files",
    "image_encoder",
    "text_encoder",
    "dim",
    "d_img",
    "d_txt",
    "dataset_fingerprint",
)


def snapshot_key(modality: str, epoch: int) -> str:
    """The tensor name of ``modality``'s snapshot after ``epoch`` epochs (0 = initialisation)."""
    return f"{modality}/epoch_{epoch}"


def expert_file_name(index: int) -> str:
    return f"expert_{index:03d}.safetensors"


def head_layout(spec: HeadSpec) -> dict:
    """The manifest's description of a projection head's flat vector."""
    shapes = spec.shapes
    return {
        "kind": "head",
        "d_in": spec.d_in,
        "dim": spec.dim,
        "numel": spec.numel,
        "names": list(shapes),
        "shapes": [list(s) for s in shapes.values()],
    }


def module_layout(spec: FlatSpec) -> dict:
    """The manifest's description of a whole module's flat vector (a LoRS image encoder)."""
    return {"kind": "module", "numel": spec.numel, **spec.to_json()}


def hash_config(config: dict) -> str:
    """The short sha256 (24 hex digits) of a JSON object with sorted keys: a recipe's
    ``recipe_sha``, or with the expert's index and seed added, its file's ``config_sha``."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:24]


def recipe_of(manifest: dict) -> dict:
    """The fields of a manifest that say how its experts were made (all but the build's
    results): two builds with equal recipes make the same bytes."""
    return {k: v for k, v in manifest.items() if k not in _BUILD_FIELDS}


def recipe_diff(old: dict, new: dict) -> list[str]:
    """``["train.seed: 0 -> 1", ...]``, the recipe fields that differ (nested one level)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [
                f"{k}.{j}: {a.get(j)!r} -> {b.get(j)!r}"
                for j in sorted(set(a) | set(b))
                if a.get(j) != b.get(j)
            ]
        else:
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


def read_json(path: Path) -> Any:
    """The JSON at ``path``; ``ValueError`` naming it when unreadable."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None


def file_digests(integrity: Any, where: Path) -> dict[str, FileDigest]:
    """``{file name: FileDigest}`` of a manifest's ``integrity`` (or a partial record)."""
    if not isinstance(integrity, dict) or not isinstance(integrity.get("files"), dict):
        return {}
    return {str(k): FileDigest.from_json(v, f"{where}: {k}") for k, v in integrity["files"].items()}


def integrity_records(manifest: dict, mpath: Path, verify: bool) -> dict[str, FileDigest]:
    """The manifest's file records; a store without them is refused when verifying."""
    integ = manifest.get("integrity")
    if integ is None:
        if verify:
            raise IntegrityError(
                f"{mpath} records no checksums of its expert files (written by an older "
                "version of repblend_fast): rerun the same `buffer` command to add them "
                "(the experts are kept), or pass --no-verify (verify=False) to use it as is"
            )
        return {}
    records = file_digests(integ, mpath)
    lacking = [n for n in manifest["files"] if n not in records]
    if lacking:
        raise IntegrityError(
            f"{mpath} records no checksum for {lacking[:3]}: the manifest was edited or "
            "damaged; rebuild the store with `buffer`"
        )
    return records


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_manifest(man: dict, mpath: Path) -> None:
    """``ValueError`` naming the first field of ``man`` (read from ``mpath``) that a store of
    this format cannot have; the expert files themselves are checked by the reader."""
    if not isinstance(man, dict):
        raise ValueError(f"{mpath} must hold a JSON object")
    version = man.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{mpath}: format_version {version!r}, but this version of repblend_fast reads "
            f"format_version {FORMAT_VERSION}; retrain the experts with this version"
        )
    lacking = [k for k in _REQUIRED if k not in man]
    if lacking:
        raise ValueError(f"{mpath} lacks the fields {lacking}; retrain the experts")
    if man["method"] not in {k.experts for k in STUDENT_KINDS.values()}:
        raise ValueError(f"{mpath}: unknown method {man['method']!r}")
    _validate_files(man, mpath)
    _validate_layouts(man["modalities"], mpath)
    epochs = man["epochs"]
    if not isinstance(epochs, list) or not epochs:
        raise ValueError(f"{mpath}: no epochs stored")
    if not all(_is_int(e) and e >= 0 for e in epochs) or len(set(epochs)) != len(epochs):
        raise ValueError(f"{mpath}: epochs must be distinct integers >= 0, got {epochs!r}")


def _validate_files(man: dict, mpath: Path) -> None:
    """The expert count, the file names (plain, distinct, one per expert) and the seeds."""
    files = man["files"]
    n_exp = man["num_experts"]
    if not _is_int(n_exp) or n_exp < 1:
        raise ValueError(f"{mpath}: num_experts must be a positive integer, got {n_exp!r}")
    if not isinstance(files, list) or len(files) != n_exp:
        listed = len(files) if isinstance(files, list) else "no list of"
        raise ValueError(f"{mpath}: num_experts is {n_exp} but {listed} files are listed")
    for name in files:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"{mpath}: expert file names must be plain names, got {name!r}")
    if len(set(files)) != len(files):
        raise ValueError(f"{mpath}: an expert file is listed twice")
    seeds = man.get("expert_seeds")
    if seeds is not None and (
        not isinstance(seeds, list) or len(seeds) != n_exp or not all(map(_is_int, seeds))
    ):
        raise ValueError(f"{mpath}: expert_seeds must list one integer per expert")


def _validate_layouts(modalities: Any, mpath: Path) -> None:
    """Each modality's flat layout: a positive ``numel`` that its ``shapes`` (if any) sum to."""
    if not isinstance(modalities, dict):
        raise ValueError(f"{mpath}: modalities must be an object")
    for m in MODALITIES:
        lay = modalities.get(m)
        if not isinstance(lay, dict) or not _is_int(lay.get("numel")) or lay["numel"] < 1:
            raise ValueError(f"{mpath}: no valid layout for the {m} modality")
        if "shapes" in lay:
            total = sum(math.prod(s) for s in lay["shapes"])
            if total != int(lay["numel"]):
                raise ValueError(
                    f"{mpath}: {m} layout shapes sum to {total} elements but numel is "
                    f"{lay['numel']}"
                )
