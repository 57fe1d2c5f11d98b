"""Fine-tune RoBERTa with DeLoRA (or LoRA) on one GLUE task: the paper's protocol, top to bottom.

    python train.py rte 42                      # one cell of the paper's Table 4
    python train.py stsb 42 --model DIR --data DIR --max-train-samples 2000 --epochs 3
    python train.py mnli 42 --resume            # continue an interrupted run, exactly
    torchrun --standalone --nproc_per_node=8 train.py mnli 42       # one run over 8 GPUs
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \
        train.py mnli 42                        # ... over 2 machines (node_rank 1 on the other)
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
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from delora import add_adapters, adapter_diagnostics, adapter_state_dict, count_parameters
from glue import TASKS, batch_order, compute_metrics, encode, get_task, load_glue
from roberta import check_max_length, from_pretrained, load_tokenizer
from run import Parser, Run, UsageError, command_line, export_merged, plan_main, run_name
from run import seed_everything, setting, to_device, user_errors


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


@dataclass
class TrainConfig:
    """Every setting of a run; each field's help is its --help text. The settings that can
    change the numbers (`results()`) name the run's files, tell rows apart in report.py and must
    match the checkpoint on --resume. Per-task settings left at None come from HPARAMS."""
    task: str = setting(help=f"GLUE task: {', '.join(TASKS)}")
    seed: int = setting(help="random seed: initialization, data order and split (paper: 42-46)")
    model: str = setting("FacebookAI/roberta-base", "hub id or local checkpoint directory")
    data: str | None = setting(None, "local GLUE folder (TSV files or save_to_disk); "
                                     "default: the hub")
    method: str = setting("delora", "delora, or lora (the baseline)", choices=("delora", "lora"))
    r: int = setting(8, "rank, on query and value of every layer; under torchrun spell it "
                        "--adapter-rank (torchrun takes --r for its own)",
                     flags=("--r", "--adapter-rank"))
    lam: float | None = setting(None, "DeLoRA's initial λ (default: per task)")
    alpha: float = setting(8.0, "LoRA's α (scale α / r)")
    lr: float | None = setting(None, "learning rate of A, B and the head (default: per task and "
                                     "method)")
    lam_lr: float | None = setting(None, "λ's own learning rate (default: per task)")
    lr_mult: float = setting(1.0, "multiply the learning rate of A and B (not the head's, not "
                                  "λ's): for robustness sweeps")
    batch_size: int | None = setting(None, "default: per task")
    epochs: int | None = setting(None, "default: per task")
    dropout: float | None = setting(None, "on the adapter's input (default: per task)")
    max_length: int = setting(256, "truncate to this many tokens, as the official code; more "
                                   "than the model's positions (roberta-base: 512) is an error")
    max_train_samples: int | None = setting(None, "train on the first N examples only "
                                                  "(default: all)")
    group_by_length: bool = setting(False, "batches of similar length: less padding; off = "
                                           "the paper's random order")
    eval_batch_size: int = setting(128, "evaluation batches, sorted by length (the batch size "
                                        "changes only float rounding)", results=False)
    device: str = setting("auto", "auto = cuda, then mps, then cpu", results=False)
    bf16: bool = setting(False, "bfloat16 autocast (for CUDA)")
    compile: bool = setting(False, "torch.compile the model", results=False)
    out_dir: str = setting(".logs", "logs go here", results=False)
    save_merged: str | None = setting(None, "write the best model, adapters merged, as a HF "
                                            "checkpoint into this folder", results=False,
                                      metavar="DIR")
    overwrite: bool = setting(False, "replace an existing run", results=False)
    resume: bool = setting(False, "continue this run from its checkpoint, ending exactly where "
                                  "an uninterrupted run would; nothing to resume: start it",
                           results=False)
    save_every: int = setting(1000, "steps between mid-epoch resume checkpoints (there is one "
                                    "at every epoch's end too); 0: epoch ends only",
                              results=False, metavar="STEPS")
    keep_checkpoint: bool = setting(False, "keep the resume checkpoint when the run ends",
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
        self.check()

    def check(self):
        """Bad values as one ValueError naming the option (a negative learning rate would
        train silently by gradient ascent: AdamW checks only its default lr)."""
        def bad(name, rule):
            return ValueError(f"--{name.replace('_', '-')} must be {rule}, got "
                              f"{getattr(self, name):g}")
        if self.method not in ("delora", "lora"):
            raise ValueError(f"--method {self.method!r}: valid: delora, lora")
        if not 0 <= self.seed < 2**32:  # what numpy's RandomState takes
            raise ValueError(f"--seed must be in [0, 2**32 - 1], got {self.seed}")
        for name in ("model", "data", "out_dir", "save_merged"):
            if getattr(self, name) is not None and not str(getattr(self, name)).strip():
                raise ValueError(f"--{name.replace('_', '-')} is an empty path: name a folder")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"--device {self.device!r}: valid: auto, cpu, cuda, cuda:N, mps")
        for name in ("lam", "alpha", "lr", "lam_lr", "lr_mult", "dropout"):
            if not math.isfinite(getattr(self, name)):
                raise bad(name, "a finite number")
        if self.method == "delora" and self.lam == 0 or self.method == "lora" and not self.alpha:
            update = ("--lam 0: DeLoRA's update (λ/r)(B Ξ A − B₀ Ξ₀ A₀) ⊙ w"
                      if self.method == "delora" else "--alpha 0: LoRA's update (α/r) B A")
            raise ValueError(f"{update} would be identically zero, and so would every gradient "
                             f"of the adapter: nothing but the head would train")
        for name in ("lr", "lam_lr", "lr_mult"):
            if not getattr(self, name) > 0:
                raise bad(name, "> 0")
        for name in ("r", "epochs", "batch_size", "max_length", "eval_batch_size",
                     "max_train_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise bad(name, ">= 1")
        if self.save_every < 0:
            raise bad("save_every", ">= 0")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "in [0, 1)")

    def results(self):
        """The settings that can change the numbers, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["results"]}

    def overrides(self):
        """The settings that can change the numbers and differ from the task's defaults, but
        those that say which run it is (task, seed, model, data) or that the method does not
        use: what names a row in report.py. TrainConfig("mnli", 1, lr=5e-3) -> {'lr': 0.005}."""
        default = TrainConfig(self.task, self.seed, method=self.method)
        unused = {"lam", "lam_lr"} if self.method == "lora" else {"alpha"}
        return {k: v for k, v in self.results().items() if k not in unused
                and k not in ("task", "seed", "model", "data") and v != getattr(default, k)}

    def run_name(self):
        return run_name(self)


# ---------------------------------------------------------------------------------------------
# The protocol

def train(cfg: TrainConfig):
    """One run of the paper's protocol for a task and a seed; returns its summary (also written
    to disk as <run>.json). run.py keeps the run's files, checkpoints and processes."""
    # the run: device, processes, what is on disk under its name; from here on a signal stops
    # it cleanly, and however it ends its JSON says how (run.Run)
    with Run(cfg) as run:
        if run.ended:  # finished or diverged earlier: --resume has nothing to do
            return run.summary
        seed_everything(cfg.seed)  # before the head and the adapters are made, as officially
        spec = get_task(cfg.task)
        with user_errors():  # a bad path, file or value: one line, before anything is written
            # 1. data: GLUE train; GLUE validation cut by the seed into new validation and test
            tokenizer = load_tokenizer(cfg.model, cfg.max_length)
            train_ds, val_ds, test_ds = load_glue(cfg.task, cfg.seed, cfg.data)
            # 2. model: the pretrained checkpoint, adapters on query and value, a new head
            model = build_model(cfg, spec.num_labels).to(run.device)
            check_max_length(cfg.max_length, tokenizer, model.config, len(spec.text_keys) == 2)
        if cfg.max_train_samples:
            train_ds = train_ds.select(range(min(cfg.max_train_samples, len(train_ds))))
        splits = {"train": train_ds, "val": val_ds, "test": test_ds}
        enc = {k: encode(cfg.task, ds, tokenizer, model.config.pad_token_id)  # tokenized once
               for k, ds in splits.items()}
        forward = run.distribute(model)  # what training calls: compiled and/or DDP, as asked
        n = count_parameters(model)
        run.say(f"{cfg.task} seed {cfg.seed}: {cfg.method} on {cfg.model} ({run.device} x "
                f"{run.dist.world}); train/val/test {len(train_ds)}/{len(val_ds)}/"
                f"{len(test_ds)}; trainable {n['adapter']:,} adapter + "
                f"{n['trainable'] - n['adapter']:,} head of {n['total']:,}")

        # 3. AdamW with λ in its own group at its own rate; linear warmup and decay over all
        optimizer = torch.optim.AdamW(param_groups(model, cfg))
        steps = cfg.epochs * math.ceil(len(enc["train"]) / cfg.batch_size)
        schedule = linear_schedule(steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        data_rng = np.random.RandomState(cfg.seed)  # draws each epoch's order of the examples
        run.start(model, optimizer, scheduler, data_rng)  # or where a checkpoint left it

        # 4. every epoch: train, validate, and test only when validation strictly improves
        lengths, metric = enc["train"].lengths, spec.metrics[0]
        for epoch in range(run.progress.epoch, cfg.epochs):
            forward.train()
            for idx, weight in run.batches(lambda: batch_order(
                    lengths, cfg.batch_size, data_rng, cfg.group_by_length)):
                batch = to_device(enc["train"].batch(idx), run.device)
                loss = train_step(forward, optimizer, batch, cfg.bf16, weight)
                lr = {g["name"]: g["lr"] for g in optimizer.param_groups}  # this step's
                scheduler.step()
                run.step_done(loss)  # checks the losses; checkpoints and stops when due
            record = dict(epoch=epoch, train_loss=run.epoch_loss())
            if run.main:  # rank 0 alone evaluates: exactly a single-process run's metrics
                record.update(val=evaluate(model, enc["val"], cfg), lr=lr,  # the last step's
                              adapters=adapter_diagnostics(model),  # λ, ‖ΔW‖_F, the bound
                              **decay_alone(cfg, schedule, run.progress.step))
            # strictly: a tie is no improvement (nor is a NaN metric ever one)
            improved = run.main and record["val"][metric] > run.progress.best
            if improved:  # test now; this epoch's test metric is the result, until beaten
                run.progress.best = record["val"][metric]
                record["test"] = evaluate(model, enc["test"], cfg)
                run.summary.update(best_epoch=epoch, val=record["val"], test=record["test"])
            run.end_epoch(record, adapter_state_dict(model) if improved else None)

        # 5. if asked, the best epoch's model with its adapters merged, as a HF checkpoint
        # (before the run is marked finished: killed during the export, --resume exports again)
        if run.main and cfg.save_merged and run.best_state is not None:
            export_merged(model, run.best_state, cfg)
            run.say(f"merged model written to {cfg.save_merged}")
        return run.finish()


def build_model(cfg, num_labels):
    """The pretrained checkpoint with adapters added (seeded, so identical for a seed)."""
    model = from_pretrained(cfg.model, num_labels=num_labels)
    return add_adapters(model, method=cfg.method, targets=("query", "value"), r=cfg.r,
                        lam=cfg.lam, alpha=cfg.alpha, dropout=cfg.dropout)


def param_groups(model, cfg, head="classifier"):
    """AdamW groups as in the official code: λ at its own learning rate, and, like A, B and
    the head's weights, with weight decay 0.01 (AdamW's default, which the official code keeps
    for λ too: each step multiplies λ by 1 − lr_λ·f(s)·0.01 before its gradient step, a pull
    toward 0 that `decay_alone` computes); the other weights (A, B, head) at lr; biases and
    LayerNorm weights without decay. The groups are named adapter (A, B), head, no_decay, lam."""
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
    """The learning-rate factor of each step, the official script's schedule exactly: it passes
    `num_warmup_steps = 0.06 * total` -- a fraction, not rounded -- to the reference library's
    linear schedule, so the factor rises as step / (0.06 total) while step < 0.06 total, then
    falls linearly to 0 at `total_steps`. E.g. 60 steps: warmup 3.6, so steps 0-3 get 0, 1/3.6,
    2/3.6, 3/3.6, step 4 gets 56/56.4 (the peak, 1, is never reached exactly); an int(3.6) = 3
    would give every step but the first and the last another factor."""
    warmup = WARMUP * total_steps  # a float, as the official code computes it

    def factor(step):
        if step < warmup:  # 1. warmup: 0 -> 1, linearly
            return step / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))  # 2. decay: 1 -> 0
    return factor


def decay_alone(cfg, schedule, steps):
    """What AdamW's weight decay alone makes of λ over the run's first `steps` steps, as if its
    gradient were 0: λ₀ · Π_s (1 − lr_λ · f(s) · WEIGHT_DECAY), f the schedule -- the line that
    λ's recorded values are read against (report.py's lambda.png). {} for LoRA (no λ)."""
    if cfg.method != "delora":
        return {}
    lam = float(cfg.lam)
    for s in range(steps):
        lam *= 1 - cfg.lam_lr * schedule(s) * WEIGHT_DECAY
    return dict(lam_decay_only=lam)


def train_step(model, optimizer, batch, bf16=False, weight=1.0):
    """Forward, backward, optimizer step; returns the loss x weight (the shard's weight under
    torchrun, run.Dist.shard), still on the device (no sync)."""
    loss = loss_fn(logits_of(model, batch, bf16), batch["labels"]) * weight
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def logits_of(model, batch, bf16=False):
    """The model's logits for a batch dict (from Encoded.batch), under bf16 autocast if asked."""
    with torch.autocast(batch["input_ids"].device.type, torch.bfloat16, enabled=bf16):
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])


def loss_fn(logits, labels):
    """Cross-entropy, or MSE for a single output (STS-B regression); in fp32 at least (bf16
    logits are cast up, a float64 model keeps float64)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    return F.cross_entropy(logits, labels)


def evaluate(model, enc, cfg):
    """The task's metrics on an encoded split: {'accuracy': ...}, selection metric first."""
    preds = predict(model, enc, cfg.eval_batch_size, cfg.bf16)
    return compute_metrics(cfg.task, preds, enc.labels)


@torch.inference_mode()
def predict(model, enc, batch_size=128, bf16=False):
    """Predictions for an encoded split, on the model's device: class ids, or scores for
    regression. Batches are formed longest-first (less padding; padding does not change a
    prediction)."""
    model.eval()
    device = next(model.parameters()).device
    order = np.argsort(-enc.lengths, kind="stable")
    out = []
    for i in range(0, len(order), batch_size):
        batch = to_device(enc.batch(order[i:i + batch_size]), device)
        out.append(logits_of(model, batch, bf16).float())
    logits = torch.cat(out).cpu()
    preds = (logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)).numpy()
    result = np.empty_like(preds)
    result[order] = preds                                     # back to the split's order
    return result


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
                      + table + "\n\nalso:  train.py --plan table4 [OPTIONS]    predict.py "
                      "RUN.json TEXT [TEXT_B]\n       report.py [OUT_DIR]                 "
                      "torchrun --nproc_per_node=N train.py TASK SEED")
    args = p.add_settings(TrainConfig).parse_args(argv)
    if args.data is not None and not Path(args.data).is_dir():
        p.error(f"--data {args.data}: no such folder")
    try:
        return TrainConfig(**vars(args))
    except ValueError as e:
        p.error(str(e))


MOVED = {"--report": "python report.py OUT_DIR [--plots DIR]",
         "--predict": "python predict.py RUN.json TEXT [TEXT_B]"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    with command_line("train.py"):  # errors as one line, exit codes, the process group closed
        if argv[:1] and argv[0] in MOVED:
            raise UsageError(f"{argv[0]} moved: {MOVED[argv[0]]}")
        if argv[:1] == ["--plan"]:
            return plan_main(argv[1:], parse_args)
        return train(parse_args(argv))


if __name__ == "__main__":
    main()
