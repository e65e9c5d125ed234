"""The research diagnostics' command line, `python -m research COMMAND` (the library's flags,
parsing and one-line errors are cli.py's)."""
from __future__ import annotations

import cli
import model_teacher
import students
from common import at_least, between, checked, choice_list, preset
from dllm2rec import Config
from research import ablation, bench, compare, false_positives, gates, knowledge, mechanism, retrieval, table5, teachers


def confidence_flag(p) -> None:
    p.add_argument("--confidence", choices=teachers.CONFIDENCE, default="honest",
                   help="the synthetic teachers' distances: honest (random candidates farther, ranked below the good "
                        "ones) or flat (one distance distribution for both, random ranks: only w_o can tell them apart)")


def add_commands(sub, parent) -> dict:
    """mechanism, ablation, compare-teachers, bench, retrieval-teacher, model-teacher, knowledge, table5,
    false-positives and gates on the subparsers sub; {name: function(args, ds)}."""
    mc = sub.add_parser("mechanism", parents=[parent],
                        help="diagnostic: distillation gain from synthetic teachers of known quality")
    cli.student_flags(mc)
    quality = checked(float, lambda q: None if 0 <= q <= 1 else "must be in [0, 1]")
    mixed_or_quality = lambda text: "mixed" if text == "mixed" else quality(text)
    mixed_or_quality.__name__ = "quality"
    mc.add_argument("--qualities", type=mixed_or_quality, nargs="+", default=[1.0, 0.3, 0.0, "mixed"],
                    help="the share of good candidates among each row's K, from 1 (the training rows' most frequent "
                         "next items) to 0 (random), and 'mixed': quality 1 on a random half of the rows, random "
                         "advice on the rest (an LLM right for some users, not others)")
    confidence_flag(mc)
    mc.add_argument("--variants", type=choice_list([v[0] for v in mechanism.VARIANTS]),
                    default=[v[0] for v in mechanism.VARIANTS],
                    help="comma-separated, from " + ",".join(f"{k} ({label})" for k, label, _ in mechanism.VARIANTS))
    mc.add_argument("--converged", action="store_true",
                    help=f"train every cell to convergence (--patience {Config.patience}, --epochs at least "
                         f"{Config.epochs}), not the quick default")
    mc.add_argument("--plot", help="also write a PNG: gain against teacher quality, one line per variant (needs matplotlib)")
    cli.split_flags(mc)
    preset(mc, students=["sasrec"], epochs=5, patience=5, seeds=2)
    ab = sub.add_parser("ablation", parents=[parent],
                        help="the ablation and differences tables with full-coverage diagnostic teachers, converged")
    cli.student_flags(ab)
    ab.add_argument("--qualities", type=quality, nargs="+", default=[1.0, 0.0],
                    help="synthetic teachers' qualities, the share of good candidates (0: the random teacher)")
    confidence_flag(ab)
    ab.add_argument("--tables", type=choice_list(("ablations", "differences")), default=["ablations", "differences"],
                    help="comma-separated, from ablations,differences")
    ab.add_argument("--plot", help="also write a PNG per quality (FILE with -q<quality> before .png): bars with "
                                   "error bars (needs matplotlib)")
    cli.split_flags(ab)
    preset(ab, students=["sasrec", "dros"], seeds=3)
    c = sub.add_parser("compare-teachers", parents=[parent],
                       help="teachers and undistilled students on the same validation and test rows")
    cli.student_flags(c)
    c.add_argument("teachers", nargs="+", help="teacher cache folders (made with the same --teacher-eval-rows)")
    preset(c, students=["sasrec", "dros"])
    count = checked(int, at_least(1))
    b = sub.add_parser("bench", help="time training steps and one evaluation on Games-shaped data")
    b.add_argument("--students", type=choice_list(students.CHOICES), default=["sasrec", "dros"],
                   help="comma-separated; plain SASRec and DROS + DLLM2Rec are the official code's comparable rows")
    b.add_argument("--rows", type=checked(int, between(1, 10**7)), default=119_836)
    b.add_argument("--items", type=checked(int, between(Config().K + 2, 10**7)), default=17_408,
                   help="catalogue size (at least --k + 2: every row needs candidates and a negative)")
    b.add_argument("--d-llm", type=checked(int, between(1, 65_536)), default=4096)
    b.add_argument("--batch-size", type=checked(int, between(1, 1 << 16)), default=256)
    b.add_argument("--steps", type=count, default=20)
    b.add_argument("--warmup", type=checked(int, at_least(2)), default=5,
                   help="untimed steps first (the captured step: up to 3 eager, then the capture, all untimed)")
    b.add_argument("--eval-rows", type=count, default=14_980)
    b.add_argument("--games-dir", help="a folder of the official Games val_data.csv and test_data.csv, whose "
                                       "histories are resampled (default: random histories)")
    b.add_argument("--device", default="auto")
    b.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    b.add_argument("--out", help="also write the figures to this JSON file")
    rt = sub.add_parser("retrieval-teacher", parents=[parent],
                        help="a teacher cache from LLM title embeddings: each row's items nearest its history")
    rt.add_argument("--item-embeddings", required=True, metavar="CACHE",
                    help="a teacher cache folder whose title embeddings z_i serve (e.g. the single command's)")
    rt.add_argument("--out", required=True, help="the teacher cache folder to write")
    rt.add_argument("--top-n", type=checked(int, at_least(1)), default=20, help="candidates kept per row")
    rt.add_argument("--decays", type=checked(float, lambda d: None if 0 < d <= 1 else "must be in (0, 1]"), nargs="+",
                    default=[1.0, 0.8, 0.6, 0.4], help="recency decays of the history embedding, the best on the "
                                                       "validation rows kept (1: the plain mean)")
    rt.set_defaults(out_is_folder=True)
    for name, module, text in (  # the commands that own their flags
            ("model-teacher", model_teacher, "a teacher cache from an ensemble of recommenders trained on the training rows only"),
            ("knowledge", knowledge, "each teacher against its random twin, lam chosen on validation, with the ablations"),
            ("false-positives", false_positives, "the verdict rule's false-positive rate: runs of one configuration, "
                                                 "seeds split in two"),
            ("table5", table5, "the paper's Table 5: the distillation baselines beside DLLM2Rec and its random-twin floor")):
        module.flags(sub.add_parser(name, parents=[parent], help=text))
    g = sub.add_parser("gates", parents=[parent],
                       help="beyond the paper: the row-gate table, each --row-gate against full DLLM2Rec and the base")
    cli.student_flags(g)
    g.add_argument("--teachers", type=gates.teacher_arg, nargs="+", default=[gates.teacher_spec(t) for t in ("0", "mixed", "1")],
                   help="a synthetic teacher's quality (0: random) or 'mixed', each with an optional ':flat' "
                        "confidence (default honest), a teacher cache folder (e.g. the retrieval teacher's), or "
                        "mix:GOOD,BAD[:flat]: two cache folders, GOOD's advice on a random half of the rows, BAD's on "
                        "the rest")
    g.add_argument("--uniform", action="store_true",
                   help="also uniform weights w_r = 1/K (the no_weights ablation), against full DLLM2Rec and the base")
    g.add_argument("--gates", type=choice_list(gates.GATES), default=list(gates.GATES),
                   help="comma-separated, from " + ",".join(gates.GATES))
    cli.split_flags(g)
    preset(g, students=["sasrec"], seeds=3)
    return {"mechanism": mechanism.cmd_mechanism, "ablation": ablation.cmd_ablation,
            "compare-teachers": compare.cmd_compare, "bench": bench.cmd_bench, "retrieval-teacher": retrieval.cmd_retrieval,
            "gates": gates.cmd_gates, "model-teacher": model_teacher.cmd_model_teacher,
            "knowledge": knowledge.cmd_knowledge, "false-positives": false_positives.cmd_false_positives,
            "table5": table5.cmd_table5}


def main(argv=None):
    return cli.run(cli.parse_args(argv, [add_commands], default=None, prog="python -m research"))


if __name__ == "__main__":
    main()
