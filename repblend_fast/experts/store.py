"""The expert trajectory store: one safetensors file per expert plus ``manifest.json``.

Layout of a store directory:

* ``expert_{i:03d}.safetensors``: both modalities' flat parameter snapshots of expert ``i`` as 1-D
  tensors ``image/epoch_{t}`` and ``text/epoch_{t}`` (one file, so an image trajectory can never be
  paired with another expert's text trajectory — the mismatch the LoRS scripts allow), with the
  expert's recipe hash (``config_sha``), seed and per-epoch losses in its header metadata;
* ``manifest.json``, written last: format version, the flat layout of each modality, encoder ids,
  dataset fingerprint, training recipe, stored epochs, file names, expert seeds and losses. A
  directory without a manifest is an unfinished run.

All writes are atomic (:mod:`repblend_fast.io`); nothing is pickled. :class:`StoreWriter` writes a
store (keeping the files of an identical earlier run), :class:`TrajectoryStore` validates one
against its manifest and preloads the snapshots a run needs onto the device once (the research
code re-read expert files from disk every iteration).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from repblend_fast.io import atomic_save_safetensors, atomic_write_json, safetensors_metadata
from repblend_fast.models.flat import FlatSpec
from repblend_fast.models.heads import HeadSpec

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "MODALITIES",
    "StoreWriter",
    "TrajectoryStore",
    "expert_file_name",
    "head_layout",
    "module_layout",
    "snapshot_key",
]

FORMAT_VERSION = 1
MODALITIES = ("image", "text")
MANIFEST = "manifest.json"


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


class StoreWriter:
    """Writes a store: one file per expert, then the manifest.

    Args:
        out_dir: the store directory (created).
        manifest: everything the manifest says besides ``files``, ``expert_seeds`` and
            ``losses`` (those are filled in as experts are written). It must hold ``method``.
        resume: keep an existing expert file whose recipe hash (over the manifest fields,
            the expert index and its seed) and tensor names match instead of retraining it.
    """

    def __init__(self, out_dir: str | os.PathLike, manifest: dict, *, resume: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.manifest = dict(manifest)
        self.resume = resume
        self._config = {
            k: v for k, v in manifest.items() if k not in ("files", "losses", "expert_seeds")
        }
        self.files: list[str] = []
        self.seeds: list[int] = []
        self.losses: list[list[float]] = []

    def config_sha(self, index: int, seed: int) -> str:
        return _config_sha({**self._config, "expert": index, "expert_seed": seed})

    def reusable(self, index: int, seed: int, keys: set[str]) -> list[float] | None:
        """The losses of a valid file of an identical earlier run for expert ``index``, or None."""
        path = self.out_dir / expert_file_name(index)
        if not (self.resume and path.is_file()):
            return None
        try:
            from safetensors import safe_open

            meta = safetensors_metadata(path)
            with safe_open(str(path), framework="pt") as f:
                have = set(f.keys())
            if meta.get("config_sha") == self.config_sha(index, seed) and have == keys:
                return json.loads(meta["losses"])
        except Exception:  # an unreadable leftover is simply retrained
            return None
        return None

    def add(self, index: int, seed: int, losses: list[float], snaps=None) -> None:
        """Record expert ``index`` (it must be the next one); write ``snaps`` (name -> 1-D
        tensor) to its file unless it was reused (``snaps=None``)."""
        if index != len(self.files):
            raise ValueError(f"experts must be added in order: expected {len(self.files)}")
        name = expert_file_name(index)
        if snaps is not None:
            meta = {
                "format_version": str(FORMAT_VERSION),
                "method": self.manifest["method"],
                "expert": str(index),
                "expert_seed": str(seed),
                "config_sha": self.config_sha(index, seed),
                "losses": json.dumps(losses),
            }
            atomic_save_safetensors(snaps, self.out_dir / name, metadata=meta)
        self.files.append(name)
        self.seeds.append(seed)
        self.losses.append(losses)

    def finish(self) -> Path:
        """Write the manifest (last, so a directory with one is complete); returns the dir."""
        manifest = {
            **self.manifest,
            "files": self.files,
            "expert_seeds": self.seeds,
            "losses": self.losses,
        }
        atomic_write_json(manifest, self.out_dir / MANIFEST)
        return self.out_dir


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

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        epochs: Iterable[int] | None = None,
    ) -> TrajectoryStore:
        """Validate ``directory`` against its manifest and preload the snapshots of ``epochs``
        (default: all stored epochs) onto ``device`` as ``dtype``."""
        from safetensors import safe_open

        root = Path(directory)
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise FileNotFoundError(
                f"no {MANIFEST} in {root}: not an expert directory, or its training did not "
                "finish (rerun the expert training with the same settings; finished experts are "
                "kept)"
            )
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{mpath} is not valid JSON ({e}); retrain the experts") from e
        cls._validate_manifest(manifest, mpath)
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

        # Validate every file's header before allocating or reading any tensor data.
        for name in manifest["files"]:
            path = root / name
            if not path.is_file():
                raise ValueError(
                    f"expert file {path} listed in {mpath} is missing; restore it or retrain"
                )
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = set(f.keys())
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
                dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
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

        snaps = {
            m: torch.empty(n_exp, len(use), numel[m], dtype=dtype, device=device)
            for m in MODALITIES
        }
        for i, name in enumerate(manifest["files"]):
            with safe_open(str(root / name), framework="pt", device="cpu") as f:
                for m in MODALITIES:
                    for j, t in enumerate(use):
                        snaps[m][i, j].copy_(f.get_tensor(snapshot_key(m, t)))
        return cls(root, manifest, snaps, use)

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
        if not isinstance(files, list) or len(files) != int(man["num_experts"]):
            raise ValueError(
                f"{mpath}: num_experts is {man['num_experts']} but {len(files)} files are listed"
            )
        for m in MODALITIES:
            lay = man["modalities"].get(m)
            if not isinstance(lay, dict) or "numel" not in lay:
                raise ValueError(f"{mpath}: no layout for the {m} modality")
            if "shapes" in lay:
                total = sum(math.prod(s) for s in lay["shapes"])
                if total != int(lay["numel"]):
                    raise ValueError(
                        f"{mpath}: {m} layout shapes sum to {total} elements but numel is "
                        f"{lay['numel']}"
                    )
        if not man["epochs"]:
            raise ValueError(f"{mpath}: no epochs stored")
        for name in files:
            if Path(name).name != name:
                raise ValueError(f"{mpath}: expert file names must be plain names, got {name!r}")

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
