"""The quantization methods, listed in one place: a configuration class and a layer quantizer.

A new method is a configuration dataclass (a subclass of
:class:`~adderquant.quant.config.QuantConfig` naming itself in ``method``), a layer quantizer
``quantizer(name, layer, observer, bits, cfg) -> (QuantAdder2d, report)`` and one entry in
:data:`METHODS`; the command line and :func:`adderquant.quantize` then know it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adderquant.nn import Adder2d
from adderquant.quant.calibrate import ActivationObserver
from adderquant.quant.config import AdderQuantConfig, PaperConfig, QSSFConfig, QuantConfig
from adderquant.quant.layers import QuantAdder2d
from adderquant.quant.methods import quantize_paper, quantize_qssf
from adderquant.quant.samegrid import quantize_adderquant

LayerQuantizer = Callable[
    [str, Adder2d, ActivationObserver, int, Any], tuple[QuantAdder2d, dict[str, Any]]
]


@dataclass(frozen=True)
class Method:
    """A quantization method: its configuration class and its layer quantizer."""

    config: type[QuantConfig]
    quantize_layer: LayerQuantizer

    @property
    def name(self) -> str:
        return self.config.method


METHODS: dict[str, Method] = {
    m.name: m for m in (
        Method(PaperConfig, quantize_paper),
        Method(QSSFConfig, quantize_qssf),
        Method(AdderQuantConfig, quantize_adderquant),
    )
}


def method_names() -> tuple[str, ...]:
    """The names of the registered methods."""
    return tuple(METHODS)


def get_method(name: str) -> Method:
    """The method called ``name``; an unknown name is a ``ValueError`` listing the known."""
    if name not in METHODS:
        raise ValueError(f"unknown quantization method {name!r}; choose one of {method_names()}")
    return METHODS[name]


def method_of(cfg: QuantConfig) -> Method:
    """The registered method ``cfg`` configures (``cfg`` must be an instance of its class)."""
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"expected a quantization configuration (one of "
                        f"{[m.config.__name__ for m in METHODS.values()]}), got "
                        f"{type(cfg).__name__}")
    method = get_method(cfg.method)
    if not isinstance(cfg, method.config):
        raise TypeError(f"{type(cfg).__name__} is not the registered configuration of method "
                        f"{cfg.method!r} ({method.config.__name__})")
    return method


def config_from_dict(data: dict[str, Any], default_method: str = PaperConfig.method) -> QuantConfig:
    """The configuration of ``data["method"]`` (else ``default_method``) with the other
    fields of ``data``."""
    method = get_method(data.get("method", default_method))
    return method.config.from_dict({k: v for k, v in data.items() if k != "method"})


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
        cfg: QuantConfig,
    ) -> tuple[QuantAdder2d, dict[str, Any]]:
        settings = {k: v for k, v in cfg.as_dict().items() if k not in WIDTH_FIELDS}
        key = (name, bits, json.dumps(settings, sort_keys=True, default=str), id(observer))
        if key not in self._layers:
            self._layers[key] = method_of(cfg).quantize_layer(name, layer, observer, bits, cfg)
            self._observers[id(observer)] = observer
        quant, report = self._layers[key]
        return copy.deepcopy(quant), copy.deepcopy(report)


def quantize_layer(
    name: str, layer: Adder2d, observer: ActivationObserver, bits: int, cfg: QuantConfig,
    cache: LayerCache | None = None,
) -> tuple[QuantAdder2d, dict[str, Any]]:
    """``layer`` quantized by the method of ``cfg`` at ``bits`` (through ``cache`` if given)."""
    if cache is not None:
        return cache.quantize(name, layer, observer, bits, cfg)
    return method_of(cfg).quantize_layer(name, layer, observer, bits, cfg)
