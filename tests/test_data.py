"""data.py: Table 10 rows, patch-aligned masks, the two views, and label mapping BY NAME for every
dataset layout (fake directory trees of tiny generated images; no network)."""

import csv
import inspect
import io
import json
import os
import pathlib
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from util import clip_load
import config
import data
from util import folders
import prompts
from util import randaugment


# --------------------------------------------------------------------------------------------------
# helpers


def _image_bytes(fmt="JPEG", mode="RGB", size=(12, 10), color=(200, 30, 60)):
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(buf, fmt)
    return buf.getvalue()


_JPEG = _image_bytes()


def _touch_image(path, payload=_JPEG):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(payload)


def _image_folder(split_dir, folder_names):
    """split_dir/<folder>/<i>.jpg where i is the index of the folder in folder_names."""
    for i, name in enumerate(folder_names):
        _touch_image(os.path.join(split_dir, name, f"{i}.jpg"))


def _assert_labels(ds, expected_of_index):
    """Every sample in <split>/<folder>/<i>.jpg has label expected_of_index[i]; each class hit
    exactly once."""
    labels = []
    for path, label in ds.samples:
        i = int(os.path.splitext(os.path.basename(path))[0])
        assert label == expected_of_index[i], path
        labels.append(label)
    assert sorted(labels) == sorted(expected_of_index)
    assert len(set(labels)) == len(labels)


# Real on-disk class names (not derived from prompts) of the datasets whose names differ most.
CALTECH101_FOLDERS = (
    "BACKGROUND_Google Faces Faces_easy Leopards Motorbikes accordion airplanes anchor ant barrel "
    "bass beaver binocular bonsai brain brontosaurus buddha butterfly camera cannon car_side "
    "ceiling_fan cellphone chair chandelier cougar_body cougar_face crab crayfish crocodile "
    "crocodile_head cup dalmatian dollar_bill dolphin dragonfly electric_guitar elephant emu "
    "euphonium ewer ferry flamingo flamingo_head garfield gerenuk gramophone grand_piano hawksbill "
    "headphone hedgehog helicopter ibis inline_skate joshua_tree kangaroo ketch lamp laptop llama "
    "lobster lotus mandolin mayfly menorah metronome minaret nautilus octopus okapi pagoda panda "
    "pigeon pizza platypus pyramid revolver rhino rooster saxophone schooner scissors scorpion "
    "sea_horse snoopy soccer_ball stapler starfish stegosaurus stop_sign strawberry sunflower tick "
    "trilobite umbrella watch water_lilly wheelchair wild_cat windsor_chair wrench "
    "yin_yang").split()
UCF101_FOLDERS = (
    "ApplyEyeMakeup ApplyLipstick Archery BabyCrawling BalanceBeam BandMarching BaseballPitch "
    "Basketball BasketballDunk BenchPress Biking Billiards BlowDryHair BlowingCandles "
    "BodyWeightSquats Bowling BoxingPunchingBag BoxingSpeedBag BreastStroke BrushingTeeth "
    "CleanAndJerk CliffDiving CricketBowling CricketShot CuttingInKitchen Diving Drumming Fencing "
    "FieldHockeyPenalty FloorGymnastics FrisbeeCatch FrontCrawl GolfSwing Haircut HammerThrow "
    "Hammering HandstandPushups HandstandWalking HeadMassage HighJump HorseRace HorseRiding "
    "HulaHoop IceDancing JavelinThrow JugglingBalls JumpRope JumpingJack Kayaking Knitting "
    "LongJump Lunges MilitaryParade Mixing MoppingFloor Nunchucks ParallelBars PizzaTossing "
    "PlayingCello PlayingDaf PlayingDhol PlayingFlute PlayingGuitar PlayingPiano PlayingSitar "
    "PlayingTabla PlayingViolin PoleVault PommelHorse PullUps Punch PushUps Rafting "
    "RockClimbingIndoor RopeClimbing Rowing SalsaSpin ShavingBeard Shotput SkateBoarding Skiing "
    "Skijet SkyDiving SoccerJuggling SoccerPenalty StillRings SumoWrestling Surfing Swing "
    "TableTennisShot TaiChi TennisSwing ThrowDiscus TrampolineJumping Typing UnevenBars "
    "VolleyballSpiking WalkingWithDog WallPushups WritingOnBoard YoYo").split()
# In the order of their official ids 1..37.
PETS_RAW = ["Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle",
            "Bengal", "Birman", "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau",
            "english_cocker_spaniel", "english_setter", "german_shorthaired", "great_pyrenees",
            "havanese", "japanese_chin", "keeshond", "leonberger", "Maine_Coon",
            "miniature_pinscher", "newfoundland", "Persian", "pomeranian", "pug", "Ragdoll",
            "Russian_Blue", "saint_bernard", "samoyed", "scottish_terrier", "shiba_inu", "Siamese",
            "Sphynx", "staffordshire_bull_terrier", "wheaten_terrier", "yorkshire_terrier"]


def _classes(name):
    return data.dataset_prompts(name)[0]


# --------------------------------------------------------------------------------------------------
# hyperparameters


def test_hparams_table10_spot_checks():
    assert len(config.HPARAMS) == 14
    assert config.HPARAMS[("imagenet", "ViT-B/16")] == dict(
        mask_unit=32, mask_ratio=0.3, conf_threshold=0.7, lambda_reg=1.0, lambda_align=0.2,
        ema_mu0=0.999, ema_mu_n=2000, base_lr=2e-5, epochs=30, eval_freq=1)
    assert config.HPARAMS[("imagenet", "ViT-L/14")] == dict(
        mask_unit=56, mask_ratio=0.3, conf_threshold=0.5, lambda_reg=1.0, lambda_align=0.5,
        ema_mu0=0.999, ema_mu_n=2000, base_lr=4e-5, epochs=20, eval_freq=1)
    sun_l = config.HPARAMS[("sun397", "ViT-L/14")]
    assert (sun_l["mask_unit"], sun_l["mask_ratio"], sun_l["conf_threshold"],
            sun_l["lambda_reg"]) == (28, 0.2, 0.3, 0.2)
    assert (sun_l["ema_mu0"], sun_l["ema_mu_n"], sun_l["base_lr"],
            sun_l["eval_freq"]) == (0.99, 500, 2e-4, 2)
    gtsrb = config.HPARAMS[("gtsrb", "ViT-B/16")]
    assert (gtsrb["mask_ratio"], gtsrb["conf_threshold"], gtsrb["lambda_align"]) == (0.5, 0.3, 0.5)
    ucf = config.HPARAMS[("ucf101", "ViT-B/16")]
    assert (ucf["mask_unit"], ucf["base_lr"], ucf["epochs"], ucf["eval_freq"]) == (16, 1e-5, 60, 5)
    assert config.HPARAMS[("ucf101", "ViT-L/14")]["conf_threshold"] == 0.6
    assert config.HPARAMS[("dtd", "ViT-B/16")]["ema_mu_n"] == 100
    assert config.HPARAMS[("food101", "ViT-L/14")]["epochs"] == 40
    for key in [("pets", "ViT-B/16"), ("caltech101", "ViT-B/16")]:
        assert config.HPARAMS[key]["base_lr"] == 1e-5 and config.HPARAMS[key]["epochs"] == 60
    assert config.GLOBAL_BATCH == {"ViT-B/16": 1024, "ViT-L/14": 512}
    for row in config.HPARAMS.values():  # every released mask unit tiles 224 px in whole patches
        assert 224 % row["mask_unit"] == 0


def test_hparams_defaults_and_fallbacks(monkeypatch):
    hp = config.hparams("imagenet", "ViT-B/16")
    assert hp == {**config.HPARAMS[("imagenet", "ViT-B/16")], "batch_size": 1024,
                  "strong_view": "paper"}
    hp["epochs"] = 1  # a fresh dict: overriding it leaves the table alone
    assert config.HPARAMS[("imagenet", "ViT-B/16")]["epochs"] == 30
    assert config.hparams("dtd", "ViT-L/14") == {**config.HPARAMS[("dtd", "ViT-L/14")],
                                                 "batch_size": 512, "strong_view": "paper"}
    # folder and the shifted ImageNets use ImageNet's row
    for name in ["folder", "imagenet-r", "imagenet-a", "imagenet-v2", "imagenet-sketch"]:
        assert config.hparams(name, "ViT-L/14") == config.hparams("imagenet", "ViT-L/14")
    # ViT-B/32 borrows ViT-B/16's row; mask unit snapped to its patch size
    b32 = config.hparams("ucf101", "ViT-B/32")
    assert b32["mask_unit"] == 32 and b32["batch_size"] == 1024 and b32["base_lr"] == 1e-5
    assert config.hparams("imagenet", "ViT-B/32")["mask_unit"] == 32
    # ViT-L/14@336px borrows ViT-L/14's; 56 and 28 tile 336
    assert config.hparams("imagenet", "ViT-L/14@336px")["mask_unit"] == 56
    assert config.hparams("sun397", "ViT-L/14@336px")["mask_unit"] == 28
    # pets has only a ViT-B/16 row: ViT-L/14 gets mask unit 28 and the same absolute lr at batch 512
    pets_l = config.hparams("pets", "ViT-L/14")
    assert pets_l["mask_unit"] == 28 and pets_l["batch_size"] == 512
    assert pets_l["base_lr"] == pytest.approx(2e-5)
    # unknown model (e.g. a checkpoint path): ViT-B/16 row, snapped when the geometry is given
    assert config.hparams("imagenet", "/ckpt/tiny.pt")["mask_unit"] == 32
    at_64 = config.hparams("imagenet", "/ckpt/tiny.pt", patch_size=8, input_size=64)
    assert at_64["mask_unit"] == 32
    at_48 = config.hparams("imagenet", "/ckpt/tiny.pt", patch_size=8, input_size=48)
    assert at_48["mask_unit"] == 24
    assert config.hparams("imagenet", "ViT-B/16", 16, 224) == config.hparams("imagenet", "ViT-B/16")
    with pytest.raises(ValueError, match="valid names: imagenet"):
        config.hparams("imagenet21k", "ViT-B/16")


# --------------------------------------------------------------------------------------------------
# mask generator


@pytest.mark.parametrize("input_size,mask_unit,patch_size,ratio,expected_units", [
    (224, 32, 16, 0.3, 15),  # 49 units, 14.7 -> 15
    (224, 32, 16, 0.1, 5),   # 4.9 -> 5
    (224, 16, 16, 0.1, 20),  # 196 units
    (224, 56, 14, 0.3, 5),   # 16 units, 4.8 -> 5
    (224, 28, 14, 0.2, 13),  # 64 units, 12.8 -> 13
    (336, 56, 14, 0.3, 11),  # 36 units, 10.8 -> 11
    (224, 32, 32, 0.5, 25),  # 49 units, 24.5 -> 25
    # UCF101 ViT-L/14: 64 units, 6.4 -> 7 (always rounded up, as the release).
    (224, 28, 14, 0.1, 7),
    (32, 16, 8, 0.3, 2),     # 4 units, 1.2 -> 2
    (32, 16, 8, 0.5, 2),     # 4 units
])
def test_mask_generator_count_and_alignment(input_size, mask_unit, patch_size, ratio,
                                            expected_units):
    gen = data.MaskGenerator(input_size, mask_unit, patch_size, ratio)
    grid, s, g = input_size // patch_size, mask_unit // patch_size, input_size // mask_unit
    masks = torch.stack([gen() for _ in range(20)])
    assert masks.dtype == torch.bool and masks.shape == (20, grid * grid)
    assert (masks.sum(1) == expected_units * s * s).all()
    blocks = masks.view(20, g, s, g, s)  # each mask unit is a full s×s block of patches
    assert (blocks.all(dim=(2, 4)) == blocks.any(dim=(2, 4))).all()
    assert (blocks.any(dim=(2, 4)).sum(dim=(1, 2)) == expected_units).all()
    if 0 < expected_units < g * g:
        assert len({tuple(m.tolist()) for m in masks}) > 1  # random positions


def test_mask_generator_errors():
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        data.MaskGenerator(224, 24, 16, 0.3)
    with pytest.raises(ValueError, match="input size 224 must be a multiple of mask_unit 48"):
        data.MaskGenerator(224, 48, 16, 0.3)
    with pytest.raises(ValueError, match="mask_ratio"):
        data.MaskGenerator(224, 32, 16, 1.5)
    assert not data.MaskGenerator(224, 32, 16, 0.0)().any()


# --------------------------------------------------------------------------------------------------
# views


def _photo(size=(48, 40)):
    g = torch.Generator().manual_seed(0)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


def test_train_transform_views():
    tf = data.TrainTransform(32, data.MaskGenerator(32, 16, 8, 0.5))
    torch.manual_seed(0)
    weak, strong, mask = tf(_photo())
    assert weak.shape == strong.shape == (3, 32, 32)
    assert weak.dtype == strong.dtype == torch.uint8  # normalized where used (data.normalize)
    assert mask.shape == (16,) and mask.dtype == torch.bool and mask.sum() == 2 * 4
    assert not torch.allclose(weak, strong)
    # reproducible from torch's seed alone
    torch.manual_seed(1)
    a = tf(_photo())
    torch.manual_seed(1)
    b = tf(_photo())
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert isinstance(pickle.loads(pickle.dumps(tf)), data.TrainTransform)  # spawned loader workers
    # an image smaller than the crop (weak view resizes the shorter side first)
    weak, strong, _ = tf(_photo((20, 50)))
    assert weak.shape == strong.shape == (3, 32, 32)


@pytest.mark.parametrize("spec", [clip_load.OPENAI_SPEC, clip_load.ClipSpec(
    "gelu", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")], ids=["openai", "open_clip"])
def test_normalize_is_to_tensor_and_normalize_bit_for_bit(spec):
    """The workers hand over uint8 views and the trainer normalizes them on its device: on the
    CPU that is exactly what T.ToTensor and T.Normalize computed in the workers, so CPU runs and
    the release fixtures are unchanged."""
    photo = _photo((40, 36))
    before = T.Normalize(spec.mean, spec.std)(T.ToTensor()(photo))
    after = data.normalize(T.PILToTensor()(photo).unsqueeze(0), spec)
    assert after.dtype == torch.float32 and torch.equal(after[0], before)


def test_light_strong_view():
    """The small-image view: a translation of at most 10% of the side, a flip, brightness/contrast;
    never a crop that loses the object, and any input size comes out at input_size."""
    tf = data.TrainTransform(32, data.MaskGenerator(32, 16, 8, 0.5), strong="light")
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[12:20, 12:20] = 255  # a white square in the middle
    torch.manual_seed(0)
    for _ in range(20):
        weak, strong, _ = tf(Image.fromarray(arr))
        assert weak.shape == strong.shape == (3, 32, 32)
        bright = strong.float().mean(0) > strong.float().mean()
        ys, xs = bright.nonzero(as_tuple=True)
        assert (12 - 3 <= ys.min() and ys.max() <= 19 + 3
                and 12 - 3 <= xs.min() and xs.max() <= 19 + 3)
        assert bright.sum() >= 40  # the square survives whole
    views = torch.stack([tf(Image.fromarray(arr))[1] for _ in range(8)]).float()
    assert views.std(0).max() > 7  # random, not a fixed transform (0.1 of a normalized unit)
    assert tf(_photo((20, 50)))[1].shape == (3, 32, 32)
    assert isinstance(pickle.loads(pickle.dumps(tf)), data.TrainTransform)
    with pytest.raises(ValueError, match="unknown strong view 'mild'.*paper, light"):
        data.strong_view(32, "mild")


def test_randaugment_every_op_every_level():
    img = _photo()
    for name, op in randaugment._RANDAUG_OPS.items():
        for magnitude in (0.0, 5.0, 10.0):
            for negate in (False, True):
                out = op(img, magnitude, negate)
                assert out.size == img.size and out.mode == "RGB", name
    invert = randaugment._RANDAUG_OPS["Invert"](img, 9.0, False)
    assert invert.getpixel((0, 0)) == tuple(255 - v for v in img.getpixel((0, 0)))
    ra = randaugment.RandAugment(num_ops=2, magnitude=9, magnitude_std=0.5)
    torch.manual_seed(0)
    changed = sum(ra(img).tobytes() != img.tobytes() for _ in range(20))
    assert changed >= 10  # two ops at p=0.5: most draws change the image


def test_test_transform():
    tf = data.test_transform(32)
    mean_color = tuple(round(255 * m) for m in clip_load.CLIP_MEAN)
    x = tf(Image.new("RGB", (64, 48), mean_color))
    assert x.shape == (3, 32, 32) and x.abs().max() < 0.02  # CLIP normalization
    assert clip_load.CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert clip_load.CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    # Another CLIP's normalization: its mean colour is its zero.
    spec = clip_load.OPENAI_SPEC._replace(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert data.test_transform(32, spec)(Image.new("RGB", (64, 48), (128, 128, 128))).abs().max() \
        < 0.01


# --------------------------------------------------------------------------------------------------
# ImageFolder layouts: class folders mapped by name for EVERY dataset


def _variant_spellings(name, classnames):
    """Folder names in another spelling than the prompt names (underscores, CamelCase, upper
    case)."""
    if name == "ucf101":
        return UCF101_FOLDERS
    if name == "caltech101":
        return CALTECH101_FOLDERS
    if name == "gtsrb":
        return [f"{i:05d}" for i in range(len(classnames))]
    styles = [lambda c: c.replace(" ", "_"),
              lambda c: c.title().replace(" ", ""),
              lambda c: c.upper()]
    return [styles[i % 3](c) for i, c in enumerate(classnames)]


@pytest.mark.parametrize("name",
                         ["sun397", "food101", "gtsrb", "dtd", "ucf101", "pets", "caltech101"])
def test_image_folder_layout_maps_every_class_by_name(tmp_path, name):
    classnames = _classes(name)
    folders = _variant_spellings(name, classnames)
    assert len(folders) == len(classnames)
    # The creation order is irrelevant; the loader sorts and maps by name.
    order = list(range(len(folders)))[::-1]
    for split in ("train", "test"):
        for i in order:
            _touch_image(str(tmp_path / split / folders[i] / f"{i}.jpg"))
    expected = list(range(len(classnames)))  # folders[i] spells prompt class i
    for split in ("train", "test"):
        ds = data.build_dataset(name, str(tmp_path), split, transform=None)
        _assert_labels(ds, expected)
        assert ds.classnames == classnames and ds.templates == prompts.DATASETS[name]["templates"]


def test_ucf101_frames_nested_per_video(tmp_path):
    for split in ("train", "test"):
        for c in ("ApplyEyeMakeup", "YoYo", "HandstandPushups"):
            for v in (1, 2):
                _touch_image(str(tmp_path / split / c / f"v_{c}_g0{v}_c01" / "frame0001.jpg"))
                _touch_image(str(tmp_path / split / c / f"v_{c}_g0{v}_c01" / "frame0002.png"))
    ds = data.build_dataset("ucf101", str(tmp_path), "train", transform=None)
    names = [ds.classnames[y] for _, y in ds.samples]
    assert len(ds) == 12
    assert (names.count("Apply Eye Makeup") == names.count("Yo Yo")
            == names.count("Hand Stand Pushups") == 4)


def test_imagenet_wnid_folders(tmp_path):
    wnids = prompts.IMAGENET_WNIDS
    _image_folder(str(tmp_path / "train"), wnids)
    _image_folder(str(tmp_path / "val"), wnids[::-1])  # file i sits in folder wnids[::-1][i]
    train = data.build_dataset("imagenet", str(tmp_path), "train", transform=None)
    _assert_labels(train, list(range(1000)))
    val = data.build_dataset("imagenet", str(tmp_path), "test", transform=None)
    _assert_labels(val, list(range(1000))[::-1])
    assert (train.classnames == prompts.DATASETS["imagenet"]["classes"]
            and len(train.templates) == 80)


def test_imagenet_class_name_folders_and_ambiguous_names(tmp_path):
    classes = prompts.DATASETS["imagenet"]["classes"]
    _image_folder(str(tmp_path / "train"), [classes[0].upper(), classes[999].replace(" ", "_")])
    ds = data.build_dataset("imagenet", str(tmp_path), "train", transform=None)
    assert sorted(y for _, y in ds.samples) == [0, 999]
    _image_folder(str(tmp_path / "test"), ["missile"])  # two ImageNet classes are called 'missile'
    with pytest.raises(ValueError, match="ambiguous; use wnid folders"):
        data.build_dataset("imagenet", str(tmp_path), "test", transform=None)


@pytest.mark.parametrize("name,wnids", [
    ("imagenet-r", "IMAGENET_R_WNIDS"),
    ("imagenet-a", "IMAGENET_A_WNIDS"),
])
def test_imagenet_r_a_200_class_subsets(tmp_path, name, wnids):
    wnids = getattr(prompts, wnids)
    _image_folder(str(tmp_path / name), sorted(wnids, reverse=True))  # creation order irrelevant
    in_order = sorted(wnids, reverse=True)
    for split in ("train", "test"):  # transductive: both splits are the same test images
        ds = data.build_dataset(name, str(tmp_path / name), split, transform=None)
        _assert_labels(ds, [wnids.index(w) for w in in_order])
        assert (len(ds.classnames) == 200
                and ds.templates == prompts.DATASETS["imagenet"]["templates"])
    imagenet = prompts.DATASETS["imagenet"]["classes"]
    assert ds.classnames == [imagenet[prompts.IMAGENET_WNIDS.index(w)] for w in wnids]


def test_imagenet_v2_index_folders(tmp_path):
    _image_folder(str(tmp_path), [str(i) for i in range(1000)])
    for split in ("train", "test"):
        ds = data.build_dataset("imagenet-v2", str(tmp_path), split, transform=None)
        _assert_labels(ds, list(range(1000)))
        assert ds.classnames == prompts.DATASETS["imagenet"]["classes"]


def test_imagenet_sketch_wnid_folders_under_split_dir(tmp_path):
    _image_folder(str(tmp_path / "test"), prompts.IMAGENET_WNIDS)  # root/test/<wnid> also accepted
    ds = data.build_dataset("imagenet-sketch", str(tmp_path), "train", transform=None)
    _assert_labels(ds, list(range(1000)))


# --------------------------------------------------------------------------------------------------
# torchvision on-disk layouts (faked minimally) and their name tables


def _expect_each_class_once(datasets, classnames):
    labels = sorted(y for ds in datasets for _, y in ds.samples)
    assert labels == list(range(len(classnames)))
    # The paths name the real files.
    assert all(os.path.isfile(p) for ds in datasets for p, _ in ds.samples)


def _fake_food101(root):
    """food-101/meta/<split>.json ({class: ["class/id", ...]}, classes NOT in sorted order) +
    images/."""
    base = root / "food-101"
    raw = [c.replace(" ", "_") for c in _classes("food101")][::-1]
    os.makedirs(base / "meta", exist_ok=True)
    for split in ("train", "test"):
        meta = {r: [f"{r}/{split}{i}"] for i, r in enumerate(raw)}
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
        for r, ims in meta.items():
            _touch_image(str(base / "images" / f"{ims[0]}.jpg"))
    return raw


def _fake_dtd(root):
    """dtd/dtd/labels/{train,val,test}1.txt of '<class>/<file>' lines + images/;
    -> {split: lines}."""
    base = root / "dtd" / "dtd"
    os.makedirs(base / "labels", exist_ok=True)
    lines = {}
    for split in ("train", "val", "test"):
        lines[split] = [f"{c}/{c}_{split}.jpg" for c in _classes("dtd")[::-1]]
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines[split]) + "\n")
        for line in lines[split]:
            _touch_image(str(base / "images" / line))
    return lines


def _fake_gtsrb(root, train_classes=range(43)):
    """gtsrb/GTSRB/Training/<00000..>/*.ppm (+ the real layout's GT-<class>.csv, not an image), the
    test images in GTSRB/Final_Test/Images and their classes in gtsrb/GT-final_test.csv (image i is
    class 42 - i)."""
    base = root / "gtsrb"
    for i in train_classes:
        folder = base / "GTSRB" / "Training" / f"{i:05d}"
        _touch_image(str(folder / f"{i:05d}_00000.ppm"))
        (folder / f"GT-{i:05d}.csv").write_text("Filename;ClassId\n")
    rows = [{"Filename": f"{i:05d}.ppm", "Width": "12", "ClassId": str(42 - i)} for i in range(43)]
    for r in rows:
        _touch_image(str(base / "GTSRB" / "Final_Test" / "Images" / r["Filename"]))
    with open(base / "GT-final_test.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["Filename", "Width", "ClassId"], delimiter=";")
        w.writeheader()
        w.writerows(rows)


def _fake_pets(root, test_breeds=PETS_RAW):
    """oxford-iiit-pet/annotations/{trainval,test}.txt
    ('<Breed>_<n> <official id> <species> <breed id>') + images/."""
    base = root / "oxford-iiit-pet"
    os.makedirs(base / "annotations", exist_ok=True)
    for split, breeds in (("trainval", PETS_RAW), ("test", test_breeds)):
        lines = [f"{raw}_{split}1 {PETS_RAW.index(raw) + 1} {1 if raw[0].isupper() else 2} 1"
                 for raw in breeds]
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
        for raw in breeds:
            _touch_image(str(base / "images" / f"{raw}_{split}1.jpg"))


def _sun397_path(classname):
    """SUN397-style '/a/apartment_building/outdoor' for a prompt name (sub-category after a '/')."""
    words = classname.split()
    if len(words) > 1 and words[-1] in ("indoor", "outdoor", "exterior", "interior", "home",
                                        "vehicle", "natural", "urban", "public", "establishment"):
        return f"/{classname[0]}/{'_'.join(words[:-1])}/{words[-1]}"
    return f"/{classname[0]}/{'_'.join(words)}"


def _fake_sun397(root):
    """SUN397/ClassName.txt ('/a/abbey' lines) + SUN397/a/abbey/sun_*.jpg; -> the class lines."""
    base = root / "SUN397"
    paths = [_sun397_path(c) for c in _classes("sun397")]
    os.makedirs(base, exist_ok=True)
    (base / "ClassName.txt").write_text("\n".join(paths) + "\n")
    for p in paths:
        _touch_image(str(base / p.lstrip("/") / "sun_abc.jpg"))
    return paths


def _fake_caltech101(root):
    """caltech101/101_ObjectCategories/<folder>/image_<n>.jpg, one image per folder (not always
    image_0001)."""
    base = root / "caltech101" / "101_ObjectCategories"
    for i, folder in enumerate(CALTECH101_FOLDERS):
        _touch_image(str(base / folder / f"image_{1 + i % 3:04d}.jpg"))


_FAKE_LAYOUTS = {"food101": _fake_food101, "dtd": _fake_dtd, "gtsrb": _fake_gtsrb,
                 "pets": _fake_pets, "sun397": _fake_sun397, "caltech101": _fake_caltech101}


def test_food101_torchvision_layout(tmp_path):
    classes = _classes("food101")
    raw = _fake_food101(tmp_path)
    for split in ("train", "test"):
        ds = data.build_dataset("food101", str(tmp_path), split, transform=None)
        _expect_each_class_once([ds], classes)
        for path, y in ds.samples:
            assert os.path.basename(os.path.dirname(path)) == classes[y].replace(" ", "_")
        # The meta file's order.
        assert [os.path.basename(os.path.dirname(p)) for p, _ in ds.samples] == raw


def test_dtd_torchvision_layout_train_is_train_plus_val(tmp_path):
    classes = _classes("dtd")
    lines = _fake_dtd(tmp_path)
    images = tmp_path / "dtd" / "dtd" / "images"
    train = data.build_dataset("dtd", str(tmp_path), "train", transform=None)
    assert len(train) == 2 * len(classes)
    for path, y in train.samples:
        assert os.path.basename(path).startswith(classes[y] + "_")
    assert [os.path.relpath(p, images) for p, _ in train.samples] == lines["train"] + lines["val"]
    test = data.build_dataset("dtd", str(tmp_path), "test", transform=None)
    _expect_each_class_once([test], classes)
    assert [os.path.relpath(p, images) for p, _ in test.samples] == lines["test"]


def test_gtsrb_torchvision_layout_numeric_labels(tmp_path):
    classes = _classes("gtsrb")
    _fake_gtsrb(tmp_path)
    train = data.build_dataset("gtsrb", str(tmp_path), "train", transform=None)
    _expect_each_class_once([train], classes)
    assert all(int(os.path.basename(os.path.dirname(p))) == y for p, y in train.samples)
    test = data.build_dataset("gtsrb", str(tmp_path), "test", transform=None)
    assert all(42 - int(os.path.basename(p)[:5]) == y for p, y in test.samples)
    _expect_each_class_once([test], classes)
    # a class folder's number is its class even when other folders are missing (not its position)
    _fake_gtsrb(tmp_path / "some", train_classes=(3, 40))
    some = data.build_dataset("gtsrb", str(tmp_path / "some"), "train", transform=None)
    assert [y for _, y in some.samples] == [3, 40]
    os.makedirs(tmp_path / "gtsrb" / "GTSRB" / "Training" / "extra")
    with pytest.raises(ValueError, match="Training/extra' is not a class number"):
        data.build_dataset("gtsrb", str(tmp_path), "train", transform=None)


def test_pets_torchvision_layout_maps_official_ids_by_name(tmp_path):
    classes = _classes("pets")
    _fake_pets(tmp_path)
    for split in ("train", "test"):
        ds = data.build_dataset("pets", str(tmp_path), split, transform=None)
        _expect_each_class_once([ds], classes)
        # The official id order (case-insensitive sort) differs from the prompt order.
        for path, y in ds.samples:
            raw = os.path.basename(path).rsplit("_", 1)[0]
            assert raw.replace("_", " ").lower() == classes[y].lower()
    assert PETS_RAW.index("Bengal") == 5 and classes.index("Bengal") == 1
    # a split that lacks some breeds still labels the others by their official id's name
    _fake_pets(tmp_path / "some", test_breeds=PETS_RAW[1::3])
    some = data.build_dataset("pets", str(tmp_path / "some"), "test", transform=None)
    expected = [r.replace("_", " ").lower() for r in PETS_RAW[1::3]]
    assert [classes[y].lower() for _, y in some.samples] == expected


def test_sun397_torchvision_layout_deterministic_split(tmp_path):
    classes = _classes("sun397")
    base = tmp_path / "SUN397"
    paths = _fake_sun397(tmp_path)
    assert any(p.count("/") == 3 for p in paths)
    train = data.build_dataset("sun397", str(tmp_path), "train", transform=None)
    test = data.build_dataset("sun397", str(tmp_path), "test", transform=None)
    _expect_each_class_once([train, test], classes)
    assert 0.1 < len(test) / len(classes) < 0.3  # ~20% held out
    for ds in (train, test):
        for path, y in ds.samples:
            rel = os.path.relpath(os.path.dirname(path), base)
            assert "/" + rel.replace(os.sep, "/") == paths[y]
    again = data.build_dataset("sun397", str(tmp_path), "test", transform=None)
    assert again.samples == test.samples


def test_caltech101_torchvision_layout_keeps_background(tmp_path):
    classes = _classes("caltech101")
    _fake_caltech101(tmp_path)
    train = data.build_dataset("caltech101", str(tmp_path), "train", transform=None)
    test = data.build_dataset("caltech101", str(tmp_path), "test", transform=None)
    _expect_each_class_once([train, test], classes)
    for ds in (train, test):
        # Real folder i is prompt class i (prompt order = sorted folder names).
        for path, y in ds.samples:
            assert CALTECH101_FOLDERS.index(os.path.basename(os.path.dirname(path))) == y


class _NoTorchvision:
    """Stands in for torchvision.datasets: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"torchvision.datasets.{name} used")


@pytest.mark.parametrize("name", sorted(_FAKE_LAYOUTS))
def test_torchvision_layouts_are_read_without_torchvision(tmp_path, monkeypatch, name):
    monkeypatch.setattr(folders, "tv_datasets", _NoTorchvision())
    _FAKE_LAYOUTS[name](tmp_path / "full")
    for split in ("train", "test"):
        assert len(data.build_dataset(name, str(tmp_path / "full"), split, transform=None)) > 0
    os.makedirs(tmp_path / "empty")
    layout = folders.TORCHVISION_LAYOUTS[name][1].replace("root", str(tmp_path / "empty"))
    for split in ("train", "test"):  # a missing layout: the message names it and --download
        with pytest.raises(FileNotFoundError,
                           match=f"torchvision's layout {layout} \\(pass --download"):
            data.build_dataset(name, str(tmp_path / "empty"), split, transform=None)


class _FakeDownloads:
    """Stands in for torchvision.datasets under --download: each constructor call is recorded and
    writes the dataset's (fake) layout under root, as a real download would."""

    def __init__(self, name):
        self.name, self.calls = name, []

    def __getattr__(self, cls):
        def construct(root, **kwargs):
            self.calls.append((cls, root, kwargs))
            _FAKE_LAYOUTS[self.name](pathlib.Path(root))
        return construct


@pytest.mark.parametrize("name", sorted(_FAKE_LAYOUTS))
def test_torchvision_download_goes_through_public_constructors(tmp_path, monkeypatch, name):
    import torchvision.datasets
    fake = _FakeDownloads(name)
    monkeypatch.setattr(folders, "tv_datasets", fake)
    root = str(tmp_path / "new")  # not there yet: the download makes it
    for split in ("train", "test"):
        assert len(data.build_dataset(name, root, split, transform=None, download=True)) > 0
    assert len(fake.calls) == 2
    for cls, at, kwargs in fake.calls:  # a real public class, called the way its signature allows
        assert at == root and kwargs["download"] is True
        inspect.signature(getattr(torchvision.datasets, cls)).bind(at, **kwargs)


def test_name_tables_hit_every_prompt_class_once():
    """The torchvision class-name lists, as torchvision spells them, cover each prompt class exactly
    once."""
    tv_names = {
        "caltech101": CALTECH101_FOLDERS,
        "pets": [" ".join(p.title() for p in raw.split("_")) for raw in PETS_RAW],
        "food101": [c.replace(" ", "_") for c in _classes("food101")],
        "gtsrb": [str(i) for i in range(43)],
        "sun397": [_sun397_path(c)[3:] for c in _classes("sun397")],
        "ucf101": UCF101_FOLDERS,
        "dtd": _classes("dtd"),
    }
    for name, names in tv_names.items():
        labels = folders.map_class_names(name, names, _classes(name), prompts.WNIDS.get(name, ()))
        assert sorted(labels) == list(range(len(_classes(name)))), name


# --------------------------------------------------------------------------------------------------
# the user's own images


def test_folder_dataset_nested_unlabeled_and_eval_root(tmp_path):
    root = tmp_path / "mine"
    _touch_image(str(root / "a.jpg"))
    rgba_png = _image_bytes("PNG", mode="RGBA", color=(1, 2, 3, 4))
    _touch_image(str(root / "x" / "y" / "b.PNG"), rgba_png)
    _touch_image(str(root / "x" / "c.webp"), _image_bytes("WEBP"))
    _touch_image(str(root / "x" / "d.bmp"), _image_bytes("BMP", mode="L"))
    (root / "x" / "notes.txt").write_text("not an image")
    _touch_image(str(root / ".hidden" / "e.jpg"))
    classes = tmp_path / "classes.txt"
    classes.write_text("# my classes\nred fox\n\nArctic Hare\n  snowy owl  \n")
    templates = tmp_path / "templates.txt"
    templates.write_text("a picture of a {}.\n# comment\n\na {} in the snow.\n")
    ds = data.build_dataset("folder", str(root), "train", transform=data.test_transform(16),
                            classes_file=str(classes), templates_file=str(templates))
    assert len(ds) == 4 and all(y == -1 for _, y in ds.samples)
    assert ds.classnames == ["red fox", "Arctic Hare", "snowy owl"]
    assert ds.templates == ["a picture of a {}.", "a {} in the snow."]
    for i in range(len(ds)):  # RGBA / grayscale decode to 3 channels
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and y == -1
    default = data.build_dataset("folder", str(root), "train", None, classes_file=str(classes))
    assert "a photo of a {}." in default.templates
    evals = tmp_path / "eval"
    _image_folder(str(evals), ["snowy_owl", "RED FOX", "arctic-hare"])
    test = data.build_dataset("folder", str(root), "test", None, classes_file=str(classes),
                              eval_root=str(evals))
    _assert_labels(test, [2, 0, 1])
    _image_folder(str(evals), ["snowy_owl", "RED FOX", "arctic-hare", "polar bear"])
    with pytest.raises(ValueError, match="'polar bear'"):
        data.build_dataset("folder", str(root), "test", None, classes_file=str(classes),
                           eval_root=str(evals))


def test_dataset_item_with_train_transform(tmp_path):
    _image_folder(str(tmp_path / "train"), ["banded", "zigzagged"])
    tf = data.TrainTransform(32, data.MaskGenerator(32, 16, 8, 0.25))
    ds = data.build_dataset("dtd", str(tmp_path), "train", tf)
    (weak, strong, mask), label = ds[1]
    assert weak.shape == strong.shape == (3, 32, 32) and mask.shape == (16,) and label == 46
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True)
    (weak, strong, mask), labels = next(iter(loader))
    assert (weak.shape == (2, 3, 32, 32) and mask.shape == (2, 16)
            and labels.tolist() in ([0, 46], [46, 0]))


# --------------------------------------------------------------------------------------------------
# errors


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError,
                       match="unknown dataset 'cifar10'; valid names: imagenet, sun397"):
        data.build_dataset("cifar10", str(tmp_path), "train", None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.build_dataset("imagenet", str(tmp_path / "nope"), "train", None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.build_dataset("folder", str(tmp_path / "nope"), "train", None,
                           classes_file=str(tmp_path / "c.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    with pytest.raises(FileNotFoundError, match="no images"):
        data.build_dataset("folder", str(empty), "train", None, classes_file=str(classes))
    with pytest.raises(FileNotFoundError, match="no class folders"):
        data.build_dataset("imagenet-r", str(empty), "train", None)
    with pytest.raises(FileNotFoundError, match=r"no imagenet under .*train/<wnid>"):
        data.build_dataset("imagenet", str(empty), "train", None)
    with pytest.raises(FileNotFoundError, match="torchvision's layout .*food-101.*--download"):
        data.build_dataset("food101", str(empty), "train", None)
    with pytest.raises(ValueError, match="needs a class names file"):
        data.build_dataset("folder", str(empty), "train", None)
    with pytest.raises(ValueError, match="needs --eval-root"):
        data.build_dataset("folder", str(empty), "test", None, classes_file=str(classes))
    with pytest.raises(ValueError, match="only for dataset 'folder'"):
        data.build_dataset("dtd", str(empty), "train", None, classes_file=str(classes))
    with pytest.raises(ValueError, match="split must be"):
        data.build_dataset("dtd", str(empty), "val", None)
    dup = tmp_path / "dup.txt"
    dup.write_text("Red fox\nred_fox\n")
    with pytest.raises(ValueError, match="repeats class names"):
        folders.read_classnames(str(dup))
    (tmp_path / "blank.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match=r"lists 0 class\(es\); a classifier needs at least 2"):
        folders.read_classnames(str(tmp_path / "blank.txt"))
    (tmp_path / "bad_t.txt").write_text("a photo of a cat\n")
    with pytest.raises(ValueError, match="line 1: 'a photo of a cat' needs exactly one '{}'"):
        folders.read_templates(str(tmp_path / "bad_t.txt"))
    # unmapped and doubly-mapped class folders
    _image_folder(str(tmp_path / "dtd" / "train"), ["banded", "velvety", "furry"])
    unmapped = r"2 class folder\(s\) of 'dtd' match no class name.*'furry', 'velvety'"
    with pytest.raises(ValueError, match=unmapped):
        data.build_dataset("dtd", str(tmp_path / "dtd"), "train", None)
    _image_folder(str(tmp_path / "dtd2" / "train"), ["polka-dotted", "polka_dotted"])
    with pytest.raises(ValueError, match="both map to class 'polka-dotted'"):
        data.build_dataset("dtd", str(tmp_path / "dtd2"), "train", None)
    with pytest.raises(FileNotFoundError, match="has no test"):
        data.build_dataset("dtd", str(tmp_path / "dtd2"), "test", None)
    _image_folder(str(tmp_path / "folders_only" / "train"), [])
    os.makedirs(tmp_path / "folders_only" / "train" / "banded")
    with pytest.raises(FileNotFoundError, match="no images"):
        data.build_dataset("dtd", str(tmp_path / "folders_only"), "train", None)
