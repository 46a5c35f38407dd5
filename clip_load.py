"""Loading CLIP, as OpenAI's `clip` package does, without ever running code from a file.

    available_models() -> list of names
    load(name_or_path, device="cpu", download_root=None) -> (model, preprocess)

A name downloads OpenAI's published file, SHA-256 checked. A local checkpoint is one of OpenAI's
TorchScript archives or a state dict saved with torch.save. A TorchScript archive is a program:
torch.jit.load runs its code (a scripted __setstate__ can write any file, e.g. with
torch.from_file). So only OpenAI's own archives, recognised by their published SHA-256, are opened
with it, and any other archive is refused; everything else is read with
torch.load(weights_only=True). The network is clip_model.py's; the tokenizer is tokenizer.py.
"""
import hashlib
import os
import urllib.error
import warnings
import zipfile

import torch
from torchvision import transforms

from clip_model import build_model
from runtime import load_error_detail

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

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


def available_models():
    return list(_MODELS)


def load(name_or_path, device="cpu", download_root=None):
    """Load a CLIP ViT by name (downloaded and checksummed) or from a local checkpoint; weights in
    fp32. -> (model in eval mode, preprocess transform), as OpenAI's clip.load.

    The cache directory is `download_root`, else $CLIP_DOWNLOAD_ROOT, else ~/.cache/clip.

    Only OpenAI's released archives (known by their published SHA-256) go through torch.jit.load;
    any other TorchScript archive is refused (UnsafeFileError) with the command that turns it into
    a state dict, and state dicts are read with torch.load(weights_only=True). A state dict may
    store an embedding table by the rows it uses: `<name>.ids` (K token ids), `<name>.rows`
    (K x width) and `<name>.vocab_size` (an int) stand for `<name>.weight` with zeros in the rows
    not listed (toy.py's toy_clip.pt is stored so); string entries are notes (such as toy.py's
    `recipe`) and are ignored.
    """
    if name_or_path in _MODELS:
        # OpenAI's cache location by default, so that weights the `clip` package already
        # downloaded are reused.
        default = os.environ.get("CLIP_DOWNLOAD_ROOT", os.path.expanduser("~/.cache/clip"))
        path = _download(_MODELS[name_or_path], download_root or default)
    elif os.path.isfile(os.path.expanduser(name_or_path)):
        path = os.path.expanduser(name_or_path)
    elif _looks_like_path(name_or_path):
        raise FileNotFoundError(f"no checkpoint file at {name_or_path}; pass an existing file or "
                                f"one of {available_models()}")
    else:
        raise ValueError(f"unknown model '{name_or_path}'; available models are "
                         f"{available_models()}, or pass the path of a checkpoint file")
    sd = _read_state_dict(path)
    try:
        model = build_model(sd)  # in fp32: load_state_dict casts fp16 weights as it copies them
    except (ValueError, RuntimeError) as e:  # named after the file, as errors in reading it are
        raise type(e)(f"{path}: {e}") from None
    model = model.to(device).eval()
    return model, image_transform(model.visual.input_resolution)


def _to_rgb(image):
    return image.convert("RGB")


def image_transform(n_px):
    """CLIP's test-time preprocessing: bicubic resize of the short side, center crop, CLIP
    normalization. Picklable, so that data loader workers started with spawn can use it."""
    return transforms.Compose([
        transforms.Resize(n_px, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(n_px),
        _to_rgb,
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
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


def _download(url, root):
    """Download `url` into `root` with torch.hub, which checks the SHA-256 that the address
    carries and gives the file its final name only once that has passed, so that a killed or
    corrupt download never leaves a file that looks complete."""
    os.makedirs(root, exist_ok=True)
    expected = url.split("/")[-2]
    target = os.path.join(root, os.path.basename(url))
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
        if _sha256(f) not in {url.split("/")[-2] for url in _MODELS.values()}:
            raise UnsafeFileError(
                f"{path} is a TorchScript archive (a program) that is not one of OpenAI's "
                "published files; loading never runs code from a file. If you trust the file, "
                "convert it once with: python -c \"import torch; "
                f"torch.save(torch.jit.load({path!r}).state_dict(), 'clip.pt')\" and pass clip.pt")
        f.seek(0)  # the bytes just hashed are the bytes loaded, even if the path is replaced
        with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript, OpenAI's format
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(f, map_location="cpu").state_dict()


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
    """A state dict from a TorchScript archive (OpenAI's release format) or a file saved with
    torch.save. Nothing in the file is run (see the docstring at the top)."""
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
    if isinstance(sd, dict):
        sd = _expand_sparse_rows({k: v for k, v in sd.items() if not isinstance(v, str)})
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path} is not a CLIP state dict (expected a dict of tensors)")
    return sd
