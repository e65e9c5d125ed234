"""From runs to a table: mean and std over seeds, the paired test (the Wilcoxon signed-rank
test of NDCG@20 over users, or over rows where the data has no users; numpy only: its normal
approximation is accurate for the hundreds of users or thousands of rows a table pairs),
Holm's correction over a table's comparisons, the verdict that needs the test and the seeds to
agree, and the one table formatter that every command's table goes through."""
from __future__ import annotations

import math
from itertools import combinations

import numpy as np

from metrics import REPORTED, ndcg_per_row


def signed_rank_test(d) -> dict:
    """Wilcoxon signed-rank test of paired differences d [N], two-sided, normal approximation:
    zero differences dropped (m rows remain), tied |d| given their average rank,
        W+ = sum of the ranks of the positive d,
        z = (W+ - m(m+1)/4) / sqrt(m(m+1)(2m+1)/24 - sum_ties (t^3 - t)/48),  p = erfc(|z| / sqrt 2).
    The approximation is accurate for m above ~50 (ML-100K's test rows hold 166 users).
    d is rounded to 12 decimals first, so that differences equal up to float rounding tie."""
    d = np.round(np.asarray(d, dtype=float), 12)
    d = d[d != 0]
    m = len(d)
    if m == 0:
        return {"pairs": 0, "W+": 0.0, "z": 0.0, "p": 1.0}
    a = np.abs(d)
    values, ties = np.unique(a, return_counts=True)                               # sorted distinct |d|, their counts
    avg_rank = np.cumsum(ties) - (ties - 1) / 2                                   # 1-based average rank per value
    rank = avg_rank[np.searchsorted(values, a)]                                   # [m]
    w_plus = float(rank[d > 0].sum())
    var = m * (m + 1) * (2 * m + 1) / 24 - float((ties.astype(float) ** 3 - ties).sum()) / 48
    z = (w_plus - m * (m + 1) / 4) / math.sqrt(var) if var > 0 else 0.0
    return {"pairs": m, "W+": w_plus, "z": z, "p": math.erfc(abs(z) / math.sqrt(2))}


def per_user_mean(x: np.ndarray, users: np.ndarray) -> np.ndarray:
    """The mean of x [N] over each user's rows, for the users that have rows: [N], [N] -> [U]."""
    counts = np.bincount(users)
    return (np.bincount(users, weights=x) / np.maximum(counts, 1))[counts > 0]


def paired_test(runs_a: list[dict], runs_b: list[dict], users: np.ndarray | None = None) -> dict | None:
    """a against b on the same test rows: each row's NDCG@20 averaged over each side's seeds, then
    the signed-rank test of the differences, over users where the data has them (each user's
    mean difference over its rows: a user's overlapping windows are not independent), else over
    rows. None when a run carries no per-row ranks."""
    if not all("test_ranks" in r for r in runs_a + runs_b):
        return None
    mean_a, mean_b = (np.mean([ndcg_per_row(r["test_ranks"]) for r in rs], axis=0) for rs in (runs_a, runs_b))
    if users is None:
        return {**signed_rank_test(mean_a - mean_b), "unit": "rows"}
    return {**signed_rank_test(per_user_mean(mean_a - mean_b, users)), "unit": "users"}


def seed_bootstrap_test(runs_a: list[dict], runs_b: list[dict], users: np.ndarray, draws: int = 4000,
                        seed: int = 0) -> dict:
    """A seed-aware paired test of a against b: a bootstrap over the seeds of each side and over
    users. Each draw takes each side's seeds with replacement (as many as it has) and the users
    with replacement, and computes the difference of the two sides' mean NDCG@20 over the drawn
    users (each user's NDCG@20 averaged over its test rows, then over the drawn seeds). p = twice
    the smaller share of draws on either side of 0 (at most 1); z: the observed difference over
    the draws' std. The Wilcoxon test over users holds the seeds fixed; this one lets them vary."""
    per_user = lambda rs: np.stack([per_user_mean(np.asarray(ndcg_per_row(r["test_ranks"])), users) for r in rs])
    a, b = per_user(runs_a), per_user(runs_b)                                   # [seeds, U]
    g = np.random.default_rng(seed)
    u = a.shape[1]
    users_drawn = np.stack([np.bincount(row, minlength=u) for row in g.integers(0, u, (draws, u))])   # [draws, U]
    def side(x):
        seeds_drawn = np.stack([np.bincount(row, minlength=len(x)) for row in g.integers(0, len(x), (draws, len(x)))])
        return ((seeds_drawn @ x) * users_drawn).sum(1) / (len(x) * u)          # [draws]
    d = side(a) - side(b)
    observed = float(a.mean() - b.mean())
    p = min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean()))
    return {"p": float(p), "z": float(observed / d.std()) if d.std() > 0 else 0.0, "draws": draws, "unit": "seeds and users"}


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down correction of m p-values: the i-th smallest becomes
    max_{j <= i} min(1, (m - j + 1) p_(j)), in the input's order."""
    order = np.argsort(ps, kind="stable")
    m, out, running = len(ps), [0.0] * len(ps), 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (m - j) * ps[i]))
        out[i] = running
    return out


# ============================================================================ seeds, verdicts, tables
P_LEVEL = 0.05   # the paired test's level
NDCG, HR = f"NDCG@{REPORTED}", f"HR@{REPORTED}"


def mean_std(xs):
    xs = np.asarray(xs, dtype=float)
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


def verdict(mean_d: float, std_d: float, mean_b: float, std_b: float, seeds: int, p: float | None = None,
            z: float | None = None) -> str:
    """A gain (or loss) only beyond twice the combined standard deviation of the two means' seeds
    and, where the paired test ran, with its (corrected) p below P_LEVEL in the direction of its
    statistic z: both must agree, or the change is within noise (tests disagree: they point
    opposite ways)."""
    if seeds < 2:
        return "1 seed: no noise estimate"
    noise = 2 * math.hypot(std_d, std_b)
    if abs(mean_d - mean_b) <= noise or (p is not None and p >= P_LEVEL):
        return "within noise"
    up = mean_d > mean_b
    if z is not None and (z > 0) != up:
        return "tests disagree"
    return "gain" if up else "loss"


def compare(line: dict, ref: dict, runs: list[dict], ref_runs: list[dict], users=None) -> dict:
    """line (a summary line) against ref: the change in NDCG@20, the seeds' verdict and the paired
    test (over users where there are users); `correct` adds the corrected p and the verdict."""
    seeds = min(line["seeds"], ref["seeds"])
    means = (line[NDCG], line[NDCG + "_std"], ref[NDCG], ref[NDCG + "_std"], seeds)
    return {"change_NDCG@20": line[NDCG] / ref[NDCG] - 1 if ref[NDCG] > 0 else None,
            "seed_noise": verdict(*means) if seeds > 1 else "1 seed", "paired": paired_test(runs, ref_runs, users),
            "verdict": None, "_means": means}


def correct(comparisons: list[dict], declared: dict[str, int] | None = None) -> None:
    """Holm's correction within each comparison's family (its "family": a claim declared before
    its runs; one family, the table's, where none is named), then each one's verdict from the
    corrected p and the statistic's direction. declared: {family: its declared number of
    comparisons}; where fewer are measured, the others count as p = 1, so the corrected p are
    upper bounds on what the complete family will give (family_size: the declared number)."""
    for family in dict.fromkeys(c.get("family") for c in comparisons):
        tested = [c for c in comparisons if c.get("family") == family and c["paired"]]
        size = max(len(tested), (declared or {}).get(family, 0))
        ps = holm([c["paired"]["p"] for c in tested] + [1.0] * (size - len(tested)))
        for c, p in zip(tested, ps):
            c["paired"]["p_holm"], c["paired"]["family_size"], c["paired"]["family_measured"] = p, size, len(tested)
    for c in comparisons:
        means, pair = c.pop("_means"), c["paired"]
        c["verdict"] = verdict(*means, pair["p_holm"], pair["z"]) if pair else verdict(*means)


def summarise(runs: list[dict], against: dict | None = None, users: np.ndarray | None = None,
              corrected: bool = True) -> list[dict]:
    """One line per (student, variant): mean and std over seeds; for a variant with a reference
    (against: {variant: reference variant}; default: every variant against "base") its change in
    NDCG@20, the paired test (users: the user of each test row, else rows are the unit), Holm's
    correction over the lines' tests, and whether the change is a gain or a loss (corrected:
    False leaves the correction and verdicts to a caller whose table holds more comparisons)."""
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
        cfg, line["lam"], line["lam_grid"] = rs[0]["config"], None, None
        if cfg.get("distilled") and cfg.get("ablation") != "no_rank":   # the lam L_rank acted with, and how it was set
            line["lam"], line["lam_grid"] = cfg.get("lam"), rs[0].get("lam_grid")
    for (student, variant), line in lines.items():
        ref_name = (against or {}).get(variant, None if against else "base")
        ref = lines.get((student, ref_name))
        line.update({"against": None, "change_NDCG@20": None, "seed_noise": None, "paired": None, "verdict": None})
        if ref is not None and ref is not line and ref[NDCG] > 0:
            line.update(against=ref_name, **compare(line, ref, groups[student, variant], groups[student, ref_name], users))
    if corrected:
        correct([l for l in lines.values() if l["against"]])
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


def lam_cell(line: dict) -> str | None:
    """The lam a line's ranking term acted with: "0.3 (val)" where chosen on validation from a grid,
    "0.7" where fixed; None where L_rank is off."""
    if line.get("lam") is None:
        return None
    return f"{line['lam']:g}" + (" (val)" if line.get("lam_grid") else "")


def format_table(lines: list[dict], floor: dict | None = None) -> str:
    """The results table of summarise's lines; floor: {label: metrics} rows printed first
    (popularity, teacher)."""
    rows = [[label, None, None, f"{m[HR]:.4f}", f"{m[NDCG]:.4f}"] for label, m in (floor or {}).items()]
    for l in lines:
        change = f"{100 * l['change_NDCG@20']:+.1f}% vs {l['against']}" if l["change_NDCG@20"] is not None else None
        rows.append([f"{l['student']} {l['variant']}", lam_cell(l), l["seeds"], pm(l[HR], l[HR + "_std"]),
                     pm(l[NDCG], l[NDCG + "_std"]),
                     change, l.get("seed_noise"), f"{l['paired']['p_holm']:.4f}" if l.get("paired") else None,
                     (l["verdict"] or "") + ("" if l["converged"] else " (not converged: epoch cap)")])
    unit = next((l["paired"]["unit"] for l in lines if l.get("paired")), None)
    over = {"users": " over users (each user's NDCG@20 averaged over its test rows and the seeds)",
            "rows": " over test rows (the data has no users; per-row NDCG@20 averaged over seeds)", None: ""}[unit]
    return format_rows(["", "lam", "seeds", HR, NDCG, "change in NDCG@20", "seeds say", "p (Holm)", "verdict"], rows,
                       left=(0, 5, 6, 8), notes=(
                           "test metrics at the epoch of best validation NDCG@20, mean ± std over seeds; lam: L_rank's "
                           "weight, (val): chosen from a grid on validation NDCG@20. A change is a "
                           "gain or a loss only when both agree, in the test statistic's direction: beyond twice the "
                           f"combined std of the seeds, and p < {P_LEVEL} after Holm's correction over the table's "
                           f"comparisons (Wilcoxon signed-rank{over})"))


# ============================================================================ the rule's own false-positive rate
def false_positive_rate(runs: list[dict], users: np.ndarray | None = None) -> dict:
    """The verdict rule on runs of ONE configuration that differ only in the seed (2m runs): every
    split into two groups of m seeds (each unordered split once), one group against the other as
    a table compares two lines (one comparison: no correction). Any gain or loss is a false
    positive. -> {"splits", "rule": share of splits called a gain or a loss, "paired alone": share
    with paired p < P_LEVEL, "seeds alone": share beyond twice the combined std; with users, "rule,
    bootstrap" and "bootstrap alone": the same with seed_bootstrap_test in the Wilcoxon test's place}."""
    n = len(runs) - len(runs) % 2
    m = n // 2
    hits = {"rule": 0, "paired alone": 0, "seeds alone": 0, "rule, bootstrap": 0, "bootstrap alone": 0}
    splits = [a for a in combinations(range(n), m) if 0 in a]           # group a holds seed 0: each split once
    for a in splits:
        ga, gb = [runs[i] for i in a], [runs[i] for i in range(n) if i not in a]
        (ma, sa), (mb, sb) = (mean_std([r["test"][NDCG] for r in g]) for g in (ga, gb))
        pair = paired_test(ga, gb, users)
        hits["rule"] += verdict(ma, sa, mb, sb, m, pair["p"], pair["z"]) in ("gain", "loss")
        hits["paired alone"] += pair["p"] < P_LEVEL
        hits["seeds alone"] += verdict(ma, sa, mb, sb, m) in ("gain", "loss")
        if users is not None:                                            # the seed-aware test in the rule's place
            boot = seed_bootstrap_test(ga, gb, users)
            hits["rule, bootstrap"] += verdict(ma, sa, mb, sb, m, boot["p"], boot["z"]) in ("gain", "loss")
            hits["bootstrap alone"] += boot["p"] < P_LEVEL
    return {"splits": len(splits), "seeds": n, **{k: v / max(len(splits), 1) for k, v in hits.items()}}
