"""The training-step benchmark: median ms per step (forward, backward, Adam) of each student,
plain and with DLLM2Rec, in each step mode (eager; on CUDA the captured graph; --compile:
torch.compile), then one full-ranking evaluation, on data shaped like the paper's Games set.
The official code's figures, measured side by side, are in RESULTS.md (speed)."""
from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np
import torch

import data
from common import UserError, pick_device, write_json
from dllm2rec import Config, build_student, target_ranks, training_loss
from results import format_rows
from step import Step


MAX_BENCH_BYTES = 16 * 2**30   # of the bench's synthetic teacher embeddings


def games_shaped(rows: int, n_items: int, d_llm: int, games_dir: Path | None, K: int, seed: int = 0):
    """Synthetic data shaped like the paper's Games set (K teacher candidates a row); histories
    resampled from the official Games val/test rows of games_dir when given, else random."""
    g = np.random.default_rng(seed)
    L = data.MAX_HISTORY
    if games_dir is not None:
        if not (games_dir / "val_data.csv").exists():
            raise UserError(f"--games-dir {games_dir}: no val_data.csv there (the official Games rows)")
        try:
            parts = [data.read_rows_file(games_dir / f, n_items) for f in ("val_data.csv", "test_data.csv")]
        except data.DataError as e:
            raise UserError(f"--items {n_items}: too few for the Games rows of --games-dir ({e}); "
                            "raise --items, or leave --games-dir out") from None
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


def cmd_bench(args, ds) -> dict:
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
                                                           Config().K)
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
                cfg = Config(student=student, distilled=distill_on)
                model = build_student(cfg, args.items, target, emb if distill_on else None).to(device)
                opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True, capturable=mode == "captured")
                step = Step(training_loss, model, opt, cfg, mode, warmup=min(3, args.warmup - 1))
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
                target_ranks(model, hist[:n_eval], lens[:n_eval], target[:n_eval])
                sync(); line["eval_s"] = time.perf_counter() - t0
            results.append(line)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    rows = [[l["student"], "dllm2rec" if l["distilled"] else "plain", *(f"{l[m + '_ms']:.2f}" for m in modes),
             f"{l['eval_s']:.2f}" if "eval_s" in l else None] for l in results]
    print(format_rows(["student", "", *(f"{m} ms/step" for m in modes), "eval s"], rows, left=(0, 1), notes=(
        f"eval = one full-ranking evaluation of {min(args.eval_rows, args.rows)} rows; peak "
        f"{'GPU' if device.type == 'cuda' else 'process'} memory {peak:.0f} MiB (steps touch one batch; compare "
        "with another --rows). The official code's figures, measured side by side: RESULTS.md, speed")))
    out = {"device": str(device), "rows": args.rows, "items": args.items, "d_llm": args.d_llm, "peak_mib": peak,
           "results": results}
    if args.out:
        write_json(Path(args.out), out)
    return out
