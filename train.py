"""Fine-tune RoBERTa with DeLoRA (or LoRA) on one GLUE task, following the paper's protocol.

    python train.py rte 42                      # one cell of the paper's Table 4
    python train.py stsb 42 --model DIR --data DIR --max-train-samples 2000 --epochs 3
    python report.py .logs                      # the table over all finished runs
    python train.py --predict RUN.json "A man is eating." "A man eats."

Protocol (RED splits, as the official code): train on GLUE train; after every epoch evaluate
the new validation split; whenever its first metric strictly improves, evaluate the new test
split. The result is the test metric at the best validation epoch, never the best test value.
"""
import argparse
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
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
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout:g}")

    def overrides(self):
        """The settings that differ from this task's defaults: what names a row in a report."""
        default = TrainConfig(self.task, self.seed, method=self.method)
        skip = {"task", "seed", "model", "out_dir", "device", "overwrite", "save_merged", "data",
                "eval_batch_size"} | ({"lam", "lam_lr"} if self.method == "lora" else {"alpha"})
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


class UsageError(Exception):
    """Bad input (task, paths, downloads): main() prints it as one line, no traceback."""


class Diverged(Exception):
    """The loss became NaN or inf."""


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name):
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; try cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available here; try cpu or auto")
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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


def train_step(model, optimizer, batch, bf16=False):
    """Forward, backward, optimizer step; returns the loss, still on the device (no sync)."""
    loss = loss_fn(logits_of(model, batch, bf16), batch["labels"])
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


def save_adapter(state, path, cfg):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(path),
              metadata={"config": json.dumps(asdict(cfg))})


def train(cfg: TrainConfig):
    """The whole run, top to bottom. Returns the JSON summary (also written to disk)."""
    t_start = time.time()
    run_dir, name = cfg.run_dir(), cfg.run_name()
    log_path, test_path = run_dir / f"{name}.txt", run_dir / f"{name}_TEST.txt"
    json_path, adapter_path = run_dir / f"{name}.json", run_dir / f"{name}_adapter.safetensors"
    if json_path.exists() and not cfg.overwrite:
        raise UsageError(f"{json_path} exists; pass --overwrite to run it again")

    # 1. data, model and adapters (everything that can fail on bad input happens here)
    seed_everything(cfg.seed)
    spec = get_task(cfg.task)
    try:
        device = pick_device(cfg.device)
        tokenizer = load_tokenizer(cfg.model, cfg.max_length)
        train_ds, val_ds, test_ds = load_glue(cfg.task, cfg.seed, cfg.data)
        model = build_model(cfg, spec.num_labels).to(device)
        check_max_length(cfg.max_length, tokenizer, model.config, pair=len(spec.text_keys) == 2)
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: an unusable --device
        raise UsageError(str(e)) from e
    if cfg.max_train_samples:
        train_ds = train_ds.select(range(min(cfg.max_train_samples, len(train_ds))))
    pad_id = model.config.pad_token_id
    splits = {"train": train_ds, "val": val_ds, "test": test_ds}
    enc = {k: encode(cfg.task, ds, tokenizer) for k, ds in splits.items()}  # once per run
    params = count_parameters(model)
    # dynamic=True: the token count N changes with every batch; compile once for it
    forward = torch.compile(model, dynamic=True) if cfg.compile else model
    print(f"{cfg.task} seed {cfg.seed}: {cfg.method} on {cfg.model} ({device}); train/val/test "
          f"{len(train_ds)}/{len(val_ds)}/{len(test_ds)}; trainable {params['adapter']:,} "
          f"adapter + {params['trainable'] - params['adapter']:,} head of {params['total']:,}")

    # 2. optimizer and schedule
    optimizer = torch.optim.AdamW(param_groups(model, cfg))
    steps_per_epoch = math.ceil(len(enc["train"]) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(cfg.epochs * steps_per_epoch))

    # 3. epochs: train, evaluate validation, and test whenever validation improves
    run_dir.mkdir(parents=True, exist_ok=True)
    for p in (log_path, test_path):
        p.write_text("")
    summary = dict(task=cfg.task, seed=cfg.seed, status="running", settings=asdict(cfg),
                   overrides=cfg.overrides(), run_name=name, metric=spec.metrics[0],
                   params=params, device=str(device), torch=torch.__version__,
                   host=platform.node(), epochs=[], best_epoch=None, val=None, test=None)
    data_rng = np.random.RandomState(cfg.seed)
    lengths, best, best_state, step = enc["train"].lengths, -math.inf, None, 0
    try:
        for epoch in range(cfg.epochs):
            model.train()
            t0 = time.time()
            batches = batch_order(lengths, cfg.batch_size, data_rng, cfg.group_by_length)
            train_loss = run_epoch(forward, optimizer, scheduler, enc["train"], batches, pad_id,
                                   device, cfg, epoch, step)
            step += len(batches)
            train_s = time.time() - t0
            val = evaluate(cfg.task, model, enc["val"], pad_id, device, cfg)
            record = dict(epoch=epoch, train_loss=train_loss, val=val,
                          lr={g["name"]: g["lr"] for g in optimizer.param_groups},
                          adapters=adapter_diagnostics(model),
                          examples_per_s=round(len(lengths) / train_s, 1),
                          seconds=round(time.time() - t0, 2))
            with open(log_path, "a") as f:
                f.write(f"epoch {epoch}: {val}\n")
            score = val[spec.metrics[0]]
            if score > best:  # strictly better (NaN never is)
                best = score
                record["test"] = evaluate(cfg.task, model, enc["test"], pad_id, device, cfg)
                summary.update(best_epoch=epoch, val=val, test=record["test"])
                best_state = adapter_state_dict(model)
                save_adapter(best_state, adapter_path, cfg)
                with open(test_path, "a") as f:
                    f.write(f"epoch {epoch}: {record['test']}\n")
            summary["epochs"].append(record)
            summary["wall_time_s"] = round(time.time() - t_start, 1)
            json_path.write_text(json.dumps(summary, indent=1))
            print(f"epoch {epoch} ({epoch + 1}/{cfg.epochs})  loss {train_loss:.4f}  val "
                  + "  ".join(f"{k} {v:.4f}" for k, v in val.items())
                  + f"  | best epoch {summary['best_epoch']}: test "
                  + "  ".join(f"{k} {v:.4f}" for k, v in (summary["test"] or {}).items())
                  + f"  ({record['examples_per_s']:.0f} ex/s, {record['seconds']:.1f}s)",
                  flush=True)
    except Diverged as e:
        summary.update(status="diverged", error=str(e))
        json_path.write_text(json.dumps(summary, indent=1))
        raise

    # 4. report, and optionally export the best model as a merged HF checkpoint
    summary.update(status="finished", wall_time_s=round(time.time() - t_start, 1))
    json_path.write_text(json.dumps(summary, indent=1))
    if cfg.save_merged and best_state is not None:
        load_adapter_state_dict(model, best_state)
        save_pretrained(merge_adapters(model).cpu(), cfg.save_merged,
                        tokenizer_from=resolve(cfg.model, "tokenizer").parent)
        print(f"merged model written to {cfg.save_merged}")
    print(f"done: best epoch {summary['best_epoch']}, test {summary['test']}; logs in {run_dir}")
    return summary


def run_epoch(model, optimizer, scheduler, enc, batches, pad_id, device, cfg, epoch, step0,
              log_every=10):
    """One pass over the training batches; returns the mean loss. Losses stay on the device
    and are checked (finite?) and shown every `log_every` steps: one host sync per window."""
    window, total, n_seen, t0 = [], 0.0, 0, time.time()
    bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
               disable=None)  # None: no bar when the output is not a terminal
    for i, idx in enumerate(bar):
        window.append(train_step(model, optimizer, to_device(enc.batch(idx, pad_id), device),
                                 cfg.bf16))
        scheduler.step()
        n_seen += len(idx)
        if len(window) == log_every or i == len(batches) - 1:
            losses = torch.stack(window).float().cpu()
            bad = (~torch.isfinite(losses)).nonzero()
            if len(bad):
                at = step0 + i - len(window) + 2 + int(bad[0])
                raise Diverged(f"loss is {losses[bad[0]].item()} at epoch {epoch}, step {at} "
                               f"(of the run); lower --lr, or try another seed")
            total += losses.sum().item()
            window = []
            bar.set_postfix(loss=f"{losses.mean():.4f}",
                            ex_s=f"{n_seen / (time.time() - t0):.1f}")
    return total / len(batches)


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
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv):
    table = "\n".join(f"  {t:5} " + "  ".join(f"{v:<6g}" for v in row)
                      for t, row in HPARAMS.items())
    p = Parser(prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Fine-tune RoBERTa with DeLoRA on a GLUE task (RED splits).",
               epilog="per-task defaults (paper Table 9; lora_lr for --method lora):\n"
                      "  task   lam     lr      lam_lr  batch   epochs  dropout lora_lr\n"
                      + table + "\n\nother modes:\n"
                      "  report.py [OUT_DIR] [--plots DIR]                  tables, figures\n"
                      "  train.py --predict RUN.json TEXT [TEXT_B]        score a sentence (pair)")
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
    args = p.parse_args(argv)
    if args.task not in TASKS:
        p.error(f"unknown task {args.task!r}; valid: {', '.join(TASKS)}")
    if args.data is not None and not Path(args.data).is_dir():
        p.error(f"--data {args.data}: no such folder")
    try:
        return TrainConfig(**vars(args))
    except ValueError as e:
        p.error(str(e))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    from huggingface_hub.utils import logging
    logging.set_verbosity_error()  # offline, its retry messages would bury our one-line error
    try:
        if argv[:1] == ["--report"]:
            raise UsageError("the report moved: python report.py OUT_DIR [--plots DIR]")
        if argv[:1] == ["--predict"]:
            return predict_main(argv[1:])
        return train(parse_args(argv))
    except (UsageError, Diverged) as e:
        raise SystemExit(f"train.py: error: {e}")


if __name__ == "__main__":
    main()
