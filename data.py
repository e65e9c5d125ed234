"""Datasets for DLLM2Rec (the BIGRec / DROS protocol): readers, BIGRec windowing, the time split.

Every reader returns a `Dataset`: item ids 0..n_items-1 (deterministic: raw ids sorted),
the padding id is n_items, every item has a title, and the rows are split 80/10/10 by the
target's timestamp. A row is (history of <= 10 items, right-padded; its length; target).
"""
from __future__ import annotations

import argparse
import ast
import csv
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import UserError, cache_home

MAX_HISTORY = 10
ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML100K_MD5 = "0e33842e24a9c977be4e0107933c0723"  # as published by GroupLens


class DataError(UserError):
    """Bad input data; the message names the file and the problem."""


@dataclass
class Split:
    hist: np.ndarray    # [N, L] int64, right-padded with the pad id (= n_items)
    lens: np.ndarray    # [N] int64, number of real items in hist (0..L)
    target: np.ndarray  # [N] int64
    user: np.ndarray | None = None   # [N] int64, the row's user (0.. in sorted raw-id order); None: not known

    def __len__(self) -> int:
        return len(self.target)


@dataclass
class Dataset:
    name: str
    n_items: int
    titles: list[str] | None  # titles[i] = title of item i
    train: Split
    val: Split
    test: Split
    domain: str = "items"     # "movies", "games", ... : words used in the teacher's prompt

    @property
    def pad(self) -> int:
        return self.n_items

    @property
    def fingerprint(self) -> str:
        """sha256 of n_items and the split rows (not their users): stored with everything derived from them."""
        h = hashlib.sha256(f"dllm2rec-rows/1 n_items={self.n_items}".encode())
        for split in (self.train, self.val, self.test):
            for a in (split.hist, split.lens, split.target):
                h.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
                h.update(b"|")
        return h.hexdigest()[:16]

    def summary(self) -> str:
        return (f"{self.name}: {self.n_items} items, rows train/val/test = "
                f"{len(self.train)}/{len(self.val)}/{len(self.test)}, fingerprint {self.fingerprint}")


# ----------------------------------------------------------------------------- windowing
def window_rows(user_items: list[list[int]], user_times: list[list[int]], n_items: int,
                max_history: int = MAX_HISTORY, min_history: int | None = None):
    """BIGRec windowing. Per user (items already in time order): for i in
    range(min(max_history, n-1), n): history items[max(i-L, 0):i], target items[i].
    min_history=L (MovieLens in BIGRec) drops users with <= L items instead.
    Returns hist [R, L], lens [R], target [R], target time [R], user [R] (the index into
    user_items), in user order."""
    hist, lens, target, times, users = [], [], [], [], []
    for u, (items, ts) in enumerate(zip(user_items, user_times)):
        n = len(items)
        start = min(max_history, n - 1) if min_history is None else min_history
        for i in range(max(start, 1), n):
            h = items[max(i - max_history, 0):i]
            hist.append(h + [n_items] * (max_history - len(h)))
            lens.append(len(h))
            target.append(items[i])
            times.append(ts[i])
            users.append(u)
    return (np.asarray(hist, np.int64).reshape(-1, max_history), np.asarray(lens, np.int64),
            np.asarray(target, np.int64), np.asarray(times, np.int64), np.asarray(users, np.int64))


def split_by_time(hist, lens, target, times, users=None) -> tuple[Split, Split, Split]:
    """Sort rows by the target's timestamp (stable: ties keep user order), split 80/10/10."""
    order = np.argsort(times, kind="stable")
    n = len(order)
    cuts = [0, int(n * 0.8), int(n * 0.9), n]
    return tuple(Split(hist[order[a:b]], lens[order[a:b]], target[order[a:b]],
                       None if users is None else users[order[a:b]]) for a, b in zip(cuts[:-1], cuts[1:]))


def from_interactions(name: str, users, items, times, raw_titles: dict, domain: str,
                      min_history: int | None = None, source: str = "") -> Dataset:
    """Interactions (user, raw item, time) + {raw item: title} -> windowed, split Dataset.
    Items without a usable title (length <= 1, as BIGRec) are dropped. Item ids are the
    raw ids in sorted order; users are taken in sorted order; each user's items by time,
    ties in file order."""
    keep = [t is not None and len(t.strip()) > 1 for t in (raw_titles.get(i) for i in items)]
    if not all(keep):        # said, not silent: a truncated titles file drops the ratings of the items it lost
        lost = sorted({i for i, k in zip(items, keep) if not k}, key=str)
        print(f"{source}: {len(keep) - sum(keep)} of {len(keep)} interactions dropped: {len(lost)} items without a "
              f"usable title (none, or <= 1 character, as BIGRec drops), e.g. {', '.join(map(str, lost[:3]))}",
              file=sys.stderr)
    users = [u for u, k in zip(users, keep) if k]
    items = [i for i, k in zip(items, keep) if k]
    times = [t for t, k in zip(times, keep) if k]
    if not items:
        raise DataError(f"{source}: no interaction has an item with a title")
    raw_ids = sorted(set(items))
    item_id = {r: i for i, r in enumerate(raw_ids)}
    by_user: dict = {}
    for pos, (u, i, t) in enumerate(zip(users, items, times)):
        by_user.setdefault(u, []).append((t, pos, item_id[i]))
    seqs, seq_times = [], []
    for u in sorted(by_user):
        events = sorted(by_user[u])
        seqs.append([e[2] for e in events])
        seq_times.append([e[0] for e in events])
    rows = window_rows(seqs, seq_times, len(raw_ids), min_history=min_history)
    train, val, test = split_by_time(*rows)
    titles = [raw_titles[r].strip() for r in raw_ids]
    return Dataset(name, len(raw_ids), titles, train, val, test, domain)


# ----------------------------------------------------------------------------- MovieLens
# the two GroupLens layouts: ratings file, its separator, titles file, its separator, and the
# fields of a titles line (ml-100k's u.item has genre flags after the title, movies.dat one field)
MOVIELENS = {"ml-100k": ("u.data", "\t", "u.item", "|", None), "ml-1m/10m": ("ratings.dat", "::", "movies.dat", "::", 3)}


def read_movielens(folder: str | os.PathLike, name: str | None = None) -> Dataset:
    """GroupLens MovieLens: ml-100k (u.data: user, item, rating, time tab-separated; u.item:
    id|title|..., latin-1) or ml-1m / ml-10m (ratings.dat user::item::rating::time; movies.dat
    id::title::genres, latin-1 or UTF-8)."""
    folder = Path(folder)
    layout = "ml-100k" if name == "ml-100k" or (folder / "u.data").exists() else "ml-1m/10m"   # asked for: its files
    ratings, sep, movies, title_sep, title_fields = MOVIELENS[layout]
    users, items, times = [], [], []
    for ln, line in enumerate(_lines(folder / ratings), 1):
        where = f"{folder / ratings} line {ln}"
        parts = line.split(sep)
        if len(parts) != 4:
            raise DataError(f"{where}: expected 4 fields user{sep}item{sep}rating{sep}time".replace("\t", "<TAB>"))
        users.append(_int(parts[0], where)); items.append(_int(parts[1], where)); times.append(_int(parts[3], where))
    titles = {}
    for ln, line in enumerate(_text_lines(folder / movies), 1):  # latin-1 as GroupLens published it, or UTF-8
        where = f"{folder / movies} line {ln}"
        parts = line.split(title_sep)
        if len(parts) < 2 or (title_fields and len(parts) != title_fields):
            raise DataError(f"{where}: expected id{title_sep}title{title_sep}" + ("genres" if title_fields else "..."))
        titles[_int(parts[0], where)] = parts[1]
    return from_interactions(name or folder.name, users, items, times, titles, "movies",
                             min_history=MAX_HISTORY, source=str(folder))


# ----------------------------------------------------------------------------- Amazon
def _json_records(path: Path):
    """Amazon files: 2018 JSON lines, or 2014 'loose JSON' (Python dict literals); .gz ok."""
    for ln, line in enumerate(_lines(path), 1):
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            try:
                yield ast.literal_eval(line)
            except (ValueError, SyntaxError):
                raise DataError(f"{path} line {ln}: neither JSON nor a Python dict literal") from None


def read_amazon(reviews: str | os.PathLike, meta: str | os.PathLike, name: str | None = None,
                domain: str = "games") -> Dataset:
    """Amazon review 5-core file (reviewerID, asin, unixReviewTime) + metadata (asin, title)."""
    reviews, meta = Path(reviews), Path(meta)
    users, items, times = [], [], []
    for ln, rec in enumerate(_json_records(reviews), 1):
        where = f"{reviews} record {ln}"
        if not isinstance(rec, dict) or not {"reviewerID", "asin", "unixReviewTime"} <= set(rec):
            raise DataError(f"{where}: needs reviewerID, asin, unixReviewTime")
        if not all(isinstance(rec[k], str) for k in ("reviewerID", "asin")):
            raise DataError(f"{where}: reviewerID and asin must be strings")
        users.append(rec["reviewerID"]); items.append(rec["asin"])
        times.append(_int(rec["unixReviewTime"], where, "unixReviewTime"))
    wanted = set(items)
    titles = {rec["asin"]: rec["title"] for rec in _json_records(meta)
              if isinstance(rec, dict) and rec.get("asin") in wanted and isinstance(rec.get("title"), str)}
    stem = re.sub(r"(\.json)?(\.gz)?$", "", reviews.name)
    return from_interactions(name or stem, users, items, times, titles, domain, source=str(reviews))


# ----------------------------------------------------------------------------- official rows
def read_titles(path: Path) -> dict[int, str]:
    """BIGRec's 'title<TAB>id' or LLaRA's 'id::name', one item per line."""
    titles = {}
    for ln, line in enumerate(_lines(path), 1):
        if "\t" in line:
            title, _, idx = line.rpartition("\t")
        elif "::" in line:
            idx, _, title = line.partition("::")
        else:
            raise DataError(f"{path} line {ln}: expected 'title<TAB>id' or 'id::title'")
        i = _int(idx, f"{path} line {ln}")
        if i in titles:
            raise DataError(f"{path} line {ln}: item id {i} appears twice (first title {titles[i]!r})")
        if not title.strip():
            raise DataError(f"{path} line {ln}: item {i} has an empty title; every item needs one")
        titles[i] = title
    return titles


def _int(value, where: str, what: str = "value") -> int:
    """An integer written as an integer (3, '3', 3.0 from a pickle), else a DataError: 3.7 is not an id."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {what} {str(value)[:40]!r} is not an integer") from None
    if not f.is_integer():
        raise DataError(f"{where}: {what} {value!r} is not an integer")
    if abs(f) >= 2**62:                  # ids and timestamps live in int64; 1e23 would overflow it
        raise DataError(f"{where}: {what} {value!r} is out of range")
    return int(f)


def _parse_seq(value, where: str) -> list[int]:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise DataError(f"{where}: seq {value[:40]!r} is not a list literal") from None
    if not isinstance(value, (list, tuple)) and not hasattr(value, "tolist"):
        raise DataError(f"{where}: seq is not a list of item ids")
    return [_int(v, where, "seq item id") for v in list(value)]


def in_label_order(path: Path, labels: list, records: list) -> list:
    """A pickled frame's rows in the order of their index labels: the official code looks the
    teacher's row up by a training row's label (train_data.sample(...).index), ours by position,
    so the two agree when label = position. Labels that are not 0..n-1 are refused."""
    if labels == list(range(len(records))):
        return records
    if sorted(labels) != list(range(len(records))):
        raise DataError(f"{path}: the frame's index is not 0..{len(records) - 1}; the official code maps "
                        "teacher rows to training rows by it (reset the index, or export the CSV)")
    return [rec for _, rec in sorted(zip(labels, records), key=lambda lr: lr[0])]


def read_rows_file(path: Path, n_items: int, allow_pickle: bool = False) -> Split:
    """One official split file (columns seq, len_seq, next). CSV, or a pandas pickle (.df)
    only when allow_pickle (unpickling runs arbitrary code)."""
    if path.suffix == ".df":
        if not allow_pickle:
            raise DataError(f"{path}: a pickled DataFrame; reading it runs code. Use the CSV, "
                            "or pass --allow-pickle if you trust the file")
        try:
            import pandas  # only needed to unpickle; not a dependency otherwise
        except ImportError:
            raise DataError(f"{path}: reading a pickled DataFrame needs pandas (pip install pandas); "
                            "or use the CSV") from None
        frame = pandas.read_pickle(path)
        records = in_label_order(path, list(frame.index), frame[["seq", "len_seq", "next"]].to_dict("records"))
    else:
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:      # -sig: a byte-order mark is not a column
                reader = csv.DictReader(f)
                if not {"seq", "len_seq", "next"} <= set(reader.fieldnames or ()):
                    raise DataError(f"{path}: expected columns seq, len_seq, next; found {reader.fieldnames}")
                records = list(reader)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        except csv.Error as e:                                             # e.g. a field over csv's size limit
            raise DataError(f"{path} line {reader.line_num}: not CSV rows ({e})") from None
    if not records:
        raise DataError(f"{path}: no rows")
    hist, lens, target = [], [], []
    for r, rec in enumerate(records):
        where = f"{path} row {r + 1}"
        seq = _parse_seq(rec["seq"], where)
        if len(seq) != MAX_HISTORY:
            raise DataError(f"{where}: seq has {len(seq)} ids, expected {MAX_HISTORY}")
        nxt = _int(rec["next"], where, "next")
        if not all(0 <= v <= n_items for v in seq) or not 0 <= nxt < n_items:
            raise DataError(f"{where}: item id outside 0..{n_items} (pad = {n_items})")
        real = sum(v != n_items for v in seq)
        if any(v == n_items for v in seq[:real]):
            raise DataError(f"{where}: padding inside the history; expected right padding")
        len_seq = _int(rec["len_seq"], where, "len_seq")
        if len_seq != real and not (real == 0 and len_seq == 1):   # LLaRA's empty histories say 1
            shifted = len_seq < real and all(v == n_items - 1 for v in seq[max(len_seq, 1):])
            hint = (f" (padded with {n_items - 1}? then the titles file has one title more than the rows' "
                    f"catalogue: the pad id is the number of titles)") if shifted else ""
            raise DataError(f"{where}: len_seq {len_seq}, but seq holds {real} item ids before the padding{hint}")
        hist.append(seq); lens.append(real); target.append(nxt)
    return Split(np.asarray(hist, np.int64).reshape(-1, MAX_HISTORY),
                 np.asarray(lens, np.int64), np.asarray(target, np.int64))


def read_official(folder: str | os.PathLike, name: str | None = None, allow_pickle: bool = False,
                  domain: str = "items") -> Dataset:
    """The DROS/DLLM2Rec row format: {train,val,test}_data.csv (or .df behind allow_pickle)
    plus a titles file (id2name.txt) whose ids 0..n_items-1 define the catalogue."""
    folder = Path(folder)
    titles_path = folder / "id2name.txt"
    if not titles_path.exists():
        raise DataError(f"{titles_path}: missing; every item needs a title (title<TAB>id or id::title)")
    titles = read_titles(titles_path)
    if not titles:
        raise DataError(f"{titles_path}: no titles; every item needs one (title<TAB>id or id::title)")
    n_items = len(titles)
    if sorted(titles) != list(range(n_items)):
        raise DataError(f"{titles_path}: ids must be exactly 0..{n_items - 1}")
    splits = []
    for split in ("train", "val", "test"):
        candidates = [folder / f"{split}_data.csv", folder / f"{split}_data.df",
                      folder / f"{split.capitalize()}_data.df"]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            raise DataError(f"{folder}: no {split}_data.csv (or .df) found")
        splits.append(read_rows_file(path, n_items, allow_pickle))
    return Dataset(name or folder.name, n_items, [titles[i] for i in range(n_items)], *splits, domain=domain)


# ----------------------------------------------------------------------------- by name / path
def download_ml100k(dest: Path | None = None) -> Path:
    """Download the GroupLens zip, verify its md5, unpack atomically; returns the folder."""
    dest = dest or cache_home() / "ml-100k"
    if (dest / "u.data").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        zpath = Path(tmp) / "ml-100k.zip"
        print(f"downloading {ML100K_URL} ...")
        urllib.request.urlretrieve(ML100K_URL, zpath)
        md5 = hashlib.md5(zpath.read_bytes()).hexdigest()
        if md5 != ML100K_MD5:
            raise DataError(f"{ML100K_URL}: md5 {md5}, expected {ML100K_MD5}; not using it")
        with zipfile.ZipFile(zpath) as z:
            z.extractall(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(Path(tmp) / "ml-100k", dest)
    return dest


def load_dataset(spec: str, data_dir: str | None = None, allow_pickle: bool = False) -> Dataset:
    """'ml-100k' (local copy from data_dir or $DLLM2REC_ML100K, else downloaded), or a folder:
    ml-100k files, ml-1m/10m .dat files, official rows + id2name.txt, or Amazon
    reviews + meta_*.json(.gz)."""
    if spec == "ml-100k":
        local = data_dir or os.environ.get("DLLM2REC_ML100K")
        return read_movielens(local if local else download_ml100k(), "ml-100k")
    folder = Path(spec)
    if not folder.is_dir():
        raise DataError(f"{spec}: neither 'ml-100k' nor a folder")
    if (folder / "u.data").exists() or (folder / "ratings.dat").exists():
        return read_movielens(folder)
    if (folder / "id2name.txt").exists():
        return read_official(folder, allow_pickle=allow_pickle)
    metas = sorted(folder.glob("meta_*.json*"))
    reviews = sorted(p for p in folder.glob("*.json*") if p not in metas)
    if len(metas) == 1 and len(reviews) == 1:
        return read_amazon(reviews[0], metas[0])
    raise DataError(f"{folder}: no known layout (u.data, ratings.dat, id2name.txt + *_data.csv, "
                    "or one reviews and one meta_*.json file)")


def _lines(path: Path, encoding: str = "utf-8-sig"):
    """Non-empty lines of a text file, plain or gzipped (UTF-8 with or without a byte-order
    mark by default); a missing, truncated or corrupt file is a DataError naming it."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding=encoding, newline="") as f:
            for line in f:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not {encoding.removesuffix('-sig')} text ({e})") from None
    except (EOFError, OSError, zlib.error) as e:      # BadGzipFile is an OSError; CRC and truncation too
        raise DataError(f"{path}: unreadable, truncated or corrupt ({type(e).__name__}: {e})") from None


def _text_lines(path: Path):
    """Lines of a file in UTF-8, or in latin-1 when it is not UTF-8 (GroupLens' older files):
    a UTF-8 copy of a latin-1 file is read right, not as mojibake."""
    try:
        return list(_lines(path))
    except DataError:
        return list(_lines(path, "latin-1"))


def sample_rows(ds: Dataset, train: int, evaluate: int, seed: int = 0) -> Dataset:
    """The paper's MovieLens-10M protocol: after BIGRec's windowing and time split, a fixed-seed
    uniform sample of `train` training rows and `evaluate` validation and test rows each, kept in
    time order (the paper: 100,000 training and 10,000 test sequences; BIGRec's notebook samples
    5,000 validation and test rows with pandas, random_state 42: the same idea, not the same rows).
    A split smaller than asked is kept whole. The fingerprint covers the rows, so it records this."""
    g = np.random.default_rng(seed)
    def pick(s: Split, n: int) -> Split:
        if n >= len(s):
            return s
        idx = np.sort(g.choice(len(s), n, replace=False))
        return Split(s.hist[idx], s.lens[idx], s.target[idx], None if s.user is None else s.user[idx])
    return Dataset(ds.name, ds.n_items, ds.titles, pick(ds.train, train), pick(ds.val, evaluate),
                   pick(ds.test, evaluate), ds.domain)


def sample_spec(text: str) -> tuple[int, int]:
    """--sample-rows TRAIN,EVAL -> (TRAIN, EVAL), both >= 1."""
    try:
        train, evaluate = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected TRAIN,EVAL, e.g. 100000,10000") from None
    if min(train, evaluate) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: both counts must be >= 1")
    return train, evaluate


def add_flags(p) -> None:
    """The data options of every command."""
    p.add_argument("--dataset", default="ml-100k", help="'ml-100k' or a dataset folder (see README)")
    p.add_argument("--data-dir", help="local copy of ml-100k (else $DLLM2REC_ML100K, else download)")
    p.add_argument("--allow-pickle", action="store_true", help="read pickled *_data.df files (runs code!)")
    p.add_argument("--sample-rows", type=sample_spec, metavar="TRAIN,EVAL",
                   help="after the time split, keep a fixed-seed sample of TRAIN training rows and EVAL validation "
                        "and test rows each (the paper's MovieLens-10M: 100000,10000; default: every row)")


def from_args(args) -> Dataset:
    ds = load_dataset(args.dataset, args.data_dir, args.allow_pickle)
    return sample_rows(ds, *args.sample_rows) if getattr(args, "sample_rows", None) else ds
