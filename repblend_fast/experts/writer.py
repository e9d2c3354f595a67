"""Writing an expert store: :class:`StoreWriter`, one expert file at a time, then the manifest.

A build never mixes with a finished store: a writer first demotes an existing manifest to the
partial record (or, for other settings, refuses unless ``overwrite``, then removes the old store's
files) before it writes any expert file, and holds the folder's lock
(:mod:`repblend_fast.locks`) throughout. It keeps the files of an identical earlier (or
interrupted) build after checking them, and in a build spread over several processes each rank
records the files it writes. All writes are atomic (:mod:`repblend_fast.io`); nothing is pickled.
The files and records it writes are described in :mod:`repblend_fast.experts.manifest`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from repblend_fast.experts.manifest import (
    EXPERT_FILE,
    FORMAT_VERSION,
    MANIFEST,
    PARTIAL,
    PARTIAL_RANK,
    RANK_PARTIAL,
    expert_file_name,
    file_digests,
    hash_config,
    read_json,
    recipe_diff,
    recipe_of,
)
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

__all__ = ["StoreExistsError", "StoreWriter"]

logger = logging.getLogger("repblend_fast.experts")


class StoreExistsError(ValueError):
    """The folder holds a finished store built with other settings (or a damaged one); it is
    replaced only with ``overwrite=True`` (CLI: ``--overwrite``)."""


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
        self.recipe_sha = hash_config(self._config)
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
            diff = recipe_diff(info.get("recipe") or {}, self._config)
            raise ValueError(
                f"rank {rank} would train other experts than rank 0 ("
                + ("; ".join(diff[:6]) or "the recipe hashes differ")
                + "): give every rank the same flags, --threads included"
            )
        self._known = file_digests({"files": info.get("known")}, self.out_dir / PARTIAL)
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
            if not RANK_PARTIAL.match(p.name):
                continue
            try:
                rec = read_json(p)
                if isinstance(rec, dict) and rec.get("recipe_sha") == self.recipe_sha:
                    out.update(file_digests({"files": rec.get("files")}, p))
            except (OSError, ValueError):
                continue  # an unreadable record vouches for nothing: its files are retrained
        return out

    def _remove_rank_records(self) -> None:
        gone = False
        for p in self.out_dir.iterdir():
            if RANK_PARTIAL.match(p.name):
                p.unlink(missing_ok=True)
                gone = True
        if gone:
            fsync_dir(self.out_dir)

    def _prepare(self, overwrite: bool) -> None:
        """Make the folder safe to write into (see the class docstring)."""
        mpath, ppath = self.out_dir / MANIFEST, self.out_dir / PARTIAL
        ranks = self._rank_records()
        if mpath.exists():
            self._demote_manifest(mpath, ranks, overwrite)
        elif ppath.exists():
            self._adopt_partial(ppath, ranks)
        self._write_partial(self._known)
        self._remove_rank_records()  # merged into the partial record just written

    def _demote_manifest(self, mpath: Path, ranks: dict[str, FileDigest], overwrite: bool) -> None:
        """A finished store is in the folder: keep what its manifest vouches for when the
        recipe is the same, refuse it (or with ``overwrite`` remove it) otherwise; either way
        the manifest goes before any expert file changes."""
        try:
            old = read_json(mpath)
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
        if old is not None and not same and _only_size_added(recipe_of(old), self._config):
            # A store of an earlier version, which recorded no image size: its experts may have
            # seen another size, so they are rebuilt (as with overwrite), not refused.
            logger.warning(
                "%s: a store of an earlier version without a recorded image size; its experts "
                "are trained again at %s px",
                self.out_dir,
                self._config["image_size"],
            )
            overwrite = True
        if old is not None and not same and not overwrite:
            diff = recipe_diff(recipe_of(old), self._config)
            raise StoreExistsError(
                f"{self.out_dir} holds a finished expert store built with other settings ("
                + "; ".join(diff[:6])
                + (", …" if len(diff) > 6 else "")
                + "): pass --overwrite (overwrite=True) to replace it, or choose another "
                "--out"
            )
        if same and self.resume:
            self._known = {**file_digests(old.get("integrity"), mpath), **ranks}
            self._legacy = "integrity" not in old
        # The manifest goes before any expert file changes; what it vouched for moves into
        # the partial record.
        self._write_partial(self._known)
        mpath.unlink()
        fsync_dir(self.out_dir)
        if not same:
            self._remove_expert_files()

    def _adopt_partial(self, ppath: Path, ranks: dict[str, FileDigest]) -> None:
        """An unfinished build is in the folder: keep the files its records vouch for when it
        has this recipe, discard its files otherwise."""
        try:
            part = read_json(ppath)
            same = isinstance(part, dict) and part.get("recipe_sha") == self.recipe_sha
        except (OSError, ValueError):
            same = False
        if same and self.resume:
            self._known = {**file_digests({"files": part.get("files")}, ppath), **ranks}
        elif not same:
            # An unfinished build of other settings: nothing finished to protect.
            logger.info("discarding the unfinished expert build in %s", self.out_dir)
            self._remove_expert_files()

    def _remove_expert_files(self) -> None:
        for p in self.out_dir.iterdir():
            if EXPERT_FILE.match(p.name) and (p.is_file() or p.is_symlink()):
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
        return hash_config({**self._config, "expert": index, "expert_seed": seed})

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
        if self._reused:
            # Visible by default: a rerun that trains nothing should say why it was quick.
            logger.warning(
                "%s: kept %d finished expert(s) of an earlier build with these settings, "
                "trained %d",
                self.out_dir,
                len(self._reused),
                len(self.files) - len(self._reused),
            )
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


def _only_size_added(old: dict, new: dict) -> bool:
    """Whether ``new`` is ``old`` plus the ``image_size`` earlier versions did not record."""
    return (
        "image_size" not in old
        and "image_size" in new
        and {k: v for k, v in new.items() if k != "image_size"} == old
    )
