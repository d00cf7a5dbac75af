"""Registry of layer quantizers and of the rows of ``adderquant reproduce``.

A layer quantizer turns one float adder layer, the statistics of its input and a bit width into
a :class:`~adderquant.quant.layers.QuantAdder2d` and a report (a JSON-ready dict)::

    quantizer(name, layer, observer, bits, cfg) -> (QuantAdder2d, report)

Registered here: ``paper`` (Nie et al. 2022: grouping, lossless weight clamp, activation
outlier clamp, each switchable) and ``qssf`` (one scale per layer shared by weights and
activations). Other modules add theirs with :func:`register_method` and
:func:`register_reproduce_row`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adderquant.nn import Adder2d
from adderquant.quant.calibrate import ActivationObserver
from adderquant.quant.config import FAITHFUL, PER_CHANNEL, PTQConfig
from adderquant.quant.grid import CodeRange
from adderquant.quant.grouping import group_filters
from adderquant.quant.layers import QuantAdder2d
from adderquant.quant.observers import MIN_THRESHOLD, mse_optimal_threshold

LayerQuantizer = Callable[
    [str, Adder2d, ActivationObserver, int, PTQConfig], tuple[QuantAdder2d, dict[str, Any]]
]
METHODS: dict[str, LayerQuantizer] = {}
FULL_PRECISION = "fp"


def register_method(name: str) -> Callable[[LayerQuantizer], LayerQuantizer]:
    """Decorator adding a layer quantizer under ``name``."""
    if name == FULL_PRECISION:
        raise ValueError(f"{FULL_PRECISION!r} is reserved for the unquantized model")

    def add(fn: LayerQuantizer) -> LayerQuantizer:
        METHODS[name] = fn
        return fn

    return add


# Settings that choose a layer's bit width rather than how a layer is quantized at a width.
WIDTH_FIELDS = ("bits", "layer_bits", "mixed_precision", "avg_bits")


class LayerCache:
    """Quantized layers of one float model by (layer, bits, the other settings), so that
    configurations quantizing a layer the same way (a method's rows and the candidates of its
    mixed-precision allocations) share the work. Hands out copies: later steps (bias
    correction) change a layer in place."""

    def __init__(self) -> None:
        self._layers: dict[tuple, tuple[QuantAdder2d, dict[str, Any]]] = {}
        self._observers: dict[int, ActivationObserver] = {}  # keeps the keys' ids valid

    def quantize(
        self, name: str, layer: Adder2d, observer: ActivationObserver, bits: int,
        cfg: PTQConfig,
    ) -> tuple[QuantAdder2d, dict[str, Any]]:
        settings = {k: v for k, v in cfg.as_dict().items() if k not in WIDTH_FIELDS}
        key = (name, bits, json.dumps(settings, sort_keys=True, default=str), id(observer))
        if key not in self._layers:
            self._layers[key] = get_method(cfg.method)(name, layer, observer, bits, cfg)
            self._observers[id(observer)] = observer
        quant, report = self._layers[key]
        return copy.deepcopy(quant), copy.deepcopy(report)


def quantize_layer(
    name: str, layer: Adder2d, observer: ActivationObserver, bits: int, cfg: PTQConfig,
    cache: LayerCache | None = None,
) -> tuple[QuantAdder2d, dict[str, Any]]:
    """``layer`` quantized by ``cfg.method`` at ``bits`` (through ``cache`` if given)."""
    if cache is not None:
        return cache.quantize(name, layer, observer, bits, cfg)
    return get_method(cfg.method)(name, layer, observer, bits, cfg)


def get_method(name: str) -> LayerQuantizer:
    if name not in METHODS:
        raise ValueError(
            f"unknown quantization method {name!r}; choose one of {method_names()}"
        )
    return METHODS[name]


def method_names() -> tuple[str, ...]:
    """``fp`` and every registered method."""
    return (FULL_PRECISION, *METHODS)


@dataclass(frozen=True)
class ReproduceRow:
    """One method of the reproduce table: ``name`` (``method`` plus an optional hyphenated
    variant suffix), the registered ``method`` and the configuration ``overrides``; ``bits``
    is ``None`` for a row evaluated once (full precision). Rows with ``default`` false (the
    ablations) run only when asked for by name or with ``--methods all``."""

    name: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)
    bits: tuple[int, ...] | None = (8, 6, 5, 4, 3, 2)
    default: bool = True

    def widths(self, requested: Sequence[int]) -> list[int | None]:
        """The requested widths this row runs at (``[None]`` for a row run once; empty when
        it runs at none of them)."""
        return [None] if self.bits is None else [b for b in requested if b in self.bits]


REPRODUCE_ROWS: list[ReproduceRow] = []


def register_reproduce_row(row: ReproduceRow) -> None:
    """Add (or replace, by name) a row of ``adderquant reproduce``."""
    REPRODUCE_ROWS[:] = [r for r in REPRODUCE_ROWS if r.name != row.name] + [row]


def select_rows(names: list[str] | None) -> list[ReproduceRow]:
    """The rows named (in table order), every row for ``["all"]``, the default rows for
    ``None``."""
    if not names:
        return [r for r in REPRODUCE_ROWS if r.default]
    if names == ["all"]:
        return list(REPRODUCE_ROWS)
    unknown = sorted(set(names) - {r.name for r in REPRODUCE_ROWS})
    if unknown:
        raise ValueError(f"unknown rows {unknown}; choose from "
                         f"{[r.name for r in REPRODUCE_ROWS]} or 'all'")
    return [r for r in REPRODUCE_ROWS if r.name in names]


# --------------------------------------------------------------------------- helpers


def resolve_groups(cfg: PTQConfig, c_out: int) -> int:
    """The number of groups of a layer with ``c_out`` filters."""
    if not cfg.grouping:
        return 1
    g = c_out if cfg.groups == PER_CHANNEL else int(cfg.groups)
    if not 1 <= g <= c_out:
        raise ValueError(
            f"groups={g} exceeds the {c_out} output channels of a layer; use at most {c_out} "
            f"or {PER_CHANNEL!r}"
        )
    return g


def activation_threshold(observer: ActivationObserver, cfg: PTQConfig, bits: int) -> float:
    """The clipping threshold ``A`` of a layer's input under ``cfg.act_clip``."""
    if cfg.act_clip == "released":
        a = observer.threshold("released", cfg.act_quantile)
    elif cfg.act_clip == "quantile":
        a = observer.threshold("plain", cfg.act_quantile)
    elif cfg.act_clip == "max":
        a = max(abs(observer.max), abs(observer.min))
    else:
        a = mse_optimal_threshold(observer.sample, bits)
    return max(a, MIN_THRESHOLD)


def group_max_abs(weight: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
    """``max|W_g|`` of every group (float32, length G)."""
    per_filter = weight.detach().flatten(1).abs().amax(dim=1).float()
    out = torch.zeros(groups).scatter_reduce(0, group, per_filter, "amax", include_self=False)
    return out.clamp_min(MIN_THRESHOLD)


def layer_report(
    name: str,
    layer: Adder2d,
    quant: QuantAdder2d,
    observer: ActivationObserver,
    threshold: float,
    limit: torch.Tensor,
) -> dict[str, Any]:
    """Per-layer figures shared by the methods here (see :mod:`adderquant.quant.report`);
    ``limit``: the range ``s_g`` of every group (``Δ_g = s_g/(2^b − 1)``)."""
    w = layer.adder.detach().float()
    s = limit[quant.group].view(-1, 1, 1, 1)
    sizes = torch.bincount(quant.group, minlength=quant.num_groups)
    sample = observer.sample
    per_group_clipped = torch.stack([(sample > v).float().mean() for v in limit])
    return {
        "layer": name,
        "bits": quant.bits,
        "A": threshold,
        "act_max": observer.max,
        "group_sizes": sizes.tolist(),
        "ranges": limit.tolist(),
        "steps": quant.scale.tolist(),
        "weights_clamped": float((w.abs() > s).float().mean()),
        "acts_clipped": float((per_group_clipped * sizes).sum() / sizes.sum()),
    }


# --------------------------------------------------------------------------- methods


@register_method("paper")
def quantize_paper(
    name: str, layer: Adder2d, observer: ActivationObserver, bits: int, cfg: PTQConfig
) -> tuple[QuantAdder2d, dict[str, Any]]:
    """Nie et al. 2022: k-means groups of filters (``cfg.grouping``), group scale
    ``s_g = min(max|W_g|, A)`` with the lossless clamp of the weights into ``[−s_g, s_g]``
    (``cfg.weight_clamp``; off: ``s_g = max|W_g|``), ``A`` by ``cfg.act_clip``; unsigned
    activations of step ``Δ_g = s_g/(2^b − 1)``, signed weights of step ``2Δ_g``."""
    w = layer.adder.detach().float()
    groups = resolve_groups(cfg, w.shape[0])
    group = group_filters(w, groups, cfg.feature, cfg.seed)
    threshold = activation_threshold(observer, cfg, bits)
    w_max = group_max_abs(w, group, groups)
    zero = torch.zeros(groups, dtype=torch.int32)
    codes = CodeRange.paper(bits)
    if cfg.weight_clamp:
        limit = w_max.clamp_max(threshold)
        quant = QuantAdder2d.from_float(
            layer, group, limit / codes.act_max, zero, codes, -limit, limit
        )
    else:
        limit = w_max
        quant = QuantAdder2d.from_float(layer, group, limit / codes.act_max, zero, codes)
    return quant, layer_report(name, layer, quant, observer, threshold, limit)


@register_method("qssf")
def quantize_qssf(
    name: str, layer: Adder2d, observer: ActivationObserver, bits: int, cfg: PTQConfig
) -> tuple[QuantAdder2d, dict[str, Any]]:
    """One scale per layer shared by weights and activations (QSSF), taken from ``max|W|``,
    from ``max|X|`` or from the larger of the two (``cfg.qssf_source``); no grouping, no clamp:
    weights beyond the scale saturate in the quantizer. Same code ranges as ``paper``."""
    w = layer.adder.detach().float()
    w_max = float(w.abs().max())
    x_max = max(abs(observer.max), abs(observer.min), MIN_THRESHOLD)
    s = {"weights": w_max, "activations": x_max, "max": max(w_max, x_max)}[cfg.qssf_source]
    limit = torch.tensor([s])
    codes = CodeRange.paper(bits)
    group = torch.zeros(w.shape[0], dtype=torch.long)
    quant = QuantAdder2d.from_float(
        layer, group, limit / codes.act_max, torch.zeros(1, dtype=torch.int32), codes
    )
    return quant, layer_report(name, layer, quant, observer, x_max, limit)


# --------------------------------------------------------------------------- reproduce rows

for _row in (
    ReproduceRow("fp", FULL_PRECISION, bits=None),
    ReproduceRow("qssf", "qssf", {"qssf_source": "max", "bias_correction": "none"}),
    ReproduceRow("paper-faithful", "paper", dict(FAITHFUL)),
    ReproduceRow("paper", "paper", {}),
):
    register_reproduce_row(_row)

# The project's own method registers itself (and its reproduce rows) on import.
import adderquant.quant.qssf_repaired  # noqa: E402, F401
import adderquant.quant.samegrid  # noqa: E402, F401
