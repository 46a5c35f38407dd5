"""The student's RandAugment against the release's: timm 0.4.12 'rand-m9-mstd0.5-inc1' with the
hparams of the release's create_transform call. tests/data/randaugment_timm.npz holds timm's own
outputs (written by tests/make_randaugment_fixtures.py in a separate environment; timm is never
imported here)."""
import collections
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import data
from util import randaugment

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "randaugment_timm.npz")


@pytest.fixture(scope="module")
def fixture():
    with np.load(FIXTURE, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def test_fixture_inputs(fixture):
    meta, arrays = fixture
    shapes = {arrays[f"input_{k}"].shape for k in range(3)}
    assert shapes == {(20, 24, 3), (17, 13, 3), (22, 16, 3)}
    assert meta["timm_version"] == "0.4.12" and meta["config"] == "rand-m9-mstd0.5-inc1"


def test_op_list_and_hparams_are_the_release_ones(fixture):
    meta, _ = fixture
    # The same names in the same order (the op index is drawn).
    assert list(randaugment._RANDAUG_OPS) == meta["ops"]
    assert randaugment._SIGNED_OPS == set(meta["signed_ops"])
    assert list(randaugment._FILL) == meta["fillcolor"] == [123, 117, 104]
    assert randaugment._RESAMPLE == meta["resample"] == Image.BICUBIC
    assert meta["choice_weights"] is None and meta["translate_pct"] == 0.45
    ra = randaugment.RandAugment()
    assert (ra.num_ops, ra.magnitude, ra.magnitude_std, ra.prob) == (
        meta["num_layers"], meta["magnitude"], meta["magnitude_std"], meta["prob"])
    transforms = data.strong_view(224, "paper").transforms
    (view,) = [t for t in transforms if isinstance(t, randaugment.RandAugment)]
    assert vars(view) == vars(ra)


@pytest.mark.parametrize("name", list(randaugment._RANDAUG_OPS))
def test_op_is_bit_equal_to_timm(fixture, name):
    meta, arrays = fixture
    op_index = meta["ops"].index(name)
    cases = [(i, m, bool(neg)) for i, (k, m, neg) in enumerate(arrays["cases"])
             if int(k) == op_index]
    signs = {neg for _, _, neg in cases}
    assert signs == ({False, True} if name in randaugment._SIGNED_OPS else {False})
    assert {m for _, m, _ in cases} == set(meta["magnitudes"])
    mismatches = []
    for k in range(3):
        img = Image.fromarray(arrays[f"input_{k}"], "RGB")
        for i, magnitude, negate in cases:
            out = randaugment._RANDAUG_OPS[name](img, magnitude, negate)
            assert out.mode == "RGB" and out.size == img.size
            if not np.array_equal(np.asarray(out), arrays[f"output_{k}"][i]):
                mismatches.append((k, magnitude, negate))
    assert not mismatches, f"{name} differs from timm at (image, magnitude, negate) {mismatches}"


def test_fixture_cases_are_not_trivial(fixture):
    """The fixture would prove little if its outputs equalled their inputs: at magnitude 9 every op
    changes the first image, the two signs of a signed op give different images, and posterize at
    10 keeps no bit."""
    meta, arrays = fixture
    cases = arrays["cases"]
    for name in meta["ops"]:
        op_index = meta["ops"].index(name)
        at9 = [i for i, (k, m, _) in enumerate(cases) if int(k) == op_index and m == 9.0]
        out = arrays["output_0"]
        assert any(not np.array_equal(out[i], arrays["input_0"]) for i in at9), name
        if name in meta["signed_ops"]:
            assert not np.array_equal(out[at9[0]], out[at9[1]]), name
    posterize10 = [i for i, (k, m, _) in enumerate(cases)
                   if meta["ops"][int(k)] == "PosterizeIncreasing" and m == 10]
    assert not arrays["output_0"][posterize10].any()  # 0 bits kept: black


def _recording_ops(monkeypatch):
    """Replace every op by one that records (name, magnitude, negate) and returns the image
    unchanged."""
    log = []
    for name in randaugment._RANDAUG_OPS:
        monkeypatch.setitem(randaugment._RANDAUG_OPS, name,
                            lambda img, m, neg, fill, name=name: log.append((name, m, neg)) or img)
    return log


def test_draw_order_is_the_documented_one(monkeypatch):
    log = _recording_ops(monkeypatch)
    ra = randaugment.RandAugment()
    names = list(randaugment._RANDAUG_OPS)
    for seed in range(50):
        torch.manual_seed(seed)
        ra(Image.new("RGB", (4, 4)))
        got, log[:], state_after = list(log), [], torch.get_rng_state()
        torch.manual_seed(seed)
        expected = []
        for i in torch.randint(15, (2,)).tolist():
            if torch.rand(()).item() > 0.5:
                continue
            m = min(max(9.0 + 0.5 * torch.randn(()).item(), 0.0), 10.0)
            expected.append((names[i], m,
                             names[i] in randaugment._SIGNED_OPS and torch.rand(()).item() > 0.5))
        assert got == expected
        assert torch.equal(torch.get_rng_state(), state_after)  # and no other draw


def test_randaugment_statistics(monkeypatch):
    """With a fixed seed: each of the 2 draws is applied with probability 0.5, ops are uniform, the
    magnitude is N(9, 0.5²) clipped at 10, and signed ops are negated half the time."""
    log = _recording_ops(monkeypatch)
    ra = randaugment.RandAugment()
    torch.manual_seed(0)
    n = 3000
    for _ in range(n):
        ra(Image.new("RGB", (4, 4)))
    assert abs(len(log) / (2 * n) - 0.5) < 0.03  # sd 0.0065
    counts = collections.Counter(name for name, _, _ in log)
    assert (set(counts) == set(randaugment._RANDAUG_OPS)
            and max(counts.values()) < 1.35 * min(counts.values()))
    mags = np.array([m for _, m, _ in log])
    assert mags.min() >= 7.0 and mags.max() == 10.0
    assert abs(mags.mean() - 9.0) < 0.03 and abs(mags.std() - 0.49) < 0.03
    assert 0.01 < (mags == 10.0).mean() < 0.04  # P(N(9, 0.5²) >= 10) = 2.3%
    negs = [neg for name, _, neg in log if name in randaugment._SIGNED_OPS]
    assert abs(np.mean(negs) - 0.5) < 0.04
    assert not any(neg for name, _, neg in log if name not in randaugment._SIGNED_OPS)


def test_randaugment_reproducible_and_picklable(fixture):
    img = Image.fromarray(fixture[1]["input_0"], "RGB")
    ra = pickle.loads(pickle.dumps(randaugment.RandAugment()))

    def run(seed):
        torch.manual_seed(seed)
        return [ra(img).tobytes() for _ in range(30)]

    first = run(3)
    assert run(3) == first
    assert run(4) != first
    unchanged = sum(out == img.tobytes() for out in first)
    # (1 - 0.5)² = 1/4 of the images get no op (an applied op may be the identity).
    assert 3 <= unchanged <= 15
