"""adderquant: fast kernels, training and low-bit quantization for adder neural networks."""

__version__ = "0.1.0"
