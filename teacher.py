"""The teacher's outputs (SPEC section 2): the project's teacher cache and the official files.

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

import json
import os
import tempfile
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
    atomic_write(folder / "confidence_train.txt", lambda f: np.savetxt(f, t.dist, fmt="%.7g"))


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
