"""The eight GLUE tasks on the revisited splits of RED (Wu et al., 2024), as DeLoRA reports them:
train on GLUE train; cut GLUE validation into a new validation set (model selection) and a new
test set (reporting). Data come from the hub (`nyu-mll/glue`), a `save_to_disk` folder, or the
classic GLUE TSV files; metrics are numpy/scipy re-implementations of scikit-learn's.

    train, val, test = load_glue("rte", seed=42)                  # 2490 / 138 / 139 examples
    compute_metrics("cola", preds, labels)  # {'matthews_correlation': ...}

This file imports no torch, so report.py can use it without: at its end it also holds the few
helpers every script shares for files and messages (one-line errors, atomic writes).
"""
import argparse
import errno
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, suppress
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import get_args

from filelock import FileLock, Timeout

import numpy as np


@dataclass(frozen=True)
class Task:
    text_keys: tuple         # text columns, as in the hub dataset nyu-mll/glue
    num_labels: int          # 1 = regression
    metrics: tuple           # the first one selects the model
    val_split: str           # the hub split used as GLUE validation
    folder: str              # folder in the classic GLUE distribution (glue_data/...)
    tsv_columns: tuple       # TSV columns holding the texts, then the label
    label_names: tuple = ()  # TSV label strings, in the order of the hub's label ids
    dev_file: str = "dev.tsv"
    tsv_header: tuple = ()   # column names for a TSV without a header line (CoLA)


TASKS = {
    "mnli": Task(("premise", "hypothesis"), 3, ("accuracy",), "validation_matched", "MNLI",
                 ("sentence1", "sentence2", "gold_label"),
                 ("entailment", "neutral", "contradiction"), dev_file="dev_matched.tsv"),
    "sst2": Task(("sentence",), 2, ("accuracy",), "validation", "SST-2", ("sentence", "label")),
    "mrpc": Task(("sentence1", "sentence2"), 2, ("accuracy", "f1"), "validation", "MRPC",
                 ("#1 String", "#2 String", "Quality")),
    "cola": Task(("sentence",), 2, ("matthews_correlation",), "validation", "CoLA",
                 ("sentence", "label"),
                 tsv_header=("source", "label", "original_label", "sentence")),
    "qnli": Task(("question", "sentence"), 2, ("accuracy",), "validation", "QNLI",
                 ("question", "sentence", "label"), ("entailment", "not_entailment")),
    "qqp": Task(("question1", "question2"), 2, ("accuracy", "f1"), "validation", "QQP",
                ("question1", "question2", "is_duplicate")),
    "rte": Task(("sentence1", "sentence2"), 2, ("accuracy",), "validation", "RTE",
                ("sentence1", "sentence2", "label"), ("entailment", "not_entailment")),
    "stsb": Task(("sentence1", "sentence2"), 1, ("pearson", "spearmanr"), "validation", "STS-B",
                 ("sentence1", "sentence2", "score")),
}
LARGE_TASKS = ("mnli", "qnli", "qqp")  # their new validation set is 1000 examples
# Where bench.py and the tests look for the classic GLUE TSV files by default (train.py's --data
# has no default: it takes the hub's copy).
LOCAL_GLUE = Path(__file__).resolve().parent.parent / "shared" / "glue"


def get_task(name):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    return TASKS[name]


# ---------------------------------------------------------------------------------------------
# Splits

def revisited_split(task, n, seed):
    """Indices of the new validation and test sets among the n GLUE validation examples.

    Permute with numpy.random.RandomState(seed); mnli/qnli/qqp: the first 1000 -> validation,
    the rest -> test; the others are halved, the first int(n/2) -> validation -- except cola,
    where (as in the official code) the first half is the test set. The split changes with the
    seed. E.g. rte, n=277 -> 138 validation / 139 test; cola, n=1043 -> 522 / 521.
    """
    get_task(task)
    perm = np.random.RandomState(seed).permutation(n)
    if task in LARGE_TASKS:
        return perm[:1000], perm[1000:]
    half = int(n / 2)
    if task == "cola":
        return perm[half:], perm[:half]
    return perm[:half], perm[half:]


def load_glue(task, seed, data=None):
    """(train, val, test) as `datasets.Dataset`s with the hub's columns (texts, label, idx).

    data=None: the hub dataset nyu-mll/glue (cached by `datasets`). data=DIR: a local copy,
    either a `save_to_disk` folder or the classic GLUE TSV files; DIR may be the root holding
    one folder per task (rte/ or RTE/) or the task's own folder. Data a run cannot use (no
    examples, a label outside the task's label set, a split that leaves no validation or test
    example) is a ValueError that names the file (and line) and the value.
    """
    spec = get_task(task)
    if data is None:
        import datasets
        try:
            glue = datasets.load_dataset("nyu-mll/glue", task)
        except Exception as e:  # offline, most often
            raise FileNotFoundError(
                f"could not load nyu-mll/glue/{task} from the hub ({type(e).__name__}); offline, "
                f"pass a local copy with --data (GLUE TSV files or a save_to_disk folder)") from e
        source = f"nyu-mll/glue/{task}"
        train, dev = (_checked(spec, glue[s], f"{source} {s}") for s in ("train", spec.val_split))
        dev_name = f"{source} {spec.val_split}"
    else:
        train, dev, dev_name = _load_local(task, Path(data))
    val_idx, test_idx = revisited_split(task, len(dev), seed)
    if not len(val_idx) or not len(test_idx):
        raise ValueError(f"{dev_name} has {len(dev)} example{'s' * (len(dev) != 1)}: the revisited "
                         f"split of {task} leaves {len(val_idx)} for validation and "
                         f"{len(test_idx)} for test")
    return train, dev.select(val_idx), dev.select(test_idx)


def local_files(task, root):
    """The files a local copy holds for the task: ('save_to_disk', folder, every file below it)
    or ('tsv', folder, [train.tsv, dev file]) -- what the run reads, and what tells two copies
    apart (run.data_tag)."""
    spec, root = get_task(task), Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    for folder in (root / task, root / spec.folder, root):
        if (folder / "dataset_dict.json").is_file():
            return "save_to_disk", folder, sorted(p for p in folder.rglob("*") if p.is_file())
        if (folder / "train.tsv").is_file() or (folder / spec.dev_file).is_file():
            return "tsv", folder, [folder / "train.tsv", folder / spec.dev_file]
    raise FileNotFoundError(f"no {task} data under {root}: looked for dataset_dict.json "
                            f"(save_to_disk) or {spec.folder}/train.tsv and {spec.dev_file}")


def _load_local(task, root):
    """(train, dev, the dev split's name) from a save_to_disk folder or the TSV files."""
    spec = TASKS[task]
    kind, folder, _ = local_files(task, root)
    if kind == "save_to_disk":
        import datasets
        d = datasets.load_from_disk(str(folder))
        for split in ("train", spec.val_split):
            if split not in d:
                raise FileNotFoundError(f"{folder} (save_to_disk) has no split {split!r}; "
                                        f"it has {list(d)}")
        return (_checked(spec, d["train"], f"{folder} train"),
                _checked(spec, d[spec.val_split], f"{folder} {spec.val_split}"),
                f"{folder} {spec.val_split}")
    return (read_tsv(task, folder / "train.tsv"), read_tsv(task, folder / spec.dev_file),
            folder / spec.dev_file)


def read_tsv(task, path):
    """One classic GLUE TSV file -> Dataset with the hub's columns and label ids, rows in order.

    subtle: the files are raw TSV -- no CSV quoting, although some fields begin with `"` --
    so we split each line on tabs. MRPC starts with a BOM (utf-8-sig), CoLA has no header,
    SST-2 keeps its space before the tab (as the hub does), CoLA/dev.tsv has no final newline.
    Windows line endings (CRLF, also mixed with LF) read as LF: the same examples, no `\r` at
    the end of a last column (which would be CoLA's sentence).
    """
    import datasets
    spec = TASKS[task]
    if not path.is_file():
        raise FileNotFoundError(f"missing file {path}")
    try:
        lines = path.read_bytes().decode("utf-8-sig").replace("\r\n", "\n").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at position "
                         f"{e.start})") from None
    if lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError(f"{path} is empty")
    header = list(spec.tsv_header) or lines.pop(0).split("\t")
    if not lines:
        raise ValueError(f"{path} has no examples, only a header")
    first = 1 if spec.tsv_header else 2  # file line number of the first data row
    missing = [c for c in spec.tsv_columns if c not in header]
    if missing:
        raise ValueError(f"{path}: no column {missing} in header {header} (is it {task}?)")
    cols = [header.index(c) for c in spec.tsv_columns]
    rows = {k: [] for k in spec.text_keys + ("label",)}
    for i, line in enumerate(lines):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(f"{path}, line {i + first}: {len(fields)} fields, "
                             f"expected {len(header)}")
        for key, c in zip(spec.text_keys, cols):
            rows[key].append(fields[c])
        rows["label"].append(_label(spec, fields[cols[-1]], f"{path}, line {i + first}"))
    rows["idx"] = list(range(len(lines)))
    return datasets.Dataset.from_dict(rows)


def _label(spec, value, where):
    """A label (a TSV field's text, or a dataset's value) -> its id, or STS-B's score; a
    ValueError naming `where` for anything outside the task's label set."""
    try:
        if spec.num_labels == 1:
            score = float(value)
            if 0 <= score <= 5:  # False for NaN
                return score
        elif isinstance(value, str) and spec.label_names:
            return spec.label_names.index(value)
        elif int(value) == float(value) and 0 <= int(value) < spec.num_labels:
            return int(value)
    except (ValueError, TypeError):
        pass
    valid = ("a number in [0, 5]" if spec.num_labels == 1 else "one of " + ", ".join(
        spec.label_names if isinstance(value, str) and spec.label_names
        else map(str, range(spec.num_labels))))
    kind = "score" if spec.num_labels == 1 else "label"
    raise ValueError(f"{where}: {kind} {value!r} is not {valid}")


def _checked(spec, ds, name):
    """A hub or save_to_disk split, checked: it has the task's columns, texts as text, examples,
    and every label valid."""
    for column in (*spec.text_keys, "label"):
        if column not in ds.column_names:
            raise ValueError(f"{name} has no column {column!r} (it has {ds.column_names})")
        if column != "label" and getattr(ds.features[column], "dtype", None) != "string":
            raise ValueError(f"{name}: column {column!r} holds {ds.features[column]}, not text")
    if len(ds) == 0:
        raise ValueError(f"{name} has no examples")
    for i, value in enumerate(ds["label"]):
        _label(spec, value, f"{name}, row {i}")
    return ds


# ---------------------------------------------------------------------------------------------
# Tokenization and batching

@dataclass
class Encoded:
    """A tokenized split: token ids and type ids per example (unpadded), the labels, and the
    model's pad id that batches are padded with."""
    ids: list
    type_ids: list
    labels: np.ndarray
    pad_id: int

    def __len__(self):
        return len(self.ids)

    @property
    def lengths(self):
        return np.array([len(x) for x in self.ids])

    def batch(self, idx, device=None):
        """Examples idx -> padded tensors, (B, T) with T the longest of the batch, on the device
        (pinned and asynchronous to a GPU: no wait for the copy)."""
        import torch  # here only: report.py reads TASKS without torch
        T = max(len(self.ids[i]) for i in idx)
        input_ids = torch.full((len(idx), T), self.pad_id, dtype=torch.long)
        token_type_ids = torch.zeros((len(idx), T), dtype=torch.long)
        attention_mask = torch.zeros((len(idx), T), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(self.ids[i])
            input_ids[row, :n] = torch.tensor(self.ids[i])
            token_type_ids[row, :n] = torch.tensor(self.type_ids[i])
            attention_mask[row, :n] = 1
        # rows: the real tokens' places in the flattened (B*T) batch, found here on the CPU, so
        # that the encoder, which computes only them (roberta.Tokens), never waits for a GPU
        batch = dict(input_ids=input_ids, attention_mask=attention_mask,
                     token_type_ids=token_type_ids, labels=torch.from_numpy(self.labels[idx]),
                     rows=attention_mask.flatten().nonzero().squeeze(1))
        return batch if device is None else to_device(batch, device)


def to_device(batch, device):
    """A batch dict's tensors on the device (pinned and asynchronous to a GPU)."""
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin)
            for k, v in batch.items()}


def encode(task, dataset, tokenizer, pad_id):
    """Tokenize a split once, with the tokenizers batch API (pairs for two-text tasks); pad_id:
    the model's (config.pad_token_id), what its batches are padded with."""
    spec = get_task(task)
    columns = [dataset[k] for k in spec.text_keys]
    texts = columns[0] if len(columns) == 1 else list(zip(*columns))
    enc = tokenizer.encode_batch(texts)
    dtype = np.float32 if spec.num_labels == 1 else np.int64
    return Encoded([e.ids for e in enc], [e.type_ids for e in enc],
                   np.asarray(dataset["label"], dtype=dtype), pad_id)


def batch_order(lengths, batch_size, rng=None, group_by_length=False, chunk=50):
    """Split example indices into batches.

    rng=None: in order (evaluation). Otherwise shuffled with the numpy RandomState `rng`;
    group_by_length also sorts by length within chunks of `chunk` batches and shuffles the
    batches, so each batch holds similar lengths (less padding) but the order stays random.
    """
    n = len(lengths)
    idx = np.arange(n) if rng is None else rng.permutation(n)
    if group_by_length and rng is not None:
        size = chunk * batch_size
        idx = np.concatenate([c[np.argsort(-lengths[c], kind="stable")]
                              for c in np.split(idx, range(size, n, size))])
    batches = [idx[i:i + batch_size] for i in range(0, n, batch_size)]
    if group_by_length and rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


# ---------------------------------------------------------------------------------------------
# Metrics (equal to scikit-learn's / scipy's, checked by the tests)

def accuracy(preds, labels):
    """Fraction correct: [1, 0, 1, 1] vs [1, 1, 1, 0] -> 0.5."""
    return float(np.mean(np.asarray(preds) == np.asarray(labels)))


def f1(preds, labels):
    """Binary F1 of class 1, 2·TP / (2·TP + FP + FN); 0 when there is no positive at all.
    [1, 0, 1, 1] vs [1, 1, 1, 0]: TP 2, FP 1, FN 1 -> 4 / 6 = 0.667."""
    p, y = np.asarray(preds) == 1, np.asarray(labels) == 1
    tp, fp, fn = np.sum(p & y), np.sum(p & ~y), np.sum(~p & y)
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0


def matthews_correlation(preds, labels):
    """Matthews correlation (the multi-class form scikit-learn uses); 0 when either side is
    constant, not NaN. [1, 0, 1, 1] vs [1, 1, 1, 0]: TP 2, TN 0, FP 1, FN 1 ->
    (2·0 − 1·1) / sqrt(3·3·1·1) = −1/3."""
    y, p = np.asarray(labels), np.asarray(preds)
    classes = np.union1d(y, p)
    C = (y[:, None] == classes).T.astype(np.float64) @ (p[:, None] == classes)  # confusion
    t, q, c, s = C.sum(1), C.sum(0), np.trace(C), C.sum()
    cov_yp, cov_pp, cov_yy = c * s - t @ q, s * s - q @ q, s * s - t @ t
    return float(cov_yp / np.sqrt(cov_yy * cov_pp)) if cov_yy * cov_pp else 0.0


def pearson(preds, labels):
    """Pearson's r (scipy.stats.pearsonr): [1, 2, 3] vs [2, 4, 7] -> 0.993; NaN when either side
    is constant (scipy's warning silenced: a run whose metric is never a number says so)."""
    from scipy.stats import pearsonr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(pearsonr(np.asarray(preds, np.float64), np.asarray(labels, np.float64))[0])


def spearmanr(preds, labels):
    """Spearman's rank correlation (scipy.stats.spearmanr): [1, 2, 3] vs [2, 4, 7] -> 1.0; NaN
    when either side is constant, as pearson."""
    from scipy.stats import spearmanr as spearman
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearman(np.asarray(preds, np.float64), np.asarray(labels, np.float64))[0])


METRICS = {f.__name__: f for f in (accuracy, f1, matthews_correlation, pearson, spearmanr)}


def metrics_text(metrics):
    """{'accuracy': 0.71234, 'f1': 0.8} -> 'accuracy 0.7123  f1 0.8000' (None: '')."""
    return "  ".join(f"{k} {v:.4f}" for k, v in (metrics or {}).items())


def compute_metrics(task, preds, labels):
    """The task's metrics, selection metric first: {'accuracy': ..., 'f1': ...} for mrpc.
    preds are class ids (classification) or scores (stsb)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    return {m: METRICS[m](preds, labels) for m in get_task(task).metrics}


# ---------------------------------------------------------------------------------------------
# Files and messages: what every script shares (torch-free, so report.py uses them too)

ENDED = ("finished", "diverged")  # nothing left to do; "running", "interrupted", "failed": more
NO_LOCKS = {getattr(errno, n) for n in ("ENOLCK", "EOPNOTSUPP", "ENOTSUP", "ENOSYS", "EINVAL")
            if hasattr(errno, n)}


class UsageError(Exception):
    """What the user must fix (a task, a path, a file, a value): one line, nothing written."""


class RunError(Exception):
    """What cannot go on (a fault of the machine, a NaN loss, a run without a result): one line.
    `status`: what a run's JSON says; `everywhere`: every torchrun process says it."""

    def __init__(self, message, status="failed", everywhere=False):
        super().__init__(message)
        self.status, self.everywhere = status, everywhere


def one_line(text):
    """A message kept on one line: a control character of a value (a newline in a folder's
    name) written as its escape."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def why(error):
    """An OSError's cause in words, mid-sentence: 'no space left on device'."""
    text = getattr(error, "strerror", None) or str(error)
    return text[:1].lower() + text[1:]


SILENT = {}  # a stream that failed -> the signal its loss stands for


def say(text="", err=False, end="\n", everywhere=False):
    """The one way this project prints: to stdout (stderr: err, a warning or an error, kept on
    one line: `one_line`), flushed, by rank 0 alone under torchrun. A stream that fails -- its
    reader gone (`| head`), the terminal gone, closed -- goes quiet; losing stdout stops a run
    at its next step as SIGPIPE or SIGHUP would."""
    stream, text = (sys.stderr, one_line(text)) if err else (sys.stdout, text)
    if stream is None or stream in SILENT or not (everywhere or os.environ.get("RANK", "0")
                                                   == "0"):
        return
    try:
        print(text, end=end, file=stream, flush=True)
    except (OSError, ValueError) as e:  # ValueError: a closed file
        SILENT[stream] = getattr(signal, "SIGPIPE" if isinstance(e, BrokenPipeError) else
                                 "SIGHUP", signal.SIGTERM)
        with suppress(OSError, ValueError):  # nothing more to it, not even at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def read_summary(path):
    """A run's JSON as a dict; {} for one that is not (damaged, edited); None if absent."""
    try:
        summary = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def files_tag(files, root):
    """8 hex digits of the SHA-256 of the files' names (below root) and bytes: what tells two
    local checkpoints or data copies apart, wherever they lie (read once per process while
    their size and time stamp hold)."""
    stamp = tuple((str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns)
                  for f in files)
    if stamp not in _TAGS:
        h = hashlib.sha256()
        for path, size, _ in stamp:
            h.update(os.fsencode(f"{os.path.relpath(path, Path(root).resolve())}\0{size}\0"))
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
        _TAGS[stamp] = h.hexdigest()[:8]
    return _TAGS[stamp]


_TAGS = {}


def _remove(path):
    with suppress(OSError):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def write_atomic(path, data):
    """Write bytes (or str, as UTF-8) -- or a folder: data(tmp) writes it -- to a temporary
    name of this process beside path, then rename it over path: readers see the old version or
    the new one, never a part (a link to a folder stays, the folder it names is replaced). A
    failed write removes the temporary, keeps the old version and is a RunError saying why. A
    folder's earlier write killed halfway is undone first (a run does it for its files when it
    starts: `remove_stale`)."""
    path, folder = Path(path), callable(data)
    path = path.resolve() if folder and path.is_symlink() else path
    tmp, old = (path.with_name(f".{path.name}.{os.getpid()}.{k}") for k in ("tmp", "old"))
    kept = "what was there is kept" if folder else "the previous version is kept" \
        if path.exists() else "no half-written file is left"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            remove_stale(path)
            data(tmp)
            if path.exists():
                os.replace(path, old)  # killed before the next rename: remove_stale undoes it
        else:
            with open(tmp, "wb") as f:  # mode 0666 & ~umask, like any other file
                f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if folder and old.exists() and not path.exists():
            os.replace(old, path)
        if isinstance(e, OSError):
            raise RunError(f"cannot write {path}: {why(e)}; {kept}") from e
        raise
    _remove(old)


def remove_stale(path):
    """What a write_atomic to path left when killed: its temporary removed, a folder moved
    aside whose new version never arrived put back."""
    path = Path(path)
    for stale in sorted(path.parent.glob(f".{path.name}.*[0-9].*")):
        if stale.suffix == ".old" and not path.exists():
            os.replace(stale, path)
        elif stale.suffix in (".tmp", ".old"):
            _remove(stale)


def not_a_folder(path):
    """Why path is not a folder, in words ('no such folder', 'a file, not a folder', 'too many
    levels of symbolic links', ...); None if it is one."""
    try:
        os.stat(path)  # what stands in the way, if anything
    except FileNotFoundError:
        return "no such folder"
    except OSError as e:
        return why(e)
    return None if os.path.isdir(path) else "a file, not a folder"


def check_writable(path, option, given=None):
    """A folder a script will write into: it, or the deepest part of it that exists, must be a
    folder that takes a file -- checked by writing one (as root, os.access says yes also on a
    read-only file system)."""
    named, existing = f"{option} {path if given is None else given}", Path(path)
    try:
        existing = next(p for p in (existing, *existing.parents) if p.exists())
        if not existing.is_dir():
            raise UsageError(f"{named}: {existing} is a file, not a folder")
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{named}: cannot write in {existing}: {why(e)}") from None


def setting(default=MISSING, help="", results=True, flags=(), **cli):
    """A field of train.TrainConfig: its default, its --help text, whether it can change the
    numbers (results=False: how the run executes), its spellings, argparse's (choices...)."""
    return field(default=default, metadata=dict(help=help, results=results, flags=flags, cli=cli))


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump; under torchrun from rank 0 only
        say(f"{self.prog}: error: {message} (see --help)", err=True)
        self.exit(2)

    def add_settings(self, config_class):
        """One argument per `setting` field: positional without a default, else an option."""
        for f in fields(config_class):
            kind = next(t for t in (bool, int, float, str) if t is f.type or t in get_args(f.type))
            flags, help = f.metadata["flags"] or ["--" + f.name.replace("_", "-")], \
                f.metadata["help"]
            if f.default is MISSING:  # TASK, SEED
                self.add_argument(f.name, type=kind, help=help)
            elif kind is bool:
                self.add_argument(*flags, action="store_true", help=help)
            else:
                self.add_argument(*flags, type=kind, default=f.default, **f.metadata["cli"],
                                  help=help + " (default: %(default)s)" * (f.default is not None))
        return self


@contextmanager
def user_errors():
    """What bad input raises while a run loads its data and model, as a UsageError."""
    try:
        yield
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: an unusable device
        raise UsageError(str(e)) from e


def command(cfg, torchrun=False, **changes):
    """The train.py arguments of this run: TASK SEED and each option not at its default,
    e.g. TrainConfig("rte", 42, lr_mult=2.0).command(resume=True) -> 'rte 42 --lr-mult 2.0
    --resume'; --overwrite left out. torchrun: each option by its last spelling (--r as
    --adapter-rank, which torchrun's own parser leaves alone)."""
    cfg = replace(cfg, **changes)
    default = type(cfg)(cfg.task, cfg.seed, method=cfg.method)
    args = [cfg.task, str(cfg.seed)] + ["--method", cfg.method] * (cfg.method != "delora")
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in ("task", "seed", "method", "overwrite") and \
                value != getattr(default, f.name):
            flags = f.metadata["flags"] or ["--" + f.name.replace("_", "-")]
            flag = flags[-1] if torchrun else flags[0]
            args += [flag] if value is True else [flag, str(value)]
    return shlex.join(args)


def num(value):
    """A number as a run's name shows it: short (0.01, 4), yet never two values as one."""
    return f"{value:g}" if float(f"{value:g}") == value else repr(float(value))


def data_tag(cfg):
    """A local --data copy: 'data' and the tag of the task's files; '' for the hub's copy."""
    if cfg.data is None:
        return ""
    _, folder, files = local_files(cfg.task, cfg.data)
    return "data" + files_tag([f for f in files if f.is_file()], folder)


def run_name(cfg):
    """The settings that change the numbers, as a file name:
    delora_r8_lam4_lr0.01_lamlr0.01_bs32_ep80_drop0_len256_seed42 for TrainConfig("rte", 42);
    a local --data copy adds its tag before the seed (_data1a2b3c4d_seed42)."""
    delora = cfg.method == "delora"
    return "".join([
        f"{cfg.method}_r{cfg.r}_", f"lam{num(cfg.lam)}" if delora else f"alpha{num(cfg.alpha)}",
        f"_lr{num(cfg.lr)}", f"x{num(cfg.lr_mult)}" * (cfg.lr_mult != 1),
        f"_lamlr{num(cfg.lam_lr)}" * delora, f"_bs{cfg.batch_size}_ep{cfg.epochs}",
        f"_drop{num(cfg.dropout)}_len{cfg.max_length}",
        f"_n{cfg.max_train_samples}" * bool(cfg.max_train_samples),
        "_grouped" * cfg.group_by_length, "_bf16" * cfg.bf16,
        f"_{data_tag(cfg)}" * (cfg.data is not None), f"_seed{cfg.seed}"])


def lock_run(path):
    """One writer per run: filelock's exclusive lock on <run>.lock, the file naming its holder.
    The kernel drops it when its holder dies: a lock file left by a killed run locks nothing.
    A file system without locks (some Lustre or FUSE mounts) runs unlocked, saying so."""
    lock = FileLock(str(path))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        holder = ""
        for _ in range(20):  # the holder names itself just after it takes the lock: wait 1 s
            with suppress(OSError):
                holder = path.read_text(errors="replace").strip()
            if holder:
                break
            time.sleep(0.05)
        raise UsageError(f"{path.with_suffix('')} is being run by {holder or 'another process'}"
                         ": one process per run (wait for it to end, or stop it)") from None
    except (OSError, NotImplementedError) as e:  # NotImplementedError: filelock 3's "no flock"
        if getattr(e, "errno", errno.ENOSYS) not in NO_LOCKS:
            raise UsageError(f"cannot take the run's lock {path}: {why(e)}") from None
        path.unlink(missing_ok=True)
        say(f"note: {path.parent} offers no file locks ({why(e)}): nothing stops a second "
            f"process from writing this run at the same time")
        return None
    path.write_text(f"pid {os.getpid()} on {platform.node()} since {time.strftime('%c')}")
    return lock


def epoch_line(record, summary, epochs):
    return (f"epoch {record['epoch']} ({record['epoch'] + 1}/{epochs})  loss "
            f"{record['train_loss']:.4f}  val {metrics_text(record['val'])}  | best epoch "
            f"{summary['best_epoch']}: test {metrics_text(summary['test'])}  "
            f"({record['examples_per_s']:.0f} ex/s, {record['seconds']:.1f}s)")


def existing_run(cfg, paths):
    """What is on disk under the run's name decides: 'fresh', 'resume' or 'ended' (nothing to do
    with --resume); a bad combination is a UsageError. --resume with nothing to resume starts
    from the beginning, so that a requeue always works, unless an unfinished run of this task
    and seed with other options is on disk: that one is named."""
    summary = read_summary(paths["json"])
    status, checkpoint = (summary or {}).get("status"), paths["checkpoint"].exists()
    done = len((summary or {}).get("epochs") or [])
    state = status or ("its JSON unreadable" if summary == {} else "no JSON")
    what = f"{paths['json'].with_suffix('')} is unfinished ({state}, {done} epoch(s) done)"
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if cfg.overwrite:  # Run.start deletes the old checkpoint and adapter
        return "fresh"
    if status in ENDED and not cfg.resume:
        raise UsageError(f"{paths['json']} exists ({status}); pass --overwrite to run it again"
                         + ", or --resume to export it" * bool(cfg.save_merged))
    if cfg.resume and done and not checkpoint and status not in ENDED:
        raise UsageError(f"{what} but its checkpoint {paths['checkpoint']} is gone: pass "
                         f"--overwrite to start over")
    other = cfg.resume and not done and not checkpoint and unfinished_other(cfg, paths)
    if other:
        raise UsageError(f"--resume: no run with these options is on disk, but {other}: resume "
                         f"with its options, or leave out --resume to start this one")
    if not cfg.resume and (checkpoint or summary is not None):
        raise UsageError(f"{what}: pass --resume to continue it, or --overwrite to start over"
                         if checkpoint else f"{what} and has no checkpoint: pass --resume or "
                         f"--overwrite to start it from the beginning")
    return "ended" if status in ENDED else "resume" if checkpoint else "fresh"


def unfinished_other(cfg, paths):
    """'RUN (interrupted) differs in --lr 0.02 (there: 0.01)' for the unfinished run of this
    task, seed, model and data whose options differ least; None if none."""
    found = []
    for path in paths["json"].parent.glob(f"*_seed{cfg.seed}.json"):
        s = read_summary(path) or {}
        if s.get("status") not in (None, *ENDED) and isinstance(s.get("settings"), dict) and \
                s.get("data_tag") == (data_tag(cfg) or None) and \
                path.with_name(f"{path.stem}_checkpoint.pt").exists():
            differ = [f"--{k.replace('_', '-')} {v} (there: {s['settings'].get(k)})"
                      for k, v in cfg.results().items()
                      if k not in ("model", "data") and v != s["settings"].get(k)]
            found.append((len(differ), f"{path.stem} ({s['status']}) differs in "
                                       f"{'; '.join(differ)}"))
    return min(found)[1] if found else None
