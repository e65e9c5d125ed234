"""Diagnostics beside the method: the mechanism check (synthetic teachers of known quality),
the training-step benchmark, and the comparison of teachers on the same rows.

They train students with dllm2rec.py's functions, which dllm2rec.py passes in (`method`: fit,
training_loss, ...), so that imports run one way: dllm2rec.py on top.
The official code's timings are in the README, not here: figures vary 2x between days.
"""
from __future__ import annotations

import math
import resource
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

import cache
import cli
import data
import students
import teacher as teacher_llm
from common import Step, UserError, at_least, between, checked, choice_list, pick_device, write_json


# ============================================================================ mechanism check
MECHANISM_VARIANTS = (("full DLLM2Rec", "none"), ("uniform w_r", "no_weights"), ("ranking only", "no_embed"),
                      ("embedding only", "no_rank"))


def cmd_mechanism(args, ds, method) -> dict:
    """Distillation gain from synthetic teachers of known quality: full DLLM2Rec, without the
    importance weights (w_r = 1/K), ranking distillation only, embedding distillation only."""
    device = pick_device(args.device)
    if len(args.students) > 1:
        raise UserError(f"--students {','.join(args.students)}: the mechanism check trains one student")
    method.preflight(ds, args, device, cache.SYNTHETIC_TOP_N)
    print(f"{ds.summary()}\nDIAGNOSTIC: synthetic teachers built from transitions that include the validation "
          f"and test rows. {args.students[0]}, {args.epochs} epochs at most (fewer than to convergence, to fit "
          f"minutes on a CPU), selected on validation; test NDCG@20")
    counts = cache.transition_counts(ds)
    student = args.students[0]
    base_runs = [method.fit(ds, cli.config(args, student=student, seed=args.seed + i), None, device, log=lambda *_: None)
                 for i in range(max(2, args.seeds))]
    base, base_std = method.mean_std([r["test"]["NDCG@20"] for r in base_runs])
    print(f"base {student}: NDCG@20 {base:.4f} ± {base_std:.4f} over {len(base_runs)} seeds "
          f"(HR@20 {np.mean([r['test']['HR@20'] for r in base_runs]):.4f})")
    print(f"{'quality':>8} " + " ".join(f"{label:>22}" for label, _ in MECHANISM_VARIANTS))
    table = {}
    for q in args.qualities:
        t = cache.synthetic_teacher(ds, q, counts, seed=args.seed)
        cells = []
        for label, ablation in MECHANISM_VARIANTS:
            rs = [method.fit(ds, cli.config(args, student=student, distilled=True, ablation=ablation, seed=args.seed + i),
                      t, device, log=lambda *_: None) for i in range(args.seeds)]
            m = float(np.mean([r["test"]["NDCG@20"] for r in rs]))
            table.setdefault(str(q), {})[label] = m
            cells.append(f"{m:.4f} ({100 * (m / base - 1):+6.1f}%)" if base > 0 else f"{m:.4f} (base 0)")
        print(f"{q:8.2f} " + " ".join(f"{c:>22}" for c in cells), flush=True)
    print("cells: test NDCG@20 (change over the base student); a change within about "
          f"{2 * base_std / base if base > 0 else math.nan:.0%} is within twice the base's seed-to-seed std")
    out = {"base": {"NDCG@20": base, "std": base_std}, "qualities": table, "epochs": args.epochs}
    if args.out:
        write_json(Path(args.out), out)
    return out


# ============================================================================ ablations and differences
# the official switches measured per student: official_dro acts only with the DRO term, the others on any student
OFFICIAL_SWITCHES = {"plain": ("official_weights", "official_neg", "official_protocol"),
                     "dro": ("official_dro", "official")}


def ablation_variants(student: str, tables: list[str], method) -> tuple[list[dict], dict]:
    """The runs of one student for the ablation table (the paper's Tables 8 and 9: base, full
    DLLM2Rec, each ablation) and the differences table (full DLLM2Rec with each official
    switch), and what each is compared with: {variant: reference variant}."""
    variants, against = [{}, {"distilled": True}], {"dllm2rec": "base"}
    if "ablations" in tables:
        for a in method.ABLATIONS:
            variants.append({"distilled": True, "ablation": a})
            against[f"dllm2rec-{a}"] = "dllm2rec"
    if "differences" in tables:
        every = [f.name for f in fields(method.Config) if f.name.startswith("official_")]
        for switch in OFFICIAL_SWITCHES["dro" if students.parse_student(student)[1] else "plain"]:
            label = "dllm2rec --" + switch.replace("_", "-")
            over = {f: True for f in every} if switch == "official" else {switch: True}
            variants.append({"distilled": True, "label": label, **over})
            against[label] = "dllm2rec"
    return variants, against


def cmd_ablation(args, ds, method) -> dict:
    """The ablation table and the differences-from-the-official-code table where the ranking
    term acts on every row: diagnostic teachers covering all training rows, every run to
    convergence, over seeds, each change with the paired test."""
    device = pick_device(args.device)
    method.preflight(ds, args, device, cache.SYNTHETIC_TOP_N)
    counts = cache.transition_counts(ds)
    plans = {s: ablation_variants(s, args.tables, method) for s in args.students}
    n_runs = len(args.qualities) * args.seeds * sum(len(v) for v, _ in plans.values())
    print(f"{ds.summary()}\nDIAGNOSTIC teachers (they see held-out transitions) covering all {len(ds.train)} "
          f"training rows, qualities {', '.join(map(str, args.qualities))}; {', '.join(args.students)}; {args.seeds} "
          f"seeds; until validation NDCG@20 has not improved for {args.patience} epochs (at most {args.epochs}); "
          f"{n_runs} runs on {device}")
    against = {k: v for _, a in plans.values() for k, v in a.items()}
    out = {}
    for q in args.qualities:
        t = cache.synthetic_teacher(ds, q, counts, seed=args.seed)
        print(f"\nteacher: {t.source}, covers {len(t.splits['train'].rows)} of {len(ds.train)} training rows",
              flush=True)
        runs = cli.train_students(method.fit, ds, t, args, {s: v for s, (v, _) in plans.items()}, device)
        summary = method.summarise(runs, against)
        for table in args.tables:
            keep = [l for l in summary if table == "ablations" and "--" not in l["variant"]
                    or table == "differences" and (l["variant"] == "dllm2rec" or "--" in l["variant"])]
            print(f"\n{table} on {ds.name}, teacher quality {q} ({'random' if q == 0 else 'diagnostic'}), all "
                  f"{len(ds.test)} test rows")
            print(method.format_table(keep))
        out[str(q)] = {"summary": summary, "runs": runs}
    if args.out:
        write_json(Path(args.out), {"dataset": ds.name, "fingerprint": ds.fingerprint, "tables": args.tables,
                                    "qualities": out})
    return out


# ============================================================================ teachers side by side
def cmd_compare(args, ds, method) -> dict:
    """Teachers and undistilled students on the same validation and test rows: each teacher's
    HR@20 / NDCG@20 and share of catalogue-title answers; each student's HR@20 / NDCG@20 on those
    rows, at the epoch its full validation selects."""
    device = pick_device(args.device)
    teachers = {f"teacher {i + 1}": cache.load_teacher(p, ds) for i, p in enumerate(args.teachers)}
    subsets = {}
    for split in ("val", "test"):
        covered = [np.sort(t.splits[split].rows) if split in t.splits else None for t in teachers.values()]
        for path, rows in zip(args.teachers, covered):
            if rows is None or not np.array_equal(rows, covered[0]):
                raise cache.TeacherError(f"{path}: covers other {split} rows than {args.teachers[0]} (or none); "
                                              "compare teachers run with the same --teacher-eval-rows")
        s = getattr(ds, split)
        subsets[split] = data.Split(s.hist[covered[0]], s.lens[covered[0]], s.target[covered[0]])
    table = {}
    for (label, t), path in zip(teachers.items(), args.teachers):
        print(f"{label}: {path}")
        table[label] = teacher_llm.report(t, ds)
    runs = cli.train_students(method.fit, ds, None, args, [{}], device, subsets)
    for r in runs:
        table[f"{r['config']['student']} seed {r['config']['seed']} (epoch {r['selected_epoch']})"] = r["subsets"]
    print(f"\n{'':24} {'validation (' + str(len(subsets['val'])) + ' rows)':>26}   "
          f"{'test (' + str(len(subsets['test'])) + ' rows)':>26}")
    print(f"{'':24} {'HR@20':>8} {'NDCG@20':>8} {'titles':>8}   {'HR@20':>8} {'NDCG@20':>8} {'titles':>8}")
    for label, m in table.items():
        cells = [f"{m[sp]['HR@20']:8.4f} {m[sp]['NDCG@20']:8.4f} " +
                 (f"{m[sp]['title_match']:8.1%}" if "title_match" in m[sp] else f"{'':8}") for sp in ("val", "test")]
        print(f"{label:24} {cells[0]}   {cells[1]}")
    cli.save_results(args, ds, runs, {}, teachers=dict(zip(teachers, args.teachers)), compare=table)
    return table


# ============================================================================ training-step benchmark
MAX_BENCH_BYTES = 16 * 2**30   # of the bench's synthetic teacher embeddings


def games_shaped(rows: int, n_items: int, d_llm: int, games_dir: Path | None, K: int, seed: int = 0):
    """Synthetic data shaped like the paper's Games set (K teacher candidates a row); histories
    resampled from the official Games val/test rows when that folder is present, else random."""
    g = np.random.default_rng(seed)
    L = data.MAX_HISTORY
    if games_dir is not None and (games_dir / "val_data.csv").exists():
        try:
            parts = [data.read_rows_file(games_dir / f, n_items) for f in ("val_data.csv", "test_data.csv")]
        except data.DataError as e:
            raise UserError(f"--items {n_items}: too few for the Games rows of --games-dir ({e}); "
                            "raise --items or pass --games-dir ''") from None
        pool = data.Split(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("hist", "lens", "target")))
        pick = g.integers(0, len(pool), rows)
        split, source = data.Split(pool.hist[pick], pool.lens[pick], pool.target[pick]), f"resampled from {games_dir}"
    else:
        lens = g.integers(1, L + 1, rows)
        hist = np.where(np.arange(L) < lens[:, None], g.integers(0, n_items, (rows, L)), n_items)
        split, source = data.Split(hist, lens, g.integers(0, n_items, rows)), "random"
    emb = torch.randn(n_items, d_llm, generator=torch.Generator().manual_seed(seed))
    ids = torch.stack([torch.randperm(n_items)[:K] for _ in range(256)])  # a pool of candidate rows
    dist = 20 + torch.rand(256, K).sort(1).values
    return split, source, emb, ids, dist


def cmd_bench(args, ds, method) -> dict:
    """Median ms per training step (forward, backward, Adam) of each student, plain and with
    DLLM2Rec, in each step mode: eager, and on CUDA the captured graph (--compile: also
    torch.compile); then one full-ranking evaluation."""
    device = pick_device(args.device)
    if args.items * args.d_llm * 4 > MAX_BENCH_BYTES:
        raise UserError(f"--items {args.items} x --d-llm {args.d_llm}: the teacher embeddings would take "
                        f"{args.items * args.d_llm * 4 / 2**30:.0f} GiB (at most {MAX_BENCH_BYTES / 2**30:.0f} here)")
    torch.manual_seed(0)
    split, source, emb, pool_ids, pool_dist = games_shaped(args.rows, args.items, args.d_llm,
                                                           Path(args.games_dir) if args.games_dir else None,
                                                           method.Config().K)
    hist, lens, target = (torch.as_tensor(a, device=device) for a in (split.hist, split.lens, split.target))
    B = args.batch_size
    modes = ["eager"] + (["captured"] if device.type == "cuda" else []) + (["compiled"] if args.compile else [])
    print(f"bench on {device} ({torch.get_num_threads()} threads): {args.rows} rows ({source}), {args.items} items, "
          f"d_llm {args.d_llm}, batch {B}, {args.steps} timed steps after {args.warmup} warm-up; modes {', '.join(modes)}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = []
    for student in args.students:
        for distill_on in (False, True):
            line = {"student": student, "distilled": distill_on}
            for mode in modes:
                cfg = method.Config(student=student, distilled=distill_on)
                model = method.build_student(cfg, args.items, target, emb if distill_on else None).to(device)
                opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True, capturable=mode == "captured")
                step = Step(method.training_loss, model, opt, cfg, mode, warmup=min(3, args.warmup - 1))
                g = torch.Generator(device="cpu").manual_seed(1)
                times = []
                for i in range(args.warmup + args.steps):
                    idx = torch.randint(0, args.rows, (B,), generator=g).to(device)
                    pick = torch.randint(0, len(pool_ids), (B,), generator=g)
                    tb = (pool_ids[pick].to(device), pool_dist[pick].to(device),
                          torch.ones(B, dtype=torch.bool, device=device)) if distill_on else ()
                    batch = (hist[idx], lens[idx], target[idx], *tb)
                    sync(); t0 = time.perf_counter()
                    step(*batch)
                    sync()
                    if i >= args.warmup:
                        times.append(time.perf_counter() - t0)
                line[f"{mode}_ms"] = 1000 * float(np.median(times))
            if distill_on:  # one full-ranking evaluation of eval_rows rows, with the distilled model
                n_eval = min(args.eval_rows, args.rows)
                sync(); t0 = time.perf_counter()
                method.target_ranks(model, hist[:n_eval], lens[:n_eval], target[:n_eval])
                sync(); line["eval_s"] = time.perf_counter() - t0
            results.append(line)
            cells = "  ".join(f"{mode} {line[mode + '_ms']:7.2f} ms" for mode in modes)
            ev = f"  eval {line['eval_s']:5.2f} s" if distill_on else ""
            print(f"  {student:8} {'dllm2rec' if distill_on else 'plain':9} {cells}{ev}", flush=True)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"eval = one full-ranking evaluation of {min(args.eval_rows, args.rows)} rows; peak "
          f"{'GPU' if device.type == 'cuda' else 'process'} memory {peak:.0f} MiB (steps touch one batch; compare "
          "with another --rows). The official code's figures, measured side by side: RESULTS.md, speed")
    out = {"device": str(device), "rows": args.rows, "items": args.items, "d_llm": args.d_llm, "peak_mib": peak,
           "results": results}
    if args.out:
        write_json(Path(args.out), out)
    return out


# ============================================================================ commands
def add_commands(sub, parent, method) -> dict:
    """mechanism, bench and compare-teachers on the subparsers sub; {name: function(args, ds)}."""
    mc = sub.add_parser("mechanism", parents=[parent],
                        help="diagnostic: distillation gain from synthetic teachers of known quality")
    cli.student_flags(mc, method.Config)
    quality = checked(float, lambda q: None if 0 <= q <= 1 else "must be in [0, 1]")
    mc.add_argument("--qualities", type=quality, nargs="+", default=[1.0, 0.3, 0.0],
                    help="from 1 (knows the held-out transitions) to 0 (random)")
    mc.set_defaults(students=["sasrec"], epochs=5, patience=5)
    ab = sub.add_parser("ablation", parents=[parent],
                        help="the ablation and differences tables with full-coverage diagnostic teachers, converged")
    cli.student_flags(ab, method.Config)
    ab.add_argument("--qualities", type=quality, nargs="+", default=[0.5, 0.0],
                    help="diagnostic teachers' qualities (0: the random teacher)")
    ab.add_argument("--tables", type=choice_list(("ablations", "differences")), default=["ablations", "differences"],
                    help="comma-separated, from ablations,differences")
    ab.set_defaults(students=["sasrec", "dros"], seeds=3)
    c = sub.add_parser("compare-teachers", parents=[parent],
                       help="teachers and undistilled students on the same validation and test rows")
    cli.student_flags(c, method.Config)
    c.add_argument("teachers", nargs="+", help="teacher cache folders (made with the same --teacher-eval-rows)")
    c.set_defaults(students=["sasrec", "dros"])
    count = checked(int, at_least(1))
    b = sub.add_parser("bench", help="time training steps and one evaluation on Games-shaped data")
    b.add_argument("--students", type=choice_list(students.CHOICES), default=["sasrec", "dros"],
                   help="comma-separated; plain SASRec and DROS + DLLM2Rec are the official code's comparable rows")
    b.add_argument("--rows", type=checked(int, between(1, 10**7)), default=119_836)
    b.add_argument("--items", type=checked(int, between(method.Config().K + 2, 10**7)), default=17_408,
                   help="catalogue size (at least --k + 2: every row needs candidates and a negative)")
    b.add_argument("--d-llm", type=checked(int, between(1, 65_536)), default=4096)
    b.add_argument("--batch-size", type=checked(int, between(1, 1 << 16)), default=256)
    b.add_argument("--steps", type=count, default=20)
    b.add_argument("--warmup", type=checked(int, at_least(2)), default=5,
                   help="untimed steps first (the captured step: up to 3 eager, then the capture, all untimed)")
    b.add_argument("--eval-rows", type=count, default=14_980)
    b.add_argument("--games-dir", default="../shared/datasets/dllm2rec_game_partial",
                   help="official Games val/test files whose histories are resampled (else random)")
    b.add_argument("--device", default="auto")
    b.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    b.add_argument("--out", help="also write the figures to this JSON file")
    return {name: (lambda args, ds, f=f: f(args, ds, method)) for name, f in
            (("mechanism", cmd_mechanism), ("ablation", cmd_ablation), ("compare-teachers", cmd_compare),
             ("bench", cmd_bench))}
