"""The project against the authors' release of MUST (salesforce/MUST), side by side on the toy CLIP.

tests/make_release_fixtures.py ran the release's own code (its clip_classifier, create_optimizer,
cosine_scheduler, train_one_epoch's EMA ramp and MaskGenerator) and stored what it computed in
tests/data/release_forward.pt; the release commit is in the file. Nothing of the release is imported here.
Float tolerances are stated at each comparison: the two towers compute the same function with different
kernels (nn.MultiheadAttention vs scaled_dot_product_attention), so fp32 outputs agree to rounding only.
"""
import hashlib
import os

import pytest
import torch

import clip_model
import data
import must
import prompts
import toy
import train

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
REMAKE = "toy_clip.pt changed since the release fixtures were made: rerun tests/make_release_fixtures.py"


@pytest.fixture(scope="module")
def release():
    return torch.load(os.path.join(DATA, "release_forward.pt"), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def toy_state():
    return toy.unslim(torch.load(toy.WEIGHTS, map_location="cpu", weights_only=True))


def toy_must_model(toy_state, extra, logit_scale):
    """The toy CLIP's image tower with the release's [MSK] / patch LayerNorm / decoder and classifier."""
    visual = clip_model.build_visual({k[len("visual."):]: v for k, v in toy_state.items() if k.startswith("visual.")})
    model = must.MUSTModel(visual, extra["classifier.weight"].t(), logit_scale)
    state = model.state_dict()
    assert set(extra) <= set(state)
    state.update(extra)
    model.load_state_dict(state)
    return model.eval()


def test_fixtures_were_made_from_the_committed_toy_clip(release):
    with open(toy.WEIGHTS, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    steps = torch.load(os.path.join(DATA, "release_steps.pt"), map_location="cpu", weights_only=True)
    assert release["toy_clip_sha256"] == digest, REMAKE
    assert steps["toy_clip_sha256"] == digest, REMAKE
    assert release["release_commit"] == steps["release_commit"]
    # both files hold the release's init of the MUST heads under the same seed
    for name, value in steps["init_extra"].items():
        assert torch.equal(value, release["forward"]["extra"][name]), name


# ---------------------------------------------------------------------------------------------- (a) forward

def test_masked_forward_matches_release(release, toy_state):
    fx = release["forward"]
    model = toy_must_model(toy_state, fx["extra"], release["logit_scale"])
    images, mask = fx["images"].float(), fx["mask"]
    with torch.no_grad():
        logits, v_cls, v_patch, recon = model.forward_masked(images, mask)
        logits_unmasked = model(images)
    # unit-norm features to 1e-6; logits are 100 x cosines (|logit| up to ~70), so 1e-4
    torch.testing.assert_close(v_cls, fx["v_cls"], rtol=0, atol=1e-6)
    torch.testing.assert_close(v_patch, fx["v_patch"], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, fx["logits"], rtol=0, atol=1e-4)
    torch.testing.assert_close(logits_unmasked, fx["logits_unmasked"], rtol=0, atol=1e-4)
    torch.testing.assert_close(recon, fx["recon"], rtol=0, atol=1e-5)  # pixels up to ~2
    assert (logits - logits_unmasked).abs().max() > 1.0  # the 5 masked patches of 16 do change the prediction

    # eq. 5: the release keeps ||v_cls - v_patch||² of the masked tokens in patch order and averages them
    dist2 = (v_cls.unsqueeze(1) - v_patch).pow(2).sum(-1)
    torch.testing.assert_close(dist2[mask].view(len(mask), -1), fx["align"], rtol=0, atol=5e-6)
    assert must.loss_align(v_cls, v_patch, mask).item() == pytest.approx(fx["align"].mean().item(), abs=5e-6)
    # eq. 4: the release's pixel mask, each patch's flag repeated over its 8x8 pixels
    assert torch.equal(must.pixel_mask(mask, model.visual.patch_size).bool(), fx["pixel_mask"])


def test_zero_shot_head_matches_release(release, toy_state):
    clip = clip_model.build_model(toy_state)
    head = prompts.zero_shot_head(clip, toy.SHAPES, toy.TEMPLATES)  # (D, K)
    torch.testing.assert_close(head, release["forward"]["extra"]["classifier.weight"].t(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- (b) parameter groups

@pytest.mark.parametrize("which", ["toy", "deep"])
def test_param_groups_match_release(release, toy_state, which):
    fx = release["groups"][which]
    if which == "toy":
        model = toy_must_model(toy_state, release["forward"]["extra"], release["logit_scale"])
    else:  # 12 blocks: two-digit block numbers
        clip = clip_model.tiny_clip(vision_layers=12)
        model = must.MUSTModel(clip.visual, torch.zeros(clip.visual.output_dim, 3), 100.0)
    L = len(model.visual.transformer.resblocks)
    assert L == fx["num_layers"]
    group_of = {id(p): g for g in train.param_groups(model, fx["weight_decay"], fx["layer_decay"]) for p in g["params"]}
    names = {n: p for n, p in model.named_parameters()}
    assert set(names) == {row["name"] for row in fx["params"]}
    for row in fx["params"]:
        group = group_of[id(names[row["name"]])]
        assert train.layer_id(row["name"], L) == row["layer_id"], row
        assert group["lr_scale"] == pytest.approx(row["lr_scale"], rel=1e-12), row
        assert group["weight_decay"] == row["weight_decay"], row
    # the release's [MSK] is (1, 1, width), not 1-D, so it is weight-decayed; ours is (width,) and must be too
    assert next(r for r in fx["params"] if r["name"] == "visual.mask_token")["weight_decay"] == fx["weight_decay"]


# ---------------------------------------------------------------------------------------------- (c) schedules

def test_cosine_lr_matches_release(release):
    for s in release["schedule"]["cosine"]:
        total = s["epochs"] * s["steps_per_epoch"]
        got = torch.tensor([train.cosine_lr(int(i), total, s["lr"], s["min_lr"]) for i in s["step"]],
                           dtype=torch.float64)
        torch.testing.assert_close(got, s["value"], rtol=1e-12, atol=0)  # same float64 formula


def test_ema_ramp_matches_release(release):
    for s in release["schedule"]["ema"]:
        got = [must.ema_momentum(it, s["mu0"], s["mu_n"], s["mu_max"]) for it in s["step"]]
        assert got == pytest.approx(s["value"], rel=1e-12, abs=0), s  # same float64 formula


# ---------------------------------------------------------------------------------------------- (d) mask count

def test_mask_count_matches_release(release):
    rows = release["mask_count"]
    for row in rows:
        gen = data.MaskGenerator(row["input_size"], row["mask_unit"], row["patch_size"], row["mask_ratio"])
        assert gen.num_masked == row["masked_units"], row
        assert int(gen().sum()) == row["masked_patches"], row
    ucf101_vit_l = next(r for r in rows if (r["input_size"], r["mask_unit"], r["mask_ratio"]) == (224, 28, 0.1))
    assert (ucf101_vit_l["units"], ucf101_vit_l["masked_units"]) == (64, 7)  # 6.4 rounded up
