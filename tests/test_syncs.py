"""Host transfers of one distillation iteration: one read-back, no blocking copy.

A GPU step stalls whenever the host waits for the device: a device-to-host read (``.item()``,
``bool(t)``, ``float(t)``, ``.tolist()``, ``.cpu()``, printing a tensor), an op whose output shape
depends on device values (``nonzero``, ``unique``, ``masked_select``, boolean-mask indexing,
``repeat_interleave`` without ``output_size``: each reads a count back), or a blocking
host-to-device copy (``.to("cuda")`` or ``torch.tensor(..., device="cuda")`` from pageable memory
waits for the copy). Budget per iteration, exact and TESLA, ``Distiller.step`` and the step
benchmark's ``FastRunner.iteration``: **one** read (the iteration's numbers, read back together)
and **no** blocking copy (plans and snapshots travel with
:func:`repblend_fast.engine.transfer.to_device`:
pinned, non-blocking).

How it is counted without a GPU: the step runs with its work on the ``meta`` device (shapes and
dtypes, no data) while the host side (the sampler, the store, the plan as drawn) stays on the CPU,
so every host/device boundary a CUDA run would cross is a cpu/meta boundary here, and every op is
classified by the devices it touches (:class:`HostTransfers`):

* a dispatch mode sees ``aten._local_scalar_dense`` on a device tensor (a read; it answers 1 so
  the step can go on), ``aten._to_copy`` / ``aten.copy_`` between host and device (device to host:
  a read, answered with ones; host to device: blocking unless ``non_blocking=True``, which is
  what :func:`to_device` asks for after pinning on CUDA — pinning itself needs a GPU, so this
  machine checks the flag, and the ``gpu`` test below checks the real thing), and the ops whose
  output shape depends on device values (counted, then the step is stopped: a meta tensor has no
  values to size their output with);
* a function mode sees what the dispatcher does not: ``torch.tensor`` / ``torch.as_tensor`` /
  ``torch.asarray`` onto the device (a blocking copy) and ``repr`` / ``str`` / ``format`` of a
  device tensor (printing copies the values to the host; a meta tensor prints without).

Each kind of transfer is injected into ``Distiller.step`` below and must be reported. On CUDA a
``gpu`` test runs a whole step under ``torch.cuda.set_sync_debug_mode("error")`` with the one
read-back allowed.
"""

from __future__ import annotations

import pytest
import torch
from test_distill import setup, small
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from repblend_fast.engine import distill as distill_mod
from repblend_fast.engine.outer import OuterOptimizer

HOST, DEVICE = torch.device("cpu"), torch.device("meta")
aten = torch.ops.aten

# Ops whose output shape depends on device values: each reads a count back to the host.
DATA_DEPENDENT = {
    aten.nonzero.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten._unique.default,
    aten.masked_select.default,
}
MASK_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten._index_put_impl_.default}
FROM_DATA = {"tensor", "as_tensor", "asarray"}
PRINTING = {"__repr__", "__str__", "__format__"}


class DataDependentOp(RuntimeError):
    """An op whose output size needs device values ran on the device."""


def _on_device(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == DEVICE.type


def _bool_index(indices) -> bool:
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()
    )


class _Dispatch(TorchDispatchMode):
    def __init__(self, log: HostTransfers):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        log = self.log
        if func is aten._local_scalar_dense.default and _on_device(args[0]):
            log.reads.append("item")
            return torch.ones((), dtype=args[0].dtype).item()
        if func is aten._to_copy.default:
            src = args[0].device
            dst = torch.device(kwargs.get("device") or src)
            if src.type == DEVICE.type and dst.type == HOST.type:
                log.reads.append("to_host")
                return torch.ones(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
            if src.type == HOST.type and dst.type == DEVICE.type:
                kind = "async_copies" if kwargs.get("non_blocking") else "blocking"
                getattr(log, kind).append(f"to_device {tuple(args[0].shape)}")
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            if dst.device.type == HOST.type and _on_device(src):
                log.reads.append("copy_to_host")
                return dst.fill_(1)
            if _on_device(dst) and src.device.type == HOST.type:
                kind = "async_copies" if non_blocking else "blocking"
                getattr(log, kind).append(f"copy_ {tuple(src.shape)}")
        data_dependent = (
            func in DATA_DEPENDENT
            or (func in MASK_INDEXING and _bool_index(args[1] if len(args) > 1 else None))
            or (func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None)
        )
        if data_dependent and any(_on_device(a) for a in args):
            log.reads.append(str(func))
            raise DataDependentOp(f"{func} on the device reads its output size back")
        return func(*args, **kwargs)


class _Functions(TorchFunctionMode):
    def __init__(self, log: HostTransfers):
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in FROM_DATA and kwargs.get("device") is not None:
            if torch.device(kwargs["device"]).type == DEVICE.type:
                self.log.blocking.append(f"torch.{name}")
        if name in PRINTING and args and _on_device(args[0]):
            self.log.reads.append(f"print ({name})")
        return func(*args, **kwargs)


class HostTransfers:
    """Counts the host transfers of the code run inside it (module docstring): ``reads``
    (device to host), ``blocking`` (host to device, blocking) and ``async_copies`` (host to
    device, non-blocking) — lists of what each was."""

    def __init__(self):
        self.reads: list[str] = []
        self.blocking: list[str] = []
        self.async_copies: list[str] = []
        self._modes = (_Functions(self), _Dispatch(self))

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        return False


def on_meta(d):
    """The Distiller ``d`` (built on the CPU) with its state and work on the meta device; the
    sampler, the store and the drawn plans stay on the host."""
    d.device = DEVICE
    d.x, d.y = d.x.to(DEVICE), d.y.to(DEVICE)
    d.eta_img, d.eta_txt = d.eta_img.to(DEVICE), d.eta_txt.to(DEVICE)
    d.sim_params = {k: v.to(DEVICE) for k, v in d.sim_params.items()}
    d.encoder.to(DEVICE)
    d.opt = OuterOptimizer(d.cfg, d._params())
    return d


def step_transfers(d, monkeypatch, inject=None) -> tuple[HostTransfers, list[int]]:
    """One ``d.step()`` after a warm-up step, counted; also the calls of ``read_back``.
    ``inject(distiller, grads)`` runs in the counted step, after the meta-gradients."""
    with HostTransfers():  # warm-up (lazy initialisation may transfer once); answers reads
        d.step()
    if inject is not None:
        real_meta = type(d)._meta_gradients

        def with_injection(self, *args):
            losses, grads = real_meta(self, *args)
            inject(self, grads)
            return losses, grads

        monkeypatch.setattr(type(d), "_meta_gradients", with_injection)
    calls = []
    real = distill_mod.read_back

    def counted(values):
        calls.append(len(values))
        return real(values)

    monkeypatch.setattr(distill_mod, "read_back", counted)
    log = HostTransfers()
    try:
        with log:
            d.step()
    except DataDependentOp:
        pass  # recorded in log.reads
    return log, calls


CASES = [
    dict(meta_grad="exact"),
    dict(meta_grad="tesla"),
    dict(meta_grad="exact", guard=True, collapse_window=3),
    dict(meta_grad="tesla", unroll_dropout=True, num_trajectories=2),
    dict(meta_grad="tesla", syn_steps=2, num_trajectories=2),
    dict(method="lors", blend=False, meta_grad="tesla"),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_one_step_reads_once_and_never_blocks_on_a_copy(kw, monkeypatch):
    d = on_meta(setup(small(iterations=5, **kw)))
    log, calls = step_transfers(d, monkeypatch)
    assert log.reads == ["to_host"], f"device reads in one step: {log.reads}"
    assert log.blocking == [], f"blocking host-to-device copies in one step: {log.blocking}"
    assert len(calls) == 1, "the one read is read_back's"
    # The plan and the snapshots did cross to the device (the counter sees the boundary).
    assert log.async_copies, "no host-to-device copy seen at all"


# Each injection runs inside Distiller.step (after the meta-gradients) with the step's own
# tensors; the counter must report it.
INJECTIONS = {
    "item": (lambda d, g: g["x"].sum().item(), "reads"),
    "bool": (lambda d, g: bool(g["x"].sum() > 0), "reads"),
    "float": (lambda d, g: float(g["eta_img"]), "reads"),
    "tolist": (lambda d, g: g["y"].tolist(), "reads"),
    "cpu": (lambda d, g: g["y"].cpu(), "reads"),
    "copy_to_host": (lambda d, g: torch.empty(g["y"].shape).copy_(g["y"]), "reads"),
    "print": (lambda d, g: print(g["y"]), "reads"),
    "format": (lambda d, g: f"{g['y']}", "reads"),
    "nonzero": (lambda d, g: g["x"].nonzero(), "reads"),
    "unique": (lambda d, g: torch.unique(g["x"]), "reads"),
    "masked_select": (lambda d, g: g["x"].masked_select(g["x"] > 0), "reads"),
    "bool_mask": (lambda d, g: g["x"][g["x"] > 0], "reads"),
    "to_device": (lambda d, g: torch.ones(3).to(d.device), "blocking"),
    "tensor_on_device": (lambda d, g: torch.tensor(0.5, device=d.device), "blocking"),
    "repeat_interleave": (lambda d, g: torch.repeat_interleave(g["y"].long()[0].abs()), "reads"),
    "copy_from_host": (
        lambda d, g: torch.empty(3, device=d.device).copy_(torch.ones(3)),
        "blocking",
    ),
}


@pytest.mark.parametrize("name", list(INJECTIONS))
def test_every_injected_transfer_is_counted(name, monkeypatch, capsys):
    """Each injection runs after the meta-gradients, the same code in both modes: exact only."""
    inject, kind = INJECTIONS[name]
    d = on_meta(setup(small(iterations=5)))
    log, _ = step_transfers(d, monkeypatch, inject)
    if kind == "reads":  # more than the one read-back (or a step stopped before it)
        assert log.reads != ["to_host"], (name, log.reads)
    else:
        assert log.blocking, (name, log.blocking)


@pytest.mark.parametrize("meta_grad", ["exact", "tesla"])
def test_benchmark_iteration_reads_once_and_never_blocks(meta_grad):
    """The step benchmark times the Distiller's step: its plans carry ``blend`` and ``touched``
    (no per-step read of ``lam``, no ``unique`` on the device) and travel like the Distiller's."""
    from repblend_fast.bench import SHAPE_SETS
    from repblend_fast.bench.inputs import build_step_inputs
    from repblend_fast.bench.runners import make_runner

    inputs = build_step_inputs(SHAPE_SETS["tiny"][0], 3, 0, methods=("repblend",))
    assert all(p.blend is True and p.touched is not None for p in inputs.plans_repblend)
    runner = make_runner(inputs, "repblend-fast", meta_grad, DEVICE, autocast="none")
    with HostTransfers():
        runner.iteration(0)
    with HostTransfers() as log:
        runner.iteration(1)
    assert log.reads == ["item"], log.reads  # the loss, read once
    assert log.blocking == [], log.blocking
    assert log.async_copies


@pytest.mark.gpu
@pytest.mark.parametrize("meta_grad", ["exact", "tesla"])
def test_one_step_synchronises_the_gpu_once(meta_grad, monkeypatch):
    """A whole step with CUDA's sync check set to raise; only ``read_back`` may synchronise."""
    cfg = small(iterations=5, meta_grad=meta_grad, guard=True, device="cuda")
    d = setup(cfg)
    d.step()
    torch.cuda.synchronize()
    real = distill_mod.read_back
    reads = []

    def allowed(values):
        reads.append(1)
        torch.cuda.set_sync_debug_mode("default")
        try:
            return real(values)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(distill_mod, "read_back", allowed)
    torch.cuda.set_sync_debug_mode("error")
    try:
        d.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert reads == [1]
