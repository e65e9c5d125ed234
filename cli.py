"""The command line: `python dllm2rec.py [command]`, the single command (reproduce) by default.

train and reproduce are here; the teacher's commands are teacher.py's, finetune is
finetune.py's, and the research diagnostics are `python -m research`'s, which builds its
command line with these functions. The options are checked when parsed, --out and --device
before any work starts, and a bad input ends the command in one line naming the file or the
option (-v: with the traceback). Each command builds its Config once and passes it down.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

import cache
import data
import finetune
import llm
import model_teacher
import runs
import students
import teacher as teacher_llm
from common import (Parser, UserError, add_flags, at_the_boundary, between, cache_home, check_writable, checked,
                    choice_list, from_args, pick_device)
from dllm2rec import ABLATIONS, Config, check_trainable, popularity_metrics
from results import format_rows, format_table, summarise

# The single command's preset: overrides of the defaults, written once. Its teacher runs on 512
# training rows and 128 validation and test rows each; its students and seeds follow the
# device: on a CPU two students over two seeds (about 20 minutes), on CUDA the full protocol.
# Beside the LLM's row, a trained-model teacher's (model_teacher.py: stronger than the students, not
# an LLM): on a CPU one DROS member distilled into the first student (9.7 more minutes on a 2-core
# CPU, RESULTS), on CUDA three members into every student.
REPRODUCE = {"train_rows": 512, "eval_rows": 128,
             "students": {"cpu": ["sasrec", "dros"], "cuda": list(students.STUDENTS)},
             "seeds": {"cpu": 2, "cuda": 3},
             "model_teacher": {"cpu": {"seeds": 1, "students": 1}, "cuda": {"seeds": 3, "students": None}}}
# The full preset (--full; the default on CUDA): the paper's protocol. The teacher's LoRA fine-tuned
# on every training row (BIGRec tuned on a few-shot sample; here all, as a full protocol asks), the
# teacher on every row, free greedy decoding as BIGRec's, in process (on CUDA 16 rows decoded
# together: the serving path's slots do the same batching behind HTTP), then all five students over
# three seeds with lam chosen on validation; each stage resumes after an interruption.
FULL = {"teacher_seqs": {"cpu": 1, "cuda": 16}, "students": list(students.STUDENTS), "seeds": 3,
        "lams": (0.1, 0.3, 0.7, 1.0), "default": {"cpu": False, "cuda": True}}
MODEL_ROW = "dllm2rec, trained-model teacher"


# ============================================================================ flags
def student_flags(p) -> None:
    """The options of every command that trains students: the run's, Config's, and Config's
    official_* switches in a group of their own, with --official for all of them."""
    p.add_argument("--students", type=choice_list(students.CHOICES), default=list(students.STUDENTS),
                   help=f"comma-separated, from {','.join(students.CHOICES)} (+dro: with the DRO term, weight "
                        f"--alpha, as the official code trains every backbone; dros = SASRec with it)")
    p.add_argument("--seeds", type=checked(int, between(1, 1000)), default=1,
                   help="number of seeds, from --seed (mean and std reported)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--out", help="results JSON (default results/<dataset>-<time>.json)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every epoch; tracebacks of errors")
    official = [f.name for f in fields(Config) if f.name.startswith("official_")]
    add_flags(p.add_argument_group("student training"), Config,
              only=[f.name for f in fields(Config) if f.name not in official])
    o = p.add_argument_group("the official code's numerics and protocol (README: differences)")
    o.add_argument("--official", action="store_true", help="every switch below")
    add_flags(o, Config, only=official)


def shard(text: str) -> tuple[int, int]:
    """--shard i/n -> (i, n), 0 <= i < n, as the teacher's --shard."""
    problem = teacher_llm.shard_spec(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}, e.g. 0/2")
    i, n = (int(x) for x in text.split("/"))
    return i, n


def split_flags(p) -> None:
    """--shard and --reuse: a command's runs split over processes or machines, then one table."""
    p.add_argument("--shard", dest="run_shard", type=shard, metavar="i/n",
                   help="i/n: train every n-th run of the command, from the i-th (0-based, as the teacher's "
                        "--shard), write them to --out and print no table; shards run side by side")
    p.add_argument("--reuse", nargs="+", default=[], metavar="JSON",
                   help="results files of earlier runs (.json or .json.gz, e.g. of every --shard): a run of the "
                        "same data, teacher outputs and settings is taken from there, not trained again")
    p.add_argument("--reuse-only", action="store_true",
                   help="with --reuse: train nothing; the tables hold the runs found (their seeds counted), and the "
                        "runs still missing are named")


def lam_grid_flag(p) -> None:
    """--lams: lam chosen on validation from a grid, as the paper tunes lambda_d."""
    p.add_argument("--lams", type=checked(float, lambda v: None if 0 <= v and math.isfinite(v) else "must be >= 0"),
                   nargs="+", default=[], metavar="LAM",
                   help="a grid of lam values (the paper's {0.1, ..., 1.0}, e.g. 0.1 0.3 0.7 1.0): every distilled "
                        "variant with L_rank runs at each over --seeds, and the value of the best mean validation "
                        "NDCG@20 is kept per student, variant and teacher (the table prints it); none: --lam alone")


def config(args) -> Config:
    """The student Config of a command line; --official turns on every official_* switch."""
    official = {f.name: True for f in fields(Config) if f.name.startswith("official_")} if args.official else {}
    return from_args(Config, args, **official)


def plan(args, ds, top_n: int | None, **over) -> runs.Plan:
    """The command's runs (over: what the command sets itself, e.g. its preset's students),
    after the checks that would otherwise fail only after a baseline or the teacher has run:
    the data trainable, --k within the teacher's candidates (top_n, None: no teacher) and the
    catalogue, and every --reuse file readable."""
    device = pick_device(args.device)
    cfg = config(args)
    if getattr(args, "reuse_only", False) and not args.reuse:
        raise UserError("--reuse-only: needs --reuse and the results files whose runs it prints")
    check_trainable(ds, cfg.batch_size, device.type == "cuda" or cfg.official_protocol)
    if top_n is not None and cfg.K > top_n:
        raise UserError(f"--k {cfg.K}: more than the {top_n} candidates per row the teacher keeps (--top-n)")
    if cfg.K > ds.n_items:
        raise UserError(f"--k {cfg.K}: more than the {ds.n_items} items of {ds.name}")
    return runs.Plan(**{"cfg": cfg, "students": args.students, "seeds": args.seeds, "device": device,
                        "shard": getattr(args, "run_shard", None),
                        "earlier": runs.earlier_runs(getattr(args, "reuse", []), ds), "verbose": args.verbose,
                        "reuse_only": getattr(args, "reuse_only", False),
                        "lams": tuple(dict.fromkeys(getattr(args, "lams", None) or ())), **over})


def ranking_share(covered: int, n_train: int, cfg: Config) -> str:
    """What the ranking term acts on. An uncovered row weighs 0 in L_rank's batch mean, so a
    covered row weighs what it weighs in the paper and the term as a whole acts with
    lam x coverage of its full-coverage weight."""
    c = covered / n_train
    return (f"the ranking term acts on {covered} of {n_train} training rows (coverage {c:.1%}): about "
            f"{c * cfg.batch_size:.1f} covered rows in a {cfg.batch_size}-row batch, an effective weight of "
            f"lam x coverage = {cfg.lam:g} x {c:.4f} = {cfg.lam * c:.4f} (lam {cfg.lam:g} at full coverage)")


# ============================================================================ train and reproduce
def cmd_train(args, ds) -> dict:
    if not args.teacher and (args.ablations or not args.baseline or args.kd != "dllm2rec"):
        raise UserError("--ablations, --no-baseline and --kd act on distilled runs: they need --teacher")
    if args.kd != "dllm2rec" and args.ablations:
        raise UserError(f"--kd {args.kd} with --ablations: the ablations are DLLM2Rec's (--kd dllm2rec)")
    teacher = cache.load_teacher(args.teacher, ds) if args.teacher else None
    p = plan(args, ds, teacher.top_n if teacher is not None else None)
    if teacher is not None:
        print(teacher_llm.describe(teacher, ds))
    variants = [{}] if args.baseline or teacher is None else []
    variants += [{"distilled": True, "ablation": a} for a in ["none", *args.ablations]] if teacher is not None else []
    trained = runs.train(p, ds, teacher, variants)
    if runs.save_shard(p, args.out, ds, trained):
        return {"runs": trained}
    summary = summarise(runs.choose_lam(trained, p.lams), users=ds.test.user)
    print(format_table(summary))
    if teacher is not None and not p.lams:
        print(ranking_share(len(teacher.splits["train"].rows), len(ds.train), p.cfg))
    runs.save_results(args.out, ds, trained, summary)
    return {"summary": summary, "runs": trained}


def cmd_reproduce(args, ds) -> dict:
    """The teacher (cached after the first run), then every student without and with DLLM2Rec,
    trained to convergence over seeds; one table beside the popularity floor and the teacher."""
    t_start = time.perf_counter()
    device = pick_device(args.device)
    full = FULL["default"][device.type] if args.preset is None else args.preset == "full"
    if full:
        p = plan(args, ds, args.top_n, students=args.students or FULL["students"], seeds=args.seeds or FULL["seeds"],
                 lams=tuple(dict.fromkeys(args.lams)) or FULL["lams"])
    else:
        p = plan(args, ds, args.top_n, **{k: getattr(args, k) or REPRODUCE[k][device.type] for k in ("students", "seeds")})
    mt = REPRODUCE["model_teacher"][device.type]
    mt_seeds = mt["seeds"] if args.model_teacher_seeds is None else args.model_teacher_seeds
    mt_students = p.students[:mt["students"]] if mt_seeds else []
    if device.type == "cpu" and not full and (args.students is None or args.seeds is None):
        print(f"on CPU the single command trains {', '.join(p.students)} over {p.seeds} seeds to fit about 20 "
              f"minutes; the full protocol runs on CUDA, or here with --students {','.join(students.STUDENTS)} --seeds 3")
    if mt_students:
        print(f"then a trained-model teacher's row (not an LLM; --model-teacher-seeds 0 leaves it out): "
              f"{' + '.join(model_teacher.MEMBERS)} x {mt_seeds} fitted on the training rows, distilled into "
              f"{', '.join(mt_students)}" + (" (about 10 more minutes on a 2-core CPU)" if device.type == "cpu" else ""))
    st = from_args(teacher_llm.TeacherSettings, args)
    if full:
        st = full_teacher(ds, st, args, p, device)
    else:
        st = teacher_llm.with_default_adapter(replace(st, train_rows=st.train_rows or REPRODUCE["train_rows"],
                                                      eval_rows=st.eval_rows or REPRODUCE["eval_rows"]), ds, args.zero_shot)
    teacher, teacher_eval, path = teacher_llm.stage(ds, st, args.cache)
    t_teacher = time.perf_counter() - t_start
    print(f"students: {', '.join(p.students)}, {p.seeds} seed(s), until validation NDCG@20 has not improved "
          f"for {p.cfg.patience} epochs (at most {p.cfg.epochs}), on {device}")
    rows = teacher.splits["test"].rows      # the test rows the teacher covered: students beside it
    subsets = {"teacher_test_rows": data.Split(ds.test.hist[rows], ds.test.lens[rows], ds.test.target[rows])}
    keep = cache_home() / "runs" / f"{ds.name}-{ds.fingerprint}-full.json" if full else None   # resumable
    trained = runs.train(p, ds, teacher, [{}, {"distilled": True}], subsets, keep=keep)
    floor, model = {"popularity (training targets)": popularity_metrics(ds, ds.test)}, None
    if mt_students:
        model = model_teacher.in_cache_home(ds, p.cfg, mt_seeds, device)
        floor[f"trained-model teacher ({' + '.join(model_teacher.MEMBERS)} x {mt_seeds}, not an LLM)"] = \
            model.manifest["teacher"]["metrics"]["test"]
        trained += runs.train(replace(p, students=mt_students), ds, model,
                              [{"distilled": True, "label": MODEL_ROW}], subsets, keep=keep)
    trained = runs.choose_lam(trained, p.lams)
    summary = summarise(trained, users=ds.test.user)
    covered, checksum = len(teacher.splits["train"].rows), cache.checksum(teacher)
    print(f"\n{ds.name}, all {len(ds.test)} test rows; the teacher covers {covered} of {len(ds.train)} training rows "
          f"({covered / len(ds.train):.1%}), outputs checksum {checksum}")
    print(format_table(summary, floor))
    print(ranking_share(covered, len(ds.train), p.cfg))
    if model is not None:
        print(f"{MODEL_ROW}: every training row taught by the trained-model teacher (outputs checksum "
              f"{cache.checksum(model)}); against its random twin, and for every student, see RESULTS.md")
    latency = beside(teacher, teacher_eval, popularity_metrics(ds, subsets["teacher_test_rows"]), summary,
                                 trained, eval_rows=len(ds.val) + len(ds.test) + len(rows))
    runs.save_results(args.out, ds, trained, summary, floor=floor, latency=latency, teacher={
        "cache": str(path), "eval": teacher_eval, "manifest": teacher.manifest, "covered_train_rows": covered,
        "checksum": checksum}, model_teacher=model and {"cache": model.source, "manifest": model.manifest,
                                                       "checksum": cache.checksum(model)})
    print(f"total {time.perf_counter() - t_start:.0f} s (teacher stage {t_teacher:.0f} s)")
    return {"summary": summary, "runs": trained, "teacher": teacher_eval}


def full_teacher(ds, st, args, p: runs.Plan, device) -> "teacher_llm.TeacherSettings":
    """The full preset's plan, printed before any work, then its first stage: the teacher's LoRA
    fine-tuned on the training rows (found in the cache home when done; resumed from its
    checkpoint when interrupted), unless --lora or --zero-shot. -> the teacher's settings."""
    n_ft = args.finetune_samples or len(ds.train)
    tuned = not (args.lora or args.zero_shot or st.server)
    rows = {"train": st.train_rows or len(ds.train), "eval": st.eval_rows or len(ds.test)}
    n_runs = len(p.students) * p.seeds * (1 + len(p.lams or (1,)))
    print(f"FULL PRESET on {device}: (1) fine-tuning "
          + (f"the teacher's LoRA on {n_ft} of {len(ds.train)} training rows, one epoch" if tuned else "skipped (an adapter "
             "is given or --zero-shot)")
          + f"; (2) the teacher on {rows['train']} training rows and {rows['eval']} validation and test rows each, "
          f"{ds.n_items} titles embedded; (3) {n_runs} student runs ({', '.join(p.students)}; {p.seeds} seed(s); base and "
          f"DLLM2Rec at lam {', '.join(map(str, p.lams))}, chosen on validation). Each stage prints its own estimate "
          "from its first steps, chunk or run, and resumes when run again.", flush=True)
    over = {"train_rows": st.train_rows, "eval_rows": st.eval_rows, "titles_only": st.titles_only,
            "n_seq": args.n_seq if args.n_seq != 1 else FULL["teacher_seqs"][device.type],
            "n_gpu_layers": st.n_gpu_layers or (-1 if device.type == "cuda" else 0)}
    if not tuned:
        return replace(teacher_llm.with_default_adapter(st, ds, args.zero_shot), **over)
    model = Path(st.model) if st.model else llm.default_model()
    out = cache_home() / "adapters" / f"{ds.name}-{ds.fingerprint}-{model.stem}-rows{n_ft}.gguf"
    if out.with_suffix(".json").exists():
        print(f"(1) fine-tuning: done before, {out}", flush=True)
    else:
        print(f"(1) fine-tuning into {out}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        finetune.finetune(ds, finetune.FinetuneSettings(out=str(out), model=st.model, samples=n_ft, device=str(device),
                                                        dtype="bfloat16" if device.type == "cuda" else "float32"))
    return replace(st, lora=str(out), **over)


def beside(teacher: cache.TeacherOutputs, teacher_eval: dict, pop: dict, summary: list[dict], runs: list[dict],
           eval_rows: int) -> dict:
    """Print the teacher beside the popularity floor (pop) and the students (their runs'
    subsets["teacher_test_rows"]) on the test rows it covered, then the seconds per user at
    inference (a student's: its evaluation time over the eval_rows it ranks). -> the latencies."""
    test = teacher_eval["test"]      # no HR@20 when the teacher kept fewer than 20 items (--top-n)
    rows = [["teacher", f"{test.get('HR@20', math.nan):.4f}", f"{test.get('NDCG@20', math.nan):.4f}"],
            ["popularity", f"{pop['HR@20']:.4f}", f"{pop['NDCG@20']:.4f}"]]
    for line in summary:
        ms = [r["subsets"]["teacher_test_rows"] for r in runs
              if r["config"]["student"] == line["student"] and r["variant"] == line["variant"]]
        rows.append([f"{line['student']} {line['variant']}", f"{np.mean([m['HR@20'] for m in ms]):.4f}",
                     f"{np.mean([m['NDCG@20'] for m in ms]):.4f}"])
    below = test.get("NDCG@20", math.nan) < pop["NDCG@20"] or test.get("HR@20", math.nan) < pop["HR@20"]
    print(f"\non the {test['rows']} test rows the teacher covered (students: mean over seeds)")
    print(format_rows(["", "HR@20", "NDCG@20"], rows, notes="the teacher scores below the popularity floor on its "
                      "own test rows: its ranking advice is worse than recommending the most popular items, so the "
                      "students have little to learn from it" if below else ""))
    latency = {r["config"]["student"]: float(np.mean([e["eval_s"] for e in r["epochs"] if "test" in e])) / eval_rows
               for r in runs if r["variant"] == "dllm2rec"}
    latency["teacher"] = teacher.manifest.get("teacher", {}).get("seconds_per_row")
    print("\nseconds per user at inference: " + ", ".join(f"{k} {v:.1e}" for k, v in latency.items() if v))
    return latency


def add_commands(sub, parent) -> dict:
    """train and reproduce on the subparsers sub (parent: the data flags); {name: function}."""
    t = sub.add_parser("train", parents=[parent], help="train students with and without DLLM2Rec")
    student_flags(t)
    t.add_argument("--teacher", help="teacher cache folder, or a folder of the official files")
    t.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the undistilled runs")
    t.add_argument("--ablations", type=choice_list(ABLATIONS), default=[],
                   help=f"comma-separated, from {','.join(ABLATIONS)}")
    lam_grid_flag(t)
    split_flags(t)
    r = sub.add_parser("reproduce", parents=[parent], help="the teacher, then every student without and with "
                                                           "DLLM2Rec (the default command)")
    student_flags(r)
    teacher_llm.settings_flags(r)
    how = r.add_mutually_exclusive_group()
    how.add_argument("--full", dest="preset", action="store_const", const="full", help=(
        "the paper's protocol: the teacher's LoRA tuned on every training row, the teacher on every row, all five "
        "students over three seeds with lam chosen on validation (default on CUDA)"))
    how.add_argument("--quick", dest="preset", action="store_const", const="quick", help=(
        "the adapter committed for ML-100K, the teacher on 512 training rows (default on a CPU)"))
    r.add_argument("--finetune-samples", type=checked(int, between(1, 10**9)),
                   help="--full: training rows the LoRA is tuned on (default: all)")
    lam_grid_flag(r)
    r.add_argument("--model-teacher-seeds", type=checked(int, between(0, 100)), help=(
        "members of the trained-model teacher whose row the table also prints (0: no such row; default: "
        + ", ".join(f"{v['seeds']} on {k}" for k, v in REPRODUCE["model_teacher"].items()) + ")"))
    r.set_defaults(students=None, seeds=None, preset=None)  # the preset decides, by device
    for action in r._actions:
        if action.dest in ("train_rows", "eval_rows"):
            action.help = action.help.replace("(default: all)", "") + (
                f"(default {REPRODUCE[action.dest]}; --full: all)")
    return {"train": cmd_train, "reproduce": cmd_reproduce}


# ============================================================================ parsing and running
def parse_args(argv=None, registrars=None, default: str | None = "reproduce", prog: str = "dllm2rec.py"):
    """registrars: functions (subparsers, parent) -> {command: function(args, ds)}, parent
    carrying the data flags (default: this module's, the teacher's and finetune's commands).
    With no command, `default` runs with the options given."""
    registrars = registrars or [add_commands, teacher_llm.add_commands, finetune.add_commands]
    p = Parser(prog=prog, description="DLLM2Rec: distil an LLM recommender into sequential students",
               epilog=f"With no command: {default}." if default else None)
    sub = p.add_subparsers(dest="command", required=default is None)
    parent = Parser(add_help=False)
    data.add_flags(parent)
    commands = {}
    for add in registrars:
        commands.update(add(sub, parent))
    argv = sys.argv[1:] if argv is None else list(argv)
    if default and (not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help"))):
        argv = [default, *argv]
    args = p.parse_args(argv)
    if hasattr(args, "official"):                 # Config's checks across fields, before any work
        try:
            config(args)
        except UserError as e:
            p.error(str(e))
    args.run = commands[args.command]
    return args


def run(args):
    """Check --out and --device, read the data, run the command; a bad input ends in one line."""
    def go():
        if not getattr(args, "out_is_folder", False):     # export-official, retrieval-teacher: --out is a folder
            check_writable(getattr(args, "out", None), "--out")
        if getattr(args, "device", None) is not None:
            pick_device(args.device)
        return args.run(args, data.from_args(args) if hasattr(args, "dataset") else None)
    return at_the_boundary(go, getattr(args, "verbose", False))


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
