"""Neural-network layers built on the adder operators."""

from adderquant.nn.adder import Adder2d

__all__ = ["Adder2d"]
