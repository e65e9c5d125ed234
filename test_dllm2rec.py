"""Oracle tests: fast code against slow versions written from the paper and the official code,
the torch side against llama.cpp, metrics against hand-computed ranks, readers against
hand-made fixtures, and an end-to-end run on MovieLens-100K. In pipeline order: data,
students, loss, training, teacher cache, LLM teacher, fine-tuning. CPU only, no network.
ML-100K comes from $DLLM2REC_ML100K, LLaRA's LastFM from $DLLM2REC_LASTFM (tests skip without them). Tests marked
needs_llm need llama-cpp-python and gguf; the others run without them."""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import importlib.util
import json
import math
import os
import pickle
import re
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import baselines as KB
import cache as C
import cli
import data
import dllm2rec as D
import llm as LL
import finetune as FT
import metrics
import model_teacher as MT
import prompt as PR
import research.plots
import results as R
import runs
import step as ST
import students as S
import teacher as T
from common import UserError, at_the_boundary, from_args, write_json
from llm import open_engine
from research import ablation as ABL, commands as RC, gates as G, mechanism as MECH, teachers as SY

ML100K = Path(os.environ.get("DLLM2REC_ML100K", "unset: set DLLM2REC_ML100K"))
LASTFM = Path(os.environ.get("DLLM2REC_LASTFM", "unset: set DLLM2REC_LASTFM"))
needs_llm = pytest.mark.skipif(not (importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("gguf")),
                               reason="needs llama-cpp-python and gguf (see README)")


# ============================================================================ helpers and fixtures
RESEARCH = ("mechanism", "ablation", "compare-teachers", "bench", "retrieval-teacher", "gates", "model-teacher",
            "knowledge", "false-positives", "table5")   # python -m research


def main(argv):
    """A command of either command line: the library's (cli.py) or the research diagnostics'."""
    return (RC.main if argv and argv[0] in RESEARCH else cli.main)(argv)


def parse(argv):
    return cli.parse_args(argv, [RC.add_commands], default=None) if argv and argv[0] in RESEARCH else cli.parse_args(argv)


def tiny_dataset(n_items=40, rows=(300, 40, 40), seed=0) -> data.Dataset:
    g = np.random.default_rng(seed)
    splits = []
    for n in rows:
        lens = g.integers(1, 11, n)
        hist = np.where(np.arange(10) < lens[:, None], g.integers(0, n_items, (n, 10)), n_items)
        splits.append(data.Split(hist, lens, g.integers(0, n_items, n)))
    return data.Dataset("tiny", n_items, [f"item {i}" for i in range(n_items)], *splits)


def random_teacher(ds, n=12, d_llm=24, seed=0, rows=None) -> C.TeacherOutputs:
    g = np.random.default_rng(seed)
    rows = np.arange(len(ds.train)) if rows is None else rows
    ids = np.stack([g.permutation(ds.n_items)[:n] for _ in rows])
    dist = np.sort(20 + g.random((len(rows), n)), axis=1).astype(np.float32)
    emb = g.normal(size=(ds.n_items, d_llm)).astype(np.float32)
    return C.TeacherOutputs(emb, {"train": C.TopN(rows, ids, dist)}, source="random")


def padded_batch(n_items, B=32, seed=0, min_len=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, 11, (B,), generator=g)
    hist = torch.randint(0, n_items, (B, 10), generator=g)
    return torch.where(torch.arange(10) < lens[:, None], hist, n_items), lens


def write_official(folder, titles_fmt, rows, n_items):
    folder.mkdir(exist_ok=True)
    lines = [f"Title {i}\t{i}" if titles_fmt == "bigrec" else f"{i}::Title {i}" for i in range(n_items)]
    (folder / "id2name.txt").write_text("\n".join(lines))
    for split in ("train", "val", "test"):
        body = "".join(f'"{seq}",{l},{t}.0\n' for seq, l, t in rows)
        (folder / f"{split}_data.csv").write_text("seq,len_seq,next\n" + body)


def student(kind, n_items, **kw):
    """A student sized as Config says (the one source of the defaults); kind: a class, or a name
    of S.CHOICES (made by S.make_student: its backbone)."""
    cfg = D.Config()
    base = {"dim": cfg.dim, "dropout": cfg.dropout, "max_len": data.MAX_HISTORY, "ed_weight": cfg.ed_weight}
    if isinstance(kind, str):
        return S.make_student(kind, n_items, **{**base, **kw})
    return kind(n_items, **{**base, **kw})


class FixedScores(S.Student):
    """A 'model' that returns given score rows, to check the metrics."""

    def __init__(self, scores):
        super().__init__(scores.shape[1], dim=1, dropout=0.0, max_len=data.MAX_HISTORY)
        self.table = scores

    def encode(self, hist, lens):
        return hist[:, 0].float()

    def score_all(self, h):
        return self.table[h.long()]


@pytest.fixture(scope="module")
def ml100k():
    if not (ML100K / "u.data").exists():
        if "DLLM2REC_ML100K" in os.environ:
            pytest.fail(f"DLLM2REC_ML100K={ML100K} has no u.data")
        pytest.skip(f"no local ml-100k at {ML100K}; set DLLM2REC_ML100K")
    return data.load_dataset("ml-100k", str(ML100K))


def planted_teacher(ds, n=20, d_llm=32):
    """A PLANTED ORACLE, for a test that the pipe carries information, never for a measurement: it
    knows item-to-next-item transitions counted over all rows, the later (val, test) ones weighted
    up, which the training rows alone cannot teach."""
    counts = np.zeros((ds.n_items + 1, ds.n_items), np.float32)
    for split, weight in ((ds.train, 1), (ds.val, 100), (ds.test, 100)):
        last = split.hist[np.arange(len(split)), np.maximum(split.lens - 1, 0)]
        np.add.at(counts, (last, split.target), weight)
    last = ds.train.hist[np.arange(len(ds.train)), ds.train.lens - 1]
    ids = np.argsort(-counts[last], axis=1, kind="stable")[:, :n]
    dist = 20 - np.log1p(np.take_along_axis(counts[last], ids, 1))
    emb = np.random.default_rng(0).normal(size=(ds.n_items, d_llm)).astype(np.float32)
    return C.TeacherOutputs(emb, {"train": C.TopN(np.arange(len(ds.train)), ids, dist)}, source="planted")


def planted_eval_cache(folder, ds, rank, hits, rows=np.arange(20), n=20):
    """A teacher cache whose val and test top-n hold the target at `rank` for the first `hits`
    rows (absent elsewhere); every other answer is a quoted catalogue title."""
    splits = {"train": random_teacher(ds, n=n).splits["train"]}
    for name in ("val", "test"):
        target = getattr(ds, name).target[rows]
        ids = np.stack([[j for j in range(ds.n_items) if j != t][:n] for t in target])
        ids[:hits, rank] = target[:hits]
        text = np.array([f'"item {i}"' if i % 2 == 0 else "made up" for i in range(len(rows))])
        splits[name] = C.TopN(rows, ids, np.sort(np.ones(ids.shape, np.float32), 1), text)
    C.write_cache(folder, ds, np.random.default_rng(0).normal(size=(ds.n_items, 4)).astype(np.float32), splits,
                  {"model": "planted"})


def corrupt(tmp_path, ds, how):
    t = random_teacher(ds)
    s = t.splits["train"]
    if how == "out_of_range":
        s.ids[4, 2] = ds.n_items
    elif how == "nan":
        s.dist[1, 1] = np.nan
    elif how == "emb_inf":
        t.item_emb[0, 0] = np.inf
    elif how == "negative":
        s.dist[2, 0] = -0.5
    C.write_cache(tmp_path, ds, t.item_emb, t.splits, {"model": "random"})
    if how == "truncated":
        p = tmp_path / "train.npz"
        p.write_bytes(p.read_bytes()[:200])
    if how == "bitflip":          # one mantissa bit of the last embedding: still a finite float
        p = tmp_path / "item_embeddings.npy"
        b = bytearray(p.read_bytes())
        b[-4] ^= 1
        p.write_bytes(bytes(b))


def write_tiny_llama(path, seed=0, n_layer=2, d=32, n_head=4, n_kv=2, ff=64, context=1024):
    """A random-weight llama GGUF: byte-fallback SentencePiece vocabulary of 355 tokens, 2 layers."""
    import gguf
    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581"] + [chr(c) for c in range(32, 127)]
    types = [2, 3, 3] + [6] * 256 + [1] * 96
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"tiny-random-llama-{seed}")
    w.add_context_length(context); w.add_embedding_length(d); w.add_block_count(n_layer)
    w.add_feed_forward_length(ff); w.add_head_count(n_head); w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5); w.add_rope_dimension_count(d // n_head); w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama"); w.add_token_list(tokens); w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types); w.add_bos_token_id(1); w.add_eos_token_id(2); w.add_unk_token_id(0); w.add_add_bos_token(True)
    t = lambda *shape: (rng.standard_normal(shape) * 0.3).astype(np.float32)
    w.add_tensor("token_embd.weight", t(len(tokens), d)); w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    w.add_tensor("output.weight", 10 * t(len(tokens), d))   # decisive logits: greedy paths do not hinge on rounding
    hd = d // n_head
    for i in range(n_layer):
        for name, shape in (("attn_q", (d, d)), ("attn_k", (n_kv * hd, d)), ("attn_v", (n_kv * hd, d)),
                            ("attn_output", (d, d)), ("ffn_gate", (ff, d)), ("ffn_up", (ff, d)), ("ffn_down", (d, ff))):
            w.add_tensor(f"blk.{i}.{name}.weight", t(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def tiny_settings(model, **kw):
    return T.TeacherSettings(**{**dict(model=str(model), n_ctx=1024, n_seq=4, max_new_tokens=12, top_n=15,
                                       train_rows=150, eval_rows=20), **kw})


def llama_cpp_logits(model_path, tokens, lora=None):
    from llama_cpp import Llama
    ref = Llama(str(model_path), n_ctx=256, logits_all=True, verbose=False, type_k=0, type_v=0,  # float32 KV cache
                lora_path=str(lora) if lora else None)
    ref.eval(tokens)
    return np.array(ref.scores[:len(tokens)])


def sample_tokens(model_path):
    from llama_cpp import Llama
    return Llama(str(model_path), vocab_only=True, verbose=False).tokenize(
        b'The user has watched the following movies before:"Heat (1995)", "Casino (1995)"', add_bos=True)


# ============================================================================ data (data.py)
def test_windowing_and_split_on_hand_made_rows():
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
    times = [[1, 2, 3], list(range(10, 23))]
    hist, lens, target, t, user = data.window_rows(seqs, times, n_items=20)
    assert target.tolist() == [3, 14, 15, 16] and user.tolist() == [0, 1, 1, 1]   # <= 11 items: one row; else from i = 10
    assert hist[0].tolist() == [1, 2] + [20] * 8 and lens[0] == 2
    assert hist[1].tolist() == list(range(4, 14)) and hist[3].tolist() == list(range(6, 16))
    h, l, tg, tm, u = data.window_rows([list(range(12))], [list(range(12))], 20, min_history=10)
    assert tg.tolist() == [10, 11]
    n = 20
    tr, va, te = data.split_by_time(np.arange(n)[:, None], np.ones(n, int), np.arange(n), np.arange(n)[::-1].copy(),
                                    np.arange(n) % 3)
    assert tr.target.tolist() == list(range(19, 3, -1)) and va.target.tolist() == [3, 2] and te.target.tolist() == [1, 0]
    assert te.user.tolist() == [1, 0] and va.user.tolist() == [0, 2]                # each row keeps its user


def test_movielens_100k_reader(tmp_path):
    (tmp_path / "u.data").write_text("".join(f"{u}\t{i}\t5\t{t}\n" for u in (2, 1) for t, i in enumerate(range(1, 13), 100 * u)))
    (tmp_path / "u.item").write_bytes("".join(f"{i}|Mis\xe9rables {i}|x\n" for i in range(1, 14)).encode("latin-1"))
    ds = data.read_movielens(tmp_path, "ml-100k")
    assert ds.n_items == 12 and ds.titles[0] == "Misérables 1"
    assert len(ds.train) + len(ds.val) + len(ds.test) == 4   # 2 users x (12 - 10) rows
    assert ds.train.hist[0].tolist() == list(range(10))
    assert ds.train.user.tolist() == [0, 0, 1] and ds.test.user.tolist() == [1]   # users 1, 2 in sorted order
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataError, match=r"empty/u.data: file not found"):   # asked for ML-100K: its file named
        data.load_dataset("ml-100k", str(empty))


def test_movielens_dat_reader(tmp_path):
    (tmp_path / "ratings.dat").write_text("".join(f"1::{i}::4::{i}\n" for i in (30, 10, 20) * 4))
    (tmp_path / "movies.dat").write_bytes("10::A (1990)::Drama\n20::B\xe9 (1991)::Comedy\n30::C::X\n".encode("latin-1"))
    ds = data.read_movielens(tmp_path)
    assert ds.titles == ["A (1990)", "Bé (1991)"] and ds.n_items == 2   # "C": too short, dropped (BIGRec)


def test_movielens_10m_protocol_samples_rows_in_time_order(tmp_path, monkeypatch):
    """--sample-rows TRAIN,EVAL: after the time split, fixed-seed samples of the training rows and
    of the validation and test rows each, in time order; another fingerprint; the same every run."""
    g = np.random.default_rng(0)
    lines = [f"{u}::{g.integers(1, 30)}::4::{1000 * u + 7 * k}\n" for u in range(1, 21) for k in range(15)]
    (tmp_path / "ratings.dat").write_text("".join(lines))
    (tmp_path / "movies.dat").write_text("".join(f"{i}::Movie {i} (1990)::Drama\n" for i in range(1, 30)))
    whole = data.read_movielens(tmp_path)
    assert (len(whole.train), len(whole.val), len(whole.test)) == (80, 10, 10)    # 20 users x (15 - 10) rows
    few = data.sample_rows(whole, 30, 4)
    assert (len(few.train), len(few.val), len(few.test)) == (30, 4, 4) and few.fingerprint != whole.fingerprint
    for part, full in ((few.train, whole.train), (few.test, whole.test)):
        at = [next(i for i in range(len(full)) if (full.hist[i] == part.hist[k]).all() and full.target[i] == part.target[k]
                   and full.user[i] == part.user[k]) for k in range(len(part))]
        assert at == sorted(at) and len(set(at)) == len(at)             # a subset, in the split's time order
    assert data.sample_rows(whole, 30, 4).fingerprint == few.fingerprint
    assert data.sample_rows(whole, 500, 500).fingerprint == whole.fingerprint       # more than there is: all
    args = parse(["train", "--dataset", str(tmp_path), "--sample-rows", "30,4"])
    assert data.from_args(args).fingerprint == few.fingerprint
    with pytest.raises(SystemExit, match=r"--sample-rows: '30': expected TRAIN,EVAL"):
        parse(["train", "--sample-rows", "30"])


@pytest.mark.parametrize("year", [2014, 2018])
def test_amazon_reader(tmp_path, year):
    reviews = [{"reviewerID": u, "asin": a, "unixReviewTime": t, "overall": 5.0}
               for u in ("U1", "U2") for t, a in enumerate(["B3", "B1", "B2", "B9", "B1"])]
    metas = [{"asin": "B1", "title": "Game One"}, {"asin": "B2", "title": "Game Two", "price": 3},
             {"asin": "B3", "title": "Three"}, {"asin": "B9", "title": "x"}]     # title too short: dropped
    dump = (lambda r: repr(r)) if year == 2014 else json.dumps                     # 2014 meta: dict literals
    with gzip.open(tmp_path / "reviews_Games_5.json.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in reviews))
    (tmp_path / "meta_Games.json").write_text("".join(dump(m) + "\n" for m in metas))
    ds = data.load_dataset(str(tmp_path))
    assert ds.titles == ["Game One", "Game Two", "Three"]
    assert ds.n_items == 3
    # per user: B3 B1 B2 (B9 dropped) B1 -> one row, history [2, 0, 1], target 0
    rows = np.concatenate([s.hist[:, :4] for s in (ds.train, ds.val, ds.test)])
    assert rows.tolist() == [[2, 0, 1, 3]] * 2
    assert [len(ds.train), len(ds.val), len(ds.test)] == [1, 0, 1]


@pytest.mark.parametrize("time,message", [("Infinity", "unixReviewTime inf is not an integer"),
                                          ("1e30", "unixReviewTime 1e+30 is out of range"),
                                          ('"soon"', "unixReviewTime 'soon' is not an integer")])
def test_an_amazon_timestamp_that_is_no_time_names_the_file_and_record(tmp_path, time, message):
    good = '{"reviewerID": "u1", "asin": "a1", "unixReviewTime": 5}'
    (tmp_path / "r.json").write_text(good + '\n{"reviewerID": "u1", "asin": "a2", "unixReviewTime": ' + time + "}\n")
    (tmp_path / "meta_x.json").write_text('{"asin": "a1", "title": "One"}\n{"asin": "a2", "title": "Two"}\n')
    with pytest.raises(data.DataError, match=re.escape(f"{tmp_path / 'r.json'} record 2: {message}")):
        data.load_dataset(str(tmp_path))


@pytest.mark.parametrize("fmt", ["bigrec", "llara"])
def test_official_rows_reader(tmp_path, fmt):
    rows = [([1, 2] + [5] * 8, 2, 3), ([5] * 10, 1, 0)]     # the second: LLaRA's empty history
    write_official(tmp_path, fmt, rows, 5)
    ds = data.load_dataset(str(tmp_path))
    assert ds.n_items == 5 and ds.titles[4] == "Title 4"
    assert ds.train.lens.tolist() == [2, 0] and ds.train.target.tolist() == [3, 0]
    assert ds.train.user is None and ds.test.user is None          # the official rows carry no users
    (tmp_path / "train_data.csv").write_text('seq,len_seq,next\n"[1, 2, 9, 5, 5, 5, 5, 5, 5, 5]",3,1\n')
    with pytest.raises(data.DataError, match=r"train_data.csv row 1: item id outside"):
        data.load_dataset(str(tmp_path))


def test_pickled_rows_need_opt_in(tmp_path):
    write_official(tmp_path, "llara", [([1] + [5] * 9, 1, 2)], 5)
    (tmp_path / "train_data.csv").unlink()
    (tmp_path / "train_data.df").write_bytes(pickle.dumps({"not": "a frame"}))
    with pytest.raises(data.DataError, match="train_data.df: a pickled DataFrame; reading it runs code"):
        data.load_dataset(str(tmp_path))


def test_pickled_rows_are_read_in_the_official_codes_label_order(tmp_path, monkeypatch):
    """The official code finds a training row's teacher row by its index label: a permuted index
    is read in label order, an index that is not 0..n-1 is refused, a missing pandas is said."""
    recs = ["a", "b", "c"]
    assert data.in_label_order(Path("t.df"), [0, 1, 2], recs) == recs
    assert data.in_label_order(Path("t.df"), [2, 0, 1], recs) == ["b", "c", "a"]
    with pytest.raises(data.DataError, match=r"t.df: the frame's index is not 0..2"):
        data.in_label_order(Path("t.df"), [0, 1, 5], recs)
    write_official(tmp_path, "llara", [([1] + [5] * 9, 1, 2)], 5)
    (tmp_path / "train_data.csv").unlink()
    (tmp_path / "train_data.df").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pandas", None)                 # as where pandas is not installed
    with pytest.raises(data.DataError, match="train_data.df: reading a pickled DataFrame needs pandas"):
        data.load_dataset(str(tmp_path), allow_pickle=True)


def test_llara_lastfm_copy_if_present():
    if not LASTFM.exists():
        pytest.skip(f"no local LLaRA LastFM copy at {LASTFM}")
    ds = data.load_dataset(str(LASTFM))
    assert (ds.n_items, len(ds.train), len(ds.val), len(ds.test)) == (4606, 50800, 122, 122)
    assert (ds.train.lens == 0).sum() == 976


def test_ml100k_download_refuses_a_bad_checksum(tmp_path, monkeypatch):
    def fake_retrieve(url, path):
        Path(path).write_bytes(b"not the GroupLens zip")
    monkeypatch.setattr(data.urllib.request, "urlretrieve", fake_retrieve)
    with pytest.raises(data.DataError, match="md5"):
        data.download_ml100k(tmp_path / "ml-100k")
    assert not (tmp_path / "ml-100k").exists()


def test_bad_input_names_the_file(tmp_path):
    (tmp_path / "u.data").write_text("1\t2\t3\n")
    (tmp_path / "u.item").write_text("1|A\n")
    with pytest.raises(data.DataError, match=r"u.data line 1: expected 4"):
        data.load_dataset(str(tmp_path))


def test_u_item_saved_as_utf8_is_read_right(tmp_path):
    """GroupLens ships u.item in latin-1; a copy re-saved as UTF-8 must not become mojibake."""
    (tmp_path / "u.data").write_text("".join(f"1\t{i}\t5\t{i}\n" for i in range(1, 13)))
    (tmp_path / "u.item").write_text("".join(f"{i}|Mis\xe9rables {i}|x\n" for i in range(1, 14)), encoding="utf-8")
    assert data.read_movielens(tmp_path, "ml-100k").titles[0] == "Misérables 1"


@pytest.mark.parametrize("row,message", [
    ('"[1, 2, 3, 4, 9, 9, 9, 9, 9, 9]",4,3.7', "row 1: next '3.7' is not an integer"),
    ('"[1.5, 2.9, 9, 9, 9, 9, 9, 9, 9, 9]",2,3', "row 1: seq item id 1.5 is not an integer"),
    ('"[1, 2, 3, 4, 9, 9, 9, 9, 9, 9]",7,3', "row 1: len_seq 7, but seq holds 4 item ids"),
    ('"[1, 2, 3, 4, 9, 9, 9, 9, 9, 9]",abc,3', "row 1: len_seq 'abc' is not an integer"),
    ('"[1, 2, 3, 4, 9, 9, 9, 9, 9, 9]",4,x', "row 1: next 'x' is not an integer"),
    (None, "val_data.csv: no rows"),
])
def test_lax_official_rows_are_refused_with_file_and_row(tmp_path, row, message):
    write_official(tmp_path, "bigrec", [([1, 2, 3, 4] + [9] * 6, 4, 3)], 9)
    (tmp_path / "val_data.csv").write_text("seq,len_seq,next\n" + (row + "\n" if row else ""))
    with pytest.raises(data.DataError, match=re.escape(message)):
        data.load_dataset(str(tmp_path))


def test_official_rows_with_bad_bytes_or_titles_are_refused(tmp_path):
    write_official(tmp_path, "bigrec", [([1, 2, 3, 4] + [9] * 6, 4, 3)], 9)
    (tmp_path / "val_data.csv").write_bytes(b'seq,len_seq,next\n"[1, 2, 3, 4, 9, 9, 9, 9, 9, 9]",4,3\xff\n')
    with pytest.raises(data.DataError, match="val_data.csv: not UTF-8 text"):
        data.load_dataset(str(tmp_path))
    write_official(tmp_path, "bigrec", [([1, 2, 3, 4] + [9] * 6, 4, 3)], 9)
    (tmp_path / "id2name.txt").write_text("".join(f"T{i}\t{i}\n" for i in range(9)) + "Again\t3\n")
    with pytest.raises(data.DataError, match="id2name.txt line 10: item id 3 appears twice"):
        data.load_dataset(str(tmp_path))
    (tmp_path / "id2name.txt").write_text("".join(f" \t{i}\n" for i in range(9)))
    with pytest.raises(data.DataError, match="id2name.txt line 1: item 0 has an empty title"):
        data.load_dataset(str(tmp_path))


def test_ml100k_protocol(ml100k):
    assert (ml100k.n_items, len(ml100k.train), len(ml100k.val), len(ml100k.test)) == (1682, 72456, 9057, 9057)
    assert ml100k.titles[0] == "Toy Story (1995)" and (ml100k.train.lens == 10).all()
    assert ml100k.fingerprint == data.load_dataset("ml-100k", str(ML100K)).fingerprint


# ============================================================================ students (students.py)
def test_sasrec_last_position_equals_every_position_version():
    torch.manual_seed(0)
    for cls in (S.SASRec, S.CL4SRec, "dros"):
        m = student(cls, 50, teacher_emb=torch.randn(50, 16)).eval()
        hist, lens = padded_batch(50)
        assert torch.allclose(m(hist, lens), m.encode_all_positions(hist, lens), atol=1e-5)


def official_sasrec_state(m, hist, lens, residual_on_normalised=True):
    """The official SASRec forward (main.py SASRec + SASRecModules_ori MultiHeadAttention and
    PositionwiseFeedForward) transcribed from the official layout on m's weights, without dropout:
    masks written as the official code writes them (-2^32 + 1 fills, sign(|sum|) key and
    query masks), the attention residual on the normalised query."""
    B, L = hist.shape
    mask = (hist != m.n_items).float().unsqueeze(-1)                 # [B, L, 1]
    seq = (m.embed(hist) + m.pos.weight[:L]) * mask                  # item + position, padding zeroed
    q = m.ln_1(seq)                                                  # seq_normalized
    Q, K_, V = m.q(q), m.k(seq), m.v(seq)
    att = Q @ K_.transpose(1, 2) / 64 ** 0.5                         # [B, L, L]
    fill = torch.full_like(att, -2 ** 32 + 1)
    key_mask = torch.sign(torch.abs(seq.sum(-1))).unsqueeze(1).expand(B, L, L)
    att = torch.where(key_mask == 0, fill, att)
    att = torch.where(torch.tril(torch.ones(L, L)) == 0, fill, att)
    att = torch.softmax(att, -1) * torch.sign(torch.abs(q.sum(-1))).unsqueeze(-1)   # query mask
    a = att @ V + (q if residual_on_normalised else seq)
    u = m.ln_2(a)
    f = m.ln_ff(m.w_2(torch.relu(m.w_1(u))) + u) * mask              # feed-forward with its own residual and LN
    return m.ln_3(f)[torch.arange(B), lens - 1]                      # LN_3, the last real position


def test_sasrec_equals_the_official_layout_on_shared_weights():
    torch.manual_seed(3)
    for cls in (S.SASRec, S.CL4SRec, "dros"):
        m = student(cls, 50, teacher_emb=torch.randn(50, 16)).eval()
        for p in m.parameters():                  # move LayerNorms and biases off their initial values
            p.data += 0.1 * torch.randn_like(p)
        hist, lens = padded_batch(50, seed=3, min_len=1)
        with torch.no_grad():
            ours, official = m(hist, lens), official_sasrec_state(m, hist, lens)
            raw_residual = official_sasrec_state(m, hist, lens, residual_on_normalised=False)
        assert torch.allclose(ours, official, atol=1e-5), (ours - official).abs().max()
        assert (ours - raw_residual).abs().max() > 1e-2     # the other layout is told apart


def test_gru4rec_has_no_dropout():
    torch.manual_seed(0)
    m = student(S.GRU4Rec, 50, teacher_emb=torch.randn(50, 16), dropout=0.5)
    hist, lens = padded_batch(50, min_len=1)
    assert torch.equal(m.train()(hist, lens), m.eval()(hist, lens))


def test_gru4rec_ignores_padding_and_items_after_the_last():
    torch.manual_seed(0)
    m = student(S.GRU4Rec, 50).eval()
    hist, lens = padded_batch(50, min_len=1)
    other = hist.clone()
    other[torch.arange(10) >= lens[:, None]] = 3             # garbage instead of padding
    alone = torch.stack([m(hist[i:i + 1, :lens[i]], lens[i:i + 1])[0] for i in range(len(lens))])
    assert torch.allclose(m(hist, lens), alone, atol=1e-5)
    assert torch.allclose(m(other, lens), alone, atol=1e-5)


def official_caser_state(m, hist):
    """The official Caser forward (main.py Caser) written out as sums over m's weights, without
    dropout: history embedded and padding zeroed; each horizontal filter of height h slid over
    the L - h + 1 windows, ReLU, max over the windows; the vertical filter a weighted sum of the
    L rows, ReLU; concatenated [horizontal pools, vertical]."""
    E = m.embed(hist) * (hist != m.n_items).unsqueeze(-1)           # [B, L, d]
    B, L, d = E.shape
    pools = []
    for conv, h in zip(m.horizontal, S.CASER_FILTER_SIZES):
        for f in range(conv.out_channels):
            W, b = conv.weight[f, 0], conv.bias[f]                   # [h, d]
            windows = torch.stack([(E[:, t:t + h] * W).sum((1, 2)) + b for t in range(L - h + 1)], 1)
            pools.append(torch.relu(windows).max(1).values)          # [B]
    w, b = m.vertical.weight[0, 0, :, 0], m.vertical.bias[0]         # [L]
    vertical = torch.relu((E * w[None, :, None]).sum(1) + b)          # [B, d]
    return torch.cat([torch.stack(pools, 1), vertical], 1)


def test_caser_equals_the_official_layout_on_its_own_weights():
    torch.manual_seed(2)
    m = student(S.Caser, 50, teacher_emb=torch.randn(50, 16)).eval()
    hist, lens = padded_batch(50, seed=2)
    hist[0] = 50                                                     # an empty history: all padding
    with torch.no_grad():
        ours, official = m(hist, lens), official_caser_state(m, hist)
        assert ours.shape == (len(hist), 64 + 3 * 16) and torch.allclose(ours, official, atol=1e-5)
        assert torch.allclose(m(hist[:1], lens[:1]), official[:1], atol=1e-5)    # one row keeps its batch axis
    assert m.out.in_features == 64 + 3 * 16 and (m.horizontal[0].bias == 0.1).all()
    with pytest.raises(ValueError, match="exactly 10 ids"):
        m(hist[:, :5], lens)


def test_score_equals_full_scores_gathered():
    m = student(S.SASRec, 50)
    h = torch.randn(6, 64)
    items = torch.randint(0, 50, (6, 3))
    assert torch.allclose(m.score(h, items), m.score_all(h).gather(1, items), atol=1e-5)


def test_item_embedding_is_offset_plus_projected_teacher():
    z = torch.randn(20, 12)
    e = S.ItemEmbedding(20, 8, z, 0.3, use_offset=True)
    items = torch.tensor([[0, 5, 20]])                       # 20 = padding
    out = e(items)
    want = e.offset.weight[[0, 5]] + 0.3 * (z[[0, 5]] @ e.g.weight.T + e.g.bias)
    assert torch.allclose(out[0, :2], want, atol=1e-6)
    assert (out[0, 2] == 0).all()
    no_off = S.ItemEmbedding(20, 8, z, 0.3, use_offset=False)
    assert no_off.offset is None
    assert torch.allclose(no_off(items)[0, 1], no_off.g(z[5]), atol=1e-6)   # the paper's e_i = g(z_i)


def test_augmentations_copy_and_keep_their_promises():
    n, pad, mask_id = 50, 50, 51
    hist, lens = padded_batch(n, B=200, seed=3)
    before = (hist.clone(), lens.clone())
    crop, c_len = S.augment_crop(hist, lens, pad, S.CROP_ETA)
    masked, _ = S.augment_mask(hist, lens, mask_id, S.MASK_GAMMA)
    reord, _ = S.augment_reorder(hist, lens, S.REORDER_BETA)
    views = S.augment_pair(hist, lens, pad, mask_id)
    assert torch.equal(hist, before[0]) and torch.equal(lens, before[1])   # inputs untouched
    for i in range(len(lens)):
        L, real = int(lens[i]), hist[i, :int(lens[i])].tolist()
        k = int(c_len[i])
        assert k == (max(1, math.floor(0.6 * L)) if L else 0)
        window = crop[i, :k].tolist()
        assert any(real[s:s + k] == window for s in range(L - k + 1)) and (crop[i, k:] == pad).all()
        assert int((masked[i] == mask_id).sum()) == math.floor(0.3 * L)
        assert all(masked[i, j] in (mask_id, hist[i, j]) for j in range(10))
        assert sorted(reord[i, :L].tolist()) == sorted(real) and (reord[i, L:] == pad).all()
        changed = [j for j in range(L) if reord[i, j] != hist[i, j]]
        assert not changed or max(changed) - min(changed) < math.floor(0.6 * L)
    for v, l in views:
        assert v.shape == hist.shape and v.data_ptr() != hist.data_ptr()


def test_info_nce_equals_slow_formula():
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    z = torch.cat([z1, z2])
    losses = []
    for i in range(8):
        j = (i + 4) % 8
        others = [k for k in range(8) if k != i]
        losses.append(-(z[i] @ z[j]) + torch.logsumexp(torch.stack([z[i] @ z[k] for k in others]), 0))
    assert S.info_nce(z1, z2, 1.0).item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-10)


def direct_dro(y, targets, ps, beta=1.0):
    out = torch.empty(targets.shape, dtype=y.dtype)
    for s in range(y.shape[0]):
        for k in range(targets.shape[1]):
            one = torch.zeros(y.shape[1], dtype=y.dtype)
            one[targets[s, k]] = 1
            out[s, k] = torch.logsumexp(ps * (y[s] - one) ** 2 / beta, 0)
    return out


def test_dro_loss_and_gradient_equal_direct_formula():
    torch.manual_seed(0)
    B, n = 5, 40
    y = (torch.randn(B, n, dtype=torch.float64) * 3).requires_grad_()
    ps = D.dro_ps(torch.randint(0, 9, (n,))).double()
    targets = torch.randint(0, n, (B, 4))
    targets[0, 0] = (ps * y[0].detach() ** 2).argmax()        # a target that is the row's argmax
    fast, slow = D.dro_loss(y, targets, ps, 2.0), direct_dro(y, targets, ps, 2.0)
    assert torch.allclose(fast, slow, atol=1e-12)
    w = torch.randn(B, 4, dtype=torch.float64)
    g_fast, = torch.autograd.grad((fast * w).sum(), y)
    g_slow, = torch.autograd.grad((slow * w).sum(), y)
    assert torch.allclose(g_fast, g_slow, atol=1e-10)


def test_dro_loss_stable_for_large_scores_in_float32():
    torch.manual_seed(1)
    y = torch.randn(3, 50, dtype=torch.float64) * 2
    y[:, 7] = 40.0                                           # exp(ps * 1600) overflows
    ps = torch.full((50,), 0.6, dtype=torch.float64)
    targets = torch.tensor([[7, 1], [2, 7], [7, 7]])
    fast = D.dro_loss(y.float(), targets, ps.float(), 1.0)
    assert torch.isfinite(fast).all()
    assert torch.allclose(fast.double(), direct_dro(y, targets, ps), rtol=1e-5)


def test_dro_ps():
    ps = D.dro_ps(torch.tensor([0, 1, 2]))
    assert torch.allclose(ps, torch.tensor([1 / 6, 2 / 6, 3 / 6]) ** 0.05)


# ============================================================================ the loss: the paper's terms against slow versions
def slow_distill(s_cand, s_neg, dist, cand, topk, lam, gammas, dro_cand=None, alpha=0.5, covered=None, official=False,
                 gate=None):
    """The paper's ranking distillation, one row and one candidate at a time. official: the
    official code's formulas, w_c = (exp(-d_r) + 1e-8) / sum_r (exp(-d_r) + 1e-8), w_o in
    {1e-8, 1}, -log sigmoid(1 - s_neg) for the negative, and the DRO candidate term as its
    [B, 1] x [B] broadcast: sum_r mean_b(w_br) * mean_b(L_DRO(b, c_r)). gate: a row gate,
    each covered row's weights times g_b / (the mean of g over the batch's covered rows)."""
    B, K = cand.shape
    g_p, g_c, g_o = gammas
    eps = 1e-8 if official else 0.0
    sig = lambda x: 1 / (1 + math.exp(-x))
    Z = sum(math.exp(-r) for r in range(1, K + 1))
    rows = [b for b in range(B) if covered is None or covered[b]]    # uncovered rows add 0 to the mean
    mean_gate = sum(float(gate[b]) for b in rows) / len(rows) if gate is not None else 1.0

    def weights(b):
        conf = [math.exp(-dist[b, q]) + eps for q in range(K)]
        w_o = [(1.0 if int(cand[b, q]) in set(topk[b].tolist()) else 0.0) + eps for q in range(K)]
        raw = [g_p * math.exp(-(q + 1)) / Z + g_c * conf[q] / sum(conf) + g_o * w_o[q] for q in range(K)]
        scale = float(gate[b]) / mean_gate if gate is not None else 1.0
        return [scale * x / sum(raw) for x in raw]

    total = 0.0
    for r in range(K):
        w_r = {b: weights(b)[r] for b in rows}
        for b in rows:
            neg = -math.log(sig(1 - s_neg[b])) if official else -math.log(1 - sig(s_neg[b]))
            total += w_r[b] * (-math.log(sig(s_cand[b, r])) + neg) / B
        if dro_cand is not None and official:
            total += alpha * (sum(w_r.values()) / B) * (sum(dro_cand[b, r] for b in range(B)) / B)
        elif dro_cand is not None:
            total += alpha * sum(w_r[b] * dro_cand[b, r] for b in rows) / B
    return lam * total


@pytest.mark.parametrize("with_dro,with_cover,gammas", [(False, False, (0.3, 0.5, 0.1)), (True, True, (0.3, 0.5, 0.1)),
                                                        (False, True, (0.0, 0.5, 0.1)), (True, False, (0.3, 0.0, 0.0))])
@pytest.mark.parametrize("official", [False, True])
def test_distill_equals_slow_loop(with_dro, with_cover, gammas, official):
    g = torch.Generator().manual_seed(1)
    B, K, n = 7, 10, 30
    cand = torch.stack([torch.randperm(n, generator=g)[:K] for _ in range(B)])
    topk = torch.stack([torch.randperm(n, generator=g)[:K] for _ in range(B)])
    topk[0] = cand[0]                      # full agreement in one row, some in others
    s_cand, s_neg = torch.randn(B, K, generator=g, dtype=torch.float64) * 3, torch.randn(B, generator=g, dtype=torch.float64)
    dist = 14 + 8 * torch.rand(B, K, generator=g, dtype=torch.float64)   # where the official w_c departs
    dro = torch.rand(B, K, generator=g, dtype=torch.float64) * 4 if with_dro else None
    cover = torch.tensor([True, False, True, True, False, True, True]) if with_cover else None
    cfg = D.Config(lam=0.7, gammas=gammas, alpha=0.5, official_weights=official, official_neg=official,
                   official_dro=official)
    fast = D.distill(s_cand, s_neg, dist, cand, topk, cfg, dro, cover)
    slow = slow_distill(s_cand.numpy(), s_neg.numpy(), dist.numpy(), cand, topk, 0.7, gammas,
                        None if dro is None else dro.numpy(), 0.5, cover, official)
    assert fast.item() == pytest.approx(slow, rel=1e-9)
    other = slow_distill(s_cand.numpy(), s_neg.numpy(), dist.numpy(), cand, topk, 0.7, gammas,
                         None if dro is None else dro.numpy(), 0.5, cover, not official)
    assert abs(fast.item() - other) > 1e-6           # the two formulas differ on these inputs


@pytest.mark.parametrize("with_dro,with_cover", [(False, False), (True, True), (False, True)])
def test_gated_distill_equals_slow_loop(with_dro, with_cover):
    g = torch.Generator().manual_seed(3)
    B, K, n = 7, 10, 30
    cand = torch.stack([torch.randperm(n, generator=g)[:K] for _ in range(B)])
    topk = torch.stack([torch.randperm(n, generator=g)[:K] for _ in range(B)])
    s_cand, s_neg = torch.randn(B, K, generator=g, dtype=torch.float64) * 3, torch.randn(B, generator=g, dtype=torch.float64)
    dist = 1 + 3 * torch.rand(B, K, generator=g, dtype=torch.float64)
    dro = torch.rand(B, K, generator=g, dtype=torch.float64) * 4 if with_dro else None
    cover = torch.tensor([True, False, True, True, False, True, True]) if with_cover else None
    gate = torch.tensor([0.1, 0.9, 1.0, 0.1, 0.5, 0.63, 0.2], dtype=torch.float64)
    cfg = D.Config(lam=0.7)
    fast = D.distill(s_cand, s_neg, dist, cand, topk, cfg, dro, cover, gate)
    slow = slow_distill(s_cand.numpy(), s_neg.numpy(), dist.numpy(), cand, topk, 0.7, cfg.gammas,
                        None if dro is None else dro.numpy(), 0.5, cover, False, gate.numpy())
    assert fast.item() == pytest.approx(slow, rel=1e-9)
    flat = D.distill(s_cand, s_neg, dist, cand, topk, cfg, dro, cover, torch.full((B,), 0.37, dtype=torch.float64))
    assert flat.item() == pytest.approx(D.distill(s_cand, s_neg, dist, cand, topk, cfg, dro, cover).item(), rel=1e-12)
    kept = cover if cover is not None else torch.ones(B, dtype=torch.bool)
    assert D.batch_gate(gate, kept)[kept].mean().item() == pytest.approx(1.0)       # the ungated total weight
    assert (D.batch_gate(gate, kept)[~kept] == 0).all()


def test_row_gates_equal_their_formulas_row_by_row():
    rank = torch.tensor([0, 1, 2, 5, 0, 20])
    want = [0.1 if r == 0 else 0.1 + 0.9 / math.log2(1 + r) for r in rank.tolist()]
    assert torch.allclose(D.target_gate(rank, 0.1), torch.tensor(want, dtype=torch.float32))
    nearest = torch.tensor([2.0, 0.5, 3.0, 0.5, 9.0, 1.0])
    covered = torch.tensor([True, True, True, True, False, True])
    got = D.confidence_gate(nearest, covered, 0.2)
    others = lambda b: [c for c in range(6) if covered[c] and c != b]
    for b in range(6):                 # the share of the other covered rows strictly nearer than b
        q = sum(nearest[c] < nearest[b] for c in others(b)) / len(others(b))
        assert got[b].item() == pytest.approx(0.2 + 0.8 * (1 - float(q)) if covered[b] else 0.2)
    ds = tiny_dataset()
    t = random_teacher(ds, n=12, rows=np.arange(0, 300, 2))
    s = t.splits["train"]
    s.ids[3, 4] = ds.train.target[s.rows[3]]                   # plant a hit at rank 5
    r, near, cov = C.target_rank_and_nearest(t, ds.train.target)
    for k, row in enumerate(range(len(ds.train))):
        hits = [q + 1 for q in range(12) if cov[row] and s.ids[row // 2, q] == ds.train.target[row]] if row % 2 == 0 else []
        assert r[row] == (hits[0] if hits else 0) and cov[row] == (row % 2 == 0)
        assert near[row] == (s.dist[row // 2, 0] if row % 2 == 0 else 0)
    assert r[s.rows[3]] <= 5 and r[s.rows[3]] > 0


@pytest.mark.parametrize("gate", ["target", "confidence"])
def test_a_gated_student_trains_and_differs_from_the_ungated(gate):
    ds = tiny_dataset()
    t = random_teacher(ds, n=12)
    t.splits["train"].ids[::3, 0] = ds.train.target[t.splits["train"].rows[::3]]    # right on a third of the rows
    plain = D.fit(ds, D.Config(distilled=True, epochs=2, patience=5), t, log=lambda *_: None)
    gated = D.fit(ds, D.Config(distilled=True, epochs=2, patience=5, row_gate=gate), t, log=lambda *_: None)
    assert gated["variant"] == f"dllm2rec+{gate}-gate" and plain["variant"] == "dllm2rec"
    assert gated["epochs"][0]["loss"] != plain["epochs"][0]["loss"]
    off = dict(plain["config"]); on = {**off, "row_gate": "off", "gate_floor": 0.5}
    assert runs.run_key("f", "c", off, False) == runs.run_key("f", "c", {k: v for k, v in off.items()
                                                                        if k not in ("row_gate", "gate_floor")}, False)
    assert runs.run_key("f", "c", on, False) == runs.run_key("f", "c", off, False)    # off: the runs of before
    assert runs.run_key("f", "c", gated["config"], False) != runs.run_key("f", "c", off, False)


def test_uniform_weights_ablation_is_the_plain_mean_over_candidates():
    g = torch.Generator().manual_seed(2)
    B, K = 5, 4
    s_cand, s_neg = torch.randn(B, K, generator=g, dtype=torch.float64), torch.randn(B, generator=g, dtype=torch.float64)
    cand = torch.arange(K).expand(B, K)
    fast = D.distill(s_cand, s_neg, torch.rand(B, K, dtype=torch.float64), cand, cand,
                     D.Config(lam=1.0, ablation="no_weights"))
    want = (torch.nn.functional.softplus(-s_cand) + torch.nn.functional.softplus(s_neg)[:, None]).mean()
    assert fast.item() == pytest.approx(want.item(), rel=1e-12)


def test_official_confidence_weight_is_uniform_at_llama_distances():
    """exp(-d) falls under 1e-8 past d ~ 18.4: the official w_c is then ~1/K, ours still ranks."""
    near, far = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[30.0, 31.0, 32.0]])
    assert torch.allclose(D.confidence_weight_official(near), D.confidence_weight(near), atol=1e-6)
    assert torch.allclose(D.confidence_weight_official(far), torch.full((1, 3), 1 / 3), atol=1e-6)
    assert D.confidence_weight(far)[0, 0] / D.confidence_weight(far)[0, 1] == pytest.approx(math.e, rel=1e-5)


def test_weights_from_spec():
    K = 10
    w_p = D.position_weight(K, None, torch.float32)
    assert w_p.sum().item() == pytest.approx(1)
    assert w_p[0] / w_p[1] == pytest.approx(math.e, rel=1e-5)
    dist = torch.tensor([[20.0, 21.0, 40.0]])               # exp(-20) alone would underflow in float32
    w_c = D.confidence_weight(dist)
    assert torch.isfinite(w_c).all() and w_c[0, 0] / w_c[0, 1] == pytest.approx(math.e, rel=1e-5)
    w_o = D.consistency_weight(torch.tensor([[3, 5, 7]]), torch.tensor([[7, 1, 3]]))
    assert w_o.tolist() == [[1.0, 0.0, 1.0]]


def test_negatives_avoid_history_and_target():
    hist = torch.tensor([[0, 1, 2, 5, 5], [3, 5, 5, 5, 5]])
    target = torch.tensor([3, 4])
    for _ in range(50):
        neg = D.sample_negatives(hist, target, 5, static=False)
        assert neg[0] == 4 and neg[1] in (0, 1, 2)


@pytest.mark.parametrize("name", ["dros", "gru4rec+dro", "caser+dro"])
@pytest.mark.parametrize("distilled", [True, False])
def test_training_loss_composes_the_terms_of_spec(name, distilled):
    """A backbone with the DRO term (+ DLLM2Rec): BCE(target, negative) + alpha L_DRO(target)
    (+ lam L_rank, where L_rank carries alpha w_r L_DRO(c_r), as the official code trains every
    backbone), each term from its slow formula."""
    n, B, K = 30, 16, 10
    hist, lens = padded_batch(n, B=B, seed=4, min_len=1)
    target = torch.randint(0, n, (B,), generator=torch.Generator().manual_seed(5))
    t_ids = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(i))[:K] for i in range(B)])
    t_dist = 20 + torch.rand(B, K, generator=torch.Generator().manual_seed(6)).sort(1).values
    cfg = D.Config(student=name, distilled=distilled, alpha=0.5)
    counts = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(8))
    model = D.build_student(cfg, n, torch.repeat_interleave(torch.arange(n), counts), None).eval()  # eval: no dropout
    torch.manual_seed(7)
    loss = D.training_loss(model, cfg, hist, lens, target, *((t_ids, t_dist) if distilled else ()))
    torch.manual_seed(7)
    neg = D.sample_negatives(hist, target, n, static=False)
    with torch.no_grad():
        y = model.score_all(model(hist, lens)).double()
    ps = ((counts + 1) / (counts + 1).sum()).double() ** 0.05
    # BCE with ONE mean over the 2B logits, as the official nn.BCEWithLogitsLoss on cat(pos, neg)
    base = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.cat([y.gather(1, target[:, None]), y.gather(1, neg[:, None])]), torch.cat([torch.ones(B, 1), torch.zeros(B, 1)]).double())
    want = base + 0.5 * direct_dro(y, target[:, None], ps).mean()
    if distilled:
        want += slow_distill(y.gather(1, t_ids).numpy(), y.gather(1, neg[:, None])[:, 0].numpy(), t_dist.double().numpy(),
                             t_ids, y.topk(K, dim=1).indices, 0.7, cfg.gammas, direct_dro(y, t_ids, ps).numpy(), 0.5)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    plain = D.Config(student=S.parse_student(name)[0], alpha=0.5)
    assert cfg.with_dro and not plain.with_dro                   # the name, not alpha, turns the term on
    assert not hasattr(D.build_student(plain, n, torch.arange(n), None), "ps")


# ============================================================================ training, evaluation, results, commands (dllm2rec.py, runs.py, results.py, cli.py, research/)
def test_metrics_equal_hand_computed_ranks():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.2, 0.0],    # target 2: rank 1 (0-based)
                           [0.5, 0.5, 0.5, 0.1, 0.0, 0.2],    # target 0, tied with two: rank 2
                           [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],    # target 0: rank 0
                           [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])   # target 5: rank 5
    hist = torch.tensor([[0] + [6] * 9, [1] + [6] * 9, [2] + [6] * 9, [3] + [6] * 9])
    ranks = D.target_ranks(FixedScores(scores), hist, torch.ones(4, dtype=torch.long), torch.tensor([2, 0, 0, 5]), batch_size=3)
    assert ranks.tolist() == [1, 2, 0, 5]
    m = metrics.metrics_from_ranks(ranks, ks=(1, 3, 5))
    assert m["HR@1"] == 0.25 and m["HR@3"] == 0.75 and m["HR@5"] == 0.75
    assert m["NDCG@3"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4) + 1) / 4)
    assert metrics.metrics_from_ranks(torch.tensor([0, 19, 20]))["NDCG@20"] == pytest.approx((1 + 1 / math.log2(21)) / 3)


def test_popularity_floor_equals_hand_computed_ranks():
    ds = tiny_dataset(n_items=5, rows=(0, 0, 0))
    ds.train = data.Split(np.zeros((6, 10), np.int64), np.ones(6, np.int64), np.array([2, 2, 2, 4, 4, 0]))
    test = data.Split(np.zeros((4, 10), np.int64), np.ones(4, np.int64), np.array([2, 4, 0, 1]))
    m = D.popularity_metrics(ds, test)
    # counts 1, 0, 3, 0, 2: item 2 ranks 0, item 4 ranks 1, item 0 ranks 2, item 1 ties with 3: rank 4
    want = [1 / math.log2(2), 1 / math.log2(3), 1 / math.log2(4), 1 / math.log2(6)]
    assert m["HR@5"] == 1.0 and m["HR@20"] == 1.0 and m["NDCG@20"] == pytest.approx(sum(want) / 4)
    assert m["HR@10"] == 1.0 and metrics.metrics_from_ranks(torch.tensor([0, 1, 2, 4]), ks=(1,))["HR@1"] == 0.25


def test_a_nan_score_is_never_a_hit_and_a_diverged_model_fails():
    scores = torch.tensor([[0.1, float("nan"), 0.3], [float("nan")] * 3])
    assert D.ranks_of(scores, torch.tensor([1, 0])).tolist() == [2, 2]       # last of 3 items: no hit at k < 3
    model = S.make_student("sasrec", 10, dim=8, dropout=0.0, max_len=10)
    with torch.no_grad():
        model.out.weight.fill_(float("nan"))
    hist = torch.full((4, 10), 10)
    hist[:, 0] = 1
    with pytest.raises(FloatingPointError, match="diverged"):
        D.target_ranks(model, hist, torch.ones(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def test_a_gain_is_a_gain_only_beyond_twice_the_combined_std():
    assert R.verdict(0.050, 0.001, 0.040, 0.002, 3) == "gain"          # 0.010 > 2 * 0.00224
    assert R.verdict(0.043, 0.001, 0.040, 0.002, 3) == "within noise"  # 0.003 < 0.00447
    assert R.verdict(0.030, 0.001, 0.040, 0.002, 3) == "loss"
    assert R.verdict(0.050, 0.0, 0.040, 0.0, 1) == "1 seed: no noise estimate"


def test_a_gain_needs_the_paired_test_to_agree_with_the_seeds():
    assert R.verdict(0.050, 0.001, 0.040, 0.002, 3, p=0.01) == "gain"
    assert R.verdict(0.050, 0.001, 0.040, 0.002, 3, p=0.20) == "within noise"   # beyond the seeds, p says no
    assert R.verdict(0.043, 0.001, 0.040, 0.002, 3, p=1e-9) == "within noise"   # p says yes, the seeds say no
    assert R.verdict(0.030, 0.001, 0.040, 0.002, 3, p=0.01) == "loss"


def test_a_verdict_takes_its_direction_from_the_statistic():
    """A mean up by more than the seeds' noise, with a significant test whose statistic says the
    other way (many users a little worse, a few much better), is no gain."""
    assert R.verdict(0.0515, 0.001, 0.040, 0.001, 3, p=1e-8, z=-5.5) == "tests disagree"
    assert R.verdict(0.0515, 0.001, 0.040, 0.001, 3, p=1e-8, z=5.5) == "gain"
    assert R.verdict(0.030, 0.001, 0.040, 0.001, 3, p=1e-8, z=-5.5) == "loss"


def test_holm_on_a_small_list():
    # sorted .01 .02 .03 .04 times 4 3 2 1: .04 .06 .06 .04 -> running max .04 .06 .06 .06
    assert R.holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert R.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and R.holm([0.2]) == [0.2] and R.holm([]) == []


def test_holm_over_a_declared_family_counts_the_unprinted_comparisons_as_p_one():
    """Two of a declared four printed: Holm over .01 .04 1 1, times 4 3 2 1: .04 .12 (upper bounds);
    undeclared, over the two printed alone: .02 .04. The verdict follows the bound."""
    def comparisons():
        return [{"family": "f", "paired": {"p": p, "z": 3.0}, "_means": (1.0, 0.0, 0.5, 0.0, 3)} for p in (0.01, 0.04)]
    alone, bounded = comparisons(), comparisons()
    R.correct(alone)
    R.correct(bounded, {"f": 4, "other": 9})
    assert [c["paired"]["p_holm"] for c in alone] == pytest.approx([0.02, 0.04])
    assert [c["paired"]["p_holm"] for c in bounded] == pytest.approx([0.04, 0.12])
    assert {(c["paired"]["family_measured"], c["paired"]["family_size"]) for c in bounded} == {(2, 4)}
    assert [c["verdict"] for c in alone] == ["gain", "gain"] and [c["verdict"] for c in bounded] == ["gain", "within noise"]


def test_the_paired_test_over_users_averages_each_users_rows_and_seeds():
    """Two users: user 0 with rows 0, 1, 3, user 1 with row 2 (and user 2 with none). By hand:
    per-row NDCG@20 of a (2 seeds) and b (1 seed), the differences averaged per user."""
    ndcg = lambda r: 1 / math.log2(r + 2) if r < 20 else 0.0
    a = [fake_run("s", "a", 0, [0, 1, 30, 3]), fake_run("s", "a", 1, [2, 1, 30, 25])]
    b = [fake_run("s", "b", 0, [0, 5, 0, 40])]
    users = np.array([0, 0, 1, 0])
    rows = [(ndcg(x) + ndcg(y)) / 2 - ndcg(z) for x, y, z in zip([0, 1, 30, 3], [2, 1, 30, 25], [0, 5, 0, 40])]
    per_user = [(rows[0] + rows[1] + rows[3]) / 3, rows[2]]
    got = R.paired_test(a, b, users)
    assert got == {**R.signed_rank_test(per_user), "unit": "users"} and got["pairs"] == 2
    assert R.signed_rank_test(per_user)["W+"] == 1.0           # user 0 up (+, smaller |d|), user 1 down
    assert R.paired_test(a, b)["pairs"] == 4 and R.paired_test(a, b)["unit"] == "rows"
    lines = R.summarise(a + b, {"a": "b"}, users)
    assert lines[0]["paired"]["unit"] == "users" and "over users" in R.format_table(lines)


def test_signed_rank_test_against_a_hand_computation():
    # d = .5 -.2 .2 0 1 .3 -.1: the 0 is dropped, m = 6; |d| ranked .1:1 .2,.2:2.5,2.5 .3:4 .5:5 1:6
    # W+ = 5 + 2.5 + 6 + 4 = 17.5; mean m(m+1)/4 = 10.5; var 6*7*13/24 - (2^3 - 2)/48 = 22.75 - 0.125
    t = R.signed_rank_test([0.5, -0.2, 0.2, 0.0, 1.0, 0.3, -0.1])
    z = 7 / math.sqrt(22.625)                                   # 1.4717
    assert (t["pairs"], t["W+"]) == (6, 17.5) and t["z"] == pytest.approx(z)
    assert t["p"] == pytest.approx(0.1411, abs=5e-4)           # 2 (1 - Phi(1.4717)), from a normal table
    # the other direction: the same |z|, the same p; no difference at all: p = 1
    assert R.signed_rank_test([-0.5, 0.2, -0.2, 0.0, -1.0, -0.3, 0.1])["z"] == pytest.approx(-z)
    assert R.signed_rank_test(np.zeros(5))["p"] == 1.0
    # differences equal up to float rounding tie (per-row NDCG differences are computed in floats)
    assert 0.3 - 0.1 != 0.2
    assert R.signed_rank_test([0.3 - 0.1, 0.2, -0.5])["W+"] == 1.5 + 1.5


def test_signed_rank_test_matches_scipy():
    stats = pytest.importorskip("scipy.stats", reason="scipy: an optional cross-check of the Wilcoxon test "
                                                      "(the hand-computed cases beside it need nothing)")
    d = np.random.default_rng(0).choice([-0.5, -0.2, 0.0, 0.0, 0.1, 0.2, 0.3, 1.0], 500)
    ours = R.signed_rank_test(d)
    theirs = stats.wilcoxon(d, zero_method="wilcox", correction=False, method="approx")
    assert ours["p"] == pytest.approx(theirs.pvalue, rel=1e-9)
    assert min(ours["W+"], ours["pairs"] * (ours["pairs"] + 1) / 2 - ours["W+"]) == pytest.approx(theirs.statistic)


def fake_run(student, variant, seed, ranks):
    ranks = np.asarray(ranks)
    m = metrics.metrics_from_ranks(torch.as_tensor(ranks))
    return {"config": {"student": student}, "variant": variant, "seed": seed, "selected_epoch": 1,
            "converged": True, "test": m, "test_ranks": ranks.tolist()}


def test_summarise_pairs_each_variant_with_its_reference_over_seed_averaged_rows():
    g = np.random.default_rng(0)
    base = [g.integers(0, 60, 400) for _ in range(3)]
    better = [np.maximum(b - 8, 0) for b in base]                 # every row ranked 8 places higher
    runs = ([fake_run("sasrec", "base", i, r) for i, r in enumerate(base)] +
            [fake_run("sasrec", "dllm2rec", i, r) for i, r in enumerate(better)] +
            [fake_run("sasrec", "dllm2rec-no_wp", i, r) for i, r in enumerate(better)])
    lines = {l["variant"]: l for l in R.summarise(runs, {"dllm2rec": "base", "dllm2rec-no_wp": "dllm2rec"})}
    full = lines["dllm2rec"]
    want = R.signed_rank_test(np.mean([metrics.ndcg_per_row(r) for r in better], 0) - np.mean([metrics.ndcg_per_row(r) for r in base], 0))
    assert full["against"] == "base" and full["paired"] == {**want, "unit": "rows", "p_holm": 2 * want["p"], "family_size": 2,
                                                          "family_measured": 2}
    assert full["paired"]["p"] < 1e-6
    assert lines["dllm2rec-no_wp"]["against"] == "dllm2rec" and lines["dllm2rec-no_wp"]["paired"]["p"] == 1.0
    assert lines["dllm2rec-no_wp"]["verdict"] == "within noise" and lines["base"]["against"] is None
    assert metrics.ndcg_per_row(base[0]).mean() == pytest.approx(runs[0]["test"]["NDCG@20"])
    assert "p (Holm)" in R.format_table(list(lines.values())) and "over test rows" in R.format_table(list(lines.values()))


def test_ranking_share_is_lam_times_coverage():
    line = cli.ranking_share(512, 72_456, D.Config())
    assert "512 of 72456" in line and "coverage 0.7%" in line and "about 1.8 covered rows in a 256-row batch" in line
    assert "0.7 x 0.0071 = 0.0049" in line


def test_official_protocol_selects_on_test_with_dropout_on_and_samples_batches():
    ds = tiny_dataset()
    torch.manual_seed(0)
    cfg = D.Config(student="sasrec", epochs=4, patience=10, batch_size=64, official_protocol=True, dropout=0.5)
    batches = D.epoch_batches(len(ds.train), cfg, "cpu", full_only=False)
    assert len(batches) == 300 // 64 and all(len(b) == 64 == len(set(b.tolist())) for b in batches)
    ours = D.epoch_batches(len(ds.train), D.Config(batch_size=64), "cpu", full_only=False)
    full = D.epoch_batches(len(ds.train), D.Config(batch_size=64), "cpu", full_only=True)
    assert [len(b) for b in full] == [64] * 4                          # the captured step: full batches only
    assert sorted(torch.cat(ours).tolist()) == list(range(300))       # every row once per epoch
    r = D.fit(ds, cfg, log=lambda *a: None)
    assert r["selected_on"] == "test"
    assert r["test"]["NDCG@20"] == max(e["test"]["NDCG@20"] for e in r["epochs"])
    m = student(S.SASRec, 40, dropout=0.5)
    hist, lens, target = D.to_tensors(ds.test, "cpu")
    torch.manual_seed(1)
    on = D.target_ranks(m, hist, lens, target, dropout_on=True)
    assert not torch.equal(on, D.target_ranks(m, hist, lens, target))   # dropout changes the ranks
    assert torch.equal(D.target_ranks(m, hist, lens, target), D.target_ranks(m, hist, lens, target))


# Two epochs of every student, undistilled and distilled, from one seed on tiny_dataset with
# random_teacher (1 thread, the eager step), as the code computed them before the method was
# moved under the commands: (epoch losses, val NDCG@20, test NDCG@20, test HR@20, sum of test ranks).
PINNED = {
    "gru4rec base": ([0.6943741353352865, 0.6941047159830729], 0.18421822214793504, 0.14400036994847212, 0.425, 876),
    "gru4rec dllm2rec": ([1.6580492146809895, 1.646732889811198], 0.14322799890905138, 0.22349853455205845, 0.525, 728),
    "sasrec base": ([0.7517921956380208, 0.7306868489583334], 0.14126145595283296, 0.21649296948584076, 0.575, 741),
    "sasrec dllm2rec": ([1.7123614501953126, 1.67388427734375], 0.19287216514117086, 0.16907155060561269, 0.525, 748),
    "cl4srec base": ([3.8105810546875, 2.894019775390625], 0.1702638698682265, 0.16485494012131763, 0.475, 786),
    "cl4srec dllm2rec": ([4.4985868326822915, 3.9229500325520834], 0.21264686735618268, 0.15651457947749184, 0.475, 768),
    "dros base": ([2.7788053385416664, 2.68453857421875], 0.14108343096499293, 0.20227731531949686, 0.5, 730),
    "dros dllm2rec": ([5.123010660807291, 4.979490966796875], 0.21306256177393462, 0.1820362549699841, 0.525, 751),
    "caser base": ([0.6921332804361979, 0.690464833577474], 0.15182783276054249, 0.17893589433492554, 0.55, 769),
    "caser dllm2rec": ([1.667029825846354, 1.6547855631510417], 0.13658865042697652, 0.19789752399388189, 0.525, 679),
    "gru4rec+dro base": ([2.557899983723958, 2.5564697265625], 0.18405840846897464, 0.14785490715659835, 0.425, 872),
    "gru4rec+dro dllm2rec": ([4.825777994791666, 4.814497884114584], 0.14313976018988012, 0.21033366310991877, 0.525, 720),
    "cl4srec+dro base": ([5.86087890625, 4.900745849609375], 0.16822854341098648, 0.18974214848637377, 0.55, 755),
    "cl4srec+dro dllm2rec": ([7.93021484375, 7.279083658854167], 0.21752174707395203, 0.17391047806612442, 0.525, 766),
    "caser+dro base": ([2.5547611490885416, 2.5525203450520833], 0.15785002533281828, 0.17566637890646225, 0.55, 774),
    "caser+dro dllm2rec": ([4.836758626302084, 4.823167724609375], 0.14570082879768737, 0.20463439563017854, 0.6, 690),
}


@pytest.mark.parametrize("name", list(PINNED))
def test_training_is_pinned_to_the_numbers_it_gave_before_the_move(name):
    """The move of the method under the commands changed no number: each student's losses and
    metrics of two epochs equal the pinned ones (to float rounding of the metrics' means)."""
    student, variant = name.split()
    ds = tiny_dataset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = D.fit(ds, D.Config(student=student, distilled=variant == "dllm2rec", epochs=2, batch_size=64, seed=3),
                  random_teacher(ds), "cpu", log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    losses, val, test, hr, rank_sum = PINNED[name]
    assert [e["loss"] for e in r["epochs"]] == pytest.approx(losses, rel=1e-6)
    assert (r["val"]["NDCG@20"], r["test"]["NDCG@20"]) == pytest.approx((val, test), rel=1e-9)
    assert r["test"]["HR@20"] == hr and sum(r["test_ranks"]) == rank_sum


def test_a_seed_reproduces_the_same_run():
    ds = tiny_dataset()
    t = random_teacher(ds)
    for student in S.STUDENTS:
        cfg = D.Config(student=student, distilled=True, epochs=2, batch_size=64, seed=3)
        a, b = (D.fit(ds, cfg, t, log=lambda *a: None) for _ in range(2))
        assert [e["loss"] for e in a["epochs"]] == [e["loss"] for e in b["epochs"]] and a["test"] == b["test"]


def run_steps(student, mode, device, steps=3, backend="inductor"):
    """Losses and final parameters of `steps` training steps of a distilled student, from one
    seed, with the step in the given mode (every mode static: fixed shapes, no host sync)."""
    ds = tiny_dataset()
    t = random_teacher(ds)
    cfg = D.Config(student=student, distilled=True, batch_size=64)
    torch.manual_seed(0)
    model = D.build_student(cfg, ds.n_items, torch.as_tensor(ds.train.target), torch.as_tensor(t.item_emb)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True, capturable=mode == "captured")
    step = ST.Step(D.training_loss, model, opt, cfg, mode, static=True, warmup=1, backend=backend)
    ids, dist, covered = (torch.as_tensor(a, device=device) for a in C.per_training_row(t, len(ds.train), cfg.K))
    train = D.to_tensors(ds.train, device)
    torch.manual_seed(5)
    losses = []
    for k in range(steps):
        idx = torch.arange(64 * k, 64 * (k + 1), device=device)
        losses.append(step(*(x[idx] for x in train), ids[idx], dist[idx], covered[idx]).item())
    return losses, [p.detach().cpu().clone() for p in model.parameters()]


@pytest.mark.parametrize("student", S.STUDENTS)
def test_compiled_step_equals_the_eager_step(student):
    """torch.compile traces the whole static step (aot_eager: the graph without code generation)
    and must give the eager step's losses and parameters."""
    eager, p_eager = run_steps(student, "eager", "cpu")
    compiled, p_compiled = run_steps(student, "compiled", "cpu", backend="aot_eager")
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(p_eager, p_compiled))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("student", S.STUDENTS)
def test_captured_step_equals_the_eager_step_on_cuda(student):
    eager, p_eager = run_steps(student, "eager", "cuda", steps=4)
    captured, p_captured = run_steps(student, "captured", "cuda", steps=4)    # 1 eager, capture, 2 replays
    assert captured == pytest.approx(eager, rel=1e-4)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(p_eager, p_captured))


def test_static_negatives_avoid_history_and_target():
    hist, lens = padded_batch(30, B=500, seed=2, min_len=1)
    target = torch.randint(0, 30, (500,))
    neg = D.sample_negatives(hist, target, 30, static=True)
    assert not (neg == target).any() and not (neg[:, None] == hist).any()


@pytest.mark.parametrize("student", S.CHOICES)
@pytest.mark.parametrize("ablation", ["none", "no_wo", "no_offset"])
def test_every_student_trains_with_and_without_distillation(student, ablation):
    ds = tiny_dataset()
    t = random_teacher(ds, rows=np.arange(0, 300, 2))
    cfg = D.Config(student=student, distilled=True, ablation=ablation, epochs=2, batch_size=64)
    r = D.fit(ds, cfg, t, log=lambda *a: None)
    assert r["teacher_rows_covered"] == 150 and len(r["epochs"]) == 2
    assert all(math.isfinite(e["loss"]) for e in r["epochs"])
    assert 0 <= r["test"]["NDCG@20"] <= r["test"]["HR@20"] <= 1
    if ablation == "none":
        base = D.fit(ds, D.Config(student=student, epochs=1, batch_size=64), log=lambda *a: None)
        assert base["variant"] == "base" and math.isfinite(base["epochs"][0]["loss"])


def test_end_to_end_a_planted_teacher_helps_and_a_random_one_still_trains(ml100k, tmp_path):
    """A teacher that plants the target lifts NDCG@20 by 30% in 4 epochs; a random teacher on 10 rows
    leaves a finite loss and a student above chance (whether it harms is measured by `ablation`)."""
    C.write_cache(tmp_path, ml100k, *(lambda t: (t.item_emb, t.splits))(planted_teacher(ml100k)), {"model": "planted"})
    planted = C.load_teacher(tmp_path, ml100k)
    cfg = dict(student="sasrec", epochs=4, patience=2)
    base = D.fit(ml100k, D.Config(**cfg), log=lambda *a: None)
    taught = D.fit(ml100k, D.Config(distilled=True, **cfg), planted, log=lambda *a: None)
    assert taught["test"]["NDCG@20"] > 1.3 * base["test"]["NDCG@20"], (base["test"], taught["test"])
    noise = D.fit(ml100k, D.Config(distilled=True, **{**cfg, "epochs": 2}), random_teacher(ml100k, n=10), log=lambda *a: None)
    assert all(math.isfinite(e["loss"]) for e in noise["epochs"]) and noise["test"]["HR@20"] > 0.01


def slow_good_candidates(ds, K):
    """The quality-1 ranking, one row at a time: count (last item -> target) over the training
    rows, then sort all items by count + popularity (stable), most first."""
    counts = {}
    for h, l, t in zip(ds.train.hist, ds.train.lens, ds.train.target):
        if l > 0:
            counts[h[l - 1], t] = counts.get((h[l - 1], t), 0) + 1
    pop = np.bincount(ds.train.target, minlength=ds.n_items) / len(ds.train)
    out = []
    for h, l in zip(ds.train.hist, ds.train.lens):
        score = [(counts.get((h[l - 1], j), 0) if l > 0 else 0) + pop[j] for j in range(ds.n_items)]
        out.append(sorted(range(ds.n_items), key=lambda j: -score[j])[:K])
    return np.array(out)


def test_synthetic_teachers_see_the_training_rows_only():
    """Every validation and test row removed (or replaced): the same candidates, distances and
    item features, for every quality, both confidences and the mixed teacher."""
    ds = tiny_dataset(n_items=30, rows=(400, 60, 60))
    other = tiny_dataset(n_items=30, rows=(400, 60, 60), seed=9)
    blind = data.Dataset(ds.name, ds.n_items, ds.titles, ds.train, other.val, other.test)
    empty = data.Split(np.zeros((0, 10), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    alone = data.Dataset(ds.name, ds.n_items, ds.titles, ds.train, empty, empty)
    assert (SY.good_candidates(ds, SY.transition_counts(ds), 10) == slow_good_candidates(ds, 10)).all()
    assert SY.transition_counts(ds).sum() == (ds.train.lens > 0).sum()             # the training rows alone
    for make in [lambda d, q=q, c=c: SY.synthetic_teacher(d, q, 10, c, seed=3) for q in (1.0, 0.5, 0.0)
                 for c in SY.CONFIDENCE] + [lambda d: SY.mixed_teacher(d, 10, "flat", seed=3)]:
        t = make(ds)
        for d in (blind, alone):
            u = make(d)
            assert np.array_equal(t.item_emb, u.item_emb) and C.checksum(t) == C.checksum(u)
    z = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    train = lambda d: SY.retrieval_teacher(d, z, 12, 0.8, "r").splits["train"]
    assert all(np.array_equal(getattr(train(ds), k), getattr(train(alone), k)) for k in ("ids", "dist"))


@pytest.mark.parametrize("confidence", SY.CONFIDENCE)
def test_quality_is_the_share_of_good_candidates_at_every_q(confidence):
    """At quality q each row holds exactly round(q K) of its quality-1 candidates among its K and
    random items outside them; honest: the good ones first and nearer; flat: one distance
    distribution, the good ones at every rank."""
    ds = tiny_dataset(n_items=40, rows=(500, 20, 20))
    K = 10
    good = slow_good_candidates(ds, K)
    for q in np.linspace(0, 1, 11):
        t = SY.synthetic_teacher(ds, float(q), K, confidence, seed=1).splits["train"]
        is_good = np.array([[c in set(g) for c in row] for row, g in zip(t.ids, good)])
        k = int(np.floor(q * K + 0.5))
        assert (is_good.sum(1) == k).all() and t.ids.shape == (500, K)
        assert all(len(set(row)) == K for row in t.ids) and (np.diff(t.dist, axis=1) >= 0).all()
        if confidence == "honest":
            assert is_good[:, :k].all() and (t.ids[:, :k] == good[:, :k]).all()
            assert k in (0, K) or t.dist[:, k - 1].max() < t.dist[:, k].min()
        elif 0 < k < K:
            assert is_good.any(0).all() and (~is_good).any(0).all()             # good and random at every rank
            assert abs(is_good.mean(0) - k / K).max() < 0.1                     # ranks drawn at random


def test_synthetic_teacher_gives_rows_with_an_empty_history_the_most_popular_items():
    ds = tiny_dataset(n_items=30, rows=(400, 60, 60))
    empty = np.arange(0, 400, 7)                     # all padding, len_seq 0, as LLaRA's LastFM rows read
    ds.train.hist[empty], ds.train.lens[empty] = ds.n_items, 0
    t = SY.synthetic_teacher(ds, 1.0, 5)
    popular = np.argsort(-np.bincount(ds.train.target, minlength=30), kind="stable")[:5]
    assert (t.splits["train"].ids[empty] == popular).all() and len(t.splits["train"].rows) == 400


def test_retrieval_teacher_equals_brute_force_nearest_items():
    """Each row's candidates: the items nearest (L2) to decay-weighted mean of its history's z,
    the history left out, nearest first, with those distances."""
    ds = tiny_dataset(n_items=30, rows=(50, 10, 10))
    z = np.random.default_rng(1).normal(size=(30, 6)).astype(np.float32)
    t = SY.retrieval_teacher(ds, z, 8, 0.5, "r")
    for name in ("train", "val", "test"):
        split, got = getattr(ds, name), t.splits[name]
        for r in range(len(split)):
            items = split.hist[r, :split.lens[r]]
            w = np.array([0.5 ** (len(items) - 1 - j) for j in range(len(items))])
            h = (w[:, None] * z[items].astype(np.float64)).sum(0) / w.sum()
            d = {j: float(np.linalg.norm(h - z[j])) for j in range(30) if j not in set(items)}
            want = sorted(d, key=lambda j: (d[j], j))[:8]
            assert got.ids[r].tolist() == want and got.dist[r] == pytest.approx([d[j] for j in want], rel=1e-5)
    assert (SY.history_embedding(ds.train, z, 1.0)[0] == pytest.approx(z[ds.train.hist[0, :ds.train.lens[0]]].mean(0)))


def test_mechanism_command_runs_on_rows_with_an_empty_history(monkeypatch, capsys):
    ds = tiny_dataset(n_items=30, rows=(300, 40, 40))
    for split in (ds.train, ds.val, ds.test):
        split.hist[::5], split.lens[::5] = ds.n_items, 0
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    out = main(["mechanism", "--epochs", "1", "--qualities", "1", "--batch-size", "64"])
    assert len(out["teachers"]["1.00"]["cells"]) == len(MECH.VARIANTS)
    few = main(["mechanism", "--epochs", "1", "--qualities", "mixed", "--variants", "full,uniform", "--batch-size", "64"])
    assert set(few["teachers"]["mixed"]["cells"]) == {"full DLLM2Rec", "uniform w_r"} and "full_vs_uniform" in few["teachers"]["mixed"]


def test_mechanism_command_prints_a_row_per_teacher_with_the_paired_test(tmp_path, monkeypatch, capsys):
    ds = tiny_dataset(n_items=30, rows=(300, 40, 40))
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    out = main(["mechanism", "--epochs", "1", "--qualities", "1", "0", "mixed", "--batch-size", "64",
                  "--out", str(tmp_path / "m.json")])
    assert set(out["teachers"]) == {"1.00", "0.00", "mixed"} and out["seeds"] == 2
    assert len(out["runs"]) == 2 * (1 + 3 * len(MECH.VARIANTS))
    for row in out["teachers"].values():
        assert all(c["against"] == "base" and c["paired"] is not None for c in row["cells"].values())
        assert 0 <= row["full_vs_uniform"]["paired"]["p"] <= 1
    text = capsys.readouterr().out
    assert "DIAGNOSTIC" in text and any(line.startswith("mixed ") for line in text.splitlines()) and "[run 26/26" in text and (tmp_path / "m.json").exists()
    assert "short of convergence" in text and "*: a seed stopped at the epoch cap (1), not converged" in text
    assert all(f"{c['NDCG@20']:.4f}* " in text for row in out["teachers"].values() for c in row["cells"].values())
    seen = []
    def first_fit(ds, cfg, *a, **k):
        seen.append(cfg)
        raise RuntimeError("stop after the first configuration")
    monkeypatch.setattr(runs, "fit", first_fit)
    for argv, epochs in ((["--converged"], D.Config.epochs), (["--converged", "--epochs", "300"], 300)):
        with pytest.raises(SystemExit, match="stop after"):
            main(["mechanism", *argv])
        assert (seen[-1].epochs, seen[-1].patience) == (epochs, D.Config.patience)
    assert "short of convergence" not in capsys.readouterr().out


def test_retrieval_teacher_command_writes_a_cache_train_distils(tmp_path, monkeypatch, capsys):
    ds = tiny_dataset(n_items=35, rows=(300, 40, 40))
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    src = random_teacher(ds)
    C.write_cache(tmp_path / "llm", ds, src.item_emb, src.splits, {"model": "random"})
    for n, message in (("26", "--top-n 26: more than the 25 items outside a history"), ("12", "--top-n 12: fewer than")):
        with pytest.raises(SystemExit, match=message):
            main(["retrieval-teacher", "--item-embeddings", str(tmp_path / "llm"), "--out", str(tmp_path / "r"), "--top-n", n])
    main(["retrieval-teacher", "--item-embeddings", str(tmp_path / "llm"), "--out", str(tmp_path / "r"),
          "--decays", "1", "0.5"])
    printed = capsys.readouterr().out
    t = C.load_teacher(tmp_path / "r", ds)
    chosen = t.manifest["teacher"]["decay"]
    want = SY.retrieval_teacher(ds, src.item_emb, 20, chosen, "r")
    assert all(np.array_equal(t.splits[n].ids, want.splits[n].ids) for n in ("train", "val", "test"))
    assert "not BIGRec's generation" in t.manifest["teacher"]["kind"] and f"chosen: decay {chosen:g}" in printed
    val = {d: C.teacher_metrics(SY.retrieval_teacher(ds, src.item_emb, 20, d, "r").splits["val"], ds.val.target)
           for d in (1.0, 0.5)}
    assert val[chosen]["NDCG@20"] == max(v["NDCG@20"] for v in val.values())       # chosen on validation
    out = main(["train", "--teacher", str(tmp_path / "r"), "--students", "sasrec", "--epochs", "1", "--batch-size", "64",
                "--out", str(tmp_path / "res.json")])
    assert [l["variant"] for l in out["summary"]] == ["base", "dllm2rec"]


def test_gates_command_compares_each_gate_with_full_and_the_base_holm_within_each_family(tmp_path, monkeypatch, capsys):
    ds = tiny_dataset(n_items=30, rows=(300, 40, 40))
    ds.test.user = np.arange(len(ds.test)) % 9                      # 9 users: the paired test runs over them
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    src = random_teacher(ds)
    C.write_cache(tmp_path / "cached", ds, src.item_emb, src.splits, {"model": "random"})
    argv = ["gates", "--epochs", "1", "--seeds", "2", "--batch-size", "64",
            "--teachers", "0", "mixed:flat", str(tmp_path / "cached")]
    out = main(argv)
    lines, runs_ = out["table"], out["runs"]
    assert len(runs_) == 2 * (1 + 3 * (1 + len(G.GATES)))
    by = {(l["teacher"], l["variant"]): l for l in lines if l["variant"] != "base"}
    assert {t for t, _ in by} == {"random, honest", "mixed, flat", "cached"}
    comparisons = []
    for (t, variant), l in by.items():
        assert set(l["vs"]) == ({"base"} if variant == "dllm2rec" else {"dllm2rec", "base"})
        assert variant in ("dllm2rec", *(f"dllm2rec+{g}-gate" for g in G.GATES))
        pick = lambda v, name: [r for r in runs_ if r["variant"] == v and r.get("teacher_name", name) == name]
        for ref, c in l["vs"].items():           # the paired test over users of exactly these runs
            assert c["paired"]["p"] == R.paired_test(pick(variant, t), pick(ref, t), ds.test.user)["p"]
            assert c["paired"]["unit"] == "users"
            comparisons.append(c)
    assert len(comparisons) == 3 * (1 + 2 * len(G.GATES))
    for family in G.FAMILIES.values():
        mine = [c for c in comparisons if c["family"] == family]
        assert len(mine) == 3 * (len(G.GATES) if family == "filter" else 1 + len(G.GATES))
        assert [c["paired"]["p_holm"] for c in mine] == R.holm([c["paired"]["p"] for c in mine])
    printed = capsys.readouterr().out
    assert "row gates on tiny" in printed and "over users with Holm's correction within its family (filter:" in printed
    table = printed.split("row gates on tiny")[1].splitlines()
    assert sum(line.startswith("sasrec base") for line in table) == 1 and len(table) == 2 + 1 + 3 * (1 + len(G.GATES)) + 1
    # shards and --reuse print the same table
    for i in (0, 1):
        main(argv + ["--shard", f"{i}/2", "--out", str(tmp_path / f"g{i}.json")])
    merged = main(argv + ["--reuse", str(tmp_path / "g0.json"), str(tmp_path / "g1.json"), "--reuse-only"])
    assert merged["table"] == lines


def test_gates_command_with_uniform_weights_compares_them_with_full_and_the_base(monkeypatch):
    ds = tiny_dataset(n_items=30, rows=(300, 40, 40))
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    out = main(["gates", "--epochs", "1", "--seeds", "1", "--batch-size", "64", "--teachers", "0", "--gates", "target",
                "--uniform"])
    by = {l["variant"]: l for l in out["table"]}
    assert set(by) == {"base", "dllm2rec", "dllm2rec+target-gate", "dllm2rec-no_weights"}
    assert set(by["dllm2rec-no_weights"]["vs"]) == {"dllm2rec", "base"}


@pytest.mark.parametrize("argv, message", [
    (["--teachers", "1.5"], "'1.5': a quality must be in [0, 1]"),
    (["--teachers", "mixed:warm"], "confidence 'warm', one of honest, flat"),
    (["--teachers", "/no/such/folder"], "neither a quality, 'mixed' nor a teacher cache folder"),
    (["--gates", "target,never"], "never"),
    (["--row-gate", "target"], "--row-gate target: the gates command sets each run's gate itself"),
])
def test_gates_command_refuses_bad_teachers_and_a_fixed_gate_in_one_line(argv, message, monkeypatch):
    monkeypatch.setattr(data, "load_dataset", lambda *a: tiny_dataset(n_items=30, rows=(300, 40, 40)))
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(["gates", "--epochs", "1", *argv])


# ---------------------------------------------------------------------------- the Table 5 baselines (baselines.py)
def test_rd_weights_and_loss_equal_a_row_by_row_version_and_a_hand_case():
    """RD: w_r = exp(-r) (r = 1..K) times tanh(max(mu (rank_S - (r - 1)), 0)), renormalised."""
    g = torch.Generator().manual_seed(0)
    s_all = torch.randn(5, 30, generator=g)
    c = torch.stack([torch.randperm(30, generator=g)[:6] for _ in range(5)])
    rank = KB.student_rank(s_all, c)
    for b in range(5):
        for r in range(6):
            assert rank[b, r] == sum(float(s_all[b, j]) > float(s_all[b, c[b, r]]) for j in range(30))
        raw = [math.exp(-(r + 1) / KB.RD_T) * math.tanh(max(KB.RD_MU * (int(rank[b, r]) - r), 0)) for r in range(6)]
        want = [x / sum(raw) if sum(raw) > 0 else 0.0 for x in raw]
        assert np.allclose(KB.rd_weights(rank)[b].numpy(), want, atol=1e-6)
        s = s_all[b, c[b]]
        assert math.isclose(float(KB.rd_loss(s_all.gather(1, c), rank)[b]),
                            sum(w * -math.log(1 / (1 + math.exp(-float(x)))) for w, x in zip(want, s)), rel_tol=1e-5)
    # by hand: K = 2, the student ranks c_1 at 0 (no discrepancy: weight 0) and c_2 at 11 (tanh(0.1 x 10))
    w = KB.rd_weights(torch.tensor([[0, 11]]))
    assert torch.allclose(w, torch.tensor([[0.0, 1.0]]))
    w = KB.rd_weights(torch.tensor([[20, 11]]))
    a, b = math.exp(-1) * math.tanh(2.0), math.exp(-2) * math.tanh(1.0)
    assert torch.allclose(w, torch.tensor([[a / (a + b), b / (a + b)]]))


def test_cd_soft_labels_and_sampling():
    """CD: BCE against y = sigmoid((-d + t2) / t1); its picks follow exp(-rho / (K T)) of the
    student's order, without replacement."""
    s, d = torch.tensor([[0.5, -1.0]]), torch.tensor([[2.0, 4.0]])
    y = [1 / (1 + math.exp(2.0 / KB.CD_T1)), 1 / (1 + math.exp(4.0 / KB.CD_T1))]
    sig = lambda x: 1 / (1 + math.exp(-x))
    want = sum(-(yy * math.log(sig(x)) + (1 - yy) * math.log(1 - sig(x))) for yy, x in zip(y, [0.5, -1.0]))
    assert math.isclose(float(KB.cd_loss(s, d)[0]), want, rel_tol=1e-6)
    torch.manual_seed(0)
    s_cand = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).repeat(20000, 1)
    picks = KB.cd_sample(s_cand, m=1, T=0.1)                         # sharp: the student's first far more often
    freq = torch.bincount(picks[:, 0], minlength=4).float() / 20000
    p = torch.softmax(-torch.arange(1, 5).float() / (4 * 0.1), 0)
    assert torch.allclose(freq, p, atol=0.01)
    two = KB.cd_sample(s_cand[:100], m=2)
    assert (two[:, 0] != two[:, 1]).all()


def test_relaxed_ranking_equals_a_slow_sum_and_rrd_masks_its_draws():
    g = torch.Generator().manual_seed(1)
    s1, s2 = torch.randn(3, 4, generator=g) * 3, torch.randn(3, 7, generator=g) * 3
    s2[0, 2] = -math.inf                                             # a draw left out
    got = KB.relaxed_ranking(s1, s2)
    for b in range(3):
        below = sum(math.exp(float(x)) for x in s2[b] if math.isfinite(float(x)))
        want = -sum(float(s1[b, r]) - math.log(sum(math.exp(float(x)) for x in s1[b, r:]) + below) for r in range(4))
        assert math.isclose(float(got[b]), want, rel_tol=1e-5)
    # by hand: one ranked item of score 0 above one other of score 0: -(0 - log 2)
    assert math.isclose(float(KB.relaxed_ranking(torch.zeros(1, 1), torch.zeros(1, 1))[0]), math.log(2), rel_tol=1e-6)
    c, target = torch.tensor([[0, 1, 2]]), torch.tensor([3])
    u, ok = KB.uninteresting(c, target, n_items=5, L=200)
    assert (ok == ~((u <= 3))).all() and ok.any()


def test_dcd_sampling_weights_and_draws():
    """Under-estimated: the student ranks it below the teacher's place; over-estimated: above."""
    rank_s = torch.tensor([[0, 30, 1]])                              # teacher ranks 0, 1, 2
    under, over = KB.dcd_probs(rank_s, T=10.0)
    assert torch.allclose(under, torch.tensor([[1e-5, math.tanh(2.9), 1e-5]]))
    assert torch.allclose(over, torch.tensor([[1e-5, 1e-5, math.tanh(0.1)]]))
    torch.manual_seed(0)
    u, o = KB.dcd_sample(rank_s.repeat(500, 1), share=0.34)          # k = 1
    assert (u[:, 0] == 1).float().mean() > 0.99 and (o[:, 0] == 2).float().mean() > 0.99
    u, o = KB.dcd_sample(torch.randint(0, 50, (200, 10)), share=0.5)
    assert (u.diff(1) > 0).all() and all(len(set(row.tolist())) == 5 for row in o)     # sorted, distinct


def test_unkd_groups_pairs_and_loss():
    """Items by popularity into groups of about equal total count; each pair within one group,
    i a candidate of the row, j an unlisted item; a row without a candidate in a group: masked."""
    targets = np.array([0] * 6 + [1] * 3 + [2] * 2 + [3])            # counts 6, 3, 2, 1 (+ item 4: 0)
    assert list(KB.popularity_groups(targets, 5, 2)) == [0, 1, 1, 1, 1]
    group = torch.as_tensor(KB.popularity_groups(targets, 5, 2))
    c = torch.tensor([[0, 2], [3, 4]])
    torch.manual_seed(0)
    i, j, valid = KB.unkd_pairs(c, group, pairs=2)
    assert i.shape == (2, 2) and (group[i[valid]] == group[j[valid]]).all()
    for b in range(2):
        for p in range(2):
            if valid[b, p]:
                assert int(i[b, p]) in c[b].tolist() and int(j[b, p]) not in c[b].tolist()
    assert not valid[1, 0]                                            # row 1 lists nothing of group 0
    s_i, s_j = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    want = math.log(1 + math.exp(-1.0))                               # only the first pair is valid
    assert math.isclose(float(KB.unkd_loss(s_i, s_j, torch.tensor([[True, False]]))[0]), want, rel_tol=1e-6)
    assert float(KB.unkd_loss(s_i, s_j, torch.zeros(1, 2, dtype=torch.bool))[0]) == 0


def test_hint_and_htd_losses_equal_slow_versions():
    torch.manual_seed(0)
    z = torch.randn(12, 6)
    head = KB.make_head("hint", 4, z * 5)                             # the features' scale divided out
    assert torch.allclose(head.z.pow(2).mean(), torch.tensor(1.0))
    e, items = torch.randn(3, 4), torch.tensor([0, 5, 5])
    with torch.no_grad():
        want = np.mean([float(((head.z[i] - head.W(e[k])) ** 2).sum()) for k, i in enumerate(items)])
    assert math.isclose(float(head.loss(e, items)), want, rel_tol=1e-5)
    s, t, grp = torch.randn(6, 4), torch.randn(6, 5), torch.tensor([0, 0, 1, 1, 1, 3])
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))
    entity = sum((cos(s[a], s[b]) - cos(t[a], t[b])) ** 2 for a in range(6) for b in range(6)
                 if grp[a] == grp[b] and cos(t[a], t[b]) > 0)
    protos = [(s[grp == k].mean(0), t[grp == k].mean(0)) for k in (0, 1, 3)]
    group = sum((cos(ps, s[a]) - cos(pt, t[a])) ** 2 for ps, pt in protos for a in range(6))
    assert math.isclose(float(KB.topology(s, t, grp)), entity + group, rel_tol=1e-4)
    htd = KB.make_head("htd", 4, z)
    loss = htd.loss(e, items)
    loss.backward()
    assert loss.isfinite() and htd.v.weight.grad is not None and htd.f[0][0].weight.grad is not None


@pytest.mark.parametrize("kd", [m for m in KB.METHODS if m != "dllm2rec"])
def test_each_baseline_trains_a_student_and_names_its_variant(kd):
    """One epoch of each on the tiny data (DROS: with its DRO term); a ranking baseline's student
    keeps its own embeddings, an embedding baseline's has a head; uncovered rows add nothing."""
    ds = tiny_dataset()
    t = random_teacher(ds, rows=np.arange(0, 300, 2))
    cfg = D.Config(student="dros", distilled=True, kd=kd, epochs=1, batch_size=64)
    r = D.fit(ds, cfg, t, log=lambda *a: None)
    assert r["variant"] == kd and math.isfinite(r["epochs"][0]["loss"]) and r["config"]["kd"] == kd
    model = D.build_student(cfg, ds.n_items, torch.as_tensor(ds.train.target), torch.as_tensor(t.item_emb))
    assert model.embed.g is None and hasattr(model, "kd_head") == (kd in KB.EMBEDDING)
    if kd in KB.RANKING:
        h = model(*(torch.as_tensor(a[:8]) for a in (ds.train.hist, ds.train.lens)))
        c, dd = torch.as_tensor(t.splits["train"].ids[:8, :10]), torch.as_tensor(t.splits["train"].dist[:8, :10])
        target, neg = torch.as_tensor(ds.train.target[:8]), torch.zeros(8, dtype=torch.long)
        assert float(KB.kd_loss(kd, model, h, target, neg, c, dd, torch.zeros(8, dtype=torch.bool))) == 0
    assert runs.run_key("f", "t", {**r["config"]}, False) != runs.run_key("f", "t", {**r["config"], "kd": "dllm2rec"}, False)
    assert runs.run_key("f", "t", {"kd": "dllm2rec", "lam": 1}, False) == runs.run_key("f", "t", {"lam": 1}, False)


# ---------------------------------------------------------------------------- the trained-model teacher, random twins, lam on validation
def test_model_teacher_sees_the_training_rows_only_and_ranks_by_the_ensemble_log_probability():
    """Validation and test rows replaced or removed: the same cache to the last bit. Each row's
    list is the slow per-row argsort of the members' mean log_softmax, d = -log p; the held-out
    rows are the last training rows."""
    ds = tiny_dataset(n_items=30, rows=(300, 40, 40))
    other = tiny_dataset(n_items=30, rows=(300, 40, 40), seed=9)
    empty = data.Split(np.zeros((0, 10), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    cfg = D.Config(epochs=2, batch_size=64, patience=1)
    make = lambda d: MT.model_teacher(d, cfg, ["sasrec", "gru4rec"], 2, 0.2, 12, log=lambda *a, **k: None)
    t, models = make(ds)
    for d in (data.Dataset(ds.name, 30, ds.titles, ds.train, other.val, other.test),
              data.Dataset(ds.name, 30, ds.titles, ds.train, empty, empty)):
        assert C.checksum(make(d)[0]) == C.checksum(t)
    inner = MT.inner_split(ds, 0.2)
    assert len(inner.train) == 240 and np.array_equal(inner.val.target, ds.train.target[240:])
    assert len(models) == 4 and t.item_emb.shape == (30, 4 * cfg.dim) and t.top_n == 12
    h, l = (torch.as_tensor(a) for a in (ds.train.hist, ds.train.lens))
    with torch.no_grad():
        for r in (0, 7, 299):
            lp = np.mean([torch.log_softmax(m.score_all(m(h[r:r + 1], l[r:r + 1])).double(), 1)[0].numpy()
                          for m in models], axis=0)
            order = sorted(range(30), key=lambda j: -lp[j])[:12]
            assert list(t.splits["train"].ids[r]) == order
            assert np.allclose(t.splits["train"].dist[r], -lp[order], atol=1e-5)
    share = MT.in_sample_share(t, ds, 10, 240)
    hit = [ds.train.target[r] in set(t.splits["train"].ids[r, :10]) for r in range(300)]
    assert share["fitted rows"] == np.mean(hit[:240]) and share["held-out rows"] == np.mean(hit[240:])


def test_model_teacher_command_writes_a_cache_with_its_report(tmp_path, monkeypatch, capsys):
    ds = tiny_dataset(n_items=30, rows=(300, 40, 40))
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    for argv, message in ((["--top-n", "5"], "--top-n 5: must be at least --k 10 and 20"),
                          (["--holdout", "1"], "--holdout"), (["--students", "bert"], "--students")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            main(["model-teacher", "--out", str(tmp_path / "m"), *argv])
    main(["model-teacher", "--out", str(tmp_path / "m"), "--epochs", "1", "--seeds", "1", "--batch-size", "64"])
    t = C.load_teacher(tmp_path / "m", ds)
    printed = capsys.readouterr().out
    assert set(t.manifest["teacher"]["metrics"]) == {"val", "test"} and "not an LLM" in t.manifest["teacher"]["kind"]
    assert "trained-model teacher" in printed and "holds their own target" in printed and t.top_n == 20


def test_random_twin_keeps_rows_k_and_distances_and_draws_candidates_and_features_at_random():
    ds = tiny_dataset(n_items=40, rows=(500, 20, 20))
    t = SY.synthetic_teacher(ds, 1.0, 10, "honest", seed=2)
    t.item_emb = (3 + 5 * t.item_emb).astype(np.float32)                   # a scale of its own
    twin = SY.random_twin(t, ds.n_items, seed=1)
    a, b = t.splits["train"], twin.splits["train"]
    assert np.array_equal(a.rows, b.rows) and np.array_equal(a.dist, b.dist) and b.ids.shape == a.ids.shape
    assert all(len(set(row)) == 10 for row in b.ids) and b.ids.min() >= 0 and b.ids.max() < 40
    assert (a.ids == b.ids).mean() < 0.1                                   # random: rarely where the teacher's are
    seen = np.bincount(b.ids.ravel(), minlength=40) / b.ids.size            # each item about equally often
    assert np.abs(seen - 1 / 40).max() < 0.01
    assert twin.item_emb.shape == t.item_emb.shape
    assert np.allclose(twin.item_emb.std(0), t.item_emb.std(0), rtol=0.3)
    assert np.allclose(twin.item_emb.mean(0), t.item_emb.mean(0), atol=0.5 * t.item_emb.std(0).max())
    centred = lambda z: (z - z.mean(0)).ravel()                            # no item's features carried over
    assert abs(np.corrcoef(centred(twin.item_emb), centred(t.item_emb))[0, 1]) < 0.1
    assert C.checksum(SY.random_twin(t, ds.n_items, seed=1)) == C.checksum(twin) != C.checksum(t)


def grid_run(student, variant, lam, val, seed=0, distilled=True, ablation="none"):
    return {"config": {"student": student, "lam": lam, "distilled": distilled, "ablation": ablation}, "seed": seed,
            "variant": variant, "teacher_checksum": "t" if distilled else None, "val": {"NDCG@20": val}}


def test_choose_lam_keeps_the_grid_value_of_the_best_mean_validation_ndcg():
    grid = (0.1, 0.3, 0.7)
    rs = [grid_run("sasrec", "base", 0.7, 0.5, distilled=False)]
    rs += [grid_run("sasrec", "dllm2rec", lam, v, seed) for lam, vs in ((0.1, (0.2, 0.4)), (0.3, (0.31, 0.31)),
                                                                        (0.7, (0.5, 0.0))) for seed, v in enumerate(vs)]
    rs += [grid_run("dros", "dllm2rec", lam, 0.3, seed) for lam in grid for seed in (0, 1)]        # a tie: the first
    rs += [grid_run("sasrec", "dllm2rec-no_rank", 0.7, 0.9, ablation="no_rank")]
    kept = runs.choose_lam(rs, grid)
    by = {}
    for r in kept:
        by.setdefault((r["config"]["student"], r["variant"]), []).append(r)
    assert [r["config"]["lam"] for r in by["sasrec", "dllm2rec"]] == [0.3, 0.3]       # means .30, .31, .25
    assert by["sasrec", "dllm2rec"][0]["lam_grid"] == {"0.1": pytest.approx(0.3), "0.3": 0.31, "0.7": 0.25}
    assert [r["config"]["lam"] for r in by["dros", "dllm2rec"]] == [0.1, 0.1]
    assert len(by["sasrec", "base"]) == 1 and len(by["sasrec", "dllm2rec-no_rank"]) == 1
    assert runs.choose_lam(rs, ()) is rs
    cfg = D.Config()
    assert runs.with_lam_grid({"distilled": True, "ablation": "no_rank"}, cfg, grid) == [{"distilled": True, "ablation": "no_rank"}]
    assert [o["lam"] for o in runs.with_lam_grid({"distilled": True}, cfg, grid)] == list(grid)
    assert runs.with_lam_grid({}, cfg, grid) == [{}]


def test_train_with_a_lam_grid_trains_each_value_and_prints_the_one_chosen_on_validation(tmp_path, monkeypatch, capsys):
    ds = tiny_dataset(n_items=30, rows=(300, 40, 40))
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    src = random_teacher(ds)
    C.write_cache(tmp_path / "t", ds, src.item_emb, src.splits, {"model": "random"})
    out = main(["train", "--teacher", str(tmp_path / "t"), "--students", "sasrec", "--epochs", "1", "--batch-size", "64",
                "--lams", "0.1", "1.0", "--seeds", "2", "--ablations", "no_rank", "--out", str(tmp_path / "r.json")])
    assert sorted(r["config"]["lam"] for r in out["runs"] if r["variant"] == "dllm2rec") == [0.1, 0.1, 1.0, 1.0]
    full = next(l for l in out["summary"] if l["variant"] == "dllm2rec")
    means = {lam: np.mean([r["val"]["NDCG@20"] for r in out["runs"] if r["variant"] == "dllm2rec"
                           and r["config"]["lam"] == lam]) for lam in (0.1, 1.0)}
    assert full["lam"] == max(means, key=lambda k: (means[k], -k)) and full["seeds"] == 2
    assert f"{full['lam']:g} (val)" in capsys.readouterr().out
    assert next(l for l in out["summary"] if l["variant"] == "dllm2rec-no_rank")["lam"] is None


def test_knowledge_command_compares_each_teacher_with_its_twin_holm_within_each_family(tmp_path, monkeypatch, capsys):
    ds = tiny_dataset(n_items=30, rows=(300, 40, 40))
    ds.test.user = np.arange(len(ds.test)) % 9
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    src = random_teacher(ds)
    C.write_cache(tmp_path / "t", ds, src.item_emb, src.splits, {"model": "random", "metrics": {
        "test": {"HR@20": 0.5, "NDCG@20": 0.25}}})
    with pytest.raises(SystemExit, match="--ablation-students gru4rec: not among --students sasrec"):
        main(["knowledge", "--teachers", str(tmp_path / "t"), "--students", "sasrec", "--ablation-students", "gru4rec"])
    argv = ["knowledge", "--teachers", str(tmp_path / "t"), "--students", "sasrec,gru4rec", "--ablation-students",
            "sasrec", "--ablations", "no_wp,no_rank", "--lams", "0.3", "1", "--seeds", "2", "--epochs", "1",
            "--batch-size", "64"]
    out = main(argv)
    assert len(out["runs"]) == 2 * (2 * (1 + 2 * 2) + 2)
    lines = {(l["student"], l["teacher"], l["variant"]): l for l in out["table"]}
    full, twin = lines["sasrec", "t", "dllm2rec"], lines["sasrec", "t (random twin)", "dllm2rec"]
    assert set(full["vs"]) == {"base", "twin"} and set(twin["vs"]) == {"base"}
    assert full["vs"]["twin"]["family"] == "knowledge" and twin["vs"]["base"]["family"] == "control"
    ablated = lines["sasrec", "t", "dllm2rec-no_wp"]
    assert ablated["lam"] == full["lam"] and ablated["vs"]["full"]["family"] == "parts"
    assert ("gru4rec", "t", "dllm2rec-no_wp") not in lines
    sizes = {c["family"]: c["paired"]["family_size"] for l in out["table"] for c in l["vs"].values()}
    assert sizes == {"lift": 2, "knowledge": 2, "control": 2, "parts": 2, "parts vs base": 2}
    ps = [l["vs"]["twin"]["paired"] for l in out["table"] if "twin" in l["vs"]]
    assert [p["p_holm"] for p in ps] == pytest.approx(R.holm([p["p"] for p in ps]))
    printed = capsys.readouterr().out
    assert "vs twin" in printed and "the teachers' own test metrics" in printed and "0.2500" in printed
    shards = [tmp_path / f"s{i}.json" for i in range(4)]
    for i in range(2):                                     # shards: the grid first, the ablations wait for it
        main(argv + ["--shard", f"{i}/2", "--out", str(shards[i])])
    assert "wait for the lam grid" in capsys.readouterr().out
    for i in range(2):                                     # again with the grid's files: the ablations
        main(argv + ["--shard", f"{i}/2", "--reuse", *map(str, shards[:2]), "--out", str(shards[2 + i])])
    again = main(argv + ["--reuse", *map(str, shards), "--reuse-only"])
    assert [l["NDCG@20"] for l in again["table"]] == [l["NDCG@20"] for l in out["table"]]


def test_table5_command_lays_out_the_baselines_with_gains_and_holm_within_each_family(tmp_path, monkeypatch, capsys):
    ds = tiny_dataset(n_items=30, rows=(300, 40, 40))
    ds.test.user = np.arange(len(ds.test)) % 9
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    src = random_teacher(ds)
    C.write_cache(tmp_path / "t", ds, src.item_emb, src.splits, {"model": "random"})
    argv = ["table5", "--teachers", str(tmp_path / "t"), "--students", "sasrec,gru4rec", "--kds", "rd,hint",
            "--lams", "0.5", "--kd-lams", "0.1", "1", "--seeds", "2", "--epochs", "1", "--batch-size", "64"]
    out = main([*argv, "--out", str(tmp_path / "t5.json")])
    assert len(out["runs"]) == 2 * 2 * (1 + 2 + 2 * 2)       # seeds x students x (base, full + twin, 2 kds x 2 lams)
    block = next(b for b in out["table"] if b["student"] == "sasrec")
    lines = {l["variant"]: l for l in block["lines"]}
    assert set(lines) == {"base", "rd", "hint", "dllm2rec", "dllm2rec, random twin"}
    assert block["gain_s"]["NDCG@20"] == pytest.approx(lines["dllm2rec"]["NDCG@20"] / lines["base"]["NDCG@20"] - 1)
    runs_of = lambda v: [r for r in out["runs"] if r["config"]["student"] == "sasrec" and r["variant"] == v]
    val = {v: max(np.mean([r["val"]["NDCG@20"] for r in runs_of(v) if r["config"]["lam"] == lam]) for lam in (0.1, 1.0))
           for v in ("rd", "hint")}
    assert block["best_baseline"] == max(val, key=val.get)
    best = lines[block["best_baseline"]]
    assert block["gain_b"]["NDCG@20"] == pytest.approx(lines["dllm2rec"]["NDCG@20"] / best["NDCG@20"] - 1)
    assert best["lam_grid"] is not None and lines["dllm2rec"]["lam"] == 0.5
    sizes = {c["family"]: c["paired"]["family_size"] for b in out["table"]
             for c in [l["vs_base"] for l in b["lines"] if "vs_base" in l] + [b["vs_best"]]}
    assert sizes == {"table5 vs base": 8, "table5 vs best baseline": 2}
    printed = capsys.readouterr().out
    assert re.search(r"^Gain\.S ", printed, re.M) and "best baseline (" in printed
    assert "table5 vs base: 8; table5 vs best baseline: 2)" in printed
    # part of a larger declared family: the same runs, Holm over 20 and 3 with the others as p = 1
    part = main([*argv, "--declared", "20", "3", "--reuse", str(tmp_path / "t5.json"), "--reuse-only"])
    pairs = lambda o: [c["paired"] for b in o["table"] for c in [l["vs_base"] for l in b["lines"] if "vs_base" in l] + [b["vs_best"]]]
    assert {(p["family_measured"], p["family_size"]) for p in pairs(part)} == {(8, 20), (2, 3)}
    assert all(p["p_holm"] >= q["p_holm"] for p, q in zip(pairs(part), pairs(out)))
    assert "table5 vs base: 8 of its declared 20, the others counted as p = 1" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="argument --kds: .bert.: choose from hint,htd"):
        main([*argv, "--kds", "bert"])


def test_seed_bootstrap_test_equals_a_slow_loop_over_its_draws():
    """The same draws, one at a time: users with replacement, then each side's seeds with
    replacement; the difference of the drawn users' means of each side's drawn-seed means."""
    g = np.random.default_rng(1)
    users = g.integers(0, 12, 50)
    a = [{"test_ranks": g.integers(0, 30, 50).tolist()} for _ in range(3)]
    b = [{"test_ranks": g.integers(0, 45, 50).tolist()} for _ in range(2)]
    got = R.seed_bootstrap_test(a, b, users, draws=300, seed=5)
    per_user = lambda r: R.per_user_mean(np.asarray(metrics.ndcg_per_row(r["test_ranks"])), users)
    A, B = np.array([per_user(r) for r in a]), np.array([per_user(r) for r in b])
    rng = np.random.default_rng(5)
    us = rng.integers(0, A.shape[1], (300, A.shape[1]))
    sa, sb = rng.integers(0, 3, (300, 3)), rng.integers(0, 2, (300, 2))
    d = np.array([A[sa[k]].mean(0)[us[k]].mean() - B[sb[k]].mean(0)[us[k]].mean() for k in range(300)])
    assert got["p"] == pytest.approx(min(1, 2 * min((d <= 0).mean(), (d >= 0).mean())))
    assert got["z"] == pytest.approx((A.mean() - B.mean()) / d.std())
    assert R.seed_bootstrap_test(a, a, users)["z"] == 0.0 and R.seed_bootstrap_test(a, a, users)["p"] > 0.5


def test_false_positive_rate_splits_the_seeds_in_two_and_counts_the_rules_calls(tmp_path, monkeypatch):
    """Seeds 0 and 1 rank every target first, seeds 2 and 3 never in the top 20: of the three
    splits of four seeds into two pairs only {0, 1} against {2, 3} differs, beyond the seeds' noise
    and with p < .05 over 30 users."""
    users = np.repeat(np.arange(30), 2)
    run = lambda seed, rank: {"seed": seed, "test_ranks": [rank] * 60, "test": {"NDCG@20": 1.0 if rank == 0 else 0.0}}
    f = R.false_positive_rate([run(0, 0), run(1, 0), run(2, 100), run(3, 100)], users)
    assert f["splits"] == 3 and f["rule"] == pytest.approx(1 / 3) and f["paired alone"] == pytest.approx(1 / 3)
    same = R.false_positive_rate([run(s, 3) for s in range(6)], users)
    assert same["splits"] == 10 and same["rule"] == same["paired alone"] == same["seeds alone"] == 0
    ds = tiny_dataset(n_items=30, rows=(300, 40, 40))
    ds.test.user = np.arange(len(ds.test)) % 9
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    with pytest.raises(SystemExit, match="--seeds 3: an even number"):
        main(["false-positives", "--seeds", "3"])
    out = main(["false-positives", "--seeds", "4", "--epochs", "1", "--batch-size", "64"])
    assert set(out["rates"]) == {"sasrec base", "sasrec dllm2rec"} and out["rates"]["sasrec base"]["splits"] == 3


def test_gate_table_counts_each_distinct_comparison_once_and_none_between_the_same_runs():
    """A gate that is 1 on every row trains full DLLM2Rec's runs again: its line against full is
    no test, and its line against the base is full's own comparison, counted once in Holm's family;
    the families are the declared ones (against full DLLM2Rec: filter; against the base)."""
    users = np.arange(30) % 10
    def run(variant, seed, shift):
        ranks = [int(r) for r in (np.arange(30) * 3 + shift) % 40]
        return {"config": {"student": "sasrec", "distilled": variant != "base", "ablation": "none", "lam": 0.7},
                "variant": variant, "seed": seed, "selected_epoch": 1, "converged": True, "test_ranks": ranks,
                "test": {k: float(np.mean(metrics.ndcg_per_row(ranks))) for k in ("HR@20", "NDCG@20")}}
    base = [run("base", s, 5 + s) for s in range(2)]
    full = [run("dllm2rec", s, s) for s in range(2)]
    gated = [{**r, "variant": "dllm2rec+confidence-gate"} for r in full]
    other = [run("dllm2rec+target-gate", s, 2 * s + 1) for s in range(2)]
    lines = G.gate_table(base, {"t": full + gated + other}, users)
    by = {l["variant"]: l for l in lines}
    assert by["dllm2rec+confidence-gate"]["vs"]["dllm2rec"]["verdict"] == "same runs"
    assert by["dllm2rec+confidence-gate"]["vs"]["base"] is by["dllm2rec"]["vs"]["base"]
    tested = {id(c): c for l in lines for c in l["vs"].values() if c.get("paired")}
    assert len(tested) == 3
    for family, size in (("filter", 1), ("filter vs base", 2)):   # Holm within each declared family
        mine = [c for c in tested.values() if c["family"] == family]
        assert len(mine) == size and all(c["paired"]["family_size"] == size for c in mine)
        assert [c["paired"]["p_holm"] for c in mine] == pytest.approx(R.holm([c["paired"]["p"] for c in mine]))
    assert by["dllm2rec+target-gate"]["vs"]["dllm2rec"]["family"] == "filter"


def test_mixed_of_two_teachers_takes_each_ones_advice_on_half_the_rows_honest_or_flat(tmp_path, monkeypatch):
    ds = tiny_dataset(n_items=40, rows=(400, 20, 20))
    good, bad = SY.synthetic_teacher(ds, 1.0, 10, seed=1), random_teacher(ds, n=12, seed=2)
    for confidence in SY.CONFIDENCE:
        m = SY.mixed_of(good, bad, confidence, seed=3).splits["train"]
        from_good = (m.ids == good.splits["train"].ids).all(1)
        from_bad = (m.ids == bad.splits["train"].ids[:, :10]).all(1)
        assert from_good.sum() == 200 and (from_good | from_bad).all() and m.ids.shape == (400, 10)
        assert np.array_equal(m.dist[from_good], good.splits["train"].dist[from_good])
        assert (np.diff(m.dist, axis=1) >= 0).all()
        g = good.splits["train"].dist
        if confidence == "honest":                         # every bad row farther than every good one
            assert m.dist[from_bad, 0].min() >= g.max() and m.dist[from_good, 0].max() <= g.max()
        else:                                              # a bad row carries a good row's distances
            goods = {tuple(r) for r in g}
            assert all(tuple(r) in goods for r in m.dist[from_bad])
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    for name, t in (("g", good), ("b", bad)):
        C.write_cache(tmp_path / name, ds, t.item_emb, t.splits, {"model": name})
    spec = G.teacher_spec(f"mix:{tmp_path / 'g'},{tmp_path / 'b'}:flat")
    assert spec == ("mix", (str(tmp_path / "g"), str(tmp_path / "b")), "flat")
    name, t = G.make_teacher(spec, ds, 10, 3, None, None)
    assert name == "mixed g/b, flat" and t.manifest["right_rows"] == 200
    with pytest.raises(ValueError, match="mix: takes two teacher cache folders"):
        G.teacher_spec(f"mix:{tmp_path / 'g'}")


def test_a_commands_preset_is_the_default_its_help_shows(capsys):
    for argv, shown in ((["knowledge", "--help"], ["epochs at most (default 300)", "(default 0.1,0.3,0.7,1.0)"]),
                        (["model-teacher", "--help"], ["epochs at most (default 300)"]),
                        (["ablation", "--help"], ["(mean and std reported) (default 3)"])):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())
        assert all(s in text for s in shown) and ("(default 100)" not in text or argv[0] == "ablation")


def test_mixed_teacher_is_the_quality_1_teacher_on_half_the_rows_and_random_on_the_rest():
    ds = tiny_dataset(n_items=30, rows=(400, 60, 60))
    mixed = SY.mixed_teacher(ds, 10, seed=4)
    good, bad = SY.synthetic_teacher(ds, 1.0, 10, seed=4), SY.synthetic_teacher(ds, 0.0, 10, seed=5)
    same_good = (mixed.splits["train"].ids == good.splits["train"].ids).all(1)
    same_bad = (mixed.splits["train"].ids == bad.splits["train"].ids).all(1)
    assert same_good.sum() == 200 and (same_good | same_bad).all() and mixed.manifest["right_rows"] == 200


def test_plot_is_refused_in_one_line_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "load_dataset", lambda *a: tiny_dataset())
    monkeypatch.setattr(runs, "fit", lambda *a, **k: pytest.fail("trained before the check"))
    monkeypatch.setattr(research.plots.importlib.util, "find_spec", lambda name: None)
    for command in ("mechanism", "ablation"):
        with pytest.raises(SystemExit, match=r"--plot m.png: needs matplotlib \(pip install matplotlib\)"):
            main([command, "--plot", "m.png"])


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib (optional)")
def test_mechanism_and_ablation_write_their_pictures(tmp_path, monkeypatch):
    ds = tiny_dataset(n_items=30, rows=(300, 40, 40))
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    main(["mechanism", "--epochs", "1", "--qualities", "1", "0", "mixed", "--seeds", "2", "--batch-size", "64",
            "--plot", str(tmp_path / "m.png")])
    main(["ablation", "--epochs", "1", "--qualities", "0", "--seeds", "2", "--batch-size", "64", "--students", "sasrec",
            "--tables", "ablations", "--plot", str(tmp_path / "a.png")])
    for name in ("m.png", "a-q0.0.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ablation_command_compares_each_ablation_with_full_and_full_with_base(tmp_path, monkeypatch, capsys):
    ds = tiny_dataset(n_items=30, rows=(300, 40, 40))
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    out = main(["ablation", "--epochs", "1", "--qualities", "0.5", "--seeds", "2", "--batch-size", "64",
                  "--students", "sasrec,dros", "--out", str(tmp_path / "a.json")])
    lines = {(l["student"], l["variant"]): l for l in out["0.5"]["summary"]}
    for student in ("sasrec", "dros"):
        switches = ABL.OFFICIAL_SWITCHES["dro" if S.parse_student(student)[1] else "plain"]
        assert lines[student, "dllm2rec"]["against"] == "base"
        assert all(lines[student, f"dllm2rec-{a}"]["against"] == "dllm2rec" for a in D.ABLATIONS)
        assert all(lines[student, "dllm2rec --" + s.replace("_", "-")]["against"] == "dllm2rec" for s in switches)
    runs = out["0.5"]["runs"]
    assert all(r["teacher_rows_covered"] == len(ds.train) for r in runs if r["variant"] not in ("base", "dllm2rec-no_rank"))
    on = [r for r in runs if r["variant"] == "dllm2rec --official"][0]["config"]
    assert all(on[k] for k in on if k.startswith("official_"))
    printed = capsys.readouterr().out
    assert "ablations on" in printed and "differences on" in printed and "ETA" in printed
    assert json.loads((tmp_path / "a.json").read_text())["tables"] == ["ablations", "differences"]


def test_shards_split_the_runs_and_reuse_prints_the_unsplit_table(tmp_path, monkeypatch, capsys):
    ds = tiny_dataset(n_items=30, rows=(300, 40, 40))
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    argv = ["ablation", "--epochs", "1", "--qualities", "0", "--seeds", "2", "--batch-size", "64", "--students", "sasrec",
            "--tables", "ablations"]
    whole = main(argv)["0.0"]
    parts = [main(argv + ["--shard", f"{i}/2", "--out", str(tmp_path / f"{i}.json")])["0.0"]["runs"] for i in (0, 1)]
    assert "shard 1/2: wrote" in capsys.readouterr().out
    key = lambda r: (r["variant"], r["seed"])
    assert [len(p) for p in parts] == [9, 9] and not {*map(key, parts[0])} & {*map(key, parts[1])}
    assert {*map(key, parts[0] + parts[1])} == {*map(key, whole["runs"])}
    trained = []
    real_fit = D.fit
    monkeypatch.setattr(runs, "fit", lambda ds, cfg, *a, **k: trained.append(cfg) or real_fit(ds, cfg, *a, **k))
    (tmp_path / "1.json.gz").write_bytes(gzip.compress((tmp_path / "1.json").read_bytes()))    # kept compressed
    merged = main(argv + ["--reuse", str(tmp_path / "0.json"), str(tmp_path / "1.json.gz")])["0.0"]
    assert trained == [] and "taken from" in capsys.readouterr().out
    assert merged["summary"] == whole["summary"]
    # another setting (even one the base ignores) is trained again; another teacher: all but the base
    main(argv + ["--lam", "0.5", "--reuse", str(tmp_path / "0.json"), "--shard", "0/2", "--out", str(tmp_path / "x.json")])
    assert len(trained) == 9
    trained.clear()
    main([*argv[:4], "0.5", *argv[5:], "--reuse", str(tmp_path / "0.json"), "--shard", "0/2", "--out", str(tmp_path / "y.json")])
    assert len(trained) == 9 - sum(r["variant"] == "base" for r in parts[0])
    # runs of the captured (CUDA) step are other runs: an eager command trains them again
    res = json.loads((tmp_path / "0.json").read_text())
    (tmp_path / "cuda.json").write_text(json.dumps({**res, "runs": [{**r, "captured_step": True} for r in res["runs"]]}))
    trained.clear()
    main(argv + ["--reuse", str(tmp_path / "cuda.json"), "--shard", "0/2", "--out", str(tmp_path / "z.json")])
    assert len(trained) == 9
    # the mechanism check splits and merges the same way
    m = ["mechanism", "--epochs", "1", "--qualities", "1", "--variants", "full,uniform", "--batch-size", "64"]
    for i in (0, 1):
        main(m + ["--shard", f"{i}/2", "--out", str(tmp_path / f"m{i}.json")])
    trained.clear()
    out = main(m + ["--reuse", str(tmp_path / "m0.json"), str(tmp_path / "m1.json")])
    assert trained == [] and "full_vs_uniform" in out["teachers"]["1.00"]
    trained.clear()                       # --reuse-only: the runs found, the others named, none trained
    part = main(m + ["--reuse", str(tmp_path / "m0.json"), "--reuse-only"])
    assert trained == [] and capsys.readouterr().out.count("MISSING (--reuse-only") == 3
    assert len(part["runs"]) == len(json.loads((tmp_path / "m0.json").read_text())["runs"]) == 3
    with pytest.raises(SystemExit, match="--reuse-only: needs --reuse"):
        main(m + ["--reuse-only"])
    main(m + ["--shard", "0/6", "--out", str(tmp_path / "b.json")])          # the base of seed 0 alone
    capsys.readouterr()
    alone = main(m + ["--reuse", str(tmp_path / "b.json"), "--reuse-only"])
    assert alone["teachers"]["1.00"]["cells"]["full DLLM2Rec"]["verdict"] == "missing"
    assert re.search(r"^1\.00 +missing +missing +missing$", capsys.readouterr().out, re.M)
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"--reuse .*empty.json: no runs on tiny"):
        main(m + ["--reuse", str(tmp_path / "empty.json")])


def test_a_run_that_stopped_on_patience_is_reused_under_a_larger_cap_only(tmp_path, monkeypatch):
    ds = tiny_dataset(n_items=30, rows=(300, 40, 40))
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    m = ["mechanism", "--qualities", "1", "--variants", "full", "--seeds", "1", "--batch-size", "64", "--patience", "1"]
    done = main(m + ["--epochs", "30", "--out", str(tmp_path / "stopped.json")])["runs"]
    assert all(r["converged"] and len(r["epochs"]) < 30 for r in done) and len(done) == 2
    capped = main(m + ["--epochs", "1", "--out", str(tmp_path / "capped.json")])["runs"]
    assert not any(r["converged"] for r in capped)
    trained, real_fit = [], D.fit
    monkeypatch.setattr(runs, "fit", lambda ds, cfg, *a, **k: trained.append(cfg.epochs) or real_fit(ds, cfg, *a, **k))
    longest = max(len(r["epochs"]) for r in done)
    again = main(m + ["--epochs", str(longest), "--reuse", str(tmp_path / "stopped.json")])["runs"]
    assert trained == [] and [r["test_ranks"] for r in again] == [r["test_ranks"] for r in done]
    main(m + ["--epochs", str(longest - 1), "--reuse", str(tmp_path / "stopped.json")])   # it would stop sooner
    assert trained == [longest - 1] * sum(len(r["epochs"]) == longest for r in done)
    trained.clear()
    main(m + ["--epochs", "30", "--reuse", str(tmp_path / "capped.json")])              # capped: not the same run
    assert trained == [30, 30]


def test_cli_writes_results_and_reports_bad_teacher(tmp_path, capsys):
    ds_dir = tmp_path / "data"
    g = np.random.default_rng(0)
    write_official(ds_dir, "llara", [(g.integers(0, 30, 4).tolist() + [30] * 6, 4, int(g.integers(30))) for _ in range(60)], 30)
    out = tmp_path / "r.json"
    main(["train", "--dataset", str(ds_dir), "--students", "sasrec", "--epochs", "2", "--seeds", "2", "--out", str(out)])
    res = json.loads(out.read_text())
    assert [r["seed"] for r in res["runs"]] == [0, 1] and res["summary"][0]["seeds"] == 2
    assert "HR@20" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: .*nowhere: neither a teacher cache"):
        main(["train", "--dataset", str(ds_dir), "--teacher", str(tmp_path / "nowhere")])


def test_compare_teachers_reports_hand_computed_metrics_on_the_same_rows(tmp_path, monkeypatch):
    ds = tiny_dataset()
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    planted_eval_cache(tmp_path / "a", ds, rank=0, hits=5)
    planted_eval_cache(tmp_path / "b", ds, rank=2, hits=10)
    table = main(["compare-teachers", str(tmp_path / "a"), str(tmp_path / "b"), "--students", "sasrec",
                    "--epochs", "1", "--out", str(tmp_path / "r.json")])
    a, b = table["teacher 1"]["val"], table["teacher 2"]["test"]
    assert (a["rows"], a["HR@20"], a["NDCG@20"], a["title_match"]) == (20, 0.25, 0.25, 0.5)
    assert (b["HR@20"], b["NDCG@20"]) == (0.5, pytest.approx(0.5 / np.log2(4)))
    (student,) = [k for k in table if k.startswith("sasrec")]
    assert set(table[student]) == {"val", "test"} and 0 <= table[student]["test"]["HR@20"] <= 1
    planted_eval_cache(tmp_path / "c", ds, rank=0, hits=5, rows=np.arange(1, 21))
    with pytest.raises(SystemExit, match="c: covers other val rows"):
        main(["compare-teachers", str(tmp_path / "a"), str(tmp_path / "c"), "--epochs", "1"])


@pytest.mark.parametrize("argv,message", [
    (["train", "--seeds", "0"], "--seeds"), (["train", "--k", "0"], "--k: 0: must be >= 1"),
    (["train", "--batch-size", "-5"], "--batch-size: -5: must be in 1..65536"), (["train", "--lam", "-1"], "--lam"),
    (["train", "--gammas", "-1", "0.5", "0.1"], "--gammas: -1"), (["train", "--gammas", "0", "0", "0"], "--gammas 0.0"),
    (["train", "--epochs", "0"], "--epochs"), (["train", "--lr", "nan"], "--lr: nan"),
    (["train", "--seed", "-1"], "--seed"), (["reproduce", "--teacher-rows", "-5"], "--teacher-rows"),
    (["train", "--students", "sasrec,bert"], "--students"), (["train", "--dropout", "1"], "--dropout"),
    (["finetune", "--out", "a.gguf", "--lr", "0"], "--lr"), (["teacher", "--shard", "2/2"], "--shard"),
    (["mechanism", "--qualities", "1", "1.5"], "--qualities: 1.5"), (["teacher-bench", "--rows", "0"], "--rows: 0"),
    (["bench", "--batch-size", "0"], "--batch-size: 0"), (["bench", "--students", "bert"], "--students"),
    (["train", "--lr", "-1e-3"], "--lr: -1e-3: must be"), (["teacher", "--shard", "-1/2"], "--shard: -1/2"),
    (["train", "--dim", "100000000"], "--dim: 100000000: must be in 1..4096"),
    (["train", "--seed", "99999999999"], "--seed: 99999999999"), (["bench", "--d-llm", "1e9"], "--d-llm"),
    (["bench", "--rows", "100000000000"], "--rows"), (["bench", "--items", "1"], "--items: 1: must be in 12.."),
    (["teacher", "--teacher-seqs", "100000"], "--teacher-seqs"), (["teacher", "--n-ctx", "1000000000"], "--n-ctx"),
    (["teacher", "--threads", "100000"], "--threads: 100000: must be in 1..512"), (["bench", "--warmup", "0"], "--warmup"),
    (["ablation", "--shard", "2/2"], "--shard: '2/2': expected i/n"), (["train", "--shard", "1"], "--shard"),
    (["finetune", "--out", "a.gguf", "--seed", "99999999999999999999999"], "--seed: 99999999999999999999999: must be in"),
])
def test_bad_options_are_refused_in_one_line_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "load_dataset", lambda *a: pytest.fail("data loaded before the options were checked"))
    with pytest.raises(SystemExit) as e:
        main(argv + ["--dataset", "x"])
    text = str(e.value.code) + capsys.readouterr().err
    assert message in text and "Traceback" not in text and len(str(e.value.code or "x").splitlines()) <= 1
    assert list(tmp_path.iterdir()) == []                                      # nothing written


def test_bad_device_out_and_os_errors_end_in_one_line(tmp_path, monkeypatch):
    ds = tiny_dataset()
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: this torch sees no CUDA device"):
            main(["train", "--device", "cuda"])
    (tmp_path / "file").write_text("")
    unwritable = [Path("/proc/dllm2rec/r.json")] if Path("/proc/self").exists() else []   # even for root
    for out in (tmp_path, tmp_path / "file" / "r.json", *unwritable):         # a folder; under a file
        with pytest.raises(SystemExit, match="--out .*: (is a folder|cannot write there)"):
            main(["train", "--epochs", "1", "--out", str(out)])
    monkeypatch.setattr(data, "load_dataset", lambda *a: open(tmp_path / "missing" / "u.data"))
    with pytest.raises(SystemExit, match=r"error: .*missing/u.data: FileNotFoundError.*\(-v shows the traceback\)"):
        main(["train"])


@pytest.mark.parametrize("argv,message", [
    (["train", "--k", "30", "--teacher", "T"], "--k 30: more than the 12 candidates per row the teacher keeps"),
    (["reproduce", "--top-n", "5"], "--k 10: more than the 5 candidates per row"),
    (["mechanism", "--k", "30"], "--k 30: the synthetic teachers need 2 x --k items"),
    (["ablation", "--k", "21"], "--k 21: the synthetic teachers need 2 x --k items (K good ones and K random items "
                                "outside them); tiny has 40"),
    (["mechanism", "--students", "sasrec,dros"], "the mechanism check trains one student"),
    (["train", "--ablations", "no_wp"], "need --teacher"), (["train", "--no-baseline"], "need --teacher"),
    (["train", "--kd", "rd"], "need --teacher"),
    (["table5", "--teachers", "T", "--students", "sasrec", "--kds", "rd", "--declared", "2", "1"],
     "--declared 2 1: this command prints 3 and 1 comparisons; a declared family holds at least as many"),
    (["train", "--kd", "rd", "--teacher", "T", "--ablations", "no_wp"], "--kd rd with --ablations: the ablations are"),
    (["train", "--kd", "hint", "--teacher", "T", "--row-gate", "target"], "--kd hint: the ablations and the row gate"),
    (["reproduce", "--zero-shot", "--lora", "A"], "--zero-shot with --lora"),
    (["train", "--device", "cpu", "--official-protocol", "--batch-size", "400"], "300 training rows, fewer than --batch-size 400"),
    (["ablation", "--reuse", "missing.json"], "--reuse missing.json: unreadable"),
    (["mechanism", "--reuse", "A"], "--reuse A: unreadable or not valid JSON"),
])
def test_bad_combinations_are_refused_after_loading_before_any_work(argv, message, tmp_path, monkeypatch):
    """Checks that need the data or the teacher's files, done before a baseline or the teacher runs."""
    ds = tiny_dataset()
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    monkeypatch.setattr(runs, "fit", lambda *a, **k: pytest.fail("a student trained before the check"))
    monkeypatch.setattr(T, "run_teacher", lambda *a, **k: pytest.fail("the teacher ran before the check"))
    (tmp_path / "A").write_bytes(b"GGUF")
    C.write_cache(tmp_path / "T", ds, *(lambda t: (t.item_emb, t.splits))(random_teacher(ds)), {"model": "random"})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(argv)


def test_no_negative_item_is_refused_and_the_sampler_never_loops_for_ever():
    ds = tiny_dataset(n_items=3, rows=(6, 2, 2))
    ds.train.hist[0, :2], ds.train.lens[0], ds.train.target[0] = (0, 1), 2, 2
    ds.train.hist[0, 2:] = 3
    with pytest.raises(D.UserError, match="training row 1 holds all 3 items: no negative item"):
        D.fit(ds, D.Config(epochs=1))
    hist = torch.tensor([[0, 1] + [3] * 8])
    with pytest.raises(RuntimeError, match="no valid negative after"):
        D.sample_negatives(hist, torch.tensor([2]), 3, static=False)


def test_corrupt_or_odd_data_files_are_named_in_one_line(tmp_path, capsys):
    """A byte-order mark is read past; a truncated gzip, a CSV field over csv's limit, an
    out-of-range timestamp, an empty titles file and a titles file one title too long are each
    refused naming the file; titles lost from u.item are said, with the ratings they drop."""
    write_official(tmp_path, "bigrec", [([1, 2] + [5] * 8, 2, 3)], 5)
    for name in ("id2name.txt", "train_data.csv"):
        p = tmp_path / name
        p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    assert data.load_dataset(str(tmp_path)).n_items == 5
    (tmp_path / "id2name.txt").write_text(open(tmp_path / "id2name.txt", encoding="utf-8-sig").read() + "\nTitle 5\t5")
    with pytest.raises(data.DataError, match=r"train_data.csv row 1: len_seq 2, .*padded with 5\? then the titles file"):
        data.load_dataset(str(tmp_path))
    (tmp_path / "id2name.txt").write_text("\n")
    with pytest.raises(data.DataError, match=r"id2name.txt: no titles"):
        data.load_dataset(str(tmp_path))
    gz = tmp_path / "r.json.gz"
    gz.write_bytes(gzip.compress(b'{"reviewerID": "u"}\n' * 100)[:40])
    with pytest.raises(data.DataError, match=r"r.json.gz: unreadable, truncated or corrupt"):
        list(data._lines(gz))
    big = tmp_path / "big"
    write_official(big, "bigrec", [([1, 2] + [5] * 8, 2, 3)], 5)
    (big / "val_data.csv").write_text('seq,len_seq,next\n"' + "1" * 200_000 + '",2,3\n')
    with pytest.raises(data.DataError, match=r"val_data.csv line \d+: not CSV rows"):
        data.load_dataset(str(big))
    with pytest.raises(data.DataError, match=r"u.data line 3: value '1e23' is out of range"):
        data._int("1e23", "u.data line 3")
    ml = tmp_path / "ml"
    ml.mkdir()
    (ml / "u.data").write_text("".join(f"{u}\t{i}\t5\t{100 * u + i}\n" for u in range(1, 6) for i in range(1, 14)))
    (ml / "u.item").write_text("".join(f"{i}|Movie {i}|x\n" for i in range(1, 13)))        # item 13 lost
    ds = data.load_dataset(str(ml))
    assert ds.n_items == 12 and "5 of 65 interactions dropped: 1 items without a usable title" in capsys.readouterr().err
    (ml / "u.data").write_text("".join(f"1\t{i}\t5\t{i}\n" for i in range(1, 13)))         # one user: 2 rows
    with pytest.raises(D.UserError, match=r"ml: 0 validation rows \(train/val/test 1/0/1\); a student needs rows"):
        D.check_trainable(data.load_dataset(str(ml)), 256, False)


def test_a_corrupt_identity_or_manifest_is_named(tmp_path):
    (tmp_path / "identity.json").write_text('{"format": "dllm2rec-teach')         # cut mid-write by another tool
    with pytest.raises(C.TeacherError, match=r"identity.json: unreadable or not valid JSON"):
        T.check_identity(tmp_path, {"format": "x"})
    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe")
    with pytest.raises(C.TeacherError, match=r"manifest.json: unreadable or not valid JSON"):
        T.check_manifest(tmp_path, {"format": "x"})
    for value in ("[1, 2]", '"text"', "3"):                                 # valid JSON, not an object
        for name in ("identity.json", "manifest.json"):
            (tmp_path / name).write_text(value)
        with pytest.raises(C.TeacherError, match=r"identity.json: holds a JSON \w+, not the object"):
            T.check_identity(tmp_path, {"format": "x"})
        with pytest.raises(C.TeacherError, match=r"manifest.json: holds a JSON \w+, not the object"):
            T.check_manifest(tmp_path, {"format": "x"})


def test_an_official_fingerprint_json_of_another_shape_is_named(tmp_path):
    ds = tiny_dataset()
    C.export_official(random_teacher(ds), tmp_path, ds)
    for value, message in (("[]", "holds a JSON list"), ('{"sha256": [1]}', "its sha256 is not an object")):
        (tmp_path / "fingerprint.json").write_text(value)
        with pytest.raises(C.TeacherError, match=re.escape(f"{tmp_path / 'fingerprint.json'}: {message}")):
            C.load_teacher(tmp_path, ds)


def test_ctrl_c_and_corrupt_archives_end_in_one_line():
    def raises(e):
        def run():
            raise e
        return run
    for e, message in [(KeyboardInterrupt(), "interrupted (a teacher run resumes"), (EOFError("x"), "EOFError: x"),
                       (zipfile.BadZipFile("File is not a zip file"), "BadZipFile: File is not a zip file"),
                       (pickle.UnpicklingError("bad"), "UnpicklingError: bad")]:
        with pytest.raises(SystemExit) as out:
            at_the_boundary(raises(e), verbose=False)
        assert message in str(out.value.code) and len(str(out.value.code).splitlines()) == 1


def test_a_full_disk_leaves_no_partial_export_and_no_temporary_file(tmp_path, monkeypatch):
    ds = tiny_dataset()
    t = random_teacher(ds)
    def full(*a, **k):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(np, "savetxt", full)
        with pytest.raises(C.UserError, match=re.escape(f"{tmp_path / 'official'}: could not be written (no space left")):
            C.export_official(t, tmp_path / "official", ds)
    assert list(tmp_path.iterdir()) == []                          # no folder, no temporary folder
    C.export_official(t, tmp_path / "official", ds)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official"]
    if importlib.util.find_spec("gguf"):
        import gguf
        cfg = FT.LlamaConfig(n_layer=1, d=8, n_head=2, n_kv=2, ff=16, n_vocab=10, eps=1e-5, rope_base=1e4, n_rot=4)
        model = FT.TorchLlama(cfg, {"blk.0.attn_q.weight": torch.zeros(8, 8), "blk.0.attn_v.weight": torch.zeros(8, 8)}, r=2, alpha=4)
        def short(*a, **k):                  # numpy's tofile on a full disk: no errno, no file name
            raise OSError("2048 requested and 840 written")
        for fail in (full, short):
            monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
            with pytest.raises(C.UserError, match=re.escape(f"{tmp_path / 'adapter.gguf'}: could not be written (no "
                                                            "space left on the device)")):
                FT.export_lora(model, tmp_path / "adapter.gguf", r=2, alpha=4)
            assert sorted(p.name for p in tmp_path.iterdir()) == ["official"]
    with monkeypatch.context() as m:         # atomic_write: every JSON, cache file and checkpoint
        m.setattr(json, "dumps", lambda *a, **k: full())
        with pytest.raises(C.UserError, match=r"r.json: could not be written \(no space left on the device\)"):
            write_json(tmp_path / "r.json", {"runs": []})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official"]


def test_a_captured_step_always_warms_up_eagerly_first():
    """Adam creates its state on the first step: captured, it would be reset at every replay."""
    m = student(S.SASRec, 10)
    opt = torch.optim.Adam(m.parameters())
    assert ST.Step(D.training_loss, m, opt, D.Config(), "captured", warmup=0).warmup == 1
    assert ST.Step(D.training_loss, m, opt, D.Config(), "eager", warmup=0).warmup == 0


def test_each_command_keeps_its_own_defaults():
    """One command's defaults (reproduce: 512 teacher rows; compare-teachers: two students)
    must not leak into another's through shared option groups."""
    get = lambda *argv: parse(list(argv))
    assert (get("teacher").train_rows, get("teacher").eval_rows) == (None, None)
    assert (get("reproduce").train_rows, get("reproduce").eval_rows) == (None, None)   # the preset decides:
    assert (cli.REPRODUCE["train_rows"], cli.REPRODUCE["eval_rows"]) == (512, 128)        # quick, or --full: all
    assert get("train").students == list(S.STUDENTS)
    assert (get("reproduce").students, get("reproduce").seeds) == (None, None)   # the preset decides, by device
    assert (get("reproduce").epochs, get("reproduce").patience) == (D.Config.epochs, D.Config.patience)
    assert (get("mechanism").epochs, get("mechanism").students) == (5, ["sasrec"])
    assert get("train", "--official").official and not get("train").official_weights
    assert from_args(T.TeacherSettings, get("reproduce", "--seed", "3")).seed == 0   # the students' seed only
    assert get("compare-teachers", "x").students == ["sasrec", "dros"]


def test_reproduce_uses_the_committed_adapter_only_on_its_own_data(tmp_path, monkeypatch):
    ds = tiny_dataset()
    adapter = tmp_path / "a.gguf"
    adapter.write_bytes(b"")
    adapter.with_suffix(".json").write_text(json.dumps({"fingerprint": ds.fingerprint, "titles_only": True}))
    monkeypatch.setattr(T, "DEFAULT_ADAPTER", adapter)
    assert adapter_of([], ds) == adapter_of([], ds, "teacher") == (str(adapter), True)   # one choice for both
    assert adapter_of(["--zero-shot"], ds) == adapter_of(["--zero-shot"], ds, "teacher") == (None, False)
    for name in ("mine.gguf", "other.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")                                # the flags check the magic
    mine, other = str(tmp_path / "mine.gguf"), str(tmp_path / "other.gguf")
    assert adapter_of(["--lora", mine], ds) == (mine, False)
    assert adapter_of(["--model", other, "--titles-only"], ds) == (None, True)
    assert adapter_of([], tiny_dataset(seed=1)) == (None, False)   # other rows: not trained for them
    with pytest.raises(UserError, match="--zero-shot with --lora"):
        adapter_of(["--zero-shot", "--lora", mine], ds, "teacher")


@pytest.mark.parametrize("command", ["teacher", "reproduce", "teacher-bench"])
def test_every_teacher_option_says_its_default(command):
    subs = argparse.ArgumentParser().add_subparsers()
    cli.add_commands(subs, argparse.ArgumentParser(add_help=False))
    T.add_commands(subs, argparse.ArgumentParser(add_help=False))
    names = {f.name for f in dataclasses.fields(T.TeacherSettings) if "help" in f.metadata}
    for action in subs.choices[command]._actions:
        if action.dest in names and not isinstance(action, argparse._StoreTrueAction):
            assert "default" in action.help, (command, action.option_strings)


def adapter_of(argv: list, ds, command: str = "reproduce") -> tuple:
    """(adapter, titles only) of a command line's teacher settings after the default adapter."""
    args = parse([command, *argv])
    st = T.with_default_adapter(from_args(T.TeacherSettings, args), ds, args.zero_shot)
    return st.lora, st.titles_only


# ============================================================================ teacher cache and official files (cache.py)
def test_teacher_cache_roundtrip_and_partial_coverage(tmp_path):
    ds = tiny_dataset()
    t = random_teacher(ds, rows=np.arange(0, 300, 3))
    t.splits["train"].text = np.array([f"text {i}" for i in range(100)])
    C.write_cache(tmp_path, ds, t.item_emb, t.splits, {"model": "random"})
    back = C.load_teacher(tmp_path, ds)
    assert back.d_llm == 24 and back.top_n == 12
    assert np.array_equal(back.splits["train"].ids, t.splits["train"].ids)
    assert back.splits["train"].text[5] == "text 5"
    ids, dist, covered = C.per_training_row(back, len(ds.train), 10)
    assert covered.sum() == 100 and covered[3] and not covered[4]
    assert np.array_equal(ids[3], t.splits["train"].ids[1, :10]) and not ids[4].any()


@pytest.mark.parametrize("how,message", [("out_of_range", "item ids outside 0..39"), ("nan", "distances contain NaN"),
                                         ("emb_inf", "item embeddings contain NaN"),
                                         ("negative", r"negative distances \(found -0.5\)"),
                                         ("truncated", "train.npz: its sha256 differs from the manifest's"),
                                         ("bitflip", "item_embeddings.npy: its sha256 differs from the manifest's")])
def test_bad_teacher_cache_is_refused(tmp_path, how, message):
    ds = tiny_dataset()
    corrupt(tmp_path, ds, how)
    with pytest.raises(C.TeacherError, match=message):
        C.load_teacher(tmp_path, ds)


def test_teacher_cache_of_other_data_is_refused(tmp_path):
    ds, other = tiny_dataset(seed=0), tiny_dataset(seed=1)
    t = random_teacher(ds)
    C.write_cache(tmp_path, ds, t.item_emb, t.splits, {"model": "random"})
    with pytest.raises(C.TeacherError, match="manifest.json: made for dataset .* misaligned"):
        C.load_teacher(tmp_path, other)


def test_official_files_export_import_and_refusals(tmp_path, capsys):
    ds = tiny_dataset()
    t = random_teacher(ds)
    s = t.splits["train"]
    s.ids[5, 2] = ds.train.target[s.rows[5]]                          # a hit for the target gate
    C.export_official(t, tmp_path, ds)
    back = C.load_teacher(tmp_path, ds)
    assert np.array_equal(back.splits["train"].ids, t.splits["train"].ids)
    assert np.allclose(back.splits["train"].dist, t.splits["train"].dist, rtol=1e-6)
    assert np.array_equal(back.item_emb, t.item_emb)
    gate = lambda teacher: D.row_gates(D.Config(row_gate="target"), teacher, ds.train.target)
    assert torch.equal(gate(back), gate(t)) and gate(back)[s.rows[5]] > 0.1 + 0.9 / math.log2(1 + 4)
    lines = (tmp_path / "myrank_train.txt").read_text().splitlines()
    (tmp_path / "myrank_train.txt").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # two rows swapped
    with pytest.raises(C.TeacherError, match="myrank_train.txt: changed since it was written"):
        C.load_teacher(tmp_path, ds)
    with pytest.raises(C.TeacherError, match="fingerprint.json: written for rows with fingerprint"):
        C.load_teacher(tmp_path, tiny_dataset(seed=1))
    (tmp_path / "fingerprint.json").unlink()                                 # files from elsewhere: a warning
    C.load_teacher(tmp_path, ds)
    assert "no fingerprint.json" in capsys.readouterr().out
    (tmp_path / "myrank_train.txt").write_text("\n".join(lines[:-1]))          # truncated
    with pytest.raises(C.TeacherError, match="myrank_train.txt is 299x12 but confidence_train.txt is 300x12"):
        C.load_teacher(tmp_path, ds)
    (tmp_path / "confidence_train.txt").write_text("\n".join((tmp_path / "confidence_train.txt").read_text().splitlines()[:-1]))
    with pytest.raises(C.TeacherError, match="299 rows, but the training split has 300"):
        C.load_teacher(tmp_path, ds)
    lines[7] = lines[7] + " 3"
    (tmp_path / "myrank_train.txt").write_text("\n".join(lines))
    with pytest.raises(C.TeacherError, match="line 8 has 13 values"):
        C.load_teacher(tmp_path, ds)
    torch.save({"x": 1}, tmp_path / "all_embeddings.pt")
    with pytest.raises(C.TeacherError, match="all_embeddings.pt: expected one tensor"):
        C.load_teacher(tmp_path, ds)


def test_official_files_under_the_earlier_names_load_the_same(tmp_path):
    ds = tiny_dataset()
    t = random_teacher(ds)
    C.export_official(t, tmp_path, ds)
    (tmp_path / "fingerprint.json").unlink()        # the official pipeline writes none
    today = C.load_teacher(tmp_path, ds)
    for role, (now, earlier) in C.OFFICIAL_NAMES.items():
        (tmp_path / now).rename(tmp_path / earlier)
    back = C.load_teacher(tmp_path, ds)
    assert np.array_equal(back.splits["train"].ids, today.splits["train"].ids)
    assert np.array_equal(back.splits["train"].dist, today.splits["train"].dist)
    assert np.array_equal(back.item_emb, today.item_emb)
    (tmp_path / "myrank_train.txt").write_text((tmp_path / "ranking_list.txt").read_text())
    with pytest.raises(C.TeacherError, match="both myrank_train.txt and ranking_list.txt.*remove one"):
        C.load_teacher(tmp_path, ds)


# ============================================================================ the LLM teacher on llama.cpp (teacher.py)
def test_bigrec_prompt_is_the_alpaca_template():
    prefix, suffix = PR.prompt_template("movies")
    prompt = prefix + PR.history_text(["A (1990)", "B"]) + suffix
    assert prompt == ("Below is an instruction that describes a task, paired with an input that provides further context. "
                      "Write a response that appropriately completes the request. \n\n### Instruction:\nGiven a list of "
                      "movies the user has watched before, please recommend a new movie that the user likes to the user."
                      "\n\n### Input:\nThe user has watched the following movies before:\"A (1990)\", \"B\"\n\n### Response:\n")
    assert "video games the user has played" in PR.prompt_template("games")[0]
    assert C.answer_title(' "Heat (1995)" and more') == "Heat (1995)" and C.answer_title(" Heat\n") == "Heat"


def test_title_match_share():
    titles = ["Heat (1995)", "Heat"]
    assert C.title_match_share(['"Heat (1995)"', "Heat", '"Nope"', 'x "Heat (1995)" y'], titles) == 0.75


def test_grounding_equals_brute_force():
    g = np.random.default_rng(0)
    items, gen = g.normal(size=(300, 16)).astype(np.float32) * 5, g.normal(size=(37, 16)).astype(np.float32) * 5
    ids, dist = T.ground(gen, items, top_n=12, chunk=10)
    brute = np.linalg.norm(gen[:, None, :].astype(np.float64) - items[None].astype(np.float64), axis=2)
    want = np.argsort(brute, axis=1, kind="stable")[:, :12]
    assert np.array_equal(ids, want)
    assert np.allclose(dist, np.take_along_axis(brute, want, 1), rtol=1e-5)


@needs_llm
def test_teacher_embeddings_are_llama_cpp_last_token_states(tiny_model):
    """Our batched multi-sequence embedding equals llama-cpp-python's own embed() (LAST pooling)."""
    import llama_cpp
    from llama_cpp import Llama
    texts = ["Toy Story (1995)", "Heat", "a much longer title with several words in it"]
    ours = T.LlamaTeacher(T.TeacherSettings(model=str(tiny_model), n_ctx=1024, n_seq=4))
    try:
        z = ours.embed(texts)
    finally:
        ours.close()
    ref = Llama(str(tiny_model), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST, n_ctx=512, verbose=False)
    want = np.array([ref.embed(t, normalize=False) for t in texts], dtype=np.float32)
    assert z.shape == (3, 32) and np.abs(z - want).max() < 3e-3   # batch shapes change float rounding


@needs_llm
def test_generation_is_llama_cpp_greedy_decoding(tiny_model):
    """Several rows decoded together over a shared prefix pick, at every step, the argmax of
    llama.cpp's own logits for prompt + the tokens so far (a random model has near ties,
    which rounding may flip: steps with a top-2 margin under 0.5 end that row's check)."""
    from llama_cpp import Llama
    prefix, suffix = PR.prompt_template("movies")
    rests = [PR.history_text(h) + suffix for h in (["Heat"], ["Toy Story (1995)", "Heat"], ["x"], ["y", "z"], ["w"])]
    ours = T.LlamaTeacher(T.TeacherSettings(model=str(tiny_model), n_ctx=1024, n_seq=4, max_new_tokens=10))
    try:
        ours.set_prefix(prefix)
        got, ids = ours.generate(rests), ours.generated_ids
    finally:
        ours.close()
    ref = Llama(str(tiny_model), n_ctx=512, logits_all=True, verbose=False)
    checked = 0
    for rest, answer, our_ids in zip(rests, got, ids):
        prompt = ref.tokenize(prefix.encode(), add_bos=True) + ref.tokenize(rest.encode(), add_bos=False)
        ref.reset()
        ref.eval(prompt + our_ids)
        for j, tok in enumerate(our_ids):
            logits = ref.scores[len(prompt) - 1 + j]
            top2 = np.sort(logits)[-2:]
            if top2[1] - top2[0] < 0.5:
                break
            assert tok == int(logits.argmax())
            checked += 1
        assert answer == ref.detokenize(our_ids).decode("utf-8", errors="ignore").split("\n")[0]
    assert checked >= 10


@needs_llm
def test_titles_only_decoding_is_the_greedy_choice_among_catalogue_titles(tiny_model):
    """With constrain_to, every answer is a quoted catalogue title, and each step's token is the
    argmax of llama.cpp's logits over the tokens that continue some title (found here by
    scanning the titles' token lists, not with the trie)."""
    from llama_cpp import Llama
    titles = ["Heat (1995)", "Heat", "Toy Story (1995)", "Casino (1995)", "Babe (1995)", "Big (1988)", "x"]
    prefix, suffix = PR.prompt_template("movies")
    rests = [PR.history_text(h) + suffix for h in (["Heat"], ["Toy Story (1995)", "Heat"], ["x"], ["y", "z"], ["w"])]
    ours = T.LlamaTeacher(T.TeacherSettings(model=str(tiny_model), n_ctx=1024, n_seq=4, max_new_tokens=2))   # the cap does not cut titles
    try:
        ours.constrain_to(titles)
        ours.set_prefix(prefix)
        got, ids = ours.generate(rests), ours.generated_ids
    finally:
        ours.close()
    assert all(C.answer_title(a) in titles and a.strip()[0] == a.strip()[-1] == '"' for a in got)
    ref = Llama(str(tiny_model), n_ctx=512, logits_all=True, verbose=False)
    spelled = [ref.tokenize(f'"{t}"'.encode(), add_bos=False) for t in titles]
    checked = 0
    for rest, our_ids in zip(rests, ids):
        assert our_ids in spelled
        prompt = ref.tokenize(prefix.encode(), add_bos=True) + ref.tokenize(rest.encode(), add_bos=False)
        ref.reset()
        ref.eval(prompt + our_ids)
        for j, tok in enumerate(our_ids):
            allowed = sorted({s[j] for s in spelled if len(s) > j and s[:j] == our_ids[:j]})
            logits = ref.scores[len(prompt) - 1 + j][allowed]
            top2 = np.sort(logits)[-2:]
            if len(allowed) > 1 and top2[1] - top2[0] < 0.5:
                break
            assert tok == allowed[int(logits.argmax())]
            checked += len(allowed) > 1
    assert checked >= 5


@needs_llm
def test_teacher_run_writes_a_cache_students_can_read(tiny_model, tmp_path):
    ds = tiny_dataset()
    t = T.run_teacher(ds, tmp_path / "cache", tiny_settings(tiny_model))
    assert t is not None and set(t.splits) == {"train", "val", "test"}
    assert len(t.splits["train"].rows) == 150 and len(t.splits["val"].rows) == 20
    assert t.item_emb.shape == (40, 32) and t.top_n == 15 and len(t.splits["train"].text) == 150
    ident = t.manifest["teacher"]
    assert ident["model"]["file"] == "tiny.gguf" and ident["seconds_per_row"] > 0
    again = C.load_teacher(tmp_path / "cache", ds)           # a second run reads the cache
    assert np.array_equal(again.splits["train"].ids, t.splits["train"].ids)
    m = C.teacher_metrics(t.splits["test"], ds.test.target)
    assert m["rows"] == 20 and "HR@20" not in m and 0 <= m["NDCG@10"] <= m["HR@10"] <= 1   # top-15 kept
    r = D.fit(ds, D.Config(student="sasrec", distilled=True, epochs=1, batch_size=64), t, log=lambda *a: None)
    assert r["teacher_rows_covered"] == 150


@needs_llm
def test_reproduce_runs_end_to_end_on_a_tiny_teacher(tiny_model, tmp_path, monkeypatch, capsys):
    """The single command on a tiny model and data: teacher stage, then both variants and the
    trained-model teacher's row (its first student, from a cache of its own the second run
    reads), one table, the teacher beside the students on its own rows, a results file;
    --top-n 12 keeps fewer than 20 items, so the teacher has no @20 metrics to print."""
    ds = tiny_dataset()
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    monkeypatch.setenv("DLLM2REC_CACHE", str(tmp_path / "home"))
    argv = ["reproduce", "--model", str(tiny_model), "--n-ctx", "1024", "--teacher-seqs", "4", "--max-new-tokens", "8",
            "--top-n", "12", "--teacher-rows", "60", "--teacher-eval-rows", "10", "--students", "sasrec", "--seeds", "2",
            "--epochs", "2", "--batch-size", "64", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "r.json")]
    main(argv)
    printed, res = capsys.readouterr().out, json.loads((tmp_path / "r.json").read_text())
    assert [(line["variant"], line["seeds"]) for line in res["summary"]] == [
        ("base", 2), ("dllm2rec", 2), (cli.MODEL_ROW, 2)]
    assert res["teacher"]["covered_train_rows"] == 60 and f"checksum {res['teacher']['checksum']}" in printed
    model = res["model_teacher"]
    assert model["manifest"]["splits"]["train"]["covered"] == len(ds.train) and model["checksum"] in printed
    assert re.search(r"^trained-model teacher \(dros x 1, not an LLM\) +[\d.]+ +[\d.]+$", printed, re.M)
    assert "on the 10 test rows the teacher covered" in printed
    assert "teacher plan, to do here: 40 of 40 titles, 60 of 60 train rows (300 in all), 10 of 10 val rows" in printed
    assert re.search(r"^teacher +nan +nan$", printed, re.M)
    rows = C.load_teacher(tmp_path / "c", ds).splits["test"].rows
    pop = D.popularity_metrics(ds, data.Split(ds.test.hist[rows], ds.test.lens[rows], ds.test.target[rows]))
    assert re.search(rf"^popularity +{pop['HR@20']:.4f} +{pop['NDCG@20']:.4f}$", printed, re.M)
    assert set(res["latency"]) == {"sasrec", "teacher"} and res["latency"]["teacher"] > 0
    main(argv)                                                             # a second run: from the caches
    printed = capsys.readouterr().out
    assert f"checksum {res['teacher']['checksum']}" in printed and "fitted on the training rows only" not in printed
    assert model["checksum"] in printed
    main([*argv, "--model-teacher-seeds", "0"])
    assert [l["variant"] for l in json.loads((tmp_path / "r.json").read_text())["summary"]] == ["base", "dllm2rec"]


@needs_llm
def test_full_preset_runs_every_stage_resumes_each_and_reuses_everything(tiny_model, tmp_path, monkeypatch, capsys):
    """reproduce --full on a tiny model and data: its plan first, then the LoRA tuned (here on 8
    rows), the teacher on every row, the students over a lam grid. A student run killed midway
    resumes from the kept runs to the same table; a second run reuses every stage."""
    ds = tiny_dataset()
    ds.domain = "movies"
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    argv = ["reproduce", "--full", "--model", str(tiny_model), "--n-ctx", "1024", "--max-new-tokens", "8",
            "--top-n", "12", "--finetune-samples", "8", "--students", "sasrec", "--seeds", "1", "--lams", "0.3", "1",
            "--epochs", "2", "--batch-size", "64", "--model-teacher-seeds", "0",
            "--teacher-rows", "128", "--teacher-eval-rows", "10"]      # (default: every row; here fewer, for time)
    def dies_at(module, name, call):               # module.name raises KeyboardInterrupt at its call-th call
        real, calls = getattr(module, name), []
        def dying(*a, **k):
            calls.append(1)
            if len(calls) == call:
                raise KeyboardInterrupt
            return real(*a, **k)
        monkeypatch.setattr(module, name, dying)
        with pytest.raises(SystemExit, match="interrupted"):
            main([*argv, "--out", str(tmp_path / "dead.json")])
        monkeypatch.setattr(module, name, real)
    for home in ("whole", "killed"):
        monkeypatch.setenv("DLLM2REC_CACHE", str(tmp_path / home))
        if home == "killed":        # killed in each stage in turn: fine-tuning, the teacher's third chunk, a student
            dies_at(FT, "lm_loss", 1)
            dies_at(T, "one_chunk", 3)
            dies_at(runs, "fit", 3)
        main([*argv, "--out", str(tmp_path / f"{home}.json")])
    printed = capsys.readouterr().out
    assert "FULL PRESET on cpu: (1) fine-tuning the teacher's LoRA on 8 of 300 training rows" in printed
    assert "(2) the teacher on 128 training rows and 10 validation and test rows each" in printed
    assert "taken from" in printed and list((tmp_path / "killed" / "adapters").glob("*.gguf"))
    whole, killed = (json.loads((tmp_path / f"{h}.json").read_text()) for h in ("whole", "killed"))
    assert whole["teacher"]["checksum"] == killed["teacher"]["checksum"]
    assert whole["teacher"]["covered_train_rows"] == 128
    args = parse(["reproduce", "--full", "--lora", str(tiny_model)])    # an adapter given: no tuning; every row
    st = cli.full_teacher(ds, from_args(T.TeacherSettings, args), args,
                          cli.plan(args, ds, 20, students=["sasrec"], seeds=1, lams=(0.5,)), torch.device("cpu"))
    assert (st.train_rows, st.eval_rows, st.n_seq, st.lora, st.titles_only) == (None, None, 1, str(tiny_model), False)
    assert [(l["variant"], l["lam"], l["NDCG@20"]) for l in whole["summary"]] == \
        [(l["variant"], l["lam"], l["NDCG@20"]) for l in killed["summary"]]
    assert whole["summary"][1]["lam_grid"] is not None
    monkeypatch.setattr(runs, "fit", lambda *a, **k: pytest.fail("a student trained again"))
    monkeypatch.setattr(FT, "train_lora", lambda *a, **k: pytest.fail("the LoRA tuned again"))
    again = main(argv)                                        # every stage from its cache
    assert [l["NDCG@20"] for l in again["summary"]] == [l["NDCG@20"] for l in killed["summary"]]


@needs_llm
def test_killed_run_resumes_to_the_same_cache_and_shards_merge(tiny_model, tmp_path):
    ds = tiny_dataset()
    st = tiny_settings(tiny_model)
    whole = T.run_teacher(ds, tmp_path / "whole", st)
    assert T.run_teacher(ds, tmp_path / "resumed", st, stop_after=2) is None      # killed after 2 chunks
    (tmp_path / "resumed" / "work" / ".train-00002.npz.x.tmp").write_bytes(b"half a file")  # killed mid-write
    resumed = T.run_teacher(ds, tmp_path / "resumed", st)
    shard_dirs = [tmp_path / f"shard{i}" for i in range(2)]
    for i, d in enumerate(shard_dirs):
        assert T.run_teacher(ds, d, T.TeacherSettings(**{**st.__dict__, "shard": f"{i}/2"})) is None
    with pytest.raises(C.TeacherError, match=r"nothing/work: no teacher work here"):
        T.merge(ds, tmp_path / "merged", [shard_dirs[0], tmp_path / "nothing"], st)
    assert not (tmp_path / "merged" / "work" / "identity.json").exists()    # the failed merge blocks no fix
    merged = T.merge(ds, tmp_path / "merged", shard_dirs, st)
    for other in (resumed, merged):
        assert np.array_equal(other.item_emb, whole.item_emb)
        for split in T.SPLITS:
            a, b = whole.splits[split], other.splits[split]
            assert np.array_equal(a.rows, b.rows) and np.array_equal(a.ids, b.ids)
            assert np.array_equal(a.dist, b.dist) and np.array_equal(a.text, b.text)
        assert C.checksum(other) == C.checksum(whole)
    whole.splits["train"].ids[[0, 1]] = whole.splits["train"].ids[[1, 0]]
    assert C.checksum(other) != C.checksum(whole)                    # two rows swapped: another checksum


@needs_llm
def test_one_row_at_a_time_answers_do_not_depend_on_the_other_rows(tiny_model, tmp_path):
    """n_seq = 1 (the default): a training row gets the same answer, embedding and top-n
    whichever subset of rows the run covers (batched decoding would tie it to its batch)."""
    ds = tiny_dataset()
    runs = [T.run_teacher(ds, tmp_path / str(n), tiny_settings(tiny_model, n_seq=1, train_rows=n)) for n in (150, 40)]
    (a, b) = (r.splits["train"] for r in runs)
    common = np.intersect1d(a.rows, b.rows)
    assert len(common) >= 10
    ia, ib = (np.searchsorted(x.rows, common) for x in (a, b))
    assert np.array_equal(a.text[ia], b.text[ib]) and np.array_equal(a.ids[ia], b.ids[ib])
    assert np.array_equal(a.dist[ia], b.dist[ib])


@needs_llm
def test_cache_of_another_dataset_model_or_prompt_is_refused(tiny_model, tmp_path):
    ds = tiny_dataset()
    st = tiny_settings(tiny_model)
    T.run_teacher(ds, tmp_path / "c", st, stop_after=1)
    other_model = write_tiny_llama(tmp_path / "other.gguf", seed=1)
    with pytest.raises(C.TeacherError, match=r"identity.json: this teacher work was made with another model"):
        T.run_teacher(ds, tmp_path / "c", T.TeacherSettings(**{**st.__dict__, "model": str(other_model)}))
    chat = T.TeacherSettings(**{**st.__dict__, "chat": True})      # the tiny model has no chat template
    with pytest.raises(C.TeacherError, match="has no chat template"):
        T.run_teacher(ds, tmp_path / "c", chat)
    work = tmp_path / "c" / "work"
    other_prompt = {**json.loads((work / "identity.json").read_text()), "prompt": {"template": "chat", "sha256": "x"}}
    with pytest.raises(C.TeacherError, match=r"another prompt \(sha256: \w+ there, x now; template: alpaca there, chat now\)"):
        T.check_identity(work, other_prompt)
    with pytest.raises(C.TeacherError, match="another dataset fingerprint"):
        T.run_teacher(tiny_dataset(seed=5), tmp_path / "c", st)
    # --n-ctx sets llama.cpp's n_ubatch (how a prompt is split, so the rounding): a resume with another is refused
    with pytest.raises(C.TeacherError, match=r"another generation \(n_ctx: 1024 there, 2048 now\)"):
        T.run_teacher(ds, tmp_path / "c", T.TeacherSettings(**{**st.__dict__, "n_ctx": 2048}))


@needs_llm
def test_cache_made_by_another_llama_cpp_build_is_refused(tiny_model, tmp_path, monkeypatch):
    ds, st = tiny_dataset(), tiny_settings(tiny_model)
    T.run_teacher(ds, tmp_path / "c", st, stop_after=1)
    made = json.loads((tmp_path / "c" / "work" / "identity.json").read_text())["llama_cpp"]
    assert made == LL.build_identity() and made["compiled_for"].startswith("CPU")
    monkeypatch.setattr(LL, "build_identity", lambda: {**made, "libraries_sha256": "another build"})
    with pytest.raises(C.TeacherError, match="another llama_cpp"):
        T.run_teacher(ds, tmp_path / "c", st)


@needs_llm
def test_a_finished_cache_answers_only_its_own_request_and_a_corrupt_chunk_is_redone(tiny_model, tmp_path, capsys):
    ds, st = tiny_dataset(), tiny_settings(tiny_model)
    whole = T.run_teacher(ds, tmp_path / "c", st)
    shutil.rmtree(tmp_path / "c" / "work")                                # the finished cache alone
    with pytest.raises(C.TeacherError, match=r"manifest.json: this teacher cache was made with another top_n"):
        T.run_teacher(ds, tmp_path / "c", tiny_settings(tiny_model, top_n=12))
    with pytest.raises(C.TeacherError, match=r"another generation"):     # GPU and CPU chunks never mix
        T.run_teacher(ds, tmp_path / "c", tiny_settings(tiny_model, n_gpu_layers=-1))
    part = tmp_path / "p"
    T.run_teacher(ds, part, st, stop_after=3)
    (part / "work" / "identity.json").unlink()                           # chunks of an unknown model
    with pytest.raises(C.TeacherError, match=r"work: teacher chunks without identity.json"):
        T.run_teacher(ds, part, st)
    shutil.rmtree(part)
    T.run_teacher(ds, part, st, stop_after=3)
    chunk = T.chunk_path(part / "work", "items", 0)
    chunk.write_bytes(chunk.read_bytes()[:100])                          # a truncated chunk
    redone = T.run_teacher(ds, part, st)
    assert "items-00000.npz: unreadable (truncated or corrupt); it is computed again" in capsys.readouterr().err
    assert C.checksum(redone) == C.checksum(whole) and np.array_equal(redone.item_emb, whole.item_emb)


@needs_llm
def test_a_kv_cache_too_small_or_too_large_is_refused_before_any_chunk(tiny_model, tmp_path):
    ds = tiny_dataset()
    with pytest.raises(C.TeacherError, match=r"--n-ctx 200 cannot hold 4 rows decoded together \(--teacher-seqs 4\)"):
        T.run_teacher(ds, tmp_path / "c", tiny_settings(tiny_model, n_ctx=200))
    assert not any((tmp_path / "c" / "work").glob("*.npz"))
    with pytest.raises(C.TeacherError, match=r"--n-ctx 6000: more than \(--teacher-seqs 4 \+ 1\) x the 1024 tokens"):
        T.LlamaTeacher(tiny_settings(tiny_model, n_ctx=6000)).load()
    with pytest.raises(C.TeacherError, match=r"--top-n 41: more than the 40 items"):
        T.run_teacher(ds, tmp_path / "c", tiny_settings(tiny_model, top_n=41))


@needs_llm
def test_the_default_kv_cache_fits_a_model_trained_on_a_short_context(tmp_path):
    """A user who sets no --n-ctx gets a cache the model can use: 4096, or (--teacher-seqs + 1) x
    the model's training context where that is smaller (here 256 tokens: 512, and 768 for 2 rows)."""
    model = write_tiny_llama(tmp_path / "short.gguf", context=256)
    for n_seq, want in ((1, 512), (2, 768)):
        llm = T.LlamaTeacher(T.TeacherSettings(model=str(model), n_seq=n_seq)).load()
        try:
            assert llm.n_ctx == want and T.TeacherSettings().n_ctx is None
        finally:
            llm.close()
    llm = T.LlamaTeacher(T.TeacherSettings(model=str(write_tiny_llama(tmp_path / "long.gguf", context=8192)))).load()
    assert llm.n_ctx == 4096
    llm.close()


def test_non_gguf_model_or_adapter_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    """llama.cpp segfaults on some non-GGUF adapters: the files are checked first, and the work
    folder gets nothing (no identity.json) until the model has loaded."""
    ds = tiny_dataset()
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    fake = tmp_path / "adapter.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    for flag in ("--lora", "--model"):
        with pytest.raises(SystemExit, match=f"{flag}: .*not a GGUF file"):
            main(["teacher", flag, str(fake), "--cache", str(tmp_path / "c")])
    with pytest.raises(C.TeacherError, match="adapter.gguf: not a GGUF file"):
        T.run_teacher(ds, tmp_path / "c", T.TeacherSettings(model=str(fake)))
    assert not (tmp_path / "c").exists()


@needs_llm
def test_official_export_import_of_a_teacher_run(tiny_model, tmp_path):
    ds = tiny_dataset()
    t = T.run_teacher(ds, tmp_path / "c", T.TeacherSettings(**{**tiny_settings(tiny_model).__dict__, "train_rows": None}))
    C.export_official(t, tmp_path / "official", ds)
    back = C.load_teacher(tmp_path / "official", ds)
    assert np.array_equal(back.item_emb, t.item_emb) and np.array_equal(back.splits["train"].ids, t.splits["train"].ids)
    assert np.array_equal(back.splits["train"].dist, t.splits["train"].dist)


@needs_llm
def test_smollm2_teacher_on_a_handful_of_rows(tmp_path):
    try:
        model = LL.default_model()
    except C.TeacherError as e:
        pytest.skip(str(e))
    ds = tiny_dataset(n_items=12, rows=(6, 3, 3))
    ds.titles = ["Toy Story (1995)", "Heat (1995)", "Casino (1995)", "Babe (1995)", "Fargo (1996)", "Scream (1996)",
                 "Titanic (1997)", "Contact (1997)", "Alien (1979)", "Aliens (1986)", "Psycho (1960)", "Vertigo (1958)"]
    ds.domain = "movies"
    t = T.run_teacher(ds, tmp_path / "c", T.TeacherSettings(n_ctx=2048, n_seq=4, max_new_tokens=16, top_n=10))
    assert t.d_llm == 576 and t.manifest["teacher"]["model"]["file"] == model.name
    assert all(len(x) > 0 for x in t.splits["train"].text)
    # its item embeddings are llama.cpp's LAST-pooled states, unnormalised (norms far from 1)
    assert np.linalg.norm(t.item_emb, axis=1).min() > 2


# ============================================================================ LoRA fine-tuning (finetune.py)
@needs_llm
def test_torch_llama_equals_llama_cpp_on_a_tiny_model(tiny_model):
    cfg, w = FT.read_gguf(tiny_model)
    assert (cfg.n_layer, cfg.d, cfg.n_head, cfg.n_kv) == (2, 32, 4, 2)
    toks = sample_tokens(tiny_model)
    with torch.no_grad():
        ours = FT.TorchLlama(cfg, w)(torch.tensor([toks]))[0].numpy()
    want = llama_cpp_logits(tiny_model, toks)
    assert np.abs(ours - want).max() < 1e-3 * np.abs(want).max()


@needs_llm
def test_exported_adapter_in_llama_cpp_equals_torch_merged(tiny_model, tmp_path):
    cfg, w = FT.read_gguf(tiny_model)
    torch.manual_seed(0)
    model = FT.TorchLlama(cfg, w, r=4, alpha=8, dropout=0.0)
    for lora in model.lora.values():
        torch.nn.init.normal_(lora.lora_b, std=0.2)        # B starts at zero: make the adapter matter
    FT.export_lora(model, tmp_path / "adapter.gguf", r=4, alpha=8)
    merged = dict(w)
    for key, lora in model.lora.items():
        i, name = key.split("_", 1)
        merged[f"blk.{i}.{name}.weight"] = lora.merged().detach()
    toks = sample_tokens(tiny_model)
    with torch.no_grad():
        ours = FT.TorchLlama(cfg, merged)(torch.tensor([toks]))[0].numpy()
        unadapted = FT.TorchLlama(cfg, w)(torch.tensor([toks]))[0].numpy()
    want = llama_cpp_logits(tiny_model, toks, lora=tmp_path / "adapter.gguf")
    assert np.abs(ours - want).max() < 1e-3 * np.abs(want).max()
    assert np.abs(unadapted - want).max() > 100 * np.abs(ours - want).max()


@needs_llm
def test_training_steps_lower_the_loss_on_a_fixed_batch(tiny_model):
    ds = tiny_dataset()
    ds.domain = "movies"
    seqs = FT.training_sequences(ds, tiny_model, np.arange(6))
    assert all(s[-1] == 2 for s in seqs)                                      # ends with end of sequence
    cfg, w = FT.read_gguf(tiny_model)
    torch.manual_seed(0)
    model = FT.TorchLlama(cfg, w, r=4, alpha=8, dropout=0.0)
    opt = torch.optim.AdamW(model.lora.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = FT.lm_loss(model, seqs, pad=2)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(not p.requires_grad for p in w.values())                      # base weights frozen


@needs_llm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])   # bfloat16: the 7B-on-a-GPU setting
def test_torch_llama_close_to_llama_cpp_on_smollm2(dtype):
    try:
        model = LL.default_model()
    except C.TeacherError as e:
        pytest.skip(str(e))
    cfg, w = FT.read_gguf(model, dtype)
    assert w["blk.0.attn_q.weight"].dtype == dtype
    toks = sample_tokens(model)
    with torch.no_grad():
        ours = torch.log_softmax(FT.TorchLlama(cfg, w)(torch.tensor([toks]))[0], -1)
    want = torch.log_softmax(torch.as_tensor(llama_cpp_logits(model, toks)), -1)
    kl = (want.exp() * (want - ours)).sum(-1)                                 # llama.cpp quantizes activations to 8 bits
    assert kl.max() < 0.05 and (ours.argmax(-1) == want.argmax(-1)).float().mean() > 0.85


@needs_llm
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model):
    ds = tiny_dataset()
    ds.domain = "movies"
    seqs = FT.training_sequences(ds, tiny_model, np.arange(4))
    cfg, w = FT.read_gguf(tiny_model)
    model = FT.TorchLlama(cfg, w, r=4, alpha=8, dropout=0.3)          # dropout: the recompute must replay it
    for lora in model.lora.values():
        torch.nn.init.normal_(lora.lora_b, std=0.2)
    got = []
    for checkpoint in (False, True):
        torch.manual_seed(1)
        model.zero_grad()
        loss = FT.lm_loss(model, seqs, pad=2, checkpoint=checkpoint)
        loss.backward()
        got.append((loss.item(), torch.cat([p.grad.flatten() for p in model.lora.parameters()])))
    assert got[0][0] == pytest.approx(got[1][0], rel=1e-6)
    assert torch.allclose(got[0][1], got[1][1], rtol=1e-4, atol=1e-7) and got[0][1].abs().max() > 0


@needs_llm
def test_interrupted_finetune_resumes_to_the_same_adapter(tiny_model, tmp_path, monkeypatch):
    ds = tiny_dataset()
    ds.domain = "movies"
    settings = lambda out, epochs, lr=1e-2: FT.FinetuneSettings(out=str(out), model=str(tiny_model), samples=12,
                                                               epochs=epochs, r=4, lora_alpha=8, lr=lr, batch_size=4)
    run = lambda out, epochs: FT.train_lora(ds, settings(out, epochs), log=lambda *a: None)
    whole = run(tmp_path / "whole.gguf", 2)
    first = run(tmp_path / "part.gguf", 1)
    resumed = run(tmp_path / "part.gguf", 2)                    # finds part.gguf.ckpt after epoch 1
    assert len(first["losses"]) == 3 and resumed["losses"] == whole["losses"]
    assert (tmp_path / "part.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()
    with pytest.raises(C.TeacherError, match="part.gguf.ckpt: a checkpoint of other settings"):
        FT.train_lora(ds, settings(tmp_path / "part.gguf", 3, lr=1e-3), log=lambda *a: None)
    # killed within an epoch (a checkpoint every 2 steps): the rerun goes on from its last step
    monkeypatch.setattr(FT, "CHECKPOINT_STEPS", 2)
    real, calls = FT.lm_loss, []
    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 6:                      # 3 steps an epoch: epoch 2's last step, after its step-2 checkpoint
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(FT, "lm_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "mid.gguf", 2)
    ck = torch.load(tmp_path / "mid.gguf.ckpt", weights_only=True)
    assert (ck["epochs"], ck["step"], len(ck["losses"])) == (1, 2, 5)
    monkeypatch.setattr(FT, "lm_loss", real)
    mid = run(tmp_path / "mid.gguf", 2)
    assert mid["losses"] == whole["losses"]
    assert (tmp_path / "mid.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()


class RunsCode:
    """A pickled object that would run code when unpickled (a planted checkpoint)."""

    def __reduce__(self):
        return (Path.touch, (Path("planted-code-ran"),))


@needs_llm
def test_finetune_refuses_planted_checkpoints_divergence_and_bad_outputs(tiny_model, tmp_path, monkeypatch):
    ds = tiny_dataset()
    ds.domain = "movies"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    settings = lambda out, lr: FT.FinetuneSettings(out=str(out), model=str(tiny_model), samples=8, r=4, lr=lr, batch_size=4)
    ckpt = tmp_path / "a.gguf.ckpt"
    for plant, message in ((lambda: torch.save({"settings": RunsCode()}, ckpt), "UnpicklingError"),  # no code runs
                           (lambda: ckpt.write_bytes(b"PK\x03\x04 cut"), "not a checkpoint this code can read"),
                           (lambda: torch.save({"lora": 1}, ckpt), "not a fine-tuning checkpoint")):
        plant()
        with pytest.raises(C.TeacherError) as e:
            FT.train_lora(ds, settings(tmp_path / "a.gguf", 1e-2), log=lambda *a: None)
        assert str(e.value).startswith(f"{ckpt}: ") and message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "planted-code-ran").exists()
    with pytest.raises(FloatingPointError, match=r"finetune: the loss became nan at step \d+ \(a smaller --lr"):
        FT.train_lora(ds, settings(tmp_path / "b.gguf", 1e30), log=lambda *a: None)
    assert not list(tmp_path.glob("b.gguf*"))                    # no adapter of NaN tensors, no checkpoint
    for out, message in [(tiny_model, "is the model it fine-tunes"), (tmp_path / "a.json", "expected a .gguf file name")]:
        with pytest.raises(SystemExit, match=message):
            main(["finetune", "--model", str(tiny_model), "--out", str(out)])


@needs_llm
def test_finetune_command_writes_the_adapter_reproduce_picks_up(tiny_model, tmp_path, monkeypatch):
    ds = tiny_dataset()
    ds.domain = "movies"
    monkeypatch.setattr(data, "load_dataset", lambda *a: ds)
    out = tmp_path / "a.gguf"
    main(["finetune", "--model", str(tiny_model), "--samples", "8", "--batch-size", "4", "--titles-only",
            "--out", str(out)])
    made = json.loads(out.with_suffix(".json").read_text())
    assert made["fingerprint"] == ds.fingerprint and made["titles_only"] and len(made["losses"]) == 2
    monkeypatch.setattr(T, "DEFAULT_ADAPTER", out)
    assert adapter_of([], ds) == (str(out), True)


# ============================================================================ the teacher on serving engines (serve.py)
# vLLM cannot run here (no GPU): its answers are the shapes of its documentation's examples
# (/version, /v1/models, /tokenize, /v1/completions with logprobs, /v1/embeddings), served by a
# fake engine; llama-server is the real one, built from the llama.cpp that llama-cpp-python vendors.
import contextlib
import http.server
import socket
import subprocess
import threading
import time
import urllib.request

import serve as SV

LLAMA_SERVER = os.environ.get("DLLM2REC_LLAMA_SERVER") or shutil.which("llama-server")
needs_server = pytest.mark.skipif(not (LLAMA_SERVER and Path(LLAMA_SERVER).exists()),
                                  reason="needs a llama-server binary: make llama-server (README), or "
                                         "DLLM2REC_LLAMA_SERVER=path")


def fake_vllm_answer(path: str, body: dict | None, d: int = 6, garbage: str | None = None):
    """What vLLM's OpenAI-compatible server answers (shapes from its documentation), for a fake
    model whose tokens are a text's bytes (BOS = 1) and whose answer to any prompt is the title
    of item (sum of the prompt's ids) mod 7, in quotes, then more text after a newline."""
    if path == "/version":
        return {"version": "0.11.0"}
    if path == "/v1/models":
        return {"object": "list", "data": [{"id": "bigrec-7b", "object": "model", "created": 0, "owned_by": "vllm",
                                            "root": "bigrec-7b", "parent": None, "max_model_len": 4096}]}
    if path == "/tokenize":
        toks = ([1] if body["add_special_tokens"] else []) + list(body["prompt"].encode())
        return {"count": len(toks), "max_model_len": 4096, "tokens": toks, "token_strs": None}
    if path == "/v1/completions":
        answer = f'"item {sum(body["prompt"]) % 7}"\nmore'.encode()[:body["max_tokens"]]
        kept = answer[:answer.index(b"\n") + 1] if b"\n" in answer else answer    # stopped at "\n", its token kept
        return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "text": kept.decode().rstrip("\n"), "finish_reason": "stop", "stop_reason": "\n",
                             "logprobs": {"text_offset": list(range(len(kept))), "token_logprobs": [-0.1] * len(kept),
                                          "tokens": [f"token_id:{b}" for b in kept], "top_logprobs": None}}],
                "usage": {"prompt_tokens": len(body["prompt"]), "total_tokens": 0, "completion_tokens": len(kept)}}
    if path == "/detokenize":
        return {"prompt": bytes(body["tokens"]).decode("utf-8", errors="replace")}
    if path == "/v1/embeddings":
        vecs = [[float(sum(ids) % 11 + k) for k in range(d)] for ids in body["input"]]
        if garbage == "nan":
            vecs[0][0] = float("nan")
        if garbage == "length":
            vecs[-1] = vecs[-1][:-1]
        return {"id": "embd-1", "object": "list", "created": 0, "model": body["model"],
                "data": [{"index": i, "object": "embedding", "embedding": v} for i, v in enumerate(vecs)][::-1],
                "usage": {"prompt_tokens": 0, "total_tokens": 0}}
    return None


@contextlib.contextmanager
def fake_engine(answer=fake_vllm_answer, html_on=None, fail_after=None):
    """A vLLM-shaped HTTP server on a free localhost port: answer(path, body) -> JSON (None: 404);
    html_on: a path answered with an HTML error page; fail_after: embedding requests served before
    every request fails with HTTP 500."""
    served = {"embeddings": 0, "requests": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def reply(self, code, raw, ctype="application/json"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def handle_one(self, body):
            served["requests"].append((self.path, body))
            if self.path == "/v1/embeddings":
                served["embeddings"] += 1
            if fail_after is not None and served["embeddings"] > fail_after:
                return self.reply(500, b'{"error": {"message": "engine died", "code": 500}}')
            if self.path == html_on:
                return self.reply(502, b"<html><body>502 Bad Gateway</body></html>", "text/html")
            out = answer(self.path, body)
            if out is None:
                return self.reply(404, b'{"error": {"message": "Not Found", "code": 404}}')
            self.reply(200, json.dumps(out).encode())

        def do_GET(self):
            self.handle_one(None)

        def do_POST(self):
            self.handle_one(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 256         # the client keeps many requests in flight, as engines expect
        daemon_threads = True
    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()


def served_settings(gen, emb, **kw):
    return T.TeacherSettings(**{**dict(server=gen, embed_server=emb, top_n=5, train_rows=100, eval_rows=20), **kw})


def test_served_answers_are_cut_by_the_in_process_rule():
    assert SV.cut_at([' "He', 'at (1995)', '", "Ca', 'sino'], 32) == 3      # the token of the second quote
    assert SV.cut_at(['"A', '\nB', 'C'], 32) == 2 and SV.cut_at(['ab', 'cd', 'ef'], 2) == 2
    assert SV.cut_at(['"', '\ufffd', '"', 'x'], 32) == 3 and SV.cut_at([], 32) == 0
    e = SV.Endpoint("http://x", "llama-server", "b1", "m.gguf", 1, {})
    assert SV.generated_ids(e, {"tokens": [5, 6, 2], "stop_type": "eos"}) == [5, 6]     # the EOS is not text
    assert SV.generated_ids(e, {"tokens": [5, 6, 2], "stop_type": "limit"}) == [5, 6, 2]
    assert SV.text_of(e, {"content": '\ufffd\x16"A"'}) == '\x16"A"'          # errors="ignore", as in process
    assert e.api.completion(e.model, [1, 2], 32)[1]["n_predict"] == 32     # llama-server's default is unbounded
    v = SV.Endpoint("http://y", "vllm", "0.11.0", "bigrec-7b", 32, {})
    path, body = v.api.completion(v.model, [1, 2], 32)
    assert (path, body["max_tokens"], body["temperature"], body["stop"]) == ("/v1/completions", 32, 0, ["\n"])
    eos = {"choices": [{"logprobs": {"tokens": ["token_id:7", "token_id:2"]}, "finish_reason": "stop", "stop_reason": None}]}
    assert SV.generated_ids(v, eos) == [7]
    assert v.api.embedding(v.model, [[1]])[1]["normalize"] is False          # vLLM <= 0.11
    assert v.api.embedding(v.model, [[1]])[1]["use_activation"] is False     # vLLM after
    assert e.api.embedding(e.model, [[1]])[1]["embd_normalize"] == -1
    assert set(SV.KINDS) == {"llama-server", "vllm"} and v.api.completion("m", [1], 4)[1]["model"] == "m"


def test_a_fake_vllm_engine_serves_the_teacher_and_two_give_the_same_cache(tmp_path):
    ds = tiny_dataset()
    with fake_engine() as (g1, _), fake_engine() as (e1, _), fake_engine() as (g2, _), fake_engine() as (e2, _):
        one = T.run_teacher(ds, tmp_path / "one", st := served_settings(g1, e1), engine=open_engine(st))
        two = T.run_teacher(ds, tmp_path / "two", st := served_settings(f"{g1},{g2}", f"{e1},{e2}"),
                            engine=open_engine(st))
        ident = json.loads((tmp_path / "one" / "work" / "identity.json").read_text())
    assert C.checksum(one) == C.checksum(two)
    assert ident["engine"]["generation"] == {"kind": "vllm", "version": "0.11.0", "model": "bigrec-7b",
                                             "max_model_len": 4096}
    assert ident["model"] == {"served": "bigrec-7b"} and ident["llama_cpp"] is None
    t = one.splits["train"]
    prefix, suffix = PR.prompt_template(ds.domain)
    for k in (0, 7, 99):               # the answer the fake model gives to the prefix's and the row's tokens
        r = t.rows[k]
        rest = PR.history_text([ds.titles[j] for j in ds.train.hist[r, :ds.train.lens[r]]]) + suffix
        ids = [1] + list(prefix.encode()) + list(rest.encode())
        assert t.text[k] == f'"item {sum(ids) % 7}"'
    z = [[float(sum([1] + list(f"item {i % 7}".encode())) % 11 + k) for k in range(6)] for i in range(7)]
    assert np.array_equal(one.item_emb[:7], np.asarray(z, np.float32)[[ds.titles.index(f"item {i}") for i in range(7)]])


@pytest.mark.parametrize("how, message", [
    ("html", r"/v1/embeddings: HTTP 502: <html>"), ("nan", "NaN"), ("length", r"vectors of length \[5, 6\]")])
def test_a_served_teacher_refuses_garbage_before_writing(tmp_path, how, message):
    ds = tiny_dataset()
    answer = lambda path, body: fake_vllm_answer(path, body, garbage=how)
    with fake_engine() as (g, _), fake_engine(answer, html_on="/v1/embeddings" if how == "html" else None) as (e, _):
        st = served_settings(g, e)
        with pytest.raises(C.TeacherError, match=re.escape(e) + ".*" + message):
            T.run_teacher(ds, tmp_path / "c", st, engine=open_engine(st))
    assert not list((tmp_path / "c").glob("work/*.npz"))


def test_a_server_that_dies_mid_run_loses_nothing(tmp_path):
    ds = tiny_dataset()
    with fake_engine() as (g, _), fake_engine() as (e, _):
        st = served_settings(g, e)
        whole = T.run_teacher(ds, tmp_path / "whole", st, engine=open_engine(st))
    with fake_engine() as (g, _), fake_engine(fail_after=12) as (e, served):
        st = served_settings(g, e)
        with pytest.raises(C.TeacherError, match=re.escape(e) + r"/v1/embeddings: HTTP 500: engine died \((\d+) chunks "
                                                 r"of this run are kept: the same command resumes\)") as died:
            T.run_teacher(ds, tmp_path / "c", st, engine=SV.ServedTeacher(st, [g], [e], retries=2))
    kept = sorted(p.name for p in (tmp_path / "c" / "work").glob("*.npz"))
    assert 0 < len(kept) < len(T.work_plan(ds, st)) and f"({len(kept)} chunks" in str(died.value)
    with fake_engine() as (g, _), fake_engine() as (e, _):          # resumed on other servers of the same engine
        st = served_settings(g, e)
        resumed = T.run_teacher(ds, tmp_path / "c", st, engine=open_engine(st))
    assert C.checksum(resumed) == C.checksum(whole)


def test_a_served_teacher_refuses_what_it_cannot_serve(tmp_path, tiny_model):
    ds = tiny_dataset()
    with pytest.raises(UserError, match="--server and --embed-server go together"):
        open_engine(served_settings("http://127.0.0.1:9", None))
    with pytest.raises(UserError, match="--lora with --server"):
        open_engine(served_settings("http://127.0.0.1:9", "http://127.0.0.1:9", lora=str(tiny_model)))
    with fake_engine(lambda path, body: None) as (g, _):
        with pytest.raises(C.TeacherError, match="neither llama-server .* nor vLLM"):
            SV.probe(g)
    with fake_engine() as (g, _), fake_engine() as (e, _):
        st = served_settings(g, e)
        T.run_teacher(ds, tmp_path / "c", st, engine=open_engine(st), stop_after=1)
        other = lambda path, body: {"version": "0.12.0"} if path == "/version" else fake_vllm_answer(path, body)
        with fake_engine(other) as (g2, _):
            st = served_settings(g2, e)
            with pytest.raises(C.TeacherError, match=r"identity.json: this teacher work was made with another engine "
                                                     r"\(generation.version: 0.11.0 there, 0.12.0 now\); use another"):
                T.run_teacher(ds, tmp_path / "c", st, engine=open_engine(st))


@contextlib.contextmanager
def llama_server(model, slots: int = 1, embeddings: bool = False, lora=None):
    """A real llama-server on a free localhost port, one thread, serving model; stopped after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [LLAMA_SERVER, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--parallel", str(slots),
           "--ctx-size", str(1024 * slots), "--threads", "1", "--no-webui"]
    cmd += ["--embeddings", "--pooling", "last"] if embeddings else []
    cmd += ["--lora", str(lora)] if lora else []
    log = Path(model).parent / f"llama-server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 60
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"llama-server did not start: {log.read_text()[-400:]}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.kill()
        proc.wait()


@needs_llm
@needs_server
def test_llama_server_gives_the_in_process_answers_and_embeddings(tmp_path, tiny_model):
    ds = tiny_dataset()
    rows = dict(top_n=15, train_rows=64, eval_rows=16, max_new_tokens=12)
    local = T.run_teacher(ds, tmp_path / "local", tiny_settings(tiny_model, n_seq=1, **rows))
    with llama_server(tiny_model) as g, llama_server(tiny_model, embeddings=True) as e:
        st = served_settings(g, e, **rows)
        remote = T.run_teacher(ds, tmp_path / "served", st, engine=open_engine(st))
        ident = json.loads((tmp_path / "served" / "work" / "identity.json").read_text())
    gen = ident["engine"]["generation"]
    assert (gen["kind"], gen["model"], gen["slots"], gen["cache_prompt"]) == ("llama-server", "tiny.gguf", 1, False)
    assert gen["version"] and ident["engine"]["embeddings"]["slots"] == 1
    assert np.allclose(remote.item_emb, local.item_emb, rtol=0, atol=SERVED_ATOL)
    differ = {}
    for split in ("train", "val", "test"):
        a, b = local.splits[split], remote.splits[split]
        same = a.text == b.text
        assert np.allclose(a.dist[same], b.dist[same], rtol=0, atol=SERVED_ATOL * 10)
        differ[split] = a.rows[~same]
    # a row may differ only where greedy decoding meets a near tie, which llama.cpp's batch shape
    # breaks either way (the prompt decoded whole on the server, prefix and row apart in process)
    assert sum(map(len, differ.values())) <= 2, differ
    prefix, suffix = PR.prompt_template(ds.domain)
    from llm import LlamaTeacher
    from llama_cpp import Llama
    here, ref = LlamaTeacher(tiny_settings(tiny_model, n_seq=1, max_new_tokens=12)), None
    with llama_server(tiny_model) as g, llama_server(tiny_model, embeddings=True) as e:
        there = open_engine(served_settings(g, e, max_new_tokens=12))
        for split, rows in differ.items():
            for r in rows:
                rest = T.row_prompts(ds, (prefix, suffix), [(split, 0, [r])])
                here.set_prefix(prefix); here.generate(rest)
                there.set_prefix(prefix); there.generate(rest)
                x, y = here.generated_ids[0], there.generated_ids[0]
                k = next(i for i in range(min(len(x), len(y)) + 1) if i == min(len(x), len(y)) or x[i] != y[i])
                ref = ref or Llama(str(tiny_model), n_ctx=512, logits_all=True, verbose=False)
                ref.reset(); ref.eval(there.prefix_ids + here.tokenize(rest[0], bos=False) + x[:k])
                logits = np.array(ref.scores[ref.n_tokens - 1])
                assert abs(logits[x[k]] - logits[y[k]]) < 1e-3 * abs(logits).max()     # a near tie
        there.close()
    here.close()
SERVED_ATOL = 1e-4    # embeddings through llama-server against in process (same build): measured below this


@needs_llm
@needs_server
def test_two_llama_servers_give_the_cache_of_one_and_other_slots_are_refused(tmp_path, tiny_model):
    ds = tiny_dataset()
    rows = dict(top_n=15, train_rows=64, eval_rows=8, max_new_tokens=12)
    with llama_server(tiny_model) as g1, llama_server(tiny_model, embeddings=True) as e1, \
            llama_server(tiny_model) as g2, llama_server(tiny_model, embeddings=True) as e2:
        one = T.run_teacher(ds, tmp_path / "one", st := served_settings(g1, e1, **rows), engine=open_engine(st))
        two = T.run_teacher(ds, tmp_path / "two", st := served_settings(f"{g1},{g2}", f"{e1},{e2}", **rows),
                            engine=open_engine(st))
        assert C.checksum(one) == C.checksum(two)
        with llama_server(tiny_model, slots=2) as g4:
            st = served_settings(g4, e1, **rows)
            with pytest.raises(C.TeacherError, match="made with another engine"):
                T.run_teacher(ds, tmp_path / "one", st, engine=open_engine(st))
