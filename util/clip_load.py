"""Reading CLIP checkpoints, with OpenAI's names: available_models(), and read(), which
clip_model.load builds the network from.

A state dict cannot say a CLIP's MLP activation, head counts or image preprocessing, and
a wrong activation costs accuracy silently. So each file's ClipSpec comes from a known
SHA-256 (OpenAI's archives), a table row (the open checkpoints below) or a config file
(open_clip's, or a Hugging Face CLIPModel folder's), and a file that says none of this
is refused.

Loading never runs code from a file. A TorchScript archive is a program, so only
OpenAI's own, known by their SHA-256, go through torch.jit.load; every other file is
read with torch.load(weights_only=True) or as safetensors.
"""
import hashlib
import json
import math
import os
import re
import urllib.error
import urllib.request
import warnings
from typing import NamedTuple, Optional

import torch
from torchvision import transforms

from util.runtime import is_torchscript, load_error_detail

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS = {"bicubic": transforms.InterpolationMode.BICUBIC,
                  "bilinear": transforms.InterpolationMode.BILINEAR}
# How an image becomes the square input: its short side resized, then a center crop
# (OpenAI's), or the whole image resized to the square (DFN's).
RESIZE_MODES = ("shortest", "squash")
# The MLP activations, by open_clip's and transformers' names (clip_model.ACTIVATIONS).
ACTIVATION_NAMES = ("quick_gelu", "gelu")


class ClipSpec(NamedTuple):
    """What a CLIP's tensors do not store, and MUST needs to use them right."""
    activation: str  # the MLPs' nonlinearity: "quick_gelu" or "gelu"
    mean: tuple  # image normalization, per RGB channel
    std: tuple
    interpolation: str  # how an image is resized: "bicubic" or "bilinear"
    resize_mode: str = "shortest"  # one of RESIZE_MODES
    vision_heads: Optional[int] = None  # attention heads; None: OpenAI's 64-wide heads
    text_heads: Optional[int] = None

    def identity(self):
        """The values a run's fingerprint covers: the last three only where they are not
        their defaults, so that checkpoints that recorded four values still match."""
        first, rest = list(self[:4]), list(self[4:])
        return first if rest == list(self._field_defaults.values()) else first + rest


OPENAI_SPEC = ClipSpec("quick_gelu", CLIP_MEAN, CLIP_STD, "bicubic")

# OpenAI's published files, by their SHA-256; the address holds it.
_OPENAI = "https://openaipublic.azureedge.net/clip/models"
_MODELS = {name: f"{_OPENAI}/{sha}/{re.sub('[/@]', '-', name)}.pt" for name, sha in {
    "ViT-B/32": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
    "ViT-B/16": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
    "ViT-L/14": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
    "ViT-L/14@336px":
        "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
}.items()}
_INCEPTION = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_H14 = dict(vision_heads=16)  # 1280 wide in heads of 80; bigG/14's 1664 in heads of 104
_DFN = dict(_H14, resize_mode="squash")
# Open checkpoints by open_clip's model name and pretrained tag, as its pretrained.py
# lists them: (the Hugging Face hub repository of open_clip_pytorch_model.bin, the
# activation, the input px, the other ClipSpec values where they are not OpenAI's).
_OPEN_CLIP = {
    "ViT-B-32/laion2b_s34b_b79k":
        ("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "gelu", 224, {}),
    "ViT-B-32/datacomp_xl_s13b_b90k":
        ("laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K", "gelu", 224, {}),
    "ViT-B-32/metaclip_400m":
        ("timm/vit_base_patch32_clip_224.metaclip_400m", "quick_gelu", 224, {}),
    "ViT-B-32/metaclip_fullcc":
        ("timm/vit_base_patch32_clip_224.metaclip_2pt5b", "quick_gelu", 224, {}),
    "ViT-B-16/laion2b_s34b_b88k":
        ("laion/CLIP-ViT-B-16-laion2B-s34B-b88K", "gelu", 224, {}),
    "ViT-B-16/datacomp_xl_s13b_b90k":
        ("laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K", "gelu", 224, {}),
    "ViT-B-16/dfn2b": ("apple/DFN2B-CLIP-ViT-B-16", "quick_gelu", 224, {}),
    "ViT-B-16/metaclip_400m":
        ("timm/vit_base_patch16_clip_224.metaclip_400m", "quick_gelu", 224, {}),
    "ViT-B-16/metaclip_fullcc":
        ("timm/vit_base_patch16_clip_224.metaclip_2pt5b", "quick_gelu", 224, {}),
    "ViT-L-14/laion2b_s32b_b82k":
        ("laion/CLIP-ViT-L-14-laion2B-s32B-b82K", "gelu", 224, _INCEPTION),
    "ViT-L-14/datacomp_xl_s13b_b90k":
        ("laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K", "gelu", 224, {}),
    "ViT-L-14/dfn2b": ("apple/DFN2B-CLIP-ViT-L-14", "quick_gelu", 224, {}),
    "ViT-L-14/metaclip_400m":
        ("timm/vit_large_patch14_clip_224.metaclip_400m", "quick_gelu", 224, {}),
    "ViT-L-14/metaclip_fullcc":
        ("timm/vit_large_patch14_clip_224.metaclip_2pt5b", "quick_gelu", 224, {}),
    "ViT-H-14/laion2b_s32b_b79k":
        ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "gelu", 224, _H14),
    "ViT-H-14/dfn5b": ("apple/DFN5B-CLIP-ViT-H-14", "quick_gelu", 224, _DFN),
    "ViT-H-14-378/dfn5b": ("apple/DFN5B-CLIP-ViT-H-14-378", "quick_gelu", 378, _DFN),
    "ViT-H-14/metaclip_fullcc":
        ("timm/vit_huge_patch14_clip_224.metaclip_2pt5b", "quick_gelu", 224, _H14),
    "ViT-bigG-14/laion2b_s39b_b160k":
        ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "gelu", 224, _H14),
}
_HUB = "https://huggingface.co"
_HUB_FILE = "open_clip_pytorch_model.bin"
# Other files known by their SHA-256: the committed toy/toy_clip.pt, which has no note.
_KNOWN_FILES = {
    "4826d1516b4b3f4e239c0b66dd7aa07f53d2729142183a502919eece8d74987f": OPENAI_SPEC}


def available_models():
    """OpenAI's names (ViT-B/16, ...), then the open checkpoints' (ViT-B-16/dfn2b)."""
    return list(_MODELS) + list(_OPEN_CLIP)


def config_note(spec, model=None):
    """open_clip's config JSON for `spec`, which a state dict may carry as its
    `open_clip_config` entry. Other image heads than OpenAI's need the CLIP `model`,
    because open_clip states them by their width."""
    model_cfg = {"quick_gelu": spec.activation == "quick_gelu"}
    if spec.vision_heads:
        if model is None:
            raise ValueError(
                "config_note needs the CLIP to state its image tower's heads")
        head_width = model.visual.width // spec.vision_heads
        model_cfg["vision_cfg"] = {"head_width": head_width}
    if spec.text_heads:
        model_cfg["text_cfg"] = {"heads": spec.text_heads}
    preprocess = {"mean": list(spec.mean), "std": list(spec.std),
                  "interpolation": spec.interpolation}
    if spec.resize_mode != "shortest":
        preprocess["resize_mode"] = spec.resize_mode
    return json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess})


def open_clip_spec(name):
    """The ClipSpec of a named open checkpoint (its table row)."""
    _, activation, _, values = _OPEN_CLIP[name]
    return OPENAI_SPEC._replace(activation=activation, **values)


def read(name_or_path, download_root=None):
    """(state dict, ClipSpec, path) of a CLIP ViT: by name (downloaded and checked), a
    file, or a Hugging Face CLIPModel folder. Downloads go to `download_root`, else
    $CLIP_DOWNLOAD_ROOT, else ~/.cache/clip, where the `clip` package keeps them.

    A state dict may store an embedding by the rows it uses: `<name>.ids` (K token ids),
    `<name>.rows` (K x width) and `<name>.vocab_size` stand for `<name>.weight`, zero
    elsewhere. Its string entries are notes; `open_clip_config` is read as its config.
    """
    root = download_root or os.environ.get("CLIP_DOWNLOAD_ROOT",
                                           os.path.expanduser("~/.cache/clip"))
    path = os.path.expanduser(name_or_path)
    if name_or_path in _MODELS:
        sd, spec = _read_file(_download(_MODELS[name_or_path], root))
    elif name_or_path in _OPEN_CLIP:
        path = _download_from_hub(_OPEN_CLIP[name_or_path][0], _HUB_FILE, root)
        sd, _ = _read_state_dict(path)
        spec = open_clip_spec(name_or_path)
    elif os.path.isdir(path):
        sd, spec = _read_folder(path)
    elif os.path.isfile(path):
        sd, spec = _read_file(path)
    elif _looks_like_path(name_or_path):
        raise FileNotFoundError(f"no checkpoint file at {name_or_path}; pass an "
                                f"existing file or one of {available_models()}")
    else:
        raise ValueError(f"unknown model '{name_or_path}'; available models are "
                         f"{available_models()}, or pass the path of a checkpoint file")
    size = _shape(sd, path)["image_resolution"]
    if name_or_path in _OPEN_CLIP and size != _OPEN_CLIP[name_or_path][2]:
        raise ValueError(f"{path}: its input is {size} px, not the "
                         f"{_OPEN_CLIP[name_or_path][2]} px of {name_or_path}: it is "
                         "another model's file")
    if spec is None:
        raise ValueError(f"{path}: it holds a CLIP's weights but not its activation "
                         "(GELU or QuickGELU) or image normalization, which a state "
                         "dict cannot store: put the open_clip_config.json it came "
                         "with beside it, or load it by name (one of "
                         f"{available_models()})")
    return sd, spec, path


# ----------------------------------------------------------------------------
# What a state dict's shapes say

def clip_heads(width):
    """The head count of OpenAI's CLIPs, whose heads are 64 wide."""
    return max(1, width // 64)


def _count_blocks(state_dict, prefix):
    return len({k[len(prefix):].split(".")[0] for k in state_dict
                if k.startswith(prefix) and k.endswith(".attn.in_proj_weight")})


def _mlp_width(state_dict, prefix):
    """The first block's MLP width (None: no blocks); loading checks the others."""
    first = state_dict.get(prefix + "0.mlp.c_fc.weight")
    return None if first is None else first.shape[0]


def key_examples(keys, n=2):
    """The first n keys, for one-line messages: 'a', 'b' or e.g. 'a', 'b' (of more)."""
    return ("e.g. " if len(keys) > n else "") + ", ".join(f"'{k}'" for k in keys[:n])


def vision_config(sd, prefix=""):
    """The image tower's architecture, from a state dict with keys after `prefix`."""
    # Only ResNet keys make it a ResNet CLIP; any other file is named by what it lacks.
    if any(k.startswith((prefix + "layer1.", prefix + "attnpool.")) for k in sd):
        raise ValueError("ResNet CLIP checkpoints (RN50, RN101, ...) are not "
                         "supported: MUST needs a ViT image tower, such as ViT-B/16's")
    for key in ("conv1.weight", "positional_embedding", "class_embedding", "proj"):
        if prefix + key not in sd:
            raise ValueError(f"not a CLIP ViT checkpoint: missing key '{prefix + key}' "
                             f"(it holds {len(sd)} tensor(s): "
                             f"{key_examples(list(sd)) or 'none'})")
    width, _, patch, _ = sd[prefix + "conv1.weight"].shape
    grid = round((sd[prefix + "positional_embedding"].shape[0] - 1) ** 0.5)
    blocks = prefix + "transformer.resblocks."
    return dict(input_resolution=patch * grid, patch_size=patch, width=width,
                layers=_count_blocks(sd, blocks),
                output_dim=sd[prefix + "proj"].shape[1],
                mlp_width=_mlp_width(sd, blocks))


def architecture(state_dict):
    """The CLIP(...) arguments an OpenAI-format state dict's shapes say (all but the
    activation and the heads); ValueError in one line when it is not a CLIP ViT's."""
    sd = state_dict
    v = vision_config(sd, "visual.")  # first, so that a ResNet gets its own message
    for key in ("text_projection", "positional_embedding", "token_embedding.weight",
                "ln_final.weight"):
        if key not in sd:
            raise ValueError(f"not a CLIP checkpoint: missing key '{key}'")
    blocks = "transformer.resblocks."
    return dict(
        embed_dim=sd["text_projection"].shape[1],
        image_resolution=v["input_resolution"],
        vision_layers=v["layers"], vision_width=v["width"],
        vision_patch_size=v["patch_size"], vision_mlp_width=v["mlp_width"],
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        transformer_width=sd["ln_final.weight"].shape[0],
        transformer_layers=_count_blocks(sd, blocks),
        transformer_mlp_width=_mlp_width(sd, blocks))


def _shape(sd, path):
    """architecture(sd), its error named after the file."""
    try:
        return architecture(sd)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _to_rgb(image):
    return image.convert("RGB")


def image_transform(n_px, spec=OPENAI_SPEC):
    """CLIP's test-time preprocessing as the spec says: resize, center crop, normalize.
    Picklable, for loader workers started with spawn."""
    size = n_px if spec.resize_mode == "shortest" else (n_px, n_px)
    return transforms.Compose([
        transforms.Resize(size, interpolation=INTERPOLATIONS[spec.interpolation]),
        transforms.CenterCrop(n_px),
        _to_rgb,
        transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])


def _looks_like_path(s):
    parent = os.path.dirname(os.path.expanduser(s))
    has_folder = parent != "" and os.path.isdir(parent)
    return os.path.splitext(s)[1] != "" or s.startswith((".", "/", "~")) or has_folder


# ----------------------------------------------------------------------------
# Downloads

def _sha256(file):
    """SHA-256 of a file, by path or open in binary mode (read from where it stands)."""
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as f:
            return _sha256(f)
    h = hashlib.sha256()
    for chunk in iter(lambda: file.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def _download(url, root, expected=None, target=None):
    """`url` downloaded into `root` (as `target`), checked against its SHA-256. The
    file gets its name only once the check has passed: a killed download leaves none."""
    os.makedirs(root, exist_ok=True)
    expected = expected or url.split("/")[-2]
    target = target or os.path.join(root, os.path.basename(url))
    if os.path.isfile(target):
        if _sha256(target) != expected:
            raise RuntimeError(f"{target} does not match its published SHA-256 "
                               f"{expected}: the file is corrupt; delete it and run "
                               "again to download it anew")
        return target
    try:
        torch.hub.download_url_to_file(url, target, hash_prefix=expected)
    except urllib.error.URLError as e:
        raise RuntimeError(f"could not download {url} ({e.reason}). Without internet, "
                           f"copy the file to {target} or pass a local checkpoint "
                           "path") from None
    except RuntimeError as e:  # torch.hub's checksum mismatch: it names both SHA-256s
        raise RuntimeError(f"downloaded {url} but its SHA-256 is not the published one "
                           f"({e}); nothing was saved to {root}. Run again; if it "
                           "repeats, download the file yourself and pass its path to "
                           "load()") from None
    return target


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None  # the hub's answer holds the checksum, not the storage's


def hub_sha256(url):
    """The SHA-256 the Hugging Face hub states for a git LFS file: the X-Linked-Etag
    of its answer to a HEAD request."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        answer = urllib.request.build_opener(_NoRedirect).open(request, timeout=60)
    except urllib.error.HTTPError as e:  # the redirect itself, not followed
        answer = e
    except urllib.error.URLError as e:
        raise RuntimeError(f"could not reach {url} ({e.reason}). Without internet, "
                           "download the file elsewhere and pass its path") from None
    etag = answer.headers.get("X-Linked-Etag") or answer.headers.get("ETag") or ""
    sha = etag.removeprefix("W/").strip('"')
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise RuntimeError(f"{url} states no SHA-256 for the file (HTTP "
                           f"{answer.status}); download it yourself and pass its path")
    return sha


def _download_from_hub(repo, filename, root):
    """The hub's file, cached as ROOT/<repo>/<filename> with its SHA-256 beside it,
    so that the cached file is checked again without the network."""
    folder = os.path.join(root, *repo.split("/"))
    target = os.path.join(folder, filename)
    stated = target + ".sha256"
    if os.path.isfile(target) and os.path.isfile(stated):
        with open(stated) as f:
            return _download(None, folder, f.read().strip(), target)
    url = f"{_HUB}/{repo}/resolve/main/{filename}"
    sha = hub_sha256(url)
    _download(url, folder, sha, target)
    with open(stated + ".tmp", "w") as f:
        f.write(sha + "\n")
    os.replace(stated + ".tmp", stated)
    return target


# ----------------------------------------------------------------------------
# What a file says about itself

def _read_file(path):
    """(state dict, ClipSpec or None) of a checkpoint file. The spec is OpenAI's for
    one of its archives, else what the file's `open_clip_config` note or an
    open_clip_config.json beside it says (both must agree), else that of a known
    SHA-256 (hashed last: an open checkpoint can be gigabytes)."""
    sd, notes = _read_state_dict(path)
    if is_torchscript(path):
        return sd, OPENAI_SPEC
    said = []  # (where, the spec it gives)
    if "open_clip_config" in notes:
        where = f"{path}'s open_clip_config note"
        config = _Fields.parse(notes["open_clip_config"], where)
        said.append((where, _open_clip_spec(config, sd, path)))
    folder = os.path.dirname(os.path.abspath(path))
    beside = os.path.join(folder, "open_clip_config.json")
    if os.path.isfile(beside):
        said.append((beside, _open_clip_spec(_Fields.read(beside), sd, path)))
    if len(said) == 2 and said[0][1] != said[1][1]:
        (note, ours), (_, theirs) = said
        differ = [f"{field} {a!r} vs {b!r}"
                  for field, a, b in zip(ClipSpec._fields, ours, theirs) if a != b]
        raise ValueError(f"{note} and {beside} disagree ({'; '.join(differ)}): correct "
                         "or remove the wrong one")
    if said:
        return sd, said[0][1]
    return sd, _KNOWN_FILES.get(_sha256(path))


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _whole(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _rgb(x):
    return isinstance(x, list) and len(x) == 3 and all(map(_finite, x))


def _side(x):
    square = isinstance(x, list) and len(x) == 2 and x[0] == x[1]
    return _whole(x) or (square and _whole(x[0]))


# The JSON types the config readers take: (the test, what a refusal says it must be).
_KINDS = {
    "object": (lambda v: isinstance(v, dict), "a JSON object"),
    "flag": (lambda v: isinstance(v, bool), "true or false"),
    "count": (_whole, "a whole number of at least 1"),
    "side": (_side, "a square's side in px, or [side, side]"),
    "number": (_finite, "a finite number"),
    "text": (lambda v: isinstance(v, str), "a string"),
    "rgb": (_rgb, "a list of 3 finite numbers"),
    "rgb>0": (lambda v: _rgb(v) and min(v) > 0, "a list of 3 positive finite numbers"),
}


def _shown(value):
    """A config value as its file spells it, cut short for a one-line message."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Fields:
    """A config file's JSON object, or a section of it, read field by field. A field
    of another type or value is refused in one line that names the file and the
    field; a null field counts as absent."""

    def __init__(self, values, where, prefix=""):
        self.values, self.where, self.prefix = values, where, prefix

    @classmethod
    def read(cls, path):
        """A UTF-8 JSON file's object."""
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except OSError as e:
            raise ValueError(f"{path} cannot be read ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: "
                             f"{e.object[e.start]:#04x}); save it as UTF-8") from None
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text, where):
        try:
            values = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{where} is not valid JSON ({e})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{where} holds no JSON object")
        return cls(values, where)

    def __contains__(self, key):
        return self.values.get(key) is not None

    def fail(self, key, why):
        raise ValueError(f"{self.where}: {self.prefix}{key} {why}")

    def get(self, key, kind, default=None):
        """The field, of `kind` (one of _KINDS); `default` when it is absent."""
        value = self.values.get(key)
        if value is None:
            return default
        test, what = _KINDS[kind]
        if not test(value):
            self.fail(key, f"is {_shown(value)}, not {what}")
        return value

    def section(self, key):
        """The field, a JSON object, as _Fields of its own."""
        return _Fields(self.get(key, "object", {}), self.where, f"{self.prefix}{key}.")

    def choice(self, key, choices, default):
        """choices[the field, or `default` when it is absent]."""
        value = self.values.get(key)
        if value is None:
            value = default
        if type(value) not in (str, int) or value not in choices:
            listed = ", ".join(map(_shown, choices))
            self.fail(key, f"is {_shown(value)}, not one of {listed}")
        return choices[value]

    def matches(self, key, kind, weights, default=None):
        """A geometry field, which must be the weights' own (`default`: the format's
        value where the file leaves it out; None: no check then)."""
        value = self.get(key, kind, default)
        if isinstance(value, list):  # a "side" given as [height, width]
            value = value[0]
        if value is not None and value != weights:
            self.fail(key, f"is {_shown(value)}, the weights' {weights}")
        return value

    def only(self, built, other, what):
        """Refuse a key that is neither in `other` (read, or without effect) nor at a
        value in `built` (key -> the values built here, the format's default first)."""
        for key, value in self.values.items():
            if value is not None and key in built and not any(
                    value == v and type(value) is type(v) for v in built[key]):
                default = built[key][0]
                has = f"no {key}" if default is None else f"{key} {_shown(default)}"
                why = f"(the CLIP built here has {has})"
                self.fail(key, f"{_shown(value)} is not supported {why}")
            if key not in built and key not in other:
                self.fail(key, f"is not one of open_clip's {what} keys")


def _stated(heads, width):
    """A head count as ClipSpec holds it: None for OpenAI's 64-wide heads."""
    return None if heads == clip_heads(width) else heads


# open_clip's config keys (open-clip-torch 3.3.0 and its main branch). A key that
# changes what a tower computes is taken only at the values built here (open_clip's
# default first); keys read, or without effect on the features, are taken as they are.
# Any other key is refused.
_BLOCK_BUILT = dict(
    ls_init_value=(None,), final_ln_after_pool=(False,), act_kwargs=(None, {}),
    norm_kwargs=(None, {}), block_type=(None, "default"), qk_norm=(False,),
    scaled_cosine_attn=(False,), scale_heads=(False,), scale_attn_inner=(False,),
    scale_attn=(False,), scale_fc=(False,))
_VISION_BUILT = dict(
    _BLOCK_BUILT, timm_model_name=(None, ""), attentional_pool=(False,),
    no_ln_pre=(False,), pos_embed_type=("learnable",), pool_type=("tok",),
    image_seq_len=(None,))
_VISION_OTHER = {
    "layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size",
    "patch_dropout", "attn_pooler_queries", "attn_pooler_heads", "output_tokens",
    "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop",
    "timm_drop_path", "timm_model_kwargs"}
_TEXT_BUILT = dict(
    _BLOCK_BUILT, text_arch=("clip",), hf_model_name=(None, ""), variable_text=(False,),
    hf_tokenizer_name=(None, ""), tokenizer_mode=(None,), tokenizer_kwargs=(None, {}),
    tokenizer_type=("",), embed_cls=(False,), pad_id=(0,), bos_id=(None,),
    no_causal_mask=(False,), pool_type=("argmax",), proj_type=("linear",),
    proj_bias=(False,))
_TEXT_OTHER = {
    "context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "eos_id",
    "output_tokens", "tiktoken_name", "hf_model_pretrained", "hf_proj_type",
    "hf_pooler_type", "hf_model_config",
    # text_arch "modern"'s:
    "attention_mode", "pos_embed", "rope_temperature", "mlp_type", "norm_type",
    "norm_eps", "attn_gated", "pre_norm", "norm_placement", "zero_init_residual",
    "reg_tokens", "value_residual", "attention_bias", "mlp_bias", "gate_bias"}
_MODEL_BUILT = dict(custom_text=(False,), multimodal_cfg=(None,),
                    init_logit_bias=(None,), nonscalar_logit_scale=(False,))
_MODEL_OTHER = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "init_logit_scale",
                "cast_dtype", "output_dict"}


# open_clip's tower sections: (their key tables, their class, their geometry keys ->
# architecture()'s names, "mlp" for the MLP width that mlp_ratio gives).
_OPEN_CLIP_TOWERS = {
    "vision_cfg": (_VISION_BUILT, _VISION_OTHER, "CLIPVisionCfg", dict(
        image_size="image_resolution", patch_size="vision_patch_size",
        width="vision_width", layers="vision_layers", mlp="vision_mlp_width")),
    "text_cfg": (_TEXT_BUILT, _TEXT_OTHER, "CLIPTextCfg", dict(
        context_length="context_length", vocab_size="vocab_size",
        width="transformer_width", layers="transformer_layers",
        mlp="transformer_mlp_width")),
}


def _open_clip_spec(config, sd, path):
    """The ClipSpec an open_clip config (_Fields) gives the weights `sd` of file `path`,
    open_clip's defaults for what it leaves out; its geometry must be the weights'."""
    shape = _shape(sd, path)
    model, pre = config.section("model_cfg"), config.section("preprocess_cfg")
    model.only(_MODEL_BUILT, _MODEL_OTHER, "model_cfg")
    model.matches("embed_dim", "count", shape["embed_dim"])
    activation = "quick_gelu" if model.get("quick_gelu", "flag", False) else "gelu"
    vision, width = _open_clip_tower(model, "vision_cfg", shape)
    vision_heads = None
    head_width = vision.get("head_width", "count")
    if head_width is not None:
        heads = width // head_width
        if heads < 1 or width % heads:
            why = f"{head_width} does not divide the width {width} into heads"
            vision.fail("head_width", why)
        vision_heads = _stated(heads, width)
    # CLIPTextCfg has 8 heads; a note without a text_cfg says nothing of the text tower.
    default_heads = 8 if "text_cfg" in model else None
    text, width = _open_clip_tower(model, "text_cfg", shape)
    heads = text.get("heads", "count", default_heads)
    if heads is not None and width % heads:
        text.fail("heads", f"{heads} does not divide the width {width}")
    text_heads = None if heads is None else _stated(heads, width)
    pre.matches("size", "side", shape["image_resolution"])
    pre.choice("mode", {"RGB": "RGB"}, "RGB")
    mean = tuple(map(float, pre.get("mean", "rgb", CLIP_MEAN)))
    std = tuple(map(float, pre.get("std", "rgb>0", CLIP_STD)))
    resize = pre.choice("interpolation", {k: k for k in INTERPOLATIONS}, "bicubic")
    mode = pre.choice("resize_mode", {k: k for k in RESIZE_MODES}, "shortest")
    return ClipSpec(activation, mean, std, resize, mode, vision_heads, text_heads)


def _open_clip_tower(model, section, shape):
    """A tower section of model_cfg, its geometry checked against the weights' `shape`.
    -> (its _Fields, its width)"""
    built, other, what, names = _OPEN_CLIP_TOWERS[section]
    tower = model.section(section)
    tower.only(built, other, what)
    for key, name in names.items():
        if key != "mlp":
            tower.matches(key, "side" if key == "image_size" else "count", shape[name])
    # open_clip's MLP width is int(width * mlp_ratio).
    width, mlp = shape[names["width"]], shape[names["mlp"]]
    ratio = tower.get("mlp_ratio", "number")
    if ratio is not None and mlp is not None and int(width * ratio) != mlp:
        why = f"{ratio} gives MLPs {int(width * ratio)} wide, the weights' are {mlp}"
        tower.fail("mlp_ratio", why)
    return tower, width


# ----------------------------------------------------------------------------
# A Hugging Face transformers CLIPModel folder

_HF_NAMES = [  # (transformers' name, OpenAI's), for the parts of a name that differ
    ("text_model.embeddings.token_embedding.", "token_embedding."),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("text_model.final_layer_norm.", "ln_final."),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
    ("vision_model.embeddings.patch_embedding.", "visual.conv1."),
    ("vision_model.embeddings.position_embedding.weight",
     "visual.positional_embedding"),
    ("vision_model.pre_layrnorm.", "visual.ln_pre."),  # sic
    ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
    ("vision_model.post_layernorm.", "visual.ln_post."),
    (".self_attn.out_proj.", ".attn.out_proj."),
    (".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."),
    (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj."),
]
# config.json's tower sections: (transformers' defaults, key -> architecture()'s name).
_HF_TOWERS = {
    "vision_config": (
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
             num_attention_heads=12, image_size=224, patch_size=32),
        dict(hidden_size="vision_width", intermediate_size="vision_mlp_width",
             num_hidden_layers="vision_layers", image_size="image_resolution",
             patch_size="vision_patch_size")),
    "text_config": (
        dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=8, max_position_embeddings=77, vocab_size=49408),
        dict(hidden_size="transformer_width", intermediate_size="transformer_mlp_width",
             num_hidden_layers="transformer_layers",
             max_position_embeddings="context_length", vocab_size="vocab_size")),
}


def _read_folder(folder):
    """(state dict in OpenAI's names, ClipSpec) of a transformers CLIPModel folder,
    or of a folder that holds an open_clip file and its open_clip_config.json."""
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return _read_file(os.path.join(folder, name))
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder} holds neither a transformers CLIPModel "
                                "(config.json) nor an open_clip checkpoint "
                                "(open_clip_pytorch_model.bin)")
    config = _Fields.read(config_path)
    if config.get("model_type", "text") != "clip":
        raise ValueError(f"{config_path} is a {config.values.get('model_type')!r} "
                         "model, not a CLIP (model_type 'clip')")
    weights = [os.path.join(folder, name)
               for name in ("model.safetensors", "pytorch_model.bin")
               if os.path.isfile(os.path.join(folder, name))]
    if not weights:
        raise FileNotFoundError(f"{folder} has no model.safetensors or "
                                "pytorch_model.bin")
    sd = _from_transformers(_read_state_dict(weights[0])[0], weights[0])
    return sd, _hf_spec(config, _shape(sd, weights[0]), folder)


def _hf_spec(config, shape, folder):
    """A transformers CLIP's ClipSpec: the activation and heads from config.json (whose
    geometry must be the weights' `shape`), the preprocessing from
    preprocessor_config.json, transformers' defaults for what a file leaves out."""
    config.matches("projection_dim", "count", shape["embed_dim"], 512)
    heads, activations = [], set()
    for section, (defaults, names) in _HF_TOWERS.items():
        tower = config.section(section)
        for key, name in names.items():
            if shape[name] is not None:  # a tower without blocks has no MLP width
                tower.matches(key, "count", shape[name], defaults[key])
        width = shape[names["hidden_size"]]
        key = "num_attention_heads"
        count = tower.get(key, "count", defaults[key])
        if width % count:
            tower.fail(key, f"{count} does not divide the width {width}")
        heads.append(_stated(count, width))
        if tower.get("layer_norm_eps", "number", 1e-5) != 1e-5:
            tower.fail("layer_norm_eps", "is not CLIP's 1e-5")
        choices = {a: a for a in ACTIVATION_NAMES}
        activations.add(tower.choice("hidden_act", choices, "quick_gelu"))
    if len(activations) != 1:
        raise ValueError(f"{folder}/config.json gives the towers different activations "
                         f"{sorted(activations)}")
    preprocessing = _hf_preprocessing(folder, shape["image_resolution"])
    return ClipSpec(activations.pop(), **preprocessing, vision_heads=heads[0],
                    text_heads=heads[1])


def _hf_preprocessing(folder, size):
    """The ClipSpec's preprocessing from preprocessor_config.json, with
    CLIPImageProcessor's defaults: resize (the short side, or to a height and width),
    center crop to 224 px (the weights' input px), pixels / 255, OpenAI's normalization
    unless do_normalize is false. Without the file, the weights' px are used."""
    path = os.path.join(folder, "preprocessor_config.json")
    pre = _Fields.read(path) if os.path.isfile(path) else _Fields({}, path)
    for key in ("do_resize", "do_center_crop", "do_rescale", "do_convert_rgb"):
        if not pre.get(key, "flag", True):
            why = "is false: only CLIP's preprocessing, which does it, is supported"
            pre.fail(key, why)
    if abs(pre.get("rescale_factor", "number", 1 / 255) * 255 - 1) > 1e-6:
        pre.fail("rescale_factor", "is not 1/255")
    side = 224 if os.path.isfile(path) else size  # where the file gives no size
    resize = pre.values.get("size")
    squash = isinstance(resize, dict) and "shortest_edge" not in resize
    keys = ("height", "width") if squash else ("shortest_edge",)
    _check_side(pre, "size", size, side, keys)
    _check_side(pre, "crop_size", size, side, ("height", "width"))
    normalize = pre.get("do_normalize", "flag", True)
    mean = pre.get("image_mean", "rgb", CLIP_MEAN) if normalize else (0, 0, 0)
    std = pre.get("image_std", "rgb>0", CLIP_STD) if normalize else (1, 1, 1)
    return dict(mean=tuple(map(float, mean)), std=tuple(map(float, std)),
                interpolation=pre.choice("resample", {3: "bicubic", 2: "bilinear"}, 3),
                resize_mode="squash" if squash else "shortest")


def _check_side(pre, key, size, side, names):
    """A preprocessor_config.json size, a number or an object of `names`: each must be
    the weights' input px `size` (`side` where the file leaves it out)."""
    if isinstance(pre.values.get(key), dict):
        for name in names:
            pre.section(key).matches(name, "count", size, side)
    else:
        pre.matches(key, "count", size, side)


def _from_transformers(sd, where):
    """A transformers CLIPModel state dict in OpenAI's names: q/k/v fused into in_proj,
    the projections transposed, position_ids left out."""
    out = {}
    for name, tensor in sd.items():
        if name.endswith("position_ids"):
            continue
        if name in ("visual_projection.weight", "text_projection.weight"):
            ours = "visual.proj" if name.startswith("visual") else "text_projection"
            out[ours] = tensor.t()
            continue
        for theirs, ours in _HF_NAMES:
            name = name.replace(theirs, ours)
        out[name] = tensor
    for prefix in {k.split(".self_attn.")[0] for k in out if ".self_attn." in k}:
        for kind in ("weight", "bias"):
            parts = [f"{prefix}.self_attn.{p}_proj.{kind}" for p in "qkv"]
            if not all(p in out for p in parts):
                raise ValueError(
                    f"{where}: {prefix} lacks one of its q, k, v projections")
            fused = torch.cat([out.pop(p) for p in parts])
            out[f"{prefix}.attn.in_proj_{kind}"] = fused
    return out


# ----------------------------------------------------------------------------
# Reading checkpoints without running code from them

class UnsafeFileError(ValueError):
    """A checkpoint that could only be read by running code from it."""


def _read_torchscript(path):
    """The state dict of one of OpenAI's published archives; any other is refused."""
    with open(path, "rb") as f:
        if _sha256(f) not in {url.split("/")[-2] for url in _MODELS.values()}:
            convert = ("python -c \"import torch; from util import clip_load; "
                       f"sd = torch.jit.load({path!r}).state_dict(); "
                       "sd['open_clip_config'] = "
                       "clip_load.config_note(clip_load.OPENAI_SPEC); "
                       "torch.save(sd, 'clip.pt')\"")
            raise UnsafeFileError(
                f"{path} is a TorchScript archive (a program) that is not one of "
                "OpenAI's published files; loading never runs code from a file. If you "
                "trust the file, convert it once (to a state dict that says it is "
                f"OpenAI's format) with: {convert} and pass clip.pt")
        f.seek(0)  # the bytes hashed are the bytes loaded, even if the path is replaced
        with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(f, map_location="cpu").state_dict()


def _read_safetensors(path):
    """A safetensors file's tensors; the package is needed for such files only."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise RuntimeError(f"{path} is a safetensors file; reading it needs the "
                           "safetensors package: pip install safetensors") from None
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # the package's own: a damaged header, a truncated file
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        raise RuntimeError(f"could not read {path}: it is truncated or not a "
                           f"safetensors file ({why})") from None


def _expand_sparse_rows(sd):
    """Each `<name>.ids`, `.rows` and `.vocab_size` as `<name>.weight`."""
    for name in [k.removesuffix(".ids") for k in sd if k.endswith(".ids")]:
        ids, rows, vocab_size = (sd.pop(f"{name}.{part}", None)
                                 for part in ("ids", "rows", "vocab_size"))
        ok = (torch.is_tensor(ids) and torch.is_tensor(rows)
              and isinstance(vocab_size, int) and ids.ndim == 1
              and not ids.is_floating_point() and rows.ndim == 2
              and len(ids) == len(rows)
              and (len(ids) == 0 or 0 <= ids.min() <= ids.max() < vocab_size))
        if not ok:
            raise ValueError(f"'{name}.ids/.rows/.vocab_size' do not describe rows of "
                             "a table: expected token ids (K,) below vocab_size, rows "
                             "(K, width) and an int vocab_size")
        weight = rows.new_zeros(vocab_size, rows.shape[1])
        weight[ids] = rows
        sd[f"{name}.weight"] = weight
    return sd


def _read_state_dict(path):
    """(tensors, string notes) of OpenAI's TorchScript archive, a safetensors file or a
    file that torch.save wrote."""
    if path.endswith(".safetensors"):
        return _read_safetensors(path), {}
    if is_torchscript(path):
        sd = _read_torchscript(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            detail = load_error_detail(e, path)
            if detail.startswith("refused"):
                raise UnsafeFileError(f"could not read {path}: {detail}") from None
            raise RuntimeError(f"could not read {path}: {detail}. If it was "
                               "downloaded, delete it and download it again") from None
    notes = {}
    if isinstance(sd, dict):
        notes = {k: v for k, v in sd.items() if isinstance(v, str)}
        sd = _expand_sparse_rows({k: v for k, v in sd.items() if k not in notes})
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(
            f"{path} is not a CLIP state dict (expected a dict of tensors)")
    return sd, notes
