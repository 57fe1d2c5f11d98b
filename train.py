"""Fine-tune RoBERTa with DeLoRA (or LoRA) on one GLUE task, following the paper's protocol.

    python train.py rte 42                      # one cell of the paper's Table 4
    python train.py stsb 42 --model DIR --data DIR --max-train-samples 2000 --epochs 3
    python train.py mnli 42 --resume            # continue an interrupted run, exactly
    torchrun --standalone --nproc_per_node=8 train.py mnli 42       # one run over 8 GPUs
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \
        train.py mnli 42                        # ... over 2 machines (node_rank 1 on the other)
    python train.py --plan table4 | parallel -j 8 'CUDA_VISIBLE_DEVICES=$(({%}-1)) sh -c {}'
    python train.py --predict RUN.json "A man is eating." "A man eats."
    python report.py .logs                      # the table over all finished runs

Protocol (RED splits, as the official code): train on GLUE train; after every epoch evaluate
the new validation split; whenever its first metric strictly improves, evaluate the new test
split. The result is the test metric at the best validation epoch, never the best test value.
"""
import argparse
import json
import math
import os
import platform
import random
import shlex
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from delora import add_adapters, adapter_diagnostics, adapter_state_dict, count_parameters
from delora import load_adapter_state_dict
from delora import merge_adapters
from glue import TASKS, Encoded, batch_order, compute_metrics, encode, get_task, load_glue
from roberta import from_pretrained, load_tokenizer, resolve, save_pretrained

# The paper's Table 9 (v2) = the official glue_eval.sh (which lacks MRPC: taken from the table).
# lora_lr: the LoRA baseline's learning rate, from the LoRA paper's RoBERTa-base setup (Hu et al.
# 2021, Table 9); LoRA shares everything else (r = 8, batch, epochs, dropout) and uses α = 8.
HPARAMS = {  # task: (λ, lr, λ lr, batch, epochs, dropout, lora_lr)
    "mnli": (12, 1e-3, 3e-3, 32, 30, 0.0, 5e-4),
    "sst2": (12, 1e-3, 3e-3, 32, 30, 0.1, 5e-4),
    "mrpc": (4, 3e-2, 1e-2, 32, 40, 0.2, 4e-4),
    "cola": (4, 1e-2, 1e-2, 8, 80, 0.2, 4e-4),
    "qnli": (12, 3e-3, 3e-3, 32, 25, 0.25, 4e-4),
    "qqp": (12, 3e-3, 3e-3, 32, 25, 0.1, 5e-4),
    "rte": (4, 1e-2, 1e-2, 32, 80, 0.0, 5e-4),
    "stsb": (12, 1e-2, 1e-2, 8, 40, 0.2, 4e-4),
}
PER_TASK = ("lam", "lr", "lam_lr", "batch_size", "epochs", "dropout")
WARMUP = 0.06  # fraction of all steps with a linearly rising learning rate
WEIGHT_DECAY = 0.01
# A resume checkpoint every 1000 steps (and at every epoch's end): on MNLI (12,272 steps an
# epoch at batch 32) a preemption loses at most 1000 steps, a few minutes of GPU work; writing
# one (20 MB for roberta-base on MNLI) took 0.07 s on 2 CPU cores.
SAVE_EVERY = 1000


@dataclass
class TrainConfig:
    task: str
    seed: int
    model: str = "FacebookAI/roberta-base"   # hub id or local checkpoint directory
    data: str | None = None                  # local GLUE copy (TSV or save_to_disk); None: hub
    method: str = "delora"                   # or "lora", the baseline
    r: int = 8                               # rank, on query and value of every layer
    lam: float | None = None                 # DeLoRA's initial λ (per task)
    alpha: float = 8.0                       # LoRA's α (scale α / r)
    lr: float | None = None                  # A, B and head (per task and method)
    lam_lr: float | None = None              # λ's own learning rate (per task)
    lr_mult: float = 1.0                     # multiplies A and B's lr: the robustness sweep
    batch_size: int | None = None
    epochs: int | None = None
    dropout: float | None = None             # on the adapter's input
    max_length: int = 256                    # what the official code truncates at
    max_train_samples: int | None = None     # the first N training examples, for quick runs
    group_by_length: bool = False            # less padding; off = the paper's random order
    eval_batch_size: int = 128
    device: str = "auto"                     # cuda, then mps, then cpu
    bf16: bool = False                       # autocast to bfloat16 (CUDA)
    compile: bool = False                    # torch.compile the model
    out_dir: str = ".logs"
    save_merged: str | None = None           # write the best model, merged, as a HF checkpoint
    overwrite: bool = False
    resume: bool = False                     # continue this run from its checkpoint
    save_every: int = SAVE_EVERY             # steps between mid-epoch checkpoints; 0: never
    keep_checkpoint: bool = False            # keep it once the run has ended

    def __post_init__(self):  # fill what was not given from the task's row of HPARAMS
        get_task(self.task)
        row = dict(zip(PER_TASK, HPARAMS[self.task]))
        if self.method == "lora":
            row["lr"] = HPARAMS[self.task][-1]
        for name, value in row.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.check()

    def check(self):
        """Bad values as one ValueError naming the option (a negative learning rate would
        train silently by gradient ascent: AdamW checks only its default lr)."""
        if self.method not in ("delora", "lora"):
            raise ValueError(f"--method {self.method!r}: valid: delora, lora")
        for name in ("lr", "lam_lr", "lr_mult"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got "
                                 f"{getattr(self, name):g}")
        for name in ("r", "epochs", "batch_size", "max_length", "eval_batch_size",
                     "max_train_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.save_every < 0:
            raise ValueError(f"--save-every must be >= 0, got {self.save_every}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout:g}")

    def overrides(self):
        """The settings that differ from this task's defaults: what names a row in a report."""
        default = TrainConfig(self.task, self.seed, method=self.method)
        skip = {"task", "seed", "model", "out_dir", "device", "overwrite", "save_merged", "data",
                "eval_batch_size", "compile", "resume", "save_every", "keep_checkpoint"} | (
                    {"lam", "lam_lr"} if self.method == "lora" else {"alpha"})
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip
                and getattr(self, f.name) != getattr(default, f.name)}

    def run_name(self):
        """e.g. delora_r8_lam4_lr0.01_lamlr0.01_bs32_ep80_drop0_len256_seed42."""
        scale = f"lam{self.lam:g}" if self.method == "delora" else f"alpha{self.alpha:g}"
        lam_lr = f"_lamlr{self.lam_lr:g}" if self.method == "delora" else ""
        mult = f"x{self.lr_mult:g}" if self.lr_mult != 1 else ""
        name = (f"{self.method}_r{self.r}_{scale}_lr{self.lr:g}{mult}{lam_lr}"
                f"_bs{self.batch_size}_ep{self.epochs}_drop{self.dropout:g}_len{self.max_length}")
        if self.max_train_samples:
            name += f"_n{self.max_train_samples}"
        if self.group_by_length:
            name += "_grouped"
        if self.bf16:
            name += "_bf16"
        return f"{name}_seed{self.seed}"

    def model_tag(self):
        """The model as its hub id, or a local path's last two parts: FacebookAI_roberta-base."""
        path = Path(self.model)
        tag = "_".join(path.resolve().parts[-2:]) if path.is_dir() else self.model
        return tag.replace("/", "_")

    def run_dir(self):
        return Path(self.out_dir) / self.model_tag() / self.task

    def command(self, **changes):
        """The train.py arguments of this run: TASK SEED and each option not at its default,
        e.g. TrainConfig("rte", 42, lr_mult=2.0).command(resume=True) -> 'rte 42 --lr-mult 2.0
        --resume'. --overwrite is left out."""
        cfg = replace(self, **changes)
        default = TrainConfig(cfg.task, cfg.seed, method=cfg.method)
        args = [cfg.task, str(cfg.seed)] + (["--method", cfg.method] if cfg.method != "delora"
                                            else [])
        for f in fields(cfg):
            value = getattr(cfg, f.name)
            if f.name in ("task", "seed", "method", "overwrite") or \
                    value == getattr(default, f.name):
                continue
            flag = "--" + f.name.replace("_", "-")
            args += [flag] if value is True else [flag, str(value)]
        return shlex.join(args)


class UsageError(Exception):
    """Bad input (task, paths, downloads): main() prints it as one line, no traceback."""


class Diverged(Exception):
    """The loss became NaN or inf."""


class Interrupted(Exception):
    """SIGINT or SIGTERM: the checkpoint is written; main() prints how to resume."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


# ---------------------------------------------------------------------------------------------
# Processes: devices, torchrun, signals

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (preemption) ask the run to stop after the current step and
    write its checkpoint; a second Ctrl-C stops at once. (A SIGTERM after a Ctrl-C does not:
    that is torchrun passing the Ctrl-C on.) Under torchrun, the processes agree on the step at
    which to stop (`agree`)."""

    def __init__(self):
        self.signum, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def agree(self, dist, requested=None):
        """Whether any process was asked to stop: one all-reduce under torchrun, unless the
        flags were already summed (`requested`, from gather_losses)."""
        if dist.world > 1 and requested is None:
            flag = torch.tensor([float(self.signum is not None)], device=dist.device)
            torch.distributed.all_reduce(flag)
            requested = flag.item() > 0
        if requested and self.signum is None:  # another process got the signal
            self.signum = int(signal.SIGTERM)
        return self.signum is not None


# ---------------------------------------------------------------------------------------------
# Optimization and evaluation

def param_groups(model, cfg, head="classifier"):
    """AdamW groups as in the official code: λ at its own learning rate; the other weights
    (A, B, head) at lr with weight decay; biases and LayerNorm weights without decay.
    Each group has a name: adapter (A, B), head, no_decay, lam."""
    groups = {"adapter": [], "head": [], "no_decay": [], "lam": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(".lam"):
            groups["lam"].append(p)
        elif name.endswith("bias") or "LayerNorm" in name:
            groups["no_decay"].append(p)
        else:
            groups["head" if name.startswith(head + ".") else "adapter"].append(p)
    # --lr-mult scales A and B only: the sweep tests the adapter, not the head (at the task's lr)
    # nor λ (at its own lr)
    settings = {"adapter": (cfg.lr * cfg.lr_mult, WEIGHT_DECAY), "head": (cfg.lr, WEIGHT_DECAY),
                "no_decay": (cfg.lr, 0.0), "lam": (cfg.lam_lr, WEIGHT_DECAY)}
    return [dict(name=name, params=params, lr=settings[name][0], weight_decay=settings[name][1])
            for name, params in groups.items() if params]


def linear_schedule(total_steps):
    """The learning-rate factor at each step: warm up over WARMUP of the steps, then decay."""
    warmup = int(WARMUP * total_steps)

    def factor(step):
        if step < warmup:  # 1. warmup: 0 -> 1, linearly
            return step / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))  # 2. decay: 1 -> 0
    return factor


def loss_fn(logits, labels):
    """Cross-entropy, or MSE for a single output (STS-B regression); in fp32."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def to_device(batch, device):
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin)
            for k, v in batch.items()}


def logits_of(model, batch, bf16=False):
    """The model's logits for a batch dict (from Encoded.batch), under bf16 autocast if asked."""
    with torch.autocast(batch["input_ids"].device.type, torch.bfloat16, enabled=bf16):
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])


def train_step(model, optimizer, batch, bf16=False, weight=1.0):
    """Forward, backward, optimizer step; returns the loss x weight (Dist.shard), still on the
    device (no sync)."""
    loss = loss_fn(logits_of(model, batch, bf16), batch["labels"]) * weight
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@torch.inference_mode()
def predict(model, enc, pad_id, device, batch_size=128, bf16=False):
    """Predictions for an encoded split: class ids, or scores for regression. Batches are
    formed longest-first (less padding; padding does not change a prediction)."""
    model.eval()
    order = np.argsort(-enc.lengths, kind="stable")
    out = []
    for i in range(0, len(order), batch_size):
        batch = to_device(enc.batch(order[i:i + batch_size], pad_id), device)
        out.append(logits_of(model, batch, bf16).float())
    logits = torch.cat(out).cpu()
    preds = (logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)).numpy()
    result = np.empty_like(preds)
    result[order] = preds                                     # back to the split's order
    return result


def evaluate(task, model, enc, pad_id, device, cfg):
    preds = predict(model, enc, pad_id, device, cfg.eval_batch_size, cfg.bf16)
    return compute_metrics(task, preds, enc.labels)


def build_model(cfg, num_labels):
    """The pretrained checkpoint with adapters added (seeded, so identical for a seed)."""
    model = from_pretrained(cfg.model, num_labels=num_labels)
    return add_adapters(model, method=cfg.method, targets=("query", "value"), r=cfg.r,
                        lam=cfg.lam, alpha=cfg.alpha, dropout=cfg.dropout)


def check_max_length(max_length, tokenizer, config, pair):
    """--max-length must fit the position embeddings (else an IndexError deep in the model on
    the first long example) and hold the special tokens (else `tokenizers` silently leaves
    the sequences untruncated): RoBERTa pairs need 4 (<s> A </s></s> B </s>), BERT pairs 3."""
    if max_length > config.max_tokens:
        raise ValueError(f"--max-length {max_length} is more than the model's "
                         f"{config.max_tokens} positions; use at most {config.max_tokens}")
    need = tokenizer.num_special_tokens_to_add(pair)
    if max_length < need:
        raise ValueError(f"--max-length {max_length} cannot hold the {need} special tokens of "
                         f"{'a pair' if pair else 'a sentence'}; use at least {need}")


# ---------------------------------------------------------------------------------------------
# Files. Each is written to a temporary name and renamed, so a kill at any moment leaves the
# previous valid version; the checkpoint is the truth, the other files are derived from it.

@dataclass
class Progress:
    """Where the run is, besides tensors: what a checkpoint needs to continue exactly."""
    epoch: int = 0                # the epoch being trained (== epochs once done)
    order: list | None = None     # its batches (example indices); None: not drawn yet
    done: int = 0                 # batches of `order` trained
    loss_sum: float = 0.0         # their losses, added one by one (so a resumed mean is equal)
    step: int = 0                 # optimizer steps of the whole run
    best: float = -math.inf       # best validation score so far


def run_paths(cfg):
    d, n = cfg.run_dir(), cfg.run_name()
    return dict(log=d / f"{n}.txt", test=d / f"{n}_TEST.txt", json=d / f"{n}.json",
                adapter=d / f"{n}_adapter.safetensors", checkpoint=d / f"{n}_checkpoint.pt")


def write_atomic(path, write):
    """write(tmp_path), then rename over path: readers see the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_outputs(paths, summary, best_state=None, cfg=None):
    """The run's JSON and its two logs (in the official code's format), all from the summary;
    the best adapter when given."""
    def text(path, key):
        lines = [f"epoch {e['epoch']}: {e[key]}\n" for e in summary["epochs"] if key in e]
        write_atomic(path, lambda p: p.write_text("".join(lines)))
    text(paths["log"], "val")
    text(paths["test"], "test")
    if best_state is not None:
        from safetensors.torch import save_file
        write_atomic(paths["adapter"], lambda p: save_file(
            {k: v.contiguous() for k, v in best_state.items()}, str(p),
            metadata={"config": json.dumps(asdict(cfg))}))
    write_atomic(paths["json"], lambda p: p.write_text(json.dumps(summary, indent=1)))


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


def save_checkpoint(paths, cfg, dist, model, optimizer, scheduler, progress, data_rng, summary,
                    best_state):
    """Everything the run needs to continue: trainable tensors (with A₀, B₀, w), AdamW and
    schedule state, progress (epoch, batch order, position), best state, summary so far, and
    every process's random streams. Every process calls it; rank 0 writes it."""
    rngs = [rng_state(data_rng)]
    if dist.world > 1:
        rngs = [None] * dist.world
        torch.distributed.all_gather_object(rngs, rng_state(data_rng))
    if not dist.main:
        return
    order = progress.order  # one flat tensor and the batch sizes: (sum of sizes,), [B, ...]
    state = dict(
        settings=asdict(cfg), world=dist.world, rng=rngs, summary=json.dumps(summary),
        progress=dict(asdict(progress), order=None if order is None else
                      (torch.from_numpy(np.concatenate(order).astype(np.int64)),
                       [len(b) for b in order])),
        model=adapter_state_dict(model), best_state=best_state,
        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
    write_atomic(paths["checkpoint"], lambda p: torch.save(state, p))


def load_checkpoint(path, cfg, dist):
    """The checkpoint, checked against this run's settings; no arbitrary objects unpickled."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    may_differ = {"resume", "overwrite", "keep_checkpoint", "save_every", "device", "compile",
                  "out_dir", "save_merged"}
    theirs, ours = state["settings"], asdict(cfg)
    differ = [f"--{k.replace('_', '-')} {ours[k]} (checkpoint: {theirs.get(k)})"
              for k in ours if k not in may_differ and theirs.get(k) != ours[k]]
    if state["world"] != dist.world:
        differ.append(f"{dist.world} process(es) (checkpoint: {state['world']})")
    if differ:
        raise UsageError(f"--resume: settings differ from the checkpoint's: {'; '.join(differ)}"
                         f" (resume with the same options, or --overwrite to start over)")
    return state


def restore(state, model, optimizer, scheduler, data_rng, dist):
    """Put an interrupted run back where its checkpoint left it: trainable tensors, AdamW,
    schedule, random streams. Returns (progress, summary, best_state)."""
    load_adapter_state_dict(model, state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    progress = Progress(**state["progress"])
    if progress.order is not None:
        flat, sizes = progress.order
        progress.order = np.split(flat.numpy(), np.cumsum(sizes)[:-1])
    set_rng_state(state["rng"][dist.rank], data_rng)
    summary = json.loads(state["summary"])
    summary.update(status="running", resumed=summary.get("resumed", 0) + 1)
    return progress, summary, state["best_state"]


def existing_run(cfg, paths):
    """What is on disk under this run's name decides: 'fresh', 'resume' or 'ended' (finished
    or diverged: nothing to do with --resume); bad combinations are one-line errors."""
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    summary = None
    if paths["json"].exists():
        try:
            summary = json.loads(paths["json"].read_text())
        except ValueError:
            summary = {}
    status = (summary or {}).get("status")
    if cfg.overwrite:
        for key in ("checkpoint", "adapter"):
            paths[key].unlink(missing_ok=True)
        return "fresh"
    if status in ("finished", "diverged"):
        if cfg.resume:
            return "ended"
        raise UsageError(f"{paths['json']} exists ({status}); pass --overwrite to run it again")
    has_checkpoint = paths["checkpoint"].exists()
    if cfg.resume:
        if not has_checkpoint:
            hint = "run without --resume" if summary is None else "pass --overwrite to start over"
            raise UsageError(f"nothing to resume: no checkpoint {paths['checkpoint']}; {hint}")
        return "resume"
    if summary is not None or has_checkpoint:
        done = len((summary or {}).get("epochs", []))
        what = f"{paths['json'].with_suffix('')} is unfinished ({status or 'no JSON'}, {done} " \
               f"epoch(s) done)"
        if not has_checkpoint:  # stopped before its first checkpoint
            raise UsageError(f"{what} and has no checkpoint: pass --overwrite to start over")
        raise UsageError(f"{what}: pass --resume to continue it, or --overwrite to start over")
    return "fresh"


# ---------------------------------------------------------------------------------------------
# The run

def train(cfg: TrainConfig):
    """The whole run, top to bottom. Returns the JSON summary (also written to disk)."""
    t_start, dist, paths = time.time(), Dist.from_env(), run_paths(cfg)
    say = print if dist.main else (lambda *a, **k: None)  # only rank 0 prints
    if existing_run(cfg, paths) == "ended":
        summary = json.loads(paths["json"].read_text())
        say(f"{paths['json']}: already {summary['status']}; nothing to resume")
        return summary
    if cfg.batch_size < dist.world:
        raise UsageError(f"--batch-size {cfg.batch_size} is smaller than the {dist.world} "
                         f"processes: each needs at least one example of every batch")

    # 1. data, model and adapters (everything that can fail on bad input happens here)
    seed_everything(cfg.seed)
    spec = get_task(cfg.task)
    try:
        device = pick_device(cfg.device, dist.local_rank)
        tokenizer = load_tokenizer(cfg.model, cfg.max_length)
        train_ds, val_ds, test_ds = load_glue(cfg.task, cfg.seed, cfg.data)
        model = build_model(cfg, spec.num_labels).to(device)
        check_max_length(cfg.max_length, tokenizer, model.config, pair=len(spec.text_keys) == 2)
        resumed = load_checkpoint(paths["checkpoint"], cfg, dist) if cfg.resume else None
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: an unusable --device
        raise UsageError(str(e)) from e
    if cfg.max_train_samples:
        train_ds = train_ds.select(range(min(cfg.max_train_samples, len(train_ds))))
    pad_id = model.config.pad_token_id
    splits = {"train": train_ds, "val": val_ds, "test": test_ds}
    enc = {k: encode(cfg.task, ds, tokenizer) for k, ds in splits.items()}  # once per run
    params = count_parameters(model)
    if dist.rank:  # each process its own dropout stream
        torch.manual_seed(cfg.seed + 100_003 * dist.rank)
    dist.start(device)
    # dynamic=True: the token count N changes with every batch; compile once for it
    forward = torch.compile(model, dynamic=True) if cfg.compile else model
    if dist.world > 1:  # gradients of A, B, λ and the head are averaged over the processes
        forward = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)
    say(f"{cfg.task} seed {cfg.seed}: {cfg.method} on {cfg.model} ({device} x {dist.world}); "
        f"train/val/test {len(train_ds)}/{len(val_ds)}/{len(test_ds)}; trainable "
        f"{params['adapter']:,} adapter + {params['trainable'] - params['adapter']:,} head of "
        f"{params['total']:,}")

    # 2. optimizer and schedule
    optimizer = torch.optim.AdamW(param_groups(model, cfg))
    steps_per_epoch = math.ceil(len(enc["train"]) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(cfg.epochs * steps_per_epoch))

    # 3. a new run, or the state of an interrupted one
    summary = dict(task=cfg.task, seed=cfg.seed, status="running", settings=asdict(cfg),
                   overrides=cfg.overrides(), run_name=cfg.run_name(), metric=spec.metrics[0],
                   params=params, device=str(device), processes=dist.world,
                   torch=torch.__version__, host=platform.node(), epochs=[], best_epoch=None,
                   val=None, test=None)
    data_rng, progress, best_state = np.random.RandomState(cfg.seed), Progress(), None
    if resumed:
        progress, summary, best_state = restore(resumed, model, optimizer, scheduler, data_rng,
                                                dist)
        t_start -= summary.get("wall_time_s", 0)
        say(f"resumed at epoch {progress.epoch}, batch {progress.done} (step {progress.step})")
    if dist.main:
        paths["json"].parent.mkdir(parents=True, exist_ok=True)
        write_outputs(paths, summary, best_state, cfg)

    def checkpoint():
        save_checkpoint(paths, cfg, dist, model, optimizer, scheduler, progress, data_rng,
                        summary, best_state)

    def end(status, **extra):  # the run's last JSON; the checkpoint goes unless kept
        summary.update(status=status, wall_time_s=round(time.time() - t_start, 1), **extra)
        if dist.main:
            write_outputs(paths, summary)
            if status != "interrupted" and not cfg.keep_checkpoint:
                paths["checkpoint"].unlink(missing_ok=True)

    # 4. epochs: train, evaluate validation, and test whenever validation improves
    lengths = enc["train"].lengths
    try:
        with StopRequest() as stop:
            for epoch in range(progress.epoch, cfg.epochs):
                t0 = time.time()
                if progress.order is None:
                    progress.order = batch_order(lengths, cfg.batch_size, data_rng,
                                                 cfg.group_by_length)
                train_loss = run_epoch(forward, optimizer, scheduler, enc["train"], pad_id,
                                       device, cfg, dist, progress, stop, checkpoint)
                train_s, improved = time.time() - t0, False
                if dist.main:  # evaluation on one process: the metrics of a single-process run
                    val = evaluate(cfg.task, model, enc["val"], pad_id, device, cfg)
                    record = dict(epoch=epoch, train_loss=train_loss, val=val,
                                  lr={g["name"]: g["lr"] for g in optimizer.param_groups},
                                  adapters=adapter_diagnostics(model),
                                  examples_per_s=round(len(lengths) / train_s, 1))
                    improved = val[spec.metrics[0]] > progress.best  # strictly (NaN never is)
                    if improved:
                        progress.best = val[spec.metrics[0]]
                        record["test"] = evaluate(cfg.task, model, enc["test"], pad_id, device,
                                                  cfg)
                        summary.update(best_epoch=epoch, val=val, test=record["test"])
                        best_state = adapter_state_dict(model)
                    record["seconds"] = round(time.time() - t0, 2)
                    summary["epochs"].append(record)
                    summary["wall_time_s"] = round(time.time() - t_start, 1)
                progress.epoch, progress.order, progress.done = epoch + 1, None, 0
                progress.loss_sum = 0.0
                checkpoint()
                if dist.main:
                    write_outputs(paths, summary, best_state if improved else None, cfg)
                    say(epoch_line(record, summary, cfg), flush=True)
                if stop.agree(dist):
                    raise interrupted(cfg, dist, progress, stop.signum)
    except Diverged as e:
        end("diverged", error=str(e))
        raise
    except Interrupted:
        end("interrupted")
        raise

    # 5. optionally export the best model as a merged HF checkpoint; then the run has finished
    # (killed during the export, it is still resumable: --resume exports again)
    if dist.main and cfg.save_merged and best_state is not None:
        load_adapter_state_dict(model, best_state)
        save_pretrained(merge_adapters(model).cpu(), cfg.save_merged,
                        tokenizer_from=resolve(cfg.model, "tokenizer").parent)
        say(f"merged model written to {cfg.save_merged}")
    end("finished")
    say(f"done: best epoch {summary['best_epoch']}, test {summary['test']}; logs in "
        f"{paths['json'].parent}")
    return summary


def run_epoch(model, optimizer, scheduler, enc, pad_id, device, cfg, dist, progress, stop,
              checkpoint, log_every=10):
    """Train this epoch's batches from progress.done on; returns the epoch's mean loss. Losses
    stay on the device and are checked (finite?) every `log_every` steps: one host sync (and
    under torchrun one all-reduce, which also agrees on a stop request) per window. A
    checkpoint every cfg.save_every steps, and when a stop is requested."""
    model.train()
    order, window, seen, t0 = progress.order, [], 0, time.time()
    bar = tqdm(total=len(order), initial=progress.done, desc=f"epoch {progress.epoch}",
               leave=False, dynamic_ncols=True, disable=None if dist.main else True)
    for i in range(progress.done, len(order)):
        idx, weight = dist.shard(order[i])
        window.append(train_step(model, optimizer, to_device(enc.batch(idx, pad_id), device),
                                 cfg.bf16, weight))
        scheduler.step()
        progress.done, progress.step, seen = i + 1, progress.step + 1, seen + len(order[i])
        last = i + 1 == len(order)
        save = cfg.save_every and progress.step % cfg.save_every == 0 and not last
        if len(window) == log_every or last or save or (dist.world == 1 and stop.signum):
            losses, stopping = gather_losses(window, dist, stop)
            bad = (~torch.isfinite(losses)).nonzero()
            if len(bad):
                at = progress.step - len(window) + 1 + int(bad[0])
                raise Diverged(f"loss is {losses[bad[0]].item()} at epoch {progress.epoch}, "
                               f"step {at} (of the run); lower --lr, or try another seed")
            for loss in losses.tolist():
                progress.loss_sum += loss
            bar.update(len(window))
            bar.set_postfix(loss=f"{losses.mean():.4f}", ex_s=f"{seen / (time.time() - t0):.1f}")
            window = []
            if (save or stopping) and not last:
                checkpoint()
            if stopping and not last:
                raise interrupted(cfg, dist, progress, stop.signum)
    bar.close()
    return progress.loss_sum / len(order)


def gather_losses(window, dist, stop):
    """The window's global-batch losses on the CPU, and whether to stop. Under torchrun, one
    all-reduce sums the processes' weighted losses and their stop requests."""
    losses = torch.stack(window).float()
    if dist.world == 1:
        return losses.cpu(), stop.signum is not None
    flag = torch.tensor([float(stop.signum is not None)], device=losses.device)
    packed = torch.cat([losses, flag])
    torch.distributed.all_reduce(packed)
    packed = packed.cpu()
    return packed[:-1] / dist.world, stop.agree(dist, requested=packed[-1].item() > 0)


def interrupted(cfg, dist, progress, signum):
    launch = "python train.py" if dist.world == 1 else "torchrun <the same options> train.py"
    return Interrupted(
        f"stopped by {signal.Signals(signum).name} at epoch {progress.epoch}, batch "
        f"{progress.done} (step {progress.step}); checkpoint {run_paths(cfg)['checkpoint']}. "
        f"Resume with: {launch} {cfg.command(resume=True)}", signum)


def epoch_line(record, summary, cfg):
    return (f"epoch {record['epoch']} ({record['epoch'] + 1}/{cfg.epochs})  loss "
            f"{record['train_loss']:.4f}  val "
            + "  ".join(f"{k} {v:.4f}" for k, v in record["val"].items())
            + f"  | best epoch {summary['best_epoch']}: test "
            + "  ".join(f"{k} {v:.4f}" for k, v in (summary["test"] or {}).items())
            + f"  ({record['examples_per_s']:.0f} ex/s, {record['seconds']:.1f}s)")


# ---------------------------------------------------------------------------------------------
# Predictions from a saved adapter

def load_finetuned(run_json):
    """A finished run's summary JSON -> (model, tokenizer, cfg): the pretrained checkpoint with
    the run's best adapter and head loaded, in eval mode, on the CPU."""
    summary = json.loads(Path(run_json).read_text())
    cfg = TrainConfig(**summary["settings"])
    adapter = Path(run_json).with_name(f"{summary['run_name']}_adapter.safetensors")
    if not adapter.is_file():
        raise UsageError(f"no adapter {adapter} beside {run_json}")
    from safetensors.torch import load_file
    model = build_model(cfg, get_task(cfg.task).num_labels)
    load_adapter_state_dict(model, load_file(str(adapter)))
    return model.eval(), load_tokenizer(cfg.model, cfg.max_length), cfg


def predict_texts(model, tokenizer, task, texts, texts_b=None):
    """Score new examples: class ids (or STS-B scores) and, for classification, probabilities.
    predict_texts(model, tok, "rte", ["A man eats."], ["A man is eating."]) -> ([0], [[.9, .1]])"""
    pairs = texts if texts_b is None else list(zip(texts, texts_b))
    enc = tokenizer.encode_batch(pairs)
    batch = Encoded([e.ids for e in enc], [e.type_ids for e in enc], np.zeros(len(enc))).batch(
        np.arange(len(enc)), model.config.pad_token_id)
    with torch.inference_mode():
        logits = logits_of(model.eval(), batch).float()
    if get_task(task).num_labels == 1:
        return logits.squeeze(-1).tolist(), None
    return logits.argmax(-1).tolist(), logits.softmax(-1).tolist()


def predict_main(argv):
    p = Parser(prog="train.py --predict", description="Score a sentence (pair) with a run.")
    p.add_argument("run_json", help="a run's summary JSON (beside its logs and adapter)")
    p.add_argument("text")
    p.add_argument("text_b", nargs="?")
    args = p.parse_args(argv)
    if not Path(args.run_json).is_file():
        raise UsageError(f"{args.run_json}: no such file")
    model, tokenizer, cfg = load_finetuned(args.run_json)
    b = None if args.text_b is None else [args.text_b]
    preds, probs = predict_texts(model, tokenizer, cfg.task, [args.text], b)
    print(json.dumps(dict(task=cfg.task, prediction=preds[0],
                          probabilities=None if probs is None else probs[0])))
    return preds[0], probs and probs[0]


# ---------------------------------------------------------------------------------------------
# Command line

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump; under torchrun from rank 0 only
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n" if Dist.from_env().main
                  else None)


def parse_args(argv):
    table = "\n".join(f"  {t:5} " + "  ".join(f"{v:<6g}" for v in row)
                      for t, row in HPARAMS.items())
    p = Parser(prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Fine-tune RoBERTa with DeLoRA on a GLUE task (RED splits).",
               epilog="per-task defaults (paper Table 9; lora_lr for --method lora):\n"
                      "  task   lam     lr      lam_lr  batch   epochs  dropout lora_lr\n"
                      + table + "\n\nother modes:\n"
                      "  train.py --predict RUN.json TEXT [TEXT_B]    score a sentence (pair)\n"
                      "  train.py --plan table4 [OPTIONS]             the 80 commands of Table 4\n"
                      "  report.py [OUT_DIR] [--plots DIR]            tables and figures\n"
                      "  torchrun --nproc_per_node=N train.py TASK SEED   one run on N GPUs")
    p.add_argument("task", help=f"GLUE task: {', '.join(TASKS)}")
    p.add_argument("seed", type=int, help="random seed (the paper: 42-46)")
    d = TrainConfig("rte", 0)  # for the defaults shown below
    p.add_argument("--model", default=d.model, help="hub id or local checkpoint directory "
                   "(default: %(default)s)")
    p.add_argument("--data", help="local GLUE folder (TSV files or save_to_disk); default: hub")
    p.add_argument("--method", choices=["delora", "lora"], default=d.method,
                   help="default: %(default)s")
    p.add_argument("--r", type=int, default=d.r, help="rank (default: %(default)s)")
    p.add_argument("--lam", type=float, help="DeLoRA's initial λ (default: per task)")
    p.add_argument("--alpha", type=float, default=d.alpha, help="LoRA's α (default: %(default)s)")
    p.add_argument("--lr", type=float, help="learning rate (default: per task and method)")
    p.add_argument("--lam-lr", type=float, help="λ's learning rate (default: per task)")
    p.add_argument("--lr-mult", type=float, default=1.0,
                   help="multiply the learning rate of A and B (not the head's, not λ's), for "
                   "robustness sweeps (default: 1)")
    p.add_argument("--batch-size", type=int, help="default: per task")
    p.add_argument("--epochs", type=int, help="default: per task")
    p.add_argument("--dropout", type=float, help="adapter input dropout (default: per task)")
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help="truncate to this many tokens; more than the model's positions "
                   "(roberta-base: 512) is an error (default: %(default)s)")
    p.add_argument("--max-train-samples", type=int,
                   help="train on the first N examples only (default: all)")
    p.add_argument("--group-by-length", action="store_true",
                   help="batches of similar length: less padding; off = the paper's protocol")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help="default: %(default)s")
    p.add_argument("--device", default=d.device, help="auto = cuda, then mps, then cpu "
                   "(default: %(default)s)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (for CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out-dir", default=d.out_dir, help="logs go here (default: %(default)s)")
    p.add_argument("--save-merged", metavar="DIR",
                   help="write the best model, adapters merged, as a HF checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run")
    p.add_argument("--resume", action="store_true", help="continue this (interrupted) run "
                   "from its checkpoint; ends exactly where an uninterrupted run would")
    p.add_argument("--save-every", type=int, default=d.save_every, metavar="STEPS",
                   help="a resume checkpoint every STEPS steps, and at every epoch's end; 0: "
                   "only at epoch ends (default: %(default)s)")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep the resume checkpoint when the run ends (default: delete it)")
    args = p.parse_args(argv)
    if args.task not in TASKS:
        p.error(f"unknown task {args.task!r}; valid: {', '.join(TASKS)}")
    if args.data is not None and not Path(args.data).is_dir():
        p.error(f"--data {args.data}: no such folder")
    try:
        return TrainConfig(**vars(args))
    except ValueError as e:
        p.error(str(e))


PLANS = {"table4": dict(tasks=list(TASKS), seeds=range(42, 47), methods=("delora", "lora"))}


def plan_main(argv):
    """One train.py command per line for a whole table (Table 4: 8 tasks x seeds 42-46 x
    DeLoRA/LoRA = 80), for xargs -P, GNU parallel or a SLURM array (`sed -n "${ID}p"`).
    Options after the plan's name are added to every line, and checked first."""
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    from huggingface_hub.utils import logging
    logging.set_verbosity_error()  # offline, its retry messages would bury our one-line error
    rank0 = Dist.from_env().main   # under torchrun, one line from rank 0, not one per process
    try:
        if argv[:1] == ["--report"]:
            raise UsageError("the report moved: python report.py OUT_DIR [--plots DIR]")
        if argv[:1] == ["--predict"]:
            return predict_main(argv[1:])
        if argv[:1] == ["--plan"]:
            return plan_main(argv[1:])
        return train(parse_args(argv))
    except (UsageError, Diverged) as e:
        raise SystemExit(f"train.py: error: {e}" if rank0 else 1)
    except Interrupted as e:
        if rank0:
            print(f"train.py: {e}", file=sys.stderr)
        raise SystemExit(128 + e.signum)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once
        raise SystemExit("train.py: stopped at once; --resume continues from the last "
                         "checkpoint" if rank0 else 130)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
