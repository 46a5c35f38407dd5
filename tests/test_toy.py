"""The toy world: determinism, classes and captions, domains, dataset API, pretraining, and a seconds-long
`train.py --data toy` run (mechanics only, never accuracy)."""
import os

import numpy as np
import pytest
import torch

import clip_model
import toy

TINY_PRETRAIN = dict(toy.PRETRAIN, model=dict(toy.PRETRAIN["model"], vision_width=32, vision_layers=1, embed_dim=16,
                                               transformer_width=32, transformer_layers=1),
                     steps=3, batch_size=8, warmup=1)


@pytest.fixture
def tiny_world(monkeypatch):
    """Small splits and a 3-step tiny CLIP, so whole runs take seconds."""
    monkeypatch.setattr(toy, "CHUNK", 32)
    monkeypatch.setitem(toy.SPLIT_SIZES, "train", 48)
    monkeypatch.setitem(toy.SPLIT_SIZES, "test", 40)
    monkeypatch.setitem(toy.SPLIT_SIZES, "val", 40)
    monkeypatch.setitem(toy.SPLIT_SIZES, "source", 40)
    monkeypatch.setattr(toy, "PRETRAIN", TINY_PRETRAIN)
    for key, value in (("batch_size", 16), ("epochs", 1), ("eval_freq", 1)):
        monkeypatch.setitem(toy.HPARAMS, key, value)  # the dict data.register_dataset holds


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


def test_classes_and_captions():
    assert len(toy.SHAPES) >= 10 and len(set(toy.SHAPES)) == len(toy.SHAPES)
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
    longest = max((f"a picture of a {s} {c} {k} on a {b} background" for s in toy.SIZES for c in toy.COLORS
                   for k in toy.SHAPES for b in toy.BACKGROUNDS), key=len)
    clip_model.tokenize(longest, context_length=toy.PRETRAIN["model"]["context_length"])
    assert all("{}" in t for t in toy.TEMPLATES)


def test_domains_differ():
    a = toy.sample_attributes(64, 0)
    a["light"][:] = (0.625, 0.5)  # neutral exposure, so that "dark" means the ink outline
    src, tgt = toy.render(a, "source").astype(float), toy.render(a, "target").astype(float)
    assert np.abs(src - tgt).mean() > 3
    # target: a dark ink outline around every shape (source has no pixel that dark unless the shape is black)
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
    source = toy.target_scene({k: v.copy() for k, v in a.items()}, "source")
    assert all(np.array_equal(v, a[k]) for k, v in source.items())  # source scenes are left as drawn
    close = toy.target_scene({k: v.copy() for k, v in a.items()}, "target")
    assert (close["size"] == list(toy.SIZES).index(toy.TARGET_SIZE)).all()
    assert all(np.array_equal(v, a[k]) for k, v in close.items() if k != "size")  # only the size changes
    images, labels = toy.render_split("test", n=6)
    assert np.array_equal(images, toy.render({k: v[:6] for k, v in close.items()}, "target"))
    assert np.array_equal(labels, a["label"][:6])


def test_dataset_api(tiny_world, tmp_path):
    import data
    ds = data.build_dataset("toy", str(tmp_path), "test", data.test_transform(toy.IMAGE_SIZE))
    assert len(ds) == 40 and ds.classnames == toy.SHAPES and ds.templates == toy.TEMPLATES
    x, y = ds[0]
    assert x.shape == (3, toy.IMAGE_SIZE, toy.IMAGE_SIZE) and 0 <= y < len(toy.SHAPES)
    assert any(f.startswith("toy_test_") for f in os.listdir(tmp_path))  # cached
    again = toy.build_dataset(str(tmp_path), "test")
    assert np.array_equal(np.asarray(again[5][0]), np.asarray(toy.build_dataset(None, "test")[5][0]))
    train = toy.build_dataset(None, "train")
    assert len(train) == 48
    val = toy.build_dataset(None, "val")  # labeled target too, but other images than test's
    assert len(val) == 40 and not np.array_equal(np.asarray(val[0][0]), np.asarray(again[0][0]))
    with pytest.raises(ValueError, match="split"):
        toy.build_dataset(None, "valid")
    hp = data.hparams("toy", "anything")
    for key in ("mask_unit", "mask_ratio", "conf_threshold", "lambda_reg", "lambda_align", "ema_mu0", "ema_mu_n",
                "base_lr", "epochs", "eval_freq", "batch_size"):
        assert key in hp
    patch = toy.PRETRAIN["model"]["vision_patch_size"]
    assert hp["mask_unit"] % patch == 0 and toy.IMAGE_SIZE % hp["mask_unit"] == 0


def test_pretrain_deterministic_and_cached(tiny_world, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    toy.pretrain(str(tmp_path / "a.pt"), log_every=1)
    toy.pretrain(str(tmp_path / "b.pt"), log_every=1)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()  # bit for bit, whatever the name
    slim = torch.load(tmp_path / "a.pt", weights_only=True)
    assert slim["recipe"] == toy.recipe_hash()
    model = clip_model.build_model(toy.unslim(slim))  # OpenAI key format, loads strictly
    assert model.visual.input_resolution == toy.IMAGE_SIZE
    # the kept token rows are exactly those toy texts use: every caption and prompt encodes as with all rows
    ids = clip_model.tokenize([toy.caption(toy.sample_attributes(50, 9), i) for i in range(50)] +
                              [t.format(k) for t in toy.TEMPLATES for k in toy.SHAPES], context_length=20)
    assert torch.isin(ids, slim["token_embedding.ids"]).all()
    # the committed weights are another recipe's (TINY_PRETRAIN): ensure_pretrained pretrains, once
    path = toy.ensure_pretrained(str(tmp_path / "cache"))
    assert torch.equal(torch.load(path, weights_only=True)["visual.proj"], slim["visual.proj"])
    monkeypatch.setattr(toy, "pretrain", lambda *a, **k: pytest.fail("pretrained twice"))
    assert toy.ensure_pretrained(str(tmp_path / "cache")) == path


def test_cache_keys_follow_the_imported_code(monkeypatch):
    """Keys hash the renderer's source as imported: an edit of toy.py on disk during a long run changes nothing."""
    import inspect
    keys = toy.world_hash(), toy.recipe_hash()
    monkeypatch.setattr(inspect, "getsource", lambda f: "edited")
    assert (toy.world_hash(), toy.recipe_hash()) == keys
    monkeypatch.setitem(toy.PRETRAIN, "steps", 1)  # the recipe and the split sizes are read at call time
    monkeypatch.setitem(toy.SPLIT_SIZES, "test", 1)
    assert toy.recipe_hash() != keys[1] and toy.world_hash() != keys[0]


def test_committed_weights():
    """toy_clip.pt is the current world's and recipe's tiny CLIP (edit either and this fails until
    `python toy.py pretrain --out toy_clip.pt` is rerun), a few MB, and unpacks to a loadable CLIP."""
    assert os.path.getsize(toy.WEIGHTS) < 5e6
    slim = torch.load(toy.WEIGHTS, map_location="cpu", weights_only=True)
    assert slim["recipe"] == toy.recipe_hash()
    model = clip_model.build_model(toy.unslim(slim))
    assert model.visual.input_resolution == toy.IMAGE_SIZE and model.context_length == 20
    assert torch.equal(torch.unique(slim["token_embedding.ids"]), toy.toy_token_ids(20))


def test_ensure_pretrained_unpacks_committed_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(toy, "pretrain", lambda *a, **k: pytest.fail("pretrained although toy_clip.pt matches"))
    path = toy.ensure_pretrained(str(tmp_path))
    state = torch.load(path, weights_only=True)
    assert state["token_embedding.weight"].shape == (49408, toy.PRETRAIN["model"]["transformer_width"])
    assert path.endswith(f"toy_clip_{toy.recipe_hash()}.pt")


def test_train_toy_end_to_end(tiny_world, tmp_path):
    import train
    out = tmp_path / "run"
    evals = train.main(["--data", "toy", "--data-root", str(tmp_path / "cache"), "--out-dir", str(out),
                        "--num-workers", "0", "--device", "cpu", "--log-freq", "1"])
    assert [e["epoch"] for e in evals] == [0, 1]
    assert all(0 <= e[k] <= 100 for e in evals for k in ("student_acc", "teacher_acc"))
    assert (out / "checkpoint.pt").is_file() and (out / "log.jsonl").is_file()
    r = toy.probe_must(str(out / "checkpoint.pt"), "teacher", str(tmp_path / "cache"))
    assert {"head_target", "knn10_target", "linear_probe_target", "head_target_masked"} <= r.keys()
    assert 0 <= r["head_target_masked"] <= 100 and abs(sum(r["masked_class_share"]) - 1) < 1e-5
    # the ablation's val scores come from these functions: on test they must give what train.py reported
    cache = str(tmp_path / "cache")
    assert toy.checkpoint_accuracy(str(out / "checkpoint.pt"), "test", cache) == pytest.approx(
        (evals[-1]["student_acc"], evals[-1]["teacher_acc"]))
    assert toy.zero_shot_accuracy("test", cache) == pytest.approx(evals[0]["student_acc"])


def test_ablation_table(tiny_world, tmp_path):
    table = toy.ablation([0], str(tmp_path / "cache"), str(tmp_path / "abl"), extra=["--num-workers", "0"])
    test, val = table.split("\n\n")
    for part, split in ((test, "test"), (val, "val")):
        assert part.startswith(f"toy world, target {split} top-1")
        assert [line.split()[0] for line in part.splitlines()[2:]] == ["zero-shot", "self-training", "+", "+", "+"]
    assert (tmp_path / "abl" / "ablation.txt").is_file() and (tmp_path / "abl" / "must_seed0" / "checkpoint.pt").is_file()
    # a finished run is resumed, not redone
    again = toy.ablation([0], str(tmp_path / "cache"), str(tmp_path / "abl"), extra=["--num-workers", "0"])
    assert again == table
    # ... but only under the settings it was made with (else a changed default would reuse stale runs)
    import train
    with pytest.raises(SystemExit, match=rf"other settings \(--mask-ratio {toy.HPARAMS['mask_ratio']} -> 0.25\)"):
        train.main(["--data", "toy", "--data-root", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "abl" /
                    "must_seed0"), "--num-workers", "0", "--mask-ratio", "0.25"])
