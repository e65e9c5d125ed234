"""HR@k and NDCG@k from the 0-based rank of each row's one target (the paper's protocol: full
ranking over all items, k in CUTOFFS, @20 reported in its Table 5). Written once: the students'
evaluation, the teacher's own metrics and the paired test's per-row NDCG all come from here."""
from __future__ import annotations

import numpy as np

CUTOFFS = (5, 10, 20)   # the k of HR@k and NDCG@k
REPORTED = 20           # the k of the tables (the paper's Table 5)


def ndcg_per_row(ranks, k: int = REPORTED) -> np.ndarray:
    """NDCG@k of each row: 1/log2(rank + 2) if rank < k, else 0 (one relevant item). [N] -> [N]"""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < k, 1 / np.log2(ranks + 2), 0.0)


def metrics_from_ranks(ranks, ks=CUTOFFS) -> dict:
    """ranks [N] (0-based) -> {"HR@k": share of rows with rank < k, "NDCG@k": mean NDCG@k}."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {}
    for k in ks:
        out[f"HR@{k}"] = float((ranks < k).mean()) if len(ranks) else 0.0
        out[f"NDCG@{k}"] = float(ndcg_per_row(ranks, k).mean()) if len(ranks) else 0.0
    return out
