"""The lists of fused ops and implementations that the documentation, the benchmarks and the package
keep are the one list of ``repblend_fast.ops.registry``: a table or list that names another set of
ops or backends fails here."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

import repblend_fast.ops as ops_pkg
from repblend_fast.kernels import MODULES
from repblend_fast.ops import registry

ROOT = Path(__file__).resolve().parents[1]
IMPL_WORDS = {"reference", "triton", "cuda", "torch"}


def _section(path: Path, heading: str) -> str:
    text = path.read_text()
    start = text.index(heading + "\n")
    nxt = re.search(r"^#{1,3} ", text[start + len(heading) + 1 :], flags=re.M)
    return text[start : start + len(heading) + 1 + (nxt.start() if nxt else len(text))]


def _readme_ops_table() -> list[tuple[str, set[str]]]:
    """``[(op name, {implementations})]`` of README.md's "Fused ops" table, in its order."""
    rows = []
    for line in _section(ROOT / "README.md", "## Fused ops").splitlines():
        m = re.match(r"\|\s*`(\w+)\(.*?\)`\s*\|.*\|\s*([^|]+?)\s*\|$", line)
        if m:
            impls = {w.strip().lower() for w in m.group(2).split(",")}
            rows.append((m.group(1), impls))
    return rows


def test_readme_ops_table_is_the_registry():
    table = _readme_ops_table()
    assert [name for name, _ in table] == list(registry.names())
    for name, impls in table:
        assert impls <= set(IMPL_WORDS), (name, impls)
        assert impls == set(registry.op(name).impls) - {"auto"}, name


def test_readme_impl_override_names_every_implementation():
    lines = (ROOT / "README.md").read_text().splitlines()
    row = next(ln for ln in lines if ln.startswith("| `REPBLEND_IMPL`"))
    named = set(re.findall(r"`(\w+)`", row)) - {"REPBLEND_IMPL", *registry.names()}
    assert named == set(registry.IMPLS) - {"auto"}, row


def test_design_doc_names_every_op_and_implementation():
    conventions = _section(ROOT / "docs" / "design.md", "## 3. Conventions")
    for name in registry.names():
        assert f"`{name}`" in conventions, name
    layout = _section(ROOT / "docs" / "design.md", "## 2. Package layout")
    (line,) = [ln for ln in layout.splitlines() if ln.strip().startswith("_dispatch.py")]
    assert set(re.findall(r"\b(auto|reference|triton|cuda|torch)\b", line)) == set(registry.IMPLS)
    # The double backward of the contrastive loss is analytic, not the reference's VJP.
    assert "VJP of the reference" not in re.sub(r"\s+", " ", conventions)


def test_package_kernels_and_benchmarks_follow_the_registry():
    assert set(registry.names()) <= set(ops_pkg.__all__)
    assert set(MODULES) == set(registry.stems())
    for stem in registry.stems():
        assert (ROOT / "kernels" / f"{stem}.py").is_file(), stem
        assert (ROOT / "csrc" / f"{stem}.cu").is_file(), stem
        assert (ROOT / "benchmarks" / f"bench_{stem}.py").is_file(), stem
    for o in registry.OPS:
        assert callable(getattr(ops_pkg, o.name)), o.name
        assert o.impls[: len(registry.COMMON_IMPLS)] == registry.COMMON_IMPLS


def test_smoke_checks_every_op():
    spec = importlib.util.spec_from_file_location("_smoke", ROOT / "benchmarks" / "smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    assert set(smoke._cases(torch.device("cpu"), big=False)) == set(registry.names())


def test_each_op_takes_exactly_its_registered_implementations():
    from repblend_fast.ops import blend_pairs, contrastive_loss
    from repblend_fast.reference import contrastive as ref

    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).unbind(0)
    tgt = torch.rand(3, 3, generator=g, dtype=torch.float64)
    got = contrastive_loss(img, txt, tgt, logit_scale=2.0, loss="infonce", impl="torch")
    want = ref.contrastive_loss(img, txt, tgt, logit_scale=2.0, loss="infonce")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="impl must be one of"):
        blend_pairs(img[None], txt[None], torch.arange(3)[None], 0.5, impl="torch")
