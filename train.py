"""Train MUST (Masked Unsupervised Self-Training, ICLR 2023) on the unlabeled images of one dataset.

    python train.py --data toy                                            # CPU-sized synthetic run
    python train.py --data imagenet --data-root /data/imagenet --model ViT-B/16
    torchrun --nproc_per_node 8 train.py --data imagenet --data-root /data/imagenet --model ViT-B/16

Top to bottom: config -> processes -> model (CLIP tower + zero-shot classifier, EMA teacher) -> data ->
optimizer (AdamW, layer-wise lr decay, cosine) -> resume -> zero-shot eval -> training loop -> result table.
Defaults come from the paper's Table 10 (data.hparams); every flag overrides.

Rank 0 writes into --out-dir:
  log.jsonl      one JSON object per line (a fresh run truncates it, a resumed one appends): {"type": "config", ...all flags},
                 {"type": "train", "step", "epoch" (fractional), "loss", "loss_cls", "loss_reg", "loss_mim",
                 "loss_align" (the terms switched on), "lr" (top layer), "ema_mu", "conf_ratio" (share of
                 confident pseudo-labels), "pseudo_label_acc" (their accuracy against the training labels, only
                 logged, null when unknown), "images_per_s"} every --log-freq steps and at each epoch end, and
                 {"type": "eval", "epoch", "step", "student_acc", "teacher_acc"} (epoch 0 = before training).
  checkpoint.pt  written atomically at each epoch end, every --save-freq steps and at --max-steps: a dict of
                 student / teacher state dicts, optimizer, scaler, fairness (running p̄ of eq. 3), step (optimizer
                 steps done), epoch (completed epochs), rng (per rank), evals (the eval records so far), args (all
                 flags as a plain dict) and classnames; torch.load(..., weights_only=True) reads it and
                 must.load_checkpoint rebuilds the classifier from it.
  head-*.pt      the zero-shot head cache (prompts.zero_shot_head).
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

import clip_model
import data
import must
import prompts

CHECKPOINT = "checkpoint.pt"


# ----------------------------------------------------------------------------------------------------------
# config

class _Help(argparse.HelpFormatter):
    """Show a flag's default only when it has one (unset Table 10 flags say so in their help)."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return action.help + " (default: %(default)s)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="MUST: unsupervised adaptation of a CLIP zero-shot classifier on unlabeled images. "
                    "Flags marked [Table 10] default to the paper's value for (--data, --model). The classifier's "
                    "logit scale s is the CLIP checkpoint's own exp(logit_scale) (100 for OpenAI's CLIPs).",
        formatter_class=_Help)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help=f"dataset: {', '.join(data.DATASET_NAMES)}")
    g.add_argument("--data-root", help="dataset directory (layouts: see data.py); toy: cache directory")
    g.add_argument("--eval-root", help="labeled test images for --data folder: DIR/<class name>/...")
    g.add_argument("--classes", help="class names file, one per line (for --data folder)")
    g.add_argument("--templates", help="prompt templates file, one per line with {} (replaces the published ones)")
    g.add_argument("--download", action="store_true", help="let torchvision fetch food101 / dtd / gtsrb / pets / "
                                                           "caltech101 / sun397 into --data-root")
    g.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data loader processes per GPU [min(8, CPU cores)]")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="CLIP name (ViT-B/16, ViT-L/14, ...) or checkpoint path [ViT-B/16; toy: its "
                                   "pretrained tiny CLIP]")
    g.add_argument("--download-root", help="where CLIP checkpoints are cached [~/.cache/clip]")
    g.add_argument("--init", help="start from this MUST checkpoint's image tower (ImageNet warm-up, §4.4)")
    g.add_argument("--freeze-classifier", action="store_true",
                   help="keep the zero-shot classifier W fixed (the ImageNet warm-up of §4.4)")
    g = p.add_argument_group("method")
    g.add_argument("--conf-threshold", type=float, help="τ: pseudo-label confidence threshold (eq. 2) [Table 10]")
    g.add_argument("--lambda-reg", type=float, help="λ_reg: weight of the fairness regularization "
                                                           "(eq. 3, 6) [Table 10]")
    g.add_argument("--lambda-align", type=float, help="λ_align: weight of the global-local alignment "
                                                             "(eq. 5, 6) [Table 10]")
    g.add_argument("--mask-unit", type=int, help="s: side in px of the square units masked together (§3.2) [Table 10]")
    g.add_argument("--mask-ratio", type=float, help="share of mask units replaced by [MSK] (§3.2) [Table 10]")
    g.add_argument("--ema-mu0", type=float, help="µ0: initial EMA decay of the teacher (eq. 1) [Table 10]")
    g.add_argument("--ema-mu-n", type=int, help="µn: iterations over which µ ramps linearly from µ0 "
                                                       "to 0.9998 [Table 10]")
    g.add_argument("--strong-view", choices=data.STRONG_VIEWS, help="the student's augmentation: paper = "
                   "RandomResizedCrop 0.3-1 + flip + RandAugment (224 px photos); light = 10%% translation + flip + "
                   "brightness/contrast (small images) [paper; toy: light]")
    g.add_argument("--align-k", type=int, help="align [CLS] only with the k nearest [MSK] tokens (Table 6) [all]")
    g.add_argument("--no-reg", action="store_true", help="ablation: drop L_reg (Table 7)")
    g.add_argument("--no-mim", action="store_true", help="ablation: drop L_mim (Table 5)")
    g.add_argument("--no-align", action="store_true", help="ablation: drop L_align (Table 5); with --no-mim the "
                                                           "student sees unmasked images (self-training only)")
    g = p.add_argument_group("optimization")
    g.add_argument("--base-lr", type=float, help="base_lr; lr = base_lr × global_batch / 256 [Table 10]")
    g.add_argument("--base-min-lr", type=float, default=1e-6, help="end of the cosine: min_lr = base_min_lr × "
                                                                   "global_batch / 256")
    g.add_argument("--epochs", type=int, help="training epochs [Table 10]")
    g.add_argument("--global-batch", type=int, help="images per optimizer step over all processes "
                                                    "[Table 10: 1024 ViT-B, 512 ViT-L]")
    g.add_argument("--batch-size-per-gpu", type=int, help="images per forward pass per process; gradients are "
                                                          "accumulated up to the global batch [global/processes]")
    g.add_argument("--accum-steps", type=int, help="gradient accumulation steps (alternative to "
                                                   "--batch-size-per-gpu) [1]")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (none on 1-D params)")
    g.add_argument("--layer-decay", type=float, default=0.65, help="layer-wise lr decay: scale "
                                                                    "layer_decay^(L+1-i) for layer i")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="mixed precision: auto = bf16 on GPUs that support it, fp32 on CPU; fp16 adds a GradScaler")
    g.add_argument("--seed", type=int, default=0, help="random seed (augmentations depend only on seed, epoch and "
                                                       "image index)")
    g.add_argument("--device", help="cuda or cpu [cuda if available]")
    g = p.add_argument_group("run")
    g.add_argument("--out-dir", help="log, zero-shot head cache and checkpoint [out/<data>]")
    g.add_argument("--resume", default="auto", help="checkpoint to resume; auto = out_dir/checkpoint.pt if it "
                                                    "exists; none = start afresh")
    g.add_argument("--eval-freq", type=int, help="evaluate student and teacher every this many epochs [Table 10]")
    g.add_argument("--log-freq", type=int, default=10, help="log every this many optimizer steps")
    g.add_argument("--save-freq", type=int, default=0, help="also checkpoint every this many steps (0: at epoch "
                                                            "ends only)")
    g.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after this many optimizer steps in "
                                                 "total; the lr schedule still spans --epochs")
    return p.parse_args(argv)


STATS = ("loss", "loss_cls", "loss_reg", "loss_mim", "loss_align", "confident", "images", "labeled", "correct")


def step_stats(loss, terms, confident, pseudo_labels, target):
    """Logged numbers of one micro-batch, in STATS order: the losses, then counts of confident pseudo-labels,
    images, confident images with a known training label (-1 = unknown) and correct ones among them."""
    labeled = confident & (target >= 0)
    values = [loss.item()] + [terms[k].item() if k in terms else 0.0 for k in STATS[1:5]]
    values += [confident.sum().item(), len(target), labeled.sum().item(),
               (pseudo_labels[labeled] == target[labeled]).sum().item()]
    return torch.tensor(values, dtype=torch.float64)


def fail(message):
    """One-line error for the command line, no traceback."""
    raise SystemExit(f"error: {message}")


def model_key(name, visual):
    """The model name Table 10 knows for a CLIP given by name or path (by architecture), else the path."""
    if name in clip_model.available_models():
        return name
    by_shape = {(16, 768, 224): "ViT-B/16", (14, 1024, 224): "ViT-L/14", (32, 768, 224): "ViT-B/32",
                (14, 1024, 336): "ViT-L/14@336px"}
    return by_shape.get((visual.patch_size, visual.width, visual.input_resolution), name)


def resolve_config(args, visual):
    """Fill unset flags from Table 10 (data.hparams) and check them."""
    hp = data.hparams(args.data, model_key(args.model, visual), visual.patch_size, visual.input_resolution)
    for key in ("mask_unit", "mask_ratio", "conf_threshold", "lambda_reg", "lambda_align", "ema_mu0", "ema_mu_n",
                "base_lr", "epochs", "eval_freq", "strong_view"):
        if getattr(args, key) is None:
            setattr(args, key, hp[key])
    if args.global_batch is None:
        args.global_batch = hp["batch_size"]
    if args.mask_unit % visual.patch_size:
        fail(f"mask unit {args.mask_unit} px is not a multiple of the patch size {visual.patch_size} px of "
             f"{args.model}")
    if visual.input_resolution % args.mask_unit:
        fail(f"mask unit {args.mask_unit} px does not tile the {visual.input_resolution} px input")
    if args.align_k is not None and args.align_k < 1:
        fail("--align-k must be at least 1")


def split_batch(args, world_size):
    """global batch -> (per-process batch, micro-batch per forward pass, accumulation steps)."""
    if args.global_batch % world_size:
        fail(f"global batch {args.global_batch} is not divisible by the {world_size} processes")
    per_process = args.global_batch // world_size
    if args.batch_size_per_gpu is not None and args.accum_steps is not None:
        fail("give --batch-size-per-gpu or --accum-steps, not both")
    accum = args.accum_steps or 1
    if args.batch_size_per_gpu is not None:
        if args.batch_size_per_gpu < 1 or per_process % args.batch_size_per_gpu:
            fail(f"per-process batch {per_process} is not divisible by --batch-size-per-gpu {args.batch_size_per_gpu}")
        accum = per_process // args.batch_size_per_gpu
    if accum < 1 or per_process % accum:
        fail(f"per-process batch {per_process} is not divisible into {accum} accumulation steps")
    return per_process, per_process // accum, accum


# ----------------------------------------------------------------------------------------------------------
# processes

def setup_distributed(device_flag):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is one process."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device(device_flag or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier():
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def rank_zero_first(rank):
    """Let rank 0 download / compute caches before the others read them."""
    if rank != 0:
        barrier()
    yield
    if rank == 0:
        barrier()


def autocast_for(amp, device):
    """-> (autocast dtype or None, GradScaler needed)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if amp == "fp16" and device.type != "cuda":
        fail("--amp fp16 needs a GPU (use bf16 or fp32 on CPU)")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp], amp == "fp16"


# ----------------------------------------------------------------------------------------------------------
# optimizer: AdamW with layer-wise lr decay, cosine schedule

def layer_id(name, num_layers):
    """Depth of a parameter for layer-wise lr decay: 0 = patch/[CLS]/positional embeddings, ln_pre and [MSK];
    n + 1 = transformer block n; num_layers + 1 = ln_post, proj, classifier, patch LayerNorm and decoder."""
    name = name.removeprefix("module.").removeprefix("visual.")
    if name.split(".")[0] in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "mask_token"):
        return 0
    if name.startswith("transformer.resblocks."):
        return int(name.split(".")[2]) + 1
    return num_layers + 1


def param_groups(model, weight_decay, layer_decay):
    """One AdamW group per (layer, decay or not); group["lr_scale"] = layer_decay^(L+1-i). Frozen params are left
    out; 1-D params (biases, LayerNorms, [CLS], [MSK]) get no weight decay."""
    num_layers = len(model.visual.transformer.resblocks)
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        i = layer_id(name, num_layers)
        decay = param.ndim > 1
        key = f"layer_{i}_{'decay' if decay else 'no_decay'}"
        if key not in groups:
            groups[key] = {"name": key, "params": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": layer_decay ** (num_layers + 1 - i)}
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups, key=lambda k: (int(k.split("_")[1]), k))]


def cosine_lr(step, total_steps, lr, min_lr):
    """Cosine decay from lr to min_lr over total_steps optimizer steps, no warmup (§3.4)."""
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


# ----------------------------------------------------------------------------------------------------------
# data

class SeededViews(Dataset):
    """Draws each training image's random views and mask from a seed of (seed, epoch, index) alone, so the global
    batch of a step is the same whatever the number of processes or workers, and a resumed run sees exactly the
    views of an uninterrupted one (data.py's augmentations draw from torch's RNG only)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        digest = hashlib.blake2b(f"{self.seed}/{self.epoch}/{index}".encode(), digest_size=8).digest()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(digest, "little") & (2 ** 63 - 1))
            return self.dataset[index]


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled, drop_last) that can start inside an epoch: `start` samples of this rank's
    share are skipped. With drop_last, step k of every rank covers global positions [k·B, (k+1)·B) of the
    epoch's permutation, so the union over ranks is the one-process batch."""

    start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self):
        return self.num_samples - self.start


def gather_cat(tensor):
    """Concatenate a 1-D CPU tensor of any length over all processes."""
    if not is_distributed():
        return tensor
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, tensor)
    return torch.cat(parts)


def accuracy(preds, labels, mean_per_class):
    """Top-1 in %, or mean per-class accuracy in % (Pets, Caltech101)."""
    keep = labels >= 0
    preds, labels = preds[keep], labels[keep]
    if len(labels) == 0:
        return float("nan")
    correct = (preds == labels).float()
    if not mean_per_class:
        return 100.0 * correct.mean().item()
    per_class = [correct[labels == c].mean() for c in labels.unique()]
    return 100.0 * torch.stack(per_class).mean().item()


@torch.no_grad()
def evaluate(models, loader, device, amp_dtype, mean_per_class):
    """Accuracy of each model on the test loader (sharded over processes, gathered)."""
    for m in models:
        m.eval()
    preds, labels = [[] for _ in models], []
    for images, target in loader:
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            for i, m in enumerate(models):
                preds[i].append(m(images).argmax(dim=-1).cpu())
        labels.append(target)
    labels = gather_cat(torch.cat(labels).long())
    return [accuracy(gather_cat(torch.cat(p)), labels, mean_per_class) for p in preds]


# ----------------------------------------------------------------------------------------------------------
# checkpoints

def rng_state():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path, checkpoint):
    """Atomic: a kill while writing leaves the previous checkpoint intact."""
    tmp = path + ".tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


# the flags that decide what a run computes (not where, how fast or how often it reports)
RUN_DEFINING = ("classes", "templates", "freeze_classifier", "conf_threshold", "lambda_reg", "lambda_align",
                "mask_unit", "mask_ratio", "ema_mu0", "ema_mu_n", "strong_view", "align_k", "no_reg", "no_mim",
                "no_align", "base_lr", "base_min_lr", "epochs", "global_batch", "weight_decay", "layer_decay", "seed")


def load_checkpoint_for(path, args, what):
    """Read a train.py checkpoint and check that it belongs to this model (and, when resuming, to this dataset
    and these RUN_DEFINING settings)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read checkpoint {path} ({clip_model.load_error_detail(e)})")
    if not isinstance(ckpt, dict) or "student" not in ckpt or "args" not in ckpt:
        fail(f"{path} is not a MUST checkpoint written by train.py")
    theirs = ckpt["args"]
    if theirs.get("model") != args.model:
        fail(f"{what} {path} was trained from model {theirs.get('model')!r}, not {args.model!r}")
    if what == "resume checkpoint":  # continuing under other settings would silently make a hybrid run
        if theirs.get("data") != args.data:
            fail(f"{what} {path} was trained on dataset {theirs.get('data')!r}, not {args.data!r}")
        changed = [f"--{k.replace('_', '-')} {theirs[k]} -> {getattr(args, k)}" for k in RUN_DEFINING
                   if k in theirs and theirs[k] != getattr(args, k)]
        if changed:
            fail(f"{what} {path} was made with other settings ({'; '.join(changed)}); resume with the same flags, "
                 f"or start anew with another --out-dir or --resume none")
    return ckpt


def print_table(evals, dataset, mean_per_class, start_name):
    """Zero-shot vs MUST student vs EMA teacher (last evaluation), plus the release's best-on-test selection."""
    first, last = evals[0], evals[-1]
    best = max(evals[1:] or evals, key=lambda e: e["student_acc"])
    rows = [(start_name, first["student_acc"], first["epoch"]), ("MUST student", last["student_acc"], last["epoch"]),
            ("MUST teacher (EMA)", last["teacher_acc"], last["epoch"]),
            ("best student", best["student_acc"], f"{best['epoch']} (chosen on test, as the release)")]
    if len(evals) == 1:  # stopped before the first evaluation after training
        rows = rows[:1]
    print(f"\n{dataset}: {'mean per-class accuracy' if mean_per_class else 'top-1'} (%)")
    for name, acc, epoch in rows:
        print(f"  {name:20} {acc:6.2f}   epoch {epoch}")


# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    if args.data not in data.DATASET_NAMES:
        fail(f"unknown dataset {args.data!r}; choose one of: {', '.join(data.DATASET_NAMES)}")
    if args.data != "toy" and not args.download and (not args.data_root or not os.path.isdir(args.data_root)
                                                     or not os.listdir(args.data_root)):
        fail(f"data root {args.data_root!r} is missing or empty (give --data-root DIR)")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.global_batch is not None:
        split_batch(args, world_size)  # fail early, before any process group or model exists
    args.out_dir = args.out_dir or os.path.join("out", args.data)
    rank, world_size, device = setup_distributed(args.device)
    amp_dtype, use_scaler = autocast_for(args.amp, device)
    os.makedirs(args.out_dir, exist_ok=True)
    log_path = os.path.join(args.out_dir, "log.jsonl")
    ckpt_path = os.path.join(args.out_dir, CHECKPOINT)

    # -- model: CLIP image tower + zero-shot head as a trainable classifier (Fig. 1) --
    with rank_zero_first(rank):
        if args.model is None:
            args.model = "ViT-B/16"
            if args.data == "toy":
                import toy  # the toy world brings its own pretrained tiny CLIP
                args.model = toy.ensure_pretrained(args.data_root or os.path.join("out", "toy_cache"))
        try:
            clip, _ = clip_model.load(args.model, device="cpu", download_root=args.download_root)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            fail(str(e))
    resolve_config(args, clip.visual)
    per_process, micro_batch, accum = split_batch(args, world_size)
    input_size, patch_size = clip.visual.input_resolution, clip.visual.patch_size

    try:
        mask_generator = data.MaskGenerator(input_size, args.mask_unit, patch_size, args.mask_ratio)
        with rank_zero_first(rank) if args.download else contextlib.nullcontext():  # one download at a time
            train_set = data.build_dataset(args.data, args.data_root, "train",
                                           data.TrainTransform(input_size, mask_generator, args.strong_view),
                                           args.classes, args.templates, args.eval_root, download=args.download)
            test_set = data.build_dataset(args.data, args.data_root, "test", data.test_transform(input_size),
                                          args.classes, args.templates, args.eval_root, download=args.download)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    steps_per_epoch = len(train_set) // args.global_batch
    if steps_per_epoch == 0:
        fail(f"{len(train_set)} training images are fewer than one global batch of {args.global_batch}")
    total_steps = args.epochs * steps_per_epoch

    with rank_zero_first(rank):
        head = prompts.zero_shot_head(clip.to(device), train_set.classnames, train_set.templates, device=device,
                                      cache_dir=args.out_dir).cpu()
    logit_scale = clip.logit_scale.exp().item()  # s: 100 for OpenAI's CLIPs; a tiny CLIP has its own
    visual = clip.visual.cpu()
    del clip  # the text tower is done: the classifier now holds its knowledge
    torch.manual_seed(args.seed)  # same [MSK] / decoder init on every rank (and as with one process)
    student = must.MUSTModel(visual, head, logit_scale, freeze_classifier=args.freeze_classifier)
    use_mim, use_align, use_reg = not args.no_mim, not args.no_align, not args.no_reg
    if not use_mim:  # heads without a loss stay frozen, so DDP sees no unused parameters
        student.visual.decoder.requires_grad_(False)
    if not (use_mim or use_align):
        student.visual.mask_token.requires_grad_(False)
        student.visual.ln_patch.requires_grad_(False)
    resume = None if args.resume == "none" else (ckpt_path if args.resume == "auto" else args.resume)
    if resume == ckpt_path and not os.path.isfile(ckpt_path):
        resume = None
    elif resume is not None and not os.path.isfile(resume):
        fail(f"no checkpoint at {resume}")
    if args.init and resume is None:
        init = load_checkpoint_for(args.init, args, "--init checkpoint")
        tower = {k[len("visual."):]: v for k, v in init["student"].items() if k.startswith("visual.")}
        try:
            student.visual.load_state_dict(tower)  # the classifier stays this dataset's zero-shot head
        except RuntimeError as e:
            fail(f"--init checkpoint {args.init} does not fit {args.model} ({str(e).splitlines()[0][:200]})")
    student.to(device)
    teacher = must.make_teacher(student)  # Δ = θ at the start (eq. 1)
    fairness = must.FairnessMean(student.num_classes)

    torch.manual_seed(args.seed + rank)  # per-rank RNG for anything else
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)

    model = student
    if world_size > 1:
        model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)

    # -- optimizer: AdamW, lr = base_lr × batch / 256, layer-wise decay, cosine to min_lr (§3.4) --
    lr = args.base_lr * args.global_batch / 256
    min_lr = args.base_min_lr * args.global_batch / 256
    optimizer = torch.optim.AdamW(param_groups(student, args.weight_decay, args.layer_decay), lr=lr,
                                  betas=(0.9, 0.999), eps=1e-8)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    # -- resume --
    step, evals = 0, []
    if resume is not None:
        ckpt = load_checkpoint_for(resume, args, "resume checkpoint")
        try:
            student.load_state_dict(ckpt["student"])
            teacher.load_state_dict(ckpt["teacher"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError) as e:
            fail(f"resume checkpoint {resume} does not fit this run ({str(e).splitlines()[0][:200]})")
        scaler.load_state_dict(ckpt["scaler"])
        fairness.load_state_dict(ckpt["fairness"])
        step, evals = ckpt["step"], list(ckpt["evals"])
        states = ckpt["rng"]
        set_rng_state(states[rank] if len(states) == world_size else states[0])
        if rank == 0:
            print(f"resumed from {resume} at step {step} (epoch {step // steps_per_epoch})")

    # -- data loaders --
    views = SeededViews(train_set, args.seed)
    sampler = ResumableSampler(views, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                               drop_last=True)
    test_loader = DataLoader(Subset(test_set, range(rank, len(test_set), world_size)), batch_size=micro_batch,
                             num_workers=args.num_workers, pin_memory=device.type == "cuda")
    mean_per_class = args.data in data.MEAN_PER_CLASS

    def log(record):
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def run_eval(epoch):
        student_acc, teacher_acc = evaluate([student, teacher], test_loader, device, amp_dtype, mean_per_class)
        evals.append({"epoch": epoch, "step": step, "student_acc": student_acc, "teacher_acc": teacher_acc})
        log({"type": "eval", **evals[-1]})
        if rank == 0:
            tqdm.write(f"epoch {epoch}: student {student_acc:.2f}%  teacher {teacher_acc:.2f}%")

    def checkpoint():
        states = [None] * world_size
        if is_distributed():
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if rank == 0:
            save_checkpoint(ckpt_path, {
                "student": student.state_dict(), "teacher": teacher.state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "fairness": fairness.state_dict(),
                "step": step, "epoch": step // steps_per_epoch, "rng": states, "evals": evals,
                "args": vars(args), "classnames": list(train_set.classnames)})
        barrier()

    if rank == 0:
        if resume is None:  # a fresh run starts a fresh log; a resumed one appends
            open(log_path, "w").close()
        print(f"MUST on {args.data}: {len(train_set)} images, {student.num_classes} classes, {world_size} process(es), "
              f"global batch {args.global_batch} = {world_size} x {accum} x {micro_batch}, {total_steps} steps, "
              f"lr {lr:.3g}, s = {logit_scale:.4g}")
        log({"type": "config", **vars(args), "world_size": world_size, "steps_per_epoch": steps_per_epoch})
    if step == 0 and not evals:
        run_eval(0)  # CLIP zero-shot (or the --init model) before any update

    # -- training (one optimizer step = one global batch) --
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    stopped = False
    for epoch in range(step // steps_per_epoch, args.epochs):
        first = step - epoch * steps_per_epoch  # steps of this epoch already done (resume)
        views.epoch = epoch
        sampler.set_epoch(epoch)
        sampler.start = first * per_process
        loader = DataLoader(views, batch_size=micro_batch, sampler=sampler, num_workers=args.num_workers,
                            pin_memory=device.type == "cuda", drop_last=True)
        batches = iter(loader)
        model.train()
        bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0,
                   initial=first, total=steps_per_epoch, dynamic_ncols=True)
        tic, images_seen = time.time(), 0
        for _ in bar:
            if args.max_steps is not None and step >= args.max_steps:
                stopped = True
                break
            set_lr(optimizer, cosine_lr(step, total_steps, lr, min_lr))
            mu = must.ema_momentum(step, args.ema_mu0, args.ema_mu_n)
            stats = torch.zeros(len(STATS), dtype=torch.float64)  # summed over micro-batches
            for micro in range(accum):
                (weak, strong, mask), target = next(batches)
                weak, strong = weak.to(device, non_blocking=True), strong.to(device, non_blocking=True)
                mask, target = mask.to(device, non_blocking=True), target.to(device)
                with torch.no_grad(), autocast:
                    teacher_logits = teacher(weak)  # pseudo-labels from the weak view, no mask (§3.1)
                sync = contextlib.nullcontext() if micro == accum - 1 or world_size == 1 else model.no_sync()
                with sync:
                    with autocast:
                        loss, terms, confident, pseudo = must.must_loss(
                            model, teacher_logits, strong, mask, fairness, conf_threshold=args.conf_threshold,
                            lambda_reg=args.lambda_reg, lambda_align=args.lambda_align, patch_size=patch_size,
                            use_reg=use_reg, use_mim=use_mim, use_align=use_align, align_k=args.align_k)
                    bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=device)
                    if is_distributed():
                        dist.all_reduce(bad)
                    if bad.item():
                        fail(f"non-finite loss ({', '.join(f'{k}={v.item():.4g}' for k, v in terms.items())}) at "
                             f"step {step}; stopped before updating; the last good checkpoint {ckpt_path} is intact")
                    scaler.scale(loss / accum).backward()
                stats += step_stats(loss, terms, confident, pseudo, target)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            must.ema_update(teacher, student, mu)  # eq. 1
            step += 1
            images_seen += args.global_batch

            if step % args.log_freq == 0 or step == steps_per_epoch * (epoch + 1):
                if is_distributed():
                    stats = stats.to(device)
                    dist.all_reduce(stats)
                    stats = stats.cpu()
                total = dict(zip(STATS, stats.tolist()))
                record = {"type": "train", "step": step, "epoch": step / steps_per_epoch}
                record.update({k: total[k] / (accum * world_size) for k in STATS[:5] if k in ("loss", *terms)})
                record.update(lr=optimizer.param_groups[-1]["lr"], ema_mu=mu,
                              conf_ratio=total["confident"] / total["images"],
                              pseudo_label_acc=total["correct"] / total["labeled"] if total["labeled"] else None,
                              images_per_s=images_seen / (time.time() - tic))
                log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", conf=f"{record['conf_ratio']:.2f}")
                tic, images_seen = time.time(), 0
            if args.save_freq and step % args.save_freq == 0 and step % steps_per_epoch:
                checkpoint()
        bar.close()
        if stopped or step < (epoch + 1) * steps_per_epoch:  # --max-steps reached inside this epoch
            stopped = True
            checkpoint()
            break
        if (epoch + 1) % args.eval_freq == 0 or epoch + 1 == args.epochs:
            run_eval(epoch + 1)
        checkpoint()
        if args.max_steps is not None and step >= args.max_steps:
            stopped = True
            break

    # -- result table --
    if rank == 0:
        if stopped:
            print(f"stopped after step {step} of {total_steps} (--max-steps); rerun to resume from {ckpt_path}")
        if evals:
            print_table(evals, args.data, mean_per_class, "--init model" if args.init else "CLIP zero-shot")
    if is_distributed():
        dist.destroy_process_group()
    return evals


if __name__ == "__main__":
    main()
