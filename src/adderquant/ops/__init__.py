"""Kernels and their Python faces: ``adder2d`` (compiled CPU kernel, Triton on CUDA) and its
plain PyTorch reference, and ``sad_conv2d``, the uint8 SAD convolution of the integer engine.
Importing this package registers the custom operators ``torch.ops.adderquant.*``."""

from adderquant.ops.adder import adder2d
from adderquant.ops.reference import adder2d_reference
from adderquant.ops.sad import sad_conv2d

__all__ = ["adder2d", "adder2d_reference", "sad_conv2d"]
