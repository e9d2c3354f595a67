"""Faults of older torch / Triton releases that the project routes around, one rule each.

The project supports two version sets (setup.py): the development one (torch 2.14.1, Triton 3.8)
and the GPU machine's fixed image (torch 2.11.0, Triton 3.6.0). Each rule below names the
versions it was measured on, what goes wrong, and what the project does instead; callers state the
returned reason where they take the other route. A fault that could be fixed in the project's own
code is fixed there instead (the cwcl loss kernel, restructured so that Triton 3.6 compiles it).
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging

from torch.torch_version import TorchVersion

logger = logging.getLogger("repblend_fast.known_faults")

INDUCTOR_TESLA_FIXED_IN = "2.12"
"""torch 2.11.0's inductor computes the compiled TESLA step wrongly (on the CPU: relative error
0.42 in the meta-gradient of x and 0.35 in y against eager; its ``aot_eager`` backend, the same
traced graphs without inductor's code generation, agrees with eager; torch 2.14.1's inductor
agrees too). Not measured on a GPU nor on torch 2.12-2.13, so the rule covers every device and
every release before 2.12."""

INTERPRETER_NUMPY_FIXED_IN = ("3.8", "2.4")
"""Triton 3.6.0's interpreter (``TRITON_INTERPRET=1``) fails under numpy >= 2.4 ("only
0-dimensional arrays can be converted to Python scalars"); Triton 3.8 runs under numpy 2.4.6.
Triton 3.7 was not measured, so the rule covers every release before 3.8. The interpreter serves
CPU tests and dry runs only: on a GPU the compiled kernels never touch numpy."""


def step_compile_backend(meta_grad: str, backend: str, torch_version: str) -> tuple[str, str]:
    """The ``torch.compile`` backend of the compiled unroll step, and why.

    ``backend`` is the one asked for; TESLA's step under inductor on torch before 2.12 goes
    through ``aot_eager`` (dynamo and AOTAutograd trace the same graph; no code generation, so no
    fused speed-up, but the right numbers).
    """
    if (
        backend == "inductor"
        and meta_grad == "tesla"
        and TorchVersion(torch_version) < INDUCTOR_TESLA_FIXED_IN
    ):
        why = (
            f"torch {torch_version} < {INDUCTOR_TESLA_FIXED_IN}: inductor computes the compiled "
            "TESLA step wrongly, so it is traced with aot_eager (no code generation)"
        )
        _warn_once(why)
        return "aot_eager", why
    return backend, f"{backend} as configured"


@functools.cache
def _warn_once(why: str) -> None:
    logger.warning("%s", why)


def triton_interpreter_fault(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's CPU interpreter cannot run with these versions, or None when it can."""
    triton_ok, numpy_bad = INTERPRETER_NUMPY_FIXED_IN
    if TorchVersion(triton_version) < triton_ok and TorchVersion(numpy_version) >= numpy_bad:
        return (
            f"Triton {triton_version}'s interpreter fails under numpy {numpy_version} (>= "
            f"{numpy_bad}; Triton {triton_ok} runs there): install numpy<{numpy_bad} for "
            "TRITON_INTERPRET=1"
        )
    return None


@functools.cache
def installed_version(package: str) -> str | None:
    """The installed distribution's version, or None (without importing the package)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
