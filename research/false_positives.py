"""`python -m research false-positives`: how often the verdict rule calls a gain or a loss
between runs of one configuration that differ only in the seed (SPEC 8: the per-user test alone
ignores seed variance). Each configuration (the base, full DLLM2Rec with a teacher) is trained
over 2m seeds; every split of them into two groups of m is compared as a table compares two
lines (results.false_positive_rate). A rule worth trusting calls few of them."""
from __future__ import annotations

import argparse
from pathlib import Path

import cli
import runs
from common import UserError, preset, write_json
from research import gates, teachers
from results import false_positive_rate, format_rows

RATES = ("rule", "paired alone", "seeds alone", "rule, bootstrap", "bootstrap alone")


def cmd_false_positives(args, ds) -> dict:
    p = cli.plan(args, ds, None)
    if p.seeds < 4 or p.seeds % 2:
        raise UserError(f"--seeds {p.seeds}: an even number, at least 4 (two groups of at least 2 seeds each)")
    kind, _, _ = args.teacher
    if kind not in ("cache", "mix"):
        teachers.check_room(ds, p.cfg.K)
    counts = teachers.transition_counts(ds)
    name, t = gates.make_teacher(args.teacher, ds, p.cfg.K, p.cfg.seed, counts, teachers.good_candidates(ds, counts, p.cfg.K))
    clock = runs.RunClock(2 * p.seeds * len(p.students), p.shard)
    print(f"{ds.summary()}\nFALSE POSITIVES of the verdict rule: {', '.join(p.students)}, base and full DLLM2Rec with "
          f"teacher {name}, {p.seeds} seeds each, every split into two groups of {p.seeds // 2}; {clock}", flush=True)
    every = runs.train(p, ds, None, [{}], clock=clock) + runs.train(p, ds, t, [{"distilled": True}], clock=clock)
    if runs.save_shard(p, args.out, ds, every):
        return {"runs": every}
    rows, found = [], {}
    for student in p.students:
        for variant in ("base", "dllm2rec"):
            rs = sorted((r for r in every if r["config"]["student"] == student and r["variant"] == variant),
                        key=lambda r: r["seed"])
            if len(rs) < 4:
                continue
            f = found[f"{student} {variant}"] = false_positive_rate(rs, ds.test.user)
            rows.append([f"{student} {variant}", f["seeds"], f["splits"], *(f"{f[k]:.1%}" for k in RATES)])
    total = sum(f["splits"] for f in found.values())
    pooled = {k: sum(f[k] * f["splits"] for f in found.values()) / max(total, 1) for k in RATES}
    rows.append(["all", None, total, *(f"{pooled[k]:.1%}" for k in RATES)])
    print(format_rows(["same configuration, seeds split in two", "seeds", "splits", "rule (both tests)",
                       "per-user test alone", "seeds alone", "rule, bootstrap", "bootstrap alone"], rows, notes=(
        "the share of splits called a gain or a loss (one comparison each, no correction): the rule needs p < 0.05 "
        "in the Wilcoxon signed-rank test over users AND a change beyond twice the combined std of the groups' "
        "seeds; bootstrap: the seed-aware test (over seeds and users) in the Wilcoxon test's place")))
    if args.out:
        write_json(Path(args.out), {"dataset": ds.name, "fingerprint": ds.fingerprint, "rates": found,
                                    "pooled": pooled, "runs": every})
    return {"rates": found, "pooled": pooled, "runs": every}


def flags(p) -> None:
    cli.student_flags(p)
    def spec(text):
        try:
            return gates.teacher_spec(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    p.add_argument("--teacher", type=spec, default=gates.teacher_spec("0"),
                   help="the teacher of the full DLLM2Rec runs: a synthetic quality (0: random), 'mixed', or a "
                        "teacher cache folder (default 0)")
    cli.split_flags(p)
    preset(p, students=["sasrec"], seeds=6, epochs=300)
