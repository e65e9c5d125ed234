"""The row-gate table (beyond the paper: README, "A row gate"): for each teacher, full DLLM2Rec
and full DLLM2Rec with each row gate (`--row-gate`), every run to convergence over seeds; each
gated student (and uniform weights, --uniform) against full DLLM2Rec and against the undistilled
base, full DLLM2Rec against the base, with the per-user paired test and Holm's correction within
each family, declared here (RESULTS declares each before its runs):
- "filter":         each gated or uniform line against full DLLM2Rec with the same teacher (do
                    the weights, or a gate, filter the teacher's bad advice?);
- "filter vs base": every distilled line against the undistilled student.

The goal, stated before the runs: with a random teacher a gated student is within noise of the
base; with the mixed teacher (right on half the rows) a gate is a gain over full DLLM2Rec; with
a good teacher it costs nothing (not a loss against full DLLM2Rec)."""
from __future__ import annotations

import argparse

from dataclasses import replace
from pathlib import Path

import cache
import cli
import runs
from common import UserError, write_json
from dllm2rec import ROW_GATES, row_gates
from research import teachers
from results import compare, correct, format_rows, pm, summarise

GATES = tuple(g for g in ROW_GATES if g != "off")
FAMILIES = {"dllm2rec": "filter", "base": "filter vs base"}   # the reference -> its family


def teacher_spec(text: str) -> tuple[str, str | float | tuple, str]:
    """--teachers' entries: a quality in [0, 1] or "mixed", each with an optional ":flat" or
    ":honest" (default honest), a teacher cache folder, or "mix:GOOD,BAD[:flat]", two cache
    folders mixed row by row (teachers.mixed_of) -> (kind, quality, path or paths, confidence)."""
    if text.startswith("mix:"):
        paths, conf = text[4:], "honest"
        if paths.rpartition(":")[2] in teachers.CONFIDENCE:
            paths, _, conf = paths.rpartition(":")
        folders = tuple(paths.split(","))
        if len(folders) != 2 or not all(Path(f).is_dir() for f in folders):
            raise ValueError(f"{text!r}: mix: takes two teacher cache folders, GOOD,BAD")
        return "mix", folders, conf
    head, _, conf = text.partition(":")
    if conf and conf not in teachers.CONFIDENCE:
        raise ValueError(f"{text!r}: confidence {conf!r}, one of {', '.join(teachers.CONFIDENCE)}")
    if head == "mixed":
        return "mixed", "mixed", conf or "honest"
    try:
        q = float(head)
    except ValueError:
        q = None
    if q is not None:
        if not 0 <= q <= 1:
            raise ValueError(f"{text!r}: a quality must be in [0, 1]")
        return "synthetic", q, conf or "honest"
    if conf or not Path(text).is_dir():
        raise ValueError(f"{text!r}: neither a quality, 'mixed' nor a teacher cache folder")
    return "cache", text, ""


def teacher_arg(text: str) -> tuple:
    """An argparse type of teacher_spec."""
    try:
        return teacher_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def make_teacher(spec: tuple, ds, K: int, seed: int, counts, good) -> tuple[str, cache.TeacherOutputs]:
    """(the table's name, the teacher) of one teacher_spec."""
    kind, value, conf = spec
    if kind == "mixed":
        return f"mixed, {conf}", teachers.mixed_teacher(ds, K, conf, seed)
    if kind == "mix":
        good, bad = (cache.load_teacher(f, ds) for f in value)
        return f"mixed {Path(value[0]).name}/{Path(value[1]).name}, {conf}", teachers.mixed_of(good, bad, conf, seed)
    if kind == "synthetic":
        name = "random" if value == 0 else f"quality {value:g}"
        return f"{name}, {conf}", teachers.synthetic_teacher(ds, value, K, conf, seed, counts, good)
    return Path(value).name, cache.load_teacher(value, ds)


def cmd_gates(args, ds) -> dict:
    p = cli.plan(args, ds, None)
    if p.cfg.row_gate != "off":
        raise UserError(f"--row-gate {p.cfg.row_gate}: the gates command sets each run's gate itself (--gates)")
    K = p.cfg.K
    if any(kind not in ("cache", "mix") for kind, _, _ in args.teachers):
        teachers.check_room(ds, K)
    counts = teachers.transition_counts(ds)
    good = teachers.good_candidates(ds, counts, K)
    made = [make_teacher(spec, ds, K, p.cfg.seed, counts, good) for spec in args.teachers]
    for name, t in made:
        if t.top_n < K:
            raise UserError(f"--k {K}: more than the {t.top_n} candidates per row teacher {name} keeps")
    variants = [{"distilled": True}] + [{"distilled": True, "row_gate": g} for g in args.gates]
    variants += [{"distilled": True, "ablation": "no_weights"}] if args.uniform else []
    clock = runs.RunClock(p.seeds * len(p.students) * (1 + len(made) * len(variants)), p.shard)
    print(f"{ds.summary()}\nROW GATES (beyond the paper) {', '.join(args.gates)}, floor {p.cfg.gate_floor}; "
          f"teachers: {'; '.join(t.source for _, t in made)}; {', '.join(p.students)}; {p.seeds} seeds; until "
          f"validation NDCG@20 has not improved for {p.cfg.patience} epochs (at most {p.cfg.epochs}); {clock} on "
          f"{p.device}", flush=True)
    base = runs.train(p, ds, None, [{}], clock=clock)
    per_teacher = {}
    for name, t in made:
        print(f"\nteacher {name}: {t.source}\n{describe_gates(p.cfg, t, ds, args.gates)}", flush=True)
        per_teacher[name] = runs.train(p, ds, t, variants, clock=clock)
    every = base + [{**r, "teacher_name": name} for name, rs in per_teacher.items() for r in rs]
    if runs.save_shard(p, args.out, ds, every):
        return {"runs": every}
    table = gate_table(base, per_teacher, ds.test.user)
    print(f"\nrow gates on {ds.name}, all {len(ds.test)} test rows")
    print(format_gate_table(table))
    if args.out:
        write_json(Path(args.out), {"dataset": ds.name, "fingerprint": ds.fingerprint, "gates": args.gates,
                                    "gate_floor": p.cfg.gate_floor, "table": table, "runs": every})
    return {"table": table, "runs": every}


def describe_gates(cfg, t: cache.TeacherOutputs, ds, gates: list[str]) -> str:
    """What each gate does to this teacher's covered training rows, before any batch scaling:
    its mean, and the share of rows at the floor (the target gate: the list misses the target)."""
    covered = t.splits["train"].rows
    parts = []
    for g in gates:
        v = row_gates(replace(cfg, row_gate=g), t, ds.train.target).numpy()[covered]
        parts.append(f"{g} gate mean {v.mean():.3f}, at the floor ({cfg.gate_floor}) on "
                     f"{100 * (v <= cfg.gate_floor + 1e-6).mean():.1f}% of its {len(covered)} covered rows")
    return "; ".join(parts)


def same_runs(a: list[dict], b: list[dict]) -> bool:
    """Two lines of the same runs, seed for seed (e.g. a gate that is 1 on every row): the same
    test ranks, so a comparison between them tests nothing."""
    key = lambda rs: sorted((r["seed"], tuple(r["test_ranks"])) for r in rs)
    return key(a) == key(b)


def gate_table(base: list[dict], per_teacher: dict, users) -> list[dict]:
    """One line per (student, teacher, variant) with its comparisons: full DLLM2Rec against the
    base; each gated variant against full DLLM2Rec and against the base. Holm within each of
    FAMILIES, each distinct comparison counted once: one between the same runs is no test ("same
    runs"), and one of the same runs as another (a gated line equal to full DLLM2Rec, against the
    base) shares it."""
    lines, comparisons, seen = [], [], []
    for name, trained in per_teacher.items():
        summary = summarise(base + trained, corrected=False)
        by = {(l["student"], l["variant"]): l for l in summary}
        pick = lambda s, v, pool: [r for r in pool if r["config"]["student"] == s and r["variant"] == v]
        for (student, variant), line in by.items():
            refs = [] if variant == "base" else ["base"] if variant == "dllm2rec" else ["dllm2rec", "base"]
            out = {k: line[k] for k in ("student", "variant", "seeds", "epochs", "converged", "HR@20", "NDCG@20",
                                        "NDCG@20_std")}
            out.update(teacher=name, vs={})
            for ref in refs:
                if (student, ref) in by:
                    mine, theirs = pick(student, variant, trained), pick(student, ref, base if ref == "base" else trained)
                    if same_runs(mine, theirs):
                        out["vs"][ref] = {"change_NDCG@20": 0.0, "paired": None, "verdict": "same runs"}
                        continue
                    twin = next((c for a, b, c in seen if same_runs(a, mine) and same_runs(b, theirs)), None)
                    c = twin if twin is not None else {**compare(line, by[student, ref], mine, theirs, users),
                                                       "family": FAMILIES[ref]}
                    out["vs"][ref] = c
                    if twin is None:
                        seen.append((mine, theirs, c))
                        comparisons.append(c)
            lines.append(out)
    correct(comparisons)
    return lines


def format_gate_table(lines: list[dict]) -> str:
    """The base once per student, then per teacher: full DLLM2Rec and each gate, with the change
    in NDCG@20, the Holm-corrected p and the verdict against full DLLM2Rec and the base."""
    def cells(c):
        if c is None:
            return [None, None, None]
        p = f"{c['paired']['p_holm']:.4f}" if c["paired"] else None
        return [f"{100 * c['change_NDCG@20']:+.1f}%", p, c["verdict"]]
    rows, seen_base = [], set()
    for l in lines:
        if l["variant"] == "base":
            if l["student"] in seen_base:
                continue
            seen_base.add(l["student"])
        star = "" if l["converged"] else " *"
        teacher = "" if l["variant"] == "base" else l["teacher"]
        rows.append([f"{l['student']} {l['variant']}", teacher, l["seeds"], pm(l["NDCG@20"], l["NDCG@20_std"]) + star,
                     *cells(l["vs"].get("dllm2rec")), *cells(l["vs"].get("base"))])
    unit = next((c["paired"]["unit"] for l in lines for c in l["vs"].values() if c["paired"]), "rows")
    return format_rows(["", "teacher", "seeds", "NDCG@20", "vs full", "p (Holm)", "verdict", "vs base", "p (Holm)",
                        "verdict"], rows, left=(0, 1, 6, 9), notes=(
        "test NDCG@20 at the epoch of best validation NDCG@20, mean ± std over seeds (*: a seed stopped at the "
        "epoch cap); vs full: against full DLLM2Rec with the same teacher, vs base: against the undistilled "
        "student. A gain or a loss needs both tests, in the statistic's direction: beyond twice the combined "
        f"seed std, and the Wilcoxon signed-rank test over {unit} with Holm's correction within its family ("
        + ", ".join(f"{f}: against {'full DLLM2Rec' if r == 'dllm2rec' else 'the base'}" for r, f in FAMILIES.items())
        + ")"))
