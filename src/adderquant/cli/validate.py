"""Checks of the command line: ``argparse`` types for single values, and :func:`validate_args`,
one pass over the parsed arguments of any command that runs before its work starts.

A command declares its outputs with ``set_defaults``: ``output_files`` (argument names holding
file paths) and ``output_dirs`` (argument name -> the file names it writes in that folder, or a
function of the arguments giving them). Every declared output is checked here (a regular file
or absent, in a writable folder), so that a bad path fails in a second, not after the
computation.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from adderquant._io import check_output_dir, check_output_file
from adderquant.quant.grid import MAX_BITS, MIN_BITS


class UsageError(ValueError):
    """Arguments that do not make sense together; the message names them and the fix."""


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``low..high`` (no upper bound if ``high`` is None)."""
    span = f"from {low} to {high}" if high is not None else f"at least {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {span}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {value}")
        return value

    parse.__name__ = f"integer {span}"
    return parse


positive_int = int_in(1)
non_negative_int = int_in(0)
bit_width = int_in(MIN_BITS, MAX_BITS)
thread_count = int_in(1, 4096)


def _float(text: str, ok: Callable[[float], bool], what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0 (NaN and inf refused)."""
    return _float(text, lambda v: v > 0, "a finite number above 0")


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number of at least 0 (NaN and inf refused)."""
    return _float(text, lambda v: v >= 0, "a finite number of at least 0")


def validate_args(args: argparse.Namespace) -> None:
    """Every check of the parsed arguments that needs more than one value; raises
    :class:`UsageError` (or ``OutputError`` for an output path) naming the problem."""
    _check_outputs(args)
    if "method" in vars(args) or hasattr(args, "config"):
        _check_config_flags(args)
    if args.command == "reproduce":
        _check_reproduce(args)
    if args.command == "analyze":
        _check_analyze(args)


def _check_outputs(args: argparse.Namespace) -> None:
    seen: dict[Path, str] = {}

    def claim(path: Path, flag: str) -> None:
        key = Path(path).resolve()
        if key in seen:
            raise UsageError(f"{flag} and {seen[key]} name the same file {path}; give two paths")
        seen[key] = flag

    for name in getattr(args, "output_files", ()):
        value = getattr(args, name, None)
        if value:
            check_output_file(value)
            claim(Path(value), _flag(name))
    for name, files in getattr(args, "output_dirs", {}).items():
        value = getattr(args, name, None)
        if not value:
            continue
        folder = check_output_dir(value)
        for file in files(args) if callable(files) else files:
            check_output_file(folder / file)
            claim(folder / file, f"{_flag(name)} {value}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_config_flags(args: argparse.Namespace) -> None:
    """Flags that the chosen configuration would silently ignore, then the configuration
    itself (bits in range, groups, choices, settings of the chosen method...)."""
    from adderquant.cli.config_args import (
        FULL_PRECISION,
        config_from_args,
        given_fields,
        method_from_args,
    )

    given = set(given_fields(args))
    if given >= {"grouping", "groups"} and not args.grouping:
        raise UsageError("--groups has no effect with --no-grouping (every layer keeps one "
                         "group); drop one of them")
    if method_from_args(args) == FULL_PRECISION:
        if given or getattr(args, "preset", None) or getattr(args, "config", None):
            flags = ", ".join(sorted(_flag(f) for f in given) or ["--config/--preset"])
            raise UsageError(f"--method {FULL_PRECISION} quantizes nothing, so {flags} would "
                             "have no effect; drop them or choose a quantization method")
        return
    config_from_args(args)


def _check_reproduce(args: argparse.Namespace) -> None:
    from adderquant.cli.config_args import given_fields
    from adderquant.studies.reproduce import select_rows

    if len(set(args.bits)) != len(args.bits):
        raise UsageError(f"--bits lists a width twice: {args.bits}")
    if len(set(args.seed)) != len(args.seed):
        raise UsageError(f"--seed values must differ, got {args.seed}")
    for row in select_rows(args.methods):
        if not row.widths(args.bits):
            raise UsageError(f"row {row.name} runs at {list(row.bits)} bits, none of --bits "
                             f"{' '.join(map(str, args.bits))}; add one of them or drop the row")
        row.configure(None, given_fields(args))  # the flags' values, checked


def _check_analyze(args: argparse.Namespace) -> None:
    if "histograms" not in args.names:
        return
    from adderquant.models import create_model
    from adderquant.quant.layers import adder_layers

    layers = adder_layers(create_model(args.model))
    unknown = [n for n in args.layers if n not in layers]
    if unknown:
        raise UsageError(f"--layers: {args.model} has no adder layer {', '.join(unknown)}; "
                         f"choose from {', '.join(layers)}")
