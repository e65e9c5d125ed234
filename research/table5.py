"""`python -m research table5`: the paper's Table 5 on this data: each student undistilled, with
each distillation baseline (baselines.py: Hint, HTD, RD, CD, RRD, DCD, UnKD), with DLLM2Rec, and
with DLLM2Rec from the teacher's random twin (the floor: what advice that knows nothing gives),
over seeds and to convergence. Every method's weight is chosen on validation NDCG@20 from a grid:
DLLM2Rec's lam from --lams (the paper's lambda_d values), each baseline's from --kd-lams (their
losses differ in scale by orders of magnitude, so the grid spans them).

Gain.S and Gain.B are the paper's: DLLM2Rec's change in NDCG@20 (and HR@20) over the undistilled
student and over the best baseline, here the baseline of the best mean validation NDCG@20 (the
paper does not say how it picks; test would select on test). The families of Holm's correction,
declared in RESULTS before the runs:
- "table5 vs base":          every distilled line (baselines, DLLM2Rec, the floor) against the base;
- "table5 vs best baseline": DLLM2Rec against the best baseline, one comparison per student and teacher."""
from __future__ import annotations

from dataclasses import replace

import baselines
import cli
import runs
from common import UserError, choice_list, preset
from research import gates, teachers
from research.knowledge import finish, twin_of
from results import HR, NDCG, compare, correct, format_rows, lam_cell, pm, summarise

FAMILIES = ("table5 vs base", "table5 vs best baseline")
ORDER = ("hint", "htd", "rd", "cd", "rrd", "dcd", "unkd")          # the paper's rows: embedding, then ranking methods


def cmd_table5(args, ds) -> dict:
    p = cli.plan(args, ds, None)
    if not p.lams or not args.kd_lams:
        raise UserError("--lams and --kd-lams: every method's weight is chosen on validation; give a grid for each")
    printed = (len(p.students) * len(args.teachers) * (len(args.kds) + 2), len(p.students) * len(args.teachers))
    if args.declared and any(d < n for d, n in zip(args.declared, printed)):
        raise UserError(f"--declared {' '.join(map(str, args.declared))}: this command prints {printed[0]} and "
                        f"{printed[1]} comparisons; a declared family holds at least as many")
    if any(kind not in ("cache", "mix") for kind, _, _ in args.teachers):
        teachers.check_room(ds, p.cfg.K)
    counts = teachers.transition_counts(ds)
    good = teachers.good_candidates(ds, counts, p.cfg.K)
    made = []
    for spec in args.teachers:
        name, t = gates.make_teacher(spec, ds, p.cfg.K, p.cfg.seed, counts, good)
        if t.top_n < p.cfg.K:
            raise UserError(f"--k {p.cfg.K}: more than the {t.top_n} candidates per row {name} keeps")
        made.append((name, t, twin_of(t, ds, p.cfg.seed)))
    kd_grid = tuple(dict.fromkeys(args.kd_lams))
    per_teacher = 2 * len(p.lams) + len(args.kds) * len(kd_grid)
    clock = runs.RunClock(p.seeds * len(p.students) * (1 + per_teacher * len(made)), p.shard)
    print(f"{ds.summary()}\nTABLE 5: {', '.join(p.students)}; base, {', '.join(args.kds)}, DLLM2Rec and the random "
          f"twin's DLLM2Rec; lam from {', '.join(map(str, p.lams))} (DLLM2Rec), {', '.join(map(str, kd_grid))} "
          f"(baselines), chosen on validation; {p.seeds} seeds; {clock} on {p.device}", flush=True)
    every = runs.train(replace(p, lams=()), ds, None, [{}], clock=clock)
    for name, t, twin in made:
        print(f"\nteacher {name}: {t.source}", flush=True)
        tag = lambda rs, who: [{**r, "teacher_name": who} for r in rs]
        every += tag(runs.train(p, ds, t, [{"distilled": True}], clock=clock), name)
        every += tag(runs.train(p, ds, twin, [{"distilled": True, "label": "dllm2rec, random twin"}], clock=clock), name)
        every += tag(runs.train(replace(p, lams=kd_grid), ds, t, [{"distilled": True, "kd": m} for m in args.kds],
                                clock=clock), name)
    if runs.save_shard(p, args.out, ds, every):
        return {"runs": every}
    table = table5(every, made, p.lams, kd_grid, ds.test.user, dict(zip(FAMILIES, args.declared or ())))
    return finish(args.out, ds, "the paper's Table 5", format_table5(table, made), FAMILIES, table, every)


def best_baseline(lines: list[dict], pool: list[dict]) -> dict | None:
    """The baseline line of the best mean validation NDCG@20 (its runs at their chosen weight)."""
    def val(l):
        rs = [r for r in pool if r["config"]["student"] == l["student"] and r["variant"] == l["variant"]]
        return sum(r["val"][NDCG] for r in rs) / len(rs)
    found = [l for l in lines if l["variant"] in baselines.METHODS and l["variant"] != "dllm2rec"]
    return max(found, key=val) if found else None


def table5(every: list[dict], made: list, lams: tuple, kd_grid: tuple, users, declared: dict | None = None) -> list[dict]:
    """Per (student, teacher): its lines (each against the base), Gain.S and Gain.B with the
    comparison against the best baseline; Holm within each declared family (declared: {family:
    its declared size}, where this command prints only part of it)."""
    base = [r for r in every if not r["config"]["distilled"]]
    pick = lambda pool, s, v: [r for r in pool if r["config"]["student"] == s and r["variant"] == v]
    base_lines = {l["student"]: l for l in summarise(base, corrected=False)}
    blocks, comparisons = [], []
    for name, _, _ in made:
        mine = [r for r in every if r.get("teacher_name") == name]
        pool = runs.choose_lam([r for r in mine if r["config"].get("kd", "dllm2rec") == "dllm2rec"], lams) + \
            runs.choose_lam([r for r in mine if r["config"].get("kd", "dllm2rec") != "dllm2rec"], kd_grid)
        for s, b in base_lines.items():
            lines = summarise(pick(base, s, "base") + [r for r in pool if r["config"]["student"] == s], corrected=False)
            for l in lines:
                if l["variant"] != "base":
                    l["vs_base"] = {**compare(l, b, pick(pool, s, l["variant"]), pick(base, s, "base"), users),
                                    "family": FAMILIES[0]}
                    comparisons.append(l["vs_base"])
            full, best = next((l for l in lines if l["variant"] == "dllm2rec"), None), best_baseline(lines, pool)
            block = {"student": s, "teacher": name, "lines": lines, "best_baseline": best and best["variant"]}
            if full is not None:
                block["gain_s"] = {m: full[m] / b[m] - 1 for m in (HR, NDCG)}
            if full is not None and best is not None:
                block["gain_b"] = {m: full[m] / best[m] - 1 for m in (HR, NDCG)}
                block["vs_best"] = {**compare(full, best, pick(pool, s, "dllm2rec"), pick(pool, s, best["variant"]),
                                              users), "family": FAMILIES[1]}
                comparisons.append(block["vs_best"])
            blocks.append(block)
    correct(comparisons, declared)
    return blocks


def format_table5(blocks: list[dict], made: list) -> str:
    """The paper's layout per teacher (rows: methods; columns: each student's HR@20 and NDCG@20),
    then every comparison with its test and verdict."""
    out = []
    for name, t, _ in made:
        mine = [b for b in blocks if b["teacher"] == name]
        row_names = ["base", *[m for m in ORDER if any(l["variant"] == m for b in mine for l in b["lines"])],
                     "dllm2rec", "dllm2rec, random twin"]
        rows = [[v] + [cell for b in mine for cell in metric_cells(next((l for l in b["lines"] if l["variant"] == v),
                                                                        None))] for v in row_names]
        for gain in ("gain_s", "gain_b"):
            rows.append([{"gain_s": "Gain.S", "gain_b": "Gain.B"}[gain]] + [
                cell for b in mine for cell in ((f"{100 * b[gain][HR]:+.1f}%", f"{100 * b[gain][NDCG]:+.1f}%", None)
                                                if gain in b else (None, None, None))])
        own = t.manifest.get("teacher", {}).get("metrics", {}).get("test")
        head = [f"teacher {name}" + (f" (its own test HR@20 {own[HR]:.4f}, NDCG@20 {own[NDCG]:.4f})" if own else "")]
        out.append(format_rows(head + [f"{b['student']} {c}" for b in mine for c in (HR, NDCG, "lam")], rows))
        cmp_rows = []
        for b in mine:
            for l in b["lines"]:
                if "vs_base" in l:
                    cmp_rows.append([f"{b['student']} {l['variant']}", "base", *cells(l["vs_base"])])
            if "vs_best" in b:
                cmp_rows.append([f"{b['student']} dllm2rec", f"best baseline ({b['best_baseline']}, by validation)",
                                 *cells(b["vs_best"])])
        out.append(format_rows(["", "against", "change in NDCG@20", "p (Holm)", "verdict"], cmp_rows,
                               left=(0, 1, 4), notes=(
            "test metrics at the epoch of best validation NDCG@20, mean ± std over seeds; lam (val): each method's "
            "weight chosen on validation; Gain.S: DLLM2Rec over the base, Gain.B: over the best baseline (by "
            "validation). A gain or a loss needs both tests: beyond twice the combined seed std, and the Wilcoxon "
            "test over users with Holm's correction within its family (" + family_sizes(blocks) + ")")))
    return "\n\n".join(out)


def family_sizes(blocks: list[dict]) -> str:
    """Each family, with how many of its declared comparisons the table holds."""
    tests = [l["vs_base"] for b in blocks for l in b["lines"] if "vs_base" in l]
    tests += [b["vs_best"] for b in blocks if "vs_best" in b]
    sizes = {c["family"]: (c["paired"]["family_measured"], c["paired"]["family_size"]) for c in tests if c["paired"]}
    said = []
    for f in FAMILIES:
        held, declared = sizes.get(f, (0, 0))
        said.append(f"{f}: {held}" + (f" of its declared {declared}, the others counted as p = 1" if held < declared else ""))
    return "; ".join(said)


def metric_cells(l: dict | None) -> tuple:
    return (pm(l[HR], l[HR + "_std"]), pm(l[NDCG], l[NDCG + "_std"]), lam_cell(l)) if l else (None, None, None)


def cells(c: dict) -> list:
    return [f"{100 * c['change_NDCG@20']:+.1f}%", f"{c['paired']['p_holm']:.4f}" if c["paired"] else None, c["verdict"]]


def flags(p) -> None:
    cli.student_flags(p)
    p.add_argument("--teachers", type=gates.teacher_arg, nargs="+", required=True, metavar="TEACHER",
                   help="teacher cache folders (e.g. model-teacher's) or a synthetic teacher's quality (1: the "
                        "collaborative teacher); each gets a random twin as the floor")
    p.add_argument("--kds", type=choice_list(ORDER), default=list(ORDER), help=f"comma-separated, from {','.join(ORDER)}")
    cli.lam_grid_flag(p)
    p.add_argument("--kd-lams", type=float, nargs="+", metavar="LAM", default=[],
                   help="the baselines' weight grid (each chosen on validation NDCG@20)")
    p.add_argument("--declared", type=int, nargs=2, metavar=("VS_BASE", "VS_BEST"),
                   help="the two families' declared sizes (RESULTS), where this command prints part of them: "
                        "Holm counts the comparisons not printed as p = 1, so its p are upper bounds")
    cli.split_flags(p)
    preset(p, students=["sasrec", "dros"], seeds=3, epochs=300, lams=[0.1, 0.3, 0.7, 1.0], kd_lams=[0.01, 0.1, 1.0, 10.0])
