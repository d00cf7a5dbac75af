"""Command-line flags generated from the configuration dataclasses of the registered methods.

Every configuration field is a flag (``--field-name``; booleans also ``--no-field-name``;
``layer_bits`` takes ``LAYER=BITS`` and may be repeated); its help and default come from the
dataclass. A file given with ``--config`` is read first; ``--preset`` is applied over it, and
the flags given on the command line over both. The command line and the Python API build the
same configuration object, so they run the same thing.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from adderquant.quant.config import PER_CHANNEL, PRESETS, QuantConfig, field_names, read_mapping
from adderquant.quant.registry import METHODS, get_method
from adderquant.studies.experiment import FULL_PRECISION  # ``ptq --method fp``: the float model


def _groups(text: str) -> int | str:
    if text == PER_CHANNEL:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"groups must be an integer or {PER_CHANNEL!r}, got {text!r}"
        ) from None


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _layer_bits(text: str) -> tuple[str, int]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected LAYER=BITS, got {text!r}")
    try:
        return key, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer, got {text!r}") from None


# Parsers of the annotations that are not a plain type.
_PARSERS = {"int | str": _groups, "float | None": _optional_float}


def config_fields() -> dict[str, dict[str, tuple[dataclasses.Field, Any]]]:
    """Every field of the registered configurations (shared ones first): per field, the
    methods that have it with the field and its default."""
    out: dict[str, dict[str, tuple[dataclasses.Field, Any]]] = {}
    for method in METHODS.values():
        for f in dataclasses.fields(method.config):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out.setdefault(f.name, {})[method.name] = (f, default)
    return out


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default_text(owners: dict[str, Any], default_method: str | None) -> str:
    """``default: X`` for the default method, then the methods whose default differs."""
    by_value: dict[str, list[str]] = {}
    for method, value in owners.items():
        by_value.setdefault(repr(value), []).append(method)
    scope = "" if len(owners) == len(METHODS) else f"{', '.join(owners)} only; "
    if len(by_value) == 1:
        return f"{scope}default: {next(iter(owners.values()))}"
    if default_method in owners:  # the default method's value first, under its name only
        first = by_value.pop(repr(owners[default_method]))
        head = f"default: {owners[default_method]} ({default_method}); "
        by_value = {"": [m for m in first if m != default_method], **by_value}
    else:
        head = "default: "
    groups = [f"{', '.join(ms)}: {owners[ms[0]]}" for ms in by_value.values() if ms]
    return scope + head + "; ".join(groups)


def add_field_flag(group: argparse._ArgumentGroup, name: str, default_method: str | None) -> None:
    """The flag of configuration field ``name`` (left out of the namespace unless given; the
    command lists the fields it has flags for in the default ``config_fields``)."""
    owners = config_fields()[name]
    f, default = next(iter(owners.values()))
    text = (f"{f.metadata.get('help', name.replace('_', ' '))} "
            f"({_default_text({m: d for m, (_, d) in owners.items()}, default_method)})")
    if "choices" in f.metadata:
        group.add_argument(flag(name), choices=f.metadata["choices"], default=argparse.SUPPRESS,
                           help=text)
    elif isinstance(default, bool):
        group.add_argument(flag(name), action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=text)
    elif isinstance(default, dict):
        group.add_argument(flag(name), type=_layer_bits, action="append", metavar="LAYER=BITS",
                           default=argparse.SUPPRESS, help=text)
    else:
        kind = _PARSERS.get(str(f.type), type(default))
        group.add_argument(flag(name), type=kind, default=argparse.SUPPRESS, help=text)


def add_config_args(
    parser: argparse.ArgumentParser, default_method: str, full_precision: bool = False
) -> None:
    """``--config``, ``--preset``, ``--method`` and one flag per configuration field of every
    registered method; ``full_precision`` also offers ``--method fp``. The help shows the
    defaults of ``default_method``."""
    g = parser.add_argument_group("quantization configuration")
    g.add_argument("--config", metavar="FILE", help="YAML or JSON file of configuration fields")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="apply a named preset (faithful: the released code's pipeline)")
    choices = (*METHODS, FULL_PRECISION) if full_precision else tuple(METHODS)
    g.add_argument("--method", choices=choices, default=argparse.SUPPRESS,
                   help=f"quantization method (default: {default_method})")
    for name in config_fields():
        add_field_flag(g, name, default_method)
    parser.set_defaults(default_method=default_method, config_fields=tuple(config_fields()))


def given_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration fields given as flags (of those the command has as configuration
    flags, listed in ``args.config_fields``)."""
    return {name: getattr(args, name) for name in getattr(args, "config_fields", ())
            if name in vars(args)}


def config_data(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--config`` file, then ``--preset``, then the flags given, as one mapping (with
    ``method`` when one of them names it)."""
    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        data.update(read_mapping(args.config))
    if getattr(args, "preset", None):
        method, preset = PRESETS[args.preset]
        data.update(preset, method=method)
    if "method" in vars(args):
        data["method"] = args.method
    for name, value in given_fields(args).items():
        data[name] = {**data.get(name, {}), **dict(value)} if name == "layer_bits" else value
    return data


def method_from_args(args: argparse.Namespace) -> str:
    """The method the command line chooses (``fp`` included)."""
    return config_data(args).get("method", args.default_method)


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    """The configuration of the chosen method with the file, preset and flags applied; a
    setting the method does not have is a ``ValueError`` naming its flag."""
    data = config_data(args)
    method = get_method(data.pop("method", args.default_method))
    foreign = sorted(set(data) - field_names(method.config))
    if foreign:
        raise ValueError(f"{', '.join(flag(n) for n in foreign)} do(es) not apply to method "
                         f"{method.name!r}; drop them or choose a method that has them")
    return method.config(**data)
