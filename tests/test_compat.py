"""Compatibility with the research code: their expert buffers, distilled checkpoints and
distillation flags (repblend_fast.compat and the import-experts / authors / export /
import-distilled commands).

The fixtures are written here with ``torch.save`` in exactly the structure their buffer scripts
save: a list of experts, each a list of epoch snapshots, each the network's ``parameters()`` in
order (their projection head: ``projection``, GELU, ``fc``, dropout, residual, ``layer_norm``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from repblend_fast.cli import main
from repblend_fast.compat import (
    FLAG_KINDS,
    RULES,
    AuthorsBufferError,
    AuthorsFlagError,
    buffer_layout,
    export_authors_checkpoint,
    head_from_authors,
    head_to_authors,
    import_authors_buffers,
    import_distilled,
    parse_authors_flags,
    script_flags,
)
from repblend_fast.engine.distill import DistilledSet
from repblend_fast.experts import TrajectoryStore
from repblend_fast.models.heads import HeadSpec, head_forward


class TheirHead(nn.Module):
    """Their ProjectionHead's structure (module names and order as in their networks.py)."""

    def __init__(self, embedding_dim: int, projection_dim: int):
        super().__init__()
        self.projection = nn.Linear(embedding_dim, projection_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(projection_dim, projection_dim)
        self.dropout = nn.Dropout(0.1)
        self.layer_norm = nn.LayerNorm(projection_dim)

    def forward(self, x):
        projected = self.projection(x)
        x = self.fc(self.gelu(projected))
        x = self.dropout(x) + projected
        return self.layer_norm(x)


def _trajectory(module: nn.Module, epochs: int, g: torch.Generator) -> list[list[torch.Tensor]]:
    """Snapshots 0..epochs of ``module``'s parameters() (epoch 0 = the module itself)."""
    base = [p.detach().clone() for p in module.parameters()]
    return [
        [b + 0.01 * t * torch.randn(b.shape, generator=g) for b in base] for t in range(epochs + 1)
    ]


def _write_buffers(folder: Path, files, make_img, make_txt, epochs: int, seed: int = 0) -> dict:
    """Their buffer files: ``files`` = [(n, experts in the file)], written in the given (shuffled)
    order. Returns {n: (image experts, text experts)} of the saved lists."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    saved = {}
    for n, k in files:
        img = [_trajectory(make_img(), epochs, g) for _ in range(k)]
        txt = [_trajectory(make_txt(), epochs, g) for _ in range(k)]
        torch.save(img, folder / f"img_replay_buffer_{n}.pt")
        torch.save(txt, folder / f"txt_replay_buffer_{n}.pt")
        saved[n] = (img, txt)
    return saved


def _flat(snapshot: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in snapshot])


# Small RepBlend heads for the library tests: image 12 -> 12, text 10 -> 12 (their D is the
# image embedding width).
D_IMG, D_TXT = 12, 10
# Shuffled file numbers with gaps (1, 2, 4 are missing), several experts per file.
FILES = [(3, 1), (0, 2), (5, 2)]


@pytest.fixture
def repblend_buffers(tmp_path):
    src = tmp_path / "buffer" / "flickr" / "nfnet_bert" / "InfoNCE"
    saved = _write_buffers(
        src, FILES, lambda: TheirHead(D_IMG, D_IMG), lambda: TheirHead(D_TXT, D_IMG), epochs=3
    )
    return src, saved


def _in_store_order(saved: dict) -> list[tuple[list, list]]:
    return [(img, txt) for n in sorted(saved) for img, txt in zip(*saved[n])]


# --------------------------------------------------------------------------- heads
def test_their_head_converts_to_ours_exactly():
    """head_forward on the converted flat vector equals their module loaded with their list."""
    torch.manual_seed(0)
    spec = HeadSpec(7, 5)
    theirs = TheirHead(7, 5).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine
        theirs.layer_norm.weight.uniform_(0.5, 1.5)
        theirs.layer_norm.bias.uniform_(-0.5, 0.5)
    params = list(theirs.parameters())
    flat = head_from_authors(params, spec)
    x = torch.randn(9, 7)
    torch.testing.assert_close(head_forward(flat, x, spec), theirs(x), rtol=0, atol=1e-6)
    back = head_to_authors(flat, spec)
    assert all(torch.equal(a, b.detach()) for a, b in zip(back, params))
    with pytest.raises(AuthorsBufferError, match=r"parameter 2 \(fc.weight\)"):
        head_from_authors([params[0], params[1], torch.zeros(5, 4), *params[3:]], spec)


# --------------------------------------------------------------------------- buffers (library)
def test_import_is_bit_exact_in_number_order(repblend_buffers, tmp_path):
    src, saved = repblend_buffers
    layout = buffer_layout("repblend", d_img=D_IMG, d_txt=D_TXT)
    report = import_authors_buffers(
        src, tmp_path / "store", "repblend", layout, image_encoder="i", text_encoder="t"
    )
    assert report.num_experts == 5 and report.imported == 5
    assert [p["n"] for p in report.pairs] == [0, 3, 5]  # by number, not by listing order
    store = TrajectoryStore.load(tmp_path / "store")
    assert store.method == "repblend" and store.epochs == [0, 1, 2, 3]
    assert store.manifest["dim"] == D_IMG and store.manifest["d_txt"] == D_TXT
    for i, (img, txt) in enumerate(_in_store_order(saved)):
        for t in range(4):
            assert torch.equal(store.snapshot(i, t, "image"), _flat(img[t]))
            assert torch.equal(store.snapshot(i, t, "text"), _flat(txt[t]))
    # The image head of an imported expert is their head, numerically.
    x = torch.randn(3, D_IMG)
    theirs = TheirHead(D_IMG, D_IMG).eval()
    first_img = _in_store_order(saved)[0][0][2]
    with torch.no_grad():
        for p, v in zip(theirs.parameters(), first_img):
            p.copy_(v)
    ours = head_forward(store.snapshot(0, 2, "image"), x, store.spec("image"))
    torch.testing.assert_close(ours, theirs(x), rtol=0, atol=1e-6)


def test_interrupted_import_continues(repblend_buffers, tmp_path, monkeypatch):
    import repblend_fast.compat.buffers as buffers

    src, saved = repblend_buffers
    layout = buffer_layout("repblend", d_img=D_IMG, d_txt=D_TXT)
    real = buffers._experts_of

    def interrupted(pair, *a, **kw):
        if pair.n == 3:
            raise KeyboardInterrupt
        return real(pair, *a, **kw)

    monkeypatch.setattr(buffers, "_experts_of", interrupted)
    kw = dict(image_encoder="i", text_encoder="t")
    with pytest.raises(KeyboardInterrupt):
        import_authors_buffers(src, tmp_path / "s", "repblend", layout, **kw)
    assert not (tmp_path / "s" / "manifest.json").exists()
    monkeypatch.setattr(buffers, "_experts_of", real)
    loads: list[str] = []
    real_load = buffers.safe_torch_load

    def counting(path):
        loads.append(Path(path).name)
        return real_load(path)

    monkeypatch.setattr(buffers, "safe_torch_load", counting)
    report = import_authors_buffers(src, tmp_path / "s", "repblend", layout, **kw)
    assert (report.reused, report.imported) == (2, 3)
    # The finished pair (n = 0) is only scanned, not copied again; the others are read twice.
    assert loads.count("img_replay_buffer_0.pt") == 1 and loads.count("img_replay_buffer_5.pt") == 2
    store = TrajectoryStore.load(tmp_path / "s")
    for i, (img, _) in enumerate(_in_store_order(saved)):
        assert torch.equal(store.snapshot(i, 3, "image"), _flat(img[3]))


def test_a_store_of_other_settings_is_replaced_only_on_request(repblend_buffers, tmp_path):
    src, saved = repblend_buffers
    layout = buffer_layout("repblend", d_img=D_IMG, d_txt=D_TXT)
    kw = dict(image_encoder="i", text_encoder="t")
    import_authors_buffers(src, tmp_path / "s", "repblend", layout, **kw)
    with pytest.raises(AuthorsBufferError, match="pass --overwrite"):
        import_authors_buffers(src, tmp_path / "s", "repblend", layout, epochs=1, **kw)
    assert TrajectoryStore.load(tmp_path / "s").epochs == [0, 1, 2, 3]  # left intact
    import_authors_buffers(src, tmp_path / "s", "repblend", layout, epochs=1, overwrite=True, **kw)
    store = TrajectoryStore.load(tmp_path / "s")
    assert store.epochs == [0, 1]
    assert torch.equal(store.snapshot(4, 1, "text"), _flat(_in_store_order(saved)[4][1][1]))


def _import_lors(tmp_path: Path) -> tuple[Path, list[str]]:
    """LoRS buffers (test_nfnet encoder + text head) checked bit for bit, then imported from the
    command line; returns the CLI store and its encoder flags."""
    from repblend_fast.models.encoders import load_image_encoder

    enc, info = load_image_encoder("test_nfnet", random_init=True, seed=0)
    src = tmp_path / "lors"
    saved = _write_buffers(
        src, [(2, 1), (0, 1)], lambda: enc, lambda: TheirHead(384, info.feature_dim), epochs=1
    )
    layout = buffer_layout("lors", d_img=info.feature_dim, d_txt=384, encoder=enc)
    import_authors_buffers(src, tmp_path / "s", "lors", layout, image_encoder="i", text_encoder="t")
    store = TrajectoryStore.load(tmp_path / "s")
    assert store.method == "lors" and store.spec("image").names[0] == layout.image.names[0]
    for i, (img, txt) in enumerate(_in_store_order(saved)):
        assert torch.equal(store.snapshot(i, 1, "image"), _flat(img[1]))
        assert torch.equal(store.snapshot(i, 1, "text"), _flat(txt[1]))
    # The same files from the command line (timm's test_nfnet, MiniLM), then MTT-VL on them.
    enc_flags = [
        "--image-encoder",
        "test_nfnet",
        "--random-init-encoder",
        "--text-encoder",
        "minilm",
    ]
    argv = ["import-experts", "--format", "lors", "--src", str(src), *enc_flags]
    assert main([*argv, "--dry-run"]) == 0
    assert main([*argv, "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    return tmp_path / "cli", enc_flags


def test_lors_buffers_hold_the_encoder(tmp_path):
    store, _ = _import_lors(tmp_path)
    assert TrajectoryStore.load(store).manifest["source"]["format"] == "lors"


def test_mttvl_distils_on_imported_lors_experts(tmp_path, tiny_pairs):
    store, enc_flags = _import_lors(tmp_path)
    argv = ["distill", "--dataset", "generic", "--annotations", str(tiny_pairs), *enc_flags]
    argv += ["--image-size", "16", "--cache-dir", str(tmp_path / "cache"), "--experts", str(store)]
    argv += ["--out", str(tmp_path / "run"), "--method", "mtt-vl", "--pairs", "8"]
    argv += ["--batch-size", "4", "--syn-steps", "2", "--iterations", "1", "--threads", "1"]
    argv += ["--set", "max_start_epoch=1", "--no-progress"]
    assert main(argv) == 0
    assert (tmp_path / "run" / "distilled.safetensors").is_file()


# --------------------------------------------------------------------------- import-experts (CLI)
ENC = ["--image-encoder", "resnet18", "--random-init-encoder", "--text-encoder", "minilm"]


def _cli_buffers(folder: Path, files=((1, 1), (0, 1)), epochs: int = 2, dim: int = 16) -> dict:
    """RepBlend buffers for resnet18 (512-d) and MiniLM (384-d) features, heads of width dim."""
    return _write_buffers(
        folder, files, lambda: TheirHead(512, dim), lambda: TheirHead(384, dim), epochs=epochs
    )


@pytest.fixture(scope="module")
def imported_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    saved = _cli_buffers(root / "buf")
    store = root / "store"
    argv = ["import-experts", "--format", "repblend", "--src", str(root / "buf"), "--out"]
    assert main([*argv, str(store), *ENC, "--dim", "16", "--no-progress"]) == 0
    return store, saved


def test_import_experts_command(imported_store, tmp_path, capsys):
    store, saved = imported_store
    s = TrajectoryStore.load(store)
    assert len(s) == 2 and s.epochs == [0, 1, 2]
    assert s.manifest["image_encoder"].startswith("timm:resnet18@")
    assert s.manifest["source"]["pairs"][0]["img"] == "img_replay_buffer_0.pt"
    assert torch.equal(s.snapshot(1, 2, "text"), _flat(saved[1][1][0][2]))
    capsys.readouterr()
    src = store.parent / "buf"
    argv = ["import-experts", "--format", "repblend", "--src", str(src), "--dry-run", *ENC]
    assert main([*argv, "--dim", "16"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["experts"] == 2 and listing["epochs"] == [0, 1, 2]
    assert listing["shapes"]["image"][0] == [16, 512]
    assert [p["img"] for p in listing["pairs"]] == [
        "img_replay_buffer_0.pt",
        "img_replay_buffer_1.pt",
    ]


def _bad_case(tmp_path: Path, name: str) -> tuple[Path, Path | None]:
    src = tmp_path / name
    marker = None
    if name == "empty":
        src.mkdir()
    elif name == "shapes":
        saved = _cli_buffers(src, files=((0, 2),))
        img = saved[0][0]
        img[1][2][2] = torch.zeros(16, 15)  # expert 1, epoch 2, parameter 2 (fc.weight)
        torch.save(img, src / "img_replay_buffer_0.pt")
    elif name == "partner":
        _cli_buffers(src, files=((0, 1), (4, 1)))
        (src / "txt_replay_buffer_4.pt").unlink()
    elif name == "truncated":
        _cli_buffers(src, files=((0, 1),))
        data = (src / "img_replay_buffer_0.pt").read_bytes()
        (src / "img_replay_buffer_0.pt").write_bytes(data[: len(data) // 2])
    elif name == "code":
        _cli_buffers(src, files=((0, 1),))
        marker = tmp_path / "EXECUTED"
        torch.save([_Evil(marker)], src / "img_replay_buffer_0.pt")
    return src, marker


class _Evil:
    """Unpickling this object opens (creates) a file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize(
    "case, needles",
    [
        ("empty", ["no img_replay_buffer_<n>.pt"]),
        ("partner", ["img_replay_buffer_4.pt has no partner txt_replay_buffer_4.pt"]),
        (
            "shapes",
            [
                "img_replay_buffer_0.pt, expert 1, epoch 2, parameter 2 (fc.weight)",
                "expected shape [16, 16], found [16, 15]",
            ],
        ),
        ("truncated", ["img_replay_buffer_0.pt: cannot be read", "truncated"]),
        ("code", ["img_replay_buffer_0.pt: refused", "not executed"]),
    ],
)
def test_bad_buffers_fail_with_one_line(case, needles, tmp_path, capsys):
    src, marker = _bad_case(tmp_path, case)
    argv = ["import-experts", "--format", "repblend", "--src", str(src), "--out"]
    rc = main([*argv, str(tmp_path / "out"), *ENC, "--dim", "16", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "out" / "manifest.json").exists()
    if marker is not None:
        assert not marker.exists()


def test_the_code_fixture_really_runs_code_when_unpickled(tmp_path):
    """Guards the previous test: an unrestricted load of the same fixture does create the file."""
    marker = tmp_path / "EXECUTED"
    torch.save([_Evil(marker)], tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


# --------------------------------------------------------------------------- distilled files
def _distilled(n: int = 6, sim: str = "lowrank") -> DistilledSet:
    g = torch.Generator().manual_seed(1)
    params = {}
    if sim == "lowrank":
        params = {k: torch.randn(n, 3, generator=g) for k in ("L", "R")}
        params = {"a": torch.rand(n, generator=g), **params}
        similarity = torch.diag(params["a"]) + params["L"] @ params["R"].T
    elif sim == "full":
        params = {"S": torch.randn(n, n, generator=g)}
        similarity = params["S"].clone()
    else:
        similarity = None
    return DistilledSet(
        torch.randn(n, 3, 8, 8, generator=g),
        torch.randn(n, 5, generator=g),
        0.0625,
        0.125,
        similarity,
        params,
    )


def _same(a: DistilledSet, b: DistilledSet) -> bool:
    sims = (a.similarity is None and b.similarity is None) or torch.equal(
        a.similarity, b.similarity
    )
    return (
        torch.equal(a.images, b.images)
        and torch.equal(a.texts, b.texts)
        and (a.eta_img, a.eta_txt) == (b.eta_img, b.eta_txt)
        and sims
        and a.sim_params.keys() == b.sim_params.keys()
        and all(torch.equal(a.sim_params[k], b.sim_params[k]) for k in a.sim_params)
    )


@pytest.mark.parametrize("sim", ["lowrank", "full", "none"])
def test_export_reads_back_and_round_trips(sim, tmp_path):
    d = _distilled(sim=sim)
    path = export_authors_checkpoint(d, tmp_path / "distilled_7.pt")
    ckpt = torch.load(path, weights_only=True)
    want = {"image", "text", "similarity_mat", "syn_lr_img", "syn_lr_txt"}
    assert set(ckpt) == want | ({"similarity_params"} if sim != "none" else set())
    assert ckpt["image"].shape == (6, 3, 8, 8) and ckpt["text"].shape == (6, 5)
    assert ckpt["similarity_mat"].shape == (6, 6) and ckpt["syn_lr_img"].dim() == 0
    if sim == "lowrank":  # their generator's order: diag_weight, left, right
        assert [tuple(t.shape) for t in ckpt["similarity_params"]] == [(6,), (6, 3), (6, 3)]
        assert torch.equal(ckpt["similarity_params"][0], d.sim_params["a"])
    assert _same(import_distilled(path), d)


def test_export_and_import_distilled_commands(tmp_path, capsys):
    d = _distilled()
    ours = d.save(tmp_path / "distilled.safetensors")
    theirs = tmp_path / "distilled_3000.pt"
    assert main(["export", "--distilled", str(tmp_path), "--out", str(theirs)]) == 0
    back = tmp_path / "back.safetensors"
    assert main(["import-distilled", "--src", str(theirs), "--out", str(back)]) == 0
    assert _same(DistilledSet.load(back), DistilledSet.load(ours))
    capsys.readouterr()
    (tmp_path / "cut.pt").write_bytes(theirs.read_bytes()[:100])
    assert main(["import-distilled", "--src", str(tmp_path / "cut.pt"), "--out", str(back)]) == 2
    assert "cut.pt: cannot be read" in capsys.readouterr().err


# --------------------------------------------------------------------------- the flag shim
# Every flag of their parsers, in order, copied from the argparse blocks of
# zhangxin-xd/RepBlend distill_repblend.py, silicx/LoRS_Distill distill_tesla_lors.py and
# princetonvisualai/multimodal_dataset_distillation distill.py.
_COMMON_HEAD = ["eval_mode", "num_eval", "eval_it", "epoch_eval_train", "Iteration"]
_COMMON_HEAD += ["lr_img", "lr_txt", "lr_lr", "lr_teacher_img", "lr_teacher_txt"]
_COMMON_MID = ["batch_train", "pix_init", "txt_init", "dsa", "dsa_strategy", "data_path"]
_COMMON_MID += ["buffer_path", "expert_epochs", "syn_steps", "max_start_epoch", "zca", "load_all"]
_COMMON_MID += ["no_aug", "texture", "canvas_size", "canvas_samples", "max_files", "max_experts"]
_COMMON_MID += ["force_save", "name", "num_queries", "mini_batch_size", "basis", "n_basis"]
_COMMON_MID += ["recursive", "load_npy", "image_size", "image_root", "ann_root"]
_COMMON_MID += ["batch_size_train", "batch_size_test", "image_encoder", "text_encoder"]
_COMMON_MID += ["text_pretrained", "image_pretrained", "text_trainable", "image_trainable"]
_COMMON_MID += ["only_has_image_projection", "distill", "optimize", "image_only", "text_only"]
_COMMON_MID += ["draw", "transfer", "std"]
_LORS_TAIL = ["disabled_wandb", "test_with_norm", "clamp_lr", "resume_from", "sim_type"]
_LORS_TAIL += ["sim_rank", "alpha"]
_MOMENTA = ["lr_sim", "temperature", "momentum_lr", "momentum_syn", "momentum_sim"]
_MOMENTA += ["merge_loss_branches"]
THEIR_FLAGS = {
    # distill_repblend.py
    "repblend": ["dataset", *_COMMON_HEAD, "loss_type", *_COMMON_MID, *_LORS_TAIL, "alpha_2"]
    + _MOMENTA,
    # distill_tesla_lors.py
    "lors": ["dataset", *_COMMON_HEAD, "loss_type", *_COMMON_MID, *_LORS_TAIL, *_MOMENTA],
    # VL-distill distill.py
    "mtt-vl": ["dataset", "ipc", *_COMMON_HEAD, *_COMMON_MID],
}


@pytest.mark.parametrize("script", ["repblend", "lors", "mtt-vl"])
def test_every_flag_of_their_parsers_is_mapped(script):
    assert script_flags(script) == THEIR_FLAGS[script]
    for name in THEIR_FLAGS[script]:
        rule = RULES[name]
        assert rule.kind in FLAG_KINDS, name
        if rule.kind in ("field", "setting"):
            assert rule.target, name
        else:  # logging-only, ignored or refused: the reason is stated
            assert rule.note or rule.refuses, name
    # Their defaults parse without a refusal (LoRS needs --loss_type, as their script does).
    extra = ["--loss_type", "WBCE"] if script == "lors" else []
    parse_authors_flags(script, ["--buffer_path", "b", *extra]).config()


# scripts/distill_flickr_repblend.sh of zhangxin-xd/RepBlend, the "100 pairs" block (shell
# quoting removed); only the program name changes.
REPBLEND_FLICKR_100 = [
    "--dataset=flickr",
    "--buffer_path=buffer/flickr/nfnet_bert/InfoNCE",
    "--image_encoder=nfnet",
    "--text_encoder=bert",
    "--syn_steps=8",
    "--expert_epochs=1",
    "--max_start_epoch=2",
    "--lr_img=100",
    "--lr_txt=100",
    "--lr_lr=1e-2",
    "--lr_teacher_img",
    "0.1",
    "--lr_teacher_txt",
    "0.1",
    "--lr_sim=10.0",
    "--sim_type",
    "lowrank",
    "--sim_rank",
    "10",
    "--alpha",
    "3",
    "--num_queries",
    "99",
    "--mini_batch_size=20",
    "--Iteration",
    "3000",
    "--loss_type",
    "WBCE",
    "--name",
    "repblend—flickr-100pairs—nfnet_bert",
    "--epoch_eval_train",
    "100",
]
# scripts/distill_coco_repblend.sh of zhangxin-xd/RepBlend, the "500 pairs" block.
REPBLEND_COCO_500 = (
    "--dataset=coco --buffer_path=buffer/coco/nfnet_bert/InfoNCE --image_encoder=nfnet "
    "--text_encoder=bert --merge_loss_branches --syn_steps=8 --expert_epochs=1 "
    "--max_start_epoch=2 --lr_img=5000 --lr_txt=5000 --lr_lr=1e-2 --lr_teacher_img 0.1 "
    "--lr_teacher_txt 0.1 --lr_sim=500 --sim_type lowrank --sim_rank 40 --alpha 1.0 "
    "--num_queries 499 --mini_batch_size=20 --temperature 0.1 --no_aug --loss_type WBCE "
    "--name repblend—coco-500pairs—nfnet_bert --Iteration 3000 --epoch_eval_train 100"
).split()
# sh/distill_flickr_lors_100.sh of silicx/LoRS_Distill (EXP_NAME expanded).
LORS_FLICKR_100 = (
    "--dataset=flickr --buffer_path=buffer/flickr/nfnet_bert/InfoNCE --image_encoder=nfnet "
    "--text_encoder=bert --syn_steps=8 --expert_epochs=1 --max_start_epoch=2 --lr_img=100 "
    "--lr_txt=100 --lr_lr=1e-2 --lr_teacher_img 0.1 --lr_teacher_txt 0.1 --lr_sim=10.0 "
    "--sim_type lowrank --sim_rank 10 --alpha 3 --num_queries 99 --mini_batch_size=20 "
    "--loss_type WBCE --name distill_flickr_lors_100"
).split()


def test_published_repblend_script_maps_to_the_paper_preset(capsys):
    from repblend_fast.config import preset

    run = parse_authors_flags("repblend", REPBLEND_FLICKR_100)
    cfg = run.config()
    paper = preset("flickr-100")
    for f in ("pairs", "iterations", "syn_steps", "expert_epochs", "max_start_epoch"):
        assert getattr(cfg, f) == getattr(paper, f), f
    for f in ("batch_size", "lr_img", "lr_txt", "lr_lr", "lr_sim", "momentum", "lr_init"):
        assert getattr(cfg, f) == getattr(paper, f), f
    for f in ("similarity", "sim_rank", "sim_alpha", "loss", "temperature", "merge_loss"):
        assert getattr(cfg, f) == getattr(paper, f), f
    # Their code's behaviour, not a flag: TESLA, the reference eta gradient, dropout on.
    assert (cfg.method, cfg.meta_grad, cfg.parity_eta_grad, cfg.unroll_dropout) == (
        "repblend",
        "tesla",
        True,
        True,
    )
    assert cfg.blend and cfg.blend_alpha == 1.0 and cfg.checkpoint_every == 150
    assert run.settings["dataset"] == "flickr30k" and run.settings["image_encoder"] == "nfnet_l0"
    assert run.settings["buffer_path"] == "buffer/flickr/nfnet_bert/InfoNCE"
    assert run.output_dir == Path("logged_files/flickr/repblend—flickr-100pairs—nfnet_bert")
    assert [w.split(":")[0] for w in run.warnings] == ["--epoch_eval_train"]
    # The same command line runs through the CLI with only the program name changed.
    assert main(["authors", "repblend", *REPBLEND_FLICKR_100, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--num_queries 99" in out and "pairs = 99" in out
    assert json.loads(out[out.index("{") :])["sim_alpha"] == 3.0

    coco = parse_authors_flags("repblend", REPBLEND_COCO_500).config()
    want = preset("coco-500")
    assert (coco.merge_loss, coco.temperature, coco.pairs, coco.sim_rank) == (
        want.merge_loss,
        want.temperature,
        want.pairs,
        want.sim_rank,
    )
    lors = parse_authors_flags("lors", LORS_FLICKR_100)
    assert lors.config().method == "lors" and not lors.config().blend
    assert lors.config().lr_img == 100 and lors.config().similarity == "lowrank"


def test_mttvl_reproduces_its_unexponentiated_logit_scale():
    import math

    cfg = parse_authors_flags("mtt-vl", ["--buffer_path", "b"]).config()
    assert (cfg.method, cfg.meta_grad, cfg.similarity, cfg.loss) == (
        "mtt-vl",
        "exact",
        "none",
        "infonce",
    )
    assert math.isclose(cfg.logit_scale, math.log(1 / 0.07))
    assert (cfg.iterations, cfg.syn_steps, cfg.max_start_epoch, cfg.batch_size) == (
        50000,
        20,
        25,
        100,
    )


def test_type_bool_flags_behave_as_in_their_parser():
    run = parse_authors_flags("repblend", ["--std", "False", "--draw", "False"])
    assert run.values["std"] is True and run.values["draw"] is True
    assert any("type=bool" in w and "--std False" in w for w in run.warnings)
    # Only an empty string is False there; for RepBlend's image projection that is refused.
    with pytest.raises(AuthorsFlagError, match="only_has_image_projection"):
        parse_authors_flags("repblend", ["--only_has_image_projection", ""])


@pytest.mark.parametrize(
    "script, argv, needle",
    [
        ("repblend", ["--pix_init", "noise"], "--pix_init noise: not supported"),
        ("repblend", ["--momentum_lr", "0.9"], "one outer momentum"),
        ("repblend", ["--lr_teacher_img", "0.2"], "lr_init"),
        ("repblend", ["--zca"], "ZCA"),
        ("repblend", ["--max_files", "1"], "one randomly chosen file"),
        ("repblend", ["--text_encoder", "clip"], "clip"),
        ("repblend", ["--loss_type", "Hinge"], "loss module"),
        ("repblend", ["--bogus", "1"], "unrecognized arguments: --bogus"),
        ("repblend", ["--Iter", "5"], "unrecognized arguments: --Iter"),
        ("lors", [], "--loss_type None: not supported"),
        ("lors", ["--loss_type", "WBCE", "--image_encoder", "nf_resnet50"], "classifier"),
        ("mtt-vl", ["--temperature", "0.1"], "unrecognized arguments: --temperature"),
    ],
)
def test_refused_flags_fail_with_the_reason(script, argv, needle, capsys):
    assert main(["authors", script, *argv, "--buffer_path", "b", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_logging_flags_are_warned_about_once(capsys):
    argv = ["--buffer_path", "b", "--draw", "True", "--disabled_wandb", "1", "--num_eval", "3"]
    assert main(["authors", "repblend", *argv, "--dry-run"]) == 0
    err = capsys.readouterr().err
    for flag in ("--draw", "--disabled_wandb", "--num_eval"):
        assert sum(line.count(f"warning: {flag}:") for line in err.splitlines()) == 1, flag


# --------------------------------------------------------------------------- runs
def _authors_argv(tiny_pairs, buffer_path, out, cache) -> list[str]:
    return [
        "authors",
        "repblend",
        "--dataset",
        "generic",
        "--annotations",
        str(tiny_pairs),
        "--buffer_path",
        str(buffer_path),
        "--image_encoder",
        "resnet18",
        "--random-init-encoder",
        "--text_encoder",
        "bert",
        "--text-encoder-path",
        "minilm",
        "--image_size",
        "16",
        "--num_queries",
        "8",
        "--mini_batch_size",
        "4",
        "--syn_steps",
        "2",
        "--Iteration",
        "2",
        "--sim_rank",
        "2",
        "--lr_lr",
        "1e-4",
        "--loss_type",
        "WBCE",
        "--name",
        "tiny",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--cache-dir",
        str(cache),
        "--no-progress",
    ]


def test_authors_repblend_end_to_end(imported_store, tiny_pairs, tmp_path, capsys):
    store, _ = imported_store
    out = tmp_path / "run"
    assert main(_authors_argv(tiny_pairs, store, out, tmp_path / "cache")) == 0
    ours = DistilledSet.load(out / "distilled.safetensors")
    theirs = torch.load(out / "distilled_2.pt", weights_only=True)
    assert set(theirs) >= {"image", "text", "similarity_params", "similarity_mat"}
    assert torch.equal(theirs["image"], ours.images) and ours.images.shape == (8, 3, 16, 16)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["meta_grad"], cfg["pairs"], cfg["iterations"]) == ("tesla", 8, 2)
    printed = capsys.readouterr().out
    assert "--num_queries 8" in printed and "distilled_2.pt" in printed
    # The same command again without --resume_from refuses to mix two runs ...
    argv = _authors_argv(tiny_pairs, store, out, tmp_path / "cache")
    assert main(argv) == 2
    assert "--resume_from" in capsys.readouterr().err
    # ... and continues it from its distilled_<it>.pt with more iterations.
    more = [a if a != "2" or argv[i - 1] != "--Iteration" else "3" for i, a in enumerate(argv)]
    assert main([*more, "--resume_from", str(out / "distilled_2.pt")]) == 0
    assert (out / "distilled_3.pt").is_file()
    recs = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["iteration"] for r in recs] == [0, 1, 2]
    # A file of their script has nothing to continue from.
    theirs = tmp_path / "elsewhere" / "distilled_2.pt"
    theirs.parent.mkdir()
    shutil.copy(out / "distilled_2.pt", theirs)
    capsys.readouterr()
    assert main([*argv, "--resume_from", str(theirs)]) == 2
    assert "no repblend_fast run beside it" in capsys.readouterr().err


def test_authors_imports_a_raw_buffer_folder_beside_it(tiny_pairs, tmp_path):
    raw = tmp_path / "buffer" / "InfoNCE"
    _cli_buffers(raw, files=((0, 1),), dim=512)  # their D: the image embedding width
    out = tmp_path / "run"
    assert main(_authors_argv(tiny_pairs, raw, out, tmp_path / "cache")) == 0
    store = TrajectoryStore.load(tmp_path / "buffer" / "InfoNCE.repblend_fast")
    assert store.manifest["dim"] == 512 and store.manifest["train"]["lr_img"] == 0.1
    assert (out / "distilled_2.pt").is_file()


def test_distill_uses_an_imported_store(imported_store, tiny_pairs, tmp_path):
    store, _ = imported_store
    run = tmp_path / "run"
    argv = ["distill", "--dataset", "generic", "--annotations", str(tiny_pairs), *ENC]
    argv += ["--image-size", "16", "--cache-dir", str(tmp_path / "cache"), "--experts", str(store)]
    argv += ["--out", str(run), "--pairs", "8", "--batch-size", "4", "--syn-steps", "2"]
    argv += ["--iterations", "2", "--set", "sim_rank=2", "--threads", "1", "--no-progress"]
    assert main(argv) == 0
    assert DistilledSet.load(run / "distilled.safetensors").texts.shape == (8, 384)


def test_a_parent_of_the_buffer_folder_is_pointed_to_it(tmp_path):
    leaf = tmp_path / "buffer" / "flickr" / "nfnet_bert" / "InfoNCE"
    _write_buffers(leaf, [(0, 1)], lambda: TheirHead(4, 4), lambda: TheirHead(3, 4), epochs=1)
    layout = buffer_layout("repblend", d_img=4, d_txt=3)
    with pytest.raises(AuthorsBufferError, match=f"buffer files are in {leaf}: pass that folder"):
        import_authors_buffers(
            tmp_path / "buffer",
            tmp_path / "s",
            "repblend",
            layout,
            image_encoder="i",
            text_encoder="t",
        )


# --------------------------------------------------------------------------- docs/migrating.md
DOC = Path(__file__).resolve().parents[1] / "docs" / "migrating.md"


def _block(text: str, heading: str, lang: str) -> str:
    """The first ```lang code block after ``heading``."""
    rest = text[text.index(heading) :]
    start = rest.index(f"```{lang}\n") + len(lang) + 4
    return rest[start : rest.index("```", start)]


def test_doc_flag_table_matches_the_code():
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("| `--"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`").lstrip("-")] = cells
    for script, col in (("repblend", 1), ("lors", 2), ("mtt-vl", 3)):
        have = {name for name, cells in rows.items() if cells[col] != "—"}
        assert have == set(THEIR_FLAGS[script]), script
    for name, cells in rows.items():
        assert cells[4] == RULES[name].kind, name


def test_doc_commands_run_on_tiny_files(tiny_pairs, tmp_path, monkeypatch):
    import shlex

    monkeypatch.setenv("REPBLEND_CACHE_DIR", str(tmp_path / "cache"))
    buffers = tmp_path / "buffers"
    _cli_buffers(buffers, files=((0, 1),), dim=512)
    script = _block(DOC.read_text(encoding="utf-8"), "## A complete example on tiny files", "bash")
    script = script.replace("\\\n", " ")
    subst = {"$PAIRS": str(tiny_pairs), "$BUFFERS": str(buffers), "$WORK": str(tmp_path / "w")}
    ran = 0
    for line in script.splitlines():
        if not line.strip():
            continue
        for k, v in subst.items():
            line = line.replace(k, v)
        argv = shlex.split(line)
        assert argv[0] == "repblend-fast", line
        assert main(argv[1:]) == 0, line
        ran += 1
    assert ran == 7
    theirs = torch.load(tmp_path / "w" / "distilled_2.pt", weights_only=True)
    assert theirs["image"].shape == (8, 3, 16, 16)


def test_doc_python_example_runs_on_tiny_files(tiny_pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("REPBLEND_CACHE_DIR", str(tmp_path / "cache"))
    buffers = tmp_path / "buffers"
    _cli_buffers(buffers, files=((0, 1),), dim=512)
    code = _block(DOC.read_text(encoding="utf-8"), "## From Python", "python")
    assert code.startswith("# --- your files\n")
    body = code.split("\n# ---\n", 1)[1]
    settings = f"""
BUFFERS = {str(buffers)!r}
DATA = dict(name="generic", annotations={str(tiny_pairs)!r}, n_test=0.2)
ENCODERS = dict(image_encoder="resnet18", text_encoder="minilm", random_init=True)
FLAGS = "--num_queries 8 --mini_batch_size 4 --syn_steps 2 --Iteration 2 --sim_rank 2 "
FLAGS += "--loss_type WBCE"
IMAGE_SIZE, OUT = 16, {str(tmp_path / "pyrun")!r}
"""
    exec(compile(settings + body, str(DOC), "exec"), {})
    for it in (0, 2):
        ckpt = torch.load(tmp_path / "pyrun" / f"distilled_{it}.pt", weights_only=True)
        assert ckpt["text"].shape == (8, 384)
