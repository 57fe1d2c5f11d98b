"""The eight GLUE tasks on the revisited splits of RED (Wu et al., 2024), as DeLoRA reports them:
train on GLUE train; cut GLUE validation into a new validation set (model selection) and a new
test set (reporting). Data come from the hub (`nyu-mll/glue`), a `save_to_disk` folder, or the
classic GLUE TSV files; metrics are numpy/scipy re-implementations of scikit-learn's. This file
holds the tasks, the splits, the reading of the data and the metrics, nothing else; it imports
no torch at load time (report.py reads TASKS).

    train, val, test = load_glue("rte", seed=42)                  # 2490 / 138 / 139 examples
    compute_metrics("cola", preds, labels)  # {'matthews_correlation': ...}
"""
import warnings
from dataclasses import dataclass
from pathlib import Path

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
    example, a copy that names another task) is a ValueError that names the file (and line)
    and the value.
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
    """The files a local copy holds for the task: ('save_to_disk', folder, its files and its
    splits' files, not deeper: a run's --out-dir inside it does not count) or ('tsv', folder,
    [train.tsv, dev file]) -- what the run reads, and what tells two copies apart
    (run.data_tag)."""
    spec, root = get_task(task), Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    for folder in (root / task, root / spec.folder, root):
        if (folder / "dataset_dict.json").is_file():
            files = [*folder.glob("*"), *folder.glob("*/*")]
            return "save_to_disk", folder, sorted(p for p in files if p.is_file())
        if (folder / "train.tsv").is_file() or (folder / spec.dev_file).is_file():
            return "tsv", folder, [folder / "train.tsv", folder / spec.dev_file]
    raise FileNotFoundError(f"no {task} data under {root}: looked for dataset_dict.json "
                            f"(save_to_disk) or {spec.folder}/train.tsv and {spec.dev_file}")


def _load_local(task, root):
    """(train, dev, the dev split's name) from a save_to_disk folder or the TSV files."""
    spec = TASKS[task]
    kind, folder, _ = local_files(task, root)
    _not_another_task(task, folder, folder.name, "folder's name")
    if kind == "save_to_disk":
        import datasets
        d = datasets.load_from_disk(str(folder))
        for split in ("train", spec.val_split):
            if split not in d:
                raise FileNotFoundError(f"{folder} (save_to_disk) has no split {split!r}; "
                                        f"it has {list(d)}")
        _not_another_task(task, folder, d["train"].info.config_name, "save_to_disk info")
        return (_checked(spec, d["train"], f"{folder} train"),
                _checked(spec, d[spec.val_split], f"{folder} {spec.val_split}"),
                f"{folder} {spec.val_split}")
    return (read_tsv(task, folder / "train.tsv"), read_tsv(task, folder / spec.dev_file),
            folder / spec.dev_file)


def _not_another_task(task, folder, name, what):
    """A local copy that names another GLUE task, by its folder's name (SST-2/ given for cola)
    or by the config its save_to_disk info records (sst2), is a ValueError: the columns alone
    cannot tell (CoLA's and SST-2's are alike in the hub's names; RTE's, MRPC's and STS-B's on
    the hub), and the run would train on the other task's data."""
    name = (name or "").lower()  # a save_to_disk copy made from_dict has no config name
    other = next((k for k, t in TASKS.items() if name in (k, t.folder.lower())), task)
    if other != task:
        raise ValueError(f"{folder} holds {other}'s data (by its {what}), not {task}'s: pass the "
                         f"GLUE folder holding {TASKS[task].folder}/, or that folder")


def read_text(path):
    """A file's text, UTF-8 (a BOM dropped); else a ValueError naming the file and the byte."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at position "
                         f"{e.start})") from None


def read_tsv(task, path, labels=True):
    """One classic GLUE TSV file -> Dataset with the hub's columns and label ids, rows in order.
    labels=False: a file without labels too (GLUE's test files), which gives no label column;
    the columns may also carry the hub's names (sentence1, sentence2, label).

    subtle: the files are raw TSV -- no CSV quoting, although some fields begin with `"` --
    so we split each line on tabs. MRPC starts with a BOM (utf-8-sig), CoLA has no header
    (but its test file has), SST-2 keeps its space before the tab (as the hub does),
    CoLA/dev.tsv has no final newline. Windows line endings (CRLF, also mixed with LF) read as
    LF: the same examples, no `\r` at the end of a last column (which would be CoLA's sentence).
    """
    import datasets
    spec = TASKS[task]
    if not path.exists():  # a pipe is read too
        raise FileNotFoundError(f"missing file {path}")
    lines = read_text(path).replace("\r\n", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError(f"{path} is empty")
    named = not spec.tsv_header or spec.text_keys[0] in lines[0].split("\t")
    header = lines.pop(0).split("\t") if named else list(spec.tsv_header)
    if not lines:
        raise ValueError(f"{path} has no examples, only a header")
    first = 2 if named else 1  # file line number of the first data row
    columns = next((c for c in (spec.tsv_columns, spec.text_keys + ("label",))
                    if set(c[:-1]) <= set(header)), spec.tsv_columns)
    if not labels and columns[-1] not in header:
        columns = columns[:-1]  # texts only
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"{path}: no column {missing} in header {header} (is it {task}?)")
    cols = [header.index(c) for c in columns]
    rows = {k: [] for k in spec.text_keys + ("label",) * (len(cols) > len(spec.text_keys))}
    for i, line in enumerate(lines):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(f"{path}, line {i + first}: {len(fields)} fields, "
                             f"expected {len(header)}")
        for key, c in zip(rows, cols):
            rows[key].append(fields[c] if key != "label" else
                             label_of(spec, fields[c], f"{path}, line {i + first}"))
    rows["idx"] = list(range(len(lines)))
    return datasets.Dataset.from_dict(rows)


def label_of(spec, value, where):
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
        label_of(spec, value, f"{name}, row {i}")
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
