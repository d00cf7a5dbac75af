"""adderquant: fast kernels, training and low-bit quantization for adder neural networks.

Quantizing a model takes three lines::

    import adderquant
    config = adderquant.AdderQuantConfig(bits=4)
    qmodel = adderquant.quantize(model, config, adderquant.CalibrationSet.from_config(config))

The names below are imported on first use, so that ``import adderquant`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "quantize": "adderquant.quant.ptq",
    "CalibrationSet": "adderquant.quant.ptq",
    "QuantConfig": "adderquant.quant.config",
    "PaperConfig": "adderquant.quant.config",
    "QSSFConfig": "adderquant.quant.config",
    "AdderQuantConfig": "adderquant.quant.config",
    "integer_path": "adderquant.quant.layers",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'adderquant' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
