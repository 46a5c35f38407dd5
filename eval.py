r"""Evaluate CLIP zero-shot or a MUST checkpoint (student and EMA teacher): accuracy (paper §4.2),
robustness to ImageNet-C corruptions (§4.7, Table 8), natural distribution shift (§4.8, Table 9)
and the paper's figures (Figure 3: GradCAM of the last block's [CLS] attention; Figure 4: masked
image modeling triplets).

    # the run's own test set
    python eval.py --checkpoint out/imagenet/checkpoint.pt
    python eval.py --data imagenet --data-root /data/imagenet \
        --checkpoint out/imagenet/checkpoint.pt
    # CLIP zero-shot
    python eval.py --data imagenet --data-root /data/imagenet --model ViT-B/16
    python eval.py --data imagenet-c --data-root /data/imagenet-c \
        --checkpoint out/imagenet/checkpoint.pt
    python eval.py --shift --shift-root /data/shift --checkpoint out/imagenet/checkpoint.pt
    python eval.py --data imagenet-r --data-root /data/shift/imagenet-r \
        --checkpoint out/imagenet-r/checkpoint.pt
    # + CLIP row and figures
    python eval.py --checkpoint out/pets/checkpoint.pt --model ViT-B/16 --figures 8
    # your own unlabeled images: a CSV of predictions; a standalone classifier file
    python eval.py --classify ~/my_images --checkpoint out/folder/checkpoint.pt
    python eval.py --checkpoint out/folder/checkpoint.pt --export classifier.pt

The layouts it reads besides data.py's (ImageNet-C, --shift-root): docs/usage.md.

A classifier scores a set whose classes it covers: a 1000-way ImageNet head scores ImageNet-R/-A
with its logits restricted to the 200 present classes (indexed by wnid); a head trained
transductively on ImageNet-R is already 200-way. Each image is decoded once; every model scores it
in the same pass.
Outputs: a table on stdout, a JSON file with every number, PNG figures with --figures; with
--classify a CSV of every image's top-5 classes and a summary; with --export a classifier file
(must.load_classifier).
"""
import argparse
import bisect
import csv
import io
import json
import math
import os
import re
import time
from collections import namedtuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import clip_model
from util import clip_load
import config
import data
import figures
from util import folders
import must
import prompts
from util.runtime import (StopRequest, add_machine_flags, all_reduce, any_process, autocast_for,
                          dead_workers_found_by_waits, end_distributed, end_workers, fail,
                          ignore_stop_signals, is_distributed, make_folder, not_a_clip,
                          peer_failed, pick_device, rank_zero_first, read_checkpoint, save_atomic,
                          setup_distributed, shared_memory_problem)


# ImageNet-C's 15 benchmark corruptions and AlexNet's error on each, averaged over the 5 severities
# (Hendrycks & Dietterich 2019): the normalizer of the corruption error CE.
ALEXNET_ERR = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}
SEVERITIES = (1, 2, 3, 4, 5)
# The mCE of the paper's Table 8, ViT-B/16.
PAPER_MCE = "CLIP 70.7, self-training 55.2, MUST 53.4, MAE+supervised 51.7"



# --------------------------------------------------------------------------------------------------
# class spaces: which logits score which set


def class_ids(dataset, classnames):
    """Identities of a label space: wnids for the ImageNets (prompts.WNIDS), spelling-insensitive
    names otherwise."""
    wnids = prompts.WNIDS.get(dataset)
    if wnids is not None and len(wnids) == len(classnames):
        return list(wnids)
    return [folders.name_key(c) for c in classnames]


def columns_for(model_ids, set_ids):
    """Logit columns that score a set, in the set's label order (None means all logits as they
    are). Raises ValueError when the classifier lacks some of the set's classes."""
    if list(model_ids) == list(set_ids):
        return None
    index = {c: i for i, c in enumerate(model_ids)}
    missing = [c for c in set_ids if c not in index]
    if missing:
        raise ValueError(f"its {len(model_ids)}-class head lacks {len(missing)} of the set's "
                         f"{len(set_ids)} classes (e.g. {missing[0]!r})")
    return torch.tensor([index[c] for c in set_ids])


# --------------------------------------------------------------------------------------------------
# evaluation sets


# A labeled dataset to score: its name, kind (a --data name), dataset (ImageList-like), class
# identities and root.
EvalSet = namedtuple("EvalSet", "name kind dataset ids root")


def build_set(name, kind, root, transform, templates_file=None, classes_file=None):
    """One named dataset's test split as an EvalSet (for --data folder, labeled images
    root/<class name>/..., names from the classes file). data.py's clear errors become one-line
    CLI errors."""
    try:
        return make_set(name, kind, root, transform, templates_file, classes_file)
    except (OSError, ValueError) as e:
        fail(f"{name}: {e}")


def make_set(name, kind, root, transform, templates_file=None, classes_file=None):
    """build_set that raises data.py's errors (OSError, ValueError) instead of exiting."""
    classes = classes_file if kind == "folder" else None
    ds = data.build_dataset(kind, root, "test", transform, classes, templates_file, eval_root=root)
    return EvalSet(name, kind, ds, class_ids(kind, ds.classnames), root)


ABSENT = "absent"  # the reason recorded for a missing part that has no folder at all


def leave_out(name, why, missing, what=""):
    """Record a set that cannot be read in `missing` ({name: why}) and say so at once, before the
    evaluation: one bad folder must not cost the scores of the others."""
    missing[name] = why
    print(f"warning: {what}{name} is left out, the other sets are scored: {why}")


def nothing_to_score(what, root, missing):
    """Fail when every set found under root was left out: the first reason, and how many more."""
    unusable = [(name, why) for name, why in missing.items() if why != ABSENT]
    more = f" (and {len(unusable) - 1} more, named above)" if len(unusable) > 1 else ""
    fail(f"nothing to score under {what} {root!r}: {unusable[0][0]}: {unusable[0][1]}{more}")


def _subfolders(path):
    """{name_key: name} of the folders in path, hidden ones left out."""
    entries = [e for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")]
    return {folders.name_key(e.name): e.name for e in entries}


def severity_sets(root, corruption, folder, transform, missing, ignored):
    """The EvalSets '<corruption>/<1..5>' of one corruption folder. Absent or unreadable severities
    go to `missing`, other folders to `ignored` (as '<folder>/<name>')."""
    classnames = prompts.DATASETS["imagenet"]["classes"]
    templates = prompts.DATASETS["imagenet"]["templates"]
    try:
        present = set(_subfolders(os.path.join(root, folder)).values())
    except OSError as e:
        leave_out(corruption, f"its folder cannot be listed ({e.strerror})", missing, "ImageNet-C ")
        return []
    ignored += [f"{folder}/{name}" for name in sorted(present - set(map(str, SEVERITIES)))]
    sets = []
    for s in SEVERITIES:
        name, path = f"{corruption}/{s}", os.path.join(root, folder, str(s))
        if str(s) not in present:
            missing[name] = ABSENT
            continue
        listing = []
        try:
            samples = folders.scan_class_folders(path, "imagenet", classnames, listing,
                                                 prompts.IMAGENET_WNIDS)
        except (OSError, ValueError) as e:  # no class folders, no images, folders that are no wnid
            leave_out(name, str(e), missing, "ImageNet-C ")
            continue
        ds = folders.ImageList(samples, classnames, templates, transform, "skip", listing)
        sets.append(EvalSet(name, "imagenet-c", ds, list(prompts.IMAGENET_WNIDS), path))
    return sets


def find_corruption_sets(root, transform):
    """ImageNet-C: EvalSets named '<corruption>/<severity>' for the 15 benchmark corruptions
    present, the missing parts {'<corruption>' or '<corruption>/<severity>': why} and the ignored
    folders (other corruptions, severities outside 1..5). Fails only when nothing can be scored."""
    if not os.path.isdir(root):
        fail(f"ImageNet-C root {root!r} does not exist or is not a directory")
    present = _subfolders(root)
    sets, missing, ignored = [], {}, []
    for corruption in ALEXNET_ERR:
        folder = present.pop(folders.name_key(corruption), None)
        if folder is None:
            missing[corruption] = ABSENT
        else:
            sets += severity_sets(root, corruption, folder, transform, missing, ignored)
    if not sets and any(why != ABSENT for why in missing.values()):
        nothing_to_score("ImageNet-C root", root, missing)
    if not sets:
        fail(f"no ImageNet-C corruption under {root!r}: expected "
             f"{root}/<corruption>/<1..5>/<wnid>/*.JPEG with <corruption> among "
             f"{', '.join(ALEXNET_ERR)}")
    return sets, missing, sorted(present.values()) + ignored


def find_shifted_sets(root, transform, templates):
    """--shift: the EvalSets of the shifted ImageNets under root, and {name: why} of those that
    cannot be read. Fails only when none can."""
    try:
        found = find_shift_sets(root)
    except FileNotFoundError as e:
        fail(str(e))
    sets, missing = [], {}
    for name, kind, path in found:
        try:
            sets.append(make_set(name, kind, path, transform, templates))
        except (OSError, ValueError) as e:  # no class folders, no images, folders that are no class
            leave_out(name, str(e), missing)
    if not sets:
        nothing_to_score("--shift-root", root, missing)
    return sets, missing


# --------------------------------------------------------------------------------------------------
# the shifted ImageNets under one folder (--shift-root; docs/usage.md gives the layout)

def _enter_single_subfolder(path):
    """Enters a folder whose only entry is a folder that is not itself a class folder, as in
    ImageNet-Sketch/sketch/<wnid> and imagenetv2/<variant>/<index>."""
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
    key = folders.name_key(folder)
    if key.startswith("imagenetv2"):
        return "imagenet-v2"
    kinds = {"imagenetr": "imagenet-r", "imagenetrendition": "imagenet-r",
             "imageneta": "imagenet-a", "imagenetadversarial": "imagenet-a",
             "imagenetsketch": "imagenet-sketch", "sketch": "imagenet-sketch",
             "imagenet": "imagenet"}
    return kinds.get(key)


# The order of Table 9.
_SHIFT_ORDER = ("imagenet", "imagenet-v2", "imagenet-r", "imagenet-a", "imagenet-sketch")


def find_shift_sets(root):
    """[(set name, kind, path)] of the shifted ImageNets under root (eval.py --shift-root), in
    Table 9's order."""
    folders.require_dir(root, "shift root")
    found = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        kind = shift_kind(entry.name) if entry.is_dir() else None
        if kind is not None:
            found.append((kind, entry.name, _enter_single_subfolder(entry.path)))
    if not found:
        names = sorted(e.name for e in os.scandir(root) if e.is_dir())
        raise FileNotFoundError(f"no shifted ImageNet under {root!r} (folders: {names[:10]}); "
                                "expected subfolders named imagenetv2-*, imagenet-r, imagenet-a, "
                                "imagenet-sketch (or imagenet with val/)")
    n_v2 = sum(kind == "imagenet-v2" for kind, _, _ in found)
    found.sort(key=lambda f: _SHIFT_ORDER.index(f[0]))
    return [(kind if kind != "imagenet-v2" or n_v2 == 1 else f"imagenet-v2 ({folder})", kind, path)
            for kind, folder, path in found]


# --------------------------------------------------------------------------------------------------
# scoring


class _Tagged(Dataset):
    """Several datasets behind one loader, so that the workers do not restart between ImageNet-C's
    75 sets. An item is (image, label, set index). `limit` keeps that many evenly spaced images of
    each set; with several processes each holds every world-th item of the whole."""

    def __init__(self, datasets, limit=None, rank=0, world=1):
        self.datasets = datasets
        self.indices = [np.arange(len(d)) if limit is None or limit >= len(d)
                        else np.unique(np.linspace(0, len(d) - 1, limit).round().astype(int))
                        for d in datasets]
        self.offsets = np.cumsum([0] + [len(i) for i in self.indices]).tolist()
        self.positions = range(rank, self.offsets[-1], world)

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, index):
        index = self.positions[index]
        s = bisect.bisect_right(self.offsets, index) - 1
        image, label = self.datasets[s][int(self.indices[s][index - self.offsets[s]])]
        return image, label, s


class Counts:
    """Per-class hit counts of one (set, model): top-1, top-5 and images. Labels < 0 (unknown) are
    skipped."""

    def __init__(self, num_classes):
        self.top1, self.top5, self.n = (np.zeros(num_classes, np.int64) for _ in range(3))

    def add(self, top5, labels):
        """top5: (B, k) predicted labels, best first; labels: (B,)."""
        keep = labels >= 0
        top5, labels = top5[keep], labels[keep]
        k = len(self.n)
        self.n += np.bincount(labels, minlength=k)
        self.top1 += np.bincount(labels[top5[:, 0] == labels], minlength=k)
        self.top5 += np.bincount(labels[(top5 == labels[:, None]).any(1)], minlength=k)

    def all_reduce(self, device):
        """Sum the counts over processes (each scored its own shard)."""
        for name in ("top1", "top5", "n"):
            summed = all_reduce(torch.from_numpy(getattr(self, name)), device)
            setattr(self, name, summed.numpy())
        return self

    def metrics(self):
        """Accuracies in %: top-1, top-5 and the mean over classes with images of per-class
        top-1."""
        total = int(self.n.sum())
        if total == 0:
            return {"images": 0, "top1": None, "top5": None, "mean_per_class": None}
        present = self.n > 0
        return {"images": int(total), "top1": 100.0 * float(self.top1.sum()) / total,
                "top5": 100.0 * float(self.top5.sum()) / total,
                "mean_per_class": 100.0 * float(np.mean(self.top1[present] / self.n[present]))}


def batch_bytes(batch_size, size):
    """The bytes of an evaluation batch as loader workers hand it over: float32 images of
    size x size px and int64 labels (for runtime.shared_memory_problem)."""
    return batch_size * (4 * 3 * size ** 2 + 8)


@torch.inference_mode()
def evaluate(models, sets, columns, device, batch_size=256, num_workers=8, amp_dtype=None,
             limit=None, stop=None):
    """Score every set with every model in one pass over the images; eval.py and train.py both
    score with it.

    models: {name: module on `device` mapping images (B,3,H,W) -> must.MUSTOutput}.
    columns[(set index, name)]: the logit columns of that set (None = all); pairs absent from it
    are not scored. Under torch.distributed each process scores its share of the images and the
    counts are summed over processes. stop: a runtime.StopRequest, asked before every batch (all
    processes agree); a requested stop ends the evaluation at once.
    Returns ({(set index, name): Counts}, images per second of this process), or (None, 0.0) when
    stopped.
    """
    if is_distributed():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = 0, 1
    tagged = _Tagged([s.dataset for s in sets], limit, rank, world)
    loader = DataLoader(tagged, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
    counts = {key: Counts(len(sets[key[0]].ids)) for key in columns}
    cols = {key: (None if c is None else c.to(device)) for key, c in columns.items()}
    # Rank 0 holds the most images, so every process goes round this often and asks about a stop
    # each time, including one whose own share ran out a batch earlier.
    rounds = math.ceil(len(range(0, tagged.offsets[-1], world)) / batch_size)
    batches = iter(loader)
    tic, seen = time.time(), 0
    progress = tqdm(range(rounds), desc="eval", dynamic_ncols=True, mininterval=2,
                    disable=rank != 0, leave=False)
    try:
        for _ in progress:
            if stop is not None and any_process(stop.signum is not None):
                return None, 0.0
            batch = next(batches, None)
            if batch is not None:
                score_batch(models, sets, cols, counts, *batch, device, amp_dtype)
                seen += len(batch[0])
    finally:  # the workers ignore stop signals: a stop or an error must end them
        end_workers(batches)
    for c in counts.values():
        c.all_reduce(device)
    return counts, seen / max(time.time() - tic, 1e-9)


def score_batch(models, sets, cols, counts, images, labels, set_index, device, amp_dtype):
    """Every model's logits on one batch of images, added to the Counts of each (set, model) it
    scores."""
    images = images.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        logits = {name: m(images).logits.float() for name, m in models.items()}  # (B, K) per model
    labels_np, set_np = labels.numpy(), set_index.numpy()
    for s in np.unique(set_np).tolist():
        rows = torch.from_numpy(np.flatnonzero(set_np == s)).to(device)
        for name in models:
            if (s, name) not in cols:
                continue
            z = logits[name][rows]
            if cols[(s, name)] is not None:
                z = z[:, cols[(s, name)]]  # (b, K_set): only the set's classes compete
            if z.shape[1] != len(sets[s].ids):
                raise ValueError(f"{name} gives {z.shape[1]} logits for the "
                                 f"{len(sets[s].ids)} classes of {sets[s].name}")
            top5 = z.topk(min(5, z.shape[1]), dim=1).indices.cpu().numpy()
            counts[(s, name)].add(top5, labels_np[set_np == s])


def corruption_errors(errors):
    """ImageNet-C (Hendrycks & Dietterich 2019; paper Table 8).
    errors: {corruption: {severity: top-1 error %}}.

    CE_c = Σ_s E_{s,c} / Σ_s E^AlexNet_{s,c} = mean_s E_{s,c} / mean_s E^AlexNet_{s,c}, in %.
    mCE = mean of CE_c. Only corruptions with all 5 severities get a CE; mCE covers those
    (complete = all 15 present).
    """
    mean_err, ce = {}, {}
    for c, by_sev in errors.items():
        if all(s in by_sev and by_sev[s] is not None for s in SEVERITIES):
            mean_err[c] = sum(by_sev[s] for s in SEVERITIES) / len(SEVERITIES)
            ce[c] = mean_err[c] / ALEXNET_ERR[c]  # % / fraction -> %
    mce = sum(ce.values()) / len(ce) if ce else None
    return {"mean_error": mean_err, "ce": ce, "mce": mce, "corruptions_scored": len(ce),
            "complete": len(ce) == len(ALEXNET_ERR)}


# --------------------------------------------------------------------------------------------------
# output


def _fmt(x, width=6):
    return f"{x:{width}.2f}" if x is not None else " " * (width - 1) + "-"


def accuracy_table(results, model_names, mean_per_class_sets):
    """One row per set; per model top-1 and top-5 accuracy (%), and mean per-class accuracy where
    asked. -> str"""
    mpc = bool(mean_per_class_sets)
    head = f"{'dataset':28s} {'images':>7s}"
    for n in model_names:
        head += f"  {n[:10] + ' top1':>15s} {'top5':>6s}" + (f" {'mpc':>6s}" if mpc else "")
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        line = f"{name[:28]:28s} {r['images']:7d}"
        for n in model_names:
            m = r["models"].get(n, {})
            line += f"  {_fmt(m.get('top1'), 15)} {_fmt(m.get('top5'))}"
            if mpc:
                line += f" {_fmt(m.get('mean_per_class') if name in mean_per_class_sets else None)}"
        lines.append(line)
    return "\n".join(lines)


def corruption_table(model_name, errors, summary):
    """One row per corruption: top-1 error (%) at each severity, mean, CE; then mCE. -> str"""
    model_head = f"{'ImageNet-C ' + model_name:24s}"
    severity_heads = "".join(f"{'s' + str(s):>7s}" for s in SEVERITIES)
    head = model_head + severity_heads + f"{'mean':>8s}{'CE':>8s}"
    lines = [head + "   (top-1 error %, CE normalized by AlexNet)", "-" * len(head)]
    for c in ALEXNET_ERR:
        by_sev = errors.get(c, {})
        line = f"{c:24s}" + "".join(f" {_fmt(by_sev.get(s))}" for s in SEVERITIES)
        line += f"  {_fmt(summary['mean_error'].get(c))}  {_fmt(summary['ce'].get(c))}"
        lines.append(line + ("" if c in errors else "   missing"))
    partial = ""
    if not summary["complete"]:
        partial = f"   (partial: {summary['corruptions_scored']}/15 corruptions)"
    lines.append(f"{'mCE':24s}{'':{7 * len(SEVERITIES) + 8}s}  {_fmt(summary['mce'])}{partial}")
    lines.append(f"paper's mCE (ViT-B/16, Table 8): {PAPER_MCE}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Evaluate CLIP zero-shot or a MUST checkpoint (student and EMA teacher): "
                    "top-1/top-5 accuracy, ImageNet-C mCE, natural distribution shift, and "
                    "GradCAM / masked-image-modeling figures. Writes a table to stdout and every "
                    "number to a JSON file.")
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--data",
                   help=f"dataset: {', '.join(data.DATASET_NAMES)}, or imagenet-c "
                        "(ROOT/<corruption>/<severity>/<wnid>/*) [the checkpoint's training "
                        "dataset]")
    g.add_argument("--data-root",
                   help="dataset directory (layouts: data.py; for --data folder: "
                        "DIR/<class name>/...) [the checkpoint's, when --data is the checkpoint's]")
    g.add_argument("--shift", action="store_true",
                   help="evaluate every shifted ImageNet found under --shift-root (Table 9) "
                        "instead of --data")
    g.add_argument("--shift-root",
                   help="folder with imagenetv2*/, imagenet-r/, imagenet-a/, imagenet-sketch/ "
                        "(and optionally imagenet/val/) subfolders; names are matched ignoring "
                        "case, '-' and '_'; [--data-root]")
    g.add_argument("--classes",
                   help="class names file, one per line (--data folder) [the checkpoint's]")
    g.add_argument("--templates",
                   help="prompt templates file, one per line with {} (for CLIP's zero-shot head)")
    g.add_argument("--limit", type=int,
                   help="score only this many evenly spaced images per set (quick check)")
    g = p.add_argument_group("models")
    g.add_argument("--checkpoint",
                   help="MUST checkpoint from train.py: its student and EMA teacher are scored")
    g.add_argument("--model",
                   help="CLIP name (ViT-B/16, ...) or checkpoint path scored zero-shot [ViT-B/16 "
                        "without --checkpoint; with one, given = also CLIP's row and GradCAM "
                        "column]")
    g.add_argument("--mean-per-class", action="store_true",
                   help="report mean per-class accuracy for every set (always shown for pets and "
                        "caltech101)")
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=256,
                   help="images per forward pass [%(default)s]")
    g.add_argument("--figures", type=int, default=0, metavar="N",
                   help="write PNG figures for N evenly spaced images of a set (the first that the "
                        "most models score): OUT_DIR/<data>-attention.png, GradCAM of the last "
                        "block's [CLS] attention of each model side by side (Figure 3), and with a "
                        "checkpoint OUT_DIR/<data>-reconstruction.png, the student's original / "
                        "masked / recovered triplets (Figure 4) [%(default)s]")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the masks drawn for the reconstruction figure [%(default)s]")
    g.add_argument("--out-dir",
                   help="where the JSON, figures and zero-shot head cache go [the checkpoint's "
                        "folder, else out/eval]")
    g.add_argument("--json", help="JSON file with every number [OUT_DIR/eval-<data>.json]")
    g = p.add_argument_group("classify your own images (instead of evaluating)")
    g.add_argument("--classify", metavar="DIR",
                   help="write the predicted class of every image under DIR (any nesting) to a "
                        "CSV: the checkpoint's model, or CLIP zero-shot of --model")
    g.add_argument("--which", choices=["student", "teacher"], default="student",
                   help="the checkpoint's model for --classify and --export [student: the "
                        "higher in the README's result table (toy: 74.95%% against 74.70%%)]")
    g.add_argument("--csv", help="the CSV file --classify writes [OUT_DIR/predictions.csv]")
    g.add_argument("--min-prob", type=float, default=0.5,
                   help="the summary counts the images predicted with a lower probability, to "
                        "check by hand [%(default)s]")
    g.add_argument("--export", metavar="FILE",
                   help="write that model as a standalone classifier file, which "
                        "must.load_classifier reads")
    add_machine_flags(p)
    return p.parse_args(argv)


def check_flags(args):
    """Every flag and file that can be checked without a model, one line each. Sets args.out_dir to
    the folder the outputs go to, made here as train.py makes its own."""
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--limit", args.limit, 1),
                               ("--num-workers", args.num_workers, 0),
                               ("--figures", args.figures, 0)):
        if value is not None and value < least:
            bound = "at least 1" if least else "0 or more"
            fail(f"{flag} {value} is not allowed: it must be {bound}")
    for flag, root in (("--data-root", args.data_root), ("--shift-root", args.shift_root)):
        if root and not os.path.isdir(root):
            fail(f"{flag} {root!r} does not exist or is not a directory")
    config.check_text_files(args.classes, args.templates)
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        fail(f"no checkpoint file at {args.checkpoint}")
    if args.json and os.path.isdir(args.json):
        fail(f"--json {args.json} is a folder: give the name of the JSON file to write")
    if args.out_dir is None:  # the checkpoint's folder, now known to exist, or out/eval
        args.out_dir = os.path.dirname(os.path.abspath(args.checkpoint)) if args.checkpoint else \
            os.path.join("out", "eval")
    make_folder("--out-dir", args.out_dir)
    if args.json:
        make_folder("--json", args.json, os.path.dirname(os.path.abspath(args.json)))


def resolve_sets(args, run, transform):
    """-> (mode, [EvalSet], found), where found is (root, missing {name: why}, ignored) for
    imagenet-c, (root, missing, None) for --shift, else None. --data and --data-root default to the
    checkpoint's own (for --data folder, its --eval-root, --classes and --templates)."""
    if args.shift and args.data:
        fail("give --data or --shift, not both")
    if args.shift:
        root = args.shift_root or args.data_root
        if root is None:
            fail("--shift needs --shift-root DIR "
                 "(a folder with imagenetv2*/imagenet-r/imagenet-a/imagenet-sketch)")
        sets, missing = find_shifted_sets(root, transform, args.templates)
        return "shift", sets, (root, missing, None)
    mode = args.data or run.get("data")
    if mode is None:
        fail("give --data NAME (and --data-root DIR), --shift, or a --checkpoint whose dataset is "
             "evaluated")
    if mode not in data.DATASET_NAMES + ["imagenet-c"]:
        names = ", ".join(data.DATASET_NAMES + ["imagenet-c"])
        fail(f"unknown dataset {mode!r}; choose one of: {names}")
    own = args.data is None or args.data == run.get("data")
    # The run args hold the checkpoint's own --eval-root or --data-root.
    own_root_flag = "eval_root" if mode == "folder" else "data_root"
    root = args.data_root or (run.get(own_root_flag) if own else None)
    if root is None and mode != "toy":
        fail(f"give --data-root DIR for {mode}")
    if mode == "imagenet-c":
        sets, missing, ignored = find_corruption_sets(root, transform)
        return mode, sets, (root, missing, ignored)
    classes = args.classes or (run.get("classes") if own else None)
    templates = args.templates or (run.get("templates") if own else None)
    return mode, [build_set(mode, mode, root, transform, templates, classes)], None


def imagenet_c_report(models, sets, counts, root, missing, ignored):
    """Per model, the error per corruption and severity, CE and mCE (printed as tables); also what
    is missing."""
    report = {"missing": missing, "ignored_folders": ignored}
    for name in models:
        errors = {}
        for i, s in enumerate(sets):
            if (i, name) in counts:
                corruption, severity = s.name.split("/")
                top1 = counts[(i, name)].metrics()["top1"]  # None: no image of it was readable
                error = None if top1 is None else 100.0 - top1
                errors.setdefault(corruption, {})[int(severity)] = error
        summary = corruption_errors(errors)
        by_corruption = {c: {str(k): v for k, v in e.items()} for c, e in errors.items()}
        report[name] = {"error": by_corruption, **summary}
        print(corruption_table(name, errors, summary) + "\n")
    print_missing(root, missing)
    if ignored:
        print("ignored folders (not a benchmark corruption, or a severity outside 1-5): "
              + ", ".join(ignored))
    return report


def print_missing(root, missing):
    """One line naming the parts of root not scored: absent ones by name, the others with why."""
    parts = [name if why == ABSENT else f"{name} ({why})" for name, why in missing.items()]
    if parts:
        print(f"missing from {root}: {', '.join(parts)}")


def report_unreadable(dataset, what, reported, device):
    """Merge the unreadable-file flags of every process (folders.ImageList.bad), warn once per file
    not in `reported` (on rank 0), and return how many files are unreadable so far (0 for datasets
    that never fail, like the toy's)."""
    if not hasattr(dataset, "bad"):
        return 0
    merged = all_reduce(dataset.bad.to(torch.int32), device, op=torch.distributed.ReduceOp.MAX)
    dataset.bad.copy_(merged.to(torch.int8))
    for index, path, why in dataset.bad_files():
        if index not in reported:
            reported.add(index)
            if not is_distributed() or torch.distributed.get_rank() == 0:
                tqdm.write(f"warning: skipped {what} image {path}: it {why}")
    return len(reported)


def report_listing(dataset, what):
    """One line per reason for the entries the listing left out (links, non-files, duplicates).
    -> how many."""
    by_reason = {}
    for path, reason in getattr(dataset, "ignored", []):
        by_reason.setdefault(reason, []).append(path)
    for reason, paths in by_reason.items():
        print(f"warning: {len(paths)} {what} entries not listed: {reason} (e.g. {paths[0]})")
    return sum(len(paths) for paths in by_reason.values())


def save_json(path, report):
    save_atomic(report, path, write=lambda obj, f: f.write(json.dumps(obj, indent=1).encode()))
    print(f"wrote {path}")


def load_models(args):
    """-> (models {name: MUSTModel}, their class identities, the checkpoint's run args, the CLIP
    to score zero-shot or None, its name, the clip_load.ClipSpec the images are prepared by).
    Everything is a MUSTModel; CLIP zero-shot becomes one once its head is built."""
    models, run, model_ids, specs = {}, {}, {}, {}
    if args.checkpoint:
        try:
            ckpt = read_checkpoint(args.checkpoint)
        except ValueError as e:
            fail(str(e))
        try:
            student = must.load_checkpoint(ckpt, "student")
            teacher = must.load_checkpoint(ckpt, "teacher")
        except (KeyError, ValueError, RuntimeError) as e:  # not the tensors train.py writes
            fail(f"cannot read MUST checkpoint {args.checkpoint} ({str(e).splitlines()[0][:200]})")
        run = dict(ckpt.get("args", {}), classnames=list(ckpt.get("classnames", [])))
        if len(run["classnames"]) != student.num_classes:
            fail(f"checkpoint {args.checkpoint} lists {len(run['classnames'])} class names for a "
                 f"{student.num_classes}-way head")
        ids = class_ids(run.get("data"), run["classnames"])
        models.update(student=student, teacher=teacher)
        model_ids.update(student=ids, teacher=ids)
        # Checkpoints older than their record of it started from OpenAI's CLIPs, the only ones.
        spec = ckpt.get("clip", clip_load.OPENAI_SPEC._asdict())
        specs[args.checkpoint] = clip_load.ClipSpec(**spec)
    clip_name = args.model or (None if args.checkpoint else "ViT-B/16")
    clip = None
    if clip_name:
        try:
            clip, _ = clip_model.load(clip_name, device="cpu", download_root=args.download_root)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            fail(not_a_clip(clip_name, e, "score it with --checkpoint"))
        specs[clip_name] = clip.spec
    size = clip.visual.input_resolution if clip is not None else None
    if clip is not None and models and size != student.visual.input_resolution:
        fail(f"CLIP {clip_name} takes {size} px images, the checkpoint "
             f"{student.visual.input_resolution} px")
    # One preparation of the images for all.
    seen = {(s.mean, s.std, s.interpolation, s.resize_mode) for s in specs.values()}
    if len(seen) > 1:
        fail(f"CLIP {clip_name} and the checkpoint {args.checkpoint} prepare images differently "
             f"({' vs '.join(' '.join(map(str, s)) for s in seen)}); score them with one eval.py "
             "each")
    return models, model_ids, run, clip, clip_name, next(iter(specs.values()))


def add_zero_shot(args, models, model_ids, clip, sets, device, out_dir):
    """CLIP zero-shot as the first model: one head over the classes every set needs (ImageNet-1k
    for several)."""
    if len(sets) == 1:
        names, templates, kind = sets[0].dataset.classnames, sets[0].dataset.templates, sets[0].kind
    else:
        imagenet = prompts.DATASETS["imagenet"]
        names, templates, kind = imagenet["classes"], imagenet["templates"], "imagenet"
        if args.templates:  # checked by check_flags
            templates = folders.read_templates(args.templates)
    model_ids["clip"] = class_ids(kind, names)
    return {"clip": zero_shot_model(clip, names, templates, device, out_dir), **models}


def zero_shot_model(clip, names, templates, device, cache_dir):
    """CLIP zero-shot over `names` as a MUSTModel in eval mode (its head cached in cache_dir)."""
    try:
        head = prompts.zero_shot_head(clip.to(device), names, templates, device=device,
                                      cache_dir=cache_dir)
    except ValueError as e:  # a prompt longer than CLIP's context
        fail(str(e))
    return must.MUSTModel.from_clip(clip, head.cpu()).eval()


def scorable(sets, models, model_ids):
    """Which logits score which set -> (sets some model can score, columns {(set index, model):
    columns}, {set: {model: why not}}). A set no model can score is reported, not loaded."""
    columns, skipped, scored = {}, {}, []
    for s in sets:
        cols = {}
        for name in models:
            try:
                cols[name] = columns_for(model_ids[name], s.ids)
            except ValueError as e:
                skipped.setdefault(s.name, {})[name] = str(e)
        if cols:
            columns.update({(len(scored), name): c for name, c in cols.items()})
            scored.append(s)
    for name, why in skipped.items():
        print(f"not scored on {name}: " + "; ".join(f"{m}: {w}" for m, w in why.items()))
    if not scored:
        fail(f"no model can score {', '.join(s.name for s in sets)} (see above)")
    return scored, columns, skipped


def results_of(sets, models, counts, unread, mpc_sets):
    """{set name: images, classes, root, unreadable / not-listed counts, metric, per-model
    accuracies}"""
    results = {}
    for i, s in enumerate(sets):
        per_model = {name: counts[(i, name)].metrics() for name in models if (i, name) in counts}
        n = next(iter(per_model.values()))["images"] if per_model else 0
        accuracies = {model: {key: value for key, value in metrics.items() if key != "images"}
                      for model, metrics in per_model.items()}
        results[s.name] = {"images": n, "classes": len(s.ids), "root": s.root, **unread[s.name],
                           "metric": "mean_per_class" if s.name in mpc_sets else "top1",
                           "models": accuracies}
    return results


def check_scored(results):
    """Warn about each set that scored no image while others did -> None. When no set scored any:
    the one-line error to fail with, once main has written the report (its counts say why)."""
    def why(r):
        n = r["unreadable"]
        return f"all {n} images read were unreadable" if n else "none of its images has a label"
    empty = {name: r for name, r in results.items() if r["images"] == 0}
    if len(empty) < len(results):
        for name, r in empty.items():
            print(f"warning: scored no image of {name}: {why(r)} (see the warnings above)")
        return None
    if len(empty) == 1:
        name, r = next(iter(empty.items()))
        return f"scored no image of {name}: {why(r)} (see the warnings above)"
    n = sum(r["unreadable"] for r in empty.values())
    return (f"scored no image of any of the {len(empty)} sets: all {n} images read were unreadable "
            "(see the warnings above)")


# --------------------------------------------------------------------------------------------------
# your own images: --classify writes a CSV of predictions, --export a standalone classifier


def check_classify_flags(args):
    """The flags of --classify and --export, one line each, after check_flags. Sets args.csv."""
    evaluation_only = (("--shift", args.shift), ("--data-root", args.data_root),
                       ("--limit", args.limit), ("--figures", args.figures),
                       ("--mean-per-class", args.mean_per_class), ("--json", args.json))
    for flag, given in evaluation_only:
        if given:
            fail(f"{flag} is for evaluating labeled images, not for --classify or --export")
    if args.checkpoint and (args.model or args.classes or args.templates or args.data):
        fail("--classify and --export use the checkpoint's model and classes; --model, --data, "
             "--classes and --templates are for CLIP zero-shot without a checkpoint")
    if args.classify and not os.path.isdir(args.classify):
        fail(f"--classify {args.classify!r} does not exist or is not a directory")
    if not 0.0 <= args.min_prob <= 1.0:
        fail(f"--min-prob {args.min_prob} is not allowed: it must be in [0, 1]")
    args.csv = args.csv or os.path.join(args.out_dir, "predictions.csv")
    for flag, path in (("--csv", args.csv if args.classify else None), ("--export", args.export)):
        if path is None:
            continue
        if os.path.isdir(path):
            fail(f"{flag} {path} is a folder: give the name of the file to write")
        make_folder(flag, path, os.path.dirname(os.path.abspath(path)))


def zero_shot_prompts(args):
    """The class names and templates of CLIP zero-shot: --classes (with the 'a photo of a {}.'
    family) or --data's published names; --templates replaces the templates."""
    if args.classes is None and args.data is None:
        fail("CLIP zero-shot needs its classes: give --classes FILE (one name per line), "
             "--data NAME (a dataset's names) or a --checkpoint")
    if args.classes is None and (args.data == "folder" or args.data == "toy"
                                 or args.data not in data.DATASET_NAMES):
        fail(f"--data {args.data} has no published class names: give --classes FILE")
    name = "folder" if args.classes else args.data
    return data.class_prompts(name, args.classes, args.templates)


def chosen_classifier(args, device, rank):
    """-> (the MUSTModel that --classify and --export use, its class names, the clip_load.ClipSpec
    its images are prepared by): the checkpoint's --which model, or CLIP zero-shot."""
    with rank_zero_first(rank):  # rank 0 downloads the CLIP and caches the head first
        models, _, run, clip, _, spec = load_models(args)
        if models:
            return models[args.which], run["classnames"], spec
        names, templates = zero_shot_prompts(args)
        return zero_shot_model(clip, names, templates, device, args.out_dir), names, spec


def image_folder(root, transform):
    """Every image under root, as training lists them (folders.list_images), in the order of
    their paths relative to root; an unreadable one is flagged, not fatal (folders.ImageList)."""
    ignored = []
    paths = folders.list_images(root, ignored=ignored)
    if not paths:
        fail(f"no images ({'/'.join(folders.IMG_EXTENSIONS)}) found under "
             f"{root!r}{folders.left_out(ignored)}")
    paths.sort(key=lambda path: os.path.relpath(path, root))
    return folders.ImageList([(path, -1) for path in paths], [], [], transform, "skip", ignored)


@torch.inference_mode()
def predict(model, dataset, device, batch_size, num_workers, amp_dtype, k=5):
    """The k most probable classes of every image of dataset, best first -> (probabilities (N, k)
    float32, classes (N, k) int64). Under torch.distributed each process scores every world-th
    image and every process gets all rows."""
    rank, world = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
                   if is_distributed() else (0, 1))
    share = _Tagged([dataset], None, rank, world)
    loader = DataLoader(share, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
    k = min(k, model.num_classes)
    probs, classes = torch.zeros(len(dataset), k), torch.zeros(len(dataset), k, dtype=torch.long)
    done, batches = 0, iter(loader)
    try:
        for images, _, _ in tqdm(batches, desc="classify", dynamic_ncols=True, mininterval=2,
                                 disable=rank != 0, leave=False):
            rows = torch.tensor(share.positions[done:done + len(images)])
            done += len(images)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                logits = model(images.to(device, non_blocking=True)).logits.float()
            top = logits.softmax(dim=1).topk(k, dim=1)
            probs[rows], classes[rows] = top.values.cpu(), top.indices.cpu()
    finally:  # the workers ignore stop signals: a stop or an error must end them
        end_workers(batches)
    # Each row was filled by one process and is zero on the others, so the sum is exact.
    return all_reduce(probs, device), all_reduce(classes, device)


def write_predictions(path, root, dataset, probs, classes, classnames):
    """The CSV of --classify, written atomically: one row per image in the dataset's order, its
    path relative to root, the k most probable classes and their probabilities; an unreadable
    image's row has no class and says why."""
    unreadable = {index: why for index, _, why in dataset.bad_files()}
    k = probs.shape[1]
    header = ["path", "class", "prob"]
    header += [f"{column}{j}" for j in range(2, k + 1) for column in ("class", "prob")]
    text = io.StringIO()
    rows = csv.writer(text, lineterminator="\n")
    rows.writerow(header + ["error"])
    for index, (image, _) in enumerate(dataset.samples):
        relative = os.path.relpath(image, root)
        if index in unreadable:
            rows.writerow([relative] + [""] * 2 * k + [unreadable[index]])
            continue
        top = zip(classes[index].tolist(), probs[index].tolist())
        rows.writerow([relative] + [v for c, p in top for v in (classnames[c], f"{p:.4f}")] + [""])
    # A file name that is not UTF-8 keeps its bytes.
    save_atomic(text.getvalue(), path,
                write=lambda t, f: f.write(t.encode("utf-8", "surrogateescape")))


def prediction_summary(probs, classes, unreadable, classnames, min_prob):
    """Images per predicted class and how many of them are under min_prob -> (table, numbers)."""
    read = torch.ones(len(probs), dtype=torch.bool)
    read[list(unreadable)] = False
    top, low = classes[read, 0], probs[read, 0] < min_prob
    per_class = torch.bincount(top, minlength=len(classnames)).tolist()
    low_per_class = torch.bincount(top[low], minlength=len(classnames)).tolist()
    head = f"{'predicted class':30s} {'images':>8s} {f'p < {min_prob:g}':>10s}"
    lines = [head, "-" * len(head)]
    lines += [f"{name[:30]:30s} {n:8d} {n_low:10d}"
              for name, n, n_low in zip(classnames, per_class, low_per_class)]
    n, n_low = int(read.sum()), int(low.sum())
    lines.append(f"{n} images classified, {n_low} ({100 * n_low / max(n, 1):.1f}%) with a "
                 f"probability under {min_prob:g}; {len(unreadable)} unreadable")
    numbers = {"images": n, "unreadable": len(unreadable), "under_min_prob": n_low,
               "per_class": dict(zip(classnames, per_class))}
    return "\n".join(lines), numbers


def classify_folder(args, model, classnames, spec, device, rank):
    """--classify: every image under the folder scored, the CSV written and summed up by rank 0
    -> the summary's numbers."""
    size = model.visual.input_resolution
    problem = shared_memory_problem(args.num_workers, batch_bytes(args.batch_size, size))
    if problem:
        fail(problem)
    images = image_folder(args.classify, data.test_transform(size, spec))
    if rank == 0:
        report_listing(images, args.classify)
    amp_dtype, _ = autocast_for(args.amp, device)
    probs, classes = predict(model.to(device), images, device, args.batch_size,
                             args.num_workers, amp_dtype)
    report_unreadable(images, "the", set(), device)  # every process's flags, merged
    if rank != 0:
        return None
    write_predictions(args.csv, args.classify, images, probs, classes, classnames)
    unreadable = [index for index, _, _ in images.bad_files()]
    table, numbers = prediction_summary(probs, classes, unreadable, classnames, args.min_prob)
    print(f"{table}\nwrote {args.csv}")
    return numbers


def classify_main(args):
    """--classify and --export, on one process or several under torchrun."""
    check_classify_flags(args)
    rank, _, device = setup_distributed(args.device)
    failed = True
    try:
        model, classnames, spec = chosen_classifier(args, device, rank)
        if args.export and rank == 0:
            must.save_classifier(model, classnames, spec, args.export)
            print(f"wrote {args.export}: a {model.num_classes}-class classifier, which "
                  f"must.load_classifier reads")
        numbers = None
        if args.classify:
            numbers = classify_folder(args, model, classnames, spec, device, rank)
        failed = False
        return numbers
    except RuntimeError as e:
        if peer_failed(e):
            fail("another process failed (its error is above), and this one stopped with it")
        raise
    finally:
        end_distributed(failed)


def main(argv=None):
    args = parse_args(argv)
    check_flags(args)
    # SIGINT, SIGTERM or SIGHUP ends eval.py at once, in one line (there is nothing to save), and
    # evaluate and predict end their loader workers on the way out.
    with StopRequest(at_once=True), dead_workers_found_by_waits():
        if args.classify or args.export:
            return classify_main(args)
        return score(args)


def score(args):
    """Everything eval.py does after its flags are checked. -> the report"""
    device = pick_device(args.device)
    amp_dtype, _ = autocast_for(args.amp, device)  # eval runs no backward: no GradScaler
    models, model_ids, run, clip, clip_name, spec = load_models(args)
    visual = (models["student"] if models else clip).visual
    size = visual.input_resolution
    problem = shared_memory_problem(args.num_workers, batch_bytes(args.batch_size, size))
    if problem:
        fail(problem)
    transform = data.test_transform(size, spec)
    mode, sets, found = resolve_sets(args, run, transform)
    out_dir = args.out_dir  # made by check_flags
    if clip is not None:
        models = add_zero_shot(args, models, model_ids, clip, sets, device, out_dir)
        del clip
    sets, columns, skipped = scorable(sets, models, model_ids)
    not_listed = {s.name: report_listing(s.dataset, s.name) for s in sets}
    # The models go to the device here, not under inference mode, because the figures need
    # autograd on these weights.
    for m in models.values():
        m.eval().to(device)
    counts, speed = evaluate(models, sets, columns, device, args.batch_size, args.num_workers,
                             amp_dtype, args.limit)
    mpc_sets = {s.name for s in sets if args.mean_per_class or mode in data.MEAN_PER_CLASS}
    unread = {s.name: {"unreadable": report_unreadable(s.dataset, s.name, set(), device),
                       "not_listed": not_listed[s.name]} for s in sets}
    results = results_of(sets, models, counts, unread, mpc_sets)
    nothing_scored = check_scored(results)
    report = {"mode": mode, "checkpoint": args.checkpoint, "clip": clip_name,
              "trained_on": run.get("data"), "models": list(models), "device": str(device),
              "images_per_s": speed, "limit": args.limit, "results": results,
              "not_scored": skipped}
    if mode == "imagenet-c":
        report["imagenet_c"] = imagenet_c_report(models, sets, counts, *found)
    else:
        print(accuracy_table(results, list(models), mpc_sets))
    if mode == "shift":
        report["missing"] = found[1]
        print_missing(*found[:2])
    print(f"{sum(r['images'] for r in results.values())} images, {speed:.1f} images/s on {device}")
    json_path = args.json or os.path.join(out_dir, f"eval-{mode}.json")
    save_json(json_path, report)
    if nothing_scored:  # after the report: its counts say what was unreadable
        fail(nothing_scored)
    if args.figures:
        prefix = os.path.join(out_dir, mode)
        report["figures"] = figures.make_figures(args, run, sets, models, columns, visual, spec,
                                                 prefix, device)
        if report["figures"]:
            print("figures: " + ", ".join(report["figures"]))
        save_json(json_path, report)
    return report


if __name__ == "__main__":
    main()
