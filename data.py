"""
Data for MUST: per-dataset hyperparameters (paper Table 10), datasets with labels in the published prompt
order, the two augmented views + patch mask of one training image (paper §3), and the shifted ImageNets that
eval.py --shift finds under one folder (find_shift_sets; docs/usage.md gives that layout).

Label order is always the order of prompts.DATASETS[...]["classes"] (the authors' prepared copies, i.e.
sorted folder names). Every loader maps its own class names to that order BY NAME, never by position.
Training labels are only read to log pseudo-label accuracy; the method itself never sees them.

Layouts accepted by build_dataset (root = --data-root):
    imagenet        root/train/<wnid>/*.JPEG, root/val/<wnid>/*.JPEG
    any named set   root/train/<class>/..., root/test/<class>/... (or val/); <class> is a prompt class name
                    in any spelling (case, '_', spaces, punctuation, CamelCase), a wnid, or for gtsrb /
                    imagenet-v2 the class index
    food101, dtd, gtsrb, pets, caltech101, sun397
                    torchvision's on-disk layout under root (download=True fetches it)
    ucf101          root/train/<ActionName>/**/*.jpg (video frames), root/test/...
    imagenet-r/-a/-sketch  root/<wnid>/* ; imagenet-v2  root/<0..999>/*   (transductive, paper §4.8: the
                    "train" split is the same unlabeled test images)
    folder          root/**/* unlabeled images + a class-names file; split "test" reads eval_root/<class>/*
"""

import collections
import csv
import functools
import json
import math
import os
import re
import stat
import string
import zlib

import torch
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

import clip_model
import prompts
from clip_model import CLIP_MEAN, CLIP_STD

# ----------------------------------------------------------------------------------------------------------
# Hyperparameters (paper Table 10, as released)

_TABLE10_COLUMNS = ("mask_unit", "mask_ratio", "conf_threshold", "lambda_reg", "lambda_align",
                    "ema_mu0", "ema_mu_n", "base_lr", "epochs", "eval_freq")
_TABLE10 = [
    # dataset      model       s   ratio  τ    λ_reg λ_align µ0     µn    base_lr ep  eval
    ("imagenet",   "ViT-B/16", 32, 0.3, 0.7, 1.0, 0.2, 0.999, 2000, 2e-5, 30, 1),
    ("imagenet",   "ViT-L/14", 56, 0.3, 0.5, 1.0, 0.5, 0.999, 2000, 4e-5, 20, 1),
    ("sun397",     "ViT-B/16", 32, 0.1, 0.4, 0.2, 1.0, 0.99, 500, 1e-4, 20, 2),
    ("sun397",     "ViT-L/14", 28, 0.2, 0.3, 0.2, 0.5, 0.99, 500, 2e-4, 20, 2),
    ("food101",    "ViT-B/16", 32, 0.1, 0.7, 1.0, 0.1, 0.999, 2000, 2e-5, 40, 2),
    ("food101",    "ViT-L/14", 56, 0.1, 0.7, 1.0, 0.1, 0.999, 2000, 4e-5, 40, 2),
    ("gtsrb",      "ViT-B/16", 32, 0.5, 0.3, 1.0, 0.5, 0.99, 500, 2e-5, 20, 2),
    ("gtsrb",      "ViT-L/14", 56, 0.3, 0.2, 1.0, 0.5, 0.99, 500, 4e-5, 20, 2),
    ("dtd",        "ViT-B/16", 32, 0.1, 0.4, 1.0, 0.2, 0.99, 100, 2e-5, 60, 5),
    ("dtd",        "ViT-L/14", 56, 0.1, 0.5, 1.0, 0.5, 0.99, 100, 4e-5, 60, 5),
    ("ucf101",     "ViT-B/16", 16, 0.1, 0.5, 1.0, 0.5, 0.99, 500, 1e-5, 60, 5),
    ("ucf101",     "ViT-L/14", 28, 0.1, 0.6, 1.0, 0.5, 0.99, 500, 2e-5, 60, 5),
    ("pets",       "ViT-B/16", 32, 0.1, 0.7, 1.0, 0.2, 0.99, 100, 1e-5, 60, 5),
    ("caltech101", "ViT-B/16", 32, 0.1, 0.7, 1.0, 0.2, 0.99, 100, 1e-5, 60, 5),
]
HPARAMS = {(d, m): dict(zip(_TABLE10_COLUMNS, v)) for d, m, *v in _TABLE10}
GLOBAL_BATCH = {"ViT-B/16": 1024, "ViT-L/14": 512}

# Paper §4.1: these report mean per-class accuracy, the others top-1.
MEAN_PER_CLASS = ("pets", "caltech101")
_SHIFTED_IMAGENETS = ("imagenet-r", "imagenet-a", "imagenet-v2", "imagenet-sketch")
DATASET_NAMES = ["imagenet", "sun397", "food101", "gtsrb", "dtd", "ucf101", "pets", "caltech101",
                 *_SHIFTED_IMAGENETS, "folder"]
# Datasets that bring their own data, hyperparameters and CLIP (toy.py's world): register_dataset adds them.
_REGISTERED = {}


def register_dataset(name, build, hparams, default_model):
    """Make `--data name` a dataset: build(root, split, transform) -> a dataset with .classnames and .templates
    (data.build_dataset's contract), hparams: its whole run configuration (hparams()'s keys), default_model(root)
    -> the CLIP checkpoint path to use when --model is not given."""
    _REGISTERED[name] = (build, hparams, default_model)
    if name not in DATASET_NAMES:
        DATASET_NAMES.append(name)


def is_registered(name):
    return name in _REGISTERED


def default_model(name, root):
    """The CLIP a dataset runs with when --model is not given: a registered dataset's own, else ViT-B/16."""
    return _REGISTERED[name][2](root) if name in _REGISTERED else "ViT-B/16"

# (patch size, input size) of the released CLIPs; the model whose Table 10 rows a model borrows, best first
MODEL_GEOMETRY = {"ViT-B/32": (32, 224, 768), "ViT-B/16": (16, 224, 768), "ViT-L/14": (14, 224, 1024),
                  "ViT-L/14@336px": (14, 336, 1024)}  # (patch, input px, width)
_ROW_PREFERENCE = {"ViT-B/32": ("ViT-B/16", "ViT-L/14"), "ViT-B/16": ("ViT-B/16", "ViT-L/14"),
                   "ViT-L/14": ("ViT-L/14", "ViT-B/16"), "ViT-L/14@336px": ("ViT-L/14", "ViT-B/16")}


def _snap_mask_unit(mask_unit, patch_size, input_size):
    """The multiple of patch_size nearest to mask_unit that tiles input_size (larger one on a tie)."""
    candidates = [m for m in range(patch_size, input_size + 1, patch_size) if input_size % m == 0]
    if not candidates:
        raise ValueError(f"input size {input_size} is not a multiple of patch size {patch_size}")
    return min(candidates, key=lambda m: (abs(m - mask_unit), -m))


def hparams(dataset, model_name, patch_size=None, input_size=None):
    """Default hyperparameters of a run: the Table 10 row of (dataset, model) plus batch_size (global).

    Combinations the paper did not run borrow the nearest row: 'folder' and the shifted ImageNets use
    ImageNet's; ViT-B/32 uses ViT-B/16's and ViT-L/14@336px ViT-L/14's; a dataset with only a ViT-B/16 row
    (pets, caltech101) lends it to ViT-L. A borrowed row's base_lr is rescaled so the absolute lr
    (base_lr × batch / 256) is unchanged, and its mask unit is snapped to a multiple of the model's patch size
    that tiles the input. Unknown model names (e.g. a checkpoint path) use the ViT-B/16 row; patch_size /
    input_size (the loaded model's) override the released geometry of model_name when given. Returns a fresh plain dict: train.py overrides any value.
    """
    if dataset in _REGISTERED:
        return dict(_REGISTERED[dataset][1])
    if dataset not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASET_NAMES)}")
    table_dataset = dataset if any(d == dataset for d, _ in HPARAMS) else "imagenet"
    preference = _ROW_PREFERENCE.get(model_name, ("ViT-B/16", "ViT-L/14"))
    row_model = next(m for m in preference if (table_dataset, m) in HPARAMS)
    hp = dict(HPARAMS[(table_dataset, row_model)])
    batch_size = GLOBAL_BATCH[preference[0]]
    hp["base_lr"] *= GLOBAL_BATCH[row_model] / batch_size
    known_patch, known_size, _ = MODEL_GEOMETRY.get(model_name, (None, None, None))
    patch_size, input_size = patch_size or known_patch, input_size or known_size  # the caller's model wins
    if patch_size is not None and input_size is not None:
        hp["mask_unit"] = _snap_mask_unit(hp["mask_unit"], patch_size, input_size)
    hp["batch_size"] = batch_size
    hp["strong_view"] = "paper"
    return hp


# ----------------------------------------------------------------------------------------------------------
# Class names: mapping folder / torchvision names to prompt order

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")

# The 'a photo of a {}.' family, for --data folder without a templates file.
DEFAULT_TEMPLATES = ["a photo of a {}.", "a photo of the {}.", "a bad photo of a {}.", "a good photo of a {}.",
                     "a photo of the small {}.", "a photo of the large {}.", "a cropped photo of a {}.",
                     "a close-up photo of a {}."]

# Folder names (Caltech101's 101_ObjectCategories, as torchvision reads them) whose words differ from the
# published prompt names; every other name of every dataset matches after name_key.
_ALIASES = {
    "caltech101": {
        "BACKGROUND_Google": "background", "Faces": "off-center face", "Faces_easy": "centered face",
        "Leopards": "leopard", "Motorbikes": "motorbike", "airplanes": "airplane", "car_side": "side of a car",
        "cougar_body": "body of a cougar cat", "cougar_face": "face of a cougar cat",
        "crocodile_head": "head of a  crocodile", "flamingo_head": "head of a flamingo",
        "snoopy": "snoopy (cartoon beagle)", "yin_yang": "yin and yang symbol",
    },
}
# Datasets whose folders may be named by class index (GTSRB's 00000..00042, ImageNetV2's 0..999).
_INDEX_NAMED = ("gtsrb", "imagenet-v2")


def name_key(name):
    """Spelling-insensitive key: 'Apply_Eye_Makeup', 'ApplyEyeMakeup', 'apply eye makeup' -> 'applyeyemakeup';
    SUN397's 'apartment_building/outdoor' -> 'apartmentbuildingoutdoor'."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


# The wnids of the ImageNets, in label order: their class identities (names repeat there: two 'missile's).
WNIDS = {"imagenet": prompts.IMAGENET_WNIDS, "imagenet-sketch": prompts.IMAGENET_WNIDS,
         "imagenet-v2": prompts.IMAGENET_WNIDS, "imagenet-c": prompts.IMAGENET_WNIDS,
         "imagenet-r": prompts.IMAGENET_R_WNIDS, "imagenet-a": prompts.IMAGENET_A_WNIDS}


def dataset_prompts(dataset):
    """(classnames, templates) of a named dataset, in label order."""
    entry = prompts.DATASETS["imagenet" if dataset in _SHIFTED_IMAGENETS else dataset]
    classes = list(entry["classes"])
    if dataset in ("imagenet-r", "imagenet-a"):  # 200-class subsets of ImageNet, in their own label order
        classes = [classes[prompts.IMAGENET_WNIDS.index(w)] for w in WNIDS[dataset]]
    return classes, list(entry["templates"])


def map_class_names(dataset, names, classnames):
    """Label (index into classnames) of each folder / torchvision class name; ValueError lists the ones that
    match no class. A name matches a wnid of the dataset, a class index (gtsrb, imagenet-v2), or a class
    name / known alias up to spelling (name_key). Names that two classes share (ImageNet's two 'missile's
    and 'sunglasses') only resolve through wnids."""
    keys = collections.Counter(name_key(c) for c in classnames)
    ambiguous = {k for k, n in keys.items() if n > 1}
    by_key = {name_key(c): i for i, c in enumerate(classnames) if keys[name_key(c)] == 1}
    for alias, target in _ALIASES.get(dataset, {}).items():
        by_key[name_key(alias)] = by_key[name_key(target)]
    by_wnid = {w: i for i, w in enumerate(WNIDS.get(dataset, []))}
    labels, unknown = [], []
    for name in names:
        if name in by_wnid:
            label = by_wnid[name]
        elif dataset in _INDEX_NAMED and name.isdigit() and int(name) < len(classnames):
            label = int(name)
        else:
            label = by_key.get(name_key(name))
        if label is None:
            unknown.append(name)
        labels.append(label)
    if unknown:
        hint = " (these ImageNet names are ambiguous; use wnid folders)" if any(
            name_key(n) in ambiguous for n in unknown) else ""
        raise ValueError(f"{len(unknown)} class folder(s) of {dataset!r} match no class name{hint}: "
                         f"{', '.join(repr(n) for n in unknown[:20])}{' ...' if len(unknown) > 20 else ''}; "
                         f"rename them to class names, e.g. {', '.join(repr(c) for c in classnames[:3])}")
    seen = {}
    for name, label in zip(names, labels):
        if label in seen:
            raise ValueError(f"class folders {seen[label]!r} and {name!r} of {dataset!r} both map to class "
                             f"{classnames[label]!r}; keep one")
        seen[label] = name
    return labels


# ----------------------------------------------------------------------------------------------------------
# Datasets


# Training images are read with this aspect ratio at most (the long side is center-cropped): CLIP's pipelines
# resize the SHORT side first, so a 1 x 10000 image would otherwise become 224 x 2,240,000 pixels in memory.
MAX_ASPECT = 4
_READ_ERRORS = {1: "cannot be decoded (truncated, empty or not an image)", 2: "is larger than PIL's "
                "decompression-bomb limit", 3: "cannot be read (permission denied)", 4: "has vanished"}
_ERROR_CODES = {Image.DecompressionBombError: 2, PermissionError: 3, FileNotFoundError: 4}  # any other error: 1


def read_image(path):
    """Decode an image file to RGB (palette / gray / RGBA files become RGB like CLIP's preprocess), its long side
    center-cropped to MAX_ASPECT times the short side. Raises the decoder's exception for a bad file."""
    with Image.open(path) as img:
        img = img.convert("RGB")
    w, h = img.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        cw, ch = min(w, MAX_ASPECT * h), min(h, MAX_ASPECT * w)
        left, top = (w - cw) // 2, (h - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
    return img


class UnreadableDataset(RuntimeError):
    """Not one image of a dataset can be read."""


class ImageList(Dataset):
    """(path, label) samples; item = (transform(RGB PIL image), label), label -1 when unknown.

    A file that cannot be read is never fatal. on_error="substitute" (training) returns the next readable sample
    in index order instead, so batch sizes, DDP and resume stay deterministic; on_error="skip" (evaluation)
    returns a blank image with label -1, which scoring ignores. Either way the file is flagged in `self.bad`
    (error code per sample, 0 = fine), a shared-memory tensor that DataLoader workers write and the main
    process reads (bad_files) to report each bad file once.
    """

    def __init__(self, samples, classnames, templates, transform=None, on_error="substitute", ignored=()):
        self.samples = samples
        self.classnames = classnames
        self.templates = templates
        self.transform = transform
        self.on_error = on_error
        self.ignored = list(ignored)  # (path, reason) of entries the listing left out
        self.bad = torch.zeros(len(samples), dtype=torch.int8).share_memory_()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        n = len(self.samples)
        for j in (index + k for k in range(n)) if self.on_error == "substitute" else (index,):
            j %= n
            path, label = self.samples[j]
            if self.bad[j]:
                continue
            try:
                img = read_image(path)
            except Exception as e:  # any decoder error, bomb, permission or vanished file
                self.bad[j] = next((code for cls, code in _ERROR_CODES.items() if isinstance(e, cls)), 1)
                continue
            return (self.transform(img) if self.transform is not None else img), label
        if self.on_error == "skip":
            blank = Image.new("RGB", (1, 1))
            return (self.transform(blank) if self.transform is not None else blank), -1
        raise UnreadableDataset(f"none of the {n} images can be read (e.g. {self.samples[index % n][0]})")

    def bad_files(self):
        """[(index, path, why)] of the files found unreadable so far."""
        return [(i, self.samples[i][0], _READ_ERRORS[int(self.bad[i])])
                for i in torch.nonzero(self.bad).flatten().tolist()]


def _list_images(root, seen=None, ignored=None):
    """Image files under root at any depth, sorted (hidden files and folders skipped). Symbolic links are followed
    without loops, each real file is listed once (`seen`: (device, inode) pairs shared across calls), and only
    regular files are kept; what is left out is appended to `ignored` as (path, reason).

    A folder that cannot be listed is left out so too, not silently (os.walk's default)."""
    seen = set() if seen is None else seen
    ignored = [] if ignored is None else ignored
    visited_dirs, paths = set(), []

    def unreadable(e):  # os.walk leaves out a folder it cannot list, silently unless told
        why = (e.strerror or type(e).__name__).lower()
        ignored.append((e.filename or root, f"folder cannot be read ({why})"))

    for folder, dirs, files in os.walk(root, onerror=unreadable, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in visited_dirs:  # a link back up the tree: walk it once
            ignored.append((folder, "folder already listed (a symbolic link to it, or a link loop)"))
            dirs[:] = []
            continue
        visited_dirs.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(IMG_EXTENSIONS):
                continue
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:
                ignored.append((path, "dangling symbolic link or unreadable entry"))
                continue
            if not stat.S_ISREG(st.st_mode):
                ignored.append((path, "not a regular file"))
            elif (st.st_dev, st.st_ino) in seen:
                ignored.append((path, "the same file is listed already"))
            else:
                seen.add((st.st_dev, st.st_ino))
                paths.append(path)
    return paths


def _require_dir(path, what):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist or is not a directory")


def scan_class_folders(split_dir, dataset, classnames, ignored=None):
    """Samples of an ImageFolder layout split_dir/<class>/**/<image>, labels mapped by name; entries the listing
    leaves out are appended to `ignored` (see _list_images)."""
    try:
        entries = list(os.scandir(split_dir))
    except OSError as e:  # as FileNotFoundError, which the command lines turn into one line
        raise FileNotFoundError(f"cannot list the class folders of {split_dir!r} "
                                f"({(e.strerror or type(e).__name__).lower()})") from None
    folders = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise FileNotFoundError(f"no class folders in {split_dir!r}: expected {split_dir}/<class name>/<images>")
    samples, seen, ignored = [], set(), [] if ignored is None else ignored
    for folder, label in zip(folders, map_class_names(dataset, folders, classnames)):
        samples += [(p, label) for p in _list_images(os.path.join(split_dir, folder), seen, ignored)]
    if not samples:
        raise FileNotFoundError(f"no images ({'/'.join(IMG_EXTENSIONS)}) in the class folders of "
                                f"{split_dir!r}{_left_out(ignored)}")
    return samples


def _left_out(ignored):
    """'; 3 entries left out, e.g. PATH: REASON' if the listing left some out: for the 'no images'
    errors, which come before the listing's warnings would be printed."""
    if not ignored:
        return ""
    path, reason = ignored[0]
    return f"; {len(ignored)} entries left out, e.g. {path}: {reason}"


def _enter_single_subfolder(path):
    """ImageNet-Sketch/sketch/<wnid>, imagenetv2/<variant>/<index>: a folder whose only entry is a folder
    that is not itself a class folder is entered."""
    while True:
        entries = [e for e in os.scandir(path) if not e.name.startswith(".")]
        if len(entries) != 1 or not entries[0].is_dir():
            return path
        name = entries[0].name
        if name.isdigit() or re.fullmatch(r"n\d{8}", name) or name in ("test", "val", "train"):
            return path
        path = entries[0].path


def shift_kind(folder):
    """The shifted ImageNet a folder name stands for, or None."""
    k = name_key(folder)
    if k.startswith("imagenetv2"):
        return "imagenet-v2"
    return {"imagenetr": "imagenet-r", "imagenetrendition": "imagenet-r", "imageneta": "imagenet-a",
            "imagenetadversarial": "imagenet-a", "imagenetsketch": "imagenet-sketch", "sketch": "imagenet-sketch",
            "imagenet": "imagenet"}.get(k)


_SHIFT_ORDER = ("imagenet", "imagenet-v2", "imagenet-r", "imagenet-a", "imagenet-sketch")  # Table 9's


def find_shift_sets(root):
    """[(set name, kind, path)] of the shifted ImageNets under root (eval.py --shift-root), in Table 9's order."""
    _require_dir(root, "shift root")
    found = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        kind = shift_kind(entry.name) if entry.is_dir() else None
        if kind is not None:
            found.append((kind, entry.name, _enter_single_subfolder(entry.path)))
    if not found:
        folders = sorted(e.name for e in os.scandir(root) if e.is_dir())
        raise FileNotFoundError(f"no shifted ImageNet under {root!r} (folders: {folders[:10]}); expected subfolders "
                                "named imagenetv2-*, imagenet-r, imagenet-a, imagenet-sketch (or imagenet with val/)")
    n_v2 = sum(kind == "imagenet-v2" for kind, _, _ in found)
    found.sort(key=lambda f: _SHIFT_ORDER.index(f[0]))
    return [(kind if kind != "imagenet-v2" or n_v2 == 1 else f"imagenet-v2 ({folder})", kind, path)
            for kind, folder, path in found]


def _split_dir(root, split):
    """root/train for 'train'; root/test or root/val for 'test'; None when absent."""
    for name in {"train": ("train",), "test": ("test", "val")}[split]:
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


def _holdout_split(samples, base, split):
    """Split 'test' (~20% of the samples) or 'train' (the others) of a dataset without an official test split
    (torchvision's SUN397, Caltech101). Deterministic: a hash of each path relative to base decides, so the split
    is the same on every machine and file-system order."""
    rel = [os.path.relpath(path, base).replace(os.sep, "/") for path, _ in samples]
    return [s for s, r in zip(samples, rel) if (zlib.crc32(r.encode()) % 5 == 0) == (split == "test")]


def _layout_dir(*parts):
    """Folder of a torchvision layout. A missing one raises RuntimeError, like torchvision's own "Dataset not
    found", which build_dataset turns into its message naming the layout and --download."""
    path = os.path.join(*parts)
    if not os.path.isdir(path):
        raise RuntimeError(f"Dataset not found: no folder {path!r}")
    return path


# Each reader of a torchvision layout returns (class names as torchvision spells them, [(path, its class name)]).
def _food101(root, split):
    base = os.path.join(root, "food-101")
    images, meta = _layout_dir(base, "images"), _layout_dir(base, "meta")
    with open(os.path.join(meta, f"{split}.json"), encoding="utf-8") as f:
        files = json.load(f)  # {class: ["class/id", ...]}, in the file's order
    samples = [(os.path.join(images, *f"{i}.jpg".split("/")), c) for c, ids in files.items() for i in ids]
    return sorted(files), samples


def _dtd(root, split):  # the paper's 3,760 training images are DTD's train + val (partition 1)
    base = _layout_dir(root, "dtd", "dtd")
    lines = [line for s in (("train", "val") if split == "train" else ("test",))  # each '<class>/<file>'
             for _, line in _read_lines(os.path.join(base, "labels", f"{s}1.txt"), "DTD split file")]
    samples = [(os.path.join(base, "images", *line.split("/")), line.split("/")[0]) for line in lines]
    return sorted({c for _, c in samples}), samples


def _gtsrb(root, split):
    """Classes are numbers 0..42 in prompt order: Training/<00000..00042>/*.ppm, the test images' in a CSV."""
    base, names = os.path.join(root, "gtsrb"), [str(i) for i in range(43)]
    if split == "test":
        images = _layout_dir(base, "GTSRB", "Final_Test", "Images")
        with open(os.path.join(base, "GT-final_test.csv"), newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter=";", skipinitialspace=True))
        return names, [(os.path.join(images, r["Filename"]), str(int(r["ClassId"]))) for r in rows]
    train = _layout_dir(base, "GTSRB", "Training")
    samples = []
    for folder in sorted(e.name for e in os.scandir(train) if e.is_dir() and not e.name.startswith(".")):
        if not (folder.isdigit() and int(folder) < len(names)):
            raise ValueError(f"GTSRB class folder {os.path.join(train, folder)!r} is not a class number "
                             "00000..00042")
        # the class folders also hold a GT-<class>.csv of boxes: only the .ppm files are images
        ppm = [p for p in _list_images(os.path.join(train, folder)) if p.lower().endswith(".ppm")]
        samples += [(p, str(int(folder))) for p in ppm]
    return names, samples


def _pets(root, split):
    base = os.path.join(root, "oxford-iiit-pet")
    images, notes = _layout_dir(base, "images"), _layout_dir(base, "annotations")
    rows = [line.split() for _, line in _read_lines(
        os.path.join(notes, "trainval.txt" if split == "train" else "test.txt"), "Oxford-IIIT Pet split file")]
    # row: <Breed_name>_<n> <official class id 1..37> <species> <breed id>; names in official id order, spelt
    # as torchvision does ('american_pit_bull_terrier' -> 'American Pit Bull Terrier')
    raw = {int(r[1]): r[0].rsplit("_", 1)[0] for r in rows}
    spelt = {i: " ".join(part.title() for part in raw[i].split("_")) for i in raw}
    names = [spelt[i] for i in sorted(raw)]
    return names, [(os.path.join(images, f"{r[0]}.jpg"), spelt[int(r[1])]) for r in rows]


def _sun397(root, split):
    base = _layout_dir(root, "SUN397")
    lines = [line for _, line in _read_lines(os.path.join(base, "ClassName.txt"), "SUN397 class list")]
    names = [line[3:] for line in lines]  # torchvision's spelling drops the '/a/' letter folder
    samples = []
    for line, name in zip(lines, names):  # line: '/a/apartment_building/outdoor', the class's folder
        folder = os.path.join(base, *line.strip("/").split("/"))
        files = sorted(f for f in os.listdir(folder) if f.startswith("sun_") and f.endswith(".jpg")
                       ) if os.path.isdir(folder) else []
        samples += [(os.path.join(folder, f), name) for f in files]
    return names, _holdout_split(samples, base, split)


def _caltech101(root, split):
    base = _layout_dir(root, "caltech101", "101_ObjectCategories")
    # torchvision drops BACKGROUND_Google; the published 102-class prompt list keeps it as 'background' (listed
    # last, after torchvision's sorted categories)
    names = sorted((e.name for e in os.scandir(base) if e.is_dir() and not e.name.startswith(".")),
                   key=lambda n: (n == "BACKGROUND_Google", n))
    samples = [(path, name) for name in names for path in _list_images(os.path.join(base, name))]
    return names, _holdout_split(samples, base, split)


# name: (reader, torchvision's layout (for messages), the public torchvision class that fetches and verifies the
# files under --download, whether that class is passed the split: DTD's, Pets', SUN397's, Caltech101's one
# archive holds every split)
_TORCHVISION = {
    "food101": (_food101, "root/food-101/", "Food101", True),
    "dtd": (_dtd, "root/dtd/dtd/", "DTD", False),
    "gtsrb": (_gtsrb, "root/gtsrb/GTSRB/", "GTSRB", True),
    "pets": (_pets, "root/oxford-iiit-pet/", "OxfordIIITPet", False),
    "sun397": (_sun397, "root/SUN397/", "SUN397", False),
    "caltech101": (_caltech101, "root/caltech101/", "Caltech101", False),
}


def _torchvision_samples(name, root, split, download, classnames):
    """Samples of torchvision's on-disk copy of a dataset, its class names mapped by name. The files are read here,
    not through torchvision's datasets, whose private attributes change between releases; download=True first
    lets torchvision's public constructor fetch and verify them."""
    read, layout, fetch, takes_split = _TORCHVISION[name]
    tv_root = os.path.expanduser(root)  # torchvision downloads to the expanded path
    try:
        if download:
            getattr(tv_datasets, fetch)(tv_root, download=True, **({"split": split} if takes_split else {}))
        names, samples = read(tv_root, split)
    except RuntimeError as e:  # torchvision's "Dataset not found ...", or _layout_dir's
        raise FileNotFoundError(
            f"no {name} under {root!r}: expected {root}/train/<class>/... and {root}/test/<class>/..., or "
            f"torchvision's layout {layout.replace('root', root)} (pass --download to fetch it) [{e}]") from None
    to_prompt = dict(zip(names, map_class_names(name, names, classnames)))
    return [(path, to_prompt[c]) for path, c in samples]


def _read_lines(path, what):
    """[(line number, text)] of a UTF-8 text file: stripped, blank lines and lines starting with '#' left out."""
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a directory; give a text file, one entry per line")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(i, line.strip()) for i, line in enumerate(f, 1)]
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path!r} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    return [(i, line) for i, line in lines if line and not line.startswith("#")]


def read_classnames(path):
    """Class names file: one name per line, at least 2; blank lines and lines starting with '#' are ignored.
    -> (names, line numbers)."""
    lines = _read_lines(path, "class names file")
    names = [name for _, name in lines]
    if len(names) < 2:
        raise ValueError(f"class names file {path!r} lists {len(names)} class(es); a classifier needs at least 2 "
                         "(one name per line)")
    keys = collections.Counter(name_key(n) for n in names)
    dup = sorted({n for n in names if keys[name_key(n)] > 1})
    if dup:
        raise ValueError(f"class names file {path!r} repeats class names (up to case/punctuation): {dup}")
    return names, [i for i, _ in lines]


def read_templates(path):
    """Templates file: one prompt per line with exactly one '{}' where the class name goes and no other braces;
    blank lines and lines starting with '#' are ignored. -> (templates, line numbers)."""
    lines = _read_lines(path, "templates file")
    if not lines:
        raise ValueError(f"templates file {path!r} lists no template (one per line, e.g. 'a photo of a {{}}.')")
    for i, t in lines:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(t) if f is not None]
        except ValueError:  # a lone '{' or '}'
            fields = None
        if fields != [""]:
            raise ValueError(f"templates file {path}, line {i}: {t!r} needs exactly one '{{}}' for the class name "
                             "and no other braces, e.g. 'a photo of a {}.'")
    return [t for _, t in lines], [i for i, _ in lines]


def check_prompt_lengths(classnames, templates, classes_at=None, templates_at=None):
    """ValueError naming the class and template (with file and line when given as (path, line numbers)) of a
    prompt longer than CLIP's 77-token context. Words are tokenized apart, so the longest prompt is the longest
    class name in some template or some class name in the longest template: K + T prompts are checked."""
    def count(texts):
        return ((clip_model.tokenize(texts, context_length=1000, truncate=True) > 0).sum(1)).tolist()

    longest_class = max(range(len(classnames)), key=count(classnames).__getitem__)
    longest_template = max(range(len(templates)), key=count([t.format("") for t in templates]).__getitem__)
    pairs = [(longest_class, j) for j in range(len(templates))] + [(i, longest_template)
                                                                   for i in range(len(classnames))]
    for (i, j), n in zip(pairs, count([templates[j].format(classnames[i]) for i, j in pairs])):
        if n > 77:
            where = [f"{what} {src[0]}, line {src[1][k]}" for what, src, k in
                     (("classes file", classes_at, i), ("templates file", templates_at, j)) if src]
            raise ValueError(f"the prompt {templates[j].format(classnames[i])[:80]!r} is {n} tokens; CLIP reads 77 "
                             f"at most: shorten the class name or the template"
                             + (f" ({'; '.join(where)})" if where else ""))


def build_dataset(name, root, split, transform, classes_file=None, templates_file=None, eval_root=None,
                  download=False):
    """Dataset of (transform(img), label) with .classnames (prompt order) and .templates.

    split: 'train' (unlabeled adaptation images) or 'test'. templates_file replaces the published templates;
    classes_file and eval_root are for name='folder'; download lets torchvision fetch its datasets. Training
    substitutes unreadable images, evaluation skips them (ImageList).
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name in _REGISTERED:
        return _REGISTERED[name][0](root, split, transform)
    if name == "folder":
        if classes_file is None:
            raise ValueError("dataset 'folder' needs a class names file (--classes FILE, one class name per line)")
        classnames, class_lines = read_classnames(classes_file)
        templates, classes_at = list(DEFAULT_TEMPLATES), (classes_file, class_lines)
    elif classes_file is not None:
        raise ValueError(f"--classes is only for dataset 'folder'; {name!r} uses the published class names")
    else:
        classnames, templates = dataset_prompts(name)
        classes_at = None  # the published prompts fit CLIP's context
    templates_at = None
    if templates_file:
        templates, lines = read_templates(templates_file)
        templates_at = (templates_file, lines)
    if classes_at or templates_at:
        check_prompt_lengths(classnames, templates, classes_at, templates_at)
    if name == "folder" and split == "test":
        if eval_root is None:
            raise ValueError("split 'test' of dataset 'folder' needs --eval-root DIR: labeled images in "
                             "DIR/<class name>/..., one folder per name in the classes file")
        _require_dir(eval_root, "eval root")
    elif not (download and name in _TORCHVISION):
        _require_dir(root, "dataset root")

    ignored = []
    if name == "folder" and split == "test":
        samples = scan_class_folders(eval_root, "folder", classnames, ignored)
    elif name == "folder":
        samples = [(p, -1) for p in _list_images(root, ignored=ignored)]  # unlabeled
        if not samples:
            raise FileNotFoundError(f"no images ({'/'.join(IMG_EXTENSIONS)}) found under {root!r}"
                                    f"{_left_out(ignored)}")
    elif name in _SHIFTED_IMAGENETS:  # transductive: both splits are the (unlabeled) test images
        images = _split_dir(root, split) or _split_dir(root, "test") or root
        samples = scan_class_folders(images, name, classnames, ignored)
    elif any(_split_dir(root, s) for s in ("train", "test")):
        split_dir = _split_dir(root, split)
        if split_dir is None:
            want = "train" if split == "train" else "test (or val)"
            raise FileNotFoundError(f"{root!r} has no {want} folder of class folders for split {split!r}")
        samples = scan_class_folders(split_dir, name, classnames, ignored)
    elif name in _TORCHVISION:
        samples = _torchvision_samples(name, root, split, download, classnames)
    else:
        what = "<wnid>/*.JPEG and val/<wnid>" if name == "imagenet" else "<ActionName>/**/*.jpg and test/<ActionName>"
        raise FileNotFoundError(f"no {name} under {root!r}: expected {root}/train/{what}/...")
    if not samples:
        raise FileNotFoundError(f"no {split} images of {name} found under {root!r}")
    return ImageList(samples, classnames, templates, transform, "substitute" if split == "train" else "skip", ignored)


# ----------------------------------------------------------------------------------------------------------
# Views and mask (paper §3: teacher sees the weak view, student the strong view with masked patches)


# CLIP's evaluation preprocessing: bicubic resize of the shorter side, center crop, normalize.
test_transform = clip_model.image_transform


# RandAugment as the release runs it: timm 0.4.12's rand_augment_transform('rand-m9-mstd0.5-inc1', hparams) with
# the hparams timm's create_transform builds from the release's arguments: fill color img_mean = CLIP's mean in
# 0-255 (rounded), interpolation bicubic (--train_interpolation), translate_pct left at its 0.45 default. Each op
# below takes a magnitude in [0, 10] and the sign draw, and computes its parameter with the same floating-point
# expression as timm's level function, so that given the same magnitude and sign its pixels are bit-equal
# (tests/test_randaugment.py checks this against fixtures written by timm itself).

_MAX_MAGNITUDE = 10.0
_FILL = tuple(min(255, round(255 * m)) for m in CLIP_MEAN)  # pixels a geometric op uncovers get the mean color
_RESAMPLE = Image.BICUBIC


def _level(magnitude, top, negate=False):
    """An op's parameter at this magnitude: magnitude / 10 of its value at magnitude 10, negated on a sign draw."""
    value = magnitude / _MAX_MAGNITUDE * top
    return -value if negate else value


def _lut(img, table):
    return img.point(table * len(img.getbands()))


def _unparameterized(op, img, magnitude, negate):  # AutoContrast, Equalize, Invert
    return op(img)


def _rotate(img, magnitude, negate):
    # about the centre, same canvas, up to ±30°
    return img.rotate(_level(magnitude, 30.0, negate), resample=_RESAMPLE, fillcolor=_FILL)


def _posterize_increasing(img, magnitude, negate):
    # keeps 4 bits at magnitude 0 down to 0 bits (a black image) at 10. Our own table, not ImageOps.posterize:
    # Pillow of the release's era accepted 0 bits, current Pillow raises on it.
    bits = 4 - int(_level(magnitude, 4))
    keep = 0xFF & ~(2 ** (8 - bits) - 1)
    return _lut(img, [i & keep for i in range(256)])


def _solarize_increasing(img, magnitude, negate):
    # inverts values >= threshold; the threshold falls from 256 (no-op) to 0 (full inversion)
    return ImageOps.solarize(img, 256 - int(_level(magnitude, 256)))


def _solarize_add(img, magnitude, negate):
    add = int(_level(magnitude, 110))
    return _lut(img, [min(255, i + add) if i < 128 else i for i in range(256)])


def _enhance(enhancer, img, magnitude, negate):  # an ImageEnhance class: Color, Contrast, Brightness, Sharpness
    # 1 is the identity; the distortion grows with magnitude towards 0.1 or 1.9
    return enhancer(img).enhance(1.0 + _level(magnitude, 0.9, negate))


def _affine(name, img, magnitude, negate):
    # PIL's affine maps output pixel (x, y) to input (a·x + b·y + c, d·x + e·y + f): shears pivot on the
    # top-left corner, not the centre, and translations (up to 45% of the side) may be fractional (then
    # bicubic-resampled)
    shear, shift = _level(magnitude, 0.3, negate), _level(magnitude, 0.45, negate)
    coeffs = {"ShearX": (1, shear, 0, 0, 1, 0), "ShearY": (1, 0, 0, shear, 1, 0),
              "TranslateXRel": (1, 0, shift * img.size[0], 0, 1, 0),
              "TranslateYRel": (1, 0, 0, 0, 1, shift * img.size[1])}[name]
    return img.transform(img.size, Image.AFFINE, coeffs, resample=_RESAMPLE, fillcolor=_FILL)


# timm's 'inc1' op list, in its order (the order matters: the op index is a random draw)
_RANDAUG_OPS = {
    "AutoContrast": functools.partial(_unparameterized, ImageOps.autocontrast),
    "Equalize": functools.partial(_unparameterized, ImageOps.equalize),
    "Invert": functools.partial(_unparameterized, ImageOps.invert),
    "Rotate": _rotate,
    "PosterizeIncreasing": _posterize_increasing,
    "SolarizeIncreasing": _solarize_increasing,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": functools.partial(_enhance, ImageEnhance.Color),
    "ContrastIncreasing": functools.partial(_enhance, ImageEnhance.Contrast),
    "BrightnessIncreasing": functools.partial(_enhance, ImageEnhance.Brightness),
    "SharpnessIncreasing": functools.partial(_enhance, ImageEnhance.Sharpness),
    "ShearX": functools.partial(_affine, "ShearX"),
    "ShearY": functools.partial(_affine, "ShearY"),
    "TranslateXRel": functools.partial(_affine, "TranslateXRel"),
    "TranslateYRel": functools.partial(_affine, "TranslateYRel"),
}
# ops whose parameter has a random sign; only these consume a sign draw (as in timm)
_SIGNED_OPS = frozenset({"Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                         "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})


class RandAugment:
    """RandAugment (Cubuk et al., 2020) with magnitude noise, the paper's strong view: the release's timm 0.4.12
    'rand-m9-mstd0.5-inc1' (ops in _RANDAUG_OPS) with all randomness drawn from torch's global RNG, so a
    loader that seeds torch per sample reproduces it.

    Draws per image, in this order:
      1. num_ops op indices, uniform over the 15 ops, with replacement: torch.randint(15, (num_ops,));
      2. for each drawn op in turn:
         a. if prob < 1: u = torch.rand(()); the op is skipped (no further draws) when u > prob;
         b. if magnitude_std > 0: magnitude + magnitude_std * torch.randn(()), then clipped to [0, 10]
            (drawn even for the ops that ignore the magnitude);
         c. for the ops in _SIGNED_OPS only: negate = torch.rand(()) > 0.5.
    This is timm's order (np.random.choice for 1, then random.random, random.gauss, random.random), so only
    the random source differs."""

    def __init__(self, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5):
        self.num_ops, self.magnitude, self.magnitude_std, self.prob = num_ops, magnitude, magnitude_std, prob
        self.op_names = list(_RANDAUG_OPS)  # names, not functions: the transform must pickle for spawned workers

    def __call__(self, img):
        for i in torch.randint(len(self.op_names), (self.num_ops,)).tolist():
            if self.prob < 1.0 and torch.rand(()).item() > self.prob:
                continue
            m = self.magnitude
            if self.magnitude_std > 0:
                m += self.magnitude_std * torch.randn(()).item()
            name = self.op_names[i]
            negate = name in _SIGNED_OPS and torch.rand(()).item() > 0.5
            img = _RANDAUG_OPS[name](img, min(max(m, 0.0), _MAX_MAGNITUDE), negate)
        return img


class MaskGenerator:
    """SimMIM patch-aligned random masking (paper §3.2): the image is cut into (input_size / mask_unit)²
    mask units of s×s px, exactly ceil(mask_ratio × units) of them are masked, and each masked unit covers a
    full (mask_unit / patch_size)² block of ViT patches. __call__ -> BoolTensor (grid²,), True = masked."""

    def __init__(self, input_size, mask_unit, patch_size, mask_ratio):
        if mask_unit % patch_size:
            raise ValueError(f"mask_unit {mask_unit} must be a multiple of the patch size {patch_size} "
                             f"(e.g. --mask-unit {max(patch_size, round(mask_unit / patch_size) * patch_size)})")
        if input_size % mask_unit:
            raise ValueError(f"input size {input_size} must be a multiple of mask_unit {mask_unit}")
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        self.units_per_side = input_size // mask_unit
        self.patches_per_unit = mask_unit // patch_size
        # rounded up, as the release's generator does (np.ceil of the same float product, so a product a rounding
        # error above an integer, e.g. 100 units x 0.55, is rounded up too): UCF101 ViT-L/14 masks 7 of 64 units
        self.num_masked = math.ceil(self.units_per_side ** 2 * mask_ratio)

    def __call__(self):
        g, s = self.units_per_side, self.patches_per_unit
        units = torch.zeros(g * g, dtype=torch.bool)
        units[torch.randperm(g * g)[:self.num_masked]] = True
        patches = units.view(g, g).repeat_interleave(s, dim=0).repeat_interleave(s, dim=1)  # (g*s, g*s)
        return patches.flatten()  # (grid*grid,), row-major like the ViT's patch tokens


STRONG_VIEWS = ("paper", "light")


def strong_view(input_size, kind="paper"):
    """The student's strong augmentation (PIL image -> PIL image), before ToTensor and normalization.

    paper: RandomResizedCrop 0.3-1 + flip + RandAugment (timm's rand-m9-mstd0.5-inc1), the release's view for 224 px
    photos of a web-trained CLIP. light: translation by up to 10% of the side (edge padding) + flip +
    brightness/contrast jitter 0.3. At 32 px the paper's ops (crops of a third of the image, posterize,
    equalize, 9/30 translations) destroy the object, and a CLIP pretrained on a small world was never taught
    to read them; light is the toy world's view, and the toy CLIP is pretrained with it (toy.PRETRAIN)."""
    if kind == "paper":
        return T.Compose([T.RandomResizedCrop(input_size, scale=(0.3, 1.0), interpolation=InterpolationMode.BICUBIC),
                          T.RandomHorizontalFlip(), RandAugment(num_ops=2, magnitude=9.0, magnitude_std=0.5)])
    if kind == "light":
        return T.Compose([T.Resize(input_size, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(input_size),
                          T.RandomCrop(input_size, padding=max(1, input_size // 10), padding_mode="edge"),
                          T.RandomHorizontalFlip(), T.ColorJitter(brightness=0.3, contrast=0.3)])
    raise ValueError(f"unknown strong view {kind!r}; expected one of {', '.join(STRONG_VIEWS)}")


class TrainTransform:
    """One decoded PIL image -> (weak, strong, mask): the teacher's weak view (bicubic resize + random crop),
    the student's strong view (strong_view(input_size, strong): 'paper' or 'light') and its patch mask."""

    def __init__(self, input_size, mask_generator, strong="paper"):
        self.weak = T.Compose([
            T.Resize(input_size, interpolation=InterpolationMode.BICUBIC), T.RandomCrop(input_size),
            T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
        self.strong = T.Compose([strong_view(input_size, strong), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
        self.mask_generator = mask_generator

    def __call__(self, img):
        return self.weak(img), self.strong(img), self.mask_generator()
