"""The toy world: MUST end to end on a CPU, offline (`python train.py --data toy`).

Its story is told in docs/toy.md. Images show one shape (the class) with a colour, size, position
and background. The source domain draws flat filled shapes, captioned
("a photo of a small red triangle on a striped background"). A tiny CLIP (clip_model.py at small
size, 32 px) is pretrained contrastively on source pairs, never on the target, and its weights are
committed (toy_clip.pt; `python toy.py pretrain` remakes them, bit for bit on the CPU that made
them). The target draws the same kind of scenes as cartoon close-ups with film grain. Its unlabeled
train split is what MUST adapts on, its labeled test split what is reported, and its labeled val
split (other images) what choices are made on. Everything is deterministic from a seed and
rendered on the fly. Importing this module registers `--data toy` with data.py. Probes, the
ablation and pictures of the world are in toy_experiments.py.
"""
import argparse
import hashlib
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import normalize
from tqdm import tqdm

import clip_load
import clip_model
import data
from clip_load import CLIP_MEAN, CLIP_STD
from runtime import save_atomic
from tokenizer import tokenize

SHAPES = ["circle", "square", "triangle", "diamond", "star",
          "cross", "ring", "heart", "crescent", "arrow"]
# name -> RGB in [0, 1], the colours captions talk about
COLORS = {
    "red": (0.85, 0.12, 0.10), "green": (0.15, 0.65, 0.20), "blue": (0.12, 0.25, 0.85),
    "yellow": (0.95, 0.85, 0.10), "purple": (0.55, 0.15, 0.70), "orange": (0.95, 0.50, 0.05),
    "white": (0.95, 0.95, 0.95), "black": (0.08, 0.08, 0.08),
}
# Shape radius as a fraction of the image side. Scenes are object-centric like ImageNet photos
# (large, near the centre), so the paper's strong view (RandomResizedCrop 0.3-1, translations)
# mostly keeps the object in frame.
SIZES = {"small": 0.22, "medium": 0.29, "large": 0.36}
TARGET_SIZE = "large"  # target photos are close-ups: a masked unit then hides less of the object
BACKGROUNDS = ["plain", "gradient", "striped", "dotted"]
CAPTION_TEMPLATES = ["a photo of a {}", "a picture of a {}", "an image of a {}", "a {}"]
# Zero-shot prompts (the toy world's "prompt engineering", as CLIP's ImageNet templates), phrased
# like captions.
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
# Names the tiny CLIP that the source world and PRETRAIN make. toy_clip.pt carries the RECIPE it
# was made by. After editing the source images, the captions or PRETRAIN, give RECIPE a new value
# (any string) and rerun `python toy.py pretrain --out toy_clip.pt`. tests/test_toy.py pins a
# digest of what RECIPE covers, so a forgotten one fails there.
RECIPE = "f273c18e9c"
# The committed toy_clip.pt predates the config note that pretrain now writes: it is known by its
# SHA-256 instead, as OpenAI's files are (a QuickGELU CLIP fed OpenAI's normalization).
WEIGHTS_SHA256 = "4826d1516b4b3f4e239c0b66dd7aa07f53d2729142183a502919eece8d74987f"
clip_load.register_file(WEIGHTS_SHA256, clip_load.OPENAI_SPEC)


# Renderer -------------------------------------------------------------------------------------

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
    return {
        "label": rng.integers(0, len(SHAPES), n),
        "color": rng.integers(0, len(COLORS), n),
        "size": rng.integers(0, len(SIZES), n),
        "background": rng.integers(0, len(BACKGROUNDS), n),
        "angle": rng.uniform(-0.35, 0.35, n),  # radians; small, so a square never becomes a diamond
        "jitter": rng.uniform(-1, 1, (n, 2)),
        # Arrows point left or right, crescents open either way.
        "mirror": rng.uniform(0, 1, n) < 0.5,
        "light": rng.uniform(0, 1, (n, 2)),  # exposure: contrast and brightness of the photo
        "bg_rgb": rng.uniform(0, 1, (n, 2, 3)),  # two background colours (stripes, dots, gradient)
        "bg_freq": rng.uniform(0.5, 1.5, n),
        "bg_phase": rng.uniform(0, 2 * math.pi, n),
        "noise_seed": rng.integers(0, 2 ** 31, n),
        # captions, like web alt-texts, name only some attributes: keep size / colour / background?
        "mention": rng.uniform(0, 1, (n, 3)) < 0.6,
        "caption_template": rng.integers(0, len(CAPTION_TEMPLATES), n),
    }


def _backgrounds(a, yy, xx, res):
    """Source backgrounds (n, res, res, 3): plain, gradient, striped, dotted (two muted colours)."""
    n = len(a["label"])
    c = (0.35 + 0.3 * a["bg_rgb"]).astype(np.float32)  # muted, so the shape stays the salient thing
    f = (a["bg_freq"] * 2 * math.pi * 6 / res).astype(np.float32)[:, None, None]
    ph = a["bg_phase"].astype(np.float32)[:, None, None]
    t = np.zeros((n, res, res), np.float32)  # 0 -> first colour, 1 -> second colour
    patterns = [(1, lambda i: np.broadcast_to((xx + yy) / (2 * res), (len(i), res, res))),
                (2, lambda i: np.sin(f[i] * (xx + 0.3 * yy) + ph[i]) > 0),
                (3, lambda i: np.sin(f[i] * xx + ph[i]) * np.sin(f[i] * yy + ph[i]) > 0.5)]
    for kind, pattern in patterns:
        i = np.nonzero(a["background"] == kind)[0]
        t[i] = pattern(i)
    t = t[..., None]
    return c[:, None, None, 0] * (1 - t) + c[:, None, None, 1] * t


def render(a, domain, res=IMAGE_SIZE):
    """Render attributes to uint8 images (n, res, res, 3): flat shapes on their backgrounds.

    In the target domain they are close-ups (every object at TARGET_SIZE, whatever a["size"] says)
    with a dark ink outline and film grain.
    """
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
        mask[idx] = _shape_mask(shape, u[idx], v[idx])
    img = _backgrounds(a, yy, xx, R)
    fg = np.array(list(COLORS.values()), np.float32)[a["color"]]
    idx = np.nonzero(mask)
    img[idx] = fg[idx[0]]
    if domain == "target":
        img = _ink_and_grain(img, mask, a["noise_seed"], res)
    contrast = 0.5 + 0.8 * a["light"][:, 0, None, None, None]
    brightness = 0.4 * a["light"][:, 1, None, None, None] - 0.2
    img = (img - 0.5) * contrast.astype(np.float32) + 0.5 + brightness.astype(np.float32)
    img = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(0, 3, 1, 2)
    img = F.avg_pool2d(img, RENDER_SCALE).permute(0, 2, 3, 1).numpy()
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _ink_and_grain(img, mask, noise_seeds, res):
    """The target style drawn over a source scene: a dark 1-px ink outline around the shape (a
    cartoon) and film grain.

    It hurts the tiny CLIP's text alignment more than its features, which is the gap self-training
    can close (docs/toy.md).
    """
    # the outline: the shape minus its erosion by a (2w+1)-square, w = 1 px at the output resolution
    outside = F.max_pool2d(torch.from_numpy(~mask).float()[:, None], 2 * RENDER_SCALE + 1, stride=1,
                           padding=RENDER_SCALE)
    idx = np.nonzero(mask & (outside[:, 0].numpy() > 0.5))
    img[idx] = 0.1
    grain = np.stack([np.random.default_rng(s).standard_normal((res, res, 3), np.float32)
                      for s in noise_seeds])
    return img + 0.03 * grain.repeat(RENDER_SCALE, 1).repeat(RENDER_SCALE, 2)


def caption(a, i):
    """Source caption of image i, e.g. 'a photo of a small red triangle on a striped background'.

    The shape is always named; size, colour and background each only sometimes."""
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
    """Images (n, 32, 32, 3) uint8 and labels of a split: 'source', or 'train', 'val', 'test'
    (target).

    Image i of a split is the same whatever n/start are, because attributes come from per-chunk
    seeds.
    """
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SIZES)}")
    n = SPLIT_SIZES[split] - start if n is None else n
    domain = "source" if split == "source" else "target"
    images, labels = [], []
    first, last = start // CHUNK, (start + n - 1) // CHUNK
    for chunk in range(first, last + 1):
        a = sample_attributes(CHUNK, [SPLIT_SEEDS[split], chunk])
        lo, hi = max(start - chunk * CHUNK, 0), min(start + n - chunk * CHUNK, CHUNK)
        a = {k: v[lo:hi] for k, v in a.items()}
        images.append(render(a, domain))
        labels.append(a["label"])
    return np.concatenate(images), np.concatenate(labels)


# MUST's hyperparameters for the toy world (train.py reads them through data.hparams('toy', ...)),
# in the roles of the paper's Table 10. They are chosen for a ~6 min CPU run (measurements:
# docs/toy.md).
HPARAMS = dict(
    mask_unit=8,  # px = one 8 px patch: 16 units per 32 px image
    mask_ratio=0.0625,  # 1 of the 16 units: on 16-token images each masked unit costs MUST accuracy
    conf_threshold=0.9,  # lower lets through so many wrong pseudo-labels that self-training drifts
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


# Tiny CLIP pretraining on source image-caption pairs ------------------------------------------

PRETRAIN = dict(  # ~7.5 min on 2 CPU cores (0.8M-param image tower, 17 tokens per image)
    model=dict(embed_dim=64, image_resolution=IMAGE_SIZE,
               vision_layers=4, vision_width=128, vision_patch_size=8,
               context_length=20, vocab_size=49408, transformer_width=64, transformer_layers=2),
    steps=2000, batch_size=128, lr=1e-3, weight_decay=0.1, warmup=200, seed=0,
    augment="light",  # data.strong_view applied to every source image, like a web CLIP's crops
)


def to_tensor(images):
    """uint8 (n, H, W, 3) -> CLIP-normalized float (n, 3, H, W).

    It is what clip_model's preprocess would give.
    """
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    return normalize(x, CLIP_MEAN, CLIP_STD, inplace=True)


def pretrain(out_path):
    """Contrastive pretraining (symmetric InfoNCE, learnable temperature) of a tiny CLIP.

    It trains on freshly rendered source image-caption batches with the PRETRAIN recipe, and writes
    its stored_state() to out_path, with the note that says its activation and normalization
    (a QuickGELU CLIP fed OpenAI's normalization), so that clip_load reads any file it makes.

    It is deterministic: batch s is drawn from seed [1000 + PRETRAIN['seed'], s] (no overlap with
    the splits). It uses AdamW, linear warmup, cosine decay, and CLIP's clamp of the temperature at
    100.
    """
    cfg = PRETRAIN
    steps, batch_size, seed = cfg["steps"], cfg["batch_size"], cfg["seed"]
    torch.manual_seed(seed)
    model = clip_model.CLIP(**cfg["model"])
    decay = [p for n, p in model.named_parameters()
             if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters()
                if not (p.ndim >= 2 and "embedding" not in n)]
    param_groups = [{"params": decay, "weight_decay": cfg["weight_decay"]},
                    {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(param_groups, lr=cfg["lr"], betas=(0.9, 0.98), eps=1e-6)
    view = data.strong_view(IMAGE_SIZE, cfg["augment"])  # draws from torch's RNG: deterministic
    bar = tqdm(range(steps), desc="pretrain tiny CLIP", mininterval=2)
    for step in bar:
        warmup_scale = min(1.0, (step + 1) / cfg["warmup"])
        one_plus_cos = 1 + math.cos(math.pi * step / steps)
        lr = cfg["lr"] * warmup_scale * 0.5 * one_plus_cos
        for g in opt.param_groups:
            g["lr"] = lr
        a = sample_attributes(batch_size, [1000 + seed, step])
        source_images = render(a, "source")
        views = [np.asarray(view(Image.fromarray(x))) for x in source_images]
        images = to_tensor(np.stack(views))
        captions = [caption(a, i) for i in range(batch_size)]
        tokens = tokenize(captions, context_length=model.context_length)
        logits_per_image, logits_per_text = model(images, tokens)
        target = torch.arange(len(images))
        image_loss = F.cross_entropy(logits_per_image, target)
        text_loss = F.cross_entropy(logits_per_text, target)
        loss = (image_loss + text_loss) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's clamp
        bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}",
                        refresh=False)
    note = clip_load.config_note(clip_load.OPENAI_SPEC)
    save_atomic({**stored_state(model), "open_clip_config": note}, out_path)


def toy_token_ids(context_length):
    """Every token id a toy caption or prompt can contain (a few dozen of CLIP's 49,408)."""
    sizes, colors, backgrounds = [[""] + [w + " " for w in ws] for ws in (SIZES, COLORS)] + \
        [[""] + [f" on a {b} background" for b in BACKGROUNDS]]
    texts = [t.format(f"{s}{c}{k}{b}")
             for t in CAPTION_TEMPLATES for s in sizes for c in colors for k in SHAPES
             for b in backgrounds]
    texts += [t.format(k) for t in TEMPLATES for k in SHAPES]
    return torch.unique(tokenize(texts, context_length=context_length, truncate=True))


def stored_state(model):
    """The tiny CLIP's state dict as toy_clip.pt stores it, which clip_load.load reads as it is.

    The token embedding is stored by the rows toy texts use (`.ids`, `.rows`, `.vocab_size`),
    because the other rows are most of the parameters and never get a gradient. RECIPE is stored as
    a note.
    """
    out = dict(model.state_dict())  # a plain dict, as the committed file
    weight = out.pop("token_embedding.weight")
    ids = toy_token_ids(model.context_length)
    out.update({"token_embedding.ids": ids, "token_embedding.rows": weight[ids],
                "token_embedding.vocab_size": weight.shape[0], "recipe": RECIPE})
    return out


# Dataset API for train.py / data.py (same contract as data.build_dataset) ---------------------

class ToyDataset(torch.utils.data.Dataset):
    """Rendered images of one split as PIL images through `transform`.

    item = (transform(img), label). In the unlabeled 'train' split, train.py reads the labels only
    to log the accuracy of the pseudo-labels.
    """

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
    """data.build_dataset's contract for the toy world.

    It is the split, rendered in memory (root is not used).
    """
    return ToyDataset(*render_split(split), transform)


data.register_dataset("toy", build_dataset, HPARAMS, lambda root: WEIGHTS)


def write_images(split, folder):
    """A split's images as PNG files folder/<class>/<index>.png, for eval.py --classify: PNG is
    lossless, so each file reads back as the pixels the split's dataset gives."""
    images, labels = render_split(split)
    for i, (image, label) in enumerate(zip(images, labels)):
        os.makedirs(os.path.join(folder, SHAPES[label]), exist_ok=True)
        Image.fromarray(image).save(os.path.join(folder, SHAPES[label], f"{i:04d}.png"))


def main(argv=None):
    description = ("Pretrain the toy world's tiny CLIP from scratch (~7 min on 2 cores), or write "
                   "its 2,000 test images as files. Probes, the ablation and pictures of the "
                   "world: toy_experiments.py.")
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("command", choices=["pretrain", "images"])
    parser.add_argument("--out",
                        help="where to write: pretrain's weights (toy_clip.pt replaces the "
                             "committed file) [out/toy_clip.pt]; the test images' folder "
                             "[out/toy/test-images]")
    args = parser.parse_args(argv)
    if args.command == "images":
        args.out = args.out or os.path.join("out", "toy", "test-images")
        write_images("test", args.out)
        print(f"wrote the test images to {args.out}/<class>/<index>.png")
        return
    args.out = args.out or os.path.join("out", "toy_clip.pt")
    pretrain(args.out)
    with open(args.out, "rb") as f:
        print(f"wrote {args.out}, sha256 {hashlib.sha256(f.read()).hexdigest()}")


if __name__ == "__main__":
    main()
