"""clip_load against open_clip and transformers: small random CLIPs that their own code built and
ran (tests/data/open_clip_fixtures.pt, made by tests/make_open_clip_fixtures.py), written back here
in their libraries' file formats and read through clip_load.load. Each must give the libraries'
image and text features, zero-shot head and preprocessing, and run MUST's masked forward, whatever
its heads and MLP widths; a state dict that does not say its activation is refused, and so is every
config field the code cannot follow, in one line; a named checkpoint downloads checked against the
SHA-256 the hub states; a run records the geometry it started from, and checkpoints that predate
that record still resume. Tests that write safetensors files are skipped without the package."""
import hashlib
import http.server
import json
import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from util import checkpoint, clip_load
import clip_model
import config
import must
import prompts
from util import runtime
from util import tokenizer
import train
from conftest import save_clip, tiny_clip

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
FIXTURES = torch.load(os.path.join(DATA, "open_clip_fixtures.pt"), weights_only=True)
CLASSES = ["red square", "blue circle", "green cross"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}."]
KINDS = ["open_clip_gelu", "open_clip_quickgelu", "open_clip_mean_std", "transformers",
         "open_clip_h14_heads", "open_clip_mlp_ratio", "transformers_heads"]


def save_file(tensors, path, **kwargs):
    """safetensors' save_file; a test that writes such a file is skipped without the package."""
    pytest.importorskip("safetensors.torch").save_file(tensors, path, **kwargs)


def full_state(fx):
    """The fixture's weights in float32, with the whole token table (zero where no prompt reads)."""
    sd = {name: t.float() for name, t in fx["state"].items()}
    key, ids, rows = fx["embedding"]
    table = torch.zeros(49408, rows.shape[1])
    table[ids] = rows.float()
    sd[key] = table
    return sd


def write(fx, folder, file_format):
    """The fixture as its library writes it -> the path to give clip_load.load."""
    folder.mkdir(parents=True)
    sd = full_state(fx)
    if fx["format"] == "transformers":
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(fx["config"])
        (folder / "preprocessor_config.json").write_text(fx["preprocessor_config"])
        return folder
    (folder / "open_clip_config.json").write_text(fx["config"])
    if file_format == "safetensors":
        save_file(sd, folder / "open_clip_model.safetensors")
        return folder / "open_clip_model.safetensors"
    torch.save(sd, folder / "open_clip_pytorch_model.bin")
    return folder / "open_clip_pytorch_model.bin"


def relative_error(got, expected):
    return ((got - expected).norm() / expected.norm()).item()


CASES = [(kind, fmt) for kind in KINDS for fmt in ("bin", "safetensors")
         if FIXTURES[kind]["format"] != "transformers" or fmt == "safetensors"]


@pytest.mark.parametrize("kind,file_format", CASES)
def test_reads_the_checkpoint_exactly(kind, file_format, tmp_path):
    """Features, zero-shot head and logit scale to 1e-5 of their size; the preprocessing is the
    checkpoint's own; MUST's masked forward runs on it."""
    fx = FIXTURES[kind]
    model, preprocess = clip_model.load(str(write(fx, tmp_path / "clip", file_format)))
    assert torch.equal(tokenizer.tokenize(fx["texts"]), fx["tokens"])
    with torch.no_grad():
        image_features = model.encode_image(fx["images"])
        text_features = model.encode_text(fx["tokens"])
        head = prompts.zero_shot_head(model, CLASSES, TEMPLATES)
    assert relative_error(image_features, fx["image_features"]) < 1e-5
    assert relative_error(text_features, fx["text_features"]) < 1e-5
    assert relative_error(head, fx["head"]) < 1e-5
    assert model.logit_scale.exp().item() == pytest.approx(fx["logit_scale"], rel=1e-6)
    picture = Image.fromarray(fx["picture"].numpy())
    difference = (preprocess(picture) - fx["preprocessed"]).abs()
    if fx["format"] == "transformers":
        # transformers resizes with its own kernels, not PIL's: a pixel may differ by one gray level
        # (1/255 before normalization), never more; a wrong normalization would move every pixel.
        one_level = 1 / 255 / min(model.spec.std)
        assert difference.max() <= 1.01 * one_level and difference.mean() < 0.05 * one_level
    else:
        assert difference.max() < 1e-5  # the same PIL resize: to float rounding (pixels ~2)
    student = must.MUSTModel.from_clip(model, head)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :4] = True
    with torch.no_grad():
        out = student(fx["images"], mask)
    assert out.recon.shape == fx["images"].shape and out.v_patch.shape == (2, 16, 32)
    assert all(torch.isfinite(t).all() for t in out)


def test_what_the_configs_say(tmp_path):
    """The activation, the preprocessing and the head counts come from the files, each as its
    library says; the MLP widths from the weights."""
    models = {kind: clip_model.load(str(write(FIXTURES[kind], tmp_path / kind, "bin")))[0]
              for kind in KINDS}
    specs = {kind: model.spec for kind, model in models.items()}
    assert specs["open_clip_gelu"] == clip_load.OPENAI_SPEC._replace(activation="gelu")
    assert specs["open_clip_quickgelu"] == clip_load.OPENAI_SPEC
    assert specs["open_clip_mean_std"].mean == specs["open_clip_mean_std"].std == (0.5,) * 3
    assert specs["transformers"] == clip_load.OPENAI_SPEC  # quick_gelu, CLIPImageProcessor's
    # 320 wide in heads of 80: 4, where 64-wide ones would be 5; the text tower's 4 of 16.
    assert specs["open_clip_h14_heads"] == clip_load.OPENAI_SPEC._replace(
        resize_mode="squash", vision_heads=4, text_heads=4)
    assert specs["open_clip_mlp_ratio"] == clip_load.OPENAI_SPEC._replace(activation="gelu")
    # do_normalize false: the pixels / 255 as they are.
    assert specs["transformers_heads"] == clip_load.ClipSpec(
        "gelu", (0.0,) * 3, (1.0,) * 3, "bicubic", "shortest", 4, 2)

    def blocks(tower):
        block = tower.resblocks[0]
        return block.attn.heads, block.mlp.c_fc.out_features
    h14, ratio, hf = (models[k] for k in KINDS[4:])
    assert blocks(h14.visual.transformer) == (4, 80) and blocks(h14.transformer) == (4, 256)
    # open_clip's int(width * ratio): 64 x 4.9231 and 64 x 4.3637
    assert blocks(ratio.visual.transformer) == (1, 315) and blocks(ratio.transformer) == (1, 279)
    assert blocks(hf.visual.transformer) == (4, 200) and blocks(hf.transformer) == (2, 100)


@pytest.mark.parametrize("kind", ["open_clip_h14_heads", "transformers_heads"])
def test_the_wrong_heads_would_show(kind, tmp_path):
    """The check has teeth: the same weights in OpenAI's 64-wide heads are far off."""
    fx = FIXTURES[kind]
    model, _ = clip_model.load(str(write(fx, tmp_path / "clip", "safetensors")))
    wrong = clip_model.build_model(model.state_dict(), model.spec.activation).eval()
    with torch.no_grad():
        assert relative_error(wrong.encode_image(fx["images"]), fx["image_features"]) > 1e-3
        assert relative_error(wrong.encode_text(fx["tokens"]), fx["text_features"]) > 1e-3


def test_the_wrong_activation_would_show(tmp_path):
    """The check has teeth: QuickGELU on GELU weights is far outside the tolerance above."""
    fx = FIXTURES["open_clip_gelu"]
    path = write(fx, tmp_path / "clip", "bin")
    config_path = tmp_path / "clip" / "open_clip_config.json"
    wrong = json.loads(config_path.read_text())
    wrong["model_cfg"]["quick_gelu"] = True
    config_path.write_text(json.dumps(wrong))
    model, _ = clip_model.load(str(path))
    with torch.no_grad():
        assert relative_error(model.encode_text(fx["tokens"]), fx["text_features"]) > 1e-3
        assert relative_error(model.encode_image(fx["images"]), fx["image_features"]) > 1e-3


def test_a_bare_state_dict_is_refused_rather_than_misloaded(tmp_path):
    path = tmp_path / "gelu_clip.pt"
    torch.save(full_state(FIXTURES["open_clip_gelu"]), path)
    with pytest.raises(ValueError) as e:
        clip_model.load(str(path))
    message = str(e.value)
    assert message.startswith(f"{path}: it holds a CLIP's weights but not its activation (GELU "
                              "or QuickGELU) or image normalization")
    assert "put the open_clip_config.json it came with beside it" in message and "\n" not in message


def test_the_config_can_travel_inside_the_state_dict(tmp_path):
    """The project's own files carry open_clip's JSON as a string entry, `open_clip_config`."""
    fx = FIXTURES["open_clip_quickgelu"]
    sd = full_state(fx)
    sd["open_clip_config"] = fx["config"]
    torch.save(sd, tmp_path / "clip.pt")
    model, _ = clip_model.load(str(tmp_path / "clip.pt"))
    assert model.spec == clip_load.OPENAI_SPEC
    with torch.no_grad():
        assert relative_error(model.encode_text(fx["tokens"]), fx["text_features"]) < 1e-5


def test_a_note_says_the_heads_too(tmp_path):
    """config_note states other heads as open_clip does (the image tower's by their width, which
    it takes from the CLIP), so that a file carrying it loads with them."""
    fx = FIXTURES["open_clip_h14_heads"]
    model, _ = clip_model.load(str(write(fx, tmp_path / "clip", "bin")))
    with pytest.raises(ValueError, match="config_note needs the CLIP"):
        clip_load.config_note(model.spec)
    note = clip_load.config_note(model.spec, model)
    torch.save({**model.state_dict(), "open_clip_config": note}, tmp_path / "noted.pt")
    again, _ = clip_model.load(str(tmp_path / "noted.pt"))
    assert again.spec == model.spec
    with torch.no_grad():
        assert relative_error(again.encode_image(fx["images"]), fx["image_features"]) < 1e-5
        assert relative_error(again.encode_text(fx["tokens"]), fx["text_features"]) < 1e-5


def test_a_note_and_the_config_beside_it_must_agree(small_weights, tmp_path):
    """A state dict's note and the open_clip_config.json beside it: the same spec loads, another
    is refused in one line that says how they differ."""
    sd = torch.load(small_weights, weights_only=True)
    path, beside = tmp_path / "clip.pt", tmp_path / "open_clip_config.json"
    beside.write_text(FIXTURES["open_clip_gelu"]["config"])  # GELU
    torch.save({**sd, "open_clip_config": clip_load.config_note(clip_load.OPENAI_SPEC)}, path)
    assert one_line_error(path) == (
        f"{path}'s open_clip_config note and {beside} disagree (activation 'quick_gelu' vs "
        "'gelu'): correct or remove the wrong one")
    gelu = clip_load.OPENAI_SPEC._replace(activation="gelu")
    torch.save({**sd, "open_clip_config": clip_load.config_note(gelu)}, path)
    assert clip_model.load(str(path))[0].spec == gelu


def test_a_note_of_the_wrong_json_type_is_one_line(small_weights, tmp_path):
    sd = torch.load(small_weights, weights_only=True)
    path = tmp_path / "clip.pt"
    torch.save({**sd, "open_clip_config": '{"model_cfg": "ViT-B-16"}'}, path)
    assert one_line_error(path) == (f"{path}'s open_clip_config note: model_cfg is \"ViT-B-16\", "
                                    "not a JSON object")


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    """open_clip_gelu's weights with the token table stored by the rows it uses (clip_load reads
    it so), written once: quick to load in the tests of config files."""
    fx = FIXTURES["open_clip_gelu"]
    sd = {name: t.float() for name, t in fx["state"].items()}
    key, ids, rows = fx["embedding"]
    name = key.removesuffix(".weight")
    sd.update({f"{name}.ids": ids, f"{name}.rows": rows.float(), f"{name}.vocab_size": 49408})
    path = tmp_path_factory.mktemp("weights") / "clip.bin"
    torch.save(sd, path)
    return path


def with_config(weights, folder, config, name="open_clip_config.json"):
    """`weights` linked into a new `folder`, with `config` (bytes, or a JSON value) beside them as
    `name`. -> the weights' path there"""
    folder.mkdir()
    os.symlink(weights, folder / "open_clip_pytorch_model.bin")
    text = config if isinstance(config, bytes) else json.dumps(config).encode()
    (folder / name).write_bytes(text)
    return folder / "open_clip_pytorch_model.bin"


def edited(keys, value, config=FIXTURES["open_clip_gelu"]["config"]):
    """A JSON config (text) with the field at `keys` set to `value` (the whole of it for no keys),
    the sections on the way made where missing."""
    if not keys:
        return value
    config = json.loads(config)
    section = config
    for key in keys[:-1]:
        section = section.setdefault(key, {})
    section[keys[-1]] = value
    return config


def one_line_error(path, error=ValueError):
    with pytest.raises(error) as e:
        clip_model.load(str(path))
    message = str(e.value)
    assert "\n" not in message, message
    return message


NAN, INF = float("nan"), float("inf")
# (id, the keys of a field of open_clip_gelu's open_clip_config.json, a value, what the one-line
# refusal says after the file's path)
CONFIG_FAULTS = [
    ("not-an-object", (), [1], " holds no JSON object"),
    ("model_cfg-list", ("model_cfg",), [1], ": model_cfg is [1], not a JSON object"),
    ("preprocess_cfg-string", ("preprocess_cfg",), "bicubic",
     ': preprocess_cfg is "bicubic", not a JSON object'),
    ("preprocess_cfg-list", ("preprocess_cfg",), [], ": preprocess_cfg is [], not a JSON object"),
    ("vision_cfg-string", ("model_cfg", "vision_cfg"), "ViT-B-16",
     ': model_cfg.vision_cfg is "ViT-B-16", not a JSON object'),
    ("vision_cfg-list", ("model_cfg", "vision_cfg"), [64],
     ": model_cfg.vision_cfg is [64], not a JSON object"),
    ("interpolation-list", ("preprocess_cfg", "interpolation"), ["bicubic"],
     ': preprocess_cfg.interpolation is ["bicubic"], not one of "bicubic", "bilinear"'),
    ("lanczos", ("preprocess_cfg", "interpolation"), "lanczos",
     ': preprocess_cfg.interpolation is "lanczos", not one of "bicubic", "bilinear"'),
    ("resize-longest", ("preprocess_cfg", "resize_mode"), "longest",
     ': preprocess_cfg.resize_mode is "longest", not one of "shortest", "squash"'),
    ("mode-L", ("preprocess_cfg", "mode"), "L", ': preprocess_cfg.mode is "L", not one of "RGB"'),
    ("quick_gelu-string", ("model_cfg", "quick_gelu"), "false",
     ': model_cfg.quick_gelu is "false", not true or false'),
    ("mean-nan", ("preprocess_cfg", "mean"), [0.5, NAN, 0.5],
     ": preprocess_cfg.mean is [0.5, NaN, 0.5], not a list of 3 finite numbers"),
    ("mean-booleans", ("preprocess_cfg", "mean"), [True, False, True],
     ": preprocess_cfg.mean is [true, false, true], not a list of 3 finite numbers"),
    ("two-means", ("preprocess_cfg", "mean"), [0.5, 0.5],
     ": preprocess_cfg.mean is [0.5, 0.5], not a list of 3 finite numbers"),
    ("std-infinity", ("preprocess_cfg", "std"), [0.5, INF, 0.5],
     ": preprocess_cfg.std is [0.5, Infinity, 0.5], not a list of 3 positive finite numbers"),
    ("zero-std", ("preprocess_cfg", "std"), [0.5, 0, 0.5],
     ": preprocess_cfg.std is [0.5, 0, 0.5], not a list of 3 positive finite numbers"),
    ("other-patch", ("model_cfg", "vision_cfg", "patch_size"), 16,
     ": model_cfg.vision_cfg.patch_size is 16, the weights' 8"),
    ("not-square", ("model_cfg", "vision_cfg", "image_size"), [32, 64],
     ": model_cfg.vision_cfg.image_size is [32, 64], not a square's side in px, or [side, side]"),
    ("other-input-size", ("preprocess_cfg", "size"), 224,
     ": preprocess_cfg.size is 224, the weights' 32"),
    ("other-text-width", ("model_cfg", "text_cfg", "width"), 128,
     ": model_cfg.text_cfg.width is 128, the weights' 64"),
    ("other-embed-dim", ("model_cfg", "embed_dim"), 64,
     ": model_cfg.embed_dim is 64, the weights' 32"),
    ("other-mlp-ratio", ("model_cfg", "vision_cfg", "mlp_ratio"), 4.5,
     ": model_cfg.vision_cfg.mlp_ratio 4.5 gives MLPs 288 wide, the weights' are 256"),
    ("head-width-over-width", ("model_cfg", "vision_cfg", "head_width"), 128,
     ": model_cfg.vision_cfg.head_width 128 does not divide the width 64 into heads"),
    ("text-heads-3", ("model_cfg", "text_cfg", "heads"), 3,
     ": model_cfg.text_cfg.heads 3 does not divide the width 64"),
    ("heads-string", ("model_cfg", "text_cfg", "heads"), "8",
     ': model_cfg.text_cfg.heads is "8", not a whole number of at least 1'),
    ("unknown-vision-key", ("model_cfg", "vision_cfg", "patch_dropout_rate"), 0.1,
     ": model_cfg.vision_cfg.patch_dropout_rate is not one of open_clip's CLIPVisionCfg keys"),
    ("unknown-model-key", ("model_cfg", "vision_config"), {},
     ": model_cfg.vision_config is not one of open_clip's model_cfg keys"),
]


@pytest.mark.parametrize("keys,value,message", [pytest.param(*row[1:], id=row[0])
                                                for row in CONFIG_FAULTS])
def test_a_config_that_cannot_be_followed_is_one_line(keys, value, message, small_weights,
                                                      tmp_path):
    path = with_config(small_weights, tmp_path / "clip", edited(keys, value))
    assert one_line_error(path) == f"{tmp_path / 'clip' / 'open_clip_config.json'}{message}"


# open_clip's CLIPVisionCfg and CLIPTextCfg keys (and model_cfg's) that change what a tower
# computes, each at a value that clip_model does not build.
REFUSED_KEYS = [
    *[(tower, key, value) for tower in ("vision_cfg", "text_cfg") for key, value in (
        ("ls_init_value", 0.1), ("final_ln_after_pool", True),
        ("act_kwargs", {"approximate": "tanh"}), ("norm_kwargs", {"eps": 1e-6}),
        ("block_type", "custom"), ("qk_norm", True), ("scaled_cosine_attn", True),
        ("scale_heads", True), ("scale_attn_inner", True), ("scale_attn", True),
        ("scale_fc", True))],
    ("vision_cfg", "timm_model_name", "vit_base_patch16_224"),
    ("vision_cfg", "attentional_pool", True), ("vision_cfg", "no_ln_pre", True),
    ("vision_cfg", "pos_embed_type", "sin_cos_2d"), ("vision_cfg", "pool_type", "avg"),
    ("vision_cfg", "image_seq_len", 256),
    ("text_cfg", "text_arch", "modern"), ("text_cfg", "hf_model_name", "roberta-base"),
    ("text_cfg", "variable_text", True), ("text_cfg", "hf_tokenizer_name", "bert-base-uncased"),
    ("text_cfg", "tokenizer_mode", "clips"), ("text_cfg", "tokenizer_kwargs", {"clean": "none"}),
    ("text_cfg", "tokenizer_type", "tiktoken"), ("text_cfg", "embed_cls", True),
    ("text_cfg", "pad_id", 1), ("text_cfg", "bos_id", 49406), ("text_cfg", "no_causal_mask", True),
    ("text_cfg", "pool_type", "last"), ("text_cfg", "proj_type", "none"),
    ("text_cfg", "proj_bias", True),
    ("model_cfg", "custom_text", True), ("model_cfg", "multimodal_cfg", {"width": 64}),
    ("model_cfg", "init_logit_bias", -10), ("model_cfg", "nonscalar_logit_scale", True),
]


@pytest.mark.parametrize("section,key,value", REFUSED_KEYS,
                         ids=[f"{section}.{key}" for section, key, _ in REFUSED_KEYS])
def test_every_open_clip_key_that_is_not_built_is_refused(section, key, value, small_weights,
                                                          tmp_path):
    keys = ("model_cfg", key) if section == "model_cfg" else ("model_cfg", section, key)
    path = with_config(small_weights, tmp_path / "clip", edited(keys, value))
    field = ".".join(keys)
    assert f": {field} {json.dumps(value)} is not supported (the CLIP built here has " in \
        one_line_error(path)


def test_every_key_open_clip_knows_is_built_refused_or_read():
    """The refusal tests cover clip_load's tables, and the tables every key of open_clip's
    CLIPVisionCfg and CLIPTextCfg (as open-clip-torch 3.3.0, which made the fixtures, has them)."""
    tables = {"vision_cfg": (clip_load._VISION_BUILT, clip_load._VISION_OTHER),
              "text_cfg": (clip_load._TEXT_BUILT, clip_load._TEXT_OTHER),
              "model_cfg": (clip_load._MODEL_BUILT, clip_load._MODEL_OTHER)}
    tested = {(section, key) for section, key, _ in REFUSED_KEYS}
    assert tested == {(section, key) for section, (built, _) in tables.items() for key in built}
    for section, keys in FIXTURES["open_clip_keys"].items():
        built, other = tables[section]
        assert set(keys) <= set(built) | other, set(keys) - set(built) - other


@pytest.fixture(scope="module")
def hf_weights(tmp_path_factory):
    """The transformers fixture's weights as pytorch_model.bin, the token table by its used rows."""
    fx = FIXTURES["transformers"]
    sd = {name: t.float() for name, t in fx["state"].items()}
    key, ids, rows = fx["embedding"]
    name = key.removesuffix(".weight")
    sd.update({f"{name}.ids": ids, f"{name}.rows": rows.float(), f"{name}.vocab_size": 49408})
    path = tmp_path_factory.mktemp("hf_weights") / "pytorch_model.bin"
    torch.save(sd, path)
    return path


def hf_folder(weights, folder, **files):
    """A transformers folder: `weights` linked in, and config.json and preprocessor_config.json,
    the fixture's unless `files` gives one (config=..., preprocessor_config=...: bytes, or a
    JSON value). -> the folder"""
    folder.mkdir()
    os.symlink(weights, folder / "pytorch_model.bin")
    for name in ("config", "preprocessor_config"):
        text = files.get(name, FIXTURES["transformers"][name].encode())
        text = text if isinstance(text, bytes) else json.dumps(text).encode()
        (folder / f"{name}.json").write_bytes(text)
    return folder


def test_a_transformers_folder_without_preprocessing_file_loads(hf_weights, tmp_path):
    folder = hf_folder(hf_weights, tmp_path / "clip")
    (folder / "preprocessor_config.json").unlink()
    assert clip_model.load(str(folder))[0].spec == clip_load.OPENAI_SPEC


# (id, the file, the keys of a field in it, a value, what the refusal says after the file's path)
HF_FAULTS = [
    ("vision_config-list", "config", ("vision_config",), [1],
     ": vision_config is [1], not a JSON object"),
    ("other-image-size", "config", ("vision_config", "image_size"), 64,
     ": vision_config.image_size is 64, the weights' 32"),
    ("other-mlp", "config", ("vision_config", "intermediate_size"), 300,
     ": vision_config.intermediate_size is 300, the weights' 256"),
    ("heads-3", "config", ("text_config", "num_attention_heads"), 3,
     ": text_config.num_attention_heads 3 does not divide the width 64"),
    ("gelu-new", "config", ("vision_config", "hidden_act"), "gelu_new",
     ': vision_config.hidden_act is "gelu_new", not one of "quick_gelu", "gelu"'),
    ("layer-norm-eps", "config", ("text_config", "layer_norm_eps"), 1e-6,
     ": text_config.layer_norm_eps is not CLIP's 1e-5"),
    ("mean-nan", "preprocessor_config", ("image_mean",), [0.5, NAN, 0.5],
     ": image_mean is [0.5, NaN, 0.5], not a list of 3 finite numbers"),
    ("do-normalize-string", "preprocessor_config", ("do_normalize",), "no",
     ': do_normalize is "no", not true or false'),
    ("no-center-crop", "preprocessor_config", ("do_center_crop",), False,
     ": do_center_crop is false: only CLIP's preprocessing, which does it, is supported"),
    ("other-crop", "preprocessor_config", ("crop_size",), {"height": 24, "width": 24},
     ": crop_size.height is 24, the weights' 32"),
    ("other-resize", "preprocessor_config", ("size",), {"shortest_edge": 64},
     ": size.shortest_edge is 64, the weights' 32"),
    ("nearest", "preprocessor_config", ("resample",), 0, ": resample is 0, not one of 3, 2"),
]


@pytest.mark.parametrize("name,keys,value,message", [pytest.param(*row[1:], id=row[0])
                                                     for row in HF_FAULTS])
def test_a_transformers_config_that_cannot_be_followed_is_one_line(name, keys, value, message,
                                                                   hf_weights, tmp_path):
    config = edited(keys, value, FIXTURES["transformers"][name])
    folder = hf_folder(hf_weights, tmp_path / "clip", **{name: config})
    assert one_line_error(folder) == f"{folder / name}.json{message}"


def test_a_transformers_size_of_height_and_width_squashes(hf_weights, tmp_path):
    """CLIPImageProcessor resizes the whole image to a size given as a height and a width."""
    square = edited(("size",), {"height": 32, "width": 32},
                    FIXTURES["transformers"]["preprocessor_config"])
    folder = hf_folder(hf_weights, tmp_path / "clip", preprocessor_config=square)
    assert clip_model.load(str(folder))[0].spec.resize_mode == "squash"


@pytest.mark.parametrize("how", [
    pytest.param("chmod", marks=pytest.mark.skipif(
        os.geteuid() == 0, reason="root reads a chmod 000 file (simulated in the next case)")),
    "simulated"])
@pytest.mark.parametrize("name", ["open_clip_config.json", "config.json",
                                  "preprocessor_config.json"])
def test_an_unreadable_config_is_one_line(how, name, small_weights, hf_weights, tmp_path,
                                          monkeypatch):
    if name == "open_clip_config.json":
        target = with_config(small_weights, tmp_path / "clip", b"{}")
    else:
        target = hf_folder(hf_weights, tmp_path / "clip")
    config_path = tmp_path / "clip" / name
    if how == "chmod":
        os.chmod(config_path, 0)
    else:
        def denied(file, *args, **kwargs):
            if os.fspath(file) == os.fspath(config_path):
                raise PermissionError(13, "Permission denied", os.fspath(file))
            return open(file, *args, **kwargs)
        monkeypatch.setattr(clip_load, "open", denied, raising=False)
    assert one_line_error(target) == f"{config_path} cannot be read (Permission denied)"


@pytest.mark.parametrize("name", ["open_clip_config.json", "config.json",
                                  "preprocessor_config.json"])
def test_a_config_that_is_not_utf8_is_one_line_naming_it(name, small_weights, hf_weights,
                                                         tmp_path):
    latin1 = '{"model_type": "clip", "about": "caf\u00e9"}'.encode("latin-1")
    if name == "open_clip_config.json":
        target = with_config(small_weights, tmp_path / "clip", latin1)
    else:
        target = hf_folder(hf_weights, tmp_path / "clip", **{name.removesuffix(".json"): latin1})
    assert one_line_error(target) == (f"{tmp_path / 'clip' / name} is not UTF-8 text (byte 36: "
                                      "0xe9); save it as UTF-8")


def test_open_checkpoints_are_named_with_their_table_rows():
    names = clip_load.available_models()
    for name in ("ViT-B-32/laion2b_s34b_b79k", "ViT-B-16/dfn2b", "ViT-L-14/datacomp_xl_s13b_b90k",
                 "ViT-B-16/metaclip_fullcc", "ViT-L-14/laion2b_s32b_b82k"):
        assert name in names
    assert clip_load.open_clip_spec("ViT-B-16/dfn2b").activation == "quick_gelu"
    assert clip_load.open_clip_spec("ViT-B-16/laion2b_s34b_b88k").activation == "gelu"
    assert clip_load.open_clip_spec("ViT-L-14/laion2b_s32b_b82k").mean == (0.5, 0.5, 0.5)
    # Table 10 by architecture: an open ViT-B/16 takes the B/16 rows, an L/14 its own.
    for name, geometry, row in (("ViT-B-16/dfn2b", (16, 224, 768), "ViT-B/16"),
                                ("ViT-L-14/dfn2b", (14, 224, 1024), "ViT-L/14"),
                                ("ViT-B-32/laion2b_s34b_b79k", (32, 224, 768), "ViT-B/32"),
                                ("ViT-H-14/dfn5b", (14, 224, 1280), "ViT-H/14"),
                                ("ViT-H-14-378/dfn5b", (14, 378, 1280), "ViT-H/14@378px"),
                                ("ViT-bigG-14/laion2b_s39b_b160k", (14, 224, 1664), "ViT-bigG/14")):
        visual = SimpleNamespace(patch_size=geometry[0], input_resolution=geometry[1],
                                 width=geometry[2])
        assert config.model_key(name, visual) == row
    assert config.hparams("imagenet", "ViT-L/14")["batch_size"] == 512


def test_the_open_vit_h_rows():
    """ViT-H/14 (and bigG/14) by their rows in open_clip's pretrained.py: 16 heads in the image
    tower (80 and 104 wide), 64-wide ones in the text tower; DFN's resize of the whole image."""
    rows = {"ViT-H-14/laion2b_s32b_b79k": ("gelu", 224, "shortest"),
            "ViT-H-14/dfn5b": ("quick_gelu", 224, "squash"),
            "ViT-H-14-378/dfn5b": ("quick_gelu", 378, "squash"),
            "ViT-H-14/metaclip_fullcc": ("quick_gelu", 224, "shortest"),
            "ViT-bigG-14/laion2b_s39b_b160k": ("gelu", 224, "shortest")}
    for name, (activation, size, resize_mode) in rows.items():
        assert name in clip_load.available_models()
        assert clip_load.open_clip_spec(name) == clip_load.OPENAI_SPEC._replace(
            activation=activation, resize_mode=resize_mode, vision_heads=16)
        assert clip_load._OPEN_CLIP[name][2] == size
    # The paper has no ViT-H/14 rows: ViT-L/14's, at its batch; the mask unit tiles 378 px.
    for model in ("ViT-H/14", "ViT-bigG/14"):
        assert config.hparams("imagenet", model) == config.hparams("imagenet", "ViT-L/14")
    at_378 = config.hparams("imagenet", "ViT-H/14@378px")
    assert at_378["mask_unit"] == 42 and at_378["batch_size"] == 512
    assert at_378["base_lr"] == config.hparams("imagenet", "ViT-L/14")["base_lr"]


class _Hub(http.server.BaseHTTPRequestHandler):
    """A stand-in for the Hugging Face hub: HEAD answers with a redirect that states the file's
    SHA-256 (X-Linked-Etag, as the hub does for git LFS files); GET serves the file."""
    files = {}

    def do_HEAD(self):
        body = self.files[self.path]
        self.send_response(302)
        self.send_header("X-Linked-Etag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header("Location", self.path + "?storage")
        self.end_headers()

    def do_GET(self):
        body = self.files[self.path.split("?")[0]]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(clip_load, "_HUB", f"http://127.0.0.1:{server.server_port}")
    yield _Hub.files
    server.shutdown()


def test_a_named_checkpoint_downloads_checked_and_is_cached(hub, tmp_path, monkeypatch):
    fx = FIXTURES["open_clip_gelu"]
    write(fx, tmp_path / "published", "bin")
    hub["/org/tiny-clip/resolve/main/open_clip_pytorch_model.bin"] = (
        tmp_path / "published" / "open_clip_pytorch_model.bin").read_bytes()
    monkeypatch.setitem(clip_load._OPEN_CLIP, "Tiny/gelu", ("org/tiny-clip", "gelu", 32, {}))
    cache = tmp_path / "cache"
    model, _ = clip_model.load("Tiny/gelu", download_root=str(cache))
    assert model.spec.activation == "gelu"
    with torch.no_grad():
        assert relative_error(model.encode_text(fx["tokens"]), fx["text_features"]) < 1e-5
    assert sorted(os.listdir(cache / "org" / "tiny-clip")) == ["open_clip_pytorch_model.bin",
                                                            "open_clip_pytorch_model.bin.sha256"]
    hub.clear()  # the second load comes from the cache, checked against the kept checksum
    assert clip_model.load("Tiny/gelu", download_root=str(cache))[0].spec.activation == "gelu"
    # A row's input px is checked: another model's file is one line.
    monkeypatch.setitem(clip_load._OPEN_CLIP, "Tiny/gelu", ("org/tiny-clip", "gelu", 378, {}))
    with pytest.raises(ValueError) as e:
        clip_model.load("Tiny/gelu", download_root=str(cache))
    assert str(e.value).endswith(": its input is 32 px, not the 378 px of Tiny/gelu: it is another "
                                 "model's file")
    (cache / "org" / "tiny-clip" / "open_clip_pytorch_model.bin").write_bytes(b"damaged")
    with pytest.raises(RuntimeError, match="does not match its published SHA-256"):
        clip_model.load("Tiny/gelu", download_root=str(cache))


def test_a_download_that_does_not_match_the_stated_checksum_leaves_nothing(hub, tmp_path,
                                                                            monkeypatch):
    hub["/org/tiny-clip/resolve/main/open_clip_pytorch_model.bin"] = b"the stated file"
    real_get = _Hub.do_GET

    def serve_other_bytes(handler):
        handler.files = {k: b"other bytes" for k in handler.files}
        real_get(handler)
    monkeypatch.setattr(_Hub, "do_GET", serve_other_bytes)
    monkeypatch.setitem(clip_load._OPEN_CLIP, "Tiny/gelu", ("org/tiny-clip", "gelu", 32, {}))
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="SHA-256"):
        clip_model.load("Tiny/gelu", download_root=str(cache))
    left = os.listdir(cache / "org" / "tiny-clip") if (cache / "org").exists() else []
    assert left == [], left


# ----------------------------------------------------------------------------------------------
# A run records the geometry it started from

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """8 unlabeled 40x40 training PNGs and a classes file."""
    root = tmp_path_factory.mktemp("images")
    (root / "train").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "train" / f"{i}.png")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def run(images, model, out, steps):
    """train.py for `steps` steps of 4 images."""
    train.main(["--data", "folder", "--data-root", str(images / "train"),
                "--classes", str(images / "classes.txt"), "--model", str(model),
                "--global-batch", "4", "--epochs", "1", "--mask-unit", "16", "--base-lr", "1e-3",
                "--conf-threshold", "0.34", "--num-workers", "0", "--max-steps", str(steps),
                "--out-dir", str(out)])


def test_a_run_keeps_the_heads_it_started_from(images, tmp_path):
    """A run from a CLIP in 80-wide heads records them; its checkpoint rebuilds the same tower
    without the CLIP; the same weights said to have other heads are another CLIP to resume."""
    clip_path = write(FIXTURES["open_clip_h14_heads"], tmp_path / "clip", "bin")
    out = tmp_path / "out"
    run(images, clip_path, out, 1)
    ckpt = torch.load(out / train.CHECKPOINT, weights_only=True)
    assert (ckpt["clip"]["vision_heads"], ckpt["clip"]["resize_mode"]) == (4, "squash")
    student = must.load_checkpoint(ckpt)
    assert student.visual.transformer.resblocks[0].attn.heads == 4
    same = must.MUSTModel.from_clip(clip_model.load(str(clip_path))[0], torch.zeros(32, 3))
    same.load_state_dict(ckpt["student"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(student(x).logits, same.eval()(x).logits)
    config_path = tmp_path / "clip" / "open_clip_config.json"
    config_path.write_text(json.dumps(edited(("model_cfg", "vision_cfg", "head_width"), 64,
                                             config_path.read_text())))  # 5 heads
    with pytest.raises(SystemExit) as e:
        run(images, clip_path, out, 2)
    assert "was made with other CLIP activation, heads or image preprocessing" in str(e.value)


def test_a_checkpoint_that_recorded_four_spec_fields_still_resumes(images, tmp_path):
    """Checkpoints record the ClipSpec (and fingerprint it): one written when it had four fields
    resumes and evaluates as it did, with OpenAI's heads."""
    four = ["quick_gelu", list(clip_load.CLIP_MEAN), list(clip_load.CLIP_STD), "bicubic"]
    assert runtime.fingerprint(clip_load.OPENAI_SPEC.identity()) == runtime.fingerprint(four)
    assert checkpoint._OLDER["clip_spec"] == runtime.fingerprint(four)
    for other in ({"vision_heads": 16}, {"text_heads": 4}, {"resize_mode": "squash"}):
        spec = clip_load.OPENAI_SPEC._replace(**other)
        assert runtime.fingerprint(spec.identity()) != runtime.fingerprint(four)
    torch.manual_seed(0)
    save_clip(tiny_clip(), tmp_path / "tiny.pt")
    out = tmp_path / "out"
    run(images, tmp_path / "tiny.pt", out, 1)
    path = out / train.CHECKPOINT
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["fingerprints"]["clip_spec"] == runtime.fingerprint(four)
    ckpt["clip"] = dict(zip(("activation", "mean", "std", "interpolation"), four))
    torch.save(ckpt, path)
    assert must.load_checkpoint(ckpt).visual.transformer.resblocks[0].attn.heads == 1
    run(images, tmp_path / "tiny.pt", out, 2)
    assert torch.load(path, weights_only=True)["step"] == 2
