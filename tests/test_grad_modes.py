"""Where autograd runs, which no number shows: evaluation, the zero-shot head, the figures and
must_step's teacher and p̄ passes run without it; must_step's student forward runs with it.
A recorder on the forwards sees the mode of each call and who called it."""
import os
import sys

import torch

import clip_model
import eval as ev
import must
import train
from test_train import argv, world  # noqa: F401 -- the tiny folder world and train.py's flags


def record(monkeypatch, cls, method):
    """Replace cls.method by one that notes (module, callers, grad mode, inference mode)."""
    calls = []
    original = getattr(cls, method)

    def recorded(self, *args, **kwargs):
        callers, frame = set(), sys._getframe(1)
        while frame is not None:
            callers.add(frame.f_code.co_name)
            frame = frame.f_back
        calls.append({"module": self, "callers": callers, "grad": torch.is_grad_enabled(),
                      "inference": torch.is_inference_mode_enabled()})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, recorded)
    return calls


def called_from(calls, name):
    found = [c for c in calls if name in c["callers"]]
    assert found, f"no call from {name}"
    return found


def test_only_the_students_training_forward_builds_a_graph(world, tmp_path,  # noqa: F811
                                                            monkeypatch):
    forwards = record(monkeypatch, must.MUSTModel, "forward")
    texts = record(monkeypatch, clip_model.CLIP, "encode_text")
    tokens = record(monkeypatch, clip_model.VisionTransformer, "tokens")
    masked = record(monkeypatch, clip_model.VisionTransformer, "forward_must")
    out = tmp_path / "run"
    # 2 micro-batches of 4: the step has its no-grad p̄ pass.
    train.main(argv(world, out, "--epochs", "1", "--batch-size-per-gpu", "4"))

    for c in called_from(forwards, "evaluate") + called_from(texts, "zero_shot_head"):
        assert not c["grad"] and c["inference"]
    # Per step: the teacher on 2 micro-batches, the student's p̄ pass on 2, then its 2 forwards
    # for the backward pass.
    steps = called_from(forwards, "must_step")
    assert len(steps) == 3 * 6  # 24 images, 8 a step
    for i in range(0, len(steps), 6):
        teacher, p_bar, student = steps[i:i + 2], steps[i + 2:i + 4], steps[i + 4:i + 6]
        assert all(not c["grad"] and not c["module"].training for c in teacher)
        assert all(not c["grad"] and c["module"].training for c in p_bar)
        assert all(c["grad"] and c["module"].training for c in student)
        assert {id(c["module"]) for c in p_bar} == {id(c["module"]) for c in student}

    forwards.clear()
    texts.clear()
    ev.main(["--checkpoint", str(out / train.CHECKPOINT), "--model", str(world / "tiny.pt"),
             "--figures", "2", "--num-workers", "0", "--out-dir", str(tmp_path / "eval")])
    assert os.path.isfile(tmp_path / "eval" / "folder-attention.png")
    for c in called_from(forwards, "evaluate") + called_from(texts, "zero_shot_head"):
        assert not c["grad"] and c["inference"]
    # GradCAM differentiates the last block only: the tokens and earlier blocks run without it.
    for c in called_from(tokens, "attention_cam") + called_from(masked, "mim_triplets"):
        assert not c["grad"]

    forwards.clear()
    ev.main(["--classify", str(world / "test"), "--checkpoint", str(out / train.CHECKPOINT),
             "--num-workers", "0", "--out-dir", str(tmp_path / "classify")])
    for c in called_from(forwards, "predict"):
        assert not c["grad"] and c["inference"]
