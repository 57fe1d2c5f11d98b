"""Use a finished run: score new sentences with it, or export it, from its files alone (<run>.json
and <run>_adapter.safetensors beside it) and the pretrained checkpoint, on the CPU.

    python predict.py .logs/FacebookAI_roberta-base/rte/<run>.json "A man is eating." "A man eats."
    {"task": "rte", "prediction": 0, "probabilities": [0.91, 0.09]}
    python predict.py RUN.json --save-merged DIR    # a plain HF checkpoint, adapters merged
    python predict.py RUN.json --save-peft DIR      # an exact PEFT LoRA adapter (rank 2r)

    from predict import load_finetuned, predict_texts
    model, tokenizer, cfg = load_finetuned(".logs/FacebookAI_roberta-base/rte/<run>.json")
    labels, probs = predict_texts(model, tokenizer, cfg.task, ["A man eats."], ["A man eats."])
"""
import json
import os
import sys
from contextlib import suppress
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from delora import adapters, add_adapters, load_adapter_state_dict, merge_adapters
from glue import TASKS, Encoded, get_task
from roberta import check_max_length, checkpoint_key, from_pretrained, load_tokenizer, resolve
from roberta import read_safetensors, save_pretrained
from glue import Parser, UsageError, check_writable, not_a_folder, say
from glue import user_errors, write_atomic
from run import command_line

BUILD = ("task", "model", "method", "r", "lam", "alpha", "dropout", "max_length")  # the model's
SAME = ("task", "seed", "method", "r", "lam", "alpha", "dropout", "max_length", "lr", "lam_lr",
        "lr_mult", "batch_size", "epochs")  # what an adapter and its run's JSON must agree on


def load_finetuned(run_json):
    """A run's JSON -> (model, tokenizer, cfg): the pretrained checkpoint with the run's best
    adapter and head, in eval mode, on the CPU; cfg: the run's settings. A file that cannot
    serve (not a run's JSON, a damaged adapter, another run's adapter) is a UsageError naming
    it; a run that did not finish is said on stderr (its best adapter so far is used)."""
    run_json = Path(run_json)
    try:
        summary = json.loads(run_json.read_bytes())
    except ValueError:
        raise UsageError(f"{run_json} is not valid JSON") from None
    if not (isinstance(summary, dict) and {"settings", "run_name"} <= set(summary)):
        raise UsageError(f"{run_json} is not a run summary (what train.py writes as <run>.json)")
    s = summary["settings"]
    if not (isinstance(s, dict) and set(BUILD) <= set(s) and s["task"] in TASKS
            and s["method"] in ("delora", "lora")):
        raise UsageError(f"{run_json} holds settings that are not train.py's (it needs "
                         f"{', '.join(BUILD)})")
    cfg, adapter = SimpleNamespace(**s), run_json.with_name(f"{summary['run_name']}"
                                                             f"_adapter.safetensors")
    done = f"{len(summary.get('epochs') or [])} of {s.get('epochs')} epoch(s)"
    if not adapter.is_file():
        raise UsageError(f"no adapter {adapter} beside {run_json}" + (
            f" (the run is {summary.get('status')} after {done})" * (summary.get("status") !=
                                                                        "finished")))
    try:
        state, metadata = read_safetensors(adapter)
        theirs = json.loads(metadata.get("config", "{}"))
    except Exception as e:  # safetensors' own error for a truncated or empty file
        raise UsageError(f"{adapter} is damaged: {str(e).strip()[:200]}") from None
    differ = [k for k in SAME if k in theirs and theirs[k] != s.get(k)]
    if differ:
        raise UsageError(f"{adapter} is another run's adapter (its {', '.join(differ)} differ "
                         f"from {run_json}'s): copy that run's JSON with it, or train this one")
    if summary.get("status") != "finished":
        say(f"predict.py: note: {run_json} is {summary.get('status')} after {done}: its best "
            f"adapter so far is used", err=True)
    spec = get_task(cfg.task)
    with user_errors():  # the model folder may have gone, or hold another model
        model = add_adapters(from_pretrained(cfg.model, num_labels=spec.num_labels),
                             method=cfg.method, r=cfg.r, lam=cfg.lam, alpha=cfg.alpha,
                             dropout=cfg.dropout)  # add_adapters' targets: query and value
        tokenizer = load_tokenizer(cfg.model, cfg.max_length)
        check_max_length(cfg.max_length, tokenizer, model.config, len(spec.text_keys) == 2)
    try:
        load_adapter_state_dict(model, state)
    except ValueError as e:
        raise UsageError(f"{adapter} does not fit the model: {e}") from None
    cfg.run_name = summary["run_name"]
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
        logits = model.eval()(batch["input_ids"], batch["attention_mask"],
                              batch["token_type_ids"]).float()
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


# ---------------------------------------------------------------------------------------------
# Export

def export_of(path):
    """The run whose export the folder holds (a merged one's config.json, a PEFT one's weights'
    metadata: delora_run), or None."""
    with suppress(OSError, ValueError, AttributeError):
        return json.loads((Path(path) / "config.json").read_text()).get("delora_run")
    with suppress(Exception):
        return read_safetensors(Path(path) / "adapter_model.safetensors")[1].get("delora_run")
    return None


def check_export_folder(folder, option, run, overwrite=False, holds=()):
    """A folder an export replaces as a whole: not a mount point, not one holding what the run
    reads or writes (`holds`: (what, path)), and, unless overwrite, empty or an export of this
    run. A link to a folder: that folder."""
    given = Path(folder)
    problem = given.is_symlink() and not_a_folder(given)
    if problem and problem != "no such folder":  # a link loop, a link to a file
        raise UsageError(f"{option} {given}: {problem}")
    path = given.resolve() if given.is_symlink() else given
    if os.path.ismount(path):
        raise UsageError(f"{option} {given} is a mount point: the export replaces its folder as "
                         f"a whole, which a mount point cannot be; give a folder inside it")
    for place in (path, path.parent):  # written beside it first
        check_writable(place, option, given)
    for what, other in holds:
        if other and (what == "logs" or Path(other).is_dir()) and \
                path.resolve() in (Path(other).resolve(), *Path(other).resolve().parents):
            raise UsageError(f"{option} {path} would replace a folder that holds the run's "
                             f"{what} ({other})")
    names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if names and not overwrite and export_of(path) != run:
        raise UsageError(f"{option} {path} holds files that are not an export of this run "
                         f"({', '.join(names[:4])}{', ...' * (len(names) > 4)}): choose another "
                         f"folder, or pass --overwrite to replace it")


def export_merged(model, folder, run, pretrained):
    """The model (its best adapter and head loaded) with each adapter folded into its weight,
    written as a plain HF checkpoint, with the pretrained checkpoint's tokenizer files, in
    place of folder; its config.json names the run (delora_run), which may replace it again."""
    merged, tokenizer = merge_adapters(model).cpu(), resolve(pretrained, "tokenizer").parent
    write_atomic(folder, lambda tmp: save_pretrained(merged, tmp, tokenizer_from=tokenizer,
                                                     delora_run=run))
    say(f"merged model written to {folder}")


def export_peft(model, folder, run, pretrained):
    """The run as a PEFT LoRA adapter for `pretrained`, exactly: each adapter's ΔW = up @ down
    (DeLoRA: rank 2r, its λ/r, Ξ and w inside the factors; LoRA: rank r, α/r inside up) as
    lora_B @ lora_A with scale lora_alpha / r = 1, and the head as PEFT saves a module it trains
    in full (modules_to_save), all under transformers' names. Loaded with PEFT's
    PeftModel.from_pretrained over that checkpoint, it gives the run's logits (to rounding)."""
    from safetensors.torch import save
    cfg, state, targets = model.config, {}, set()
    for name, m in adapters(model):
        up, down = (t.detach().float() for t in m.factors())  # (out, k), (k, in)
        where = "base_model.model." + checkpoint_key(f"{name}.weight", cfg, False)[:-len("weight")]
        state.update({where + "lora_A.weight": down, where + "lora_B.weight": up})
        targets.add(name.rsplit(".", 1)[-1])
    for key, t in model.classifier.state_dict().items():
        state["base_model.model." + checkpoint_key(f"classifier.{key}", cfg, False)] = t.float()
    config = dict(peft_type="LORA", task_type="SEQ_CLS", base_model_name_or_path=str(pretrained),
                  r=up.shape[1], lora_alpha=up.shape[1], target_modules=sorted(targets),
                  lora_dropout=0.0, bias="none", fan_in_fan_out=False, use_rslora=False,
                  use_dora=False, init_lora_weights=True, inference_mode=True,  # BERT: pooler
                  modules_to_save=["classifier"] + ["pooler"] * (not cfg.is_roberta))

    def write(tmp):
        tmp.mkdir()
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "adapter_model.safetensors").write_bytes(save(
            {k: v.contiguous() for k, v in state.items()}, metadata=dict(format="pt",
                                                                          delora_run=run)))
    write_atomic(folder, write)
    say(f"PEFT LoRA adapter (rank {up.shape[1]}, scale 1) written to {folder}")


def main(argv=None):
    p = Parser(prog="predict.py", description="Score a sentence (pair) with a finished run, "
                                              "or export it.")
    p.add_argument("run_json", help="a run's summary JSON (beside its logs and adapter)")
    p.add_argument("text", nargs="?")
    p.add_argument("text_b", nargs="?", help="the second sentence, for pair tasks")
    p.add_argument("--save-merged", metavar="DIR", help="write the model, adapters merged, as a "
                   "HF checkpoint into DIR")
    p.add_argument("--save-peft", metavar="DIR", help="write the adapters and the head as an exact "
                   "PEFT LoRA adapter into DIR")
    p.add_argument("--overwrite", action="store_true", help="replace what DIR holds")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    with command_line("predict.py"), user_errors():
        if not Path(args.run_json).is_file():  # what is there instead, in words
            problem = not_a_folder(args.run_json)
            raise UsageError(f"{args.run_json}: " + ("a folder, not a run's JSON" if not problem
                                                     else problem.replace("folder", "file")))
        if args.text is None and not (args.save_merged or args.save_peft):
            raise UsageError("give TEXT (and TEXT_B) to score, or --save-merged DIR or "
                             "--save-peft DIR to export")
        for i, text in enumerate(t for t in (args.text, args.text_b) if t is not None):
            try:
                text.encode()
            except UnicodeEncodeError as e:  # bytes the terminal's encoding could not decode
                raise UsageError(f"TEXT{'_B' * i} is not UTF-8 text (at character {e.start})") \
                    from None
        model, tokenizer, cfg = load_finetuned(args.run_json)
        exports = [(option, folder, export) for option, folder, export in (
            ("--save-peft", args.save_peft, export_peft),
            ("--save-merged", args.save_merged, export_merged)) if folder]
        for option, folder, _ in exports:  # both checked before either is written
            check_export_folder(folder, option, cfg.run_name, args.overwrite,
                                (("logs", Path(args.run_json).parent), ("model", cfg.model)))
        for _, folder, export in exports:  # merging last: it changes the model
            export(model, folder, cfg.run_name, cfg.model)
        if exports:
            return None
        b = None if args.text_b is None else [args.text_b]
        preds, probs = predict_texts(model, tokenizer, cfg.task, [args.text], b)
        say(json.dumps(dict(task=cfg.task, prediction=preds[0],
                            probabilities=None if probs is None else probs[0])))
        return preds[0], probs and probs[0]


if __name__ == "__main__":
    main()
