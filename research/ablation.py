"""The ablation table (the paper's Tables 8 and 9: base, full DLLM2Rec, each ablation) and the
differences-from-the-official-code table (full DLLM2Rec with each official switch), where the
ranking term acts on every row: synthetic teachers covering all training rows, every run to
convergence, over seeds, each change with the paired test."""
from __future__ import annotations

import copy
from dataclasses import fields
from pathlib import Path

import cli
import runs
import students
from common import write_json
from dllm2rec import ABLATIONS, Config
from research import plots, teachers
from results import correct, format_table, summarise

# the official switches measured per student: official_dro acts only with the DRO term, the others on any student
OFFICIAL_SWITCHES = {"plain": ("official_weights", "official_neg", "official_protocol"),
                     "dro": ("official_dro", "official")}


def ablation_variants(student: str, tables: list[str]) -> tuple[list[dict], dict]:
    """The runs of one student for the tables asked for, and what each is compared with:
    {variant: reference variant}."""
    variants, against = [{}, {"distilled": True}], {"dllm2rec": "base"}
    if "ablations" in tables:
        for a in ABLATIONS:
            variants.append({"distilled": True, "ablation": a})
            against[f"dllm2rec-{a}"] = "dllm2rec"
    if "differences" in tables:
        every = [f.name for f in fields(Config) if f.name.startswith("official_")]
        for switch in OFFICIAL_SWITCHES["dro" if students.parse_student(student)[1] else "plain"]:
            label = "dllm2rec --" + switch.replace("_", "-")
            over = {f: True for f in every} if switch == "official" else {switch: True}
            variants.append({"distilled": True, "label": label, **over})
            against[label] = "dllm2rec"
    return variants, against


def cmd_ablation(args, ds) -> dict:
    p = cli.plan(args, ds, None)
    teachers.check_room(ds, p.cfg.K)
    plots.check_plot(args.plot)
    counts = teachers.transition_counts(ds)
    good = teachers.good_candidates(ds, counts, p.cfg.K)
    plans = {s: ablation_variants(s, args.tables) for s in p.students}
    clock = runs.RunClock(len(args.qualities) * p.seeds * sum(len(v) for v, _ in plans.values()), p.shard)
    print(f"{ds.summary()}\nDIAGNOSTIC teachers from the training rows' transitions covering all {len(ds.train)} "
          f"training rows, qualities {', '.join(map(str, args.qualities))}, {args.confidence} confidence; "
          f"{', '.join(p.students)}; {p.seeds} "
          f"seeds; until validation NDCG@20 has not improved for {p.cfg.patience} epochs (at most {p.cfg.epochs}); "
          f"{clock} on {p.device}")
    against = {k: v for _, a in plans.values() for k, v in a.items()}
    out = {}
    for q in args.qualities:
        t = teachers.synthetic_teacher(ds, q, p.cfg.K, args.confidence, p.cfg.seed, counts, good)
        print(f"\nteacher: {t.source}, covers {len(t.splits['train'].rows)} of {len(ds.train)} training rows",
              flush=True)
        trained = runs.train(p, ds, t, {s: v for s, (v, _) in plans.items()}, clock=clock)
        if p.shard:
            out[str(q)] = {"runs": trained}
            continue
        summary, tables = summarise(trained, against, ds.test.user, corrected=False), {}
        for table in args.tables:          # Holm's correction over each printed table's comparisons
            tables[table] = keep = copy.deepcopy([l for l in summary if table == "ablations" and "--" not in l["variant"]
                                                  or table == "differences" and (l["variant"] == "dllm2rec" or "--" in l["variant"])])
            correct([l for l in keep if l["against"]])
            print(f"\n{table} on {ds.name}, teacher quality {q} ({'random' if q == 0 else 'synthetic'}, "
                  f"{args.confidence} confidence), all {len(ds.test)} test rows")
            print(format_table(keep))
        out[str(q)] = {"summary": [l for keep in tables.values() for l in keep], "tables": tables, "runs": trained}
        if args.plot:
            path = Path(args.plot)
            plots.plot_ablation(summary, f"{ds.name}, teacher quality {q}, {p.seeds} seeds",
                                path.with_name(f"{path.stem}-q{q}{path.suffix or '.png'}"))
    if runs.save_shard(p, args.out, ds, [r for q in out.values() for r in q["runs"]]):
        return out
    if args.out:
        write_json(Path(args.out), {"dataset": ds.name, "fingerprint": ds.fingerprint, "tables": args.tables,
                                    "qualities": out})
    return out
