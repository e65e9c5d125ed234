"""DLLM2Rec (Cui et al., RecSys 2024, arXiv 2405.00338): distil an LLM recommender into a
sequential student. The whole loss of one batch of B rows, each with a target t and one
sampled negative n (the paper's method section, in the official code's conventions; where its
equation images are lost, the form is the prose's and the official code's):

    loss = L_base + alpha * L_DRO(t)                 (alpha: DROS, and any <student>+dro)
         + the student's own term                    (CL4SRec's InfoNCE: students.py)
         + lam * L_rank                              ("Importance-aware ranking distillation")
    L_base = (mean_b -log sig(s_t) + mean_b -log(1 - sig(s_n))) / 2      (BCE, one mean over 2B logits)
    L_rank = sum_r mean_b w_r * (-log sig(s_{c_r}) - log(1 - sig(s_n)) [+ alpha * L_DRO(c_r)])
    w_r = normalize_r(gamma_p w_p + gamma_c w_c + gamma_o w_o)     (the three weights combined)
    w_p = exp(-r) / Z (position-aware),  w_c = softmax_r(-d_r) (confidence-aware),
    w_o = 1[c_r in the student's top-K] (consistency-aware)
    L_DRO(t) = log sum_j exp(ps_j (y_j - 1[j = t])^2 / beta)          (DROS, Yang et al. 2023)
    ps_j = ((c_j + 1) / sum_k (c_k + 1))^0.05, c_j: item j's count as a training target; beta = 1

Beyond the paper (off by default, --row-gate): each covered row's L_rank term times a gate
g_b (target_gate, confidence_gate), scaled to mean 1 over the batch's covered rows.

c_1..c_K are the teacher's top-K items (nearest first), d_r their distances. The paper's
"Collaborative embedding distillation" is the student's input layer, e_i = b_i + ed_weight * g(z_i)
(students.ItemEmbedding). Training selects the epoch on validation NDCG@20 and reports test.

The paper's comparison methods (its Table 5: RD, CD, RRD, DCD, UnKD, Hint, HTD) are baselines.py's;
`--kd` puts one in L_rank's place and the embedding distillation's.

Here: the paper's terms, Config, the training loss, the training loop and evaluation. The
defaults are the paper's method in the official code's conventions; the official_* switches
give the official code's numerics and protocol (README: differences). The commands are
cli.py's; `python dllm2rec.py` runs the single command.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

import baselines
import cache
import data
import students
from common import UserError, at_least, between, fraction, non_negative, opt, positive
from metrics import REPORTED, metrics_from_ranks
from step import Step, captured

ABLATIONS = ("no_wp", "no_wc", "no_wo", "no_weights", "no_rank", "no_embed", "no_offset")
ROW_GATES = ("off", "target", "confidence")   # beyond the paper (README): off is the paper's method
OFFICIAL_EPS = 1e-8   # the official code adds it to exp(-d_r) and to the 0/1 consistency weight
DRO_BETA = 1.0        # DROS's robust radius beta


# ============================================================================ the paper's terms (importance-aware ranking distillation)
def position_weight(K: int, device, dtype) -> torch.Tensor:
    """Position-aware weight w_p[r] = exp(-r / 1) / sum_{r'=1..K} exp(-r' / 1), r = 1..K -> [K]."""
    return torch.softmax(-torch.arange(1, K + 1, dtype=dtype, device=device), dim=0)


def confidence_weight(dist: torch.Tensor) -> torch.Tensor:
    """Confidence-aware weight w_c = exp(-d_r) / sum_r' exp(-d_r'), the paper's form: dist [B, K] -> [B, K]
    (a softmax, shift-safe: raw LLaMA distances of ~20 do not underflow)."""
    return torch.softmax(-dist, dim=1)


def confidence_weight_official(dist: torch.Tensor) -> torch.Tensor:
    """The official code's w_c = (exp(-d_r) + 1e-8) / sum_r' (exp(-d_r') + 1e-8): once every
    d_r passes ~18 (exp(-18.4) = 1e-8) the 1e-8 dominates and w_c tends to uniform, 1/K."""
    w = torch.exp(-dist) + OFFICIAL_EPS
    return w / w.sum(dim=1, keepdim=True)


def consistency_weight(cand: torch.Tensor, student_topk: torch.Tensor) -> torch.Tensor:
    """Consistency-aware weight w_o[r] = 1 if candidate c_r is in the student's current top-K, else 0:
    [B, K], [B, K'] -> [B, K]. (The official code writes 1 or 1e-8: + OFFICIAL_EPS.)"""
    return (cand.unsqueeze(2) == student_topk.unsqueeze(1)).any(dim=2).to(torch.get_default_dtype())


def importance_weight(w_p, w_c, w_o, gammas) -> torch.Tensor:
    """w = normalize_over_r(gamma_p w_p + gamma_c w_c + gamma_o w_o) -> [B, K]."""
    g_p, g_c, g_o = gammas
    w = g_p * w_p + g_c * w_c + g_o * w_o
    return w / w.sum(dim=1, keepdim=True).clamp(min=1e-12)


def neg_term(s_neg: torch.Tensor, official: bool) -> torch.Tensor:
    """-log(1 - sigmoid(s_neg)) = softplus(s_neg); the official code writes
    -log sigmoid(1 - s_neg) = softplus(s_neg - 1). [B] -> [B]"""
    return F.softplus(s_neg - 1) if official else F.softplus(s_neg)


# ---------------------------------------------------------------------------- the DRO term (DROS)
def dro_ps(target_counts: torch.Tensor) -> torch.Tensor:
    """ps_j = ((c_j + 1) / sum_k (c_k + 1)) ** 0.05, c_j = times item j is a training target. [n] -> [n]"""
    c = target_counts.double() + 1
    return (c / c.sum()).pow(0.05).float()


class DroNormaliser(torch.autograd.Function):
    """The part of L_DRO shared by every target of a row, in a few passes over [B, n].

    With a_sj = c_j y_sj^2 (c = ps / beta): M [B] = max_j a_sj, top [B] = its argmax and
    R [B] = sum_{j != top} exp(a_sj - M). Backward, with E_j = exp(a_j - M) and
    a'_j = 2 c_j y_j: dR/dy_j = E_j a'_j for j != top, dR/dy_top = -R a'_top,
    dM/dy_top = a'_top, and dM/dy_j = 0 elsewhere."""

    @staticmethod
    def forward(ctx, y, c):                          # y [B, n], c [n]
        E = y.square().mul_(c)                       # a
        M, top = E.max(dim=1)
        E.sub_(M.unsqueeze(1)).exp_()                # exp(a - M), 1 at top
        E.scatter_(1, top.unsqueeze(1), 0.0)         # leave the top term out of R
        R = E.sum(dim=1)
        ctx.save_for_backward(y, c, E, top, R)
        ctx.mark_non_differentiable(top)
        return M, top, R

    @staticmethod
    def backward(ctx, g_M, _g_top, g_R):
        y, c, E, top, R = ctx.saved_tensors
        g_y = (E * g_R.unsqueeze(1)).mul_(y).mul_(2 * c)              # E_j a'_j g_R, 0 at top
        col = top.unsqueeze(1)
        a_top = 2 * c[top] * y.gather(1, col).squeeze(1)             # a'_top [B]
        g_y.scatter_(1, col, ((g_M - g_R * R) * a_top).unsqueeze(1))
        return g_y, None


def dro_loss(scores: torch.Tensor, targets: torch.Tensor, ps: torch.Tensor, beta: float = DRO_BETA) -> torch.Tensor:
    """L_DRO(s, t) = log sum_j exp(ps_j (y_sj - 1[j = t])^2 / beta) for each row s and each
    target column: scores [B, n], targets [B, m] -> [B, m]. Its plain form, one [B, m, n] tensor
    (the test's oracle): torch.logsumexp(ps / beta * (scores[:, None] - one_hot(targets, n))**2, -1).
    Here the sum over j is computed once per row (DroNormaliser) and shared by the targets. Stable: sum_j = exp(M) * rest_t + exp(b_t),
    where rest_t, the sum over j != t divided by exp(M), is R if t is the row's argmax, else
    1 + R - exp(a_t - M) (>= 1, no cancellation)."""
    c = ps / beta
    M, top, R = DroNormaliser.apply(scores, c)
    y_t, c_t = scores.gather(1, targets), c[targets]                            # [B, m]
    a_t, b_t = c_t * y_t.square(), c_t * (y_t - 1.0).square()                   # [B, m]
    Mx, Rx = M.unsqueeze(1), R.unsqueeze(1)
    rest = torch.where(targets == top.unsqueeze(1), Rx, 1.0 + Rx - torch.exp(a_t - Mx))
    return torch.logaddexp(Mx + torch.log(rest.clamp(min=torch.finfo(scores.dtype).tiny)), b_t)


def dro_candidate_term(w: torch.Tensor, dro_cand: torch.Tensor, official: bool) -> torch.Tensor:
    """sum_r mean_b(w_br L_DRO(b, c_r)), the intended per-row product; the official code's
    [B, 1] x [B] broadcast computes sum_r mean_b(w_br) * mean_b(L_DRO(b, c_r)). [B, K] -> []"""
    if official:
        return (w.mean(dim=0) * dro_cand.mean(dim=0)).sum()
    return (w * dro_cand).sum(dim=1).mean()


# ---------------------------------------------------------------------------- the ranking distillation
def distill(s_cand, s_neg, dist, cand, student_topk, cfg: "Config", dro_cand=None, covered=None,
            gate=None) -> torch.Tensor:
    """lam * L_rank, the importance-aware ranking distillation, vectorised over the K candidates.

    s_cand [B, K]: the student's scores of the teacher's top-K items c_1..c_K (nearest first);
    s_neg [B]: its score of the row's sampled negative; dist [B, K]: the teacher's distances;
    cand [B, K]: the candidate ids; student_topk [B, K]: the student's current top-K ids;
    dro_cand [B, K]: L_DRO(s, c_r) for a student with the DRO term (adds alpha * w_r * L_DRO);
    covered [B] bool: rows the teacher ran on; the others contribute 0 to the batch mean, so a
    covered row weighs the same whatever the teacher's coverage; gate [B]: a row gate (beyond
    the paper), scaling each covered row's term, batch_gate-normalised.
    cfg gives lam, the gammas, alpha and which official formulas to use."""
    B, K = cand.shape
    if cfg.weight_gammas is None:                                                # ablation: w_r = 1/K
        w = torch.full((B, K), 1.0 / K, dtype=dist.dtype, device=dist.device)
    else:
        w_p = position_weight(K, cand.device, dist.dtype).expand(B, K)           # [B, K]
        w_c = (confidence_weight_official if cfg.official_weights else confidence_weight)(dist)
        w_o = consistency_weight(cand, student_topk).to(dist.dtype) + (OFFICIAL_EPS if cfg.official_weights else 0.0)
        w = importance_weight(w_p, w_c, w_o, cfg.weight_gammas)                  # [B, K]
    keep = torch.ones(B, dtype=dist.dtype, device=dist.device) if covered is None else covered.to(dist.dtype)
    if gate is not None:
        keep = batch_gate(gate.to(dist.dtype), keep > 0)                         # [B], mean 1 over covered rows
    w = w * keep.unsqueeze(1)                                                    # uncovered rows: 0
    bce = F.softplus(-s_cand) + neg_term(s_neg, cfg.official_neg).unsqueeze(1)   # [B, K]
    loss = (w * bce).sum(dim=1).mean()
    if dro_cand is not None:
        loss = loss + cfg.alpha * dro_candidate_term(w, dro_cand, cfg.official_dro)
    return cfg.lam * loss


# ---------------------------------------------------------------------------- beyond the paper: a row gate
# The importance weights sum to 1 over a row's K candidates, so a row of bad advice distils with
# the same total weight as a row of good advice. A gate g_b scales row b's whole ranking term;
# within a batch the gates are scaled to mean 1 over its covered rows (batch_gate), so that the
# term's total weight stays the ungated one's and lam keeps its meaning. This project's extension.
def target_gate(target_rank: torch.Tensor, floor: float) -> torch.Tensor:
    """From the teacher's own record of the row's true next item (a training row's target is
    known): g_b = floor + (1 - floor) / log2(1 + r_b), r_b its 1-based rank in the teacher's
    top-n list, and g_b = floor where the list misses it (r_b = 0). [n] int -> [n]"""
    r = target_rank.double()
    credit = torch.where(r > 0, 1.0 / torch.log2(1.0 + r.clamp(min=1)), torch.zeros_like(r))
    return (floor + (1.0 - floor) * credit).float()


def confidence_gate(nearest: torch.Tensor, covered: torch.Tensor, floor: float) -> torch.Tensor:
    """Label-free, from the teacher's absolute confidence compared across rows: g_b = floor +
    (1 - floor) * (1 - q_b), q_b the share of the other covered rows whose nearest candidate
    lies nearer than row b's (d_b1). [n], [n] bool -> [n] (floor on uncovered rows)."""
    d = nearest[covered].double()
    below = torch.searchsorted(d.sort().values, nearest.double(), right=False).double()   # rows nearer than b
    q = below / max(len(d) - 1, 1)
    return torch.where(covered, floor + (1.0 - floor) * (1.0 - q.clamp(max=1.0)),
                       torch.full_like(q, floor)).float()


def batch_gate(gate: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """The batch's gates scaled to mean 1 over its covered rows, 0 elsewhere: [B], [B] bool -> [B].
    No host synchronisation (a captured step may use it)."""
    c = covered.to(gate.dtype)
    return c * gate * c.sum().clamp(min=1.0) / (c * gate).sum().clamp(min=torch.finfo(gate.dtype).tiny)


# ============================================================================ configuration
@dataclass
class Config:
    """One student's training; the command-line flags are generated from the fields with help
    text. Defaults: the official README (lam, ed_weight, alpha, gammas, K, lr, batch) and the
    official code (patience 10)."""
    student: str = "sasrec"          # one of students.CHOICES
    distilled: bool = False          # False: the undistilled baseline
    ablation: str = "none"           # one of ABLATIONS, or none
    lam: float = opt(0.7, "weight of the ranking distillation L_rank", non_negative)
    ed_weight: float = opt(0.3, "weight of the projected teacher embedding in e_i", non_negative)
    alpha: float = opt(0.5, "weight of L_DRO (dros, and any <student>+dro)", non_negative)
    gammas: tuple = opt((0.3, 0.5, 0.1), "gamma_p gamma_c gamma_o: mix of w_p, w_c, w_o", non_negative,
                        metavar=("P", "C", "O"))
    K: int = opt(10, "teacher candidates per row", at_least(1), flag="k")
    lr: float = opt(1e-3, "Adam learning rate", positive)
    batch_size: int = opt(256, "rows per step", between(1, 1 << 16))
    weight_decay: float = opt(0.0, "Adam weight decay", non_negative)
    epochs: int = opt(100, "epochs at most", at_least(1))
    patience: int = opt(10, "stop after this many epochs without a better validation NDCG@20", at_least(1))
    dim: int = opt(64, "embedding size of the students", between(1, 4096))
    dropout: float = opt(0.1, "dropout of the students", fraction)
    seed: int = opt(0, "first seed", between(0, 2**31 - 1))
    official_weights: bool = opt(False, "w_c = (exp(-d)+1e-8)/sum and w_o in {1e-8, 1} (default: exact softmax, {0, 1})")
    official_neg: bool = opt(False, "-log sigmoid(1 - s_neg) in L_rank (default: -log(1 - sigmoid(s_neg)))")
    official_dro: bool = opt(False, "DRO candidate term as the official broadcast, mean(w_r) * mean(L_DRO) "
                                    "(default: the per-row product)")
    official_protocol: bool = opt(False, "official batches (floor(n/B) random samples of B rows), evaluation with "
                                         "dropout on, epoch selection and early stopping on TEST (biased upward)")
    row_gate: str = opt("off", "beyond the paper: scale each row's ranking term by a gate, mean 1 over a batch's "
                               "covered rows; target: the teacher's rank of the row's true next item; confidence: "
                               "its nearest distance against other rows'; off: the paper's method",
                        choices=ROW_GATES)
    gate_floor: float = opt(0.1, "the row gate's value for a row of no credit", fraction)
    kd: str = opt("dllm2rec", "the distillation: dllm2rec (the paper's method) or a baseline of its Table 5 "
                              "(baselines.py): the ranking methods rd, cd, rrd, dcd, unkd (the student keeps its own "
                              "item embeddings) or the embedding methods hint, htd (no ranking term); lam weighs it",
                  choices=baselines.METHODS)

    def __post_init__(self):
        if sum(self.gammas) <= 0 and self.ablation != "no_weights":
            raise UserError(f"--gammas {' '.join(map(str, self.gammas))}: at least one must be > 0")
        if self.kd != "dllm2rec" and (self.ablation != "none" or self.row_gate != "off"):
            raise UserError(f"--kd {self.kd}: the ablations and the row gate are DLLM2Rec's; use them with --kd dllm2rec")

    @property
    def variant(self) -> str:
        if not self.distilled:
            return "base"
        if self.kd != "dllm2rec":
            return self.kd
        name = "dllm2rec" if self.ablation == "none" else f"dllm2rec-{self.ablation}"
        return name if self.row_gate == "off" else f"{name}+{self.row_gate}-gate"

    @property
    def with_dro(self) -> bool:
        """The student carries the DRO term: dros, or <backbone>+dro (the name, not alpha, says so)."""
        return students.parse_student(self.student)[1]

    @property
    def rank_on(self) -> bool:
        return self.distilled and self.ablation != "no_rank" and self.kd == "dllm2rec"

    @property
    def embed_on(self) -> bool:
        return self.distilled and self.ablation != "no_embed" and self.kd == "dllm2rec"

    @property
    def lists_on(self) -> bool:
        """The teacher's top-K lists enter the loss: L_rank or a ranking baseline."""
        return self.rank_on or (self.distilled and self.kd in baselines.RANKING)

    @property
    def weight_gammas(self) -> tuple | None:
        """The gammas after the ablation; None: uniform weights (ablation no_weights)."""
        if self.ablation == "no_weights":
            return None
        return tuple(0.0 if self.ablation == name else g for g, name in zip(self.gammas, ("no_wp", "no_wc", "no_wo")))


def build_student(cfg: Config, n_items: int, train_targets: torch.Tensor, item_emb: torch.Tensor | None):
    """The student of cfg; with the DRO term, its ps (a buffer "ps", from the training targets)."""
    model = students.make_student(
        cfg.student, n_items, dim=cfg.dim, dropout=cfg.dropout, max_len=data.MAX_HISTORY,
        teacher_emb=item_emb if cfg.embed_on else None, ed_weight=cfg.ed_weight, use_offset=cfg.ablation != "no_offset")
    if cfg.with_dro:
        model.register_buffer("ps", dro_ps(torch.bincount(train_targets.cpu(), minlength=n_items)))
    if cfg.distilled and cfg.kd in baselines.EMBEDDING:       # a baseline's learnable part, trained with the student
        model.kd_head = baselines.make_head(cfg.kd, cfg.dim, item_emb)
    if cfg.distilled and cfg.kd == "unkd":
        model.register_buffer("kd_groups", torch.as_tensor(baselines.popularity_groups(train_targets.cpu().numpy(), n_items)))
    return model


# ============================================================================ the training loss
NEG_DRAWS = 16         # candidates per row drawn at once by the static sampler
MAX_REDRAWS = 10_000   # rounds of the eager sampler; check_trainable refuses rows without any valid negative


def sample_negatives(hist: torch.Tensor, target: torch.Tensor, n_items: int, static: bool) -> torch.Tensor:
    """One item per row, uniformly among items not in the row's history nor its target.
    Eager: redraw the rows that hit one until none does (a host sync per round). Static (the
    captured step): NEG_DRAWS candidates at once, the first valid one kept; a row with none
    valid keeps its first draw (probability (11 / n_items) ** 16 at most)."""
    if static:
        cand = torch.randint(0, n_items, (len(target), NEG_DRAWS), device=target.device)     # [B, M]
        bad = (cand == target.unsqueeze(1)) | (cand.unsqueeze(2) == hist.unsqueeze(1)).any(2)
        return cand.gather(1, (~bad).int().argmax(1, keepdim=True)).squeeze(1)
    neg = torch.randint(0, n_items, target.shape, device=target.device)
    for _ in range(MAX_REDRAWS):
        bad = (neg == target) | (neg.unsqueeze(1) == hist).any(1)
        if not bad.any():
            return neg
        neg = torch.where(bad, torch.randint(0, n_items, target.shape, device=target.device), neg)
    raise RuntimeError(f"no valid negative after {MAX_REDRAWS} draws: does a row hold all {n_items} items?")


def bce_base(s_pos: torch.Tensor, s_neg: torch.Tensor) -> torch.Tensor:
    """BCE with logits over the 2B logits (B targets labelled 1, B negatives labelled 0), ONE
    mean as in the official code: (mean_b softplus(-s_pos) + mean_b softplus(s_neg)) / 2."""
    return 0.5 * (F.softplus(-s_pos).mean() + F.softplus(s_neg).mean())


def training_loss(model: students.Student, cfg: Config, hist, lens, target, t_ids=None, t_dist=None,
                  covered=None, gate=None, static: bool = False) -> torch.Tensor:
    """The module docstring's loss for one batch. hist [B, L], lens [B], target [B]; t_ids /
    t_dist [B, K]: the teacher's top-K; covered [B]: rows the teacher ran on; gate [B]: the row gate.
    static: fixed shapes and no host synchronisation, for a compiled or captured step."""
    neg = sample_negatives(hist, target, model.n_items, static)
    h = model(hist, lens)                                                   # [B, d]
    s = model.score(h, torch.stack([target, neg], 1))                       # [B, 2]
    loss = bce_base(s[:, 0], s[:, 1])
    rank_on = cfg.rank_on and t_ids is not None
    scores_all = model.score_all(h) if cfg.with_dro else None              # [B, n_items]
    dro_cand = None
    if cfg.with_dro:            # L_DRO of the target (and of each candidate): one normaliser per row
        dro = dro_loss(scores_all, torch.cat([target.unsqueeze(1), t_ids], 1) if rank_on else target.unsqueeze(1),
                       model.ps)                                            # [B, 1 (+ K)]
        loss = loss + cfg.alpha * dro[:, 0].mean()
        dro_cand = dro[:, 1:] if rank_on else None                          # weighted by alpha * w_r in distill
    extra = model.extra_loss(hist, lens, h, target)
    if extra is not None:
        loss = loss + extra
    if rank_on:
        with torch.no_grad():   # the student's top-K from this training forward (dropout on), as officially
            all_ = scores_all if scores_all is not None else model.score_all(h)
            student_topk = all_.topk(cfg.K, dim=1).indices                  # [B, K]
        loss = loss + distill(model.score(h, t_ids), s[:, 1], t_dist, t_ids, student_topk, cfg, dro_cand, covered, gate)
    elif cfg.distilled and cfg.kd != "dllm2rec":                            # a Table 5 baseline in L_rank's place
        loss = loss + cfg.lam * baselines.kd_loss(cfg.kd, model, h, target, neg, t_ids, t_dist, covered)
    return loss


# ============================================================================ evaluation (the paper's experimental protocol)
def ranks_of(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target in its row of scores [b, n]; ties count against the target
    (a model scoring everything equal gets no hits); a NaN target score ranks last, never a hit."""
    s_t = scores.gather(1, target.unsqueeze(1))                              # [b, 1]
    rank = (scores > s_t).sum(1) + (scores == s_t).sum(1) - 1
    return torch.where(s_t.squeeze(1).isnan(), scores.shape[1] - 1, rank)


@torch.no_grad()
def target_ranks(model: students.Student, hist, lens, target, dropout_on: bool = False,
                 batch_size: int = 1024) -> torch.Tensor:
    """0-based rank of each target among all items in full ranking. History items are not
    masked. dropout_on: evaluate in training mode, as the official code does."""
    was_training = model.training
    model.train(dropout_on)
    ranks = []
    for a in range(0, len(target), batch_size):
        scores = model.score_all(model(hist[a:a + batch_size], lens[a:a + batch_size]))
        if scores.isnan().any():
            raise FloatingPointError("the model's scores are NaN: training diverged (a smaller --lr?)")
        ranks.append(ranks_of(scores, target[a:a + batch_size]))
    model.train(was_training)
    return torch.cat(ranks).cpu()


def popularity_metrics(ds: data.Dataset, split: data.Split) -> dict:
    """The floor every student must clear: items ranked by their count as training targets."""
    counts = torch.bincount(torch.as_tensor(ds.train.target), minlength=ds.n_items).double()
    target = torch.as_tensor(split.target)
    return metrics_from_ranks(ranks_of(counts.expand(len(target), -1), target))


# ============================================================================ training
def check_trainable(ds: data.Dataset, batch_size: int, full_batches: bool) -> None:
    """Refuse, before any work, data a student cannot be trained on: an empty split, a training
    row whose history and target hold every item (no negative to sample), or fewer rows than one
    batch where only full batches run (the captured step, the official protocol)."""
    for name, split in (("training", ds.train), ("validation", ds.val), ("test", ds.test)):
        if len(split) == 0:
            raise UserError(f"{ds.name}: 0 {name} rows (train/val/test {len(ds.train)}/{len(ds.val)}/{len(ds.test)}); "
                            "a student needs rows in each: more users with more interactions")
    if full_batches and len(ds.train) < batch_size:
        raise UserError(f"{ds.name}: {len(ds.train)} training rows, fewer than --batch-size {batch_size}; the "
                        "captured step (CUDA) and --official-protocol run full batches only: a smaller --batch-size")
    if ds.n_items <= data.MAX_HISTORY + 1:          # otherwise every row leaves at least one item out
        held = np.concatenate([ds.train.hist, ds.train.target[:, None]], 1)
        distinct = np.array([len(set(row) - {ds.n_items}) for row in held])
        if (distinct >= ds.n_items).any():
            r = int(np.argmax(distinct >= ds.n_items))
            raise UserError(f"{ds.name}: training row {r + 1} holds all {ds.n_items} items: no negative item to sample")


def row_gates(cfg: Config, teacher, targets: np.ndarray) -> torch.Tensor:
    """Each training row's gate g_b (cfg.row_gate), from the teacher's outputs: [n_rows]."""
    rank, nearest, covered = (torch.as_tensor(a) for a in cache.target_rank_and_nearest(teacher, targets))
    if cfg.row_gate == "target":
        return target_gate(rank, cfg.gate_floor)
    return confidence_gate(nearest, covered, cfg.gate_floor)


def to_tensors(split: data.Split, device):
    return tuple(torch.as_tensor(a, device=device) for a in (split.hist, split.lens, split.target))


def epoch_batches(n: int, cfg: Config, device, full_only: bool) -> list[torch.Tensor]:
    """Row indices of each step. Ours: a random permutation, every row once per epoch (full_only,
    for the captured step: the last n mod B rows of the permutation are left out, other rows
    each epoch). The official code: floor(n / B) steps, each a fresh sample of B distinct rows."""
    if cfg.official_protocol:
        return [torch.randperm(n, device=device)[:cfg.batch_size] for _ in range(n // cfg.batch_size)]
    order = torch.randperm(n, device=device)
    return list((order[:n - n % cfg.batch_size] if full_only else order).split(cfg.batch_size))


def fit(ds: data.Dataset, cfg: Config, teacher=None, device="cpu", log=print, subsets: dict | None = None,
        keep_best: bool = False) -> dict:
    """Train one student: epochs of steps until validation NDCG@20 has not improved for
    `patience` epochs; report test at the selected epoch (official protocol: select and stop on
    test, evaluate with dropout on). teacher: cache.TeacherOutputs (needed when distilled);
    subsets: {name: data.Split} also evaluated at every selected epoch; keep_best: also return
    the model at the selected epoch (under "model", for a trained-model teacher)."""
    if cfg.distilled and teacher is None:
        raise ValueError("distillation needs a teacher (--teacher)")
    teacher = teacher if cfg.distilled else None
    capture = captured(device) and cfg.kd == "dllm2rec"   # fixed shapes: full batches; the baselines sample eagerly
    check_trainable(ds, cfg.batch_size, capture or cfg.official_protocol)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    train = to_tensors(ds.train, device)
    split = {"val": to_tensors(ds.val, device), "test": to_tensors(ds.test, device)}
    extra = {name: to_tensors(s, device) for name, s in (subsets or {}).items()}
    item_emb = torch.as_tensor(teacher.item_emb) if teacher is not None else None
    model = build_student(cfg, ds.n_items, train[2], item_emb).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True, capturable=capture)
    step = Step(training_loss, model, opt, cfg, "captured" if capture else "eager")
    tt = ()                                           # per training row: the teacher's top-K ids, distances, covered
    if teacher is not None and cfg.lists_on:          # (and the row gate)
        tt = tuple(torch.as_tensor(a, device=device) for a in cache.per_training_row(teacher, len(ds.train), cfg.K))
        if cfg.row_gate != "off":
            tt += (row_gates(cfg, teacher, ds.train.target).to(device),)
    select_on, other = ("test", "val") if cfg.official_protocol else ("val", "test")
    key = f"NDCG@{REPORTED}"
    ranks = {}                                        # the latest ranks of each split: test's feed the paired test

    def evaluate(name, split_t):
        ranks[name] = target_ranks(model, *split_t, dropout_on=cfg.official_protocol)
        return metrics_from_ranks(ranks[name])

    history, best, bad_epochs, best_test_ranks, best_state = [], None, 0, None, None
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        total, rows = torch.zeros((), device=device), 0
        for idx in epoch_batches(len(ds.train), cfg, device, full_only=capture):
            total += step(*(x[idx] for x in train + tt)) * len(idx)      # no per-step sync with the GPU
            rows += len(idx)
        loss = total.item() / rows
        t1 = time.perf_counter()
        e = {"epoch": epoch, "loss": loss, select_on: evaluate(select_on, split[select_on])}
        improved = best is None or e[select_on][key] > best[select_on][key]
        if improved or cfg.official_protocol:   # the other split only where it may be reported
            e[other] = evaluate(other, split[other])
            e["subsets"] = {name: evaluate(name, t) for name, t in extra.items()}
        history.append({**e, "train_s": round(t1 - t0, 3), "eval_s": round(time.perf_counter() - t1, 3)})
        log(f"  epoch {epoch:3d} loss {loss:.6f} {select_on} {key} {e[select_on][key]:.4f} "
            f"HR@{REPORTED} {e[select_on][f'HR@{REPORTED}']:.4f} ({history[-1]['train_s']:.1f}s + "
            f"{history[-1]['eval_s']:.1f}s eval)")
        if not math.isfinite(loss):
            raise FloatingPointError(f"{cfg.student} {cfg.variant}: loss became {loss} at epoch {epoch}")
        best, bad_epochs = (history[-1], 0) if improved else (best, bad_epochs + 1)
        best_test_ranks = ranks["test"] if improved else best_test_ranks
        if improved and keep_best:
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if bad_epochs >= cfg.patience:
            break
    if keep_best:
        model.load_state_dict(best_state)
    return {
        **({"model": model.eval()} if keep_best else {}),
        "config": asdict(cfg), "variant": cfg.variant, "seed": cfg.seed, "dataset": ds.name,
        "fingerprint": ds.fingerprint, "device": str(device), "teacher": teacher.source if teacher is not None else None,
        "teacher_rows_covered": int(tt[2].sum()) if tt else None, "epochs": history,
        "selected_epoch": best["epoch"], "selected_on": select_on, "converged": bad_epochs >= cfg.patience,
        "val": best["val"], "test": best["test"], "subsets": best["subsets"], "captured_step": capture,
        "test_ranks": best_test_ranks.tolist(),      # per test row, at the selected epoch: the paired test's input
        "wall_s": {k: round(sum(e[k + "_s"] for e in history), 2) for k in ("train", "eval")},
    }


# The one import of the orchestration from the method's file, at run time only: the price of
# `python dllm2rec.py` (the paper's file) as the entry point; nothing above it reads cli.
if __name__ == "__main__":      # the single command and every other: the command line is cli.py's
    import cli
    cli.main()
