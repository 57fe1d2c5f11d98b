"""A compact RoBERTa (and BERT) encoder with a sequence-classification head.

Mirrors Hugging Face's `RobertaForSequenceClassification` / `BertForSequenceClassification`
(transformers/models/roberta/modeling_roberta.py) module for module, so that real checkpoints load
and give the same logits, in a file you can read next to the paper. BERT-family checkpoints
(bert-base-uncased, MiniLM) use the same classes; what differs is read from config.json.

    model = from_pretrained("FacebookAI/roberta-base", num_labels=2)
    tokenizer = load_tokenizer("FacebookAI/roberta-base")
    logits = model(input_ids, attention_mask)            # (batch, num_labels)
"""
import json
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cli import first_line, not_a_folder

ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")  # positions offset by pad id, as RoBERTa
BERT_TYPES = ("bert",)
GELUS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}  # hidden_act -> approx
# The attention kernels we trust: flash (no mask), memory-efficient (with our padding mask), the
# math fallback. Not cuDNN's, the default on H100s: with a mask its backward gives NaN query
# gradients when the length is 64 mod 128 (pytorch/pytorch#196678, since torch 2.11), where the
# memory-efficient and math kernels are clean on the same inputs.
TRUSTED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class RobertaConfig:
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072              # feed-forward width
    max_position_embeddings: int = 514         # 512 tokens + the pad_id + 1 offset
    type_vocab_size: int = 1                   # RoBERTa has one token type, BERT two
    pad_token_id: int = 1
    layer_norm_eps: float = 1e-5
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None    # None: use hidden_dropout_prob (as HF)
    hidden_act: str = "gelu"                   # exact (erf) GELU
    initializer_range: float = 0.02            # std of a new head's weights
    model_type: str = "roberta"                # "bert": positions from 0, pooler-style head
    num_labels: int = 2                        # 1 = regression (STS-B)

    @classmethod
    def from_dict(cls, d, **overrides):
        """Build from a Hugging Face config.json dict; keys we do not model are ignored."""
        names = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ValueError(f"unknown config field(s) {bad}; valid: {sorted(names)}")
        config = cls(**{k: v for k, v in {**d, **overrides}.items() if k in names})
        if config.model_type not in ROBERTA_TYPES + BERT_TYPES:
            raise ValueError(f"model_type {config.model_type!r} is not supported; "
                             f"valid: {list(ROBERTA_TYPES + BERT_TYPES)}")
        if config.hidden_act not in GELUS:
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; "
                             f"valid: {list(GELUS)}")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only position_embedding_type 'absolute' is supported")
        if config.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {config.num_labels}")
        return config

    @property
    def is_roberta(self):
        return self.model_type in ROBERTA_TYPES

    @property
    def max_tokens(self):
        """The longest sequence the position embeddings cover: roberta-base 514 - 2 = 512
        (RoBERTa's positions start after pad_id), BERT all of them."""
        offset = self.pad_token_id + 1 if self.is_roberta else 0
        return self.max_position_embeddings - offset


class Tokens:
    """Where the real tokens of a padded (B, T) batch are, and the two moves between layouts.

    The protocol draws batches in random order, so about half of a batch is padding (50 % on
    RTE, 55 % on SST-2, bench.py). Every Linear, LayerNorm, GELU and dropout works on each
    token alone, so the encoder runs them on the N real tokens only, as an (N, C) matrix;
    attention, the one op that mixes tokens, gets the (B, T) layout back (as FlashAttention's
    unpad_input / pad_input and MosaicBERT do). `rows`: the (N,) positions of the real tokens
    in the flattened (B*T) batch, or None when every position is computed.
    """

    def __init__(self, rows, key_mask, batch, length):
        self.rows = rows
        self.key_mask = key_mask
        self.batch = batch
        self.length = length

    @classmethod
    def of(cls, attention_mask, B, T, keep_padding=False, rows=None):
        """rows: given with the batch (glue.Encoded.batch, made on the CPU), or found here with
        `nonzero`, which waits for the device (a host sync)."""
        if attention_mask is None:  # nothing is padding
            return cls(None, None, B, T)
        real = attention_mask.bool()                                       # (B, T)
        key_mask = real[:, None, None, :]                                  # (B, 1, 1, T)
        if keep_padding:
            return cls(None, key_mask, B, T)
        rows = real.flatten().nonzero().squeeze(1) if rows is None else rows       # (N,)
        if len(rows) == B * T:  # no padding in this batch: no gather, no mask
            return cls(None, None, B, T)
        return cls(rows, key_mask, B, T)

    def unpad(self, x):
        """(B*T, ...) -> (N, ...): the real tokens' rows (a gather)."""
        return x if self.rows is None else x.index_select(0, self.rows)

    def pad(self, x):
        """(N, ...) -> (B*T, ...): back to every position, zeros at padding (a scatter)."""
        if self.rows is None:
            return x
        return x.new_zeros(self.batch * self.length, *x.shape[1:]).index_copy(0, self.rows, x)


class Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                            padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.pad_id = cfg.pad_token_id
        self.is_roberta = cfg.is_roberta

    def forward(self, input_ids, token_type_ids, tokens):
        """(B, T) ids -> (N, C): the embeddings of the real tokens only (see `Tokens`)."""
        B, T = input_ids.shape  # batch, sequence length
        if self.is_roberta:
            # RoBERTa (fairseq) counts positions over real tokens only, starting at pad_id + 1;
            # pad tokens sit at position pad_id. So a sentence gets the same positions however
            # much padding follows it, and position embedding rows 0..pad_id are never used
            # for text -- which is why roberta-base has 514 = 512 + 2 positions.
            not_pad = input_ids.ne(self.pad_id).int()                    # (B, T)
            positions = torch.cumsum(not_pad, dim=1) * not_pad + self.pad_id
        else:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)  # BERT: from 0
        ids, types, positions = (tokens.unpad(t.reshape(B * T)) for t in
                                 (input_ids, token_type_ids, positions))   # (N,) each
        x = (self.word_embeddings(ids) + self.token_type_embeddings(types)
             + self.position_embeddings(positions))                     # (N, C)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention plus its output projection and post-LayerNorm residual.
    HF splits this into `attention.self` (query, key, value) and `attention.output`."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.query = nn.Linear(C, C)
        self.key = nn.Linear(C, C)
        self.value = nn.Linear(C, C)
        self.dense = nn.Linear(C, C)
        self.LayerNorm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.attn_dropout = cfg.attention_probs_dropout_prob
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x, tokens):
        N, C = x.shape  # real tokens, hidden size
        B, T, nh = tokens.batch, tokens.length, self.n_head

        def heads(t):  # (N, C) -> (B*T, C), zeros at padding -> (B, nh, T, hs)
            return tokens.pad(t).view(B, T, nh, C // nh).transpose(1, 2)
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        # key_mask: (B, 1, 1, T) bool, True = attend; broadcast over heads and queries, so no
        # (T x T) mask is materialized. None (no padding) lets SDPA pick the flash kernel.
        # Padded query rows are computed here and dropped just below: attention is the one
        # place that needs the (B, T) layout.
        with sdpa_kernel(TRUSTED_SDPA):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=tokens.key_mask, dropout_p=(
                self.attn_dropout if self.training else 0.0))
        y = tokens.unpad(y.transpose(1, 2).reshape(B * T, C))            # (N, C)
        return self.LayerNorm(x + self.dropout(self.dense(y)))


class Layer(nn.Module):
    """One post-LayerNorm transformer block: attention, then a GELU feed-forward."""

    def __init__(self, cfg):
        super().__init__()
        self.attention = SelfAttention(cfg)
        self.intermediate = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.approximate = GELUS[cfg.hidden_act]

    def forward(self, x, tokens):
        x = self.attention(x, tokens)                                   # (N, C)
        h = F.gelu(self.intermediate(x), approximate=self.approximate)  # (N, 4C)
        return self.LayerNorm(x + self.dropout(self.output(h)))


class ClassificationHead(nn.Module):
    """On the first token (<s> / [CLS]): dropout -> dense -> tanh -> dropout -> out_proj.
    For BERT, `dense` is the pooler and there is no first dropout, exactly as in HF."""

    def __init__(self, cfg):
        super().__init__()
        p = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        self.dropout = nn.Dropout(p)
        self.first_dropout = self.dropout if cfg.is_roberta else nn.Identity()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, hidden):
        x = hidden[:, 0]                                                 # (B, C)
        x = torch.tanh(self.dense(self.first_dropout(x)))
        return self.out_proj(self.dropout(x))                            # (B, num_labels)


class RobertaClassifier(nn.Module):
    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.classifier = ClassificationHead(cfg)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        # What HF does for weights a checkpoint does not provide (in practice: a new head).
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, keep_padding=False,
               rows=None):
        """The encoder's last hidden states, (batch, seq, hidden).

        Only the real tokens are computed (rows: their flat positions, if the batch brings
        them); padding positions hold zeros. keep_padding=True computes every position of the
        (B, T) batch, padding included: the plain padded computation, kept as the reference
        that the tests and bench.py compare against (equal at the real tokens up to rounding)."""
        B, T = input_ids.shape
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        tokens = Tokens.of(attention_mask, B, T, keep_padding, rows)
        x = self.embeddings(input_ids, token_type_ids, tokens)             # (N, C)
        for layer in self.layers:
            x = layer(x, tokens)                                           # (N, C)
        return tokens.pad(x).view(B, T, -1)                                # (B, T, C)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, keep_padding=False,
                rows=None):
        """input_ids, attention_mask (1 = token, 0 = pad): (B, T) -> logits (B, num_labels).
        The head runs in fp32 (or the model's dtype, if wider) also under bf16 autocast: its
        logits are what the loss, the predictions and STS-B's scores are made of."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids, keep_padding, rows)
        dtype = self.classifier.out_proj.weight.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            return self.classifier(hidden.to(torch.promote_types(dtype, torch.float32)))


# ----------------------------------------------------------------------------------------------
# Checkpoints. Our module tree is HF's, with each layer flattened; this is the whole difference.

LAYER_KEYS = {  # inside encoder.layer.N, checkpoint name -> ours (inside layers.N)
    "attention.self.query": "attention.query",
    "attention.self.key": "attention.key",
    "attention.self.value": "attention.value",
    "attention.output.dense": "attention.dense",
    "attention.output.LayerNorm": "attention.LayerNorm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "LayerNorm",
}
HEAD_KEYS = {  # the sequence-classification head, checkpoint name -> ours
    "roberta": {"classifier.dense": "classifier.dense",
                "classifier.out_proj": "classifier.out_proj"},
    "bert": {"pooler.dense": "classifier.dense", "classifier": "classifier.out_proj"},
}
IGNORED = re.compile(r"^(lm_head\.|cls\.|pooler\.|.*position_ids$)")  # pretraining heads, buffers


def checkpoint_key(key, cfg, to_ours=True):
    """Map one parameter name between a HF checkpoint and our model (to_ours=False: back).

    roberta.encoder.layer.3.attention.self.query.weight <-> layers.3.attention.query.weight
    roberta.embeddings.LayerNorm.gamma                   -> embeddings.LayerNorm.weight
    bert.pooler.dense.bias                              <-> classifier.dense.bias   (BERT)
    Returns None for a checkpoint key that has no place in our model.
    """
    prefix = "roberta." if cfg.is_roberta else "bert."
    head = HEAD_KEYS["roberta" if cfg.is_roberta else "bert"]
    module, _, leaf = key.rpartition(".")
    if to_ours:
        module = module.removeprefix("roberta.").removeprefix("bert.")
        leaf = {"gamma": "weight", "beta": "bias"}.get(leaf, leaf)  # old LayerNorm names
        if module in head:
            return f"{head[module]}.{leaf}"
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", module)
        if m and m.group(2) in LAYER_KEYS:
            return f"layers.{m.group(1)}.{LAYER_KEYS[m.group(2)]}.{leaf}"
        return f"{module}.{leaf}" if module.startswith("embeddings.") else None
    # Back to the checkpoint's names: the same tables, read the other way.
    for theirs, ours in head.items():
        if module == ours:  # the BERT pooler lives inside the encoder's prefix
            return (prefix if theirs.startswith("pooler.") else "") + f"{theirs}.{leaf}"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", module)
    if m:
        inner = {v: k for k, v in LAYER_KEYS.items()}[m.group(2)]
        return f"{prefix}encoder.layer.{m.group(1)}.{inner}.{leaf}"
    return f"{prefix}{module}.{leaf}"


def load_checkpoint_state(model, state):
    """Copy a HF state dict into `model`: errors on missing/mis-shaped encoder weights, warns on
    keys we do not know. Returns the names of head parameters left newly initialized."""
    cfg, ours = model.config, model.state_dict()
    mapped, unexpected = {}, []
    for key, tensor in state.items():
        name = checkpoint_key(key, cfg)
        if name in ours:
            mapped[name] = tensor
        elif not IGNORED.match(key.removeprefix("roberta.").removeprefix("bert.")):
            unexpected.append(key)
    # A checkpoint's head is used only with the same number of labels; otherwise the head is
    # new, except that a BERT pooler still initializes the dense layer (as HF does).
    out_proj = mapped.get("classifier.out_proj.weight")
    if out_proj is None or out_proj.shape != ours["classifier.out_proj.weight"].shape:
        drop = "classifier." if cfg.is_roberta else "classifier.out_proj."
        mapped = {n: t for n, t in mapped.items() if not n.startswith(drop)}
    missing = [n for n in ours if n not in mapped and not n.startswith("classifier.")]
    if missing:
        raise ValueError(f"checkpoint is missing encoder weights: {missing[:8]}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    bad = [f"{n}: checkpoint {tuple(t.shape)} vs model {tuple(ours[n].shape)}"
           for n, t in mapped.items() if t.shape != ours[n].shape]
    if bad:
        raise ValueError(f"shape mismatch: {'; '.join(bad[:8])}")
    if unexpected:
        warnings.warn(f"ignored {len(unexpected)} unexpected checkpoint key(s): {unexpected[:8]}")
    model.load_state_dict(mapped, strict=False)
    return [n for n in ours if n.startswith("classifier.") and n not in mapped]


def export_state_dict(model):
    """Our (plain, adapter-free) model's weights under the reference HF key names."""
    return {checkpoint_key(n, model.config, to_ours=False): t.detach().contiguous()
            for n, t in model.state_dict().items()}


HUB_FILES = {  # what we need from a checkpoint, in order of preference
    "config": ["config.json"],
    "weights": ["model.safetensors", "pytorch_model.bin"],
    "tokenizer": ["tokenizer.json", "vocab.json"],  # vocab.json comes with merges.txt
}


def resolve(name_or_path, kind):
    """A local directory or a hub id -> the path of the first `kind` file (HUB_FILES) it has.
    Hub files are fetched with huggingface_hub into its usual cache."""
    wanted, name_or_path = HUB_FILES[kind], str(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        for f in wanted:
            if (path / f).is_file():
                return path / f
        raise FileNotFoundError(f"{path} has none of {wanted}: a checkpoint directory needs "
                                f"{' or '.join(wanted)}")
    problem = not_a_folder(path)  # 'no such folder', 'a file, ...', a link loop, ...
    if problem != "no such folder" or name_or_path.startswith((".", "/", "~")) or \
            name_or_path.count("/") > 1:  # a local path, not a hub id
        raise FileNotFoundError(f"{name_or_path} is not a directory ({problem}): pass a local "
                                f"checkpoint directory (with {' or '.join(wanted)}) or a hub id")
    from huggingface_hub import errors, hf_hub_download
    absent = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)
    try:
        for f in wanted:
            try:
                found = Path(hf_hub_download(name_or_path, f))
            except absent:  # the repo has no such file: try the next one
                continue
            if f == "vocab.json":  # byte-level BPE needs its merges too
                hf_hub_download(name_or_path, "merges.txt")
            return found
        error = f"it has none of {wanted}"
    except Exception as e:  # offline, unknown repo, a full cache ...: no point trying others
        error = type(e).__name__ + (f": {e.strerror[:1].lower()}{e.strerror[1:]}"
                                    if isinstance(e, OSError) and e.strerror else "")
    raise FileNotFoundError(
        f"{name_or_path!r} is no local directory and {wanted[0]} could not be fetched from the "
        f"Hugging Face hub ({error}); offline, pass a local directory with "
        f"{' or '.join(wanted)} as --model instead")


@contextmanager
def reading(path):
    """Around reading a checkpoint's file: what its reader raises for a damaged one (a download
    cut short) -- safetensors', pickle's, a zip's, tokenizers' own errors -- becomes one
    ValueError naming the file."""
    try:
        yield
    except (OSError, MemoryError):
        raise
    except Exception as e:
        cause = first_line(e)
        if "allocate memory" in cause or "out of memory" in cause:  # the machine's, not the file's
            raise MemoryError(f"reading {path}: {cause}") from None
        raise ValueError(f"{path} cannot be read ({cause}): a damaged or incomplete file "
                         f"(fetch it again)") from None


def from_pretrained(name_or_path="FacebookAI/roberta-base", num_labels=2, **config_overrides):
    """A local checkpoint directory or hub id -> RobertaClassifier with its weights loaded.
    A matching sequence-classification head in the checkpoint is loaded, else a new one made."""
    config_file = resolve(name_or_path, "config")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as e:
        raise ValueError(f"{config_file} is not valid JSON ({e})") from None
    cfg = RobertaConfig.from_dict(config, num_labels=num_labels, **config_overrides)
    weights = resolve(name_or_path, "weights")
    with reading(weights):
        state = read_safetensors(weights)[0] if weights.suffix == ".safetensors" else \
            torch.load(weights, map_location="cpu", weights_only=True)
    model = RobertaClassifier(cfg)
    load_checkpoint_state(model, state)
    return model


def read_safetensors(path):
    """A .safetensors file's tensors and its metadata, the file read by Python (so any path, also
    one whose name is not UTF-8, which safetensors' own reader refuses)."""
    from safetensors.torch import load
    data = Path(path).read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    return load(data), header.get("__metadata__") or {}


def save_pretrained(model, directory, tokenizer_from=None, **config_extra):
    """Write a HF checkpoint directory: config.json (plus config_extra's keys, which HF keeps as
    attributes), model.safetensors (+ tokenizer files)."""
    from safetensors.torch import save
    cfg, directory = model.config, Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arch = "RobertaForSequenceClassification" if cfg.is_roberta else \
        "BertForSequenceClassification"
    config = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    config.update(architectures=[arch], position_embedding_type="absolute",
                  id2label={str(i): f"LABEL_{i}" for i in range(cfg.num_labels)},
                  label2id={f"LABEL_{i}": i for i in range(cfg.num_labels)})
    if cfg.num_labels == 1:
        config["problem_type"] = "regression"
    config.update(config_extra)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # serialized, then written by Python: a failed write is an OSError that names its cause
    (directory / "model.safetensors").write_bytes(save(export_state_dict(model),
                                                       metadata={"format": "pt"}))
    if tokenizer_from is not None:
        for f in HUB_FILES["tokenizer"] + ["merges.txt", "tokenizer_config.json",
                                           "special_tokens_map.json", "vocab.txt"]:
            src = Path(tokenizer_from) / f
            if src.is_file():
                (directory / f).write_bytes(src.read_bytes())


def check_max_length(max_length, tokenizer, config, pair):
    """--max-length must fit the position embeddings (else an IndexError deep in the model on
    the first long example) and leave room for text besides the special tokens -- one token of
    each text of a pair -- (else `tokenizers` trains on the special tokens alone, or leaves the
    sequences untruncated): RoBERTa pairs need 4 + 2 (<s> A </s></s> B </s>), BERT pairs 3 + 2."""
    if max_length > config.max_tokens:
        raise ValueError(f"--max-length {max_length} is more than the model's "
                         f"{config.max_tokens} positions; use at most {config.max_tokens}")
    special = tokenizer.num_special_tokens_to_add(pair)
    need = special + (2 if pair else 1)
    if max_length < need:
        raise ValueError(f"--max-length {max_length} leaves no room for the text of "
                         f"{'a pair (one token of each)' if pair else 'a sentence'} beside its "
                         f"{special} special tokens; use at least {need}")


def load_tokenizer(name_or_path="FacebookAI/roberta-base", max_length=256):
    """The checkpoint's tokenizer (tokenizer.json, or vocab.json + merges.txt as RoBERTa's
    byte-level BPE), set to our settings: no padding, longest-first truncation to max_length.
    Pairs encode as `<s> A </s></s> B </s>` (RoBERTa) or `[CLS] A [SEP] B [SEP]` (BERT)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    path = resolve(name_or_path, "tokenizer")
    if path.name == "tokenizer.json":  # read here: the Rust readers take UTF-8 paths only
        with reading(path):
            tok = Tokenizer.from_str(path.read_bytes().decode())
    else:
        merges = path.parent / "merges.txt"
        if not merges.is_file():
            raise FileNotFoundError(f"{path.parent} has vocab.json but no merges.txt")
        with reading(f"{path} (with {merges.name})"):
            pairs = [tuple(line.split(" ")) for line in merges.read_bytes().decode().splitlines()
                     if line and not line.startswith("#version")]
            tok = Tokenizer(models.BPE(json.loads(path.read_bytes()), pairs))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        vocab = tok.get_vocab()
        tok.add_special_tokens([t for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
                                if t in vocab])
        tok.post_processor = processors.RobertaProcessing(("</s>", vocab["</s>"]),
                                                          ("<s>", vocab["<s>"]))
    tok.no_padding()
    tok.enable_truncation(max_length, strategy="longest_first")
    return tok
