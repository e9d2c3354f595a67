"""``repblend_fast.known_faults``: each rule per version, and the code paths that follow it.

The rules themselves were measured on both version sets (torch 2.11.0 / Triton 3.6.0, the GPU
machine's image, and torch 2.14.1 / Triton 3.8); here each is pinned on version strings, so the
tests say what happens on each set whichever one runs them. ``.ci/gpu_image_rehearsal.sh`` runs
the real thing on the old set (the compiled TESLA step against eager, the interpreter tests).
"""

from __future__ import annotations

import pytest
import torch

from repblend_fast import known_faults
from repblend_fast.known_faults import step_compile_backend, triton_interpreter_fault


@pytest.mark.parametrize(
    ("meta_grad", "asked", "version", "want"),
    [
        ("tesla", "inductor", "2.11.0+cu130", "aot_eager"),  # the GPU image: routed
        ("tesla", "inductor", "2.11.0", "aot_eager"),
        ("tesla", "inductor", "2.12.0", "inductor"),
        ("tesla", "inductor", "2.14.1", "inductor"),  # the development set: inductor
        ("exact", "inductor", "2.11.0+cu130", "inductor"),  # exact is right on 2.11
        ("tesla", "aot_eager", "2.11.0", "aot_eager"),
    ],
)
def test_step_compile_backend_per_version(meta_grad, asked, version, want):
    backend, why = step_compile_backend(meta_grad, asked, version)
    assert backend == want
    if want != asked:
        assert version in why and "TESLA" in why and "aot_eager" in why


@pytest.mark.parametrize(("version", "want"), [("2.11.0", "aot_eager"), ("2.14.1", "inductor")])
def test_unroller_compiles_the_tesla_step_with_the_routed_backend(monkeypatch, version, want):
    """The Unroller hands ``torch.compile`` the routed backend for TESLA's step (and the asked one
    for exact and for the encoder); ``torch.compile`` is replaced by a recorder, so nothing is
    compiled."""
    from repblend_fast.bench import SHAPE_SETS, build_step_inputs, make_runner

    seen = []

    def fake_compile(fn, **kwargs):
        seen.append((fn.__name__, kwargs.get("backend")))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch, "__version__", version)
    inputs = build_step_inputs(SHAPE_SETS["tiny"][0], 2, 0, methods=("repblend",))
    for meta_grad in ("exact", "tesla"):
        seen.clear()
        runner = make_runner(inputs, "repblend-fast", meta_grad, "cpu", compile="step")
        runner.grads_at_start(inputs.plans_repblend[0])
        step = {b for name, b in seen if name == "_func_step_grads"}
        encoder = {b for name, b in seen if name == "_encode_eager"}
        assert step == {want if meta_grad == "tesla" else "inductor"}, seen
        assert encoder == {"inductor"}, seen


@pytest.mark.parametrize(
    ("triton_v", "numpy_v", "broken"),
    [
        ("3.6.0", "2.5.2", True),  # the GPU image's pair: its dry run cannot interpret
        ("3.6.0", "2.4.0", True),
        ("3.6.0", "2.3.5", False),  # the rehearsal's pin
        ("3.8.0", "2.4.6", False),  # the development set
    ],
)
def test_interpreter_fault_per_version(triton_v, numpy_v, broken):
    why = triton_interpreter_fault(triton_v, numpy_v)
    assert (why is not None) == broken
    if broken:
        assert triton_v in why and numpy_v in why and "numpy<2.4" in why


def test_dispatcher_refuses_the_interpreter_with_its_reason(monkeypatch):
    pytest.importorskip("triton")
    from repblend_fast.ops import _dispatch

    versions = {"triton": "3.6.0", "numpy": "2.5.2"}
    monkeypatch.setattr(_dispatch, "installed_version", versions.get)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, why = _dispatch.triton_status(torch.device("cpu"))
    assert not ok and "numpy<2.4" in why
    with pytest.raises(RuntimeError, match="numpy<2.4"):
        _dispatch.resolve_impl("blend_pairs", "triton", [torch.zeros(1)])
    versions["numpy"] = "2.3.5"
    assert _dispatch.triton_status(torch.device("cpu"))[0]


def test_installed_version_reads_metadata_without_importing():
    assert known_faults.installed_version("torch") == torch.__version__.split("+")[0] or (
        known_faults.installed_version("torch") == torch.__version__
    )
    assert known_faults.installed_version("no-such-distribution-xyz") is None
