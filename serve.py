"""The teacher on serving engines: a thin client (the standard library's urllib) for llama.cpp's
llama-server and vLLM's OpenAI-compatible server, an llm.Engine as the in-process model is, so
that teacher.run_teacher drives either.

Facts of the engines that the client handles:
- an engine process serves generation or embeddings, not both reliably (llama-server with
  --embeddings batches only embeddings; vLLM embeds with a separate --runner pooling engine), so
  there are two lists of endpoints, possibly serving one GGUF;
- the prompt goes as token ids, tokenized by the engine (/tokenize) in two parts as the
  in-process path does (the prefix with BOS, the row's part without), so that both decode the
  same tokens; generation is greedy (temperature 0) with an explicit token limit
  (llama-server's default is unbounded, vLLM's 16), the stop string "\n" and no repetition
  penalty; the generated token ids come back, the in-process stopping rule (a newline, or the
  second quote) cuts them at the same token, and the engine's /detokenize gives the text;
- embeddings are the last token's hidden state, unnormalised: llama-server started with
  --embeddings --pooling last and asked "embd_normalize": -1; vLLM started with --runner
  pooling and a LAST, unnormalised pooler, asked with both spellings of "do not normalise"
  ("normalize": false up to v0.11, "use_activation": false after); the length is checked;
- llama-server's prompt cache can change greedy answers (a cached prefix is computed in another
  batch than the whole prompt), so every request says "cache_prompt": false; vLLM's prefix
  caching is a server flag: start it with --no-enable-prefix-caching (README);
- many requests are in flight per endpoint (twice its slots) so that continuous batching works;
  answers are matched back by index; a request that fails is tried again a bounded number of
  times, then the run stops naming the URL; an answer that is not what was asked (not JSON, an
  HTML error page, a vector of the wrong length, NaN) is refused naming the URL, before
  anything of its chunk is written.
"""
from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cache import TeacherError

RETRIES = 3          # tries of one request before the run stops
TIMEOUT_S = 600.0    # seconds one request may take
VLLM_SLOTS = 32      # requests in flight per vLLM endpoint (it reports no slot count)


@dataclass
class Endpoint:
    url: str
    kind: str                  # "llama-server" or "vllm"
    version: str               # llama-server's build_info, vLLM's version
    model: str                 # the model the engine serves (file name or model id)
    slots: int                 # parallel sequences (llama-server --parallel); vLLM: VLLM_SLOTS
    settings: dict             # what moves the outputs besides the model (recorded in the cache identity)
    n_embd: int | None = None  # the model's hidden size where the engine says it (llama-server)

    @property
    def api(self):
        """The class of its kind (KINDS): its paths, request bodies and answers."""
        return KINDS[self.kind]

    def identity(self) -> dict:
        return {"kind": self.kind, "version": self.version, "model": self.model, **self.settings}


# ============================================================================ HTTP
def call(url: str, path: str, body: dict | None = None, timeout: float = TIMEOUT_S, retries: int = RETRIES):
    """GET (body None) or POST JSON to url + path; the decoded JSON answer. Connection failures,
    timeouts and 5xx answers are tried again (retries in all, waiting 1, 2, 4 ... s); a 4xx answer,
    or an answer that is not JSON, stops at once with one line naming the URL."""
    where = url.rstrip("/") + path
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(retries):
        req = urllib.request.Request(where, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw, ctype = r.read(), r.headers.get("Content-Type", "")
            break
        except urllib.error.HTTPError as e:
            message = error_message(e.read())
            if e.code < 500 or attempt == retries - 1:
                raise TeacherError(f"{where}: HTTP {e.code}: {message}") from None
            why = f"HTTP {e.code}: {message}"
        except (urllib.error.URLError, OSError) as e:     # refused, reset, timed out
            why = str(getattr(e, "reason", e))
            if attempt == retries - 1:
                raise TeacherError(f"{where}: no answer after {retries} tries ({why})") from None
        time.sleep(2 ** attempt)
    try:
        return json.loads(raw)
    except ValueError:
        text = raw[:60].decode("utf-8", errors="replace").replace("\n", " ")
        raise TeacherError(f"{where}: answered {ctype or 'something'} that is not JSON ({text!r}...)") from None


def error_message(raw: bytes) -> str:
    """The message of an engine's error answer ({"error": {"message": ...}} for both), else its start."""
    try:
        err = json.loads(raw).get("error", {})
        return str(err.get("message", err)) if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        return raw[:60].decode("utf-8", errors="replace").replace("\n", " ")


def get_or_none(url: str, path: str, retries: int):
    """A GET's answer, or None where the path is not served (HTTP 404): another kind of engine."""
    try:
        return call(url, path, retries=retries)
    except TeacherError as e:
        if "HTTP 404" not in str(e):
            raise
        return None


# ============================================================================ one class per kind of engine
class LlamaServer:
    """llama.cpp's llama-server: its own /completion, /tokenize and /detokenize; its control tokens
    come back rendered ("<s>")."""
    name = "llama-server"
    renders_control_tokens = True

    def probe(self, url: str, retries: int) -> Endpoint | None:
        props = get_or_none(url, "/props", retries)
        if not (isinstance(props, dict) and "build_info" in props):
            return None
        model = str(props.get("model_path", "")).replace("\\", "/").rsplit("/", 1)[-1]
        loras = call(url, "/lora-adapters", retries=retries)
        models = call(url, "/v1/models", retries=retries)
        try:
            n_embd = int(models["data"][0]["meta"]["n_embd"])
        except (KeyError, IndexError, TypeError, ValueError):
            n_embd = None
        slots = int(props.get("total_slots", 1))
        return Endpoint(url, self.name, str(props["build_info"]), model, slots,
                        {"slots": slots, "cache_prompt": False,
                         "lora": [{"file": str(a.get("path", "")).rsplit("/", 1)[-1], "scale": a.get("scale")}
                                  for a in loras] if isinstance(loras, list) else None}, n_embd)

    def tokenize(self, model: str, text: str, bos: bool, special: bool) -> tuple[str, dict]:
        return "/tokenize", {"content": text, "add_special": bos, "parse_special": special}

    def completion(self, model: str, ids: list[int], max_tokens: int) -> tuple[str, dict]:
        return "/completion", {"prompt": ids, "n_predict": max_tokens, "temperature": 0, "top_k": 1,
                               "repeat_penalty": 1.0, "dry_multiplier": 0.0, "stop": ["\n"], "cache_prompt": False,
                               "return_tokens": True, "stream": False}

    def generated(self, answer) -> tuple[list[int], bool]:
        """(the token ids of "tokens", whether generation ended at an end-of-generation token)."""
        return [int(t) for t in answer["tokens"]], answer.get("stop_type") == "eos"

    def detokenize(self, model: str, ids: list[int]) -> tuple[str, dict]:
        return "/detokenize", {"tokens": ids}

    def text(self, answer) -> str | None:
        return answer.get("content")

    def embedding(self, model: str, ids: list[list[int]]) -> tuple[str, dict]:
        return "/v1/embeddings", {"input": ids, "embd_normalize": -1, "encoding_format": "float"}

    def chat_template(self, url: str, retries: int) -> str | None:
        return call(url, "/props", retries=retries).get("chat_template")


class VLLM:
    """vLLM's OpenAI-compatible server: /v1/completions with the generated ids as logprobs tokens
    "token_id:N", /tokenize and /detokenize naming the model; embeddings from a pooling runner."""
    name = "vllm"
    renders_control_tokens = False

    def probe(self, url: str, retries: int) -> Endpoint | None:
        version, models = get_or_none(url, "/version", retries), get_or_none(url, "/v1/models", retries)
        if not (isinstance(version, dict) and "version" in version and isinstance(models, dict) and models.get("data")):
            return None
        return Endpoint(url, self.name, str(version["version"]), str(models["data"][0]["id"]), VLLM_SLOTS,
                        {"max_model_len": models["data"][0].get("max_model_len")})

    def tokenize(self, model: str, text: str, bos: bool, special: bool) -> tuple[str, dict]:
        return "/tokenize", {"model": model, "prompt": text, "add_special_tokens": bos}

    def completion(self, model: str, ids: list[int], max_tokens: int) -> tuple[str, dict]:
        return "/v1/completions", {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                                   "stop": ["\n"], "repetition_penalty": 1.0, "logprobs": 0,
                                   "return_tokens_as_token_ids": True, "stream": False}

    def generated(self, answer) -> tuple[list[int], bool]:
        choice = answer["choices"][0]
        ids = [int(str(t).rsplit(":", 1)[1]) for t in choice["logprobs"]["tokens"]]
        return ids, choice.get("finish_reason") == "stop" and choice.get("stop_reason") is None

    def detokenize(self, model: str, ids: list[int]) -> tuple[str, dict]:
        return "/detokenize", {"model": model, "tokens": ids}

    def text(self, answer) -> str | None:
        return answer.get("prompt")

    def embedding(self, model: str, ids: list[list[int]]) -> tuple[str, dict]:
        # "do not normalise" in both spellings: "normalize" up to v0.11, "use_activation" after
        return "/v1/embeddings", {"model": model, "input": ids, "encoding_format": "float",
                                  "normalize": False, "use_activation": False}

    def chat_template(self, url: str, retries: int) -> str | None:
        return None                     # vLLM does not serve it


KINDS = {k.name: k for k in (LlamaServer(), VLLM())}     # a new engine: its class, and one entry here


def probe(url: str, retries: int = RETRIES) -> Endpoint:
    """Which engine answers at url, its version, model, slots and the settings that move its outputs."""
    for kind in KINDS.values():
        found = kind.probe(url, retries)
        if found is not None:
            return found
    raise TeacherError(f"{url}: neither llama-server (/props) nor vLLM (/version, /v1/models) answers there")


# ============================================================================ answers, checked
def tokens_of(e: Endpoint, answer) -> list[int]:
    toks = answer.get("tokens") if isinstance(answer, dict) else None
    if not isinstance(toks, list) or not all(isinstance(t, int) for t in toks):
        raise TeacherError(f"{e.url}/tokenize: answered without a list of token ids")
    return toks


def generated_ids(e: Endpoint, answer) -> list[int]:
    """The generated token ids, in order, an end-of-generation token left out (the in-process
    path never appends it)."""
    try:
        ids, eos = e.api.generated(answer)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        raise TeacherError(f"{e.url}: a completion answer without its generated token ids "
                           f"(keys {sorted(answer)[:6] if isinstance(answer, dict) else type(answer).__name__})") from None
    return ids[:-1] if eos and ids else ids


def text_of(e: Endpoint, answer) -> str:
    """A detokenize answer's text, its replacement characters dropped: the engines replace bytes
    that are not UTF-8 by U+FFFD, the in-process path decodes with errors="ignore"."""
    text = e.api.text(answer) if isinstance(answer, dict) else None
    if not isinstance(text, str):
        raise TeacherError(f"{e.url}/detokenize: answered without a text")
    return text.replace("\ufffd", "")


def cut_at(pieces: list[str], max_tokens: int) -> int:
    """The in-process stopping rule (llm.LlamaTeacher.generate) on the generated tokens' pieces:
    the number of tokens kept, up to the one that writes a newline or the second quote."""
    quotes = 0
    for k, piece in enumerate(pieces[:max_tokens]):
        quotes += piece.count('"')
        if "\n" in piece or quotes >= 2:
            return k + 1
    return min(len(pieces), max_tokens)


def vectors_of(e: Endpoint, answer, n: int, d: int | None) -> list[list[float]]:
    """The n embeddings of an answer, by index; refused unless each has length d (or one common
    length) and is finite."""
    try:
        data = sorted(answer["data"], key=lambda r: r["index"])
        vecs = [r["embedding"] for r in data]
    except (KeyError, TypeError):
        raise TeacherError(f"{e.url}/v1/embeddings: an answer without data[].embedding") from None
    if len(vecs) != n:
        raise TeacherError(f"{e.url}/v1/embeddings: {len(vecs)} embeddings for {n} inputs")
    lengths = {len(v) if isinstance(v, list) else -1 for v in vecs}
    if len(lengths) != 1 or (d is not None and lengths != {d}):
        raise TeacherError(f"{e.url}/v1/embeddings: vectors of length {sorted(lengths)}, expected {d or 'one length'} "
                           "(pooling none? start llama-server with --pooling last)")
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for v in vecs for x in v):
        raise TeacherError(f"{e.url}/v1/embeddings: an embedding with NaN, inf or a non-number")
    return vecs


# ============================================================================ the teacher
class ServedTeacher:
    """The teacher's generation on gen_urls and its embeddings on embed_urls, each spread over its
    URLs by index; the interface of llm.LlamaTeacher."""

    def __init__(self, st, gen_urls: list[str], embed_urls: list[str], retries: int = RETRIES,
                 timeout: float = TIMEOUT_S):
        self.retries, self.timeout = retries, timeout
        self.gen = [probe(u, retries) for u in gen_urls]
        self.emb = [probe(u, retries) for u in embed_urls]
        for group, what in ((self.gen, "--server"), (self.emb, "--embed-server")):
            kinds = {json.dumps(e.identity(), sort_keys=True) for e in group}
            if len(kinds) > 1:
                raise TeacherError(f"{what}: the endpoints serve different engines, models or settings: "
                                   + "; ".join(f"{e.url}: {e.identity()}" for e in group))
        self.model_name = f"served-{Path(self.gen[0].model).stem}"
        self.special, self.max_new_tokens = bool(st.chat), st.max_new_tokens
        self.chat_template = self.served_template() if st.chat else None
        self.pool = ThreadPoolExecutor(max_workers=2 * sum(e.slots for e in self.gen + self.emb))
        self.d = self.emb[0].n_embd      # every embedding must have this length (vLLM: the first answer's)
        self.prefix_ids, self.prefix_len, self.pieces, self.control = [], 0, {}, set()
        self.generated_ids = []          # of the last generate(), as llm.LlamaTeacher keeps them
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "embedded_tokens": 0}

    def identity(self) -> dict:
        """The engines' part of the cache identity (not their URLs or number: two servers give the
        same cache as one)."""
        return {"model": {"served": self.gen[0].model}, "llama_cpp": None,
                "engine": {"generation": self.gen[0].identity(), "embeddings": self.emb[0].identity()}}

    def served_template(self) -> str:
        e = self.gen[0]
        template = e.api.chat_template(e.url, self.retries)
        if not template:
            raise TeacherError(f"{e.url}: --chat needs the served model's chat template (llama-server's /props)")
        return template

    def _map(self, group: list[Endpoint], requests: list, parse) -> list:
        """requests[i] = (path, body) for endpoint group[i % len(group)], many in flight;
        parse(i, endpoint, answer) of each, in order."""
        def one(i):
            e = group[i % len(group)]
            return parse(i, e, call(e.url, *requests[i], timeout=self.timeout, retries=self.retries))
        return list(self.pool.map(one, range(len(requests))))

    def tokenize_all(self, texts: list[str], bos: bool) -> list[list[int]]:
        group = self.gen or self.emb
        reqs = [(e := group[i % len(group)]).api.tokenize(e.model, t, bos, self.special) for i, t in enumerate(texts)]
        return self._map(group, reqs, lambda i, e, a: tokens_of(e, a))

    def constrain_to(self, titles) -> None:
        raise TeacherError("--titles-only decodes over a trie of the titles' tokens in process; with --server "
                           "the teacher decodes freely (BIGRec's decoding): drop --titles-only")

    def check_room(self, prefix: str, rests: list[str]) -> None:
        """Nothing to check here: an engine refuses a prompt beyond its context with an error naming it."""

    def set_prefix(self, prefix: str) -> None:
        self.prefix_ids = self.tokenize_all([prefix], bos=True)[0]
        self.prefix_len = len(self.prefix_ids)

    def generate(self, rests: list[str]) -> list[str]:
        """Greedy answers to prefix + rest: the engine's tokens, cut by the in-process rule, as text."""
        ids = [self.prefix_ids + t for t in self.tokenize_all(rests, bos=False)]
        reqs = [(e := self.gen[i % len(self.gen)]).api.completion(e.model, x, self.max_new_tokens)
                for i, x in enumerate(ids)]
        out = self._map(self.gen, reqs, lambda i, e, a: generated_ids(e, a))
        self.learn_pieces({t for o in out for t in o})
        self.generated_ids = [o[:cut_at([self.pieces[t] for t in o], self.max_new_tokens)] for o in out]
        kept = [[t for t in k if t not in self.control] for k in self.generated_ids]
        reqs = [(e := self.gen[i % len(self.gen)]).api.detokenize(e.model, k) for i, k in enumerate(kept)]
        texts = self._map(self.gen, reqs, lambda i, e, a: text_of(e, a))
        self.stats["prompt_tokens"] += sum(len(x) - self.prefix_len for x in ids)
        self.stats["generated_tokens"] += sum(map(len, out))
        return [t.split("\n")[0] for t in texts]

    def learn_pieces(self, ids: set) -> None:
        """Each new token's own text, kept across calls (the stopping rule looks for ASCII in it);
        a control token's is "" as in process (detokenized without special tokens). llama-server
        renders control tokens ("<s>"): one is a token whose text tokenizes back to it only when
        special tokens are parsed. vLLM's /detokenize is taken as it renders them."""
        new = sorted(ids - set(self.pieces))
        group = self.gen
        reqs = [(e := group[i % len(group)]).api.detokenize(e.model, [t]) for i, t in enumerate(new)]
        texts = self._map(group, reqs, lambda i, e, a: text_of(e, a))
        if group[0].api.renders_control_tokens:
            back = lambda special: self._map(group, [(e := group[i % len(group)]).api.tokenize(e.model, t, False, special)
                                                     for i, t in enumerate(texts)], lambda i, e, a: tokens_of(e, a))
            parsed, plain = back(True), back(False)
            texts = ["" if p == [t] and q != [t] else x for t, x, p, q in zip(new, texts, parsed, plain)]
            self.control |= {t for t, x, p, q in zip(new, texts, parsed, plain) if p == [t] and q != [t]}
        self.pieces.update(zip(new, texts))

    def embed(self, texts: list[str], per_request: int = 8):
        """Last-token embeddings of texts (each tokenized with BOS, as in process): [len(texts), d]."""
        import numpy as np
        toks = self.tokenize_all([t or " " for t in texts], bos=True)
        groups = [toks[a:a + per_request] for a in range(0, len(toks), per_request)]
        reqs = [(e := self.emb[i % len(self.emb)]).api.embedding(e.model, g) for i, g in enumerate(groups)]
        parts = self._map(self.emb, reqs, lambda i, e, a: vectors_of(e, a, len(groups[i]), self.d))
        lengths = sorted({len(v) for part in parts for v in part})
        if len(lengths) > 1:
            raise TeacherError(f"{', '.join(e.url for e in self.emb)}: embeddings of lengths {lengths} in one run")
        out = np.asarray([v for part in parts for v in part], np.float32).reshape(len(texts), -1)
        if self.d is None and len(out):
            self.d = out.shape[1]       # later answers must have this length
        self.stats["embedded_tokens"] += sum(map(len, toks))
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
