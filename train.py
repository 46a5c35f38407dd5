"""Train MUST (Masked Unsupervised Self-Training, ICLR 2023) on a dataset's unlabeled images.

    python train.py --data toy                                     # a CPU-sized synthetic run
    python train.py --data imagenet --data-root /data/imagenet --model ViT-B/16
    torchrun --nproc_per_node 8 --shutdown-timeout 300 train.py --data imagenet \
        --data-root /data/imagenet   # 300 s for the checkpoint after a SIGTERM

Top to bottom: the run (Run), the optimizer and its schedule (§3.4), one epoch of steps
(must.must_step), evaluation, and main. What a run writes into --out-dir: docs/usage.md.
"""
import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import clip_model
import config
import data
import must
import prompts
from eval import (EvalSet, batch_bytes, check_scored, evaluate, report_end, report_listing,
                  report_unreadable)
from util import clip_load, folders
from util.checkpoint import (CHECKPOINT, PREVIOUS, check_health, check_out_dir, check_resume,
                             fingerprints_of, load_checkpoint_for, resume, resume_path,
                             save_checkpoint)
from util.runtime import (ResumableSampler, RunLock, SeededViews, StopRequest, all_reduce,
                          any_process, autocast_for, dead_workers_found_by_waits,
                          end_distributed, end_workers, fail, ignore_stop_signals,
                          is_distributed, loader_worker_died, make_folder, not_a_clip,
                          peer_failed, rank_zero_first, setup_distributed,
                          shared_memory_problem)


# ----------------------------------------------------------------------------------------------
# the state of a run

@dataclass
class Run:
    """Everything a training run holds: built once by build_run, changed by the loop."""
    args: argparse.Namespace  # every setting (config.py), Table 10's values filled in
    rank: int  # this process among `world` (torchrun's RANK and WORLD_SIZE)
    world: int
    device: torch.device
    stop: StopRequest  # set by SIGTERM, SIGINT or SIGHUP
    # The method (must.py): the student θ, its EMA teacher Δ, and what trains the student.
    student: must.MUSTModel
    teacher: must.MUSTModel
    model: torch.nn.Module  # what runs the student's forward: DDP(student), or the student
    optimizer: torch.optim.Optimizer  # AdamW over param_groups
    scaler: torch.amp.GradScaler  # enabled by --amp fp16 only
    fairness: must.FairnessMean  # eq. 3's p̄
    hp: must.Hparams  # what must_step reads
    # The data: unlabeled training images, labeled test images (None: not evaluated).
    train_set: torch.utils.data.Dataset
    test_set: Optional[torch.utils.data.Dataset]
    sampler: ResumableSampler  # this process's share of an epoch
    loader: DataLoader  # its (weak, strong, mask) views as uint8
    micro_batch: int  # images per forward pass
    accum: int  # micro-batches per optimizer step on this process
    # The schedule (§3.4).
    steps_per_epoch: int
    total_steps: int
    lr: float  # base_lr × global batch / 256: the cosine's start
    min_lr: float  # and its end
    # The files (rank 0 writes them) and what identifies the run.
    ckpt_path: str
    prev_path: str
    log_path: str
    fingerprints: dict  # SHA-256 of the CLIP, classes, templates and training images
    clip_spec: clip_load.ClipSpec  # what the CLIP's tensors do not say
    # Progress, saved in checkpoints.
    step: int = 0  # optimizer steps done
    evals: list = field(default_factory=list)  # the evaluation records so far
    reported: set = field(default_factory=set)  # unreadable training images, warned once
    reported_test: set = field(default_factory=set)  # unreadable test images
    # Health (util/checkpoint.check_health).
    nonfinite: Optional[torch.Tensor] = None  # non-finite losses since the step `checked`
    checked: int = 0  # the last step whose losses were read
    saved: tuple = (0, 0)  # (step, number of evaluations) of the checkpoint on disk
    saved_at: float = 0.0  # time.monotonic() of the last checkpoint, or of the start


# ----------------------------------------------------------------------------------------------
# the optimizer: AdamW with layer-wise lr decay, a cosine schedule (§3.4)

def layer_id(name, num_layers):
    """A parameter's depth for layer-wise lr decay: 0 = the embeddings, ln_pre and [MSK];
    n + 1 = block n; num_layers + 1 = ln_post, proj, the classifier and the MIM heads."""
    name = name.removeprefix("module.").removeprefix("visual.")
    embeddings = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "mask_token")
    if name.split(".")[0] in embeddings:
        return 0
    if name.startswith("transformer.resblocks."):
        return int(name.split(".")[2]) + 1
    return num_layers + 1


def param_groups(model, weight_decay, layer_decay):
    """One AdamW group per (layer, decayed or not), lr_scale = layer_decay^(L+1-i); frozen
    parameters left out, 1-D ones not decayed."""
    num_layers = len(model.visual.transformer.resblocks)
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        i = layer_id(name, num_layers)
        # The release's [MSK] is (1, 1, width), so it is decayed, although ours is (width,).
        decay = param.ndim > 1 or name.removeprefix("module.") == "visual.mask_token"
        key = (i, not decay)  # in sorted order: by layer, the decayed group first
        if key not in groups:
            groups[key] = {"name": f"layer_{i}_{'decay' if decay else 'no_decay'}",
                           "params": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": layer_decay ** (num_layers + 1 - i)}
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def make_optimizer(model, weight_decay, layer_decay, lr, device):
    """AdamW (β 0.9, 0.999, ε 1e-8) over param_groups, fused on a GPU."""
    kernels = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, weight_decay, layer_decay), lr=lr,
                             betas=(0.9, 0.999), eps=1e-8, **kernels)


def cosine_lr(step, total_steps, lr, min_lr):
    """Cosine decay from lr to min_lr over total_steps, without warmup (§3.4)."""
    progress = min(step, total_steps) / total_steps
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


# ----------------------------------------------------------------------------------------------
# one epoch

def train_one_epoch(run):
    """Run the rest of the current epoch (all of it, unless a resume starts inside it).
    -> why it ended: "epoch", "max-steps" or "signal" (a stop was asked for)."""
    args = run.args
    epoch, first = divmod(run.step, run.steps_per_epoch)
    run.sampler.set_epoch(epoch)  # it hands the epoch to the workers with each index
    run.sampler.start = first * run.accum * run.micro_batch  # this process's samples per step
    batches = iter(run.loader)
    run.model.train()
    bar = tqdm(range(first, run.steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
               disable=run.rank != 0, initial=first, total=run.steps_per_epoch,
               dynamic_ncols=True)
    tic, seen = time.time(), 0
    for _ in bar:
        if args.max_steps is not None and run.step >= args.max_steps:
            return "max-steps"
        set_lr(run.optimizer, cosine_lr(run.step, run.total_steps, run.lr, run.min_lr))
        mu = must.ema_momentum(run.step, args.ema_mu0, args.ema_mu_n)
        new_epoch = run.step % run.steps_per_epoch == 0
        stats = must.must_step(run.student, run.teacher, run.model, run.optimizer, run.scaler,
                               run.fairness, next_parts(run, batches), run.hp, mu, new_epoch)
        run.nonfinite += stats["nonfinite"]
        run.step += 1
        seen += args.global_batch
        # One agreement per step: every rank stops, or checkpoints, at the same step.
        stop, save = any_process(run.stop.signum is not None, save_due(run))
        if run.step % args.log_freq == 0 or run.step % run.steps_per_epoch == 0 or stop:
            check_health(run)
            record = log_train(run, stats, mu, seen / (time.time() - tic))
            bar.set_postfix(loss=f"{record['loss']:.3f}", conf=f"{record['conf_ratio']:.2f}")
            tic, seen = time.time(), 0
        if stop:
            return "signal"
        if save:
            save_checkpoint(run)
    return "epoch"


def next_parts(run, batches):
    """This process's micro-batches of the next step on its device, normalized there:
    [((weak, strong, mask), target)]."""
    try:
        parts = [next(batches) for _ in range(run.accum)]
    except folders.UnreadableDataset as e:  # from a worker, its message ends the traceback
        fail(str(e).rpartition("UnreadableDataset: ")[2].strip())
    on_device = []
    for (weak, strong, mask), target in parts:
        weak, strong, mask, target = (t.to(run.device, non_blocking=True)
                                      for t in (weak, strong, mask, target))
        views = (data.normalize(weak, run.clip_spec), data.normalize(strong, run.clip_spec), mask)
        on_device.append((views, target))
    return on_device


def save_due(run):
    """Whether this process calls for a checkpoint inside the epoch: every --save-freq steps,
    or when --save-minutes have passed since the last one on rank 0's clock, which decides."""
    args = run.args
    if run.step % run.steps_per_epoch == 0:  # the epoch's end saves anyway
        return False
    if args.save_freq and run.step % args.save_freq == 0:
        return True
    minutes = (time.monotonic() - run.saved_at) / 60
    return run.rank == 0 and args.save_minutes > 0 and minutes >= args.save_minutes


def log(run, record):
    """Rank 0 appends one record to OUT/log.jsonl."""
    if run.rank == 0:
        try:
            with open(run.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            fail(f"cannot append to {run.log_path} ({e.strerror}); was --out-dir "
                 f"{run.args.out_dir} removed?")


def log_train(run, stats, mu, images_per_s):
    """Log a "train" record of the step just done, must_step's statistics summed over
    processes, and print its loss terms, confident share and lr."""
    args = run.args
    total = dict(zip(stats, all_reduce(torch.stack(list(stats.values())), run.device).tolist()))
    skipped = report_unreadable(run.train_set, "training", run.reported, run.device)
    readable = len(run.train_set) - skipped
    if readable < args.global_batch:
        fail(f"only {readable} of the {len(run.train_set)} training images can be read: fewer "
             f"than one global batch of {args.global_batch} (see the warnings above)")
    weights = {"loss_reg": args.lambda_reg, "loss_align": args.lambda_align}  # eq. 6
    loss = sum(weights.get(k, 1.0) * v for k, v in total.items() if k.startswith("loss_"))
    labeled = total["labeled"]
    record = {"type": "train", "step": run.step, "epoch": run.step / run.steps_per_epoch,
              "loss": loss, **total, "lr": run.optimizer.param_groups[-1]["lr"], "ema_mu": mu,
              "conf_ratio": total["confident"] / total["images"],
              "pseudo_label_acc": total["correct"] / labeled if labeled else None,
              "images_per_s": images_per_s, "skipped": skipped}
    log(run, record)
    if run.rank == 0:
        terms = " ".join(f"{k[5:]} {v:.4f}" for k, v in total.items() if k.startswith("loss_"))
        tqdm.write(f"step {run.step}: loss {loss:.4f} ({terms}), confident "
                   f"{record['conf_ratio']:.2f}, lr {record['lr']:.3g}")
    return record


# ----------------------------------------------------------------------------------------------
# evaluation

def run_eval(run, at_stop=False):
    """Score student and teacher where due: before training, every --eval-freq epochs, after the
    last, and where --max-steps stops the run (at_stop); each step once. -> False when a stop
    was asked for (a stopped evaluation is dropped; the resumed run evaluates again)."""
    epoch, into_epoch = divmod(run.step, run.steps_per_epoch)
    due = epoch == 0 or epoch % run.args.eval_freq == 0 or epoch == run.args.epochs
    done = any(e["step"] == run.step for e in run.evals)
    if run.test_set is None or done or not (at_stop or due and not into_epoch):
        return not any_process(run.stop.signum is not None)
    if into_epoch:
        epoch = round(run.step / run.steps_per_epoch, 2)
    models = {"student": run.student, "teacher": run.teacher}
    test = EvalSet("test", run.args.data, run.test_set, run.train_set.classnames, None)
    # Eagerly, --compile or not: compiling would add graphs on every rank to save little.
    with torch.compiler.set_stance("force_eager"):
        counts, _ = evaluate(models, [test], {(0, name): None for name in models}, run.device,
                             run.micro_batch, run.args.num_workers, run.hp.amp_dtype,
                             stop=run.stop)
    if counts is None:
        return False
    key = "mean_per_class" if run.args.data in data.MEAN_PER_CLASS else "top1"
    student, teacher = (counts[(0, name)].metrics() for name in models)
    unreadable = report_unreadable(run.test_set, "test", run.reported_test, run.device)
    nothing_scored = check_scored({"the test set": {"images": student["images"],
                                                    "unreadable": unreadable}})
    if nothing_scored:
        fail(nothing_scored)
    run.evals.append({"epoch": epoch, "step": run.step, "student_acc": student[key],
                      "teacher_acc": teacher[key], "images": student["images"]})
    log(run, {"type": "eval", **run.evals[-1]})
    if run.rank == 0:
        tqdm.write(f"epoch {epoch}: student {student[key]:.2f}%  teacher {teacher[key]:.2f}%  "
                   f"({student['images']} images)")
    return not any_process(run.stop.signum is not None)  # all processes agree


# ----------------------------------------------------------------------------------------------
# main: the epoch loop, building a run

def train(run):
    """The epoch loop, ended by the last epoch, --max-steps or a signal. -> the eval records.
    Each epoch is checkpointed before its evaluation, so a kill during it loses no step."""
    args = run.args
    with dead_workers_found_by_waits():  # between steps, where stop_for_dead_worker can save
        try:
            # Zero-shot (or the --init model) before training, or an evaluation a stop cut short.
            why = "epoch" if run_eval(run) else "signal"
            while why == "epoch" and run.step < run.total_steps:
                why = train_one_epoch(run)
                save_checkpoint(run)
                if why == "epoch" and not run_eval(run):
                    why = "signal"
                if why == "epoch" and args.max_steps is not None and run.step >= args.max_steps:
                    why = "max-steps"
                if why == "max-steps" and not run_eval(run, at_stop=True):
                    why = "signal"
        except (RuntimeError, ConnectionError) as e:
            if not loader_worker_died(e):
                raise
            stop_for_dead_worker(run, e)
        finally:
            end_workers(run.loader)
        save_checkpoint(run)  # the last evaluation joins the checkpoint
    if run.rank == 0:
        if run.step == run.total_steps:  # the run is over: its last checkpoint is its result
            with contextlib.suppress(FileNotFoundError):
                os.remove(run.prev_path)
        report_end(run, why)
    if why == "signal":
        signum = run.stop.signum or signal.SIGTERM
        if run.rank == 0:
            saved = os.path.isfile(run.ckpt_path)
            done = f"checkpoint {run.ckpt_path} written" if saved else "nothing to save"
            print(f"stopped by {signal.Signals(signum).name} after step {run.step}: {done}; "
                  f"run the same command again to {'resume' if run.step else 'start'}",
                  file=sys.stderr)
        raise SystemExit(128 + signum)
    return run.evals


def stop_for_dead_worker(run, error):
    """A loader worker died, found while waiting for its batch: checkpoint the steps done (with
    one process; with several the others may be inside a step) and stop in one line."""
    if not is_distributed():
        save_checkpoint(run)
    saved = os.path.isfile(run.ckpt_path)
    kept = f"{run.ckpt_path} holds step {run.saved[0]}" if saved else "nothing was saved"
    fail(f"a data loader worker ended unexpectedly, most often killed for lack of memory (lower "
         f"--num-workers): {str(error).splitlines()[0]}; {kept}; rerun the same command to "
         f"{'resume' if saved else 'start'}")


def build_run(args, rank, world, device, stop):
    """Everything a run holds (Run): the CLIP of --model made a MUST student, its teacher and
    optimizer, the data, the schedule and the paths."""
    amp_dtype, use_scaler = autocast_for(args.amp, device)
    with rank_zero_first(rank):  # the CLIP of --model: rank 0 downloads it first
        if args.model is None:
            args.model = data.default_model(args.data)
        try:
            clip, _ = clip_model.load(args.model, device="cpu", download_root=args.download_root)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            fail(not_a_clip(args.model, e, "give it as --init (with --model the CLIP it was "
                                           "trained from), or score it with eval.py --checkpoint"))
    masks = config.resolve_config(args, clip.visual)  # Table 10's values where no flag was given
    _, micro_batch, accum = config.split_batch(args, world)
    train_set, test_set = build_datasets(args, clip.visual, clip.spec, masks, rank)
    steps_per_epoch = len(train_set) // args.global_batch
    if steps_per_epoch == 0:
        fail(f"{len(train_set)} training images are fewer than one global batch of "
             f"{args.global_batch}")
    fingerprints = fingerprints_of(clip, train_set, args.data_root)
    student = build_student(args, clip, train_set, fingerprints, device, rank)
    clip_spec = clip.spec
    del clip  # the text tower is done: the classifier holds what it knew
    lr, min_lr = (x * args.global_batch / 256 for x in (args.base_lr, args.base_min_lr))
    sampler = ResumableSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                               seed=args.seed, drop_last=True)
    ddp_devices = [device.index] if device.type == "cuda" else None
    run = Run(
        args=args, rank=rank, world=world, device=device, stop=stop,
        student=student, teacher=must.make_teacher(student),  # Δ = θ at the start (eq. 1)
        model=DistributedDataParallel(student, ddp_devices) if world > 1 else student,
        optimizer=make_optimizer(student, args.weight_decay, args.layer_decay, lr, device),
        scaler=torch.amp.GradScaler(device.type, enabled=use_scaler),
        fairness=must.FairnessMean(student.num_classes),
        hp=config.method_hparams(args, student.visual.patch_size, amp_dtype),
        train_set=train_set, test_set=test_set, sampler=sampler,
        loader=train_loader(train_set, sampler, micro_batch, args, device),
        micro_batch=micro_batch, accum=accum, steps_per_epoch=steps_per_epoch,
        total_steps=args.epochs * steps_per_epoch, lr=lr, min_lr=min_lr,
        ckpt_path=os.path.join(args.out_dir, CHECKPOINT),
        prev_path=os.path.join(args.out_dir, PREVIOUS),
        log_path=os.path.join(args.out_dir, "log.jsonl"), fingerprints=fingerprints,
        clip_spec=clip_spec, nonfinite=torch.zeros((), dtype=torch.float64, device=device))
    if args.compile:  # in place, so that the checkpoints' state dicts keep their names
        run.student.compile()
        run.teacher.compile()
    return run


def train_loader(train_set, sampler, micro_batch, args, device):
    """This process's micro-batches of (weak, strong, mask) views from persistent workers (the
    sampler hands them the epoch), pinned when the device is a GPU."""
    views = SeededViews(train_set, args.seed)
    return DataLoader(views, batch_size=micro_batch, sampler=sampler, drop_last=True,
                      num_workers=args.num_workers, persistent_workers=args.num_workers > 0,
                      pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)


def build_datasets(args, visual, spec, masks, rank):
    """(the unlabeled training set with its views and masks, the labeled test set or None for a
    folder without --eval-root)"""
    size = visual.input_resolution
    views = data.TrainTransform(size, masks, args.strong_view, spec)
    evaluated = not (args.data == "folder" and not args.eval_root)
    try:
        # With --download, one process at a time fetches the files.
        with rank_zero_first(rank) if args.download else contextlib.nullcontext():
            train_set = data.build_dataset(args.data, args.data_root, "train", views,
                                           args.classes, args.templates, args.eval_root,
                                           args.download)
            test_set = data.build_dataset(args.data, args.data_root, "test",
                                          data.test_transform(size, spec), args.classes,
                                          args.templates, args.eval_root,
                                          args.download) if evaluated else None
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if rank == 0:
        report_listing(train_set, "training")
        if test_set is not None:
            report_listing(test_set, "test")
    return train_set, test_set


def build_student(args, clip, train_set, fingerprints, device, rank):
    """The MUSTModel training starts from (Fig. 1): CLIP's image tower (or --init's), the MIM
    heads and the zero-shot head as a trainable classifier. Heads without a loss stay frozen,
    so that DDP sees no unused parameters."""
    with rank_zero_first(rank):  # rank 0 computes the head and caches it for the others
        try:
            head = prompts.zero_shot_head(clip.to(device), train_set.classnames,
                                          train_set.templates, device=device,
                                          cache_dir=args.out_dir).cpu()
        except ValueError as e:  # a prompt longer than CLIP's context
            fail(str(e))
    if not torch.isfinite(head).all():
        fail(f"the zero-shot head has non-finite values: the text tower of {args.model} is "
             f"broken")
    torch.manual_seed(args.seed)  # the same [MSK] and decoder on every rank
    student = must.MUSTModel.from_clip(clip.cpu(), head, args.freeze_classifier)
    if args.no_mim:
        student.visual.decoder.requires_grad_(False)
    if args.no_mim and args.no_align:
        student.visual.mask_token.requires_grad_(False)
        student.visual.ln_patch.requires_grad_(False)
    if args.init:
        init = load_checkpoint_for(args.init, args, fingerprints)
        tower = {k.removeprefix("visual."): v for k, v in init["student"].items()
                 if k.startswith("visual.")}
        try:
            student.visual.load_state_dict(tower)  # the classifier stays this dataset's head
        except RuntimeError as e:
            fail(f"--init checkpoint {args.init} does not fit {args.model} "
                 f"({str(e).splitlines()[0][:200]})")
    return student.to(device)


def check_shared_memory(run):
    """Enough shared memory for the loader workers' larger batch: a training one (two uint8
    views and a mask) or an evaluation one (float32 images)."""
    size = run.student.visual.input_resolution
    grid = (size // run.student.visual.patch_size) ** 2
    views = run.micro_batch * (2 * 3 * size ** 2 + grid + 8)  # views, mask, int64 label
    problem = shared_memory_problem(run.args.num_workers,
                                    max(views, batch_bytes(run.micro_batch, size)))
    if any_process(problem is not None):
        fail(problem or "another node has too little shared memory (see its message)")


def preflight(args, run=None):
    """The checks before any work, one line for the first that fails. Without a run, before
    any process group, model or data: the flags and the files they name. With the built run,
    before its first evaluation or step: the out-dir's files and room, and shared memory.
    Table 10's values, the lr among them, are checked as config.resolve_config fills them."""
    if run is not None:
        check_out_dir(run)
        check_shared_memory(run)
        return
    config.check_flags(args)
    config.check_files(args)
    if args.global_batch is not None:  # else Table 10's, split once the model is known
        config.split_batch(args, int(os.environ.get("WORLD_SIZE", 1)))
    args.out_dir = args.out_dir or os.path.join("out", args.data)
    make_folder("--out-dir", args.out_dir)
    check_resume(args)


def start(run):
    """Resume, or start a fresh log; seed the per-rank RNGs."""
    args = run.args
    path, restore = resume_path(run)
    run.saved_at = time.monotonic()  # --save-minutes counts from here
    seed = (args.seed + run.rank) % 2 ** 32  # per-rank RNGs for anything else (numpy's: < 2^32)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if path is not None:
        resume(run, path, config.run_defining(args), restore)
    elif run.rank == 0:  # a fresh run starts a fresh log; a resumed one appends
        if os.path.isfile(run.log_path) and os.path.getsize(run.log_path):
            print(f"note: a new run starts in {args.out_dir}: the log and any checkpoint of the "
                  f"run before are replaced")
        open(run.log_path, "w").close()
    if run.rank == 0:
        print(f"MUST on {args.data}: {len(run.train_set)} images, {run.student.num_classes} "
              f"classes, {run.world} process(es), global batch {args.global_batch} = "
              f"{run.world} x {run.accum} x {run.micro_batch}, {run.total_steps} steps, "
              f"lr {run.lr:.3g}, s = {run.student.logit_scale.item():.4g}")
        log(run, {"type": "config", **vars(args), "world_size": run.world,
                  "steps_per_epoch": run.steps_per_epoch})


def main(argv=None):
    args = config.parse_args(argv)
    preflight(args)
    rank, world, device = setup_distributed(args.device, args.dist_timeout)
    lock = RunLock(args.out_dir) if rank == 0 else None
    failed = True  # until the run ends, or stops on a signal with its checkpoint
    try:
        with StopRequest() as stop:
            run = build_run(args, rank, world, device, stop)
            preflight(args, run)
            start(run)
            evals = train(run)
        failed = False
        return evals
    except SystemExit as e:
        failed = not isinstance(e.code, int)  # a stop exits 128 + signal; fail(), with a message
        raise
    except RuntimeError as e:
        if peer_failed(e):
            fail("another process of this run failed (its error is in the run's output) and "
                 "this one stopped with it; a checkpoint written before is intact, and "
                 "rerunning the same command resumes from it")
        raise
    finally:
        if lock is not None:
            lock.release()
        end_distributed(failed)


if __name__ == "__main__":
    main()
