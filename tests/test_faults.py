"""Bad inputs and faults, table by table, on one tiny module-scoped world (a random tiny CLIP, 40x40
PNGs): flags out of their domain, class and template files, bad image files (training substitutes,
evaluation skips, each reported once and counted, runs stay bit-reproducible, also across DataLoader
workers), listing of links, FIFOs and loops, too few readable images, checkpoints that are broken or
belong to another model / class list / templates / dataset, the out-dir lock, a full disk (a real
ENOSPC from /dev/full), non-finite losses and heads, --data folder without --eval-root, and eval.py
skipping unreadable files. Every error is checked as the exact one-line message (fragment)
train.main / eval.main exits with, and where it matters, that nothing was written. Last: --model
files that are no CLIP ViT, a damaged zero-shot head cache, folders that cannot be listed."""
import contextlib
import errno
import io
import json
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import unicodedata

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

from util import clip_load
import data
import eval as ev
import figures
from util import folders
import must
import prompts
from util import checkpoint, runtime
import train
from conftest import save_clip, tiny_clip

# Tiny models: one thread is several times faster than two on a shared 2-core machine, and as
# deterministic.
torch.set_num_threads(1)
CLASSES = ["red square", "blue circle", "green cross"]
HAS_GPU = torch.cuda.is_available()
UNDECODABLE = folders._READ_ERRORS[1]  # "cannot be decoded (truncated, empty or not an image)"
BOMB = folders._READ_ERRORS[2]
DENIED = folders._READ_ERRORS[3]
VANISHED = folders._READ_ERRORS[4]
DANGLING = "dangling symbolic link or unreadable entry"
NOT_REGULAR = "not a regular file"
SAME_FILE = "the same file is listed already"
LOOP = "folder already listed (a symbolic link to it, or a link loop)"


def _png(path, size=(40, 40), seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """good/: 8 training PNGs 0..7; test/<class>/: 6 labeled PNGs; classes.txt; tiny.pt and other.pt
    (two random tiny CLIPs: 32 px input, 8 px patches)."""
    root = tmp_path_factory.mktemp("faults")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "good").mkdir()
    for i in range(8):
        _png(root / "good" / f"{i}.png", seed=i)
    for i in range(6):
        folder = root / "test" / CLASSES[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        _png(folder / f"{i}.png", seed=100 + i)
    torch.manual_seed(0)
    save_clip(tiny_clip(), root / "tiny.pt")
    torch.manual_seed(1)
    save_clip(tiny_clip(), root / "other.pt")
    return root


def argv(world, data_root, out, *extra):
    """A folder run: global batch 4, one epoch (8 images: 2 steps), no evaluation unless --eval-root
    is added."""
    return ["--data", "folder", "--data-root", str(data_root),
            "--classes", str(world / "classes.txt"), "--model", str(world / "tiny.pt"),
            "--global-batch", "4", "--epochs", "1", "--mask-unit", "16", "--base-lr", "1e-3",
            "--conf-threshold", "0.34", "--num-workers", "0", "--log-freq", "1",
            "--out-dir", str(out), *extra]


def with_ids(rows, name=lambda row: row[0]):
    """pytest.param per table row, its id from the row (rows already made with pytest.param are
    kept)."""
    return [row if hasattr(row, "marks") else pytest.param(*row, id=name(row)) for row in rows]


def error_of(run, argv_list):
    """The message of the SystemExit that run(argv_list) ends with: one line starting with
    'error: '."""
    with pytest.raises(SystemExit) as e:
        run(argv_list)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def train_error(argv_list):
    return error_of(train.main, argv_list)


def ckpt(out):
    return torch.load(os.path.join(out, train.CHECKPOINT), map_location="cpu", weights_only=True)


def records(out, kind):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def same_weights(a, b):
    return all(torch.equal(a[k][n], b[k][n]) for k in ("student", "teacher") for n in a[k])


def copy_good(world, dst, n=7):
    """dst/0.png .. dst/{n-1}.png: copies of the good training images."""
    os.makedirs(dst, exist_ok=True)
    for i in range(n):
        shutil.copy(world / "good" / f"{i}.png", os.path.join(dst, f"{i}.png"))
    return dst


class Hung(BaseException):
    """Not an Exception: the loaders' `except Exception` (a bad file) must not swallow it."""


@contextlib.contextmanager
def deadline(seconds):
    """Fail instead of hanging (e.g. on a blocking open of a FIFO): SIGALRM interrupts the blocked
    call."""
    def expire(signum, frame):
        raise Hung(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -------------------------------------------------------------------------------------------- flags

# (extra flags, exact fragment of the one-line error); "{tmp}", "{world}" and "{file}" (an existing
# file) are filled in.
# Stage "flags": refused by train.preflight / the device check, before any model, data or lock:
# the out-dir holds nothing. Stage "setup": refused after the model is read (mask geometry, batch vs
# data): no log, no checkpoint.
FLAG_ERRORS = [
    ("flags", ["--eval-freq", "0"], "--eval-freq 0 is not allowed: it must be at least 1"),
    ("flags", ["--global-batch", "0"], "--global-batch 0 is not allowed: it must be at least 1"),
    ("flags", ["--global-batch", "-8"], "--global-batch -8 is not allowed: it must be at least 1"),
    ("flags", ["--log-freq", "0"], "--log-freq 0 is not allowed: it must be at least 1"),
    ("flags", ["--mask-unit", "0"], "--mask-unit 0 is not allowed: it must be at least 1 px"),
    ("flags", ["--base-lr", "-1"], "--base-lr -1.0 is not allowed: it must be a positive number"),
    ("flags", ["--base-lr", "0"], "--base-lr 0.0 is not allowed: it must be a positive number"),
    ("flags", ["--base-lr", "inf"], "--base-lr inf is not allowed: it must be a positive number"),
    ("flags", ["--num-workers", "-1"], "--num-workers -1 is not allowed: it must be 0 or more"),
    ("flags", ["--conf-threshold", "-5"],
     "--conf-threshold -5.0 is not allowed: it must be in [0, 1)"),
    ("flags", ["--conf-threshold", "1"],
     "--conf-threshold 1.0 is not allowed: it must be in [0, 1) (a softmax never exceeds 1)"),
    ("flags", ["--conf-threshold", "nan"], "--conf-threshold nan is not allowed"),
    ("flags", ["--lambda-align", "-1"], "--lambda-align -1.0 is not allowed: it must be 0 or more"),
    ("flags", ["--lambda-reg", "nan"], "--lambda-reg nan is not allowed: it must be 0 or more"),
    ("flags", ["--lambda-reg", "inf"], "--lambda-reg inf is not allowed: it must be 0 or more"),
    ("flags", ["--ema-mu0", "2"], "--ema-mu0 2.0 is not allowed: it must be in [0, 1]"),
    ("flags", ["--ema-mu-n", "-1"], "--ema-mu-n -1 is not allowed: it must be 0 or more"),
    ("flags", ["--layer-decay", "0"], "--layer-decay 0.0 is not allowed: it must be in (0, 1]"),
    ("flags", ["--layer-decay", "1.5"], "--layer-decay 1.5 is not allowed: it must be in (0, 1]"),
    ("flags", ["--weight-decay", "-0.1"],
     "--weight-decay -0.1 is not allowed: it must be 0 or more"),
    ("flags", ["--base-min-lr", "-1"], "--base-min-lr -1.0 is not allowed: it must be 0 or more"),
    ("flags", ["--epochs", "0"], "--epochs 0 is not allowed: it must be at least 1"),
    ("flags", ["--save-freq", "-1"], "--save-freq -1 is not allowed: it must be 0 (off) or more"),
    ("flags", ["--save-minutes", "-1"], "--save-minutes -1.0 is not allowed: it must be 0 or more"),
    ("flags", ["--dist-timeout", "0"], "--dist-timeout 0.0 is not allowed: it must be in (0, 1e6]"),
    ("flags", ["--dist-timeout", "inf"], "--dist-timeout inf is not allowed"),
    ("flags", ["--max-steps", "-1"], "--max-steps -1 is not allowed: it must be 0 or more"),
    ("flags", ["--accum-steps", "0"], "--accum-steps 0 is not allowed: it must be at least 1"),
    ("flags", ["--batch-size-per-gpu", "0"],
     "--batch-size-per-gpu 0 is not allowed: it must be at least 1"),
    ("flags", ["--align-k", "0"], "--align-k 0 is not allowed: it must be at least 1"),
    ("flags", ["--mask-ratio", "1.5"], "--mask-ratio 1.5 is not allowed: it must be in [0, 1]"),
    ("flags", ["--batch-size-per-gpu", "3"],
     "per-process batch 4 is not divisible by --batch-size-per-gpu 3"),
    ("flags", ["--accum-steps", "2", "--batch-size-per-gpu", "2"],
     "give --batch-size-per-gpu or --accum-steps, not both"),
    ("flags", ["--device", "nonsense"],
     "--device 'nonsense' is not a device name (use cuda, cuda:N or cpu)"),
    ("flags", ["--device", "meta"], "--device meta: only cuda and cpu are supported"),
    pytest.param("flags", ["--device", "cuda"],
                 "--device cuda asked for a GPU, but torch sees none (use --device cpu)",
                 marks=pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU"),
                 id="device-cuda-without-gpu"),
    pytest.param("flags", ["--device", "cuda:1"],
                 "--device cuda:1 asked for a GPU, but torch sees none",
                 marks=pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU"),
                 id="device-cuda1-without-gpu"),
    ("flags", ["--out-dir", "{file}"], "--out-dir {file} cannot be created (File exists)"),
    ("flags", ["--init", "{tmp}/absent.pt"], "--init {tmp}/absent.pt does not exist"),
    ("flags", ["--eval-root", "{tmp}/absent"], "--eval-root {tmp}/absent does not exist"),
    ("flags", ["--data-root", "{tmp}/absent"], "data root '{tmp}/absent' is missing or empty"),
    ("flags", ["--data", "imagenot"], "unknown dataset 'imagenot'"),
    ("flags", ["--classes", "{tmp}/absent.txt"],
     "class names file '{tmp}/absent.txt' does not exist"),
    ("setup", ["--model", "{tmp}/absent.pt"], "no checkpoint file at {tmp}/absent.pt"),
    ("setup", ["--model", "{world}/classes.txt"],
     "could not read {world}/classes.txt: it is truncated or not a checkpoint"),
    ("setup", ["--mask-unit", "32"],
     "--mask-ratio 0.3 masks every one of the 1 mask unit(s) of 32 px on the 32 px input, "
     "so the MIM and alignment terms would be meaningless: "
     "change --mask-ratio, or --mask-unit (a multiple of 8 px that divides 32)"),
    ("setup", ["--mask-ratio", "0"],
     "--mask-ratio 0.0 masks no one of the 4 mask unit(s) of 16 px"),
    ("setup", ["--mask-ratio", "1"],
     "--mask-ratio 1.0 masks every one of the 4 mask unit(s) of 16 px"),
    ("setup", ["--mask-unit", "12"], "mask_unit 12 must be a multiple of the patch size 8"),
    ("setup", ["--mask-unit", "24"], "input size 32 must be a multiple of mask_unit 24"),
    ("setup", ["--global-batch", "16"], "8 training images are fewer than one global batch of 16"),
    ("flags", ["--resume", "{tmp}/absent.pt"], "no checkpoint at {tmp}/absent.pt"),
    pytest.param("setup", ["--amp", "fp16"], "--amp fp16 needs a GPU (use bf16 or fp32 on CPU)",
                 marks=pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU"),
                 id="amp-fp16-on-cpu"),
    ("flags", ["--seed", "-1"], "--seed -1 is not allowed: it must be in [0, 2^32)"),
    ("flags", ["--seed", "4294967296"],
     "--seed 4294967296 is not allowed: it must be in [0, 2^32)"),
    ("setup", ["--base-min-lr", "0.01"],
     "--base-min-lr 0.01 is above --base-lr 0.001: the cosine schedule would rise from lr to "
     "min_lr"),
    ("setup", ["--base-lr", "1e40"],
     "lr = --base-lr 1e+40 x 4 / 256 = 1.56e+38 overflows float32 in AdamW's first step"),
]


def _fill(text, world, tmp):
    return text.format(world=world, tmp=tmp, file=tmp / "a-file")


@pytest.mark.parametrize("stage,flags,message", with_ids(FLAG_ERRORS, lambda row: "_".join(row[1])))
def test_bad_flag_is_a_one_line_error_before_any_work(stage, flags, message, world, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "out"
    flags = [_fill(f, world, tmp_path) for f in flags]
    assert _fill(message, world, tmp_path) in train_error(argv(world, world / "good", out, *flags))
    if "--out-dir" in flags:
        assert (tmp_path / "a-file").read_text() == "not a folder"
        return
    left = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if stage == "flags":
        assert left == []  # not even the lock or a head cache
    else:
        assert "log.jsonl" not in left and train.CHECKPOINT not in left, left


def test_no_mim_no_align_lifts_the_mask_geometry_check(world, tmp_path):
    """The geometry error names the way out: without MIM and alignment a 1-unit mask is fine."""
    out = tmp_path / "out"
    train.main(argv(world, world / "good", out, "--mask-unit", "32", "--no-mim", "--no-align",
                    "--max-steps", "1"))
    assert ckpt(out)["step"] == 1


# ------------------------------------------------------------------------- class and template files

LONG = " ".join(["word"] * 80)

# (classes file content or None = the good one, templates file content or None = no --templates,
#  fragment; "{classes}" / "{templates}" are the files' paths)
TEXT_FILE_ERRORS = [
    pytest.param("red square\n", None,
                 "class names file '{classes}' lists 1 class(es); a classifier needs at least 2",
                 id="one-class"),
    pytest.param("", None, "class names file '{classes}' lists 0 class(es)", id="empty-classes"),
    pytest.param("# red square\n# blue circle\nred square\n\n", None, "lists 1 class(es)",
                 id="comments-are-not-classes"),
    pytest.param("red square\nRed_Square\nblue\n", None,
                 "repeats class names (up to case/punctuation): ['Red_Square', 'red square']",
                 id="duplicate-classes"),
    pytest.param(b"red square\n\xff\xfeblue\n", None,
                 "class names file '{classes}' is not UTF-8 text (byte 11); save it as UTF-8",
                 id="classes-not-utf8"),
    pytest.param("DIR", None,
                 "class names file '{classes}' is a directory; "
                 "give a text file, one entry per line",
                 id="classes-is-a-directory"),
    pytest.param(f"# header\nred square\n\n{LONG}\n", None,
                 "tokens; CLIP reads 77 at most: shorten the class name or the template",
                 id="long-class-name"),
    pytest.param(None, "a {} and a {}.\n",
                 "templates file {templates}, line 1: 'a {{}} and a {{}}.' needs exactly one "
                 "'{{}}' for the class name",
                 id="template-two-braces"),
    pytest.param(None, "# mine\na photo of a {}.\na {name}.\n",
                 "templates file {templates}, line 3: 'a {{name}}.' needs exactly one '{{}}'",
                 id="template-named-field"),
    pytest.param(None, "a photo of a {}.\n\na photo.\n",
                 "templates file {templates}, line 3: 'a photo.' needs exactly one '{{}}'",
                 id="template-no-braces"),
    pytest.param(None, "a {.\n", "templates file {templates}, line 1: 'a {{.' needs exactly one",
                 id="template-lone-brace"),
    pytest.param(None, "a }{} photo\n", "templates file {templates}, line 1",
                 id="template-stray-close-brace"),
    pytest.param(None, "# only a comment\n\n", "templates file '{templates}' lists no template",
                 id="templates-empty"),
    pytest.param(None, b"a photo of a {}.\n\xe9t\xe9 {}\n",
                 "templates file '{templates}' is not UTF-8 text",
                 id="templates-not-utf8"),
    pytest.param(None, "DIR", "templates file '{templates}' is a directory",
                 id="templates-is-a-directory"),
    pytest.param(None, f"a photo of a {{}}.\n# long one next\n{LONG} {{}}.\n",
                 "tokens; CLIP reads 77 at most: shorten the class name or the template",
                 id="long-template"),
]


def _write(path, content):
    if content == "DIR":
        os.makedirs(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


@pytest.mark.parametrize("classes,templates,message", TEXT_FILE_ERRORS)
def test_bad_class_or_template_file(classes, templates, message, world, tmp_path):
    classes_path, templates_path = tmp_path / "classes.txt", tmp_path / "templates.txt"
    _write(classes_path, "red square\nblue circle\ngreen cross\n" if classes is None else classes)
    extra = ["--classes", str(classes_path)]
    if templates is not None:
        _write(templates_path, templates)
        extra += ["--templates", str(templates_path)]
    out = tmp_path / "out"
    got = train_error(argv(world, world / "good", out, *extra))
    assert message.format(classes=classes_path, templates=templates_path) in got
    assert not os.path.exists(out / "log.jsonl")


def test_comment_and_blank_lines_are_ignored_in_class_and_template_files(world, tmp_path):
    (tmp_path / "classes.txt").write_text(
        "# my three classes\nred square\n\n  blue circle  \n#green\ngreen cross\n")
    (tmp_path / "templates.txt").write_text(
        "# prompts\na photo of a {}.\n\n# another\na {} on a table.\n")
    out = tmp_path / "out"
    train.main(argv(world, world / "good", out, "--classes", str(tmp_path / "classes.txt"),
                    "--templates", str(tmp_path / "templates.txt"), "--max-steps", "1"))
    c = ckpt(out)
    assert c["classnames"] == CLASSES
    assert c["fingerprints"]["templates"] == runtime.fingerprint(
        ["a photo of a {}.", "a {} on a table."])


def test_class_names_in_any_script(world, tmp_path):
    """A class is keyed by its letters, digits and marks in any script (folders.name_key): 猫 and
    犬 train and evaluate, a folder matches its class in whichever Unicode form its name is stored
    (macOS decomposes 'é'), and names that differ by a vowel sign stay apart. An ASCII name keys as
    before: the [0-9a-z] of its lower case."""
    for name in (f"A_b{chr(i)}9" for i in range(128)):
        assert folders.name_key(name) == re.sub(r"[^0-9a-z]", "", name.lower())
    (tmp_path / "hindi.txt").write_text("कम\nकमी\n")
    assert folders.read_classnames(str(tmp_path / "hindi.txt")) == ["कम", "कमी"]
    names = ["猫", "犬", "café"]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    test = tmp_path / "test"
    for i, name in enumerate(names):
        folder = test / unicodedata.normalize("NFD", name)
        folder.mkdir(parents=True)
        for j in range(2):
            _png(folder / f"{j}.png", seed=200 + 2 * i + j)
    out = tmp_path / "out"
    evals = train.main(argv(world, world / "good", out, "--eval-root", str(test),
                            "--classes", str(tmp_path / "classes.txt")))
    assert [e["images"] for e in evals] == [6, 6] and ckpt(out)["classnames"] == names
    report = ev.main(ckpt_argv(out / train.CHECKPOINT, tmp_path))
    assert report["results"]["folder"]["images"] == 6


# ---------------------------------------------------------------------------------- bad image files

def _zero_byte(d):
    open(os.path.join(d, "3b.jpg"), "wb").close()
    return os.path.join(d, "3b.jpg")


def _truncated(fmt, ext):
    def make(d):
        rng = np.random.default_rng(7)
        path = os.path.join(d, f"3b.{ext}")
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path, format=fmt)
        blob = open(path, "rb").read()
        open(path, "wb").write(blob[:len(blob) // 2])
        return path
    return make


def _text_as_png(d):
    path = os.path.join(d, "3b.png")
    open(path, "w").write("this is not a picture\n")
    return path


def _broken_png_header(d):
    path = os.path.join(d, "3b.png")
    _png(path, seed=7)
    blob = bytearray(open(path, "rb").read())
    blob[1:4] = b"GIF"  # the PNG signature no longer matches: no decoder claims it
    open(path, "wb").write(bytes(blob))
    return path


def _bomb(d):
    path = os.path.join(d, "3b.png")
    Image.new("RGB", (64, 64), (9, 9, 9)).save(path)  # 4096 px > 2 x the limit the patch below sets
    return path


def _readable(name, make_image):
    def make(d):
        path = os.path.join(d, name)
        make_image().save(path)
        return path
    return make


def _valid_png(d):
    path = os.path.join(d, "3b.png")
    _png(path, seed=7)
    return path


def _dangling(d):
    os.symlink(os.path.join(d, "nowhere.png"), os.path.join(d, "3b.png"))
    return os.path.join(d, "3b.png")


def _fifo(d):
    os.mkfifo(os.path.join(d, "3b.jpg"))
    return os.path.join(d, "3b.jpg")


def _symlink_to_listed(d):
    os.symlink("0.png", os.path.join(d, "3b.png"))
    return os.path.join(d, "3b.png")


def _hardlink_to_listed(d):
    os.link(os.path.join(d, "0.png"), os.path.join(d, "3b.png"))
    return os.path.join(d, "3b.png")


def _folder_named_jpg(d):
    os.makedirs(os.path.join(d, "3b.jpg"))
    _png(os.path.join(d, "3b.jpg", "inner.png"), seed=7)
    return os.path.join(d, "3b.jpg")


def _hidden_garbage(d):
    open(os.path.join(d, ".3b.png"), "w").write("garbage")
    return os.path.join(d, ".3b.png")


def _other_extension(d):
    open(os.path.join(d, "3b.txt"), "w").write("notes")
    return os.path.join(d, "3b.txt")


def _patch_bomb_limit(monkeypatch):
    # PIL refuses images over 2 x MAX_IMAGE_PIXELS; the good ones (1600 px) stay below MAX (no
    # warning either).
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1700)


def _patch_permission_denied(monkeypatch):
    """As root chmod 000 does not stop reads: deny opening '3b.*' the way the kernel would."""
    real_open = PIL.Image.open

    def open_(fp, *args, **kwargs):
        if isinstance(fp, (str, os.PathLike)) and os.path.basename(fp).startswith("3b."):
            raise PermissionError(errno.EACCES, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)
    monkeypatch.setattr(PIL.Image, "open", open_)


def _patch_vanish_after_listing(monkeypatch):
    """The file is deleted between the listing and the first read (e.g. by a sync job)."""
    real_list = folders.list_images

    def list_then_delete(*args, **kwargs):
        paths = real_list(*args, **kwargs)
        for p in paths:
            if os.path.basename(p).startswith("3b.") and os.path.exists(p):
                os.remove(p)
        return paths
    monkeypatch.setattr(folders, "list_images", list_then_delete)


def _chmod_000(d):
    path = _valid_png(d)
    os.chmod(path, 0)
    return path


not_root = pytest.mark.skipif(
    os.geteuid() == 0, reason="root reads a chmod 000 file (simulated in permission-denied)")

# (id, make(dir) -> the bad entry, patch(monkeypatch) or None, outcome, reason)
# outcome "skipped": listed, unreadable, replaced by the next readable image, warned once and
#                    counted;
#         "unlisted": left out by the listing and reported as such;
#         "read": a valid image, used as it is;
#         "ignored": not an image entry at all (hidden or another extension): no warning.
BAD_IMAGES = [
    ("zero-byte-jpg", _zero_byte, None, "skipped", UNDECODABLE),
    ("truncated-jpeg", _truncated("JPEG", "jpg"), None, "skipped", UNDECODABLE),
    ("truncated-png", _truncated("PNG", "png"), None, "skipped", UNDECODABLE),
    ("text-named-png", _text_as_png, None, "skipped", UNDECODABLE),
    ("broken-png-signature", _broken_png_header, None, "skipped", UNDECODABLE),
    ("decompression-bomb", _bomb, _patch_bomb_limit, "skipped", BOMB),
    ("permission-denied-simulated", _valid_png, _patch_permission_denied, "skipped", DENIED),
    pytest.param("permission-denied-chmod", _chmod_000, None, "skipped", DENIED, marks=not_root,
                 id="permission-denied-chmod"),
    ("deleted-after-listing", _valid_png, _patch_vanish_after_listing, "skipped", VANISHED),
    ("dangling-symlink", _dangling, None, "unlisted", DANGLING),
    ("fifo-named-jpg", _fifo, None, "unlisted", NOT_REGULAR),
    ("symlink-to-a-listed-file", _symlink_to_listed, None, "unlisted", SAME_FILE),
    ("hardlink-to-a-listed-file", _hardlink_to_listed, None, "unlisted", SAME_FILE),
    ("extreme-aspect-1x1000",
     _readable("3b.png", lambda: Image.new("RGB", (1, 1000), (200, 10, 10))),
     None, "read", None),
    ("extreme-aspect-1000x1",
     _readable("3b.png", lambda: Image.new("RGB", (1000, 1), (10, 200, 10))),
     None, "read", None),
    ("cmyk-jpeg",
     _readable("3b.jpg", lambda: Image.new("CMYK", (40, 40), (10, 20, 30, 40))),
     None, "read", None),
    ("16-bit-gray-png",
     _readable("3b.png", lambda: Image.fromarray(np.full((40, 40), 300, np.uint16))),
     None, "read", None),
    ("rgba-png",
     _readable("3b.png", lambda: Image.new("RGBA", (40, 40), (1, 2, 3, 4))),
     None, "read", None),
    ("1x1-png",
     _readable("3b.png", lambda: Image.new("RGB", (1, 1), (5, 6, 7))),
     None, "read", None),
    ("folder-named-jpg", _folder_named_jpg, None, "read", None),
    ("hidden-garbage", _hidden_garbage, None, "ignored", None),
    ("other-extension", _other_extension, None, "ignored", None),
]


def _bad_world(world, d, make):
    """7 good images 0..6 and the bad entry '3b.*', which sorts between 3.png and 4.png: listed, it
    is index 4 and its substitute is 4.png (index 5). 8 listed images = 2 steps of 4: every index is
    read in the epoch."""
    if os.path.isdir(d):
        shutil.rmtree(d)
    copy_good(world, d)
    return make(str(d))


def _run_bad(world, d, out, make, capsys, *extra):
    bad = _bad_world(world, d, make)
    capsys.readouterr()
    with deadline(30):  # a FIFO that got listed would block the read forever
        evals = train.main(argv(world, d, out, *extra))
    return bad, evals, capsys.readouterr().out


@pytest.mark.parametrize("kind,make,patch,outcome,reason", with_ids(BAD_IMAGES))
def test_bad_image_file_is_never_fatal(kind, make, patch, outcome, reason, world, tmp_path,
                                       monkeypatch, capsys):
    if patch is not None:
        patch(monkeypatch)
    bad, evals, out = _run_bad(world, tmp_path / "train", tmp_path / "a", make, capsys)
    steps = records(tmp_path / "a", "train")
    assert evals == [] and "not evaluated: --data folder without --eval-root" in out
    listed = {"skipped": 8, "read": 8, "unlisted": 7, "ignored": 7}[outcome]
    assert f"MUST on folder: {listed} images," in out
    assert ([r["step"] for r in steps] == ([1, 2] if listed == 8 else [1])
            and ckpt(tmp_path / "a")["step"] == len(steps))
    if outcome == "skipped":
        assert out.count(f"warning: skipped training image {bad}: it {reason}\n") == 1, out
        assert out.count("warning: skipped") == 1 and "not listed" not in out
        assert ("skipped 1 unreadable training image(s) (named above); "
                "each was replaced by the next readable one") in out
        assert steps[-1]["skipped"] == 1 and all(r["skipped"] in (0, 1) for r in steps)
        # determinism: the same run again gives bit-identical weights
        _run_bad(world, tmp_path / "train", tmp_path / "b", make, capsys)
        assert same_weights(ckpt(tmp_path / "a"), ckpt(tmp_path / "b"))
        return
    assert "warning: skipped" not in out and "unreadable training image" not in out
    assert all(r["skipped"] == 0 for r in steps)
    if outcome == "unlisted":
        unlisted = f"warning: 1 training entries not listed: {reason} (e.g. {bad})\n"
        assert out.count(unlisted) == 1, out
    else:
        assert "not listed" not in out, out


@pytest.mark.parametrize("kind,make,patch,reason", with_ids([
    ("zero-byte-jpg", _zero_byte, None, UNDECODABLE),
    ("decompression-bomb", _bomb, _patch_bomb_limit, BOMB),
    ("permission-denied-simulated", _valid_png, _patch_permission_denied, DENIED),
    ("deleted-after-listing", _valid_png, _patch_vanish_after_listing, VANISHED),
]))
def test_bad_image_report_across_two_loader_workers(kind, make, patch, reason, world, tmp_path,
                                                    monkeypatch, capsys):
    """Workers flag bad files in ImageList.bad (shared memory): the main process warns once, counts
    it, and the weights are bit-identical to the in-process loader's."""
    if patch is not None:
        patch(monkeypatch)
    _run_bad(world, tmp_path / "train", tmp_path / "w0", make, capsys)
    bad, _, out = _run_bad(world, tmp_path / "train", tmp_path / "w2", make, capsys,
                           "--num-workers", "2")
    assert out.count(f"warning: skipped training image {bad}: it {reason}\n") == 1, out
    assert out.count("warning: skipped") == 1
    assert records(tmp_path / "w2", "train")[-1]["skipped"] == 1
    assert same_weights(ckpt(tmp_path / "w0"), ckpt(tmp_path / "w2"))


@pytest.mark.parametrize("make", [_zero_byte, _text_as_png],
                         ids=["zero-byte-jpg", "text-named-png"])
def test_unreadable_image_is_replaced_by_the_next_readable_one(make, world, tmp_path, capsys):
    """Bit-identical to a world where the bad file is a copy of the next file (4.png), and not to
    one where it is a copy of another file (0.png): the substitute is the next readable image in
    index order."""
    _run_bad(world, tmp_path / "bad", tmp_path / "bad-out", make, capsys)
    for source, out in (("4.png", "next-out"), ("0.png", "first-out")):
        d = tmp_path / source
        copy_good(world, d)
        shutil.copy(d / source, d / "3b.png")  # sorts where the bad file does: index 4
        train.main(argv(world, d, tmp_path / out))
    bad = ckpt(tmp_path / "bad-out")
    assert same_weights(bad, ckpt(tmp_path / "next-out"))
    assert not same_weights(bad, ckpt(tmp_path / "first-out"))


def test_symlink_loops_list_each_real_file_once(world, tmp_path, capsys):
    """train/link -> .  and  train/sub/a -> ..  and  train/sub/b -> .  : every real file is listed
    once (4 at the top, 4 in sub/), each loop is walked once and reported; a link to a folder
    outside the tree is followed."""
    d = tmp_path / "train"
    copy_good(world, d, 4)
    (d / "sub").mkdir()
    for i in range(4, 8):
        shutil.copy(world / "good" / f"{i}.png", d / "sub" / f"{i}.png")
    os.symlink(".", d / "link")
    os.symlink("..", d / "sub" / "a")
    os.symlink(".", d / "sub" / "b")
    outside = tmp_path / "outside"
    copy_good(world, outside, 4)  # copies: other files with the same pixels as 0..3
    os.symlink(outside, d / "sub" / "c-outside")
    listed = folders.list_images(str(d))
    assert [os.path.relpath(p, d) for p in listed] == [
        "0.png", "1.png", "2.png", "3.png", "sub/4.png", "sub/5.png", "sub/6.png", "sub/7.png",
        "sub/c-outside/0.png", "sub/c-outside/1.png", "sub/c-outside/2.png", "sub/c-outside/3.png"]
    capsys.readouterr()
    train.main(argv(world, d, tmp_path / "out", "--max-steps", "1"))
    out = capsys.readouterr().out
    assert f"warning: 3 training entries not listed: {LOOP} (e.g. {d / 'link'})\n" in out
    assert "MUST on folder: 12 images," in out


def test_a_link_loop_in_a_class_folder_takes_no_other_class_images(world, tmp_path):
    """test/blue circle/loop -> .. leads to the other classes' folders: their images listed through
    it would be labeled blue circle, and their own listing dropped as duplicates. The link is
    reported and not followed: every image keeps its class."""
    d = tmp_path / "test"
    shutil.copytree(world / "test", d)
    os.symlink("..", d / CLASSES[1] / "loop")
    ignored = []
    listed = folders.scan_class_folders(str(d), "folder", CLASSES, ignored)
    clean = folders.scan_class_folders(str(world / "test"), "folder", CLASSES)
    assert ([(os.path.relpath(p, d), label) for p, label in listed]
            == [(os.path.relpath(p, world / "test"), label) for p, label in clean])
    assert ignored == [(str(d / CLASSES[1] / "loop"),
                        "a symbolic link to a folder above it (a link loop)")]


def test_fifo_is_never_opened(world, tmp_path):
    """A FIFO named like an image is left out by the listing: nothing ever opens it (that would
    block)."""
    d = copy_good(world, tmp_path / "train", 3)
    os.mkfifo(d / "x.jpg")
    ignored = []
    with deadline(10):
        listed = folders.list_images(str(d), ignored=ignored)
        ds = folders.ImageList([(p, -1) for p in listed], CLASSES, ["{}"], None)
        assert all(ds[i][0].size == (40, 40) for i in range(len(ds)))
    assert (listed == [str(d / f"{i}.png") for i in range(3)]
            and ignored == [(str(d / "x.jpg"), NOT_REGULAR)])


# (size of the file, size read_image returns): the long side is center-cropped to
# folders.MAX_ASPECT x the short side.
ASPECTS = [((1, 1000), (1, 4)), ((1000, 1), (4, 1)), ((10, 41), (10, 40)), ((50, 200), (50, 200)),
           ((40, 40), (40, 40)), ((3, 10000), (3, 12))]


@pytest.mark.parametrize("size,read", ASPECTS, ids=[f"{w}x{h}" for (w, h), _ in ASPECTS])
def test_extreme_aspect_is_cropped_so_memory_per_sample_is_bounded(size, read, tmp_path):
    path = tmp_path / "a.png"
    img = Image.new("RGB", size)
    img.putpixel((size[0] // 2, size[1] // 2), (255, 0, 0))  # the centre survives the center crop
    img.save(path)
    got = folders.read_image(str(path))
    assert got.size == read and max(read) <= folders.MAX_ASPECT * min(read)
    assert got.getpixel((read[0] // 2, read[1] // 2)) == (255, 0, 0)
    weak, strong, mask = data.TrainTransform(32, data.MaskGenerator(32, 16, 8, 0.3))(got)
    assert weak.shape == strong.shape == (3, 32, 32)


# -------------------------------------------------------------------------- too few readable images

def _text_files(d, names):
    for name in names:
        open(os.path.join(d, name), "w").write("not an image")


@pytest.mark.parametrize("workers", ["0", "2"])
def test_fewer_readable_images_than_one_batch_stops(world, tmp_path, workers):
    d = copy_good(world, tmp_path / "train", 3)
    _text_files(d, [f"9{i}.png" for i in range(5)])  # 3 readable of 8, global batch 4
    before = set(multiprocessing.active_children())
    message = train_error(argv(world, d, tmp_path / "out", "--num-workers", workers))
    assert ("only 3 of the 8 training images can be read: fewer than one global batch of 4 "
            "(see the warnings above)") in message
    # See test_no_readable_image_at_all_stops.
    assert set(multiprocessing.active_children()) <= before


@pytest.mark.parametrize("workers", ["0", "2"])
def test_no_readable_image_at_all_stops(world, tmp_path, workers):
    d = tmp_path / "train"
    d.mkdir()
    _text_files(d, ["a.png", "b.jpg", "c.png", "d.png"])
    before = set(multiprocessing.active_children())
    message = train_error(argv(world, d, tmp_path / "out", "--num-workers", workers))
    assert message.startswith(f"error: none of the 4 images can be read (e.g. {d}/"), message
    assert not os.path.exists(tmp_path / "out" / train.CHECKPOINT)
    # The run ended its loader workers: they ignore SIGTERM, and the worker's exception keeps the
    # loader alive in a reference cycle, so a worker left running made the process's exit wait for
    # it forever (the CLI hung here).
    assert set(multiprocessing.active_children()) <= before


@pytest.mark.parametrize("on_error", ["substitute", "skip"])
def test_image_list_substitutes_or_skips_and_flags_once(on_error, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(d / f"{i}.png")
    open(d / "1b.png", "w").write("bad")
    samples = [(str(d / n), k) for k, n in enumerate(["0.png", "1.png", "1b.png", "2.png"])]
    ds = folders.ImageList(samples, CLASSES, ["{}"], None, on_error)
    for attempt in range(2):
        if attempt:
            # Readable now, but the flag stands: a run treats a file the same way throughout.
            shutil.copy(d / "0.png", d / "1b.png")
        img, label = ds[2]
        if on_error == "substitute":
            assert (img.getpixel((0, 0)), label) == ((100, 0, 0), 3)  # 2.png, the next readable one
        else:
            assert (img.size, label) == ((1, 1), -1)  # blank, ignored by scoring
    assert ds.bad.tolist() == [0, 0, 1, 0]
    assert ds.bad_files() == [(2, str(d / "1b.png"), UNDECODABLE)]
    if on_error == "substitute":
        open(d / "2.png", "w").write("bad too")  # the last one: the substitute wraps to index 0
        assert ds[3][0].getpixel((0, 0)) == (0, 0, 0) and ds[3][1] == 0


# -------------------------------------------------------------------------------------- checkpoints

def _base(world, tmp):
    """A 1-step run (of 2) with its own copies of the model and class file, so that rows may change
    them in place."""
    shutil.copy(world / "tiny.pt", tmp / "model.pt")
    shutil.copy(world / "classes.txt", tmp / "classes.txt")
    out = tmp / "out"
    train.main(_ckpt_argv(world, tmp, out, "--max-steps", "1"))
    return out


def _ckpt_argv(world, tmp, out, *extra):
    return argv(world, world / "good", out, "--model", str(tmp / "model.pt"),
                "--classes", str(tmp / "classes.txt"), *extra)


def _truncate(world, tmp, ck):
    blob = open(ck, "rb").read()
    open(ck, "wb").write(blob[:len(blob) // 2])
    return []


def _resave(change):
    def mutate(world, tmp, ck):
        c = torch.load(ck, weights_only=True)
        torch.save(change(c), ck)
        return []
    return mutate


def _without(key):
    def change(c):
        c.pop(key)
        return c
    return change


def _student_without_proj(c):
    del c["student"]["visual.proj"]
    return c


def _other_dataset(c):
    c["args"]["data"] = "imagenet"
    return c


def _rewrite(name, text):
    def mutate(world, tmp, ck):
        (tmp / name).write_text(text)
        return []
    return mutate


def _flags(*flags):
    def mutate(world, tmp, ck):
        return [f.format(world=world, tmp=tmp, ck=ck) for f in flags]
    return mutate


def _templates(text):
    def mutate(world, tmp, ck):
        (tmp / "t.txt").write_text(text)
        return ["--templates", str(tmp / "t.txt")]
    return mutate


def _other_weights_same_path(world, tmp, ck):
    shutil.copy(world / "other.pt", tmp / "model.pt")
    return []


def _write_file(content):
    def mutate(world, tmp, ck):
        open(ck, "wb").write(content)
        return []
    return mutate


def _clip_state_dict(world, tmp, ck):
    shutil.copy(world / "tiny.pt", ck)
    return []


def _other_images(n, rename=False):
    """Resume with --data-root on a copy of the training images: n of them, and with one renamed if
    asked."""
    def mutate(world, tmp, ck):
        folder = copy_good(world, tmp / "images", n=min(n, 8))
        if n > 8:
            _png(folder / "extra.png", seed=99)
        if rename:
            os.rename(folder / "0.png", folder / "renamed.png")
        return ["--data-root", str(folder)]
    return mutate


def _other_spec(world, tmp, ck):
    """The same weights, said to be GELU's: another CLIP as far as the run can tell."""
    sd = torch.load(tmp / "model.pt", weights_only=True)
    gelu = clip_load.OPENAI_SPEC._replace(activation="gelu")
    torch.save({**sd, "open_clip_config": clip_load.config_note(gelu)}, tmp / "model.pt")
    return []


def _init_from(mutate_ck):
    """--init a copy of the base checkpoint (changed by mutate_ck) into a fresh out-dir."""
    def mutate(world, tmp, ck):
        init = tmp / "init.pt"
        shutil.copy(ck, init)
        extra = mutate_ck(world, tmp, str(init)) if mutate_ck else []
        return extra + ["--init", str(init), "--out-dir", str(tmp / "fresh")]
    return mutate


def _init_from_other_spec(world, tmp, ck):
    return _other_spec(world, tmp, ck) + _init_from(None)(world, tmp, ck)


def _init_then_other_model(world, tmp, ck):
    return _init_from(None)(world, tmp, ck) + ["--model", str(world / "other.pt")]


# (id, mutate(world, tmp, checkpoint path) -> extra flags, fragment; "{ck}" is the checkpoint,
# "{init}" the --init file)
CHECKPOINT_REFUSALS = [
    ("truncated", _truncate, "cannot read resume checkpoint {ck}: "),
    ("empty-file", _write_file(b""), "cannot read resume checkpoint {ck}: "),
    ("text-file", _write_file(b"step 1, trust me\n"), "cannot read resume checkpoint {ck}: "),
    ("a-list", _resave(lambda c: [1, 2]),
     "{ck} is not a MUST checkpoint written by train.py: "
     "it does not hold both 'student' and 'teacher' weights (it holds a list)"),
    ("no-fingerprints", _resave(_without("fingerprints")),
     "{ck} is not a MUST checkpoint written by this train.py"),
    ("clip-state-dict", _clip_state_dict,
     "{ck} holds a CLIP's weights, not a checkpoint written by train.py: give it as --model {ck}"),
    ("other-model-path", _flags("--model", "{world}/other.pt"),
     "resume checkpoint {ck} was made with other CLIP weights (--model); give the same ones"),
    ("other-weights-same-path", _other_weights_same_path,
     "resume checkpoint {ck} was made with other CLIP weights (--model)"),
    ("classes-reordered-same-path",
     _rewrite("classes.txt", "blue circle\nred square\ngreen cross\n"),
     "resume checkpoint {ck} was made with other class list (names or their order)"),
    ("classes-renamed", _rewrite("classes.txt", "red square\nblue circle\ngreen star\n"),
     "was made with other class list (names or their order)"),
    ("templates-changed", _templates("a photo of a {}.\n"),
     "resume checkpoint {ck} was made with other prompt templates"),
    ("other-activation-same-weights", _other_spec,
     "resume checkpoint {ck} was made with other CLIP activation, heads or image preprocessing"),
    ("templates-reordered", _templates("\n".join(data.DEFAULT_TEMPLATES[::-1])),
     "was made with other prompt templates"),
    ("other-dataset", _resave(_other_dataset),
     "resume checkpoint {ck} was trained on dataset 'imagenet', not 'folder'"),
    ("fewer-training-images", _other_images(7),
     "resume checkpoint {ck} was trained on other training images "
     "(8 -> 7 images under --data-root); resume on the same images"),
    ("more-training-images", _other_images(9),
     "was trained on other training images (8 -> 9 images"),
    ("other-training-files", _other_images(8, rename=True),
     "was trained on other training images "
     "(the same number of images (8), other files under --data-root)"),
    ("other-seed", _flags("--seed", "1"),
     "resume checkpoint {ck} was made with other settings (--seed 0 -> 1)"),
    ("other-lr", _flags("--base-lr", "2e-3"),
     "was made with other settings (--base-lr 0.001 -> 0.002)"),
    ("student-missing-a-tensor", _resave(_student_without_proj),
     "resume checkpoint {ck} does not fit this run ("),
    ("resume-a-directory", _flags("--resume", "{tmp}"), "no checkpoint at {tmp}"),
    ("init-truncated", _init_from(_truncate), "cannot read --init checkpoint {init}: "),
    ("init-clip-state-dict", _init_from(_clip_state_dict),
     "{init} holds a CLIP's weights, not a checkpoint"),
    ("init-other-model", _init_then_other_model,
     "--init checkpoint {init} was made with other CLIP weights (--model)"),
    ("init-other-activation", _init_from_other_spec,
     "--init checkpoint {init} was made with other CLIP activation, heads or image preprocessing"),
]


@pytest.mark.parametrize("kind,mutate,message", with_ids(CHECKPOINT_REFUSALS))
def test_checkpoint_refused_in_one_line_and_left_as_it_was(kind, mutate, message, world, tmp_path):
    out = _base(world, tmp_path)
    ck = out / train.CHECKPOINT
    extra = mutate(world, tmp_path, str(ck))
    before = open(ck, "rb").read()
    got = train_error(_ckpt_argv(world, tmp_path, out, *extra))
    assert message.format(ck=ck, init=tmp_path / "init.pt", tmp=tmp_path) in got
    assert open(ck, "rb").read() == before  # a refused run writes nothing over it
    assert not os.path.exists(tmp_path / "fresh" / train.CHECKPOINT)


def _copy_model_elsewhere(world, tmp, ck):
    (tmp / "elsewhere").mkdir()
    shutil.copy(tmp / "model.pt", tmp / "elsewhere" / "renamed.pt")
    return ["--model", str(tmp / "elsewhere" / "renamed.pt")]


def _copy_classes_elsewhere(world, tmp, ck):
    shutil.copy(tmp / "classes.txt", tmp / "same-classes.txt")
    return ["--classes", str(tmp / "same-classes.txt")]


_default_templates_as_file = _templates("# the default family, written out\n"
                                        + "\n".join(data.DEFAULT_TEMPLATES))


def _stale_tmp(world, tmp, ck):
    open(ck + ".tmp", "wb").write(b"half a checkpoint from a killed run")
    return []


def _other_workers_and_log_freq(world, tmp, ck):
    return ["--num-workers", "2", "--log-freq", "5"]


# Resumes by content: other paths with the same bytes, the default templates given as a file, a
# stale temp file, flags that do not define the run.
CHECKPOINT_ACCEPTED = [
    ("same-model-copied-elsewhere", _copy_model_elsewhere),
    ("same-classes-copied-elsewhere", _copy_classes_elsewhere),
    ("default-templates-as-a-file", _default_templates_as_file),
    ("stale-tmp-file-from-a-killed-write", _stale_tmp),
    ("other-workers-and-log-freq", _other_workers_and_log_freq),
    ("same-images-copied-elsewhere", _other_images(8)),
]


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    """The 2-step run the resumed ones must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("uninterrupted")
    train.main(argv(world, world / "good", out))
    return ckpt(out)


@pytest.mark.parametrize("kind,mutate", with_ids(CHECKPOINT_ACCEPTED))
def test_checkpoint_identity_is_by_content(kind, mutate, world, tmp_path, capsys, uninterrupted):
    out = _base(world, tmp_path)
    ck = out / train.CHECKPOINT
    extra = mutate(world, tmp_path, str(ck))
    capsys.readouterr()
    train.main(_ckpt_argv(world, tmp_path, out, *extra))
    assert f"resumed from {ck} at step 1 (epoch 0)" in capsys.readouterr().out
    assert ckpt(out)["step"] == 2 and not os.path.exists(str(ck) + ".tmp")
    assert same_weights(ckpt(out), uninterrupted)  # the same run, continued


def test_the_checkpoint_before_a_missing_or_unreadable_one_is_resumed(world, tmp_path, capsys,
                                                                    uninterrupted):
    """A truncated checkpoint.pt beside a good checkpoint.prev.pt: the error says how to resume
    from the one before. Moved away, the rerun resumes from it (it takes checkpoint.pt's place,
    and nothing deletes it before a newer one is written) and ends as an uninterrupted run."""
    out = _base(world, tmp_path)
    ck, prev = out / train.CHECKPOINT, out / train.PREVIOUS
    shutil.copy(ck, prev)
    _truncate(world, tmp_path, ck)
    message = train_error(_ckpt_argv(world, tmp_path, out))
    assert message.startswith(f"error: cannot read resume checkpoint {ck}: ")
    assert message.endswith(f"; the checkpoint before it, {prev} (step 1), can be read: move {ck} "
                            f"away and rerun the same command to resume from it"), message
    os.rename(ck, tmp_path / "truncated.pt")
    capsys.readouterr()
    train.main(_ckpt_argv(world, tmp_path, out))
    assert (f"{ck} is missing: resuming from the checkpoint before it\nresumed from {prev} at step "
            f"1 (epoch 0)\n") in capsys.readouterr().out
    assert ckpt(out)["step"] == 2 and same_weights(ckpt(out), uninterrupted)


def test_resuming_with_compile_toggled_says_the_weights_differ(world, tmp_path, capsys):
    """As for another process count: compiled kernels round differently (about 1e-9)."""
    out = _base(world, tmp_path)
    _resave(lambda c: {**c, "args": {**c["args"], "compile": True}})(world, tmp_path,
                                                                     out / train.CHECKPOINT)
    capsys.readouterr()
    train.main(_ckpt_argv(world, tmp_path, out))
    assert ("note: --compile is off in this run and was on in the checkpoint's: compiled and eager "
            "kernels round differently, so the weights will not be bit-identical to an "
            "uninterrupted run's\n") in capsys.readouterr().out


def test_starting_over_in_a_used_out_dir_says_so(world, tmp_path, capsys):
    out = _base(world, tmp_path)
    capsys.readouterr()
    train.main(_ckpt_argv(world, tmp_path, out, "--resume", "none", "--max-steps", "1"))
    assert (f"note: a new run starts in {out}: the log and any checkpoint of the run before are "
            f"replaced\n") in capsys.readouterr().out
    assert len(records(out, "config")) == 1


def test_init_needs_only_the_same_clip(world, tmp_path):
    """--init takes the image tower of a run on another class list (order): only the CLIP weights
    must match."""
    out = _base(world, tmp_path)
    (tmp_path / "reordered.txt").write_text("green cross\nred square\nblue circle\n")
    fresh = tmp_path / "fresh"
    train.main(_ckpt_argv(world, tmp_path, fresh, "--classes", str(tmp_path / "reordered.txt"),
                          "--init", str(out / train.CHECKPOINT), "--max-steps", "1"))
    assert (ckpt(fresh)["step"] == 1
            and ckpt(fresh)["classnames"] == ["green cross", "red square", "blue circle"])


# --------------------------------------------------------------------------------------------- lock

def test_second_lock_on_the_same_dir_is_refused(tmp_path):
    first = runtime.RunLock(str(tmp_path))
    try:
        with pytest.raises(SystemExit) as e:
            runtime.RunLock(str(tmp_path))
        message = str(e.value.code)
        assert message.startswith(f"error: {tmp_path} is in use by another run "
                                  f"(pid {os.getpid()} on {socket.gethostname()} since ")
        assert (message.endswith("); wait for it to finish or use another --out-dir")
                and "\n" not in message)
    finally:
        first.release()
    runtime.RunLock(str(tmp_path)).release()  # released: free again
    assert (tmp_path / "run.lock").read_text() == ""


def test_run_refused_while_another_process_holds_the_lock(world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(out / 'run.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, f'pid {os.getpid()} on elsewhere'.encode())\n"
         "print('held', flush=True)\nsys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        message = train_error(argv(world, world / "good", out))
        assert f"{out} is in use by another run (pid {holder.pid} on elsewhere)" in message
        assert sorted(os.listdir(out)) == ["run.lock"]  # no log, no head cache, no checkpoint
    finally:
        holder.communicate("", timeout=30)  # closing stdin ends the holder and drops its lock
    train.main(argv(world, world / "good", out, "--max-steps", "1"))  # free again
    assert ckpt(out)["step"] == 1


def test_stale_lock_is_taken_over_with_a_message(world, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.lock").write_text("pid 999999 on gone-host since 2000-01-01 00:00:00")
    capsys.readouterr()
    train.main(argv(world, world / "good", out, "--max-steps", "1"))
    assert ("taking over the lock of a run that ended without releasing it "
            "(pid 999999 on gone-host since 2000-01-01 00:00:00)") in capsys.readouterr().out
    assert (out / "run.lock").read_text() == ""  # released at the end, by this run


def test_lock_is_released_when_a_run_fails(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(must, "loss_mim", lambda *a, **k: torch.tensor(float("nan")))
    assert "non-finite loss" in train_error(argv(world, world / "good", out))
    capsys.readouterr()
    lock = runtime.RunLock(str(out))  # neither held nor stale
    lock.release()
    assert "taking over" not in capsys.readouterr().out


def test_a_failing_process_ends_the_whole_run_in_seconds(world, tmp_path):
    """torchrun, 2 gloo processes: rank 1 raises in its 3rd step (tests/inject_failure.py), as an
    out-of-memory error would, while rank 0 waits for it in a collective. Rank 0 stops with one line
    instead of a traceback, both abort their process groups, and the job exits non-zero within 30 s
    of the error (seen: about 2 s on this 2-core machine); the checkpoint of epoch 1 is intact."""
    out = tmp_path / "out"
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "inject_failure.py")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         script, "1", "3", *argv(world, world / "good", out, "--epochs", "2")],
        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    ended = time.time()
    assert result.returncode != 0
    assert "RuntimeError: injected failure on rank 1 at step 3" in result.stderr
    injected = float(result.stderr.split("injecting a failure at ")[1].split()[0])
    assert ended - injected < 30, f"the job ran {ended - injected:.1f} s after the error"
    assert ("error: another process of this run failed (its error is in the run's output) and "
            "this one stopped with it") in result.stderr
    assert "[rank0]: Traceback" not in result.stderr, result.stderr[-3000:]
    assert ckpt(out)["step"] == 2
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


# -------------------------------------------------------------------------------------- the out-dir

def _folder_named(name):
    def make(out, monkeypatch):
        (out / name).mkdir(parents=True)
        return (f"{out / name} is a folder, where the run writes a file: "
                "move it away or use another --out-dir")
    return make


def _little_disk(out, monkeypatch):
    """A disk with 1 MiB free: the tiny model's checkpoint is about 2 MiB, and two are kept."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1 << 20))
    return (f"--out-dir {out} has 1.0 MiB free, and this run needs about 3.9 MiB more for its "
            f"checkpoints (2.0 MiB each; the newest and the one before it are kept)")


# (id, make(out dir, monkeypatch) -> the message); refused after the model is built, before any
# evaluation or step.
OUT_DIR_PROBLEMS = [
    ("checkpoint-is-a-folder", _folder_named(train.CHECKPOINT)),
    ("previous-checkpoint-is-a-folder", _folder_named(train.PREVIOUS)),
    ("log-is-a-folder", _folder_named("log.jsonl")),
    ("checkpoint-temp-file-is-a-folder", _folder_named(train.CHECKPOINT + ".tmp")),
    ("previous-checkpoint-temp-file-is-a-folder", _folder_named(train.PREVIOUS + ".tmp")),
    ("no-room-for-two-checkpoints", _little_disk),
]


@pytest.mark.parametrize("kind,make", with_ids(OUT_DIR_PROBLEMS))
def test_out_dir_problems_are_found_before_any_work(kind, make, world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    message = make(out, monkeypatch)
    assert message in train_error(argv(world, world / "good", out))
    assert not os.path.isfile(out / "log.jsonl") and not os.path.isfile(out / train.CHECKPOINT)


def test_unreadable_data_root_is_one_line(world, tmp_path, monkeypatch):
    def denied(path):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(os, "listdir", denied)
    assert f"data root '{world / 'good'}' cannot be read (Permission denied)" in \
        train_error(argv(world, world / "good", tmp_path / "out"))


def test_checkpoint_size_estimate_is_close(world, tmp_path):
    """check_out_dir's estimate of a checkpoint's size, against the file a run writes (within
    5%)."""
    out = tmp_path / "out"
    run = {}
    real_start = train.start

    def start(r):
        run["bytes"] = checkpoint.checkpoint_bytes(r)
        return real_start(r)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train, "start", start)
        train.main(argv(world, world / "good", out, "--max-steps", "1"))
    assert os.path.getsize(out / train.CHECKPOINT) == pytest.approx(run["bytes"], rel=0.05)


def remove_after_the_first_step(out, monkeypatch):
    """The out-dir is deleted at the end of the run's first step."""
    real = must.ema_update

    def remove_out_dir(*a, **k):
        real(*a, **k)
        shutil.rmtree(out)
    monkeypatch.setattr(must, "ema_update", remove_out_dir)


def test_out_dir_removed_during_a_run_is_one_line(world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    remove_after_the_first_step(out, monkeypatch)
    assert (f"cannot append to {out / 'log.jsonl'} (No such file or directory); "
            f"was --out-dir {out} removed?"
            in train_error(argv(world, world / "good", out)))


def test_out_dir_removed_before_a_checkpoint_is_one_line(world, tmp_path, monkeypatch):
    """Removed when a checkpoint comes before the next log line: it is not made anew (without its
    lock or config record)."""
    out = tmp_path / "out"
    remove_after_the_first_step(out, monkeypatch)
    message = train_error(argv(world, world / "good", out, "--log-freq", "100", "--save-freq", "1"))
    assert message == (f"error: --out-dir {out} was removed during the run: nothing more is "
                       f"written (step 1 is not saved)")
    assert not os.path.exists(out)


def test_sizes_are_said_in_a_unit_they_fill():
    assert [runtime.size_text(n) for n in (0, 1023, 1024, 9.5 * 1024, 100_000, 1.2 * 2 ** 30,
                                           3 * 2 ** 40)] == [
        "0 B", "1023 B", "1.0 KiB", "9.5 KiB", "98 KiB", "1.2 GiB", "3.0 TiB"]


def test_a_killed_loader_worker_stops_the_run_with_the_steps_done_saved(world, tmp_path,
                                                                        monkeypatch):
    """The out-of-memory killer takes a loader worker (SIGKILL, here in the middle of step 1). Its
    death is found by the wait for one of its batches, between two steps, and not in the middle of
    one: the steps done are checkpointed, the run stops in one line, and the rerun ends as an
    uninterrupted run. 8 steps of one image, for the worker to have batches still to make."""
    before = set(multiprocessing.active_children())
    real, killed = must.ema_update, []

    def kill_a_worker(*a, **k):
        real(*a, **k)
        if not killed:
            worker = min(set(multiprocessing.active_children()) - before, key=lambda p: p.pid)
            os.kill(worker.pid, signal.SIGKILL)
            killed.append(worker.pid)
    monkeypatch.setattr(must, "ema_update", kill_a_worker)
    out, flags = tmp_path / "out", ("--global-batch", "1", "--num-workers", "2")
    message = train_error(argv(world, world / "good", out, *flags))
    step = ckpt(out)["step"]
    assert message.startswith("error: a data loader worker ended unexpectedly, most often killed "
                              "for lack of memory (lower --num-workers): "), message
    assert message.endswith(f"; {out / train.CHECKPOINT} holds step {step}; rerun the same "
                            f"command to resume"), message
    assert 1 <= step < 8 and set(multiprocessing.active_children()) <= before
    monkeypatch.setattr(must, "ema_update", real)
    train.main(argv(world, world / "good", out, *flags))
    train.main(argv(world, world / "good", tmp_path / "whole", "--global-batch", "1"))
    assert same_weights(ckpt(out), ckpt(tmp_path / "whole"))


# ---------------------------------------------------------------------------------------- full disk

def _make_disk_full(out):
    """save_atomic writes checkpoint.pt.tmp: as a link to /dev/full every write fails with a real
    ENOSPC."""
    os.symlink("/dev/full", out / (train.CHECKPOINT + ".tmp"))


needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")


@needs_dev_full
def test_full_disk_keeps_the_previous_checkpoint_and_stays_resumable(world, tmp_path):
    out = tmp_path / "out"
    train.main(argv(world, world / "good", out, "--max-steps", "1"))
    ck = out / train.CHECKPOINT
    before = open(ck, "rb").read()
    _make_disk_full(out)
    message = train_error(argv(world, world / "good", out))
    assert message == (f"error: could not write {ck} (the disk is full); "
                       "the previous one is intact"), message
    # No temp file is left behind.
    assert open(ck, "rb").read() == before and not os.path.lexists(str(ck) + ".tmp")
    train.main(argv(world, world / "good", out))  # space again: resumes from step 1
    assert ckpt(out)["step"] == 2


@needs_dev_full
def test_full_disk_before_any_checkpoint(world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _make_disk_full(out)
    message = train_error(argv(world, world / "good", out, "--max-steps", "1"))
    assert message.endswith("(the disk is full); no earlier one exists"), message
    assert (not os.path.lexists(out / train.CHECKPOINT)
            and not os.path.lexists(out / (train.CHECKPOINT + ".tmp")))


@needs_dev_full
def test_save_atomic_on_a_full_disk(tmp_path):
    path = str(tmp_path / "x.pt")
    runtime.save_atomic({"step": 1}, path)
    os.symlink("/dev/full", path + ".tmp")
    with pytest.raises(SystemExit) as e:
        runtime.save_atomic({"step": 2, "w": torch.zeros(10000)}, path)
    assert ("(the disk is full); " in str(e.value.code)
            and str(e.value.code).endswith("the previous one is intact"))
    assert torch.load(path, weights_only=True) == {"step": 1} and not os.path.lexists(path + ".tmp")


# ---------------------------------------------------------------------------------- shared memory

def _shm_free(monkeypatch, free):
    """/dev/shm with `free` bytes free, as a container's --shm-size would leave it."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real(p)._replace(free=free) if p == "/dev/shm" else real(p))


needs_dev_shm = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")


@needs_dev_shm
def test_too_little_shared_memory_for_the_workers_is_refused_before_any_work(world, tmp_path,
                                                                            monkeypatch):
    """Docker's default 64 MiB /dev/shm would end a run with a bus error at its first batch. The
    tiny world's evaluation batch (4 float32 images of 32 px) is the larger: 48 KiB and 32 bytes,
    2 in flight per worker, for each of the node's 4 processes."""
    _shm_free(monkeypatch, 100_000)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    out = tmp_path / "out"
    message = train_error(argv(world, world / "good", out, "--num-workers", "2"))
    need = 4 * 2 * 2 * 4 * (4 * 3 * 32 ** 2 + 8)
    assert need == 786_944  # 768.5 KiB
    assert message == ("error: /dev/shm has 98 KiB free, and the loader workers of this node's 4 "
                       "process(es) pass their batches through it: about 768 KiB (2 workers x 2 "
                       "batches of 48 KiB each); give it more room (docker run --shm-size 1g) or "
                       "lower --num-workers (0 loads in the process itself)")
    assert not os.path.exists(out / "log.jsonl")  # refused before any work
    train.main(argv(world, world / "good", out, "--num-workers", "0", "--max-steps", "1"))
    _shm_free(monkeypatch, need)
    train.main(argv(world, world / "good", out, "--num-workers", "2", "--max-steps", "2"))
    assert ckpt(out)["step"] == 2
    assert "/dev/shm has" in error_of(ev.main, [
        "--checkpoint", str(out / train.CHECKPOINT), "--device", "cpu", "--num-workers", "1",
        "--batch-size", "1000", "--out-dir", str(tmp_path / "eval")])


# -------------------------------------------------------------------------------- non-finite values

NONFINITE = [  # (loss term made non-finite, value, a checkpoint exists)
    ("loss_mim", float("nan"), True),
    ("loss_mim", float("inf"), False),
    ("loss_align", float("nan"), False),
    ("loss_align", float("-inf"), True),
]


@pytest.mark.parametrize("term,value,with_checkpoint", NONFINITE)
def test_non_finite_loss_never_reaches_a_checkpoint(term, value, with_checkpoint, world, tmp_path,
                                                    monkeypatch):
    out = tmp_path / "out"
    ck = out / train.CHECKPOINT
    if with_checkpoint:
        train.main(argv(world, world / "good", out, "--max-steps", "1"))
        before = open(ck, "rb").read()
    monkeypatch.setattr(must, term, lambda *a, **k: torch.tensor(value))
    message = train_error(argv(world, world / "good", out))
    # Optimizer steps count from 1; the check follows each step here.
    step = 2 if with_checkpoint else 1
    assert (f"non-finite loss in optimizer step(s) {step}-{step}; "
            "their updates are not saved; ") in message
    if with_checkpoint:  # no step was taken from it yet: not called good
        assert (f"the last checkpoint {ck} (step 1) "
                "holds the weights these steps started from") in message
        assert open(ck, "rb").read() == before
    else:
        assert message.endswith("no checkpoint was written yet") and not os.path.exists(ck)
    assert [r["step"] for r in records(out, "train")] == ([1] if with_checkpoint else [])


def _nan_from_call(n):
    """A loss_mim that is NaN from its n-th call on (one call per step here): steps before it are
    healthy."""
    real, calls = must.loss_mim, [0]

    def loss_mim(*a, **k):
        calls[0] += 1
        return real(*a, **k) if calls[0] < n else torch.tensor(float("nan"))
    return loss_mim


def test_a_checkpoint_is_good_once_a_healthy_step_followed_it(world, tmp_path, monkeypatch):
    """Checkpoint at step 2, step 3 healthy (checked at its log line), step 4 NaN: the checkpoint of
    step 2 is the last good one, and the one it replaced is gone."""
    out = tmp_path / "out"
    monkeypatch.setattr(must, "loss_mim", _nan_from_call(4))
    message = train_error(argv(world, world / "good", out, "--epochs", "2"))
    ck = out / train.CHECKPOINT
    assert message.endswith("non-finite loss in optimizer step(s) 4-4; "
                            "their updates are not saved; "
                            f"the last good checkpoint {ck} (step 2) is intact"), message
    assert ckpt(out)["step"] == 2 and not os.path.exists(out / train.PREVIOUS)


def test_the_checkpoint_before_is_kept_until_the_newest_is_known_good(world, tmp_path, monkeypatch):
    """Checkpoints at steps 1 and 2, step 3 NaN: nothing has shown the weights of step 2 good, so
    the checkpoint of step 1 is still on disk as checkpoint.prev.pt, and the message says which is
    which."""
    out = tmp_path / "out"
    monkeypatch.setattr(must, "loss_mim", _nan_from_call(3))
    message = train_error(argv(world, world / "good", out, "--epochs", "2", "--save-freq", "1"))
    ck, prev = out / train.CHECKPOINT, out / train.PREVIOUS
    assert (f"the last checkpoint {ck} (step 2) holds the weights these steps started from, "
            f"and {prev} the last known good ones; resuming repeats the same steps") in message
    assert ckpt(out)["step"] == 2
    assert torch.load(prev, map_location="cpu", weights_only=True)["step"] == 1


def test_non_finite_weights_after_finite_losses_never_reach_a_checkpoint(world, tmp_path,
                                                                         monkeypatch):
    """An update that overflows leaves a finite loss: the weights themselves are checked before
    every checkpoint. Here the teacher's projection becomes inf after step 1 (its pseudo-labels
    would then just stop being confident, with a loss of 0)."""
    out = tmp_path / "out"
    real = must.ema_update

    def overflowing(teacher, student, mu):
        real(teacher, student, mu)
        teacher.visual.proj.data[0, 0] = float("inf")
    monkeypatch.setattr(must, "ema_update", overflowing)
    message = train_error(argv(world, world / "good", out, "--max-steps", "1"))
    assert ("non-finite weights after optimizer step 1 although every loss was finite "
            "(an update overflowed: lower --base-lr); they are not saved; "
            "no checkpoint was written yet") in message
    assert not os.path.exists(out / train.CHECKPOINT)


@pytest.mark.parametrize("tensor,message", [
    ("text_projection",
     "the zero-shot head has non-finite values: the text tower of {model} is broken"),
    ("visual.proj", "non-finite loss in optimizer step(s) 1-1"),
])
def test_broken_clip_weights(tensor, message, world, tmp_path):
    sd = torch.load(world / "tiny.pt", weights_only=True)
    sd[tensor] = torch.full_like(sd[tensor], float("nan"))
    model = tmp_path / "broken.pt"
    torch.save(sd, model)
    out = tmp_path / "out"
    got = train_error(argv(world, world / "good", out, "--model", str(model)))
    assert message.format(model=model) in got
    assert not os.path.exists(out / train.CHECKPOINT)
    # It stopped before any step.
    assert not os.path.exists(out / "log.jsonl") or records(out, "train") == []


# --------------------------------------------------------------------------------------- evaluation

def test_folder_without_eval_root_trains_without_evaluation(world, tmp_path, capsys):
    out = tmp_path / "out"
    capsys.readouterr()
    assert train.main(argv(world, world / "good", out)) == []
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith("not evaluated: --data folder without --eval-root")
    assert records(out, "eval") == [] and ckpt(out)["evals"] == [] and ckpt(out)["step"] == 2


def _test_dir_with_faults(world, d):
    """The 6 labeled test images, one of them zero bytes, plus a dangling link: 5 to score."""
    shutil.copytree(world / "test", d)
    bad = d / CLASSES[1] / "4.png"
    open(bad, "wb").close()
    os.symlink(d / "nowhere.png", d / CLASSES[2] / "link.png")
    return bad, d / CLASSES[2] / "link.png"


@pytest.mark.parametrize("workers", ["0", "2"])
def test_training_evaluation_skips_unreadable_test_images(workers, world, tmp_path, capsys):
    bad, link = _test_dir_with_faults(world, tmp_path / "test")
    out = tmp_path / "out"
    capsys.readouterr()
    evals = train.main(argv(world, world / "good", out, "--eval-root", str(tmp_path / "test"),
                            "--num-workers", workers))
    printed = capsys.readouterr().out
    assert [e["epoch"] for e in evals] == [0, 1]
    # Evaluated twice, warned once.
    assert printed.count(f"warning: skipped test image {bad}: it {UNDECODABLE}\n") == 1
    assert f"warning: 1 test entries not listed: {DANGLING} (e.g. {link})\n" in printed
    for e in evals:  # accuracy over the 5 readable images: a multiple of 20 %
        for acc in (e["student_acc"], e["teacher_acc"]):
            assert acc * 5 / 100 == pytest.approx(round(acc * 5 / 100), abs=1e-4), acc
    assert records(out, "train")[-1]["skipped"] == 0  # test images are not training images


def test_training_evaluation_with_no_readable_test_image_is_one_line(world, tmp_path):
    test = tmp_path / "test"
    shutil.copytree(world / "test", test)
    for path in test.glob("*/*.png"):
        path.write_bytes(b"")
    assert train_error(argv(world, world / "good", tmp_path / "out", "--eval-root", str(test))) \
        == ("error: scored no image of the test set: all 6 images read were unreadable (see the "
            "warnings above)")


@pytest.mark.parametrize("workers", ["0", "2"])
def test_eval_py_skips_unreadable_files_and_reports_them(workers, world, tmp_path, capsys):
    bad, link = _test_dir_with_faults(world, tmp_path / "test")
    capsys.readouterr()
    report = ev.main(["--data", "folder", "--data-root", str(tmp_path / "test"),
                      "--classes", str(world / "classes.txt"),
                      "--model", str(world / "tiny.pt"), "--device", "cpu", "--batch-size", "4",
                      "--num-workers", workers, "--out-dir", str(tmp_path / "eval")])
    printed = capsys.readouterr().out
    assert printed.count(f"warning: skipped folder image {bad}: it {UNDECODABLE}\n") == 1
    assert f"warning: 1 folder entries not listed: {DANGLING} (e.g. {link})\n" in printed
    r = report["results"]["folder"]
    assert (r["images"], r["unreadable"], r["not_listed"]) == (5, 1, 1)
    with open(tmp_path / "eval" / "eval-folder.json") as f:
        saved = json.load(f)["results"]["folder"]
    assert (saved["images"], saved["unreadable"], saved["not_listed"]) == (5, 1, 1)
    top1 = saved["models"]["clip"]["top1"]
    # The top-1 accuracy is k of the 5 readable images.
    assert top1 / 20 == pytest.approx(round(top1 / 20), abs=1e-9), top1


def test_eval_py_scores_nothing_when_no_image_is_readable(world, tmp_path, capsys):
    """Nothing scored is an error, raised once the JSON report is written: its counts say why."""
    for i, name in enumerate(CLASSES[:2]):
        (tmp_path / "test" / name).mkdir(parents=True)
        # Empty, then text.
        open(tmp_path / "test" / name / f"{i}.png", "w").write("not an image" * i)
    argv_list = ["--data", "folder", "--data-root", str(tmp_path / "test"),
                 "--classes", str(world / "classes.txt"), "--model", str(world / "tiny.pt"),
                 "--device", "cpu", "--num-workers", "0", "--out-dir", str(tmp_path / "eval")]
    assert error_of(ev.main, argv_list) == ("error: scored no image of folder: all 2 images read "
                                            "were unreadable (see the warnings above)")
    with open(tmp_path / "eval" / "eval-folder.json") as f:
        r = json.load(f)["results"]["folder"]
    assert (r["images"], r["unreadable"], r["not_listed"]) == (0, 2, 0)
    assert r["models"]["clip"] == {"top1": None, "top5": None, "mean_per_class": None}
    assert capsys.readouterr().out.count("warning: skipped folder image ") == 2


def test_unreadable_files_are_warned_once_across_resumes(world, tmp_path, capsys):
    """The checkpoint remembers the files found unreadable: a resumed run neither warns again nor
    restarts the count."""
    folder = tmp_path / "imgs"
    shutil.copytree(world / "good", folder)
    (folder / "0.png").write_bytes(b"")
    out = tmp_path / "out"
    capsys.readouterr()
    train.main(argv(world, folder, out, "--max-steps", "1"))
    train.main(argv(world, folder, out))
    captured = capsys.readouterr()
    warning = f"warning: skipped training image {folder / '0.png'}"
    assert (captured.out + captured.err).count(warning) == 1
    assert [r["skipped"] for r in records(out, "train")] == [1, 1]
    assert ckpt(out)["unreadable"] == [0]


# ---- eval.py inputs and partial results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INET = prompts.DATASETS["imagenet"]["classes"]


def eval_argv(world, tmp, data_root, *extra):
    """eval.py on a --data folder, the tiny CLIP zero-shot; JSON and figures go to tmp/eval."""
    return ["--data", "folder", "--data-root", str(data_root),
            "--classes", str(world / "classes.txt"), "--model", str(world / "tiny.pt"),
            "--device", "cpu", "--num-workers", "0", "--out-dir", str(tmp / "eval"), *extra]


def ckpt_argv(ckpt_path, tmp, *extra):
    """eval.py scoring a MUST checkpoint (no zero-shot head to build); outputs go to tmp/eval."""
    return ["--checkpoint", str(ckpt_path), "--device", "cpu", "--num-workers", "0",
            "--batch-size", "4", "--out-dir", str(tmp / "eval"), *extra]


@pytest.fixture(scope="module")
def imagenet_ckpt(world):
    """A checkpoint laid out as train.py writes it, of a tiny 1000-way ImageNet model: it scores
    ImageNet-C and the shifted ImageNets without building a zero-shot head over 1000 classes."""
    torch.manual_seed(2)
    clip = tiny_clip()
    head = torch.nn.functional.normalize(torch.randn(clip.visual.output_dim, len(INET)), dim=0)
    state = must.MUSTModel(clip.visual, head, 100.0).state_dict()
    path = world / "imagenet-must.pt"
    torch.save({"student": state, "teacher": state, "classnames": INET,
                "args": {"data": "imagenet", "mask_unit": 16, "mask_ratio": 0.5}}, path)
    return path


def _class_images(folder, wnids, n=1):
    """folder/<wnid>/<j>.png: n random 40x40 PNGs per wnid."""
    for k, w in enumerate(wnids):
        os.makedirs(folder / w, exist_ok=True)
        for j in range(n):
            _png(folder / w / f"{j}.png", seed=10 * k + j)


# Flags and files eval.py refuses before any model is loaded: (flags, exact one-line error);
# "{tmp}" and "{file}" (an existing file) are filled in.
EVAL_FLAG_ERRORS = [
    (["--batch-size", "0"], "--batch-size 0 is not allowed: it must be at least 1"),
    (["--batch-size", "-4"], "--batch-size -4 is not allowed: it must be at least 1"),
    (["--num-workers", "-1"], "--num-workers -1 is not allowed: it must be 0 or more"),
    (["--limit", "0"], "--limit 0 is not allowed: it must be at least 1"),
    (["--figures", "-1"], "--figures -1 is not allowed: it must be 0 or more"),
    (["--out-dir", "{file}"], "--out-dir {file} cannot be created (File exists)"),
    (["--out-dir", "{file}/sub"], "--out-dir {file}/sub cannot be created (Not a directory)"),
    (["--json", "{tmp}"], "--json {tmp} is a folder: give the name of the JSON file to write"),
    (["--json", "{file}/eval.json"],
     "--json {file}/eval.json: its folder {file} cannot be created (File exists)"),
    (["--json", "{file}/sub/eval.json"],
     "--json {file}/sub/eval.json: its folder {file}/sub cannot be created (Not a directory)"),
    (["--checkpoint", "{tmp}/absent.pt"], "no checkpoint file at {tmp}/absent.pt"),
    (["--templates", "{tmp}/absent.txt"], "templates file '{tmp}/absent.txt' does not exist"),
]


@pytest.mark.parametrize("flags,message",
                         with_ids(EVAL_FLAG_ERRORS, lambda row: "_".join(row[0])))
def test_eval_py_bad_flag_is_one_line_before_any_model(flags, message, world, tmp_path,
                                                       monkeypatch):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setattr(ev, "load_models", lambda args: pytest.fail("a model was loaded"))
    flags = [_fill(f, world, tmp_path) for f in flags]
    assert error_of(ev.main, eval_argv(world, tmp_path, world / "test", *flags)) == \
        "error: " + _fill(message, world, tmp_path)
    assert (tmp_path / "a-file").read_text() == "not a folder"


# eval.py whose image reads take half a second each and name the process that reads.
SLOW_EVAL = """import os, sys, time
sys.path.insert(0, {repo!r})
import eval
from util import folders
real = folders.read_image
def read_image(path):
    with open({pids!r}, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    time.sleep(0.5)
    return real(path)
folders.read_image = read_image
eval.main(sys.argv[1:])
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=lambda s: s.name)
def test_eval_py_stops_on_a_signal_in_one_line_and_ends_its_workers(sig, world, tmp_path):
    """Sent to the whole process group, as Ctrl-C is, while both loader workers read: they ignore
    it, and eval.py ends them and exits 128 + signal with one line (the exit waited for them
    forever)."""
    pids, script = tmp_path / "pids", tmp_path / "slow_eval.py"
    script.write_text(SLOW_EVAL.format(repo=REPO, pids=str(pids)))
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n")
    flags = eval_argv(world, tmp_path, world / "test", "--num-workers", "2", "--batch-size", "1",
                      "--templates", str(tmp_path / "templates.txt"))
    proc = subprocess.Popen([sys.executable, str(script), *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        started = time.time()
        while len(set(pids.read_text().split()) if pids.exists() else ()) < 2:
            assert proc.poll() is None and time.time() - started < 120, proc.stderr.read()
            time.sleep(0.05)
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert f"\nstopped by {sig.name}\n" in err and "Traceback" not in err, err[-2000:]
    for pid in map(int, pids.read_text().split()):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize("tool", ["train", "eval"])
def test_a_must_checkpoint_given_as_model_says_where_it_goes(tool, world, imagenet_ckpt,
                                                             tmp_path):
    out, ck = tmp_path / "out", imagenet_ckpt
    if tool == "train":
        got = train_error(argv(world, world / "good", out, "--model", str(ck)))
        hint = ("give it as --init (with --model the CLIP it was trained from), or score it with "
                "eval.py --checkpoint")
    else:
        got = error_of(ev.main, _eval_argv(world, out, "--model", str(ck)))
        hint = "score it with --checkpoint"
    assert got == f"error: {ck} is a MUST checkpoint written by train.py, not a CLIP: {hint}"


def _saved(tmp_path, obj):
    torch.save(obj, tmp_path / "file.pt")
    return str(tmp_path / "file.pt")


CLIP_NOT_MUST = ("{path} holds a CLIP's weights, not a checkpoint written by train.py: give it "
                 "as --model {path}")
NOT_MUST = ("{path} is not a MUST checkpoint written by train.py: it does not hold both 'student' "
            "and 'teacher' weights")
# (kind, what --checkpoint is given, exact one-line error): files that are no train.py checkpoint.
EVAL_CHECKPOINT_ERRORS = [
    ("toy_clip", lambda world, tmp: os.path.join(REPO, "toy", "toy_clip.pt"), CLIP_NOT_MUST),
    ("tiny_clip", lambda world, tmp: str(world / "tiny.pt"), CLIP_NOT_MUST),
    ("other_dict", lambda world, tmp: _saved(tmp, {"step": 3, "epoch": 1}),
     NOT_MUST + " (its entries: step, epoch)"),
    ("student_only", lambda world, tmp: _saved(tmp, {"student": {}}),
     NOT_MUST + " (its entries: student)"),
    ("many_entries", lambda world, tmp: _saved(tmp, {f"k{i}": i for i in range(7)}),
     NOT_MUST + " (its entries: k0, k1, k2, k3, k4, ...)"),
    ("empty_dict", lambda world, tmp: _saved(tmp, {}), NOT_MUST + " (it holds an empty dict)"),
    ("tensor", lambda world, tmp: _saved(tmp, torch.zeros(3)), NOT_MUST + " (it holds a Tensor)"),
]


@pytest.mark.parametrize("kind,make,message", with_ids(EVAL_CHECKPOINT_ERRORS))
def test_eval_py_checkpoint_that_is_no_must_checkpoint(kind, make, message, world, tmp_path):
    path = make(world, tmp_path)
    assert error_of(ev.main, ckpt_argv(path, tmp_path)) == "error: " + message.format(path=path)


def _shift_root(tmp_path, broken=(), unreadable=()):
    """shift/imagenet-r and shift/imagenet-a, 2 wnids of one image each; a set in `broken` is an
    empty folder, one in `unreadable` holds zero-byte files only."""
    root = tmp_path / "shift"
    for name, wnids in (("imagenet-r", prompts.IMAGENET_R_WNIDS[:2]),
                        ("imagenet-a", prompts.IMAGENET_A_WNIDS[:2])):
        (root / name).mkdir(parents=True)
        if name not in broken:
            _class_images(root / name, wnids)
        if name in unreadable:
            for path in (root / name).glob("*/*.png"):
                path.write_bytes(b"")
    return root


def _shift(imagenet_ckpt, tmp_path, root, *extra):
    return ckpt_argv(imagenet_ckpt, tmp_path, "--shift", "--shift-root", str(root), *extra)


def test_eval_py_set_with_no_readable_image_is_a_warning(world, imagenet_ckpt, tmp_path, capsys):
    """One set scores nothing, the other scores: a warning, exit 0."""
    root = _shift_root(tmp_path, unreadable=["imagenet-a"])
    capsys.readouterr()
    res = ev.main(_shift(imagenet_ckpt, tmp_path, root))["results"]
    out = capsys.readouterr().out
    assert ("warning: scored no image of imagenet-a: all 2 images read were unreadable "
            "(see the warnings above)\n") in out
    a, r = res["imagenet-a"], res["imagenet-r"]
    assert (r["images"], a["images"], a["unreadable"]) == (2, 0, 2)
    assert a["models"]["student"]["top1"] is None


def test_eval_py_no_set_scored_is_an_error_after_the_report(world, imagenet_ckpt, tmp_path):
    root = _shift_root(tmp_path, unreadable=["imagenet-r", "imagenet-a"])
    assert error_of(ev.main, _shift(imagenet_ckpt, tmp_path, root)) == (
        "error: scored no image of any of the 2 sets: all 4 images read were unreadable "
        "(see the warnings above)")
    with open(tmp_path / "eval" / "eval-shift.json") as f:
        res = json.load(f)["results"]
    assert [(r["images"], r["unreadable"]) for r in res.values()] == [(0, 2), (0, 2)]


def _no_class_folders(folder):
    return f"no class folders in '{folder}': expected {folder}/<class name>/<images>"


def test_eval_py_empty_shifted_set_is_listed_and_the_others_scored(world, imagenet_ckpt,
                                                                   tmp_path, capsys):
    root = _shift_root(tmp_path, broken=["imagenet-a"])
    why = _no_class_folders(root / "imagenet-a")
    capsys.readouterr()
    report = ev.main(_shift(imagenet_ckpt, tmp_path, root))
    out = capsys.readouterr().out
    assert f"warning: imagenet-a is left out, the other sets are scored: {why}\n" in out
    assert f"missing from {root}: imagenet-a ({why})\n" in out
    assert list(report["results"]) == ["imagenet-r"]
    assert report["results"]["imagenet-r"]["images"] == 2
    assert report["missing"] == {"imagenet-a": why}
    with open(tmp_path / "eval" / "eval-shift.json") as f:
        assert json.load(f)["missing"] == {"imagenet-a": why}


def test_eval_py_shift_root_with_no_usable_set(world, imagenet_ckpt, tmp_path):
    root = _shift_root(tmp_path, broken=["imagenet-r", "imagenet-a"])
    assert error_of(ev.main, _shift(imagenet_ckpt, tmp_path, root)) == (
        f"error: nothing to score under --shift-root '{root}': imagenet-r: "
        f"{_no_class_folders(root / 'imagenet-r')} (and 1 more, named above)")


def _imagenet_c_root(tmp_path):
    """fog/1 scorable, fog/2 zero-byte files only, fog/3 empty, fog/4 a class folder without images,
    fog/7 (no severity), snow/1 a folder that is no wnid, speckle_noise (no benchmark corruption);
    the rest absent."""
    root = tmp_path / "imagenet-c"
    wnids = prompts.IMAGENET_WNIDS[:2]
    for s in ("1", "2", "7"):
        _class_images(root / "fog" / s, wnids)
    for path in (root / "fog" / "2").glob("*/*.png"):
        path.write_bytes(b"")
    (root / "fog" / "3").mkdir()
    (root / "fog" / "4" / wnids[0]).mkdir(parents=True)
    _class_images(root / "snow" / "1", ["cat"])
    _class_images(root / "speckle_noise" / "1", wnids)
    return root


def test_eval_py_imagenet_c_lists_unusable_parts_and_scores_the_rest(world, imagenet_ckpt,
                                                                     tmp_path, capsys):
    root = _imagenet_c_root(tmp_path)
    capsys.readouterr()
    report = ev.main(ckpt_argv(imagenet_ckpt, tmp_path, "--data", "imagenet-c",
                               "--data-root", str(root)))
    out = capsys.readouterr().out
    missing, fog3 = report["imagenet_c"]["missing"], _no_class_folders(root / "fog" / "3")
    assert missing["fog/3"] == fog3
    assert missing["fog/4"].startswith("no images (")
    assert f"'{root / 'fog' / '4'}'" in missing["fog/4"]
    assert "match no class" in missing["snow/1"]
    assert missing["fog/5"] == missing["brightness"] == missing["snow/2"] == "absent"
    assert len(missing) == 13 + 3 + 5  # 13 corruptions absent, fog/3..5, snow/1..5
    assert report["imagenet_c"]["ignored_folders"] == ["speckle_noise", "fog/7"]
    res, error = report["results"], report["imagenet_c"]["student"]["error"]["fog"]
    assert [(name, r["images"]) for name, r in res.items()] == [("fog/1", 2), ("fog/2", 0)]
    assert error["2"] is None and error["1"] is not None
    assert f"warning: ImageNet-C fog/3 is left out, the other sets are scored: {fog3}\n" in out
    assert ("warning: scored no image of fog/2: all 2 images read were unreadable "
            "(see the warnings above)\n") in out
    missing_line = next(line for line in out.splitlines() if line.startswith("missing from "))
    assert "brightness, " in missing_line and f"fog/3 ({fog3})" in missing_line
    assert ("ignored folders (not a benchmark corruption, or a severity outside 1-5): "
            "speckle_noise, fog/7\n") in out


def test_eval_py_imagenet_c_with_nothing_usable(world, imagenet_ckpt, tmp_path):
    root = tmp_path / "imagenet-c"
    (root / "fog" / "3").mkdir(parents=True)
    message = error_of(ev.main, ckpt_argv(imagenet_ckpt, tmp_path, "--data", "imagenet-c",
                                          "--data-root", str(root)))
    assert message == (f"error: nothing to score under ImageNet-C root '{root}': fog/3: "
                       f"{_no_class_folders(root / 'fog' / '3')}")


def _figure_rows(path):
    """Rows of a figures.compose_grid image: 128 px cells, 16 px captions, 4 px padding."""
    with Image.open(path) as img:
        rows, rest = divmod(img.height - 16 - 4, 128 + 16 + 4)
    assert rest == 0
    return rows


# (--figures N and flags, the test images made unreadable, rows drawn, the warning printed or None)
EVAL_FIGURES = [
    (["--figures", "3"], [], 3, None),
    (["--figures", "3"], ["blue circle/1.png", "red square/3.png"], 3, None),  # first, last pick
    (["--figures", "6"], ["blue circle/1.png", "red square/3.png"], 4, None),  # fewer than asked
    (["--figures", "3", "--limit", "1"], ["red square/3.png"], 3,  # a file scoring did not read
     "warning: figures: passed over 1 more unreadable image(s) of folder"),
]


@pytest.mark.parametrize("flags,broken,rows,warning", with_ids(
    EVAL_FIGURES, lambda row: "_".join(row[0]) + f"-{len(row[1])}-unreadable"))
def test_eval_py_figures_show_only_readable_images(flags, broken, rows, warning, world, tmp_path,
                                                   monkeypatch, capsys):
    shutil.copytree(world / "test", tmp_path / "test")
    for name in broken:
        (tmp_path / "test" / name).write_bytes(b"")
    drawn, real = [], figures.attention_cam
    monkeypatch.setattr(figures, "attention_cam",
                        lambda model, images, c: drawn.append(images) or real(model, images, c))
    capsys.readouterr()
    report = ev.main(eval_argv(world, tmp_path, tmp_path / "test", *flags))
    out = capsys.readouterr().out
    assert _figure_rows(report["figures"][0]) == rows
    blank = data.test_transform(32)(Image.new("RGB", (1, 1)))  # a skipped file's placeholder
    assert not any(torch.equal(image, blank) for image in drawn[0])
    assert (warning in out) if warning else "warning: figures" not in out


def test_eval_py_no_figures_when_their_set_has_no_readable_image(world, imagenet_ckpt, tmp_path,
                                                                  capsys):
    """The figures' set (the first that most models score: imagenet-r) has no readable image: a
    warning, no figures; the other set is scored."""
    root = _shift_root(tmp_path, unreadable=["imagenet-r"])
    capsys.readouterr()
    report = ev.main(_shift(imagenet_ckpt, tmp_path, root, "--figures", "2"))
    out = capsys.readouterr().out
    assert "warning: no figures: none of the 2 images of imagenet-r can be read\n" in out
    assert report["figures"] == [] and "\nfigures: " not in out
    assert report["results"]["imagenet-a"]["images"] == 2


# ------------------------------------------------------------- loading, listing and the head cache

class Program:
    """Unpickling this would call print: code from the file."""

    def __reduce__(self):
        return print, ("code from the file ran",)


def _bytes_file(content):
    def make(world, tmp):
        (tmp / "x.bin").write_bytes(content)
        return tmp / "x.bin"
    return make


def _pickled(protocol):
    def make(world, tmp):
        (tmp / "x.pkl").write_bytes(pickle.dumps({"visual.proj": Program()}, protocol))
        return tmp / "x.pkl"
    return make


def _state_dict(change):
    """A state dict made from tiny.pt's by change(sd) -> sd, saved with torch.save."""
    def make(world, tmp):
        sd = change(torch.load(world / "tiny.pt", weights_only=True))
        torch.save(sd, tmp / "sd.pt")
        return tmp / "sd.pt"
    return make


def _drop(*keys, **added):
    def change(sd):
        return {**{k: v for k, v in sd.items() if k not in keys}, **added}
    return change


def _resnet(sd):
    return {**_drop(*[k for k in sd if k.startswith("visual.")])(sd),
            "visual.conv1.weight": torch.zeros(8, 3, 3, 3),
            "visual.layer1.0.conv1.weight": torch.zeros(8)}


def _reshaped(sd):
    return {**sd, "visual.ln_post.weight": torch.zeros(3)}


def _linear(world, tmp):
    torch.save(torch.nn.Linear(2, 3).state_dict(), tmp / "sd.pt")
    return tmp / "sd.pt"


REFUSED = ("refused: it holds more than the tensors and plain values that can be read without "
           "running code from the file")
NOT_A_VIT = "{path}: not a CLIP ViT checkpoint: missing key"
DOES_NOT_FIT = "{path}: the state dict does not fit the CLIP its tensors describe:"

# (id, make(world, tmp) -> the file given as --model, fragment of the one-line error; "{path}" is
# the file). Stage "setup": nothing is written. Only a file that names code is called 'refused'.
LOAD_ERRORS = [
    ("random-bytes", _bytes_file(np.random.default_rng(0).bytes(4096)),
     "could not read {path}: it is truncated or not a checkpoint (torch.load: Unsupported "
     "operand "),
    ("empty-file", _bytes_file(b""), "could not read {path}: it is truncated or not a checkpoint "
     "(EOFError). If it was downloaded, delete it and download it again"),
    ("pickle-protocol-2-names-code", _pickled(2), "could not read {path}: " + REFUSED
     + " (Unsupported global: GLOBAL print was not an allowed global by default)"),
    ("pickle-protocol-5-names-code", _pickled(5), "could not read {path}: " + REFUSED
     + " (Unsupported operand 149)"),
    ("nn-linear", _linear, NOT_A_VIT + " 'visual.conv1.weight' (it holds 2 tensor(s): 'weight', "
     "'bias')"),
    ("vit-without-visual-proj", _state_dict(_drop("visual.proj")),
     NOT_A_VIT + " 'visual.proj' (it holds "),
    ("resnet-keys", _state_dict(_resnet), "{path}: ResNet CLIP checkpoints (RN50, RN101, ...) are "
     "not supported: MUST needs a ViT image tower"),
    ("missing-and-unexpected-keys", _state_dict(_drop("visual.ln_post.bias", "ln_final.bias",
                                                      **{"extra.weight": torch.zeros(1)})),
     DOES_NOT_FIT + " 2 key(s) missing ('visual.ln_post.bias', 'ln_final.bias'), 1 unexpected "
     "('extra.weight')"),
    ("a-tensor-of-another-shape", _state_dict(_reshaped),
     DOES_NOT_FIT + " 0 key(s) missing, 0 unexpected, 1 of another shape ('visual.ln_post.weight': "
     "(3,) in the file, (64,) in the model)"),
    ("activation-not-said", _state_dict(_drop("open_clip_config")),
     "{path}: it holds a CLIP's weights but not its activation (GELU or QuickGELU) or image "
     "normalization, which a state dict cannot store: put the open_clip_config.json it came with "
     "beside it, or load it by name"),
    ("a-config-it-cannot-follow",
     _state_dict(_drop(open_clip_config='{"preprocess_cfg": {"resize_mode": "longest"}}')),
     "{path}'s open_clip_config note: preprocess_cfg.resize_mode is \"longest\", not one of"),
]


def _eval_argv(world, out, *extra):
    return ["--data", "folder", "--data-root", str(world / "test"), "--classes",
            str(world / "classes.txt"), "--device", "cpu", "--num-workers", "0",
            "--out-dir", str(out), *extra]


@pytest.mark.parametrize("tool", ["train", "eval"])
@pytest.mark.parametrize("kind,make,message", with_ids(LOAD_ERRORS))
def test_model_file_error_says_what_the_file_is(kind, make, message, tool, world, tmp_path, capsys):
    path = make(world, tmp_path)
    out = tmp_path / "out"
    if tool == "train":
        got = train_error(argv(world, world / "good", out, "--model", str(path)))
    else:
        got = error_of(ev.main, _eval_argv(world, out, "--model", str(path)))
    assert message.format(path=path) in got, got
    assert ("refused" in got) == ("refused" in message), got
    assert "code from the file ran" not in capsys.readouterr().out
    left = sorted(os.listdir(out)) if os.path.isdir(out) else []
    assert "log.jsonl" not in left and train.CHECKPOINT not in left, left


# The zero-shot head cache: out/head-<key>.pt, written and read like a checkpoint.

def _head_file(out):
    heads = [name for name in os.listdir(out) if name.startswith("head-")]
    assert len(heads) == 1, heads
    return heads[0]


@pytest.fixture(scope="module")
def fresh_head(world, tmp_path_factory):
    """A 1-step run that computed its head: (out-dir, the head file's name)."""
    out = tmp_path_factory.mktemp("fresh-head")
    train.main(argv(world, world / "good", out, "--max-steps", "1"))
    assert _head_file(out).endswith(".pt")
    return out, _head_file(out)


def _truncated_head(good):
    return good[:len(good) // 2]


def _garbage_head(good):
    return np.random.default_rng(1).bytes(len(good))


def _head_of_another_shape(good):
    buffer = io.BytesIO()
    torch.save(torch.zeros(3, 3), buffer)
    return buffer.getvalue()


# (id, bad cache content from the good one, the reason in the warning, or None: torch's own words)
BAD_HEADS = [
    ("truncated", _truncated_head, None),
    ("garbage", _garbage_head,
     "it is truncated or not a checkpoint (torch.load: Unsupported operand "),
    ("another-shape", _head_of_another_shape,
     "it holds a torch.float32 tensor of shape (3, 3), not a float32 tensor of shape (32, 3)"),
]


@pytest.mark.parametrize("kind,damage,why", with_ids(BAD_HEADS))
def test_unreadable_head_cache_is_computed_again(kind, damage, why, world, tmp_path, capsys,
                                                 fresh_head):
    fresh, name = fresh_head
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(damage((fresh / name).read_bytes()))
    capsys.readouterr()
    train.main(argv(world, world / "good", out, "--max-steps", "1"))
    printed = capsys.readouterr().out
    warning = f"warning: the cached zero-shot head {out / name} is unreadable ("
    assert printed.count(warning) == 1, printed
    line = printed[printed.index(warning):].split("\n")[0]
    assert line.endswith("); computing it again") and (why is None or why in line), line
    rebuilt, computed = (torch.load(d / name, weights_only=True) for d in (out, fresh))
    assert torch.equal(rebuilt, computed)
    assert same_weights(ckpt(out), ckpt(fresh)) and not os.path.lexists(out / (name + ".tmp"))
    capsys.readouterr()
    train.main(argv(world, world / "good", tmp_path / "again", "--max-steps", "1"))
    assert "cached zero-shot head" not in capsys.readouterr().out


@needs_dev_full
def test_full_disk_while_writing_the_head_cache(world, tmp_path, fresh_head):
    _, name = fresh_head
    out = tmp_path / "out"
    out.mkdir()
    os.symlink("/dev/full", out / (name + ".tmp"))
    message = train_error(argv(world, world / "good", out, "--max-steps", "1"))
    assert message == (f"error: could not write {out / name} (the disk is full); no earlier one "
                       "exists")
    assert not os.path.lexists(out / (name + ".tmp")) and not os.path.lexists(out / name)
    assert "log.jsonl" not in os.listdir(out) and train.CHECKPOINT not in os.listdir(out)


# Folders that cannot be listed: os.walk leaves them out silently unless asked to report them.

FOLDER_DENIED = "folder cannot be read (permission denied)"


def _patch_unreadable_folders(monkeypatch, *names):
    """As root chmod 000 does not stop listing: deny listing the folders of these names as the
    kernel would (os.walk and scan_class_folders list with os.scandir)."""
    real_scandir = os.scandir

    def scandir(path="."):
        if os.path.basename(os.fspath(path)) in names:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)


def test_unreadable_training_subfolder_is_reported(world, tmp_path, monkeypatch, capsys):
    d = copy_good(world, tmp_path / "train", 8)
    copy_good(world, d / "locked", 2)
    _patch_unreadable_folders(monkeypatch, "locked")
    capsys.readouterr()
    train.main(argv(world, d, tmp_path / "out", "--max-steps", "1"))
    printed = capsys.readouterr().out
    warning = f"warning: 1 training entries not listed: {FOLDER_DENIED} (e.g. {d / 'locked'})\n"
    assert warning in printed
    assert "MUST on folder: 8 images," in printed


def test_unreadable_class_folder_is_reported_by_train_and_eval(world, tmp_path, monkeypatch,
                                                               capsys):
    test = tmp_path / "test"
    shutil.copytree(world / "test", test)
    _patch_unreadable_folders(monkeypatch, CLASSES[2])
    capsys.readouterr()
    train.main(argv(world, world / "good", tmp_path / "out", "--eval-root", str(test),
                    "--max-steps", "1"))
    reason = f"entries not listed: {FOLDER_DENIED} (e.g. {test / CLASSES[2]})\n"
    assert capsys.readouterr().out.count(f"warning: 1 test {reason}") == 1
    report = ev.main(_eval_argv(world, tmp_path / "eval", "--model", str(world / "tiny.pt"),
                                "--data-root", str(test)))
    assert f"warning: 1 folder {reason}" in capsys.readouterr().out
    r = report["results"]["folder"]
    assert (r["images"], r["unreadable"], r["not_listed"]) == (4, 0, 1)


def test_no_readable_class_folder_is_one_line(world, tmp_path, monkeypatch):
    test = tmp_path / "test"
    shutil.copytree(world / "test", test)
    _patch_unreadable_folders(monkeypatch, *CLASSES)
    message = train_error(argv(world, world / "good", tmp_path / "out", "--eval-root", str(test)))
    assert message.endswith(f"in the class folders of {str(test)!r}; 3 entries left out, e.g. "
                            f"{test / CLASSES[1]}: {FOLDER_DENIED}"), message
    _patch_unreadable_folders(monkeypatch, "test")  # the eval root itself
    message = train_error(argv(world, world / "good", tmp_path / "out", "--eval-root", str(test)))
    assert message == f"error: cannot list the class folders of {str(test)!r} (permission denied)"


def test_unreadable_training_root_is_named_in_the_error(world, tmp_path, monkeypatch):
    d = copy_good(world, tmp_path / "train", 8)
    _patch_unreadable_folders(monkeypatch, "train")
    with pytest.raises(FileNotFoundError) as e:
        data.build_dataset("folder", str(d), "train", None, str(world / "classes.txt"))
    assert str(e.value).endswith(f"found under {str(d)!r}; 1 entries left out, e.g. {d}: "
                                 f"{FOLDER_DENIED}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists a chmod 000 folder (simulated above)")
def test_chmod_000_folders_are_reported(world, tmp_path):
    d = copy_good(world, tmp_path / "train", 2)
    copy_good(world, d / "sub", 2)
    test = tmp_path / "test"
    shutil.copytree(world / "test", test)
    os.chmod(d / "sub", 0)
    os.chmod(test / CLASSES[0], 0)
    try:
        ignored = []
        assert folders.list_images(str(d), ignored=ignored) == [str(d / "0.png"), str(d / "1.png")]
        assert ignored == [(str(d / "sub"), FOLDER_DENIED)]
        ignored = []
        samples = folders.scan_class_folders(str(test), "folder", CLASSES, ignored)
        assert len(samples) == 4 and ignored == [(str(test / CLASSES[0]), FOLDER_DENIED)]
    finally:
        os.chmod(d / "sub", 0o755)
        os.chmod(test / CLASSES[0], 0o755)
