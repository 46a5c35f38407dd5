"""Regenerate tests/data/open_clip_fixtures.pt: small random CLIPs built by open_clip and by
transformers, with the outputs their own code computes, so that tests/test_open_clip.py can check
that clip_load reads their files exactly.

Dev-only: the tests never import this file, open_clip or transformers; they only read what it
writes. It needs open-clip-torch 3.3.0 and transformers from PyPI, installed outside the project's
environment, with the project's torch, e.g.

    python3 -m venv /tmp/refenv
    echo "$VIRTUAL_ENV/lib/python3.11/site-packages" \\
        > /tmp/refenv/lib/python3.11/site-packages/project_torch.pth
    /tmp/refenv/bin/pip install open-clip-torch==3.3.0 transformers
    /tmp/refenv/bin/python tests/make_open_clip_fixtures.py

Each CLIP: a 32-px image tower with 8-px patches, 64 wide, 2 blocks; a text tower 64 wide, 2
blocks, with OpenAI's vocabulary of 49,408 tokens, of which only the rows that the fixture's
prompts use are non-zero, and only those are stored (the tests rebuild the whole table). Every
parameter is random at a trained CLIP's scale, so that a loader that drops, transposes or
mis-assigns a tensor, or picks the wrong activation or head count, changes the outputs.

    open_clip_gelu       open_clip CLIP, nn.GELU (LAION-2B's and DataComp's activation)
    open_clip_quickgelu  open_clip CLIP, QuickGELU (DFN's, MetaCLIP's), as its config says
    open_clip_mean_std   open_clip CLIP, GELU, normalized with mean = std = 0.5 (LAION ViT-L/14's)
    transformers         transformers CLIPModel: config.json, model.safetensors, preprocessing
    open_clip_h14_heads  ViT-H/14's heads: an image tower 320 wide (1 block, MLP 80 wide) in 80-wide
                         heads, 4 where 64-wide ones would be 5; text heads 16 wide; QuickGELU and
                         DFN5B's resize of the whole image to the square (resize_mode squash)
    open_clip_mlp_ratio  ViT-bigG/14's MLP ratio 4.9231 in the image tower, g/14's 4.3637 in the
                         text tower (1 block each)
    transformers_heads   transformers CLIPModel with 16- and 32-wide heads, MLPs not 4x wide, GELU,
                         do_normalize false (1 block each)
"""
import dataclasses
import json
import os

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "data", "open_clip_fixtures.pt")
CLASSES = ["red square", "blue circle", "green cross"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}."]
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
VISION = dict(image_size=32, layers=2, width=64, patch_size=8)
TEXT = dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2)


def randomize_(model, seed):
    """Every parameter random at the scale of a trained CLIP's, and a float16 number (stored so:
    half the size, and exact when the tests read it back in float32)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            randn = torch.randn(p.shape, generator=gen)
            if "norm" in name or ".ln" in name or name.startswith("ln"):
                p.copy_(1.0 + 0.2 * randn if name.endswith("weight") else 0.1 * randn)
            elif name.endswith("bias"):
                p.copy_(0.05 * randn)
            elif "logit_scale" in name:
                p.fill_(3.9)  # exp = 49.4: not OpenAI's 100
            elif p.ndim < 2 or "embedding" in name:
                p.copy_(0.1 * randn)
            else:
                p.copy_(randn * p.shape[-1] ** -0.5 if p.ndim == 2 else
                        randn * p[0].numel() ** -0.5)
            p.copy_(p.half().float())


def keep_rows(model, key, ids):
    """Zero the token embedding's rows that no fixture prompt uses. -> (ids, their rows)"""
    weight = dict(model.named_parameters())[key]
    with torch.no_grad():
        rows = weight[ids].half()
        weight.zero_()
        weight[ids] = rows.float()
    return rows


def the_prompts():
    texts = [t.format(c) for c in CLASSES for t in TEMPLATES]
    tokens = open_clip.tokenize(texts)  # OpenAI's BPE, as the project's tokenizer
    return texts, tokens, torch.unique(tokens)


def head_of(encode_text, tokens):
    """The zero-shot head (D, K): each class's normalized prompt features averaged, normalized."""
    features = F.normalize(encode_text(tokens), dim=-1).view(len(CLASSES), len(TEMPLATES), -1)
    return F.normalize(features.mean(dim=1), dim=-1).t()


def picture():
    """A 40 x 48 RGB picture (uint8), so that the preprocessing resizes and crops."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)


def open_clip_fixture(quick_gelu, mean, std, seed, vision=VISION, text=TEXT,
                      resize_mode="shortest"):
    model_cfg = dict(embed_dim=32, quick_gelu=quick_gelu, vision_cfg=vision, text_cfg=text)
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(32, open_clip.model.CLIPVisionCfg(**vision),
                                 open_clip.model.CLIPTextCfg(**text), quick_gelu=quick_gelu).eval()
    randomize_(model, seed)
    texts, tokens, ids = the_prompts()
    rows = keep_rows(model, "token_embedding.weight", ids)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    preprocess = open_clip.image_transform(32, is_train=False, mean=mean, std=std,
                                           resize_mode=resize_mode)
    with torch.no_grad():
        outputs = dict(image_features=model.encode_image(images),
                       text_features=model.encode_text(tokens),
                       head=head_of(model.encode_text, tokens))
    state = {k: v.half() for k, v in model.state_dict().items() if k != "token_embedding.weight"}
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(mean), "std": list(std),
                                                         "interpolation": "bicubic",
                                                         "resize_mode": resize_mode}}
    return dict(format="open_clip", config=json.dumps(config), state=state,
                embedding=("token_embedding.weight", ids, rows), images=images, texts=texts,
                tokens=tokens, picture=torch.from_numpy(picture()),
                preprocessed=preprocess(Image.fromarray(picture())),
                logit_scale=model.logit_scale.exp().item(), **outputs)


def transformers_fixture(seed, vision=None, text=None, **processing):
    towers = dict(hidden_size=64, intermediate_size=256, num_attention_heads=1, num_hidden_layers=2,
                  hidden_act="quick_gelu")
    config = CLIPConfig(text_config=dict(towers, max_position_embeddings=77, vocab_size=49408,
                                         **(text or {})),
                        vision_config=dict(towers, image_size=32, patch_size=8, **(vision or {})),
                        projection_dim=32)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    randomize_(model, seed)
    texts, tokens, ids = the_prompts()
    key = "text_model.embeddings.token_embedding.weight"
    rows = keep_rows(model, key, ids)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    processor = CLIPImageProcessor(size={"shortest_edge": 32},
                                   crop_size={"height": 32, "width": 32}, **processing)

    def encode_text(t):
        return model.get_text_features(input_ids=t).pooler_output  # transformers 5: an output

    def encode_image(x):
        return model.get_image_features(pixel_values=x).pooler_output
    with torch.no_grad():
        try:
            image_features, text_features = encode_image(images), encode_text(tokens)
        except AttributeError:  # transformers 4 returns the tensors themselves
            def encode_text(t):
                return model.get_text_features(input_ids=t)
            image_features = model.get_image_features(pixel_values=images)
            text_features = encode_text(tokens)
        head = head_of(encode_text, tokens)
    preprocessed = processor(images=Image.fromarray(picture()), return_tensors="pt")
    state = {k: v.half() for k, v in model.state_dict().items() if k != key}
    return dict(format="transformers", config=config.to_json_string(),
                preprocessor_config=processor.to_json_string(), state=state,
                embedding=(key, ids, rows), images=images, texts=texts, tokens=tokens,
                picture=torch.from_numpy(picture()), preprocessed=preprocessed["pixel_values"][0],
                logit_scale=model.logit_scale.exp().item(), image_features=image_features,
                text_features=text_features, head=head)


def main():
    fixtures = {
        "open_clip_gelu": open_clip_fixture(False, OPENAI_MEAN, OPENAI_STD, seed=1),
        "open_clip_quickgelu": open_clip_fixture(True, OPENAI_MEAN, OPENAI_STD, seed=2),
        "open_clip_mean_std": open_clip_fixture(False, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), seed=3),
        "transformers": transformers_fixture(seed=4),
        "open_clip_h14_heads": open_clip_fixture(
            True, OPENAI_MEAN, OPENAI_STD, seed=5, resize_mode="squash",
            vision=dict(VISION, width=320, head_width=80, layers=1, mlp_ratio=0.25),
            text=dict(TEXT, heads=4)),
        "open_clip_mlp_ratio": open_clip_fixture(
            False, OPENAI_MEAN, OPENAI_STD, seed=6, vision=dict(VISION, layers=1, mlp_ratio=4.9231),
            text=dict(TEXT, layers=1, mlp_ratio=4.3637)),
        "transformers_heads": transformers_fixture(
            seed=7, vision=dict(num_attention_heads=4, intermediate_size=200, hidden_act="gelu",
                                num_hidden_layers=1),
            text=dict(num_attention_heads=2, intermediate_size=100, hidden_act="gelu",
                      num_hidden_layers=1),
            do_normalize=False),
    }
    # The keys open_clip's configs know, which clip_load must each build, take or refuse.
    fixtures["open_clip_keys"] = {
        "vision_cfg": [f.name for f in dataclasses.fields(open_clip.model.CLIPVisionCfg)],
        "text_cfg": [f.name for f in dataclasses.fields(open_clip.model.CLIPTextCfg)]}
    fixtures["about"] = (f"made by tests/make_open_clip_fixtures.py with open_clip "
                         f"{open_clip.__version__} and transformers "
                         f"{__import__('transformers').__version__}")
    torch.save(fixtures, OUT)
    print(f"wrote {OUT} ({os.path.getsize(OUT) / 1e6:.2f} MB): {fixtures['about']}")


if __name__ == "__main__":
    main()
