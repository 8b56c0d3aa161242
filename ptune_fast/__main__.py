"""Command line: ``python -m ptune_fast demo|info`` (also the ``ptune_fast`` console script).

* ``demo`` -- P-Tuning v2 on the pretrained all-MiniLM-L6-v2, PEFT vs PEFT + ptune_fast side by side
  (see :mod:`ptune_fast.demo`);
* ``info`` -- versions, available backends and why not, supported model types
  (see :mod:`ptune_fast.info`); ``--json`` for machines.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from ptune_fast import demo, info

    p = argparse.ArgumentParser(
        prog="ptune_fast",
        description="ptune_fast: fused kernels for PEFT prompt-learning (prefix tuning, P-Tuning v1/v2, "
                    "prompt tuning).")
    sub = p.add_subparsers(dest="command", metavar="{demo,info}")
    d = sub.add_parser("demo", help="train P-Tuning v2 on all-MiniLM-L6-v2 with PEFT and PEFT + ptune_fast, "
                                     f"side by side (CPU, offline, {demo.WALL_TIME_SHORT}; see demo --help)",
                       description=demo.__doc__.split("\n\n")[0], epilog=demo.WALL_TIME)
    demo.add_arguments(d)
    i = sub.add_parser("info", help="versions, backends (CUDA extension, Triton, reference) and supported models")
    info.add_arguments(i)
    return p


def main(argv=None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # e.g. `info --json | head`: the reader left; not an error of ours
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ptune_fast import demo

        return demo.main_from_args(args)
    if args.command == "info":
        from ptune_fast import info

        return info.main_from_args(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
