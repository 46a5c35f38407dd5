"""The datasets on disk, for data.build_dataset: listing folders, reading images (a bad
file is never fatal), torchvision's layouts, and the --classes and --templates files.

Class folders map to the dataset's label order by name (or wnid), never by position.
What a listing leaves out goes to `ignored` as (path, reason), for commands to report.
"""
import collections
import csv
import json
import os
import stat
import string
import unicodedata
import zlib

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif",
                  ".tiff", ".gif")

# Caltech101's folder names whose words differ from the published prompt names; every
# other name matches after name_key.
_ALIASES = {
    "caltech101": {
        "BACKGROUND_Google": "background",
        "Faces": "off-center face", "Faces_easy": "centered face",
        "Leopards": "leopard", "Motorbikes": "motorbike", "airplanes": "airplane",
        "car_side": "side of a car",
        "cougar_body": "body of a cougar cat", "cougar_face": "face of a cougar cat",
        "crocodile_head": "head of a  crocodile", "flamingo_head": "head of a flamingo",
        "snoopy": "snoopy (cartoon beagle)", "yin_yang": "yin and yang symbol",
    },
}
# Datasets whose folders may be named by class index (GTSRB's, ImageNetV2's).
_INDEX_NAMED = ("gtsrb", "imagenet-v2")


def name_key(name):
    """A class name's letters, digits and marks in any script, case-folded, in NFKC
    form: 'Apply_Eye_Makeup', 'apply eye makeup' -> 'applyeyemakeup'; '猫' -> '猫'."""
    folded = unicodedata.normalize("NFKC", name).casefold()
    return "".join(c for c in folded if unicodedata.category(c)[0] in "LMN")


def map_class_names(dataset, names, classnames, wnids=()):
    """The label (index into classnames) of each folder name: a wnid (of `wnids`, in
    label order), a class index (gtsrb, imagenet-v2), or a class name or alias up to
    spelling. A name two classes share (ImageNet's 'missile') needs wnids."""
    keys = collections.Counter(name_key(c) for c in classnames)
    ambiguous = {k for k, n in keys.items() if n > 1}
    by_key = {name_key(c): i for i, c in enumerate(classnames)
              if keys[name_key(c)] == 1}
    for alias, target in _ALIASES.get(dataset, {}).items():
        by_key[name_key(alias)] = by_key[name_key(target)]
    by_wnid = {w: i for i, w in enumerate(wnids)}
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
        shown = ', '.join(repr(n) for n in unknown[:20])
        more = ' ...' if len(unknown) > 20 else ''
        examples = ', '.join(repr(c) for c in classnames[:3])
        raise ValueError(f"{len(unknown)} class folder(s) of {dataset!r} match no "
                         f"class name{hint}: {shown}{more}; rename them to class "
                         f"names, e.g. {examples}")
    seen = {}
    for name, label in zip(names, labels):
        if label in seen:
            raise ValueError(f"class folders {seen[label]!r} and {name!r} of "
                             f"{dataset!r} both map to class {classnames[label]!r}; "
                             "keep one")
        seen[label] = name
    return labels


# ----------------------------------------------------------------------------
# Reading images and listing folders

# The largest aspect ratio read: CLIP's pipelines resize the short side first, so a
# 1 x 10000 image would otherwise become 224 x 2,240,000 pixels in memory.
MAX_ASPECT = 4
_READ_ERRORS = {1: "cannot be decoded (truncated, empty or not an image)",
                2: "is larger than PIL's decompression-bomb limit",
                3: "cannot be read (permission denied)",
                4: "has vanished"}
# Any other error is code 1.
_ERROR_CODES = {Image.DecompressionBombError: 2, PermissionError: 3,
                FileNotFoundError: 4}


def read_image(path):
    """An image as RGB, its long side center-cropped to MAX_ASPECT times the short."""
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
    """(path, label) samples as (transform(RGB image), label), label -1 when unknown.

    An unreadable file is never fatal: on_error="substitute" (training) gives the next
    readable sample, so batches stay deterministic; "skip" (evaluation) gives a blank
    image of label -1, which scoring ignores. Either way `self.bad`, a shared-memory
    tensor the loader workers write, flags it (an error code) for bad_files to report.
    """

    def __init__(self, samples, classnames, templates, transform=None,
                 on_error="substitute", ignored=()):
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
        substitute = self.on_error == "substitute"
        for j in (index + k for k in range(n)) if substitute else (index,):
            j %= n
            path, label = self.samples[j]
            if self.bad[j]:
                continue
            try:
                img = read_image(path)
            except Exception as e:  # a decoder error, a bomb, no permission, vanished
                codes = [code for kind, code in _ERROR_CODES.items()
                         if isinstance(e, kind)]
                self.bad[j] = codes[0] if codes else 1
                continue
            return (self.transform(img) if self.transform is not None else img), label
        if self.on_error == "skip":
            blank = Image.new("RGB", (1, 1))
            return (self.transform(blank) if self.transform is not None else blank), -1
        example_path = self.samples[index % n][0]
        raise UnreadableDataset(
            f"none of the {n} images can be read (e.g. {example_path})")

    def bad_files(self):
        """[(index, path, why)] of the files found unreadable so far."""
        return [(i, self.samples[i][0], _READ_ERRORS[int(self.bad[i])])
                for i in torch.nonzero(self.bad).flatten().tolist()]


def list_images(root, seen=None, ignored=None):
    """Image files under root at any depth, sorted, hidden ones skipped. Links are
    followed without loops, each real file is listed once (`seen`: (device, inode)
    pairs shared across calls), and what is left out goes to `ignored`."""
    seen = set() if seen is None else seen
    ignored = [] if ignored is None else ignored
    visited_dirs, paths = set(), []

    def unreadable(e):  # os.walk's default passes over it silently
        why = (e.strerror or type(e).__name__).lower()
        ignored.append((e.filename or root, f"folder cannot be read ({why})"))

    real_root = os.path.realpath(root)
    for folder, dirs, files in os.walk(root, onerror=unreadable, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in visited_dirs:  # a link back up the tree
            why = "folder already listed (a symbolic link to it, or a link loop)"
            ignored.append((folder, why))
            dirs[:] = []
            continue
        # A link to a folder above root loops through other folders (in a split, the
        # other classes') before it comes back: nothing it reaches is root's.
        real = os.path.realpath(folder)
        if real != real_root and os.path.commonpath([real, real_root]) == real:
            why = "a symbolic link to a folder above it (a link loop)"
            ignored.append((folder, why))
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


def _subfolders(entries):
    """The sorted names of the visible folders among os.scandir's entries."""
    return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def require_dir(path, what):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist or is not a directory")


def scan_class_folders(split_dir, dataset, classnames, ignored=None, wnids=()):
    """Samples of split_dir/<class>/**/<image>, labels mapped by name (or wnid)."""
    try:
        entries = list(os.scandir(split_dir))
    except OSError as e:  # FileNotFoundError: the commands make it one line
        why = (e.strerror or type(e).__name__).lower()
        raise FileNotFoundError(
            f"cannot list the class folders of {split_dir!r} ({why})") from None
    folders = _subfolders(entries)
    if not folders:
        raise FileNotFoundError(f"no class folders in {split_dir!r}: "
                                f"expected {split_dir}/<class name>/<images>")
    samples, seen, ignored = [], set(), [] if ignored is None else ignored
    labels = map_class_names(dataset, folders, classnames, wnids)
    for folder, label in zip(folders, labels):
        images = list_images(os.path.join(split_dir, folder), seen, ignored)
        samples += [(p, label) for p in images]
    if not samples:
        raise FileNotFoundError(f"no images ({'/'.join(IMG_EXTENSIONS)}) in the class "
                                f"folders of {split_dir!r}{left_out(ignored)}")
    return samples


def left_out(ignored):
    """'; 3 entries left out, e.g. PATH: REASON', for the 'no images' errors, which come
    before the listing's warnings."""
    if not ignored:
        return ""
    path, reason = ignored[0]
    return f"; {len(ignored)} entries left out, e.g. {path}: {reason}"


# ----------------------------------------------------------------------------
# Layouts: split folders, torchvision's on-disk formats

def split_dir(root, split):
    """root/train for 'train'; root/test or root/val for 'test'; None when absent."""
    for name in {"train": ("train",), "test": ("test", "val")}[split]:
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


def _holdout_split(samples, base, split):
    """Split 'test' (~20%) or 'train' of a dataset without a test split (SUN397,
    Caltech101), by a hash of each relative path: the same on every machine."""
    rel = [os.path.relpath(path, base).replace(os.sep, "/") for path, _ in samples]
    want_test = split == "test"
    return [s for s, r in zip(samples, rel)
            if (zlib.crc32(r.encode()) % 5 == 0) == want_test]


def _layout_dir(*parts):
    """A torchvision layout's folder; RuntimeError when missing, as in torchvision."""
    path = os.path.join(*parts)
    if not os.path.isdir(path):
        raise RuntimeError(f"Dataset not found: no folder {path!r}")
    return path


# Each reader of a torchvision layout returns
# (class names as torchvision spells them, [(path, its class name)]).
def _food101(root, split):
    base = os.path.join(root, "food-101")
    images, meta = _layout_dir(base, "images"), _layout_dir(base, "meta")
    with open(os.path.join(meta, f"{split}.json"), encoding="utf-8") as f:
        files = json.load(f)  # {class: ["class/id", ...]}, in the file's order
    samples = [(os.path.join(images, *f"{i}.jpg".split("/")), c)
               for c, ids in files.items() for i in ids]
    return sorted(files), samples


def _dtd(root, split):  # the paper's 3,760 training images: train + val of partition 1
    base = _layout_dir(root, "dtd", "dtd")
    parts = ("train", "val") if split == "train" else ("test",)
    split_files = [os.path.join(base, "labels", f"{s}1.txt") for s in parts]
    # Each line is '<class>/<file>'.
    lines = [line for path in split_files
             for _, line in _read_lines(path, "DTD split file")]
    samples = [(os.path.join(base, "images", *line.split("/")), line.split("/")[0])
               for line in lines]
    return sorted({c for _, c in samples}), samples


def _gtsrb(root, split):
    """Classes 0..42 in prompt order: Training/<00000..00042>/*.ppm; a CSV for test."""
    base, names = os.path.join(root, "gtsrb"), [str(i) for i in range(43)]
    if split == "test":
        images = _layout_dir(base, "GTSRB", "Final_Test", "Images")
        labels = os.path.join(base, "GT-final_test.csv")
        with open(labels, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter=";", skipinitialspace=True))
        return names, [(os.path.join(images, r["Filename"]), str(int(r["ClassId"])))
                       for r in rows]
    train = _layout_dir(base, "GTSRB", "Training")
    samples = []
    for folder in _subfolders(os.scandir(train)):
        if not (folder.isdigit() and int(folder) < len(names)):
            raise ValueError(f"GTSRB class folder {os.path.join(train, folder)!r} is "
                             "not a class number 00000..00042")
        # The class folders also hold a GT-<class>.csv of boxes.
        ppm = [p for p in list_images(os.path.join(train, folder))
               if p.lower().endswith(".ppm")]
        samples += [(p, str(int(folder))) for p in ppm]
    return names, samples


def _pets(root, split):
    base = os.path.join(root, "oxford-iiit-pet")
    images, notes = _layout_dir(base, "images"), _layout_dir(base, "annotations")
    split_file = os.path.join(notes, "trainval.txt" if split == "train" else "test.txt")
    rows = [line.split()
            for _, line in _read_lines(split_file, "Oxford-IIIT Pet split file")]
    # A row is <Breed_name>_<n> <class id 1..37> <species> <breed id>. The names are in
    # id order, spelt as torchvision does ('american_pit_bull' -> 'American Pit Bull').
    raw = {int(r[1]): r[0].rsplit("_", 1)[0] for r in rows}
    spelt = {i: " ".join(part.title() for part in raw[i].split("_")) for i in raw}
    names = [spelt[i] for i in sorted(raw)]
    return names, [(os.path.join(images, f"{r[0]}.jpg"), spelt[int(r[1])])
                   for r in rows]


def _sun397(root, split):
    base = _layout_dir(root, "SUN397")
    class_list = os.path.join(base, "ClassName.txt")
    lines = [line for _, line in _read_lines(class_list, "SUN397 class list")]
    names = [line[3:] for line in lines]  # torchvision drops the '/a/' letter folder
    samples = []
    # Each line is the class's folder, e.g. '/a/apartment_building/outdoor'.
    for line, name in zip(lines, names):
        folder = os.path.join(base, *line.strip("/").split("/"))
        files = (sorted(f for f in os.listdir(folder)
                        if f.startswith("sun_") and f.endswith(".jpg"))
                 if os.path.isdir(folder) else [])
        samples += [(os.path.join(folder, f), name) for f in files]
    return names, _holdout_split(samples, base, split)


def _caltech101(root, split):
    base = _layout_dir(root, "caltech101", "101_ObjectCategories")
    # torchvision drops BACKGROUND_Google; the published prompts keep it last.
    names = sorted(_subfolders(os.scandir(base)),
                   key=lambda name: name == "BACKGROUND_Google")
    samples = [(path, name) for name in names
               for path in list_images(os.path.join(base, name))]
    return names, _holdout_split(samples, base, split)


# name: (reader, torchvision's layout, the torchvision class that fetches it for
# --download, whether that class takes the split: not where one archive holds all).
TORCHVISION_LAYOUTS = {
    "food101": (_food101, "root/food-101/", "Food101", True),
    "dtd": (_dtd, "root/dtd/dtd/", "DTD", False),
    "gtsrb": (_gtsrb, "root/gtsrb/GTSRB/", "GTSRB", True),
    "pets": (_pets, "root/oxford-iiit-pet/", "OxfordIIITPet", False),
    "sun397": (_sun397, "root/SUN397/", "SUN397", False),
    "caltech101": (_caltech101, "root/caltech101/", "Caltech101", False),
}


def torchvision_samples(name, root, split, download, classnames):
    """Samples of torchvision's copy of a dataset, read here because its datasets'
    private attributes change between releases; download=True fetches it first."""
    read, layout, fetch, takes_split = TORCHVISION_LAYOUTS[name]
    tv_root = os.path.expanduser(root)  # torchvision downloads to the expanded path
    try:
        if download:
            split_kwargs = {"split": split} if takes_split else {}
            getattr(tv_datasets, fetch)(tv_root, download=True, **split_kwargs)
        names, samples = read(tv_root, split)
    except RuntimeError as e:  # torchvision's "Dataset not found ...", or _layout_dir's
        tv_layout = layout.replace('root', root)
        raise FileNotFoundError(
            f"no {name} under {root!r}: expected {root}/train/<class>/... and "
            f"{root}/test/<class>/..., or torchvision's layout {tv_layout} "
            f"(pass --download to fetch it) [{e}]") from None
    to_prompt = dict(zip(names, map_class_names(name, names, classnames)))
    return [(path, to_prompt[c]) for path, c in samples]


# ----------------------------------------------------------------------------
# Text files: --classes and --templates

def _read_lines(path, what):
    """[(line number, text)] of a UTF-8 file's lines, stripped, less blanks and '#'s."""
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a directory; give a text file, one entry "
                         "per line")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(i, line.strip()) for i, line in enumerate(f, 1)]
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path!r} is not UTF-8 text (byte {e.start}); "
                         "save it as UTF-8") from None
    return [(i, line) for i, line in lines if line and not line.startswith("#")]


def read_classnames(path):
    """The names of a class names file: one a line, at least 2."""
    names = [name for _, name in _read_lines(path, "class names file")]
    if len(names) < 2:
        raise ValueError(f"class names file {path!r} lists {len(names)} class(es); a "
                         "classifier needs at least 2 (one name per line)")
    keys = collections.Counter(name_key(n) for n in names)
    repeated = sorted({n for n in names if keys[name_key(n)] > 1})
    if repeated:
        raise ValueError(f"class names file {path!r} repeats class names (up to "
                         f"case/punctuation): {repeated}")
    return names


def read_templates(path):
    """The prompts of a templates file: one a line, each with one '{}' for the name."""
    lines = _read_lines(path, "templates file")
    if not lines:
        raise ValueError(f"templates file {path!r} lists no template (one per line, "
                         "e.g. 'a photo of a {}.')")
    for i, t in lines:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(t) if f is not None]
        except ValueError:  # a lone '{' or '}'
            fields = None
        if fields != [""]:
            raise ValueError(f"templates file {path}, line {i}: {t!r} needs exactly "
                             "one '{}' for the class name and no other braces, e.g. "
                             "'a photo of a {}.'")
    return [t for _, t in lines]
