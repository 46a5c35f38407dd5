"""CLIP (Radford et al., 2021) as MUST uses it: a ViT image tower, a text transformer,
and MUST's patch to the image tower (paper §3, Figure 2): a learnable [MSK] embedding,
a LayerNorm over the patch outputs and a SimMIM linear decoder.

Parameter names and shapes are OpenAI's, so released state dicts load with strict
matching. A state dict holds neither the activation (QuickGELU for OpenAI's CLIPs,
GELU for many open ones) nor the head counts: whoever builds a CLIP says them (clip_load
reads them for every file). Tokens are batch-first, (B, L, C).
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.clip_load import (architecture, clip_heads, image_transform, key_examples,
                            read, vision_config)
from util.clip_load import available_models  # noqa: F401 -- OpenAI's API, with load

# Entries of OpenAI's TorchScript archives that are not parameters.
_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")


# ----------------------------------------------------------------------------
# The transformer shared by both towers

class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI's CLIPs were trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


# The MLP activations of the CLIPs this project reads (clip_load.ACTIVATION_NAMES).
ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names."""

    def __init__(self, width, heads):
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(
                f"a width of {width} does not split into {heads} attention heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def qkv(self, x):
        B, L, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # shape = [B, L, 3C]
        qkv = qkv.view(B, L, 3, self.heads, C // self.heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # shape = [3, B, heads, L, C / heads]
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x, causal=False):
        B, L, C = x.shape
        q, k, v = self.qkv(x)
        # shape = [B, heads, L, C / heads]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, C))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, activation, mlp_width=None):
        super().__init__()
        mlp_width = mlp_width or 4 * width  # OpenAI's; ViT-bigG/14's is another
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_width)),
            ("gelu", ACTIVATIONS[activation]()),
            ("c_proj", nn.Linear(mlp_width, width)),
        ]))

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, activation="quick_gelu", mlp_width=None):
        super().__init__()
        self.width, self.layers = width, layers
        blocks = [ResidualAttentionBlock(width, heads, activation, mlp_width)
                  for _ in range(layers)]
        self.resblocks = nn.ModuleList(blocks)

    def forward(self, x, causal=False):
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x

    def init_weights(self):
        # OpenAI's: the residual projections shrink with depth, so that the variance of
        # the residual stream stays bounded.
        attn_std = self.width ** -0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


# ----------------------------------------------------------------------------
# The image tower, with MUST's patch

class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, output_dim,
                 activation="quick_gelu", heads=None, mlp_width=None):
        super().__init__()
        self.input_resolution, self.patch_size = input_resolution, patch_size
        self.grid_size = input_resolution // patch_size
        self.width, self.output_dim = width, output_dim
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size,
                               bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        positions = scale * torch.randn(self.grid_size ** 2 + 1, width)
        self.positional_embedding = nn.Parameter(positions)
        self.ln_pre = nn.LayerNorm(width)
        heads = heads or clip_heads(width)
        self.transformer = Transformer(width, layers, heads, activation, mlp_width)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def tokens(self, x, mask=None):
        """Patch embeddings, [MSK] where masked, [CLS] first, positions added, ln_pre.
        (B, 3, H, W) -> (B, 1 + N, width)"""
        x = self.conv1(x)  # shape = [B, width, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # shape = [B, grid ** 2, width]
        if mask is not None:
            # MUST: [MSK] replaces a patch before the positions are added, so it still
            # knows where it stands.
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)  # shape = [B, grid ** 2 + 1, width]
        return self.ln_pre(x + self.positional_embedding.to(x.dtype))

    def forward(self, x):
        """CLIP's image embedding (not normalized). (B, 3, H, W) -> (B, output_dim)"""
        z = self.transformer(self.tokens(x))
        return self.ln_post(z[:, 0]) @ self.proj

    # ---- MUST's patch (paper §3, Figure 2; the release's MUST heads) ----

    def add_must_heads(self):
        """Create the [MSK] embedding, the patch LayerNorm and the SimMIM linear decoder
        (a 1x1 convolution and a PixelShuffle)."""
        p, ref = self.patch_size, self.conv1.weight
        like = dict(device=ref.device, dtype=ref.dtype)
        self.mask_token = nn.Parameter(torch.empty(self.width, **like))
        nn.init.normal_(self.mask_token, std=0.02)
        self.ln_patch = nn.LayerNorm(self.width, **like)
        self.decoder = nn.Sequential(
            nn.Conv2d(self.width, p * p * 3, kernel_size=1, **like),
            nn.PixelShuffle(p),
        )

    @property
    def has_must_heads(self):
        return hasattr(self, "mask_token")

    def forward_must(self, x, mask=None):
        """One forward for the three MUST objectives. x: (B, 3, H, W); mask: (B, N)
        bool, True = masked, or None.

        Returns v_cls (B, D) and v_patch (B, N, D), L2-normalized in the joint embedding
        space (one `proj` for [CLS] and the patches, eq. 5), and recon (B, 3, H, W), the
        decoder's prediction of every patch's CLIP-normalized pixels (eq. 4).
        """
        z = self.transformer(self.tokens(x, mask))  # shape = [B, grid ** 2 + 1, width]
        v_cls = F.normalize(self.ln_post(z[:, 0]) @ self.proj, dim=-1)
        patches = self.ln_patch(z[:, 1:])  # shape = [B, grid ** 2, width]
        v_patch = F.normalize(patches @ self.proj, dim=-1)
        B, N, C = patches.shape
        grid = patches.transpose(1, 2).reshape(B, C, self.grid_size, self.grid_size)
        recon = self.decoder(grid)  # shape = [B, 3, grid * p, grid * p]
        return v_cls, v_patch, recon


# ----------------------------------------------------------------------------
# CLIP: both towers

class CLIP(nn.Module):
    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width,
                 vision_patch_size, context_length, vocab_size, transformer_width,
                 transformer_layers, activation="quick_gelu", vision_heads=None,
                 transformer_heads=None, vision_mlp_width=None,
                 transformer_mlp_width=None):
        super().__init__()
        self.context_length = context_length
        self.visual = VisionTransformer(
            image_resolution, vision_patch_size, vision_width, vision_layers, embed_dim,
            activation, vision_heads, vision_mlp_width)
        width = transformer_width
        heads = transformer_heads or clip_heads(width)
        self.transformer = Transformer(width, transformer_layers, heads, activation,
                                       transformer_mlp_width)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())
        self.init_weights()

    def init_weights(self):
        """OpenAI's initialization, for CLIPs trained here."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)
        self.transformer.init_weights()
        self.visual.transformer.init_weights()

    def encode_image(self, image):
        return self.visual(image)

    def encode_text(self, text):
        # Causal attention makes the positions after <|endoftext|> irrelevant, so
        # callers may trim the padding.
        x = self.token_embedding(text)  # shape = [B, L, width]
        x = x + self.positional_embedding[:text.shape[1]]
        x = self.ln_final(self.transformer(x, causal=True))
        # <|endoftext|> has the largest id, so argmax finds each text's last position.
        eot = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
        return eot @ self.text_projection

    def forward(self, image, text):
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


# ----------------------------------------------------------------------------
# Building a CLIP from a state dict

def _mismatch(module, state_dict):
    """One line on how a state dict's keys miss `module`'s, or None when they match."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    reshaped = [k for k in expected
                if k in state_dict and state_dict[k].shape != expected[k].shape]
    if not (missing or unexpected or reshaped):
        return None
    found = [f"{len(missing)} key(s) missing", f"{len(unexpected)} unexpected"]
    if missing:
        found[0] += f" ({key_examples(missing)})"
    if unexpected:
        found[1] += f" ({key_examples(unexpected)})"
    if reshaped:
        k = reshaped[0]
        in_file, in_model = tuple(state_dict[k].shape), tuple(expected[k].shape)
        found.append(f"{len(reshaped)} of another shape ('{k}': {in_file} in the file, "
                     f"{in_model} in the model)")
    return (f"the state dict does not fit the {type(module).__name__} its tensors "
            f"describe: {', '.join(found)}")


def _load_strict(module, state_dict):
    if "mask_token" in {k.split(".")[-1] for k in state_dict}:
        (module.visual if isinstance(module, CLIP) else module).add_must_heads()
    # Checked first: load_state_dict's own error lists every key on a line of its own.
    mismatch = _mismatch(module, state_dict)
    if mismatch:
        raise RuntimeError(mismatch)
    module.load_state_dict(state_dict, strict=True)
    return module


def build_model(state_dict, activation, vision_heads=None, transformer_heads=None):
    """A CLIP built as an OpenAI-format state dict's shapes say, loaded with strict key
    matching. The activation ("quick_gelu" or "gelu") and each tower's heads (None: 64
    wide) are the caller's, because a state dict cannot say them."""
    sd = {k: v for k, v in state_dict.items() if k not in _NON_PARAMETER_KEYS}
    model = CLIP(**architecture(sd), activation=activation, vision_heads=vision_heads,
                 transformer_heads=transformer_heads)
    return _load_strict(model, sd)


def build_visual(state_dict, activation, heads=None):
    """The image tower alone, from its state dict without the `visual.` prefix (as a
    MUST checkpoint holds it), with `heads` attention heads (None: 64-wide ones)."""
    tower = VisionTransformer(**vision_config(state_dict), activation=activation,
                              heads=heads)
    return _load_strict(tower, state_dict)


def load(name_or_path, device="cpu", download_root=None):
    """(model in eval mode, preprocess transform) of a CLIP ViT by name, file or folder
    (clip_load.read), as OpenAI's clip.load gives them; weights in fp32. model.spec says
    how the CLIP was trained to see images."""
    sd, spec, path = read(name_or_path, download_root)
    try:  # fp32: fp16 weights are cast as they are copied
        model = build_model(sd, spec.activation, spec.vision_heads, spec.text_heads)
    except (ValueError, RuntimeError) as e:  # named after the file
        raise type(e)(f"{path}: {e}") from None
    model.spec = spec
    model = model.to(device).eval()
    return model, image_transform(model.visual.input_resolution, spec)
