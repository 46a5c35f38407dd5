"""tokenizer.tokenize against OpenAI's clip.tokenize, via ids recorded in tests/data/ref_tokens.json
(regenerate with tests/make_reference.py)."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch

import prompts
from util import tokenizer

REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "ref_tokens.json")
with open(REF) as _f:
    REFERENCE = json.load(_f)

SOT, EOT = 49406, 49407


def _prompt_texts(name):
    d = prompts.DATASETS["ucf101" if name == "ucf101_frames" else name]
    return [t.format(c) for c in d["classes"] for t in d["templates"]]  # class-major


@pytest.mark.parametrize("name", sorted(REFERENCE["datasets"]))
def test_dataset_prompts_match_openai(name):
    ref = REFERENCE["datasets"][name]
    texts = _prompt_texts(name)
    assert len(texts) == ref["count"]
    assert hashlib.sha256("\n".join(texts).encode()).hexdigest() == ref["texts_sha256"], \
        "the prompt texts differ from the ones the reference was made from (prompts.json changed?)"
    ids = tokenizer.tokenize(texts)
    assert ids.dtype == torch.long and ids.shape == (len(texts), 77)
    assert hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest() == ref["sha256"]


def _strip(row):
    ids = row.tolist()
    while ids and ids[-1] == 0:
        ids.pop()
    return ids


def test_adversarial_strings_match_openai():
    mismatches = []
    for case in REFERENCE["strings"]:
        text, n = case["text"], case["context_length"]
        ids = tokenizer.tokenize(text, context_length=n, truncate=True)
        assert ids.shape == (1, n)
        if _strip(ids[0]) != case["ids"]:
            mismatches.append((text, n, _strip(ids[0]), case["ids"]))
        if case["too_long"]:
            with pytest.raises(ValueError):
                tokenizer.tokenize(text, context_length=n)
        elif _strip(tokenizer.tokenize(text, context_length=n)[0]) != case["ids"]:
            mismatches.append((text, n, "without truncate"))
    assert not mismatches, mismatches


def test_batch_equals_single():
    texts = [c["text"] for c in REFERENCE["strings"]
             if c["context_length"] == 77 and not c["too_long"]]
    batch = tokenizer.tokenize(texts)
    assert batch.shape == (len(texts), 77)
    for text, row in zip(texts, batch):
        assert torch.equal(row, tokenizer.tokenize(text)[0])


def test_too_long_raises_unless_truncate():
    text = "a photo of a " * 30
    with pytest.raises(ValueError, match=r"is 122 tokens; CLIP reads 77 at most$"):
        tokenizer.tokenize(text)
    with pytest.raises(ValueError):
        tokenizer.tokenize(["short", text])
    ids = tokenizer.tokenize(text, truncate=True)[0]
    assert ids[0].item() == SOT and ids[-1].item() == EOT and (ids != 0).all()


def test_context_length_argument():
    ids = tokenizer.tokenize(["a photo of a dog.", "cat"], context_length=12)
    assert ids.shape == (2, 12)
    assert _strip(ids[0]) == [SOT, 320, 1125, 539, 320, 1929, 269, EOT]
    assert ids[1].tolist()[:3] == [SOT, 2368, EOT] and ids[1, 3:].eq(0).all()
    cut = tokenizer.tokenize("a photo of a big red dog.", context_length=5, truncate=True)[0]
    assert cut.tolist() == [SOT, 320, 1125, 539, EOT]
    with pytest.raises(ValueError):
        tokenizer.tokenize("a photo of a big red dog.", context_length=5)


def test_eot_is_row_maximum():
    # encode_text finds the end of each text with argmax, so <|endoftext|> must be the largest id.
    ids = tokenizer.tokenize(["", "hello", "a photo of a dog."])
    lengths = (ids != 0).sum(dim=1)
    assert torch.equal(ids.argmax(dim=-1), lengths - 1)
    assert np.all(ids.max(dim=-1).values.numpy() == EOT)
