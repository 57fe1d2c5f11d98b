"""Use a finished run: score sentences or a whole file with it, or export it, from its files alone
(<run>.json and <run>_adapter.safetensors beside it) and the pretrained checkpoint, on the CPU.

    python predict.py .logs/FacebookAI_roberta-base/rte/<run>.json "A man is eating." "A man eats."
    {"task": "rte", "prediction": 0, "probabilities": [0.91, 0.09]}
    python predict.py RUN.json --input dev.tsv      # one prediction a line; with labels, metrics
    python predict.py RUN.json --save-merged DIR    # a plain HF checkpoint, adapters merged
    python predict.py RUN.json --save-peft DIR      # an exact PEFT LoRA adapter (rank 2r)

    from predict import load_finetuned, predict_texts
    model, tokenizer, cfg = load_finetuned(".logs/FacebookAI_roberta-base/rte/<run>.json")
    labels, probs = predict_texts(model, tokenizer, cfg.task, ["A man eats."], ["A man eats."])
"""
import json
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from cli import STOPPED, Parser, UsageError, check_output, command_line, holder, not_a_folder
from cli import say, user_errors, write_atomic
from delora import adapters, load_adapter_state_dict
from glue import compute_metrics, encode, get_task, label_of, read_text, read_tsv
from roberta import check_max_length, checkpoint_key, load_tokenizer, read_safetensors
from run import check_export, checkpoint_tag, content_of, export_merged
from train import TrainConfig, all_logits, build_model

SAME = ("task", "seed", "method", "r", "lam", "alpha", "dropout", "max_length", "lr", "lam_lr",
        "lr_mult", "batch_size", "epochs")  # what an adapter and its run's JSON must agree on
CAP = 20  # characters of a text kept per token of --max-length (`predict_texts`)


def load_finetuned(run_json, model_dir=None):
    """A run's JSON -> (model, tokenizer, cfg): the pretrained checkpoint with the run's best
    adapter and head (train.build_model), in eval mode, on the CPU; cfg: the run's settings
    and its run_name. model_dir: the checkpoint, where it lies now if not where the run had it (a
    local run's: the same files, checked by their content tag).
    A file that cannot serve (not a run's JSON, a damaged adapter, another run's adapter, a
    model of other files) is a UsageError naming it; a run that did not finish is said on
    stderr (its best adapter so far is used)."""
    run_json = Path(run_json)
    try:
        summary = json.loads(run_json.read_bytes())
    except ValueError:
        raise UsageError(f"{run_json} is not valid JSON") from None
    if not (isinstance(summary, dict) and {"settings", "run_name"} <= set(summary)):
        raise UsageError(f"{run_json} is not a run summary (what train.py writes as <run>.json)")
    s, known = summary["settings"], {f.name for f in fields(TrainConfig)}
    settings = {k: v for k, v in s.items() if k in known}
    settings.update({"model": model_dir} if model_dir else {})
    try:
        cfg = TrainConfig(**settings)
    except (TypeError, ValueError, AttributeError):
        raise UsageError(f"{run_json} holds settings that are not train.py's") from None
    adapter = run_json.with_name(f"{summary['run_name']}_adapter.safetensors")
    done = f"{len(summary.get('epochs') or [])} of {cfg.epochs} epoch(s)"
    status = summary.get("status")
    if status == "running" and holder(run_json.with_suffix(".lock")) is None:
        status = STOPPED
    if not adapter.is_file():
        raise UsageError(f"no adapter {adapter} beside {run_json}" + (
            f" (the run is {status} after {done})" * (status != "finished")))
    try:
        state, metadata = read_safetensors(adapter)
        theirs = json.loads(metadata.get("config", "{}"))
    except Exception as e:  # safetensors' own error for a truncated or empty file
        raise UsageError(f"{adapter} is damaged: {str(e).strip()[:200]}") from None
    differ = [k for k in SAME if k in theirs and theirs[k] != s.get(k)]
    if differ:
        raise UsageError(f"{adapter} is another run's adapter (its {', '.join(differ)} differ "
                         f"from {run_json}'s): copy that run's JSON with it, or train this one")
    if status != "finished":
        say(f"predict.py: note: {run_json} is {status} after {done}: its best adapter so far is "
            f"used", err=True)
    spec = get_task(cfg.task)
    problem = os.path.isabs(cfg.model) and not_a_folder(cfg.model)  # a local one, gone since
    if problem:
        raise UsageError(f"--model {model_dir}: {problem}" if model_dir else f"{run_json} was "
                         f"trained on {cfg.model}, {problem} now: give --model DIR, a copy of it")
    theirs = content_of(str(summary.get("model_tag")))  # a local checkpoint's files
    if model_dir and theirs and os.path.isdir(cfg.model) and \
            content_of(checkpoint_tag(cfg.model)) != theirs:
        raise UsageError(f"--model {model_dir} holds other files than the checkpoint the run was "
                         f"trained on ({summary['model_tag']})")
    with user_errors():  # the model folder may hold another model
        tokenizer = load_tokenizer(cfg.model, cfg.max_length)
        model = build_model(cfg, spec.num_labels)
        check_max_length(cfg.max_length, tokenizer, model.config, len(spec.text_keys) == 2)
    try:
        load_adapter_state_dict(model, state)
    except ValueError as e:
        raise UsageError(f"{adapter} does not fit the model: {e}") from None
    return model.eval(), tokenizer, SimpleNamespace(**asdict(cfg), run_name=summary["run_name"])


def predict_texts(model, tokenizer, task, texts, texts_b=None, batch_size=128):
    """Score new examples: class ids (or STS-B scores) and, for classification, probabilities,
    tokenized as in training (train.all_logits; padding changes nothing). A text longer than
    CAP characters per token of the tokenizer's max length is cut there first (tokenizers'
    truncation of a long pair takes memory quadratic in its length); below that, the tokens
    are training's. predict_texts(model, tok, "rte", ["A man eats."], ["A man is eating."])
    -> ([0], [[.9, .1]])"""
    pair = len(get_task(task).text_keys) == 2
    if pair != (texts_b is not None):
        raise ValueError(f"{task} scores a sentence pair: give TEXT and TEXT_B" if pair else
                         f"{task} scores single sentences: give TEXT alone")
    cap = CAP * tokenizer.truncation["max_length"]
    columns = {k: [t[:cap] for t in c] for k, c in zip(get_task(task).text_keys,
                                                        (texts, texts_b))}
    enc = encode(task, dict(columns, label=np.zeros(len(texts))), tokenizer,
                 model.config.pad_token_id)
    logits = all_logits(model, enc, batch_size)
    if get_task(task).num_labels == 1:
        return logits.squeeze(-1).tolist(), None
    return logits.argmax(-1).tolist(), logits.softmax(-1).tolist()


def read_input(task, path):
    """A file of examples to score -> (its texts, column by column; its labels, or None): GLUE's
    TSV layout (with or without labels, glue.read_tsv), or JSON lines with the hub's keys
    ({"sentence1": ..., "sentence2": ..., "label": ...}: label optional)."""
    path, spec = Path(path), get_task(task)
    if path.suffix != ".jsonl":
        ds = read_tsv(task, path, labels=False)
        return [ds[k] for k in spec.text_keys], ds["label"] if "label" in ds.column_names else None
    rows = []
    for i, line in enumerate(read_text(path).splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            rows.append(None)
        if not (isinstance(rows[-1], dict) and all(isinstance(rows[-1].get(k), str)
                                                   for k in spec.text_keys)):
            raise ValueError(f"{path}, line {i}: not a JSON object with "
                             f"{', '.join(spec.text_keys)} as text")
    labeled = bool(rows) and all("label" in row for row in rows)
    return [[row[k] for row in rows] for k in spec.text_keys], [
        label_of(spec, row["label"], f"{path}, line {i}") for i, row in enumerate(rows, 1)
    ] if labeled else None


def score_file(model, tokenizer, cfg, path, output=None):
    """Every example of an input file (read_input) scored in batches: one prediction per line,
    JSON lines, or TSV (index, prediction) for an output named .tsv; to stdout without output.
    With labels, the task's metrics are the last line printed (and of a JSON-lines output)."""
    texts, labels = read_input(cfg.task, path)
    if not texts[0]:
        raise UsageError(f"{path} holds no examples")
    preds, probs = predict_texts(model, tokenizer, cfg.task, *texts,
                                 batch_size=cfg.eval_batch_size)
    tsv = output is not None and Path(output).suffix == ".tsv"
    lines = ["index\tprediction"] * tsv + [
        f"{i}\t{p}" if tsv else json.dumps(dict(index=i, prediction=p, **(
            {"probabilities": probs[i]} if probs else {}))) for i, p in enumerate(preds)]
    metrics = labels and compute_metrics(cfg.task, preds, labels)
    last = [json.dumps(dict(metrics=metrics, examples=len(preds)))] if metrics else []
    if output is None:
        say("\n".join(lines + last))
    else:
        write_atomic(output, "\n".join(lines + last * (not tsv)) + "\n")
        say("\n".join([f"{len(preds)} predictions written to {output}"] + last))
    return preds, metrics


# ---------------------------------------------------------------------------------------------
# The PEFT export

def export_peft(model, folder, run, pretrained):
    """The run as a PEFT LoRA adapter for `pretrained`, exactly: each adapter's ΔW = up @ down
    (DeLoRA: rank 2r, its λ/r, Ξ and w inside the factors; LoRA: rank r, α/r inside up) as
    lora_B @ lora_A with scale lora_alpha / r = 1, and the head as PEFT saves a module it trains
    in full (modules_to_save), all under transformers' names. Loaded with PEFT's
    PeftModel.from_pretrained over that checkpoint, it gives the run's logits (to rounding)."""
    from safetensors.torch import save
    cfg = model.config
    state = {}    # PEFT's key -> tensor
    targets = set()  # the adapted modules' last names: query, value
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


def check_arguments(args):
    """What the command line asks, refused in one line before anything is read where it cannot
    be done: TEXT and --input together, --output without --input or onto what the command
    reads, a path that is not a file, an export folder that would hold another output."""
    if args.input and args.text is not None:  # one would be scored, the other not
        raise UsageError("give TEXT (and TEXT_B) or --input FILE, not both")
    if args.output and not args.input:  # TEXT's prediction is printed: nothing would go there
        raise UsageError(f"--output {args.output} holds --input's predictions: give --input "
                         f"FILE too")
    for path in (p for p in (args.run_json, args.input) if p is not None):
        problem = not_a_folder(path)  # what is there, in words: a file, or a pipe (<(head ...))
        if problem != "a file, not a folder":
            raise UsageError(f"{path}: " + ("a folder, not a file" if problem is None else
                                            problem.replace("folder", "file")))
    if args.output:
        check_output(args.output, "--output", folder=False)
        out, run = Path(args.output).resolve(), Path(args.run_json).resolve()
        if out.parent == run.parent and out.name.startswith((f"{run.stem}.", f"{run.stem}_")):
            raise UsageError(f"--output {args.output} would replace a file of the run "
                             f"{run.stem} (its JSON, adapter, logs): name another file")
        if args.input and out == Path(args.input).resolve():
            raise UsageError(f"--output {args.output} would replace --input: name another "
                             f"file")
    if args.text is None and not (args.input or args.save_merged or args.save_peft):
        raise UsageError("give TEXT (and TEXT_B) or --input FILE to score, or --save-merged "
                         "DIR or --save-peft DIR to export")
    for i, text in enumerate(t for t in (args.text, args.text_b) if t is not None):
        try:
            text.encode()
        except UnicodeEncodeError as e:  # bytes the terminal's encoding could not decode
            raise UsageError(f"TEXT{'_B' * i} is not UTF-8 text (at character {e.start})") \
                from None
    written = {option: place for option, place in (("--save-peft", args.save_peft), (
        "--save-merged", args.save_merged), ("--output", args.output)) if place}
    for option in [o for o in ("--save-peft", "--save-merged") if o in written]:
        folder = Path(written[option]).resolve()  # replaced whole: nothing else this command
        for other, place in written.items():      # writes may be in it (lost now, or by the
            place = Path(place).resolve()         # run's next export)
            if other != option and folder in (place, *place.parents):
                raise UsageError(f"{option} {written[option]} would hold {other} {written[other]}, "
                                 f"which this command writes too: give them places apart")


def main(argv=None):
    p = Parser(prog="predict.py", description="Score sentences or a file with a finished run, "
                                              "or export it.")
    p.add_argument("run_json", help="a run's summary JSON (beside its logs and adapter)")
    p.add_argument("text", nargs="?")
    p.add_argument("text_b", nargs="?", help="the second sentence, for pair tasks")
    p.add_argument("--input", metavar="FILE", help="score every example of FILE: GLUE's TSV "
                   "layout, or JSON lines (.jsonl) with the hub's keys; with labels, the metrics")
    p.add_argument("--output", metavar="FILE", help="--input's predictions into FILE (.tsv: "
                   "index and prediction; else JSON lines), not stdout")
    p.add_argument("--save-merged", metavar="DIR", help="write the model, adapters merged, as a "
                   "HF checkpoint into DIR")
    p.add_argument("--save-peft", metavar="DIR", help="write the adapters and the head as an exact "
                   "PEFT LoRA adapter into DIR")
    p.add_argument("--model", metavar="DIR", help="the pretrained checkpoint, where the run's "
                   "is no longer (the same files: checked)")
    p.add_argument("--overwrite", action="store_true", help="replace what DIR holds")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    with command_line("predict.py"), user_errors():
        check_arguments(args)
        model, tokenizer, cfg = load_finetuned(args.run_json, args.model)
        exports = [(option, folder, export) for option, folder, export in (
            ("--save-peft", args.save_peft, export_peft),
            ("--save-merged", args.save_merged, export_merged)) if folder]
        for option, folder, _ in exports:  # both checked before either is written
            check_export(folder, option, cfg.run_name, args.overwrite,
                         (("logs", Path(args.run_json).parent), ("model", cfg.model)))
        for _, folder, export in exports:  # merging last: it changes the model
            export(model, folder, cfg.run_name, cfg.model)
        if args.input:
            return score_file(model, tokenizer, cfg, args.input, args.output)
        if exports:
            return None
        b = None if args.text_b is None else [args.text_b]
        preds, probs = predict_texts(model, tokenizer, cfg.task, [args.text], b)
        say(json.dumps(dict(task=cfg.task, prediction=preds[0],
                            probabilities=None if probs is None else probs[0])))
        return preds[0], probs and probs[0]


if __name__ == "__main__":
    main()
