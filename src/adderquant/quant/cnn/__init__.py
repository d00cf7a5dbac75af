"""Post-training quantization of convolutional networks (the CNN side of the comparison)."""

from adderquant.quant.cnn.layers import QuantConv2d, fold_batchnorm
from adderquant.quant.cnn.ptq import (
    CNN_METHODS,
    CNNPTQConfig,
    calibrate_cnn,
    cnn_ptq,
    quantizable_convs,
    quantize_cnn,
)

__all__ = [
    "CNN_METHODS",
    "CNNPTQConfig",
    "QuantConv2d",
    "calibrate_cnn",
    "cnn_ptq",
    "fold_batchnorm",
    "quantizable_convs",
    "quantize_cnn",
]
