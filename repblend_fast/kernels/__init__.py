"""Triton kernels of repblend_fast (``repblend_fast.kernels``); their sources are the repository's
top-level ``kernels/`` folder.

That folder has no ``__init__.py`` on purpose: with the repository root on the module search path
(``python -m pytest``, ``python -m repblend_fast``, ``torchrun -m ...``, a notebook started in the
root) a regular package there would be imported as the top-level module ``kernels`` and shadow
Hugging Face's ``kernels`` package, which ``transformers`` imports while it loads a text encoder.

An installed wheel carries the kernel modules next to this file (setup.py copies them here). In a
checkout, installed in editable mode or not installed at all (the root on the search path), this
package's search path is extended to the top-level folder, so ``repblend_fast.kernels.contrastive``
imports the same way in all three cases.

Each kernel module imports triton at its own import time; nothing here is imported by ``import
repblend_fast`` (the dispatcher imports a kernel module only when it runs it).
"""

from __future__ import annotations

import os

#: The kernel modules, one per fused op (the dispatcher's Triton status imports all of them).
MODULES = ("blend", "contrastive", "trajectory")


def _source_dir() -> str | None:
    """The checkout's top-level ``kernels/`` folder, or None when the modules sit beside this file
    (an installed wheel) or this file is not inside a repblend_fast checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    if all(os.path.isfile(os.path.join(here, f"{m}.py")) for m in MODULES):
        return None
    root = os.path.dirname(os.path.dirname(here))
    src = os.path.join(root, "kernels")
    ours = os.path.isfile(os.path.join(root, "setup.py")) and all(
        os.path.isfile(os.path.join(src, f"{m}.py")) for m in MODULES
    )
    return src if ours else None


_SRC = _source_dir()
if _SRC is not None and _SRC not in __path__:
    __path__.append(_SRC)
