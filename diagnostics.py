"""Diagnostics beside the method: the mechanism check (synthetic teachers of known quality),
the training-step benchmark, and the comparison of teachers on the same rows.

They train students with dllm2rec.py's functions, which dllm2rec.py passes in (`method`: fit,
training_loss, ...), so that imports run one way: dllm2rec.py on top.
The official code's timings are in the README, not here: figures vary 2x between days.
"""
from __future__ import annotations

import importlib.util
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
from common import (Step, UserError, at_least, atomic_write, between, check_writable, checked, choice_list,
                    pick_device, write_json)


# ============================================================================ mechanism check
MECHANISM_VARIANTS = (("full", "full DLLM2Rec", "none"), ("uniform", "uniform w_r", "no_weights"),
                      ("ranking", "ranking only", "no_embed"), ("embedding", "embedding only", "no_rank"))


def mechanism_teachers(ds, args) -> list[tuple[str, object]]:
    """(name, teacher): one diagnostic teacher per --qualities entry (a quality, or "mixed")."""
    counts = cache.transition_counts(ds)
    return [("mixed", cache.mixed_teacher(ds, counts, seed=args.seed)) if q == "mixed" else
            (f"{q:.2f}", cache.synthetic_teacher(ds, q, counts, seed=args.seed)) for q in args.qualities]


def cmd_mechanism(args, ds, method) -> dict:
    """Distillation gain from synthetic teachers of known quality: full DLLM2Rec, without the
    importance weights (w_r = 1/K), ranking distillation only, embedding distillation only;
    each against the base student with the paired test, and full DLLM2Rec against uniform weights."""
    device = pick_device(args.device)
    if len(args.students) > 1:
        raise UserError(f"--students {','.join(args.students)}: the mechanism check trains one student")
    cli.preflight(ds, args, device, cache.SYNTHETIC_TOP_N)
    check_plot(args.plot)
    if args.converged:                       # the method's patience; an explicit larger --epochs is kept
        args.epochs, args.patience = max(args.epochs, method.Config.epochs), method.Config.patience
    short = args.epochs < method.Config.epochs or args.patience < method.Config.patience
    student, teachers = args.students[0], mechanism_teachers(ds, args)
    chosen = [(label, a) for key, label, a in MECHANISM_VARIANTS if key in args.variants]
    variants = [{"distilled": True, "ablation": a, "label": label} for label, a in chosen]
    clock = cli.RunClock(args.seeds * (1 + len(teachers) * len(variants)), args.run_shard)
    print(f"{ds.summary()}\nDIAGNOSTIC: synthetic teachers built from transitions that include the validation "
          f"and test rows, covering every training row. {student}, {args.seeds} seeds, until validation NDCG@20 has "
          f"not improved for {args.patience} epochs (at most {args.epochs}{', short of convergence: --converged trains to it' if short else ''}); "
          f"test NDCG@20; {clock} on {device}")
    base_runs = cli.train_students(method.fit, ds, None, args, [{}], device, clock=clock)
    against = {label: "base" for label, _ in chosen}
    both = {"full", "uniform"} <= set(args.variants)          # full DLLM2Rec against uniform weights
    table, all_runs, teacher_runs = {}, list(base_runs), {}
    for name, t in teachers:
        print(f"\nteacher: {t.source}", flush=True)
        teacher_runs[name] = cli.train_students(method.fit, ds, t, args, variants, device, clock=clock)
        all_runs += [{**r, "teacher_name": name} for r in teacher_runs[name]]
    if cli.save_shard(args, ds, all_runs):
        return {"runs": all_runs}
    for name, runs in teacher_runs.items():
        lines = {l["variant"]: l for l in method.summarise(base_runs + runs, against)}
        table[name] = {"cells": {label: lines[label] for label, _ in chosen}}
        if both:
            full, uniform = (lines[v] for v in ("full DLLM2Rec", "uniform w_r"))
            pair = method.paired_test([r for r in runs if r["variant"] == full["variant"]],
                                      [r for r in runs if r["variant"] == uniform["variant"]])
            table[name]["full_vs_uniform"] = {
                "change_NDCG@20": full["NDCG@20"] / uniform["NDCG@20"] - 1 if uniform["NDCG@20"] > 0 else None,
                "paired": pair,
                "verdict": method.verdict(full["NDCG@20"], full["NDCG@20_std"], uniform["NDCG@20"],
                                          uniform["NDCG@20_std"], args.seeds, pair["p"] if pair else None)}
    base = method.summarise(base_runs)[0]
    print(f"\nbase {student}: test NDCG@20 {base['NDCG@20']:.4f} ± {base['NDCG@20_std']:.4f} over {base['seeds']} seeds "
          f"(selected epochs {base['epochs']}){'' if base['converged'] else ' *'}")
    print(f"{'teacher':>8} " + " ".join(f"{label:>26}" for label, _ in chosen) + (f" {'full vs uniform':>26}" if both else ""))
    for name, row in table.items():
        pct = lambda c: f"{100 * c:+6.1f}%" if c is not None else "(base 0)"          # a change over 0 is none
        capped = lambda c: "" if c["converged"] else "*"                 # a seed stopped at the epoch cap
        cells = [f"{c['NDCG@20']:.4f}{capped(c)} {pct(c['change_NDCG@20'])} {c['verdict'] or '':>12}"
                 for c in row["cells"].values()]
        if both:
            fu = row["full_vs_uniform"]
            p = fu["paired"]["p"] if fu["paired"] else math.nan
            cells.append(f"{pct(fu['change_NDCG@20'])} p {p:.3f} {fu['verdict']:>12}")
        print(f"{name:>8} " + " ".join(f"{c:>26}" for c in cells), flush=True)
    print("cells: test NDCG@20, its change over the base student and the verdict (beyond twice the combined seed "
          f"std AND paired p < {method.P_LEVEL}); full vs uniform: full DLLM2Rec against uniform weights w_r = 1/K"
          + ("" if all(c["converged"] for row in table.values() for c in row["cells"].values()) and base["converged"]
             else f"; *: a seed stopped at the epoch cap ({args.epochs}), not converged"))
    out = {"base": base, "teachers": table, "epochs": args.epochs, "patience": args.patience, "seeds": args.seeds,
           "runs": all_runs}
    if args.plot:
        plot_mechanism(table, base, Path(args.plot))
    if args.out:
        write_json(Path(args.out), out)
    return out


# ============================================================================ pictures (matplotlib, optional)
def check_plot(path: str | None) -> None:
    """--plot needs matplotlib, which is optional: refused in one line, before any work, without it."""
    if path is None:
        return
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError(f"--plot {path}: needs matplotlib (pip install matplotlib), which is optional here")
    check_writable(path, "--plot")


def new_figure(width: float):
    import matplotlib
    matplotlib.use("Agg")                       # files only, no display
    import matplotlib.pyplot as plt
    return plt, *plt.subplots(figsize=(width, 4))


def plot_mechanism(table: dict, base: dict, path: Path) -> None:
    """Change in test NDCG@20 over the base against teacher quality, one line per variant; the
    mixed teacher as points at x = 0.5 (half its rows are quality 1, half random)."""
    plt, fig, ax = new_figure(6.5)
    graded = sorted(((float(n), row) for n, row in table.items() if n != "mixed"), key=lambda qr: qr[0])
    as_pct = lambda c: 100 * c if c is not None else math.nan                   # no change over a base of 0
    for k, label in enumerate(next(iter(table.values()))["cells"]):
        color = f"C{k}"
        if graded:
            ax.plot([q for q, _ in graded], [as_pct(row["cells"][label]["change_NDCG@20"]) for _, row in graded],
                    "o-", color=color, label=label)
        if "mixed" in table:
            ax.plot([0.5], [as_pct(table["mixed"]["cells"][label]["change_NDCG@20"])], "*", ms=14, color=color,
                    label=f"{label}, mixed teacher")
    noise = 200 * base["NDCG@20_std"] / base["NDCG@20"] if base["NDCG@20"] > 0 else 0
    ax.axhspan(-noise, noise, color="0.9", label="within 2 std of the base's seeds")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set(xlabel="teacher quality (1: knows the held-out transitions, 0: random)",
           ylabel="change in test NDCG@20 over the base (%)", title=f"distillation gain, base NDCG@20 {base['NDCG@20']:.4f}")
    ax.legend(fontsize=7)
    write_figure(plt, fig, path)


def plot_ablation(summary: list[dict], title: str, path: Path) -> None:
    """Test NDCG@20 of each (student, variant): bars with the seeds' std as error bars."""
    plt, fig, ax = new_figure(max(6.0, 0.6 * len(summary)))
    names = [f"{l['student']} {l['variant']}" for l in summary]
    order = list(dict.fromkeys(l["student"] for l in summary))              # one colour per student
    ax.bar(range(len(summary)), [l["NDCG@20"] for l in summary], yerr=[l["NDCG@20_std"] for l in summary],
           capsize=3, color=[f"C{order.index(l['student']) % 10}" for l in summary])
    ax.set_xticks(range(len(summary)), names, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="test NDCG@20 (mean ± std over seeds)", title=title)
    write_figure(plt, fig, path)


def write_figure(plt, fig, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    print(f"wrote {path}")


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
    cli.preflight(ds, args, device, cache.SYNTHETIC_TOP_N)
    check_plot(args.plot)
    counts = cache.transition_counts(ds)
    plans = {s: ablation_variants(s, args.tables, method) for s in args.students}
    clock = cli.RunClock(len(args.qualities) * args.seeds * sum(len(v) for v, _ in plans.values()), args.run_shard)
    print(f"{ds.summary()}\nDIAGNOSTIC teachers (they see held-out transitions) covering all {len(ds.train)} "
          f"training rows, qualities {', '.join(map(str, args.qualities))}; {', '.join(args.students)}; {args.seeds} "
          f"seeds; until validation NDCG@20 has not improved for {args.patience} epochs (at most {args.epochs}); "
          f"{clock} on {device}")
    against = {k: v for _, a in plans.values() for k, v in a.items()}
    out = {}
    for q in args.qualities:
        t = cache.synthetic_teacher(ds, q, counts, seed=args.seed)
        print(f"\nteacher: {t.source}, covers {len(t.splits['train'].rows)} of {len(ds.train)} training rows",
              flush=True)
        runs = cli.train_students(method.fit, ds, t, args, {s: v for s, (v, _) in plans.items()}, device, clock=clock)
        if args.run_shard:
            out[str(q)] = {"runs": runs}
            continue
        summary = method.summarise(runs, against)
        for table in args.tables:
            keep = [l for l in summary if table == "ablations" and "--" not in l["variant"]
                    or table == "differences" and (l["variant"] == "dllm2rec" or "--" in l["variant"])]
            print(f"\n{table} on {ds.name}, teacher quality {q} ({'random' if q == 0 else 'diagnostic'}), all "
                  f"{len(ds.test)} test rows")
            print(method.format_table(keep))
        out[str(q)] = {"summary": summary, "runs": runs}
        if args.plot:
            path = Path(args.plot)
            plot_ablation(summary, f"{ds.name}, teacher quality {q}, {args.seeds} seeds",
                          path.with_name(f"{path.stem}-q{q}{path.suffix or '.png'}"))
    if cli.save_shard(args, ds, [r for q in out.values() for r in q["runs"]]):
        return out
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
    mixed_or_quality = lambda text: "mixed" if text == "mixed" else quality(text)
    mixed_or_quality.__name__ = "quality"
    mc.add_argument("--qualities", type=mixed_or_quality, nargs="+", default=[1.0, 0.3, 0.0, "mixed"],
                    help="from 1 (knows the held-out transitions) to 0 (random), and 'mixed': quality 1 on a random "
                         "half of the rows, random advice on the rest (an LLM right for some users, not others)")
    mc.add_argument("--variants", type=choice_list([v[0] for v in MECHANISM_VARIANTS]),
                    default=[v[0] for v in MECHANISM_VARIANTS],
                    help="comma-separated, from " + ",".join(f"{k} ({label})" for k, label, _ in MECHANISM_VARIANTS))
    mc.add_argument("--converged", action="store_true",
                    help=f"train every cell to convergence (--patience {method.Config.patience}, --epochs at least "
                         f"{method.Config.epochs}), not the quick default")
    mc.add_argument("--plot", help="also write a PNG: gain against teacher quality, one line per variant (needs matplotlib)")
    cli.split_flags(mc)
    mc.set_defaults(students=["sasrec"], epochs=5, patience=5, seeds=2)
    ab = sub.add_parser("ablation", parents=[parent],
                        help="the ablation and differences tables with full-coverage diagnostic teachers, converged")
    cli.student_flags(ab, method.Config)
    ab.add_argument("--qualities", type=quality, nargs="+", default=[0.5, 0.0],
                    help="diagnostic teachers' qualities (0: the random teacher)")
    ab.add_argument("--tables", type=choice_list(("ablations", "differences")), default=["ablations", "differences"],
                    help="comma-separated, from ablations,differences")
    ab.add_argument("--plot", help="also write a PNG per quality (FILE with -q<quality> before .png): bars with "
                                   "error bars (needs matplotlib)")
    cli.split_flags(ab)
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
