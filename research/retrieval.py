"""`python -m research retrieval-teacher`: the retrieval teacher (research/teachers.py) from a
teacher cache's LLM title embeddings z_i, its recency decay chosen on the validation rows, its
own HR@20 / NDCG@20 beside popularity's, written as a teacher cache that `train --teacher` reads.
It is not BIGRec's generation: it knows what the LLM's title embeddings know, no more."""
from __future__ import annotations

from pathlib import Path

import numpy as np

import cache
from common import UserError
from dllm2rec import popularity_metrics
from metrics import REPORTED
from research import teachers
from results import format_rows


def cmd_retrieval(args, ds) -> cache.TeacherOutputs:
    source = cache.load_teacher(args.item_embeddings, ds)
    if args.top_n > ds.n_items - ds.train.hist.shape[1]:
        raise UserError(f"--top-n {args.top_n}: more than the {ds.n_items - ds.train.hist.shape[1]} items outside a "
                        f"history of {ds.name}")
    if args.top_n < REPORTED:
        raise UserError(f"--top-n {args.top_n}: fewer than the {REPORTED} items its HR@{REPORTED} needs")
    key = f"NDCG@{REPORTED}"
    found, rows = {}, []
    for decay in args.decays:          # chosen on validation: the test rows stay unseen until the end
        ids, dist = teachers.retrieve(ds.val, source.item_emb, args.top_n, decay)
        found[decay] = cache.teacher_metrics(cache.TopN(np.arange(len(ds.val)), ids, dist), ds.val.target)
        rows.append([f"decay {decay:g}", f"{found[decay][f'HR@{REPORTED}']:.4f}", f"{found[decay][key]:.4f}"])
    decay = max(args.decays, key=lambda d: found[d][key])
    t = teachers.retrieval_teacher(ds, source.item_emb, args.top_n, decay, source=(
        f"retrieval teacher over the title embeddings of {args.item_embeddings} (decay {decay:g}; not BIGRec's generation)"))
    pop = {name: popularity_metrics(ds, getattr(ds, name)) for name in ("val", "test")}
    own = {name: cache.teacher_metrics(t.splits[name], getattr(ds, name).target) for name in ("val", "test")}
    print(format_rows(["validation rows", f"HR@{REPORTED}", key], rows, notes=f"chosen: decay {decay:g}"))
    print(format_rows(["", f"val HR@{REPORTED}", f"val {key}", f"test HR@{REPORTED}", f"test {key}"], [
        [label] + [f"{m[n][k]:.4f}" for n in ("val", "test") for k in (f"HR@{REPORTED}", key)]
        for label, m in (("retrieval teacher", own), ("popularity (training targets)", pop))],
        notes=f"all {len(ds.val)} validation and {len(ds.test)} test rows"))
    identity = {"kind": "retrieval over LLM title embeddings (not BIGRec's generation)", "decay": decay,
                "top_n": args.top_n, "item_embeddings": {"cache": str(args.item_embeddings),
                                                          "checksum": cache.checksum(source),
                                                          "teacher": source.manifest.get("teacher", {})}}
    cache.write_cache(Path(args.out), ds, t.item_emb, t.splits, identity)
    print(f"wrote {args.out}: python dllm2rec.py train --teacher {args.out} distils it")
    return t

