"""The expert trajectory store: :class:`TrajectoryStore` reads a store folder, checks it against
its manifest and preloads the snapshots a run needs onto the device once (the research code
re-read expert files from disk every iteration).

A store is one safetensors file per expert plus ``manifest.json``, written last
(:mod:`repblend_fast.experts.manifest` describes the layout and checks the manifest's fields);
:class:`StoreWriter` (:mod:`repblend_fast.experts.writer`) writes one. Loading validates every
listed file (streamed sha256 unless ``verify=False``) before it reads any tensor data; nothing is
pickled. The writer's names and the manifest's are re-exported here, where users import them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from repblend_fast.experts.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    MODALITIES,
    PARTIAL,
    expert_file_name,
    hash_config,
    head_layout,
    integrity_records,
    module_layout,
    recipe_of,
    snapshot_key,
    validate_manifest,
)
from repblend_fast.experts.writer import StoreExistsError, StoreWriter
from repblend_fast.io import FileDigest, IntegrityError, read_safetensors_header, verify_file
from repblend_fast.models.flat import FlatSpec
from repblend_fast.models.heads import HeadSpec

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "MODALITIES",
    "PARTIAL",
    "StoreExistsError",
    "StoreWriter",
    "TrajectoryStore",
    "expert_file_name",
    "head_layout",
    "module_layout",
    "snapshot_key",
]

_FIX = "restore the store's own file or rebuild the store with `buffer`"


@dataclass(frozen=True)
class _Expected:
    """What every expert file of a store must hold, from its manifest: the snapshot names
    ``want``, each modality's ``numel``, the manifest's file ``records``, its ``recipe`` and
    expert ``seeds`` (for the files' ``config_sha``) and its ``stored`` epochs."""

    mpath: Path
    want: set[str]
    numel: dict[str, int]
    records: dict[str, FileDigest]
    recipe: dict
    seeds: list[int] | None
    stored: list[int]


class TrajectoryStore:
    """Validated expert trajectories, preloaded on one device.

    ``snapshot(expert, epoch, modality)`` returns a 1-D view ``[numel_m]`` of the preloaded
    ``[E, len(epochs), numel_m]`` tensor (:meth:`stacked`); no disk IO after :meth:`load`.
    """

    def __init__(
        self,
        root: Path,
        manifest: dict,
        snapshots: dict[str, torch.Tensor],
        epochs: Sequence[int],
    ):
        self.root = root
        self.manifest = manifest
        self._snaps = snapshots
        self.epochs = list(epochs)
        self._epoch_pos = {e: i for i, e in enumerate(self.epochs)}
        # sha256 of manifest.json as loaded: a checkpoint records it to name the store it
        # continues (set by load).
        self.manifest_sha256: str | None = None
        self.verified = False

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        epochs: Iterable[int] | None = None,
        verify: bool = True,
    ) -> TrajectoryStore:
        """Validate ``directory`` against its manifest and preload the snapshots of ``epochs``
        (default: all stored epochs) onto ``device`` as ``dtype``.

        Every listed file must be a plain file inside the store (a symbolic link leaving it is
        refused) with the size the manifest records, a valid safetensors header holding exactly
        the manifest's snapshots, and the recipe hash of this store in its header; with
        ``verify`` (default) its sha256, streamed, must match the manifest too. Snapshots must
        be finite. Anything else raises ``ValueError`` (``IntegrityError`` for changed bytes)
        naming the file and what to do. ``verify=False`` skips only the sha256 (the reading
        that costs as much as loading; for stores of hundreds of GB).
        """
        root = Path(directory)
        mpath, raw, manifest = _read_manifest(root)
        stored = [int(e) for e in manifest["epochs"]]
        use = _select_epochs(root, stored, epochs)
        expected = _Expected(
            mpath=mpath,
            want={snapshot_key(m, t) for m in MODALITIES for t in stored},
            numel={m: int(manifest["modalities"][m]["numel"]) for m in MODALITIES},
            records=integrity_records(manifest, mpath, verify),
            recipe=recipe_of(manifest),
            seeds=manifest.get("expert_seeds"),
            stored=stored,
        )
        # Validate every file before allocating or reading any tensor data.
        for i, name in enumerate(manifest["files"]):
            _check_expert_file(_member(root, name, mpath), i, name, expected, verify)
        snaps = _read_snapshots(
            root, manifest["files"], use, expected.numel, device=device, dtype=dtype
        )
        store = cls(root, manifest, snaps, use)
        store.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        store.verified = verify
        return store

    # --- access -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.manifest["num_experts"])

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def device(self) -> torch.device:
        return self._snaps["image"].device

    def numel(self, modality: str) -> int:
        self._check_modality(modality)
        return int(self._snaps[modality].shape[-1])

    def spec(self, modality: str) -> HeadSpec | FlatSpec:
        """The flat layout of a modality: a :class:`HeadSpec` or a :class:`FlatSpec`."""
        self._check_modality(modality)
        lay = self.manifest["modalities"][modality]
        if lay.get("kind") == "head":
            return HeadSpec(int(lay["d_in"]), int(lay["dim"]))
        return FlatSpec.from_json(lay)

    def stacked(self, modality: str) -> torch.Tensor:
        """All preloaded snapshots of a modality ``[E, len(epochs), numel]``."""
        self._check_modality(modality)
        return self._snaps[modality]

    def snapshot(self, expert: int, epoch: int, modality: str) -> torch.Tensor:
        """Flat parameters ``[numel]`` of ``expert`` after ``epoch`` epochs (0 = init)."""
        self._check_modality(modality)
        if not 0 <= int(expert) < len(self):
            raise IndexError(f"expert {expert} out of range: the store holds {len(self)} experts")
        if epoch not in self._epoch_pos:
            raise KeyError(
                f"epoch {epoch} not loaded (loaded: {self.epochs}); pass it in "
                "TrajectoryStore.load(epochs=...) or train experts storing it"
            )
        return self._snaps[modality][int(expert), self._epoch_pos[epoch]]

    def losses(self) -> list[list[float]]:
        """Mean training loss per expert and epoch (epochs 1..epochs_trained)."""
        return [list(x) for x in self.manifest.get("losses", [])]

    def _check_modality(self, modality: str) -> None:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")

    def check_compatible(
        self,
        *,
        method: str | None = None,
        image_encoder: str | None = None,
        text_encoder: str | None = None,
        dim: int | None = None,
        d_img: int | None = None,
        d_txt: int | None = None,
        dataset_fingerprint: str | None = None,
        image_size: int | None = None,
    ) -> None:
        """Raise ``ValueError`` listing every given setting that differs from the store's (a
        store that records no image size, older or imported, is not checked for it)."""
        hints = {
            "method": "train experts with the run's method (or change the method)",
            "image_encoder": "use the image encoder the experts were trained with, or retrain",
            "text_encoder": "use the text encoder (and pooling) the experts were trained with",
            "dim": "set the head width to the experts' dim, or retrain the experts",
            "d_img": "the image features differ in width: use the experts' image encoder",
            "d_txt": "the text features differ in width: use the experts' text encoder",
            "dataset_fingerprint": "the experts were trained on other data: retrain on this one",
            "image_size": "distil at the experts' --image-size, or retrain them at this one",
        }
        given = {
            "method": method,
            "image_encoder": image_encoder,
            "text_encoder": text_encoder,
            "dim": dim,
            "d_img": d_img,
            "d_txt": d_txt,
            "dataset_fingerprint": dataset_fingerprint,
            "image_size": image_size,
        }
        problems = []
        for k, v in given.items():
            if v is None or (k == "image_size" and k not in self.manifest):
                continue
            have = self.manifest.get(k)
            if have != v:
                problems.append(f"{k}: store has {have!r}, run wants {v!r} ({hints[k]})")
        if problems:
            raise ValueError(
                f"expert store {self.root} is incompatible with this run: " + "; ".join(problems)
            )

    def __repr__(self) -> str:
        return (
            f"TrajectoryStore({str(self.root)!r}, method={self.method!r}, experts={len(self)}, "
            f"epochs={self.epochs}, numel={{image: {self.numel('image')}, "
            f"text: {self.numel('text')}}}, device={self.device})"
        )


# --- the steps of TrajectoryStore.load ------------------------------------------------------


def _read_manifest(root: Path) -> tuple[Path, bytes, dict]:
    """``(path, bytes, parsed)`` of the store's manifest after :func:`validate_manifest`;
    ``FileNotFoundError`` for a folder without one (saying whether a build is unfinished)."""
    mpath = root / MANIFEST
    if not mpath.is_file():
        if (root / PARTIAL).is_file():
            raise FileNotFoundError(
                f"{root} holds an unfinished expert store (no {MANIFEST}; its training was "
                "interrupted or is running): rerun the same `buffer` command to finish it "
                "(finished experts are kept)"
            )
        raise FileNotFoundError(
            f"no {MANIFEST} in {root}: not an expert directory, or its training did not "
            "finish (rerun the expert training with the same settings; finished experts are "
            "kept)"
        )
    raw = mpath.read_bytes()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{mpath} is not valid JSON ({e}); retrain the experts") from None
    try:
        validate_manifest(manifest, mpath)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"{mpath}: malformed manifest ({type(e).__name__}: {e}); rebuild the store with "
            "`buffer`"
        ) from None
    return mpath, raw, manifest


def _select_epochs(root: Path, stored: list[int], epochs: Iterable[int] | None) -> list[int]:
    """The epochs to load, sorted: all ``stored`` ones, or the requested ones if all stored."""
    if epochs is None:
        return stored
    use = sorted({int(e) for e in epochs})
    missing = [e for e in use if e not in stored]
    if missing:
        raise ValueError(
            f"epochs {missing} are not stored in {root} (stored: {stored}); train the "
            "experts with these epochs in keep_epochs"
        )
    return use


def _member(root: Path, name: str, mpath: Path) -> Path:
    """``root / name`` after checking that it is a regular file inside the store."""
    path = root / name
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(root.resolve()):
            raise ValueError(
                f"{path} is a symbolic link to {target}, outside the store: expert files "
                "must live in the store (copy the file in instead of linking it)"
            )
    if not path.exists():
        raise ValueError(f"expert file {path} listed in {mpath} is missing; restore it or retrain")
    if not path.is_file():
        raise ValueError(f"{path} listed in {mpath} is not a regular file")
    return path


def _check_expert_file(path: Path, i: int, name: str, exp: _Expected, verify: bool) -> None:
    """Expert ``i``'s file ``name`` (at ``path``) against the manifest: its recipe hash, its
    tensors' names, shapes and dtypes, then its size and (with ``verify``) its sha256."""
    header = read_safetensors_header(path)
    meta = header.pop("__metadata__", None) or {}
    keys = set(header)
    shapes = {k: tuple(int(d) for d in header[k]["shape"]) for k in keys}
    dtypes = {k: str(header[k]["dtype"]) for k in keys}
    seeds = exp.seeds
    if "config_sha" in meta and not isinstance(seeds, list):
        # Every store this library writes records them; without them the next check (which
        # ties each file to its position) would be skipped.
        raise ValueError(
            f"{exp.mpath} lacks expert_seeds, which tie each expert file to its position (the "
            f"manifest was edited); {_FIX}"
        )
    if meta.get("expert", str(i)) != str(i):
        raise ValueError(
            f"{path} is expert {meta['expert']} but {exp.mpath} lists it at position {i} (the "
            f"files list was reordered); {_FIX}"
        )
    if (
        isinstance(seeds, list)
        and "config_sha" in meta
        and meta["config_sha"] != hash_config({**exp.recipe, "expert": i, "expert_seed": seeds[i]})
    ):
        raise ValueError(
            f"{path} was trained with other settings than {exp.mpath} describes (another "
            f"store's file, or another expert's); {_FIX}"
        )
    _check_tensors(path, shapes, dtypes, exp)
    # Bytes last: a structural problem gets the more specific message above.
    if name in exp.records:
        size = path.stat().st_size
        if size != exp.records[name].size:
            raise IntegrityError(
                f"{path} has {size} bytes but {exp.mpath} records {exp.records[name].size} "
                f"(truncated, extended or replaced); {_FIX}"
            )
        if verify:
            verify_file(path, exp.records[name], fix=_FIX)


def _check_tensors(
    path: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str], exp: _Expected
) -> None:
    """The file's tensors (``shapes`` and ``dtypes`` by name) are exactly the manifest's
    snapshots: as many of each modality, 1-D of the modality's ``numel``, floating point."""
    keys = set(shapes)
    counts = {m: sum(k.startswith(m + "/") for k in keys) for m in MODALITIES}
    if counts["image"] != counts["text"]:
        raise ValueError(
            f"{path}: {counts['image']} image snapshots but {counts['text']} text "
            "snapshots; the two trajectories of an expert must have the same epochs "
            "(corrupt file: retrain this expert)"
        )
    if keys != exp.want:
        lacking, extra = sorted(exp.want - keys), sorted(keys - exp.want)
        raise ValueError(
            f"{path}: tensors do not match {MANIFEST}: missing {lacking[:6]}, "
            f"unexpected {extra[:6]} (manifest epochs {exp.stored}); retrain this expert"
        )
    for k in sorted(keys):
        m = k.split("/", 1)[0]
        n = math.prod(shapes[k])
        if len(shapes[k]) != 1 or n != exp.numel[m]:
            raise ValueError(
                f"{path}: tensor {k} has shape {list(shapes[k])}, but {MANIFEST} "
                f"declares a 1-D {m} vector of numel {exp.numel[m]}; the file belongs to "
                "another run: retrain this expert"
            )
        if not dtypes[k].startswith("F") and not dtypes[k].startswith("BF"):
            raise ValueError(f"{path}: tensor {k} has non-float dtype {dtypes[k]}")


def _read_snapshots(
    root: Path,
    files: list[str],
    use: list[int],
    numel: dict[str, int],
    *,
    device: str | torch.device,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """``{modality: [E, len(use), numel]}`` on ``device``: the epochs ``use`` of every expert
    file, each snapshot checked to be finite."""
    from safetensors import safe_open

    snaps = {
        m: torch.empty(len(files), len(use), numel[m], dtype=dtype, device=device)
        for m in MODALITIES
    }
    for i, name in enumerate(files):
        with safe_open(str(root / name), framework="pt", device="cpu") as f:
            for m in MODALITIES:
                for j, t in enumerate(use):
                    snap = f.get_tensor(snapshot_key(m, t))
                    if not bool(torch.isfinite(snap).all()):
                        raise ValueError(
                            f"{root / name}: snapshot {snapshot_key(m, t)} holds non-finite "
                            f"values; {_FIX}"
                        )
                    snaps[m][i, j].copy_(snap)
    return snaps
