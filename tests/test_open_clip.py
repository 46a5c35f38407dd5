"""clip_load against open_clip and transformers: small random CLIPs that their own code built and
ran (tests/data/open_clip_fixtures.pt, made by tests/make_open_clip_fixtures.py), written back here
in their libraries' file formats and read through clip_load.load. Each must give the libraries'
image and text features, zero-shot head and preprocessing, and run MUST's masked forward; a state
dict that does not say its activation is refused; a named checkpoint downloads checked against the
SHA-256 the hub states."""
import hashlib
import http.server
import json
import os
import threading
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import clip_load
import config
import must
import prompts
import tokenizer

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
FIXTURES = torch.load(os.path.join(DATA, "open_clip_fixtures.pt"), weights_only=True)
CLASSES = ["red square", "blue circle", "green cross"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}."]
KINDS = ["open_clip_gelu", "open_clip_quickgelu", "open_clip_mean_std", "transformers"]


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
         if kind != "transformers" or fmt == "safetensors"]


@pytest.mark.parametrize("kind,file_format", CASES)
def test_reads_the_checkpoint_exactly(kind, file_format, tmp_path):
    """Features, zero-shot head and logit scale to 1e-5 of their size; the preprocessing is the
    checkpoint's own; MUST's masked forward runs on it."""
    fx = FIXTURES[kind]
    model, preprocess = clip_load.load(str(write(fx, tmp_path / "clip", file_format)))
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
    """The activation and the normalization come from the files, each as its library says."""
    specs = {kind: clip_load.load(str(write(FIXTURES[kind], tmp_path / kind, "bin")))[0].spec
             for kind in KINDS}
    assert specs["open_clip_gelu"] == clip_load.OPENAI_SPEC._replace(activation="gelu")
    assert specs["open_clip_quickgelu"] == clip_load.OPENAI_SPEC
    assert specs["open_clip_mean_std"].mean == specs["open_clip_mean_std"].std == (0.5,) * 3
    assert specs["transformers"] == clip_load.OPENAI_SPEC  # quick_gelu, CLIPImageProcessor's


def test_the_wrong_activation_would_show(tmp_path):
    """The check has teeth: QuickGELU on GELU weights is far outside the tolerance above."""
    fx = FIXTURES["open_clip_gelu"]
    path = write(fx, tmp_path / "clip", "bin")
    config_path = tmp_path / "clip" / "open_clip_config.json"
    wrong = json.loads(config_path.read_text())
    wrong["model_cfg"]["quick_gelu"] = True
    config_path.write_text(json.dumps(wrong))
    model, _ = clip_load.load(str(path))
    with torch.no_grad():
        assert relative_error(model.encode_text(fx["tokens"]), fx["text_features"]) > 1e-3
        assert relative_error(model.encode_image(fx["images"]), fx["image_features"]) > 1e-3


def test_a_bare_state_dict_is_refused_rather_than_misloaded(tmp_path):
    path = tmp_path / "gelu_clip.pt"
    torch.save(full_state(FIXTURES["open_clip_gelu"]), path)
    with pytest.raises(ValueError) as e:
        clip_load.load(str(path))
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
    model, _ = clip_load.load(str(tmp_path / "clip.pt"))
    assert model.spec == clip_load.OPENAI_SPEC
    with torch.no_grad():
        assert relative_error(model.encode_text(fx["tokens"]), fx["text_features"]) < 1e-5


@pytest.mark.parametrize("change,message", [
    ({"model_cfg": {"vision_cfg": {"timm_model_name": "vit_base"}}}, "are not CLIP's ViT"),
    ({"model_cfg": {"vision_cfg": {"patch_size": 16}}},
     "gives vision patch_size 16, the weights 8"),
    ({"preprocess_cfg": {"resize_mode": "squash"}}, "resize_mode 'squash' is not supported"),
    ({"preprocess_cfg": {"mean": [0.5, 0.5]}}, "mean and std must be 3 numbers each"),
    ({"preprocess_cfg": {"std": [0.5, 0, 0.5]}}, "must be positive"),
    ({"preprocess_cfg": {"interpolation": "lanczos"}}, "interpolation 'lanczos' is not one of"),
], ids=["timm-tower", "other-geometry", "squash", "two-means", "zero-std", "lanczos"])
def test_a_config_that_cannot_be_followed_is_one_line(change, message, tmp_path):
    fx = FIXTURES["open_clip_gelu"]
    path = write(fx, tmp_path / "clip", "bin")
    config_path = tmp_path / "clip" / "open_clip_config.json"
    edited = json.loads(config_path.read_text())
    for section, values in change.items():
        for key, value in values.items():
            if isinstance(value, dict):
                edited[section][key] = {**edited[section].get(key, {}), **value}
            else:
                edited[section][key] = value
    config_path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=message) as e:
        clip_load.load(str(path))
    assert "\n" not in str(e.value)


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
                                ("ViT-B-32/laion2b_s34b_b79k", (32, 224, 768), "ViT-B/32")):
        visual = SimpleNamespace(patch_size=geometry[0], input_resolution=geometry[1],
                                 width=geometry[2])
        assert config.model_key(name, visual) == row
    assert config.hparams("imagenet", "ViT-L/14")["batch_size"] == 512


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
    monkeypatch.setitem(clip_load._OPEN_CLIP, "Tiny/gelu", ("org/tiny-clip", "gelu", {}))
    cache = tmp_path / "cache"
    model, _ = clip_load.load("Tiny/gelu", download_root=str(cache))
    assert model.spec.activation == "gelu"
    with torch.no_grad():
        assert relative_error(model.encode_text(fx["tokens"]), fx["text_features"]) < 1e-5
    assert sorted(os.listdir(cache / "org" / "tiny-clip")) == ["open_clip_pytorch_model.bin",
                                                            "open_clip_pytorch_model.bin.sha256"]
    hub.clear()  # the second load comes from the cache, checked against the kept checksum
    assert clip_load.load("Tiny/gelu", download_root=str(cache))[0].spec.activation == "gelu"
    (cache / "org" / "tiny-clip" / "open_clip_pytorch_model.bin").write_bytes(b"damaged")
    with pytest.raises(RuntimeError, match="does not match its published SHA-256"):
        clip_load.load("Tiny/gelu", download_root=str(cache))


def test_a_download_that_does_not_match_the_stated_checksum_leaves_nothing(hub, tmp_path,
                                                                            monkeypatch):
    hub["/org/tiny-clip/resolve/main/open_clip_pytorch_model.bin"] = b"the stated file"
    real_get = _Hub.do_GET

    def serve_other_bytes(handler):
        handler.files = {k: b"other bytes" for k in handler.files}
        real_get(handler)
    monkeypatch.setattr(_Hub, "do_GET", serve_other_bytes)
    monkeypatch.setitem(clip_load._OPEN_CLIP, "Tiny/gelu", ("org/tiny-clip", "gelu", {}))
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="SHA-256"):
        clip_load.load("Tiny/gelu", download_root=str(cache))
    left = os.listdir(cache / "org" / "tiny-clip") if (cache / "org").exists() else []
    assert left == [], left
