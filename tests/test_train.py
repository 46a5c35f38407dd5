"""train.py end to end on CPU: a tiny CLIP (saved state dict) and generated images in a 'folder'
dataset. Layer-wise lr decay x cosine, a few-step run, 2-process torchrun == 1 process on the same
global batch, kill-and-resume == uninterrupted, the NaN guard, one-line errors."""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import config
import eval as ev
import must
import train
from conftest import save_clip, tiny_clip
from util import checkpoint, clip_load, runtime

# tiny models: one thread is several times faster than two on a shared 2-core machine,
# and as deterministic
torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["red square", "blue circle", "green cross"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """24 unlabeled 40x40 training images, 9 labeled test images, a random tiny CLIP
    (32 px, patch 8)."""
    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for split, n in (("train", 24), ("test", 9)):
        for i in range(n):
            folder = root / split if split == "train" else root / split / CLASSES[i % 3]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    torch.manual_seed(0)
    save_clip(tiny_clip(), root / "tiny.pt")
    torch.manual_seed(1)
    save_clip(tiny_clip(), root / "other.pt")
    return root


def argv(world, out, *extra):
    return ["--data", "folder", "--data-root", str(world / "train"),
            "--eval-root", str(world / "test"), "--classes", str(world / "classes.txt"),
            "--model", str(world / "tiny.pt"), "--global-batch", "8", "--epochs", "2",
            "--mask-unit", "16", "--base-lr", "1e-3", "--conf-threshold", "0.34",
            "--num-workers", "0", "--log-freq", "1", "--out-dir", str(out), *extra]


def ckpt(out):
    return torch.load(os.path.join(out, train.CHECKPOINT), map_location="cpu", weights_only=True)


def records(out, kind):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def error_of(argv_list):
    with pytest.raises(SystemExit) as e:
        train.main(argv_list)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------- optimizer

def test_layer_decay_and_cosine_lr_of_every_group():
    torch.manual_seed(0)
    clip = tiny_clip(vision_layers=3)
    model = must.MUSTModel(clip.visual, torch.randn(32, 4), 100.0)
    groups = train.param_groups(model, weight_decay=0.05, layer_decay=0.65)
    L = 3
    expected_layer = {"visual.conv1.weight": 0, "visual.class_embedding": 0,
                      "visual.positional_embedding": 0,
                      "visual.ln_pre.weight": 0, "visual.mask_token": 0,
                      "visual.transformer.resblocks.0.attn.in_proj_weight": 1,
                      "visual.transformer.resblocks.2.mlp.c_fc.bias": 3, "visual.ln_post.bias": 4,
                      "visual.proj": 4,
                      "classifier.weight": 4, "visual.ln_patch.weight": 4,
                      "visual.decoder.0.weight": 4}
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            seen.add(name)
            i = train.layer_id(name, L)
            assert g["lr_scale"] == pytest.approx(0.65 ** (L + 1 - i))
            decayed = p.ndim > 1 or name == "visual.mask_token"
            assert g["weight_decay"] == (0.05 if decayed else 0.0), name
            if name in expected_layer:
                assert i == expected_layer[name], name
    assert seen == {n for n, _ in model.named_parameters()}
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    lr, min_lr, total = 4e-4, 1e-6, 100
    for step, expect in ((0, lr), (50, (lr + min_lr) / 2), (100, min_lr),
                         (25, min_lr + (lr - min_lr) * 0.853553)):
        train.set_lr(optimizer, train.cosine_lr(step, total, lr, min_lr))
        for g in optimizer.param_groups:
            assert g["lr"] == pytest.approx(expect * g["lr_scale"], rel=1e-5)
    frozen = must.MUSTModel(tiny_clip().visual, torch.randn(32, 4), 100.0, freeze_classifier=True)
    assert all(p is not frozen.classifier.weight
               for g in train.param_groups(frozen, 0.05, 0.65) for p in g["params"])


def test_util_imports_nothing_from_the_top_level():
    """util/ (the checkpoints among its plumbing) takes what it needs from its callers."""
    import ast
    top = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}
    assert {"train", "config", "must"} <= top
    for name in os.listdir(os.path.join(ROOT, "util")):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(ROOT, "util", name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module and not node.level}
        assert not imported & top, (name, imported & top)


def test_help_names_the_paper_symbols(capsys):
    with pytest.raises(SystemExit) as e:
        config.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for symbol in ("τ", "λ_reg", "λ_align", "µ0", "µn", "base_lr"):
        assert symbol in text


# --------------------------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def full_run(world, tmp_path_factory):
    """An uninterrupted 2-epoch run (3 steps per epoch) with 2 accumulation steps per optimizer
    step."""
    out = tmp_path_factory.mktemp("full")
    evals = train.main(argv(world, out, "--batch-size-per-gpu", "4"))
    return out, evals


def test_few_steps_end_to_end(full_run):
    out, evals = full_run
    steps = records(out, "train")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        for key in ("loss", "loss_cls", "loss_reg", "loss_mim", "loss_align", "lr", "ema_mu",
                    "conf_ratio", "images_per_s"):
            assert np.isfinite(r[key]), key
        assert r["pseudo_label_acc"] is None  # folder training images are unlabeled
    assert any(r["conf_ratio"] > 0 for r in steps)  # L_cls was active
    assert [e["epoch"] for e in records(out, "eval")] == [0, 1, 2] == [e["epoch"] for e in evals]
    assert [e["images"] for e in records(out, "eval")] == [9, 9, 9]  # what each evaluation scored
    # a finished run keeps only its last checkpoint
    assert not os.path.exists(os.path.join(out, train.PREVIOUS))
    c = ckpt(out)
    assert c["step"] == 6 and c["epoch"] == 2 and c["classnames"] == CLASSES
    assert c["args"]["data"] == "folder" and c["args"]["conf_threshold"] == 0.34
    assert c["args"]["strong_view"] == "paper"  # Table 10's datasets use the paper's view
    assert any(not torch.equal(c["student"][k], c["teacher"][k]) for k in c["student"])
    checkpoint = runtime.read_checkpoint(os.path.join(out, train.CHECKPOINT))
    model = must.load_checkpoint(checkpoint, "teacher")
    assert model.num_classes == 3


def test_kill_and_resume_equals_uninterrupted(world, full_run, tmp_path):
    out = tmp_path / "resumed"
    # "killed" inside epoch 1
    train.main(argv(world, out, "--batch-size-per-gpu", "4", "--max-steps", "2"))
    assert ckpt(out)["step"] == 2
    # A run that --max-steps ends is evaluated where it stops.
    assert [(e["epoch"], e["step"]) for e in ckpt(out)["evals"]] == [(0, 0), (0.67, 2)]
    # resumes, stops in epoch 2
    train.main(argv(world, out, "--batch-size-per-gpu", "4", "--max-steps", "4"))
    assert ckpt(out)["step"] == 4
    train.main(argv(world, out, "--batch-size-per-gpu", "4"))  # resumes to the end
    a, b = ckpt(full_run[0]), ckpt(out)
    assert b["step"] == 6
    for key in ("student", "teacher"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])
    assert [r["loss"] for r in records(full_run[0], "train")] == [
        r["loss"] for r in records(out, "train")]


def test_loader_workers_give_the_same_run(world, full_run, tmp_path):
    """Two persistent loader workers feed the run that the process fed itself, bit for bit: over
    two epochs (each epoch's views reach the workers with the indices) and with accumulation."""
    out = tmp_path / "workers"
    train.main(argv(world, out, "--batch-size-per-gpu", "4", "--num-workers", "2"))
    a, b = ckpt(full_run[0]), ckpt(out)
    assert all(torch.equal(a[key][name], b[key][name]) for key in ("student", "teacher")
               for name in a[key])
    assert [r["loss"] for r in records(full_run[0], "train")] == [
        r["loss"] for r in records(out, "train")]


def test_persistent_workers_draw_each_epochs_views():
    """The same worker processes serve every epoch, and draw each epoch's views: the sampler
    hands them the epoch with each index (runtime.SeededViews)."""
    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            return torch.rand(2)

    sampler = runtime.ResumableSampler(Draws(), num_replicas=1, rank=0, seed=0, drop_last=True)
    settings = argparse.Namespace(num_workers=2, seed=0)
    loader = train.train_loader(Draws(), sampler, 4, settings, torch.device("cpu"))
    inline = train.train_loader(Draws(), sampler, 4, argparse.Namespace(num_workers=0, seed=0),
                                torch.device("cpu"))
    views, workers = [], []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        views.append(torch.cat(list(loader)))
        assert torch.equal(views[-1], torch.cat(list(inline)))
        workers.append([w.pid for w in loader._iterator._workers])
    assert workers[0] == workers[1] == workers[2]
    assert torch.equal(views[0], views[2])
    assert not (views[0][:, None] == views[1][None]).all(-1).any()  # no view drawn twice
    train.end_workers(loader)
    assert not any(w.is_alive() for w in loader._iterator._workers)


def test_two_process_torchrun_equals_one_process(world, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(argv(world, one, "--max-steps", "1"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2",
                             os.path.join(ROOT, "train.py"), *argv(world, two, "--max-steps", "1")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = ckpt(one), ckpt(two)
    assert b["args"]["global_batch"] == 8 and len(b["rng"]) == 2
    for key in ("student", "teacher"):
        for name in a[key]:
            assert torch.allclose(a[key][name], b[key][name], atol=1e-5, rtol=0), (key, name)
    # Non-vacuous: every layer moved by ~1e-5 or more in this step, while the two runs agree to
    # ~1e-7. The key part of attn.in_proj_bias is left out of that check: its gradient is exactly 0
    # in theory (softmax ignores a shift shared by all keys), so Adam's first step turns float noise
    # into updates of ~1e-6.
    clip = torch.load(world / "tiny.pt", weights_only=True)
    moved = min((a["student"]["visual." + n] - clip["visual." + n]).abs().max().item()
                for n in ("conv1.weight", "transformer.resblocks.0.attn.in_proj_weight", "proj"))
    worst = max((a["student"][n] - b["student"][n]).abs().max().item() for n in a["student"]
                if not n.endswith("attn.in_proj_bias"))
    assert moved > 5e-6 and worst < 1e-6, (moved, worst)
    la, lb = records(one, "train")[0], records(two, "train")[0]
    assert lb["loss"] == pytest.approx(la["loss"], rel=1e-5)
    assert lb["conf_ratio"] == la["conf_ratio"]
    assert records(one, "eval")[0]["student_acc"] == pytest.approx(
        records(two, "eval")[0]["student_acc"])


def test_resume_on_another_process_count_says_it_is_not_bit_exact(world, tmp_path, capsys):
    """A checkpoint of 1 process resumed by 2 (torchrun): accepted, with one line saying why the
    weights will not be bit-identical to an uninterrupted run's; a resume on the same count says
    nothing of the kind."""
    out = tmp_path / "out"
    train.main(argv(world, out, "--max-steps", "1"))
    train.main(argv(world, out, "--max-steps", "2"))
    assert "note: the checkpoint was written by" not in capsys.readouterr().out
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2",
                             os.path.join(ROOT, "train.py"), *argv(world, out, "--max-steps", "3")],
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("note: the checkpoint was written by 1 process(es) and this run has 2: the images, "
            "global batch and steps are the same, but sums over processes run in another order, "
            "so the weights will not be bit-identical to an uninterrupted run's") in result.stdout
    assert ckpt(out)["step"] == 3 and len(ckpt(out)["rng"]) == 2


def test_table_marks_evaluations_of_different_image_counts(capsys):
    """When test images vanish during a run, the rows say how many images each scored, the best
    student is chosen among the evaluations that scored as many as the last, and a warning says the
    rows are not comparable."""
    evals = [{"epoch": 0, "student_acc": 50.0, "teacher_acc": 50.0, "images": 4},
             {"epoch": 1, "student_acc": 100.0, "teacher_acc": 100.0, "images": 2},
             {"epoch": 2, "student_acc": 75.0, "teacher_acc": 75.0, "images": 4},
             {"epoch": 3, "student_acc": 70.0, "teacher_acc": 72.0, "images": 4}]
    ev.print_table(evals, "folder", False, "CLIP zero-shot")
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "  CLIP zero-shot        50.00   epoch 0   on 4 images"
    assert lines[5] == ("  best student          75.00   epoch 2 (chosen on test, as the release)"
                        "   on 4 images")
    assert lines[6].startswith("  warning: the evaluations scored different numbers of test images")
    ev.print_table([dict(e, images=4) for e in evals], "folder", False, "CLIP zero-shot")
    printed = capsys.readouterr().out
    assert "images" not in printed and "best student         100.00   epoch 1" in printed


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(world, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    train.main(argv(world, out, "--max-steps", "1"))
    path = os.path.join(out, train.CHECKPOINT)
    before = open(path, "rb").read()
    monkeypatch.setattr(must, "loss_mim", lambda *a, **k: torch.tensor(float("nan")))
    message = error_of(argv(world, out))
    assert (f"non-finite loss in optimizer step(s) 2-2; their updates are not saved; "
            f"the last checkpoint {path} (step 1) holds the weights these steps started from, "
            f"and no earlier checkpoint is kept") in message
    assert open(path, "rb").read() == before


# ------------------------------------------------------------------------------------------- errors

def test_one_line_errors(world, tmp_path, monkeypatch):
    out = tmp_path / "err"
    assert "unknown dataset 'imagenot'" in error_of(argv(world, out) + ["--data", "imagenot"])
    assert "missing or empty" in error_of(argv(world, out)
                                          + ["--data-root", str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    assert "missing or empty" in error_of(argv(world, out)
                                          + ["--data-root", str(tmp_path / "empty")])
    assert "must be a multiple of the patch size 8" in error_of(argv(world, out)
                                                                + ["--mask-unit", "12"])
    with monkeypatch.context() as m:
        m.setenv("WORLD_SIZE", "3")
        assert "not divisible by the 3 processes" in error_of(argv(world, out))
    # a checkpoint of another model, of another dataset
    train.main(argv(world, out, "--max-steps", "1"))
    assert "other CLIP weights (--model)" in error_of(argv(world, out)
                                                      + ["--model", str(world / "other.pt")])
    c = ckpt(out)
    c["args"]["data"] = "imagenet"
    torch.save(c, tmp_path / "imagenet.pt")
    imagenet_resume = ["--resume", str(tmp_path / "imagenet.pt")]
    assert "trained on dataset 'imagenet'" in error_of(argv(world, out) + imagenet_resume)
    assert "not both" in error_of(argv(world, out)
                                  + ["--accum-steps", "2", "--batch-size-per-gpu", "4"])
    assert "not divisible by --batch-size-per-gpu 3" in error_of(argv(world, out)
                                                                 + ["--batch-size-per-gpu", "3"])
    assert "no checkpoint at" in error_of(argv(world, out)
                                          + ["--resume", str(tmp_path / "absent.pt")])


def test_a_setting_the_checkpoint_does_not_record_counts_as_its_default(world, tmp_path):
    """A checkpoint of a code version without a setting was made with that setting's default
    (a static one, or Table 10's): resuming with another value is refused, with it goes on."""
    out = tmp_path / "run"
    train.main(argv(world, out, "--max-steps", "1"))
    c = ckpt(out)
    for key in ("align_k", "no_mim", "lambda_reg"):
        del c["args"][key]
    older = str(tmp_path / "older.pt")
    torch.save(c, older)
    for flags, change in ((["--align-k", "2"], "--align-k None -> 2"),
                          (["--no-mim"], "--no-mim False -> True"),
                          (["--lambda-reg", "0.5"], "--lambda-reg 1.0 -> 0.5")):
        message = error_of(argv(world, out, "--resume", older, *flags))
        assert f"other settings ({change})" in message
    train.main(argv(world, out, "--resume", older, "--max-steps", "2", "--lambda-reg", "1.0"))
    assert ckpt(out)["step"] == 2


def test_warmup_with_frozen_classifier_then_init(world, tmp_path):
    """§4.4: warm up with a frozen classifier, then start another run's tower from that
    checkpoint."""
    warm = tmp_path / "warm"
    train.main(argv(world, warm, "--freeze-classifier", "--max-steps", "2"))
    c = ckpt(warm)
    # never trained
    assert torch.equal(c["student"]["classifier.weight"], c["teacher"]["classifier.weight"])
    # the tower was
    assert not torch.equal(c["student"]["visual.proj"], c["teacher"]["visual.proj"])
    clip_proj = torch.load(world / "tiny.pt", weights_only=True)["visual.proj"]
    after = tmp_path / "after"
    train.main(argv(world, after, "--init", str(warm / train.CHECKPOINT), "--max-steps", "1"))
    # one step later the teacher (µ0 = 0.999) is still the warm-up tower, not CLIP's
    teacher_proj = ckpt(after)["teacher"]["visual.proj"]
    assert (teacher_proj - c["student"]["visual.proj"]).abs().max() < 1e-6 < (
        teacher_proj - clip_proj).abs().max()
    assert "--init checkpoint" in error_of(argv(world, tmp_path / "x",
                                                "--init", str(warm / train.CHECKPOINT),
                                                "--model", str(world / "other.pt")))


def test_strong_view_flag(world, tmp_path, monkeypatch, capsys):
    import data
    seen = []
    real = data.TrainTransform
    monkeypatch.setattr(data, "TrainTransform",
                        lambda *a, **k: seen.append(a[2:] + tuple(k.values())) or real(*a, **k))
    train.main(argv(world, tmp_path / "light", "--strong-view", "light", "--max-steps", "1"))
    assert seen == [("light", clip_load.OPENAI_SPEC)]  # the view, and the CLIP's normalization
    # Each log step prints its line; a run that --max-steps ends has its trained rows.
    out = capsys.readouterr().out
    assert "step 1: loss " in out and "cls " in out and "confident " in out and "lr " in out
    assert "MUST student" in out and "epoch 0.33" in out
    with pytest.raises(SystemExit):
        train.main(argv(world, tmp_path / "heavy", "--strong-view", "heavy"))
    assert "--strong-view: invalid choice: 'heavy'" in capsys.readouterr().err


def test_self_training_only_ablation(world, tmp_path):
    out = tmp_path / "st"
    train.main(argv(world, out, "--no-mim", "--no-align", "--max-steps", "1"))
    r = records(out, "train")[0]
    assert "loss_mim" not in r and "loss_align" not in r and np.isfinite(r["loss_reg"])
    c = ckpt(out)
    # frozen, unused
    assert torch.equal(c["student"]["visual.mask_token"], c["teacher"]["visual.mask_token"])


def test_bf16_on_cpu_and_pseudo_label_accuracy_with_labeled_training_images(world, tmp_path):
    """A named dataset's training folders carry labels: logged (only) as the confident
    pseudo-labels' accuracy."""
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for i in range(12):
            folder = tmp_path / "dtd" / split / ["banded", "blotchy", "braided"][i % 3]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg")
    out = tmp_path / "out"
    train.main(["--data", "dtd", "--data-root", str(tmp_path / "dtd"),
                "--model", str(world / "tiny.pt"),
                "--global-batch", "4", "--epochs", "1", "--max-steps", "2", "--mask-unit", "8",
                "--conf-threshold", "0", "--amp", "bf16", "--num-workers", "0", "--log-freq", "1",
                "--out-dir", str(out)])
    for r in records(out, "train"):
        assert (np.isfinite(r["loss"]) and r["conf_ratio"] == 1.0
                and 0.0 <= r["pseudo_label_acc"] <= 1.0)


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    runtime.save_atomic({"step": 1}, path)

    def killed(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        runtime.save_atomic({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert not os.path.exists(path + ".tmp")  # no partial temp file is left behind


# ------------------------------------------------------------------------------------------ signals

def signal_wrapper(tmp_path, sends):
    """A train.py entry point that sends itself signals after given EMA updates (= optimizer
    steps), to stop a run at a known step:
    sends = [(after update n, signal name, 'self' | 'group', rank or None)]."""
    path = tmp_path / "signalled_train.py"
    path.write_text(f"""import os, signal, sys
sys.path.insert(0, {ROOT!r})
import must, train
real, count = must.ema_update, [0]
def ema_update(*a, **k):
    real(*a, **k)
    count[0] += 1
    for n, name, where, rank in {sends!r}:
        if n == count[0] and rank in (None, int(os.environ.get("RANK", 0))):
            (os.killpg if where == "group" else os.kill)(0 if where == "group" else os.getpid(), \
getattr(signal, name))
must.ema_update = ema_update
train.main(sys.argv[1:])
""")
    return str(path)


def test_sigterm_checkpoints_and_resumes_bit_exact(world, full_run, tmp_path, monkeypatch):
    """SIGTERM mid-epoch (1 process, accumulation 2): the step in flight finishes, a checkpoint is
    written, the exit code is 128 + 15 with a one-line message; rerun, the final weights equal an
    uninterrupted run's bit for bit."""
    out = tmp_path / "term"
    real, count = must.ema_update, [0]

    def ema_update(*a, **k):
        real(*a, **k)
        count[0] += 1
        if count[0] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(must, "ema_update", ema_update)
    with pytest.raises(SystemExit) as e:
        train.main(argv(world, out, "--batch-size-per-gpu", "4"))
    assert e.value.code == 128 + signal.SIGTERM
    # the signal came during step 1's EMA update: step 1 was the one in flight
    assert ckpt(out)["step"] == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(must, "ema_update", real)
    train.main(argv(world, out, "--batch-size-per-gpu", "4"))
    a, b = ckpt(full_run[0]), ckpt(out)
    for key in ("student", "teacher"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert [r["loss"] for r in records(full_run[0], "train")] == [
        r["loss"] for r in records(out, "train")]
    assert [r["epoch"] for r in records(out, "eval")] == [0, 1, 2]


def test_sigint_to_the_process_group_with_workers_then_twice_aborts(world, tmp_path):
    """Ctrl-C reaches every process of the group, DataLoader workers too: they ignore it, the run
    checkpoints and exits 130 with a one-line message. A second Ctrl-C aborts at once, leaving the
    last checkpoint intact."""
    out = tmp_path / "int"
    # 12 loads/epoch
    cmd = [sys.executable, signal_wrapper(tmp_path, [(1, "SIGINT", "group", None)]),
           *argv(world, out, "--num-workers", "2", "--epochs", "3", "--batch-size-per-gpu", "2")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 128 + signal.SIGINT, result.stderr[-2000:]
    assert ("stopped by SIGINT after step 1" in result.stderr
            and "run the same command again to resume" in result.stderr
            and "Traceback" not in result.stderr)
    # the workers ignore it
    assert result.stderr.count("SIGINT: stopping after the current step") == 1
    assert ckpt(out)["step"] == 1
    before = open(os.path.join(out, train.CHECKPOINT), "rb").read()
    cmd[1] = signal_wrapper(tmp_path, [(1, "SIGINT", "self", None), (1, "SIGINT", "self", None)])
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert (result.returncode == 1
            and "error: interrupted twice: aborted without a checkpoint" in result.stderr)
    assert "Traceback" not in result.stderr
    assert open(os.path.join(out, train.CHECKPOINT), "rb").read() == before


def test_sigterm_on_one_of_two_processes_resumes_bit_exact(world, tmp_path):
    """torchrun, 2 gloo processes: SIGTERM reaches rank 1 only; both ranks agree to stop after the
    step in flight (agreed every step, not only at log steps) and write one checkpoint together;
    rerun, the final weights equal an uninterrupted 2-process run's bit for bit."""
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def torchrun(script, out):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", "2",
                               script, *argv(world, out, "--max-steps", "4", "--log-freq", "10")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    plain = os.path.join(ROOT, "train.py")
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert torchrun(plain, full).returncode == 0
    stopped = torchrun(signal_wrapper(tmp_path, [(1, "SIGTERM", "self", 1)]), cut)
    assert stopped.returncode != 0 and "stopped by SIGTERM after step 1" in stopped.stderr
    assert ckpt(cut)["step"] == 1 and len(ckpt(cut)["rng"]) == 2
    resumed = torchrun(plain, cut)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = ckpt(full), ckpt(cut)
    assert a["step"] == b["step"] == 4
    for key in ("student", "teacher"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


@pytest.mark.parametrize("minutes,written", [(30, [2, 3, 5, 6, 6]), (0, [3, 6, 6])])
def test_save_minutes_checkpoints_inside_an_epoch(world, tmp_path, monkeypatch, minutes, written):
    """A clock that advances 20 minutes a step, epochs of 3 steps: with --save-minutes 30 a
    checkpoint is written inside each epoch as soon as 30 minutes have passed since the last one
    (steps 2 and 5), besides each epoch's end and the final one that adds the last evaluation;
    with 0, only those."""
    clock, steps, real_step, real_save = [0.0], [], must.must_step, checkpoint.save_atomic

    def must_step(*args, **kwargs):
        clock[0] += 20 * 60
        return real_step(*args, **kwargs)

    def save_atomic(obj, path, write=None):
        steps.append(obj["step"])
        return real_save(obj, path, write)
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(must, "must_step", must_step)
    monkeypatch.setattr(checkpoint, "save_atomic", save_atomic)
    train.main(argv(world, tmp_path / "out", "--save-minutes", str(minutes)))
    assert steps == written


def _agree(rank, rendezvous, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                                         world_size=2)
    answers = [runtime.any_process(rank == 0, False, True), runtime.any_process(rank == 1)]
    torch.save(answers, f"{out}.{rank}")
    runtime.end_distributed(failed=False)


def test_processes_agree_on_several_flags_at_once(tmp_path):
    """runtime.any_process over 2 gloo processes: a flag that holds on one process (rank 0's
    decision to checkpoint, rank 1's stop request) holds on both."""
    out = str(tmp_path / "answers")
    # Forked: the processes start at once, with the modules already imported.
    torch.multiprocessing.start_processes(_agree, args=(str(tmp_path / "rendezvous"), out),
                                          nprocs=2, start_method="fork")
    for rank in (0, 1):
        assert torch.load(f"{out}.{rank}", weights_only=True) == [(True, False, True), True]


def eval_signal_wrapper(tmp_path, evaluation, seconds_per_batch, rank=None):
    """A train.py entry point that sends itself SIGTERM in the first batch of its n-th evaluation
    (1 = zero-shot, 2 = after epoch 1), whose batches from then on take seconds_per_batch each, as a
    large test set's would; it touches tmp_path/signalled when it sends the signal."""
    path = tmp_path / "eval_signalled_train.py"
    path.write_text(f"""import os, signal, sys, time
sys.path.insert(0, {ROOT!r})
import eval, train
real_evaluate, real_score, calls, batches = train.evaluate, eval.score_batch, [0], [0]
def evaluate(*a, **k):
    calls[0] += 1
    return real_evaluate(*a, **k)
def score_batch(*a, **k):
    if calls[0] == {evaluation} and batches[0] == 0 and {rank!r} in \
(None, int(os.environ.get("RANK", 0))):
        batches[0] += 1
        open({str(tmp_path / "signalled")!r}, "w").close()
        os.kill(os.getpid(), signal.SIGTERM)
    if calls[0] >= {evaluation}:
        time.sleep({seconds_per_batch})
    return real_score(*a, **k)
train.evaluate, eval.score_batch = evaluate, score_batch
train.main(sys.argv[1:])
""")
    return str(path)


def test_preemption_during_the_epoch_end_evaluation_loses_no_step(world, full_run, tmp_path):
    """A scheduler's preemption: SIGTERM as the evaluation after epoch 1 starts (a 30 s batch: a
    long evaluation), SIGKILL 3 s later. The epoch's 3 steps were checkpointed before the
    evaluation, so they survive the kill; rerun, the evaluation runs again and the final weights
    equal an uninterrupted run's bit for bit."""
    out = tmp_path / "preempted"
    cmd = [sys.executable, eval_signal_wrapper(tmp_path, 2, 30),
           *argv(world, out, "--batch-size-per-gpu", "4")]
    run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 240
        while (not os.path.exists(tmp_path / "signalled") and run.poll() is None
               and time.time() < deadline):
            time.sleep(0.1)
        time.sleep(3)  # the grace period: the batch in flight has not ended
        run.kill()
        _, stderr = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == -signal.SIGKILL, stderr[-2000:]
    assert ckpt(out)["step"] == 3 and [e["epoch"] for e in ckpt(out)["evals"]] == [0]
    train.main(argv(world, out, "--batch-size-per-gpu", "4"))
    a, b = ckpt(full_run[0]), ckpt(out)
    for key in ("student", "teacher"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert [e["epoch"] for e in b["evals"]] == [0, 1, 2]
    assert [e["student_acc"] for e in b["evals"]] == [e["student_acc"] for e in a["evals"]]


@pytest.mark.parametrize("evaluation,step,done",
                         [(2, 3, "checkpoint {ck} written; run the same command again to resume"),
                          (1, 0, "nothing to save; run the same command again to start")],
                         ids=["after-epoch-1", "zero-shot"])
def test_sigterm_ends_an_evaluation_at_once(world, tmp_path, evaluation, step, done):
    """A stop request is asked before every evaluation batch (here 2 s each, 3 batches): the
    evaluation is dropped after the batch in flight and no step is started after it; the zero-shot
    evaluation leaves nothing to save."""
    out = tmp_path / "stopped"
    result = subprocess.run([sys.executable, eval_signal_wrapper(tmp_path, evaluation, 2),
                             *argv(world, out, "--batch-size-per-gpu", "4")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    message = f"stopped by SIGTERM after step {step}: " + done.format(ck=out / train.CHECKPOINT)
    assert message in result.stderr and "Traceback" not in result.stderr
    assert [r["step"] for r in records(out, "train")] == list(range(1, step + 1))
    assert [r["epoch"] for r in records(out, "eval")] == ([0] if step else [])
    assert os.path.exists(out / train.CHECKPOINT) == bool(step)


def test_sigterm_during_evaluation_on_one_of_two_processes(world, tmp_path):
    """torchrun, 2 gloo processes holding 5 and 4 of the 9 test images (2 and 1 batches of 4):
    rank 1 is asked to stop as the evaluation after epoch 1 starts; both ranks agree before every
    batch, so neither waits for the other, and both exit with the checkpoint of step 3."""
    out = tmp_path / "two"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2",
                             eval_signal_wrapper(tmp_path, 2, 1, rank=1), *argv(world, out)],
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=300)
    assert (result.returncode != 0
            and "stopped by SIGTERM after step 3: checkpoint" in result.stderr), (
        result.stderr[-3000:])
    assert ckpt(out)["step"] == 3 and len(ckpt(out)["rng"]) == 2
    assert [r["epoch"] for r in records(out, "eval")] == [0]


def test_sighup_stops_like_sigterm(world, tmp_path):
    """A closed ssh session sends SIGHUP: the step in flight finishes, a checkpoint is written,
    exit 128 + 1."""
    out = tmp_path / "hup"
    result = subprocess.run([sys.executable,
                             signal_wrapper(tmp_path, [(1, "SIGHUP", "self", None)]),
                             *argv(world, out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 128 + signal.SIGHUP, result.stderr[-2000:]
    assert "stopped by SIGHUP after step 1: checkpoint" in result.stderr
    assert ckpt(out)["step"] == 1


def test_output_to_a_hung_up_terminal_cannot_stop_the_run(tmp_path):
    """After SIGHUP the terminal is gone and writing to it raises EIO; runtime.StopRequest sends
    stdout and stderr to /dev/null instead. A child process prints to a pseudo-terminal whose other
    end was closed: with the handler it finishes, without the redirect it dies of the first
    print."""
    script = tmp_path / "hangup.py"
    script.write_text(f"""import os, pty, signal, sys
sys.path.insert(0, {ROOT!r})
from util import runtime
if sys.argv[2] == "without-redirect":
    runtime._leave_closed_terminal = lambda: None
master, terminal = pty.openpty()
os.dup2(terminal, 1)
os.dup2(terminal, 2)
with runtime.StopRequest() as stop:
    os.close(master)
    os.kill(os.getpid(), signal.SIGHUP)
    for i in range(1000):
        print("still training", i)
    sys.stdout.flush()
    open(sys.argv[1], "w").write(signal.Signals(stop.signum).name)
""")
    done = tmp_path / "done"
    with_redirect = [sys.executable, str(script), str(done), "with-redirect"]
    assert subprocess.run(with_redirect, timeout=60).returncode == 0
    assert done.read_text() == "SIGHUP"
    done.unlink()
    without_redirect = [sys.executable, str(script), str(done), "without-redirect"]
    assert subprocess.run(without_redirect, timeout=60).returncode != 0
    assert not done.exists()


# ---------------------------------------------------------------------------------------- --compile

def test_compile_gives_the_eager_loss_and_gradients():
    """torch.compile of the model (what --compile does, in place) on CPU: the masked forward's
    logits and reconstruction, L_cls + L_mim and every gradient agree with eager to 1e-4 (the
    compiled kernels fuse and reorder float operations, so they agree to rounding, not bit for
    bit)."""
    torch.manual_seed(0)
    model = must.MUSTModel(tiny_clip().visual, torch.randn(32, 3), 100.0)
    x, mask = torch.randn(4, 3, 32, 32), torch.zeros(4, 16, dtype=torch.bool)
    mask[:, :4] = True
    labels, confident = must.pseudo_labels(torch.randn(4, 3) * 5, 0.0)

    def loss_and_grads():
        model.zero_grad()
        logits, _, _, recon = model(x, mask)
        loss = must.loss_cls(logits, labels, confident, 4) + must.loss_mim(recon, x, mask, 8)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return logits.detach(), loss.item(), grads

    eager = loss_and_grads()
    keys = list(model.state_dict())
    model.compile()
    compiled = loss_and_grads()
    assert list(model.state_dict()) == keys  # checkpoints keep their names
    assert (torch.allclose(compiled[0], eager[0], atol=1e-4)
            and compiled[1] == pytest.approx(eager[1], rel=1e-5))
    for name, grad in eager[2].items():
        assert torch.allclose(compiled[2][name], grad, atol=1e-4, rtol=1e-3), name


def test_compile_evaluates_trains_and_resumes_as_eager(world, tmp_path):
    """train.py --compile for real (inductor on CPU): the zero-shot evaluation, 2 steps with 2
    accumulation micro-batches, a resume to the end of the 1-epoch run and its evaluation, against
    the same runs in eager mode, and no more graphs than the training step needs."""
    # Graphs that other tests compiled are dropped, so that none stands in for one of this run's.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    graphs = torch._dynamo.utils.counters["stats"]
    runs = {}
    for flags in ((), ("--compile",)):
        out = tmp_path / ("compiled" if flags else "eager")
        common = argv(world, out, "--epochs", "1", "--accum-steps", "2", *flags)
        train.main(common + ["--max-steps", "2"])
        if flags:
            # The teacher's forward, the student's forward and backward, its no-grad p̄ pass:
            # evaluation runs eagerly, so it adds none.
            assert graphs["unique_graphs"] == 3
        evals = train.main(common)  # resumes at step 2
        runs[flags] = records(out, "train"), evals, ckpt(out)
    (eager, eager_evals, a), (compiled, compiled_evals, b) = runs.values()
    # The resumed run's new towers pass the guards of the graphs compiled for the first ones.
    assert graphs["unique_graphs"] == 3
    # Compiled kernels fuse and reorder float operations, so the runs agree to rounding.
    # Loss terms (0.7 to 3.4) to 1e-5 of their value: seen 1e-7; a 1% error in the logits of the
    # p̄ pass, or 0.1% in the student's reconstruction, moves them by 5e-5 or more.
    assert [r["step"] for r in compiled] == [1, 2, 3]
    for r, s in zip(eager, compiled):
        for term in ("loss", "loss_cls", "loss_reg", "loss_mim", "loss_align", "conf_ratio"):
            assert s[term] == pytest.approx(r[term], rel=1e-5), (r["step"], term)
    # Weights to 10% of the lr, the scale of one Adam update, which turns the rounding noise of
    # a near-zero gradient into up to that much: seen 1.1% of the lr. The attention's biases are
    # left out: their key part has a gradient of exactly 0 in theory, so Adam turns noise into
    # updates of 5% of the lr. The mutations above move student weights by twice the lr or more.
    lr = eager[0]["lr"]
    assert list(b["student"]) == list(a["student"])  # checkpoints keep their names
    for key in ("student", "teacher"):
        for name in a[key]:
            if not name.endswith("attn.in_proj_bias"):
                torch.testing.assert_close(b[key][name], a[key][name], rtol=0, atol=0.1 * lr,
                                           msg=f"{key} {name}")
    # The evaluations before training, where --max-steps stopped it and after it run eagerly on
    # these weights, so they agree exactly: an image's prediction flips only where its top logits
    # tie to about 1e-6 (the smallest margin here is 0.2).
    assert [e["epoch"] for e in compiled_evals] == [0, 0.67, 1]
    assert compiled_evals == eager_evals


def test_non_finite_loss_between_log_steps_is_caught_before_the_checkpoint(
        world, tmp_path, monkeypatch):
    """The device counts non-finite losses without stopping the host; the count is read at the next
    log step or checkpoint, so the message names the range of steps whose updates it discards, and
    no checkpoint holds them."""
    monkeypatch.setattr(must, "loss_align", lambda *a, **k: torch.tensor(float("nan")))
    out = tmp_path / "late"
    # 3 steps per epoch: the epoch end checks first
    message = error_of(argv(world, out, "--log-freq", "5"))
    assert ("non-finite loss in optimizer step(s) 1-3; their updates are not saved; "
            "no checkpoint was written yet") in message
    assert not os.path.exists(os.path.join(out, train.CHECKPOINT))


def test_method_hparams_take_each_setting_by_name():
    """must.Hparams is filled from the flags of the same names, so a new setting reaches must.py
    without an edit of train.py."""
    args = config.parse_args(["--data", "toy", "--no-mim", "--align-k", "3",
                              "--conf-threshold", "0.4", "--lambda-reg", "0.5",
                              "--lambda-align", "0.25", "--global-batch", "64"])
    hp = config.method_hparams(args, 8, torch.bfloat16)
    assert hp == must.Hparams(0.4, 0.5, 0.25, 3, 8, 64, use_reg=True, use_mim=False,
                              use_align=True, amp_dtype=torch.bfloat16)
