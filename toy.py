"""A synthetic toy world for running MUST end to end on a CPU, offline.

Images show one shape (the class) with a colour, size, position and background; captions describe
them ("a photo of a small red triangle on a striped background"). Two domains:

- source: filled flat shapes, the palette and backgrounds named in the captions. A tiny CLIP (our
  clip_model.py, small width/depth, 32 px) is pretrained contrastively on source image-caption pairs; its
  weights are committed (toy_clip.pt) and `python toy.py pretrain` remakes them bit for bit.
- target: the same kind of scenes in another rendering style: a dark 1-px ink outline around the shape
  and film grain, and close-ups (every object drawn large; the source mixes three sizes). Its unlabeled
  train split is what MUST adapts on; its labeled test split is what we report, and its labeled val split
  (other images) is what choices are made on. The target is never seen during pretraining.

Everything is deterministic from a seed and generated on the fly (a few thousand images a second).
"""
import argparse
import hashlib
import inspect
import io
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data

SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart", "crescent", "arrow"]
# name -> RGB in [0, 1], the colours captions talk about
COLORS = {
    "red": (0.85, 0.12, 0.10), "green": (0.15, 0.65, 0.20), "blue": (0.12, 0.25, 0.85),
    "yellow": (0.95, 0.85, 0.10), "purple": (0.55, 0.15, 0.70), "orange": (0.95, 0.50, 0.05),
    "white": (0.95, 0.95, 0.95), "black": (0.08, 0.08, 0.08),
}
# Shape radius as a fraction of the image side. Scenes are object-centric like ImageNet photos (large, near the
# centre), so the paper's strong view (RandomResizedCrop 0.3-1, translations) mostly keeps the object in frame.
SIZES = {"small": 0.22, "medium": 0.29, "large": 0.36}
TARGET_SIZE = "large"  # target photos are close-ups (why: the README's toy-world section, point 1)
BACKGROUNDS = ["plain", "gradient", "striped", "dotted"]
CAPTION_TEMPLATES = ["a photo of a {}", "a picture of a {}", "an image of a {}", "a {}"]
# zero-shot prompts (the toy world's "prompt engineering", as CLIP's ImageNet templates): phrased like captions
TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "a {}.", "a photo of a small {}.", "a photo of a large {}."]
IMAGE_SIZE = 32
RENDER_SCALE = 2  # draw at 2x and average-pool: cheap anti-aliasing

# Splits: seeds are offsets so that no two splits share an image.
# train: 10,000 images x 10 epochs did as well as 30,000 x 5 at mask ratio 0.1 (README, the toy world's history)
SPLIT_SIZES = {"source": 50000, "train": 30000, "val": 2000, "test": 2000}
SPLIT_SEEDS = {"source": 0, "train": 1, "test": 2, "val": 3}  # val: labeled target, for choosing; test: reported
# The pretrained tiny CLIP, committed (3.8 MB): `python toy.py pretrain --out toy_clip.pt` remakes it bit for bit.
WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_clip.pt")
CHUNK = 1000  # images drawn per seed; rendering is vectorized over a chunk


# ----------------------------------------------------------------------------------------------
# Renderer


def _shape_mask(shape, u, v):
    """Inside-test of a unit-size shape at local coordinates (u, v) (arrays, y grows downward)."""
    r = np.sqrt(u * u + v * v)
    if shape == "circle":
        return r < 0.95
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.8
    if shape == "triangle":  # upward, equilateral-ish
        return (v < 0.7) & (v > -0.95 + 1.9 * np.abs(u) * 0.95)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) < 1.0
    if shape == "star":  # five points
        theta = np.arctan2(u, -v)
        return r < 0.45 + 0.55 * np.abs(np.cos(2.5 * theta)) ** 3
    if shape == "cross":
        return ((np.abs(u) < 0.3) & (np.abs(v) < 0.95)) | ((np.abs(v) < 0.3) & (np.abs(u) < 0.95))
    if shape == "ring":
        return (r < 0.95) & (r > 0.55)
    if shape == "heart":
        x, y = u * 1.15, -v * 1.15 + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 < 0
    if shape == "crescent":
        return (r < 0.95) & ((u - 0.45) ** 2 + (v + 0.1) ** 2 > 0.72 ** 2)
    if shape == "arrow":  # pointing right
        shaft = (u > -0.95) & (u < 0.15) & (np.abs(v) < 0.25)
        head = (u >= 0.15) & (u < 0.95) & (np.abs(v) < 0.75 * (0.95 - u) / 0.8)
        return shaft | head
    raise ValueError(f"unknown shape {shape!r}")


def sample_attributes(n, seed):
    """Draw the latent attributes of n images; shape/colour/size/background are independent."""
    rng = np.random.default_rng(seed)
    a = {
        "label": rng.integers(0, len(SHAPES), n),
        "color": rng.integers(0, len(COLORS), n),
        "size": rng.integers(0, len(SIZES), n),
        "background": rng.integers(0, len(BACKGROUNDS), n),
        "angle": rng.uniform(-0.35, 0.35, n),  # radians; small, so a square never becomes a diamond
        "jitter": rng.uniform(-1, 1, (n, 2)),
        "mirror": rng.uniform(0, 1, n) < 0.5,  # arrows point left or right, crescents open either way
        "light": rng.uniform(0, 1, (n, 2)),  # exposure: contrast and brightness of the photo
        "bg_rgb": rng.uniform(0, 1, (n, 2, 3)),  # two background colours (stripes, dots, gradient)
        "bg_freq": rng.uniform(0.5, 1.5, n),
        "bg_phase": rng.uniform(0, 2 * math.pi, n),
        "noise_seed": rng.integers(0, 2 ** 31, n),
        # captions, like web alt-texts, name only some attributes: keep size / colour / background?
        "mention": rng.uniform(0, 1, (n, 3)) < 0.6,
        "caption_template": rng.integers(0, len(CAPTION_TEMPLATES), n),
    }
    return a


def _backgrounds(a, yy, xx, res):
    """Source backgrounds (n, res, res, 3): plain, gradient, striped, dotted (two muted colours)."""
    n = len(a["label"])
    c = (0.35 + 0.3 * a["bg_rgb"]).astype(np.float32)  # muted, so the shape stays the salient thing
    f = (a["bg_freq"] * 2 * math.pi * 6 / res).astype(np.float32)[:, None, None]
    ph = a["bg_phase"].astype(np.float32)[:, None, None]
    t = np.zeros((n, res, res), np.float32)  # 0 -> first colour, 1 -> second colour
    for kind, pattern in [(1, lambda i: np.broadcast_to((xx + yy) / (2 * res), (len(i), res, res))),
                          (2, lambda i: np.sin(f[i] * (xx + 0.3 * yy) + ph[i]) > 0),
                          (3, lambda i: np.sin(f[i] * xx + ph[i]) * np.sin(f[i] * yy + ph[i]) > 0.5)]:
        i = np.nonzero(a["background"] == kind)[0]
        t[i] = pattern(i)
    t = t[..., None]
    return c[:, None, None, 0] * (1 - t) + c[:, None, None, 1] * t


def _erode(mask, width):
    """Binary erosion with a square of side 2*width+1: the inside of an outline."""
    m = torch.from_numpy(mask.astype(np.float32))[:, None]
    inner = 1 - F.max_pool2d(1 - m, 2 * width + 1, stride=1, padding=width)
    return inner[:, 0].numpy() > 0.5


def render(a, domain, res=IMAGE_SIZE):
    """Render attributes to uint8 images (n, res, res, 3)."""
    n = len(a["label"])
    R = res * RENDER_SCALE
    yy, xx = np.mgrid[0:R, 0:R].astype(np.float32) + 0.5
    size = (np.array(list(SIZES.values()))[a["size"]] * R).astype(np.float32)
    # keep the whole shape inside the frame
    margin = 0.8 * (R / 2 - size - 1)
    cx = (R / 2 + a["jitter"][:, 0] * margin).astype(np.float32)
    cy = (R / 2 + a["jitter"][:, 1] * margin).astype(np.float32)
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    ang = a["angle"].astype(np.float32)
    ca, sa = np.cos(ang)[:, None, None], np.sin(ang)[:, None, None]
    u = (ca * dx + sa * dy) / size[:, None, None] * np.where(a["mirror"], -1, 1)[:, None, None]
    v = (-sa * dx + ca * dy) / size[:, None, None]
    mask = np.zeros((n, R, R), bool)
    for k, shape in enumerate(SHAPES):
        idx = np.nonzero(a["label"] == k)[0]
        if len(idx):
            mask[idx] = _shape_mask(shape, u[idx], v[idx])

    if domain == "source":
        img = _backgrounds(a, yy, xx, R)
        fg = np.array(list(COLORS.values()), np.float32)[a["color"]]
        idx = np.nonzero(mask)
        img[idx] = fg[idx[0]]
    elif domain == "target":
        img = _target_style(a, mask, yy, xx, R)
    else:
        raise ValueError(f"unknown domain {domain!r}; expected 'source' or 'target'")
    contrast = 0.5 + 0.8 * a["light"][:, 0, None, None, None]
    brightness = 0.4 * a["light"][:, 1, None, None, None] - 0.2
    img = (img - 0.5) * contrast.astype(np.float32) + 0.5 + brightness.astype(np.float32)
    img = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(0, 3, 1, 2)
    img = F.avg_pool2d(img, RENDER_SCALE).permute(0, 2, 3, 1).numpy()
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _target_style(a, mask, yy, xx, R):
    """Target rendering of the same kind of scenes: a dark 1-px ink outline around the shape (a cartoon) and
    film grain, on close-ups (target_scene). The tiny CLIP's zero-shot accuracy drops from 83% (source) to 62%,
    while a linear probe on its target features reaches 87%: the shift hurts the text alignment more than the
    features. Other candidate factors (palette, texture fill, clutter, noisy backgrounds) broke the features
    themselves, leaving self-training nothing to work with (measurements in the README's toy-world section)."""
    img = _backgrounds(a, yy, xx, R)
    fg = np.array(list(COLORS.values()), np.float32)[a["color"]]
    idx = np.nonzero(mask)
    img[idx] = fg[idx[0]]
    idx = np.nonzero(mask & ~_erode(mask, RENDER_SCALE))  # 1 px at the output resolution
    img[idx] = 0.1
    r = R // RENDER_SCALE
    grain = np.stack([np.random.default_rng(s).standard_normal((r, r, 3), np.float32) for s in a["noise_seed"]])
    return img + 0.03 * grain.repeat(RENDER_SCALE, 1).repeat(RENDER_SCALE, 2)


def caption(a, i):
    """Source caption of image i, e.g. 'a photo of a small red triangle on a striped background'.

    The shape is always named; size, colour and background each only sometimes."""
    size, color, bg = a["mention"][i]
    words = ([list(SIZES)[a["size"][i]]] if size else []) + ([list(COLORS)[a["color"][i]]] if color else [])
    thing = " ".join(words + [SHAPES[a["label"][i]]])
    if bg:
        thing += f" on a {BACKGROUNDS[a['background'][i]]} background"
    text = CAPTION_TEMPLATES[a["caption_template"][i]].format(thing)
    return (" " + text).replace(" a o", " an o").replace(" a a", " an a")[1:]  # "an orange", "an arrow"


def target_scene(a, domain):
    """The target domain's scenes: close-ups, every object drawn at TARGET_SIZE (the source mixes all sizes)."""
    if domain == "target":
        a["size"][:] = list(SIZES).index(TARGET_SIZE)
    return a


def render_split(split, n=None, start=0):
    """Images (n, 32, 32, 3) uint8 and labels of a split: 'source', or 'train', 'val', 'test' (target).

    Image i of a split is the same whatever n/start are: attributes come from per-chunk seeds."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SIZES)}")
    n = SPLIT_SIZES[split] - start if n is None else n
    domain = "source" if split == "source" else "target"
    images, labels = [], []
    first, last = start // CHUNK, (start + n - 1) // CHUNK
    for chunk in range(first, last + 1):
        a = target_scene(sample_attributes(CHUNK, [SPLIT_SEEDS[split], chunk]), domain)
        lo, hi = max(start - chunk * CHUNK, 0), min(start + n - chunk * CHUNK, CHUNK)
        a = {k: v[lo:hi] for k, v in a.items()}
        images.append(render(a, domain))
        labels.append(a["label"])
    return np.concatenate(images), np.concatenate(labels)


# MUST's hyperparameters for the toy world (train.py reads them through data.hparams('toy', ...)), in the
# roles of the paper's Table 10. Chosen for a ~6 min CPU run (measurements in the README's toy-world section).
HPARAMS = dict(
    mask_unit=8,  # px = one 8 px patch: 16 units per 32 px image
    mask_ratio=0.0625,  # 1 of the 16 units; chosen on the val split over Table 10's 0.1 (2 units; ImageNet's 0.3: 5)
    conf_threshold=0.9,  # at 0.7, 30-40% of the passing pseudo-labels were wrong; self-training peaked early
    lambda_reg=1.0,
    lambda_align=0.2,
    ema_mu0=0.99,
    ema_mu_n=2000,
    base_lr=2e-4,  # lr 1e-4 at batch 128
    epochs=5,  # 1,170 steps over the 30,000 target images
    eval_freq=1,
    batch_size=128,
    strong_view="light",  # data.strong_view: what the toy CLIP was pretrained to read (PRETRAIN["augment"])
)

# ----------------------------------------------------------------------------------------------
# Tiny CLIP pretraining on source image-caption pairs

PRETRAIN = dict(  # ~7.5 min on 2 CPU cores (0.8M-param image tower, 17 tokens per image)
    model=dict(embed_dim=64, image_resolution=IMAGE_SIZE, vision_layers=4, vision_width=128, vision_patch_size=8,
               context_length=20, vocab_size=49408, transformer_width=64, transformer_layers=2),
    steps=2000, batch_size=128, lr=1e-3, weight_decay=0.1, warmup=200, seed=0,
    augment="light",  # data.strong_view applied to every source image, like a web CLIP's crops (None: off)
)


def to_tensor(images):
    """uint8 (n, H, W, 3) -> CLIP-normalized float (n, 3, H, W), as clip_model's preprocess would give."""
    import clip_model
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(clip_model.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(clip_model.CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def caption_tokens(a, context_length, cache):
    """Token ids (n, context_length) of the source captions of a batch; `cache` maps caption -> ids."""
    import clip_model
    texts = [caption(a, i) for i in range(len(a["label"]))]
    missing = sorted({t for t in texts if t not in cache})
    if missing:
        for t, ids in zip(missing, clip_model.tokenize(missing, context_length=context_length)):
            cache[t] = ids
    return torch.stack([cache[t] for t in texts])


def clip_loss(model, images, tokens):
    """Symmetric InfoNCE over the batch with CLIP's learnable temperature."""
    logits_per_image, logits_per_text = model(images, tokens)
    target = torch.arange(len(images))
    return (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_text, target)) / 2


def pretrain(out_path=None, log_every=100):
    """Contrastive pretraining (symmetric InfoNCE, learnable temperature) of a tiny CLIP on freshly rendered
    source image-caption batches, with the PRETRAIN recipe; returns its slim() state dict (saved to out_path).

    Deterministic: batch s is drawn from seed [1000 + PRETRAIN['seed'], s] (no overlap with the splits).
    AdamW, linear warmup, cosine decay, CLIP's clamp of the temperature at 100."""
    import clip_model
    import data
    from tqdm import tqdm
    cfg = PRETRAIN
    steps, batch_size, seed = cfg["steps"], cfg["batch_size"], cfg["seed"]
    torch.manual_seed(seed)
    model = clip_model.tiny_clip(**cfg["model"])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"], betas=(0.9, 0.98), eps=1e-6)
    cache = {}
    view = data.strong_view(IMAGE_SIZE, cfg["augment"]) if cfg["augment"] else None  # torch RNG: deterministic
    bar = tqdm(range(steps), desc="pretrain tiny CLIP", mininterval=2)
    for step in bar:
        lr = cfg["lr"] * min(1.0, (step + 1) / cfg["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        a = sample_attributes(batch_size, [1000 + seed, step])
        images = render(a, "source")
        if view is not None:
            images = np.stack([np.asarray(view(Image.fromarray(x))) for x in images])
        images = to_tensor(images)
        tokens = caption_tokens(a, model.context_length, cache)
        loss = clip_loss(model, images, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's clamp
        if step % log_every == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    state = slim(model.state_dict())
    if out_path:
        save_exact(state, out_path)
    return state


def toy_token_ids(context_length):
    """Every token id a toy caption or prompt can contain (a few dozen of CLIP's 49,408)."""
    import clip_model
    sizes, colors, backgrounds = [[""] + [w + " " for w in ws] for ws in (SIZES, COLORS)] + \
        [[""] + [f" on a {b} background" for b in BACKGROUNDS]]
    texts = [t.format(f"{s}{c}{k}{b}") for t in CAPTION_TEMPLATES for s in sizes for c in colors for k in SHAPES
             for b in backgrounds]
    texts += [t.format(k) for t in TEMPLATES for k in SHAPES]
    return torch.unique(clip_model.tokenize(texts, context_length=context_length, truncate=True))


def slim(state):
    """A pretrained tiny CLIP state dict without the token-embedding rows that no toy text uses: those rows are
    most of the parameters (49,408 × width) and never receive a gradient. Adds the recipe hash it was made by."""
    out = {k: v for k, v in state.items() if k != "token_embedding.weight"}
    weight = state["token_embedding.weight"]
    ids = toy_token_ids(state["positional_embedding"].shape[0])
    out.update({"token_embedding.ids": ids, "token_embedding.rows": weight[ids].clone(),
                "token_embedding.vocab_size": weight.shape[0], "recipe": recipe_hash()})
    return out


def unslim(state):
    """slim()'s inverse: a state dict clip_model.build_model loads (unused token rows are zero)."""
    state = dict(state)
    ids, rows = state.pop("token_embedding.ids"), state.pop("token_embedding.rows")
    weight = rows.new_zeros(state.pop("token_embedding.vocab_size"), rows.shape[1])
    weight[ids] = rows
    state.pop("recipe")
    state["token_embedding.weight"] = weight
    return state


def save_exact(obj, path):
    """torch.save whose bytes depend only on obj (a path would name the archive's inner folder), written
    atomically, so that two runs of the same recipe give files with the same SHA-256."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buffer.getvalue())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Dataset API for train.py / data.py (same contract as data.build_dataset)

class ToyDataset(torch.utils.data.Dataset):
    """Rendered images of one split as PIL images through `transform`; item = (transform(img), label).

    split 'train' is the unlabeled target train split (labels only for logging pseudo-label accuracy),
    'val' / 'test' the labeled target splits, 'source' the pretraining domain (for diagnostics)."""

    classnames = SHAPES
    templates = TEMPLATES

    def __init__(self, images, labels, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), int(self.labels[i])


# Source text of the functions that decide pixels and captions, read once at import: the cache keys describe the
# code this process runs, even if toy.py is edited on disk meanwhile (a long ablation would otherwise re-pretrain).
_SOURCE = {f: inspect.getsource(f) for f in (_shape_mask, sample_attributes, _backgrounds, _erode, render,
                                             _target_style, caption, target_scene, render_split)}


def source_hash():
    """Short hash of everything that decides the source images and captions (keys the pretrained tiny CLIP)."""
    h = hashlib.sha256()
    for f in (_shape_mask, sample_attributes, _backgrounds, render, caption):
        h.update(_SOURCE[f].encode())
    h.update(repr((SHAPES, CAPTION_TEMPLATES, COLORS, SIZES, BACKGROUNDS, IMAGE_SIZE, RENDER_SCALE)).encode())
    return h.hexdigest()[:10]


def world_hash():
    """Short hash of everything that decides the pixels of the splits, to key their caches."""
    h = hashlib.sha256(source_hash().encode())
    for f in (_erode, _target_style, target_scene, render_split):
        h.update(_SOURCE[f].encode())
    h.update(repr((SPLIT_SIZES, SPLIT_SEEDS, CHUNK, TARGET_SIZE)).encode())
    return h.hexdigest()[:10]


def load_split(split, cache_dir=None):
    """(images, labels) of a whole split, rendered once and cached as .npz under cache_dir if given."""
    path = os.path.join(cache_dir, f"toy_{split}_{world_hash()}.npz") if cache_dir else None
    if path and os.path.isfile(path):
        with np.load(path) as z:
            return z["images"], z["labels"]
    images, labels = render_split(split)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + f".tmp{os.getpid()}.npz"
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, path)  # atomic: concurrent runs never read a half-written file
    return images, labels


def build_dataset(root, split, transform=None):
    """data.build_dataset's contract for the toy world; root = cache directory (None: render in memory)."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"toy split must be 'train' (unlabeled target), 'val' or 'test' (labeled target) or "
                         f"'source', not {split!r}")
    return ToyDataset(*load_split(split, root), transform)


DEFAULT_CACHE = os.path.join("out", "toy_cache")  # --data toy's --data-root when none is given


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def recipe_hash():
    """Short hash of the source world and the PRETRAIN recipe: which tiny CLIP a weights file is."""
    return hashlib.sha256((source_hash() + repr(sorted(PRETRAIN.items()))).encode()).hexdigest()[:10]


def pretrained_path(cache_dir):
    """Where ensure_pretrained keeps the tiny CLIP state dict (OpenAI key format) that train.py loads."""
    return os.path.join(cache_dir, f"toy_clip_{recipe_hash()}.pt")


def ensure_pretrained(cache_dir):
    """Path to the tiny CLIP pretrained on the source domain, as a plain state dict under cache_dir.

    Unpacks the committed toy_clip.pt (made by `python toy.py pretrain --out toy_clip.pt`); if the world or the
    recipe was edited since, so that the committed weights are someone else's model, pretrains afresh (~7 min)."""
    path = pretrained_path(cache_dir)
    if os.path.isfile(path):
        return path
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True) if os.path.isfile(WEIGHTS) else None
    if state is None or state["recipe"] != recipe_hash():
        print(f"{WEIGHTS} does not match this world and PRETRAIN recipe: pretraining the tiny CLIP on source "
              f"image-caption pairs (once; cached at {path})")
        state = pretrain()
    save_exact(unslim(state), path)
    return path


data.register_dataset("toy", build_dataset, HPARAMS, lambda root: ensure_pretrained(root or DEFAULT_CACHE))


# ----------------------------------------------------------------------------------------------
# Measurements: why adaptation helps (or not)

@torch.no_grad()
def image_features(visual, images, batch_size=500):
    """L2-normalized image embeddings (n, D) of uint8 images."""
    out = [F.normalize(visual(to_tensor(images[i:i + batch_size])), dim=-1) for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def probe(visual, head, logit_scale, cache_dir=None, n_train=5000, taus=(0.5, 0.7, 0.9)):
    """Accuracy of the classifier `head` (the zero-shot head for a CLIP, the trained W for a MUST checkpoint)
    on source and target, and how much the target features know with labels.

    kNN (k=10, cosine) and a linear probe are fit on labeled target-train features and scored on the
    target test split: they bound what adapting the classifier alone could reach. Confidence stats say
    how many pseudo-labels a threshold τ would pass, and how accurate those are."""
    visual = visual.eval()
    r = {}
    xs, ys = render_split("source", 2000)
    r["head_source"] = _acc((image_features(visual, xs) @ head).argmax(1), ys)
    xtr, ytr = load_split("train", cache_dir)
    xte, yte = load_split("test", cache_dir)
    xtr, ytr = xtr[:n_train], torch.from_numpy(ytr[:n_train])
    ftr, fte, yte = image_features(visual, xtr), image_features(visual, xte), torch.from_numpy(yte)
    prob = (logit_scale * fte @ head).softmax(1)
    conf, pred = prob.max(1)
    r["head_target"] = _acc(pred, yte)
    r["predicted_class_share"] = _shares(pred, head.shape[1])
    for tau in taus:
        m = conf > tau
        r[f"pass_{tau}"] = m.float().mean().item() * 100
        r[f"acc_pass_{tau}"] = _acc(pred[m], yte[m]) if m.any() else float("nan")
    nn_idx = (fte @ ftr.T).topk(10, dim=1).indices
    r["knn10_target"] = _acc(torch.mode(ytr[nn_idx], dim=1).values, yte)
    with torch.enable_grad():
        torch.manual_seed(0)
        linear = torch.nn.Linear(ftr.shape[1], head.shape[1])
        opt = torch.optim.Adam(linear.parameters(), lr=1e-2)
        for _ in range(300):
            loss = F.cross_entropy(linear(ftr * logit_scale), ytr)
            opt.zero_grad()
            loss.backward()
            opt.step()
    r["linear_probe_target"] = _acc(linear(fte * logit_scale).argmax(1), yte)
    return r


def _acc(pred, labels):
    return (torch.as_tensor(pred) == torch.as_tensor(labels)).float().mean().item() * 100


def _shares(pred, num_classes):
    """Share of predictions per class (a list summing to 1)."""
    return (torch.bincount(pred, minlength=num_classes).float() / len(pred)).tolist()


def probe_clip(path, cache_dir=None):
    """probe() for a pretrained tiny CLIP state dict: its zero-shot head and learned temperature."""
    import clip_model
    import prompts
    model, _ = clip_model.load(path)
    head = prompts.zero_shot_head(model, SHAPES, TEMPLATES)
    return probe(model.visual, head, model.logit_scale.exp().item(), cache_dir)


def probe_must(checkpoint, which="teacher", cache_dir=None, mask_ratio=None):
    """probe() for a MUST checkpoint written by train.py (its trained classifier and image tower)."""
    import must
    model, _ = must.load_checkpoint(checkpoint, which)
    model.eval()
    head = model.classifier.weight.detach().t()  # as MUSTModel uses it: s · normalize(v) @ W
    r = probe(model.visual, head, float(model.logit_scale), cache_dir)
    r.update(masked_view_accuracy(model, cache_dir, mask_ratio))
    return r


@torch.no_grad()
def masked_view_accuracy(model, cache_dir=None, mask_ratio=None, batch_size=500, seed=0):
    """Target test accuracy and class shares of a MUSTModel on masked views: the student's input in training
    (HPARAMS' mask unit, mask_ratio or HPARAMS', its own [MSK]; one fixed draw of masks from `seed`), without
    augmentation."""
    import data
    xte, yte = load_split("test", cache_dir)
    ratio = HPARAMS["mask_ratio"] if mask_ratio is None else mask_ratio
    gen = data.MaskGenerator(IMAGE_SIZE, HPARAMS["mask_unit"], model.visual.patch_size, ratio)
    torch.manual_seed(seed)
    masks = torch.stack([gen() for _ in range(len(xte))])  # (n, N) bool
    pred = torch.cat([model(to_tensor(xte[i:i + batch_size]), masks[i:i + batch_size])[0].argmax(1)
                      for i in range(0, len(xte), batch_size)])
    return {"head_target_masked": _acc(pred, yte),
            "masked_class_share": _shares(pred, len(SHAPES))}


@torch.no_grad()
def zero_shot_accuracy(split, cache_dir):
    """Top-1 (%) of the tiny CLIP's zero-shot head on a labeled split ('val' or 'test')."""
    import clip_model
    import prompts
    model, _ = clip_model.load(ensure_pretrained(cache_dir))
    head = prompts.zero_shot_head(model, SHAPES, TEMPLATES)
    x, y = load_split(split, cache_dir)
    return _acc((image_features(model.visual, x) @ head).argmax(1), y)


@torch.no_grad()
def checkpoint_accuracy(checkpoint, split, cache_dir=None):
    """Top-1 (%) of a train.py checkpoint's (student, teacher) on a labeled split ('val' or 'test')."""
    import must
    x, y = load_split(split, cache_dir)
    accs = []
    for which in ("student", "teacher"):
        model, _ = must.load_checkpoint(checkpoint, which)
        accs.append(_acc(model.classify(image_features(model.visual, x)).argmax(1), y))  # = model(x), batched
    return tuple(accs)


# ----------------------------------------------------------------------------------------------
# Ablation (paper Tables 5 and 7) through train.py's main

ABLATION = [  # (row, run directory, train.py flags)
    ("self-training only", "st", ["--no-reg", "--no-mim", "--no-align"]),
    ("+ fairness (L_reg)", "st_reg", ["--no-mim", "--no-align"]),
    ("+ MIM (L_mim)", "st_reg_mim", ["--no-align"]),
    ("+ alignment = MUST", "must", []),
]


def ablation(seeds, cache_dir, out_dir, extra=()):
    """Run each ablation row for each seed with train.py; print zero-shot / student / teacher, mean ± spread, on
    the target test split (what is reported) and the target val split (what choices are made on)."""
    import train
    test, val = {}, {}
    for name, short, flags in ABLATION:
        for seed in seeds:
            run_dir = os.path.join(out_dir, f"{short}_seed{seed}")  # a finished run is resumed, not redone
            print(f"\n=== {name}, seed {seed} -> {run_dir}")
            evals = train.main(["--data", "toy", "--data-root", cache_dir, "--out-dir", run_dir, "--seed", str(seed),
                                *flags, *extra])
            test.setdefault(name, []).append((evals[-1]["student_acc"], evals[-1]["teacher_acc"]))
            val.setdefault(name, []).append(checkpoint_accuracy(os.path.join(run_dir, train.CHECKPOINT), "val",
                                                                cache_dir))
    zero_shot = {"test": evals[0]["student_acc"], "val": zero_shot_accuracy("val", cache_dir)}
    lines = []
    for split, rows in (("test", test), ("val", val)):
        lines += [f"toy world, target {split} top-1 (%), final epoch, mean ± std over seeds {list(seeds)}",
                  f"{'':24s} {'student':>15s} {'teacher':>15s}",
                  f"{'zero-shot':24s} {zero_shot[split]:>15.1f} {zero_shot[split]:>15.1f}"]
        for name, vals in rows.items():
            v = np.array(vals)
            lines.append(f"{name:24s} {_ms(v[:, 0]):>15s} {_ms(v[:, 1]):>15s}")
        lines.append("")
    table = "\n".join(lines).rstrip()
    print("\n" + table)
    with open(os.path.join(out_dir, "ablation.txt"), "w") as f:
        f.write(table + "\n")
    return table


def _ms(v):
    return f"{v.mean():.1f} ± {v.std():.1f}" if len(v) > 1 else f"{v.mean():.1f}"


# ----------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    p = argparse.ArgumentParser(description="The toy world: pretrain its tiny CLIP, measure, run the ablation.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("pretrain", help="pretrain the tiny CLIP on source pairs from scratch (~7 min on 2 cores) and "
                                        "compare with the committed toy_clip.pt")
    c.add_argument("--out", default=os.path.join("out", "toy_clip.pt"), help="where to write the weights "
                   "(--out toy_clip.pt replaces the committed file) [out/toy_clip.pt]")
    c = sub.add_parser("probe", help="zero-shot, kNN and linear-probe accuracy of a tiny CLIP or MUST "
                                      "checkpoint (and a MUST checkpoint's accuracy on masked views)")
    c.add_argument("path", nargs="?", help="CLIP state dict or train.py checkpoint [the cached tiny CLIP]")
    c.add_argument("--which", choices=["student", "teacher"], default="teacher",
                   help="which weights of a MUST checkpoint to probe [teacher]")
    c.add_argument("--mask-ratio", type=float, help="mask ratio of the masked-view accuracy [toy.HPARAMS]")
    c.add_argument("--cache-dir", default=os.path.join("out", "toy_cache"),
                   help="where rendered splits and the unpacked tiny CLIP are cached [out/toy_cache]")
    c = sub.add_parser("ablation", help="Tables 5/7 on the toy world: each loss added in turn, several seeds; "
                                         "prints target test (reported) and val (for choices) tables")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds, one run per row and "
                   "seed [0 1 2]")
    c.add_argument("--cache-dir", default=os.path.join("out", "toy_cache"),
                   help="where rendered splits and the unpacked tiny CLIP are cached [out/toy_cache]")
    c.add_argument("--out-dir", default=os.path.join("out", "toy_ablation"), help="one run directory per row "
                   "and seed (a finished run is reused, not redone) and ablation.txt [out/toy_ablation]")
    c.add_argument("--num-workers", default="2", help="data loader processes per run")
    c = sub.add_parser("show", help="save a grid of source and target images")
    c.add_argument("--out", default="toy_world.png", help="PNG path [toy_world.png]")
    args = p.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    if args.command == "pretrain":
        t = time.time()
        committed = _sha256(WEIGHTS) if os.path.isfile(WEIGHTS) else None  # before --out may replace it
        pretrain(args.out)
        digest = _sha256(args.out)
        print(f"wrote {args.out} in {time.time() - t:.0f} s, sha256 {digest}")
        print(f"committed {WEIGHTS}: " + ("none" if committed is None else "bit-identical" if committed == digest
                                          else f"differs (sha256 {committed})"))
    elif args.command == "probe":
        path = args.path or ensure_pretrained(args.cache_dir)
        if not os.path.isfile(path):
            raise SystemExit(f"error: no file {path}")
        keys = torch.load(path, map_location="cpu", weights_only=True, mmap=True).keys()  # no optimizer read
        if "student" in keys:
            r = probe_must(path, args.which, args.cache_dir, args.mask_ratio)
        else:
            r = probe_clip(path, args.cache_dir)
        for k, v in r.items():
            print(f"{k:24s} {' '.join(f'{x:.2f}' for x in v) if isinstance(v, list) else f'{v:.1f}'}")
    elif args.command == "ablation":
        ablation(args.seeds, args.cache_dir, args.out_dir, extra=["--num-workers", args.num_workers])
    elif args.command == "show":
        rows = []
        for domain in ("source", "target"):
            a = target_scene(sample_attributes(len(SHAPES) * 4, 123), domain)
            a["label"] = np.repeat(np.arange(len(SHAPES)), 4)  # 4 examples per class, one class per column
            img = render(a, domain).reshape(len(SHAPES), 4, IMAGE_SIZE, IMAGE_SIZE, 3)
            rows.append(img.transpose(1, 2, 0, 3, 4).reshape(4 * IMAGE_SIZE, len(SHAPES) * IMAGE_SIZE, 3))
        Image.fromarray(np.concatenate(rows)).resize((len(SHAPES) * 96, 8 * 96), Image.NEAREST).save(args.out)
        print(f"wrote {args.out}: top 4 rows source, bottom 4 rows target; columns: {', '.join(SHAPES)}")


if __name__ == "__main__":
    main()
