"""Teachers side by side: each teacher's HR@20 / NDCG@20 and share of catalogue-title answers,
and undistilled students on the same validation and test rows, at the epoch their full
validation selects."""
from __future__ import annotations

import numpy as np

import cache
import cli
import data
import runs
import teacher as teacher_llm
from results import format_rows


def cmd_compare(args, ds) -> dict:
    made = {f"teacher {i + 1}": cache.load_teacher(p, ds) for i, p in enumerate(args.teachers)}
    p = cli.plan(args, ds, None)
    subsets = {}
    for split in ("val", "test"):
        covered = [np.sort(t.splits[split].rows) if split in t.splits else None for t in made.values()]
        for path, rows in zip(args.teachers, covered):
            if rows is None or not np.array_equal(rows, covered[0]):
                raise cache.TeacherError(f"{path}: covers other {split} rows than {args.teachers[0]} (or none); "
                                         "compare teachers run with the same --teacher-eval-rows")
        s = getattr(ds, split)
        subsets[split] = data.Split(s.hist[covered[0]], s.lens[covered[0]], s.target[covered[0]])
    table = {}
    for (label, t), path in zip(made.items(), args.teachers):
        print(f"{label}: {path}")
        table[label] = teacher_llm.report(t, ds)
    trained = runs.train(p, ds, None, [{}], subsets)
    for r in trained:
        table[f"{r['config']['student']} seed {r['config']['seed']} (epoch {r['selected_epoch']})"] = r["subsets"]
    rows = [[label] + [cell for sp in ("val", "test") for cell in
                       (f"{m[sp]['HR@20']:.4f}", f"{m[sp]['NDCG@20']:.4f}",
                        f"{m[sp]['title_match']:.1%}" if "title_match" in m[sp] else None)]
            for label, m in table.items()]
    n = {sp: len(subsets[sp]) for sp in ("val", "test")}
    print("\n" + format_rows(["", "val HR@20", "val NDCG@20", "val titles", "test HR@20", "test NDCG@20", "test titles"],
                             rows, notes=f"on the {n['val']} validation and {n['test']} test rows every teacher covers; "
                                         "titles: answers that are catalogue titles"))
    runs.save_results(args.out, ds, trained, {}, teachers=dict(zip(made, args.teachers)), compare=table)
    return table
