"""Loading CLIP, as OpenAI's `clip` package does, without ever running code from a file or guessing
what a file does not say.

    available_models() -> list of names
    load(name_or_path, device="cpu", download_root=None) -> (model, preprocess)

The model carries `model.spec`, a ClipSpec: what its tensors cannot store and MUST needs to use it
right (the MLP activation, the image normalization, the resize interpolation). It comes from a
known checksum (OpenAI's archives), a table row (the named open checkpoints below), or a config
file: open_clip's open_clip_config.json beside the weights, or the same JSON stored in the state
dict as the string entry `open_clip_config`; a Hugging Face CLIPModel folder's config.json and
preprocessor_config.json. A state dict that says none of this is refused: its activation may be
GELU or QuickGELU, and a wrong one costs accuracy silently.

A name downloads its file, checked against a SHA-256: OpenAI's published ones, or the one the
Hugging Face hub states for the file. A TorchScript archive is a program: torch.jit.load runs its
code (a scripted __setstate__ can write any file). So only OpenAI's own archives, recognised by
their published SHA-256, are opened with it, and any other archive is refused; every other file
is read with torch.load(weights_only=True), or as safetensors. The network is clip_model.py's;
the tokenizer is tokenizer.py.
"""
import hashlib
import json
import os
import re
import urllib.error
import urllib.request
import warnings
import zipfile
from typing import NamedTuple

import torch
from torchvision import transforms

from clip_model import ACTIVATIONS, architecture, build_model
from runtime import load_error_detail

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS = {"bicubic": transforms.InterpolationMode.BICUBIC,
                  "bilinear": transforms.InterpolationMode.BILINEAR}


class ClipSpec(NamedTuple):
    """What a CLIP's tensors do not store, and MUST needs to use them right."""
    activation: str  # the MLPs' nonlinearity: "quick_gelu" or "gelu"
    mean: tuple  # image normalization, per RGB channel
    std: tuple
    interpolation: str  # how an image is resized: "bicubic" or "bilinear"


OPENAI_SPEC = ClipSpec("quick_gelu", CLIP_MEAN, CLIP_STD, "bicubic")

# OpenAI's published addresses; the second-to-last path segment is the file's SHA-256.
_OPENAI = "https://openaipublic.azureedge.net/clip/models"
_MODELS = {
    "ViT-B/32": f"{_OPENAI}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/"
                "ViT-B-32.pt",
    "ViT-B/16": f"{_OPENAI}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/"
                "ViT-B-16.pt",
    "ViT-L/14": f"{_OPENAI}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/"
                "ViT-L-14.pt",
    "ViT-L/14@336px": f"{_OPENAI}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/"
                      "ViT-L-14-336px.pt",
}
_INCEPTION = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
# Open checkpoints by open_clip's model name and pretrained tag, as its pretrained.py lists them:
# (the Hugging Face hub repository that holds open_clip_pytorch_model.bin, the activation they were
# trained with, their normalization where it is not OpenAI's). All are 224 px, resized bicubic.
_OPEN_CLIP = {
    "ViT-B-32/laion2b_s34b_b79k": ("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "gelu", {}),
    "ViT-B-32/datacomp_xl_s13b_b90k": ("laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K", "gelu", {}),
    "ViT-B-32/metaclip_400m": ("timm/vit_base_patch32_clip_224.metaclip_400m", "quick_gelu", {}),
    "ViT-B-32/metaclip_fullcc": ("timm/vit_base_patch32_clip_224.metaclip_2pt5b", "quick_gelu",
                                 {}),
    "ViT-B-16/laion2b_s34b_b88k": ("laion/CLIP-ViT-B-16-laion2B-s34B-b88K", "gelu", {}),
    "ViT-B-16/datacomp_xl_s13b_b90k": ("laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K", "gelu", {}),
    "ViT-B-16/dfn2b": ("apple/DFN2B-CLIP-ViT-B-16", "quick_gelu", {}),
    "ViT-B-16/metaclip_400m": ("timm/vit_base_patch16_clip_224.metaclip_400m", "quick_gelu", {}),
    "ViT-B-16/metaclip_fullcc": ("timm/vit_base_patch16_clip_224.metaclip_2pt5b", "quick_gelu",
                                 {}),
    "ViT-L-14/laion2b_s32b_b82k": ("laion/CLIP-ViT-L-14-laion2B-s32B-b82K", "gelu", _INCEPTION),
    "ViT-L-14/datacomp_xl_s13b_b90k": ("laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K", "gelu", {}),
    "ViT-L-14/dfn2b": ("apple/DFN2B-CLIP-ViT-L-14", "quick_gelu", {}),
    "ViT-L-14/metaclip_400m": ("timm/vit_large_patch14_clip_224.metaclip_400m", "quick_gelu", {}),
    "ViT-L-14/metaclip_fullcc": ("timm/vit_large_patch14_clip_224.metaclip_2pt5b", "quick_gelu",
                                 {}),
}
_HUB = "https://huggingface.co"
_HUB_FILE = "open_clip_pytorch_model.bin"
# Other files known by their SHA-256 -> spec; toy.py adds its committed tiny CLIP (register_file).
_KNOWN_FILES = {}


def available_models():
    """OpenAI's names (ViT-B/16, ...) and the open checkpoints' (ViT-B-16/dfn2b, ...)."""
    return list(_MODELS) + list(_OPEN_CLIP)


def register_file(sha256, spec):
    """Let a file with this SHA-256 load with `spec`, as OpenAI's archives do."""
    _KNOWN_FILES[sha256] = spec


def config_note(spec):
    """open_clip's config JSON for `spec`, which a state dict may carry as its `open_clip_config`
    string entry to say what its tensors cannot (this project's own CLIP files do)."""
    return json.dumps({"model_cfg": {"quick_gelu": spec.activation == "quick_gelu"},
                       "preprocess_cfg": {"mean": list(spec.mean), "std": list(spec.std),
                                          "interpolation": spec.interpolation}})


def _openai_sha256s():
    """The SHA-256s of OpenAI's published files, which their addresses carry."""
    return {url.split("/")[-2] for url in _MODELS.values()}


def open_clip_spec(name):
    """The ClipSpec of a named open checkpoint (its table row)."""
    _, activation, normalization = _OPEN_CLIP[name]
    return OPENAI_SPEC._replace(activation=activation, **normalization)


def load(name_or_path, device="cpu", download_root=None):
    """Load a CLIP ViT by name (downloaded and checksummed), from a local file, or from a Hugging
    Face CLIPModel folder; weights in fp32. -> (model in eval mode, preprocess transform), as
    OpenAI's clip.load; model.spec says how it was trained to see images.

    The cache directory is `download_root`, else $CLIP_DOWNLOAD_ROOT, else ~/.cache/clip.

    A state dict may store an embedding table by the rows it uses: `<name>.ids` (K token ids),
    `<name>.rows` (K x width) and `<name>.vocab_size` (an int) stand for `<name>.weight` with
    zeros in the rows not listed (toy.py's toy_clip.pt is stored so); string entries are notes
    (such as toy.py's `recipe`), of which `open_clip_config` is read as the file's config.
    """
    root = download_root or os.environ.get("CLIP_DOWNLOAD_ROOT",
                                           os.path.expanduser("~/.cache/clip"))
    path = os.path.expanduser(name_or_path)
    if name_or_path in _MODELS:
        # OpenAI's cache location by default, so that weights the `clip` package already
        # downloaded are reused.
        sd, spec = _read_file(_download(_MODELS[name_or_path], root))
    elif name_or_path in _OPEN_CLIP:
        sd, _ = _read_state_dict(_download_from_hub(_OPEN_CLIP[name_or_path][0], _HUB_FILE, root))
        spec = open_clip_spec(name_or_path)
    elif os.path.isdir(path):
        sd, spec = _read_folder(path)
    elif os.path.isfile(path):
        sd, spec = _read_file(path)
    elif _looks_like_path(name_or_path):
        raise FileNotFoundError(f"no checkpoint file at {name_or_path}; pass an existing file or "
                                f"one of {available_models()}")
    else:
        raise ValueError(f"unknown model '{name_or_path}'; available models are "
                         f"{available_models()}, or pass the path of a checkpoint file")
    try:
        architecture(sd)  # a CLIP ViT's tensors, or one line that says what is missing
        if spec is None:
            raise ValueError("it holds a CLIP's weights but not its activation (GELU or "
                             "QuickGELU) or image normalization, which a state dict cannot "
                             "store: put the open_clip_config.json it came with beside it, or "
                             f"load it by name (one of {available_models()})")
        model = build_model(sd, spec.activation)  # fp32: fp16 weights are cast as they are copied
    except (ValueError, RuntimeError) as e:  # named after the file, as errors in reading it are
        raise type(e)(f"{path}: {e}") from None
    model.spec = spec
    model = model.to(device).eval()
    return model, image_transform(model.visual.input_resolution, spec)


def _to_rgb(image):
    return image.convert("RGB")


def image_transform(n_px, spec=OPENAI_SPEC):
    """CLIP's test-time preprocessing: resize of the short side, center crop, normalization, as
    the checkpoint's spec says. Picklable, so that data loader workers started with spawn can use
    it."""
    return transforms.Compose([
        transforms.Resize(n_px, interpolation=INTERPOLATIONS[spec.interpolation]),
        transforms.CenterCrop(n_px),
        _to_rgb,
        transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])


def _looks_like_path(s):
    parent = os.path.dirname(os.path.expanduser(s))
    has_folder = parent != "" and os.path.isdir(parent)
    return os.path.splitext(s)[1] != "" or s.startswith((".", "/", "~")) or has_folder


# ----------------------------------------------------------------------------------------------
# Downloads

def _sha256(file):
    """SHA-256 of a file given by its path, or open in binary mode (then read from where it
    stands)."""
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as f:
            return _sha256(f)
    h = hashlib.sha256()
    for chunk in iter(lambda: file.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def _download(url, root, expected=None, target=None):
    """Download `url` into `root` (as `target`) with torch.hub, which checks the SHA-256 (OpenAI's
    addresses carry it) and gives the file its final name only once that has passed, so that a
    killed or corrupt download never leaves a file that looks complete."""
    os.makedirs(root, exist_ok=True)
    expected = expected or url.split("/")[-2]
    target = target or os.path.join(root, os.path.basename(url))
    if os.path.isfile(target):
        if _sha256(target) != expected:
            raise RuntimeError(f"{target} does not match its published SHA-256 {expected}: the "
                               "file is corrupt; delete it and run again to download it anew")
        return target
    try:
        torch.hub.download_url_to_file(url, target, hash_prefix=expected)
    except urllib.error.URLError as e:
        raise RuntimeError(f"could not download {url} ({e.reason}). Without internet, copy the "
                           f"file to {target} or pass a local checkpoint path") from None
    except RuntimeError as e:  # torch.hub's checksum mismatch, which names both SHA-256s
        raise RuntimeError(f"downloaded {url} but its SHA-256 is not the published one ({e}); "
                           f"nothing was saved to {root}. Run again; if it repeats, download the "
                           "file yourself and pass its path to load()") from None
    return target


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None  # the hub's own answer holds the checksum; the storage it points to does not


def hub_sha256(url):
    """The SHA-256 that the Hugging Face hub states for a file it stores with git LFS: the
    X-Linked-Etag header of its answer to a HEAD request, before the redirect to the storage."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        answer = urllib.request.build_opener(_NoRedirect).open(request, timeout=60)
    except urllib.error.HTTPError as e:  # the redirect itself, not followed
        answer = e
    except urllib.error.URLError as e:
        raise RuntimeError(f"could not reach {url} ({e.reason}). Without internet, download the "
                           "file elsewhere and pass its path") from None
    etag = answer.headers.get("X-Linked-Etag") or answer.headers.get("ETag") or ""
    sha = etag.removeprefix("W/").strip('"')
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise RuntimeError(f"{url} states no SHA-256 for the file (HTTP {answer.status}); "
                           "download it yourself and pass its path")
    return sha


def _download_from_hub(repo, filename, root):
    """The hub's file in the cache, ROOT/<repo>/<filename>, checked against the SHA-256 the hub
    states; its checksum is kept beside it (<filename>.sha256), so that a cached file is checked
    again without the network."""
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


# ----------------------------------------------------------------------------------------------
# What a file says about itself

def _read_file(path):
    """(state dict, ClipSpec or None) of a checkpoint file. A TorchScript archive is read only when
    its SHA-256 is one of OpenAI's, so it is OpenAI's CLIP; any other file says its spec by its own
    `open_clip_config` note, an open_clip_config.json beside it, or its SHA-256 if it is a known
    file (hashed last: an open checkpoint can be gigabytes)."""
    sd, notes = _read_state_dict(path)
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), "open_clip_config.json")
    if _is_torchscript(path):
        return sd, OPENAI_SPEC
    if "open_clip_config" in notes:
        return sd, _open_clip_spec(_parse_json(notes["open_clip_config"], path), path, sd)
    if os.path.isfile(beside):
        return sd, _open_clip_spec(_parse_json(_read_text(beside), beside), beside, sd)
    return sd, _KNOWN_FILES.get(_sha256(path))  # None: the file does not say (load refuses it)


def _read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _parse_json(text, where):
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where} holds no JSON object")
    return value


def _open_clip_spec(config, where, sd):
    """The ClipSpec an open_clip_config.json gives, with open_clip's own defaults for what it
    leaves out (GELU, OpenAI's normalization, bicubic); its geometry must be the weights'."""
    model_cfg, pre = config.get("model_cfg", {}), config.get("preprocess_cfg", {})
    vision = model_cfg.get("vision_cfg", {})
    if vision.get("timm_model_name") or model_cfg.get("text_cfg", {}).get("hf_model_name"):
        raise ValueError(f"{where} describes a CLIP whose towers are not CLIP's ViT and text "
                         "transformer; MUST runs on those only")
    if pre.get("resize_mode", "shortest") != "shortest":
        raise ValueError(f"{where}: resize_mode {pre['resize_mode']!r} is not supported (CLIP's "
                         "'shortest' is)")
    if {"visual.positional_embedding", "visual.conv1.weight"} <= set(sd):  # else build_model says
        width, _, patch, _ = sd["visual.conv1.weight"].shape
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        weights = {"image_size": grid * patch, "patch_size": patch, "width": width}
        for key, value in weights.items():
            if key in vision and vision[key] != value:
                raise ValueError(f"{where} gives vision {key} {vision[key]}, the weights {value}")
    activation = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    return _checked_spec(activation, pre.get("mean", CLIP_MEAN), pre.get("std", CLIP_STD),
                         pre.get("interpolation", "bicubic"), where)


def _checked_spec(activation, mean, std, interpolation, where):
    """A ClipSpec from a config's values, refused in one line when one cannot be used."""
    triples = [m for m in (mean, std) if isinstance(m, (list, tuple)) and len(m) == 3]
    if len(triples) != 2 or not all(isinstance(x, (int, float)) for m in triples for x in m):
        raise ValueError(f"{where}: mean and std must be 3 numbers each, not {mean} and {std}")
    if min(std) <= 0:
        raise ValueError(f"{where}: std {std} must be positive")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"{where}: interpolation {interpolation!r} is not one of "
                         f"{', '.join(INTERPOLATIONS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: activation {activation!r} is not one of "
                         f"{', '.join(ACTIVATIONS)}")
    return ClipSpec(activation, tuple(map(float, mean)), tuple(map(float, std)), interpolation)


# ----------------------------------------------------------------------------------------------
# A Hugging Face transformers CLIPModel folder

_HF_NAMES = [  # (transformers' name, OpenAI's), for the parts of a name that differ
    ("text_model.embeddings.token_embedding.", "token_embedding."),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("text_model.final_layer_norm.", "ln_final."),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
    ("vision_model.embeddings.patch_embedding.", "visual.conv1."),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
    ("vision_model.pre_layrnorm.", "visual.ln_pre."),  # sic
    ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
    ("vision_model.post_layernorm.", "visual.ln_post."),
    (".self_attn.out_proj.", ".attn.out_proj."),
    (".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."),
    (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj."),
]


def _read_folder(folder):
    """(state dict in OpenAI's names, ClipSpec) of a transformers CLIPModel folder (config.json,
    model.safetensors or pytorch_model.bin, preprocessor_config.json if any), or of a folder
    holding an open_clip file and its open_clip_config.json."""
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return _read_file(os.path.join(folder, name))
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder} holds neither a transformers CLIPModel (config.json) "
                                "nor an open_clip checkpoint (open_clip_pytorch_model.bin)")
    config = _parse_json(_read_text(config_path), config_path)
    if config.get("model_type") != "clip":
        raise ValueError(f"{config_path} is a {config.get('model_type')!r} model, not a CLIP "
                         "(model_type 'clip')")
    weights = [os.path.join(folder, n) for n in ("model.safetensors", "pytorch_model.bin")]
    weights = [w for w in weights if os.path.isfile(w)]
    if not weights:
        raise FileNotFoundError(f"{folder} has no model.safetensors or pytorch_model.bin")
    sd, _ = _read_state_dict(weights[0])
    return _from_transformers(sd, weights[0]), _hf_spec(config, folder)


def _hf_spec(config, folder):
    """The ClipSpec of a transformers CLIP: the activation from config.json (the same in both
    towers), the preprocessing from preprocessor_config.json, with the defaults of transformers'
    CLIPImageProcessor (OpenAI's normalization, bicubic) for what it leaves out."""
    towers = [config.get("vision_config", {}), config.get("text_config", {})]
    acts = {tower.get("hidden_act", "quick_gelu") for tower in towers}
    for tower in towers:
        width = tower.get("hidden_size", 0)
        if tower.get("intermediate_size", 4 * width) != 4 * width or (
                width and tower.get("num_attention_heads", width // 64) != max(1, width // 64)):
            raise ValueError(f"{folder}: a tower of {width} wide without CLIP's 64-wide heads and "
                             "4x MLP is not supported")
        if tower.get("layer_norm_eps", 1e-5) != 1e-5:
            raise ValueError(f"{folder}: layer_norm_eps {tower['layer_norm_eps']} is not CLIP's "
                             "1e-5")
    if len(acts) != 1:
        raise ValueError(f"{folder}/config.json gives the towers different activations {acts}")
    path = os.path.join(folder, "preprocessor_config.json")
    pre = _parse_json(_read_text(path), path) if os.path.isfile(path) else {}
    resample = {3: "bicubic", 2: "bilinear"}.get(pre.get("resample", 3), pre.get("resample"))
    return _checked_spec(acts.pop(), pre.get("image_mean", CLIP_MEAN),
                         pre.get("image_std", CLIP_STD), resample, path)


def _from_transformers(sd, where):
    """A transformers CLIPModel state dict in OpenAI's names: the q/k/v projections fused into
    in_proj, the projections transposed, position_ids buffers left out."""
    out = {}
    for name, tensor in sd.items():
        if name.endswith("position_ids"):
            continue
        if name in ("visual_projection.weight", "text_projection.weight"):
            out["visual.proj" if name.startswith("visual") else "text_projection"] = tensor.t()
            continue
        for theirs, ours in _HF_NAMES:
            name = name.replace(theirs, ours)
        out[name] = tensor
    for prefix in {k.split(".self_attn.")[0] for k in out if ".self_attn." in k}:
        for kind in ("weight", "bias"):
            parts = [f"{prefix}.self_attn.{p}_proj.{kind}" for p in "qkv"]
            if not all(p in out for p in parts):
                raise ValueError(f"{where}: {prefix} lacks one of its q, k, v projections")
            out[f"{prefix}.attn.in_proj_{kind}"] = torch.cat([out.pop(p) for p in parts])
    return out


# ----------------------------------------------------------------------------------------------
# Reading checkpoints without running code from them

class UnsafeFileError(ValueError):
    """A checkpoint that could only be read by running code from it."""


def _is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:  # torch.load's own test: a <name>/constants.pkl record
        return any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in archive.namelist())


def _read_torchscript(path):
    """The state dict of one of OpenAI's published archives, through torch.jit.load; any other
    is refused."""
    with open(path, "rb") as f:
        if _sha256(f) not in _openai_sha256s():
            raise UnsafeFileError(
                f"{path} is a TorchScript archive (a program) that is not one of OpenAI's "
                "published files; loading never runs code from a file. If you trust the file, "
                "convert it once (to a state dict that says it is OpenAI's format) with: python -c "
                "\"import torch, clip_load; sd = torch.jit.load("
                f"{path!r}).state_dict(); sd['open_clip_config'] = "
                "clip_load.config_note(clip_load.OPENAI_SPEC); torch.save(sd, 'clip.pt')\" and "
                "pass clip.pt")
        f.seek(0)  # the bytes just hashed are the bytes loaded, even if the path is replaced
        with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript, OpenAI's format
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(f, map_location="cpu").state_dict()


def _read_safetensors(path):
    """A safetensors file's tensors. The package is needed for such files only, so it is imported
    here, not made a dependency of every run."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise RuntimeError(f"{path} is a safetensors file; reading it needs the safetensors "
                           "package: pip install safetensors") from None
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # the package's own errors: a damaged header, a truncated file
        raise RuntimeError(f"could not read {path}: it is truncated or not a safetensors file "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _expand_sparse_rows(sd):
    """Turn each `<name>.ids` + `<name>.rows` + `<name>.vocab_size` into `<name>.weight` (the other
    rows zero)."""
    for name in [k.removesuffix(".ids") for k in sd if k.endswith(".ids")]:
        ids, rows, vocab_size = (sd.pop(f"{name}.{part}", None)
                                 for part in ("ids", "rows", "vocab_size"))
        ok = (torch.is_tensor(ids) and torch.is_tensor(rows) and isinstance(vocab_size, int)
              and ids.ndim == 1 and not ids.is_floating_point() and rows.ndim == 2
              and len(ids) == len(rows)
              and (len(ids) == 0 or 0 <= ids.min() <= ids.max() < vocab_size))
        if not ok:
            raise ValueError(f"'{name}.ids/.rows/.vocab_size' do not describe rows of a table: "
                             "expected token ids (K,) below vocab_size, rows (K, width) and an "
                             "int vocab_size")
        weight = rows.new_zeros(vocab_size, rows.shape[1])
        weight[ids] = rows
        sd[f"{name}.weight"] = weight
    return sd


def _read_state_dict(path):
    """(tensors, string notes) of a TorchScript archive (OpenAI's release format), a safetensors
    file or a file saved with torch.save. Nothing in the file is run (see the docstring at the
    top)."""
    if path.endswith(".safetensors"):
        return _read_safetensors(path), {}
    try:
        if _is_torchscript(path):
            sd = _read_torchscript(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except UnsafeFileError:
        raise
    except Exception as e:
        detail = load_error_detail(e, path)
        if detail.startswith("refused"):
            raise UnsafeFileError(f"could not read {path}: {detail}") from None
        if not detail.startswith("it is truncated"):
            detail = f"it is truncated or not a checkpoint ({detail})"
        raise RuntimeError(f"could not read {path}: {detail}. If it was downloaded, delete it "
                           "and download it again") from None
    notes = {k: v for k, v in sd.items() if isinstance(v, str)} if isinstance(sd, dict) else {}
    if isinstance(sd, dict):
        sd = _expand_sparse_rows({k: v for k, v in sd.items() if not isinstance(v, str)})
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path} is not a CLIP state dict (expected a dict of tensors)")
    return sd, notes
