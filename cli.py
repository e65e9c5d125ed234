"""The command line of `python dllm2rec.py <command>`: each module adds its own commands; the
options are checked when parsed, --out and --device before any work starts, and a bad input
ends the command in one line naming the file or the option (-v: with the traceback). The
student commands' runs (students x variants x seeds) and their results file are made here.

Nothing here imports dllm2rec.py: it passes itself in (`method`: its Config, commands and fit).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

import cache
import data
import students
import teacher as teacher_llm
from common import (Parser, UserError, add_flags, at_least, at_the_boundary, between, check_writable, checked, choice_list,
                    cpu_name, from_args, pick_device, write_json)


def student_flags(p, Config) -> None:
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
    p.set_defaults(Config=Config)


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
                   help="results files of earlier runs (e.g. of every --shard): a run of the same data, teacher "
                        "outputs and settings is taken from there, not trained again")


def config(args, **over):
    """The student Config of a command line (over: fields the command sets); --official turns
    on every official_* switch."""
    if args.official:
        over = {**{f.name: True for f in fields(args.Config) if f.name.startswith("official_")}, **over}
    return from_args(args.Config, args, **over)


# ---------------------------------------------------------------------------- checks before any work
def check_trainable(ds: data.Dataset, batch_size: int, full_batches: bool) -> None:
    """Refuse, before any work, data a student cannot be trained on: an empty split, a training row whose
    history and target hold every item (no negative to sample), or fewer rows than one batch
    where only full batches run (the captured step, the official protocol)."""
    for name, split in (("training", ds.train), ("validation", ds.val), ("test", ds.test)):
        if len(split) == 0:
            raise UserError(f"{ds.name}: 0 {name} rows (train/val/test {len(ds.train)}/{len(ds.val)}/{len(ds.test)}); "
                            "a student needs rows in each: more users with more interactions")
    if full_batches and len(ds.train) < batch_size:
        raise UserError(f"{ds.name}: {len(ds.train)} training rows, fewer than --batch-size {batch_size}; the "
                        "captured step (CUDA) and --official-protocol run full batches only: a smaller --batch-size")
    if ds.n_items <= data.MAX_HISTORY + 1:          # otherwise every row leaves at least one item out
        held = np.concatenate([ds.train.hist, ds.train.target[:, None]], 1)
        distinct = np.array([len(set(row) - {ds.n_items}) for row in held])
        if (distinct >= ds.n_items).any():
            r = int(np.argmax(distinct >= ds.n_items))
            raise UserError(f"{ds.name}: training row {r + 1} holds all {ds.n_items} items: no negative item to sample")


def preflight(ds: data.Dataset, args, device, top_n: int | None) -> None:
    """Checks of a training command that would otherwise fail only after a baseline or the
    teacher has run: the data trainable, --k within the teacher's candidates (top_n, None:
    no teacher) and the catalogue."""
    cfg = config(args)
    check_trainable(ds, cfg.batch_size, device.type == "cuda" or cfg.official_protocol)
    if top_n is not None and cfg.K > top_n:
        raise UserError(f"--k {cfg.K}: more than the {top_n} candidates per row the teacher keeps (--top-n)")
    if cfg.K > ds.n_items:
        raise UserError(f"--k {cfg.K}: more than the {ds.n_items} items of {ds.name}")
    args.earlier = earlier_runs(getattr(args, "reuse", []), ds)


class RunClock:
    """Runs done of all that a command asks for, over one or several train_students calls;
    `planned` numbers every run of the command (shard (i, n): this process trains runs i, i+n, ..., 0-based)."""

    def __init__(self, total: int, shard: tuple[int, int] | None = None):
        self.shard = i, n = shard or (0, 1)
        self.all, self.total, self.done, self.planned = total, len(range(i, total, n)), 0, 0
        self.t0 = time.perf_counter()

    def __str__(self) -> str:
        i, n = self.shard
        return f"{self.all} runs" + (f" (shard {i}/{n} trains {self.total} of them)" if n > 1 else "")

    def mine(self) -> bool:
        """Whether the next planned run is this shard's."""
        i, n = self.shard
        self.planned += 1
        return (self.planned - 1) % n == i

    def taken(self) -> None:
        """A run of this shard's taken from --reuse, not trained."""
        self.total -= 1

    def tick(self) -> str:
        self.done += 1
        spent = time.perf_counter() - self.t0
        eta = spent / self.done * (self.total - self.done)
        return f"[run {self.done}/{self.total}, {spent / 60:.1f} min, ETA {eta / 60:.0f} min]"


def captured_step(device) -> bool:
    """Whether fit trains with the captured step (CUDA): full batches only and the static
    negative sampler, other runs than the eager step's (CPU) of the same settings."""
    return torch.device(device).type == "cuda"


def run_key(fingerprint: str, teacher_checksum: str | None, config: dict, captured: bool) -> str:
    """What a run's result depends on: the data, the teacher's outputs (none for a base run:
    fit ignores its teacher), every setting and the kind of step (captured or eager)."""
    return json.dumps([fingerprint, teacher_checksum if config.get("distilled") else None, config, bool(captured)],
                      sort_keys=True)


def earlier_runs(paths: list[str], ds: data.Dataset) -> dict[str, dict]:
    """The runs in results files (of train, mechanism, ablation, at any depth) on this data:
    {run_key: run}, a run that stopped on patience also under its key without the epoch cap
    (see find_earlier); a file unreadable or without such runs is named."""
    found = {}

    def walk(node, path):
        if isinstance(node, dict):
            if "config" in node and "test_ranks" in node and "teacher_checksum" in node:
                if node.get("fingerprint") == ds.fingerprint:
                    run, captured = {**node, "from": str(path)}, node.get("captured_step", False)
                    found[run_key(ds.fingerprint, node["teacher_checksum"], node["config"], captured)] = run
                    if node.get("converged"):
                        found[run_key(ds.fingerprint, node["teacher_checksum"], {**node["config"], "epochs": None},
                                      captured)] = run
                return
            node = list(node.values())
        if isinstance(node, list):
            for child in node:
                walk(child, path)
    for path in paths:
        before = len(found)
        try:
            walk(json.loads(Path(path).read_text()), path)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"--reuse {path}: unreadable or not valid JSON ({e})") from None
        if len(found) == before:
            raise UserError(f"--reuse {path}: no runs on {ds.name} (fingerprint {ds.fingerprint}) with their teacher's "
                            "checksum; results files of train, mechanism or ablation hold them")
    return found


def find_earlier(earlier: dict, fingerprint: str, teacher_checksum: str | None, config: dict,
                 captured: bool) -> dict | None:
    """The earlier run of these settings, or None: the one of the same key, or one of another
    --epochs that stopped on patience within this run's cap. Training reads the cap only to stop,
    so a run that stopped after E epochs is the same run under any cap of E or more."""
    exact = earlier.get(run_key(fingerprint, teacher_checksum, config, captured))
    if exact is not None:
        return exact
    stopped = earlier.get(run_key(fingerprint, teacher_checksum, {**config, "epochs": None}, captured))
    return stopped if stopped is not None and len(stopped["epochs"]) <= config["epochs"] else None


def train_students(fit, ds, teacher, args, variants, device, subsets=None, clock: RunClock | None = None) -> list[dict]:
    """fit(ds, cfg, teacher, device, log, subsets) for every (student, variant, seed) of the
    command line, with the elapsed time and an ETA after each run (clock: of a command that
    calls this more than once). variants: a list of Config overrides, e.g. {} (the base),
    {"distilled": True, "ablation": "no_wp"}; an override "label" names the variant in the
    table (default: Config.variant); a dict {student: list} gives each student its own.
    A run found in --reuse is taken from there; with --shard i/n only the command's runs
    i, i+n, i+2n ... (0-based) are trained and the others left out."""
    per_student = variants if isinstance(variants, dict) else {s: variants for s in args.students}
    plan = [(student, over, seed) for student in args.students for over in per_student[student]
            for seed in range(args.seed, args.seed + args.seeds)]
    clock = clock or RunClock(len(plan), getattr(args, "run_shard", None))
    teacher_checksum = cache.checksum(teacher) if teacher is not None else None
    earlier, runs = getattr(args, "earlier", {}), []
    for student, over, seed in plan:
        over = dict(over)
        label = over.pop("label", None)
        cfg = config(args, **{"distilled": False, **over, "student": student, "seed": seed})
        label = label or cfg.variant
        if not clock.mine():
            continue
        taken = find_earlier(earlier, ds.fingerprint, teacher_checksum, json.loads(json.dumps(asdict(cfg))),
                             captured_step(device))
        if taken is not None:
            clock.taken()
            runs.append({**taken, "variant": label})
            print(f"{student} {label} seed {seed}: taken from {taken['from']} (test NDCG@20 "
                  f"{taken['test']['NDCG@20']:.4f})", flush=True)
            continue
        print(f"{student} {label} seed {seed} on {device}", flush=True)
        r = fit(ds, cfg, teacher, device, log=print if args.verbose else (lambda *_: None), subsets=subsets)
        r["variant"], r["teacher_checksum"] = label, teacher_checksum
        runs.append(r)
        print(f"  selected epoch {r['selected_epoch']} of {len(r['epochs'])}: test HR@20 {r['test']['HR@20']:.4f} "
              f"NDCG@20 {r['test']['NDCG@20']:.4f} ({r['wall_s']['train']:.0f}s train, "
              f"{r['wall_s']['eval']:.0f}s eval) {clock.tick()}", flush=True)
    return runs


def save_shard(args, ds, runs: list[dict]) -> bool:
    """With --shard: write this shard's runs (--out, or results/<dataset>-shard-i-of-n-<time>.json)
    and say how to print the tables; True when this is a shard (the command then stops)."""
    if not getattr(args, "run_shard", None):
        return False
    i, n = args.run_shard
    out = Path(args.out) if args.out else Path("results") / f"{ds.name}-shard-{i}-of-{n}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(out, {"dataset": ds.name, "fingerprint": ds.fingerprint, "argv": sys.argv[1:], "shard": [i, n],
                     "runs": [r for r in runs if "from" not in r]})
    print(f"shard {i}/{n}: wrote {out}; the tables: the same command without --shard, with --reuse and every "
          "shard's file")
    return True


def save_results(args, ds, runs, summary, **extra) -> Path:
    """The results JSON: --out, or results/<dataset>-<time>.json."""
    out = Path(args.out) if args.out else Path("results") / f"{ds.name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    machine = {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    write_json(out, {"dataset": ds.name, "fingerprint": ds.fingerprint, "argv": sys.argv[1:], "machine": machine,
                     "summary": summary, **extra, "runs": runs})
    print(f"wrote {out}")
    return out


def method_commands(sub, parent, method) -> dict:
    """train and reproduce, the commands of dllm2rec.py (method), on the subparsers sub."""
    t = sub.add_parser("train", parents=[parent], help="train students with and without DLLM2Rec")
    student_flags(t, method.Config)
    t.add_argument("--teacher", help="teacher cache folder, or a folder of the official files")
    t.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the undistilled runs")
    t.add_argument("--ablations", type=choice_list(method.ABLATIONS), default=[],
                   help=f"comma-separated, from {','.join(method.ABLATIONS)}")
    split_flags(t)
    r = sub.add_parser("reproduce", parents=[parent], help="the teacher, then every student without and with "
                                                           "DLLM2Rec (the default command)")
    student_flags(r, method.Config)
    teacher_llm.settings_flags(r, zero_shot=True)
    r.set_defaults(students=None, seeds=None, **method.REPRODUCE)      # students and seeds: the device's preset
    return {"train": method.cmd_train, "reproduce": method.cmd_reproduce}


def parse_args(argv, method, registrars, default: str = "reproduce"):
    """method: dllm2rec.py, whose commands come first; registrars: the other modules' functions
    (subparsers, parent) -> {command: function(args, ds)}, parent carrying the data flags.
    With no command, `default` runs with the options given."""
    p = Parser(prog="dllm2rec.py", description=method.__doc__.split("\n")[0], epilog=f"With no command: {default}.")
    sub = p.add_subparsers(dest="command")
    parent = Parser(add_help=False)
    data.add_flags(parent)
    commands = method_commands(sub, parent, method)
    for add in registrars:
        commands.update(add(sub, parent))
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = [default, *argv]
    args = p.parse_args(argv)
    if hasattr(args, "Config"):                 # Config's checks across fields, before any work
        try:
            config(args)
        except UserError as e:
            p.error(str(e))
    args.run = commands[args.command]
    return args


def main(args):
    """Check --out and --device, read the data, run the command; a bad input ends in one line."""
    def run():
        if args.command != "export-official":            # there --out is a folder
            check_writable(getattr(args, "out", None), "--out")
        if getattr(args, "device", None) is not None:
            pick_device(args.device)
        return args.run(args, data.from_args(args) if hasattr(args, "dataset") else None)
    return at_the_boundary(run, getattr(args, "verbose", False))
