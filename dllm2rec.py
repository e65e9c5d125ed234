"""DLLM2Rec (Cui et al., RecSys 2024): distil an LLM recommender into sequential students.

    loss = base BCE (+ the student's own term) + lam * L_rank
    L_rank = sum_r mean_batch( w_r * (-log sig(s_{c_r}) - log(1 - sig(s_neg))) )
    w = normalize_r(gamma_p w_p + gamma_c w_c + gamma_o w_o)
(the paper's importance-aware ranking distillation), and the student's input embedding
e_i = b_i + ed_weight * g(z_i) (its collaborative embedding distillation; students.ItemEmbedding).

Defaults: the paper's method with the official code's conventions; `--official` switches on the
official code's numerics and protocol (README: differences). Here: the method, its training and
evaluation, the results table, the `reproduce` (default) and `train` commands; flags in cli.py.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

import cache
import cli
import data
import diagnostics
import finetune
import students
import teacher as teacher_llm
from common import Step, UserError, at_least, between, fraction, non_negative, opt, pick_device, positive
from significance import ndcg_per_row, paired_test, signed_rank_test  # noqa: F401  (two for the tests)

CUTOFFS = (5, 10, 20)   # the k of HR@k and NDCG@k (cfg.K is the number of teacher candidates)
ABLATIONS = ("no_wp", "no_wc", "no_wo", "no_weights", "no_rank", "no_embed", "no_offset")
OFFICIAL_EPS = 1e-8   # the official code adds it to exp(-d_r) and to the 0/1 consistency weight


# ============================================================================ the paper's terms
def position_weight(K: int, device, dtype) -> torch.Tensor:
    """w_p[r] = exp(-r / 1) / sum_{r'=1..K} exp(-r' / 1), r = 1..K -> [K]."""
    return torch.softmax(-torch.arange(1, K + 1, dtype=dtype, device=device), dim=0)


def confidence_weight(dist: torch.Tensor) -> torch.Tensor:
    """w_c = exp(-d_r) / sum_r' exp(-d_r'), the paper's form: dist [B, K] -> [B, K]
    (a softmax, shift-safe: raw LLaMA distances of ~20 do not underflow)."""
    return torch.softmax(-dist, dim=1)


def confidence_weight_official(dist: torch.Tensor) -> torch.Tensor:
    """The official code's w_c = (exp(-d_r) + 1e-8) / sum_r' (exp(-d_r') + 1e-8): once every
    d_r passes ~18 (exp(-18.4) = 1e-8) the 1e-8 dominates and w_c tends to uniform, 1/K."""
    w = torch.exp(-dist) + OFFICIAL_EPS
    return w / w.sum(dim=1, keepdim=True)


def consistency_weight(cand: torch.Tensor, student_topk: torch.Tensor) -> torch.Tensor:
    """w_o[r] = 1 if candidate c_r is in the student's current top-K, else 0: [B, K], [B, K'] -> [B, K].
    (The official code writes 1 or 1e-8: consistency_weight(...) + OFFICIAL_EPS.)"""
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


def dro_candidate_term(w: torch.Tensor, dro_cand: torch.Tensor, official: bool) -> torch.Tensor:
    """sum_r mean_b(w_br L_DRO(b, c_r)), the intended per-row product; the official code's
    [B, 1] x [B] broadcast computes sum_r mean_b(w_br) * mean_b(L_DRO(b, c_r)). [B, K] -> []"""
    if official:
        return (w.mean(dim=0) * dro_cand.mean(dim=0)).sum()
    return (w * dro_cand).sum(dim=1).mean()


def distill(s_cand, s_neg, dist, cand, student_topk, cfg: "Config", dro_cand=None, covered=None) -> torch.Tensor:
    """lam * L_rank, the importance-aware ranking distillation, vectorised over the K candidates.

    s_cand [B, K]: the student's scores of the teacher's top-K items c_1..c_K (nearest first);
    s_neg [B]: its score of the row's sampled negative; dist [B, K]: the teacher's distances;
    cand [B, K]: the candidate ids; student_topk [B, K]: the student's current top-K ids;
    dro_cand [B, K]: L_DRO(s, c_r) for a student with the DRO term (adds alpha * w_r * L_DRO);
    covered [B] bool: rows the teacher ran on; the others contribute 0 to the batch mean, so a
    covered row weighs the same whatever the teacher's coverage.
    cfg gives lam, the gammas, alpha and which official formulas to use.
    The collaborative embedding term lives in the student's input: students.ItemEmbedding."""
    B, K = cand.shape
    if cfg.weight_gammas is None:                                                # ablation: w_r = 1/K
        w = torch.full((B, K), 1.0 / K, dtype=dist.dtype, device=dist.device)
    else:
        w_p = position_weight(K, cand.device, dist.dtype).expand(B, K)           # [B, K]
        w_c = (confidence_weight_official if cfg.official_weights else confidence_weight)(dist)
        w_o = consistency_weight(cand, student_topk).to(dist.dtype) + (OFFICIAL_EPS if cfg.official_weights else 0.0)
        w = importance_weight(w_p, w_c, w_o, cfg.weight_gammas)                  # [B, K]
    keep = torch.ones(B, dtype=dist.dtype, device=dist.device) if covered is None else covered.to(dist.dtype)
    w = w * keep.unsqueeze(1)                                                    # uncovered rows: 0
    bce = F.softplus(-s_cand) + neg_term(s_neg, cfg.official_neg).unsqueeze(1)   # [B, K]
    loss = (w * bce).sum(dim=1).mean()
    if dro_cand is not None:
        loss = loss + cfg.alpha * dro_candidate_term(w, dro_cand, cfg.official_dro)
    return cfg.lam * loss


# ============================================================================ configuration
@dataclass
class Config:
    """One student's training; flags are generated from the fields with help text. Defaults:
    the official README (lam, ed_weight, alpha, gammas, K, lr, batch) and the official code (patience 10)."""
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

    def __post_init__(self):
        if sum(self.gammas) <= 0 and self.ablation != "no_weights":
            raise UserError(f"--gammas {' '.join(map(str, self.gammas))}: at least one must be > 0")

    @property
    def variant(self) -> str:
        return "base" if not self.distilled else "dllm2rec" if self.ablation == "none" else f"dllm2rec-{self.ablation}"

    @property
    def rank_on(self) -> bool:
        return self.distilled and self.ablation != "no_rank"

    @property
    def embed_on(self) -> bool:
        return self.distilled and self.ablation != "no_embed"

    @property
    def weight_gammas(self) -> tuple | None:
        """The gammas after the ablation; None: uniform weights (ablation no_weights)."""
        if self.ablation == "no_weights":
            return None
        return tuple(0.0 if self.ablation == name else g for g, name in zip(self.gammas, ("no_wp", "no_wc", "no_wo")))


# The single command: overrides of the teacher's settings; per device, its students and seeds (CPU: ~20 min)
REPRODUCE = {"train_rows": 512, "eval_rows": 128}   # TeacherSettings: --teacher-rows, --teacher-eval-rows
PRESET_STUDENTS = {"cpu": (("sasrec", "dros"), 2), "cuda": (students.STUDENTS, 3)}


def build_student(cfg: Config, n_items: int, train_targets: torch.Tensor, item_emb: torch.Tensor | None):
    counts = torch.bincount(train_targets.cpu(), minlength=n_items)
    return students.make_student(
        cfg.student, n_items, target_counts=counts, alpha=cfg.alpha, dim=cfg.dim, dropout=cfg.dropout,
        max_len=data.MAX_HISTORY, teacher_emb=item_emb if cfg.embed_on else None, ed_weight=cfg.ed_weight,
        use_offset=cfg.ablation != "no_offset")


# ============================================================================ one step
NEG_DRAWS = 16   # candidates per row drawn at once by the static sampler


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


MAX_REDRAWS = 10_000   # rounds of the eager sampler; check_trainable refuses rows without any valid negative


def bce_base(s_pos: torch.Tensor, s_neg: torch.Tensor) -> torch.Tensor:
    """BCE with logits over the 2B logits (B targets labelled 1, B negatives labelled 0), ONE
    mean as in the official code: (mean_b softplus(-s_pos) + mean_b softplus(s_neg)) / 2."""
    return 0.5 * (F.softplus(-s_pos).mean() + F.softplus(s_neg).mean())


def training_loss(model: students.Student, cfg: Config, hist, lens, target, t_ids=None, t_dist=None,
                  covered=None, static: bool = False) -> torch.Tensor:
    """Base BCE on (target, one negative) + alpha * L_DRO (dros, +dro) + the student's own term
    (CL4SRec's) (+ lam * L_rank, which carries alpha * w_r * L_DRO(c_r) with DRO).
    hist [B, L], lens [B], target [B]; t_ids / t_dist [B, K] the teacher's top-K.
    static: fixed shapes and no host synchronisation, for a captured step."""
    neg = sample_negatives(hist, target, model.n_items, static)
    h = model(hist, lens)                                                   # [B, d]
    s = model.score(h, torch.stack([target, neg], 1))                       # [B, 2]
    loss = bce_base(s[:, 0], s[:, 1])
    rank_on = cfg.rank_on and t_ids is not None
    scores_all = model.score_all(h) if model.dro_alpha > 0 else None       # [B, n_items]
    dro_cand = None
    if scores_all is not None:  # L_DRO with the target (and each candidate): one normaliser per row
        dro = model.dro_terms(scores_all, torch.cat([target.unsqueeze(1), t_ids], 1) if rank_on else target.unsqueeze(1))
        loss = loss + model.dro_alpha * dro[:, 0].mean()                   # dro [B, 1 (+ K)]
        dro_cand = dro[:, 1:] if rank_on else None
    extra = model.extra_loss(hist, lens, h, target)
    if extra is not None:
        loss = loss + extra
    if rank_on:
        with torch.no_grad():   # the student's top-K from this training forward (dropout on), as officially
            all_ = scores_all if scores_all is not None else model.score_all(h)
            student_topk = all_.topk(cfg.K, dim=1).indices                  # [B, K]
        loss = loss + distill(model.score(h, t_ids), s[:, 1], t_dist, t_ids, student_topk, cfg, dro_cand, covered)
    return loss


# ============================================================================ evaluation
def metrics_from_ranks(ranks: torch.Tensor, ks=CUTOFFS) -> dict:
    """ranks [N], 0-based rank of each target -> HR@k and NDCG@k (= 1/log2(rank+2) if hit)."""
    out = {}
    for k in ks:
        hit = (ranks < k).double()
        out[f"HR@{k}"] = hit.mean().item()
        out[f"NDCG@{k}"] = (hit / torch.log2(ranks.double() + 2)).mean().item()
    return out


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


def fit(ds: data.Dataset, cfg: Config, teacher=None, device="cpu", log=print, subsets: dict | None = None) -> dict:
    """Train one student; select the epoch on validation NDCG@20 and stop after `patience`
    epochs without improvement; report test at the selected epoch (official protocol: select
    and stop on test, evaluate with dropout on). subsets: {name: data.Split} also evaluated
    at every selected epoch (the reproduction passes the test rows the teacher covered)."""
    if cfg.distilled and teacher is None:
        raise ValueError("distillation needs a teacher (--teacher)")
    teacher = teacher if cfg.distilled else None
    capture = cli.captured_step(device)               # the captured step needs fixed shapes: full batches
    cli.check_trainable(ds, cfg.batch_size, capture or cfg.official_protocol)
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
    if teacher is not None and cfg.rank_on:
        tt = tuple(torch.as_tensor(a, device=device) for a in cache.per_training_row(teacher, len(ds.train), cfg.K))
    select_on, other = ("test", "val") if cfg.official_protocol else ("val", "test")

    ranks = {}                                        # the latest ranks of each split: test's feed the paired test

    def evaluate(name, split_t):
        ranks[name] = target_ranks(model, *split_t, dropout_on=cfg.official_protocol)
        return metrics_from_ranks(ranks[name])

    history, best, bad_epochs, best_test_ranks = [], None, 0, None
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
        improved = best is None or e[select_on]["NDCG@20"] > best[select_on]["NDCG@20"]
        if improved or cfg.official_protocol:   # the other split only where it may be reported
            e[other] = evaluate(other, split[other])
            e["subsets"] = {name: evaluate(name, t) for name, t in extra.items()}
        history.append({**e, "train_s": round(t1 - t0, 3), "eval_s": round(time.perf_counter() - t1, 3)})
        log(f"  epoch {epoch:3d} loss {loss:.6f} {select_on} NDCG@20 {e[select_on]['NDCG@20']:.4f} "
            f"HR@20 {e[select_on]['HR@20']:.4f} ({history[-1]['train_s']:.1f}s + {history[-1]['eval_s']:.1f}s eval)")
        if not math.isfinite(loss):
            raise FloatingPointError(f"{cfg.student} {cfg.variant}: loss became {loss} at epoch {epoch}")
        best, bad_epochs = (history[-1], 0) if improved else (best, bad_epochs + 1)
        best_test_ranks = ranks["test"] if improved else best_test_ranks
        if bad_epochs >= cfg.patience:
            break
    return {
        "config": asdict(cfg), "variant": cfg.variant, "seed": cfg.seed, "dataset": ds.name,
        "fingerprint": ds.fingerprint, "device": str(device), "teacher": teacher.source if teacher is not None else None,
        "teacher_rows_covered": int(tt[2].sum()) if tt else None, "epochs": history,
        "selected_epoch": best["epoch"], "selected_on": select_on, "converged": bad_epochs >= cfg.patience,
        "val": best["val"], "test": best["test"], "subsets": best["subsets"], "captured_step": capture,
        "test_ranks": best_test_ranks.tolist(),      # per test row, at the selected epoch: the paired test's input
        "wall_s": {k: round(sum(e[k + "_s"] for e in history), 2) for k in ("train", "eval")},
    }


# ============================================================================ the results table
def mean_std(xs):
    xs = np.asarray(xs, dtype=float)
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


P_LEVEL = 0.05   # the paired test's level


def verdict(mean_d: float, std_d: float, mean_b: float, std_b: float, seeds: int, p: float | None = None) -> str:
    """A gain (or loss) only beyond twice the combined standard deviation of the two means' seeds
    and, where the paired test ran, with its p below P_LEVEL: both must agree."""
    if seeds < 2:
        return "1 seed: no noise estimate"
    noise = 2 * math.hypot(std_d, std_b)
    if abs(mean_d - mean_b) <= noise or (p is not None and p >= P_LEVEL):
        return "within noise"
    return "gain" if mean_d > mean_b else "loss"


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
        for m in ("HR@20", "NDCG@20"):
            line[m], line[m + "_std"] = mean_std([r["test"][m] for r in rs])
    for (student, variant), line in lines.items():
        ref_name = (against or {}).get(variant, None if against else "base")
        ref = lines.get((student, ref_name))
        line.update({"against": None, "change_NDCG@20": None, "seed_noise": None, "paired": None, "verdict": None})
        if ref is not None and ref is not line and ref["NDCG@20"] > 0:
            seeds = min(line["seeds"], ref["seeds"])
            line["against"], line["change_NDCG@20"] = ref_name, line["NDCG@20"] / ref["NDCG@20"] - 1
            means = (line["NDCG@20"], line["NDCG@20_std"], ref["NDCG@20"], ref["NDCG@20_std"], seeds)
            line["seed_noise"] = verdict(*means) if seeds > 1 else "1 seed"
            line["paired"] = paired_test(groups[student, variant], groups[student, ref_name])
            line["verdict"] = verdict(*means, line["paired"]["p"] if line["paired"] else None)
    return list(lines.values())


def format_table(lines: list[dict], floor: dict | None = None) -> str:
    """The results table; floor: {label: metrics} rows printed first (popularity, teacher)."""
    rows = [f"{'':36} {'seeds':>5} {'HR@20':>13} {'NDCG@20':>13}  {'change in NDCG@20':24} {'seeds say':13} "
            f"{'paired p':>8}  verdict"]
    for label, m in (floor or {}).items():
        rows.append(f"{label:36} {'':5} {m['HR@20']:13.4f} {m['NDCG@20']:13.4f}")
    for l in lines:
        change = f"{100 * l['change_NDCG@20']:+6.1f}% vs {l['against']}" if l["change_NDCG@20"] is not None else ""
        p = f"{l['paired']['p']:8.4f}" if l.get("paired") else f"{'':8}"
        flag = "" if l["converged"] else " (not converged: epoch cap)"
        rows.append(f"{l['student'] + ' ' + l['variant']:36} {l['seeds']:5d} {l['HR@20']:.4f}±{l['HR@20_std']:.4f} "
                    f"{l['NDCG@20']:.4f}±{l['NDCG@20_std']:.4f}  {change:24} {l.get('seed_noise') or '':13} {p}  "
                    f"{l['verdict'] or ''}{flag}".rstrip())
    rows.append("test metrics at the epoch of best validation NDCG@20, mean ± std over seeds. A change is a gain or a "
                "loss only when both agree: beyond twice the combined std of the seeds, and paired p < "
                f"{P_LEVEL} (Wilcoxon signed-rank over the test rows, per-row NDCG@20 averaged over seeds)")
    return "\n".join(rows)


# ============================================================================ commands
def ranking_share(covered: int, n_train: int, cfg: Config) -> str:
    """What the ranking term acts on. An uncovered row weighs 0 in L_rank's batch mean, so a
    covered row weighs what it weighs in the paper and the term as a whole acts with
    lam x coverage of its full-coverage weight."""
    c = covered / n_train
    return (f"the ranking term acts on {covered} of {n_train} training rows (coverage {c:.1%}): about "
            f"{c * cfg.batch_size:.1f} covered rows in a {cfg.batch_size}-row batch, an effective weight of "
            f"lam x coverage = {cfg.lam:g} x {c:.4f} = {cfg.lam * c:.4f} (lam {cfg.lam:g} at full coverage)")


def cmd_train(args, ds) -> dict:
    device = pick_device(args.device)
    if not args.teacher and (args.ablations or not args.baseline):
        raise UserError("--ablations and --no-baseline act on distilled runs: they need --teacher")
    teacher = cache.load_teacher(args.teacher, ds) if args.teacher else None
    cli.preflight(ds, args, device, teacher.top_n if teacher is not None else None)
    if teacher is not None:
        print(teacher_llm.describe(teacher, ds))
    variants = [{}] if args.baseline or teacher is None else []
    variants += [{"distilled": True, "ablation": a} for a in ["none", *args.ablations]] if teacher is not None else []
    runs = cli.train_students(fit, ds, teacher, args, variants, device)
    if cli.save_shard(args, ds, runs):
        return {"runs": runs}
    summary = summarise(runs)
    print(format_table(summary))
    if teacher is not None:
        print(ranking_share(len(teacher.splits["train"].rows), len(ds.train), cli.config(args)))
    cli.save_results(args, ds, runs, summary)
    return {"summary": summary, "runs": runs}


def cmd_reproduce(args, ds) -> dict:
    """The teacher (cached after the first run), then every student without and with DLLM2Rec,
    trained to convergence over seeds; one table beside the popularity floor and the teacher."""
    t_start = time.perf_counter()
    device = pick_device(args.device)
    cli.preflight(ds, args, device, args.top_n)
    teacher, teacher_eval, path = teacher_llm.stage(args, ds)
    t_teacher = time.perf_counter() - t_start
    preset, seeds = PRESET_STUDENTS[device.type]
    if args.students is None or args.seeds is None:
        args.students, args.seeds = args.students or list(preset), args.seeds or seeds
        if device.type == "cpu":
            print(f"on CPU the single command trains {', '.join(args.students)} over {args.seeds} seeds to fit about 20 "
                  "minutes; the full protocol runs on CUDA, or here with --students gru4rec,sasrec,cl4srec,dros,caser --seeds 3")
    print(f"students: {', '.join(args.students)}, {args.seeds} seed(s), until validation NDCG@20 has not improved "
          f"for {args.patience} epochs (at most {args.epochs}), on {device}")
    rows = teacher.splits["test"].rows      # the test rows the teacher covered: students beside it
    subsets = {"teacher_test_rows": data.Split(ds.test.hist[rows], ds.test.lens[rows], ds.test.target[rows])}
    runs = cli.train_students(fit, ds, teacher, args, [{}, {"distilled": True}], device, subsets)
    summary = summarise(runs)
    covered, checksum = len(teacher.splits["train"].rows), cache.checksum(teacher)
    floor = {"popularity (training targets)": popularity_metrics(ds, ds.test)}
    print(f"\n{ds.name}, all {len(ds.test)} test rows; the teacher covers {covered} of {len(ds.train)} training rows "
          f"({covered / len(ds.train):.1%}), outputs checksum {checksum}")
    print(format_table(summary, floor))
    print(ranking_share(covered, len(ds.train), cli.config(args)))
    latency = teacher_llm.beside(teacher, teacher_eval, popularity_metrics(ds, subsets["teacher_test_rows"]), summary,
                                 runs, eval_rows=len(ds.val) + len(ds.test) + len(rows))
    cli.save_results(args, ds, runs, summary, floor=floor, latency=latency, teacher={
        "cache": str(path), "eval": teacher_eval, "manifest": teacher.manifest, "covered_train_rows": covered,
        "checksum": checksum})
    print(f"total {time.perf_counter() - t_start:.0f} s (teacher stage {t_teacher:.0f} s)")
    return {"summary": summary, "runs": runs, "teacher": teacher_eval}


def parse_args(argv=None):
    """The command line is cli.py's: train and reproduce (this module's, passed as `method`, so
    that no module imports this one), then each other module's own commands."""
    method = sys.modules[__name__]
    return cli.parse_args(argv, method, [teacher_llm.add_commands, finetune.add_commands,
                                         lambda sub, parent: diagnostics.add_commands(sub, parent, method)])


def main(argv=None):
    return cli.main(parse_args(argv))


if __name__ == "__main__":
    main()
