"""The configuration of a MUST run: the paper's Table 10, every setting in one table (SETTINGS),
the command line built from it and checked before any work (check_flags), the Table 10 values
filled in for the dataset and model of the run (resolve_config), and check_same_run, which says
whether a checkpoint was made by the same run.

A hyperparameter is added in one place, a SETTINGS row: from there it becomes a flag in its --help
group, is checked against its domain, takes Table 10's value when the flag is not given and the
table has one, and, when it decides the weights (defines), must be the same to resume.
A new weight-deciding setting must default to the old behaviour: a checkpoint that does not
record it counts as made with its default, and a resume with another value is refused.
"""
import argparse
import math
import os
from collections import namedtuple

import torch

import data
from toy import world as toy
from util import clip_load, folders
from util.runtime import add_machine_flags, fail, fingerprint, make_folder

# ----------------------------------------------------------------------------------------------
# The paper's Table 10, as released

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

# (patch size, input px, width) of the released CLIPs, by which a CLIP file finds its rows.
MODEL_GEOMETRY = {"ViT-B/32": (32, 224, 768), "ViT-B/16": (16, 224, 768),
                  "ViT-L/14": (14, 224, 1024), "ViT-L/14@336px": (14, 336, 1024),
                  "ViT-H/14": (14, 224, 1280), "ViT-H/14@378px": (14, 378, 1280),
                  "ViT-bigG/14": (14, 224, 1664)}
# The models whose Table 10 rows a model borrows, best first. The paper has no ViT-H/14 or
# bigG/14 rows: they take ViT-L/14's, the largest model and the same patch.
_ROW_PREFERENCE = {"ViT-B/32": ("ViT-B/16", "ViT-L/14"), "ViT-B/16": ("ViT-B/16", "ViT-L/14"),
                   **{model: ("ViT-L/14", "ViT-B/16") for model in (
                       "ViT-L/14", "ViT-L/14@336px", "ViT-H/14", "ViT-H/14@378px",
                       "ViT-bigG/14")}}


def hparams(dataset, model_name, patch_size=None, input_size=None):
    """The default hyperparameters of a run: the Table 10 row of (dataset, model), and
    batch_size (global). -> a fresh plain dict: train.py overrides any value

    Combinations the paper did not run borrow the nearest row: 'folder' and the shifted ImageNets
    use ImageNet's; ViT-B/32 uses ViT-B/16's; ViT-L/14@336px, ViT-H/14 (at 224 or 378 px) and
    ViT-bigG/14 use ViT-L/14's; a dataset with only a ViT-B/16 row (pets, caltech101) lends it to
    ViT-L and larger. A borrowed row's base_lr is rescaled so that the absolute lr (base_lr ×
    batch / 256) is unchanged, and its mask unit is snapped to a multiple of the model's patch
    size that tiles the input. Unknown model names (e.g. a checkpoint path) use the ViT-B/16 row;
    patch_size / input_size (the loaded model's) override the released geometry of model_name when
    given.
    """
    if dataset == "toy":
        return dict(toy.HPARAMS)
    if dataset not in data.DATASET_NAMES:
        raise ValueError(f"unknown dataset {dataset!r}; valid names: "
                         f"{', '.join(data.DATASET_NAMES)}")
    table_dataset = dataset if any(d == dataset for d, _ in HPARAMS) else "imagenet"
    preference = _ROW_PREFERENCE.get(model_name, ("ViT-B/16", "ViT-L/14"))
    row_model = next(m for m in preference if (table_dataset, m) in HPARAMS)
    hp = dict(HPARAMS[(table_dataset, row_model)])
    batch_size = GLOBAL_BATCH[preference[0]]
    hp["base_lr"] *= GLOBAL_BATCH[row_model] / batch_size
    known_patch, known_size, _ = MODEL_GEOMETRY.get(model_name, (None, None, None))
    patch_size, input_size = patch_size or known_patch, input_size or known_size  # the model's
    if patch_size is not None and input_size is not None:
        hp["mask_unit"] = _snap_mask_unit(hp["mask_unit"], patch_size, input_size)
    hp["batch_size"] = batch_size
    hp["strong_view"] = "paper"
    return hp


def _snap_mask_unit(mask_unit, patch_size, input_size):
    """The multiple of patch_size nearest to mask_unit that tiles input_size (the larger one on a
    tie)."""
    candidates = [m for m in range(patch_size, input_size + 1, patch_size) if input_size % m == 0]
    if not candidates:
        raise ValueError(f"input size {input_size} is not a multiple of patch size {patch_size}")
    return min(candidates, key=lambda m: (abs(m - mask_unit), -m))


def model_key(name, visual):
    """The model name Table 10 knows for a CLIP, by its architecture, whatever its source: an open
    ViT-B/16 (ViT-B-16/dfn2b, a file) takes the ViT-B/16 rows; else the name itself."""
    by_geometry = {geometry: known for known, geometry in MODEL_GEOMETRY.items()}
    return by_geometry.get((visual.patch_size, visual.input_resolution, visual.width), name)


# ----------------------------------------------------------------------------------------------
# Every setting

# One row of SETTINGS; domain = (the test a given value must pass, what it must be, as the error
# message says), or a list of choices. A row of type bool is a switch, off by default.
Setting = namedtuple("Setting", "name type default domain group help defines", defaults=(True,))
_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_AT_LEAST_0 = (lambda v: 0 <= v < math.inf, "0 or more")
_UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")

SETTINGS = [
    Setting("conf_threshold", float, None,
            (lambda v: 0 <= v < 1, "in [0, 1) (a softmax never exceeds 1)"), "method",
            "τ: pseudo-label confidence threshold (eq. 2) [Table 10]"),
    Setting("lambda_reg", float, None, _AT_LEAST_0, "loss",
            "λ_reg: weight of the fairness regularization (eq. 3, 6) [Table 10]"),
    Setting("lambda_align", float, None, _AT_LEAST_0, "loss",
            "λ_align: weight of the global-local alignment (eq. 5, 6) [Table 10]"),
    Setting("align_k", int, None, _AT_LEAST_1, "loss",
            "align [CLS] only with the k nearest [MSK] tokens (Table 6) [all]"),
    Setting("mask_unit", int, None, (lambda v: v >= 1, "at least 1 px"), "method",
            "s: side in px of the square units masked together (§3.2) [Table 10]"),
    Setting("mask_ratio", float, None, _UNIT, "method",
            "share of mask units replaced by [MSK], rounded up (§3.2) [Table 10]"),
    Setting("ema_mu0", float, None, _UNIT, "method",
            "µ0: initial EMA decay of the teacher (eq. 1) [Table 10]"),
    Setting("ema_mu_n", int, None, _AT_LEAST_0, "method",
            "µn: iterations over which µ ramps linearly from µ0 to 0.9998 [Table 10]"),
    Setting("strong_view", str, None, list(data.STRONG_VIEWS), "method",
            "the student's augmentation: paper = RandomResizedCrop 0.3-1 + flip + RandAugment "
            "(224 px photos); light = 10%% translation + flip + brightness/contrast (small "
            "images) [paper; toy: light]"),
    Setting("freeze_classifier", bool, False, None, "model",
            "keep the zero-shot classifier W fixed (the ImageNet warm-up of §4.4)"),
    Setting("no_reg", bool, False, None, "method", "ablation: drop L_reg (Table 7)"),
    Setting("no_mim", bool, False, None, "method", "ablation: drop L_mim (Table 5)"),
    Setting("no_align", bool, False, None, "method",
            "ablation: drop L_align (Table 5); with --no-mim the student sees unmasked images "
            "(self-training only)"),
    Setting("base_lr", float, None, (lambda v: 0 < v < math.inf, "a positive number"),
            "optimization", "base_lr; lr = base_lr × global_batch / 256 [Table 10]"),
    Setting("base_min_lr", float, 1e-6, _AT_LEAST_0, "optimization",
            "end of the cosine: min_lr = base_min_lr × global_batch / 256"),
    Setting("epochs", int, None, _AT_LEAST_1, "optimization", "training epochs [Table 10]"),
    Setting("global_batch", int, None, _AT_LEAST_1, "optimization",
            "images per optimizer step over all processes [Table 10: 1024 ViT-B, 512 ViT-L]"),
    Setting("weight_decay", float, 0.05, _AT_LEAST_0, "optimization",
            "AdamW weight decay (none on 1-D params but [MSK])"),
    Setting("layer_decay", float, 0.65, (lambda v: 0 < v <= 1, "in (0, 1]"), "optimization",
            "layer-wise lr decay: scale layer_decay^(L+1-i) for layer i"),
    Setting("seed", int, 0, (lambda v: 0 <= v < 2 ** 32, "in [0, 2^32)"), "optimization",
            "random seed (augmentations depend only on seed, epoch and image index)"),
    Setting("batch_size_per_gpu", int, None, _AT_LEAST_1, "optimization",
            "images per forward pass per process; gradients are accumulated exactly up to the "
            "global batch (eq. 2-3 over the global batch) [global/processes]", defines=False),
    Setting("accum_steps", int, None, _AT_LEAST_1, "optimization",
            "gradient accumulation steps (alternative to --batch-size-per-gpu) [1]",
            defines=False),
    Setting("eval_freq", int, None, _AT_LEAST_1, "run",
            "evaluate student and teacher every this many epochs [Table 10]", defines=False),
    Setting("log_freq", int, 10, _AT_LEAST_1, "run", "log every this many optimizer steps",
            defines=False),
    Setting("save_freq", int, 0, (lambda v: v >= 0, "0 (off) or more"), "run",
            "also checkpoint every this many steps (0: off)", defines=False),
    Setting("save_minutes", float, 30.0, _AT_LEAST_0, "run",
            "also checkpoint when this many minutes have passed since the last checkpoint, on "
            "rank 0's clock (0: off): a crash or kill then loses at most about this much work, "
            "where an ImageNet epoch takes hours, and a checkpoint's write of seconds to a "
            "minute (several GB for ViT-L/14) costs a few %% of it",
            defines=False),
    Setting("max_steps", int, None, _AT_LEAST_0, "run",
            "stop (with a checkpoint) after this many optimizer steps in total; the lr schedule "
            "still spans --epochs", defines=False),
]
# The switches that decide the weights besides SETTINGS; the CLIP, classes and templates are
# compared by content.
RUN_DEFINING = tuple(s.name for s in SETTINGS if s.defines)
# What a run has without the flag; Table 10's value where resolve_config fills one (args.table10).
DEFAULTS = {s.name: s.default for s in SETTINGS}


class _Help(argparse.HelpFormatter):
    """Show a flag's default only when it has one (unset Table 10 flags say so in their help) and
    its help does not say it already (the machine flags, which eval.py and bench.py share)."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS:
            return action.help
        if "(default:" in action.help:
            return action.help
        return action.help + " (default: %(default)s)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="MUST: unsupervised adaptation of a CLIP zero-shot classifier on unlabeled "
                    "images. Flags marked [Table 10] default to the paper's value for (--data, "
                    "--model). The classifier's logit scale s is the CLIP checkpoint's own "
                    "exp(logit_scale) (100 for OpenAI's CLIPs).",
        formatter_class=_Help)
    names = ("data", "model", "method", "loss", "optimization", "run")
    groups = {name: p.add_argument_group(name) for name in names}
    g = groups["data"]
    g.add_argument("--data", required=True, help=f"dataset: {', '.join(data.DATASET_NAMES)}")
    g.add_argument("--data-root", help="dataset directory (layouts: see data.py); not used by toy")
    g.add_argument("--eval-root", help="labeled test images for --data folder: "
                                       "DIR/<class name>/... (without it a folder run is not "
                                       "evaluated)")
    g.add_argument("--classes", help="class names file for --data folder: UTF-8, one name per "
                                     "line, at least 2; blank lines and lines starting with # are "
                                     "ignored")
    g.add_argument("--templates", help="prompt templates file, one per line with one {} for the "
                                       "class name (replaces the published ones); lines starting "
                                       "with # are ignored")
    g.add_argument("--download", action="store_true",
                   help="let torchvision fetch food101 / dtd / gtsrb / pets / caltech101 / sun397 "
                        "into --data-root")
    g = groups["model"]
    g.add_argument("--model", help="CLIP name (ViT-B/16, ViT-H-14/dfn5b, ...) or checkpoint path; "
                                   "Table 10 by architecture, ViT-H/14 and bigG/14 taking "
                                   "ViT-L/14's rows [ViT-B/16; toy: its pretrained tiny CLIP]")
    g.add_argument("--init", help="start from this MUST checkpoint's image tower (ImageNet "
                                  "warm-up, §4.4)")
    for s in SETTINGS:
        flag = "--" + s.name.replace("_", "-")
        if s.type is bool:
            groups[s.group].add_argument(flag, action="store_true", help=s.help)
        else:
            choices = s.domain if isinstance(s.domain, list) else None
            groups[s.group].add_argument(flag, type=s.type, default=s.default, help=s.help,
                                         choices=choices)
    g = groups["optimization"]
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the student and the teacher in place for the training "
                        "steps (evaluation runs them eagerly); the first steps are slow while "
                        "they compile")
    g = groups["run"]
    g.add_argument("--out-dir", help="log, zero-shot head cache and checkpoint [out/<data>]")
    g.add_argument("--resume", default="auto",
                   help="checkpoint to resume; auto = out_dir/checkpoint.pt if it exists, else "
                        "the checkpoint.prev.pt before it; none = start afresh")
    add_machine_flags(p, process_group=True)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Checks and Table 10's values

def check_flags(args):
    """Every flag in its domain and every named file readable, before any work; one line for the
    first that is not. Flags Table 10 fills later are valid by construction."""
    for s in SETTINGS:
        if not isinstance(s.domain, tuple):  # a switch, or argparse's choices
            continue
        ok, must = s.domain
        value = getattr(args, s.name)
        if value is not None and not ok(value):
            fail(f"--{s.name.replace('_', '-')} {value} is not allowed: it must be {must}")
    if args.num_workers < 0:
        fail(f"--num-workers {args.num_workers} is not allowed: it must be 0 or more")
    if not 0 < args.dist_timeout <= 1e6:  # about two years; inf is no length of time
        fail(f"--dist-timeout {args.dist_timeout} is not allowed: it must be in (0, 1e6] minutes")
    if args.data not in data.DATASET_NAMES:
        fail(f"unknown dataset {args.data!r}; choose one of: {', '.join(data.DATASET_NAMES)}")
    if args.data != "toy" and not args.download:
        root = args.data_root
        try:
            empty = not (root and os.path.isdir(root) and os.listdir(root))
        except OSError as e:
            fail(f"data root {root!r} cannot be read ({e.strerror})")
        if empty:
            fail(f"data root {root!r} is missing or empty (give --data-root DIR)")
    for flag, path in (("--init", args.init), ("--eval-root", args.eval_root)):
        if path and not os.path.exists(path):
            fail(f"{flag} {path} does not exist")
    check_text_files(args.classes, args.templates)
    if args.global_batch is not None:
        split_batch(args, int(os.environ.get("WORLD_SIZE", 1)))
    args.out_dir = args.out_dir or os.path.join("out", args.data)
    make_folder("--out-dir", args.out_dir)


def check_text_files(classes, templates):
    """The --classes and --templates files (train.py's and eval.py's), one line for the first
    problem."""
    try:
        if classes:
            folders.read_classnames(classes)
        if templates:
            folders.read_templates(templates)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))


def resolve_config(args, visual):
    """Fill the unset flags from Table 10 (hparams). -> the run's mask_generator."""
    hp = hparams(args.data, model_key(args.model, visual), visual.patch_size,
                 visual.input_resolution)
    hp["global_batch"] = hp.pop("batch_size")
    args.table10 = {s.name: hp[s.name] for s in SETTINGS if s.name in hp}
    for s in SETTINGS:
        if getattr(args, s.name) is None and s.name in hp:
            setattr(args, s.name, hp[s.name])
    check_lr(args)
    return mask_generator(visual, args.mask_unit, args.mask_ratio,
                          masked=not (args.no_mim and args.no_align))


def mask_generator(visual, mask_unit, mask_ratio, masked=True):
    """The student's masks (§3.2) for this image tower, checked: the unit tiles its input, and,
    where MIM or alignment is on (masked), the ratio masks some units but not all."""
    size, patch = visual.input_resolution, visual.patch_size
    try:
        masks = data.MaskGenerator(size, mask_unit, patch, mask_ratio)
    except ValueError as e:
        fail(f"{e} ({size} px input, {patch} px patches)")
    units = masks.units_per_side ** 2
    if masked and masks.num_masked in (0, units):
        what = "no" if masks.num_masked == 0 else "every"
        fail(f"--mask-ratio {mask_ratio} masks {what} one of the {units} mask unit(s) of "
             f"{mask_unit} px on the {size} px input, so the MIM and alignment terms would "
             f"be {'0' if what == 'no' else 'meaningless'}: change --mask-ratio, or --mask-unit "
             f"(a multiple of {patch} px that divides {size}), or pass --no-mim --no-align")
    return masks


def check_lr(args):
    """The learning rates, once Table 10 has filled --base-lr and --global-batch: the cosine
    decays (min_lr <= lr), and AdamW's first step size, lr / (1 - β1) = 10 lr, is a float32
    number, which is what AdamW computes with."""
    lr, min_lr = (x * args.global_batch / 256 for x in (args.base_lr, args.base_min_lr))
    if min_lr > lr:
        fail(f"--base-min-lr {args.base_min_lr:g} is above --base-lr {args.base_lr:g}: the cosine "
             f"schedule would rise from lr to min_lr; give a --base-min-lr below --base-lr")
    largest = torch.finfo(torch.float32).max
    if 10 * lr > largest:
        fail(f"lr = --base-lr {args.base_lr:g} x {args.global_batch} / 256 = {lr:.3g} overflows "
             f"float32 in AdamW's first step (10 lr > {largest:.3g}); give a smaller --base-lr")


def split_batch(args, world_size):
    """global batch -> (per-process batch, micro-batch per forward pass, accumulation steps)."""
    if args.global_batch % world_size:
        fail(f"global batch {args.global_batch} is not divisible by the {world_size} processes")
    per_process = args.global_batch // world_size
    if args.batch_size_per_gpu is not None and args.accum_steps is not None:
        fail("give --batch-size-per-gpu or --accum-steps, not both")
    accum = args.accum_steps or 1
    if args.batch_size_per_gpu is not None:
        if per_process % args.batch_size_per_gpu:
            fail(f"per-process batch {per_process} is not divisible by --batch-size-per-gpu "
                 f"{args.batch_size_per_gpu}")
        accum = per_process // args.batch_size_per_gpu
    if per_process % accum:
        fail(f"per-process batch {per_process} is not divisible into {accum} accumulation steps")
    return per_process, per_process // accum, accum


# ----------------------------------------------------------------------------------------------
# The identity of a run

_WHAT = {"model": "CLIP weights (--model)",
         "clip_spec": "CLIP activation, heads or image preprocessing (--model's config)",
         "classes": "class list (names or their order)", "templates": "prompt templates"}
# What checkpoints older than their record of it were made with: the only CLIP there was then.
_OLDER = {"clip_spec": fingerprint(clip_load.OPENAI_SPEC.identity())}


def check_same_run(what, theirs, their_fingerprints, args, fingerprints, resume):
    """A checkpoint's run (its flags and content fingerprints) against this one: --init needs the
    same CLIP weights (and takes any dataset: the ImageNet warm-up of §4.4 moves to another);
    resuming also needs the same dataset, training images, class list, templates and RUN_DEFINING
    settings (continuing under others would silently make a hybrid run). One line saying what
    differs."""
    keys = ("model", "clip_spec", "classes", "templates") if resume else ("model", "clip_spec")
    differ = [_WHAT[k] for k in keys
              if their_fingerprints.get(k, _OLDER.get(k)) != fingerprints[k]]
    anew = "start anew with another --out-dir or --resume none"
    if differ:
        fail(f"{what} was made with other {' and other '.join(differ)}; give the same ones, or "
             f"{anew}")
    if not resume:
        return
    if theirs.get("data") != args.data:
        fail(f"{what} was trained on dataset {theirs.get('data')!r}, not {args.data!r}")
    listing = fingerprints["train_listing"]
    if their_fingerprints.get("train_listing", listing) != listing:  # older ones have none
        n, m = their_fingerprints["train_images"], fingerprints["train_images"]
        change = f"{n} -> {m} images" if n != m else f"the same number of images ({n}), other files"
        fail(f"{what} was trained on other training images ({change} under --data-root); resume "
             f"on the same images, or {anew}")
    # A setting the checkpoint does not record is newer than it: its run had the default.
    defaults = {**DEFAULTS, **getattr(args, "table10", {})}
    recorded = {k: theirs.get(k, defaults[k]) for k in RUN_DEFINING}
    changed = [f"--{k.replace('_', '-')} {recorded[k]} -> {getattr(args, k)}" for k in RUN_DEFINING
               if recorded[k] != getattr(args, k)]
    if changed:
        fail(f"{what} was made with other settings ({'; '.join(changed)}); resume with the same "
             f"flags, or {anew}")
