"""`hf-seqarch` command line."""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-seqarch", description="Sequence architectures as HuggingFace models.")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="build, train a few steps, save, reload and generate (a quick smoke run)")
    demo.add_argument("--output-dir", default="outputs/demo", help="where the checkpoint is saved (default: %(default)s)")
    demo.add_argument("--mixers", default="lstm,attention,sliding_attention,gru",
                      help="comma-separated mixer per layer (default: %(default)s)")
    demo.add_argument("--steps", type=_positive_int, default=30, help="training steps, at least 1 (default: %(default)s)")
    compare = sub.add_parser("compare", help="the architectures side by side on this machine: speed, memory, "
                             "decoding, recall, text; writes report.md, results.json, plots, checkpoints")
    compare.add_argument("--preset", default="quick", help="quick (default, <= 10 min on a 2-core CPU), full (GPU) or test")
    compare.add_argument("--output-dir", default="outputs/compare",
                         help="where report.md, results.json, the plots and checkpoints/ go (default: %(default)s); a "
                              "re-run there replaces them, and the checkpoints of the architectures it runs")
    compare.add_argument("--device", default="cpu", help="cpu or cuda (the first GPU: the Trainer runs on cuda:0)")
    compare.add_argument("--architectures", default=None,
                         help="comma-separated subset of lstm,transformer,sliding_window,mamba2,linear_attention,hybrid,gru "
                              "(default: all but gru)")
    compare.add_argument("--threads", type=_positive_int, default=None,
                         help="torch CPU threads (default: the preset's: 1 for quick and test, torch's default for full)")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        mixers = [name.strip() for name in args.mixers.split(",") if name.strip()]  # "lstm, gru" as "lstm,gru"
        try:
            run_demo(args.output_dir, mixers, args.steps)
        except ValueError as err:  # a bad mixer name, an output directory that cannot be written
            print(f"hf-seqarch demo: error: {err}", file=sys.stderr)
            return 2
        return 0
    elif args.command == "compare":
        from .compare.run import main_compare

        return main_compare(args)
    else:  # no command: what there is, and a usage error's status (as argparse gives for a missing argument)
        parser.print_help(sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
