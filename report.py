"""The paper's tables and figures, made from finished runs (the JSON summaries train.py writes).

    python report.py .logs                      # Table 4 in the paper's form + robustness table
    python report.py .logs --plots figures      # + PNG figures (needs matplotlib)
    python report.py .logs --csv rows.csv --json rows.json

A run's result is its test metric at the best validation epoch. Diverged runs count, as in the
paper (no seed is discarded): the official code trains on through a NaN loss, so its result for
such a run is the test metric at the best validation epoch before the NaN; ours stops at the
NaN and reports exactly that, marked †. Running or interrupted runs are listed apart.
"""
import argparse
import csv
import json
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np

from glue import TASKS
from train import TrainConfig

PAPER = {  # Table 4 (RoBERTa-base, test metric at the best validation epoch, x100, 5 seeds)
    "DeLoRA (paper)": (87.2, 94.1, 89.0, 63.6, 92.8, 90.1, 77.1, 90.9),
    "LoRA (paper)": (86.6, 93.9, 88.7, 59.7, 92.6, 90.4, 75.3, 90.3),
}
RUN_KEYS = {"task", "seed", "status", "settings", "metric", "epochs", "test"}
ENDED = ("finished", "diverged")  # what counts; "running" and "interrupted" do not


def load_runs(out_dir):
    """Every run summary under out_dir. Files that are not valid JSON, or JSON that is not a
    run summary, are skipped with a warning naming them."""
    runs = []
    for path in sorted(Path(out_dir).rglob("*.json")):
        try:
            s = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as e:
            warn(f"skipped {path}: not readable as JSON ({type(e).__name__})")
            continue
        if not (isinstance(s, dict) and RUN_KEYS <= set(s)):
            warn(f"skipped {path}: not a run summary")
            continue
        try:
            config(s)
        except (TypeError, ValueError, AttributeError) as e:
            warn(f"skipped {path}: its settings are not train.py's ({e})")
            continue
        runs.append(dict(s, path=str(path)))
    return runs


def config(run):
    """The run's TrainConfig; settings this version does not know are left out."""
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in run["settings"].items() if k in known})


def warn(message):
    print(f"report.py: warning: {message}", file=sys.stderr)


def result(run):
    """The run's test metric at its best validation epoch; None if no epoch was validated."""
    return run["test"][run["metric"]] if run["test"] else None


def row_name(run, ignore=()):
    """'<model> <method> (<settings that differ from the task's defaults>)'."""
    cfg = config(run)
    extra = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in sorted(cfg.overrides().items()) if k not in ignore)
    return f"{cfg.model_tag()} {cfg.method}" + (f" ({extra})" if extra else "")


def cell(runs):
    """Runs of one cell -> '78.6 ± 2.1 (2)': mean ± sample std over seeds of the result, x100,
    with the count; '(3, 1†)' when one of the three diverged."""
    v = 100 * np.array([result(r) for r in runs], dtype=float)
    std = v.std(ddof=1) if len(v) > 1 else 0.0
    diverged = sum(r["status"] == "diverged" for r in runs)
    return f"{v.mean():.1f} ± {std:.1f} ({len(v)}" + (f", {diverged}†)" if diverged else ")")


def report(runs):
    """Markdown tables in the paper's form from load_runs' runs, plus the rows behind them:
    {'rows': [{'name', 'task', 'values', 'mean', 'std', 'n', 'diverged'}], 'unfinished': [...],
    'no_result': [...]}. A second table shows test metric vs learning-rate multiplier, where
    runs vary --lr-mult."""
    counted = [r for r in runs if r["status"] in ENDED and result(r) is not None]
    no_result = [r for r in runs if r["status"] == "diverged" and result(r) is None]
    unfinished = [r for r in runs if r["status"] not in ENDED]
    cells = {}  # (row, task) -> runs
    for r in counted:
        cells.setdefault((row_name(r), r["task"]), []).append(r)
    lines = ["| method | " + " | ".join(TASKS) + " | avg |", "|---" * (len(TASKS) + 2) + "|"]
    for name, values in PAPER.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values)
                     + f" | {np.mean(values):.1f} |")
    rows = []
    for name in dict.fromkeys(name for name, _ in cells):
        row = [cells.get((name, t)) for t in TASKS]
        means = [100 * np.mean([result(r) for r in c]) for c in row if c]
        avg = f"{np.mean(means):.1f}" + ("" if len(means) == len(TASKS) else
                                          f" ({len(means)} of {len(TASKS)} tasks)")
        lines.append(f"| {name} | " + " | ".join(cell(c) if c else "-" for c in row)
                     + f" | {avg} |")
        for task, c in zip(TASKS, row):
            if c:
                v = [result(r) for r in c]
                rows.append(dict(name=name, task=task, values=v, mean=float(np.mean(v)),
                                 std=float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                                 n=len(v), diverged=sum(r["status"] == "diverged" for r in c)))
    text = "\n".join(lines) + "\n"
    text += "\ntest metric at the best validation epoch, x100: mean ± std (seeds)\n"
    if any(r["status"] == "diverged" for r in counted):
        text += ("† diverged (loss NaN/inf): the result is the test metric at the best "
                 "validation epoch before the divergence\n")
    if len({r["settings"]["lr_mult"] for r in counted}) > 1:
        text += "\n" + robustness_table(counted) + "\n"
    if no_result:
        text += "\ndiverged before their first validation, so no result:\n" + "".join(
            f"- {r['path']}: {r.get('error', 'diverged')}\n" for r in no_result)
    if unfinished:
        text += "\nnot finished (not averaged in):\n" + "".join(
            f"- {r['path']}: {r['status']}, {len(r['epochs'])} epoch(s)\n" for r in unfinished)
    return text, dict(rows=rows, unfinished=[r["path"] for r in unfinished],
                      no_result=[r["path"] for r in no_result])


def robustness_table(counted):
    """Test metric vs learning-rate multiplier, one row per task and method."""
    cells = {}
    for r in counted:
        cells.setdefault((r["task"], row_name(r, ignore=("lr_mult",))), {}).setdefault(
            r["settings"]["lr_mult"], []).append(r)
    mults = sorted({m for per in cells.values() for m in per})
    lines = ["| task | method | " + " | ".join(f"lr x{m:g}" for m in mults) + " |",
             "|---" * (len(mults) + 2) + "|"]
    for (task, name), per in sorted(cells.items()):
        lines.append(f"| {task} | {name} | "
                     + " | ".join(cell(per[m]) if m in per else "-" for m in mults) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib, imported only here)

def plots(runs, directory):
    """Write the figures whose runs exist into directory; returns the paths written. A figure
    whose runs are missing is skipped with one printed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ended = [r for r in runs if r["status"] in ENDED]
    written = []
    for name, make in (("robustness", fig_robustness), ("update_size", fig_update_size),
                       ("validation", fig_validation), ("lambda", fig_lambda)):
        fig, why = make(plt, ended)
        if fig is None:
            print(f"skipped {name}.png: {why}")
            continue
        path = directory / f"{name}.png"
        fig.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
        print(f"wrote {path}")
    return written


def _panels(plt, n_rows, n_cols, w=4.2, h=3.0):
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(w * n_cols, h * n_rows), squeeze=False)
    return fig, axes


def _band(ax, x, per_x, label, color, marker="o"):
    """A mean line with a ± sample-std band over the values at each x."""
    x = [v for v in x if per_x.get(v)]
    mean = np.array([np.mean(per_x[v]) for v in x])
    std = np.array([np.std(per_x[v], ddof=1) if len(per_x[v]) > 1 else 0.0 for v in x])
    ax.plot(x, mean, marker=marker, ms=4, label=label, color=color)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2)


def _sweeps(ended):
    """{task: {method row without lr_mult: runs}} for tasks whose runs vary --lr-mult."""
    by_task = {}
    for r in ended:
        by_task.setdefault(r["task"], []).append(r)
    sweeps = {}
    for task, rs in by_task.items():
        if len({r["settings"]["lr_mult"] for r in rs}) > 1:
            for r in rs:
                sweeps.setdefault(task, {}).setdefault(
                    row_name(r, ignore=("lr_mult",)), []).append(r)
    return sweeps


def _mark_diverged(ax, runs, y_of):
    """Diverged runs: a red x at their value, or on the lower edge if they have none."""
    for r in runs:
        if r["status"] != "diverged":
            continue
        y = y_of(r)
        m = r["settings"]["lr_mult"]
        if y is None:
            ax.plot([m], [0.02], "rv", ms=7, transform=ax.get_xaxis_transform())
        else:
            ax.plot([m], [y], "rx", ms=9, mew=2)


def fig_robustness(plt, ended):
    sweeps = _sweeps(ended)
    if not sweeps:
        return None, "no learning-rate sweep (runs with more than one --lr-mult per task)"
    fig, axes = _panels(plt, 1, len(sweeps))
    for ax, (task, methods) in zip(axes[0], sorted(sweeps.items())):
        for i, (name, rs) in enumerate(sorted(methods.items())):
            per = {}
            for r in rs:
                if result(r) is not None:
                    per.setdefault(r["settings"]["lr_mult"], []).append(100 * result(r))
            _band(ax, sorted(per), per, name, f"C{i}")
            _mark_diverged(ax, rs, lambda r: None if result(r) is None else 100 * result(r))
        ax.set(xscale="log", title=task, xlabel="learning-rate multiplier (A, B)",
               ylabel=f"test {rs[0]['metric']} x100")
        ax.plot([], [], "rx", label="diverged (result before the NaN)")
        ax.legend(fontsize=7)
    return fig, None


def _last_diagnostics(r, key):
    """The mean over layers of an adapter diagnostic in the run's last epoch record."""
    last = r["epochs"][-1].get("adapters") if r["epochs"] else None
    values = [d[key] for d in (last or {}).values() if key in d]
    return float(np.mean(values)) if values else None


def fig_update_size(plt, ended):
    sweeps = _sweeps(ended)
    sweeps = {t: {n: [r for r in rs if _last_diagnostics(r, "delta_norm") is not None]
                  for n, rs in m.items()} for t, m in sweeps.items()}
    sweeps = {t: {n: rs for n, rs in m.items() if rs} for t, m in sweeps.items()}
    sweeps = {t: m for t, m in sweeps.items() if m}
    if not sweeps:
        return None, "no learning-rate sweep with adapter diagnostics"
    fig, axes = _panels(plt, 1, len(sweeps))
    for ax, (task, methods) in zip(axes[0], sorted(sweeps.items())):
        for i, (name, rs) in enumerate(sorted(methods.items())):
            for key, style in (("delta_norm", "-"), ("bound", "--")):
                per = {}
                for r in rs:
                    v = _last_diagnostics(r, key)
                    if v is not None:
                        per.setdefault(r["settings"]["lr_mult"], []).append(v)
                if per:
                    label = name if key == "delta_norm" else f"{name}: bound 2|λ| max w"
                    _band(ax, sorted(per), per, label, f"C{i}",
                          marker="o" if key == "delta_norm" else "")
                    ax.lines[-1].set_linestyle(style)
            _mark_diverged(ax, rs, lambda r: _last_diagnostics(r, "delta_norm"))
        ax.set(xscale="log", yscale="log", title=task, xlabel="learning-rate multiplier (A, B)",
               ylabel="‖ΔW‖_F, mean over layers (last epoch)")
        ax.legend(fontsize=7)
    return fig, None


def _settings_grid(ended, keep):
    """{(task, method): {setting label: runs}} over the runs `keep` accepts."""
    grid = {}
    for r in ended:
        if keep(r):
            cfg = r["settings"]
            label = f"lr x{cfg['lr_mult']:g}" if cfg["lr_mult"] != 1 else "defaults"
            key = (r["task"], row_name(r, ignore=("lr_mult",)))
            grid.setdefault(key, {}).setdefault(label, []).append(r)
    return grid


def _by_mult(label):
    return 1.0 if label == "defaults" else float(label.removeprefix("lr x"))


def fig_validation(plt, ended):
    grid = _settings_grid(ended, lambda r: len(r["epochs"]) > 0)
    if not grid:
        return None, "no finished or diverged run with a validated epoch"
    tasks = sorted({t for t, _ in grid})
    methods = sorted({m for _, m in grid})
    fig, axes = _panels(plt, len(tasks), len(methods))
    for (task, method), settings in grid.items():
        ax = axes[tasks.index(task)][methods.index(method)]
        cmap = plt.get_cmap("viridis")
        for i, label in enumerate(sorted(settings, key=_by_mult)):
            per = {}
            for r in settings[label]:
                for e in r["epochs"]:
                    per.setdefault(e["epoch"], []).append(100 * e["val"][r["metric"]])
            color = cmap(i / max(1, len(settings) - 1))
            _band(ax, sorted(per), per, label, color, marker=".")
        ax.set(title=f"{task}: {method}", xlabel="epoch",
               ylabel=f"validation {settings[label][0]['metric']} x100")
        ax.legend(fontsize=6)
    return fig, None


def fig_lambda(plt, ended):
    grid = _settings_grid(ended, lambda r: r["settings"]["method"] == "delora"
                          and any("adapters" in e for e in r["epochs"]))
    if not grid:
        return None, "no DeLoRA run with adapter diagnostics"
    panels = [(key, label) for key, settings in sorted(grid.items())
              for label in sorted(settings, key=_by_mult)]
    fig, axes = _panels(plt, 1, len(panels), w=3.6)
    cmap = plt.get_cmap("viridis")
    for ax, ((task, method), label) in zip(axes[0], panels):
        rs = grid[(task, method)][label]
        layers = list(next(e for e in rs[0]["epochs"] if "adapters" in e)["adapters"])
        for j, layer in enumerate(layers):  # the mean over seeds, after each epoch
            per = {0: [r["settings"]["lam"] for r in rs]}
            for r in rs:
                for e in r["epochs"]:
                    if layer in e.get("adapters", {}):
                        per.setdefault(e["epoch"] + 1, []).append(e["adapters"][layer]["lam"])
            x = sorted(per)
            ax.plot(x, [np.mean(per[v]) for v in x], color=cmap(j / max(1, len(layers) - 1)),
                    ls="-" if layer.endswith("query") else "--", lw=1)
        ax.set(title=f"{task}: {method}, {label}", xlabel="epochs done", ylabel="λ")
    axes[0][0].plot([], [], "k-", label="query")
    axes[0][0].plot([], [], "k--", label="value")
    axes[0][0].legend(fontsize=7, title="color: layer depth", title_fontsize=7)
    return fig, None


# ---------------------------------------------------------------------------------------------
# Command line

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv=None):
    p = Parser(prog="report.py", description="Tables and figures over the runs in OUT_DIR.")
    p.add_argument("out_dir", nargs="?", default=".logs", help="default: %(default)s")
    p.add_argument("--csv", help="also write the rows as CSV")
    p.add_argument("--json", help="also write the rows as JSON")
    p.add_argument("--plots", metavar="DIR", help="write the figures (PNG) into DIR")
    args = p.parse_args(argv)
    if not Path(args.out_dir).is_dir():
        p.exit(1, f"report.py: error: {args.out_dir}: no such folder\n")
    runs = load_runs(args.out_dir)
    if not runs:
        p.exit(1, f"report.py: error: no run summaries under {args.out_dir} (train.py writes "
                  f"one <run>.json per run)\n")
    text, data = report(runs)
    print(text, end="")
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["name", "task", "mean", "std", "n", "diverged"])
            w.writerows([r["name"], r["task"], r["mean"], r["std"], r["n"], r["diverged"]]
                        for r in data["rows"])
    if args.plots:
        data["plots"] = [str(p) for p in plots(runs, args.plots)]
    return data


if __name__ == "__main__":
    main()
