"""Evaluate CLIP zero-shot or a MUST checkpoint (student and EMA teacher): accuracy
(paper §4.2), ImageNet-C (§4.7, Table 8), natural distribution shift (§4.8, Table 9) and
the figures (Figure 3: GradCAM of the [CLS] attention; Figure 4: masked image modeling).

    python eval.py --checkpoint out/pets/checkpoint.pt --model ViT-B/16 --figures 8
    python eval.py --data imagenet-c --data-root /data/imagenet-c --checkpoint CKPT
    python eval.py --shift --shift-root /data/shift --checkpoint CKPT
    python eval.py --classify ~/my_images --checkpoint CKPT   # a CSV of predictions
    python eval.py --checkpoint CKPT --export classifier.pt   # must.load_classifier

A classifier scores a set whose classes it covers: a 1000-way ImageNet head scores
ImageNet-R/-A on their 200 classes. Every model scores an image in the same pass.
docs/usage.md gives the layouts and the flags in detail.
"""
import argparse
import bisect
import csv
import io
import json
import math
import os
import time
from collections import namedtuple

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Subset
from tqdm import tqdm

import clip_model
import config
import data
import figures
import must
import prompts
from util import clip_load, folders, layouts
from util.layouts import ABSENT, IGNORED, find_shift_sets
from util.runtime import (StopRequest, add_machine_flags, all_reduce, any_process,
                          autocast_for, dead_workers_found_by_waits, end_distributed,
                          end_workers, fail, ignore_stop_signals, is_distributed,
                          make_folder, not_a_clip, peer_failed, pick_device,
                          rank_zero_first, read_checkpoint, save_atomic,
                          setup_distributed, shared_memory_problem)

# ImageNet-C's 15 benchmark corruptions and AlexNet's error on each, averaged over the 5
# severities (Hendrycks & Dietterich 2019): the normalizer of the corruption error CE.
ALEXNET_ERR = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948,
    "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572, "fog": 0.819324,
    "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
SEVERITIES = (1, 2, 3, 4, 5)
# The mCE of the paper's Table 8, ViT-B/16.
PAPER_MCE = "CLIP 70.7, self-training 55.2, MUST 53.4, MAE+supervised 51.7"


# ------------------------------------------------------------------------------
# class spaces: which logits score which set


def class_ids(dataset, classnames):
    """A label space's identities: wnids for the ImageNets, else the names' name_key."""
    wnids = prompts.WNIDS.get(dataset)
    if wnids is not None and len(wnids) == len(classnames):
        return list(wnids)
    return [folders.name_key(c) for c in classnames]


def columns_for(model_ids, set_ids):
    """The logit columns that score a set, in its label order (None: all, as they are).
    Raises ValueError when the classifier lacks some of the set's classes."""
    if list(model_ids) == list(set_ids):
        return None
    index = {c: i for i, c in enumerate(model_ids)}
    missing = [c for c in set_ids if c not in index]
    if missing:
        raise ValueError(f"its {len(model_ids)}-class head lacks {len(missing)} of the "
                         f"set's {len(set_ids)} classes (e.g. {missing[0]!r})")
    return torch.tensor([index[c] for c in set_ids])


# ------------------------------------------------------------------------------
# evaluation sets

# A labeled dataset to score: name, kind (a --data name), dataset, class identities, root.
EvalSet = namedtuple("EvalSet", "name kind dataset ids root")


def build_set(name, kind, root, transform, templates_file=None, classes_file=None):
    """A dataset's test split as an EvalSet; raises data.py's OSError or ValueError."""
    classes = classes_file if kind == "folder" else None
    ds = data.build_dataset(kind, root, "test", transform, classes, templates_file,
                            eval_root=root)
    return EvalSet(name, kind, ds, class_ids(kind, ds.classnames), root)


def corruption_sets(root, transform):
    """ImageNet-C: the EvalSets '<corruption>/<severity>' of the benchmark corruptions
    present -> (sets, left_out [(part, why)])."""
    if not os.path.isdir(root):
        fail(f"ImageNet-C root {root!r} does not exist or is not a directory")
    parts, left_out = layouts.corruption_folders(root, ALEXNET_ERR, SEVERITIES)
    imagenet, wnids = prompts.DATASETS["imagenet"], prompts.IMAGENET_WNIDS
    names, sets = imagenet["classes"], []
    for name, path in parts:
        listing = []
        try:
            samples = folders.scan_class_folders(path, "imagenet", names, listing, wnids)
        except (OSError, ValueError) as e:  # no class folders or images, no wnids
            left_out.append((name, str(e)))
            continue
        ds = folders.ImageList(samples, names, imagenet["templates"], transform, "skip",
                               listing)
        sets.append(EvalSet(name, "imagenet-c", ds, list(wnids), path))
    if not sets and all(why in (ABSENT, IGNORED) for _, why in left_out):
        fail(f"no ImageNet-C corruption under {root!r}: expected "
             f"{root}/<corruption>/<1..5>/<wnid>/*.JPEG with <corruption> among "
             f"{', '.join(ALEXNET_ERR)}")
    warn_left_out(left_out, sets, "ImageNet-C ", f"ImageNet-C root {root!r}")
    return sets, left_out


def shifted_sets(root, transform, templates):
    """--shift: the EvalSets of the shifted ImageNets under root -> (sets, left_out)."""
    try:
        found = find_shift_sets(root)
    except FileNotFoundError as e:
        fail(str(e))
    sets, left_out = [], []
    for name, kind, path in found:
        try:
            sets.append(build_set(name, kind, path, transform, templates))
        except (OSError, ValueError) as e:  # no class folders, no images
            left_out.append((name, str(e)))
    warn_left_out(left_out, sets, "", f"--shift-root {root!r}")
    return sets, left_out


def warn_left_out(left_out, sets, what, where):
    """Warn about each part that cannot be read, before the others are scored; fail when
    there are no others."""
    unusable = [(name, why) for name, why in left_out if why not in (ABSENT, IGNORED)]
    for name, why in unusable:
        print(f"warning: {what}{name} is left out, the other sets are scored: {why}")
    if not sets:
        (first, why), more = unusable[0], ""
        if len(unusable) > 1:
            more = f" (and {len(unusable) - 1} more, named above)"
        fail(f"nothing to score under {where}: {first}: {why}{more}")


def missing_parts(root, left_out):
    """Print the parts of root not scored and the folders passed over -> the JSON's."""
    missing = {name: why for name, why in left_out if why != IGNORED}
    ignored = [name for name, why in left_out if why == IGNORED]
    if missing:
        parts = [name if why == ABSENT else f"{name} ({why})"
                 for name, why in missing.items()]
        print(f"missing from {root}: {', '.join(parts)}")
    if ignored:
        print("ignored folders (not a benchmark corruption, or a severity outside 1-5): "
              + ", ".join(ignored))
    return {"missing": missing, "ignored_folders": ignored}


# ------------------------------------------------------------------------------
# scoring


class Tagged(ConcatDataset):
    """Datasets behind one loader, items (image, label, set index): the workers need not
    restart between ImageNet-C's 75 sets."""

    def __getitem__(self, index):
        set_index = bisect.bisect_right(self.cumulative_sizes, index)
        return (*super().__getitem__(index), set_index)


def shard(datasets, limit=None, rank=0, world=1):
    """Process `rank`'s share of the datasets as one Tagged: every world-th item of the
    whole, and with `limit` only that many evenly spaced images of each dataset."""
    def spaced(d):
        at = np.linspace(0, len(d) - 1, limit).round().astype(int)
        return Subset(d, np.unique(at).tolist())
    whole = Tagged([spaced(d) if limit and limit < len(d) else d for d in datasets])
    return Subset(whole, range(rank, len(whole), world))


def each_batch(datasets, device, batch_size, num_workers, work, limit=None, stop=None,
               desc="eval"):
    """work(images on device, labels, set index, rows) on each batch of this process's
    share; rows are the items' places in the whole. stop: a runtime.StopRequest, asked
    before every batch. -> the images handed over, or None when stopped."""
    rank, world = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
                   if is_distributed() else (0, 1))
    share = shard(datasets, limit, rank, world)
    loader = DataLoader(share, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda",
                        worker_init_fn=ignore_stop_signals)
    # Rank 0 holds the most images: every process goes round this often and asks about a
    # stop each time, including one whose own share ran out a batch earlier.
    rounds = math.ceil(len(range(0, len(share.dataset), world)) / batch_size)
    batches, done = iter(loader), 0
    try:
        for _ in tqdm(range(rounds), desc=desc, dynamic_ncols=True, mininterval=2,
                      disable=rank != 0, leave=False):
            if stop is not None and any_process(stop.signum is not None):
                return None
            batch = next(batches, None)
            if batch is not None:
                images, labels, set_index = batch
                rows = torch.tensor(share.indices[done:done + len(images)])
                work(images.to(device, non_blocking=True), labels, set_index, rows)
                done += len(images)
    finally:  # the workers ignore stop signals: a stop or an error must end them
        end_workers(batches)
    return done


def logits_of(model, images, amp_dtype):
    """The model's fp32 logits, autocast to amp_dtype where one is given."""
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        return model(images).logits.float()


class Counts:
    """Per-class hits of one (set, model): top-1, top-5, images; labels < 0 skipped."""

    def __init__(self, num_classes):
        self.hits = np.zeros((3, num_classes), np.int64)  # top-1, top-5, images

    def add(self, top5, labels):
        """top5: (B, k) predicted labels, best first; labels: (B,)."""
        keep = labels >= 0
        top5, labels = top5[keep], labels[keep]
        right = (labels[top5[:, 0] == labels], labels[(top5 == labels[:, None]).any(1)])
        k = self.hits.shape[1]
        self.hits += np.stack([np.bincount(h, minlength=k) for h in (*right, labels)])

    def all_reduce(self, device):
        """Sum the counts over processes, each of which scored its own share."""
        self.hits = all_reduce(torch.from_numpy(self.hits), device).numpy()
        return self

    def metrics(self):
        """Top-1, top-5 and mean per-class top-1 accuracy (%), the classes with images."""
        top1, top5, n = self.hits
        total = int(n.sum())
        if total == 0:
            return {"images": 0, "top1": None, "top5": None, "mean_per_class": None}
        return {"images": total, "top1": 100.0 * float(top1.sum()) / total,
                "top5": 100.0 * float(top5.sum()) / total,
                "mean_per_class": 100.0 * float(np.mean(top1[n > 0] / n[n > 0]))}


def batch_bytes(batch_size, size):
    """The bytes of a batch that loader workers hand over: float32 images, int64 labels"""
    return batch_size * (4 * 3 * size ** 2 + 8)


@torch.inference_mode()
def evaluate(models, sets, columns, device, batch_size=256, num_workers=8,
             amp_dtype=None, limit=None, stop=None):
    """Score every set with every model in one pass over the images (eval.py, train.py).

    models: {name: module on device, images -> must.MUSTOutput}. columns[(set index,
    name)]: the logit columns that score the set (None: all); only those pairs are
    scored. Under torch.distributed each process scores its share and the counts are
    summed. -> ({(set index, name): Counts}, this process's images per second), or
    (None, 0.0) when `stop` asked.
    """
    counts = {key: Counts(len(sets[key[0]].ids)) for key in columns}
    cols = {key: None if c is None else c.to(device) for key, c in columns.items()}

    def work(images, labels, set_index, _):
        score_batch(models, sets, cols, counts, images, labels, set_index, amp_dtype)

    tic = time.time()
    seen = each_batch([s.dataset for s in sets], device, batch_size, num_workers, work,
                      limit, stop)
    if seen is None:
        return None, 0.0
    for c in counts.values():
        c.all_reduce(device)
    return counts, seen / max(time.time() - tic, 1e-9)


def score_batch(models, sets, cols, counts, images, labels, set_index, amp_dtype):
    """Add one batch to the Counts of each (set, model) that it scores."""
    logits = {name: logits_of(m, images, amp_dtype) for name, m in models.items()}
    labels_np, set_np = labels.numpy(), set_index.numpy()
    for s in np.unique(set_np).tolist():
        rows = torch.from_numpy(np.flatnonzero(set_np == s)).to(images.device)
        for name in models:
            if (s, name) not in cols:
                continue
            z = logits[name][rows]  # (b, K)
            if cols[(s, name)] is not None:
                z = z[:, cols[(s, name)]]  # (b, K_set): only the set's classes compete
            if z.shape[1] != len(sets[s].ids):
                raise ValueError(f"{name} gives {z.shape[1]} logits for the "
                                 f"{len(sets[s].ids)} classes of {sets[s].name}")
            top5 = z.topk(min(5, z.shape[1]), dim=1).indices.cpu().numpy()
            counts[(s, name)].add(top5, labels_np[set_np == s])


def corruption_errors(errors):
    """ImageNet-C's corruption errors (paper Table 8) from errors {corruption: {severity:
    top-1 error %}}.

    CE_c = Σ_s E_{s,c} / Σ_s E^AlexNet_{s,c}, in %; mCE = mean of CE_c over the
    corruptions with all 5 severities (complete when that is all 15).
    """
    mean_err, ce = {}, {}
    for c, by_sev in errors.items():
        if all(by_sev.get(s) is not None for s in SEVERITIES):
            mean_err[c] = sum(by_sev[s] for s in SEVERITIES) / len(SEVERITIES)
            ce[c] = mean_err[c] / ALEXNET_ERR[c]  # % / fraction -> %
    mce = sum(ce.values()) / len(ce) if ce else None
    return {"mean_error": mean_err, "ce": ce, "mce": mce, "corruptions_scored": len(ce),
            "complete": len(ce) == len(ALEXNET_ERR)}


# ------------------------------------------------------------------------------
# output


def _fmt(x, width=6):
    return f"{x:{width}.2f}" if x is not None else " " * (width - 1) + "-"


def accuracy_table(results, model_names, mean_per_class_sets):
    """A row per set: each model's top-1, top-5 and, where asked, mean per-class."""
    mpc = bool(mean_per_class_sets)
    head = f"{'dataset':28s} {'images':>7s}"
    for n in model_names:
        head += f"  {n[:10] + ' top1':>15s} {'top5':>6s}"
        head += f" {'mpc':>6s}" if mpc else ""
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        line = f"{name[:28]:28s} {r['images']:7d}"
        for n in model_names:
            m = r["models"].get(n, {})
            line += f"  {_fmt(m.get('top1'), 15)} {_fmt(m.get('top5'))}"
            if mpc:
                shown = name in mean_per_class_sets
                line += f" {_fmt(m.get('mean_per_class') if shown else None)}"
        lines.append(line)
    return "\n".join(lines)


def corruption_table(model_name, errors, summary):
    """A row per corruption: top-1 error (%) at each severity, mean and CE; then mCE."""
    head = f"{'ImageNet-C ' + model_name:24s}"
    head += "".join(f"{'s' + str(s):>7s}" for s in SEVERITIES) + f"{'mean':>8s}{'CE':>8s}"
    lines = [head + "   (top-1 error %, CE normalized by AlexNet)", "-" * len(head)]
    for c in ALEXNET_ERR:
        by_sev = errors.get(c, {})
        line = f"{c:24s}" + "".join(f" {_fmt(by_sev.get(s))}" for s in SEVERITIES)
        line += f"  {_fmt(summary['mean_error'].get(c))}  {_fmt(summary['ce'].get(c))}"
        lines.append(line + ("" if c in errors else "   missing"))
    partial = ""
    if not summary["complete"]:
        partial = f"   (partial: {summary['corruptions_scored']}/15 corruptions)"
    gap = " " * (7 * len(SEVERITIES) + 8)
    lines.append(f"{'mCE':24s}{gap}  {_fmt(summary['mce'])}{partial}")
    lines.append(f"paper's mCE (ViT-B/16, Table 8): {PAPER_MCE}")
    return "\n".join(lines)


def print_table(evals, dataset, mean_per_class, start_name):
    """Zero-shot vs the MUST student and EMA teacher of the last evaluation, and the release's
    best-on-test student. When evaluations scored different numbers of images, each row says
    how many, and the best student is chosen among those that scored as many as the last."""
    first, last = evals[0], evals[-1]
    same = [e for e in evals[1:] or evals if e.get("images") == last.get("images")] or [last]
    best = max(same, key=lambda e: e["student_acc"])
    rows = [(start_name, first), ("MUST student", last), ("MUST teacher (EMA)", last),
            ("best student", best)]
    if len(evals) == 1:  # stopped before the first evaluation after training
        rows = rows[:1]
    # Older checkpoints' evaluations have no image count.
    differ = len({e["images"] for e in evals if "images" in e}) > 1
    print(f"\n{dataset}: {'mean per-class accuracy' if mean_per_class else 'top-1'} (%)")
    for name, e in rows:
        acc = e["teacher_acc"] if name == "MUST teacher (EMA)" else e["student_acc"]
        when = e["epoch"]
        if name == "best student":
            when = f"{when} (chosen on test, as the release)"
        count = f"   on {e.get('images')} images" if differ else ""
        print(f"  {name:20} {acc:6.2f}   epoch {when}{count}")
    if differ:
        print("  warning: the evaluations scored different numbers of test images (see the "
              "warnings above), so their accuracies are not comparable")


def report_end(run, why):
    """train.py's closing lines (rank 0): unreadable images, a --max-steps stop, the table."""
    args = run.args
    if run.reported:
        print(f"skipped {len(run.reported)} unreadable training image(s) (named above); each "
              f"was replaced by the next readable one")
    if why == "max-steps":
        print(f"stopped after step {run.step} of {run.total_steps} (--max-steps); to go on, "
              f"rerun with a larger --max-steps or without it (it resumes from {run.ckpt_path})")
    if run.evals:
        start = "--init model" if args.init else "CLIP zero-shot"
        print_table(run.evals, args.data, args.data in data.MEAN_PER_CLASS, start)
    elif run.test_set is None:
        print("not evaluated: --data folder without --eval-root")


def imagenet_c_report(models, sets, counts):
    """Per model: the error per corruption and severity, CE and mCE, printed as tables."""
    report = {}
    for name in models:
        errors = {}
        for i, s in enumerate(sets):
            if (i, name) in counts:
                corruption, severity = s.name.split("/")
                top1 = counts[(i, name)].metrics()["top1"]  # None: no image readable
                error = None if top1 is None else 100.0 - top1
                errors.setdefault(corruption, {})[int(severity)] = error
        summary = corruption_errors(errors)
        as_json = {c: {str(k): v for k, v in e.items()} for c, e in errors.items()}
        report[name] = {"error": as_json, **summary}
        print(corruption_table(name, errors, summary) + "\n")
    return report


def report_unreadable(dataset, what, reported, device):
    """Merge every process's unreadable-file flags (folders.ImageList.bad), warn once
    about each file not in `reported`, and return how many are unreadable so far."""
    if not hasattr(dataset, "bad"):  # the toy's datasets never fail
        return 0
    bad = all_reduce(dataset.bad.to(torch.int32), device, torch.distributed.ReduceOp.MAX)
    dataset.bad.copy_(bad.to(torch.int8))
    for index, path, why in dataset.bad_files():
        if index not in reported:
            reported.add(index)
            if not is_distributed() or torch.distributed.get_rank() == 0:
                tqdm.write(f"warning: skipped {what} image {path}: it {why}")
    return len(reported)


def report_listing(dataset, what):
    """A line per reason for the entries that the listing left out -> how many."""
    by_reason = {}
    for path, reason in getattr(dataset, "ignored", []):
        by_reason.setdefault(reason, []).append(path)
    for reason, paths in by_reason.items():
        print(f"warning: {len(paths)} {what} entries not listed: {reason} "
              f"(e.g. {paths[0]})")
    return sum(len(paths) for paths in by_reason.values())


def results_of(sets, models, counts, unread, mpc_sets):
    """{set name: images, classes, root, unreadable and unlisted files, accuracies}"""
    results = {}
    for i, s in enumerate(sets):
        per_model = {name: counts[(i, name)].metrics()
                     for name in models if (i, name) in counts}
        n = next(iter(per_model.values()))["images"] if per_model else 0
        accuracies = {model: {key: v for key, v in metrics.items() if key != "images"}
                      for model, metrics in per_model.items()}
        results[s.name] = {"images": n, "classes": len(s.ids), "root": s.root,
                           **unread[s.name],
                           "metric": "mean_per_class" if s.name in mpc_sets else "top1",
                           "models": accuracies}
    return results


def check_scored(results):
    """Warn about each set that scored no image while others did. When none scored any,
    return the error to fail with once the report is written (its counts say why)."""
    def why(r):
        n = r["unreadable"]
        return (f"all {n} images read were unreadable" if n
                else "none of its images has a label")
    empty = {name: r for name, r in results.items() if r["images"] == 0}
    if len(empty) < len(results):
        for name, r in empty.items():
            print(f"warning: scored no image of {name}: {why(r)} "
                  "(see the warnings above)")
        return None
    if len(empty) == 1:
        name, r = next(iter(empty.items()))
        return f"scored no image of {name}: {why(r)} (see the warnings above)"
    n = sum(r["unreadable"] for r in empty.values())
    return (f"scored no image of any of the {len(empty)} sets: all {n} images read "
            "were unreadable (see the warnings above)")


def save_json(path, report):
    save_atomic(report, path,
                write=lambda obj, f: f.write(json.dumps(obj, indent=1).encode()))
    print(f"wrote {path}")


# ------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Evaluate CLIP zero-shot or a MUST checkpoint: accuracy, ImageNet-C "
                    "mCE, distribution shift, the paper's figures (docs/usage.md).")
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--data", help=f"dataset: {', '.join(data.DATASET_NAMES)} or "
                                  "imagenet-c [the checkpoint's]")
    g.add_argument("--data-root", help="dataset folder [the checkpoint's]")
    g.add_argument("--shift", action="store_true",
                   help="score every shifted ImageNet under --shift-root (Table 9)")
    g.add_argument("--shift-root", help="folder of the shifted ImageNets [--data-root]")
    g.add_argument("--classes", help="class names file, one a line [the checkpoint's]")
    g.add_argument("--templates", help="prompt templates file, one a line with {}")
    g.add_argument("--limit", type=int, metavar="N",
                   help="score N evenly spaced images per set")
    g = p.add_argument_group("models")
    g.add_argument("--checkpoint", help="MUST checkpoint: its student and teacher")
    g.add_argument("--model", help="CLIP name or file to score zero-shot "
                                   "[ViT-B/16 without --checkpoint]")
    g.add_argument("--mean-per-class", action="store_true",
                   help="report mean per-class accuracy on every set")
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=256,
                   help="images per forward pass [%(default)s]")
    g.add_argument("--figures", type=int, default=0, metavar="N",
                   help="draw Figures 3 and 4 for N images of a set [%(default)s]")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the reconstruction figure's masks [%(default)s]")
    g.add_argument("--out-dir", help="folder of the JSON, figures and zero-shot heads "
                                     "[the checkpoint's, else out/eval]")
    g.add_argument("--json", help="the JSON file [OUT_DIR/eval-<data>.json]")
    g = p.add_argument_group("classify your own images (instead of evaluating)")
    g.add_argument("--classify", metavar="DIR",
                   help="write the top-5 classes of every image under DIR to a CSV")
    g.add_argument("--which", choices=["student", "teacher"], default="student",
                   help="the checkpoint's model to classify or export [%(default)s]")
    g.add_argument("--csv", help="the CSV of --classify [OUT_DIR/predictions.csv]")
    g.add_argument("--min-prob", type=float, default=0.5,
                   help="the summary counts predictions under it [%(default)s]")
    g.add_argument("--export", metavar="FILE",
                   help="write the model as a classifier file (must.load_classifier)")
    add_machine_flags(p)
    return p.parse_args(argv)


def preflight(args):
    """eval.py's checks before any model is loaded, one line each; makes the folders
    that the outputs go to."""
    check_flags(args)
    check_inputs(args)
    if args.classify or args.export:
        check_classify_flags(args)
    check_outputs(args)


def check_flags(args):
    """The numbers that flags take."""
    bounds = (("--batch-size", args.batch_size, 1), ("--limit", args.limit, 1),
              ("--num-workers", args.num_workers, 0), ("--figures", args.figures, 0))
    for flag, value, least in bounds:
        if value is not None and value < least:
            bound = "at least 1" if least else "0 or more"
            fail(f"{flag} {value} is not allowed: it must be {bound}")


def check_inputs(args):
    """The folders and files that flags name."""
    for flag, root in (("--data-root", args.data_root), ("--shift-root", args.shift_root),
                       ("--classify", args.classify)):
        if root and not os.path.isdir(root):
            fail(f"{flag} {root!r} does not exist or is not a directory")
    config.check_text_files(args.classes, args.templates)
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        fail(f"no checkpoint file at {args.checkpoint}")


def check_classify_flags(args):
    """--classify and --export: no evaluation flag, and a model with class names."""
    evaluation_only = (("--shift", args.shift), ("--data-root", args.data_root),
                       ("--limit", args.limit), ("--figures", args.figures),
                       ("--mean-per-class", args.mean_per_class), ("--json", args.json))
    for flag, given in evaluation_only:
        if given:
            fail(f"{flag} is for evaluating labeled images, not for --classify or "
                 "--export")
    if args.checkpoint and (args.model or args.classes or args.templates or args.data):
        fail("--classify and --export use the checkpoint's model and classes; --model, "
             "--data, --classes and --templates are for CLIP zero-shot without a "
             "checkpoint")
    if not 0.0 <= args.min_prob <= 1.0:
        fail(f"--min-prob {args.min_prob} is not allowed: it must be in [0, 1]")
    if args.checkpoint or args.classes:
        return
    if args.data is None:
        fail("CLIP zero-shot needs its classes: give --classes FILE (one name per line), "
             "--data NAME (a dataset's names) or a --checkpoint")
    if args.data in ("folder", "toy") or args.data not in data.DATASET_NAMES:
        fail(f"--data {args.data} has no published class names: give --classes FILE")


def check_outputs(args):
    """Make --out-dir and the folders of --json, --csv and --export."""
    if args.out_dir is None:  # the checkpoint's folder, now known to exist, or out/eval
        args.out_dir = (os.path.dirname(os.path.abspath(args.checkpoint))
                        if args.checkpoint else os.path.join("out", "eval"))
    args.csv = args.csv or os.path.join(args.out_dir, "predictions.csv")
    outputs = (("--json", args.json, "JSON file"), ("--export", args.export, "file"),
               ("--csv", args.csv if args.classify else None, "file"))
    for flag, path, what in outputs:
        if path and os.path.isdir(path):
            fail(f"{flag} {path} is a folder: give the name of the {what} to write")
    make_folder("--out-dir", args.out_dir)
    for flag, path, _ in outputs:
        if path:
            make_folder(flag, path, os.path.dirname(os.path.abspath(path)))


def check_shared_memory(args, size):
    """Fail when /dev/shm cannot hold the loader workers' batches of size px images."""
    need = batch_bytes(args.batch_size, size)
    problem = shared_memory_problem(args.num_workers, need)
    if problem:
        fail(problem)


# ------------------------------------------------------------------------------
# models and sets

# What load_models reads, on CPU: the checkpoint's models {"student", "teacher"} ({}
# without one), {model name: class identities}, the checkpoint's flags and "classnames"
# ({}), the CLIP to score zero-shot and its --model (or None), the clip_load.ClipSpec that
# prepares the images for all, and the image tower that sets their size.
Loaded = namedtuple("Loaded", "models ids run clip clip_name spec visual")


def load_models(args):
    """The checkpoint's student and teacher and the CLIP to score zero-shot -> Loaded."""
    models, ids, run, specs = {}, {}, {}, {}
    if args.checkpoint:
        models, run, specs[args.checkpoint] = read_must_checkpoint(args.checkpoint)
        ids = dict.fromkeys(models, class_ids(run.get("data"), run["classnames"]))
    clip_name, clip = args.model or (None if args.checkpoint else "ViT-B/16"), None
    if clip_name:
        try:
            clip, _ = clip_model.load(clip_name, device="cpu",
                                      download_root=args.download_root)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            fail(not_a_clip(clip_name, e, "score it with --checkpoint"))
        specs[clip_name] = clip.spec
    visual = models["student"].visual if models else clip.visual
    size = visual.input_resolution
    if clip is not None and size != clip.visual.input_resolution:
        fail(f"CLIP {clip_name} takes {clip.visual.input_resolution} px images, the "
             f"checkpoint {size} px")
    # One pass prepares the images for all.
    seen = {(s.mean, s.std, s.interpolation, s.resize_mode) for s in specs.values()}
    if len(seen) > 1:
        fail(f"CLIP {clip_name} and the checkpoint {args.checkpoint} prepare images "
             f"differently ({' vs '.join(' '.join(map(str, s)) for s in seen)}); score "
             "them with one eval.py each")
    return Loaded(models, ids, run, clip, clip_name, next(iter(specs.values())), visual)


def read_must_checkpoint(path):
    """train.py's checkpoint -> ({"student", "teacher": MUSTModel}, run, ClipSpec)."""
    try:
        ckpt = read_checkpoint(path)
    except ValueError as e:
        fail(str(e))
    try:
        models = {name: must.load_checkpoint(ckpt, name)
                  for name in ("student", "teacher")}
    except (KeyError, ValueError, RuntimeError) as e:  # not the tensors train.py writes
        fail(f"cannot read MUST checkpoint {path} ({str(e).splitlines()[0][:200]})")
    run = dict(ckpt.get("args", {}), classnames=list(ckpt.get("classnames", [])))
    if len(run["classnames"]) != models["student"].num_classes:
        fail(f"checkpoint {path} lists {len(run['classnames'])} class names for a "
             f"{models['student'].num_classes}-way head")
    # A checkpoint without its CLIP's spec started from OpenAI's, the only ones then.
    spec = ckpt.get("clip", clip_load.OPENAI_SPEC._asdict())
    return models, run, clip_load.ClipSpec(**spec)


def zero_shot_model(clip, names, templates, device, cache_dir):
    """CLIP zero-shot over `names` as a MUSTModel in eval mode, its head cached."""
    try:
        head = prompts.zero_shot_head(clip.to(device), names, templates, device=device,
                                      cache_dir=cache_dir)
    except ValueError as e:  # a prompt longer than CLIP's context
        fail(str(e))
    return must.MUSTModel.from_clip(clip, head.cpu()).eval()


def add_zero_shot(args, loaded, sets, device):
    """CLIP zero-shot first among the models -> (models, ids): one head over the classes
    that every set needs (ImageNet-1k for several)."""
    if len(sets) == 1:
        ds, kind = sets[0].dataset, sets[0].kind
        names, templates = ds.classnames, ds.templates
    else:
        imagenet, kind = prompts.DATASETS["imagenet"], "imagenet"
        names, templates = imagenet["classes"], imagenet["templates"]
        if args.templates:
            templates = folders.read_templates(args.templates)
    clip = zero_shot_model(loaded.clip, names, templates, device, args.out_dir)
    return ({"clip": clip, **loaded.models},
            {"clip": class_ids(kind, names), **loaded.ids})


def resolve_sets(args, run, transform):
    """The sets to score -> (mode, root, [EvalSet], left_out); the flags that name them
    default to the checkpoint's."""
    if args.shift and args.data:
        fail("give --data or --shift, not both")
    if args.shift:
        root = args.shift_root or args.data_root
        if root is None:
            fail("--shift needs --shift-root DIR "
                 "(a folder with imagenetv2*/imagenet-r/imagenet-a/imagenet-sketch)")
        return ("shift", root, *shifted_sets(root, transform, args.templates))
    mode = args.data or run.get("data")
    if mode is None:
        fail("give --data NAME (and --data-root DIR), --shift, or a --checkpoint whose "
             "dataset is evaluated")
    names = data.DATASET_NAMES + ["imagenet-c"]
    if mode not in names:
        fail(f"unknown dataset {mode!r}; choose one of: {', '.join(names)}")
    own = run if args.data in (None, run.get("data")) else {}
    # The checkpoint's flags hold its own --eval-root or --data-root.
    root = args.data_root or own.get("eval_root" if mode == "folder" else "data_root")
    if root is None and mode != "toy":
        fail(f"give --data-root DIR for {mode}")
    if mode == "imagenet-c":
        return (mode, root, *corruption_sets(root, transform))
    classes = args.classes or own.get("classes")
    templates = args.templates or own.get("templates")
    try:
        test = build_set(mode, mode, root, transform, templates, classes)
        return mode, root, [test], []
    except (OSError, ValueError) as e:
        fail(f"{mode}: {e}")


def scorable(sets, models, model_ids):
    """Which logits score which set -> (the sets some model scores, columns {(set index,
    model): columns}, {set: {model: why not}}). A set no model scores is not loaded."""
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


# ------------------------------------------------------------------------------
# evaluation


def score(args):
    """eval.py's evaluation, once the flags are checked -> the report."""
    device = pick_device(args.device)
    amp_dtype, _ = autocast_for(args.amp, device)  # no backward: no GradScaler
    loaded = load_models(args)
    check_shared_memory(args, loaded.visual.input_resolution)
    transform = data.test_transform(loaded.visual.input_resolution, loaded.spec)
    mode, root, sets, left_out = resolve_sets(args, loaded.run, transform)
    models, ids = loaded.models, loaded.ids
    if loaded.clip is not None:
        models, ids = add_zero_shot(args, loaded, sets, device)
        loaded = loaded._replace(clip=None)  # frees the text tower
    sets, columns, skipped = scorable(sets, models, ids)
    not_listed = {s.name: report_listing(s.dataset, s.name) for s in sets}
    # Not under inference mode: the figures need autograd on these weights.
    for m in models.values():
        m.eval().to(device)
    counts, speed = evaluate(models, sets, columns, device, args.batch_size,
                             args.num_workers, amp_dtype, args.limit)
    mpc = args.mean_per_class or mode in data.MEAN_PER_CLASS
    mpc_sets = {s.name for s in sets} if mpc else set()
    unread = {s.name: {"unreadable": report_unreadable(s.dataset, s.name, set(), device),
                       "not_listed": not_listed[s.name]} for s in sets}
    results = results_of(sets, models, counts, unread, mpc_sets)
    nothing_scored = check_scored(results)
    report = {"mode": mode, "checkpoint": args.checkpoint, "clip": loaded.clip_name,
              "trained_on": loaded.run.get("data"), "models": list(models),
              "device": str(device), "images_per_s": speed, "limit": args.limit,
              "results": results, "not_scored": skipped}
    if mode == "imagenet-c":
        report["imagenet_c"] = imagenet_c_report(models, sets, counts)
        report["imagenet_c"].update(missing_parts(root, left_out))
    else:
        print(accuracy_table(results, list(models), mpc_sets))
    if mode == "shift":
        report["missing"] = missing_parts(root, left_out)["missing"]
    images = sum(r["images"] for r in results.values())
    print(f"{images} images, {speed:.1f} images/s on {device}")
    json_path = args.json or os.path.join(args.out_dir, f"eval-{mode}.json")
    save_json(json_path, report)
    if nothing_scored:  # after the report: its counts say what was unreadable
        fail(nothing_scored)
    if args.figures:
        prefix = os.path.join(args.out_dir, mode)
        report["figures"] = figures.make_figures(args, loaded.run, sets, models, columns,
                                                 loaded.spec, prefix, device)
        if report["figures"]:
            print("figures: " + ", ".join(report["figures"]))
        save_json(json_path, report)
    return report


# ------------------------------------------------------------------------------
# your own images: --classify writes a CSV of predictions, --export a classifier file


def chosen_classifier(args, device, rank):
    """The checkpoint's --which model, or CLIP zero-shot -> (MUSTModel, classes, spec)."""
    with rank_zero_first(rank):  # rank 0 downloads the CLIP and caches the head first
        loaded = load_models(args)
        if loaded.models:
            return loaded.models[args.which], loaded.run["classnames"], loaded.spec
        names, templates = data.class_prompts("folder" if args.classes else args.data,
                                              args.classes, args.templates)
        model = zero_shot_model(loaded.clip, names, templates, device, args.out_dir)
        return model, names, loaded.spec


def image_folder(root, transform):
    """Every image under root as training lists them, in the order of their paths; an
    unreadable one is flagged, not fatal (folders.ImageList)."""
    ignored = []
    paths = folders.list_images(root, ignored=ignored)
    if not paths:
        fail(f"no images ({'/'.join(folders.IMG_EXTENSIONS)}) found under "
             f"{root!r}{folders.left_out(ignored)}")
    paths.sort(key=lambda path: os.path.relpath(path, root))
    samples = [(path, -1) for path in paths]
    return folders.ImageList(samples, [], [], transform, "skip", ignored)


@torch.inference_mode()
def predict(model, dataset, device, batch_size, num_workers, amp_dtype, k=5):
    """The k most probable classes of every image, best first -> (probabilities (N, k),
    classes (N, k)). Under torch.distributed each process scores its share; all get all
    rows."""
    k = min(k, model.num_classes)
    probs = torch.zeros(len(dataset), k)
    classes = torch.zeros(len(dataset), k, dtype=torch.long)

    def work(images, _, __, rows):
        top = logits_of(model, images, amp_dtype).softmax(dim=1).topk(k, dim=1)
        probs[rows], classes[rows] = top.values.cpu(), top.indices.cpu()

    each_batch([dataset], device, batch_size, num_workers, work, desc="classify")
    # Each row was filled by one process and is zero on the others: the sum is exact.
    return all_reduce(probs, device), all_reduce(classes, device)


def write_predictions(path, root, dataset, probs, classes, classnames):
    """The CSV of --classify, written atomically: a row per image, its path relative to
    root, its k most probable classes and their probabilities, or why it is unreadable."""
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
        cells = [v for c, p in top for v in (classnames[c], f"{p:.4f}")]
        rows.writerow([relative] + cells + [""])
    # A file name that is not UTF-8 keeps its bytes.
    save_atomic(text.getvalue(), path,
                write=lambda t, f: f.write(t.encode("utf-8", "surrogateescape")))


def prediction_summary(probs, classes, unreadable, classnames, min_prob):
    """Images per predicted class, and how many under min_prob -> (table, numbers)."""
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
    lines.append(f"{n} images classified, {n_low} ({100 * n_low / max(n, 1):.1f}%) with "
                 f"a probability under {min_prob:g}; {len(unreadable)} unreadable")
    numbers = {"images": n, "unreadable": len(unreadable), "under_min_prob": n_low,
               "per_class": dict(zip(classnames, per_class))}
    return "\n".join(lines), numbers


def classify_folder(args, model, classnames, spec, device, rank):
    """--classify: every image under the folder scored; rank 0 writes the CSV and sums it
    up -> the summary's numbers."""
    size = model.visual.input_resolution
    check_shared_memory(args, size)
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
    table, numbers = prediction_summary(probs, classes, unreadable, classnames,
                                        args.min_prob)
    print(f"{table}\nwrote {args.csv}")
    return numbers


def classify_main(args):
    """--classify and --export, on one process or several under torchrun."""
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
            fail("another process failed (its error is above), and this one stopped "
                 "with it")
        raise
    finally:
        end_distributed(failed)


def main(argv=None):
    args = parse_args(argv)
    preflight(args)
    # A stop signal ends eval.py at once in one line (it has nothing to save); evaluate
    # and predict end their loader workers on the way out.
    with StopRequest(at_once=True), dead_workers_found_by_waits():
        if args.classify or args.export:
            return classify_main(args)
        return score(args)


if __name__ == "__main__":
    main()
