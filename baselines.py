"""The distillation baselines of the paper's Table 5, each a loss on DLLM2Rec's own inputs:
`train --kd rd|cd|rrd|dcd|unkd|hint|htd` (dllm2rec.py is the paper's method; this module is the
comparison). The paper: "For fair comparisons, we integrated these methods into ... GRU4Rec,
SASRec and DROS ... we closely followed the settings suggested by their original papers."

The loss of a batch is then L_base (+ alpha L_DRO) + lam * L_kd; lam is the baseline's weight
(chosen on validation with `--lams`, as DLLM2Rec's is). A ranking baseline keeps the student's own
item embeddings (no embedding distillation) and an embedding baseline has no ranking term, as in
the paper's Table 5. The inputs, per training row b of a batch of B:

    c [B, K]: the teacher's top-K items, nearest first;  d [B, K]: their distances (smaller:
    nearer), so the teacher's score of c_r is -d_r;  s_all [B, n]: the student's scores of every
    item;  covered [B]: rows the teacher ran on (the others add 0 to the batch mean);
    z [n, d_t]: the teacher's item features, divided by their root mean square (one scalar) so
    that a weight means the same for any teacher.

Every method was written for a teacher that scores every item (CD, DCD, UnKD sample from that
ranking) and for user/item embeddings; the teacher here gives a top-K list per row and item
features, as BIGRec gives the DLLM2Rec authors. Each docstring says how its method reads that
input and where it differs from github.com/woriazzc/KDs (read as a check, not copied). Sampling
is per batch (the KDs code samples once per epoch); the student's rank of an item is exact here
(RD estimated it from 100 samples)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("dllm2rec", "rd", "cd", "rrd", "dcd", "unkd", "hint", "htd")
RANKING, EMBEDDING = ("rd", "cd", "rrd", "dcd", "unkd"), ("hint", "htd")

# each method's settings from its paper or its authors' code (KDs' configs where the paper is silent)
RD_T, RD_MU = 1.0, 0.1                 # position sharpness lambda, ranking-discrepancy sharpness mu (RD's code)
CD_T, CD_T1, CD_T2, CD_PICKS = 20.0, 2.0, 0.0, 2   # rank-sampling temperature, soft-label scale and shift, items
RRD_L = 200                            # uninteresting items per row (KDs' rrd_L)
DCD_T, DCD_SHARE = 10.0, 0.2           # discrepancy temperature; items sampled per side: 100 of 500 in DCD
UNKD_GROUPS, UNKD_PAIRS = 2, 2         # popularity groups; pairs per row, spread evenly over the groups
HTD_EXPERTS, HTD_ALPHA, HTD_TAU = 30, 0.9, 0.1   # groups (experts), TD's share against GA, Gumbel temperature


# ============================================================================ shared pieces
def student_rank(s_all: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """0-based rank of each of items [B, m] in the student's scores s_all [B, n]: how many items
    score higher. -> [B, m]"""
    s = s_all.gather(1, items)                                             # [B, m]
    return (s_all.unsqueeze(1) > s.unsqueeze(2)).sum(2)                    # [B, m]


def relaxed_ranking(s_ranked: torch.Tensor, s_below: torch.Tensor) -> torch.Tensor:
    """The relaxed list-wise loss of RRD (and DCD), per row: the items of s_ranked [B, k] in their
    order above every item of s_below [B, l] (-inf: left out), the order among s_below ignored:
    -sum_r [s_r - log(sum_{r' >= r} exp s_r' + sum_u exp s_u)].  -> [B]"""
    tail = torch.logcumsumexp(s_ranked.flip(1), dim=1).flip(1)             # [B, k]: log sum_{r' >= r} exp
    below = torch.logsumexp(s_below, dim=1, keepdim=True)                  # [B, 1]
    return -(s_ranked - torch.logaddexp(tail, below)).sum(1)


def gumbel_like(x: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(torch.rand_like(x).clamp(1e-20, 1.0)))


def rank_biased_pick(logits: torch.Tensor, n: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """n distinct column indices per row, drawn in turn without replacement with probability
    softmax(logits) over the valid columns (the Gumbel top-n); past a row's valid columns its
    first pick repeats (a row with none: the caller masks it). -> [B, n]"""
    logits = logits if valid is None else logits.masked_fill(~valid, -math.inf)
    keys = logits + gumbel_like(logits)
    picks = keys.topk(n, dim=1).indices
    return torch.where(keys.gather(1, picks) > -math.inf, picks, picks[:, :1])


# ============================================================================ the ranking methods
def rd_weights(rank_s: torch.Tensor, T: float = RD_T, mu: float = RD_MU) -> torch.Tensor:
    """RD's hybrid weight of each candidate (Tang & Wang, KDD 2018, Eqs. 8-9): the position weight
    w_r = exp(-r / lambda) (r = 1..K, normalised) times the ranking-discrepancy weight
    tanh(max(mu (rank_S(c_r) - (r - 1)), 0)), renormalised over the row: candidates the student
    already ranks above the teacher's position weigh 0. rank_s [B, K]: the student's 0-based ranks.
    Differences: RD starts the discrepancy weight after 10 epochs; here from the first step."""
    K = rank_s.shape[1]
    r = torch.arange(1, K + 1, device=rank_s.device, dtype=torch.float32)
    static = torch.softmax(-r / T, dim=0)                                  # [K]
    dynamic = torch.tanh((mu * (rank_s.float() - (r - 1))).clamp(min=0))  # [B, K]
    return F.normalize(static * dynamic, p=1, dim=1)


def rd_loss(s_cand: torch.Tensor, rank_s: torch.Tensor) -> torch.Tensor:
    """RD: the teacher's top-K as positives, -sum_r w_r log sigmoid(s_{c_r}), w (rd_weights)
    treated as constants. s_cand [B, K]. -> [B]"""
    return (rd_weights(rank_s).detach() * F.softplus(-s_cand)).sum(1)


def cd_loss(s_pick: torch.Tensor, d_pick: torch.Tensor, t1: float = CD_T1, t2: float = CD_T2) -> torch.Tensor:
    """CD (Lee et al., 2019, collaborative distillation): the student's score of each sampled item
    against the teacher's soft label y = sigmoid((score_T + t2) / t1), score_T = -d, by binary
    cross-entropy, summed over the sampled items. s_pick, d_pick [B, m]. -> [B]
    CD was written for a teacher's logits (a BPR model's: 0 is neutral); a distance teacher's
    score -d is below 0 for every item, so every label is below 1/2: with the model teacher
    (d about 6) y is about .05, and CD tells the student that the teacher's top items are
    irrelevant. t2 is CD's own shift for such a scale; here it is KDs' 0, not tuned (RESULTS)."""
    y = torch.sigmoid((-d_pick + t2) / t1)
    return (y * F.softplus(-s_pick) + (1 - y) * F.softplus(s_pick)).sum(1)


def cd_sample(s_cand: torch.Tensor, m: int = CD_PICKS, T: float = CD_T) -> torch.Tensor:
    """CD's student-guided rank-aware sampling, on the teacher's top-K (the only items with a
    teacher score here): m candidates per row, drawn with probability proportional to
    exp(-rho / (K T)), rho the candidate's 1-based place in the student's order of the K.
    Difference: CD keeps the student's better of two draws until m distinct are found; here a
    draw without replacement from the same distribution. -> column indices [B, m]"""
    K = s_cand.shape[1]
    rho = s_cand.argsort(1, descending=True).argsort(1) + 1                # [B, K]
    return rank_biased_pick(-rho.float() / (K * T), min(m, K))


def rrd_loss(s_cand: torch.Tensor, s_other: torch.Tensor) -> torch.Tensor:
    """RRD (Kang et al., CIKM 2020, DE-RRD): the teacher's top-K, in its order, above L items it
    did not recommend, order among those ignored (relaxed_ranking). s_cand [B, K]; s_other [B, L]:
    the student's scores of the uninteresting items (-inf where a draw hit a candidate or the row's
    target). Difference: RRD samples K of its teacher's top 500 by rank; the whole top-K here."""
    return relaxed_ranking(s_cand, s_other)


def uninteresting(c: torch.Tensor, target: torch.Tensor, n_items: int, L: int = RRD_L) -> tuple:
    """L uniform draws per row and whether each may serve (neither a candidate nor the target)."""
    u = torch.randint(0, n_items, (c.shape[0], L), device=c.device)         # [B, L]
    ok = ~((u.unsqueeze(2) == c.unsqueeze(1)).any(2) | (u == target.unsqueeze(1)))
    return u, ok


def dcd_probs(rank_s: torch.Tensor, T: float = DCD_T) -> tuple[torch.Tensor, torch.Tensor]:
    """DCD's sampling weights (Lee & Kim, 2021) over the teacher's top-K: under-estimated items
    (the student ranks them below the teacher's place) max(tanh(max((rank_S - rank_T) / T, 0)),
    1e-5), over-estimated ones the same with the difference reversed. -> (under, over) [B, K]"""
    rank_t = torch.arange(rank_s.shape[1], device=rank_s.device)
    diff = (rank_s - rank_t).float() / T
    return torch.tanh(diff.clamp(min=0)).clamp(min=1e-5), torch.tanh((-diff).clamp(min=0)).clamp(min=1e-5)


def dcd_sample(rank_s: torch.Tensor, share: float = DCD_SHARE, T: float = DCD_T) -> tuple:
    """k = round(share K) under- and k over-estimated candidates per row (column indices, the
    under-estimated sorted by the teacher's rank). -> (under [B, k], over [B, k])"""
    k = max(1, round(share * rank_s.shape[1]))
    under, over = dcd_probs(rank_s, T)
    return rank_biased_pick(under.log(), k).sort(1).values, rank_biased_pick(over.log(), k)


def dcd_loss(s_under: torch.Tensor, s_over: torch.Tensor) -> torch.Tensor:
    """DCD, its user side: the under-estimated items, in the teacher's order, ranked above the
    over-estimated ones (relaxed_ranking). Differences: the item side (an item's ranking over the
    rows) needs the teacher's score of an item for rows that did not list it, which a top-K list
    does not have: left out; KDs keeps the under-estimated items in draw order. -> [B]"""
    return relaxed_ranking(s_under, s_over)


def popularity_groups(train_targets: np.ndarray, n_items: int, groups: int = UNKD_GROUPS) -> np.ndarray:
    """UnKD's item groups (Chen et al., WSDM 2023): items by training-target count, most popular
    first, cut into `groups` runs of about equal total count. -> group of each item [n_items]"""
    counts = np.bincount(train_targets, minlength=n_items)
    order = np.argsort(-counts, kind="stable")
    share = np.cumsum(counts[order]) / max(counts.sum(), 1)                 # [n]
    group = np.empty(n_items, np.int64)
    group[order] = np.minimum((share * groups - 1e-9).clip(min=0).astype(np.int64), groups - 1)
    return group


def unkd_pairs(c: torch.Tensor, group: torch.Tensor, pairs: int = UNKD_PAIRS) -> tuple:
    """UnKD's pairs, within a popularity group (so the ranking distilled is free of popularity
    across groups): per row, pairs // groups per group of (i, j), i one of the row's candidates in
    the group (rank-biased: exp(-(1 + r) / 20), r its place among them), j a random item of the
    group that the teacher did not list (so ranked below i). -> (i, j, valid) [B, pairs]
    Difference: UnKD ranks every item of a group by the teacher's score and draws both items by
    rank; a top-K list ranks only its candidates, so j is any unlisted item of the group."""
    G, B = int(group.max()) + 1, c.shape[0]
    per = max(1, pairs // G)
    i, j, valid = [], [], []
    in_group = group[c]                                                     # [B, K]
    for g in range(G):
        members = (group == g).nonzero().squeeze(1)                         # [n_g]
        has = in_group == g                                                 # [B, K]
        r = has.cumsum(1) - 1                                               # place among the group's candidates
        pick = rank_biased_pick(-(1 + r.float()) / 20, per, has)
        i.append(c.gather(1, pick))
        jj = members[torch.randint(0, len(members), (B, per), device=c.device)]
        j.append(jj)
        valid.append(has.any(1, keepdim=True) & ~(jj.unsqueeze(2) == c.unsqueeze(1)).any(2))
    return torch.cat(i, 1), torch.cat(j, 1), torch.cat(valid, 1)


def unkd_loss(s_i: torch.Tensor, s_j: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """UnKD: -log sigmoid(s_i - s_j) averaged over a row's valid pairs (0 for a row with none).
    s_i, s_j, valid [B, P]. -> [B]"""
    loss = F.softplus(-(s_i - s_j)) * valid
    return loss.sum(1) / valid.sum(1).clamp(min=1)


# ============================================================================ the embedding methods
class Hint(nn.Module):
    """Hint (FitNets, Romero et al., ICLR 2015; the paper's Hint baseline): the student's item
    embeddings e_i, through a learnable linear regressor W, regress onto the teacher's item
    features: L = mean over B random items of ||z_i - W e_i||^2. Difference: KDs' projector is an
    MLP with dropout and also regresses user embeddings (a sequential student has none)."""

    def __init__(self, dim: int, z: torch.Tensor):
        super().__init__()
        self.register_buffer("z", z, persistent=False)                      # [n, d_t]
        self.W = nn.Linear(dim, z.shape[1])

    def loss(self, e: torch.Tensor, items: torch.Tensor) -> torch.Tensor:  # e [m, dim], items [m] -> scalar
        return (self.z[items] - self.W(e)).pow(2).sum(1).mean()


class HTD(nn.Module):
    """HTD (Kang et al., KDD 2021, hierarchical topology distillation) on the items of a batch:
    - group assignment (GA): a selection net v(z) = softmax(Linear(z)) over E groups; each group
      an expert MLP f_e: dim -> (dim + d_t) / 2 -> d_t; the student's e_i through the experts,
      mixed by a Gumbel-softmax of v(z_i) at temperature tau, regresses onto z_i (squared error);
    - topology distillation (TD, HTD's "Group(P, e)" form): with hard groups argmax v(z_i), the
      cosine similarity of every pair in one group (where the teacher's is > 0) and of each group
      prototype (the group's mean embedding, a constant) with every item, student against teacher.
    L = alpha TD + (1 - alpha) GA, each a sum over the batch's items, divided by their number.
    Differences: HTD anneals tau from 1 per epoch (no epoch reaches the loss here: fixed, as
    KDs' config value) and also distils users (a sequential teacher here has none)."""

    def __init__(self, dim: int, z: torch.Tensor, experts: int = HTD_EXPERTS):
        super().__init__()
        d_t = z.shape[1]
        self.register_buffer("z", z, persistent=False)
        self.f = nn.ModuleList(nn.Sequential(nn.Linear(dim, (dim + d_t) // 2), nn.ReLU(), nn.Linear((dim + d_t) // 2, d_t))
                               for _ in range(experts))
        self.v = nn.Linear(d_t, experts)

    def loss(self, e: torch.Tensor, items: torch.Tensor, alpha: float = HTD_ALPHA, tau: float = HTD_TAU):
        t = self.z[items]                                                   # [m, d_t]
        sel = torch.softmax(self.v(t), dim=1)                               # [m, E]
        mix = torch.softmax(((sel + 1e-10).log() + gumbel_like(sel)) / tau, dim=1)   # [m, E]
        f_hat = torch.einsum("me,emd->md", mix, torch.stack([f(e) for f in self.f]))
        ga = (t - f_hat).pow(2).sum(1).sum()
        return (alpha * topology(e, t, sel.argmax(1).detach()) + (1 - alpha) * ga) / len(items)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


def topology(s: torch.Tensor, t: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """HTD's TD term: s [m, dim], t [m, d_t] of the same m items, group [m]. -> scalar"""
    Z = F.one_hot(group).float()                                            # [m, G]
    same = Z @ Z.T                                                          # [m, m]: 1 within a group
    ct = cosine(t, t) * same
    keep = ct > 0
    entity = ((cosine(s, s) * same - ct)[keep]).pow(2).sum()
    with torch.no_grad():
        present = Z.sum(0) > 0
        mean = (Z / Z.sum(0).clamp(min=1)).T                                # [G, m]
        P_s, P_t = (mean @ s)[present], (mean @ t)[present]
    return entity + (cosine(P_s, s) - cosine(P_t, t)).pow(2).sum()


def make_head(method: str, dim: int, z: torch.Tensor | None) -> nn.Module | None:
    """The learnable part of an embedding method (the student owns it: its optimizer trains it)."""
    if method not in EMBEDDING:
        return None
    z = z.float() / z.float().pow(2).mean().sqrt().clamp(min=1e-12)
    return Hint(dim, z) if method == "hint" else HTD(dim, z)


# ============================================================================ one method's loss of a batch
def kd_loss(method: str, model, h: torch.Tensor, target: torch.Tensor, neg: torch.Tensor,
            c: torch.Tensor | None, d: torch.Tensor | None, covered: torch.Tensor | None) -> torch.Tensor:
    """L_kd of one batch (before lam): h [B, dim] the student's states; target, neg [B]; c, d,
    covered: the teacher's top-K, distances and covered rows (ranking methods)."""
    if method in EMBEDDING:
        head = model.kd_head
        items = (torch.randint(0, model.n_items, target.shape, device=target.device) if method == "hint"
                 else torch.cat([target, neg]).unique())       # Hint: random items (KDs); HTD: the batch's items
        return head.loss(model.embed(items), items)
    s_all = model.score_all(h)                                              # [B, n]
    s_cand = s_all.gather(1, c)                                             # [B, K]
    if method == "rd":
        per_row = rd_loss(s_cand, student_rank(s_all, c).detach())
    elif method == "cd":
        pick = cd_sample(s_cand.detach())
        per_row = cd_loss(s_cand.gather(1, pick), d.gather(1, pick))
    elif method == "rrd":
        u, ok = uninteresting(c, target, model.n_items)
        per_row = rrd_loss(s_cand, s_all.gather(1, u).masked_fill(~ok, -math.inf))
    elif method == "dcd":
        under, over = dcd_sample(student_rank(s_all, c).detach())
        per_row = dcd_loss(s_cand.gather(1, under), s_cand.gather(1, over))
    elif method == "unkd":
        i, j, valid = unkd_pairs(c, model.kd_groups)
        per_row = unkd_loss(s_all.gather(1, i), s_all.gather(1, j), valid)
    else:
        raise ValueError(f"unknown distillation method {method!r}; choose from {', '.join(METHODS)}")
    keep = torch.ones_like(per_row) if covered is None else covered.to(per_row.dtype)
    return (per_row * keep).mean()                                         # uncovered rows: 0
