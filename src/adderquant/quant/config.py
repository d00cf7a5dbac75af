"""Quantization configurations: one dataclass per method, each holding its own defaults.

:class:`QuantConfig` holds the settings every method shares (bit widths, calibration,
BatchNorm re-estimation, bias correction, mixed precision); :class:`PaperConfig`,
:class:`QSSFConfig` and :class:`AdderQuantConfig` add the settings of one method each and
name it in the class variable ``method``. Every field is validated on construction and
carries its help text in ``metadata["help"]``, from which the command line builds its flags.
The methods are listed, with their layer quantizers, in :mod:`adderquant.quant.registry`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from adderquant.quant.grid import MAX_BITS, MIN_BITS, check_bits
from adderquant.quant.grouping import FEATURES

ACT_CLIPS = ("released", "quantile", "max", "mse")
QSSF_SOURCES = ("weights", "activations", "max")
BIAS_CORRECTIONS = ("none", "float-input", "quant-input")
PER_CHANNEL = "per-channel"
POSITIVE_FIELDS = ("calib_batches", "calib_batch_size", "calib_pool", "sample_per_batch",
                   "bn_batches", "bias_correction_batches", "mp_images")


def setting(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with its help text (and allowed values) in its metadata."""
    meta = {"help": help, **({"choices": choices} if choices else {})}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class QuantConfig:
    """Settings shared by every post-training quantization method (see docs/api.md)."""

    method: ClassVar[str] = ""  # the registered name of the method a subclass configures

    bits: int = setting(4, "bit width of weights and activations (2-8)")
    layer_bits: dict[str, int] = setting({}, "per-layer bit width LAYER=BITS (repeatable)")
    # calibration: calib_batches x calib_batch_size images drawn from the first calib_pool
    # training images (the rest is never used for calibration), augmented with crop + flip
    calib_batches: int = setting(202, "calibration batches")
    calib_batch_size: int = setting(128, "images per calibration batch")
    calib_augment: bool = setting(True, "crop + flip augmentation of the calibration images")
    calib_pool: int = setting(40000, "calibration draws from the first N training images")
    act_quantile: float = setting(0.9997, "quantile q of |x| per calibration batch")
    sample_per_batch: int = setting(4096, "activation values sampled per batch and layer")
    report_images: int = setting(32, "calibration images kept per layer (output SQNR, search)")
    seed: int = setting(0, "seed of every random choice (calibration batches, sampling, k-means)")
    # BatchNorm re-estimation: train-mode statistics over bn_batches calibration batches
    bn_reestimate: bool = setting(False, "re-estimate the BatchNorm statistics after quantizing")
    bn_momentum: float | None = setting(
        0.1, "BatchNorm re-estimation momentum (none: cumulative average)")
    bn_batches: int = setting(202, "calibration batches of the BatchNorm re-estimation")
    # leading batches whose weight in the momentum average stays below this are not run (0: run
    # all); 1e-6 runs the last 132 of 202 batches at momentum 0.1
    bn_negligible_weight: float = setting(
        1e-6, "skip the leading BatchNorm batches whose total weight in the momentum average is "
        "below this (0: run every batch)")
    bias_correction: str = setting(
        "float-input", "per-channel bias correction measured on float or quantized inputs",
        BIAS_CORRECTIONS)
    bias_correction_batches: int = setting(16, "calibration batches of the bias correction")
    # mixed precision (quant/mixed.py): per-layer bits whose average, weighted by each layer's
    # adder operations, is at most avg_bits (or bits, if avg_bits is unset)
    mixed_precision: bool = setting(False, "per-layer bit widths averaging --bits")
    avg_bits: float | None = setting(None, "average bit width of mixed precision (turns it on)")
    mp_images: int = setting(256, "calibration images of the mixed-precision sensitivity")

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
        for f in fields(self):
            if "choices" in f.metadata:
                _choice(f.name, getattr(self, f.name), f.metadata["choices"])
        for name in POSITIVE_FIELDS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 < self.act_quantile <= 1.0:
            raise ValueError(f"act_quantile must be in (0, 1], got {self.act_quantile}")
        if self.report_images < 0:
            raise ValueError(f"report_images must be >= 0, got {self.report_images}")
        if self.bn_momentum is not None and not 0.0 < self.bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be in (0, 1] or None, got {self.bn_momentum}")
        if not 0.0 <= self.bn_negligible_weight < 1.0:
            raise ValueError(f"bn_negligible_weight must be in [0, 1), got "
                             f"{self.bn_negligible_weight}")
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

    def replace(self, **changes: Any) -> QuantConfig:
        """A validated copy with ``changes`` applied; a field this method does not have is a
        ``ValueError`` naming it."""
        unknown = sorted(set(changes) - field_names(type(self)))
        if unknown:
            raise ValueError(f"method {self.method!r} has no setting {unknown}; its settings "
                             f"are {sorted(field_names(type(self)))}")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """``{"method": ..., field: value, ...}`` (JSON-ready)."""
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """The configuration of the fields in ``data`` (a ``method`` entry must name this
        class's method); an unknown field is a ``ValueError`` listing the known ones."""
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"{cls.__name__} configures method {cls.method!r}, not {method!r}")
        unknown = sorted(set(data) - field_names(cls))
        if unknown:
            raise ValueError(f"method {cls.method!r} has no setting {unknown}; its settings are "
                             f"{sorted(field_names(cls))}")
        return cls(**data)


@dataclass(kw_only=True)
class GroupedConfig(QuantConfig):
    """Settings of methods that split a layer's output channels into groups of one grid."""

    grouping: bool = setting(True, "split the filters into groups (off: one group)")
    groups: int | str = setting(4, "number of weight groups G, or per-channel")

    def validate(self) -> None:
        super().validate()
        if not (self.groups == PER_CHANNEL or (isinstance(self.groups, int)
                                               and not isinstance(self.groups, bool)
                                               and self.groups >= 1)):
            raise ValueError(f"groups must be a positive integer or {PER_CHANNEL!r}, got "
                             f"{self.groups!r}")


@dataclass(kw_only=True)
class PaperConfig(GroupedConfig):
    """Nie et al. 2022: k-means groups of filters, the lossless weight clamp, an activation
    threshold ``A``."""

    method: ClassVar[str] = "paper"

    feature: str = setting("max_abs", "clustering feature of a filter", FEATURES)
    weight_clamp: bool = setting(True, "lossless clamp of the weights into [-A, A]")
    act_clip: str = setting(
        "mse", "activation threshold A: released (the released code's quantile rule), quantile "
        "(plain per-batch quantile), max, mse (MSE-optimal for the bit width)", ACT_CLIPS)


@dataclass(kw_only=True)
class QSSFConfig(QuantConfig):
    """One scale per layer shared by weights and activations."""

    method: ClassVar[str] = "qssf"

    qssf_source: str = setting(
        "weights", "the shared scale comes from weights, activations or the max of both",
        QSSF_SOURCES)


@dataclass(kw_only=True)
class AdderQuantConfig(GroupedConfig):
    """Weights and inputs on one unsigned grid per group, each group's interval chosen by the
    output error on sampled calibration patches (:mod:`adderquant.quant.samegrid`). It searches
    on kept calibration inputs and corrects the mean error itself: 2 batches of 128 images
    suffice, of which 128 are kept per layer, and no further bias correction runs."""

    method: ClassVar[str] = "adderquant"

    calib_batches: int = setting(2, "calibration batches")
    report_images: int = setting(128, "calibration images kept per layer (output SQNR, search)")
    bias_correction: str = setting(
        "none", "per-channel bias correction measured on float or quantized inputs",
        BIAS_CORRECTIONS)
    clip_search: bool = setting(
        True, "choose each group's interval by output error (off: the fixed interval of "
        "act_quantile, one group)")
    clip_candidates: int = setting(16, "candidate intervals per layer, shrinking by clip_shrink")
    clip_shrink: float = setting(2**-0.25, "ratio of successive candidate intervals")
    search_positions: int = setting(1024, "sampled output positions per layer")
    mean_correction: bool = setting(True, "per-channel bias removing the mean output error")

    def validate(self) -> None:
        super().validate()
        if self.clip_candidates < 1:
            raise ValueError(f"clip_candidates must be at least 1, got {self.clip_candidates}")
        if not 0.0 < self.clip_shrink < 1.0:
            raise ValueError(f"clip_shrink must be in (0, 1), got {self.clip_shrink}")
        if self.search_positions < 16:
            raise ValueError(f"search_positions must be at least 16, got {self.search_positions}")


# Settings of the released code (MindSpore AdderQuant): A by its quantile rule, G = 4 groups on
# max|w|, the clamp, BatchNorm re-estimated in train mode (momentum 0.1) over bn_batches
# (default 202) calibration batches, no bias correction.
FAITHFUL = {
    "grouping": True, "groups": 4, "feature": "max_abs", "weight_clamp": True,
    "act_clip": "released", "act_quantile": 0.9997, "bn_reestimate": True, "bn_momentum": 0.1,
    "bias_correction": "none",
}
# Named presets: the method they configure and their fields.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {"faithful": (PaperConfig.method, FAITHFUL)}


def field_names(cls: type[QuantConfig]) -> set[str]:
    """The settings of a configuration class."""
    return {f.name for f in fields(cls)}


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
