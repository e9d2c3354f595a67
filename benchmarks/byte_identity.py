"""Byte identity of small seeded runs: records or compares sha256 of what they write.

Trains two tiny expert stores (``buffer --method repblend`` and ``buffer --method lors``) and
distils against them with every method (RepBlend exact, RepBlend TESLA, RepBlend re-encoding
every step, LoRS and MTT-VL), a few iterations each, on a generated 30-pair dataset at 16 px with
one torch thread. Every tensor file written (expert files, checkpoints, distilled sets: tensors and
header), the loss column of ``metrics.jsonl`` and the scores of ``evaluate`` on two of the sets
are hashed.

A refactor that must change no number runs this before and after::

    python benchmarks/byte_identity.py --write /tmp/ident_before.json
    ...edit...
    python benchmarks/byte_identity.py --check /tmp/ident_before.json

``--check`` exits 1 and names every file whose hash differs (or that is missing or new).
About half a minute on one core.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path


def make_pairs(root: Path) -> Path:
    """The 30 random 16-px images with distinct captions the test suite uses (tests/conftest.py)."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow", "black", "white"]
    shapes = ["square", "circle", "stripe", "dot", "cross"]
    rows = []
    for i in range(30):
        arr = (rng.random((16, 16, 3)) * 255).astype("uint8")
        Image.fromarray(arr).save(root / f"img{i:02d}.png")
        rows.append(
            {
                "image": f"img{i:02d}.png",
                "caption": f"a {colours[i % 6]} {shapes[i % 5]} number {i}",
            }
        )
    ann = root / "pairs.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ann


def _common(ann: Path, cache: Path) -> list[str]:
    return [
        "--dataset", "generic", "--annotations", str(ann), "--image-encoder", "resnet18",
        "--random-init-encoder", "--image-size", "16", "--cache-dir", str(cache),
        "--threads", "1", "--no-progress",
    ]  # fmt: skip


BUFFERS = {
    "experts_repblend": ["--method", "repblend", "--experts", "2", "--epochs", "2", "--dim", "16"],
    "experts_lors": ["--method", "lors", "--experts", "1", "--epochs", "2"],
}

_SMALL = ["--pairs", "8", "--batch-size", "4", "--syn-steps", "2", "--iterations", "3",
          "--set", "sim_rank=2", "--set", "checkpoint_every=2"]  # fmt: skip

_LORS = ["--set", "lr_lr=1e-4", "--set", "max_start_epoch=1"]

RUNS = {
    "repblend_exact": ("experts_repblend", ["--method", "repblend", "--meta-grad", "exact"]),
    "repblend_tesla": ("experts_repblend", ["--method", "repblend", "--meta-grad", "tesla"]),
    "repblend_reencode": ("experts_repblend", ["--method", "repblend", "--no-share-encoder"]),
    "lors": ("experts_lors", ["--method", "lors", *_LORS]),
    "mtt_vl": ("experts_lors", ["--method", "mtt-vl", *_LORS]),
}  # fmt: skip

EVALUATED = ["repblend_exact", "lors"]  # scored by ``evaluate`` (fresh heads, one seed, 2 epochs)


def _sha(path: Path) -> str:
    """sha256 of a .safetensors file's tensors and header, less the metrics file's record
    (``metrics.jsonl`` holds timings, so a checkpoint's note of its size and hash varies)."""
    import struct

    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header.get("__metadata__", {}).pop("metrics", None)
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    h.update(raw[8 + n :])
    return h.hexdigest()


def _hash_folder(folder: Path, prefix: str, out: dict[str, str]) -> None:
    for p in sorted(folder.rglob("*.safetensors")):
        out[f"{prefix}/{p.relative_to(folder)}"] = _sha(p)
    metrics = folder / "metrics.jsonl"
    if metrics.exists():
        losses = [json.loads(x).get("loss") for x in metrics.read_text().splitlines()]
        out[f"{prefix}/metrics.jsonl[loss]"] = hashlib.sha256(repr(losses).encode()).hexdigest()


def run_all(work: Path) -> dict[str, str]:
    import torch

    from repblend_fast.cli import main

    torch.set_num_threads(1)
    ann = make_pairs(work / "pairs")
    cache = work / "cache"
    hashes: dict[str, str] = {}
    for name, extra in BUFFERS.items():
        out = work / name
        argv = ["buffer", *_common(ann, cache), *extra, "--batch-size", "8", "--out", str(out)]
        if main(argv) != 0:
            raise SystemExit(f"buffer {name} failed")
        _hash_folder(out, name, hashes)
    for name, (experts, extra) in RUNS.items():
        out = work / name
        argv = ["distill", *_common(ann, cache), "--experts", str(work / experts),
                "--out", str(out), *_SMALL, *extra]  # fmt: skip
        if main(argv) != 0:
            raise SystemExit(f"distill {name} failed")
        _hash_folder(out, name, hashes)
    for name in EVALUATED:
        js = work / f"eval_{name}.json"
        argv = ["evaluate", "--distilled", str(work / name), *_common(ann, cache)[:-1],
                "--num-eval", "1", "--epochs", "2", "--dim", "16", "--json", str(js)]  # fmt: skip
        if main(argv) != 0:
            raise SystemExit(f"evaluate {name} failed")
        scores = json.dumps(json.loads(js.read_text())["methods"], sort_keys=True)
        hashes[f"evaluate/{name}"] = hashlib.sha256(scores.encode()).hexdigest()
    return hashes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", metavar="FILE", help="record the hashes in FILE")
    mode.add_argument("--check", metavar="FILE", help="compare with the hashes in FILE")
    ap.add_argument("--keep", metavar="DIR", help="run in DIR and keep it (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.keep:
        hashes = run_all(Path(args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="byte_identity_") as tmp:
            hashes = run_all(Path(tmp))
    if args.write:
        Path(args.write).write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
        print(f"{len(hashes)} hashes written to {args.write}")
        return 0
    ref = json.loads(Path(args.check).read_text())
    bad = []
    for key in sorted(set(ref) | set(hashes)):
        if key not in hashes:
            bad.append(f"missing: {key}")
        elif key not in ref:
            bad.append(f"new: {key}")
        elif ref[key] != hashes[key]:
            bad.append(f"differs: {key}")
    for line in bad:
        print(line)
    same = sum(1 for k in ref if hashes.get(k) == ref[k])
    print(f"{same} of {len(ref)} equal")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
