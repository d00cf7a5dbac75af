"""Quantization of adder networks: integer grids, grouping, lossless clamp, calibration, PTQ."""

from adderquant.quant.calibrate import ActivationObserver, calibrate
from adderquant.quant.clamp import lossless_clamp
from adderquant.quant.grid import CodeRange, check_bits
from adderquant.quant.grouping import group_filters, kmeans_groups
from adderquant.quant.layers import QuantAdder2d, adder_layers, replace_module

__all__ = [
    "ActivationObserver",
    "CodeRange",
    "QuantAdder2d",
    "adder_layers",
    "calibrate",
    "check_bits",
    "group_filters",
    "kmeans_groups",
    "lossless_clamp",
    "replace_module",
]
