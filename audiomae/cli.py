"""``audiomae`` command line: one sub-command per module, each registering its own parser.

Every module in ``COMMANDS`` exposes ``register(subparsers)``, which adds its sub-command(s) and
sets ``func`` on them; ``func(args)`` returns the process exit code. Modules are imported only to
register, so each keeps its heavy imports inside its functions.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("audiomae.report", "audiomae.demo_data", "audiomae.train", "audiomae.embed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audiomae", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
