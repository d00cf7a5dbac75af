"""The post-training quantization configuration: a dataclass, YAML/JSON files, CLI flags.

Every field is a command-line flag (``--field-name``; booleans also ``--no-field-name``;
``layer_bits`` and ``method_options`` take ``KEY=VALUE`` and may be repeated). A file given
with ``--config`` is read first; flags given on the command line override it; presets
(:data:`PRESETS`) are applied between the two.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from adderquant.quant.grid import MAX_BITS, MIN_BITS, check_bits
from adderquant.quant.grouping import FEATURES

ACT_CLIPS = ("released", "quantile", "max", "mse")
QSSF_SOURCES = ("weights", "activations", "max")
BIAS_CORRECTIONS = ("none", "float-input", "quant-input")
PER_CHANNEL = "per-channel"


@dataclass
class PTQConfig:
    """All settings of one post-training quantization run (see docs/reproduction.md)."""

    method: str = "paper"  # a registered method (adderquant.quant.methods) or "fp"
    bits: int = 4  # W = A bits of every adder layer, 2..8
    layer_bits: dict[str, int] = field(default_factory=dict)  # per-layer overrides
    # clustering-based grouping (paper, part 1)
    grouping: bool = True
    groups: int | str = 4  # G, or "per-channel"
    feature: str = "max_abs"  # clustering feature: max_abs | mean_abs | std | range
    # lossless weight range clamp (paper, part 2)
    weight_clamp: bool = True
    # activation threshold A (paper, part 3): released | quantile | max | mse
    act_clip: str = "mse"
    act_quantile: float = 0.9997
    # QSSF: where the single shared scale comes from: weights | activations | max
    qssf_source: str = "weights"
    # calibration: num_batches x batch_size images drawn from the first calib_pool training
    # images (the rest is never used for calibration), augmented with crop + flip
    calib_batches: int = 202
    calib_batch_size: int = 128
    calib_augment: bool = True
    calib_pool: int = 40000
    sample_per_batch: int = 4096  # activation values sampled per batch and layer
    report_images: int = 32  # calibration images kept per layer for the output SQNR
    seed: int = 0
    # BatchNorm re-estimation: train-mode statistics over bn_batches calibration batches
    bn_reestimate: bool = False
    bn_momentum: float | None = 0.1  # None: cumulative average
    bn_batches: int = 202
    # leading BatchNorm batches whose weight in the momentum average stays below this are not
    # run (0: run all); 1e-6 runs the last 132 of 202 batches at momentum 0.1
    bn_negligible_weight: float = 1e-6
    # per-channel bias correction of adder outputs, measured on the layer inputs of the
    # float or of the quantized model: none | float-input | quant-input
    bias_correction: str = "float-input"
    bias_correction_batches: int = 16
    # adderquant (quant/samegrid.py): weights and inputs on one unsigned grid per group, each
    # group's interval chosen by the output error on sampled calibration patches
    clip_search: bool = True  # off: the fixed interval of act_quantile, one group
    clip_candidates: int = 16  # candidate intervals per layer, shrinking by clip_shrink
    clip_shrink: float = 2**-0.25
    search_positions: int = 1024  # sampled output positions per layer
    mean_correction: bool = True  # per-channel bias removing the mean output error
    # mixed precision (quant/mixed.py): per-layer bits whose average, weighted by each layer's
    # adder operations, is at most avg_bits (or bits, if avg_bits is unset)
    mixed_precision: bool = False
    avg_bits: float | None = None  # setting it turns mixed precision on
    mp_images: int = 256  # calibration images of the sensitivity measurement
    # options of methods registered elsewhere, KEY=VALUE
    method_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        check_bits(self.bits)
        for name, b in self.layer_bits.items():
            try:
                check_bits(b)
            except ValueError as e:
                raise ValueError(f"layer_bits[{name!r}]: {e}") from None
        if not (self.groups == PER_CHANNEL or (isinstance(self.groups, int) and self.groups >= 1)):
            raise ValueError(f"groups must be a positive integer or {PER_CHANNEL!r}, got "
                             f"{self.groups!r}")
        _choice("feature", self.feature, FEATURES)
        _choice("act_clip", self.act_clip, ACT_CLIPS)
        _choice("qssf_source", self.qssf_source, QSSF_SOURCES)
        _choice("bias_correction", self.bias_correction, BIAS_CORRECTIONS)
        if not 0.0 < self.act_quantile <= 1.0:
            raise ValueError(f"act_quantile must be in (0, 1], got {self.act_quantile}")
        for name in ("calib_batches", "calib_batch_size", "calib_pool", "sample_per_batch",
                     "bn_batches", "bias_correction_batches", "clip_candidates", "mp_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.report_images < 0:
            raise ValueError(f"report_images must be >= 0, got {self.report_images}")
        if self.bn_momentum is not None and not 0.0 < self.bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be in (0, 1] or None, got {self.bn_momentum}")
        if not 0.0 <= self.bn_negligible_weight < 1.0:
            raise ValueError(f"bn_negligible_weight must be in [0, 1), got "
                             f"{self.bn_negligible_weight}")
        if not 0.0 < self.clip_shrink < 1.0:
            raise ValueError(f"clip_shrink must be in (0, 1), got {self.clip_shrink}")
        if self.search_positions < 16:
            raise ValueError(f"search_positions must be at least 16, got {self.search_positions}")
        if self.avg_bits is not None and not MIN_BITS <= self.avg_bits <= MAX_BITS:
            raise ValueError(f"avg_bits must be between {MIN_BITS} and {MAX_BITS}, got "
                             f"{self.avg_bits}")

    @property
    def bit_budget(self) -> float | None:
        """The average bit width of mixed precision, or ``None`` for uniform bits."""
        if self.avg_bits is not None:
            return self.avg_bits
        return float(self.bits) if self.mixed_precision else None

    def bits_for(self, layer: str) -> int:
        """The bit width of adder layer ``layer``."""
        return self.layer_bits.get(layer, self.bits)

    def replace(self, **changes: Any) -> PTQConfig:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PTQConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown configuration field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> PTQConfig:
        """Read a YAML or JSON file holding a mapping of fields."""
        return cls.from_dict(read_mapping(path))


# Settings of the released code (MindSpore AdderQuant): A by its quantile rule, G = 4 groups on
# max|w|, the clamp, BatchNorm re-estimated in train mode (momentum 0.1) over bn_batches
# (default 202) calibration batches, no bias correction.
FAITHFUL = {
    "grouping": True, "groups": 4, "feature": "max_abs", "weight_clamp": True,
    "act_clip": "released", "act_quantile": 0.9997, "bn_reestimate": True, "bn_momentum": 0.1,
    "bias_correction": "none",
}
PRESETS: dict[str, dict[str, Any]] = {"faithful": FAITHFUL}
# Defaults of a method for the fields a run leaves unset (file, preset and flags win).
# adderquant searches on kept calibration inputs and corrects the mean error itself: 2 batches
# of 128 images suffice, of which 128 are kept per layer.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "adderquant": {"calib_batches": 2, "report_images": 128, "bias_correction": "none"},
}


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON file holding one mapping."""
    path = Path(path)
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of configuration fields")
    return data


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


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


_FLAG_TYPES = {"groups": _groups, "bn_momentum": _optional_float, "avg_bits": _optional_float}
_CHOICES = {"feature": FEATURES, "act_clip": ACT_CLIPS, "qssf_source": QSSF_SOURCES,
            "bias_correction": BIAS_CORRECTIONS}
_HELP = {
    "method": "quantization method",
    "bits": "bit width of weights and activations (2-8)",
    "layer_bits": "per-layer bit width LAYER=BITS (repeatable)",
    "groups": "number of weight groups G, or per-channel",
    "grouping": "cluster the filters into groups (off: one group)",
    "feature": "clustering feature of a filter",
    "weight_clamp": "lossless clamp of the weights into [-A, A]",
    "act_clip": "activation threshold A: released (the released code's quantile rule), "
                "quantile (plain per-batch quantile), max, mse (MSE-optimal for the bit width)",
    "act_quantile": "quantile q of |x| per calibration batch",
    "qssf_source": "qssf: the shared scale comes from weights, activations or the max of both",
    "calib_pool": "calibration draws from the first N training images",
    "bn_momentum": "BatchNorm re-estimation momentum (none: cumulative average)",
    "bn_negligible_weight": "skip the leading BatchNorm batches whose total weight in the "
    "momentum average is below this (0: run every batch)",
    "bias_correction": "per-channel bias correction measured on float or quantized inputs",
    "method_options": "method-specific option KEY=VALUE (repeatable; YAML value syntax)",
}


def add_config_args(
    parser: argparse.ArgumentParser, methods: tuple[str, ...], default_method: str | None = None
) -> None:
    """Add ``--config``, ``--preset`` and one flag per :class:`PTQConfig` field.

    ``default_method`` is the method the command uses when none is given (default: the
    :class:`PTQConfig` default); the help then shows that method's defaults."""
    g = parser.add_argument_group("quantization configuration")
    g.add_argument("--config", metavar="FILE", help="YAML or JSON file of configuration fields")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="apply a named preset (faithful: the released code's pipeline)")
    method = default_method or PTQConfig.method
    defaults = PTQConfig(**{**METHOD_DEFAULTS.get(method, {}), "method": method})
    for f in fields(PTQConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        other = getattr(PTQConfig, f.name, default)
        note = (f"; other methods: {other}"
                if f.name in METHOD_DEFAULTS.get(method, {}) and other != default else "")
        help_text = f"{_HELP.get(f.name, f.name.replace('_', ' '))} (default: {default}{note})"
        if f.name == "method" or f.name in _CHOICES:
            choices = methods if f.name == "method" else _CHOICES[f.name]
            g.add_argument(flag, choices=choices, default=argparse.SUPPRESS, help=help_text)
        elif isinstance(default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_text)
        elif isinstance(default, dict):
            g.add_argument(flag, type=_key_value, action="append", metavar="KEY=VALUE",
                           default=argparse.SUPPRESS, help=help_text)
        else:
            kind = _FLAG_TYPES.get(f.name, type(default))
            g.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)


def config_from_args(
    args: argparse.Namespace, defaults: dict[str, Any] | None = None, **overrides: Any
) -> PTQConfig:
    """``defaults``, then the ``--config`` file, then ``--preset``, then ``overrides``, then the
    flags given; fields still unset take the chosen method's :data:`METHOD_DEFAULTS`."""
    data: dict[str, Any] = dict(defaults or {})
    if getattr(args, "config", None):
        data.update(read_mapping(args.config))
    if getattr(args, "preset", None):
        data.update(PRESETS[args.preset])
    data.update(overrides)
    for f in fields(PTQConfig):
        if f.name not in vars(args):
            continue
        value = getattr(args, f.name)
        if f.name == "layer_bits":
            value = {**data.get(f.name, {}), **{k: int(v) for k, v in value}}
        elif f.name == "method_options":
            value = {**data.get(f.name, {}), **{k: yaml.safe_load(v) for k, v in value}}
        data[f.name] = value
    for key, value in METHOD_DEFAULTS.get(data.get("method", PTQConfig.method), {}).items():
        data.setdefault(key, value)
    return PTQConfig.from_dict(data)
