"""The toy world: determinism, classes and captions, domains, the pinned pixels and recipe, the
committed tiny CLIP, pretraining, the dataset API and a seconds-long `train.py --data toy` run
(mechanics, and the zero-shot start)."""
import hashlib
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

import clip_model
import data
from toy import world as toy
from tools import toy_experiments
import config
from util import tokenizer

# What the committed toy_clip.pt, the README's numbers and docs/toy.md's were made on. If an edit of
# toy/world.py changes WORLD_DIGEST, those numbers are another world's: remeasure them, then
# update it. RECIPE_DIGESTS maps each toy.RECIPE to what it names: after an edit of the source
# world or of PRETRAIN, give toy.RECIPE a new value, rerun
# `python -m tools.toy_experiments pretrain --out toy/toy_clip.pt`, and add the new pair.
WORLD_DIGEST = "a2327bb7b3887c8f0a0382311e9c49bc3735301333ba7edb37f084504cc474bd"
RECIPE_DIGESTS = {"f273c18e9c": "ba2b7adf1a12d11b96b77a6732a59211c41464985dbe61befb91f393c8bc2ee8"}


def test_render_is_deterministic_and_chunk_independent(monkeypatch):
    monkeypatch.setattr(toy, "CHUNK", 16)
    a, la = toy.render_split("train", 40)
    b, lb = toy.render_split("train", 40)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    c, lc = toy.render_split("train", 10, start=12)  # straddles a chunk boundary
    assert np.array_equal(c, a[12:22]) and np.array_equal(lc, la[12:22])
    d, _ = toy.render_split("test", 40)
    assert not np.array_equal(a, d)  # splits never share images
    assert a.dtype == np.uint8 and a.shape == (40, toy.IMAGE_SIZE, toy.IMAGE_SIZE, 3)
    with pytest.raises(ValueError, match="split"):
        toy.render_split("valid")


def test_the_world_is_the_one_measured():
    h = hashlib.sha256(repr((toy.SPLIT_SIZES, toy.SPLIT_SEEDS, toy.CHUNK)).encode())
    for split in ("source", "train", "val", "test"):
        images, labels = toy.render_split(split, 100)
        h.update(images.tobytes())
        h.update(labels.tobytes())
    assert h.hexdigest() == WORLD_DIGEST, "the splits' pixels changed: see WORLD_DIGEST's comment"


def recipe_digest():
    """SHA-256 of what toy.RECIPE names: PRETRAIN and its first batch (pixels, captions and
    augmented views)."""
    cfg = toy.PRETRAIN
    a = toy.sample_attributes(cfg["batch_size"], [1000 + cfg["seed"], 0])
    images = toy.render(a, "source")
    torch.manual_seed(cfg["seed"])
    view = data.strong_view(toy.IMAGE_SIZE, cfg["augment"])
    views = np.stack([np.asarray(view(Image.fromarray(x))) for x in images[:16]])
    texts = "\n".join(toy.caption(a, i) for i in range(len(images)))
    h = hashlib.sha256(repr(sorted(cfg.items())).encode())
    for part in (images.tobytes(), views.tobytes(), texts.encode()):
        h.update(part)
    return h.hexdigest()


def test_recipe_names_what_it_covers(monkeypatch):
    assert RECIPE_DIGESTS.get(toy.RECIPE) == recipe_digest(), "see RECIPE_DIGESTS' comment"
    monkeypatch.setitem(toy.PRETRAIN, "steps", 1999)  # any edit of the recipe shows
    assert recipe_digest() != RECIPE_DIGESTS[toy.RECIPE]


def test_classes_and_captions():
    # every class renders to a distinct silhouette at the same place and size
    n = len(toy.SHAPES)
    a = toy.sample_attributes(n, 0)
    a.update(label=np.arange(n), size=np.full(n, 2), angle=np.zeros(n), jitter=np.zeros((n, 2)),
             color=np.full(n, list(toy.COLORS).index("black")), background=np.zeros(n, int))
    a["bg_rgb"][:] = 1.0
    a["light"][:] = (0.625, 0.5)  # neutral exposure: contrast 1, brightness 0
    dark = toy.render(a, "source").mean(-1) < 100  # (n, H, W) masks
    for i in range(n):
        assert dark[i].sum() > 30, toy.SHAPES[i]
        for j in range(i):
            iou = (dark[i] & dark[j]).sum() / (dark[i] | dark[j]).sum()
            assert iou < 0.85, (toy.SHAPES[i], toy.SHAPES[j])
    a = toy.sample_attributes(200, 3)
    for i in range(200):
        words = " " + toy.caption(a, i) + " "
        size, color, bg = a["mention"][i]
        assert f" {toy.SHAPES[a['label'][i]]} " in words  # the class is always named
        assert (f" {list(toy.COLORS)[a['color'][i]]} " in words) == color
        assert (f" {list(toy.SIZES)[a['size'][i]]} " in words) == size
        assert (f" on a {toy.BACKGROUNDS[a['background'][i]]} background " in words) == bg
        assert " a a" not in words and " a o" not in words  # "an arrow", "an orange ..."
    # the longest caption fits the tiny CLIP's context
    longest = max((f"a picture of a {s} {c} {k} on a {b} background"
                   for s in toy.SIZES for c in toy.COLORS
                   for k in toy.SHAPES for b in toy.BACKGROUNDS), key=len)
    tokenizer.tokenize(longest, context_length=toy.PRETRAIN["model"]["context_length"])


def test_domains_differ():
    a = toy.sample_attributes(64, 0)
    a["light"][:] = (0.625, 0.5)  # neutral exposure, so that "dark" means the ink outline
    src, tgt = toy.render(a, "source").astype(float), toy.render(a, "target").astype(float)
    assert np.abs(src - tgt).mean() > 3
    # target: a dark ink outline around every shape
    # (source has no pixel that dark unless the shape is black)
    not_black = a["color"] != list(toy.COLORS).index("black")
    assert (src.mean(-1).min(axis=(1, 2))[not_black] > 70).all()
    assert (tgt.mean(-1).min(axis=(1, 2))[not_black] < 60).mean() > 0.9
    # and film grain on every pixel, not only on the outline
    assert np.median(np.abs(tgt - src)) > 2
    with pytest.raises(ValueError, match="domain"):
        toy.render(a, "sketch")


def test_target_scenes_are_close_ups():
    a = toy.sample_attributes(toy.CHUNK, [toy.SPLIT_SEEDS["test"], 0])
    assert set(a["size"]) == set(range(len(toy.SIZES)))  # source scenes mix every size
    large = dict(a, size=np.full(toy.CHUNK, list(toy.SIZES).index(toy.TARGET_SIZE)))
    # whatever the size says
    assert np.array_equal(toy.render(a, "target"), toy.render(large, "target"))
    assert not np.array_equal(toy.render(a, "source"), toy.render(large, "source"))
    images, labels = toy.render_split("test", n=6)
    assert np.array_equal(images, toy.render({k: v[:6] for k, v in a.items()}, "target"))
    assert np.array_equal(labels, a["label"][:6])


def test_dataset_api(tiny_world):
    ds = data.build_dataset("toy", None, "test", data.test_transform(toy.IMAGE_SIZE))
    images, labels = toy.render_split("test")
    assert len(ds) == 40 and ds.classnames == toy.SHAPES and ds.templates == toy.TEMPLATES
    x, y = ds[5]
    expected = data.test_transform(toy.IMAGE_SIZE)(Image.fromarray(images[5]))
    assert y == labels[5] and torch.equal(x, expected)
    assert len(toy.build_dataset(None, "train")) == 48
    val = toy.build_dataset(None, "val")  # labeled target too, but other images than test's
    assert len(val) == 40 and not np.array_equal(np.asarray(val[0][0]), images[0])
    with pytest.raises(ValueError, match="split"):
        toy.build_dataset(None, "valid")
    hp = config.hparams("toy", "anything")
    # a copy: train.py's overrides never reach the module
    assert hp == toy.HPARAMS and hp is not toy.HPARAMS
    assert data.default_model("toy") == toy.WEIGHTS


def test_committed_weights():
    """toy_clip.pt is this RECIPE's tiny CLIP, a few MB, loads as it is, and keeps exactly the token
    rows toy texts use; rewriting its weights gives the file byte for byte, as
    `python -m tools.toy_experiments pretrain` writes it."""
    assert os.path.getsize(toy.WEIGHTS) < 5e6
    stored = torch.load(toy.WEIGHTS, map_location="cpu", weights_only=True)
    assert stored["recipe"] == toy.RECIPE, (
        "toy_clip.pt is another recipe's: rerun python -m tools.toy_experiments pretrain")
    model, _ = clip_model.load(toy.WEIGHTS)
    assert model.visual.input_resolution == toy.IMAGE_SIZE and model.context_length == 20
    assert torch.equal(stored["token_embedding.ids"], toy_experiments.toy_token_ids(20))
    buffer = io.BytesIO()
    torch.save(toy_experiments.stored_state(model), buffer)
    with open(toy.WEIGHTS, "rb") as f:
        assert buffer.getvalue() == f.read()


def test_pretrain_deterministic(tiny_world, tmp_path):
    torch.set_num_threads(1)
    toy_experiments.main(["pretrain", "--out", str(tmp_path / "a.pt")])
    toy_experiments.main(["pretrain", "--out", str(tmp_path / "b" / "b.pt")])
    # whatever the file's name
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b" / "b.pt").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "b"]  # no temporary file left behind
    model, _ = clip_model.load(str(tmp_path / "a.pt"))
    assert model.visual.input_resolution == toy.IMAGE_SIZE and model.visual.transformer.layers == 1
    # the kept token rows are exactly those toy texts use:
    # every caption and prompt encodes as with all rows
    stored = torch.load(tmp_path / "a.pt", weights_only=True)
    ids = tokenizer.tokenize([toy.caption(toy.sample_attributes(50, 9), i) for i in range(50)] +
                             [t.format(k) for t in toy.TEMPLATES for k in toy.SHAPES],
                             context_length=20)
    assert torch.isin(ids, stored["token_embedding.ids"]).all()
    kept_rows = (model.token_embedding.weight.abs().sum(1) > 0).sum()
    assert kept_rows == len(stored["token_embedding.ids"])


def test_train_toy_end_to_end(tiny_world, tmp_path):
    import train
    out = tmp_path / "run"
    evals = train.main(["--data", "toy", "--out-dir", str(out), "--num-workers", "0",
                        "--device", "cpu", "--log-freq", "1"])
    assert [e["epoch"] for e in evals] == [0, 1]
    assert (out / "checkpoint.pt").is_file() and (out / "log.jsonl").is_file()
    # the run starts from the committed CLIP, which reads the target far above chance
    # (10%; 62% on all 2,000)
    assert evals[0]["student_acc"] > 30
