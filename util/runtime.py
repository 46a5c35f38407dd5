"""What any long multi-process PyTorch run needs to be safe to kill, shared by train.py
and eval.py: one-line errors, device and precision, the process groups, RNG state, a
data order that survives resumes, atomic writes, fingerprints, the out-dir lock and
graceful stops. Nothing here knows about MUST.
"""
import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import signal
import socket
import stat
import sys
import threading
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler


def fail(message):
    """One-line error for the command line, no traceback."""
    raise SystemExit(f"error: {message}")


# --------------------------------------------------------------------------------------------------
# device, precision, processes

def pick_device(flag):
    """--device (cuda, cuda:N, cpu, ...) or the best available; an unavailable device
    is a one-line error."""
    try:
        device = torch.device(flag or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        fail(f"--device {flag!r} is not a device name (use cuda, cuda:N or cpu)")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {flag} asked for a GPU, but torch sees none (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        fail(f"--device {flag}: there are only {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cuda", "cpu"):
        fail(f"--device {flag}: only cuda and cpu are supported")
    return device


# --dist-timeout: torch's 10 minutes for NCCL can be less than rank 0's lone work, and a
# failed process ends the run at once anyway (end_distributed).
DIST_TIMEOUT_MINUTES = 60.0


def add_machine_flags(parser, workers=True, download_root=True, process_group=False):
    """The flags of where and how a command computes, shared by train.py, eval.py and
    bench.py (docs/usage.md says why their defaults are what they are)."""
    g = parser.add_argument_group("machine")
    g.add_argument("--device", help="cuda, cuda:N or cpu [cuda if available]")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="mixed precision; auto is bf16 where the GPU has it, else fp32 "
                        "(default: auto)")
    if workers:
        g.add_argument("--num-workers", type=int, default=default_workers(),
                       help="data loader processes per process [its cores less one; 0 "
                            "without a GPU on 2 cores or fewer]")
    if download_root:
        g.add_argument("--download-root", help="where CLIPs are cached [~/.cache/clip]")
    if process_group:
        g.add_argument("--dist-timeout", type=float, default=DIST_TIMEOUT_MINUTES,
                       help="minutes a collective may wait before the run counts as "
                            "hung")


def default_workers():
    """Loader workers per process: the cores this process may use, shared by torchrun's
    processes on this node, less one for the process itself (at least one). Without a GPU
    and with 2 cores or fewer, none: the step's threads use those cores (docs/usage.md)."""
    cores = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if cores <= 2 and not torch.cuda.is_available():
        return 0
    return max(1, cores - 1)


def autocast_for(amp, device):
    """-> (autocast dtype or None, GradScaler needed)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if amp == "fp16" and device.type != "cuda":
        fail("--amp fp16 needs a GPU (use bf16 or fp32 on CPU)")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp], amp == "fp16"


def setup_distributed(device_flag, timeout_minutes=DIST_TIMEOUT_MINUTES):
    """(rank, world, device) from torchrun's RANK, WORLD_SIZE and LOCAL_RANK (one
    process without them), with the process groups made to wait up to
    timeout_minutes."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_flag)
    if device.type == "cuda":
        device = torch.device("cuda", local if device.index is None else device.index)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        _host_group(timeout)  # made now, while every process is here, with this timeout
    return rank, world, device


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier():
    """Wait for every process, on the hosts: the waits are for rank 0's files, and a
    host wait fails as soon as a process dies, where an NCCL barrier would wait out
    the timeout."""
    if is_distributed():
        dist.barrier(group=_host_group())


def all_reduce(tensor, device, op=None):
    """A tensor summed (or op) over processes, through `device`: NCCL reduces GPU
    tensors."""
    if not is_distributed():
        return tensor
    t = tensor.to(device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.to(tensor.device)


def any_process(*flags):
    """Whether each flag holds on any process (a bool, or a tuple for several),
    agreed in one all-reduce on the hosts: it never waits for the GPU, so it can be
    asked every step."""
    if is_distributed():
        t = torch.tensor([float(flag) for flag in flags])
        dist.all_reduce(t, group=_host_group())
        flags = (t > 0).tolist()
    agreed = tuple(bool(flag) for flag in flags)
    return agreed[0] if len(agreed) == 1 else agreed


_host_groups = {}  # the default process group -> its group on the hosts


def _host_group(timeout=None):
    """A gloo group over the default group when that is NCCL, else the default group.
    It is made once, by setup_distributed or else at the first call, which every
    process makes."""
    world = dist.group.WORLD
    if world not in _host_groups:
        nccl = dist.get_backend(world) == "nccl"
        _host_groups[world] = dist.new_group(backend="gloo", timeout=timeout) if nccl else world
    return _host_groups[world]


# The words of gloo's error when the process at the other end of a connection is gone.
_PEER_GONE = ("closed by peer", "reset by peer", "socket closed")


def peer_failed(error):
    """Whether an error is a collective's report that another process died (which prints
    its own error), rather than this process's."""
    return (is_distributed() and isinstance(error, RuntimeError)
            and any(words in str(error).lower() for words in _PEER_GONE))


def end_distributed(failed):
    """This process's end of the process groups: destroyed after a success or a stop,
    which every process reaches together; aborted after a failure, because destroying
    would wait for collectives the others never complete, and the abort gives them an
    error now."""
    if not is_distributed():
        return
    if failed:
        dist.distributed_c10d._abort_process_group()
    else:
        dist.destroy_process_group()
    _host_groups.clear()


@contextlib.contextmanager
def rank_zero_first(rank):
    """Let rank 0 download / compute caches before the others read them."""
    if rank != 0:
        barrier()
    yield
    if rank == 0:
        barrier()


def rng_state():
    name, keys, *rest = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, keys.tolist(), *rest],  # weights_only reads no ndarray
            "python": random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    version, internal, gauss = state["python"]  # random.setstate wants tuples
    random.setstate((version, tuple(internal), gauss))


def shared_memory_problem(workers, batch_bytes, folder="/dev/shm"):
    """Why `workers` loader processes per process cannot pass batches of batch_bytes
    through shared memory (two each in flight), or None: a container's default 64 MiB
    ends a run with a bus error at its first batch."""
    if not workers or not os.path.isdir(folder):
        return None
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    need, free = processes * workers * 2 * batch_bytes, shutil.disk_usage(folder).free
    if free >= need:
        return None
    return (f"{folder} has {size_text(free)} free, and the loader workers of this node's "
            f"{processes} process(es) pass their batches through it: about {size_text(need)} "
            f"({workers} workers x 2 batches of {size_text(batch_bytes)} each); give it more "
            f"room (docker run --shm-size {math.ceil(need / 2 ** 30)}g) or lower --num-workers "
            f"(0 loads in the process itself)")


def size_text(n):
    """Bytes in the largest binary unit they fill: '512 B', '9.5 KiB', '1.2 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            break
        n /= 1024
    else:
        unit = "TiB"
    return f"{n:.1f} {unit}" if n < 10 and unit != "B" else f"{n:.0f} {unit}"


# --------------------------------------------------------------------------------------------------
# data order: the same samples and random views at every split and after a resume

class SeededViews(Dataset):
    """Each training image's random views and mask, drawn from torch's RNG seeded by
    (seed, epoch, index) alone: a step's global batch is the same for any number of
    processes or workers, and a resumed run sees the views of an uninterrupted one.
    Items are keyed (epoch, index), so that persistent workers, which keep their own
    copy, see the epoch."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        key = f"{self.seed}/{epoch}/{index}".encode()
        digest = hashlib.blake2b(key, digest_size=8).digest()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(digest, "little") & (2 ** 63 - 1))
            return self.dataset[index]


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled, drop_last) that can start `start` samples into
    this rank's share of an epoch, and yields (epoch, index) keys (SeededViews). Step
    k of the ranks together covers positions [k·B, (k+1)·B) of the permutation: one
    process's batch."""

    start = 0

    def __iter__(self):
        return iter([(self.epoch, i) for i in list(super().__iter__())[self.start:]])

    def __len__(self):
        return self.num_samples - self.start


# --------------------------------------------------------------------------------------------------
# files

def save_atomic(obj, path, write=None):
    """write(obj, binary file) (torch.save by default) to path.tmp, fsync, rename: a
    kill or a full disk leaves the previous file intact and no temp file. A failed
    write is one line."""
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            (write or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # A kill (KeyboardInterrupt) too, so that no partial temp file is left behind.
        with contextlib.suppress(OSError):
            os.remove(tmp)
        # torch's zip writer reports a short write as a RuntimeError.
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        if getattr(e, "errno", None) == errno.ENOSPC:
            reason = "the disk is full"
        elif free < (64 << 20):  # torch's zip writer gives a short write no errno
            reason = f"the disk is full: {size_text(free)} free"
        else:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        kept = "the previous one is intact" if os.path.isfile(path) else "no earlier one exists"
        fail(f"could not write {path} ({reason}); {kept}")
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def make_folder(flag, path, folder=None):
    """Create `folder` (path itself by default), where a flag's output goes, before any
    work: a path that cannot hold it is one line now, not after a run."""
    folder = folder or path
    where = "" if path == folder else f": its folder {folder}"
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        fail(f"{flag} {path}{where} cannot be created ({e.strerror})")
    if not os.access(folder, os.W_OK):
        fail(f"{flag} {path}{where} is not writable")


def is_torchscript(path):
    """Whether a file is a TorchScript archive, by torch.load's own test: a zip archive
    with a <name>/constants.pkl record."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in names)


def _is_pickle(path):
    """Whether a file is what torch.save writes (a zip archive) or a pickle (PROTO first
    from protocol 2 on, STOP last): only these can hold code."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
    return (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or last == b"."


def _first_sentence(e):
    text = str(e).strip()
    return text.splitlines()[0].split(". ")[0][:200] if text else ""


def load_error_detail(e, path):
    """Why torch.load(path, weights_only=True) failed, in one clause without torch's
    advice to load the file unsafely; "refused: ..." where the file may hold code."""
    if is_torchscript(path):
        return "refused: it is a TorchScript archive (a program), not a file of tensors"
    if isinstance(e, pickle.UnpicklingError):
        # torch wraps the safe unpickler's own error in that advice.
        reason = _first_sentence(e.__context__ or e)
        if _is_pickle(path):  # random bytes stop the unpickler too
            return ("refused: it holds more than the tensors and plain values that can "
                    f"be read without running code from the file ({reason})")
        reason = f"torch.load: {reason}"
    else:
        sentence = _first_sentence(e)
        reason = f"{type(e).__name__}: {sentence}" if sentence else type(e).__name__
    return f"it is truncated or not a checkpoint ({reason})"


def read_checkpoint(path, what="MUST checkpoint"):
    """A train.py checkpoint as a dict, read without running code (its tensors
    mapped, not read); otherwise ValueError, one line that says what the file is."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, not a checkpoint, unsafe to load
        raise ValueError(f"cannot read {what} {path}: {load_error_detail(e, path)}") from None
    holds_both_models = isinstance(ckpt, dict) and all(
        isinstance(ckpt.get(part), dict) for part in ("student", "teacher"))
    if holds_both_models:
        return ckpt
    if isinstance(ckpt, dict) and "text_projection" in ckpt:  # a CLIP's text tower
        raise ValueError(f"{path} holds a CLIP's weights, not a checkpoint written by train.py: "
                         f"give it as --model {path}")
    if isinstance(ckpt, dict) and ckpt:
        more = ", ..." if len(ckpt) > 5 else ""
        holds = f"its entries: {', '.join(map(str, list(ckpt)[:5]))}{more}"
    else:
        content = "an empty dict" if isinstance(ckpt, dict) else "a " + type(ckpt).__name__
        holds = f"it holds {content}"
    raise ValueError(f"{path} is not a MUST checkpoint written by train.py: it does not hold both "
                     f"'student' and 'teacher' weights ({holds})")


def not_a_clip(path, error, hint):
    """The line for a --model that the CLIP loader refused with `error`; for a train.py
    checkpoint, that it is one and `hint`, where it goes instead."""
    with contextlib.suppress(ValueError):
        read_checkpoint(path)
        return f"{path} is a MUST checkpoint written by train.py, not a CLIP: {hint}"
    return str(error)


def fingerprint(value):
    """SHA-256 of a state dict's tensors (names, dtypes, shapes, bytes), or of a list of
    strings or of such lists."""
    h = hashlib.sha256()
    if isinstance(value, dict):
        for name in sorted(value):
            t = value[name].detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(json.dumps(list(value)).encode())
    return h.hexdigest()


class RunLock:
    """One run per out-dir: an flock on OUT/run.lock, which the kernel releases when
    the process dies. The file names its holder; one left by a dead process is taken
    over."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, "run.lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            written = os.pread(self.fd, 4096, 0).decode(errors="replace").strip()
            holder = written or "another process"
            os.close(self.fd)
            fail(f"{out_dir} is in use by another run ({holder}); "
                 "wait for it to finish or use another --out-dir")
        stale = os.pread(self.fd, 4096, 0).decode(errors="replace").strip()
        if stale:
            print(f"taking over the lock of a run that ended without releasing it ({stale})")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)

    def release(self):
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock
            self.fd = None


# --------------------------------------------------------------------------------------------------
# graceful stop

class StopRequest:
    """SIGTERM (schedulers, torchrun), SIGINT (Ctrl-C) and SIGHUP (a closed terminal)
    ask the run to stop after the step in flight, with a checkpoint; a second SIGINT
    aborts. With at_once (nothing to save) the first ends the command: one line, exit
    128 + signal. A context manager; the previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, at_once=False):
        self.signum = None
        self.at_once = at_once
        self._previous = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGHUP:
            _leave_closed_terminal()
        if self.at_once:
            if self.signum is None:  # a later one would cut short ending the workers
                self.signum = signum
                with contextlib.suppress(OSError):
                    print(f"\nstopped by {signal.Signals(signum).name}", file=sys.stderr,
                          flush=True)
                raise SystemExit(128 + signum)
            return
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            fail("interrupted twice: aborted without a checkpoint (the last one is intact)")
        if self.signum is None:
            with contextlib.suppress(OSError):
                print(f"\n{signal.Signals(signum).name}: stopping after the current step "
                      "with a checkpoint (Ctrl-C again to abort at once)",
                      file=sys.stderr, flush=True)
            self.signum = signum

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            # Only the main thread may install handlers; a caller thread keeps the
            # defaults.
            return self
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _leave_closed_terminal():
    """Stdout and stderr that were a hung-up terminal (a character device) go to
    /dev/null: every write there fails, and a print must not stop the run before its
    checkpoint."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if stat.S_ISCHR(os.fstat(fd).st_mode):
                os.dup2(devnull, fd)
    os.close(devnull)


def end_workers(loader):
    """Stop the workers of a DataLoader or of one of its iterators. They ignore SIGTERM
    (ignore_stop_signals), so an exit while they live would wait for them forever."""
    workers = getattr(loader, "_iterator", loader)
    if hasattr(workers, "_shutdown_workers"):
        workers._shutdown_workers()


@contextlib.contextmanager
def dead_workers_found_by_waits():
    """A block in which a loader worker's death is raised by the wait for its batch,
    not by torch's SIGCHLD handler, which would raise it in the middle of an
    optimizer step or a checkpoint's write. torch sets that handler with a loader's
    first workers: it is set here, so that it stays off inside and comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    torch.utils.data._utils.signal_handling._set_SIGCHLD_handler()
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)


def loader_worker_died(error):
    """Whether a DataLoader iterator's error says that a worker died: torch's words,
    or the connection that passed a batch, reset by the dying worker."""
    words = ("DataLoader worker (pid", "Pin memory thread exited unexpectedly")
    return isinstance(error, ConnectionError) or any(w in str(error) for w in words)


def ignore_stop_signals(_worker_id=None):
    """DataLoader worker_init_fn: workers outlive Ctrl-C, which reaches the whole
    process group, until the step in flight has its batches."""
    for s in StopRequest.SIGNALS:
        signal.signal(s, signal.SIG_IGN)
