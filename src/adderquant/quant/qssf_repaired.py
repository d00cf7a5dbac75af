"""The shared-scale baseline (QSSF) at its strongest fair setting.

Per layer, one scale shared by weights and inputs as in ``qssf``, taken from whichever of its
two sources, ``max|W|`` (few input levels survive) or ``max|X|`` (most weights saturate), gives
the smaller output error on the calibration inputs kept by the observer; the error is measured
with each channel's mean removed, because the bias correction that follows (the repair the
paper's method gets) removes that part. :class:`QSSFRepairedConfig` runs it with that bias
correction (its default); the faithful baseline is the row ``qssf``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from adderquant.nn import Adder2d
from adderquant.quant.calibrate import ActivationObserver
from adderquant.quant.config import QSSFConfig, QuantConfig
from adderquant.quant.layers import QuantAdder2d
from adderquant.quant.methods import quantize_qssf

SOURCES = ("weights", "activations")


@dataclass(kw_only=True)
class QSSFRepairedConfig(QuantConfig):
    """The shared scale of ``qssf`` from the better of its sources per layer, followed by
    per-channel bias correction on float inputs (the shared settings' default)."""

    method: ClassVar[str] = "qssf-repaired"


@torch.no_grad()
def centred_error(float_layer: Adder2d, quant: QuantAdder2d, x: torch.Tensor) -> float:
    """``Σ (e − ē_c)²`` of the output error ``e = layer(x) − quant(x)``, ``ē_c`` its mean per
    output channel (float64)."""
    e = (float_layer(x) - quant(x)).double()
    return float((e - e.mean(dim=(0, 2, 3), keepdim=True)).pow(2).sum())


def quantize_qssf_repaired(
    name: str, layer: Adder2d, observer: ActivationObserver, bits: int, cfg: QSSFRepairedConfig
) -> tuple[QuantAdder2d, dict[str, Any]]:
    """``qssf`` with the better of its scale sources for this layer (see the module)."""
    x = observer.kept_inputs
    if x.numel() == 0:
        raise ValueError(f"qssf-repaired needs calibration inputs kept for layer {name!r}; "
                         "set report_images to at least 1")
    shared = {f.name: getattr(cfg, f.name) for f in fields(QuantConfig)}
    best = None
    for source in SOURCES:
        quant, report = quantize_qssf(name, layer, observer, bits,
                                      QSSFConfig(**shared, qssf_source=source))
        error = centred_error(layer, quant, x)
        if best is None or error < best[0]:
            best = (error, quant, {**report, "qssf_source": source})
    return best[1], best[2]

