"""``python -m blip <command>``: the project's command line."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m blip", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="generate a small world, pre-train the tiny model, print captions")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--steps", type=int, default=300)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.command == "demo":
        from .demo import run_demo

        run_demo(a.out, a.steps, a.batch_size, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
