"""From runs to a table: mean and std over seeds, the paired test (the Wilcoxon signed-rank
test of per-row NDCG@20, numpy only: its normal approximation is accurate for the thousands
of rows a table pairs), the verdict that needs both to agree, and the one table formatter
that every command's table goes through."""
from __future__ import annotations

import math

import numpy as np

from metrics import REPORTED, ndcg_per_row


def signed_rank_test(d) -> dict:
    """Wilcoxon signed-rank test of paired differences d [N], two-sided, normal approximation:
    zero differences dropped (m rows remain), tied |d| given their average rank,
        W+ = sum of the ranks of the positive d,
        z = (W+ - m(m+1)/4) / sqrt(m(m+1)(2m+1)/24 - sum_ties (t^3 - t)/48),  p = erfc(|z| / sqrt 2).
    The approximation is accurate for m above ~50; the tables here pair thousands of rows.
    d is rounded to 12 decimals first, so that differences equal up to float rounding tie."""
    d = np.round(np.asarray(d, dtype=float), 12)
    d = d[d != 0]
    m = len(d)
    if m == 0:
        return {"rows": 0, "W+": 0.0, "z": 0.0, "p": 1.0}
    a = np.abs(d)
    values, ties = np.unique(a, return_counts=True)                               # sorted distinct |d|, their counts
    avg_rank = np.cumsum(ties) - (ties - 1) / 2                                   # 1-based average rank per value
    rank = avg_rank[np.searchsorted(values, a)]                                   # [m]
    w_plus = float(rank[d > 0].sum())
    var = m * (m + 1) * (2 * m + 1) / 24 - float((ties.astype(float) ** 3 - ties).sum()) / 48
    z = (w_plus - m * (m + 1) / 4) / math.sqrt(var) if var > 0 else 0.0
    return {"rows": m, "W+": w_plus, "z": z, "p": math.erfc(abs(z) / math.sqrt(2))}


def paired_test(runs_a: list[dict], runs_b: list[dict]) -> dict | None:
    """a against b over the test rows: per-row NDCG@20 averaged over each side's seeds, then the
    signed-rank test of the per-row differences (None when a run carries no per-row ranks)."""
    if not all("test_ranks" in r for r in runs_a + runs_b):
        return None
    mean_a, mean_b = (np.mean([ndcg_per_row(r["test_ranks"]) for r in rs], axis=0) for rs in (runs_a, runs_b))
    return signed_rank_test(mean_a - mean_b)


# ============================================================================ seeds, verdicts, tables
P_LEVEL = 0.05   # the paired test's level
NDCG, HR = f"NDCG@{REPORTED}", f"HR@{REPORTED}"


def mean_std(xs):
    xs = np.asarray(xs, dtype=float)
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


def verdict(mean_d: float, std_d: float, mean_b: float, std_b: float, seeds: int, p: float | None = None) -> str:
    """A gain (or loss) only beyond twice the combined standard deviation of the two means' seeds
    and, where the paired test ran, with its p below P_LEVEL: both must agree."""
    if seeds < 2:
        return "1 seed: no noise estimate"
    noise = 2 * math.hypot(std_d, std_b)
    if abs(mean_d - mean_b) <= noise or (p is not None and p >= P_LEVEL):
        return "within noise"
    return "gain" if mean_d > mean_b else "loss"


def compare(line: dict, ref: dict, runs: list[dict], ref_runs: list[dict]) -> dict:
    """line (a summary line) against ref: the change in NDCG@20, the seeds' verdict, the paired
    test over the test rows, and the verdict of both."""
    seeds = min(line["seeds"], ref["seeds"])
    means = (line[NDCG], line[NDCG + "_std"], ref[NDCG], ref[NDCG + "_std"], seeds)
    paired = paired_test(runs, ref_runs)
    return {"change_NDCG@20": line[NDCG] / ref[NDCG] - 1 if ref[NDCG] > 0 else None,
            "seed_noise": verdict(*means) if seeds > 1 else "1 seed", "paired": paired,
            "verdict": verdict(*means, paired["p"] if paired else None)}


def summarise(runs: list[dict], against: dict | None = None) -> list[dict]:
    """One line per (student, variant): mean and std over seeds; for a variant with a reference
    (against: {variant: reference variant}; default: every variant against "base") its change in
    NDCG@20, the paired test over the test rows, and whether the change is a gain or a loss."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["config"]["student"], r["variant"]), []).append(r)
    lines = {}
    for (student, variant), rs in groups.items():
        line = lines[student, variant] = {"student": student, "variant": variant, "seeds": len(rs),
                                          "epochs": [r["selected_epoch"] for r in rs],
                                          "converged": all(r["converged"] for r in rs)}
        for m in (HR, NDCG):
            line[m], line[m + "_std"] = mean_std([r["test"][m] for r in rs])
    for (student, variant), line in lines.items():
        ref_name = (against or {}).get(variant, None if against else "base")
        ref = lines.get((student, ref_name))
        line.update({"against": None, "change_NDCG@20": None, "seed_noise": None, "paired": None, "verdict": None})
        if ref is not None and ref is not line and ref[NDCG] > 0:
            line.update(against=ref_name, **compare(line, ref, groups[student, variant], groups[student, ref_name]))
    return list(lines.values())


def format_rows(header: list[str], rows: list[list], notes: str = "", left: tuple = (0,)) -> str:
    """The one table formatter: each column as wide as its widest cell, right-aligned but the
    columns in left; a cell is printed as given (None: empty); notes follow the table."""
    cells = [[("" if c is None else str(c)) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in cells]
    return "\n".join(text + ([notes] if notes else []))


def pm(mean: float, std: float) -> str:
    return f"{mean:.4f}±{std:.4f}"


def format_table(lines: list[dict], floor: dict | None = None) -> str:
    """The results table of summarise's lines; floor: {label: metrics} rows printed first
    (popularity, teacher)."""
    rows = [[label, None, f"{m[HR]:.4f}", f"{m[NDCG]:.4f}"] for label, m in (floor or {}).items()]
    for l in lines:
        change = f"{100 * l['change_NDCG@20']:+.1f}% vs {l['against']}" if l["change_NDCG@20"] is not None else None
        rows.append([f"{l['student']} {l['variant']}", l["seeds"], pm(l[HR], l[HR + "_std"]), pm(l[NDCG], l[NDCG + "_std"]),
                     change, l.get("seed_noise"), f"{l['paired']['p']:.4f}" if l.get("paired") else None,
                     (l["verdict"] or "") + ("" if l["converged"] else " (not converged: epoch cap)")])
    return format_rows(["", "seeds", HR, NDCG, "change in NDCG@20", "seeds say", "paired p", "verdict"], rows, left=(0, 4, 5, 7), notes=
                       "test metrics at the epoch of best validation NDCG@20, mean ± std over seeds. A change is a gain "
                       "or a loss only when both agree: beyond twice the combined std of the seeds, and paired p < "
                       f"{P_LEVEL} (Wilcoxon signed-rank over the test rows, per-row NDCG@20 averaged over seeds)")
