"""The fused ops, in one list: what each is called, where its kernels live and which
implementations it has.

Everything that enumerates the ops reads this list: the dispatcher (which implementations an op
accepts), the tests of the CUDA extension's registrations and of the Triton kernels' compilation,
``benchmarks/smoke.py`` (one check per op) and ``benchmarks/gpu_check.sh`` (one benchmark stage per
kernel stem, :func:`stems`). The documentation's op table
(README.md, "Fused ops") is compared with it by ``tests/test_docs_sync.py``.

Implementations (``impl=``):

* ``auto``: the dispatcher's choice (``repblend_fast.ops._dispatch``);
* ``reference``: the plain-torch specification (``repblend_fast.reference``), every op;
* ``triton``: the Triton kernels (``kernels/<stem>.py``), every op;
* ``cuda``: the compiled extension (``csrc/<stem>.cu``), every op;
* ``torch``: ``contrastive_loss`` only: the fused kernels' own formulas (saved statistics,
  analytic gradients) in plain torch ops and any floating dtype
  (``repblend_fast.ops.contrastive_torch``), to check the autograd layer in float64; never chosen
  by ``auto``.
"""

from __future__ import annotations

from dataclasses import dataclass

COMMON_IMPLS = ("auto", "reference", "triton", "cuda")
"""The implementations every op has."""


@dataclass(frozen=True)
class Op:
    """One fused op.

    Attributes:
        name: the function in ``repblend_fast.ops``.
        stem: the file stem of its kernels: ``kernels/<stem>.py``, ``csrc/<stem>.cu``,
            ``benchmarks/bench_<stem>.py`` (the two trajectory ops share one).
        cuda_ops: the ``torch.ops.repblend_fast`` operators it calls.
        triton_kernels: the ``@triton.jit`` kernels its launchers start.
        extra_impls: implementations beyond :data:`COMMON_IMPLS`.
    """

    name: str
    stem: str
    cuda_ops: tuple[str, ...]
    triton_kernels: tuple[str, ...]
    extra_impls: tuple[str, ...] = ()

    @property
    def impls(self) -> tuple[str, ...]:
        return COMMON_IMPLS + self.extra_impls


OPS = (
    Op(
        "contrastive_loss",
        "contrastive",
        ("contrastive_fwd", "contrastive_bwd"),
        (
            "_cos_kernel",
            "_loss_kernel",
            "_loss_final_kernel",
            "_dz_kernel",
            "_dscale_final_kernel",
            "_dx_kernel",
        ),
        extra_impls=("torch",),
    ),
    Op(
        "blend_pairs",
        "blend",
        ("blend_gather", "blend_scatter"),
        ("_blend_gather_kernel", "_blend_scatter_kernel"),
    ),
    Op(
        "trajectory_distance",
        "trajectory",
        ("trajectory_distance_partials", "trajectory_finalize"),
        ("_dist_partial_kernel", "_final_kernel"),
    ),
    Op(
        "trajectory_terms",
        "trajectory",
        ("trajectory_terms_partials", "trajectory_finalize"),
        ("_terms_partial_kernel", "_final_kernel"),
    ),
)

IMPLS = tuple(dict.fromkeys(i for op in OPS for i in op.impls))
"""Every implementation name some op accepts."""


def _unique(items) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def op(name: str) -> Op:
    """The op called ``name`` (``KeyError`` naming the known ones otherwise)."""
    for o in OPS:
        if o.name == name:
            return o
    raise KeyError(f"no fused op {name!r}; the ops are {names()}")


def names() -> tuple[str, ...]:
    """The ops' function names, in order."""
    return tuple(o.name for o in OPS)


def stems() -> tuple[str, ...]:
    """The kernel file stems, in order, each once."""
    return _unique(o.stem for o in OPS)


def cuda_ops() -> tuple[str, ...]:
    """Every ``torch.ops.repblend_fast`` operator the ops call, each once."""
    return _unique(n for o in OPS for n in o.cuda_ops)


def triton_kernels() -> tuple[str, ...]:
    """Every Triton kernel the ops launch, each once."""
    return _unique(n for o in OPS for n in o.triton_kernels)
