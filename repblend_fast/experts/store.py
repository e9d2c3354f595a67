"""The expert trajectory store: one safetensors file per expert plus ``manifest.json``.

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

A build never mixes with a finished store: a writer first demotes an existing manifest to the
partial record (or, for other settings, refuses unless ``overwrite``, then removes the old store's
files) before it writes any expert file, and holds the folder's lock
(:mod:`repblend_fast.locks`) throughout. All writes are atomic (:mod:`repblend_fast.io`); nothing
is pickled. :class:`StoreWriter` writes a store (keeping the files of an identical earlier run),
:class:`TrajectoryStore` validates one against its manifest (streamed sha256 of every file unless
``verify=False``) and preloads the snapshots a run needs onto the device once (the research code
re-read expert files from disk every iteration).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from repblend_fast.io import (
    FileDigest,
    IntegrityError,
    file_digest,
    fsync_dir,
    json_bytes,
    read_safetensors_header,
    remove_stale_temps,
    safetensors_bytes,
    verify_file,
    write_atomic,
)
from repblend_fast.locks import FolderLock
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

logger = logging.getLogger("repblend_fast.experts")

FORMAT_VERSION = 1
MODALITIES = ("image", "text")
MANIFEST = "manifest.json"
PARTIAL = "manifest.partial.json"
PARTIAL_RANK = "manifest.partial.rank{}.json"  # a rank > 0's record in a distributed build
_RANK_PARTIAL = re.compile(r"^manifest\.partial\.rank\d+\.json$")
# Manifest fields that describe the finished build rather than its recipe.
_BUILD_FIELDS = ("files", "losses", "expert_seeds", "integrity", "recipe_sha", "seed")
_EXPERT_FILE = re.compile(r"^expert_\d{3,}\.safetensors$")


class StoreExistsError(ValueError):
    """The folder holds a finished store built with other settings (or a damaged one); it is
    replaced only with ``overwrite=True`` (CLI: ``--overwrite``)."""


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


def _config_sha(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:24]


def recipe_of(manifest: dict) -> dict:
    """The fields of a manifest that say how its experts were made (all but the build's
    results): two builds with equal recipes make the same bytes."""
    return {k: v for k, v in manifest.items() if k not in _BUILD_FIELDS}


def _recipe_diff(old: dict, new: dict) -> list[str]:
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


def _read_json(path: Path) -> Any:
    """The JSON at ``path``; ``ValueError`` naming it when unreadable."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None


class StoreWriter:
    """Writes a store: one file per expert, then the manifest, holding the folder's lock.

    Args:
        out_dir: the store directory (created).
        manifest: everything the manifest says besides ``files``, ``expert_seeds`` and
            ``losses`` (those are filled in as experts are written). It must hold ``method``.
        resume: keep an existing expert file of an identical earlier build (same recipe, file
            unchanged since it was written, same recipe hash, index, seed and tensor names in
            its header) instead of retraining it.
        overwrite: replace a finished store built with other settings (without it such a
            folder is refused with :class:`StoreExistsError`, so that a finished store is never
            destroyed by a mistyped ``--out``).
        lock: hold the folder's lock (:class:`repblend_fast.locks.FolderLock`) until
            :meth:`finish` or :meth:`close`; a second writer gets ``LockHeldError``.
        follow, rank: for rank ``rank > 0`` of a build spread over several processes, the
            :meth:`shard_info` of rank 0's writer, which prepared the folder and holds its lock:
            this writer takes no lock, changes nothing but the expert files it writes
            (:meth:`write_expert`) and records them in its own ``manifest.partial.rank{r}.json``
            (``ValueError`` when its recipe differs from rank 0's).

    Whatever the folder held, no expert file is written while a manifest describes another
    build: an existing manifest is demoted to ``manifest.partial.json`` (same recipe) or removed
    with the old store's files (``overwrite``) first.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        manifest: dict,
        *,
        resume: bool = True,
        overwrite: bool = False,
        lock: bool = True,
        follow: dict | None = None,
        rank: int = 0,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.manifest = dict(manifest)
        self.resume = resume
        self._config = recipe_of(manifest)
        self.recipe_sha = _config_sha(self._config)
        self.files: list[str] = []
        self.seeds: list[int] = []
        self.losses: list[list[float]] = []
        self.digests: dict[str, FileDigest] = {}
        self._known: dict[str, FileDigest] = {}  # digests of an identical earlier build's files
        self._legacy = False  # the earlier build predates checksums: reuse on header checks
        self._reused: dict[str, FileDigest] = {}
        self._written: dict[str, FileDigest] = {}
        self._partial = PARTIAL if follow is None else PARTIAL_RANK.format(int(rank))
        self._follower = follow is not None
        if follow is not None:
            self._lock = None
            self._follow(follow, int(rank))
            return
        self._lock = FolderLock(self.out_dir, "buffer: writing an expert store") if lock else None
        if self._lock is not None:
            self._lock.acquire()
        try:
            remove_stale_temps(self.out_dir)
            self._prepare(overwrite)
        except BaseException:
            self.close()
            raise

    def _follow(self, info: dict, rank: int) -> None:
        if info.get("recipe_sha") != self.recipe_sha:
            diff = _recipe_diff(info.get("recipe") or {}, self._config)
            raise ValueError(
                f"rank {rank} would train other experts than rank 0 ("
                + ("; ".join(diff[:6]) or "the recipe hashes differ")
                + "): give every rank the same flags, --threads included"
            )
        self._known = _digests({"files": info.get("known")}, self.out_dir / PARTIAL)
        self._legacy = bool(info.get("legacy"))

    def shard_info(self) -> dict:
        """What the writers of the other ranks of a distributed build follow (JSON)."""
        return {
            "recipe_sha": self.recipe_sha,
            "recipe": self._config,
            "known": {k: v.to_json() for k, v in self._known.items()},
            "legacy": self._legacy,
        }

    def _rank_records(self) -> dict[str, FileDigest]:
        """The digests the ranks of an unfinished distributed build of this recipe recorded."""
        out: dict[str, FileDigest] = {}
        for p in sorted(self.out_dir.iterdir()):
            if not _RANK_PARTIAL.match(p.name):
                continue
            try:
                rec = _read_json(p)
                if isinstance(rec, dict) and rec.get("recipe_sha") == self.recipe_sha:
                    out.update(_digests({"files": rec.get("files")}, p))
            except (OSError, ValueError):
                continue  # an unreadable record vouches for nothing: its files are retrained
        return out

    def _remove_rank_records(self) -> None:
        gone = False
        for p in self.out_dir.iterdir():
            if _RANK_PARTIAL.match(p.name):
                p.unlink(missing_ok=True)
                gone = True
        if gone:
            fsync_dir(self.out_dir)

    def _prepare(self, overwrite: bool) -> None:
        """Make the folder safe to write into (see the class docstring)."""
        mpath, ppath = self.out_dir / MANIFEST, self.out_dir / PARTIAL
        ranks = self._rank_records()
        if mpath.exists():
            try:
                old = _read_json(mpath)
                if not isinstance(old, dict):
                    raise ValueError(f"{mpath} does not hold a JSON object")
            except (OSError, ValueError) as exc:
                if not overwrite:
                    raise StoreExistsError(
                        f"{self.out_dir} holds an unreadable expert store ({exc}); pass "
                        "--overwrite (overwrite=True) to rebuild it, or choose another --out"
                    ) from None
                old = None
            same = old is not None and recipe_of(old) == self._config
            if old is not None and not same and not overwrite:
                diff = _recipe_diff(recipe_of(old), self._config)
                raise StoreExistsError(
                    f"{self.out_dir} holds a finished expert store built with other settings ("
                    + "; ".join(diff[:6])
                    + (", …" if len(diff) > 6 else "")
                    + "): pass --overwrite (overwrite=True) to replace it, or choose another "
                    "--out"
                )
            if same and self.resume:
                self._known = {**_digests(old.get("integrity"), mpath), **ranks}
                self._legacy = "integrity" not in old
            # The manifest goes before any expert file changes; what it vouched for moves into
            # the partial record.
            self._write_partial(self._known)
            mpath.unlink()
            fsync_dir(self.out_dir)
            if not same:
                self._remove_expert_files()
        elif ppath.exists():
            try:
                part = _read_json(ppath)
                same = isinstance(part, dict) and part.get("recipe_sha") == self.recipe_sha
            except (OSError, ValueError):
                same = False
            if same and self.resume:
                self._known = {**_digests({"files": part.get("files")}, ppath), **ranks}
            elif not same:
                # An unfinished build of other settings: nothing finished to protect.
                logger.info("discarding the unfinished expert build in %s", self.out_dir)
                self._remove_expert_files()
        self._write_partial(self._known)
        self._remove_rank_records()  # merged into the partial record just written

    def _remove_expert_files(self) -> None:
        for p in self.out_dir.iterdir():
            if _EXPERT_FILE.match(p.name) and (p.is_file() or p.is_symlink()):
                p.unlink()
        fsync_dir(self.out_dir)

    def _write_partial(self, files: dict[str, FileDigest]) -> None:
        record = {
            "kind": "repblend_fast.experts-partial",
            "recipe_sha": self.recipe_sha,
            "num_experts": self.manifest.get("num_experts"),
            "files": {k: v.to_json() for k, v in files.items()},
        }
        write_atomic(self.out_dir / self._partial, json_bytes(record))

    def _vouched(self) -> dict[str, FileDigest]:
        """The files this writer's partial record vouches for."""
        if self._follower:
            return {**self._reused, **self._written}
        return {**self._known, **self._written, **self.digests}

    def config_sha(self, index: int, seed: int) -> str:
        return _config_sha({**self._config, "expert": index, "expert_seed": seed})

    def reusable(self, index: int, seed: int, keys: set[str]) -> list[float] | None:
        """The losses of a valid file of an identical earlier run for expert ``index``, or None."""
        name = expert_file_name(index)
        path = self.out_dir / name
        if not (self.resume and path.is_file()) or path.is_symlink():
            return None
        known = self._known.get(name)
        if known is None and not self._legacy:
            return None
        try:
            if known is not None:
                verify_file(path, known, fix="it is retrained")
            header = read_safetensors_header(path)
            meta = header.get("__metadata__") or {}
            have = set(header) - {"__metadata__"}
            if meta.get("config_sha") != self.config_sha(index, seed) or have != keys:
                return None
            losses = json.loads(meta["losses"])
            self._reused[name] = known if known is not None else file_digest(path)
            if self._follower:
                self._write_partial(self._vouched())
            return losses
        except IntegrityError as exc:
            logger.warning("%s", exc)
            return None
        except (OSError, ValueError, KeyError, TypeError):  # an unreadable leftover: retrain it
            return None

    def reused_digest(self, index: int) -> FileDigest:
        """The digest of expert ``index``'s file, which :meth:`reusable` accepted."""
        return self._reused[expert_file_name(index)]

    def _write_file(self, index: int, seed: int, losses: list[float], snaps) -> FileDigest:
        name = expert_file_name(index)
        meta = {
            "format_version": str(FORMAT_VERSION),
            "method": self.manifest["method"],
            "expert": str(index),
            "expert_seed": str(seed),
            "config_sha": self.config_sha(index, seed),
            "losses": json.dumps(losses),
        }
        digest = write_atomic(self.out_dir / name, safetensors_bytes(snaps, meta))
        self._written[name] = digest
        return digest

    def write_expert(self, index: int, seed: int, losses: list[float], snaps) -> FileDigest:
        """Write expert ``index``'s file (any order) and record it in this writer's partial
        record; rank 0 lists it in the manifest later with :meth:`add`."""
        digest = self._write_file(index, seed, losses, snaps)
        self._write_partial(self._vouched())
        return digest

    def add(
        self,
        index: int,
        seed: int,
        losses: list[float],
        snaps=None,
        *,
        digest: FileDigest | None = None,
    ) -> None:
        """Record expert ``index`` (it must be the next one); write ``snaps`` (name -> 1-D
        tensor) to its file unless it was reused or written already (``snaps=None``; ``digest``:
        the file's, when another rank wrote it)."""
        if self._follower:
            raise ValueError("only rank 0's writer lists experts in the manifest")
        if index != len(self.files):
            raise ValueError(f"experts must be added in order: expected {len(self.files)}")
        name = expert_file_name(index)
        path = self.out_dir / name
        if snaps is not None:
            digest = self._write_file(index, seed, losses, snaps)
        elif digest is None:
            digest = self._reused.get(name) or self._written.get(name)
            if digest is None:
                if not path.is_file():
                    raise ValueError(f"expert {index} was not written and {path} does not exist")
                digest = file_digest(path)
        self.files.append(name)
        self.seeds.append(seed)
        self.losses.append(losses)
        self.digests[name] = digest
        self._write_partial(self._vouched())

    def finish(self) -> Path:
        """Write the manifest (last, so a directory with one is complete), remove the partial
        record and release the lock; returns the dir."""
        manifest = {
            **self.manifest,
            "files": self.files,
            "expert_seeds": self.seeds,
            "losses": self.losses,
            "recipe_sha": self.recipe_sha,
            "seed": self.manifest.get("seed", (self.manifest.get("train") or {}).get("seed")),
            "integrity": {
                "algorithm": "sha256",
                "files": {k: self.digests[k].to_json() for k in self.files},
            },
        }
        if self._follower:
            raise ValueError("only rank 0's writer writes the manifest")
        write_atomic(self.out_dir / MANIFEST, json_bytes(manifest))
        (self.out_dir / PARTIAL).unlink(missing_ok=True)
        self._remove_rank_records()
        fsync_dir(self.out_dir)
        self.close()
        return self.out_dir

    def close(self) -> None:
        """Release the folder's lock (the store stays unfinished unless :meth:`finish` ran)."""
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _digests(integrity: Any, where: Path) -> dict[str, FileDigest]:
    """``{file name: FileDigest}`` of a manifest's ``integrity`` (or a partial record)."""
    if not isinstance(integrity, dict) or not isinstance(integrity.get("files"), dict):
        return {}
    return {str(k): FileDigest.from_json(v, f"{where}: {k}") for k, v in integrity["files"].items()}


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
            cls._validate_manifest(manifest, mpath)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(
                f"{mpath}: malformed manifest ({type(e).__name__}: {e}); rebuild the store with "
                "`buffer`"
            ) from None
        stored = [int(e) for e in manifest["epochs"]]
        if epochs is None:
            use = stored
        else:
            use = sorted({int(e) for e in epochs})
            missing = [e for e in use if e not in stored]
            if missing:
                raise ValueError(
                    f"epochs {missing} are not stored in {root} (stored: {stored}); train the "
                    "experts with these epochs in keep_epochs"
                )
        numel = {m: int(manifest["modalities"][m]["numel"]) for m in MODALITIES}
        n_exp = int(manifest["num_experts"])
        want = {snapshot_key(m, t) for m in MODALITIES for t in stored}
        records = cls._integrity(manifest, mpath, verify)
        recipe = recipe_of(manifest)
        seeds = manifest.get("expert_seeds")
        fix = "restore the store's own file or rebuild the store with `buffer`"

        # Validate every file before allocating or reading any tensor data.
        for i, name in enumerate(manifest["files"]):
            path = cls._member(root, name, mpath)
            header = read_safetensors_header(path)
            meta = header.pop("__metadata__", None) or {}
            keys = set(header)
            shapes = {k: tuple(int(d) for d in header[k]["shape"]) for k in keys}
            dtypes = {k: str(header[k]["dtype"]) for k in keys}
            if (
                isinstance(seeds, list)
                and "config_sha" in meta
                and meta["config_sha"]
                != _config_sha({**recipe, "expert": i, "expert_seed": seeds[i]})
            ):
                raise ValueError(
                    f"{path} was trained with other settings than {mpath} describes (another "
                    f"store's file, or another expert's); {fix}"
                )
            counts = {m: sum(k.startswith(m + "/") for k in keys) for m in MODALITIES}
            if counts["image"] != counts["text"]:
                raise ValueError(
                    f"{path}: {counts['image']} image snapshots but {counts['text']} text "
                    "snapshots; the two trajectories of an expert must have the same epochs "
                    "(corrupt file: retrain this expert)"
                )
            if keys != want:
                lacking, extra = sorted(want - keys), sorted(keys - want)
                raise ValueError(
                    f"{path}: tensors do not match {MANIFEST}: missing {lacking[:6]}, "
                    f"unexpected {extra[:6]} (manifest epochs {stored}); retrain this expert"
                )
            for k in sorted(keys):
                m = k.split("/", 1)[0]
                n = math.prod(shapes[k])
                if len(shapes[k]) != 1 or n != numel[m]:
                    raise ValueError(
                        f"{path}: tensor {k} has shape {list(shapes[k])}, but {MANIFEST} "
                        f"declares a 1-D {m} vector of numel {numel[m]}; the file belongs to "
                        "another run: retrain this expert"
                    )
                if not dtypes[k].startswith("F") and not dtypes[k].startswith("BF"):
                    raise ValueError(f"{path}: tensor {k} has non-float dtype {dtypes[k]}")
            # Bytes last: a structural problem gets the more specific message above.
            if name in records:
                size = path.stat().st_size
                if size != records[name].size:
                    raise IntegrityError(
                        f"{path} has {size} bytes but {mpath} records {records[name].size} "
                        f"(truncated, extended or replaced); {fix}"
                    )
                if verify:
                    verify_file(path, records[name], fix=fix)

        from safetensors import safe_open

        snaps = {
            m: torch.empty(n_exp, len(use), numel[m], dtype=dtype, device=device)
            for m in MODALITIES
        }
        for i, name in enumerate(manifest["files"]):
            with safe_open(str(root / name), framework="pt", device="cpu") as f:
                for m in MODALITIES:
                    for j, t in enumerate(use):
                        snap = f.get_tensor(snapshot_key(m, t))
                        if not bool(torch.isfinite(snap).all()):
                            raise ValueError(
                                f"{root / name}: snapshot {snapshot_key(m, t)} holds non-finite "
                                f"values; {fix}"
                            )
                        snaps[m][i, j].copy_(snap)
        store = cls(root, manifest, snaps, use)
        store.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        store.verified = verify
        return store

    @staticmethod
    def _integrity(manifest: dict, mpath: Path, verify: bool) -> dict[str, FileDigest]:
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
        records = _digests(integ, mpath)
        lacking = [n for n in manifest["files"] if n not in records]
        if lacking:
            raise IntegrityError(
                f"{mpath} records no checksum for {lacking[:3]}: the manifest was edited or "
                "damaged; rebuild the store with `buffer`"
            )
        return records

    @staticmethod
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
            raise ValueError(
                f"expert file {path} listed in {mpath} is missing; restore it or retrain"
            )
        if not path.is_file():
            raise ValueError(f"{path} listed in {mpath} is not a regular file")
        return path

    @staticmethod
    def _validate_manifest(man: dict, mpath: Path) -> None:
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
        if man["method"] not in ("repblend", "lors"):
            raise ValueError(f"{mpath}: unknown method {man['method']!r}")
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
        if not isinstance(man["modalities"], dict):
            raise ValueError(f"{mpath}: modalities must be an object")
        for m in MODALITIES:
            lay = man["modalities"].get(m)
            if not isinstance(lay, dict) or not _is_int(lay.get("numel")) or lay["numel"] < 1:
                raise ValueError(f"{mpath}: no valid layout for the {m} modality")
            if "shapes" in lay:
                total = sum(math.prod(s) for s in lay["shapes"])
                if total != int(lay["numel"]):
                    raise ValueError(
                        f"{mpath}: {m} layout shapes sum to {total} elements but numel is "
                        f"{lay['numel']}"
                    )
        epochs = man["epochs"]
        if not isinstance(epochs, list) or not epochs:
            raise ValueError(f"{mpath}: no epochs stored")
        if not all(_is_int(e) and e >= 0 for e in epochs) or len(set(epochs)) != len(epochs):
            raise ValueError(f"{mpath}: epochs must be distinct integers >= 0, got {epochs!r}")

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
    ) -> None:
        """Raise ``ValueError`` listing every given setting that differs from the store's."""
        hints = {
            "method": "train experts with the run's method (or change the method)",
            "image_encoder": "use the image encoder the experts were trained with, or retrain",
            "text_encoder": "use the text encoder (and pooling) the experts were trained with",
            "dim": "set the head width to the experts' dim, or retrain the experts",
            "d_img": "the image features differ in width: use the experts' image encoder",
            "d_txt": "the text features differ in width: use the experts' text encoder",
            "dataset_fingerprint": "the experts were trained on other data: retrain on this one",
        }
        given = {
            "method": method,
            "image_encoder": image_encoder,
            "text_encoder": text_encoder,
            "dim": dim,
            "d_img": d_img,
            "d_txt": d_txt,
            "dataset_fingerprint": dataset_fingerprint,
        }
        problems = []
        for k, v in given.items():
            if v is None:
                continue
            have = self.manifest.get(k)
            if have != v:
                problems.append(f"{k}: store has {have!r}, run wants {v!r} ({hints[k]})")
        if problems:
            raise ValueError(
                f"expert store {self.root} is incompatible with this run:\n  "
                + "\n  ".join(problems)
            )

    def __repr__(self) -> str:
        return (
            f"TrajectoryStore({str(self.root)!r}, method={self.method!r}, experts={len(self)}, "
            f"epochs={self.epochs}, numel={{image: {self.numel('image')}, "
            f"text: {self.numel('text')}}}, device={self.device})"
        )
