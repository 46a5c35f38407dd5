"""eval.py --classify and --export on a tiny CLIP, checkpoints and folders made here: the CSV
(sorted, byte for byte the same on 1 and 2 processes, an unreadable file's row, the checkpoint's
own image preparation), a kill mid-write, the standalone classifier file's logits, one-line errors,
and the toy world's predictions against its labels."""
import csv
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import clip_model
from util import clip_load
import eval as ev
from util import folders
import must
import prompts
from toy import world as toy
from tools import toy_experiments
import train
from conftest import save_clip, tiny_clip

torch.set_num_threads(1)  # tiny models: one thread is faster on a shared machine, and as exact
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["red square", "blue circle", "green cross"]
# Not OpenAI's preparation, so that a CSV made with OpenAI's would differ.
SPEC = clip_load.ClipSpec("quick_gelu", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
# The images under the folder, in path order; b/broken.jpg is unreadable, notes.txt is no image.
IMAGES = ["a/0.png", "a/1.png", "a/2.png", "b/broken.jpg", "b/c/3.png", "b0.png", "z.jpg"]


def tiny_must(seed):
    torch.manual_seed(seed)
    clip = tiny_clip()
    head = torch.nn.functional.normalize(torch.randn(clip.visual.output_dim, len(CLASSES)), dim=0)
    return must.MUSTModel(clip.visual, head, 100.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder of images at several depths (one unreadable, one text file), a tiny CLIP, a
    checkpoint whose CLIP prepared images by SPEC, and a classes file."""
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    for name in IMAGES:
        path = root / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == "b/broken.jpg":
            path.write_bytes(b"\xff\xd8 not a jpeg")
        else:
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, format="PNG")
    (root / "images" / "b" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    torch.manual_seed(0)
    save_clip(tiny_clip(), root / "clip.pt")
    torch.save({"student": tiny_must(1).state_dict(), "teacher": tiny_must(2).state_dict(),
                "optimizer": {}, "args": {"data": "folder"}, "classnames": CLASSES,
                "clip": SPEC._asdict()}, root / "checkpoint.pt")
    return root


def classify(world, tmp_path, *argv):
    return ev.main(["--num-workers", "0", "--batch-size", "2", "--device", "cpu",
                    "--out-dir", str(tmp_path), *map(str, argv)])


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def error_of(world, tmp_path, *argv):
    with pytest.raises(SystemExit) as e:
        classify(world, tmp_path, *argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def probabilities(model, paths, transform):
    """The model's class probabilities of image files, one at a time."""
    with torch.no_grad():
        images = torch.stack([transform(folders.read_image(p)) for p in paths])
        return model(images).logits.softmax(-1)


def test_csv_is_sorted_deterministic_and_prepared_by_the_checkpoint_s_spec(world, tmp_path,
                                                                          capsys):
    ckpt = world / "checkpoint.pt"
    numbers = classify(world, tmp_path, "--classify", world / "images", "--checkpoint", ckpt,
                       "--min-prob", "0.9")
    out = capsys.readouterr().out
    first = (tmp_path / "predictions.csv").read_bytes()
    classify(world, tmp_path, "--classify", world / "images", "--checkpoint", ckpt,
             "--min-prob", "0.9", "--csv", tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_bytes() == first
    rows = rows_of(tmp_path / "predictions.csv")
    assert [r["path"] for r in rows] == IMAGES  # every image, in path order, none other
    assert list(rows[0]) == ["path", "class", "prob", "class2", "prob2", "class3", "prob3",
                             "error"]
    broken = rows[IMAGES.index("b/broken.jpg")]
    assert broken["class"] == broken["prob"] == "" and "cannot be decoded" in broken["error"]
    read = [r for r in rows if r is not broken]
    student = must.load_checkpoint(torch.load(ckpt, weights_only=True), "student")
    paths = [world / "images" / r["path"] for r in read]
    expected = probabilities(student, paths, clip_load.image_transform(32, SPEC))
    for row, p in zip(read, expected):
        top = p.argsort(descending=True)
        assert [row["class"], row["class2"], row["class3"]] == [CLASSES[c] for c in top]
        assert [float(row[k]) for k in ("prob", "prob2", "prob3")] == pytest.approx(
            p[top].tolist(), abs=1e-4)
        assert row["error"] == ""
    # OpenAI's preparation would have given other probabilities: the spec was used.
    openai = probabilities(student, paths, clip_load.image_transform(32))
    assert (openai - expected).abs().max() > 1e-3
    assert numbers["images"] == 6 and numbers["unreadable"] == 1
    assert numbers["per_class"] == {c: sum(r["class"] == c for r in read) for c in CLASSES}
    assert numbers["under_min_prob"] == sum(float(r["prob"]) < 0.9 for r in read)
    assert "6 images classified" in out and "1 unreadable" in out
    # The teacher is another model, with other probabilities.
    classify(world, tmp_path, "--classify", world / "images", "--checkpoint", ckpt,
             "--which", "teacher", "--csv", tmp_path / "teacher.csv")
    teacher = must.load_checkpoint(torch.load(ckpt, weights_only=True), "teacher")
    expected = probabilities(teacher, paths, clip_load.image_transform(32, SPEC))
    probs = [float(r["prob"]) for r in rows_of(tmp_path / "teacher.csv") if r["class"]]
    assert probs == pytest.approx(expected.max(-1).values.tolist(), abs=1e-4)


KILL_MID_WRITE = """import os, signal, sys
sys.path.insert(0, {root!r})
import eval
real = eval.save_atomic
def save_atomic(text, path, write=None):
    def half(t, f):  # half the CSV on disk, then killed
        f.write(t[:len(t) // 2].encode())
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(text, path, half)
eval.save_atomic = save_atomic
eval.main(sys.argv[1:])
"""


def test_a_kill_while_writing_leaves_no_partial_csv(world, tmp_path):
    """SIGKILL halfway through writing the CSV: the final name holds nothing, or the previous
    file as it was; rerun, the CSV is whole and the killed run's temp file gone."""
    script = tmp_path / "killed.py"
    script.write_text(KILL_MID_WRITE.format(root=ROOT))
    argv = ["--classify", str(world / "images"), "--checkpoint", str(world / "checkpoint.pt"),
            "--num-workers", "0", "--batch-size", "2", "--device", "cpu",
            "--out-dir", str(tmp_path / "out")]
    csv_path = tmp_path / "out" / "predictions.csv"
    run = subprocess.run([sys.executable, str(script), *argv], cwd=ROOT, capture_output=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert not csv_path.exists() and (tmp_path / "out" / "predictions.csv.tmp").exists()
    ev.main(argv)
    whole = csv_path.read_bytes()
    assert len(rows_of(csv_path)) == len(IMAGES)
    run = subprocess.run([sys.executable, str(script), *argv], cwd=ROOT, capture_output=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert run.returncode == -signal.SIGKILL and csv_path.read_bytes() == whole
    ev.main(argv)
    assert csv_path.read_bytes() == whole
    assert sorted(os.listdir(tmp_path / "out")) == ["predictions.csv"]


def test_two_processes_write_the_csv_of_one(world, tmp_path):
    """torchrun, 2 gloo processes: each scores every other image (the unreadable one is rank 1's),
    rank 0 writes the same CSV byte for byte."""
    assert IMAGES.index("b/broken.jpg") % 2 == 1
    argv = ["--classify", str(world / "images"), "--checkpoint", str(world / "checkpoint.pt"),
            "--num-workers", "0", "--batch-size", "2", "--device", "cpu"]
    ev.main(argv + ["--csv", str(tmp_path / "one.csv")])
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", os.path.join(ROOT, "eval.py"), *argv,
                          "--csv", str(tmp_path / "two.csv")],
                         cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "two.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert run.stdout.count("wrote") == 1  # rank 0 alone writes and sums up


def test_exported_classifier_gives_the_checkpoint_s_logits(world, tmp_path):
    """--export: a file torch.load reads with weights_only=True, without optimizer, teacher or
    MUST heads, whose model (must.load_classifier) gives the checkpoint's logits exactly, and whose
    transform is the checkpoint's preparation; CLIP zero-shot exports likewise."""
    ckpt = torch.load(world / "checkpoint.pt", weights_only=True)
    paths = [world / "images" / name for name in IMAGES if name != "b/broken.jpg"]
    transform = clip_load.image_transform(32, SPEC)
    images = torch.stack([transform(folders.read_image(p)) for p in paths])
    for which in ("student", "teacher"):
        path = tmp_path / f"{which}.pt"
        assert classify(world, tmp_path, "--checkpoint", world / "checkpoint.pt", "--which", which,
                        "--export", path) is None
        file = torch.load(path, weights_only=True)
        assert sorted(file) == ["classnames", "clip", "model"] and file["classnames"] == CLASSES
        kept = set(file["model"])
        assert kept == {k for k in ckpt[which] if not k.startswith(must._TRAINING_HEADS)}
        assert "logit_scale" in kept and not any("decoder" in k or "mask_token" in k for k in kept)
        params = sum(t.numel() * t.element_size() for t in file["model"].values())
        assert os.path.getsize(path) < params + 50_000  # the tensors, and little else
        model, preprocess, classnames = must.load_classifier(str(path))
        assert classnames == CLASSES and not model.visual.has_must_heads
        image = folders.read_image(paths[0])
        assert torch.equal(preprocess(image), transform(image))
        with torch.no_grad():
            assert torch.equal(model(images).logits,
                               must.load_checkpoint(ckpt, which)(images).logits)
    # CLIP zero-shot over a classes file: the head eval.py scores with.
    path = tmp_path / "zero-shot.pt"
    classify(world, tmp_path, "--model", world / "clip.pt", "--classes", world / "classes.txt",
             "--export", path)
    clip, preprocess = clip_model.load(str(world / "clip.pt"))
    head = prompts.zero_shot_head(clip, CLASSES, ev.data.DEFAULT_TEMPLATES)
    model, _, classnames = must.load_classifier(str(path))
    images = torch.stack([preprocess(folders.read_image(p)) for p in paths])
    with torch.no_grad():
        zero_shot = must.MUSTModel.from_clip(clip, head).eval()
        assert torch.equal(model(images).logits, zero_shot(images).logits)


def test_zero_shot_classifies_a_folder(world, tmp_path):
    """--model without a checkpoint: CLIP zero-shot over --classes, prepared by the CLIP's spec."""
    classify(world, tmp_path, "--classify", world / "images", "--model", world / "clip.pt",
             "--classes", world / "classes.txt")
    rows = [r for r in rows_of(tmp_path / "predictions.csv") if r["class"]]
    clip, preprocess = clip_model.load(str(world / "clip.pt"))
    head = prompts.zero_shot_head(clip, CLASSES, ev.data.DEFAULT_TEMPLATES)
    zero_shot = must.MUSTModel.from_clip(clip, head).eval()
    expected = probabilities(zero_shot, [world / "images" / r["path"] for r in rows], preprocess)
    assert [r["class"] for r in rows] == [CLASSES[c] for c in expected.argmax(-1)]


def test_one_line_errors(world, tmp_path):
    images, ckpt = world / "images", world / "checkpoint.pt"
    assert "no checkpoint file" in error_of(world, tmp_path, "--classify", images,
                                            "--checkpoint", tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_text("junk")
    assert "cannot read MUST checkpoint" in error_of(world, tmp_path, "--classify", images,
                                                     "--checkpoint", tmp_path / "junk.pt")
    assert "holds a CLIP's weights" in error_of(world, tmp_path, "--classify", images,
                                                "--checkpoint", world / "clip.pt")
    assert "no images" in error_of(world, tmp_path, "--classify", world / "empty",
                                   "--checkpoint", ckpt)
    assert "does not exist" in error_of(world, tmp_path, "--classify", tmp_path / "nowhere",
                                        "--checkpoint", ckpt)
    assert "--min-prob" in error_of(world, tmp_path, "--classify", images, "--checkpoint", ckpt,
                                    "--min-prob", "2")
    assert "is a folder" in error_of(world, tmp_path, "--classify", images, "--checkpoint", ckpt,
                                     "--csv", tmp_path)
    assert "zero-shot" in error_of(world, tmp_path, "--classify", images, "--checkpoint", ckpt,
                                   "--classes", world / "classes.txt")
    assert "--shift" in error_of(world, tmp_path, "--classify", images, "--checkpoint", ckpt,
                                 "--shift")
    assert "needs its classes" in error_of(world, tmp_path, "--classify", images,
                                           "--model", world / "clip.pt")
    assert "no published class names" in error_of(world, tmp_path, "--classify", images,
                                                  "--model", world / "clip.pt", "--data", "toy")


def test_toy_predictions_agree_with_the_student_accuracy(tiny_world, tmp_path):
    """The README's toy commands on a small run: the test images written as files and classified,
    their predictions agree with the labels (their folders) as often as the run's last student
    evaluation, and eval.py's, say."""
    out = tmp_path / "run"
    evals = train.main(["--data", "toy", "--out-dir", str(out), "--num-workers", "0",
                        "--device", "cpu"])
    toy_experiments.main(["images", "--out", str(tmp_path / "test")])
    numbers = ev.main(["--classify", str(tmp_path / "test"), "--checkpoint",
                       str(out / "checkpoint.pt"), "--num-workers", "0", "--device", "cpu"])
    rows = rows_of(out / "predictions.csv")
    labels = toy.render_split("test")[1]
    assert len(rows) == numbers["images"] == len(labels) == 40
    folder_of = {int(r["path"][-8:-4]): r["path"].split("/")[0] for r in rows}
    assert folder_of == {i: toy.SHAPES[c] for i, c in enumerate(labels)}
    agreement = 100.0 * float(sum(r["class"] == r["path"].split("/")[0] for r in rows)) / 40
    report = ev.main(["--checkpoint", str(out / "checkpoint.pt"), "--num-workers", "0",
                      "--device", "cpu"])
    assert agreement == evals[-1]["student_acc"] == report["results"]["toy"]["models"][
        "student"]["top1"]
    assert 0 < agreement < 100
