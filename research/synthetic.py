"""Synthetic teachers of known quality for the diagnostics: built from item-to-next-item
transition counts over ALL rows (validation and test included: they see held-out data), with
random candidates mixed in. The storage of real teachers' outputs is cache.py's."""
from __future__ import annotations

import numpy as np

from cache import TeacherOutputs, TopN


def transition_counts(ds) -> np.ndarray:
    """counts[a, b]: how often item b directly follows item a over ALL rows, validation and test
    included: what a teacher that knows the held-out transitions knows. [n_items, n_items]"""
    counts = np.zeros((ds.n_items, ds.n_items), np.float32)
    for s in (ds.train, ds.val, ds.test):
        last = s.hist[np.arange(len(s)), np.maximum(s.lens - 1, 0)]
        np.add.at(counts, (last[s.lens > 0], s.target[s.lens > 0]), 1)
    return counts


SYNTHETIC_TOP_N = 20   # candidates per row of the diagnostic teachers


def synthetic_teacher(ds, quality: float, counts: np.ndarray, top_n: int = SYNTHETIC_TOP_N, d_llm: int = 32,
                      seed: int = 0) -> TeacherOutputs:
    """A DIAGNOSTIC teacher of known quality that sees held-out data. Quality 1: each training
    row's candidates are the items that most often follow its last item (counts), item
    embeddings the top singular vectors of log(1 + counts + counts^T). Each candidate is then
    replaced by a uniformly random item with probability 1 - quality (a row with an empty history
    gets the most popular items), and each embedding mixed
    with noise in that proportion; replaced candidates get larger distances (an honest
    confidence), so quality 0 is a random teacher."""
    g = np.random.default_rng(seed)
    pop = np.bincount(ds.train.target, minlength=ds.n_items) / len(ds.train)
    last = ds.train.hist[np.arange(len(ds.train)), np.maximum(ds.train.lens - 1, 0)]
    follows = np.where((ds.train.lens > 0)[:, None], counts[np.minimum(last, ds.n_items - 1)], 0)  # empty history: none
    ids = np.argsort(-(follows + pop), axis=1, kind="stable")[:, :top_n]             # [N, n], popularity breaks ties
    keep = g.random(ids.shape) < quality
    ids = np.where(keep, ids, g.integers(0, ds.n_items, ids.shape))
    dist = np.where(keep, 1 + 0.1 * np.arange(top_n), 3 + g.random(ids.shape)).astype(np.float32)
    order = np.argsort(dist, axis=1, kind="stable")
    ids, dist = np.take_along_axis(ids, order, 1), np.take_along_axis(dist, order, 1)
    u, sv, _ = np.linalg.svd(np.log1p(counts + counts.T), full_matrices=False)
    z = u[:, :d_llm] * sv[:d_llm] / (u[:, :d_llm] * sv[:d_llm]).std()
    z = quality * z + (1 - quality) * g.standard_normal(z.shape)
    rows = np.arange(len(ds.train))
    return TeacherOutputs(z.astype(np.float32), {"train": TopN(rows, ids, dist)},
                                     source=f"synthetic teacher, quality {quality}")


def mixed_teacher(ds, counts: np.ndarray, seed: int = 0) -> TeacherOutputs:
    """A DIAGNOSTIC teacher that is right for some rows and hallucinates for the others, as an
    LLM may: on a random half of the training rows (rows carry no user) the quality-1 teacher's
    candidates, on the other half the random teacher's (whose larger distances make it honest
    about its confidence); item embeddings those of quality 0.5."""
    good, bad = (synthetic_teacher(ds, q, counts, seed=seed + k) for k, q in enumerate((1.0, 0.0)))
    n = len(ds.train)
    oracle = np.zeros(n, bool)
    oracle[np.random.default_rng(seed).permutation(n)[:n // 2]] = True
    pick = lambda a, b: np.where(oracle[:, None], a, b)
    g, b = good.splits["train"], bad.splits["train"]
    top = TopN(g.rows, pick(g.ids, b.ids), pick(g.dist, b.dist).astype(np.float32))
    emb = synthetic_teacher(ds, 0.5, counts, seed=seed).item_emb
    return TeacherOutputs(emb, {"train": top}, {"oracle_rows": int(oracle.sum())},
                          source="mixed teacher: quality 1 on half the rows, random on the rest")
