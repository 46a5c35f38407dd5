"""
Data for MUST: per-dataset hyperparameters (paper Table 10), datasets with labels in the published prompt
order, the two augmented views + patch mask of one training image (paper §3), and seeding for loaders.

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

import math
import os
import random
import re
import zlib

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

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
                 *_SHIFTED_IMAGENETS, "folder", "toy"]

# (patch size, input size) of the released CLIPs; the model whose Table 10 rows a model borrows, best first
_MODEL_GEOMETRY = {"ViT-B/32": (32, 224), "ViT-B/16": (16, 224), "ViT-L/14": (14, 224), "ViT-L/14@336px": (14, 336)}
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
    if dataset == "toy":
        import toy  # lazy: the toy world is only needed for toy runs
        return dict(toy.HPARAMS)
    if dataset not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASET_NAMES)}")
    table_dataset = dataset if any(d == dataset for d, _ in HPARAMS) else "imagenet"
    preference = _ROW_PREFERENCE.get(model_name, ("ViT-B/16", "ViT-L/14"))
    row_model = next(m for m in preference if (table_dataset, m) in HPARAMS)
    hp = dict(HPARAMS[(table_dataset, row_model)])
    batch_size = GLOBAL_BATCH[preference[0]]
    hp["base_lr"] *= GLOBAL_BATCH[row_model] / batch_size
    known_patch, known_size = _MODEL_GEOMETRY.get(model_name, (None, None))
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
# published prompt names; every other name of every dataset matches after _name_key.
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


def _name_key(name):
    """Spelling-insensitive key: 'Apply_Eye_Makeup', 'ApplyEyeMakeup', 'apply eye makeup' -> 'applyeyemakeup';
    SUN397's 'apartment_building/outdoor' -> 'apartmentbuildingoutdoor'."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _wnids(dataset):
    return {"imagenet": prompts.IMAGENET_WNIDS, "imagenet-sketch": prompts.IMAGENET_WNIDS,
            "imagenet-v2": prompts.IMAGENET_WNIDS, "imagenet-r": prompts.IMAGENET_R_WNIDS,
            "imagenet-a": prompts.IMAGENET_A_WNIDS}.get(dataset, [])


def dataset_prompts(dataset):
    """(classnames, templates) of a named dataset, in label order."""
    if dataset in ("imagenet-r", "imagenet-a"):
        imagenet = prompts.DATASETS["imagenet"]
        index = {w: i for i, w in enumerate(prompts.IMAGENET_WNIDS)}
        return [imagenet["classes"][index[w]] for w in _wnids(dataset)], list(imagenet["templates"])
    entry = prompts.DATASETS["imagenet" if dataset in _SHIFTED_IMAGENETS else dataset]
    return list(entry["classes"]), list(entry["templates"])


def map_class_names(dataset, names, classnames):
    """Label (index into classnames) of each folder / torchvision class name; ValueError lists the ones that
    match no class. A name matches a wnid of the dataset, a class index (gtsrb, imagenet-v2), or a class
    name / known alias up to spelling (_name_key). Names that two classes share (ImageNet's two 'missile's
    and 'sunglasses') only resolve through wnids."""
    by_key, ambiguous = {}, set()
    for i, c in enumerate(classnames):
        k = _name_key(c)
        if k in by_key:
            ambiguous.add(k)
        by_key[k] = i
    for k in ambiguous:
        del by_key[k]
    for alias, target in _ALIASES.get(dataset, {}).items():
        by_key[_name_key(alias)] = by_key[_name_key(target)]
    by_wnid = {w: i for i, w in enumerate(_wnids(dataset))}
    labels, unknown = [], []
    for name in names:
        if name in by_wnid:
            label = by_wnid[name]
        elif dataset in _INDEX_NAMED and name.isdigit() and int(name) < len(classnames):
            label = int(name)
        else:
            label = by_key.get(_name_key(name))
        if label is None:
            unknown.append(name)
        labels.append(label)
    if unknown:
        hint = " (these ImageNet names are ambiguous; use wnid folders)" if any(
            _name_key(n) in ambiguous for n in unknown) else ""
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


class ImageList(Dataset):
    """(path, label) samples; item = (transform(RGB PIL image), label), label -1 when unknown."""

    def __init__(self, samples, classnames, templates, transform=None):
        self.samples = samples
        self.classnames = classnames
        self.templates = templates
        self.transform = transform

    @property
    def targets(self):
        return [label for _, label in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        with Image.open(path) as img:
            img = img.convert("RGB")  # one decode; palette / gray / RGBA files become RGB like CLIP's preprocess
        return (self.transform(img) if self.transform is not None else img), label


def _list_images(root):
    """Image files under root at any depth, sorted (hidden files and folders skipped)."""
    paths = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [os.path.join(folder, f) for f in sorted(files)
                  if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS)]
    return paths


def _require_dir(path, what):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist or is not a directory")


def scan_class_folders(split_dir, dataset, classnames):
    """Samples of an ImageFolder layout split_dir/<class>/**/<image>, labels mapped by name."""
    folders = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise FileNotFoundError(f"no class folders in {split_dir!r}: expected {split_dir}/<class name>/<images>")
    samples = []
    for folder, label in zip(folders, map_class_names(dataset, folders, classnames)):
        samples += [(p, label) for p in _list_images(os.path.join(split_dir, folder))]
    if not samples:
        raise FileNotFoundError(f"no images ({'/'.join(IMG_EXTENSIONS)}) in the class folders of {split_dir!r}")
    return samples


def _split_dir(root, split):
    """root/train for 'train'; root/test or root/val for 'test'; None when absent."""
    for name in {"train": ("train",), "test": ("test", "val")}[split]:
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


def _is_holdout(path, base):
    """Deterministic ~20% test split for datasets without an official one (torchvision's SUN397, Caltech101):
    a hash of the relative path, so the split is the same on every machine and file-system order."""
    rel = os.path.relpath(path, base).replace(os.sep, "/")
    return zlib.crc32(rel.encode()) % 5 == 0


def _torchvision_samples(name, root, split, download):
    """(paths, class names, labels) of torchvision's copy of a dataset; labels index the class names."""
    if name == "food101":
        ds = tv_datasets.Food101(root, split=split, download=download)
        return ds._image_files, ds.classes, ds._labels
    if name == "dtd":  # the paper's 3,760 training images are DTD's train + val
        parts = [tv_datasets.DTD(root, split=s, partition=1, download=download)
                 for s in (("train", "val") if split == "train" else ("test",))]
        names = sorted({c for d in parts for c in d.classes})
        return ([p for d in parts for p in d._image_files], names,
                [names.index(d.classes[y]) for d in parts for y in d._labels])
    if name == "gtsrb":  # numeric classes 0..42 in prompt order
        ds = tv_datasets.GTSRB(root, split=split, download=download)
        return [p for p, _ in ds._samples], [str(i) for i in range(43)], [y for _, y in ds._samples]
    if name == "pets":
        ds = tv_datasets.OxfordIIITPet(root, split="trainval" if split == "train" else "test", download=download)
        return ds._images, ds.classes, ds._labels
    if name == "sun397":
        ds = tv_datasets.SUN397(root, download=download)
        base = ds._data_dir
        keep = [_is_holdout(p, base) == (split == "test") for p in ds._image_files]
        return ([p for p, k in zip(ds._image_files, keep) if k], ds.classes,
                [y for y, k in zip(ds._labels, keep) if k])
    if name == "caltech101":
        ds = tv_datasets.Caltech101(root, target_type="category", download=download)
        base = os.path.join(ds.root, "101_ObjectCategories")
        paths = [os.path.join(base, ds.categories[y], f"image_{i:04d}.jpg") for i, y in zip(ds.index, ds.y)]
        labels = list(ds.y)
        # torchvision drops BACKGROUND_Google; the published 102-class prompt list keeps it as 'background'
        background = _list_images(os.path.join(base, "BACKGROUND_Google"))
        names = ds.categories + ["BACKGROUND_Google"]
        paths, labels = paths + background, labels + [len(names) - 1] * len(background)
        keep = [_is_holdout(p, base) == (split == "test") for p in paths]
        return [p for p, k in zip(paths, keep) if k], names, [y for y, k in zip(labels, keep) if k]
    raise AssertionError(name)


_TORCHVISION_LAYOUT = {"food101": "root/food-101/", "dtd": "root/dtd/dtd/", "gtsrb": "root/gtsrb/GTSRB/",
                       "pets": "root/oxford-iiit-pet/", "sun397": "root/SUN397/", "caltech101": "root/caltech101/"}


def _read_lines(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


def read_classnames(path):
    """Class names file: one name per line; blank lines and '#' comments ignored."""
    names = _read_lines(path, "class names file")
    if not names:
        raise ValueError(f"class names file {path!r} lists no class (one name per line)")
    keys = [_name_key(n) for n in names]
    dup = sorted({n for n, k in zip(names, keys) if keys.count(k) > 1})
    if dup:
        raise ValueError(f"class names file {path!r} repeats class names (up to case/punctuation): {dup}")
    return names


def read_templates(path):
    """Templates file: one prompt per line with '{}' where the class name goes; blanks / '#' ignored."""
    templates = _read_lines(path, "templates file")
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"templates file {path!r} needs one template per line, each with '{{}}' for the class "
                         f"name, e.g. 'a photo of a {{}}.'; bad lines: {bad[:5]}")
    return templates


def _folder_dataset(root, split, transform, classes_file, templates_file, eval_root):
    if classes_file is None:
        raise ValueError("dataset 'folder' needs a class names file (--classes FILE, one class name per line)")
    classnames = read_classnames(classes_file)
    templates = read_templates(templates_file) if templates_file else list(DEFAULT_TEMPLATES)
    if split == "train":
        _require_dir(root, "dataset root")
        paths = _list_images(root)
        if not paths:
            raise FileNotFoundError(f"no images ({'/'.join(IMG_EXTENSIONS)}) found under {root!r}")
        samples = [(p, -1) for p in paths]  # unlabeled
    else:
        if eval_root is None:
            raise ValueError("split 'test' of dataset 'folder' needs --eval-root DIR: labeled images in "
                             "DIR/<class name>/..., one folder per name in the classes file")
        _require_dir(eval_root, "eval root")
        samples = scan_class_folders(eval_root, "folder", classnames)
    return ImageList(samples, classnames, templates, transform)


def build_dataset(name, root, split, transform, classes_file=None, templates_file=None, eval_root=None,
                  download=False):
    """Dataset of (transform(img), label) with .classnames (prompt order) and .templates.

    split: 'train' (unlabeled adaptation images) or 'test'. templates_file replaces the published templates;
    classes_file and eval_root are for name='folder'; download lets torchvision fetch its datasets.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "toy":
        import toy  # lazy: only toy runs need the toy world
        return toy.build_dataset(root, split, transform)
    if name == "folder":
        return _folder_dataset(root, split, transform, classes_file, templates_file, eval_root)
    if classes_file is not None:
        raise ValueError(f"--classes is only for dataset 'folder'; {name!r} uses the published class names")
    classnames, templates = dataset_prompts(name)
    if templates_file:
        templates = read_templates(templates_file)
    if not (download and name in _TORCHVISION_LAYOUT):
        _require_dir(root, "dataset root")

    split_dir = _split_dir(root, split) if os.path.isdir(root) else None
    folder_layout = os.path.isdir(root) and any(_split_dir(root, s) for s in ("train", "test"))
    if name in _SHIFTED_IMAGENETS:  # transductive: both splits are the (unlabeled) test images
        samples = scan_class_folders(split_dir or _split_dir(root, "test") or root, name, classnames)
    elif folder_layout:
        if split_dir is None:
            want = "train" if split == "train" else "test (or val)"
            raise FileNotFoundError(f"{root!r} has no {want} folder of class folders for split {split!r}")
        samples = scan_class_folders(split_dir, name, classnames)
    elif name in _TORCHVISION_LAYOUT:
        try:
            paths, tv_names, tv_labels = _torchvision_samples(name, root, split, download)
        except RuntimeError as e:  # torchvision's "Dataset not found ..."
            raise FileNotFoundError(
                f"no {name} under {root!r}: expected {root}/train/<class>/... and {root}/test/<class>/..., or "
                f"torchvision's layout {_TORCHVISION_LAYOUT[name].replace('root', root)} (pass --download to "
                f"fetch it) [{e}]") from None
        to_prompt = map_class_names(name, list(tv_names), classnames)
        samples = [(str(p), to_prompt[y]) for p, y in zip(paths, tv_labels)]
    else:
        what = "<wnid>/*.JPEG and val/<wnid>" if name == "imagenet" else "<ActionName>/**/*.jpg and test/<ActionName>"
        raise FileNotFoundError(f"no {name} under {root!r}: expected {root}/train/{what}/...")
    if not samples:
        raise FileNotFoundError(f"no {split} images of {name} found under {root!r}")
    return ImageList(samples, classnames, templates, transform)


# ----------------------------------------------------------------------------------------------------------
# Views and mask (paper §3: teacher sees the weak view, student the strong view with masked patches)


def _normalize():
    return T.Normalize(CLIP_MEAN, CLIP_STD)


def test_transform(input_size):
    """CLIP's evaluation preprocessing: bicubic resize of the shorter side, center crop, normalize."""
    return clip_model.image_transform(input_size)


def _rand_sign(v):
    return -v if torch.rand(()).item() < 0.5 else v


_FILL = tuple(round(255 * m) for m in CLIP_MEAN)  # geometric ops fill uncovered pixels with the mean color


def _solarize_add(img, level):
    add = int(110 * level)
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _affine(img, translate=(0, 0), shear=(0.0, 0.0), angle=0.0):
    return TF.affine(img, angle=angle, translate=list(translate), scale=1.0, shear=list(shear),
                     interpolation=InterpolationMode.BILINEAR, fill=list(_FILL))


def _shear_deg(level):
    return math.degrees(math.atan(_rand_sign(0.3 * level)))  # shear factor up to 0.3, as an angle


# level in [0, 1] = magnitude / 10; "increasing" variants: a larger level is always a stronger distortion
_RANDAUG_OPS = {
    "AutoContrast": lambda img, lv: TF.autocontrast(img),
    "Equalize": lambda img, lv: TF.equalize(img),
    "Invert": lambda img, lv: TF.invert(img),
    "Rotate": lambda img, lv: _affine(img, angle=_rand_sign(30.0 * lv)),
    "Posterize": lambda img, lv: TF.posterize(img, max(1, 4 - int(4 * lv))),  # PIL keeps >= 1 bit
    "Solarize": lambda img, lv: TF.solarize(img, int(256 - 256 * lv)),
    "SolarizeAdd": _solarize_add,
    "Color": lambda img, lv: TF.adjust_saturation(img, 1.0 + _rand_sign(0.9 * lv)),
    "Contrast": lambda img, lv: TF.adjust_contrast(img, 1.0 + _rand_sign(0.9 * lv)),
    "Brightness": lambda img, lv: TF.adjust_brightness(img, 1.0 + _rand_sign(0.9 * lv)),
    "Sharpness": lambda img, lv: TF.adjust_sharpness(img, 1.0 + _rand_sign(0.9 * lv)),
    "ShearX": lambda img, lv: _affine(img, shear=(_shear_deg(lv), 0.0)),
    "ShearY": lambda img, lv: _affine(img, shear=(0.0, _shear_deg(lv))),
    "TranslateX": lambda img, lv: _affine(img, translate=(round(_rand_sign(0.45 * lv) * img.width), 0)),
    "TranslateY": lambda img, lv: _affine(img, translate=(0, round(_rand_sign(0.45 * lv) * img.height))),
}


class RandAugment:
    """RandAugment (Cubuk et al., 2020) with magnitude noise, as the paper's strong view uses it: num_ops ops
    drawn with replacement, each applied with probability prob at magnitude ~ N(magnitude, magnitude_std²)
    clipped to [0, 10]. All randomness comes from torch's RNG, so seeded loaders reproduce it."""

    def __init__(self, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5):
        self.num_ops, self.magnitude, self.magnitude_std, self.prob = num_ops, magnitude, magnitude_std, prob
        self.op_names = list(_RANDAUG_OPS)  # names, not lambdas: the transform must pickle for spawned workers

    def __call__(self, img):
        for i in torch.randint(len(self.op_names), (self.num_ops,)).tolist():
            if torch.rand(()).item() >= self.prob:
                continue
            m = self.magnitude + self.magnitude_std * torch.randn(()).item()
            img = _RANDAUG_OPS[self.op_names[i]](img, min(max(m, 0.0), 10.0) / 10.0)
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

    paper: RandomResizedCrop 0.3-1 + flip + RandAugment (2 ops, m9 with noise), the release's view for 224 px
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
            T.ToTensor(), _normalize()])
        self.strong = T.Compose([strong_view(input_size, strong), T.ToTensor(), _normalize()])
        self.mask_generator = mask_generator

    def __call__(self, img):
        return self.weak(img), self.strong(img), self.mask_generator()


# ----------------------------------------------------------------------------------------------------------
# Reproducible loading: DataLoader(..., generator=loader_generator(seed, rank), worker_init_fn=seed_worker).
# The loader's generator draws each epoch's base seed; worker i's torch RNG is seeded base_seed + i, and every
# random op above uses torch's RNG, so a run with the same seed, world size and num_workers sees the same views.


def loader_generator(seed, rank=0):
    """torch.Generator for a DataLoader on this rank (distinct ranks draw distinct augmentations)."""
    return torch.Generator().manual_seed(seed + 1000003 * rank)


def seed_worker(worker_id):
    """worker_init_fn: seed Python's and numpy's RNGs from the worker's torch seed (for any op using them)."""
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
