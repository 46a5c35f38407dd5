"""clip_model against OpenAI's reference CLIP: a tiny random ViT CLIP saved in both release formats
and OpenAI's fp32 outputs on fixed inputs (tests/data/, made by tests/make_reference.py); the MUST
patch of the image tower; and the loader's errors."""
import hashlib
import re
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clip_model
from conftest import save_clip, tiny_clip
from util import clip_load
from util import runtime
from util import tokenizer

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
FP16 = os.path.join(DATA, "ref_clip_fp16.pt")
JIT = os.path.join(DATA, "ref_clip_jit.pt")
# The reference CLIP is OpenAI's architecture, built by OpenAI's code: a known file, as OpenAI's
# releases are.
with open(FP16, "rb") as _f:
    clip_load._KNOWN_FILES[hashlib.sha256(_f.read()).hexdigest()] = clip_load.OPENAI_SPEC
REF = torch.load(os.path.join(DATA, "ref_clip_outputs.pt"), weights_only=True)
ATOL = 1e-5


def _reference_keys():
    return set(torch.load(FP16, weights_only=True))


def _check_against_reference(model):
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert set(model.state_dict()) == _reference_keys()
    ref_sd = torch.load(FP16, weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_sd[k].float()), k
    with torch.no_grad():
        image = model.encode_image(REF["images"])
        text = model.encode_text(REF["tokens"])
        logits_per_image, logits_per_text = model(REF["images"], REF["tokens"])
    assert (image - REF["image_features"]).abs().max() < ATOL
    assert (text - REF["text_features"]).abs().max() < ATOL
    assert (logits_per_image - REF["logits_per_image"]).abs().max() < 1e-4
    assert torch.equal(logits_per_text, logits_per_image.t())


@pytest.fixture(scope="module")
def ref_model():
    model, _ = clip_model.load(FP16)
    return model


def test_load_fp16_state_dict(ref_model):
    _check_against_reference(ref_model)
    arch = REF["arch"]
    assert ref_model.context_length == arch["context_length"]
    assert ref_model.visual.input_resolution == arch["image_resolution"]
    assert ref_model.visual.patch_size == arch["vision_patch_size"]
    assert ref_model.visual.grid_size == arch["image_resolution"] // arch["vision_patch_size"]
    assert ref_model.visual.width == arch["vision_width"]
    assert ref_model.visual.output_dim == arch["embed_dim"]


def test_load_published_torchscript_archive(monkeypatch):
    """OpenAI's release format: read with torch.jit.load, which only archives with a published
    SHA-256 get."""
    sha = hashlib.sha256(open(JIT, "rb").read()).hexdigest()
    monkeypatch.setitem(clip_load._MODELS, "Fake-1", f"file:///nowhere/{sha}/Fake-1.pt")
    model, preprocess = clip_model.load(JIT)
    _check_against_reference(model)
    archive_keys = set(torch.jit.load(JIT, map_location="cpu").state_dict())
    assert archive_keys == _reference_keys() | {"input_resolution", "context_length", "vocab_size"}


def test_load_resaved_fp32_state_dict(ref_model, tmp_path):
    path = tmp_path / "resaved.pt"
    save_clip(ref_model, path)
    model, _ = clip_model.load(str(path))
    _check_against_reference(model)
    state = torch.load(path, weights_only=True)
    state.pop("open_clip_config")
    _check_against_reference(clip_model.build_model(state, "quick_gelu").eval())


def test_build_model_is_strict():
    sd = torch.load(FP16, weights_only=True)
    with pytest.raises(RuntimeError, match="visual.unexpected"):
        clip_model.build_model({**sd, "visual.unexpected": torch.zeros(3)}, "quick_gelu")
    del sd["visual.ln_post.bias"]
    with pytest.raises(RuntimeError, match="visual.ln_post.bias"):
        clip_model.build_model(sd, "quick_gelu")


def test_preprocess_gives_model_sized_normalized_tensor():
    from PIL import Image
    _, preprocess = clip_model.load(FP16)
    image = Image.new("RGB", (50, 40), color=(124, 116, 104))  # ~ CLIP mean colour
    x = preprocess(image)
    assert x.shape == (3, 32, 32) and x.abs().max() < 0.05
    assert preprocess(Image.new("L", (40, 40))).shape == (3, 32, 32)


def test_logit_scale_and_public_constants(ref_model):
    expected_scale = torch.tensor(3.9).half().float().exp().item()
    assert abs(ref_model.logit_scale.exp().item() - expected_scale) < 1e-4
    assert len(clip_load.CLIP_MEAN) == len(clip_load.CLIP_STD) == 3
    openai = ["ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]
    assert clip_load.available_models()[:4] == openai  # then the open checkpoints' names
    assert all("-" in name.split("/")[0][4:] for name in clip_load.available_models()[4:])


# --------------------------------------------------------------------------------------------------
# MUST patch of the image tower


@pytest.fixture()
def must_model():
    model, _ = clip_model.load(FP16)
    assert not model.visual.has_must_heads
    model.visual.add_must_heads()
    assert model.visual.has_must_heads
    return model


def test_forward_must_without_mask_is_clip(must_model):
    visual, x = must_model.visual, REF["images"]
    with torch.no_grad():
        v_cls, v_patch, recon = visual.forward_must(x, None)
        no_mask = visual.forward_must(x, torch.zeros(3, visual.grid_size ** 2, dtype=torch.bool))
    assert (v_cls - F.normalize(REF["image_features"], dim=-1)).abs().max() < ATOL
    assert v_patch.shape == (3, visual.grid_size ** 2, visual.output_dim)
    assert torch.allclose(v_patch.norm(dim=-1), torch.ones(3, visual.grid_size ** 2), atol=1e-5)
    assert recon.shape == x.shape
    for a, b in zip((v_cls, v_patch, recon), no_mask):
        assert torch.allclose(a, b, atol=1e-6)


def test_mask_replaces_only_masked_patch_embeddings(must_model):
    visual, x = must_model.visual, REF["images"].clone()
    g, p = visual.grid_size, visual.patch_size
    mask = torch.zeros(3, g * g, dtype=torch.bool)
    mask[0, 5] = True  # patch (row 1, col 1) of image 0
    mask[2, [0, 3, 7]] = True
    with torch.no_grad():
        clean = visual.forward_must(x, None)
        masked = visual.forward_must(x, mask)
        # masking changes image 0 and 2 but not image 1 (no masked patch)
        assert not torch.allclose(masked[0][0], clean[0][0], atol=1e-4)
        assert not torch.allclose(masked[0][2], clean[0][2], atol=1e-4)
        for a, b in zip(masked, clean):
            assert torch.allclose(a[1], b[1], atol=1e-6)
            assert a.shape == b.shape
        assert masked[2].shape == x.shape
        # a masked patch's pixels are never seen ...
        y = x.clone()
        y[0, :, p:2 * p, p:2 * p] = torch.randn(3, p, p)
        for a, b in zip(visual.forward_must(y, mask), masked):
            assert torch.allclose(a, b, atol=1e-6)
        # ... while an unmasked patch's are
        y[0, :, 0:p, 0:p] += 1.0
        assert not torch.allclose(visual.forward_must(y, mask)[0], masked[0], atol=1e-4)
        # [MSK] replaces the patch embedding (conv1 output), before [CLS] and positions are added:
        # making it equal to that patch's embedding undoes the masking exactly
        one = torch.zeros(1, g * g, dtype=torch.bool)
        one[0, 5] = True
        patch_embedding = visual.conv1(x[:1]).flatten(2)[0, :, 5]  # (width,)
        visual.mask_token.copy_(patch_embedding)
        for a, b in zip(visual.forward_must(x[:1], one), visual.forward_must(x[:1], None)):
            assert torch.allclose(a, b, atol=1e-5)


def test_must_heads_shapes_and_init(must_model):
    visual = must_model.visual
    assert visual.mask_token.shape == (visual.width,)
    assert 0.005 < visual.mask_token.std().item() < 0.05
    assert isinstance(visual.ln_patch, torch.nn.LayerNorm)
    conv, shuffle = visual.decoder
    assert conv.in_channels == visual.width and conv.out_channels == visual.patch_size ** 2 * 3
    assert conv.kernel_size == (1, 1) and isinstance(shuffle, torch.nn.PixelShuffle)


def test_build_model_round_trips_must_heads(must_model, tmp_path):
    with torch.no_grad():
        for p in must_model.visual.ln_patch.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    sd = must_model.state_dict()
    assert {"visual.mask_token", "visual.ln_patch.weight", "visual.decoder.0.weight"} <= set(sd)
    mask = torch.rand(3, must_model.visual.grid_size ** 2) < 0.4
    rebuilt = clip_model.build_model(sd, "quick_gelu").eval()
    assert rebuilt.visual.has_must_heads
    assert set(rebuilt.state_dict()) == set(sd)
    torch.save({**sd, "open_clip_config": clip_load.config_note(clip_load.OPENAI_SPEC)},
               tmp_path / "must.pt")
    reloaded, _ = clip_model.load(str(tmp_path / "must.pt"))
    visual_sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    visual = clip_model.build_visual(visual_sd, "quick_gelu")
    with torch.no_grad():
        expected = must_model.visual.forward_must(REF["images"], mask)
        for model in (rebuilt.visual, reloaded.visual, visual.eval()):
            for a, b in zip(model.forward_must(REF["images"], mask), expected):
                assert torch.equal(a, b)


def test_tiny_clip_works_with_real_tokenizer():
    torch.manual_seed(0)
    model = tiny_clip().eval()
    assert model.visual.input_resolution == 32 and model.visual.grid_size == 4
    with torch.no_grad():
        images = torch.randn(2, 3, 32, 32)
        texts = tokenizer.tokenize(["a photo of a dog.", "a cat"])
        logits, _ = model(images, texts)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    rebuilt = clip_model.build_model(model.state_dict(), "quick_gelu")
    assert set(rebuilt.state_dict()) == set(model.state_dict())


# --------------------------------------------------------------------------------------------------
# Errors


def test_unknown_model_name():
    with pytest.raises(ValueError, match="ViT-B/16") as e:
        clip_model.load("ViT-H/99")
    assert "ViT-L/14" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        clip_model.load(str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("source", [FP16, JIT])
def test_truncated_file(source, tmp_path):
    path = tmp_path / "cut.pt"
    data = open(source, "rb").read()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(RuntimeError, match=re.escape(str(path))):
        clip_model.load(str(path))


def _published(tmp_path, sha):
    """A file:// 'release' whose address carries `sha`, as OpenAI's URLs carry the file's
    SHA-256."""
    folder = tmp_path / "server" / sha
    folder.mkdir(parents=True)
    shutil.copy(FP16, folder / "Fake-1.pt")
    return (folder / "Fake-1.pt").as_uri()


def test_download_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(clip_load._MODELS, "Fake-1", _published(tmp_path, "0" * 64))
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="SHA-256|sha256|checksum"):
        clip_model.load("Fake-1", download_root=str(cache))
    left = os.listdir(cache) if cache.exists() else []
    assert not any(name.endswith(".pt") for name in left), left


def test_download_verifies_and_caches(tmp_path, monkeypatch):
    sha = hashlib.sha256(open(FP16, "rb").read()).hexdigest()
    url = _published(tmp_path, sha)
    monkeypatch.setitem(clip_load._MODELS, "Fake-1", url)
    cache = tmp_path / "cache"
    path = clip_load._download(url, str(cache))
    assert os.path.samefile(path, cache / "Fake-1.pt")
    assert os.listdir(cache) == ["Fake-1.pt"]
    shutil.rmtree(tmp_path / "server")  # the second load must come from the cache
    model, _ = clip_model.load("Fake-1", download_root=str(cache))
    _check_against_reference(model.eval())


def _resnet_state_dict():
    sd = {k: v for k, v in torch.load(FP16, weights_only=True).items()
          if not k.startswith("visual.")}
    sd.update({
        "visual.conv1.weight": torch.zeros(32, 3, 3, 3),
        "visual.bn1.weight": torch.ones(32),
        "visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
        "visual.layer1.0.bn1.weight": torch.ones(64),
        "visual.attnpool.positional_embedding": torch.zeros(50, 2048),
        "visual.attnpool.q_proj.weight": torch.zeros(2048, 2048)[:8],
        "visual.attnpool.c_proj.weight": torch.zeros(64, 2048)[:, :8],
    })
    return sd


def test_resnet_clip_is_rejected(tmp_path):
    sd = _resnet_state_dict()
    with pytest.raises(ValueError, match="ResNet"):
        clip_model.build_model(sd, "quick_gelu")
    torch.save(sd, tmp_path / "rn50.pt")
    with pytest.raises(ValueError, match="ResNet"):
        clip_model.load(str(tmp_path / "rn50.pt"))


# --------------------------------------------------------------------------------------------------
# Embedding tables stored by their used rows (the committed toy_clip.pt)


def test_committed_toy_clip_loads_as_its_unpacked_state_dict():
    from toy import world as toy
    slim = torch.load(toy.WEIGHTS, weights_only=True)
    assert "token_embedding.weight" not in slim and isinstance(slim["recipe"], str)
    model, preprocess = clip_model.load(toy.WEIGHTS)
    expected = {k: v for k, v in slim.items()
                if torch.is_tensor(v) and not k.startswith("token_embedding.")}
    rows = slim["token_embedding.rows"]
    vocab_size = slim["token_embedding.vocab_size"]
    expected["token_embedding.weight"] = torch.zeros(vocab_size, rows.shape[1])
    expected["token_embedding.weight"][slim["token_embedding.ids"]] = rows
    assert set(model.state_dict()) == set(expected)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k].float()), k
    weight = model.token_embedding.weight
    assert weight.shape[0] == slim["token_embedding.vocab_size"] == 49408
    assert torch.equal(weight[slim["token_embedding.ids"]], slim["token_embedding.rows"])
    # The other rows are zero.
    assert int((weight.abs().sum(1) > 0).sum()) == len(slim["token_embedding.ids"])


@pytest.mark.parametrize("change", [
    {"token_embedding.ids": torch.tensor([0, 256])},  # an id past vocab_size
    {"token_embedding.rows": torch.zeros(3, 64)},  # one row too many
    {"token_embedding.vocab_size": torch.tensor(256)},  # not an int
    {"token_embedding.ids": torch.tensor([0.0, 1.0])},  # not ids
])
def test_malformed_sparse_rows_are_refused(change, tmp_path):
    sd = torch.load(FP16, weights_only=True)
    weight = sd.pop("token_embedding.weight")
    sd.update({"token_embedding.ids": torch.tensor([3, 7]), "token_embedding.rows": weight[[3, 7]],
               "token_embedding.vocab_size": weight.shape[0], "note": "made by hand",
               "open_clip_config": clip_load.config_note(clip_load.OPENAI_SPEC)})
    torch.save(sd, tmp_path / "sparse.pt")
    model, _ = clip_model.load(str(tmp_path / "sparse.pt"))
    assert torch.equal(model.token_embedding.weight[[3, 7]], weight[[3, 7]].float())
    assert model.token_embedding.weight[[0, 1, 2, 4]].abs().sum() == 0
    torch.save({**sd, **change}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="token_embedding.ids/.rows/.vocab_size"):
        clip_model.load(str(tmp_path / "bad.pt"))


# ------------------------------------------------------------------------------------------------
# What a file that is no CLIP ViT is called


class Program:
    """Unpickling this would call print: code, which torch.load(weights_only=True) refuses."""

    def __reduce__(self):
        return print, ("code from the file ran",)


@pytest.mark.parametrize("seed", range(40))
def test_random_bytes_are_not_called_a_program(seed, tmp_path):
    """torch refuses random bytes as it refuses code (an unknown opcode); they are not a pickle."""
    path = tmp_path / "x.bin"
    path.write_bytes(np.random.default_rng(seed).bytes(4096))
    with pytest.raises(RuntimeError) as e:
        clip_model.load(str(path))
    message = str(e.value)
    assert not isinstance(e.value, clip_load.UnsafeFileError) and "\n" not in message
    assert message.startswith(f"could not read {path}: it is truncated or not a checkpoint ("), (
        message)
    assert "refused" not in message and "running code" not in message


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_naming_code_is_refused_at_any_protocol(protocol, tmp_path, capsys):
    """torch names the global only for some protocols (it refuses others at an opcode it does not
    read, before the global), but the file is a pickle (PROTO first or STOP last), so it is called
    refused, not damaged."""
    path = tmp_path / "program.pkl"
    path.write_bytes(pickle.dumps({"visual.proj": Program()}, protocol))
    with pytest.raises(clip_load.UnsafeFileError) as e:
        clip_model.load(str(path))
    message = str(e.value)
    assert message.startswith(f"could not read {path}: refused: it holds more than the tensors and "
                              "plain values that can be read without running code from the file (")
    assert "\n" not in message
    assert "code from the file ran" not in capsys.readouterr().out


def test_load_error_detail_says_refused_only_for_pickles(tmp_path):
    path = tmp_path / "program.pkl"
    path.write_bytes(pickle.dumps(Program(), 5))
    with pytest.raises(Exception) as e:
        torch.load(path, weights_only=True)
    assert runtime.load_error_detail(e.value, str(path)).startswith("refused: ")
    path.write_bytes(b"\x00" * 10)  # neither a PROTO opcode first nor STOP last: not a pickle
    with pytest.raises(Exception) as e:
        torch.load(path, weights_only=True)
    detail = runtime.load_error_detail(e.value, str(path))
    assert detail.startswith("it is truncated or not a checkpoint")


@pytest.mark.parametrize("sd,message", [
    ({"weight": torch.zeros(3, 2), "bias": torch.zeros(3)},
     "not a CLIP ViT checkpoint: missing key 'visual.conv1.weight' (it holds 2 tensor(s): "
     "'weight', 'bias')"),
    ({}, "not a CLIP ViT checkpoint: missing key 'visual.conv1.weight' (it holds 0 tensor(s): "
         "none)"),
    ({f"k{i}": torch.zeros(1) for i in range(5)},
     "not a CLIP ViT checkpoint: missing key 'visual.conv1.weight' (it holds 5 tensor(s): e.g. "
     "'k0', 'k1')"),
], ids=["nn-linear", "empty", "five-keys"])
def test_a_state_dict_without_vit_keys_is_not_called_resnet(sd, message, tmp_path):
    torch.save(sd, tmp_path / "sd.pt")
    with pytest.raises(ValueError) as e:
        clip_model.load(str(tmp_path / "sd.pt"))
    assert str(e.value) == f"{tmp_path / 'sd.pt'}: {message}" and "ResNet" not in str(e.value)


def test_vit_without_proj_is_not_called_resnet():
    sd = torch.load(FP16, weights_only=True)
    del sd["visual.proj"]
    with pytest.raises(ValueError, match=r"^not a CLIP ViT checkpoint: missing key 'visual.proj' "):
        clip_model.build_model(sd, "quick_gelu")


def test_key_mismatch_is_one_line_with_counts_and_examples():
    sd = torch.load(FP16, weights_only=True)
    for key in ("visual.ln_post.bias", "visual.ln_post.weight", "ln_final.bias"):
        del sd[key]
    sd.update({"extra.a": torch.zeros(1), "extra.b": torch.zeros(1)})
    sd["visual.class_embedding"] = sd["visual.class_embedding"][:-1]
    with pytest.raises(RuntimeError) as e:
        clip_model.build_model(sd, "quick_gelu")
    width = sd["visual.conv1.weight"].shape[0]
    assert str(e.value) == (
        "the state dict does not fit the CLIP its tensors describe: 3 key(s) missing (e.g. "
        "'visual.ln_post.weight', 'visual.ln_post.bias'), 2 unexpected ('extra.a', 'extra.b'), "
        f"1 of another shape ('visual.class_embedding': ({width - 1},) in the file, ({width},) in "
        "the model)")
