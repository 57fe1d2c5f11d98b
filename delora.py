"""DeLoRA (Bini, Girrbach, Akata, ICLR 2025, arXiv 2503.18225) and a LoRA baseline, as drop-in
wrappers around a frozen nn.Linear, plus the helpers that add, save and load them.

Equation numbers follow the paper's v2. Where the paper is silent or differs from the code that
produced its GLUE table (github.com/ExplainableML/DeLoRA), we follow that code and say so.
"""
import functools
import math

import torch
import torch.nn as nn

NORM_EPS = 1e-4  # norms are clamped to this, so a collapsed rank-one term cannot divide by 0;
# below it a term is no longer unit-norm (its ΔW part shrinks with the norm)


def _kaiming(*shape):
    """A tensor initialized like nn.Linear's weight (kaiming-uniform, a = sqrt(5))."""
    t = torch.empty(*shape)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


class AdapterLinear(nn.Module):
    """What DeLoRA and LoRA share: a frozen `base` nn.Linear plus a low-rank update
    ΔW = up @ down (`factors()`; `delta_weight()` builds it), which the forward applies as two
    thin products, `merge()` folds into base.weight and `unmerge()` takes out."""

    def __init__(self, base: nn.Linear, r: int, dropout: float):
        super().__init__()
        if r < 1:
            raise ValueError(f"rank r must be >= 1, got {r}")
        most = min(base.in_features, base.out_features)  # ΔW's rank is at most that anyway
        if r > most:
            raise ValueError(f"rank r must be <= {most} for a {base.out_features} x "
                             f"{base.in_features} layer, got {r}")
        self.base = base.requires_grad_(False)
        self.r = r
        self.merged = False
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.factors_now = None  # set for one forward of a model by `add_adapters`' hook

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        # Equal to y + x @ delta_weight().T, but O(tokens·d·r): two thin products, never the
        # (out, in) matrix -- (x @ down.T) is (..., rank).
        up, down = self.factors() if self.factors_now is None else self.factors_now
        return y + (self.dropout(x) @ down.T) @ up.T                       # (..., out)

    @torch.no_grad()
    def delta_norm(self):
        """‖ΔW‖_F from the factors, never building ΔW: ‖U V‖²_F = tr((UᵀU)(V Vᵀ)), two
        (rank x rank) Gram matrices; in float64, as the two terms of DeLoRA's ΔW nearly cancel
        early in training."""
        up, down = (t.double() for t in self.factors())
        return float((up.T @ up * (down @ down.T)).sum().clamp_min(0).sqrt())

    @torch.no_grad()
    def merge(self):
        """Fold ΔW into base.weight: the same outputs, no adapter cost at inference."""
        if self.merged:
            raise RuntimeError("already merged")
        self.base.weight += self.exact_delta()
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Take ΔW back out of base.weight (the inverse of merge up to float rounding: W + ΔW − ΔW
        in the weight's dtype is W only to its last bit or so)."""
        if not self.merged:
            raise RuntimeError("not merged")
        self.base.weight -= self.exact_delta()
        self.merged = False

    def exact_delta(self):
        """ΔW for merge and unmerge: up @ down in float64, rounded once to the weight's dtype
        (the factors hold DeLoRA's two terms' difference already; in float64 no TF32 or bf16
        matmul rounds it)."""
        up, down = self.factors()
        return (up.double() @ down.double()).to(self.base.weight.dtype)


class DeLoRALinear(AdapterLinear):
    r"""A frozen linear layer plus DeLoRA's bounded low-rank update.

        h  = W x + b + ΔW x                                                   (Eq. 15)
        ΔW = (λ / r) · (B Ξ A − B₀ Ξ₀ A₀) ⊙ w                                  (Eq. 5-9)
        Ξ  = diag(1 / (‖b_i‖ ‖a_i‖)),   b_i: column i of B,  a_i: row i of A    (Eq. 5)
        w_j = ‖W[:, j]‖₂   (⊙ w scales column j of the update by w_j)         (Eq. 8)

    | symbol   | attribute          | shape      | trained |
    |----------|--------------------|------------|---------|
    | W, b     | base.weight/.bias  | (out, in)  | no      |
    | A        | A                  | (r, in)    | yes     |
    | B        | B                  | (out, r)   | yes     |
    | λ        | lam                | ()         | yes     |
    | A₀, B₀   | A0, B0 (buffers)   | as A, B    | no      |
    | w        | w (buffer)         | (in,)      | no      |

    What the pieces do, exactly (walkthrough.py shows each on a real layer):
    - ΔW = λ · D, with D = (1/r)(B Ξ A − B₀ Ξ₀ A₀) ⊙ w. Ξ divides each rank-one term b_i a_iᵀ
      by its own norm, so D depends only on the *directions* of the a_i, b_i (and of their
      initial copies): rescaling a row of A or a column of B by a positive factor changes
      nothing (while their norms stay above the clamp, 1e-4). That is the decoupling of the
      title: A and B set the angles, λ scales. λ does not set the size on its own: D is 0 at
      the start and becomes non-zero when the directions turn away from where they began (not
      every turn makes it so: flipping the signs of a_i and b_i together, or swapping two
      terms, leaves it 0) or when a norm falls below the clamp, where Ξ no longer makes its
      term unit-norm; ‖D‖_F ≤ 2·max_j w_j, so λ scales D and caps ‖ΔW‖_F at 2|λ|·max_j w_j,
      and how far the angles have turned decides how much of the cap is used.
    - Each normalized term has unit Frobenius norm, so ‖B Ξ A‖_F ≤ r, whatever the learning
      rate does to A and B (Eq. 6); dividing by r makes the *bound* |λ| for every rank (Eq. 7).
      The value itself is not rank-independent: for random, independent directions, as at the
      start, it is about |λ|/√r (the terms are nearly orthogonal); trained directions give
      more (walkthrough section 10: from r = 16 to 64 they hardly fall), and only aligned
      terms reach |λ|.
    - Scaling column j by the pretrained column norm w_j makes the update relative to the
      weights it changes, mimicking multiplicative fine-tuning (Eq. 8). With w and the frozen
      term, ‖ΔW‖_F ≤ 2|λ|·max_j w_j, a loose ball; from a given start the frozen term is fixed
      (up to λ): a run stays within |λ|·max_j w_j + ‖(λ/r) B₀ Ξ₀ A₀ ⊙ w‖_F, an upper bound
      for that start which no run reaches (walkthrough, 10).
    - Subtracting the frozen copy of the initial update makes ΔW exactly 0 at the start while A
      and B are both random (kaiming-uniform), Eq. 9. Zero-initializing B as LoRA does puts
      ‖b_i‖ = 0 in Ξ's denominator, defined only by the clamp (then ΔW = 0: PEFT's start,
      walkthrough section 9), and the paper found starts from a small ε unstable.
      Because the frozen term is scaled by the same λ, D = 0 at init and so dL/dλ = 0 exactly:
      λ starts learning only once A and B have moved.
    - λ is trained at its own learning rate and, as in the official code, weight-decayed (AdamW
      0.01), which alone pulls it toward 0 (train.param_groups, train.decay_alone).

    Following the official code rather than the paper's text: the frozen term is scaled by the
    *current* λ (Eq. 9 writes the initial λ₀: then dL/dλ ≠ 0 at init, doubling λ does not
    double ΔW, and the bound is (|λ| + |λ₀|)·max w), w is the per-column norm vector, and
    dropout is applied to the adapter's input only. Unlike the official code, A₀, B₀ are real
    copies (it aliases them to A, B, so on CPU ΔW stays 0), w is computed once here (so merge
    and unmerge are inverses, up to float rounding; the official code re-reads w from the
    merged weight) and the forward pass never builds the (out, in) matrix (see `factors`).
    All departures from the official code: docs/departures.md.
    """

    def __init__(self, base: nn.Linear, r: int, lam: float, dropout: float = 0.0):
        super().__init__(base, r, dropout)
        W = base.weight
        A, B = _kaiming(r, base.in_features), _kaiming(base.out_features, r)
        self.A = nn.Parameter(A.to(W))
        self.B = nn.Parameter(B.to(W))
        self.lam = nn.Parameter(torch.tensor(float(lam), device=W.device))
        self.register_buffer("A0", A.clone().to(W))  # clone: never a view of the trained A
        self.register_buffer("B0", B.clone().to(W))
        # (in,), fixed now; computed in fp32 at least (a bf16 W's norms in bf16 would be coarse)
        exact = torch.promote_types(W.dtype, torch.float32)
        self.register_buffer("w", W.detach().to(exact).norm(dim=0).to(W.dtype))

    @staticmethod
    def xi(A, B):
        """The diagonal of Ξ: 1 / (‖b_i‖ ‖a_i‖), shape (r,)."""
        return 1.0 / (B.norm(dim=0).clamp_min(NORM_EPS) * A.norm(dim=1).clamp_min(NORM_EPS))

    def delta_weight(self):
        """ΔW = (λ / r) · (B Ξ A − B₀ Ξ₀ A₀) ⊙ w, written literally: the readable definition."""
        A, B, A0, B0, lam, r, w = self.A, self.B, self.A0, self.B0, self.lam, self.r, self.w
        Xi, Xi0 = torch.diag(self.xi(A, B)), torch.diag(self.xi(A0, B0))   # (r, r)
        return (lam / r) * (B @ Xi @ A - B0 @ Xi0 @ A0) * w                # (out, in)

    def factors(self):
        """ΔW = up @ down, with rank 2r:  up = (λ/r)[B − B₀, B₀],  down = [Ξ A; Ξ A − Ξ₀ A₀] ⊙ w.
        Multiplied out: (λ/r)((B − B₀) Ξ A + B₀ (Ξ A − Ξ₀ A₀)) ⊙ w = ΔW. The differences are taken
        before any product: at init up's first block, B − B₀, and down's second, Ξ A − Ξ₀ A₀,
        are exactly zero, so both products are (the layer starts exactly at the pretrained
        one); and while small they stay accurate, also when the products run in TF32 or bf16
        (no near-cancelling sums inside a matmul). Computed in the parameters' dtype (fp32),
        also under bf16 autocast, then cast for the products. In a model's forward all layers'
        factors come from one call of `factors_of` (`factors_together`)."""
        frozen = unit_terms(self.A0, self.B0)                                   # Ξ₀ A₀
        return factors_of(self.A, self.B, self.lam, self.B0, frozen, self.w, self.r)

    @torch.no_grad()
    def bound(self):
        """The ball ΔW cannot leave, whatever A and B do: ‖ΔW‖_F ≤ 2|λ|·max_j w_j."""
        return float(2 * self.lam.abs() * self.w.max())


def unit_terms(A, B):
    """Ξ A: row a_i of A divided by ‖b_i‖ ‖a_i‖ (each norm clamped at NORM_EPS). A (..., r, in),
    B (..., out, r): one layer, or many stacked along a leading axis."""
    xi = 1.0 / (B.norm(dim=-2).clamp_min(NORM_EPS) * A.norm(dim=-1).clamp_min(NORM_EPS))  # (.., r)
    return xi[..., None] * A                                                      # (..., r, in)


def factors_of(A, B, lam, B0, frozen, w, r):
    """DeLoRALinear.factors for one layer, or for many at once along a leading axis (lam: (...,),
    frozen: Ξ₀ A₀ as A): up (..., out, 2r), down (..., 2r, in)."""
    P = unit_terms(A, B)                                                          # Ξ A
    down = torch.cat([P, P - frozen], dim=-2) * w[..., None, :]                   # (..., 2r, in)
    up = torch.cat([B - B0, B0], dim=-1) * (lam / r)[..., None, None]             # (..., out, 2r)
    return up, down


def factors_together(delora_layers, model, inputs=None):
    """Before a model's forward: the DeLoRA layers' factors in one set of kernels, the same
    equation with a leading axis over the layers of one shape (so a step's kernels no longer
    grow with the number of layers; bench.py --count-ops). What never changes (B₀, w and the
    frozen Ξ₀ A₀, stacked) is computed once and kept until a state dict is loaded into the
    layers or they move; Ξ₀ A₀ by the same stacked call as Ξ A, so that at init their
    difference is exactly zero on any device. (Compiled, the graph computes it each step.)
    Under autocast the factors are cast to its dtype here, once: the values each layer's
    products would cast them to, with the same gradients."""
    groups = {}
    for m in delora_layers:
        if not m.merged:
            groups.setdefault((m.A.shape, m.B.shape, m.A.dtype, m.A.device), []).append(m)
    for key, layers in groups.items():
        stack = lambda *names: (torch.stack([getattr(m, k) for m in layers]) for k in names)
        if torch.compiler.is_compiling():  # no Python-side cache inside a graph
            A0, B0, w = stack("A0", "B0", "w")
            frozen = unit_terms(A0, B0)
        else:
            # here, out of a compiled graph's reach: torch 2.11's dynamo cannot trace __dict__
            kept = model.__dict__.setdefault("delora_frozen", {})
            stamp = [(t.data_ptr(), t._version) for m in layers for t in (m.A0, m.B0, m.w)]
            if key not in kept or kept[key][0] != stamp:  # first call, or loaded, or moved
                with torch.inference_mode(False):  # kept for training too, even if made while
                    A0, B0, w = stack("A0", "B0", "w")  # predicting (no inference tensors)
                    kept[key] = stamp, B0, unit_terms(A0, B0), w
            _, B0, frozen, w = kept[key]
        A, B, lam = stack("A", "B", "lam")
        up, down = factors_of(A, B, lam, B0, frozen, w, layers[0].r)
        low = products_dtype(up)  # under autocast: cast once for all layers, not in each product
        if low is not None:
            up, down = up.to(low), down.to(low)
        for m, factors in zip(layers, zip(up.unbind(0), down.unbind(0))):
            m.factors_now = factors


def products_dtype(t):
    """The dtype autocast casts a float32 tensor to in a matmul (bf16 under --bf16); None where
    a matmul takes it as it is (no autocast, or not float32)."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) and \
        t.dtype == torch.float32 else None


def factors_done(delora_layers, model, inputs=None, output=None):
    """After a model's forward: each layer's factors are its own again (DeLoRALinear.factors)."""
    for m in delora_layers:
        m.factors_now = None


class LoRALinear(AdapterLinear):
    """The LoRA baseline (Hu et al., 2021; paper Eq. 1): h = W x + b + (α/r) B A x, with A
    kaiming-uniform and B = 0, so the layer starts as the pretrained one."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, r, dropout)
        self.scale = alpha / r
        self.A = nn.Parameter(_kaiming(r, base.in_features).to(base.weight))
        self.B = nn.Parameter(torch.zeros(base.out_features, r).to(base.weight))

    def delta_weight(self):
        return self.scale * (self.B @ self.A)                               # (out, in)

    def factors(self):
        """ΔW = up @ down = (α/r · B) @ A: the scale goes on B (out, r), not on the (..., out)
        output, one big multiply less."""
        return self.B * self.scale, self.A


ADAPTERS = {"delora": DeLoRALinear, "lora": LoRALinear}


def add_adapters(model, method="delora", targets=("query", "value"), r=8, lam=4.0, alpha=8.0,
                 dropout=0.0, head="classifier"):
    """Wrap every nn.Linear whose name ends in one of `targets` (outside the head) with a
    DeLoRA (λ = lam) or LoRA (α = alpha) adapter, and freeze everything except the adapters
    and the head. Returns the model; its parameter counts are in `count_parameters(model)`."""
    if method not in ADAPTERS:
        raise ValueError(f"unknown method {method!r}; valid: {list(ADAPTERS)}")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and n.split(".")[-1] in targets and not n.startswith(head + ".")]
    if not names:
        raise ValueError(f"no nn.Linear named {list(targets)} found outside the head")
    model.requires_grad_(False)
    strength = dict(lam=lam) if method == "delora" else dict(alpha=alpha)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        setattr(parent, child, ADAPTERS[method](base, r, dropout=dropout, **strength))
    model.get_submodule(head).requires_grad_(True)
    if method == "delora":  # all layers' factors at once, before each forward of the model
        # the layers found once, not at every forward: on a GPU the host's time is the step's
        layers = [m for m in model.modules() if isinstance(m, DeLoRALinear)]
        model.register_forward_pre_hook(functools.partial(factors_together, layers))
        model.register_forward_hook(functools.partial(factors_done, layers))
    return model


def adapters(model):
    """(name, module) for every adapter layer in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear)]


def adapter_diagnostics(model):
    """What each adapter does to its weight, for the run's epoch records:
    {name: {"lam": λ, "delta_norm": ‖ΔW‖_F, "bound": 2|λ|·max_j w_j}} for DeLoRA,
    {name: {"delta_norm": ‖ΔW‖_F}} for LoRA."""
    out = {}
    for name, m in adapters(model):
        out[name] = dict(delta_norm=m.delta_norm())
        if isinstance(m, DeLoRALinear):
            out[name].update(lam=m.lam.item(), bound=m.bound())
    return out


def count_parameters(model, head="classifier"):
    """Trainable parameters without the head (the paper's "0.3M": A, B, λ), with it, and all."""
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    adapter = sum(v for n, v in trainable.items() if not n.startswith(head + "."))
    return dict(adapter=adapter, trainable=sum(trainable.values()),
                total=sum(p.numel() for p in model.parameters()))


def adapter_state_dict(model, head="classifier"):
    """Everything that turns the pretrained checkpoint into the fine-tuned model: each adapter's
    tensors (A, B, λ, and for DeLoRA A₀, B₀, w; not the frozen base) and the head."""
    state = {}
    for name, module in adapters(model):
        if module.merged:
            raise RuntimeError(f"{name} is merged; unmerge before saving the adapter")
        for key, t in module.state_dict().items():
            if not key.startswith("base."):
                state[f"{name}.{key}"] = t.detach().clone()
    for key, t in model.get_submodule(head).state_dict().items():
        state[f"{head}.{key}"] = t.detach().clone()
    return state


def load_adapter_state_dict(model, state):
    """Load `adapter_state_dict` output into a model prepared with the same add_adapters
    settings; a different method, target set or rank is an error naming the keys."""
    wanted = adapter_state_dict(model)
    missing, extra = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
    if missing or extra:
        raise ValueError("adapter does not fit this model (other method or targets?): "
                         f"missing {missing[:4]}, unexpected {extra[:4]}")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(t.shape)}" for k, t in wanted.items()
           if state[k].shape != t.shape]
    if bad:
        raise ValueError(f"adapter shapes differ (other rank?): {bad[:4]}")
    model.load_state_dict(state, strict=False)
    return model


def merge_adapters(model):
    """Fold every adapter into its base layer and put the plain nn.Linear back: the result is
    an ordinary model whose state dict matches the pretrained checkpoint's layout."""
    for name, module in adapters(model):
        if not module.merged:
            module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.base)
    return model
