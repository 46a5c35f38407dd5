"""A training run's checkpoints: writing them, keeping the one before until the newest is known
good, checking the run's health, and reading one back for a resume or --init of the same run.

`run` is train.py's Run; the functions read only the fields they name.
"""
import contextlib
import os
import shutil
import time

import torch

from util import clip_load
from util.runtime import (all_reduce, any_process, barrier, fail, fingerprint, is_distributed,
                          read_checkpoint, rng_state, save_atomic, set_rng_state, size_text)

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"  # kept until the newest checkpoint is known good


# ----------------------------------------------------------------------------------------------
# writing

def save_checkpoint(run):
    """Collective: check the run's health, gather every rank's RNG state, and let rank 0 write
    OUT/checkpoint.pt atomically. Nothing is written when the file already holds this step and
    these evaluations."""
    if run.saved == (run.step, len(run.evals)):
        return
    check_health(run, weights=True)
    states = [rng_state()] * run.world  # with several processes, all_gather_object fills it
    if is_distributed():
        torch.distributed.all_gather_object(states, states[0])
    if run.rank == 0:
        if not os.path.isdir(run.args.out_dir):  # save_atomic would make it anew, unlocked
            fail(f"--out-dir {run.args.out_dir} was removed during the run: nothing more is "
                 f"written (step {run.step} is not saved)")
        if run.step > run.saved[0]:  # new weights: the ones on disk stay until these are good
            keep_previous(run.ckpt_path, run.prev_path)
        save_atomic({"student": run.student.state_dict(), "teacher": run.teacher.state_dict(),
                     "optimizer": run.optimizer.state_dict(),
                     "scaler": run.scaler.state_dict(), "fairness": run.fairness.state_dict(),
                     "step": run.step, "epoch": run.step // run.steps_per_epoch,
                     "rng": states, "evals": run.evals, "args": vars(run.args),
                     "classnames": list(run.train_set.classnames),
                     "fingerprints": run.fingerprints, "clip": run.clip_spec._asdict(),
                     "unreadable": sorted(run.reported)},
                    run.ckpt_path)
    run.saved = (run.step, len(run.evals))
    run.saved_at = time.monotonic()
    barrier()


def keep_previous(path, previous):
    """Make `previous` a second name for the file at path: a hard link, or a copy where the file
    system has none; nothing when there is no file yet."""
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


def checkpoint_bytes(run):
    """About the size of the run's checkpoint: student and teacher, and AdamW's two moments of
    each trained weight."""
    weights = sum(t.numel() * t.element_size() for t in run.student.state_dict().values())
    moments = sum(2 * p.numel() * p.element_size() for p in run.student.parameters()
                  if p.requires_grad)
    return 2 * weights + moments


def check_out_dir(run):
    """Rank 0: the files the run writes are not folders, and the disk has room for two
    checkpoints (the newest and the one before it)."""
    problem = None
    if run.rank == 0:
        # The files the run writes, and the temporary ones its checkpoints go through.
        for path in (run.log_path, run.ckpt_path, run.prev_path, run.ckpt_path + ".tmp",
                     run.prev_path + ".tmp"):
            if os.path.isdir(path):
                problem = (f"{path} is a folder, where the run writes a file: move it away or "
                           f"use another --out-dir")
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


# ----------------------------------------------------------------------------------------------
# health

def check_health(run, weights=False):
    """Read the non-finite losses the device counted since the last check, over all processes;
    with weights=True (before a checkpoint) the weights must be finite too, since an update can
    overflow while its loss is finite. A passing check after the newest checkpoint shows it good:
    the one kept before it is removed."""
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
        fail(f"non-finite weights after optimizer step {run.step} although every loss was "
             f"finite (an update overflowed: lower --base-lr); they are not saved; "
             f"{checkpoints_kept(run)}")
    run.checked = run.step
    if run.rank == 0 and run.saved[0] < run.checked:
        with contextlib.suppress(FileNotFoundError):
            os.remove(run.prev_path)


def checkpoints_kept(run):
    """What a failed health check says about the checkpoints on disk."""
    if not os.path.isfile(run.ckpt_path):
        return "no checkpoint was written yet"
    step = run.saved[0]
    if step < run.checked:  # a healthy step was taken from its weights
        return f"the last good checkpoint {run.ckpt_path} (step {step}) is intact"
    kept = (f"the last checkpoint {run.ckpt_path} (step {step}) holds the weights these steps "
            f"started from")
    if os.path.isfile(run.prev_path):
        return (f"{kept}, and {run.prev_path} the last known good ones; resuming repeats the "
                f"same steps, so to go on with other settings (a lower --base-lr), start a new "
                f"run from one of them with --init")
    return (f"{kept}, and no earlier checkpoint is kept; resuming repeats the same steps, so "
            f"start again with other settings (a lower --base-lr), or start a new run from it "
            f"with --init")


# ----------------------------------------------------------------------------------------------
# reading: the same run

def fingerprints_of(clip, train_set, root):
    """What a resume or --init compares: SHA-256 of the CLIP, its spec, the classes, the
    templates and the training images' paths under the data root (or, for a dataset without
    files, its size), in order: another listing would shift every index."""
    samples = getattr(train_set, "samples", None)
    prefix = os.path.join(root, "") if root else ""
    listing = [f"{len(train_set)} items"] if samples is None else [
        path[len(prefix):] if path.startswith(prefix) else path for path, _ in samples]
    return {"model": fingerprint(clip.state_dict()),
            "clip_spec": fingerprint(clip.spec.identity()),
            "classes": fingerprint(train_set.classnames),
            "templates": fingerprint(train_set.templates),
            "train_images": len(train_set), "train_listing": fingerprint(listing)}


_WHAT = {"model": "CLIP weights (--model)",
         "clip_spec": "CLIP activation, heads or image preprocessing (--model's config)",
         "classes": "class list (names or their order)", "templates": "prompt templates"}
# What checkpoints older than their record of it were made with: the only CLIP there was then.
_OLDER = {"clip_spec": fingerprint(clip_load.OPENAI_SPEC.identity())}


def check_same_run(what, theirs, their_fingerprints, args, fingerprints, defining=None):
    """A checkpoint's flags and fingerprints against this run's. --init (defining None) needs the
    same CLIP only; a resume also needs the same dataset, images, classes, templates and the
    `defining` settings ({name: value without the flag}), or it would make a hybrid run."""
    resume = defining is not None
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
        change = (f"{n} -> {m} images" if n != m
                  else f"the same number of images ({n}), other files")
        fail(f"{what} was trained on other training images ({change} under --data-root); "
             f"resume on the same images, or {anew}")
    # A setting the checkpoint does not record is newer than it: its run had the default.
    recorded = {k: theirs.get(k, default) for k, default in defining.items()}
    changed = [f"--{k.replace('_', '-')} {recorded[k]} -> {getattr(args, k)}"
               for k in defining if recorded[k] != getattr(args, k)]
    if changed:
        fail(f"{what} was made with other settings ({'; '.join(changed)}); resume with the "
             f"same flags, or {anew}")


def load_checkpoint_for(path, args, fingerprints, defining=None):
    """A train.py checkpoint that check_same_run accepts for this run's --init (defining None)
    or its resume."""
    resume = defining is not None
    what = "resume checkpoint" if resume else "--init checkpoint"
    try:
        ckpt = read_checkpoint(path, what)
    except ValueError as e:
        newest = resume and path == os.path.join(args.out_dir, CHECKPOINT)
        fail(f"{e}{previous_readable(args.out_dir) if newest else ''}")
    if not {"args", "fingerprints"} <= set(ckpt):
        fail(f"{path} is not a MUST checkpoint written by this train.py (no settings or "
             f"fingerprints)")
    check_same_run(f"{what} {path}", ckpt["args"], ckpt["fingerprints"], args, fingerprints,
                   defining)
    return ckpt


def previous_readable(out_dir):
    """For an unreadable checkpoint.pt: '; ...' saying how to resume from the one before it, if
    that one can be read; else ''."""
    previous = os.path.join(out_dir, PREVIOUS)
    try:
        step = read_checkpoint(previous)["step"]
    except (ValueError, KeyError):
        return ""
    return (f"; the checkpoint before it, {previous} (step {step}), can be read: move "
            f"{os.path.join(out_dir, CHECKPOINT)} away and rerun the same command to resume "
            f"from it")


def check_resume(args):
    """--resume names a checkpoint file (auto also takes a missing OUT/checkpoint.pt)."""
    newest = os.path.join(args.out_dir, CHECKPOINT)
    if args.resume not in ("auto", "none", newest) and not os.path.isfile(args.resume):
        fail(f"no checkpoint at {args.resume}")


def resume_path(run):
    """(the checkpoint to resume or None, whether it is the one before a missing
    OUT/checkpoint.pt, which it then replaces: --resume auto)"""
    path = {"none": None, "auto": run.ckpt_path}.get(run.args.resume, run.args.resume)
    missing = path == run.ckpt_path and not os.path.isfile(path)
    if missing and os.path.isfile(run.prev_path):
        if run.rank == 0:
            print(f"{run.ckpt_path} is missing: resuming from the checkpoint before it")
        return run.prev_path, True
    return (None if missing else path), False


def resume(run, path, defining, restore=False):
    """Load the checkpoint at path into the run: weights, optimizer, progress and RNG states;
    restore: it takes the place of a missing checkpoint.pt."""
    ckpt = load_checkpoint_for(path, run.args, run.fingerprints, defining)
    try:
        run.student.load_state_dict(ckpt["student"])
        run.teacher.load_state_dict(ckpt["teacher"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError) as e:
        fail(f"resume checkpoint {path} does not fit this run "
             f"({str(e).splitlines()[0][:200]})")
    run.scaler.load_state_dict(ckpt["scaler"])
    run.fairness.load_state_dict(ckpt["fairness"])
    run.step, run.evals = ckpt["step"], list(ckpt["evals"])
    run.checked = run.step
    run.saved = (run.step, len(run.evals))
    # The images warned about already; only folders.ImageList flags unreadable ones.
    run.reported = set(ckpt.get("unreadable", []))
    if run.reported:
        run.train_set.bad[sorted(run.reported)] = 1
    states = ckpt["rng"]
    set_rng_state(states[run.rank] if len(states) == run.world else states[0])
    if run.rank == 0:
        print(f"resumed from {path} at step {run.step} "
              f"(epoch {run.step // run.steps_per_epoch})")
        not_exact = "so the weights will not be bit-identical to an uninterrupted run's"
        if len(states) != run.world:
            print(f"note: the checkpoint was written by {len(states)} process(es) and this run "
                  f"has {run.world}: the images, global batch and steps are the same, but sums "
                  f"over processes run in another order, {not_exact}")
        if ckpt["args"].get("compile", False) != run.args.compile:
            on, off = ("on", "off") if run.args.compile else ("off", "on")
            print(f"note: --compile is {on} in this run and was {off} in the checkpoint's: "
                  f"compiled and eager kernels round differently, {not_exact}")
        if restore:
            keep_previous(run.prev_path, run.ckpt_path)
