"""The paired test beside the seed-noise rule of the results table: per-row NDCG@20 of two
variants on the same test rows, and the Wilcoxon signed-rank test of their differences (numpy
only: its normal approximation is accurate for the thousands of rows a table pairs)."""
from __future__ import annotations

import math

import numpy as np


def ndcg_per_row(ranks, k: int = 20) -> np.ndarray:
    """NDCG@k of each row from its 0-based target rank: 1/log2(rank + 2) if rank < k, else 0. [N] -> [N]"""
    ranks = np.asarray(ranks, dtype=float)
    return np.where(ranks < k, 1 / np.log2(ranks + 2), 0.0)


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
