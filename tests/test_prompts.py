import pytest
import torch
import torch.nn.functional as F

import prompts
from conftest import tiny_clip
from util import tokenizer

EXPECTED = {  # (classes, templates) as published
    "imagenet": (1000, 80), "sun397": (397, 2), "food101": (101, 1), "gtsrb": (43, 3),
    "dtd": (47, 8), "ucf101": (101, 48), "pets": (37, 1), "caltech101": (102, 34),
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_clip().eval()


def test_published_prompt_data():
    counts = {n: (len(d["classes"]), len(d["templates"])) for n, d in prompts.DATASETS.items()}
    assert counts == EXPECTED
    assert all("{}" in t for d in prompts.DATASETS.values() for t in d["templates"])
    assert len(prompts.IMAGENET_WNIDS) == len(set(prompts.IMAGENET_WNIDS)) == 1000
    assert prompts.IMAGENET_WNIDS[:2] == ["n01440764", "n01443537"]  # tench, goldfish
    for subset in (prompts.IMAGENET_R_WNIDS, prompts.IMAGENET_A_WNIDS):
        assert len(set(subset)) == 200 and set(subset) <= set(prompts.IMAGENET_WNIDS)


def test_head_is_the_normalized_mean_of_normalized_prompt_embeddings(model):
    classes = ["cat", "dog", "red triangle"]
    templates = ["a photo of a {}.", "a drawing of a {}.", "{}"]
    # The batches cut across classes.
    head = prompts.zero_shot_head(model, classes, templates, batch_size=4)
    with torch.no_grad():
        expected = []
        for c in classes:
            tokens = tokenizer.tokenize([t.format(c) for t in templates])
            e = F.normalize(model.encode_text(tokens), dim=-1)
            expected.append(F.normalize(e.mean(0), dim=0))
    assert head.shape == (32, 3)
    torch.testing.assert_close(head, torch.stack(expected, dim=1), atol=1e-5, rtol=0)
    torch.testing.assert_close(head.norm(dim=0), torch.ones(3))


def test_every_dataset_head_builds(model):
    for name, d in prompts.DATASETS.items():
        head = prompts.zero_shot_head(model, d["classes"], d["templates"])
        assert head.shape == (32, EXPECTED[name][0]) and torch.isfinite(head).all()


def test_head_cache_is_reused_and_keyed_by_weights(model, tmp_path, monkeypatch):
    classes, templates = ["cat", "dog"], ["a photo of a {}."]
    first = prompts.zero_shot_head(model, classes, templates, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("head-*.pt"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the cached head should have been used")
    monkeypatch.setattr(model, "encode_text", fail)
    cached = prompts.zero_shot_head(model, classes, templates, cache_dir=tmp_path)
    assert torch.equal(cached, first)
    monkeypatch.undo()

    other = tiny_clip().eval()  # other weights must not hit the same cache entry
    second = prompts.zero_shot_head(other, classes, templates, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("head-*.pt"))) == 2 and not torch.equal(first, second)


def test_head_cache_dir_expands_home(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    prompts.zero_shot_head(model, ["cat"], ["a {}."], cache_dir="~/heads")
    assert len(list((tmp_path / "heads").glob("head-*.pt"))) == 1
