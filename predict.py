"""Score new sentences with a finished run: the pretrained checkpoint, plus the run's best
adapter and head (its <run>_adapter.safetensors), on the CPU.

    python predict.py .logs/FacebookAI_roberta-base/rte/<run>.json "A man is eating." "A man eats."
    {"task": "rte", "prediction": 0, "probabilities": [0.91, 0.09]}

    from predict import load_finetuned, predict_texts
    model, tokenizer, cfg = load_finetuned(".logs/FacebookAI_roberta-base/rte/<run>.json")
    labels, probs = predict_texts(model, tokenizer, cfg.task, ["A man eats."], ["A man eats."])
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

from delora import load_adapter_state_dict
from glue import Encoded, get_task
from roberta import check_max_length, load_tokenizer
from run import Parser, UsageError, command_line, user_errors
from train import TrainConfig, build_model, logits_of


def load_finetuned(run_json):
    """A finished run's summary JSON -> (model, tokenizer, cfg): the pretrained checkpoint with
    the run's best adapter and head loaded, in eval mode, on the CPU. A file that cannot serve
    (not a run summary, a damaged adapter, one that does not fit) is a UsageError naming it."""
    run_json = Path(run_json)
    try:
        summary = json.loads(run_json.read_bytes())
    except ValueError:
        raise UsageError(f"{run_json} is not valid JSON") from None
    if not (isinstance(summary, dict) and {"settings", "run_name"} <= set(summary)):
        raise UsageError(f"{run_json} is not a run summary (what train.py writes as <run>.json)")
    try:
        cfg = TrainConfig(**summary["settings"])
    except (TypeError, ValueError) as e:
        raise UsageError(f"{run_json} holds settings that are not train.py's ({e})") from None
    adapter = run_json.with_name(f"{summary['run_name']}_adapter.safetensors")
    if not adapter.is_file():
        raise UsageError(f"no adapter {adapter} beside {run_json}")
    from safetensors.torch import load_file
    with user_errors():  # the model folder may have gone, or hold another model
        model = build_model(cfg, get_task(cfg.task).num_labels)
        tokenizer = load_tokenizer(cfg.model, cfg.max_length)
        check_max_length(cfg.max_length, tokenizer, model.config,
                         len(get_task(cfg.task).text_keys) == 2)
    try:
        state = load_file(str(adapter))
    except Exception as e:  # safetensors' own error for a truncated or empty file
        raise UsageError(f"{adapter} is damaged: {str(e).strip()[:200]}") from None
    try:
        load_adapter_state_dict(model, state)
    except ValueError as e:
        raise UsageError(f"{adapter} does not fit the model: {e}") from None
    return model.eval(), tokenizer, cfg


def predict_texts(model, tokenizer, task, texts, texts_b=None):
    """Score new examples: class ids (or STS-B scores) and, for classification, probabilities.
    predict_texts(model, tok, "rte", ["A man eats."], ["A man is eating."]) -> ([0], [[.9, .1]])"""
    pair = len(get_task(task).text_keys) == 2
    if pair != (texts_b is not None):
        raise ValueError(f"{task} scores a sentence pair: give TEXT and TEXT_B" if pair else
                         f"{task} scores single sentences: give TEXT alone")
    texts = [cut(tokenizer, t, u) for t, u in zip(texts, texts_b or [None] * len(texts))]
    enc = tokenizer.encode_batch([t if texts_b is None else tuple(t) for t in texts])
    batch = Encoded([e.ids for e in enc], [e.type_ids for e in enc], np.zeros(len(enc)),
                    model.config.pad_token_id).batch(np.arange(len(enc)))
    with torch.inference_mode():
        logits = logits_of(model.eval(), batch).float()
    if get_task(task).num_labels == 1:
        return logits.squeeze(-1).tolist(), None
    return logits.argmax(-1).tolist(), logits.softmax(-1).tolist()


def cut(tokenizer, text, text_b=None, slack=64):
    """A text (or pair) cut short before it is encoded, so that encoding it costs memory linear
    in its length -- encoding a long pair whole, `tokenizers` builds every combination of the
    two texts' overflowing windows, quadratic -- and gives the same tokens as the whole one.

    Each text longer than the truncation's budget T (max length minus the special tokens) is
    cut at the end of a word (the tokens before it are unchanged) just past T + 1 tokens; of a
    pair, the one longest-first truncation treats as the longer stays the longer, which is all
    that truncation reads of lengths above T. A word of more than `slack` tokens at the cut is
    cut inside it (exact unless its BPE merges near the cut differ). Returns text, or a pair."""
    max_length = tokenizer.truncation["max_length"]
    budget = max_length - tokenizer.num_special_tokens_to_add(text_b is not None)
    texts = [text] if text_b is None else [text, text_b]
    truncation = tokenizer.truncation
    tokenizer.no_truncation()
    try:
        alone = tokenizer.encode_batch(texts, add_special_tokens=False)
    finally:
        tokenizer.enable_truncation(**truncation)
    n = [len(e.ids) for e in alone]
    order = [0] if len(n) == 1 else ([0, 1] if n[0] <= n[1] else [1, 0])  # shorter/first first
    kept = list(texts)
    at_least = budget + 1
    for i in order:
        if n[i] > at_least:
            j = next((j for j in range(at_least, min(n[i], at_least + slack))
                      if alone[i].word_ids[j] != alone[i].word_ids[j - 1]),
                     min(n[i], at_least + slack))
            if j < n[i]:
                kept[i] = texts[i][:alone[i].offsets[j - 1][1]]
            n[i] = j
        at_least = max(budget + 1, n[i] + 1)  # the longer (or the second of a tie) stays longer
    return kept[0] if text_b is None else tuple(kept)


def main(argv=None):
    p = Parser(prog="predict.py", description="Score a sentence (pair) with a finished run.")
    p.add_argument("run_json", help="a run's summary JSON (beside its logs and adapter)")
    p.add_argument("text")
    p.add_argument("text_b", nargs="?", help="the second sentence, for pair tasks")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    with command_line("predict.py"), user_errors():
        if not Path(args.run_json).is_file():
            raise UsageError(f"{args.run_json}: no such file")
        model, tokenizer, cfg = load_finetuned(args.run_json)
        b = None if args.text_b is None else [args.text_b]
        preds, probs = predict_texts(model, tokenizer, cfg.task, [args.text], b)
        print(json.dumps(dict(task=cfg.task, prediction=preds[0],
                              probabilities=None if probs is None else probs[0])))
        return preds[0], probs and probs[0]


if __name__ == "__main__":
    main()
