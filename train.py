"""Fine-tune RoBERTa with DeLoRA (or LoRA) on one GLUE task: the paper's protocol, top to bottom.

    python train.py rte 42                      # one cell of the paper's Table 4
    python train.py stsb 42 --model DIR --data DIR --max-train-samples 2000 --epochs 3
    python train.py mnli 42 --resume            # continue an interrupted run, exactly
    torchrun --standalone --nproc_per_node=8 train.py mnli 42       # one run over 8 GPUs
    python train.py --plan table4 | parallel -j 8 'CUDA_VISIBLE_DEVICES=$(({%}-1)) sh -c {}'

The protocol (the official code, on RED's revisited splits): train on GLUE train; after every
epoch evaluate the new validation split; whenever its first metric strictly improves, evaluate
the new test split. The result is the test metric at the best validation epoch, never the best
test value. This file: Table 9, the settings, then train() and its helpers in the order it calls
them, then the command line. How a run survives kills and spreads over processes is run.py's;
predictions with a finished run are predict.py's, tables and figures report.py's.
"""
import argparse
import math
import os
import shlex
import sys
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import NamedTuple, get_args

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import Parser, RunError, UsageError, command_line, not_a_folder, say, user_errors
from delora import add_adapters, adapter_diagnostics, adapter_state_dict, count_parameters
from delora import load_adapter_state_dict
from glue import TASKS, batch_order, compute_metrics, encode, get_task, load_glue, metrics_text
from roberta import check_max_length, from_pretrained, load_tokenizer, read_safetensors
from run import Run, check_device, check_export, export_merged, run_name, seed_everything


def setting(default=MISSING, help="", results=True, flags=(), **cli):
    """A field of TrainConfig: its default, its --help text, whether it is part of the experiment
    (results=False: how the run executes, which changes the numbers by float rounding at most --
    and --device the dropout masks drawn: docs/long-runs.md), its spellings, argparse's
    (choices...)."""
    return field(default=default, metadata=dict(help=help, results=results, flags=flags, cli=cli))


class Hparams(NamedTuple):
    lam: float        # λ's initial value
    lr: float         # learning rate of A, B and the head
    lam_lr: float     # λ's own learning rate
    batch_size: int
    epochs: int
    dropout: float    # on the adapter's input
    lora_lr: float    # the LoRA baseline's learning rate


# The paper's Table 9 (v2) = the official glue_eval.sh (which lacks MRPC: taken from the table).
# lora_lr: from the LoRA paper's RoBERTa-base setup (Hu et al. 2021, Table 9); the baseline
# shares everything else (r = 8, batch, epochs, dropout) and uses α = 8.
HPARAMS = {
    #               λ   lr    λ lr  bs  ep  drop  lora lr
    "mnli": Hparams(12, 1e-3, 3e-3, 32, 30, 0.0,  5e-4),
    "sst2": Hparams(12, 1e-3, 3e-3, 32, 30, 0.1,  5e-4),
    "mrpc": Hparams(4,  3e-2, 1e-2, 32, 40, 0.2,  4e-4),
    "cola": Hparams(4,  1e-2, 1e-2, 8,  80, 0.2,  4e-4),
    "qnli": Hparams(12, 3e-3, 3e-3, 32, 25, 0.25, 4e-4),
    "qqp":  Hparams(12, 3e-3, 3e-3, 32, 25, 0.1,  5e-4),
    "rte":  Hparams(4,  1e-2, 1e-2, 32, 80, 0.0,  5e-4),
    "stsb": Hparams(12, 1e-2, 1e-2, 8,  40, 0.2,  4e-4),
}
WARMUP = 0.06        # fraction of all steps with a linearly rising learning rate
WEIGHT_DECAY = 0.01  # AdamW's default; on A, B, the head's weights and λ too (official)
PATHS = ("model", "data", "out_dir", "save_merged")  # the options that name a file or folder
RULES = [  # (options, the test a value passes, what a value that fails it is told): `check`
    (("seed",), lambda v: 0 <= v < 2**32, "must be in [0, 2**32 - 1], got {}"),  # numpy's
    (PATHS, str.strip, "is an empty path: name a folder"),
    (("lam", "alpha", "lr", "lam_lr", "lr_mult", "dropout"), math.isfinite,
     "must be a finite number, got {:g}"),
    (("lr", "lam_lr", "lr_mult"), lambda v: v > 0, "must be > 0, got {:g}"),
    (("r", "epochs", "batch_size", "max_length", "eval_batch_size", "max_train_samples"),
     lambda v: v >= 1, "must be >= 1, got {:g}"),
    (("save_every",), lambda v: v >= 0, "must be >= 0, got {:g}"),
    (("dropout",), lambda v: 0 <= v < 1, "must be in [0, 1), got {:g}")]


@dataclass
class TrainConfig:
    """Every setting of a run, its help its --help text. The settings of the experiment (`results`
    in `setting`) name the run's files; those left at None come from HPARAMS."""
    task: str = setting(help=f"GLUE task: {', '.join(TASKS)}")
    seed: int = setting(help="random seed: initialization, data order and split (paper: 42-46)")
    model: str = setting("FacebookAI/roberta-base", "hub id or local checkpoint directory")
    data: str | None = setting(None, "local GLUE TSV folder (the root or the task's), or "
                                          "a save_to_disk folder (default: hub)")
    method: str = setting("delora", "delora, or lora (the baseline)", choices=("delora", "lora"))
    r: int = setting(8, "rank, on query and value of every layer (--adapter-rank: under "
                        "torchrun, which takes --r)", flags=("--r", "--adapter-rank"))
    lam: float | None = setting(None, "DeLoRA's initial λ (default: per task)")
    alpha: float = setting(8.0, "LoRA's α (scale α / r)")
    lr: float | None = setting(None, "learning rate of A, B and the head (default: per task)")
    lam_lr: float | None = setting(None, "λ's own learning rate (default: per task)")
    lr_mult: float = setting(1.0, "multiply A's and B's learning rate only: robustness sweeps")
    batch_size: int | None = setting(None, "default: per task")
    epochs: int | None = setting(None, "default: per task")
    dropout: float | None = setting(None, "on the adapter's input (default: per task)")
    max_length: int = setting(256, "truncate to this many tokens, as the official code; more "
                                   "than the model's positions (roberta-base: 512) is an error")
    max_train_samples: int | None = setting(None, "train on the first N examples only")
    group_by_length: bool = setting(False, "batches of similar lengths (not the paper's)")
    eval_batch_size: int = setting(128, "evaluation batches (changes float rounding only)",
                                   results=False)
    device: str = setting("auto", "auto = cuda, then mps, then cpu", results=False)
    bf16: bool = setting(False, "bfloat16 autocast of the encoder's matmuls (for CUDA)")
    compile: bool = setting(False, "torch.compile the model (the same dropout masks: float "
                                   "rounding only)", results=False)
    out_dir: str = setting(".logs", "logs go here", results=False)
    save_merged: str | None = setting(None, "write the best model, adapters merged, as a HF "
                                            "checkpoint (a finished run: with --resume)",
                                      results=False, metavar="DIR")
    overwrite: bool = setting(False, "replace an existing run", results=False)
    save_every: int = setting(1000, "steps between checkpoints (and one at every epoch's end; "
                                    "0: there only)", results=False, metavar="STEPS")
    keep_checkpoint: bool = setting(False, "keep the checkpoint once the run ends", results=False)
    resume: bool = setting(False, "continue from the checkpoint, exactly (none: start the run)",
                           results=False)

    def __post_init__(self):  # fill what was not given from the task's row of HPARAMS
        get_task(self.task)  # an unknown task: a ValueError that lists the eight
        row = HPARAMS[self.task]._asdict()
        lora_lr = row.pop("lora_lr")
        if self.method == "lora":
            row["lr"] = lora_lr
        for name, value in row.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in PATHS:  # ~ is the home folder in every path option alike
            if isinstance(getattr(self, name), str):
                setattr(self, name, os.path.expanduser(getattr(self, name)))
        # A local model or data folder by its absolute path: the run's JSON and its resume line
        # name them for predict.py and --resume run from any folder (a hub id stays as it is).
        for name in ("model", "data"):
            if getattr(self, name) and os.path.isdir(getattr(self, name)):
                setattr(self, name, os.path.abspath(getattr(self, name)))
        check(self)

    def changed(self, numbers_only=False):
        """The settings that differ from the task's defaults for the method, by name, but the
        task and seed: what a command line must say; numbers_only: those of them that are part of
        the experiment (`setting`)."""
        default = TrainConfig(self.task, self.seed, method=self.method)
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("task", "seed") and getattr(self, f.name) !=
                getattr(default, f.name) and (f.metadata["results"] or not numbers_only)}

    def overrides(self):
        """The settings of the experiment that differ from the task's defaults, but the
        model, the data and what the method does not use: a row's name in report.py.
        TrainConfig("mnli", 1, lr=5e-3).overrides() -> {'lr': 0.005}."""
        unused = {"lam", "lam_lr"} if self.method == "lora" else {"alpha"}
        return {k: v for k, v in self.changed(numbers_only=True).items()
                if k not in unused | {"model", "data"}}

    def command(self, torchrun=False, **changes):
        """The train.py arguments of this run: TASK SEED and each option not at its default,
        e.g. TrainConfig("rte", 42, lr_mult=2.0).command(resume=True) -> 'rte 42 --lr-mult 2.0
        --resume'; --overwrite left out. torchrun: each option by its last spelling (--r as
        --adapter-rank, which torchrun's own parser leaves alone)."""
        cfg = replace(self, **changes)
        args = [cfg.task, str(cfg.seed)] + ["--method", cfg.method] * (cfg.method != "delora")
        by_name = {f.name: f for f in fields(self)}
        for name, value in cfg.changed().items():
            flags = by_name[name].metadata["flags"] or ["--" + name.replace("_", "-")]
            flag = flags[-1] if torchrun else flags[0]
            args += [] if name == "overwrite" else [flag] if value is True else [flag, str(value)]
        return shlex.join(args)

    def run_name(self):
        return run_name(self)


def check_rules(values, rules):
    """The rows of `rules` (options, the test a value passes, what one that fails is told) on the
    values' attributes, None for one not given: the first that fails, one ValueError."""
    for names, ok, told in rules:
        for name in names:
            value = getattr(values, name)
            if value is not None and not ok(value):
                raise ValueError(f"--{name.replace('_', '-')} {told.format(value)}")


def check(cfg):
    """Bad values as one ValueError naming the option (a negative learning rate would train
    silently by gradient ascent: AdamW checks only its default lr)."""
    if cfg.method not in ("delora", "lora"):
        raise ValueError(f"--method {cfg.method!r}: valid: delora, lora")
    check_rules(cfg, RULES)
    check_device(cfg.device)
    if cfg.method == "delora" and cfg.lam == 0 or cfg.method == "lora" and not cfg.alpha:
        update = ("--lam 0: DeLoRA's update (λ/r)(B Ξ A − B₀ Ξ₀ A₀) ⊙ w"
                  if cfg.method == "delora" else "--alpha 0: LoRA's update (α/r) B A")
        raise ValueError(f"{update} would be identically zero, and so would every gradient "
                         f"of the adapter: nothing but the head would train")


# ---------------------------------------------------------------------------------------------
# The protocol

def train(cfg: TrainConfig):
    """One run of the paper's protocol for a task and a seed; returns its summary (also written
    to disk as <run>.json). run.py keeps the run's files, checkpoints and processes."""
    # the run: device, processes, what is on disk under its name; from here on a signal stops
    # it cleanly, and however it ends its JSON says how (run.Run)
    with Run(cfg) as run:
        if run.summary is not None:  # finished or diverged earlier: nothing left to train
            return save_merged(cfg, run)
        seed_everything(cfg.seed)  # before the head and the adapters are made, as officially
        spec = get_task(cfg.task)
        with user_errors():  # a bad path, file or value: one line, before anything is written
            # 1. data: GLUE train; GLUE validation cut by the seed into new validation and test
            tokenizer = load_tokenizer(cfg.model, cfg.max_length)
            train_ds, val_ds, test_ds = load_glue(cfg.task, cfg.seed, cfg.data)
            # 2. model: the pretrained checkpoint, adapters on query and value, a new head
            model = build_model(cfg, spec.num_labels).to(run.device)
            check_max_length(cfg.max_length, tokenizer, model.config, len(spec.text_keys) == 2)
        if cfg.bf16:
            frozen_in_bf16(model)
        if cfg.max_train_samples:
            train_ds = train_ds.select(range(min(cfg.max_train_samples, len(train_ds))))
        enc = {k: encode(cfg.task, ds, tokenizer, model.config.pad_token_id)  # tokenized once
               for k, ds in (("train", train_ds), ("val", val_ds), ("test", test_ds))}
        forward = run.distribute(model)  # what training calls: compiled and/or DDP, as asked
        n = count_parameters(model)
        say(f"{cfg.task} seed {cfg.seed}: {cfg.method} on {cfg.model}; train/val/test "
            f"{len(train_ds)}/{len(val_ds)}/{len(test_ds)}; trainable {n['adapter']:,} adapter "
            f"+ {n['trainable'] - n['adapter']:,} head of {n['total']:,}")

        # 3. AdamW with λ in its own group at its own rate; linear warmup and decay over all
        optimizer = torch.optim.AdamW(param_groups(model, cfg), fused=run.device.type == "cuda")
        per_epoch = math.ceil(len(enc["train"]) / cfg.batch_size)
        schedule = linear_schedule(cfg.epochs * per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        # the protocol's state: the best validation score so far, its epoch, metrics, adapter
        best = dict(score=-math.inf, epoch=None, val=None, test=None, adapter=None)
        first = run.start(model, optimizer, scheduler, best)  # or as it was stopped

        # 4. every epoch: train, validate, and test only when validation strictly improves
        lengths, metric = enc["train"].lengths, spec.metrics[0]
        for epoch in range(first, cfg.epochs):
            forward.train()
            for idx in run.batches(epoch_order(lengths, cfg, epoch)):  # where it stands
                part, weight = shard(idx, run.dist)  # this process's share of the batch
                batch = enc["train"].batch(part, run.device)
                loss = train_step(forward, optimizer, batch, cfg.bf16, weight)
                lr = {g["name"]: g["lr"] for g in optimizer.param_groups}  # this step's
                scheduler.step()
                run.step_done(loss)  # checks the losses; checkpoints and stops when due
            record = dict(epoch=epoch)
            if run.main:  # rank 0 alone evaluates: exactly a single-process run's metrics
                record.update(val=evaluate(model, enc["val"], cfg), lr=lr,  # the last step's
                              adapters=adapter_diagnostics(model),  # λ, ‖ΔW‖_F, the bound
                              **decay_alone(cfg, schedule, (epoch + 1) * per_epoch))
                # the paper's rule: test only when validation strictly improves (a tie is no
                # improvement, nor is a NaN ever one); that test metric is the result until beaten
                if record["val"][metric] > best["score"]:
                    record["test"] = evaluate(model, enc["test"], cfg)
                    best.update(score=record["val"][metric], epoch=epoch, val=record["val"],
                                test=record["test"], adapter=adapter_state_dict(model))
            run.end_epoch(record, best)  # checkpoint, logs, the epoch line; a stop, if asked

        # 5. the result: the test metric at the best validation epoch (rank 0 knows it)
        if run.main and best["epoch"] is None:
            raise RunError(f"finished, but validation {metric} was never a number in "
                           f"{cfg.epochs} epoch(s) (NaN: constant predictions?): no best "
                           f"epoch, no result", status="finished")
        if run.main:
            say(f"done: best epoch {best['epoch'] + 1}, test {metrics_text(best['test'])}  "
                f"{shlex.quote(str(run.paths['json']))}")  # as the next command takes it
    return save_merged(cfg, run)


def build_model(cfg, num_labels, adapter=None):
    """The pretrained checkpoint with adapters added (seeded, so identical for a seed); with
    `adapter` (a run's adapter file's tensors) loaded into them: the fine-tuned model."""
    model = add_adapters(from_pretrained(cfg.model, num_labels=num_labels), method=cfg.method,
                         targets=("query", "value"), r=cfg.r, lam=cfg.lam, alpha=cfg.alpha,
                         dropout=cfg.dropout)
    return model if adapter is None else load_adapter_state_dict(model, adapter)


def frozen_in_bf16(model):
    """--bf16: every frozen Linear (the encoder's, and the adapters' bases) held in bfloat16
    once -- the values autocast would cast its weight and bias to in every step -- so that a
    step casts none; A, B, λ, w, the head, LayerNorm and the embeddings stay float32."""
    for m in model.modules():
        if isinstance(m, nn.Linear) and not m.weight.requires_grad:
            m.to(torch.bfloat16)


def param_groups(model, cfg, head="classifier"):
    """AdamW groups as in the official code: λ at its own learning rate and, like A, B and the
    head's weights, with weight decay 0.01 (AdamW's default, kept for λ too: each step takes
    λ times 1 − lr_λ·f(s)·0.01 before its gradient step, `decay_alone`); A, B, head at lr;
    biases and LayerNorm weights without decay. Named adapter (A, B), head, no_decay, lam."""
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
    # --lr-mult scales A and B only: the sweep tests the adapter, not the head nor λ
    settings = {"adapter": (cfg.lr * cfg.lr_mult, WEIGHT_DECAY), "head": (cfg.lr, WEIGHT_DECAY),
                "no_decay": (cfg.lr, 0.0), "lam": (cfg.lam_lr, WEIGHT_DECAY)}
    return [dict(name=name, params=params, lr=settings[name][0], weight_decay=settings[name][1])
            for name, params in groups.items() if params]


def linear_schedule(total_steps):
    """The learning-rate factor of each step, the official script's schedule exactly: it gives
    `num_warmup_steps = 0.06 * total`, a fraction, to transformers' linear schedule: step /
    (0.06 total) below it, then down to 0 linearly. E.g. 60 steps: warmup 3.6; steps 0-3 get 0,
    1/3.6, 2/3.6, 3/3.6, step 4 gets 56/56.4 (the peak, 1, never exactly). An int warmup, 3,
    would change every step but the first (step 59 too: 1/57, not 1/56.4)."""
    warmup = WARMUP * total_steps  # a float, as the official code computes it

    def factor(step):
        if step < warmup:  # 1. warmup: 0 -> 1, linearly
            return step / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))  # 2. decay: 1 -> 0
    return factor


def decay_alone(cfg, schedule, steps):
    """λ after the run's first `steps` steps under AdamW's weight decay alone (gradient 0):
    λ₀ · Π_s (1 − lr_λ · f(s) · WEIGHT_DECAY), f the schedule; report.py's lambda.png reads λ
    against it. {} for LoRA (no λ)."""
    if cfg.method != "delora":
        return {}
    lam = float(cfg.lam)
    for s in range(steps):
        lam *= 1 - cfg.lam_lr * schedule(s) * WEIGHT_DECAY
    return dict(lam_decay_only=lam)


def epoch_order(lengths, cfg, epoch):
    """The batches of epoch `epoch` (from 0), as example indices: a new permutation every
    epoch, each drawn from one numpy.random.RandomState(seed) in turn -- the (epoch + 1)-th
    draw -- so that the order is the seed's and the epoch's alone, and a resumed run draws it
    again (glue.batch_order; --group-by-length: batches of similar lengths)."""
    rng = np.random.RandomState(cfg.seed)
    for _ in range(epoch + 1):
        order = batch_order(lengths, cfg.batch_size, rng, cfg.group_by_length)
    return order


def shard(idx, dist):
    """This process's part of a global batch, and the weight of its mean loss that makes the
    processes' averaged gradients the whole batch's mean: len(part) · world / len(batch). A
    process left without an example runs one at weight 0, so that every process joins the
    all-reduce. One process: the batch, weight 1."""
    part = np.array_split(idx, dist.world)[dist.rank]
    return (idx[:1], 0.0) if len(part) == 0 else (part, len(part) * dist.world / len(idx))


def train_step(model, optimizer, batch, bf16=False, weight=1.0):
    """Forward, backward, optimizer step; returns loss x weight (`shard`) on the device."""
    loss = loss_fn(logits_of(model, batch, bf16), batch["labels"]) * weight
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def logits_of(model, batch, bf16=False):
    """The model's logits for a batch dict (from Encoded.batch), under bf16 autocast if asked."""
    with torch.autocast(batch["input_ids"].device.type, torch.bfloat16, enabled=bf16):
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                     rows=batch.get("rows"))


def loss_fn(logits, labels):
    """Cross-entropy, or MSE for one output (STS-B); in fp32 at least (float64 stays)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    return F.cross_entropy(logits, labels)


def evaluate(model, enc, cfg):
    """The task's metrics on an encoded split: {'accuracy': ...}, selection metric first."""
    return compute_metrics(cfg.task, predict(model, enc, cfg.eval_batch_size, cfg.bf16),
                           enc.labels)


def predict(model, enc, batch_size=128, bf16=False):
    """Predictions for an encoded split: class ids, or scores for regression."""
    logits = all_logits(model, enc, batch_size, bf16)
    return (logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)).numpy()


@torch.inference_mode()
def all_logits(model, enc, batch_size=128, bf16=False):
    """The logits of every example of an encoded split, (N, labels) in float32 on the CPU, in
    the split's order; the model in eval mode (dropout off), on its own device, in batches
    formed longest first (padding does not change a logit)."""
    model.eval()
    device = next(model.parameters()).device
    order = np.argsort(-enc.lengths, kind="stable")
    logits = torch.cat([logits_of(model, enc.batch(order[i:i + batch_size], device), bf16)
                        .float() for i in range(0, len(order), batch_size)]).cpu()
    return logits[torch.from_numpy(np.argsort(order))]          # back to the split's order


def save_merged(cfg, run):
    """--save-merged: the best epoch's model with its adapters merged, as a HF checkpoint, made
    from the run's files once it has ended (killed during the export, a finished run: --resume
    exports it again); returns the run's summary."""
    if cfg.save_merged and run.main:
        if run.summary.get("best_epoch") is None:
            raise UsageError(f"{run.paths['json']} has no best epoch: nothing to export")
        adapter = read_safetensors(run.paths["adapter"])[0]
        export_merged(build_model(cfg, get_task(cfg.task).num_labels, adapter), cfg.save_merged,
                      run_name(cfg), cfg.model)
    return run.summary


# ---------------------------------------------------------------------------------------------
# Command line

def parse_args(argv):
    """train.py's arguments -> TrainConfig: TASK SEED, then one option per field (its help)."""
    table = "\n".join(f"  {t:5} " + "  ".join(f"{v:<6g}" for v in row)
                      for t, row in HPARAMS.items())
    p = Parser(prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Fine-tune RoBERTa with DeLoRA on a GLUE task (RED splits).",
               epilog="per-task defaults (paper Table 9; lora_lr for --method lora):\n"
                      "  task   lam     lr      lam_lr  batch   epochs  dropout lora_lr\n"
                      + table + "\n\nalso:  train.py --plan table4 [--per-gpu K] [OPTIONS]"
                      "\n       predict.py RUN.json TEXT [TEXT_B]\n       report.py [OUT_DIR]"
                      "\n       torchrun --nproc_per_node=N train.py TASK SEED")
    for f in fields(TrainConfig):  # one argument per field: positional without a default
        kind = next(t for t in (bool, int, float, str) if t is f.type or t in get_args(f.type))
        flags, help = f.metadata["flags"] or ["--" + f.name.replace("_", "-")], f.metadata["help"]
        if f.default is MISSING:  # TASK, SEED
            p.add_argument(f.name, type=kind, help=help)
        elif kind is bool:
            p.add_argument(*flags, action="store_true", help=help)
        else:
            p.add_argument(*flags, type=kind, default=f.default, **f.metadata["cli"],
                           help=help + " (default: %(default)s)" * (f.default is not None))
    args = p.parse_args(argv)
    problem = args.data is not None and not_a_folder(os.path.expanduser(args.data))
    if problem:
        p.error(f"--data {args.data}: {problem}")
    try:
        cfg = TrainConfig(**vars(args))
        if cfg.save_merged:  # checked now, not after the run
            check_export(cfg.save_merged, "--save-merged", run_name(cfg), cfg.overwrite,
                         (("logs", cfg.out_dir), ("model", cfg.model), ("data", cfg.data)))
        return cfg
    except ValueError as e:
        p.error(str(e))


def plan(argv):
    """One train.py command per line for Table 4 (8 tasks x seeds 42-46 x DeLoRA/LoRA = 80), for
    xargs -P, GNU parallel or a SLURM array (`sed -n "${ID}p"`). Options after the plan's name
    are added to every line, and checked first. With --per-gpu K a line starts K runs of one
    task at once, for one GPU to share (docs/long-runs.md: when that pays), waits for all of
    them and exits 0 if every run did, else with a failed run's exit status."""
    if argv[:1] != ["table4"]:
        raise UsageError("--plan needs a plan: table4 (then options for every run)")
    options, per_gpu = argv[1:], 1
    if "--per-gpu" in options:
        at = options.index("--per-gpu")
        value = options[at + 1] if at + 1 < len(options) else ""
        if not value.isdigit() or int(value) < 1:
            raise UsageError(f"--per-gpu {value!r}: the number of runs sharing a GPU, 1 or more")
        per_gpu = int(value)
        del options[at:at + 2]
    runs = {task: [[task, str(seed), "--method", method, *options] for seed in range(42, 47)
                   for method in ("delora", "lora")] for task in TASKS}
    every = sum(runs.values(), [])
    for args in every:
        cfg = parse_args(args)  # a bad option fails here, not in 80 jobs
    if cfg.save_merged:  # each run would replace the last one's export, or be refused by it
        raise UsageError(f"--save-merged {cfg.save_merged}: one folder for {len(every)} runs; "
                         f"export a finished run with predict.py RUN.json --save-merged DIR")
    lines = []
    for task_runs in runs.values():
        for i in range(0, len(task_runs), per_gpu):
            commands = [shlex.join(["python", "train.py", *args])
                        for args in task_runs[i:i + per_gpu]]
            lines.append(commands[0] if len(commands) == 1 else  # each in the background:
                         "p=; " + "".join(f'{c} & p="$p $!"; ' for c in commands)  # then wait
                         + "s=0; for i in $p; do wait $i || s=$?; done; exit $s")  # for all
    say("\n".join(lines))
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    with command_line("train.py"):  # a fault: one line and an exit status (cli.FAULTS)
        return plan(argv[1:]) if argv[:1] == ["--plan"] else train(parse_args(argv))


if __name__ == "__main__":
    main()
