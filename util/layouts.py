"""Where eval.py's evaluation sets lie: ImageNet-C's corruption folders and the shifted
ImageNets under --shift-root (docs/usage.md gives both layouts). Folder names only: no
image is read."""
import os
import re

from util.folders import name_key, require_dir

# The reason of a part that has no folder, and of a folder that holds no part.
ABSENT, IGNORED = "absent", "ignored"


def subfolders(path):
    """{name_key: name} of the folders in path, hidden ones left out."""
    entries = [e for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")]
    return {name_key(e.name): e.name for e in entries}


def corruption_folders(root, corruptions, severities):
    """ImageNet-C's folders root/<corruption>/<severity> -> ([(part, path)], left_out):
    part is '<corruption>/<severity>'; left_out lists (part or folder, why), why being
    ABSENT, IGNORED or why a folder cannot be listed."""
    present = subfolders(root)
    wanted = {name_key(c) for c in corruptions}
    left_out = [(name, IGNORED) for name in sorted(present.values())
                if name_key(name) not in wanted]
    parts = []
    for corruption in corruptions:
        folder = present.get(name_key(corruption))
        if folder is None:
            left_out.append((corruption, ABSENT))
            continue
        try:
            levels = set(subfolders(os.path.join(root, folder)).values())
        except OSError as e:
            left_out.append((corruption, f"its folder cannot be listed ({e.strerror})"))
            continue
        named = set(map(str, severities))
        left_out += [(f"{folder}/{name}", IGNORED) for name in sorted(levels - named)]
        for s in map(str, severities):
            part = f"{corruption}/{s}"
            if s in levels:
                parts.append((part, os.path.join(root, folder, s)))
            else:
                left_out.append((part, ABSENT))
    return parts, left_out


def enter_single_subfolder(path):
    """The folder below path while path holds just one folder that is no class folder,
    as in ImageNet-Sketch/sketch/<wnid> and imagenetv2/<variant>/<index>."""
    while True:
        entries = [e for e in os.scandir(path) if not e.name.startswith(".")]
        if len(entries) != 1 or not entries[0].is_dir():
            return path
        name = entries[0].name
        class_like = name.isdigit() or re.fullmatch(r"n\d{8}", name)
        if class_like or name in ("test", "val", "train"):
            return path
        path = entries[0].path


SHIFT_KINDS = {"imagenetr": "imagenet-r", "imagenetrendition": "imagenet-r",
               "imageneta": "imagenet-a", "imagenetadversarial": "imagenet-a",
               "imagenetsketch": "imagenet-sketch", "sketch": "imagenet-sketch",
               "imagenet": "imagenet"}
# Table 9's order.
SHIFT_ORDER = ("imagenet", "imagenet-v2", "imagenet-r", "imagenet-a", "imagenet-sketch")


def shift_kind(folder):
    """The shifted ImageNet a folder name stands for, or None."""
    key = name_key(folder)
    return "imagenet-v2" if key.startswith("imagenetv2") else SHIFT_KINDS.get(key)


def find_shift_sets(root):
    """[(set name, kind, path)] of the shifted ImageNets under root, in Table 9's order.
    Several ImageNetV2 variants are told apart by their folder names."""
    require_dir(root, "shift root")
    found = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        kind = shift_kind(entry.name) if entry.is_dir() else None
        if kind is not None:
            found.append((kind, entry.name, enter_single_subfolder(entry.path)))
    if not found:
        names = sorted(e.name for e in os.scandir(root) if e.is_dir())
        raise FileNotFoundError(
            f"no shifted ImageNet under {root!r} (folders: {names[:10]}); expected "
            "subfolders named imagenetv2-*, imagenet-r, imagenet-a, imagenet-sketch "
            "(or imagenet with val/)")
    n_v2 = sum(kind == "imagenet-v2" for kind, _, _ in found)
    found.sort(key=lambda f: SHIFT_ORDER.index(f[0]))
    return [(f"{kind} ({folder})" if kind == "imagenet-v2" and n_v2 > 1 else kind,
             kind, path) for kind, folder, path in found]
