"""Host synchronisations of one distillation iteration.

Every read of a device value (``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``) dispatches
``aten._local_scalar_dense`` and, on a GPU, stalls the queue. One ``Distiller.step()`` must read
the device once: all its metrics and the NaN-guard/spike-guard decisions come back together in
``distill.read_back`` (one ``tolist`` of one stacked tensor). On a CPU the test counts the
dispatched scalar reads (there must be none: the random draws are read from host tensors with
``tolist``, the checks that used to read values moved to plan time) and the calls of
``read_back`` (exactly one); on a GPU it counts CUDA synchronisations with
``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_distill import setup, small
from torch.utils._python_dispatch import TorchDispatchMode

from repblend_fast import distill as distill_mod


class _ScalarReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


CASES = [
    dict(meta_grad="exact"),
    dict(meta_grad="tesla"),
    dict(meta_grad="exact", guard=True, collapse_window=3),
    dict(meta_grad="tesla", unroll_dropout=True, num_trajectories=2),
    dict(method="lors", blend=False, meta_grad="tesla"),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_one_step_reads_the_device_once(kw, monkeypatch):
    d = setup(small(iterations=5, **kw))
    d.step()  # warm-up: lazy initialisation may read values once
    calls = []
    real = distill_mod.read_back

    def counted(values):
        calls.append(len(values))
        return real(values)

    monkeypatch.setattr(distill_mod, "read_back", counted)
    with _ScalarReads() as reads:
        rec = d.step()
    assert reads.count == 0, f"{reads.count} scalar reads in one step"
    assert len(calls) == 1 and rec["iteration"] == 1


@pytest.mark.gpu
@pytest.mark.parametrize("meta_grad", ["exact", "tesla"])
def test_one_step_synchronises_the_gpu_once(meta_grad):
    cfg = small(iterations=5, meta_grad=meta_grad, guard=True, device="cuda")
    d = setup(cfg)
    d.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            d.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]
