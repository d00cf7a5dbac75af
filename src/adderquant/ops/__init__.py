"""Adder operators: ``adder2d`` (compiled CPU kernel) and its plain PyTorch reference."""

from adderquant.ops.adder import adder2d
from adderquant.ops.reference import adder2d_reference

__all__ = ["adder2d", "adder2d_reference"]
