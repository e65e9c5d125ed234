"""The diagnostics' teachers, each covering every training row and built from the training rows
alone (a test removes every validation and test row and finds the same outputs):

- synthetic teachers of known quality: at quality q a row's K candidates hold exactly
  round(q K) good ones, the items that most often follow the row's last item in the training
  rows (the quality-1 ranking), and K - round(q K) random items outside that ranking; their
  confidence is *honest* (random candidates get larger distances and sort below the good ones)
  or *flat* (one distance distribution for both, at random ranks: neither w_p nor w_c can tell
  them apart, only w_o can). Item features: the top singular vectors of the training transition
  counts, mixed with noise in the proportion 1 - q;
- the mixed teacher: quality 1 on a random half of the rows, quality 0 on the rest;
- the retrieval teacher: a real teacher of what the LLM knows about titles, not BIGRec's
  generation: each row's candidates are the items nearest in L2 to the recency-weighted mean of
  its history items' LLM title embeddings z_i (the z_i of the embedding distillation), its own
  history left out, with those distances as its confidence.
"""
from __future__ import annotations

import numpy as np

from cache import TeacherOutputs, TopN, checksum
from common import UserError

CONFIDENCE = ("honest", "flat")
D_SYNTHETIC = 32     # size of the synthetic teachers' item features


def transition_counts(ds) -> np.ndarray:
    """counts[a, b]: how often item b is the target of a training row whose last history item is
    a; the training rows only. [n_items, n_items]"""
    s = ds.train
    counts = np.zeros((ds.n_items, ds.n_items), np.float32)
    last = s.hist[np.arange(len(s)), np.maximum(s.lens - 1, 0)]
    np.add.at(counts, (last[s.lens > 0], s.target[s.lens > 0]), 1)
    return counts


def good_candidates(ds, counts: np.ndarray, K: int) -> np.ndarray:
    """The quality-1 ranking: per training row the K items that most often follow its last item
    (counts), popularity as a training target breaking ties; an empty history: the most popular. [N, K]"""
    pop = np.bincount(ds.train.target, minlength=ds.n_items) / len(ds.train)
    last = ds.train.hist[np.arange(len(ds.train)), np.maximum(ds.train.lens - 1, 0)]
    out = np.empty((len(ds.train), K), np.int64)
    for a in range(0, len(out), 4096):                                 # [chunk, n_items] at a time
        rows = slice(a, a + 4096)
        follows = np.where((ds.train.lens[rows] > 0)[:, None], counts[np.minimum(last[rows], ds.n_items - 1)], 0)
        out[rows] = np.argsort(-(follows + pop), axis=1, kind="stable")[:, :K]
    return out


def random_outside(g, n_items: int, taken: np.ndarray, m: int) -> np.ndarray:
    """m distinct items per row, uniformly among those not in the row of taken [N, t]. [N, m]"""
    out = np.empty((len(taken), m), np.int64)
    for a in range(0, len(taken), 4096):
        keys = g.random((len(taken[a:a + 4096]), n_items), dtype=np.float32)
        np.put_along_axis(keys, taken[a:a + 4096], np.inf, axis=1)
        out[a:a + 4096] = np.argsort(keys, axis=1, kind="stable")[:, :m]
    return out


def item_features(counts: np.ndarray, quality: float, g) -> np.ndarray:
    """The top singular vectors of log(1 + counts + counts^T), scaled to unit std, mixed with
    standard normal noise: quality * z + (1 - quality) * noise. [n_items, D_SYNTHETIC]"""
    u, sv, _ = np.linalg.svd(np.log1p(counts + counts.T), full_matrices=False)
    z = u[:, :D_SYNTHETIC] * sv[:D_SYNTHETIC]
    z = z / z.std()
    return (quality * z + (1 - quality) * g.standard_normal(z.shape)).astype(np.float32)


def check_room(ds, K: int) -> None:
    """A synthetic teacher draws up to K random items outside a row's K good ones: 2K items at least."""
    if 2 * K > ds.n_items:
        raise UserError(f"--k {K}: the synthetic teachers need 2 x --k items (K good ones and K random items "
                        f"outside them); {ds.name} has {ds.n_items}")


def n_good(quality: float, K: int) -> int:
    """round(q K), halves up."""
    return int(np.floor(quality * K + 0.5))


def synthetic_teacher(ds, quality: float, K: int, confidence: str = "honest", seed: int = 0,
                      counts: np.ndarray | None = None, good: np.ndarray | None = None) -> TeacherOutputs:
    """The module docstring's teacher of quality q over every training row: K candidates a row,
    the first round(q K) of the quality-1 ranking and random items outside it."""
    if confidence not in CONFIDENCE:
        raise ValueError(f"confidence {confidence!r}: one of {', '.join(CONFIDENCE)}")
    g = np.random.default_rng(seed)
    counts = transition_counts(ds) if counts is None else counts
    good = good_candidates(ds, counts, K) if good is None else good
    n, k = len(ds.train), n_good(quality, K)
    ids = np.concatenate([good[:, :k], random_outside(g, ds.n_items, good, K - k)], axis=1)     # [N, K]
    if confidence == "honest":      # good: 1.0, 1.1, ...; random: U(3, 4), sorted below them
        dist = np.concatenate([np.broadcast_to(1 + 0.1 * np.arange(k), (n, k)),
                               np.sort(3 + g.random((n, K - k)), axis=1)], axis=1)
    else:                           # flat: shuffled ranks, one distance distribution, sorted by rank
        ids = np.take_along_axis(ids, np.argsort(g.random((n, K)), axis=1), axis=1)
        dist = np.sort(1 + 3 * g.random((n, K)), axis=1)
    return TeacherOutputs(item_features(counts, quality, g), {"train": TopN(np.arange(n), ids, dist.astype(np.float32))},
                          {"teacher": {"kind": "synthetic", "quality": quality, "confidence": confidence}},
                          source=f"synthetic teacher, quality {quality} ({k} of {K} good), {confidence} confidence")


def mixed_teacher(ds, K: int, confidence: str = "honest", seed: int = 0) -> TeacherOutputs:
    """Right on a random half of the rows (quality 1), random advice on the others (quality 0),
    as an LLM right for some users and not for others; item features those of quality 0.5."""
    counts = transition_counts(ds)
    good = good_candidates(ds, counts, K)
    right, wrong = (synthetic_teacher(ds, q, K, confidence, seed + k, counts, good).splits["train"]
                    for k, q in enumerate((1.0, 0.0)))
    n = len(ds.train)
    oracle = np.zeros(n, bool)
    oracle[np.random.default_rng(seed).permutation(n)[:n // 2]] = True
    pick = lambda a, b: np.where(oracle[:, None], a, b)
    top = TopN(right.rows, pick(right.ids, wrong.ids), pick(right.dist, wrong.dist).astype(np.float32))
    return TeacherOutputs(synthetic_teacher(ds, 0.5, K, confidence, seed, counts, good).item_emb, {"train": top},
                          {"teacher": {"kind": "mixed", "confidence": confidence}, "right_rows": int(oracle.sum())},
                          source=f"mixed teacher: quality 1 on half the rows, random on the rest, {confidence} confidence")


# ============================================================================ the retrieval teacher
def history_embedding(split, z: np.ndarray, decay: float) -> np.ndarray:
    """The recency-weighted mean of each row's history items' z: weight decay^(age), age 0 for
    the last item (decay 1: the plain mean). Empty histories: zeros. [N, L], [n, d] -> [N, d]"""
    L = split.hist.shape[1]
    age = split.lens[:, None] - 1 - np.arange(L)                       # [N, L], < 0 at padding
    w = np.where(age >= 0, float(decay) ** np.maximum(age, 0), 0.0)
    zp = np.concatenate([z, np.zeros((1, z.shape[1]), z.dtype)])       # the pad id embeds to 0
    return np.einsum("nl,nld->nd", w, zp[split.hist]) / np.maximum(w.sum(1, keepdims=True), 1e-12)


def retrieve(split, z: np.ndarray, top_n: int, decay: float) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top_n items nearest (L2) to its history embedding, its history left out:
    ids int64 [N, top_n], distances float32 [N, top_n], nearest first."""
    h = history_embedding(split, z.astype(np.float64), decay)
    zz = (z.astype(np.float64) ** 2).sum(1)
    ids, dist = np.empty((len(h), top_n), np.int64), np.empty((len(h), top_n), np.float32)
    for a in range(0, len(h), 2048):
        d2 = (h[a:a + 2048] ** 2).sum(1, keepdims=True) + zz - 2 * h[a:a + 2048] @ z.T.astype(np.float64)
        hist = split.hist[a:a + 2048]
        r, c = np.nonzero(hist < len(z))                              # real history items: never candidates
        d2[r, hist[r, c]] = np.inf
        top = np.argsort(d2, axis=1, kind="stable")[:, :top_n]
        ids[a:a + 2048], dist[a:a + 2048] = top, np.sqrt(np.maximum(np.take_along_axis(d2, top, 1), 0))
    return ids, dist


def retrieval_teacher(ds, z: np.ndarray, top_n: int, decay: float, source: str) -> TeacherOutputs:
    """The module docstring's retrieval teacher over every row of every split (validation and test:
    its own metrics only; training uses the training rows')."""
    splits = {}
    for name in ("train", "val", "test"):
        split = getattr(ds, name)
        ids, dist = retrieve(split, z, top_n, decay)
        splits[name] = TopN(np.arange(len(split)), ids, dist)
    return TeacherOutputs(z.astype(np.float32), splits, source=source)


# ============================================================================ the control: a teacher's random twin
def random_twin(t: TeacherOutputs, n_items: int, seed: int = 0) -> TeacherOutputs:
    """A teacher that knows nothing, shaped like t (SPEC 8, controls): the same rows and K, each
    row's own distances (so the same distance distribution, nearest first), but its candidates K
    distinct items drawn uniformly at random (so each distance lands on a random item, at a random
    rank of the catalogue), and item features standard normal noise rescaled to t's per-column
    mean and std (the same size and scale). Every split of t gets a twin."""
    g = np.random.default_rng(seed)
    mean, std = t.item_emb.mean(0, keepdims=True), t.item_emb.std(0, keepdims=True)
    features = (mean + std * g.standard_normal(t.item_emb.shape)).astype(np.float32)
    splits = {}
    for name, s in t.splits.items():
        ids = random_outside(g, n_items, np.zeros((len(s.rows), 0), np.int64), s.ids.shape[1])
        splits[name] = TopN(s.rows.copy(), ids, s.dist.copy())
    return TeacherOutputs(features, splits, {"teacher": {"kind": "random twin", "of": t.manifest.get("teacher", {}),
                                                         "of_checksum": checksum(t), "seed": seed}},
                          source=f"random twin of: {t.source} (random candidates, its distances, noise features)")


def mixed_of(good: TeacherOutputs, bad: TeacherOutputs, confidence: str = "honest", seed: int = 0) -> TeacherOutputs:
    """Two teachers' advice on one set of training rows: good's on a random half of the rows,
    bad's on the rest (e.g. the trained-model teacher and the harmful retrieval teacher), K the
    smaller of the two; item features good's. Distances: *honest*, a bad row's sorted above every
    good row's (good's largest distance plus the bad row's own distances less their minimum), so
    that a row's nearest candidate tells the two apart; *flat*, a bad row takes the distances of a
    random good row, so that nothing but the candidates themselves tells them apart."""
    if confidence not in CONFIDENCE:
        raise ValueError(f"confidence {confidence!r}: one of {', '.join(CONFIDENCE)}")
    a, b = good.splits["train"], bad.splits["train"]
    if not np.array_equal(a.rows, b.rows):
        raise UserError("mixed teacher: the two teachers cover different training rows")
    g = np.random.default_rng(seed)
    n, K = len(a.rows), min(a.ids.shape[1], b.ids.shape[1])
    right = np.zeros(n, bool)
    right[g.permutation(n)[:n // 2]] = True
    if confidence == "honest":
        bad_dist = a.dist[:, :K].max() + (b.dist[:, :K] - b.dist[:, :1])
    else:
        bad_dist = a.dist[g.integers(0, n, n), :K]
    ids = np.where(right[:, None], a.ids[:, :K], b.ids[:, :K])
    dist = np.where(right[:, None], a.dist[:, :K], bad_dist).astype(np.float32)
    return TeacherOutputs(good.item_emb, {"train": TopN(a.rows.copy(), ids, dist)},
                          {"teacher": {"kind": "mixed of two teachers", "confidence": confidence, "seed": seed,
                                       "good": checksum(good), "bad": checksum(bad)}, "right_rows": int(right.sum())},
                          source=f"mixed: {good.source} on half the rows, {bad.source} on the rest, {confidence} confidence")
