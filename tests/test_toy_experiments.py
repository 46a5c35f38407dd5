"""toy_experiments.py: its probes agree with what train.py reports, the ablation table's shape and
reuse of finished runs, and the picture of the world."""
import numpy as np
import pytest
from PIL import Image

from toy import world as toy
from tools import toy_experiments as experiments
import train


def test_probes_agree_with_train(tiny_world, tmp_path):
    out = tmp_path / "run"
    evals = train.main(["--data", "toy", "--out-dir", str(out), "--num-workers", "0",
                        "--device", "cpu"])
    checkpoint = str(out / "checkpoint.pt")
    images, labels = toy.render_split("test")
    # the ablation's val scores come from these functions:
    # on test they must give what train.py reported
    student, teacher = (
        experiments.accuracy(experiments.load(checkpoint, which)[0], images, labels)
        for which in ("student", "teacher"))
    assert (student, teacher) == pytest.approx((evals[-1]["student_acc"], evals[-1]["teacher_acc"]))
    assert experiments.accuracy(experiments.load(toy.WEIGHTS)[0], images, labels) == pytest.approx(
        evals[0]["student_acc"])
    r = experiments.probe(checkpoint, "teacher")
    assert r["head_target"] == pytest.approx(teacher)  # the probe's own path to the same classifier
    assert {"head_source", "knn10_target", "linear_probe_target", "head_target_masked"} <= r.keys()
    assert (sum(r["masked_class_share"]) == pytest.approx(1)
            and len(r["masked_class_share"]) == len(toy.SHAPES))
    assert r["pass_0.5"] >= r["pass_0.7"] >= r["pass_0.9"]  # a higher threshold passes a subset
    r = experiments.probe(toy.WEIGHTS)
    assert (r["head_target"] == pytest.approx(evals[0]["student_acc"])
            and "head_target_masked" not in r)


def test_ablation_table(tiny_world, tmp_path):
    table = experiments.ablation([0], str(tmp_path / "abl"), extra=["--num-workers", "0"])
    test, val = table.split("\n\n")
    for part, split in ((test, "test"), (val, "val")):
        assert part.startswith(f"toy world, target {split} top-1")
        first_words = [line.split()[0] for line in part.splitlines()[2:]]
        assert first_words == ["zero-shot", "self-training", "+", "+", "+"]
    assert (tmp_path / "abl" / "ablation.txt").read_text() == table + "\n"
    assert (tmp_path / "abl" / "must_seed0" / "checkpoint.pt").is_file()
    # a finished run is resumed, not redone
    again = experiments.ablation([0], str(tmp_path / "abl"), extra=["--num-workers", "0"])
    assert again == table
    # ... but only under the settings it was made with
    # (else a changed default would reuse stale runs)
    stale = rf"other settings \(--mask-ratio {toy.HPARAMS['mask_ratio']} -> 0.25\)"
    with pytest.raises(SystemExit, match=stale):
        train.main(["--data", "toy", "--out-dir", str(tmp_path / "abl" / "must_seed0"),
                    "--num-workers", "0", "--mask-ratio", "0.25"])


def test_world_grid(tmp_path):
    experiments.main(["show", "--out", str(tmp_path / "world.png")])
    grid = np.asarray(Image.open(tmp_path / "world.png"))
    cell = 3 * toy.IMAGE_SIZE
    assert grid.shape == (4 * cell, len(toy.SHAPES) * cell, 3)
    # column k shows class k:
    # the top-left cell of each half is the first scene of class 0, in its domain
    a = toy.sample_attributes(2 * len(toy.SHAPES), 123)
    a["label"] = np.repeat(np.arange(len(toy.SHAPES)), 2)
    for row, domain in ((0, "source"), (2, "target")):
        expected = toy.render(a, domain)[0].repeat(3, 0).repeat(3, 1)
        assert np.array_equal(grid[row * cell:(row + 1) * cell, :cell], expected)
