"""The shared-scale baseline (QSSF) at its strongest fair setting.

Per layer, one scale shared by weights and inputs as in ``qssf``, taken from whichever of its
two sources, ``max|W|`` (few input levels survive) or ``max|X|`` (most weights saturate), gives
the smaller output error on the calibration inputs kept by the observer; the error is measured
with each channel's mean removed, because the bias correction that follows (the repair the
paper's method gets) removes that part. The row ``qssf-repaired`` runs it with that bias
correction; the faithful baseline is the row ``qssf``.
"""

from __future__ import annotations

from typing import Any

import torch

from adderquant.nn import Adder2d
from adderquant.quant.calibrate import ActivationObserver
from adderquant.quant.config import PTQConfig
from adderquant.quant.layers import QuantAdder2d
from adderquant.quant.methods import (
    ReproduceRow,
    quantize_qssf,
    register_method,
    register_reproduce_row,
)

SOURCES = ("weights", "activations")


@torch.no_grad()
def centred_error(float_layer: Adder2d, quant: QuantAdder2d, x: torch.Tensor) -> float:
    """``Σ (e − ē_c)²`` of the output error ``e = layer(x) − quant(x)``, ``ē_c`` its mean per
    output channel (float64)."""
    e = (float_layer(x) - quant(x)).double()
    return float((e - e.mean(dim=(0, 2, 3), keepdim=True)).pow(2).sum())


@register_method("qssf-repaired")
def quantize_qssf_repaired(
    name: str, layer: Adder2d, observer: ActivationObserver, bits: int, cfg: PTQConfig
) -> tuple[QuantAdder2d, dict[str, Any]]:
    """``qssf`` with the better of its scale sources for this layer (see the module)."""
    x = observer.kept_inputs
    if x.numel() == 0:
        raise ValueError(f"qssf-repaired needs calibration inputs kept for layer {name!r}; "
                         "set report_images to at least 1")
    best = None
    for source in SOURCES:
        quant, report = quantize_qssf(name, layer, observer, bits,
                                      cfg.replace(qssf_source=source))
        error = centred_error(layer, quant, x)
        if best is None or error < best[0]:
            best = (error, quant, {**report, "qssf_source": source})
    return best[1], best[2]


register_reproduce_row(ReproduceRow("qssf-repaired", "qssf-repaired",
                                    {"bias_correction": "float-input"}, default=False))
