"""The toy world: MUST end to end on a CPU, offline (`python train.py --data toy`); its
story is in docs/toy.md.

An image shows one shape (the class) with a colour, size, position and background. The
source domain draws flat shapes with captions ("a photo of a small red triangle on a
striped background"); a tiny CLIP is pretrained on them (toy_clip.pt, which
`python -m tools.toy_experiments pretrain` remakes). The target draws the same scenes as
cartoon close-ups with film grain: MUST adapts on its unlabeled train split, reports its
test split and makes choices on its val split. Everything is rendered from seeds.
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import normalize

from util.clip_load import CLIP_MEAN, CLIP_STD

SHAPES = ["circle", "square", "triangle", "diamond", "star",
          "cross", "ring", "heart", "crescent", "arrow"]
# name -> RGB in [0, 1], the colours captions talk about
COLORS = {
    "red": (0.85, 0.12, 0.10), "green": (0.15, 0.65, 0.20),
    "blue": (0.12, 0.25, 0.85), "yellow": (0.95, 0.85, 0.10),
    "purple": (0.55, 0.15, 0.70), "orange": (0.95, 0.50, 0.05),
    "white": (0.95, 0.95, 0.95), "black": (0.08, 0.08, 0.08),
}
# Shape radius per image side. Scenes are object-centric, like ImageNet photos, so the
# paper's strong view (crops of 0.3-1, translations) mostly keeps the object in frame.
SIZES = {"small": 0.22, "medium": 0.29, "large": 0.36}
TARGET_SIZE = "large"  # close-ups: a masked unit hides less of the object
BACKGROUNDS = ["plain", "gradient", "striped", "dotted"]
CAPTION_TEMPLATES = ["a photo of a {}", "a picture of a {}", "an image of a {}", "a {}"]
# Zero-shot prompts, phrased like captions (as CLIP's ImageNet templates are).
TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "a {}.",
             "a photo of a small {}.", "a photo of a large {}."]
IMAGE_SIZE = 32
RENDER_SCALE = 2  # draw at 2x and average-pool: cheap anti-aliasing

# Splits: seeds are offsets so that no two splits share an image.
SPLIT_SIZES = {"source": 50000, "train": 30000, "val": 2000, "test": 2000}
# val is the labeled target split for choosing, test the one that is reported.
SPLIT_SEEDS = {"source": 0, "train": 1, "test": 2, "val": 3}
CHUNK = 1000  # images drawn per seed; rendering is vectorized over a chunk
# The tiny CLIP, 3.8 MB.
WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_clip.pt")
# Names the tiny CLIP that the source world and PRETRAIN make; toy_clip.pt carries it.
# After editing the source images, the captions or PRETRAIN, give RECIPE a new value and
# rerun `python -m tools.toy_experiments pretrain --out toy/toy_clip.pt`
# (tests/test_toy.py fails otherwise).
RECIPE = "f273c18e9c"


# Renderer ------------------------------------------------------------------

def _shape_mask(shape, u, v):
    """Whether (u, v), arrays with y down, lie inside a unit-size shape."""
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
        return (((np.abs(u) < 0.3) & (np.abs(v) < 0.95))
                | ((np.abs(v) < 0.3) & (np.abs(u) < 0.95)))
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
    """The latent attributes of n images, drawn independently."""
    rng = np.random.default_rng(seed)
    return {
        "label": rng.integers(0, len(SHAPES), n),
        "color": rng.integers(0, len(COLORS), n),
        "size": rng.integers(0, len(SIZES), n),
        "background": rng.integers(0, len(BACKGROUNDS), n),
        "angle": rng.uniform(-0.35, 0.35, n),  # radians: a square stays no diamond
        "jitter": rng.uniform(-1, 1, (n, 2)),
        # Arrows point left or right, crescents open either way.
        "mirror": rng.uniform(0, 1, n) < 0.5,
        "light": rng.uniform(0, 1, (n, 2)),  # contrast and brightness
        "bg_rgb": rng.uniform(0, 1, (n, 2, 3)),  # two background colours
        "bg_freq": rng.uniform(0.5, 1.5, n),
        "bg_phase": rng.uniform(0, 2 * math.pi, n),
        "noise_seed": rng.integers(0, 2 ** 31, n),
        # Captions, like alt-texts, name only some attributes: size, colour, background?
        "mention": rng.uniform(0, 1, (n, 3)) < 0.6,
        "caption_template": rng.integers(0, len(CAPTION_TEMPLATES), n),
    }


def _backgrounds(a, yy, xx, res):
    """Source backgrounds (n, res, res, 3): plain, gradient, striped or dotted."""
    n = len(a["label"])
    c = (0.35 + 0.3 * a["bg_rgb"]).astype(np.float32)  # muted: the shape stands out
    f = (a["bg_freq"] * 2 * math.pi * 6 / res).astype(np.float32)[:, None, None]
    ph = a["bg_phase"].astype(np.float32)[:, None, None]
    t = np.zeros((n, res, res), np.float32)  # 0 -> first colour, 1 -> second colour
    patterns = [
        (1, lambda i: np.broadcast_to((xx + yy) / (2 * res), (len(i), res, res))),
        (2, lambda i: np.sin(f[i] * (xx + 0.3 * yy) + ph[i]) > 0),
        (3, lambda i: np.sin(f[i] * xx + ph[i]) * np.sin(f[i] * yy + ph[i]) > 0.5)]
    for kind, pattern in patterns:
        i = np.nonzero(a["background"] == kind)[0]
        t[i] = pattern(i)
    t = t[..., None]
    return c[:, None, None, 0] * (1 - t) + c[:, None, None, 1] * t


def render(a, domain, res=IMAGE_SIZE):
    """uint8 images (n, res, res, 3) of attributes: flat shapes on their backgrounds,
    or in the target domain close-ups (TARGET_SIZE) with an ink outline and grain."""
    if domain not in ("source", "target"):
        raise ValueError(f"unknown domain {domain!r}; expected 'source' or 'target'")
    n = len(a["label"])
    R = res * RENDER_SCALE
    yy, xx = np.mgrid[0:R, 0:R].astype(np.float32) + 0.5
    if domain == "source":
        size = np.array(list(SIZES.values()))[a["size"]]
    else:
        size = np.full(n, SIZES[TARGET_SIZE])
    size = (size * R).astype(np.float32)
    # The whole shape stays inside the frame.
    margin = 0.8 * (R / 2 - size - 1)
    cx = (R / 2 + a["jitter"][:, 0] * margin).astype(np.float32)
    cy = (R / 2 + a["jitter"][:, 1] * margin).astype(np.float32)
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    ang = a["angle"].astype(np.float32)
    ca, sa = np.cos(ang)[:, None, None], np.sin(ang)[:, None, None]
    mirror = np.where(a["mirror"], -1, 1)[:, None, None]
    u = (ca * dx + sa * dy) / size[:, None, None] * mirror
    v = (-sa * dx + ca * dy) / size[:, None, None]
    mask = np.zeros((n, R, R), bool)
    for k, shape in enumerate(SHAPES):
        idx = np.nonzero(a["label"] == k)[0]
        mask[idx] = _shape_mask(shape, u[idx], v[idx])
    img = _backgrounds(a, yy, xx, R)
    fg = np.array(list(COLORS.values()), np.float32)[a["color"]]
    idx = np.nonzero(mask)
    img[idx] = fg[idx[0]]
    if domain == "target":
        img = _ink_and_grain(img, mask, a["noise_seed"], res)
    contrast = 0.5 + 0.8 * a["light"][:, 0, None, None, None]
    brightness = 0.4 * a["light"][:, 1, None, None, None] - 0.2
    img = ((img - 0.5) * contrast.astype(np.float32) + 0.5
           + brightness.astype(np.float32))
    img = np.ascontiguousarray(img, dtype=np.float32)
    img = torch.from_numpy(img).permute(0, 3, 1, 2)
    img = F.avg_pool2d(img, RENDER_SCALE).permute(0, 2, 3, 1).numpy()
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _ink_and_grain(img, mask, noise_seeds, res):
    """The target style over a source scene: a 1-px ink outline and film grain. It hurts
    the tiny CLIP's text alignment more than its features: a gap MUST closes."""
    # The outline: the shape less its erosion by a (2w+1)-square, w = 1 output px.
    background = torch.from_numpy(~mask).float()[:, None]
    outside = F.max_pool2d(background, 2 * RENDER_SCALE + 1, stride=1,
                           padding=RENDER_SCALE)
    idx = np.nonzero(mask & (outside[:, 0].numpy() > 0.5))
    img[idx] = 0.1
    grain = np.stack([
        np.random.default_rng(s).standard_normal((res, res, 3), np.float32)
        for s in noise_seeds])
    return img + 0.03 * grain.repeat(RENDER_SCALE, 1).repeat(RENDER_SCALE, 2)


def caption(a, i):
    """Image i's source caption, e.g. 'a photo of a small red triangle on a striped
    background': the shape always, size, colour and background sometimes."""
    size, color, bg = a["mention"][i]
    size_word = [list(SIZES)[a["size"][i]]] if size else []
    color_word = [list(COLORS)[a["color"][i]]] if color else []
    words = size_word + color_word
    thing = " ".join(words + [SHAPES[a["label"][i]]])
    if bg:
        thing += f" on a {BACKGROUNDS[a['background'][i]]} background"
    text = CAPTION_TEMPLATES[a["caption_template"][i]].format(thing)
    # The article before a vowel: "an orange", "an arrow".
    return (" " + text).replace(" a o", " an o").replace(" a a", " an a")[1:]


def render_split(split, n=None, start=0):
    """uint8 images (n, 32, 32, 3) and labels of a split: 'source', or the target's
    'train', 'val', 'test'. Image i is the same for any n and start (chunk seeds)."""
    if split not in SPLIT_SIZES:
        raise ValueError(
            f"unknown split {split!r}; expected one of {sorted(SPLIT_SIZES)}")
    n = SPLIT_SIZES[split] - start if n is None else n
    domain = "source" if split == "source" else "target"

    def chunk_of(chunk):
        a = sample_attributes(CHUNK, [SPLIT_SEEDS[split], chunk])
        lo, hi = max(start - chunk * CHUNK, 0), min(start + n - chunk * CHUNK, CHUNK)
        a = {k: v[lo:hi] for k, v in a.items()}
        return render(a, domain), a["label"]

    # Chunks are independent, so threads render them side by side (numpy and torch release
    # the GIL): the same pixels in about 60% of the time on 2 cores.
    chunks = range(start // CHUNK, (start + n - 1) // CHUNK + 1)
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        images, labels = zip(*pool.map(chunk_of, chunks))
    return np.concatenate(images), np.concatenate(labels)


# MUST's settings for the toy world, in Table 10's roles (config.hparams), chosen for a
# ~6 min CPU run (docs/toy.md).
HPARAMS = dict(
    mask_unit=8,  # px: one patch, 16 units per image
    mask_ratio=0.0625,  # 1 unit: on 16 tokens each masked unit costs accuracy
    conf_threshold=0.9,  # lower passes so many wrong pseudo-labels that training drifts
    lambda_reg=1.0,
    lambda_align=0.2,
    ema_mu0=0.99,
    ema_mu_n=2000,
    base_lr=2e-4,  # lr 1e-4 at batch 128
    epochs=5,  # 1,170 steps over the 30,000 target images
    eval_freq=1,
    batch_size=128,
    # data.strong_view: what the toy CLIP was pretrained to read (PRETRAIN["augment"]).
    strong_view="light",
)


# Tiny CLIP pretraining on source image-caption pairs -----------------------

PRETRAIN = dict(  # ~7.5 min on 2 CPU cores (0.8M-param image tower, 17 tokens)
    model=dict(embed_dim=64, image_resolution=IMAGE_SIZE,
               vision_layers=4, vision_width=128, vision_patch_size=8,
               context_length=20, vocab_size=49408, transformer_width=64,
               transformer_layers=2),
    steps=2000, batch_size=128, lr=1e-3, weight_decay=0.1, warmup=200, seed=0,
    augment="light",  # data.strong_view of every image, as a web CLIP's crops
)


def to_tensor(images):
    """uint8 (n, H, W, 3) -> CLIP-normalized float (n, 3, H, W), as preprocess gives."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    return normalize(x, CLIP_MEAN, CLIP_STD, inplace=True)


# The dataset, as data.build_dataset gives them -----------------------------

class ToyDataset(torch.utils.data.Dataset):
    """A split's rendered images as (transform(PIL image), label); train.py reads the
    'train' split's labels only to log the pseudo-labels' accuracy."""

    classnames = SHAPES
    templates = TEMPLATES

    def __init__(self, images, labels, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def build_dataset(root, split, transform=None):
    """data.build_dataset for the toy world: the split, rendered (root is not used)."""
    return ToyDataset(*render_split(split), transform)


def write_images(split, folder):
    """A split's images as lossless PNGs folder/<class>/<index>.png (eval.py
    --classify reads back the dataset's pixels)."""
    images, labels = render_split(split)
    for i, (image, label) in enumerate(zip(images, labels)):
        os.makedirs(os.path.join(folder, SHAPES[label]), exist_ok=True)
        Image.fromarray(image).save(os.path.join(folder, SHAPES[label], f"{i:04d}.png"))
