"""eval.py on tiny generated folder trees: the class mapping of every shifted ImageNet layout
(checked with an oracle model that reads the label from the pixel colour), ImageNet-C's mCE against
a hand computation, mean per-class accuracy, GradCAM == the model's own forward, the CLI end to end
with a tiny CLIP and MUST checkpoints built here (figures written, JSON complete), transductive
ImageNet-R checkpoints, one-line errors."""
import argparse
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import clip_model
import config
import data
import eval as ev
import figures
import must
import prompts
from util import runtime
import train
from conftest import save_clip, tiny_clip
from util import clip_load

WNIDS = prompts.IMAGENET_WNIDS
R_WNIDS, A_WNIDS = prompts.IMAGENET_R_WNIDS, prompts.IMAGENET_A_WNIDS
MEAN = torch.tensor(clip_load.CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(clip_load.CLIP_STD).view(1, 3, 1, 1)


def color_of(c):
    """ImageNet index c -> an RGB colour that survives resize/crop/normalize exactly (checked:
    constant images)."""
    return (c % 250, (c // 250) * 60, 128)


def save_image(folder, name, c, size=(40, 36)):
    os.makedirs(folder, exist_ok=True)
    image = Image.fromarray(np.full((size[1], size[0], 3), color_of(c), np.uint8))
    image.save(os.path.join(folder, name), format="PNG")  # lossless whatever the name's extension


class ColorOracle(torch.nn.Module):
    """1000-way logits, one-hot at the ImageNet class encoded in the image's colour."""

    def forward(self, images):
        # (B, 3) RGB of a corner
        pix = ((images[:, :, 0, 0] * STD.view(1, 3) + MEAN.view(1, 3)) * 255).round()
        c = (pix[:, 0] + 250 * (pix[:, 1] / 60)).long()
        return must.MUSTOutput(torch.nn.functional.one_hot(c, 1000).float() * 10)


def tiny_must(num_classes, seed):
    torch.manual_seed(seed)
    clip = tiny_clip()
    head = torch.nn.functional.normalize(torch.randn(clip.visual.output_dim, num_classes), dim=0)
    return must.MUSTModel(clip.visual, head, 100.0)


def save_checkpoint(path, dataset, classnames, clip_path, data_root):
    student, teacher = tiny_must(len(classnames), 1), tiny_must(len(classnames), 2)
    clip_state = clip_model.load(str(clip_path))[0].state_dict()
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(), "step": 3,
                "epoch": 1,
                "args": {"data": dataset, "model": str(clip_path), "data_root": str(data_root),
                         "mask_unit": 16, "mask_ratio": 0.5},
                "classnames": list(classnames),
                "fingerprints": {"model": runtime.fingerprint(clip_state)}}, path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_world")
    torch.manual_seed(0)
    save_clip(tiny_clip(), root / "clip.pt")
    (root / "templates.txt").write_text("a photo of a {}.\n")
    imagenet_classes = prompts.DATASETS["imagenet"]["classes"]
    r_classes = data.dataset_prompts("imagenet-r")[0]
    # ImageNet val: 3 classes x 2 images
    for c in (0, 5, 999):
        for j in range(2):
            save_image(root / "imagenet" / "val" / WNIDS[c], f"{j}.png", c)
    # shift root: V2 class-index folders (nested like the release tarball),
    # R / A wnid subsets, Sketch nested
    shift = root / "shift"
    v2 = shift / "imagenetv2-matched-frequency" / "imagenetv2-matched-frequency-format-val"
    for c in (3, 500):
        save_image(v2 / str(c), "a.jpeg", c)
    for w in (R_WNIDS[0], R_WNIDS[7], R_WNIDS[199]):
        for j in range(2):
            save_image(shift / "imagenet-r" / w, f"{j}.jpg", WNIDS.index(w))
    for w in (A_WNIDS[1], A_WNIDS[100]):
        save_image(shift / "imagenet-a" / w, "x.jpg", WNIDS.index(w))
    for c in (10, 20):
        save_image(shift / "ImageNet-Sketch" / "sketch" / WNIDS[c], "s.JPEG", c)
    (shift / "notes").mkdir()  # an unrelated folder is left alone
    # ImageNet-C: 2 corruptions complete, 1 with severity 4 missing, an extra (non-benchmark) folder
    inc = root / "imagenet-c"
    for corruption, severities in (("gaussian_noise", (1, 2, 3, 4, 5)), ("fog", (1, 2, 3, 4, 5)),
                                   ("jpeg_compression", (1, 2, 3, 5)), ("speckle_noise", (1,))):
        for s in severities:
            for c in (1, 2):
                save_image(inc / corruption / str(s) / WNIDS[c], "i.png", c)
    ckpt = save_checkpoint(root / "in1k.pt", "imagenet", imagenet_classes, root / "clip.pt",
                           root / "imagenet")
    ckpt_r = save_checkpoint(root / "r.pt", "imagenet-r", r_classes, root / "clip.pt",
                             shift / "imagenet-r")
    return {"root": root, "clip": root / "clip.pt", "templates": root / "templates.txt",
            "shift": shift, "imagenet": root / "imagenet", "imagenet_c": inc, "ckpt": ckpt,
            "ckpt_r": ckpt_r}


def run(world, tmp_path, *argv):
    args = ["--num-workers", "0", "--batch-size", "4", "--out-dir", str(tmp_path), "--templates",
            str(world["templates"]), *map(str, argv)]
    return ev.main(args)


def error_of(world, tmp_path, *argv):
    with pytest.raises(SystemExit) as e:
        run(world, tmp_path, *argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# --------------------------------------------------------------------------------------------------
# class mapping


def test_columns_restrict_imagenet_head_to_r_and_a_by_wnid():
    for subset in (R_WNIDS, A_WNIDS):
        cols = ev.columns_for(WNIDS, subset)
        assert cols.tolist() == [WNIDS.index(w) for w in subset] and len(cols) == 200
    # a transductive ImageNet-R head is already 200-way
    assert ev.columns_for(R_WNIDS, R_WNIDS) is None
    with pytest.raises(ValueError, match="lacks"):
        ev.columns_for(R_WNIDS, A_WNIDS)  # an ImageNet-R head cannot score ImageNet-A
    r_names = data.dataset_prompts("imagenet-r")[0]
    assert ev.class_ids("imagenet-r", r_names) == R_WNIDS
    assert ev.class_ids("imagenet", prompts.DATASETS["imagenet"]["classes"]) == WNIDS
    assert ev.class_ids("pets", ["Abyssinian", "beagle"]) == ["abyssinian", "beagle"]


def test_every_shift_layout_maps_labels_right(world):
    """An oracle that is always right must score 100% on every layout iff folders and logits are
    mapped right."""
    found = ev.find_shift_sets(str(world["shift"]))
    assert [(n, k) for n, k, _ in found] == [("imagenet-v2", "imagenet-v2"),
                                             ("imagenet-r", "imagenet-r"),
                                             ("imagenet-a", "imagenet-a"),
                                             ("imagenet-sketch", "imagenet-sketch")]
    transform = data.test_transform(32)
    sets = [ev.build_set(n, k, p, transform) for n, k, p in found]
    assert [len(s.ids) for s in sets] == [1000, 200, 200, 1000]
    assert [len(s.dataset) for s in sets] == [2, 6, 2, 2]
    columns = {(i, "oracle"): ev.columns_for(WNIDS, s.ids) for i, s in enumerate(sets)}
    counts, speed = ev.evaluate({"oracle": ColorOracle()}, sets, columns, torch.device("cpu"),
                                batch_size=3, num_workers=0)
    for i, s in enumerate(sets):
        m = counts[(i, "oracle")].metrics()
        assert m["images"] == len(s.dataset) and m["top1"] == 100.0 and m["top5"] == 100.0, (
            s.name, m)
    # the same oracle read through unrestricted 1000-way logits
    # would put ImageNet-R labels in the wrong space
    wrong = {(1, "oracle"): None}
    with pytest.raises(ValueError, match="1000 logits for the 200 classes"):
        ev.evaluate({"oracle": ColorOracle()}, sets, wrong, torch.device("cpu"), num_workers=0)


def test_limit_keeps_evenly_spaced_images(world):
    ds = ev.build_set("imagenet-r", "imagenet-r", str(world["shift"] / "imagenet-r"),
                      data.test_transform(32))
    tagged = ev.shard([ds.dataset, ds.dataset], limit=3)
    assert len(tagged) == 6 and tagged.dataset.datasets[0].indices == [0, 2, 5]
    assert tagged[4][2] == 1
    # Process 1 of 2 holds every other item of the whole, whichever set it is in.
    second = ev.shard([ds.dataset, ds.dataset], limit=3, rank=1, world=2)
    assert list(second.indices) == [1, 3, 5] and [item[2] for item in second] == [0, 1, 1]


# --------------------------------------------------------------------------------------------------
# metrics


def test_counts_top1_top5_and_mean_per_class():
    c = ev.Counts(3)
    # class 0: 3 images, 2 right; class 1: 1 image, wrong (right at rank 2);
    # class 2: none; one unknown label
    top5 = np.array([[0, 1, 2], [0, 2, 1], [1, 0, 2], [2, 1, 0], [0, 1, 2]])
    labels = np.array([0, 0, 0, 1, -1])
    c.add(top5, labels)
    m = c.metrics()
    assert m["images"] == 4
    assert m["top1"] == pytest.approx(100 * 2 / 4)
    assert m["top5"] == pytest.approx(100.0)
    # classes without images do not count
    assert m["mean_per_class"] == pytest.approx(100 * (2 / 3 + 0) / 2)


def test_mce_matches_hand_computation():
    errors = {"gaussian_noise": {1: 10.0, 2: 20.0, 3: 30.0, 4: 40.0, 5: 50.0},
              "brightness": {s: 28.2296 for s in ev.SEVERITIES},
              "fog": {1: 5.0, 2: 5.0, 3: 5.0, 5: 5.0}}  # severity 4 missing: no CE
    out = ev.corruption_errors(errors)
    ce_gauss = 30.0 / 0.886428  # mean error 30 % over AlexNet's 88.6428 %
    ce_bright = 28.2296 / 0.564592  # = 50.0
    assert out["ce"]["gaussian_noise"] == pytest.approx(ce_gauss) == pytest.approx(
        33.8437, abs=1e-4)
    assert out["ce"]["brightness"] == pytest.approx(50.0)
    assert "fog" not in out["ce"] and out["corruptions_scored"] == 2 and not out["complete"]
    assert out["mce"] == pytest.approx((ce_gauss + ce_bright) / 2)
    alexnet = {c: {s: 100 * a for s in ev.SEVERITIES} for c, a in ev.ALEXNET_ERR.items()}
    full = ev.corruption_errors(alexnet)
    assert full["complete"] and full["mce"] == pytest.approx(100.0)  # AlexNet itself has mCE 100


# --------------------------------------------------------------------------------------------------
# figures' building blocks


def test_gradcam_recomputes_the_models_own_forward():
    model = tiny_must(7, 3).eval()
    images = torch.randn(3, 3, 32, 32)
    cam, pred, logits = figures.attention_cam(model, images)
    with torch.no_grad():
        expected = model(images).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert (cam.shape == (3, 4, 4) and cam.min() >= 0 and cam.max() <= 1
            and (pred == expected.argmax(1)).all())
    cols = torch.tensor([6, 2])
    _, pred2, logits2 = figures.attention_cam(model, images, cols)
    torch.testing.assert_close(logits2, expected[:, cols], atol=1e-4, rtol=1e-4)


def test_mim_triplets_keep_visible_pixels():
    model = tiny_must(5, 4).eval()
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :4] = True  # first row of patches
    original, masked, recovered = figures.mim_triplets(model, images, mask)
    assert torch.equal(original, images)
    assert torch.equal(masked[:, :, 8:], images[:, :, 8:]) and (masked[:, :, :8] == 0).all()
    assert torch.equal(recovered[:, :, 8:], images[:, :, 8:])
    _, _, recon = model.visual.forward_must(images, mask)
    torch.testing.assert_close(recovered[:, :, :8], recon[:, :, :8].detach())


# --------------------------------------------------------------------------------------------------
# the command line


def test_cli_checkpoint_with_clip_row_json_and_figures(world, tmp_path, capsys):
    report = run(world, tmp_path, "--data", "imagenet", "--data-root", world["imagenet"],
                 "--checkpoint", world["ckpt"], "--model", world["clip"], "--figures", "3",
                 "--mean-per-class")
    out = capsys.readouterr().out
    assert report["models"] == ["clip", "student", "teacher"]
    r = report["results"]["imagenet"]
    assert r["images"] == 6 and r["classes"] == 1000 and r["metric"] == "mean_per_class"
    for name in ("clip", "student", "teacher"):
        m = r["models"][name]
        assert m["top1"] <= m["top5"] and m["mean_per_class"] is not None
        # k of the 6 images
        assert (m["top1"] * 6 / 100) == pytest.approx(round(m["top1"] * 6 / 100))
    assert "student top1" in out and "images/s" in out
    with open(tmp_path / "eval-imagenet.json") as f:
        assert json.load(f)["results"]["imagenet"]["models"]["teacher"] == r["models"]["teacher"]
    assert len(report["figures"]) == 2
    for path in report["figures"]:
        assert os.path.getsize(path) > 0
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width > 3 * 128 and img.height > 3 * 128
    # zero-shot only (no checkpoint): CLIP's numbers;
    # the checkpoint's own dataset and root by default
    zs = run(world, tmp_path, "--data", "imagenet", "--data-root", world["imagenet"],
             "--model", world["clip"], "--json", tmp_path / "zs.json")
    assert zs["models"] == ["clip"] and os.path.isfile(tmp_path / "zs.json")
    # same head, same images
    assert zs["results"]["imagenet"]["models"]["clip"] == r["models"]["clip"]
    own = run(world, tmp_path, "--checkpoint", world["ckpt"], "--json", tmp_path / "own.json")
    assert own["results"]["imagenet"]["models"]["student"] == r["models"]["student"]


def test_cli_shift_scores_every_present_set(world, tmp_path):
    report = run(world, tmp_path, "--shift", "--shift-root", world["shift"],
                 "--checkpoint", world["ckpt"], "--model", world["clip"])
    res = report["results"]
    assert list(res) == ["imagenet-v2", "imagenet-r", "imagenet-a", "imagenet-sketch"]
    assert [res[k]["classes"] for k in res] == [1000, 200, 200, 1000]
    assert all(set(r["models"]) == {"clip", "student", "teacher"} for r in res.values())
    assert os.path.isfile(tmp_path / "eval-shift.json")


def test_cli_transductive_imagenet_r_checkpoint(world, tmp_path):
    """A checkpoint trained on ImageNet-R's unlabeled images has a 200-way head: scored as is on
    ImageNet-R; sets whose classes it lacks are reported as not scored."""
    report = run(world, tmp_path, "--checkpoint", world["ckpt_r"])  # its own data and root
    r = report["results"]["imagenet-r"]
    assert r["classes"] == 200 and r["images"] == 6 and set(r["models"]) == {"student", "teacher"}
    shift = run(world, tmp_path, "--shift", "--shift-root", world["shift"],
                "--checkpoint", world["ckpt_r"])
    assert shift["results"]["imagenet-r"]["models"]["student"] == r["models"]["student"]
    assert set(shift["not_scored"]) == {"imagenet-v2", "imagenet-a", "imagenet-sketch"}
    assert list(shift["results"]) == ["imagenet-r"]  # sets no model can score are not even loaded
    assert "lacks" in shift["not_scored"]["imagenet-a"]["student"]


def test_cli_zero_shot_single_shift_set_and_pets_mean_per_class(world, tmp_path, capsys):
    only_r = tmp_path / "only-r"
    shutil.copytree(world["shift"] / "imagenet-r", only_r / "imagenet-rendition")
    report = run(world, tmp_path, "--shift", "--shift-root", only_r, "--model", world["clip"])
    assert (list(report["results"]) == ["imagenet-r"]
            and report["results"]["imagenet-r"]["models"]["clip"])
    pets = tmp_path / "pets"
    # folder spellings map by name
    for i, name in enumerate(("Abyssinian", "american_bulldog", "Bengal")):
        for j in range(i + 1):
            save_image(pets / "test" / name, f"{j}.png", 10 * i + j)
    capsys.readouterr()
    report = run(world, tmp_path, "--data", "pets", "--data-root", pets, "--model", world["clip"],
                 "--limit", "5")
    r = report["results"]["pets"]
    # Pets: paper's metric
    assert r["metric"] == "mean_per_class" and r["images"] == 5 and r["classes"] == 37
    assert "mpc" in capsys.readouterr().out


def test_train_then_eval_transductive_imagenet_r(world, tmp_path):
    """The real contract: train.py on ImageNet-R's unlabeled images with an ImageNet warm-up
    (--init, Table 9), then eval.py scores the same images with the run's 200-way head."""
    train.main(["--data", "imagenet-r", "--data-root", str(world["shift"] / "imagenet-r"),
                "--model", str(world["clip"]), "--init", str(world["ckpt"]),
                "--templates", str(world["templates"]),
                "--global-batch", "2", "--epochs", "1", "--max-steps", "1", "--mask-unit", "16",
                "--num-workers", "0", "--out-dir", str(tmp_path / "run")])
    report = ev.main(["--checkpoint", str(tmp_path / "run" / train.CHECKPOINT),
                      "--num-workers", "0"])
    r = report["results"]["imagenet-r"]
    assert report["trained_on"] == "imagenet-r" and r["classes"] == 200 and r["images"] == 6
    assert set(r["models"]) == {"student", "teacher"}
    assert os.path.isfile(tmp_path / "run" / "eval-imagenet-r.json")


def test_cli_imagenet_c_reports_missing_and_mce(world, tmp_path, capsys):
    report = run(world, tmp_path, "--data", "imagenet-c", "--data-root", world["imagenet_c"],
                 "--checkpoint", world["ckpt"])
    out = capsys.readouterr().out
    c = report["imagenet_c"]
    assert ("jpeg_compression/4" in c["missing"] and "snow" in c["missing"]
            and len(c["missing"]) == 13)
    assert c["ignored_folders"] == ["speckle_noise"]
    s = c["student"]
    assert set(s["ce"]) == {"gaussian_noise", "fog"} and not s["complete"]
    assert set(s["error"]["jpeg_compression"]) == {"1", "2", "3", "5"}
    err = s["error"]["fog"]
    assert s["ce"]["fog"] == pytest.approx(sum(err.values()) / 5 / 0.819324)
    assert s["mce"] == pytest.approx((s["ce"]["fog"] + s["ce"]["gaussian_noise"]) / 2)
    rows = [line for line in out.splitlines()
            if line.split()[:1] and line.split()[0] in ev.ALEXNET_ERR]
    assert len(rows) == 2 * 15  # one row per corruption, student and teacher tables
    assert "partial: 2/15" in out and "missing from" in out


def test_cli_errors_are_one_line(world, tmp_path):
    assert "does not exist" in error_of(world, tmp_path, "--data", "imagenet-r", "--data-root",
                                        tmp_path / "nowhere", "--checkpoint", world["ckpt"])
    bad = tmp_path / "bad-r"
    save_image(bad / "not_a_class", "x.png", 1)
    assert "match no class" in error_of(world, tmp_path, "--data", "imagenet-r", "--data-root", bad,
                                        "--checkpoint", world["ckpt"])
    assert "no shifted ImageNet" in error_of(world, tmp_path, "--shift", "--shift-root", bad,
                                             "--checkpoint", world["ckpt"])
    assert "no ImageNet-C corruption" in error_of(world, tmp_path, "--data", "imagenet-c",
                                                  "--data-root", bad, "--checkpoint", world["ckpt"])
    broken = tmp_path / "broken-c"
    save_image(broken / "fog" / "1" / "cat", "x.png", 1)
    assert "fog/1" in error_of(world, tmp_path, "--data", "imagenet-c", "--data-root", broken,
                               "--checkpoint", world["ckpt"])
    assert "no checkpoint file" in error_of(world, tmp_path, "--checkpoint", tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_text("junk")
    assert "cannot read MUST checkpoint" in error_of(world, tmp_path, "--checkpoint",
                                                     tmp_path / "junk.pt")
    assert "unknown dataset" in error_of(world, tmp_path, "--data", "imagenet-x",
                                         "--data-root", bad, "--checkpoint", world["ckpt"])
    assert "--shift-root" in error_of(world, tmp_path, "--shift", "--checkpoint", world["ckpt"])
    assert "not both" in error_of(world, tmp_path, "--shift", "--data", "imagenet",
                                  "--checkpoint", world["ckpt"])
    assert "--data-root" in error_of(world, tmp_path, "--data", "imagenet-r",
                                     "--checkpoint", world["ckpt"])


def test_every_flag_has_help():
    """--help explains every flag: a flag added without a help text fails here (argparse would list
    it bare)."""
    for parser_of in (ev.parse_args, config.parse_args):
        actions = []
        real = argparse.ArgumentParser.parse_args
        argparse.ArgumentParser.parse_args = lambda self, argv=None: actions.extend(self._actions)
        try:
            parser_of([])
        finally:
            argparse.ArgumentParser.parse_args = real
        bare = [a.option_strings for a in actions
                if a.option_strings and not (a.help or "").strip()]
        assert len(actions) > 10 and not bare, bare


def test_figures_show_images_with_the_clip_s_own_normalization():
    """to_pil undoes the normalization the CLIP's spec gives: a normalized 0 is its mean colour."""
    zero = torch.zeros(3, 4, 4)
    openai = figures.to_pil(zero).getpixel((0, 0))
    half = clip_load.OPENAI_SPEC._replace(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert openai == tuple(round(255 * m) for m in clip_load.CLIP_MEAN)
    assert figures.to_pil(zero, half).getpixel((0, 0)) == (128, 128, 128)
