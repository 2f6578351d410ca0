"""`hf-seqarch` command line."""

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-seqarch", description="Sequence architectures as HuggingFace models.")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="build, train a few steps, save, reload and generate (a quick smoke run)")
    demo.add_argument("--output-dir", default="outputs/demo")
    demo.add_argument("--mixers", default="lstm,attention,sliding_attention,gru")
    demo.add_argument("--steps", type=int, default=30)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.output_dir, args.mixers.split(","), args.steps)
    else:
        parser.print_help()


if __name__ == "__main__":
    main()
