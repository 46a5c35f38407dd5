"""Train MUST (Masked Unsupervised Self-Training, ICLR 2023) on the unlabeled images of one dataset.

    python train.py --data toy                                            # CPU-sized synthetic run
    python train.py --data imagenet --data-root /data/imagenet --model ViT-B/16
    torchrun --nproc_per_node 8 train.py --data imagenet --data-root /data/imagenet --model ViT-B/16

Top to bottom: optimizer (AdamW, layer-wise lr decay, cosine) -> checkpoints -> one optimizer step (exact
over the global batch) -> one epoch -> the epoch loop -> building a run -> main. The settings are config.py's, with
defaults from the paper's Table 10 (data.hparams); every flag overrides.

Rank 0 writes log.jsonl, checkpoint.pt and the zero-shot head cache into --out-dir (one run at a time: run.lock);
docs/usage.md describes every field.
"""
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import clip_model
import config
import data
from eval import EvalSet, evaluate, report_listing, report_unreadable
import must
import prompts
from runtime import (ResumableSampler, RunLock, SeededViews, StopRequest, all_reduce, any_process, autocast_for,
                     barrier, fail, fingerprint, ignore_stop_signals, is_distributed, rank_zero_first, rng_state,
                     save_atomic, set_rng_state, setup_distributed)

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"  # the checkpoint before, kept until the newest is known good


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
    out; 1-D params (biases, LayerNorms, [CLS]) get no weight decay; [MSK] does, as in the release."""
    num_layers = len(model.visual.transformer.resblocks)
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        i = layer_id(name, num_layers)
        # The release decays every param that is not 1-D; its [MSK] is stored as (1, 1, width), so it is decayed
        # although ours is (width,).
        decay = param.ndim > 1 or name.removeprefix("module.") == "visual.mask_token"
        key = (i, not decay)  # in sorted order: by layer, the decayed group first
        if key not in groups:
            groups[key] = {"name": f"layer_{i}_{'decay' if decay else 'no_decay'}", "params": [],
                           "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": layer_decay ** (num_layers + 1 - i)}
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def make_optimizer(model, weight_decay, layer_decay, lr, device):
    """AdamW (β 0.9, 0.999, ε 1e-8) over param_groups: one fused kernel on a GPU, multi-tensor kernels on CPU."""
    return torch.optim.AdamW(param_groups(model, weight_decay, layer_decay), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                             **({"fused": True} if device.type == "cuda" else {"foreach": True}))


def cosine_lr(step, total_steps, lr, min_lr):
    """Cosine decay from lr to min_lr over total_steps optimizer steps, no warmup (§3.4)."""
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


# ----------------------------------------------------------------------------------------------------------
# checkpoints and the identity of a run

def load_checkpoint_for(path, args, fingerprints, resume):
    """Read a train.py checkpoint that config.check_same_run accepts for this run (resume) or its --init."""
    what = "resume checkpoint" if resume else "--init checkpoint"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read {what} {path} ({clip_model.load_error_detail(e, path)})")
    if not isinstance(ckpt, dict) or not {"student", "args", "fingerprints"} <= set(ckpt):
        fail(f"{path} is not a MUST checkpoint written by this train.py (no student weights or fingerprints)")
    config.check_same_run(f"{what} {path}", ckpt["args"], ckpt["fingerprints"], args, fingerprints, resume)
    return ckpt


def save_checkpoint(run):
    """Collective: checks that the steps since the last check and the weights are healthy, gathers every rank's RNG
    state; rank 0 writes OUT/checkpoint.pt atomically. The checkpoint it replaces is kept as checkpoint.prev.pt until
    a healthy step after the new one shows that the new one is good. Nothing is written when the checkpoint on disk
    already holds this step and these evaluations."""
    if run.saved == (run.step, len(run.evals)):
        return
    check_health(run, weights=True)
    states = [rng_state()] * run.world  # with several processes, all_gather_object puts in every rank's own
    if is_distributed():
        torch.distributed.all_gather_object(states, states[0])
    if run.rank == 0:
        if run.step > run.saved[0]:  # new weights: the ones on disk stay until these are known good
            keep_previous(run.ckpt_path, run.prev_path)
        save_atomic({"student": run.student.state_dict(), "teacher": run.teacher.state_dict(),
                     "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
                     "fairness": run.fairness.state_dict(), "step": run.step, "epoch": run.step // run.steps_per_epoch,
                     "rng": states, "evals": run.evals, "args": vars(run.args),
                     "classnames": list(run.train_set.classnames), "fingerprints": run.fingerprints,
                     "unreadable": sorted(run.reported)}, run.ckpt_path)
    run.saved = (run.step, len(run.evals))
    barrier()


def keep_previous(path, previous):
    """previous = the file at path, as a second name for the same bytes (a hard link: no copy, no space), or a
    copy where the file system has no hard links; nothing when there is no file at path yet."""
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
    run.reported = set(ckpt.get("unreadable", []))  # warned about already: the warning and count go on from there
    if run.reported:  # only a dataset that flags unreadable files (data.ImageList.bad) ever reports one
        run.train_set.bad[sorted(run.reported)] = 1
    states = ckpt["rng"]
    set_rng_state(states[run.rank] if len(states) == run.world else states[0])
    if run.rank == 0:
        print(f"resumed from {path} at step {run.step} (epoch {run.step // run.steps_per_epoch})")
        if len(states) != run.world:
            print(f"note: the checkpoint was written by {len(states)} process(es) and this run has {run.world}: "
                  f"the images, global batch and steps are the same, but sums over processes run in another "
                  f"order, so the weights will not be bit-identical to an uninterrupted run's")


# ----------------------------------------------------------------------------------------------------------
# one optimizer step, exact over the global batch

STATS = ("loss_cls", "loss_reg", "loss_mim", "loss_align", "confident", "images", "labeled", "correct")


def forward_student(model, strong, mask, masked):
    """-> (logits,) or, masked, (logits, v_cls, v_patch, recon): must.must_loss's `outputs`."""
    return model(strong, mask) if masked else (model(strong),)


def train_step(run, parts):
    """One optimizer step on the global batch, of which this process holds `parts`, its accumulation
    micro-batches [((weak, strong, mask), target)]. Exact at every split: eq. 2's confident count and eq. 3's p̄
    are taken over the whole global batch before any backward (with accumulation p̄ needs a no-grad student pass
    first), and each part back-propagates its share of the global loss (must.must_loss).
    Nothing here waits for the device: returns this process's numbers in STATS order, on the device (a non-finite
    loss is counted in run.nonfinite and acted on by check_health)."""
    a, dev, masked = run.args, run.device, run.use_mim or run.use_align
    first_of_epoch = run.step % run.steps_per_epoch == 0
    autocast = torch.autocast(dev.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None)
    with torch.no_grad():  # pseudo-labels from the weak view, no mask (§3.1)
        targets = []
        for (weak, _, _), _ in parts:
            with autocast:
                targets.append(must.pseudo_labels(run.teacher(weak.to(dev, non_blocking=True)), a.conf_threshold))
        num_confident = all_reduce(sum(confident.sum() for _, confident in targets), dev)
        if run.use_reg and len(parts) > 1:
            with autocast:
                probs = sum(len(s) * must.mean_probs(forward_student(run.student, s.to(dev), m.to(dev), masked)[0])
                            for (_, s, m), _ in parts)
            reg_w, l_reg = must.fairness_weights(all_reduce(probs, dev) / a.global_batch, run.fairness, first_of_epoch)
    stats = torch.zeros(len(STATS), dtype=torch.float64, device=dev)
    for i, ((_, strong, mask), target) in enumerate(parts):
        strong, mask, target = (t.to(dev, non_blocking=True) for t in (strong, mask, target))
        labels, confident = targets[i]
        with contextlib.nullcontext() if i == len(parts) - 1 or run.world == 1 else run.model.no_sync():
            with autocast:
                outputs = forward_student(run.model, strong, mask, masked)
            if run.use_reg and len(parts) == 1:  # the batch is this pass's: its p̄ costs no extra forward
                probs = len(strong) * must.mean_probs(outputs[0].detach())
                reg_w, l_reg = must.fairness_weights(all_reduce(probs, dev) / a.global_batch, run.fairness,
                                                     first_of_epoch)
            loss, terms = must.must_loss(
                outputs, strong, mask, labels, confident, num_confident, a.global_batch,
                reg_w if run.use_reg else None, patch_size=run.patch_size, use_mim=run.use_mim,
                use_align=run.use_align, **run.loss_settings)
            run.scaler.scale(loss * run.world).backward()  # DDP averages over processes; the shares add up
        run.nonfinite += ~torch.isfinite(loss.detach())
        labeled = confident & (target >= 0)
        zero = torch.zeros((), device=dev)
        stats += torch.stack([terms["loss_cls"], zero, terms.get("loss_mim", zero), terms.get("loss_align", zero),
                              confident.sum(), torch.full((), len(target), device=dev), labeled.sum(),
                              (labeled & (labels == target)).sum()]).double()  # no boolean indexing: no sync
    if run.use_reg:
        stats[1] = l_reg / run.world  # the same global value on every process: the sum over them gives it back
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return stats


def check_health(run, weights=False):
    """The non-finite losses the device counted since the last check, over all processes, read once (a host
    sync): any stops the run before those updates reach a checkpoint. With weights=True (before every checkpoint)
    the student's and teacher's weights must be finite too: a loss can still be finite when an update overflows.
    Called at log steps and before every checkpoint; a loss check at the step already checked has nothing new to
    read (run.step is the same on every process). A check that passes after the newest checkpoint shows that
    checkpoint good: the one kept before it (checkpoint.prev.pt) is removed."""
    if run.checked == run.step and not weights:
        return
    bad = [run.nonfinite.clone().double()]
    if weights:
        tensors = [t for m in (run.student, run.teacher) for t in m.state_dict().values() if t.is_floating_point()]
        bad.append(sum((~torch.isfinite(t)).sum() for t in tensors).double())
    bad_losses, *bad_weights = all_reduce(torch.stack(bad), run.device).tolist()
    if bad_losses:
        fail(f"non-finite loss in optimizer step(s) {run.checked + 1}-{run.step}; their updates are not saved; "
             f"{checkpoints_kept(run)}")
    if bad_weights and bad_weights[0]:
        fail(f"non-finite weights after optimizer step {run.step} although every loss was finite (an update "
             f"overflowed: lower --base-lr); they are not saved; {checkpoints_kept(run)}")
    run.checked = run.step
    if run.rank == 0 and run.saved[0] < run.checked:
        with contextlib.suppress(FileNotFoundError):
            os.remove(run.prev_path)


def checkpoints_kept(run):
    """What the error of a failed health check says about the checkpoints on disk."""
    if not os.path.isfile(run.ckpt_path):
        return "no checkpoint was written yet"
    if run.saved[0] < run.checked:  # a healthy step was taken from its weights
        return f"the last good checkpoint {run.ckpt_path} (step {run.saved[0]}) is intact"
    kept = f"the last checkpoint {run.ckpt_path} (step {run.saved[0]}) holds the weights these steps started from"
    if os.path.isfile(run.prev_path):
        return (f"{kept}, and {run.prev_path} the last known good ones; resuming repeats the same steps, so to go "
                f"on with other settings (a lower --base-lr), start a new run from one of them with --init")
    return (f"{kept}, and no earlier checkpoint is kept; resuming repeats the same steps, so start again with other "
            f"settings (a lower --base-lr), or start a new run from it with --init")


def log(run, record):
    """Rank 0 appends one record to OUT/log.jsonl."""
    if run.rank == 0:
        try:
            with open(run.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            fail(f"cannot append to {run.log_path} ({e.strerror}); was --out-dir {run.args.out_dir} removed?")


def log_train(run, stats, mu, images_per_s):
    """Rank 0 appends one "train" record for the step just done (the terms switched on, summed over processes)."""
    total = dict(zip(STATS, all_reduce(stats, run.device).tolist()))
    skipped = report_unreadable(run.train_set, "training", run.reported, run.device)
    if len(run.train_set) - skipped < run.args.global_batch:
        fail(f"only {len(run.train_set) - skipped} of the {len(run.train_set)} training images can be read: fewer "
             f"than one global batch of {run.args.global_batch} (see the warnings above)")
    weights = {"loss_cls": 1.0, "loss_reg": run.args.lambda_reg, "loss_mim": 1.0, "loss_align": run.args.lambda_align}
    on = [k for k, used in zip(weights, (True, run.use_reg, run.use_mim, run.use_align)) if used]
    record = {"type": "train", "step": run.step, "epoch": run.step / run.steps_per_epoch,
              "loss": sum(weights[k] * total[k] for k in on), **{k: total[k] for k in on},
              "lr": run.optimizer.param_groups[-1]["lr"], "ema_mu": mu,
              "conf_ratio": total["confident"] / total["images"],
              "pseudo_label_acc": total["correct"] / total["labeled"] if total["labeled"] else None,
              "images_per_s": images_per_s, "skipped": skipped}
    log(run, record)
    return record


def train_one_epoch(run):
    """The steps not done yet of the epoch run.step is in (all of them unless resumed inside it).
    -> why it ended: "epoch", "max-steps" or "signal" (a process was asked to stop: the step in flight finished)."""
    a = run.args
    epoch, first = divmod(run.step, run.steps_per_epoch)
    run.views.epoch = epoch
    run.sampler.set_epoch(epoch)
    run.sampler.start = first * run.accum * run.micro_batch  # this process's samples per step
    loader = DataLoader(run.views, batch_size=run.micro_batch, sampler=run.sampler, num_workers=a.num_workers,
                        pin_memory=run.device.type == "cuda", drop_last=True, worker_init_fn=ignore_stop_signals)
    batches = iter(loader)
    try:
        run.model.train()
        bar = tqdm(range(first, run.steps_per_epoch), desc=f"epoch {epoch + 1}/{a.epochs}", disable=run.rank != 0,
                   initial=first, total=run.steps_per_epoch, dynamic_ncols=True)
        tic, seen = time.time(), 0
        for _ in bar:
            if a.max_steps is not None and run.step >= a.max_steps:
                return "max-steps"
            set_lr(run.optimizer, cosine_lr(run.step, run.total_steps, run.lr, run.min_lr))
            mu = must.ema_momentum(run.step, a.ema_mu0, a.ema_mu_n)
            try:
                parts = [next(batches) for _ in range(run.accum)]
            except data.UnreadableDataset as e:  # from a worker, the message ends its traceback
                fail(str(e).strip().splitlines()[-1].removeprefix("data.UnreadableDataset: "))
            stats = train_step(run, parts)
            must.ema_update(run.teacher, run.student, mu)  # eq. 1
            run.step += 1
            seen += a.global_batch
            stop = stop_requested(run)  # every rank ends at the same step
            if run.step % a.log_freq == 0 or run.step % run.steps_per_epoch == 0 or stop:
                check_health(run)
                record = log_train(run, stats, mu, seen / (time.time() - tic))
                bar.set_postfix(loss=f"{record['loss']:.3f}", conf=f"{record['conf_ratio']:.2f}")
                tic, seen = time.time(), 0
            if stop:
                return "signal"
            if a.save_freq and run.step % a.save_freq == 0 and run.step % run.steps_per_epoch:
                save_checkpoint(run)
        return "epoch"
    finally:
        # A worker ignores SIGTERM (ignore_stop_signals), so the interpreter's exit cannot stop one that an error left
        # running (a worker's exception keeps the loader alive in a reference cycle until the process ends, and the
        # exit then waits for it forever): end the workers here, whatever ended the epoch.
        getattr(batches, "_shutdown_workers", lambda: None)()


def stop_requested(run):
    """Whether a process was asked to stop (runtime.StopRequest); all processes get the same answer."""
    return any_process(run.stop.signum is not None)


def run_eval(run):
    """Score student and teacher at the start of an epoch where that is due: before training, every --eval-freq
    epochs and after the last; each epoch once. -> False when a stop was requested, before or during it (a stopped
    evaluation is dropped: a resumed run evaluates again)."""
    epoch, into_epoch = divmod(run.step, run.steps_per_epoch)
    due = epoch == 0 or epoch % run.args.eval_freq == 0 or epoch == run.args.epochs
    if run.test_set is None or into_epoch or not due or any(e["epoch"] == epoch for e in run.evals):
        return not stop_requested(run)
    models = {"student": run.student, "teacher": run.teacher}
    counts, _ = evaluate(models, [EvalSet("test", run.args.data, run.test_set, run.train_set.classnames, None)],
                         {(0, name): None for name in models}, run.device, run.micro_batch, run.args.num_workers,
                         run.amp_dtype, stop=run.stop)
    if counts is None:
        return False
    key = "mean_per_class" if run.mean_per_class else "top1"
    student, teacher = (counts[(0, name)].metrics() for name in models)
    report_unreadable(run.test_set, "test", run.reported_test, run.device)
    run.evals.append({"epoch": epoch, "step": run.step, "student_acc": student[key], "teacher_acc": teacher[key],
                      "images": student["images"]})
    log(run, {"type": "eval", **run.evals[-1]})
    if run.rank == 0:
        tqdm.write(f"epoch {epoch}: student {student[key]:.2f}%  teacher {teacher[key]:.2f}%  "
                   f"({student['images']} images)")
    return not stop_requested(run)


def train(run):
    """The epoch loop and its one place for stopping: the end, --max-steps, or a signal. -> the eval records.
    Each epoch's steps are checkpointed before its evaluation, so a stop or a kill during a long evaluation loses
    no training."""
    a = run.args
    why = "epoch" if run_eval(run) else "signal"  # zero-shot (or --init) before training, or one a stop cut short
    while why == "epoch" and run.step < run.total_steps:
        why = train_one_epoch(run)
        save_checkpoint(run)
        if why == "epoch" and not run_eval(run):
            why = "signal"
        if why == "epoch" and a.max_steps is not None and run.step >= a.max_steps:
            why = "max-steps"
    save_checkpoint(run)  # the last evaluation joins the checkpoint
    if run.rank == 0:
        if run.step == run.total_steps:  # the run is over: its last checkpoint is its result, no step will test it
            with contextlib.suppress(FileNotFoundError):
                os.remove(run.prev_path)
        report_end(run, why)
    if why == "signal":
        signum = run.stop.signum or signal.SIGTERM
        if run.rank == 0:
            done = f"checkpoint {run.ckpt_path} written" if os.path.isfile(run.ckpt_path) else "nothing to save"
            print(f"stopped by {signal.Signals(signum).name} after step {run.step}: {done}; run the same command "
                  f"again to {'resume' if run.step else 'start'}", file=sys.stderr)
        raise SystemExit(128 + signum)
    return run.evals


def report_end(run, why):
    """Rank 0's closing lines: unreadable images, a --max-steps stop, the results table."""
    a = run.args
    if run.reported:
        print(f"skipped {len(run.reported)} unreadable training image(s) (named above); each was replaced by "
              f"the next readable one")
    if why == "max-steps":
        print(f"stopped after step {run.step} of {run.total_steps} (--max-steps); rerun to resume from "
              f"{run.ckpt_path}")
    if run.evals:
        print_table(run.evals, a.data, run.mean_per_class, "--init model" if a.init else "CLIP zero-shot")
    elif run.test_set is None:
        print("not evaluated: --data folder without --eval-root")


def print_table(evals, dataset, mean_per_class, start_name):
    """Zero-shot vs MUST student vs EMA teacher (last evaluation), plus the release's best-on-test selection. When
    the evaluations scored different numbers of images (test files vanished or became unreadable during the run),
    each row says how many, and the best student is chosen among those that scored as many as the last."""
    first, last = evals[0], evals[-1]
    same = [e for e in evals[1:] or evals if e.get("images") == last.get("images")] or [last]
    best = max(same, key=lambda e: e["student_acc"])
    rows = [(start_name, first), ("MUST student", last), ("MUST teacher (EMA)", last), ("best student", best)]
    if len(evals) == 1:  # stopped before the first evaluation after training
        rows = rows[:1]
    differ = len({e["images"] for e in evals if "images" in e}) > 1  # older checkpoints' evals have no count
    print(f"\n{dataset}: {'mean per-class accuracy' if mean_per_class else 'top-1'} (%)")
    for name, e in rows:
        acc = e["teacher_acc"] if name == "MUST teacher (EMA)" else e["student_acc"]
        when = f"{e['epoch']} (chosen on test, as the release)" if name == "best student" else e["epoch"]
        print(f"  {name:20} {acc:6.2f}   epoch {when}" + (f"   on {e.get('images')} images" if differ else ""))
    if differ:
        print("  warning: the evaluations scored different numbers of test images (see the warnings above), so "
              "their accuracies are not comparable")


# ----------------------------------------------------------------------------------------------------------
# building a run

def build_datasets(args, visual, rank):
    """(unlabeled training set with its views and masks, labeled test set or None for a folder without --eval-root)"""
    input_size = visual.input_resolution
    mask_generator = data.MaskGenerator(input_size, args.mask_unit, visual.patch_size, args.mask_ratio)
    try:
        with rank_zero_first(rank) if args.download else contextlib.nullcontext():  # one download at a time
            train_set = data.build_dataset(args.data, args.data_root, "train",
                                           data.TrainTransform(input_size, mask_generator, args.strong_view),
                                           args.classes, args.templates, args.eval_root, download=args.download)
            test_set = None if args.data == "folder" and not args.eval_root else data.build_dataset(
                args.data, args.data_root, "test", data.test_transform(input_size), args.classes, args.templates,
                args.eval_root, download=args.download)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if rank == 0:
        report_listing(train_set, "training")
        if test_set is not None:
            report_listing(test_set, "test")
    return train_set, test_set


def listing(dataset, root):
    """The training images as a run knows them: their paths relative to the data root, in order (a dataset that
    lists no files, like the toy world's, by its size). Resuming on another listing would shift every index."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return [f"{len(dataset)} items"]
    prefix = os.path.join(root, "") if root else ""
    return [path[len(prefix):] if path.startswith(prefix) else path for path, _ in samples]


def build_student(args, clip, head):
    """MUSTModel: CLIP's image tower + the zero-shot head as a trainable classifier (Fig. 1) and the MIM heads;
    heads without a loss stay frozen, so DDP sees no unused parameters."""
    torch.manual_seed(args.seed)  # same [MSK] / decoder init on every rank (and as with one process)
    student = must.MUSTModel(clip.visual, head, clip.logit_scale.exp().item(), freeze_classifier=args.freeze_classifier)
    if args.no_mim:
        student.visual.decoder.requires_grad_(False)
    if args.no_mim and args.no_align:
        student.visual.mask_token.requires_grad_(False)
        student.visual.ln_patch.requires_grad_(False)
    return student


def build_run(args, rank, world, device, stop):
    """Everything a run holds, as one namespace: model, teacher, optimizer, data, schedule, paths."""
    with rank_zero_first(rank):  # the CLIP of --model: rank 0 downloads it first
        if args.model is None:
            args.model = data.default_model(args.data, args.data_root)
        try:
            clip, _ = clip_model.load(args.model, device="cpu", download_root=args.download_root)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            fail(str(e))
    config.resolve_config(args, clip.visual)  # Table 10's values for this CLIP where no flag was given
    _, micro_batch, accum = config.split_batch(args, world)
    train_set, test_set = build_datasets(args, clip.visual, rank)
    fingerprints = {"model": fingerprint(clip.state_dict()), "classes": fingerprint(train_set.classnames),
                    "templates": fingerprint(train_set.templates),
                    "train_images": len(train_set), "train_listing": fingerprint(listing(train_set, args.data_root))}
    with rank_zero_first(rank):
        head = prompts.zero_shot_head(clip.to(device), train_set.classnames, train_set.templates, device=device,
                                      cache_dir=args.out_dir).cpu()
    if not torch.isfinite(head).all():
        fail(f"the zero-shot head has non-finite values: the text tower of {args.model} is broken")
    student = build_student(args, clip.cpu(), head)
    del clip  # the text tower is done: the classifier now holds its knowledge
    if args.init:
        init = load_checkpoint_for(args.init, args, fingerprints, resume=False)
        tower = {k[len("visual."):]: v for k, v in init["student"].items() if k.startswith("visual.")}
        try:
            student.visual.load_state_dict(tower)  # the classifier stays this dataset's zero-shot head
        except RuntimeError as e:
            fail(f"--init checkpoint {args.init} does not fit {args.model} ({str(e).splitlines()[0][:200]})")
    student.to(device)
    spe = len(train_set) // args.global_batch
    if spe == 0:
        fail(f"{len(train_set)} training images are fewer than one global batch of {args.global_batch}")
    lr, min_lr = args.base_lr * args.global_batch / 256, args.base_min_lr * args.global_batch / 256
    views = SeededViews(train_set, args.seed)
    sampler = ResumableSampler(views, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    return step_state(
        args, student, make_optimizer(student, args.weight_decay, args.layer_decay, lr, device), device, spe, world,
        rank, stop=stop, ckpt_path=os.path.join(args.out_dir, CHECKPOINT),
        prev_path=os.path.join(args.out_dir, PREVIOUS), saved=(0, 0), micro_batch=micro_batch, accum=accum,
        total_steps=args.epochs * spe, lr=lr, min_lr=min_lr, evals=[], train_set=train_set, test_set=test_set,
        views=views, sampler=sampler, mean_per_class=args.data in data.MEAN_PER_CLASS, fingerprints=fingerprints,
        reported=set(), reported_test=set(), log_path=os.path.join(args.out_dir, "log.jsonl"))


def step_state(args, student, optimizer, device, steps_per_epoch, world=1, rank=0, **trainer):
    """What train_step reads, built in one place for the trainer, bench.py and the tests; the trainer passes the
    rest of its run (data, schedule, paths) as keywords. args needs conf_threshold, global_batch, the "loss"
    settings (config.SETTINGS), amp, no_reg / no_mim / no_align and compile."""
    amp_dtype, use_scaler = autocast_for(args.amp, device)
    state = SimpleNamespace(
        args=args, rank=rank, world=world, device=device,
        student=student, teacher=must.make_teacher(student),  # Δ = θ at the start (eq. 1)
        model=DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
        if world > 1 else student,
        optimizer=optimizer, scaler=torch.amp.GradScaler(device.type, enabled=use_scaler),
        fairness=must.FairnessMean(student.num_classes), amp_dtype=amp_dtype,
        use_reg=not args.no_reg, use_mim=not args.no_mim, use_align=not args.no_align,
        loss_settings={s.name: getattr(args, s.name) for s in config.SETTINGS if s.group == "loss"},  # must_loss's
        patch_size=student.visual.patch_size, steps_per_epoch=steps_per_epoch, step=0,
        nonfinite=torch.zeros((), dtype=torch.int64, device=device), checked=0, **trainer)
    if args.compile:  # in place: the state dict keeps its names, so checkpoints do not depend on the flag
        state.student.compile()
        state.teacher.compile()
    return state


def check_out_dir(run):
    """What would otherwise fail only at the first log line or checkpoint, checked on rank 0 before any work: the
    files the run writes are not folders, and the disk has room for two checkpoints (the newest, and the one before
    it until the newest is known good)."""
    problem = None
    if run.rank == 0:
        for path in (run.log_path, run.ckpt_path, run.prev_path):
            if os.path.isdir(path):
                problem = f"{path} is a folder, where the run writes a file: move it away or use another --out-dir"
        size = checkpoint_bytes(run)
        on_disk = sum(os.path.getsize(p) for p in (run.ckpt_path, run.prev_path) if os.path.isfile(p))
        free = shutil.disk_usage(run.args.out_dir).free
        if problem is None and free + on_disk < 2 * size:
            problem = (f"--out-dir {run.args.out_dir} has {free / 2 ** 30:.2f} GiB free, and this run needs about "
                       f"{(2 * size - on_disk) / 2 ** 30:.2f} GiB more for its checkpoints ({size / 2 ** 30:.2f} GiB "
                       f"each; the newest and the one before it are kept): free space or use another --out-dir")
    if any_process(problem is not None):
        fail(problem or "rank 0 cannot write its checkpoints (see its message)")


def checkpoint_bytes(run):
    """About the size of this run's checkpoint: student and teacher weights, and AdamW's two moments per trained
    weight."""
    weights = sum(t.numel() * t.element_size() for t in run.student.state_dict().values())
    moments = sum(2 * p.numel() * p.element_size() for p in run.student.parameters() if p.requires_grad)
    return 2 * weights + moments


def start(run):
    """Resume (--resume auto: OUT/checkpoint.pt if present) or start a fresh log; seed per-rank RNGs."""
    a = run.args
    path = None if a.resume == "none" else (run.ckpt_path if a.resume == "auto" else a.resume)
    if path == run.ckpt_path and not os.path.isfile(path):
        path = None
    elif path is not None and not os.path.isfile(path):
        fail(f"no checkpoint at {path}")
    check_out_dir(run)
    seed = (a.seed + run.rank) % 2 ** 32  # per-rank RNG for anything else; numpy takes seeds below 2^32
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if path is not None:
        resume(run, path)
    elif run.rank == 0:  # a fresh run starts a fresh log; a resumed one appends
        open(run.log_path, "w").close()
    if run.rank == 0:
        print(f"MUST on {a.data}: {len(run.train_set)} images, {run.student.num_classes} classes, {run.world} "
              f"process(es), global batch {a.global_batch} = {run.world} x {run.accum} x {run.micro_batch}, "
              f"{run.total_steps} steps, lr {run.lr:.3g}, s = {run.student.logit_scale.item():.4g}")
        log(run, {"type": "config", **vars(a), "world_size": run.world, "steps_per_epoch": run.steps_per_epoch})


# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = config.parse_args(argv)
    config.check_flags(args)  # every flag, before any process group, model or data exists
    rank, world, device = setup_distributed(args.device)
    lock = RunLock(args.out_dir) if rank == 0 else None
    try:
        with StopRequest() as stop:
            run = build_run(args, rank, world, device, stop)
            start(run)
            return train(run)
    finally:
        if lock is not None:
            lock.release()
        if is_distributed():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
