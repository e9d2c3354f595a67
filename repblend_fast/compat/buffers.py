"""Expert buffers of the research scripts (RepBlend, LoRS, MTT-VL): reading and checking them.

Their buffer scripts write, per run, ``img_replay_buffer_<n>.pt`` and ``txt_replay_buffer_<n>.pt``
with ``torch.save``: a list of experts, each a list of epoch snapshots (0 = initialisation), each
the list of the network's tensors in ``parameters()`` order. The image side holds the image
projection head (RepBlend) or the whole timm image encoder (LoRS, MTT-VL); the text side holds the
text projection head. Those files took days of GPU time to make, so this module reads them, and
:mod:`repblend_fast.compat.import_store` writes them into the store format of
:mod:`repblend_fast.experts.store`, instead of asking for new experts:

- files are paired by their number ``<n>`` (never by listing order: their LoRS code zips two
  unsorted globs, which can pair the image trajectory of one run with the text trajectory of
  another; MTT-VL's pairs by number but stops at the first gap); gaps in the numbering are fine,
  a file without its partner is an error;
- every tensor's shape is checked against the declared architecture (:func:`buffer_layout`), and
  the first mismatch is named (file, expert, epoch, parameter index and name, expected and found
  shape);
- files are read with ``torch.load(weights_only=True)``: a file that needs anything beyond tensors,
  lists and dicts is refused and never executed;
- one file pair is in memory at a time (stores of hundreds of GB exist).

The heads convert without reordering: their ``ProjectionHead`` is ``projection`` (Linear d_in->D),
GELU, ``fc`` (Linear D->D), dropout, the residual add of the projection output and
``layer_norm``, so its ``parameters()`` order (projection.weight, projection.bias, fc.weight,
fc.bias, layer_norm.weight, layer_norm.bias) is exactly :class:`HeadSpec`'s flat order
(W1, b1, W2, b2, gamma, beta).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from repblend_fast.compat.flag_specs import SCRIPT_FACTS
from repblend_fast.experts.store import MODALITIES, head_layout, module_layout
from repblend_fast.methods import STUDENT_KINDS, get_method
from repblend_fast.models.flat import FlatSpec
from repblend_fast.models.heads import HeadSpec

__all__ = [
    "AUTHORS_FORMATS",
    "HEAD_PARAM_NAMES",
    "AuthorsBufferError",
    "AuthorsExpert",
    "BufferLayout",
    "BufferPair",
    "ImportReport",
    "buffer_layout",
    "find_buffer_pairs",
    "head_from_authors",
    "head_to_authors",
    "load_authors_buffers",
    "safe_torch_load",
    "scan_authors_buffers",
]

AUTHORS_FORMATS = tuple(SCRIPT_FACTS)  # one per research script, named by its method
# Their ProjectionHead's parameter names, in parameters() order = HeadSpec's flat order.
HEAD_PARAM_NAMES = (
    "projection.weight",
    "projection.bias",
    "fc.weight",
    "fc.bias",
    "layer_norm.weight",
    "layer_norm.bias",
)
_FILE_RE = re.compile(r"^(img|txt)_replay_buffer_(\d+)\.pt$")


class AuthorsBufferError(ValueError):
    """A buffer folder or file that cannot be imported; the message names the file and the fix."""


# ----------------------------------------------------------------------------- safe loading
def safe_torch_load(path: str | os.PathLike):
    """``torch.load(path, weights_only=True)`` on the CPU, with one-line errors.

    A file whose pickle needs anything beyond tensors, lists, dicts and plain values is refused
    by torch's restricted unpickler before any of its code can run; this turns that, and a
    truncated or foreign file, into :class:`AuthorsBufferError` naming the file. Zip-format files
    are memory-mapped, so a file far larger than the memory can still be streamed.
    """
    import pickle

    path = Path(path)
    attempts = ({"mmap": True}, {})
    last: Exception | None = None
    for extra in attempts:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, **extra)
        except pickle.UnpicklingError as exc:
            if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
                raise AuthorsBufferError(
                    f"{path}: refused: the file needs Python objects beyond tensors, lists and "
                    "dicts to load, and it was not executed (files are read with "
                    "torch.load(weights_only=True)); re-save its tensors as plain lists"
                ) from None
            last = exc
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            last = exc
    raise AuthorsBufferError(
        f"{path}: cannot be read as a torch.save file ({type(last).__name__}: "
        f"{str(last).splitlines()[0] if str(last) else 'no details'}); it is truncated or not "
        "a buffer file: copy it again or delete it with its partner"
    )


# ----------------------------------------------------------------------------- pairing
@dataclass(frozen=True)
class BufferPair:
    """``img_replay_buffer_<n>.pt`` and ``txt_replay_buffer_<n>.pt`` of one buffer run."""

    n: int
    img: Path
    txt: Path

    def key(self, fmt: str) -> str:
        """Identifies this pair's content (names, sizes, modification times): an import only
        reuses what it wrote from the same files."""
        parts = [fmt]
        for p in (self.img, self.txt):
            st = p.stat()
            parts += [p.name, str(st.st_size), str(st.st_mtime_ns)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def find_buffer_pairs(src: str | os.PathLike) -> list[BufferPair]:
    """The buffer file pairs in ``src``, sorted by their number ``<n>`` (gaps allowed).

    Raises :class:`AuthorsBufferError` for a missing folder, a folder without buffer files (and
    says where below it they are, when the user passed a parent of the leaf folder) and for a
    file without its partner.
    """
    src = Path(src)
    if not src.is_dir():
        raise AuthorsBufferError(f"{src}: no such folder (expected *_replay_buffer_<n>.pt files)")
    found: dict[str, dict[int, Path]] = {"img": {}, "txt": {}}
    for p in src.iterdir():
        m = _FILE_RE.match(p.name)
        if m and p.is_file():
            found[m.group(1)][int(m.group(2))] = p
    if not found["img"] and not found["txt"]:
        deeper = sorted({str(p.parent) for p in src.rglob("img_replay_buffer_*.pt")})
        hint = f"; buffer files are in {deeper[0]}: pass that folder" if len(deeper) == 1 else ""
        if len(deeper) > 1:
            hint = f"; several folders below it hold buffers ({', '.join(deeper[:3])}): pick one"
        raise AuthorsBufferError(
            f"{src}: no img_replay_buffer_<n>.pt / txt_replay_buffer_<n>.pt files{hint}"
        )
    for side, other in (("img", "txt"), ("txt", "img")):
        lonely = sorted(set(found[side]) - set(found[other]))
        if lonely:
            n = lonely[0]
            raise AuthorsBufferError(
                f"{found[side][n]} has no partner {other}_replay_buffer_{n}.pt in {src}: restore "
                "it, or move both files of that run out of the folder"
            )
    return [BufferPair(n, found["img"][n], found["txt"][n]) for n in sorted(found["img"])]


# ----------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class BufferLayout:
    """What each side of a buffer must hold: a projection head (:class:`HeadSpec`) or a whole
    module (:class:`FlatSpec`, the LoRS / MTT-VL image encoder in ``parameters()`` order)."""

    image: HeadSpec | FlatSpec
    text: HeadSpec

    def spec(self, modality: str) -> HeadSpec | FlatSpec:
        return self.image if modality == "image" else self.text

    def names(self, modality: str) -> tuple[str, ...]:
        spec = self.spec(modality)
        return HEAD_PARAM_NAMES if isinstance(spec, HeadSpec) else spec.names

    def shapes(self, modality: str) -> tuple[tuple[int, ...], ...]:
        spec = self.spec(modality)
        if isinstance(spec, HeadSpec):
            return tuple(tuple(s) for s in spec.shapes.values())
        return spec.shapes

    @property
    def method(self) -> str:
        """The store method these experts drive: ``repblend`` (two heads) or ``lors``."""
        return next(
            k.experts for k in STUDENT_KINDS.values() if isinstance(self.image, k.image_spec_type())
        )

    def manifest_layouts(self) -> dict:
        if isinstance(self.image, HeadSpec):
            img = head_layout(self.image)
        else:
            img = module_layout(self.image)
        return {"image": img, "text": head_layout(self.text)}


def buffer_layout(
    fmt: str,
    *,
    d_img: int,
    d_txt: int,
    dim: int | None = None,
    encoder: torch.nn.Module | None = None,
) -> BufferLayout:
    """The architecture a research buffer of ``fmt`` holds, for the shape checks.

    RepBlend: an image head ``d_img -> dim`` and a text head ``d_txt -> dim`` (their ``dim`` is
    the image embedding width, the default here). LoRS / MTT-VL: the whole image ``encoder``
    (every parameter, ``parameters()`` order; a timm model built with ``num_classes=0``, random
    weights are fine for the shapes) and a text head ``d_txt -> d_img``.
    """
    if fmt not in AUTHORS_FORMATS:
        raise AuthorsBufferError(f"format {fmt!r}: expected one of {AUTHORS_FORMATS}")
    if get_method(fmt).student_kind().frozen_encoder:
        width = int(dim) if dim else int(d_img)
        return BufferLayout(HeadSpec(int(d_img), width), HeadSpec(int(d_txt), width))
    if encoder is None:
        raise AuthorsBufferError(f"format {fmt!r} holds the image encoder: pass encoder=")
    if dim and int(dim) != int(d_img):
        raise AuthorsBufferError(
            f"format {fmt!r}: the text head maps to the image features ({d_img}-d); dim={dim} "
            "cannot differ"
        )
    return BufferLayout(
        FlatSpec.from_module(encoder, trainable_only=False), HeadSpec(int(d_txt), int(d_img))
    )


def _check_list(obj, what: str, where: str) -> list:
    if not isinstance(obj, (list, tuple)):
        raise AuthorsBufferError(
            f"{where}: expected {what} as a list, found {type(obj).__name__}; not a buffer "
            "written by the research scripts"
        )
    return list(obj)


def _check_snapshot(
    params, names: Sequence[str], shapes: Sequence[tuple[int, ...]] | None, where: str
) -> list[torch.Tensor]:
    """Check one snapshot (a list of tensors) against the declared shapes; returns the list.

    Reads only tensor metadata, so on a memory-mapped file it costs no data reads.
    """
    params = _check_list(params, "a snapshot (the network's tensors)", where)
    if not params:
        raise AuthorsBufferError(f"{where}: an empty snapshot")
    if shapes is not None and len(params) != len(shapes):
        raise AuthorsBufferError(
            f"{where}: {len(params)} parameter tensors, but the declared architecture has "
            f"{len(shapes)}; the buffer was made with another network (check the encoder, "
            "the head widths and whether the script kept a classifier)"
        )
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise AuthorsBufferError(f"{where}, parameter {i}: a {type(p).__name__}, not a tensor")
        if not p.is_floating_point():
            raise AuthorsBufferError(f"{where}, parameter {i}: non-float dtype {p.dtype}")
        if shapes is not None and tuple(p.shape) != tuple(shapes[i]):
            name = names[i] if i < len(names) else "?"
            raise AuthorsBufferError(
                f"{where}, parameter {i} ({name}): expected shape {list(shapes[i])}, found "
                f"{list(p.shape)}; the buffer was made with another network or width (check "
                "--image-encoder, --text-encoder and --dim)"
            )
    return params


def _flat(params: list[torch.Tensor]) -> torch.Tensor:
    """A snapshot's tensors concatenated in order: the flat vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in params])


def head_from_authors(params: Sequence[torch.Tensor], spec: HeadSpec) -> torch.Tensor:
    """Their ``ProjectionHead`` parameter list -> our flat head vector ``[spec.numel]``.

    The orders coincide (see the module docstring), so this checks the six shapes and
    concatenates; ``head_forward(flat, h, spec)`` then equals their module on ``h`` (eval mode).
    """
    shapes = tuple(tuple(s) for s in spec.shapes.values())
    return _flat(_check_snapshot(list(params), HEAD_PARAM_NAMES, shapes, f"head {spec}"))


def head_to_authors(flat: torch.Tensor, spec: HeadSpec) -> list[torch.Tensor]:
    """Our flat head vector -> their ``ProjectionHead`` parameter list (copies, their order)."""
    return [v.detach().clone() for v in spec.views(flat).values()]


# ----------------------------------------------------------------------------- reading
@dataclass
class AuthorsExpert:
    """One expert of a buffer pair: flat snapshots per epoch for each side."""

    pair: BufferPair
    index: int  # position in its file's list of experts
    image: list[torch.Tensor]  # [epochs] of [numel_image]
    text: list[torch.Tensor]  # [epochs] of [numel_text]

    @property
    def epochs(self) -> int:
        return len(self.image)


def _open_pair(pair: BufferPair, layout: BufferLayout | None) -> list[dict[str, list]]:
    """Load a pair (memory-mapped where possible) and check its structure and every tensor's
    shape; returns per expert ``{"image": [snapshots], "text": [snapshots]}``."""
    files = {"image": pair.img, "text": pair.txt}
    lists = {
        m: _check_list(safe_torch_load(files[m]), "a list of experts", str(files[m]))
        for m in MODALITIES
    }
    if len(lists["image"]) != len(lists["text"]):
        raise AuthorsBufferError(
            f"{pair.img} holds {len(lists['image'])} experts but {pair.txt} holds "
            f"{len(lists['text'])}: the two files are not from one buffer run"
        )
    if not lists["image"]:
        raise AuthorsBufferError(f"{pair.img}: an empty list of experts")
    experts = []
    for j in range(len(lists["image"])):
        traj = {
            m: _check_list(lists[m][j], "a list of epoch snapshots", f"{files[m]}, expert {j}")
            for m in MODALITIES
        }
        if len(traj["image"]) != len(traj["text"]):
            raise AuthorsBufferError(
                f"{pair.img}, expert {j}: {len(traj['image'])} image snapshots but "
                f"{pair.txt} has {len(traj['text'])}: the files are not from one buffer run"
            )
        for m in MODALITIES:
            names = layout.names(m) if layout is not None else ()
            shapes = layout.shapes(m) if layout is not None else None
            traj[m] = [
                _check_snapshot(s, names, shapes, f"{files[m]}, expert {j}, epoch {t}")
                for t, s in enumerate(traj[m])
            ]
        experts.append(traj)
    return experts


def _experts_of(pair: BufferPair, layout: BufferLayout | None, keep: int | None):
    """Yield the experts of one pair (the only pair in memory), checked and flattened."""
    for j, traj in enumerate(_open_pair(pair, layout)):
        count = len(traj["image"]) if keep is None else keep + 1
        if len(traj["image"]) < count:
            raise AuthorsBufferError(
                f"{pair.img}, expert {j}: {len(traj['image'])} snapshots (epochs 0.."
                f"{len(traj['image']) - 1}), fewer than the {count} to import; lower --epochs"
            )
        yield AuthorsExpert(
            pair,
            j,
            [_flat(traj["image"][t]) for t in range(count)],
            [_flat(traj["text"][t]) for t in range(count)],
        )


def load_authors_buffers(
    src: str | os.PathLike,
    fmt: str,
    *,
    layout: BufferLayout | None = None,
    epochs: int | None = None,
) -> Iterator[AuthorsExpert]:
    """Stream the experts of a research buffer folder, pair by pair (in ``<n>`` order).

    Args:
        src: the folder holding ``img_replay_buffer_<n>.pt`` / ``txt_replay_buffer_<n>.pt``.
        fmt: ``repblend``, ``lors`` or ``mtt-vl`` (which script wrote them).
        layout: the declared architecture; every tensor's shape is checked against it (without
            one, only the list structure is checked).
        epochs: yield snapshots 0..epochs only (default: all).

    Only one file pair is held in memory at a time; an expert's snapshots are flat copies.
    """
    if fmt not in AUTHORS_FORMATS:
        raise AuthorsBufferError(f"format {fmt!r}: expected one of {AUTHORS_FORMATS}")
    for pair in find_buffer_pairs(src):
        yield from _experts_of(pair, layout, epochs)


# ----------------------------------------------------------------------------- scanning
@dataclass
class ImportReport:
    """What an import did (or, with ``dry_run``, would do)."""

    source: Path
    store: Path | None
    format: str
    pairs: list[dict] = field(default_factory=list)  # n, img, txt, experts, epochs
    epochs: list[int] = field(default_factory=list)
    shapes: dict[str, list[list[int]]] = field(default_factory=dict)
    imported: int = 0
    reused: int = 0

    @property
    def num_experts(self) -> int:
        return sum(int(p["experts"]) for p in self.pairs)

    def to_json(self) -> dict:
        return {
            "source": str(self.source),
            "store": str(self.store) if self.store is not None else None,
            "format": self.format,
            "experts": self.num_experts,
            "epochs": self.epochs,
            "shapes": self.shapes,
            "imported": self.imported,
            "reused": self.reused,
            "pairs": self.pairs,
        }


def scan_authors_buffers(
    src: str | os.PathLike, fmt: str, layout: BufferLayout | None = None
) -> ImportReport:
    """Check a buffer folder without importing it: pairs, experts per pair, epochs, and every
    tensor's shape against ``layout``. Files are memory-mapped, so this reads little beyond the
    pickled structure; the first problem raises :class:`AuthorsBufferError`."""
    if fmt not in AUTHORS_FORMATS:
        raise AuthorsBufferError(f"format {fmt!r}: expected one of {AUTHORS_FORMATS}")
    src = Path(src)
    report = ImportReport(src, None, fmt)
    if layout is not None:
        report.shapes = {m: [list(s) for s in layout.shapes(m)] for m in MODALITIES}
    for pair in find_buffer_pairs(src):
        experts = _open_pair(pair, layout)
        counts = [len(t["image"]) for t in experts]
        report.pairs.append(
            {
                "n": pair.n,
                "img": pair.img.name,
                "txt": pair.txt.name,
                "key": pair.key(fmt),
                "experts": len(experts),
                "snapshots": counts,
            }
        )
        del experts
    shortest = min(min(p["snapshots"]) for p in report.pairs)
    report.epochs = list(range(shortest))
    return report
