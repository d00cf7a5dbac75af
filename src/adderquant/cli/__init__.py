"""The ``adderquant`` command line."""

from __future__ import annotations

import argparse
import importlib
import sys

from adderquant.hub import OFFLINE_ENV, settings

# Each module defines ``register(subparsers)``, which adds a sub-command whose ``func`` runs it.
COMMANDS = ("eval", "data", "train", "energy", "export", "infer", "ptq", "reproduce", "analyze",
            "models")
# Commands that may look up (and download) a checkpoint or a dataset.
RESOLVING = ("eval", "train", "infer", "ptq", "reproduce", "analyze")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every sub-command, or with ``only`` one of them (which then imports
    only that command's dependencies)."""
    parser = argparse.ArgumentParser(
        prog="adderquant",
        description="Adder neural networks: evaluation, quantization, integer deployment.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS if only is None else (only,):
        importlib.import_module(f"adderquant.cli.{name}_cmd").register(sub)
        if name in RESOLVING:
            sub.choices[name].add_argument(
                "--offline", action="store_true",
                help=f"never download: use only local files (also {OFFLINE_ENV}=1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    try:
        with settings(offline=getattr(args, "offline", False),
                      progress=not getattr(args, "no_progress", False)):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError, RuntimeError, TypeError, OSError) as e:
        print(f"adderquant {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
