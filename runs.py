"""A command's runs: students x variants x seeds of one Config, each trained by dllm2rec.fit.
Runs can be split over processes (a shard trains every n-th run) and taken back from earlier
results files (--reuse), so that n shards and one merge print the table of one command.
Also the results file every training command writes."""
from __future__ import annotations

import gzip
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

import cache
from common import UserError, cpu_name, write_json
from dllm2rec import Config, fit
from step import captured


@dataclass
class Plan:
    """What a command asks for: every student of `students` in every variant, over `seeds`
    seeds from cfg.seed, each run a copy of cfg (the command line's settings, built once)
    with the run's student, seed and variant overrides."""
    cfg: Config
    students: list[str]
    seeds: int
    device: torch.device
    shard: tuple[int, int] | None = None     # (i, n): train the command's runs i, i + n, ... (0-based)
    earlier: dict = field(default_factory=dict)   # {run_key: run}: runs of --reuse's files
    verbose: bool = False
    reuse_only: bool = False                 # train nothing: runs not in `earlier` are left out, and named
    lams: tuple = ()                         # a lam grid: each distilled variant with L_rank at every value (choose_lam)


class RunClock:
    """Runs done of all that a command asks for, over one or several `train` calls; `planned`
    numbers every run of the command (shard (i, n): this process trains runs i, i+n, ..., 0-based)."""

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


# ============================================================================ runs taken from earlier results files
def run_key(fingerprint: str, teacher_checksum: str | None, config: dict, captured_step: bool) -> str:
    """What a run's result depends on: the data, the teacher's outputs (none for a base run:
    fit ignores its teacher), every setting and the kind of step (captured or eager). Settings
    added later leave the key where they are off (the row gate, a baseline's --kd), so earlier
    files stay reusable."""
    if config.get("row_gate", "off") == "off":
        config = {k: v for k, v in config.items() if k not in ("row_gate", "gate_floor")}
    if config.get("kd", "dllm2rec") == "dllm2rec":
        config = {k: v for k, v in config.items() if k != "kd"}
    return json.dumps([fingerprint, teacher_checksum if config.get("distilled") else None, config,
                       bool(captured_step)], sort_keys=True)


def earlier_runs(paths: list[str], ds) -> dict[str, dict]:
    """The runs in results files (of train, mechanism, ablation, at any depth; .json or .json.gz) on this data:
    {run_key: run}, a run that stopped on patience also under its key without the epoch cap
    (see find_earlier); a file unreadable or without such runs is named."""
    found = {}

    def walk(node, path):
        if isinstance(node, dict):
            if "config" in node and "test_ranks" in node and "teacher_checksum" in node:
                if node.get("fingerprint") == ds.fingerprint:
                    run, step = {**node, "from": str(path)}, node.get("captured_step", False)
                    found[run_key(ds.fingerprint, node["teacher_checksum"], node["config"], step)] = run
                    if node.get("converged"):
                        found[run_key(ds.fingerprint, node["teacher_checksum"], {**node["config"], "epochs": None},
                                      step)] = run
                return
            node = list(node.values())
        if isinstance(node, list):
            for child in node:
                walk(child, path)
    for path in paths:
        before = len(found)
        try:
            text = gzip.decompress(Path(path).read_bytes()) if str(path).endswith(".gz") else Path(path).read_bytes()
            walk(json.loads(text), path)
        except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"--reuse {path}: unreadable or not valid JSON ({e})") from None
        if len(found) == before:
            raise UserError(f"--reuse {path}: no runs on {ds.name} (fingerprint {ds.fingerprint}) with their teacher's "
                            "checksum; results files of train, mechanism or ablation hold them")
    return found


def find_earlier(earlier: dict, fingerprint: str, teacher_checksum: str | None, config: dict,
                 captured_step: bool) -> dict | None:
    """The earlier run of these settings, or None: the one of the same key, or one of another
    --epochs that stopped on patience within this run's cap. Training reads the cap only to stop,
    so a run that stopped after E epochs is the same run under any cap of E or more."""
    exact = earlier.get(run_key(fingerprint, teacher_checksum, config, captured_step))
    if exact is not None:
        return exact
    stopped = earlier.get(run_key(fingerprint, teacher_checksum, {**config, "epochs": None}, captured_step))
    return stopped if stopped is not None and len(stopped["epochs"]) <= config["epochs"] else None


# ============================================================================ the runs
def with_lam_grid(over: dict, cfg: Config, lams: tuple) -> list[dict]:
    """A variant's overrides once per lam of the grid where its ranking term acts (distilled, not
    no_rank, lam not set by the variant itself), else once as given."""
    acts = over.get("distilled") and over.get("ablation", cfg.ablation) != "no_rank" and "lam" not in over
    return [{**over, "lam": lam} for lam in lams] if lams and acts else [over]


def train(plan: Plan, ds, teacher, variants, subsets=None, clock: RunClock | None = None, say=print,
          keep: Path | None = None) -> list[dict]:
    """fit every (student, variant, seed) of the plan, with the elapsed time and an ETA after each
    run (clock: of a command that calls this more than once). variants: a list of Config
    overrides, e.g. {} (the base), {"distilled": True, "ablation": "no_wp"}; an override "label"
    names the variant in the table (default: Config.variant); a dict {student: list} gives each
    student its own; with plan.lams every distilled variant runs at each lam of the grid (choose_lam
    keeps one). A run found in plan.earlier is taken from there; with a shard only the command's
    runs i, i+n, i+2n ... (0-based) are trained and the others left out. say: where progress goes.
    keep: a results file that every trained run is added to as it ends, and that runs are taken
    from first (a killed command resumes after its last whole run)."""
    per_student = variants if isinstance(variants, dict) else {s: variants for s in plan.students}
    todo = [(student, grid_over, seed) for student in plan.students for over in per_student[student]
            for grid_over in with_lam_grid(over, plan.cfg, plan.lams)
            for seed in range(plan.cfg.seed, plan.cfg.seed + plan.seeds)]
    clock = clock or RunClock(len(todo), plan.shard)
    teacher_checksum = cache.checksum(teacher) if teacher is not None else None
    kept = json.loads(Path(keep).read_text())["runs"] if keep is not None and Path(keep).exists() else []
    if kept:
        plan = replace(plan, earlier={**earlier_runs([str(keep)], ds), **plan.earlier})
    step, runs = captured(plan.device), []
    for student, over, seed in todo:
        over = dict(over)
        label = over.pop("label", None)
        cfg = replace(plan.cfg, **{"distilled": False, **over, "student": student, "seed": seed})
        label = label or cfg.variant
        if not clock.mine():
            continue
        taken = find_earlier(plan.earlier, ds.fingerprint, teacher_checksum, json.loads(json.dumps(asdict(cfg))), step)
        if taken is not None:
            clock.taken()
            runs.append({**taken, "variant": label})
            say(f"{student} {label} seed {seed}: taken from {taken['from']} (test NDCG@20 "
                f"{taken['test']['NDCG@20']:.4f})", flush=True)
            continue
        if plan.reuse_only:
            say(f"{student} {label} seed {seed}: MISSING (--reuse-only: not trained; its line has fewer seeds)",
                flush=True)
            continue
        say(f"{student} {label} seed {seed} on {plan.device}", flush=True)
        r = fit(ds, cfg, teacher, plan.device, log=print if plan.verbose else (lambda *_: None), subsets=subsets)
        r["variant"], r["teacher_checksum"] = label, teacher_checksum
        runs.append(r)
        if keep is not None:
            kept.append(r)
            write_json(Path(keep), {"dataset": ds.name, "fingerprint": ds.fingerprint, "runs": kept})
        say(f"  selected epoch {r['selected_epoch']} of {len(r['epochs'])}: test HR@20 {r['test']['HR@20']:.4f} "
            f"NDCG@20 {r['test']['NDCG@20']:.4f} ({r['wall_s']['train']:.0f}s train, "
            f"{r['wall_s']['eval']:.0f}s eval) {clock.tick()}", flush=True)
    return runs


def choose_lam(runs: list[dict], lams: tuple) -> list[dict]:
    """lam chosen on validation, as the paper tunes lambda_d: for each (student, variant, teacher)
    trained over the grid, the lam whose runs have the best mean validation NDCG@20 over their
    seeds (ties: the first in the grid); its runs are kept, each recording the grid's means
    ("lam_grid") and the choice ("lam_chosen"). Runs of variants off the grid pass through."""
    if not lams:
        return runs
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["config"]["student"], r["variant"], r["teacher_checksum"]), []).append(r)
    kept = []
    for rs in groups.values():
        by_lam = {}
        for r in rs:
            by_lam.setdefault(r["config"]["lam"], []).append(r)
        if len(by_lam) == 1 and not all(r["config"]["distilled"] and r["config"]["ablation"] != "no_rank" for r in rs):
            kept += rs
            continue
        means = {lam: sum(r["val"]["NDCG@20"] for r in by_lam[lam]) / len(by_lam[lam]) for lam in lams if lam in by_lam}
        best = max(means, key=lambda lam: (means[lam], -lams.index(lam)))
        kept += [{**r, "lam_chosen": best, "lam_grid": {str(k): v for k, v in means.items()}} for r in by_lam[best]]
    return kept


# ============================================================================ results files
def save_shard(plan: Plan, out: str | None, ds, runs: list[dict]) -> bool:
    """With a shard: write this shard's runs (out, or results/<dataset>-shard-i-of-n-<time>.json)
    and say how to print the tables; True when this is a shard (the command then stops)."""
    if not plan.shard:
        return False
    i, n = plan.shard
    out = Path(out) if out else Path("results") / f"{ds.name}-shard-{i}-of-{n}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(out, {"dataset": ds.name, "fingerprint": ds.fingerprint, "argv": sys.argv[1:], "shard": [i, n],
                     "runs": [r for r in runs if "from" not in r]})
    print(f"shard {i}/{n}: wrote {out}; the tables: the same command without --shard, with --reuse and every "
          "shard's file")
    return True


def save_results(out: str | None, ds, runs, summary, **extra) -> Path:
    """The results JSON: out, or results/<dataset>-<time>.json."""
    out = Path(out) if out else Path("results") / f"{ds.name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    machine = {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    write_json(out, {"dataset": ds.name, "fingerprint": ds.fingerprint, "argv": sys.argv[1:], "machine": machine,
                     "summary": summary, **extra, "runs": runs})
    print(f"wrote {out}")
    return out
