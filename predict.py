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
from roberta import load_tokenizer
from run import Parser, UsageError, command_line
from train import TrainConfig, build_model, logits_of


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
    batch = Encoded([e.ids for e in enc], [e.type_ids for e in enc], np.zeros(len(enc)),
                    model.config.pad_token_id).batch(np.arange(len(enc)))
    with torch.inference_mode():
        logits = logits_of(model.eval(), batch).float()
    if get_task(task).num_labels == 1:
        return logits.squeeze(-1).tolist(), None
    return logits.argmax(-1).tolist(), logits.softmax(-1).tolist()


def main(argv=None):
    p = Parser(prog="predict.py", description="Score a sentence (pair) with a finished run.")
    p.add_argument("run_json", help="a run's summary JSON (beside its logs and adapter)")
    p.add_argument("text")
    p.add_argument("text_b", nargs="?", help="the second sentence, for pair tasks")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    with command_line("predict.py"):
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
