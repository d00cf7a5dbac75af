"""Quantization of adder networks: integer grids, grouping, lossless clamp, calibration, PTQ,
QAT."""

from adderquant.quant.calibrate import ActivationObserver, calibrate
from adderquant.quant.clamp import lossless_clamp
from adderquant.quant.config import PTQConfig
from adderquant.quant.grid import CodeRange, check_bits
from adderquant.quant.grouping import group_filters, kmeans_groups
from adderquant.quant.layers import QuantAdder2d, adder_layers, replace_module
from adderquant.quant.ptq import CalibrationSet, ptq
from adderquant.quant.qat import qat
from adderquant.quant.qat_config import QATConfig

__all__ = [
    "ActivationObserver",
    "CalibrationSet",
    "CodeRange",
    "PTQConfig",
    "QATConfig",
    "QuantAdder2d",
    "adder_layers",
    "calibrate",
    "check_bits",
    "group_filters",
    "kmeans_groups",
    "lossless_clamp",
    "ptq",
    "qat",
    "replace_module",
]
