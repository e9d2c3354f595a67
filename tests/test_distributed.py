"""Several processes, one result (docs/distributed.md): ``torchrun`` with 2 CPU processes (gloo)
on the tiny generic dataset (random resnet18 at 16 px) against single-process runs.

One launch of a worker script (two ranks, the process group initialised once, the commands run
one after another through :func:`repblend_fast.cli.main`) makes everything the tests compare:
a 3-expert store, a K = 2 distillation with each rank's final set, a 2-iteration run, the
resume of a single-process checkpoint, an evaluation, and last a ``buffer`` in which rank 1
fails after writing its expert. The references run in this process, one thread each.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from repblend_fast import distributed
from repblend_fast.cli import main
from repblend_fast.io import load_safetensors

WORKER = r"""
import json, sys, time
from pathlib import Path

from repblend_fast import distributed
from repblend_fast.cli import build_parser, main
from repblend_fast.cli.run import config_from_args, run_distill
from repblend_fast.experts import store as store_mod
from repblend_fast.io import safetensors_bytes, write_atomic

out, single = Path(sys.argv[1]), Path(sys.argv[2])
common, buffer, distill = (json.loads(a) for a in sys.argv[3:6])
ctx = distributed.init("cpu", timeout=60)


def run(argv, what):
    rc = main(argv)
    if rc != 0:
        sys.exit(f"{what} exited with {rc} on rank {ctx.rank}")


run(["buffer", *common, *buffer, "--out", str(out / "experts")], "buffer")
argv = ["distill", *common, *distill, "--experts", str(out / "experts"), "--iterations", "4"]
args = build_parser().parse_args([*argv, "--out", str(out / "run")])
s = run_distill(args, config_from_args(args))
tensors = {"images": s.images, "texts": s.texts, "similarity": s.similarity}
write_atomic(out / f"rank{ctx.rank}.safetensors", safetensors_bytes(tensors))
run([*argv, "--out", str(out / "half"), "--iterations", "2"], "distill 2 iterations")
run([*argv, "--out", str(single / "half"), "--resume"], "resume of a 1-process run")
evaluate = ["evaluate", *common, "--distilled", str(single / "run"), "--dim", "16"]
run([*evaluate, "--num-eval", "3", "--epochs", "3", "--json", str(out / "eval.json")], "eval")

# Last: rank 1 fails once its expert's file is written; rank 0 is training or waiting.
real = store_mod.StoreWriter.write_expert


def write_then_fail(self, *a, **k):
    digest = real(self, *a, **k)
    if ctx.rank == 1:
        raise ValueError("rank 1 ran out of disk after its expert")
    return digest


store_mod.StoreWriter.write_expert = write_then_fail
(out / "failing_at").write_text(repr(time.time()))
sys.exit(main(["buffer", *common, *buffer, "--out", str(out / "killed")]))
"""

THREADS = ["--threads", "1"]
BUFFER = ["--experts", "3", "--epochs", "2", "--dim", "16", "--batch-size", "8", "--no-progress"]
DISTILL = [
    "--pairs", "8", "--batch-size", "4", "--syn-steps", "2", "--set", "sim_rank=2",
    "--set", "num_trajectories=2", "--no-progress",
]  # fmt: skip


def _common(ann, cache):
    return [
        "--dataset", "generic", "--annotations", str(ann), "--image-encoder", "resnet18",
        "--random-init-encoder", "--image-size", "16", "--cache-dir", str(cache), *THREADS,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny_pairs, tmp_path_factory):
    """``single`` (the single-process references), ``out`` (the launch's outputs), ``proc``
    (its ``CompletedProcess``), ``ended`` (when it ended) and ``common`` (the data flags)."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("dist")
    single, out = root / "single", root / "launch"
    common = _common(tiny_pairs, root / "cache")
    distill = [*common, *DISTILL, "--experts", str(single / "experts")]
    try:
        assert main(["buffer", *common, *BUFFER, "--out", str(single / "experts")]) == 0
        assert main(["distill", *distill, "--out", str(single / "run"), "--iterations", "4"]) == 0
        assert main(["distill", *distill, "--out", str(single / "half"), "--iterations", "2"]) == 0
        out.mkdir()
        worker = root / "worker.py"
        worker.write_text(WORKER)
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", str(worker), str(out), str(single), json.dumps(common), json.dumps(BUFFER),
            json.dumps(DISTILL),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        yield SimpleNamespace(single=single, out=out, proc=proc, ended=time.time(), common=common)
    finally:
        torch.set_num_threads(threads)


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    same = a.dtype == b.dtype and a.shape == b.shape
    return same and a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))


def _close(a: dict, b: dict) -> None:
    # Float rounding only. One process takes the mean of the K = 2 trajectories inside one
    # batched unroll (batched heads, one encoder pass over the touched images of both, one VJP);
    # two processes unroll one trajectory each and the all-reduce sums their results, so the
    # same sums are rounded in another order (the first iteration's loss is still bit-equal).
    # Over 4 iterations this moved the images by at most 2.4e-6 (values up to 4.4), the texts
    # and similarity by <= 1e-6: under 5% of this tolerance. Real mistakes are far outside
    # it: unrolling one trajectory instead of two changes the set by up to 4.9.
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=5e-5, msg=k)


def test_the_launch_ran_every_command(runs):
    log = runs.proc.stdout + runs.proc.stderr
    assert (runs.out / "experts" / "manifest.json").is_file(), log
    assert (runs.out / "eval.json").is_file(), log


def test_two_ranks_train_the_same_experts_bit_for_bit(runs):
    one, two = runs.single / "experts", runs.out / "experts"
    assert (two / "manifest.json").read_bytes() == (one / "manifest.json").read_bytes()
    for i in range(3):  # rank 0 trained experts 0 and 2, rank 1 expert 1
        a = load_safetensors(one / f"expert_{i:03d}.safetensors")
        b = load_safetensors(two / f"expert_{i:03d}.safetensors")
        assert sorted(a) == sorted(b)
        assert all(_bitwise(a[k], b[k]) for k in a), i
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_two_ranks_distil_the_single_process_set(runs):
    ref = load_safetensors(runs.single / "run" / "distilled.safetensors")
    written = load_safetensors(runs.out / "run" / "distilled.safetensors")
    _close(ref, written)
    # Both ranks hold the same set, bit for bit; rank 0 alone wrote the run folder.
    r0 = load_safetensors(runs.out / "rank0.safetensors")
    r1 = load_safetensors(runs.out / "rank1.safetensors")
    assert all(_bitwise(r0[k], r1[k]) for k in r0)
    assert _bitwise(written["images"], r0["images"])
    recs = _records(runs.out / "run")
    assert [r["iteration"] for r in recs] == [0, 1, 2, 3]
    # Every rank drew all K trajectories; the record lists them as one process does.
    assert [r["expert"] for r in recs] == [r["expert"] for r in _records(runs.single / "run")]
    assert recs[0]["loss"] == _records(runs.single / "run")[0]["loss"]


def test_checkpoints_resume_with_another_number_of_processes(runs):
    ref = load_safetensors(runs.single / "run" / "distilled.safetensors")
    # A single-process checkpoint (2 iterations) continued to 4 by the two ranks ...
    _close(ref, load_safetensors(runs.single / "half" / "distilled.safetensors"))
    # ... and a two-rank checkpoint continued by one process.
    half = runs.out / "half"
    argv = [*runs.common, *DISTILL, "--experts", str(runs.out / "experts"), "--out", str(half)]
    assert main(["distill", *argv, "--iterations", "4", "--resume"]) == 0
    _close(ref, load_safetensors(half / "distilled.safetensors"))
    assert [r["iteration"] for r in _records(half)] == [0, 1, 2, 3]


def test_evaluation_seeds_spread_over_ranks_give_the_same_table(runs, tmp_path):
    argv = ["evaluate", *runs.common, "--distilled", str(runs.single / "run"), "--dim", "16"]
    argv += ["--num-eval", "3", "--epochs", "3", "--json", str(tmp_path / "e.json")]
    assert main(argv) == 0
    one = json.loads((tmp_path / "e.json").read_text())
    assert json.loads((runs.out / "eval.json").read_text()) == one


def test_a_failing_rank_stops_the_launch_with_its_message(runs):
    text = runs.proc.stdout + runs.proc.stderr
    assert runs.proc.returncode != 0
    # Printed once by the rank that failed (and in the launcher's summary, from its error
    # file); the other rank stopped at its next wait instead of hanging.
    line = "buffer [rank 1]: error: rank 1 ran out of disk after its expert"
    assert line in text
    assert text.split("ChildFailedError")[0].count(line) == 1
    started = float((runs.out / "failing_at").read_text())
    assert runs.ended - started < 60  # the collective timeout of the launch
    killed = runs.out / "killed"
    assert not (killed / "manifest.json").exists()
    assert (killed / "manifest.partial.rank1.json").is_file()  # rank 1 recorded its expert


def test_a_killed_build_finishes_with_one_process_keeping_its_experts(runs, monkeypatch):
    from repblend_fast.experts import train

    killed = runs.out / "killed"
    kept = {p.name for p in killed.glob("expert_*.safetensors")}
    assert "expert_001.safetensors" in kept
    trained = []
    real = train._train_one

    def counted(recipe, student, es, bar):
        trained.append(es)
        return real(recipe, student, es, bar)

    monkeypatch.setattr(train, "_train_one", counted)
    assert main(["buffer", *runs.common, *BUFFER, "--out", str(killed)]) == 0
    assert len(trained) == 3 - len(kept)  # only what no rank had finished
    assert train.expert_seed(0, 1) not in trained
    ref = runs.single / "experts"
    assert (killed / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in ref.iterdir())


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- in one process
class FakeStore:
    """The launcher's key-value store, in memory (the calls Context makes)."""

    def __init__(self):
        self.d: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def set(self, k, v):
        with self.lock:
            self.d[k] = v.encode() if isinstance(v, str) else v

    def get(self, k):
        with self.lock:
            return self.d[k]

    def add(self, k, n):
        with self.lock:
            self.d[k] = str(int(self.d.get(k, b"0")) + n).encode()
            return int(self.d[k])

    def check(self, keys):
        with self.lock:
            return all(k in self.d for k in keys)

    def compare_set(self, k, expected, desired):
        with self.lock:
            cur = self.d.get(k)
            if (cur is None and expected == "") or cur == expected.encode():
                self.d[k] = desired.encode()
            return self.d[k]


def _ctx(rank, store, timeout=0.5):
    return distributed.Context(
        rank, 2, rank, torch.device("cpu"), timeout, store, FakeStore(), owns_group=False
    )


def test_waits_last_while_the_other_rank_is_alive_and_end_when_it_falls_silent():
    store = FakeStore()
    ctx = _ctx(0, store)
    try:
        # Rank 1 works for over twice the timeout but its heartbeat ticks: the exchange waits.
        stop = threading.Event()

        def alive():
            while not stop.wait(0.1):
                store.add("hb/1", 1)

        ticker = threading.Thread(target=alive, daemon=True)
        ticker.start()
        late = json.dumps({"tag": "t", "value": 7})
        threading.Timer(1.2, lambda: store.set("x/0/1", late)).start()
        assert ctx.exchange("t", 3) == [3, 7]
        stop.set()
        ticker.join()
        # Now rank 1 is silent: the next exchange fails after the timeout, naming it.
        t0 = time.monotonic()
        with pytest.raises(distributed.PeerTimeout, match="rank 1, which has not answered"):
            ctx.exchange("u", 1)
        assert time.monotonic() - t0 < 5
        # Ranks that reach different exchanges are out of step (a bug), not a hang.
        store.set("x/2/1", json.dumps({"tag": "other", "value": None}))
        with pytest.raises(distributed.DistributedError, match="out of step"):
            ctx.exchange("mine", None)
    finally:
        ctx._close()


def test_a_published_failure_stops_the_others_and_is_printed_once():
    store = FakeStore()
    a, b = _ctx(0, store), _ctx(1, store)
    try:
        same = "error: --threads x: expected a positive integer"
        assert b.report_failure(ValueError(), same, 2, collective=False)  # first: prints
        assert not a.report_failure(ValueError(), same, 2, collective=False)  # same: does not
        assert a.report_failure(ValueError(), "error: another one", 2, collective=False)
        with pytest.raises(distributed.PeerFailed, match="rank 1 failed: error: --threads x") as e:
            a.exchange("t", None)
        assert e.value.status == 2
        assert not a.report_failure(e.value, str(e.value), 2, collective=False)
        # A failure every rank meets together (a NaN stop, a signal) is printed by rank 0.
        assert a.report_failure(RuntimeError(), "m", 2, collective=True)
        assert not b.report_failure(RuntimeError(), "m", 2, collective=True)
    finally:
        a._close()
        b._close()


def test_trajectories_must_split_evenly_over_the_ranks():
    from repblend_fast.config import DistillConfig

    DistillConfig(num_trajectories=4).validate(world=2)
    DistillConfig(num_trajectories=3).validate(world=1)
    with pytest.raises(ValueError, match="multiple of 2"):
        DistillConfig(num_trajectories=3).validate(world=2)
    with pytest.raises(ValueError, match="multiple of 2"):
        DistillConfig(num_trajectories=1).validate(world=2)
    assert distributed.current() is None and distributed.world_size() == 1
