"""Pictures of the diagnostics (matplotlib, optional: --plot is refused in one line without it)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from common import UserError, atomic_write, check_writable


def check_plot(path: str | None) -> None:
    """--plot needs matplotlib, which is optional: refused in one line, before any work, without it."""
    if path is None:
        return
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError(f"--plot {path}: needs matplotlib (pip install matplotlib), which is optional here")
    check_writable(path, "--plot")


def new_figure(width: float):
    import matplotlib
    matplotlib.use("Agg")                       # files only, no display
    import matplotlib.pyplot as plt
    return plt, *plt.subplots(figsize=(width, 4))


def plot_mechanism(table: dict, base: dict, path: Path) -> None:
    """Change in test NDCG@20 over the base against teacher quality, one line per variant; the
    mixed teacher as points at x = 0.5 (half its rows are quality 1, half random)."""
    plt, fig, ax = new_figure(6.5)
    graded = sorted(((float(n), row) for n, row in table.items() if n != "mixed"), key=lambda qr: qr[0])
    as_pct = lambda c: 100 * c if c is not None else math.nan                   # no change over a base of 0
    for k, label in enumerate(next(iter(table.values()))["cells"]):
        color = f"C{k}"
        if graded:
            ax.plot([q for q, _ in graded], [as_pct(row["cells"][label]["change_NDCG@20"]) for _, row in graded],
                    "o-", color=color, label=label)
        if "mixed" in table:
            ax.plot([0.5], [as_pct(table["mixed"]["cells"][label]["change_NDCG@20"])], "*", ms=14, color=color,
                    label=f"{label}, mixed teacher")
    noise = 200 * base["NDCG@20_std"] / base["NDCG@20"] if base["NDCG@20"] > 0 else 0
    ax.axhspan(-noise, noise, color="0.9", label="within 2 std of the base's seeds")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set(xlabel="teacher quality: the share of good candidates (1: the training transitions, 0: random)",
           ylabel="change in test NDCG@20 over the base (%)", title=f"distillation gain, base NDCG@20 {base['NDCG@20']:.4f}")
    ax.legend(fontsize=7)
    write_figure(plt, fig, path)


def plot_ablation(summary: list[dict], title: str, path: Path) -> None:
    """Test NDCG@20 of each (student, variant): bars with the seeds' std as error bars."""
    plt, fig, ax = new_figure(max(6.0, 0.6 * len(summary)))
    names = [f"{l['student']} {l['variant']}" for l in summary]
    order = list(dict.fromkeys(l["student"] for l in summary))              # one colour per student
    ax.bar(range(len(summary)), [l["NDCG@20"] for l in summary], yerr=[l["NDCG@20_std"] for l in summary],
           capsize=3, color=[f"C{order.index(l['student']) % 10}" for l in summary])
    ax.set_xticks(range(len(summary)), names, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="test NDCG@20 (mean ± std over seeds)", title=title)
    write_figure(plt, fig, path)


def write_figure(plt, fig, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    print(f"wrote {path}")
