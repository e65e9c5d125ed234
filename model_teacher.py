"""A trained-model teacher, stronger than its students, from the training rows alone, written as
a teacher cache that `train --teacher` reads (`python -m research model-teacher`; the single command
prints its row beside the LLM teacher's).

The paper's teacher (BIGRec) ranks at least as well as its students; no LLM run here does. This
teacher stands in for one, as a recommender, not an LLM: an ensemble of sequential models (by
default three DROS seeds) trained on the training rows only. The training rows are sorted by
time, so the last `holdout` share of them serves as the ensemble's own validation rows (each
member's epoch is selected there, patience as for the students); the dataset's validation and
test rows are never seen, only scored afterwards for the report (a test removes them and finds
the same cache). A fine-tuned LLM has seen its training rows, and so has this teacher on all but
the held-out share: its advice there is in-sample, reported as such.

Its outputs, per training row: the top-n items by the ensemble's log-probability
log p_j = mean over members of log_softmax_j(scores), nearest first; distances d_j = -log p_j
(so w_c = softmax_r(-d_r) is the ensemble's probability renormalised over the K candidates, and
a row's nearest distance says how sure it is, comparable across rows). Item features: the
members' item embeddings b_i side by side, [n_items, dim x members].
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import cache
import data
import students
from common import UserError, add_flags, between, cache_home, checked, choice_list, fraction, pick_device, preset
from dllm2rec import Config, fit, popularity_metrics, ranks_of
from metrics import REPORTED, metrics_from_ranks
from results import format_rows

MEMBERS, HOLDOUT, TOP_N = ["dros"], 0.1, 20    # the members' kinds, the held-out share, candidates per row


def inner_split(ds: data.Dataset, holdout: float) -> data.Dataset:
    """The teacher's own data, from the training rows alone: the earlier rows to fit on, the last
    `holdout` share (the latest targets: the rows are sorted by time) to select epochs on."""
    n = len(ds.train)
    cut = n - max(1, round(holdout * n))
    if cut < 1:
        raise UserError(f"--holdout {holdout}: leaves no training rows of {ds.name} to fit on")
    part = lambda a, b: data.Split(ds.train.hist[a:b], ds.train.lens[a:b], ds.train.target[a:b])
    return data.Dataset(f"{ds.name}-teacher", ds.n_items, ds.titles, part(0, cut), part(cut, n), part(cut, n), ds.domain)


@torch.no_grad()
def ensemble_log_probs(models: list, split: data.Split, device, batch_size: int = 1024):
    """Per row of split, the members' mean log_softmax over all items, in chunks:
    yields (row slice, [b, n_items] float32 on the CPU)."""
    t = [torch.as_tensor(a, device=device) for a in (split.hist, split.lens)]
    for a in range(0, len(split), batch_size):
        rows = slice(a, a + batch_size)
        lp = sum(torch.log_softmax(m.score_all(m(t[0][rows], t[1][rows])).double(), dim=1) for m in models)
        yield rows, (lp / len(models)).float().cpu()


def top_n_of(models: list, split: data.Split, top_n: int, device) -> cache.TopN:
    """Each row's top_n items by the ensemble's log-probability, d = -log p, nearest first."""
    ids, dist = np.empty((len(split), top_n), np.int64), np.empty((len(split), top_n), np.float32)
    for rows, lp in ensemble_log_probs(models, split, device):
        top = lp.topk(top_n, dim=1)                                  # sorted: largest log p first
        ids[rows], dist[rows] = top.indices.numpy(), (-top.values).numpy()
    return cache.TopN(np.arange(len(split)), ids, dist)


def ensemble_metrics(models: list, split: data.Split, device) -> dict:
    """The ensemble's own full-ranking HR / NDCG on a split (a report: nothing it outputs reads it)."""
    ranks = [ranks_of(lp, torch.as_tensor(split.target[rows])) for rows, lp in ensemble_log_probs(models, split, device)]
    return metrics_from_ranks(torch.cat(ranks))


def train_members(ds: data.Dataset, cfg: Config, members: list[str], seeds: int, holdout: float, device,
                  log=print) -> tuple[list, list[dict]]:
    """Every (student, seed) member fitted on inner_split(ds): the models at their selected
    epochs, and what each run selected."""
    inner = inner_split(ds, holdout)
    models, record = [], []
    for student in members:
        for seed in range(cfg.seed, cfg.seed + seeds):
            r = fit(inner, replace(cfg, student=student, seed=seed, distilled=False), None, device,
                    log=lambda *_: None, keep_best=True)
            models.append(r["model"])
            record.append({"student": student, "seed": seed, "selected_epoch": r["selected_epoch"],
                           "epochs": len(r["epochs"]), "converged": r["converged"],
                           "holdout_NDCG@20": r["val"][f"NDCG@{REPORTED}"]})
            log(f"  member {student} seed {seed}: selected epoch {r['selected_epoch']} of {len(r['epochs'])}, "
                f"NDCG@{REPORTED} {r['val'][f'NDCG@{REPORTED}']:.4f} on the held-out training rows", flush=True)
    return models, record


def model_teacher(ds: data.Dataset, cfg: Config, members: list[str], seeds: int, holdout: float, top_n: int,
                  device="cpu", log=print) -> tuple[cache.TeacherOutputs, list]:
    """The module docstring's teacher over every training row, and its members (for the report)."""
    models, record = train_members(ds, cfg, members, seeds, holdout, device, log)
    item_emb = np.concatenate([m.embed.offset.weight[:ds.n_items].detach().cpu().numpy() for m in models], axis=1)
    train = top_n_of(models, ds.train, top_n, device)
    identity = {"kind": "trained model: an ensemble of sequential recommenders (not an LLM)", "members": record,
                "holdout": holdout, "top_n": top_n, "fit_rows": len(inner_split(ds, holdout).train),
                "settings": {k: getattr(cfg, k) for k in ("lr", "batch_size", "weight_decay", "epochs", "patience",
                                                          "dim", "dropout", "alpha")}}
    names = ", ".join(f"{seeds} x {s}" for s in members)
    return cache.TeacherOutputs(item_emb.astype(np.float32), {"train": train}, {"teacher": identity},
                                source=f"trained-model teacher ({names}, dim {cfg.dim}; training rows only)"), models


def in_sample_share(t: cache.TeacherOutputs, ds: data.Dataset, K: int, fit_rows: int) -> dict:
    """The share of training rows whose teacher top-K holds the row's own target: on the rows
    the members were fitted on (in-sample) and on the held-out ones."""
    hit = (t.splits["train"].ids[:, :K] == ds.train.target[:, None]).any(1)
    return {"fitted rows": float(hit[:fit_rows].mean()), "held-out rows": float(hit[fit_rows:].mean()) if
            fit_rows < len(hit) else float("nan"), "all rows": float(hit.mean())}


def build(ds: data.Dataset, cfg: Config, members: list[str], seeds: int, holdout: float = HOLDOUT,
          top_n: int = TOP_N, device="cpu", log=print) -> cache.TeacherOutputs:
    """model_teacher with its report in the manifest's teacher record: the ensemble's own
    validation and test metrics, and in_sample_share (read afterwards: the outputs never see them)."""
    t, models = model_teacher(ds, cfg, members, seeds, holdout, top_n, device, log)
    own = {name: ensemble_metrics(models, getattr(ds, name), device) for name in ("val", "test")}
    share = in_sample_share(t, ds, cfg.K, t.manifest["teacher"]["fit_rows"])
    t.manifest["teacher"].update(metrics=own, target_in_top_k=share)
    return t


def in_cache_home(ds: data.Dataset, cfg: Config, seeds: int, device, log=print) -> cache.TeacherOutputs:
    """The single command's trained-model teacher (MEMBERS x seeds, cfg's training settings): read
    from its folder under the cache home when an earlier run made it, else built and written there."""
    top_n = min(TOP_N, ds.n_items)
    settings = {"members": MEMBERS, "seeds": seeds, "holdout": HOLDOUT, "top_n": top_n,
                **{k: getattr(cfg, k) for k in ("lr", "batch_size", "weight_decay", "epochs", "patience", "dim",
                                                "dropout", "alpha", "seed")}}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_home() / "teacher" / f"{ds.name}-{ds.fingerprint}-model-{'+'.join(MEMBERS)}x{seeds}-{key}"
    if not (path / "manifest.json").exists():
        log(f"trained-model teacher (not an LLM): {' + '.join(MEMBERS)} x {seeds} seed(s) fitted on the training "
            f"rows only; cache {path}", flush=True)
        t = build(ds, cfg, MEMBERS, seeds, HOLDOUT, top_n, device, log)
        cache.write_cache(path, ds, t.item_emb, t.splits, t.manifest["teacher"])
    return cache.read_cache(path, ds)


def cmd_model_teacher(args, ds) -> cache.TeacherOutputs:
    device = pick_device(args.device)
    cfg = Config(**{k: getattr(args, k) for k in ("lr", "batch_size", "weight_decay", "epochs", "patience", "dim",
                                                   "dropout", "alpha", "seed", "K")})
    if args.top_n > ds.n_items or args.top_n < max(cfg.K, REPORTED):
        raise UserError(f"--top-n {args.top_n}: must be at least --k {cfg.K} and {REPORTED} (its HR@{REPORTED}) and at "
                        f"most the {ds.n_items} items of {ds.name}")
    print(f"{ds.summary()}\ntrained-model teacher: {', '.join(args.students)} x {args.seeds} seeds, dim {cfg.dim}, "
          f"fitted on the first {1 - args.holdout:.0%} of the training rows, epochs selected on the last "
          f"{args.holdout:.0%}; validation and test rows unseen, on {device}", flush=True)
    t = build(ds, cfg, args.students, args.seeds, args.holdout, args.top_n, device)
    own, share = t.manifest["teacher"]["metrics"], t.manifest["teacher"]["target_in_top_k"]
    pop = {name: popularity_metrics(ds, getattr(ds, name)) for name in ("val", "test")}
    cols = [f"HR@{REPORTED}", f"NDCG@{REPORTED}"]
    print(format_rows(["", *(f"{s} {c}" for s in ("val", "test") for c in cols)], [
        [label] + [f"{m[s][c]:.4f}" for s in ("val", "test") for c in cols]
        for label, m in (("trained-model teacher", own), ("popularity (training targets)", pop))],
        notes=f"all {len(ds.val)} validation and {len(ds.test)} test rows (a report: the cache never reads them)"))
    print(f"training rows whose top-{cfg.K} holds their own target: " + ", ".join(
        f"{k} {v:.1%}" for k, v in share.items()))
    cache.write_cache(Path(args.out), ds, t.item_emb, t.splits, t.manifest["teacher"])
    print(f"wrote {args.out} (outputs checksum {cache.checksum(t)}): python dllm2rec.py train --teacher {args.out} "
          "distils it")
    return t


def flags(p) -> None:
    """model-teacher's options: the members, their training (Config's defaults), the held-out share."""
    p.add_argument("--students", type=choice_list(students.CHOICES), default=MEMBERS,
                   help="the members' kinds, comma-separated (each trained over --seeds seeds)")
    p.add_argument("--seeds", type=checked(int, between(1, 100)), default=3, help="seeds per member kind, from --seed")
    p.add_argument("--holdout", type=checked(float, lambda v: fraction(v) or (None if v > 0 else "must be > 0")),
                   default=HOLDOUT, help="the last share of the training rows held out to select each member's epoch")
    p.add_argument("--top-n", type=checked(int, between(1, 10**6)), default=TOP_N, help="candidates kept per row")
    p.add_argument("--out", required=True, help="the teacher cache folder to write")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda ...")
    add_flags(p.add_argument_group("the members' training"), Config,
                 only=["lr", "batch_size", "weight_decay", "epochs", "patience", "dim", "dropout", "alpha", "seed", "K"])
    preset(p, out_is_folder=True, epochs=300)
