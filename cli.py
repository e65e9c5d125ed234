"""The command line of `python dllm2rec.py <command>`: each module adds its own commands; the
options are checked when parsed, --out and --device before any work starts, and a bad input
ends the command in one line naming the file or the option (-v: with the traceback).

Nothing here imports dllm2rec.py: it passes its commands and its Config in.
"""
from __future__ import annotations

import sys
from dataclasses import fields

import data
import students
from common import (Parser, UserError, add_flags, at_least, at_the_boundary, check_writable, checked, choice_list,
                    pick_device)


def student_flags(p, Config) -> None:
    """The options of every command that trains students: the run's, Config's, and Config's
    official_* switches in a group of their own with --official, all four at once."""
    p.add_argument("--students", type=choice_list(students.STUDENTS), default=list(students.STUDENTS),
                   help=f"comma-separated, from {','.join(students.STUDENTS)}")
    p.add_argument("--seeds", type=checked(int, at_least(1)), default=1,
                   help="number of seeds, from --seed (mean and std reported)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--out", help="results JSON (default results/<dataset>-<time>.json)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every epoch; tracebacks of errors")
    official = [f.name for f in fields(Config) if f.name.startswith("official_")]
    add_flags(p.add_argument_group("student training"), Config,
              only=[f.name for f in fields(Config) if f.name not in official])
    o = p.add_argument_group("the official code's numerics and protocol (README: differences)")
    o.add_argument("--official", action="store_true", help="all four switches below")
    add_flags(o, Config, only=official)


def parse_args(argv, registrars, check, description: str, default: str = "reproduce"):
    """registrars: functions (subparsers, parent) -> {command: function(args, ds)}, where parent
    carries the data flags; with no command, `default` runs with the options given.
    check(args) raises UserError where a student command's options conflict."""
    p = Parser(prog="dllm2rec.py", description=description, epilog=f"With no command: {default}.")
    sub = p.add_subparsers(dest="command")
    parent = Parser(add_help=False)
    data.add_flags(parent)
    commands = {}
    for add in registrars:
        commands.update(add(sub, parent))
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = [default, *argv]
    args = p.parse_args(argv)
    if hasattr(args, "gammas"):                 # Config's checks across fields, before any work
        try:
            check(args)
        except UserError as e:
            p.error(str(e))
    args.run = commands[args.command]
    return args


def main(args):
    """Check --out and --device, read the data, run the command; a bad input ends in one line."""
    def run():
        if args.command != "export-official":            # there --out is a folder
            check_writable(getattr(args, "out", None), "--out")
        if getattr(args, "device", None) is not None:
            pick_device(args.device)
        return args.run(args, data.from_args(args) if hasattr(args, "dataset") else None)
    return at_the_boundary(run, getattr(args, "verbose", False))
