"""Small helpers every module may use: the one-line error for bad input, atomic writes, the
device choice, and command-line flags generated from a settings dataclass (so that a default
is written once, beside its help text)."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import MISSING, field, fields
from pathlib import Path


class UserError(ValueError):
    """Bad input; the message names the file or the option and the problem, on one line."""


# ============================================================================ files
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
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {path}: cannot write there ({parent} is not a writable folder)")


def pick_device(name: str):
    """'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1' ...; refused when absent."""
    import torch
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


def positive(v):
    return None if v > 0 and math.isfinite(v) else "must be a finite number > 0"


def non_negative(v):
    return None if v >= 0 and math.isfinite(v) else "must be a finite number >= 0"


def fraction(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _typed(kind, check, flag):
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
        parser.add_argument(flag, dest=f.name, type=_typed(kind, meta["check"], flag), default=default,
                            help=meta["help"] + shown, **extra)


def from_args(cls, args, **over):
    """An instance of the dataclass cls from the parsed flags it generated, then overrides."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    for name, value in given.items():
        if isinstance(value, list) and isinstance(getattr(cls, name, None), tuple):
            given[name] = tuple(value)
    return cls(**{**given, **over})


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line."""

    def error(self, message):
        sys.exit(f"{self.prog}: error: {message}")
