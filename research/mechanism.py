"""The mechanism check: the distillation gain from synthetic teachers of known quality. For
each teacher, the student four ways (full DLLM2Rec, uniform weights w_r = 1/K, ranking
distillation only, embedding distillation only), each against the undistilled student with
the paired test, and full DLLM2Rec against uniform weights."""
from __future__ import annotations

import math
from pathlib import Path

import cli
import runs
from common import UserError, write_json
from dllm2rec import Config
from research import plots, teachers
from results import P_LEVEL, compare, correct, format_rows, summarise

# a cell of a table printed with --reuse-only whose runs are not there yet
MISSING = {"NDCG@20": math.nan, "change_NDCG@20": None, "verdict": "missing", "converged": True, "paired": None}
VARIANTS = (("full", "full DLLM2Rec", "none"), ("uniform", "uniform w_r", "no_weights"),
            ("ranking", "ranking only", "no_embed"), ("embedding", "embedding only", "no_rank"))


def make_teachers(ds, qualities, K: int, confidence: str, seed: int) -> list[tuple[str, object]]:
    """(name, teacher): one diagnostic teacher per entry of qualities (a quality, or "mixed")."""
    counts = teachers.transition_counts(ds)
    good = teachers.good_candidates(ds, counts, K)
    return [("mixed", teachers.mixed_teacher(ds, K, confidence, seed)) if q == "mixed" else
            (f"{q:.2f}", teachers.synthetic_teacher(ds, q, K, confidence, seed, counts, good)) for q in qualities]


def cmd_mechanism(args, ds) -> dict:
    if len(args.students) > 1:
        raise UserError(f"--students {','.join(args.students)}: the mechanism check trains one student")
    if args.converged:                       # the method's patience; an explicit larger --epochs is kept
        args.epochs, args.patience = max(args.epochs, Config.epochs), Config.patience
    p = cli.plan(args, ds, None)
    teachers.check_room(ds, p.cfg.K)
    plots.check_plot(args.plot)
    cfg = p.cfg
    short = cfg.epochs < Config.epochs or cfg.patience < Config.patience
    student, made = args.students[0], make_teachers(ds, args.qualities, cfg.K, args.confidence, cfg.seed)
    chosen = [(label, a) for key, label, a in VARIANTS if key in args.variants]
    variants = [{"distilled": True, "ablation": a, "label": label} for label, a in chosen]
    clock = runs.RunClock(p.seeds * (1 + len(made) * len(variants)), p.shard)
    print(f"{ds.summary()}\nDIAGNOSTIC: synthetic teachers from the training rows' transitions, covering every "
          f"training row, {args.confidence} confidence. {student}, {p.seeds} seeds, until validation NDCG@20 has "
          f"not improved for {cfg.patience} epochs (at most {cfg.epochs}"
          f"{', short of convergence: --converged trains to it' if short else ''}); test NDCG@20; {clock} on {p.device}")
    base_runs = runs.train(p, ds, None, [{}], clock=clock)
    all_runs, teacher_runs = list(base_runs), {}
    for name, t in made:
        print(f"\nteacher: {t.source}", flush=True)
        teacher_runs[name] = runs.train(p, ds, t, variants, clock=clock)
        all_runs += [{**r, "teacher_name": name} for r in teacher_runs[name]]
    if runs.save_shard(p, args.out, ds, all_runs):
        return {"runs": all_runs}
    if not base_runs:
        raise UserError("--reuse-only: no base run found; the mechanism table compares every cell with it")
    against = {label: "base" for label, _ in chosen}
    both = {"full", "uniform"} <= set(args.variants)          # full DLLM2Rec against uniform weights
    table, users = {}, ds.test.user
    for name, trained in teacher_runs.items():
        lines = {l["variant"]: l for l in summarise(base_runs + trained, against, users, corrected=False)}
        table[name] = {"cells": {label: lines.get(label, MISSING) for label, _ in chosen}}
        if both and {"full DLLM2Rec", "uniform w_r"} <= set(lines):
            full, uniform = (lines[v] for v in ("full DLLM2Rec", "uniform w_r"))
            pick = lambda v: [r for r in trained if r["variant"] == v]
            table[name]["full_vs_uniform"] = compare(full, uniform, pick(full["variant"]), pick(uniform["variant"]), users)
        elif both:
            table[name]["full_vs_uniform"] = MISSING
    correct([c for row in table.values() for c in [*row["cells"].values(), row.get("full_vs_uniform")]
             if c and c is not MISSING])
    base = summarise(base_runs)[0]
    print(f"\nbase {student}: test NDCG@20 {base['NDCG@20']:.4f} ± {base['NDCG@20_std']:.4f} over {base['seeds']} seeds "
          f"(selected epochs {base['epochs']}){'' if base['converged'] else ' *'}")
    print(f"{args.confidence} confidence (README: the research diagnostics); quality q: round(q K) of each row's "
          f"K = {cfg.K} candidates are good")
    print(format_table(table, [label for label, _ in chosen], both, cfg.epochs, base["converged"]))
    out = {"base": base, "teachers": table, "confidence": args.confidence, "epochs": cfg.epochs, "patience": cfg.patience, "seeds": p.seeds,
           "runs": all_runs}
    if args.plot:
        plots.plot_mechanism(table, base, Path(args.plot))
    if args.out:
        write_json(Path(args.out), out)
    return out


def format_table(table: dict, labels: list[str], both: bool, epochs: int, base_converged: bool) -> str:
    """One line per teacher: each variant's test NDCG@20 (* a seed stopped at the epoch cap), its
    change over the base and verdict; then full DLLM2Rec against uniform weights."""
    pct = lambda c: f"{100 * c:+.1f}%" if c is not None else "(base 0)"          # a change over 0 is none
    rows = []
    for name, row in table.items():
        cells = [name]
        for c in row["cells"].values():
            cells += (["missing", None, None] if c is MISSING else
                      [f"{c['NDCG@20']:.4f}{'' if c['converged'] else '*'}", pct(c["change_NDCG@20"]), c["verdict"]])
        if both:
            fu = row["full_vs_uniform"]
            cells += (["missing", None, None] if fu is MISSING else
                      [pct(fu["change_NDCG@20"]), f"p {fu['paired']['p_holm'] if fu['paired'] else math.nan:.3f}",
                       fu["verdict"]])
        rows.append(cells)
    header = ["teacher"] + [h for label in labels for h in (label, "change", "verdict")]
    header += ["full vs uniform", "paired", "verdict"] if both else []
    capped = not (base_converged and all(c["converged"] for row in table.values() for c in row["cells"].values()))
    return format_rows(header, rows, notes=(
        "cells: test NDCG@20, its change over the base student and the verdict (beyond twice the combined seed "
        f"std AND paired p < {P_LEVEL} after Holm's correction over the table's comparisons, in the statistic's "
        "direction); full vs uniform: full DLLM2Rec against uniform weights w_r = 1/K"
        + (f"; *: a seed stopped at the epoch cap ({epochs}), not converged" if capped else "")))
