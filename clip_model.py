"""
CLIP (Radford et al., 2021) as MUST uses it: a ViT image tower, a text transformer, CLIP's BPE tokenizer,
and the loader for OpenAI's released checkpoints — plus MUST's patch to the image tower (paper §3, Figure 2):
a learnable [MSK] embedding, a LayerNorm over patch outputs and a SimMIM linear decoder.

Public API, as in OpenAI's `clip` package:
    available_models() -> list of names
    load(name_or_path, device="cpu", download_root=None) -> (model, preprocess)
    tokenize(texts, context_length=77, truncate=False) -> LongTensor (N, context_length)

Parameter names and shapes are those of OpenAI's checkpoints, so a released state dict loads with strict
matching; the architecture is read from the state dict. Tokens are batch-first (B, L, C) throughout.
"""

import gzip
import hashlib
import html
import os
import urllib.error
import warnings
import zipfile
from collections import OrderedDict
from functools import lru_cache

import ftfy
import regex
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# OpenAI's published addresses; the second-to-last path segment is the file's SHA-256.
_MODELS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
_BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
# Entries of OpenAI's TorchScript archives that are not parameters.
_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")


# ----------------------------------------------------------------------------------------------------------
# The transformer shared by both towers


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI's CLIPs were trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (in_proj_*, out_proj)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def qkv(self, x):
        B, L, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3C)
        qkv = qkv.view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, L, C/H)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x, causal=False):
        B, L, C = x.shape
        q, k, v = self.qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, L, C/H)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, C))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x, causal=False):
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x

    def init_weights(self):
        # OpenAI's initialization: residual projections shrink with depth so the stream's variance stays bounded.
        attn_std = self.width ** -0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


def _heads(width):
    """CLIP's ViTs use 64-dim heads; the state dict does not store the head count, so it is derived."""
    return max(1, width // 64)


# ----------------------------------------------------------------------------------------------------------
# Image tower, with MUST's patch


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, output_dim):
        super().__init__()
        self.input_resolution, self.patch_size = input_resolution, patch_size
        self.grid_size = input_resolution // patch_size
        self.width, self.output_dim = width, output_dim
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, _heads(width))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def tokens(self, x, mask=None):
        """Patch embeddings -> [MSK] where masked -> prepend [CLS] -> + positions -> ln_pre. (B, 1+N, width)"""
        x = self.conv1(x)  # (B, width, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, N, width)
        if mask is not None:
            # MUST: masked patches are replaced before positions are added, so [MSK] still knows where it is.
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def forward(self, x):
        """CLIP's image embedding (not normalized). (B, 3, H, W) -> (B, output_dim)"""
        z = self.transformer(self.tokens(x))
        return self.ln_post(z[:, 0]) @ self.proj

    # --- MUST (paper §3; the release's MUST heads) ---

    def add_must_heads(self):
        """Create the [MSK] embedding, the patch LayerNorm and the SimMIM linear decoder (1x1 conv + PixelShuffle)."""
        p, ref = self.patch_size, self.conv1.weight
        self.mask_token = nn.Parameter(torch.empty(self.width, device=ref.device, dtype=ref.dtype))
        nn.init.normal_(self.mask_token, std=0.02)
        self.ln_patch = nn.LayerNorm(self.width, device=ref.device, dtype=ref.dtype)
        self.decoder = nn.Sequential(
            nn.Conv2d(self.width, p * p * 3, kernel_size=1, device=ref.device, dtype=ref.dtype),
            nn.PixelShuffle(p),
        )

    @property
    def has_must_heads(self):
        return hasattr(self, "mask_token")

    def forward_must(self, x, mask=None):
        """One forward for the three MUST objectives.

        x: (B, 3, H, W); mask: (B, N) bool, True = masked, or None.
        Returns v_cls (B, D) and v_patch (B, N, D), both L2-normalized in the joint embedding space
        (the same `proj` for [CLS] and patches, eq. 5), and recon (B, 3, H, W), the decoder's prediction
        of the CLIP-normalized pixels of every patch (eq. 4).
        """
        z = self.transformer(self.tokens(x, mask))
        v_cls = F.normalize(self.ln_post(z[:, 0]) @ self.proj, dim=-1)
        patches = self.ln_patch(z[:, 1:])  # (B, N, width)
        v_patch = F.normalize(patches @ self.proj, dim=-1)
        B, N, C = patches.shape
        grid = patches.transpose(1, 2).reshape(B, C, self.grid_size, self.grid_size)
        recon = self.decoder(grid)  # (B, p*p*3, g, g) -> PixelShuffle -> (B, 3, g*p, g*p)
        return v_cls, v_patch, recon


# ----------------------------------------------------------------------------------------------------------
# CLIP


class CLIP(nn.Module):
    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                 context_length, vocab_size, transformer_width, transformer_layers):
        super().__init__()
        self.context_length = context_length
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers, embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, _heads(transformer_width))
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = nn.LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())
        self.init_weights()

    def init_weights(self):
        """OpenAI's initialization, for CLIPs trained here (checkpoints overwrite all of it)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)
        self.transformer.init_weights()
        self.visual.transformer.init_weights()

    def encode_image(self, image):
        return self.visual(image)

    def encode_text(self, text):
        # Causal attention makes positions after <|endoftext|> irrelevant, so callers may pass trimmed tokens.
        x = self.token_embedding(text) + self.positional_embedding[:text.shape[1]]  # (B, L, width)
        x = self.ln_final(self.transformer(x, causal=True))
        # The end-of-text token has the largest id, so argmax finds each sequence's last position.
        eot = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
        return eot @ self.text_projection

    def forward(self, image, text):
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def _count_blocks(state_dict, prefix):
    return len({k[len(prefix):].split(".")[0] for k in state_dict
                if k.startswith(prefix) and k.endswith(".attn.in_proj_weight")})


def _examples(keys, n=2):
    """The first n keys of a list, for one-line messages: 'a', 'b' or e.g. 'a', 'b' (of more)."""
    return ("e.g. " if len(keys) > n else "") + ", ".join(f"'{k}'" for k in keys[:n])


def _vision_config(sd, prefix=""):
    """Architecture of the image tower read from a state dict whose keys start with `prefix`."""
    # Only ResNet keys make it a ResNet CLIP: any other state dict without a ViT's keys (a plain
    # nn.Linear, a text model) is not a CLIP ViT, and the message names what it lacks and holds.
    if any(k.startswith((prefix + "layer1.", prefix + "attnpool.")) for k in sd):
        raise ValueError("ResNet CLIP checkpoints (RN50, RN101, ...) are not supported: MUST needs a ViT "
                         f"image tower; use one of {available_models()}")
    for key in ("conv1.weight", "positional_embedding", "class_embedding", "proj"):
        if prefix + key not in sd:
            raise ValueError(f"not a CLIP ViT checkpoint: missing key '{prefix + key}' (it holds "
                             f"{len(sd)} tensor(s): {_examples(list(sd)) or 'none'})")
    width, _, patch, _ = sd[prefix + "conv1.weight"].shape
    grid = round((sd[prefix + "positional_embedding"].shape[0] - 1) ** 0.5)
    return dict(input_resolution=patch * grid, patch_size=patch, width=width,
                layers=_count_blocks(sd, prefix + "transformer.resblocks."), output_dim=sd[prefix + "proj"].shape[1])


def _mismatch(module, state_dict):
    """One line on how the keys of a state dict miss those of `module`, or None when they match."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    reshaped = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if not (missing or unexpected or reshaped):
        return None
    found = [f"{len(missing)} key(s) missing" + (f" ({_examples(missing)})" if missing else ""),
             f"{len(unexpected)} unexpected"
             + (f" ({_examples(unexpected)})" if unexpected else "")]
    if reshaped:
        k = reshaped[0]
        found.append(f"{len(reshaped)} of another shape ('{k}': {tuple(state_dict[k].shape)} in "
                     f"the file, {tuple(expected[k].shape)} in the model)")
    return (f"the state dict does not fit the {type(module).__name__} its tensors describe: "
            + ", ".join(found))


def _load_strict(module, state_dict):
    if "mask_token" in {k.split(".")[-1] for k in state_dict}:
        (module.visual if isinstance(module, CLIP) else module).add_must_heads()
    # Checked first: load_state_dict's own error lists every key, on lines of their own.
    mismatch = _mismatch(module, state_dict)
    if mismatch:
        raise RuntimeError(mismatch)
    module.load_state_dict(state_dict, strict=True)
    return module


def build_model(state_dict):
    """A CLIP whose architecture is read from an OpenAI-format state dict, loaded with strict key matching."""
    sd = {k: v for k, v in state_dict.items() if k not in _NON_PARAMETER_KEYS}
    v = _vision_config(sd, "visual.")  # first, so a ResNet checkpoint gets its own message
    for key in ("text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight"):
        if key not in sd:
            raise ValueError(f"not a CLIP checkpoint: missing key '{key}'")
    model = CLIP(
        embed_dim=sd["text_projection"].shape[1], image_resolution=v["input_resolution"],
        vision_layers=v["layers"], vision_width=v["width"], vision_patch_size=v["patch_size"],
        context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
        transformer_width=sd["ln_final.weight"].shape[0],
        transformer_layers=_count_blocks(sd, "transformer.resblocks."),
    )
    return _load_strict(model, sd)


def build_visual(state_dict):
    """The image tower alone, from its state dict without the `visual.` prefix (e.g. from a MUST checkpoint)."""
    return _load_strict(VisionTransformer(**_vision_config(state_dict)), state_dict)


# ----------------------------------------------------------------------------------------------------------
# Loading checkpoints


def available_models():
    return list(_MODELS)


def _sha256(file):
    """SHA-256 of a file given by its path, or open in binary mode (then read from where it stands)."""
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as f:
            return _sha256(f)
    h = hashlib.sha256()
    for chunk in iter(lambda: file.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def _download(url, root):
    """Download `url` into `root` with torch.hub, which checks the SHA-256 the address carries and gives the file its
    final name only once that has passed, so a killed or corrupt download never leaves a file that looks complete."""
    os.makedirs(root, exist_ok=True)
    expected = url.split("/")[-2]
    target = os.path.join(root, os.path.basename(url))
    if os.path.isfile(target):
        if _sha256(target) != expected:
            raise RuntimeError(f"{target} does not match its published SHA-256 {expected}: the file is corrupt; "
                               "delete it and run again to download it anew")
        return target
    try:
        torch.hub.download_url_to_file(url, target, hash_prefix=expected)
    except urllib.error.URLError as e:
        raise RuntimeError(f"could not download {url} ({e.reason}). Without internet, copy the file to {target} "
                           "or pass a local checkpoint path") from None
    except RuntimeError as e:  # torch.hub's checksum mismatch, which names both SHA-256s
        raise RuntimeError(f"downloaded {url} but its SHA-256 is not the published one ({e}); nothing was saved "
                           f"to {root}. Run again; if it repeats, download the file yourself and pass its path to "
                           "load()") from None
    return target


# ----------------------------------------------------------------------------------------------------------
# Reading checkpoints without running code from them
#
# A TorchScript archive is a program: torch.jit.load runs its code (a scripted __setstate__ can write any file,
# e.g. with torch.from_file). So only OpenAI's own archives, recognised by their published SHA-256, are opened
# with it, and any other archive is refused; everything else is read with torch.load(weights_only=True).


class UnsafeFileError(ValueError):
    """A checkpoint that could only be read by running code from it."""


def _is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:  # torch.load's own test: a <name>/constants.pkl record
        return any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in archive.namelist())


def _read_torchscript(path):
    """The state dict of one of OpenAI's published archives, through torch.jit.load; any other is refused."""
    with open(path, "rb") as f:
        if _sha256(f) not in {url.split("/")[-2] for url in _MODELS.values()}:
            raise UnsafeFileError(
                f"{path} is a TorchScript archive (a program) that is not one of OpenAI's published files; loading "
                "never runs code from a file. If you trust the file, convert it once with: python -c \"import torch; "
                f"torch.save(torch.jit.load({path!r}).state_dict(), 'clip.pt')\" and pass clip.pt")
        f.seek(0)  # the bytes just hashed are the bytes loaded, even if the path is replaced meanwhile
        with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript, OpenAI's release format
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(f, map_location="cpu").state_dict()


def _weights_only_refusal(e):
    """torch's own line in an error of torch.load(..., weights_only=True), such as 'Unsupported
    operand 108' or 'Unsupported global: GLOBAL io.open was not an allowed global by default';
    None for other errors."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines or not lines[0].startswith("Weights only load failed"):
        return None
    # torch's wording varies between versions; its specific line names the global or opcode refused
    specific = [line.split("WeightsUnpickler error:")[-1].strip().split(". ")[0]
                for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return specific[0][:200] if specific else lines[0][:200]


def _is_pickle(path):
    """Whether a file is what torch.save writes (a zip archive) or a pickle (from protocol 2 on it
    starts with the PROTO opcode, and every pickle ends with STOP): torch's safe reader refuses
    random bytes as it refuses code, and only these can hold code."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
    return (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or last == b"."


def load_error_detail(e, path):
    """One line saying why torch.load(path, ..., weights_only=True) failed, without torch's advice
    to load unsafely. A refused file is said to hold more than tensors only if it is a pickle."""
    refusal = _weights_only_refusal(e)
    if refusal is not None and ("GLOBAL" in refusal or _is_pickle(path)):
        return ("refused: it holds more than the tensors and plain values that can be read without "
                f"running code from the file ({refusal})")
    if refusal is not None:
        return f"it is truncated or not a checkpoint (torch.load: {refusal})"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if lines and "TorchScript" in lines[0] and "weights_only" in lines[0]:
        return "refused: it is a TorchScript archive (a program), not a file of tensors"
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _expand_sparse_rows(sd):
    """Turn each `<name>.ids` + `<name>.rows` + `<name>.vocab_size` into `<name>.weight` (the other rows zero)."""
    for name in [k[:-len(".ids")] for k in sd if k.endswith(".ids")]:
        ids, rows, vocab_size = (sd.pop(f"{name}.{part}", None) for part in ("ids", "rows", "vocab_size"))
        ok = (torch.is_tensor(ids) and torch.is_tensor(rows) and isinstance(vocab_size, int) and ids.ndim == 1
              and not ids.is_floating_point() and rows.ndim == 2 and len(ids) == len(rows)
              and (len(ids) == 0 or 0 <= ids.min() <= ids.max() < vocab_size))
        if not ok:
            raise ValueError(f"'{name}.ids/.rows/.vocab_size' do not describe rows of a table: expected token ids "
                             f"(K,) below vocab_size, rows (K, width) and an int vocab_size")
        weight = rows.new_zeros(vocab_size, rows.shape[1])
        weight[ids] = rows
        sd[f"{name}.weight"] = weight
    return sd


def _read_state_dict(path):
    """A state dict from a TorchScript archive (OpenAI's release format) or a file saved with torch.save.

    Nothing in the file is run: see _read_torchscript; everything else goes through weights_only=True."""
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
        raise RuntimeError(f"could not read {path}: {detail}. If it was downloaded, delete it and "
                           "download it again") from None
    if isinstance(sd, dict):
        sd = _expand_sparse_rows({k: v for k, v in sd.items() if not isinstance(v, str)})
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path} is not a CLIP state dict (expected a dict of tensors)")
    return sd


def _looks_like_path(s):
    parent = os.path.dirname(os.path.expanduser(s))
    return os.path.splitext(s)[1] != "" or s.startswith((".", "/", "~")) or (parent != "" and os.path.isdir(parent))


def _to_rgb(image):
    return image.convert("RGB")


def image_transform(n_px):
    """CLIP's test-time preprocessing: bicubic resize of the short side, center crop, CLIP normalization.
    Picklable, so data loader workers started with spawn can use it."""
    return transforms.Compose([
        transforms.Resize(n_px, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(n_px),
        _to_rgb,
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def load(name_or_path, device="cpu", download_root=None):
    """Load a CLIP ViT by name (downloaded and checksummed) or from a local checkpoint; weights in fp32.

    Returns (model in eval mode, preprocess transform), as OpenAI's clip.load.
    The cache directory is `download_root`, else $CLIP_DOWNLOAD_ROOT, else ~/.cache/clip.

    A checkpoint is a TorchScript archive or a state dict saved with torch.save; loading never runs code from
    it. Only OpenAI's released archives (known by their published SHA-256) go through torch.jit.load; any other
    TorchScript archive is refused (UnsafeFileError) with the command that turns it into a state dict, and state
    dicts are read with torch.load(weights_only=True). A state dict may store an embedding table by the rows it uses:
    `<name>.ids` (K token ids), `<name>.rows` (K x width) and `<name>.vocab_size` (an int) stand for
    `<name>.weight` with zeros in the rows not listed (toy.py's toy_clip.pt is stored so); string entries are
    notes (such as toy.py's `recipe`) and are ignored.
    """
    if name_or_path in _MODELS:
        # OpenAI's cache location by default, so weights the `clip` package already downloaded are reused
        root = download_root or os.environ.get("CLIP_DOWNLOAD_ROOT", os.path.expanduser("~/.cache/clip"))
        path = _download(_MODELS[name_or_path], root)
    elif os.path.isfile(os.path.expanduser(name_or_path)):
        path = os.path.expanduser(name_or_path)
    elif _looks_like_path(name_or_path):
        raise FileNotFoundError(f"no checkpoint file at {name_or_path}; pass an existing file or one of "
                                f"{available_models()}")
    else:
        raise ValueError(f"unknown model '{name_or_path}'; available models are {available_models()}, "
                         "or pass the path of a checkpoint file")
    sd = _read_state_dict(path)
    try:
        model = build_model(sd)  # in fp32: load_state_dict casts fp16 weights as it copies them
    except (ValueError, RuntimeError) as e:  # named after the file, as errors in reading it are
        raise (ValueError if isinstance(e, ValueError) else RuntimeError)(f"{path}: {e}") from None
    model = model.to(device).eval()
    return model, image_transform(model.visual.input_resolution)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer: CLIP's byte-level BPE


def _byte_alphabet():
    """Bytes -> printable unicode characters, in the order that fixes the first 256 vocabulary ids.

    Printable latin-1 bytes stand for themselves; every other byte is moved to code point 256 + n so that
    the BPE never sees whitespace or control characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


_TOKEN_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


class _Tokenizer:
    def __init__(self, bpe_path=_BPE_PATH):
        if not os.path.isfile(bpe_path):
            raise FileNotFoundError(f"the BPE merges file {bpe_path} is missing; it ships with this repository "
                                    "(restore it with git checkout)")
        if _sha256(bpe_path) != _BPE_SHA256:
            raise RuntimeError(f"{bpe_path} does not match its SHA-256 {_BPE_SHA256}; restore it with git checkout")
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # 48,894 merges after the header
        self.byte_encoder = _byte_alphabet()
        chars = list(self.byte_encoder.values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        self.cache = {"<|startoftext|>": ("<|startoftext|>",), "<|endoftext|>": ("<|endoftext|>",)}
        self.sot, self.eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]

    def bpe(self, token):
        """Greedily merge the lowest-ranked adjacent pair until no known merge is left."""
        if token in self.cache:
            return self.cache[token]
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged = []
            for piece in word:  # a merged piece is longer than best[0], so this pass never merges it again
                if merged and (merged[-1], piece) == best:
                    merged[-1] += piece
                else:
                    merged.append(piece)
            word = tuple(merged)
        self.cache[token] = word
        return word

    def encode(self, text):
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for token in _TOKEN_PATTERN.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(token))
        return ids


@lru_cache()
def _tokenizer():
    return _Tokenizer()


def tokenize(texts, context_length=77, truncate=False):
    """Token ids of each text between <|startoftext|> and <|endoftext|>, zero-padded: LongTensor (N, context_length).

    A text longer than the context is an error unless truncate=True, which cuts it and keeps <|endoftext|> last.
    """
    tok = _tokenizer()
    texts = [texts] if isinstance(texts, str) else list(texts)
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [tok.sot, *tok.encode(text), tok.eot]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"text {i} is {len(ids)} tokens, longer than the context length {context_length}: "
                                 f"{text[:80]!r}...; shorten it or pass truncate=True")
            ids = ids[:context_length - 1] + [tok.eot]
        result[i, :len(ids)] = torch.tensor(ids)
    return result
