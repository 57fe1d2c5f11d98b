"""The long-run mechanics of a training run: what lets train.py's protocol survive a kill, a
Ctrl-C, a preemption or a fault of the machine, and spread over several processes. Nothing of
the protocol is decided here (train.py keeps its best epoch and says the result); this file
never imports train.py. The protocol calls in at a few points:

    with Run(cfg) as run:                  # device, processes, the rules for an existing run
        forward = run.distribute(model)    # compiled and/or DDP, as asked
        first = run.start(model, optimizer, scheduler, data_rng, best)  # or where it stopped
        for epoch in range(first, cfg.epochs):
            for idx, weight in run.batches(draw_order):  # this process's shard of each batch
                ...; run.step_done(loss)   # losses checked, progress, checkpoints, stops
            run.end_epoch(record, best)    # checkpoint, logs, the epoch line

A run ends one way, leaving that block (Run.__exit__): its JSON gets the final status, the
checkpoint goes when nothing is left to resume, the lock is released. What the user is told:
- finished: JSON `finished` beside the best epoch's adapter; train.py prints `done: ...`.
- diverged (a NaN or inf loss): JSON `diverged`, its result its best epoch before; one line
  names the step; exit 1.
- interrupted (a stop signal, or our output's reader gone): the step ends, a checkpoint is
  written, JSON `interrupted`; one line shows the command that resumes; exit 128 + signal.
- failed (a fault of the machine, or a bug): JSON `failed` with the cause in `error`, as of the
  last checkpoint; one line names what failed and how to go on (a bug: its traceback); exit 1.
Every file is written to a temporary name and renamed (glue.write_atomic); a start removes what
a killed write left. The checkpoint holds the trainable tensors, AdamW and the schedule, the
place in the epoch and every random stream, read back without unpickling objects: nanoGPT's
resume, plus what exactness and torchrun need (docs/long-runs.md).
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
import signal
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from delora import adapter_state_dict, count_parameters, load_adapter_state_dict
from glue import ENDED, SILENT, RunError, UsageError, check_writable, data_tag, epoch_line
from glue import existing_run, get_task, lock_run, read_summary, remove_stale, run_name, say
from glue import one_line, user_errors, why, write_atomic
from roberta import checkpoint_tag

LOG_EVERY = 10  # steps between loss checks: one host sync (and one all-reduce) per window
# Stop requests: Ctrl-C, a preemption, the terminal gone, a scheduler's warning before its time
# limit (SLURM --signal=USR1@90, or B:USR2), a CPU-time limit (ulimit -t).
STOP_SIGNALS = [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2",
                                             "SIGXCPU") if hasattr(signal, n)]
PEER_TIMEOUT = datetime.timedelta(minutes=30)  # > rank 0's longest lone evaluation (QQP test)
NO_RESEND = next(k for k in ("forward_sync_buffers", "broadcast_buffers")  # renamed in 2.13
                 if k in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters)


class Interrupted(BaseException):
    """A stop signal. A BaseException like KeyboardInterrupt: raised while loading, inside
    library code, no `except Exception` there takes it for an error of its own."""

    def __init__(self, message, signum, loading=False):
        super().__init__(message)
        self.signum, self.loading = signum, loading


def run_paths(cfg):
    """OUT_DIR/CHECKPOINT_TAG/TASK/<run>{.txt, _TEST.txt, .json, _adapter.safetensors,
    _checkpoint.pt, .lock}."""
    d, n = Path(cfg.out_dir) / checkpoint_tag(cfg.model) / cfg.task, run_name(cfg)
    return dict(log=d / f"{n}.txt", test=d / f"{n}_TEST.txt", json=d / f"{n}.json",
                adapter=d / f"{n}_adapter.safetensors", checkpoint=d / f"{n}_checkpoint.pt",
                lock=d / f"{n}.lock")


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
        if cuda:  # TF32 for float32 matmuls, as users expect (DeLoRA's stay exact: speed.md)
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=PEER_TIMEOUT)
        return self.device

    def shard(self, idx):
        """This process's part of a global batch, and the weight that makes the averaged
        gradients the batch's mean: len(part) * world / len(batch); a process left without an
        example runs one at weight 0, so that every process joins the all-reduce."""
        part = np.array_split(idx, self.world)[self.rank]
        return (idx[:1], 0.0) if len(part) == 0 else (part, len(part) * self.world / len(idx))


class StopRequest:
    """A stop signal: stop after this step, with a checkpoint; a second Ctrl-C stops at once
    (a SIGTERM after it does not: torchrun passing it on). While loading (not `deferred`) a
    signal stops at once. Under torchrun the processes agree on the step to stop at."""

    def __init__(self):
        self.signum, self.previous, self.deferred = None, {}, False

    def __enter__(self):
        with suppress(ValueError):  # not the main thread: signals stay as they are
            self.previous = {s: signal.signal(s, self.request) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def request(self, signum, frame=None):
        if signum == signal.SIGINT and (self.signum is not None or not self.deferred):
            raise KeyboardInterrupt  # a second Ctrl-C, or one while loading: at once
        if not self.deferred:
            raise Interrupted(f"stopped by {signal.Signals(signum).name} while loading, before "
                              f"anything was written: start it again with the same line (with "
                              f"--resume, or without)", signum, loading=True)
        self.signum = self.signum or signum

    def requested(self):
        """The signal to stop for: one that came, or the one losing our output stands for."""
        return self.signum or SILENT.get(sys.stdout)

    def agree(self, dist, flag=None):
        """Whether any process was asked to stop (under torchrun `flag` is all-reduced)."""
        if dist.world > 1 and flag is None:
            flag = torch.tensor([float(bool(self.requested()))], device=dist.device)
            torch.distributed.all_reduce(flag)
        if flag is not None and flag.item() > 0 and not self.requested():
            self.signum = int(signal.SIGTERM)  # another process got the signal
        return bool(self.requested())


# ---------------------------------------------------------------------------------------------
# The checkpoint

@dataclass
class Progress:
    """Where the run is, besides tensors: what a checkpoint needs to continue exactly."""
    epoch: int = 0                # the epoch being trained (== epochs once done)
    order: list | None = None     # its batches (example indices); None: not drawn yet
    done: int = 0                 # batches of `order` trained
    loss_sum: float = 0.0         # their losses, added one by one (so a resumed mean is equal)
    step: int = 0                 # optimizer steps of the whole run


def seed_everything(seed):
    """Seed the streams a run draws from (Python, NumPy, torch); the data order has its own."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(data_rng, device, restore=None):
    """Every random stream of the run as tuples, lists, tensors (no pickled objects), or with
    `restore` each put back; of the GPUs the run's own only: it resumes with others visible."""
    if restore is None:
        def numpy(s):  # ('MT19937', keys, pos, has_gauss, cached_gaussian)
            return [s[0], s[1].tolist(), *s[2:]]
        return dict(python=random.getstate(), numpy=numpy(np.random.get_state()),
                    data=numpy(data_rng.get_state()), torch=torch.get_rng_state(),
                    cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    for set_state, s in ((np.random.set_state, restore["numpy"]), (data_rng.set_state,
                                                                   restore["data"])):
        set_state((s[0], np.array(s[1], dtype=np.uint32), *s[2:]))
    random.setstate((restore["python"][0], tuple(restore["python"][1]), restore["python"][2]))
    torch.set_rng_state(restore["torch"])
    cuda = restore["cuda"]
    if isinstance(cuda, list):  # an older checkpoint: one state per visible GPU
        cuda = cuda[device.index or 0] if len(cuda) > (device.index or 0) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def read_checkpoint(path):
    """A checkpoint's state, its SHA-256 checked; None if damaged (an older one: unchecked)."""
    with suppress(Exception):  # whatever a truncated or overwritten file makes torch.load raise
        outer = torch.load(path, map_location="cpu", weights_only=True)
        if "state" not in outer:
            return outer if "progress" in outer else None
        payload = outer["state"].numpy().tobytes()
        if hashlib.sha256(payload).hexdigest() == outer["sha256"]:
            return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    return None


# ---------------------------------------------------------------------------------------------
# The run

class Steps:
    """An epoch's steps, as a run sees them: the batches, the losses, the progress."""

    def batches(self, draw_order):
        """This epoch's batches from where the run stands (its order, or a new one drawn):
        this process's shard of each, and its weight."""
        p = self.progress
        p.order = draw_order() if p.order is None else p.order
        self.t_epoch, self.first, self.window, self.phase = time.monotonic(), p.done, [], "train"
        self.shown = (self.t_epoch, p.done)  # when, and after which batch, progress was shown
        for i in range(p.done, len(p.order)):
            yield self.dist.shard(p.order[i])
        self.train_seconds, self.phase = time.monotonic() - self.t_epoch, "evaluate"

    def step_done(self, loss):
        """After each step (loss still on the device): every LOG_EVERY steps and at a checkpoint,
        a stop, the epoch's end: check the losses, show progress, checkpoint, stop if asked."""
        p, cfg, world = self.progress, self.cfg, self.dist.world
        self.window.append(loss)
        p.done, p.step = p.done + 1, p.step + 1
        last = p.done == len(p.order)
        save = cfg.save_every and p.step % cfg.save_every == 0 and not last
        if not (len(self.window) == LOG_EVERY or last or save or
                world == 1 and self.stop.requested()):
            return
        losses, flag = torch.stack(self.window).float(), None
        if world > 1:  # one all-reduce: the processes' weighted losses and their stop requests
            flag = torch.tensor([float(bool(self.stop.requested()))], device=losses.device)
            packed = torch.cat([losses, flag])
            torch.distributed.all_reduce(packed)
            losses, flag = packed[:-1] / world, packed[-1:].cpu()
        losses, stopping = losses.cpu(), self.stop.agree(self.dist, flag)
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            raise RunError(f"loss is {losses[bad[0]].item()} at epoch {p.epoch}, step "
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

    def show(self, loss):
        """Progress: on a terminal a line rewritten at each loss check; into a file a line about
        every 60 s and 10 % of the epoch. Examples/s: since this process began (or resumed)."""
        p, now, tty = self.progress, time.monotonic(), sys.stdout.isatty()
        if p.done == len(p.order) or not (tty or now - self.shown[0] >= 60 or
                                          10 * (p.done - self.shown[1]) >= len(p.order)):
            return
        self.shown, total = (now, p.done), self.cfg.epochs * len(p.order)
        eta = (now - self.t_epoch) / (p.done - self.first) * (total - p.step)
        seen = sum(map(len, p.order[self.first:p.done]))
        say(f"epoch {p.epoch + 1}/{self.cfg.epochs} [{'#' * (20 * p.done // len(p.order)):20}]"
            f" step {p.done}/{len(p.order)}, run {p.step}/{total}  loss {loss:.4f}  "
            f"{seen / (now - self.t_epoch):.1f} ex/s  ETA "
            f"{datetime.timedelta(seconds=round(eta))}", end="\r" if tty else "\n")

    def interrupted(self):
        p, world, signum = self.progress, self.dist.world, self.stop.requested()
        launch = "python train.py" if world == 1 else "torchrun <the same options> train.py"
        return Interrupted(
            f"stopped by {signal.Signals(signum).name} at epoch {p.epoch}, batch {p.done} (step "
            f"{p.step}); checkpoint {self.paths['checkpoint']}. Resume with: {launch} "
            f"{self.cfg.command(torchrun=world > 1, resume=True)}", signum)


class Files:
    """What a run writes and reads back: its logs, JSON and best adapter; its checkpoint; and
    the lock that keeps them its own."""

    def unlock(self):
        if self.lock is not None:
            with suppress(OSError):  # a folder gone read-only since: the lock still goes
                self.paths["lock"].unlink()
            self.lock.release()
            self.lock = None

    def write_outputs(self, best_state=None):
        """The JSON, the two logs (the official code's format) and the best adapter if given."""
        from safetensors.torch import save
        for path, key in ((self.paths["log"], "val"), (self.paths["test"], "test")):
            write_atomic(path, "".join(f"epoch {e['epoch']}: {e[key]}\n"
                                       for e in self.summary["epochs"] if key in e))
        if best_state is not None:
            write_atomic(self.paths["adapter"], save(
                {k: v.contiguous() for k, v in best_state.items()},
                metadata={"config": json.dumps(asdict(self.cfg))}))
        write_atomic(self.paths["json"], json.dumps(self.summary, indent=1))

    def new_summary(self):
        cfg = self.cfg
        return dict(task=cfg.task, seed=cfg.seed, status="running", settings=asdict(cfg),
                    overrides=cfg.overrides(), run_name=run_name(cfg),
                    model_tag=checkpoint_tag(cfg.model), data_tag=data_tag(cfg) or None,
                    metric=get_task(cfg.task).metrics[0], params=count_parameters(self.model),
                    device=str(self.device), processes=self.dist.world, torch=torch.__version__,
                    host=platform.node(), epochs=[], best_epoch=None, val=None, test=None)

    def checkpoint(self):
        """All the run needs to continue (trainable tensors with A₀, B₀, w; AdamW and schedule;
        progress; best adapter; summary; random streams) and its SHA-256. Rank 0 writes it."""
        rngs = [rng_state(self.data_rng, self.device)]
        if self.dist.world > 1:
            rngs = [None] * self.dist.world
            torch.distributed.all_gather_object(rngs, rng_state(self.data_rng, self.device))
        order = self.progress.order
        if self.dist.rank:  # as rank 0 will have written it
            self.checkpointed = self.progress.step
            return
        state = dict(
            settings=asdict(self.cfg), world=self.dist.world, rng=rngs,
            summary=json.dumps(self.summary), model=adapter_state_dict(self.model),
            progress=dict(asdict(self.progress), order=order and (  # flat, and the batch sizes
                torch.from_numpy(np.concatenate(order).astype(np.int64)), [len(b) for b in order])),
            best_state=self.best["adapter"], optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict())
        torch.save(state, inner := io.BytesIO())  # its bytes, as a tensor: stored verbatim
        payload = torch.frombuffer(bytearray(inner.getvalue()), dtype=torch.uint8)
        torch.save(dict(sha256=hashlib.sha256(payload.numpy()).hexdigest(), state=payload),
                   outer := io.BytesIO())
        write_atomic(self.paths["checkpoint"], outer.getvalue())
        self.saved, self.checkpointed = state["summary"], self.progress.step

    def restore(self):
        """The checkpoint, checked (damage, processes), put back; the protocol's best too."""
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
        if p.order is not None:
            p.order = np.split(p.order[0].numpy(), np.cumsum(p.order[1])[:-1])
        rng_state(self.data_rng, self.device, restore=state["rng"][self.dist.rank])
        s = self.summary = json.loads(state["summary"])
        s.pop("error", None)
        s.update(status="running", resumed=s.get("resumed", 0) + 1, device=str(self.device),
                 resumed_on=s.get("resumed_on", []) + [str(self.device)])
        self.best.update(score=s["val"][s["metric"]] if s["val"] else -math.inf,
                         epoch=s["best_epoch"], val=s["val"], test=s["test"],
                         adapter=state["best_state"])
        self.checkpointed, self.t_start = p.step, self.t_start - s.get("wall_time_s", 0)
        say(f"resumed at epoch {p.epoch}, batch {p.done} (step {p.step})")


class Run(Steps, Files):
    """One run as seen from outside the protocol (the module docstring says how)."""

    def __init__(self, cfg):
        self.cfg, self.dist, self.stop, self.progress = cfg, Dist.from_env(), StopRequest(), \
            Progress()
        self.main, self.lock, self.summary, self.started = self.dist.rank == 0, None, None, False
        self.t_start, self.phase = time.monotonic(), "load"
        if cfg.batch_size < self.dist.world:  # before the processes wait for each other
            raise UsageError(f"--batch-size {cfg.batch_size} is smaller than the {self.dist.world}"
                             f" processes: each needs at least one example of every batch")
        with user_errors():
            self.device = self.dist.start(cfg.device)
            self.paths = run_paths(cfg)  # named by the settings, the model's and data's files
        check_writable(self.paths["json"].parent, "--out-dir", cfg.out_dir)  # the run's folder
        if self.main and self.paths["lock"].exists():  # it may be running: then say who runs it
            self.lock = lock_run(self.paths["lock"])
        try:
            ended = existing_run(cfg, self.paths) == "ended"
        except UsageError:  # refused before the run began: the lock goes too (train() in a
            self.unlock()   # notebook may try again)
            raise
        if ended:  # finished or diverged earlier
            self.summary = read_summary(self.paths["json"])
            say(f"{self.paths['json']}: already {self.summary['status']}; nothing to resume")

    def __enter__(self):  # the stop signals: handled from here (while loading: at once)
        self.stop.__enter__()
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

    def start(self, model, optimizer, scheduler, data_rng, best):
        """From here a signal stops at the next step, with a checkpoint. The lock (rank 0), what
        is on disk decided for good, what killed writes left removed; on --resume the checkpoint
        restored, the protocol's `best` too. Returns the epoch to start at."""
        self.stop.deferred, self.best, self.model, self.optimizer, self.scheduler, \
            self.data_rng, cfg, paths = True, best, model, optimizer, scheduler, data_rng, \
            self.cfg, self.paths
        if self.main:
            self.lock = self.lock or lock_run(paths["lock"])
            for key in ("log", "test", "json", "adapter", "checkpoint"):
                remove_stale(paths[key])
        decision = existing_run(cfg, paths)
        if self.dist.world > 1:  # every rank has decided before rank 0 writes the new JSON
            torch.distributed.barrier()
        if decision == "ended":
            raise UsageError(f"{paths['json']} ended while this process was starting")
        for key in ("checkpoint", "adapter") if cfg.overwrite and self.main else ():
            paths[key].unlink(missing_ok=True)
        self.summary, self.checkpointed = self.new_summary(), None  # the last checkpoint's step
        if decision == "resume":
            self.restore()
        elif cfg.resume:
            say(f"nothing to resume under {paths['json'].with_suffix('')}: starting from the "
                f"beginning")
        self.saved, self.started = json.dumps(self.summary), True
        if self.main:
            self.write_outputs(best["adapter"])
        return self.progress.epoch

    def end_epoch(self, record, best):
        """After an epoch's evaluation (record: with 'test' if validation improved): checkpoint,
        logs, the epoch line; a stop, if asked and epochs remain (after the last, none)."""
        p, self.phase, self.best = self.progress, "save", best
        record = {"epoch": record["epoch"], "train_loss": p.loss_sum / len(p.order), **record}
        if self.main:
            record.update(examples_per_s=round(sum(map(len, p.order[self.first:]))
                                               / self.train_seconds, 1),
                          seconds=round(time.monotonic() - self.t_epoch, 2))
            self.summary["epochs"].append(record)
            self.summary.update(best_epoch=best["epoch"], val=best["val"], test=best["test"])
        p.epoch, p.order, p.done, p.loss_sum = p.epoch + 1, None, 0, 0.0
        self.checkpoint()
        if self.main:
            self.write_outputs(best["adapter"] if "test" in record else None)
            say(epoch_line(record, self.summary, self.cfg.epochs))
        if p.epoch < self.cfg.epochs and self.stop.agree(self.dist):  # collective: every rank
            raise self.interrupted()
        if p.epoch == self.cfg.epochs and self.stop.requested():
            say(f"{signal.Signals(self.stop.requested()).name} after the last step: the run "
                f"finishes instead of stopping")

    def __exit__(self, kind, error, traceback):
        """The one way a run ends (the module docstring)."""
        self.stop.__exit__()
        try:
            return self.started and end(self, error)
        finally:
            self.unlock()


def end(run, error):
    """A run's end, from what ended it: the JSON's final status (and `error`), the checkpoint
    gone if nothing is left to resume, and the one line (a RunError) for a fault; False lets
    anything else (a stop, a NaN, a bug) go on as it is."""
    status, text, line = ending(run, error)
    run.summary.update(status=status, wall_time_s=round(time.monotonic() - run.t_start, 1))
    run.summary.update({"error": text} if text else {})
    try:
        if run.main:
            run.write_outputs()
            if status in ENDED and not run.cfg.keep_checkpoint:
                run.paths["checkpoint"].unlink(missing_ok=True)
    except Exception as e:  # the disk is still full: the line says so
        if error is None:
            raise RunError(ending(run, e)[2]) from e
        note = f" (and the run's JSON could not say so: {e})"
        line, error.args = line and line + note, (f"{error}{note}",)
    if status == "finished" and run.dist.world > 1:  # every process ends here, together
        torch.distributed.barrier()
    if line:
        raise RunError(line, everywhere=run.dist.world > 1 and peer_failure(error)) from error
    return False


def ending(run, error):
    """What ended a run, as its JSON's status and `error`, and the line to say instead (a
    RunError), or None to let the error go on."""
    p, cfg = run.progress, run.cfg
    if error is None or isinstance(error, Interrupted):
        return ("finished" if error is None else "interrupted"), None, None
    if isinstance(error, RunError) and error.status != "failed":  # diverged; no result
        return error.status, str(error), None
    run.summary = json.loads(run.saved)  # what --resume continues from, no more
    then = ("--resume starts it from the beginning" if run.checkpointed is None else
            f"--resume continues from the checkpoint of step {run.checkpointed}")
    if isinstance(error, KeyboardInterrupt):  # a second Ctrl-C
        return ("failed", "stopped at once (a second Ctrl-C)", "stopped at once, before the "
                "run's first checkpoint: start it again (with --resume: from the beginning)") \
            if run.checkpointed is None else \
            ("interrupted", "stopped at once (a second Ctrl-C)", f"stopped at once; {then}")
    if isinstance(error, RunError):  # a write that failed: its file and cause
        line = f"{error}; once there is room or the place is writable again, {then}"
    elif isinstance(error, OSError):
        line = f"{error.filename or 'an operation on a file'}: {why(error)}; {then}"
    elif out_of_memory(error):
        line = "out of memory " + {
            "save": f"after epoch {p.epoch - 1}, saving the run's files or its export: free "
                    f"memory, then {then}",
            "evaluate": f"evaluating epoch {p.epoch} (batches of {cfg.eval_batch_size}): lower "
                        f"--eval-batch-size (--resume may change it), then {then}"}.get(
            run.phase, f"at epoch {p.epoch}, step {p.step + 1} (batches of {cfg.batch_size}, up "
                       f"to {cfg.max_length} tokens): lower --batch-size or --max-length (a new "
                       f"run), or try --bf16; or free memory, then {then}")
    elif run.dist.world > 1 and peer_failure(error):
        line = (f"another process of this torchrun launch is gone ({type(error).__name__}; its "
                f"own message says why); {then}")
    else:  # a bug: its traceback is worth seeing
        return "failed", f"{type(error).__name__}: {error}", None
    return "failed", line, line


def out_of_memory(error):
    """Whether an exception is the allocator's: CUDA's OutOfMemoryError, the CPU's."""
    cuda = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5
    return isinstance(error, (MemoryError, cuda)) or isinstance(error, RuntimeError) and any(
        s in str(error) for s in ("out of memory", "can't allocate memory",
                                  "Cannot allocate memory"))


def peer_failure(error):
    """Whether an exception says another process of a torchrun launch is gone: a collective
    that failed (gloo: the connection closed; NCCL: a timeout or an error of the group)."""
    return isinstance(error, getattr(torch.distributed, "DistError", ())) or isinstance(
        error, RuntimeError) and any(s in str(error) for s in (
            "Connection closed by peer", "Connection reset by peer", "NCCL", "gloo",
            "Broken pipe"))


# ---------------------------------------------------------------------------------------------
# The command line: how a process ends

@contextmanager
def command_line(prog):
    """Around a script's main(): bad input, a fault, a NaN or a stop end the process with one
    line and an exit code, no traceback; under torchrun from rank 0, but what only some see (a
    peer gone, a stop while loading). What a terminal cannot show is escaped."""
    from huggingface_hub.utils import logging
    logging.set_verbosity_error()  # offline, its retry messages would bury our one-line error
    for stream in (sys.stdout, sys.stderr):
        with suppress(AttributeError, ValueError):  # None (closed at start), or not a terminal
            stream.reconfigure(errors="backslashreplace")
    rank = int(os.environ.get("RANK", 0))
    try:
        yield
        if SILENT.get(sys.stdout):  # the reader stopped (| head): quietly, as SIGPIPE would
            raise SystemExit(128 + SILENT[sys.stdout])
    except (UsageError, RunError, Interrupted, KeyboardInterrupt, MemoryError) as e:
        code = 128 + e.signum if isinstance(e, Interrupted) else 1
        if rank and not (getattr(e, "everywhere", False) or getattr(e, "loading", False)):
            raise SystemExit(code)  # rank 0 says it
        detail = f" ({e})" if str(e) else ""
        line = f"{prog}: {f'rank {rank}: ' * bool(rank)}" + (
            str(e) if isinstance(e, Interrupted) else "stopped at once (Ctrl-C)" if isinstance(
                e, KeyboardInterrupt) else f"error: out of memory while loading{detail}: free "
            f"memory, or lower --max-length" if isinstance(e, MemoryError) else f"error: {e}")
        if code == 1:  # Python prints it: kept on one line as say() keeps what it prints
            raise SystemExit(one_line(line))
        say(line, err=True, everywhere=True)
        raise SystemExit(code)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
