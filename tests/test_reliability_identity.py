"""What makes the experts is part of a store's recipe and is checked (docs/reliability.md §1): the
image size, and the manifest fields that tie each expert file to its position.
Built on the tiny data of tests/test_reliability.py (16-px images).
"""

from __future__ import annotations

import json

import pytest
from test_reliability import Env, _buffer_args, _copy, _err

from repblend_fast.cli import main


@pytest.fixture(scope="module")
def env(tiny_pairs, tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("identity"), tiny_pairs)
    e.store = e.root / "experts"
    assert e.buffer(e.store) == 0
    return e


def _at_size(argv: list[str], size: int) -> list[str]:
    argv = list(argv)
    argv[argv.index("--image-size") + 1] = str(size)
    return argv


def test_the_image_size_is_recorded_in_the_manifest_and_its_recipe(env):
    from repblend_fast.experts.manifest import hash_config, recipe_of

    man = json.loads((env.store / "manifest.json").read_text())
    assert man["image_size"] == 16
    other = {**man, "image_size": 32}
    assert hash_config(recipe_of(other)) != hash_config(recipe_of(man))


def test_a_buffer_rerun_at_another_image_size_is_refused(env, tmp_path, capsys):
    store = _copy(env.store, tmp_path / "experts")
    before = (store / "expert_000.safetensors").read_bytes()
    capsys.readouterr()
    assert main(_at_size(_buffer_args(env.ann, env.cache, store), 32)) == 2
    err = capsys.readouterr().err
    assert "image_size: 16 -> 32" in err and "--overwrite" in err, err
    assert (store / "expert_000.safetensors").read_bytes() == before


def test_distill_at_another_image_size_than_the_experts_is_refused(env, tmp_path, capsys):
    capsys.readouterr()
    assert main(_at_size(env.distill_args(env.store, tmp_path / "run", 1), 32)) == 2
    err = capsys.readouterr().err
    assert "image_size: store has 16, run wants 32" in err and "--image-size" in err, err
    assert not (tmp_path / "run" / "distilled.safetensors").exists()


def test_a_store_without_a_recorded_size_is_still_usable(env):
    """Stores of older versions (and imported ones) record no size: it is not checked."""
    from repblend_fast.experts import TrajectoryStore

    store = TrajectoryStore.load(env.store, verify=False)
    with pytest.raises(ValueError, match="image_size"):
        store.check_compatible(image_size=32)
    del store.manifest["image_size"]
    store.check_compatible(image_size=32)


def test_removing_expert_seeds_is_refused(env, tmp_path, capsys):
    store = _copy(env.store, tmp_path / "experts")
    man = json.loads((store / "manifest.json").read_text())
    del man["expert_seeds"]
    (store / "manifest.json").write_text(json.dumps(man))
    capsys.readouterr()
    assert env.distill(store, tmp_path / "run", 1) == 2
    assert "lacks expert_seeds" in _err(capsys)


def test_a_reordered_files_list_names_the_position(env, tmp_path, capsys):
    store = _copy(env.store, tmp_path / "experts")
    man = json.loads((store / "manifest.json").read_text())
    man["files"] = man["files"][::-1]
    man["expert_seeds"] = man["expert_seeds"][::-1]  # a consistent edit of both lists
    (store / "manifest.json").write_text(json.dumps(man))
    capsys.readouterr()
    assert env.distill(store, tmp_path / "run", 1) == 2
    assert "lists it at position 0" in _err(capsys)


def test_a_store_of_an_earlier_version_is_rebuilt_with_its_size_not_refused(env, tmp_path, caplog):
    """Caches of earlier versions (demo, study) hold stores without image_size: a rerun of the
    same command rebuilds them, it does not stop with "other settings"."""
    from repblend_fast.experts.manifest import hash_config, recipe_of

    store = _copy(env.store, tmp_path / "experts")
    man = json.loads((store / "manifest.json").read_text())
    del man["image_size"]
    man["recipe_sha"] = hash_config(recipe_of(man))
    (store / "manifest.json").write_text(json.dumps(man))
    caplog.clear()
    assert env.buffer(store) == 0
    assert "earlier version without a recorded image size" in caplog.text
    assert json.loads((store / "manifest.json").read_text())["image_size"] == 16
    for name in ("expert_000.safetensors", "expert_001.safetensors"):
        assert (store / name).read_bytes() == (env.store / name).read_bytes()
