"""Loading never runs code from a file: crafted TorchScript archives and pickles, each first shown
to write a marker file when loaded the unsafe way, go through clip_load.load,
runtime.read_checkpoint, train.py (--model, --resume, --init) and eval.py (--checkpoint); the marker
never appears and each gives a one-line error. Only TorchScript archives with one of OpenAI's
published SHA-256s are opened with torch.jit.load; any other is refused."""
import builtins
import io
import os
import pickle
import warnings
import zipfile
from typing import Tuple

import pytest
import torch
from torch import Tensor

import clip_model
from util import clip_load
import eval as ev
from util import runtime
from test_train import argv, error_of, world  # noqa: F401  (world is a fixture)

JIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "ref_clip_jit.pt")


class Writer(torch.nn.Module):
    """A module whose scripted __setstate__, which torch.jit.load runs, maps a file in shared mode:
    this creates the file, as any write to disk a hostile archive might do."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.mapped = torch.zeros(1)

    def forward(self, x):
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, Tensor, bool]:
        return self.path, self.weight, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, Tensor, bool]) -> None:
        self.path, self.weight, self.training = state
        self.mapped = torch.from_file(self.path, True, 4)


class OpensFile:
    """Unpickling this calls open(path, "w"): code from the file, creating the marker."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def _quiet(load, *args, **kwargs):
    # TorchScript's deprecation, torch.load's 'dispatching to torch.jit.load'.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load(*args, **kwargs)


def _live(path, marker, unsafe_load):
    """Check that loading `path` the unsafe way does write `marker` (so the tests below can fail),
    then reset."""
    assert not os.path.exists(marker)
    result = _quiet(unsafe_load, str(path))
    if hasattr(result, "close"):
        result.close()
    assert os.path.exists(marker), (
        "the crafted file does not run its code; the test would prove nothing")
    os.remove(marker)
    return str(path)


def _scripted_archive(tmp_path, marker):
    path = tmp_path / "scripted.pt"
    _quiet(torch.jit.save, _quiet(torch.jit.script, Writer(str(marker))), str(path))
    return _live(path, marker, torch.jit.load)


def _rewritten_jit(tmp_path, name, replace):
    """The reference TorchScript archive with some records replaced: {record name: new bytes}."""
    path = tmp_path / name
    with zipfile.ZipFile(JIT) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            record = info.filename.split("/", 1)[1]
            dst.writestr(info.filename, replace.get(record, src.read(info.filename)))
    return str(path)


def _torch_saved(tmp_path, marker):
    path = tmp_path / "torch_saved.pt"
    torch.save({"visual.proj": torch.zeros(2), "logit_scale": OpensFile(str(marker))}, path)
    return _live(path, marker, lambda p: torch.load(p, weights_only=False)["logit_scale"])


def _pickled(tmp_path, marker):
    path = tmp_path / "pickled.pt"
    path.write_bytes(pickle.dumps({"student": {"x": OpensFile(str(marker))}, "args": {}}))
    return _live(path, marker, lambda p: pickle.loads(open(p, "rb").read())["student"]["x"])


def _hostile_data_pkl(tmp_path, marker):
    """OpenAI's archive layout with a data.pkl that calls open() (torch.jit.load would run it
    too)."""
    hostile = {"data.pkl": pickle.dumps(OpensFile(str(marker)), 2)}
    path = _rewritten_jit(tmp_path, "hostile_data.pt", hostile)
    record = "ref_clip_jit/data.pkl"
    return _live(path, marker, lambda p: pickle.loads(zipfile.ZipFile(p).read(record)))


CRAFTED = {"scripted_setstate": _scripted_archive, "hostile_data_pkl": _hostile_data_pkl,
           "torch_save_reduce": _torch_saved, "pickle_reduce": _pickled}


def _one_line(e):
    message = str(e)
    assert message and "\n" not in message, message
    return message


def _assert_unpublished_archive_message(message, path):
    assert ("TorchScript archive (a program)" in message
            and "not one of OpenAI's published files" in message)
    assert "never runs code from a file" in message
    # It tells how to convert a trusted file.
    assert f"sd = torch.jit.load({path!r}).state_dict(); sd['open_clip_config'] = " in message


@pytest.mark.parametrize("kind", CRAFTED)
def test_clip_model_load_runs_nothing(kind, tmp_path):
    marker = tmp_path / "marker"
    path = CRAFTED[kind](tmp_path, marker)
    with pytest.raises(clip_load.UnsafeFileError) as e:
        clip_model.load(path)
    message = _one_line(e.value)
    assert path in message and not os.path.exists(marker)
    if kind == "torch_save_reduce":
        # The message names the global it asked for.
        assert "refused" in message and f"{builtins.open.__module__}.open" in message
    if kind in ("scripted_setstate", "hostile_data_pkl"):
        _assert_unpublished_archive_message(message, path)


@pytest.mark.parametrize("kind", CRAFTED)
def test_checkpoint_readers_run_nothing(kind, world, tmp_path):  # noqa: F811  (world is a fixture)
    marker = tmp_path / "marker"
    path = CRAFTED[kind](tmp_path, marker)
    # torch.load itself refuses TorchScript with weights_only.
    if kind in ("scripted_setstate", "hostile_data_pkl"):
        with pytest.raises(RuntimeError, match="TorchScript"):
            _quiet(torch.load, path, weights_only=True)
    with pytest.raises(ValueError):
        _quiet(runtime.read_checkpoint, path)
    for flags in (["--resume", path], ["--init", path, "--resume", "none"], ["--model", path]):
        message = error_of(argv(world, tmp_path / "run", *flags))
        assert path in message
    with pytest.raises(SystemExit) as e:
        _quiet(ev.main, ["--checkpoint", path, "--out-dir", str(tmp_path / "eval")])
    assert str(e.value.code).startswith("error: ") and path in _one_line(e.value.code)
    assert not os.path.exists(marker)


def test_resume_error_names_the_refusal(world, tmp_path):  # noqa: F811
    path = _torch_saved(tmp_path, tmp_path / "marker")
    message = error_of(argv(world, tmp_path / "run", "--resume", path))
    assert "refused" in message and f"GLOBAL {builtins.open.__module__}.open" in message
    # Torch's advice to load unsafely is not passed on.
    assert "weights_only` set to `False`" not in message


def _benign_scripted(tmp_path):
    path = tmp_path / "benign.pt"
    _quiet(torch.jit.save, _quiet(torch.jit.script, torch.nn.Linear(2, 3)), str(path))
    return str(path)


@pytest.mark.parametrize("make", [
    lambda tmp_path: JIT,  # laid out like OpenAI's files, but not one of them
    _benign_scripted,
    lambda tmp_path: _rewritten_jit(tmp_path, "malformed.pt", {"data/0": b"\0" * 8}),
], ids=["reference", "scripted_linear", "malformed"])
def test_unpublished_archive_is_refused_in_one_line(make, tmp_path, monkeypatch):
    path = make(tmp_path)
    calls = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **kw: calls.append(a))
    with pytest.raises(clip_load.UnsafeFileError) as e:
        clip_model.load(path)
    _assert_unpublished_archive_message(_one_line(e.value), path)
    assert calls == []


def test_published_archive_goes_through_torch_jit_load(tmp_path, monkeypatch):
    """Once the reference archive's SHA-256 is among the published ones, torch.jit.load reads it,
    from the very file object that was hashed."""
    reference = _quiet(torch.jit.load, JIT, map_location="cpu").state_dict()
    real_jit_load, calls = torch.jit.load, []
    monkeypatch.setattr(torch.jit, "load",
                        lambda f, **kw: calls.append(f) or real_jit_load(f, **kw))
    sha = clip_load._sha256(JIT)
    monkeypatch.setitem(clip_load._MODELS, "Fake-1", f"file:///nowhere/{sha}/Fake-1.pt")
    sd, notes = clip_load._read_state_dict(JIT)
    assert notes == {}
    assert len(calls) == 1 and isinstance(calls[0], io.BufferedReader)
    assert list(sd) == list(reference)  # parameters and buffers, in state_dict()'s order
    for k, v in reference.items():
        assert sd[k].dtype == v.dtype and sd[k].shape == v.shape and torch.equal(sd[k], v), k
