"""Small helpers every module may use: the one-line error for bad input, atomic writes, the
folder for downloads and caches, the device choice, and command-line flags generated from a
settings dataclass (so that a default is written once, beside its help text)."""
from __future__ import annotations

import argparse
import csv
import errno
import hashlib
import json
import math
import os
import pickle
import platform
import re
import sys
import tempfile
import traceback
import time
import zipfile
from dataclasses import MISSING, field, fields
from pathlib import Path

import torch


class UserError(ValueError):
    """Bad input; the message names the file or the option and the problem, on one line."""


# ============================================================================ files
def write_error(path, e: OSError) -> UserError:
    """A failed write as one line naming the file; a full disk is said as such (numpy's tofile
    reports one only as "N requested and M written", without an errno)."""
    full = e.errno == errno.ENOSPC or " requested and " in str(e)
    why = "no space left on the device" if full else (e.strerror or str(e).splitlines()[0] if str(e) else type(e).__name__)
    return UserError(f"{path}: could not be written ({why}); nothing was written there")


def atomic_write(path: Path, write) -> None:
    """write(f) into a temporary file beside path, then rename it over path; a failed write
    leaves neither a partial file nor the temporary one, and is named (write_error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, e) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


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


def cache_home() -> Path:
    """Where downloads (data.py) and teacher caches (teacher.py) go: $DLLM2REC_CACHE, else
    ~/.cache/dllm2rec."""
    return Path(os.environ.get("DLLM2REC_CACHE", Path.home() / ".cache" / "dllm2rec"))


def cpu_name() -> str:
    """The CPU this runs on (model name from /proc/cpuinfo where there is one): results and
    teacher caches record it, since torch's and llama.cpp's CPU kernels round per instruction set."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def check_writable(path: str | None, flag: str) -> None:
    """Refuse an output path that cannot be written, before any work starts."""
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {path}: is a folder, expected a file name")
    parent = next(q for q in (p.resolve().parent, *p.resolve().parents) if q.exists())
    try:                              # a trial file, removed at once: os.access says yes to root everywhere
        if not parent.is_dir():
            raise NotADirectoryError
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError:
        raise UserError(f"{flag} {path}: cannot write there ({parent} is not a writable folder)") from None


def pick_device(name: str):
    """'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1' ...; refused when absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1 ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this torch sees no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


# ============================================================================ flags from dataclasses
def opt(default, help: str, check=None, flag: str | None = None, **kw):
    """A settings field: its default, its help text, and an optional check (value -> error
    message or None) applied when the flag is parsed. kw: argparse's choices, type, metavar."""
    meta = {"help": help, "check": check, "flag": flag, **kw}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def at_least(n):
    return lambda v: None if v >= n else f"must be >= {n}"


def between(lo, hi):
    """A bound on both sides: sizes that would otherwise reach the allocator or overflow."""
    return lambda v: None if lo <= v <= hi else f"must be in {lo}..{hi}"


def positive(v):
    return None if v > 0 and math.isfinite(v) else "must be a finite number > 0"


def non_negative(v):
    return None if v >= 0 and math.isfinite(v) else "must be a finite number >= 0"


def fraction(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"


def checked(kind, check=None):
    """An argparse type: kind(text), then check(value) -> error message or None."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        problem = check(value) if check else None
        if kind is float and problem is None and not math.isfinite(value):
            problem = "must be finite"
        if problem:
            raise argparse.ArgumentTypeError(f"{text}: {problem}")
        return value
    parse.__name__ = kind.__name__
    return parse


def choice_list(choices):
    """An argparse type: a comma-separated list of names from choices."""
    def parse(text):
        chosen = [s for s in text.split(",") if s]
        bad = [s for s in chosen if s not in choices]
        if bad or not chosen:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(choices)}")
        return chosen
    return parse


def add_flags(parser, cls, only=None) -> None:
    """One flag per field of the dataclass cls that has help text (only: these names)."""
    for f in fields(cls):
        meta = f.metadata
        if "help" not in meta or (only is not None and f.name not in only):
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        flag = "--" + (meta["flag"] or f.name.replace("_", "-"))
        extra = {k: meta[k] for k in ("choices", "metavar", "required") if meta.get(k) is not None}
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action="store_true", help=meta["help"])
            continue
        kind = meta.get("type") or (type(default[0]) if isinstance(default, (tuple, list))
                                    else type(default) if default is not None else str)
        if isinstance(default, (tuple, list)):
            extra["nargs"] = len(default)
        shown = "" if default is None else f" (default {' '.join(map(str, default)) if extra.get('nargs') else default})"
        parser.add_argument(flag, dest=f.name, type=checked(kind, meta["check"]), default=default,
                            help=meta["help"] + shown, **extra)


def preset(parser, **defaults) -> None:
    """parser.set_defaults(**defaults), and each flag's help says its new default (a command's preset
    overrides the dataclass default that add_flags wrote there)."""
    parser.set_defaults(**defaults)
    for action in parser._actions:
        if action.dest in defaults and action.help and defaults[action.dest] is not None:
            value = defaults[action.dest]
            shown = ",".join(map(str, value)) if isinstance(value, list) else value
            action.help = re.sub(r" \(default[: ][^)]*\)$", "", action.help) + f" (default {shown})"


def from_args(cls, args, **over):
    """An instance of the dataclass cls from the parsed flags it generated (fields without a
    flag keep their defaults: another stage's --seed is not this one's), then overrides."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if "help" in f.metadata and hasattr(args, f.name)}
    for name, value in given.items():
        if isinstance(value, list) and isinstance(getattr(cls, name, None), tuple):
            given[name] = tuple(value)
    return cls(**{**given, **over})


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line, and any text that starts with a minus and a
    digit read as a value ("--lr -1e-3", "--shard -1/2" reach their checks, not "expected one
    argument"): no flag here starts with a digit."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message):
        sys.exit(f"{self.prog}: error: {message}")


def at_the_boundary(run, verbose: bool):
    """run(); a bad input (UserError) or an error of the OS, numpy or torch ends the command
    with one line naming the file and the problem (verbose: with the traceback)."""
    try:
        return run()
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted (a teacher run resumes from its last finished chunk, fine-tuning from its last epoch, "
                 "reproduce --full's students after their last whole run, when run again)")
    except (OSError, ValueError, RuntimeError, KeyError, IndexError, ArithmeticError, EOFError, zipfile.BadZipFile,
            csv.Error, pickle.UnpicklingError) as e:
        if verbose:
            traceback.print_exc()
        where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
        first = str(e).splitlines()[0] if str(e) else ""
        sys.exit(f"error: {where}{type(e).__name__}: {first}" + ("" if verbose else " (-v shows the traceback)"))
