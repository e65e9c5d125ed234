"""`python -m research knowledge`: does the student learn what its teacher *knows*?

On ML-100K a teacher that knows nothing already lifts SASRec about 8%, so a lift over the
undistilled student says little by itself (SPEC 8, controls). For each teacher cache this
command trains, over seeds and to convergence:
- each student's base (no teacher);
- full DLLM2Rec with the teacher and with its random twin (teachers.random_twin: the same rows,
  K and distances, random candidates, noise item features of the same size and scale), `lam`
  chosen on validation from --lams for each, as the paper tunes lambda_d: the control gets the
  same chance;
- the ablations with the teacher (--ablation-students), at the lam chosen for its full DLLM2Rec.

The families of Holm's correction, one per claim, fixed here and so the same whatever else a
table holds (RESULTS declares them before the runs):
- "lift":      full DLLM2Rec with each teacher against the base, over every student and teacher;
- "knowledge": full DLLM2Rec with each teacher against its random twin, over every student and
               teacher (the paper's claim as a teacher's knowledge);
- "control":   full DLLM2Rec with each random twin against the base;
- "parts":     each ablation against full DLLM2Rec with the same teacher, over every student;
- "parts vs base": each ablation against the base.
Beside them, the title claim: the teacher's own test metrics (its cache's report) beside the
students'."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cache
import cli
import runs
from common import UserError, choice_list, preset, write_json
from dllm2rec import ABLATIONS
from research import teachers
from results import HR, NDCG, compare, correct, format_rows, lam_cell, pm, summarise

FAMILIES = ("lift", "knowledge", "control", "parts", "parts vs base")


def twin_of(t: cache.TeacherOutputs, ds, seed: int) -> cache.TeacherOutputs:
    return teachers.random_twin(t, ds.n_items, seed)


def all_found(p: runs.Plan, ds, t, variants) -> list[dict] | None:
    """Every run of variants with teacher t, trained here or in --reuse's files, or None while
    one is missing (a shard sees only its own runs: the others come from --reuse)."""
    found = runs.train(replace(p, shard=None, reuse_only=True), ds, t, variants, say=lambda *_, **__: None)
    need = len(p.students) * p.seeds * sum(len(runs.with_lam_grid(v, p.cfg, p.lams)) for v in variants)
    return found if len(found) == need else None


def cmd_knowledge(args, ds) -> dict:
    p = cli.plan(args, ds, None)
    if not p.lams:
        raise UserError("--lams: the knowledge table chooses lam on validation for the teacher and its twin alike; "
                        "give a grid, e.g. --lams 0.1 0.3 0.7 1.0 (a single value fixes it)")
    bad = [s for s in args.ablation_students if s not in p.students]
    if bad:
        raise UserError(f"--ablation-students {','.join(bad)}: not among --students {','.join(p.students)}")
    made = []
    for path in args.teachers:
        t = cache.load_teacher(path, ds)
        if t.top_n < p.cfg.K:
            raise UserError(f"--k {p.cfg.K}: more than the {t.top_n} candidates per row {path} keeps")
        made.append((Path(path).name, t, twin_of(t, ds, p.cfg.seed)))
    full = [{"distilled": True}]
    ablations = {s: [{"distilled": True, "ablation": a} for a in args.ablations] if s in args.ablation_students else []
                 for s in p.students}
    n_grid = len(runs.with_lam_grid(full[0], p.cfg, p.lams))
    clock = runs.RunClock(p.seeds * (len(p.students) * (1 + 2 * n_grid * len(made)) +
                                     len(made) * sum(len(v) for v in ablations.values())), p.shard)
    print(f"{ds.summary()}\nKNOWLEDGE: each teacher against its random twin; {', '.join(p.students)}; {p.seeds} seeds; "
          f"lam chosen on validation from {', '.join(map(str, p.lams))}; until validation NDCG@20 has not improved for "
          f"{p.cfg.patience} epochs (at most {p.cfg.epochs}); {clock} on {p.device}", flush=True)
    every = runs.train(replace(p, lams=()), ds, None, [{}], clock=clock)
    waiting = []
    for name, t, twin in made:
        print(f"\nteacher {name}: {t.source}\ntwin: {twin.source}", flush=True)
        every += [{**r, "teacher_name": name} for r in runs.train(p, ds, t, full, clock=clock)]
        every += [{**r, "teacher_name": f"{name} (random twin)"} for r in runs.train(p, ds, twin, full, clock=clock)]
    for name, t, twin in made if any(ablations.values()) else []:   # the ablations at full DLLM2Rec's lam
        grid = all_found(p, ds, t, full) if p.shard else [r for r in every if r.get("teacher_name") == name]
        if grid is None:
            waiting.append(name)
            continue
        chosen = {r["config"]["student"]: r["lam_chosen"] for r in runs.choose_lam(grid, p.lams)}
        variants = {s: [{**v, "lam": chosen[s]} for v in ablations[s]] for s in p.students}
        every += [{**r, "teacher_name": name} for r in runs.train(replace(p, lams=()), ds, t, variants, clock=clock)]
    if waiting:
        print(f"the ablations with {', '.join(waiting)} wait for the lam grid's runs of every shard: run the shards "
              "again with --reuse of their files", flush=True)
    if runs.save_shard(p, args.out, ds, every):
        return {"runs": every}
    table = knowledge_table(every, made, p.lams, ds.test.user)
    return finish(args.out, ds, "knowledge", format_knowledge_table(table, made), FAMILIES, table, every)


def finish(out: str | None, ds, title: str, text: str, families: tuple, table, every: list[dict]) -> dict:
    """Print a table of declared families, and write it with its runs to out (if given)."""
    print(f"\n{title} on {ds.name}, all {len(ds.test)} test rows\n{text}")
    if out:
        write_json(Path(out), {"dataset": ds.name, "fingerprint": ds.fingerprint, "families": families,
                               "table": table, "runs": every})
    return {"table": table, "runs": every}


def knowledge_table(every: list[dict], made: list, lams: tuple, users) -> list[dict]:
    """One line per (student, teacher, variant): its comparisons (against the base, the twin, full
    DLLM2Rec), each tagged with its family; Holm's correction within each family."""
    base = [r for r in every if not r["config"]["distilled"]]
    lines, comparisons = [], []
    pick = lambda pool, s, v: [r for r in pool if r["config"]["student"] == s and r["variant"] == v]
    base_lines = {l["student"]: l for l in summarise(base, corrected=False)}
    for l in base_lines.values():
        lines.append({**l, "teacher": "", "vs": {}})
    for name, _, _ in made:
        mine = runs.choose_lam([r for r in every if r.get("teacher_name") == name], lams)
        twin = runs.choose_lam([r for r in every if r.get("teacher_name") == f"{name} (random twin)"], lams)
        for who, pool in ((name, mine), (f"{name} (random twin)", twin)):
            for l in summarise(pool, corrected=False):
                s, v = l["student"], l["variant"]
                out = {**l, "teacher": who, "vs": {}}
                tests = [("base", base_lines.get(s), pick(base, s, "base"),
                          "lift" if pool is mine and v == "dllm2rec" else "control" if v == "dllm2rec" else "parts vs base")]
                if pool is mine and v == "dllm2rec":
                    twin_line = next((x for x in summarise(pick(twin, s, v), corrected=False)), None)
                    tests.append(("twin", twin_line, pick(twin, s, v), "knowledge"))
                elif pool is mine:
                    full_line = next((x for x in summarise(pick(mine, s, "dllm2rec"), corrected=False)), None)
                    tests.append(("full", full_line, pick(mine, s, "dllm2rec"), "parts"))
                for ref, ref_line, ref_runs, family in tests:
                    if ref_line is not None and ref_line[NDCG] > 0:
                        c = {**compare(l, ref_line, pick(pool, s, v), ref_runs, users), "family": family}
                        out["vs"][ref] = c
                        comparisons.append(c)
                lines.append(out)
    correct(comparisons)
    return lines


def format_knowledge_table(lines: list[dict], made: list) -> str:
    """Per student: the base, then per teacher its full DLLM2Rec (against the base and its twin),
    the twin's (against the base), the ablations (against full and the base); the teachers' own
    test metrics after."""
    def cells(c):
        if c is None:
            return [None, None, None]
        p = f"{c['paired']['p_holm']:.4f}" if c["paired"] else None
        return [f"{100 * c['change_NDCG@20']:+.1f}%", p, c["verdict"]]
    rows = []
    for l in sorted(lines, key=lambda l: (l["student"], l["teacher"] != "", l["teacher"], l["variant"] != "dllm2rec")):
        star = "" if l["converged"] else " *"
        other = l["vs"].get("twin") or l["vs"].get("full")
        rows.append([f"{l['student']} {l['variant']}", l["teacher"], lam_cell(l), l["seeds"],
                     pm(l[HR], l[HR + "_std"]), pm(l[NDCG], l[NDCG + "_std"]) + star, *cells(l["vs"].get("base")),
                     ("vs twin" if "twin" in l["vs"] else "vs full" if other else None), *cells(other)])
    own = [[name, f"{m['test'][HR]:.4f}", f"{m['test'][NDCG]:.4f}"] for name, t, _ in made
           if (m := t.manifest.get("teacher", {}).get("metrics"))]
    text = format_rows(["", "teacher", "lam", "seeds", HR, NDCG, "vs base", "p (Holm)", "verdict", "", "change",
                        "p (Holm)", "verdict"], rows, left=(0, 1, 8, 9, 12), notes=(
        "test metrics at the epoch of best validation NDCG@20, mean ± std over seeds (*: a seed stopped at the epoch "
        "cap); lam (val): chosen on validation NDCG@20, the ablations at full DLLM2Rec's. A gain or a loss needs "
        "both tests, in the statistic's direction: beyond twice the combined seed std, and the Wilcoxon signed-rank "
        "test over users with Holm's correction within its family (" + ", ".join(
            f"{f}" for f in FAMILIES) + ": research/knowledge.py)"))
    if own:
        text += "\n\nthe teachers' own test metrics (the title claim: does the student close the gap?)\n" + format_rows(
            ["teacher", HR, NDCG], own)
    return text


def flags(p) -> None:
    cli.student_flags(p)
    p.add_argument("--teachers", nargs="+", required=True, metavar="CACHE",
                   help="teacher cache folders (e.g. model-teacher's); each gets a random twin")
    p.add_argument("--ablation-students", type=lambda s: [x for x in s.split(",") if x], default=["sasrec", "dros"],
                   help="comma-separated students that also run the ablations with each teacher (those not in "
                        "--students are refused)")
    p.add_argument("--ablations", type=choice_list(ABLATIONS), default=list(ABLATIONS),
                   help=f"comma-separated, from {','.join(ABLATIONS)}")
    cli.lam_grid_flag(p)
    cli.split_flags(p)
    preset(p, students=["sasrec", "gru4rec", "dros"], seeds=3, epochs=300, lams=[0.1, 0.3, 0.7, 1.0])
