"""The method registry: the three methods as entries, and a fourth added in this file alone
(docs/design.md, "Adding a method") that distils for one iteration."""

from __future__ import annotations

import math

import pytest
import torch
from test_distill import make_store, small, tiny_encoder

from repblend_fast import methods
from repblend_fast.config import DistillConfig, preset
from repblend_fast.engine.distill import Distiller
from repblend_fast.methods import HeadsStudent, Method, get_method
from repblend_fast.models.heads import init_head_flat
from repblend_fast.report.tables import method_label


def test_the_three_methods_and_what_they_imply():
    assert list(methods.METHOD_REGISTRY)[:3] == ["repblend", "lors", "mtt-vl"]
    rb, lors, mtt = (get_method(m) for m in ("repblend", "lors", "mtt-vl"))
    assert rb.student_kind().name == "heads" and rb.student_kind(symmetric=False).name == "encoder"
    assert lors.student_kind(symmetric=False).name == "encoder"
    assert (rb.eval_every, lors.eval_every, mtt.eval_every) == (20, 10, 10)
    assert preset("demo", method="mtt-vl").similarity == "none"
    assert DistillConfig(method="lors", blend=False).expert_kind == "lors"
    assert DistillConfig(symmetric=False).expert_kind == "lors"
    with pytest.raises(ValueError, match="method must be one of"):
        get_method("nope")
    with pytest.raises(ValueError, match="method"):
        DistillConfig(method="nope").validate()


class HalfFeatureHeads(HeadsStudent):
    """A toy student: RepBlend's heads on the frozen features scaled by one half."""

    name = "toy-heads"
    experts = "toy"
    description = "image + text heads on halved features"

    def embed_image(self, unroller, th_img, img_in, y_b, perm, lam, keep):
        return super().embed_image(unroller, th_img, 0.5 * img_in, y_b, perm, lam, keep)


@pytest.fixture
def toy_method():
    kind = methods.register_student_kind(HalfFeatureHeads())
    method = methods.register_method(
        Method(
            "toy",
            label="Toy",
            student=kind.name,
            defaults={"blend": False, "similarity": "none"},
            eval_every=5,
            learns_similarity=False,
        )
    )
    yield method
    del methods.METHOD_REGISTRY["toy"]
    del methods.STUDENT_KINDS[kind.name]


def test_a_fourth_method_distils_one_iteration(toy_method, tmp_path):
    assert preset("demo", method="toy").similarity == "none"  # the method's defaults
    cfg = small(method="toy", blend=False, similarity="none", iterations=1).validate()
    assert cfg.student == "toy-heads" and cfg.expert_kind == "toy" and not cfg.blending
    with pytest.raises(ValueError, match="identity targets"):
        cfg.replace(similarity="lowrank").validate()
    store = make_store(lambda g: init_head_flat(6, 8, generator=g))
    store.manifest["method"] = "toy"
    g = torch.Generator().manual_seed(0)
    d = Distiller(
        cfg,
        encoder=tiny_encoder(),
        store=store,
        init_images=torch.randn(cfg.pairs, 3, 4, 4, generator=g),
        init_texts=torch.randn(cfg.pairs, 10, generator=g),
        out_dir=tmp_path / "run",
    )
    assert isinstance(d.unroller.kind, HalfFeatureHeads)
    out = d.run(progress=False)
    assert len(d.history) == 1 and math.isfinite(d.history[0]["loss"])
    assert out.similarity is None and torch.isfinite(out.images).all()
    assert method_label({}, "toy") == "Toy"
    # The store of another kind is refused by name.
    store.manifest["method"] = "repblend"
    with pytest.raises(ValueError, match="'toy' experts"):
        Distiller(
            cfg,
            encoder=tiny_encoder(),
            store=store,
            init_images=torch.randn(cfg.pairs, 3, 4, 4, generator=g),
            init_texts=torch.randn(cfg.pairs, 10, generator=g),
        )
