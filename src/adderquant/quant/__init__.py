"""Quantization of adder networks: integer grids, grouping, lossless clamp, calibration, PTQ,
QAT."""

from adderquant.quant.calibrate import ActivationObserver, calibrate
from adderquant.quant.clamp import lossless_clamp
from adderquant.quant.config import AdderQuantConfig, PaperConfig, QSSFConfig, QuantConfig
from adderquant.quant.grid import CodeRange, check_bits
from adderquant.quant.grouping import group_filters, kmeans_groups
from adderquant.quant.layers import QuantAdder2d, adder_layers, integer_path, replace_module
from adderquant.quant.ptq import CalibrationSet, quantize, quantize_with_report
from adderquant.quant.qat import qat
from adderquant.quant.qat_config import QATConfig

__all__ = [
    "ActivationObserver",
    "AdderQuantConfig",
    "CalibrationSet",
    "CodeRange",
    "PaperConfig",
    "QATConfig",
    "QSSFConfig",
    "QuantAdder2d",
    "QuantConfig",
    "adder_layers",
    "calibrate",
    "check_bits",
    "group_filters",
    "integer_path",
    "kmeans_groups",
    "lossless_clamp",
    "qat",
    "quantize",
    "quantize_with_report",
    "replace_module",
]
