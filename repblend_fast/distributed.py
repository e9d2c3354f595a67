"""Several processes, one result: ``torch.distributed`` launched by ``torchrun``.

``torchrun --nproc-per-node N -m repblend_fast COMMAND ...`` starts N copies of a command; this
module is what they share (docs/distributed.md). Without torchrun, or with one process,
:func:`init` returns None and every caller keeps its single-process code path, unchanged.

- :func:`init` joins the process group the launcher describes in the environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): gloo for CPU runs; for CUDA
  runs NCCL for device tensors (and gloo for host tensors), each rank on GPU ``LOCAL_RANK``.
  Collectives time out after ``timeout`` seconds.
- :class:`Context` holds the rank and world size and the operations the commands use:
  sharding (``items[rank::world]``), small exchanges of JSON values through the launcher's
  key-value store (barriers, gathering expert records and evaluation rows, sharing a decision of
  rank 0), tensor all-reduce / all-gather / byte broadcast through the process group, and the
  reporting of a failure to the other ranks.
- :class:`StepSync` is what :meth:`repblend_fast.Distiller.step` needs: each rank's share of the
  iteration's trajectories, the one all-reduce of the meta-gradients, the agreed stop after a
  signal and the check that every rank holds the same synthetic set.

Two kinds of waiting. Collectives of the process group (one all-reduce per distillation
iteration, where every rank does the same work) fail after ``timeout`` seconds. Exchanges
through the store happen where ranks do uneven work (one rank trains an expert more than
another, evaluates one seed more, loads a store from a slower disk); they wait as long as the
ranks they wait for are alive (every rank increments a heartbeat counter in the store every few
seconds) and fail once one has been silent for ``timeout`` seconds. A rank that fails publishes
its message in the store first, so the others stop with "rank r failed: <its message>" instead
of a timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import torch

__all__ = [
    "DEFAULT_TIMEOUT",
    "Context",
    "DistributedError",
    "PeerFailed",
    "PeerTimeout",
    "RanksDiverged",
    "StepSync",
    "close",
    "current",
    "init",
    "is_main",
    "launched",
    "map_shards",
    "rank",
    "step_sync",
    "world_size",
]

DEFAULT_TIMEOUT = 600.0
_ERROR = "error"  # store key of the first failure: {"rank", "status", "message"}


class DistributedError(RuntimeError):
    """A run of several processes cannot continue (a rank failed, stopped answering, drifted)."""


class PeerFailed(DistributedError):
    """Another rank failed; it printed its own message (``origin``, ``message``, ``status``)."""

    def __init__(self, origin: int, message: str, status: int | None = None):
        self.origin, self.message, self.status = origin, message, status
        super().__init__(f"stopped because rank {origin} failed: {message}")


class PeerTimeout(DistributedError):
    """A rank stopped answering for longer than the timeout."""


class RanksDiverged(DistributedError):
    """The ranks of a distillation run no longer hold the same synthetic set."""


_CTX: Context | None = None


def launched() -> bool:
    """Whether the environment describes a launch of several processes (``WORLD_SIZE > 1``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def current() -> Context | None:
    """This process's context, or None in a single-process run."""
    return _CTX


def rank() -> int:
    return _CTX.rank if _CTX is not None else 0


def world_size() -> int:
    return _CTX.world if _CTX is not None else 1


def is_main() -> bool:
    """True on rank 0 and in a single-process run: the process that prints and writes."""
    return _CTX is None or _CTX.is_main


def init(device: str | torch.device = "cpu", *, timeout: float = DEFAULT_TIMEOUT) -> Context | None:
    """Join the process group the launcher describes; None without one (or with one process).

    Reuses a default process group the caller initialised already (and then leaves it to the
    caller to destroy). ``device`` picks the backend: ``cuda`` -> NCCL for device tensors (plus
    gloo for host tensors), each rank on GPU ``LOCAL_RANK``; ``cpu`` -> gloo. ``timeout``:
    seconds a collective waits, and how long a silent rank is waited for.
    """
    global _CTX
    if _CTX is not None:
        return _CTX
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if not launched() and not initialised:
        return None
    if not dist.is_available():
        raise DistributedError("this build of torch has no torch.distributed")
    env = os.environ
    try:
        rank_, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", "0"))
        host, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    except (KeyError, ValueError) as exc:
        raise DistributedError(
            f"the environment describes {env.get('WORLD_SIZE')} processes but {exc} is missing "
            "or invalid: launch with torchrun, which sets RANK, LOCAL_RANK, MASTER_ADDR and "
            "MASTER_PORT"
        ) from None
    if world < 2:
        return None
    dev = torch.device(device)
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if local >= n:
            raise DistributedError(
                f"LOCAL_RANK {local} but this machine has {n} GPU(s): launch at most {n} "
                "processes per machine (--nproc-per-node)"
            )
        torch.cuda.set_device(local)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    if not initialised:
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        except Exception as exc:
            raise DistributedError(
                f"rank {rank_} could not join the other {world - 1} process(es) through "
                f"{host}:{port} ({_first_line(exc)}): check the launcher's rendezvous settings "
                "and that every machine started"
            ) from exc
    else:
        rank_, world = dist.get_rank(), dist.get_world_size()
    prefix = f"repblend_fast/{env.get('TORCHELASTIC_RUN_ID', 'run')}/"
    prefix += f"{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    try:
        store = dist.PrefixStore(prefix, _client(host, port, timeout))
        beat = dist.PrefixStore(prefix, _client(host, port, timeout))
    except Exception as exc:
        if not initialised:
            dist.destroy_process_group()
        raise DistributedError(
            f"rank {rank_} cannot reach the launcher's store at {host}:{port} ({_first_line(exc)})"
        ) from exc
    _CTX = Context(rank_, world, local, dev, timeout, store, beat, owns_group=not initialised)
    return _CTX


def close() -> None:
    """Leave the process group (when :func:`init` created it) and forget the context."""
    global _CTX
    ctx, _CTX = _CTX, None
    if ctx is not None:
        ctx._close()


def _client(host: str, port: int, timeout: float):
    import torch.distributed as dist

    return dist.TCPStore(
        host, port, is_master=False, timeout=timedelta(seconds=timeout), wait_for_workers=False
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Context:
    """Rank, world size and the cross-process operations of one launch (see the module
    docstring). Every rank must call the same exchanges and collectives in the same order."""

    def __init__(
        self,
        rank: int,
        world: int,
        local_rank: int,
        device: torch.device,
        timeout: float,
        store,
        beat_store,
        *,
        owns_group: bool,
    ):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device, self.timeout = device, float(timeout)
        self._store, self._owns = store, owns_group
        self._seq = 0
        self._seen: dict[int, tuple[int, float]] = {}
        self._stop = threading.Event()
        interval = max(0.2, min(5.0, self.timeout / 10))
        self._beat = threading.Thread(
            target=self._heartbeat, args=(beat_store, interval), daemon=True, name="heartbeat"
        )
        self._beat.start()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Iterable) -> list:
        """This rank's share of ``items``: every ``world``-th one from position ``rank``."""
        return list(items)[self.rank :: self.world]

    # ----------------------------------------------------------------- store exchanges
    def exchange(self, tag: str, value: Any) -> list[Any]:
        """Every rank's ``value`` (JSON), in rank order; waits for all (see the docstring)."""
        key = f"x/{self._seq}"
        self._seq += 1
        self._op(self._store.set, f"{key}/{self.rank}", json.dumps({"tag": tag, "value": value}))
        self._wait([f"{key}/{r}" for r in range(self.world)], tag)
        got = [json.loads(self._op(self._store.get, f"{key}/{r}")) for r in range(self.world)]
        tags = {g["tag"] for g in got}
        if len(tags) > 1:
            where = ", ".join(f"rank {r} at {g['tag']!r}" for r, g in enumerate(got))
            raise DistributedError(f"the ranks are out of step ({where})")
        return [g["value"] for g in got]

    def barrier(self, tag: str) -> None:
        """Wait until every rank got here (no timeout while they are alive)."""
        self.exchange(tag, None)

    def from_main(self, tag: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` run on rank 0, its (JSON) result on every rank. An exception on rank 0 is
        raised there and published, so the other ranks stop with its message."""
        value = None
        if self.is_main:
            try:
                value = fn()
            except BaseException as exc:
                self.publish_failure(f"{type(exc).__name__}: {exc}", None)
                raise
        return self.exchange(tag, value)[0]

    def _wait(self, keys: list[str], tag: str) -> None:
        delay, next_check = 0.001, time.monotonic() + 1.0
        while not self._op(self._store.check, keys):
            self._raise_if_failed()
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 1.0
                for r, k in enumerate(keys):
                    if r != self.rank and not self._op(self._store.check, [k]):
                        self._check_alive(r, tag, now)
            time.sleep(delay)
            delay = min(2 * delay, 0.1)

    def _check_alive(self, r: int, tag: str, now: float) -> None:
        count = self._op(self._store.add, f"hb/{r}", 0)
        last = self._seen.get(r)
        if last is None or last[0] != count:
            self._seen[r] = (count, now)
        elif now - last[1] > self.timeout:
            raise PeerTimeout(
                f"waited at {tag!r} for rank {r}, which has not answered for "
                f"{self.timeout:g} s (it exited without a message, was killed, or its machine is "
                "unreachable; its own output or the launcher's says which)"
            )

    def _heartbeat(self, store, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                store.add(f"hb/{self.rank}", 1)
            except Exception:
                return  # the store is gone: the waiters find out by themselves

    def _op(self, fn, *args):
        try:
            return fn(*args)
        except DistributedError:
            raise
        except Exception as exc:
            raise DistributedError(
                f"lost the launcher's store ({_first_line(exc)}): the launcher "
                "or rank 0 stopped; their output says why"
            ) from None

    # ----------------------------------------------------------------- failures
    def _error_record(self) -> dict | None:
        try:
            if not self._store.check([_ERROR]):
                return None
            return json.loads(self._store.get(_ERROR))
        except Exception:
            return None

    def _raise_if_failed(self) -> None:
        rec = self._error_record()
        if rec is not None and rec.get("rank") != self.rank:
            raise PeerFailed(int(rec["rank"]), str(rec["message"]), rec.get("status"))

    def publish_failure(self, message: str, status: int | None) -> dict:
        """Record this rank's failure unless another was recorded first; returns the record
        that stands (``{"rank", "status", "message"}``)."""
        mine = {"rank": self.rank, "status": status, "message": message}
        try:
            got = self._store.compare_set(_ERROR, "", json.dumps(mine))
            return json.loads(got)
        except Exception:
            return mine

    def report_failure(self, exc: BaseException, message: str, status: int, *, collective: bool):
        """Publish a failure that ends this rank's command; returns whether this rank should
        print ``message``. A failure every rank meets together (``collective``) is printed by
        rank 0; a failure caused by another rank's is printed by that rank; one several ranks
        meet with the same message is printed once."""
        if isinstance(exc, PeerFailed):
            return False
        if collective:
            return self.is_main
        rec = self.publish_failure(message, status)
        return rec.get("rank") == self.rank or rec.get("message") != message

    def _lost(self, what: str, exc: BaseException) -> DistributedError:
        """The error of a failed collective: another rank's published failure if there is one
        (a failing rank publishes before it exits, so a broken connection is followed by its
        record at once), else a timeout or a lost connection."""
        text = _first_line(exc)
        timed_out = "timeout" in text.lower() or "timed out" in text.lower()
        deadline = time.monotonic() + (0.0 if timed_out else 2.0)
        while True:
            rec = self._error_record()
            if rec is not None and rec.get("rank") != self.rank:
                return PeerFailed(int(rec["rank"]), str(rec["message"]), rec.get("status"))
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if timed_out:
            return PeerTimeout(
                f"{what}: no answer from the other ranks within {self.timeout:g} s "
                "(--dist-timeout): a rank hangs, is far behind or was stopped"
            )
        return DistributedError(f"{what}: lost the other ranks ({text})")

    # ----------------------------------------------------------------- collectives
    def all_reduce_(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place."""
        import torch.distributed as dist

        try:
            dist.all_reduce(t)
        except RuntimeError as exc:
            raise self._lost(what, exc) from None
        return t

    def all_gather(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Every rank's ``t`` stacked ``[world, *t.shape]``."""
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(self.world)]
        try:
            dist.all_gather(parts, t.contiguous())
        except RuntimeError as exc:
            raise self._lost(what, exc) from None
        return torch.stack(parts)

    def broadcast_bytes(self, data: bytes | None, what: str) -> bytes:
        """Rank 0's ``data`` on every rank (host tensors, gloo)."""
        import torch.distributed as dist

        try:
            size = torch.tensor([len(data) if self.is_main else 0], dtype=torch.int64)
            dist.broadcast(size, 0)
            if self.is_main:
                buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            else:
                buf = torch.empty(int(size[0]), dtype=torch.uint8)
            dist.broadcast(buf, 0)
        except RuntimeError as exc:
            raise self._lost(what, exc) from None
        return data if self.is_main else buf.numpy().tobytes()

    def _close(self) -> None:
        self._stop.set()
        if self._owns:
            import torch.distributed as dist

            try:
                dist.destroy_process_group()
            except Exception:
                pass


def map_shards(fn: Callable[[Any], Any], items: Iterable, tag: str) -> list:
    """``[fn(x) for x in items]`` with the items spread over the ranks (``items[rank::world]``)
    and the (JSON) results gathered on every rank, in item order."""
    items = list(items)
    ctx = _CTX
    if ctx is None:
        return [fn(x) for x in items]
    mine = {i: fn(items[i]) for i in range(ctx.rank, len(items), ctx.world)}
    merged: dict[str, Any] = {}
    for part in ctx.exchange(tag, {str(i): v for i, v in mine.items()}):
        merged.update(part)
    return [merged[str(i)] for i in range(len(items))]


# --------------------------------------------------------------------------- distillation
def step_sync(num_trajectories: int) -> StepSync | LocalSync:
    """The :class:`StepSync` of a launch of several processes, else a :class:`LocalSync`."""
    return StepSync(_CTX, num_trajectories) if _CTX is not None else LocalSync()


class LocalSync:
    """:class:`StepSync`'s interface for a single process: every rank's share is the whole
    iteration, and every collective operation does nothing."""

    is_main = True  # the process that writes the run folder
    whole = True  # holds every trajectory of an iteration (the gradient check needs them all)
    stop_source = None  # the run's StopOnSignal

    @property
    def stop_signum(self) -> int | None:
        return self.stop_source.signum if self.stop_source is not None else None

    def mine(self, draws: list) -> list:
        return draws

    def average(self, losses: tuple, grads: dict[str, torch.Tensor]):
        return losses, grads, {}

    def after_step(self, distiller, vals: dict[str, float]) -> None:
        pass

    def start(self, distiller) -> None:
        pass

    def finish(self) -> None:
        pass


def _bitsum(t: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor's bit patterns as int64 (exact, independent of the summation order)."""
    flat = t.detach().contiguous().reshape(-1)
    view = {1: torch.uint8, 2: torch.int16}.get(flat.element_size(), torch.int32)
    return flat.view(view).sum(dtype=torch.int64)


class StepSync:
    """:class:`repblend_fast.Distiller` over several processes (docs/distributed.md §3).

    Every rank draws all K trajectories of an iteration from the same seeded generator and
    unrolls a contiguous block of K / W of them (:meth:`mine`); :meth:`average` sums the ranks'
    means of the losses and meta-gradients in one all-reduce of one flat buffer and divides by
    W, so every rank applies the same update. Every :attr:`check_every` iterations (and after
    the last) :meth:`after_step` compares the bit sums of the parameters across the ranks.
    """

    check_every = 10
    whole = False

    def __init__(self, ctx: Context, num_trajectories: int):
        self.ctx = ctx
        self.is_main = ctx.is_main
        self.per_rank = num_trajectories // ctx.world
        self.stop_source = None  # the run's StopOnSignal: its signal joins the all-reduce
        self.stop_signum: int | None = None

    def mine(self, draws: list) -> list:
        """This rank's block of the iteration's draws."""
        lo = self.ctx.rank * self.per_rank
        return draws[lo : lo + self.per_rank]

    def average(self, losses: tuple, grads: dict[str, torch.Tensor]):
        """``(losses, grads, extra)``: the means over every rank's trajectories, from one
        all-reduce; ``extra`` holds the 0-d stop flag for the iteration's one read-back."""
        names = list(grads)
        parts = [*losses, *(grads[n] for n in names)]
        dev = grads[names[0]].device
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
        stop = self.stop_source is not None and self.stop_source.signum is not None
        self._local_signum = self.stop_source.signum if self.stop_source is not None else None
        flat = torch.cat(
            [p.detach().reshape(-1).to(dev, dtype) for p in parts]
            + [torch.full((1,), float(stop), dtype=dtype, device=dev)]
        )
        self.ctx.all_reduce_(flat, "the meta-gradient all-reduce")
        flat = flat / self.ctx.world
        out, pos = [], 0
        for p in parts:
            n = p.numel()
            out.append(flat[pos : pos + n].reshape(p.shape).to(p.dtype))
            pos += n
        k = len(losses)
        return (
            tuple(out[:k]),
            dict(zip(names, out[k:])),
            {"dist_stop": flat[pos]},
        )

    def after_step(self, distiller, vals: dict[str, float]) -> None:
        """After the iteration's read-back: the agreed stop (some rank had a signal before the
        all-reduce) and, every :attr:`check_every` iterations, the identity check."""
        if vals.get("dist_stop", 0.0) > 0:
            self.stop_signum = self._local_signum or int(signal.SIGTERM)
        done = distiller.iteration + 1
        if done % self.check_every == 0 or done >= distiller.cfg.iterations:
            self.check_identical(distiller._params(), done)

    def check_identical(self, params: dict[str, torch.Tensor], iteration: int) -> None:
        """``RanksDiverged`` unless every rank holds bit-identical ``params``."""
        sums = torch.stack([_bitsum(p) for p in params.values()])
        table = self.ctx.all_gather(sums, "the synthetic-set check").tolist()
        names = list(params)
        bad = {
            r: [n for j, n in enumerate(names) if row[j] != table[0][j]]
            for r, row in enumerate(table)
            if row != table[0]
        }
        if bad:
            where = "; ".join(f"rank {r}: {', '.join(ns)}" for r, ns in bad.items())
            raise RanksDiverged(
                f"after iteration {iteration} the ranks no longer hold the same synthetic set "
                f"({where} differ from rank 0): every rank must run the same code with the same "
                "--threads on the same kind of device; resume from the last checkpoint"
            )

    def start(self, distiller) -> None:
        """Before the first iteration: check that every rank loaded the same expert store and
        give every rank rank 0's state (a resumed run's, or the fresh one) when they differ."""
        from repblend_fast.io import safetensors_bytes

        blob = safetensors_bytes(distiller.state_tensors())
        mine = {
            "state": hashlib.sha256(blob).hexdigest(),
            "store": getattr(distiller.store, "manifest_sha256", None),
            "devices": str(distiller.device.type),
        }
        rows = self.ctx.exchange("distill:start", mine)
        for r, row in enumerate(rows):
            if row["store"] != rows[0]["store"]:
                raise DistributedError(
                    f"rank {r} loaded another expert store than rank 0 (manifest sha256 "
                    f"{str(row['store'])[:12]}… vs {str(rows[0]['store'])[:12]}…): every rank "
                    "must read the same --experts"
                )
            if row["devices"] != rows[0]["devices"]:
                raise DistributedError(
                    f"rank {r} runs on {row['devices']} and rank 0 on {rows[0]['devices']}: "
                    "every rank must use the same --device"
                )
        if any(row["state"] != rows[0]["state"] for row in rows):
            from safetensors.torch import load

            data = self.ctx.broadcast_bytes(blob if self.ctx.is_main else None, "the start state")
            if not self.ctx.is_main:
                distiller._restore(load(data))

    def finish(self) -> None:
        """After rank 0 wrote the outputs: every rank ends together (a failure of the writes
        stops the others too)."""
        self.ctx.barrier("distill:done")
