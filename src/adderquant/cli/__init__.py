"""The ``adderquant`` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# Each module defines ``register(subparsers)``, which adds a sub-command whose ``func`` runs it.
COMMANDS = ("eval", "data", "train", "energy", "export", "infer", "ptq", "qat", "reproduce",
            "analyze", "models", "compare")
# Commands that may look up (and download) a checkpoint or a dataset.
RESOLVING = ("eval", "train", "infer", "ptq", "qat", "reproduce", "analyze", "compare")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every sub-command, or with ``only`` one of them (which then imports
    only that command's dependencies)."""
    from adderquant.hub import OFFLINE_ENV  # imports torch: keep `import adderquant.cli` light

    parser = argparse.ArgumentParser(
        prog="adderquant",
        description="Adder neural networks: evaluation, quantization, integer deployment.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS if only is None else (only,):
        importlib.import_module(f"adderquant.cli.{name}_cmd").register(sub)
        verbosity = sub.choices[name].add_mutually_exclusive_group()
        verbosity.add_argument("-v", "--verbose", action="store_true",
                               help="also print the diagnostics of every step")
        verbosity.add_argument("-q", "--quiet", action="store_true",
                               help="print only warnings and the result")
        if name in RESOLVING:
            sub.choices[name].add_argument(
                "--offline", action="store_true",
                help=f"never download: use only local files (also {OFFLINE_ENV}=1)")
    return parser


def _build_parser_uninterrupted(command: str | None) -> argparse.ArgumentParser:
    """:func:`build_parser`, with Ctrl-C held back until its imports are done (a library
    interrupted in the middle of its import can fail later in odd ways), then raised."""
    pressed: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    except ValueError:  # not the main thread: signals are not ours to handle
        return build_parser(command)
    try:
        parser = build_parser(command)
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command: parse, validate every argument, then work. User errors exit 2 with one
    line; Ctrl-C (even while starting) exits 130 with one line, leaving no file half written."""
    argv_given = argv is not None
    try:
        argv = sys.argv[1:] if argv is None else argv
        command = argv[0] if argv and argv[0] in COMMANDS else None
        parser = _build_parser_uninterrupted(command)
        args = parser.parse_args(argv)
        from adderquant.cli.validate import validate_args
        from adderquant.hub import settings

        try:
            validate_args(args)
            level = (logging.DEBUG if args.verbose else logging.WARNING if args.quiet
                     else logging.INFO)
            with settings(offline=getattr(args, "offline", False),
                          progress=not getattr(args, "no_progress", False)), \
                    _logging_to_stderr(level):
                return int(args.func(args) or 0)
        except (FileNotFoundError, ValueError, RuntimeError, TypeError, OSError) as e:
            print(f"adderquant {args.command}: error: {e}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        _say_interrupted(restore=argv_given)
        return 130


@contextmanager
def _logging_to_stderr(level: int) -> Iterator[None]:
    """The package's log records at ``level`` and above go to stderr, one line each, while
    the command runs."""
    logger = logging.getLogger("adderquant")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def _say_interrupted(restore: bool) -> None:
    """Print the one line of an interrupted command, ignoring further Ctrl-C meanwhile, and
    for the rest of the process when it runs as the program (``restore`` false)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals are not ours to handle
        previous = None
    print("adderquant: interrupted", file=sys.stderr)
    if restore and previous is not None:
        signal.signal(signal.SIGINT, previous)

if __name__ == "__main__":
    sys.exit(main())
