"""The teacher's outputs and their files: the teacher cache, the official DLLM2Rec files, their
checks, and the teacher's own metrics.

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
Official DLLM2Rec files: all_embeddings.pt, myrank_train.txt, confidence_train.txt, and
fingerprint.json beside them when this code wrote them (the dataset fingerprint and each
file's sha256: a copy with rows reordered is refused).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import UserError, atomic_write, file_sha256, write_error
from metrics import CUTOFFS, metrics_from_ranks

FORMAT = "dllm2rec-teacher-cache/1"
SPLITS = ("train", "val", "test")


class TeacherError(UserError):
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


def checksum(t: TeacherOutputs) -> str:
    """A short fingerprint of the teacher's outputs (item embeddings, every split's rows, ids,
    distances and texts): two runs that print the same checksum computed the same cache."""
    h = hashlib.sha256(np.ascontiguousarray(t.item_emb, dtype=np.float32).tobytes())
    for name in sorted(t.splits):
        s = t.splits[name]
        h.update(name.encode())
        for a in (s.rows.astype(np.int64), s.ids.astype(np.int64), s.dist.astype(np.float32)):
            h.update(np.ascontiguousarray(a).tobytes())
        if s.text is not None:
            h.update("\x00".join(map(str, s.text)).encode())
    return h.hexdigest()[:12]


def write_cache(folder, dataset, item_emb: np.ndarray, splits: dict[str, TopN], teacher: dict) -> None:
    folder = Path(folder)
    atomic_write(folder / "item_embeddings.npy", lambda f: np.save(f, item_emb.astype(np.float32)))
    for name, t in splits.items():
        arrays = {"rows": t.rows.astype(np.int64), "ids": t.ids.astype(np.int64), "dist": t.dist.astype(np.float32)}
        if t.text is not None:
            arrays["text"] = np.asarray(t.text, dtype=str)
        atomic_write(folder / f"{name}.npz", lambda f: np.savez(f, **arrays))
    names = ["item_embeddings.npy", *(f"{name}.npz" for name in splits)]
    manifest = {
        "format": FORMAT, "dataset": dataset.name, "fingerprint": dataset.fingerprint,
        "files": {name: file_sha256(folder / name) for name in names},     # checked by read_cache
        "teacher": teacher, "n_items": int(item_emb.shape[0]), "d_llm": int(item_emb.shape[1]),
        "top_n": int(next(iter(splits.values())).ids.shape[1]) if splits else 0,
        "splits": {name: {"rows": len(getattr(dataset, name)), "covered": len(t.rows)} for name, t in splits.items()},
    }
    atomic_write(folder / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))


# ----------------------------------------------------------------------------- reading
def read_json(path: Path) -> dict:
    """A JSON object of the teacher's (manifest, identity, adapter record, fingerprint.json); a
    corrupt one, or one that holds another kind of value, is named."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TeacherError(f"{path}: unreadable or not valid JSON ({e}); delete or restore it") from None
    if not isinstance(obj, dict):
        raise TeacherError(f"{path}: holds a JSON {type(obj).__name__}, not the object this code writes; delete or "
                           "restore it")
    return obj


def read_cache(folder, dataset) -> TeacherOutputs:
    folder = Path(folder)
    mpath = folder / "manifest.json"
    manifest = read_json(mpath)
    if manifest.get("format") != FORMAT:
        raise TeacherError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("fingerprint") != dataset.fingerprint:
        raise TeacherError(f"{mpath}: made for dataset {manifest.get('dataset')!r} with fingerprint "
                           f"{manifest.get('fingerprint')}, but the data loaded now ({dataset.name}) has "
                           f"fingerprint {dataset.fingerprint}: the rows differ, so its ranks would be misaligned")
    if "files" not in manifest:
        raise TeacherError(f"{mpath}: no sha256 of its files (an older cache); delete manifest.json and run the "
                           "teacher again to assemble it from work/")
    for name, sha in manifest["files"].items():
        if not (folder / name).exists():
            raise TeacherError(f"{folder / name}: missing (the manifest lists it)")
        if file_sha256(folder / name) != sha:
            raise TeacherError(f"{folder / name}: its sha256 differs from the manifest's: the file changed after "
                               "it was written (delete the cache, or its manifest.json to assemble it again)")
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


# the official files under today's names (the official code reads them) and the official README's
# earlier ones, in that order
OFFICIAL_NAMES = {"embeddings": ("all_embeddings.pt", "item_embedding.pt"),
                  "ranks": ("myrank_train.txt", "ranking_list.txt"),
                  "confidence": ("confidence_train.txt", "ranking_confidence.txt")}


def official_file(folder: Path, role: str) -> Path:
    """The file of one role (OFFICIAL_NAMES) in folder, under either name; both names is refused."""
    there = [folder / n for n in OFFICIAL_NAMES[role] if (folder / n).exists()]
    if len(there) > 1:
        raise TeacherError(f"{folder}: both {there[0].name} and {there[1].name}; which one is the teacher's "
                           "cannot be told: remove one")
    return there[0] if there else folder / OFFICIAL_NAMES[role][0]


def read_official(folder, dataset) -> TeacherOutputs:
    """The official DLLM2Rec files: all_embeddings.pt, myrank_train.txt, confidence_train.txt, or
    their earlier names item_embedding.pt, ranking_list.txt, ranking_confidence.txt (row r =
    training row r). fingerprint.json, written beside them by export_official, proves that the
    rows are this dataset's; without it only counts and ranges can be checked."""
    import torch
    folder = Path(folder)
    fpath = folder / "fingerprint.json"
    if fpath.exists():
        made = read_json(fpath)
        if not isinstance(made.get("sha256", {}), dict):
            raise TeacherError(f"{fpath}: its sha256 is not an object {{file: digest}}; delete or restore it")
        if made.get("fingerprint") != dataset.fingerprint:
            raise TeacherError(f"{fpath}: written for rows with fingerprint {made.get('fingerprint')}, the data "
                               f"loaded now ({dataset.name}) has {dataset.fingerprint}: the ranks would be misaligned")
        for name, digest in made.get("sha256", {}).items():
            if ((folder / name).exists() and file_sha256(folder / name)) != digest:
                raise TeacherError(f"{folder / name}: changed since it was written beside {fpath.name} "
                                   "(rows reordered or edited?); row r must be training row r")
    else:
        print(f"warning: {folder}: no fingerprint.json; cannot check that row r of the official files is "
              f"training row r of {dataset.name} (only counts and ranges are checked)")
    epath, rpath, cpath = (official_file(folder, role) for role in OFFICIAL_NAMES)
    emb = _load(epath, lambda: torch.load(epath, map_location="cpu", weights_only=True))
    if not isinstance(emb, torch.Tensor):
        raise TeacherError(f"{epath}: expected one tensor [n_items, d_llm], found {type(emb).__name__}")
    ids = _read_matrix(rpath, np.int64)
    dist = _read_matrix(cpath, np.float32)
    if ids.shape != dist.shape:
        raise TeacherError(f"{folder}: {rpath.name} is {ids.shape[0]}x{ids.shape[1]} but "
                           f"{cpath.name} is {dist.shape[0]}x{dist.shape[1]}")
    out = TeacherOutputs(emb.float().numpy(), {"train": TopN(np.arange(len(ids)), ids, dist)},
                         {"teacher": {"source": "official files"}}, str(folder))
    if len(ids) != len(dataset.train):
        raise TeacherError(f"{rpath}: {len(ids)} rows, but the training split has "
                           f"{len(dataset.train)}: row r must be training row r")
    check_teacher(out, dataset)
    return out


def export_official(teacher: TeacherOutputs, folder, dataset) -> None:
    """Write the official files, for the official code, and fingerprint.json beside them;
    needs a teacher covering all training rows."""
    import torch
    t = teacher.splits["train"]
    if len(t.rows) != len(dataset.train) or not np.array_equal(t.rows, np.arange(len(dataset.train))):
        raise TeacherError(f"{teacher.source}: covers {len(t.rows)} of {len(dataset.train)} training rows; "
                           "the official files need every row, in order")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    files = ("all_embeddings.pt", "myrank_train.txt", "confidence_train.txt")
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial-"))
    try:            # every file written beside the folder first: a full disk leaves no partial export
        torch.save(torch.from_numpy(teacher.item_emb), tmp / files[0])
        np.savetxt(tmp / files[1], t.ids, fmt="%d")
        np.savetxt(tmp / files[2], t.dist, fmt="%.9g")        # 9 digits: float32 exactly
        (tmp / "fingerprint.json").write_text(json.dumps(
            {"dataset": dataset.name, "fingerprint": dataset.fingerprint, "rows": len(dataset.train),
             "sha256": {name: file_sha256(tmp / name) for name in files}}, indent=1))
        folder.mkdir(exist_ok=True)
        for name in (*files, "fingerprint.json"):
            os.replace(tmp / name, folder / name)
    except OSError as e:
        raise write_error(folder, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_teacher(path, dataset) -> TeacherOutputs:
    """A teacher cache folder (manifest.json) or a folder of official files."""
    path = Path(path)
    if (path / "manifest.json").exists():
        return read_cache(path, dataset)
    if any((path / n).exists() for n in OFFICIAL_NAMES["embeddings"]):
        return read_official(path, dataset)
    raise TeacherError(f"{path}: neither a teacher cache (manifest.json) nor official files "
                       "(all_embeddings.pt or item_embedding.pt)")


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
        if s.dist.size and s.dist.min() < 0:
            raise TeacherError(f"{where}: negative distances (found {s.dist.min():.4g}); an L2 distance is >= 0")
        if s.text is not None and len(s.text) != len(s.rows):
            raise TeacherError(f"{where}: {len(s.text)} texts for {len(s.rows)} rows")
        declared = t.manifest.get("splits", {}).get(name)
        if declared and (declared.get("rows") != n_rows or declared.get("covered") != len(s.rows)):
            raise TeacherError(f"{where}: manifest says {declared}, files hold {len(s.rows)} of {n_rows} rows")


def per_training_row(t: TeacherOutputs, n_rows: int, K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The teacher's top-K per training row: ids [n_rows, K], distances [n_rows, K] float32,
    covered [n_rows] bool; a row the teacher did not run on gets zeros and covered False."""
    s = t.splits["train"]
    if s.ids.shape[1] < K:
        raise TeacherError(f"{t.source}: the teacher kept top-{s.ids.shape[1]}, distillation needs K={K}")
    ids, dist = np.zeros((n_rows, K), dtype=np.int64), np.zeros((n_rows, K), dtype=np.float32)
    covered = np.zeros(n_rows, dtype=bool)
    ids[s.rows], dist[s.rows], covered[s.rows] = s.ids[:, :K], s.dist[:, :K], True
    return ids, dist, covered


def target_rank_and_nearest(t: TeacherOutputs, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per training row: the 1-based rank of its true next item in the teacher's whole top-n list
    (0: not in it), the distance of the teacher's nearest item, covered; [n_rows] each (the row
    gates' inputs)."""
    s, n_rows = t.splits["train"], len(targets)
    rank, nearest, covered = np.zeros(n_rows, np.int64), np.zeros(n_rows, np.float32), np.zeros(n_rows, bool)
    hit = s.ids == targets[s.rows][:, None]                                          # [rows, top_n]
    rank[s.rows] = np.where(hit.any(1), hit.argmax(1) + 1, 0)
    nearest[s.rows], covered[s.rows] = s.dist[:, 0], True
    return rank, nearest, covered


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


# ============================================================================ the teacher's own metrics
def answer_title(text: str) -> str:
    """The title inside the first pair of quotes of a generated answer, else the stripped text."""
    parts = text.split('"')
    return parts[1].strip() if len(parts) >= 3 else text.strip().strip('"').strip()


def title_match_share(texts, titles: list[str]) -> float:
    """The share of generated answers whose quoted title is exactly a catalogue title."""
    catalogue = set(titles)
    return float(np.mean([answer_title(str(t)) in catalogue for t in texts])) if len(texts) else 0.0


def teacher_metrics(t: TopN, targets: np.ndarray) -> dict:
    """The teacher's own HR@k / NDCG@k on the rows it covered (rank = position in its top-n;
    a cutoff beyond its top-n is left out: what lies past the list is not known)."""
    hit = t.ids == targets[t.rows][:, None]                                   # [m, n]
    rank = np.where(hit.any(1), hit.argmax(1), t.ids.shape[1])
    return {"rows": int(len(t.rows)), **metrics_from_ranks(rank, [k for k in CUTOFFS if k <= t.ids.shape[1]])}
