"""The settings of a MUST run: the paper's Table 10, every setting in one table (SETTINGS), the
command line built from it, its checks, and Table 10's values filled in for the run's dataset and
model (resolve_config).

A hyperparameter is one SETTINGS row: a flag, checked against its domain, defaulting to Table 10
where the table has it and, when it decides the weights (defines), the same on resume. A new
weight-deciding setting must default to the old behaviour: checkpoints without it count as made
with its default.
"""
import argparse
import dataclasses
import math
import os
from collections import namedtuple

import torch

import data
import must
from toy import world as toy
from util import folders
from util.runtime import add_machine_flags, fail

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

# (patch size, input px, width) of the released CLIPs: how a CLIP file finds its rows.
MODEL_GEOMETRY = {"ViT-B/32": (32, 224, 768), "ViT-B/16": (16, 224, 768),
                  "ViT-L/14": (14, 224, 1024), "ViT-L/14@336px": (14, 336, 1024),
                  "ViT-H/14": (14, 224, 1280), "ViT-H/14@378px": (14, 378, 1280),
                  "ViT-bigG/14": (14, 224, 1664)}
# The models whose Table 10 rows a model borrows, best first: ViT-H/14 and bigG/14 take
# ViT-L/14's, the largest model with the same patch.
_ROW_PREFERENCE = {"ViT-B/32": ("ViT-B/16", "ViT-L/14"), "ViT-B/16": ("ViT-B/16", "ViT-L/14"),
                   **{model: ("ViT-L/14", "ViT-B/16") for model in (
                       "ViT-L/14", "ViT-L/14@336px", "ViT-H/14", "ViT-H/14@378px",
                       "ViT-bigG/14")}}


def hparams(dataset, model_name, patch_size=None, input_size=None):
    """A run's default hyperparameters as a fresh dict: the Table 10 row of (dataset, model) and
    the global batch_size.

    Other pairs borrow the nearest row (_ROW_PREFERENCE; 'folder' and the shifted ImageNets take
    ImageNet's; an unknown model ViT-B/16's), keeping the absolute lr, with the mask unit snapped
    to the model's patches (patch_size, input_size: the loaded model's, if given).
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
    patch_size, input_size = patch_size or known_patch, input_size or known_size
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
    """The model name Table 10 knows for a CLIP of this architecture (an open ViT-B/16 takes
    the ViT-B/16 rows); else the name itself."""
    by_geometry = {geometry: known for known, geometry in MODEL_GEOMETRY.items()}
    return by_geometry.get((visual.patch_size, visual.input_resolution, visual.width), name)


# ----------------------------------------------------------------------------------------------
# Every setting

# domain: (a test of the value, what it must be) or a list of choices; a bool row is a switch.
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
            "align [CLS] with its k nearest [MSK] tokens only (Table 6) [all]"),
    Setting("mask_unit", int, None, (lambda v: v >= 1, "at least 1 px"), "method",
            "s: side in px of a square mask unit (§3.2) [Table 10]"),
    Setting("mask_ratio", float, None, _UNIT, "method",
            "share of mask units replaced by [MSK], rounded up (§3.2) [Table 10]"),
    Setting("ema_mu0", float, None, _UNIT, "method",
            "µ0: initial EMA decay of the teacher (eq. 1) [Table 10]"),
    Setting("ema_mu_n", int, None, _AT_LEAST_0, "method",
            "µn: iterations over which µ ramps linearly from µ0 to 0.9998 [Table 10]"),
    Setting("strong_view", str, None, list(data.STRONG_VIEWS), "method",
            "the student's augmentation (docs/usage.md) [paper; toy: light]"),
    Setting("freeze_classifier", bool, False, None, "model",
            "keep the zero-shot classifier W fixed (§4.4's ImageNet warm-up)"),
    Setting("no_reg", bool, False, None, "method", "ablation: drop L_reg (Table 7)"),
    Setting("no_mim", bool, False, None, "method", "ablation: drop L_mim (Table 5)"),
    Setting("no_align", bool, False, None, "method",
            "ablation: drop L_align (Table 5); with --no-mim, self-training only"),
    Setting("base_lr", float, None, (lambda v: 0 < v < math.inf, "a positive number"),
            "optimization", "lr = base_lr × global_batch / 256 [Table 10]"),
    Setting("base_min_lr", float, 1e-6, _AT_LEAST_0, "optimization",
            "the cosine's end: min_lr = base_min_lr × global_batch / 256"),
    Setting("epochs", int, None, _AT_LEAST_1, "optimization", "training epochs [Table 10]"),
    Setting("global_batch", int, None, _AT_LEAST_1, "optimization",
            "images per optimizer step over all processes [Table 10: 1024 ViT-B, 512 ViT-L]"),
    Setting("weight_decay", float, 0.05, _AT_LEAST_0, "optimization",
            "AdamW weight decay (none on 1-D params but [MSK])"),
    Setting("layer_decay", float, 0.65, (lambda v: 0 < v <= 1, "in (0, 1]"), "optimization",
            "layer-wise lr decay: layer i's lr scaled by layer_decay^(L+1-i)"),
    Setting("seed", int, 0, (lambda v: 0 <= v < 2 ** 32, "in [0, 2^32)"), "optimization",
            "random seed; the views depend only on it, the epoch and the image"),
    Setting("batch_size_per_gpu", int, None, _AT_LEAST_1, "optimization",
            "images per forward pass per process, accumulated exactly [global/processes]",
            defines=False),
    Setting("accum_steps", int, None, _AT_LEAST_1, "optimization",
            "micro-batches per step, instead of --batch-size-per-gpu [1]", defines=False),
    Setting("eval_freq", int, None, _AT_LEAST_1, "run",
            "evaluate student and teacher every this many epochs [Table 10]", defines=False),
    Setting("log_freq", int, 10, _AT_LEAST_1, "run", "log every this many optimizer steps",
            defines=False),
    Setting("save_freq", int, 0, (lambda v: v >= 0, "0 (off) or more"), "run",
            "also checkpoint every this many steps (0: off)", defines=False),
    Setting("save_minutes", float, 30.0, _AT_LEAST_0, "run",
            "also checkpoint this many minutes after the last one, on rank 0's clock (0: off)",
            defines=False),
    Setting("max_steps", int, None, _AT_LEAST_0, "run",
            "stop with a checkpoint after this many steps; the lr still spans --epochs",
            defines=False),
]
# The switches that decide the weights besides SETTINGS; the CLIP, classes and templates are
# compared by content.
RUN_DEFINING = tuple(s.name for s in SETTINGS if s.defines)
# What a run has without the flag; Table 10's value where resolve_config fills one (args.table10).
DEFAULTS = {s.name: s.default for s in SETTINGS}


def method_hparams(args, patch_size, amp_dtype):
    """must.Hparams from the run's settings: each field takes the setting of its name (use_reg is
    not --no-reg, and so on), so that a new SETTINGS row reaches must.py by its name alone."""
    values = {**vars(args), "patch_size": patch_size, "amp_dtype": amp_dtype}
    values.update({f"use_{term}": not values[f"no_{term}"] for term in ("reg", "mim", "align")})
    fields = dataclasses.fields(must.Hparams)
    return must.Hparams(**{f.name: values[f.name] for f in fields if f.name in values})


def run_defining(args):
    """{name: the value a run has without the flag} of the settings a resume must keep."""
    defaults = {**DEFAULTS, **getattr(args, "table10", {})}
    return {k: defaults[k] for k in RUN_DEFINING}


class _Help(argparse.HelpFormatter):
    """Show a flag's default only when it has one and its help does not give it already."""

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
                    "--model).",
        formatter_class=_Help)
    names = ("data", "model", "method", "loss", "optimization", "run")
    groups = {name: p.add_argument_group(name) for name in names}
    g = groups["data"]
    g.add_argument("--data", required=True, help=f"dataset: {', '.join(data.DATASET_NAMES)}")
    g.add_argument("--data-root", help="dataset directory (layouts: data.py); not used by toy")
    g.add_argument("--eval-root", help="labeled test images DIR/<class name>/... for --data "
                                       "folder (without it, no evaluation)")
    g.add_argument("--classes", help="class names file for --data folder, one per line")
    g.add_argument("--templates", help="prompt templates file, one per line with {} for the "
                                       "class name")
    g.add_argument("--download", action="store_true",
                   help="let torchvision fetch the dataset into --data-root")
    g = groups["model"]
    g.add_argument("--model", help="CLIP name (ViT-B/16, ViT-H-14/dfn5b, ...) or file "
                                   "[ViT-B/16; toy: its tiny CLIP]")
    g.add_argument("--init", help="start from this MUST checkpoint's image tower (§4.4)")
    for s in SETTINGS:
        flag = "--" + s.name.replace("_", "-")
        if s.type is bool:
            groups[s.group].add_argument(flag, action="store_true", help=s.help)
        else:
            choices = s.domain if isinstance(s.domain, list) else None
            groups[s.group].add_argument(flag, type=s.type, default=s.default, help=s.help,
                                         choices=choices)
    groups["optimization"].add_argument(
        "--compile", action="store_true",
        help="torch.compile the training steps (the first ones are slow)")
    g = groups["run"]
    g.add_argument("--out-dir", help="log, zero-shot head cache and checkpoints [out/<data>]")
    g.add_argument("--resume", default="auto",
                   help="checkpoint to resume; auto: OUT/checkpoint.pt, else the one before it; "
                        "none: start afresh")
    add_machine_flags(p, process_group=True)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Checks and Table 10's values

def check_flags(args):
    """Every flag in its domain; one line for the first that is not. Flags that Table 10 fills
    later are valid by construction."""
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


def check_files(args):
    """The data root and every file a flag names exist and can be read."""
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


def check_text_files(classes, templates):
    """The --classes and --templates files (train.py's and eval.py's)."""
    try:
        if classes:
            folders.read_classnames(classes)
        if templates:
            folders.read_templates(templates)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))


def resolve_config(args, visual):
    """Fill the unset flags from Table 10 (hparams) and check the lr. -> the run's masks."""
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
    """The student's masks (§3.2) for this image tower: the unit must tile its input and, when
    MIM or alignment is on (masked), the ratio must mask some units but not all."""
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
    """The cosine must decay (min_lr <= lr), and AdamW's first step, lr / (1 - β1) = 10 lr, must
    be a float32 number."""
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
