import os
import sys

import pytest
import torch

# The project is a flat folder of modules; tests import them from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from util import clip_load  # noqa: E402
import clip_model  # noqa: E402
from toy import world as toy


def tiny_clip(**overrides):
    """A small randomly initialized CLIP for tests; it uses the real tokenizer's vocabulary."""
    config = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                  vision_patch_size=8, context_length=77, vocab_size=49408, transformer_width=64,
                  transformer_layers=2)
    config.update(overrides)
    return clip_model.CLIP(**config)


def save_clip(model, path, spec=clip_load.OPENAI_SPEC):
    """A CLIP's state dict as this project's CLIP files store it: with the `open_clip_config`
    note that says what its tensors cannot (tiny_clip builds OpenAI's QuickGELU architecture)."""
    torch.save({**model.state_dict(), "open_clip_config": clip_load.config_note(spec)}, path)


# A 3-step pretraining recipe of a smaller tiny CLIP (tests/test_toy.py pretrains with it)
TINY_PRETRAIN = dict(toy.PRETRAIN,
                     model=dict(toy.PRETRAIN["model"], vision_width=32, vision_layers=1,
                                embed_dim=16, transformer_width=32, transformer_layers=1),
                     steps=3, batch_size=8, warmup=1)


@pytest.fixture
def tiny_world(monkeypatch):
    """The toy world with small splits, short runs and TINY_PRETRAIN, so whole runs take seconds."""
    monkeypatch.setattr(toy, "CHUNK", 32)
    monkeypatch.setitem(toy.SPLIT_SIZES, "train", 48)
    monkeypatch.setitem(toy.SPLIT_SIZES, "test", 40)
    monkeypatch.setitem(toy.SPLIT_SIZES, "val", 40)
    monkeypatch.setitem(toy.SPLIT_SIZES, "source", 40)
    monkeypatch.setattr(toy, "PRETRAIN", TINY_PRETRAIN)
    for key, value in (("batch_size", 16), ("epochs", 1), ("eval_freq", 1)):
        monkeypatch.setitem(toy.HPARAMS, key, value)  # the dict config.hparams copies
