"""Train MUST (Masked Unsupervised Self-Training, ICLR 2023) on the unlabeled images of one dataset.

    python train.py --data toy                                       # CPU-sized synthetic run
    python train.py --data imagenet --data-root /data/imagenet --model ViT-B/16
    torchrun --nproc_per_node 8 --shutdown-timeout 300 train.py --data imagenet \
        --data-root /data/imagenet   # 300 s for the checkpoint after a SIGTERM

Top to bottom: the state of a run (Run) -> the optimizer and its schedule (§3.4) -> one epoch of
optimizer steps (must.must_step) -> evaluation -> the epoch loop -> checkpoints and their health ->
building a run -> main. The settings are config.py's, with defaults from the paper's Table 10;
every flag overrides.

Rank 0 writes log.jsonl, checkpoint.pt and the zero-shot head cache into --out-dir (one run at a
time: run.lock); docs/usage.md describes every field.
"""
import argparse
import contextlib
import json
import math
import os
import random
import shutil
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
from util import clip_load
import config
import data
from util import folders
import must
import prompts
from eval import (EvalSet, batch_bytes, check_scored, evaluate, report_listing,
                  report_unreadable)
from util.runtime import (ResumableSampler, RunLock, SeededViews, StopRequest, all_reduce,
                          any_process, autocast_for, barrier, dead_workers_found_by_waits,
                          end_distributed, end_workers, fail, fingerprint, ignore_stop_signals,
                          is_distributed, loader_worker_died, not_a_clip, peer_failed,
                          rank_zero_first, read_checkpoint, rng_state, save_atomic, set_rng_state,
                          setup_distributed, shared_memory_problem, size_text)

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"  # the checkpoint before, kept until the newest is known good


# ----------------------------------------------------------------------------------------------
# the state of a run

@dataclass
class Run:
    """Everything a training run holds: built once, by build_run; changed by the loop."""
    args: argparse.Namespace  # every setting (config.py), Table 10's values filled in
    rank: int  # this process among `world` (torchrun's RANK and WORLD_SIZE)
    world: int
    device: torch.device
    stop: StopRequest  # set by SIGTERM, SIGINT or SIGHUP
    # The method (must.py): the student θ, its EMA teacher Δ, and what trains the student.
    student: must.MUSTModel
    teacher: must.MUSTModel
    model: torch.nn.Module  # what computes the student's forward: DDP(student), or the student
    optimizer: torch.optim.Optimizer  # AdamW over param_groups (layer-wise lr decay)
    scaler: torch.amp.GradScaler  # enabled by --amp fp16 only
    fairness: must.FairnessMean  # eq. 3's p̄, a running mean with many classes
    hp: must.Hparams  # what must_step reads: τ, λ_reg, λ_align, k, the switches, autocast
    # The data: unlabeled training images, labeled test images (None: not evaluated).
    train_set: torch.utils.data.Dataset
    test_set: Optional[torch.utils.data.Dataset]
    sampler: ResumableSampler  # this process's share of an epoch, in an order resumes keep
    loader: DataLoader  # its (weak, strong, mask) views, seeded by image and epoch, as uint8
    micro_batch: int  # images per forward pass
    accum: int  # micro-batches per optimizer step on this process
    # The schedule (§3.4) and the metric.
    steps_per_epoch: int
    total_steps: int
    lr: float  # base_lr × global batch / 256: the cosine's start
    min_lr: float  # and its end
    mean_per_class: bool  # the paper's metric for pets and caltech101, else top-1
    # The files (rank 0 writes them) and what identifies the run.
    ckpt_path: str
    prev_path: str
    log_path: str
    fingerprints: dict  # SHA-256 of the CLIP, classes, templates and training images
    clip_spec: clip_load.ClipSpec  # what the CLIP's tensors do not say: activation, heads, ...
    # Progress, saved in checkpoints.
    step: int = 0  # optimizer steps done
    evals: list = field(default_factory=list)  # the evaluation records so far
    reported: set = field(default_factory=set)  # training images found unreadable (warned once)
    reported_test: set = field(default_factory=set)  # test images found unreadable
    # Health: non-finite losses are counted on the device and read at log steps (check_health).
    nonfinite: Optional[torch.Tensor] = None  # non-finite losses since the step `checked`
    checked: int = 0  # the last step whose losses were read
    saved: tuple = (0, 0)  # (step, number of evaluations) of the checkpoint on disk
    saved_at: float = 0.0  # time.monotonic() of the last checkpoint written, or of the start


# ----------------------------------------------------------------------------------------------
# the optimizer: AdamW with layer-wise lr decay, a cosine schedule (§3.4)

def layer_id(name, num_layers):
    """The depth of a parameter for layer-wise lr decay: 0 = the patch, [CLS] and positional
    embeddings, ln_pre and [MSK]; n + 1 = transformer block n; num_layers + 1 = ln_post, proj,
    the classifier, the patch LayerNorm and the decoder."""
    name = name.removeprefix("module.").removeprefix("visual.")
    embeddings = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "mask_token")
    if name.split(".")[0] in embeddings:
        return 0
    if name.startswith("transformer.resblocks."):
        return int(name.split(".")[2]) + 1
    return num_layers + 1


def param_groups(model, weight_decay, layer_decay):
    """One AdamW group per (layer, decayed or not); group["lr_scale"] = layer_decay^(L+1-i).
    Frozen parameters are left out; 1-D ones (biases, LayerNorms, [CLS]) get no weight decay;
    [MSK] does, as in the release."""
    num_layers = len(model.visual.transformer.resblocks)
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        i = layer_id(name, num_layers)
        # The release decays every parameter that is not 1-D; its [MSK] is stored as
        # (1, 1, width), so it is decayed, although ours is (width,).
        decay = param.ndim > 1 or name.removeprefix("module.") == "visual.mask_token"
        key = (i, not decay)  # in sorted order: by layer, the decayed group first
        if key not in groups:
            groups[key] = {"name": f"layer_{i}_{'decay' if decay else 'no_decay'}", "params": [],
                           "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": layer_decay ** (num_layers + 1 - i)}
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def make_optimizer(model, weight_decay, layer_decay, lr, device):
    """AdamW (β 0.9, 0.999, ε 1e-8) over param_groups: one fused kernel on a GPU, multi-tensor
    kernels on a CPU."""
    kernels = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, weight_decay, layer_decay), lr=lr,
                             betas=(0.9, 0.999), eps=1e-8, **kernels)


def cosine_lr(step, total_steps, lr, min_lr):
    """Cosine decay from lr to min_lr over total_steps optimizer steps, without warmup (§3.4)."""
    progress = min(step, total_steps) / total_steps
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


# ----------------------------------------------------------------------------------------------
# one epoch

def train_one_epoch(run):
    """The steps not done yet of the epoch run.step is in (all of them, unless resumed inside it).
    -> why it ended: "epoch", "max-steps" or "signal" (a process was asked to stop: the step in
    flight finished)."""
    args = run.args
    epoch, first = divmod(run.step, run.steps_per_epoch)
    run.sampler.set_epoch(epoch)  # it hands the epoch to the workers with each index
    run.sampler.start = first * run.accum * run.micro_batch  # this process's samples per step
    batches = iter(run.loader)
    run.model.train()
    bar = tqdm(range(first, run.steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
               disable=run.rank != 0, initial=first, total=run.steps_per_epoch, dynamic_ncols=True)
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
    """This process's accumulation micro-batches of the next step, on its device:
    [((weak, strong, mask), target)], the views normalized there (data.normalize). From pinned
    memory the copies do not wait for the device."""
    try:
        parts = [next(batches) for _ in range(run.accum)]
    except folders.UnreadableDataset as e:  # from a worker, its message ends the traceback
        fail(str(e).strip().splitlines()[-1].split("UnreadableDataset: ")[-1])
    on_device = []
    for (weak, strong, mask), target in parts:
        weak, strong, mask, target = (t.to(run.device, non_blocking=True)
                                      for t in (weak, strong, mask, target))
        views = (data.normalize(weak, run.clip_spec), data.normalize(strong, run.clip_spec), mask)
        on_device.append((views, target))
    return on_device


def stop_requested(run):
    """Whether a process was asked to stop (runtime.StopRequest); all processes get the same
    answer."""
    return any_process(run.stop.signum is not None)


def save_due(run):
    """Whether this process calls for a checkpoint inside the epoch after the step just done: every
    --save-freq steps, or, on rank 0 only, when --save-minutes have passed on its clock since the
    last checkpoint, so that the processes' agreement is rank 0's decision. An epoch's end saves
    anyway."""
    args = run.args
    if run.step % run.steps_per_epoch == 0:
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
    """Rank 0 appends one "train" record for the step just done, every statistic of must_step
    summed over processes, and prints its loss terms, confident share and lr."""
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
    """Score student and teacher where that is due: before training, every --eval-freq epochs,
    after the last, and where --max-steps stops the run (at_stop); each step once. -> False when
    a stop was requested, before or during it (a stopped evaluation is dropped: a resumed run
    evaluates again)."""
    epoch, into_epoch = divmod(run.step, run.steps_per_epoch)
    due = epoch == 0 or epoch % run.args.eval_freq == 0 or epoch == run.args.epochs
    done = any(e["step"] == run.step for e in run.evals)
    if run.test_set is None or done or not (at_stop or due and not into_epoch):
        return not stop_requested(run)
    if into_epoch:
        epoch = round(run.step / run.steps_per_epoch, 2)
    models = {"student": run.student, "teacher": run.teacher}
    test = EvalSet("test", run.args.data, run.test_set, run.train_set.classnames, None)
    # Evaluation runs the towers eagerly, --compile or not: compiling it would add graphs
    # (inference mode, the last batch's size) on every rank, to save little.
    with torch.compiler.set_stance("force_eager"):
        counts, _ = evaluate(models, [test], {(0, name): None for name in models}, run.device,
                             run.micro_batch, run.args.num_workers, run.hp.amp_dtype, stop=run.stop)
    if counts is None:
        return False
    key = "mean_per_class" if run.mean_per_class else "top1"
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
    return not stop_requested(run)


def print_table(evals, dataset, mean_per_class, start_name):
    """Zero-shot vs MUST student vs EMA teacher (last evaluation), and the release's best-on-test
    selection. When the evaluations scored different numbers of images (test files vanished or
    became unreadable during the run), each row says how many, and the best student is chosen
    among those that scored as many as the last."""
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


# ----------------------------------------------------------------------------------------------
# the epoch loop

def train(run):
    """The epoch loop and its one place for stopping: the end, --max-steps, or a signal. -> the
    eval records. Each epoch's steps are checkpointed before its evaluation, so that a stop or a
    kill during a long evaluation loses no training."""
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
            print(f"stopped by {signal.Signals(signum).name} after step {run.step}: {done}; run "
                  f"the same command again to {'resume' if run.step else 'start'}",
                  file=sys.stderr)
        raise SystemExit(128 + signum)
    return run.evals


def stop_for_dead_worker(run, error):
    """A loader worker died, and its error came from a wait for one of its batches: between two
    steps, or in an evaluation. With one process the steps done are checkpointed; with several,
    the others may be in a step's collectives and end with this one (the checkpoint on disk is
    intact). Then one line."""
    if not is_distributed():
        save_checkpoint(run)
    saved = os.path.isfile(run.ckpt_path)
    kept = f"{run.ckpt_path} holds step {run.saved[0]}" if saved else "nothing was saved"
    fail(f"a data loader worker ended unexpectedly, most often killed for lack of memory (lower "
         f"--num-workers): {str(error).splitlines()[0]}; {kept}; rerun the same command to "
         f"{'resume' if saved else 'start'}")


def report_end(run, why):
    """Rank 0's closing lines: unreadable images, a --max-steps stop, the results table."""
    args = run.args
    if run.reported:
        print(f"skipped {len(run.reported)} unreadable training image(s) (named above); each was "
              f"replaced by the next readable one")
    if why == "max-steps":
        print(f"stopped after step {run.step} of {run.total_steps} (--max-steps); to go on, rerun "
              f"with a larger --max-steps or without it (it resumes from {run.ckpt_path})")
    if run.evals:
        start = "--init model" if args.init else "CLIP zero-shot"
        print_table(run.evals, args.data, run.mean_per_class, start)
    elif run.test_set is None:
        print("not evaluated: --data folder without --eval-root")


# ----------------------------------------------------------------------------------------------
# checkpoints and their health

def save_checkpoint(run):
    """Collective: checks that the steps since the last check and the weights are healthy, and
    gathers every rank's RNG state; rank 0 writes OUT/checkpoint.pt atomically. The checkpoint it
    replaces is kept as checkpoint.prev.pt until a healthy step after the new one shows the new
    one good. Nothing is written when the checkpoint on disk already holds this step and these
    evaluations."""
    if run.saved == (run.step, len(run.evals)):
        return
    check_health(run, weights=True)
    states = [rng_state()] * run.world  # with several processes, all_gather_object fills it
    if is_distributed():
        torch.distributed.all_gather_object(states, states[0])
    if run.rank == 0:
        if not os.path.isdir(run.args.out_dir):  # save_atomic would make it anew, without a lock
            fail(f"--out-dir {run.args.out_dir} was removed during the run: nothing more is "
                 f"written (step {run.step} is not saved)")
        if run.step > run.saved[0]:  # new weights: the ones on disk stay until these are good
            keep_previous(run.ckpt_path, run.prev_path)
        save_atomic({"student": run.student.state_dict(), "teacher": run.teacher.state_dict(),
                     "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
                     "fairness": run.fairness.state_dict(), "step": run.step,
                     "epoch": run.step // run.steps_per_epoch, "rng": states, "evals": run.evals,
                     "args": vars(run.args), "classnames": list(run.train_set.classnames),
                     "fingerprints": run.fingerprints, "clip": run.clip_spec._asdict(),
                     "unreadable": sorted(run.reported)},
                    run.ckpt_path)
    run.saved = (run.step, len(run.evals))
    run.saved_at = time.monotonic()
    barrier()


def keep_previous(path, previous):
    """previous = the file at path, as a second name for the same bytes (a hard link: no copy, no
    space), or a copy where the file system has no hard links; nothing when there is no file at
    path yet."""
    if not os.path.isfile(path):
        return
    tmp = previous + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, previous)


def check_health(run, weights=False):
    """The non-finite losses the device counted since the last check, over all processes, read
    once (a host sync): any stops the run before those updates reach a checkpoint. With
    weights=True (before every checkpoint) the student's and teacher's weights must be finite too:
    a loss can still be finite when an update overflows.

    Called at log steps and before every checkpoint; a loss check at the step already checked has
    nothing new to read (run.step is the same on every process). A check that passes after the
    newest checkpoint shows that checkpoint good: the one kept before it is removed."""
    if run.checked == run.step and not weights:
        return
    bad = [run.nonfinite.clone().double()]
    if weights:
        tensors = [t for m in (run.student, run.teacher) for t in m.state_dict().values()
                   if t.is_floating_point()]
        bad.append(sum((~torch.isfinite(t)).sum() for t in tensors).double())
    bad_losses, *bad_weights = all_reduce(torch.stack(bad), run.device).tolist()
    if bad_losses:
        fail(f"non-finite loss in optimizer step(s) {run.checked + 1}-{run.step}; their updates "
             f"are not saved; {checkpoints_kept(run)}")
    if bad_weights and bad_weights[0]:
        fail(f"non-finite weights after optimizer step {run.step} although every loss was finite "
             f"(an update overflowed: lower --base-lr); they are not saved; "
             f"{checkpoints_kept(run)}")
    run.checked = run.step
    if run.rank == 0 and run.saved[0] < run.checked:
        with contextlib.suppress(FileNotFoundError):
            os.remove(run.prev_path)


def checkpoints_kept(run):
    """What the error of a failed health check says about the checkpoints on disk."""
    if not os.path.isfile(run.ckpt_path):
        return "no checkpoint was written yet"
    step = run.saved[0]
    if step < run.checked:  # a healthy step was taken from its weights
        return f"the last good checkpoint {run.ckpt_path} (step {step}) is intact"
    kept = (f"the last checkpoint {run.ckpt_path} (step {step}) holds the weights these steps "
            f"started from")
    if os.path.isfile(run.prev_path):
        return (f"{kept}, and {run.prev_path} the last known good ones; resuming repeats the same "
                f"steps, so to go on with other settings (a lower --base-lr), start a new run from "
                f"one of them with --init")
    return (f"{kept}, and no earlier checkpoint is kept; resuming repeats the same steps, so start "
            f"again with other settings (a lower --base-lr), or start a new run from it with "
            f"--init")


def load_checkpoint_for(path, args, fingerprints, resume):
    """A train.py checkpoint that config.check_same_run accepts for this run (resume) or its
    --init."""
    what = "resume checkpoint" if resume else "--init checkpoint"
    try:
        ckpt = read_checkpoint(path, what)
    except ValueError as e:
        newest = resume and path == os.path.join(args.out_dir, CHECKPOINT)
        fail(f"{e}{previous_readable(args.out_dir) if newest else ''}")
    if not {"args", "fingerprints"} <= set(ckpt):
        fail(f"{path} is not a MUST checkpoint written by this train.py (no settings or "
             f"fingerprints)")
    config.check_same_run(f"{what} {path}", ckpt["args"], ckpt["fingerprints"], args,
                          fingerprints, resume)
    return ckpt


def previous_readable(out_dir):
    """For a checkpoint.pt that cannot be read: '; ...' saying how to resume from the checkpoint
    before it, if that one can be read; else ''."""
    previous = os.path.join(out_dir, PREVIOUS)
    try:
        step = read_checkpoint(previous)["step"]
    except (ValueError, KeyError):
        return ""
    return (f"; the checkpoint before it, {previous} (step {step}), can be read: move "
            f"{os.path.join(out_dir, CHECKPOINT)} away and rerun the same command to resume "
            f"from it")


def resume(run, path):
    ckpt = load_checkpoint_for(path, run.args, run.fingerprints, resume=True)
    try:
        run.student.load_state_dict(ckpt["student"])
        run.teacher.load_state_dict(ckpt["teacher"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError) as e:
        fail(f"resume checkpoint {path} does not fit this run ({str(e).splitlines()[0][:200]})")
    run.scaler.load_state_dict(ckpt["scaler"])
    run.fairness.load_state_dict(ckpt["fairness"])
    run.step, run.evals = ckpt["step"], list(ckpt["evals"])
    run.checked = run.step
    run.saved = (run.step, len(run.evals))
    # Files warned about already: the warning and the count go on from there. Only a dataset that
    # flags unreadable files (folders.ImageList.bad) ever reports one.
    run.reported = set(ckpt.get("unreadable", []))
    if run.reported:
        run.train_set.bad[sorted(run.reported)] = 1
    states = ckpt["rng"]
    set_rng_state(states[run.rank] if len(states) == run.world else states[0])
    if run.rank == 0:
        print(f"resumed from {path} at step {run.step} (epoch {run.step // run.steps_per_epoch})")
        if len(states) != run.world:
            print(f"note: the checkpoint was written by {len(states)} process(es) and this run "
                  f"has {run.world}: the images, global batch and steps are the same, but sums "
                  f"over processes run in another order, so the weights will not be "
                  f"bit-identical to an uninterrupted run's")
        if ckpt["args"].get("compile", False) != run.args.compile:
            on, off = ("on", "off") if run.args.compile else ("off", "on")
            print(f"note: --compile is {on} in this run and was {off} in the checkpoint's: "
                  f"compiled and eager kernels round differently, so the weights will not be "
                  f"bit-identical to an uninterrupted run's")


# ----------------------------------------------------------------------------------------------
# building a run

def build_run(args, rank, world, device, stop):
    """Everything a run holds (Run): the CLIP of --model made a MUST student, its teacher and
    optimizer, the data, the schedule and the paths."""
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
    fingerprints = {"model": fingerprint(clip.state_dict()),
                    "clip_spec": fingerprint(clip.spec.identity()),
                    "classes": fingerprint(train_set.classnames),
                    "templates": fingerprint(train_set.templates),
                    "train_images": len(train_set),
                    "train_listing": fingerprint(listing(train_set, args.data_root))}
    student = build_student(args, clip, train_set, fingerprints, device, rank)
    clip_spec = clip.spec
    del clip  # the text tower is done: the classifier holds what it knew
    steps_per_epoch = len(train_set) // args.global_batch
    if steps_per_epoch == 0:
        fail(f"{len(train_set)} training images are fewer than one global batch of "
             f"{args.global_batch}")
    lr, min_lr = (x * args.global_batch / 256 for x in (args.base_lr, args.base_min_lr))
    amp_dtype, use_scaler = autocast_for(args.amp, device)
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
        hp=must.Hparams(args.conf_threshold, args.lambda_reg, args.lambda_align, args.align_k,
                        student.visual.patch_size, args.global_batch, not args.no_reg,
                        not args.no_mim, not args.no_align, amp_dtype),
        train_set=train_set, test_set=test_set, sampler=sampler,
        loader=train_loader(train_set, sampler, micro_batch, args, device),
        micro_batch=micro_batch, accum=accum, steps_per_epoch=steps_per_epoch,
        total_steps=args.epochs * steps_per_epoch, lr=lr, min_lr=min_lr,
        mean_per_class=args.data in data.MEAN_PER_CLASS,
        ckpt_path=os.path.join(args.out_dir, CHECKPOINT),
        prev_path=os.path.join(args.out_dir, PREVIOUS),
        log_path=os.path.join(args.out_dir, "log.jsonl"), fingerprints=fingerprints,
        clip_spec=clip_spec,
        nonfinite=torch.zeros((), dtype=torch.float64, device=device))
    # In place, so that the state dicts, and so checkpoints, keep their names; run_eval runs the
    # towers eagerly, so the compiled graphs are must_step's: the teacher's forward, the student's
    # forward and backward (through DDP with several processes) and its no-grad p̄ pass.
    if args.compile:
        run.student.compile()
        run.teacher.compile()
    return run


def train_loader(train_set, sampler, micro_batch, args, device):
    """This process's micro-batches of (weak, strong, mask) views, made by --num-workers
    processes. They are persistent (no start-up at each epoch): the sampler hands them the
    epoch with each index (SeededViews). Batches arrive in pinned memory when the device is a
    GPU, so that their copies do not wait."""
    views = SeededViews(train_set, args.seed)
    return DataLoader(views, batch_size=micro_batch, sampler=sampler, drop_last=True,
                      num_workers=args.num_workers, persistent_workers=args.num_workers > 0,
                      pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)


def build_datasets(args, visual, spec, masks, rank):
    """(the unlabeled training set with its views and masks, the labeled test set, or None for a
    folder without --eval-root)"""
    size = visual.input_resolution
    views = data.TrainTransform(size, masks, args.strong_view, spec)
    evaluated = not (args.data == "folder" and not args.eval_root)
    try:
        # With --download, one process at a time fetches the files.
        with rank_zero_first(rank) if args.download else contextlib.nullcontext():
            train_set = data.build_dataset(args.data, args.data_root, "train", views, args.classes,
                                           args.templates, args.eval_root, args.download)
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


def listing(dataset, root):
    """The training images as a run knows them: their paths relative to the data root, in order
    (a dataset that lists no files, like the toy world's, by its size). Resuming on another
    listing would shift every index."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return [f"{len(dataset)} items"]
    prefix = os.path.join(root, "") if root else ""
    return [path[len(prefix):] if path.startswith(prefix) else path for path, _ in samples]


def build_student(args, clip, train_set, fingerprints, device, rank):
    """The MUSTModel that training starts from (Fig. 1): CLIP's image tower, the MIM heads and the
    zero-shot head of the training classes as a trainable classifier; the image tower of --init
    if given. Heads without a loss stay frozen, so that DDP sees no unused parameters."""
    with rank_zero_first(rank):  # rank 0 computes the head and caches it for the others
        try:
            head = prompts.zero_shot_head(clip.to(device), train_set.classnames,
                                          train_set.templates, device=device,
                                          cache_dir=args.out_dir).cpu()
        except ValueError as e:  # a prompt longer than CLIP's context
            fail(str(e))
    if not torch.isfinite(head).all():
        fail(f"the zero-shot head has non-finite values: the text tower of {args.model} is broken")
    torch.manual_seed(args.seed)  # the same [MSK] and decoder on every rank, as with one process
    student = must.MUSTModel.from_clip(clip.cpu(), head, args.freeze_classifier)
    if args.no_mim:
        student.visual.decoder.requires_grad_(False)
    if args.no_mim and args.no_align:
        student.visual.mask_token.requires_grad_(False)
        student.visual.ln_patch.requires_grad_(False)
    if args.init:
        init = load_checkpoint_for(args.init, args, fingerprints, resume=False)
        tower = {k.removeprefix("visual."): v for k, v in init["student"].items()
                 if k.startswith("visual.")}
        try:
            student.visual.load_state_dict(tower)  # the classifier stays this dataset's head
        except RuntimeError as e:
            fail(f"--init checkpoint {args.init} does not fit {args.model} "
                 f"({str(e).splitlines()[0][:200]})")
    return student.to(device)


def check_out_dir(run):
    """What would otherwise fail only at the first log line or checkpoint, checked on rank 0
    before any work: the files the run writes are not folders, and the disk has room for two
    checkpoints (the newest, and the one before it until the newest is known good)."""
    problem = None
    if run.rank == 0:
        # The files the run writes, and the temporary ones its checkpoints are written through.
        for path in (run.log_path, run.ckpt_path, run.prev_path, run.ckpt_path + ".tmp",
                     run.prev_path + ".tmp"):
            if os.path.isdir(path):
                problem = (f"{path} is a folder, where the run writes a file: move it away or use "
                           f"another --out-dir")
        size = checkpoint_bytes(run)
        on_disk = sum(os.path.getsize(p) for p in (run.ckpt_path, run.prev_path)
                      if os.path.isfile(p))
        free = shutil.disk_usage(run.args.out_dir).free
        if problem is None and free + on_disk < 2 * size:
            problem = (f"--out-dir {run.args.out_dir} has {size_text(free)} free, and this run "
                       f"needs about {size_text(2 * size - on_disk)} more for its checkpoints "
                       f"({size_text(size)} each; the newest and the one before it are kept): "
                       f"free space or use another --out-dir")
    if any_process(problem is not None):
        fail(problem or "rank 0 cannot write its checkpoints (see its message)")


def check_shared_memory(run):
    """Enough shared memory for the loader workers, checked before any work: for the larger of a
    training batch (two uint8 views and a mask) and an evaluation batch (float32 images)."""
    size = run.student.visual.input_resolution
    grid = (size // run.student.visual.patch_size) ** 2
    views = run.micro_batch * (2 * 3 * size ** 2 + grid + 8)  # uint8 views, bool mask, int64 label
    problem = shared_memory_problem(run.args.num_workers,
                                    max(views, batch_bytes(run.micro_batch, size)))
    if any_process(problem is not None):
        fail(problem or "another node has too little shared memory (see its message)")


def checkpoint_bytes(run):
    """About the size of this run's checkpoint: the student's and teacher's weights, and AdamW's
    two moments per trained weight."""
    weights = sum(t.numel() * t.element_size() for t in run.student.state_dict().values())
    moments = sum(2 * p.numel() * p.element_size() for p in run.student.parameters()
                  if p.requires_grad)
    return 2 * weights + moments


def start(run):
    """Resume (--resume auto: OUT/checkpoint.pt, or the checkpoint before it when it is missing)
    or start a fresh log; seed the per-rank RNGs."""
    args = run.args
    path = {"none": None, "auto": run.ckpt_path}.get(args.resume, args.resume)
    missing = path == run.ckpt_path and not os.path.isfile(path)
    restore = missing and os.path.isfile(run.prev_path)
    if restore:  # checkpoint.pt was removed: the one before it is resumed and takes its place
        path = run.prev_path
        if run.rank == 0:
            print(f"{run.ckpt_path} is missing: resuming from the checkpoint before it")
    elif missing:
        path = None
    elif path is not None and not os.path.isfile(path):
        fail(f"no checkpoint at {path}")
    check_out_dir(run)
    check_shared_memory(run)
    run.saved_at = time.monotonic()  # --save-minutes counts from here
    seed = (args.seed + run.rank) % 2 ** 32  # per-rank RNGs for anything else; numpy's take < 2^32
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if path is not None:
        resume(run, path)
    elif run.rank == 0:  # a fresh run starts a fresh log; a resumed one appends
        if os.path.isfile(run.log_path) and os.path.getsize(run.log_path):
            print(f"note: a new run starts in {args.out_dir}: the log and any checkpoint of the "
                  f"run before are replaced")
        open(run.log_path, "w").close()
    if restore and run.rank == 0:
        keep_previous(run.prev_path, run.ckpt_path)
    if run.rank == 0:
        print(f"MUST on {args.data}: {len(run.train_set)} images, {run.student.num_classes} "
              f"classes, {run.world} process(es), global batch {args.global_batch} = {run.world} x "
              f"{run.accum} x {run.micro_batch}, {run.total_steps} steps, lr {run.lr:.3g}, "
              f"s = {run.student.logit_scale.item():.4g}")
        log(run, {"type": "config", **vars(args), "world_size": run.world,
                  "steps_per_epoch": run.steps_per_epoch})


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = config.parse_args(argv)
    config.check_flags(args)  # every flag, before any process group, model or data exists
    rank, world, device = setup_distributed(args.device, args.dist_timeout)
    lock = RunLock(args.out_dir) if rank == 0 else None
    failed = True  # until the run ends, or stops on a signal with its checkpoint
    try:
        with StopRequest() as stop:
            run = build_run(args, rank, world, device, stop)
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
                 "this one stopped with it; a checkpoint written before is intact, and rerunning "
                 "the same command resumes from it")
        raise
    finally:
        if lock is not None:
            lock.release()
        end_distributed(failed)


if __name__ == "__main__":
    main()
