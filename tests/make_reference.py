"""Regenerate the reference fixtures in tests/data/ from OpenAI's own CLIP code.

Dev-only: the tests never import this file or OpenAI's package; they only read what it writes.
It needs OpenAI's `clip` package (PyPI: openai-clip==1.0.1), installed OUTSIDE the project env, e.g.

    pip download --no-deps openai-clip==1.0.1 -d /tmp/refpkgs
    pip install --no-deps --no-build-isolation --target /tmp/refsite \\
        /tmp/refpkgs/openai-clip-1.0.1.tar.gz
    # openai-clip 1.0.1 imports `packaging` via pkg_resources, which new setuptools dropped;
    # a two-line shim does:
    mkdir -p /tmp/refsite/pkg_resources && \\
        printf 'import packaging\\nimport packaging.version\\n' \\
        > /tmp/refsite/pkg_resources/__init__.py
    PYTHONPATH=/tmp/refsite python tests/make_reference.py

Writes (all small, < 2 MB together):
  ref_clip_fp16.pt     fp16 state dict of a tiny random ViT CLIP, OpenAI key names (torch.save)
  ref_clip_jit.pt      the same weights as a TorchScript archive, laid out like OpenAI's released
                       files (fp16 parameters + input_resolution/context_length/vocab_size entries
                       in state_dict())
  ref_clip_outputs.pt  fixed images/tokens and OpenAI's fp32 encode_image/encode_text/forward
                       outputs, computed on the fp32 upcast of the fp16 weights
  ref_tokens.json      clip.tokenize ids: per-dataset prompt hashes (prompts.json) and ~70
                       adversarial strings
"""
import hashlib
import json
import os

import numpy as np
import torch

import clip
from clip.model import CLIP

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "data")
PROMPTS_JSON = os.path.join(HERE, "..", "prompts.json")

# Tiny ViT CLIP. heads = width // 64 in OpenAI's code: vision gets 2 heads (tests the head split),
# text gets 2 layers (tests stacking);
# the 2 MB fixture budget (two copies of the weights) allows no more.
ARCH = dict(embed_dim=64, image_resolution=32, vision_layers=1, vision_width=128,
            vision_patch_size=8, context_length=77, vocab_size=256, transformer_width=64,
            transformer_heads=1, transformer_layers=2)
SEED = 1234


def randomize_(model, gen):
    """Give every parameter a non-trivial random value at the scale a trained CLIP would have,
    so a loader that drops, transposes or mis-assigns any tensor changes the outputs."""
    for name, p in model.named_parameters():
        shape = p.shape
        randn = torch.randn(shape, generator=gen)
        if name.startswith("ln") or ".ln" in name:  # LayerNorm gains around 1, biases around 0
            value = 1.0 + 0.2 * randn if name.endswith("weight") else 0.1 * randn
        elif name.endswith("bias"):
            value = 0.05 * randn
        elif name == "logit_scale":
            value = torch.tensor(3.9)               # exp = 49.4, deliberately not 100
        elif name in ("visual.proj", "text_projection"):
            value = shape[0] ** -0.5 * randn
        elif name.endswith("class_embedding") or name.endswith("positional_embedding"):
            value = 0.1 * randn
        elif name == "token_embedding.weight":
            value = 0.1 * randn
        else:                                       # conv1 and all linear weights: fan-in scaling
            fan_in = p[0].numel() if p.dim() > 1 else shape[0]
            value = fan_in ** -0.5 * randn
        with torch.no_grad():
            p.copy_(value)


def build_reference():
    gen = torch.Generator().manual_seed(SEED)
    model = CLIP(**ARCH).eval()
    randomize_(model, gen)
    fp16 = {k: v.detach().half() for k, v in model.state_dict().items()}
    # the fp32 upcast of the fp16 weights
    model.load_state_dict({k: v.float() for k, v in fp16.items()})
    return model, fp16, gen


def make_inputs(gen):
    images = torch.randn(3, 3, ARCH["image_resolution"], ARCH["image_resolution"], generator=gen)
    eot = ARCH["vocab_size"] - 1  # OpenAI reads the EOT position as the argmax id of each row
    tokens = torch.zeros(3, ARCH["context_length"], dtype=torch.long)
    for row, length in enumerate([5, 40, ARCH["context_length"]]):   # short, medium, exactly full
        tokens[row, 0] = eot - 1
        tokens[row, 1:length - 1] = torch.randint(1, eot - 1, (length - 2,), generator=gen)
        tokens[row, length - 1] = eot
    return images, tokens


def save_jit(model, images, tokens, path):
    """Trace in fp32 (so the archive runs after .float(), as OpenAI's do on CPU), then store fp16
    weights."""
    ref = CLIP(**ARCH).eval()
    ref.load_state_dict(model.state_dict())
    # plain ints in OpenAI's class, tensor entries in their archives
    del ref.context_length, ref.vocab_size
    ref.register_buffer("input_resolution", torch.tensor(ARCH["image_resolution"]))
    ref.register_buffer("context_length", torch.tensor(ARCH["context_length"]))
    ref.register_buffer("vocab_size", torch.tensor(ARCH["vocab_size"]))
    with torch.no_grad():
        traced = torch.jit.trace_module(
            ref, {"forward": (images, tokens), "encode_image": (images,), "encode_text": (tokens,)},
            # OpenAI's attention re-assigns its mask attribute, which upsets the checker
            check_trace=False)
    traced.half()
    traced.save(path)


def token_hash(ids):
    return hashlib.sha256(np.ascontiguousarray(ids.numpy().astype("<i8")).tobytes()).hexdigest()


def strip_padding(row):
    ids = row.tolist()
    while ids and ids[-1] == 0:
        ids.pop()
    return ids


ADVERSARIAL = [
    "", " ", "   ", "a photo of a dog.", "A Photo Of A DOG.", "HELLO WORLD", "MiXeD CaSe ToKeNs",
    "café", "naïve résumé", "Ångström", "São Paulo", "Zürich über Straße", "crème brûlée",
    "北京欢迎你", "東京タワー", "한국어 텍스트", "مرحبا بالعالم", "שלום", "Привет, мир", "ελληνικά",
    "👍", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "I ❤️ NY", "🐶🐱🐭", "a photo of a 🍕.",
    "schÃ¶n", "Ã©tÃ©", "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.", "â€œquotedâ€\x9d",
    "fish &amp; chips", "1 &lt; 2", "it&#39;s", "double &amp;amp; escaped",
    "&quot;hi&quot; <b>bold</b> &amp;",
    "it's", "don't", "we're", "they've", "I'm", "you'll", "he'd", "IT'S", "DON'T", "Pat'S",
    "rock 'n' roll",
    "1234567", "3.14", "1,000", "2023-01-01", "v1.0.1", "x86_64", "abc123def",
    "!!!???...", "--__--", "((([[[{{{}}}]]])))", "@#$%^&*", "a.b.c", "e.g.", "~~~///\\\\\\",
    "tab\tseparated\twords", "new\nline\r\nwindows", "multiple     spaces",
    "  leading and trailing  ",
    "\u00a0non-breaking\u00a0space", "zero\u200bwidth",
    "<|startoftext|>", "<|endoftext|>", "before <|endoftext|> after",
    "<|startoftext|>hi<|endoftext|>",
    "ﬁne ligature", "ｆｕｌｌｗｉｄｔｈ", "x²+y²", "½ cup",
]


def tokenizer_fixtures():
    cases = [{"text": t, "context_length": 77} for t in ADVERSARIAL]
    # exactly at the limit (75 BPE tokens + SOT + EOT = 77), one past it, and long texts
    cases += [{"text": " ".join(["a"] * 75), "context_length": 77},
              {"text": " ".join(["a"] * 76), "context_length": 77},
              {"text": "a photo of a " * 30, "context_length": 77},
              {"text": "北京欢迎你" * 40, "context_length": 77},
              {"text": "👨‍👩‍👧‍👦" * 30, "context_length": 77},
              {"text": "a photo of a dog.", "context_length": 8},
              {"text": "a photo of a big red dog.", "context_length": 8},
              {"text": "a photo of a dog.", "context_length": 100}]
    for case in cases:
        try:
            clip.tokenize(case["text"], context_length=case["context_length"])
            case["too_long"] = False
        except RuntimeError:
            case["too_long"] = True
        ids = clip.tokenize(case["text"], context_length=case["context_length"], truncate=True)[0]
        case["ids"] = strip_padding(ids)
    at_limit = cases[len(ADVERSARIAL)]
    assert len(at_limit["ids"]) == 77 and not at_limit["too_long"], (
        "the at-limit string is not at the limit")
    assert cases[len(ADVERSARIAL) + 1]["too_long"]

    with open(PROMPTS_JSON) as f:
        datasets = json.load(f)["datasets"]
    prompt_hashes = {}
    for name, d in datasets.items():
        texts = [t.format(c) for c in d["classes"] for t in d["templates"]]   # class-major
        ids = clip.tokenize(texts)
        prompt_hashes[name] = {
            "count": len(texts), "sha256": token_hash(ids),
            "texts_sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest()}
    return {"about": ("OpenAI clip.tokenize (openai-clip 1.0.1) reference ids; "
                      "made by tests/make_reference.py"),
            "datasets": prompt_hashes, "strings": cases}


def main():
    os.makedirs(OUT, exist_ok=True)
    model, fp16, gen = build_reference()
    images, tokens = make_inputs(gen)
    torch.save(fp16, os.path.join(OUT, "ref_clip_fp16.pt"))
    save_jit(model, images, tokens, os.path.join(OUT, "ref_clip_jit.pt"))
    with torch.no_grad():
        image_features = model.encode_image(images)
        text_features = model.encode_text(tokens)
        logits_per_image, _ = model(images, tokens)
        # sanity: the archive holds the same weights and runs like the module it came from
        archive = torch.jit.load(os.path.join(OUT, "ref_clip_jit.pt"), map_location="cpu").float()
        assert torch.allclose(archive.encode_image(images), image_features, atol=1e-5)
        assert torch.allclose(archive.encode_text(tokens), text_features, atol=1e-5)
    torch.save({"images": images, "tokens": tokens, "image_features": image_features,
                "text_features": text_features, "logits_per_image": logits_per_image,
                "arch": ARCH}, os.path.join(OUT, "ref_clip_outputs.pt"))
    with open(os.path.join(OUT, "ref_tokens.json"), "w") as f:
        json.dump(tokenizer_fixtures(), f, ensure_ascii=True, indent=0)
    for name in sorted(os.listdir(OUT)):
        print(f"{name}: {os.path.getsize(os.path.join(OUT, name)) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
