"""The adder-layer shapes of ResNet-20 on CIFAR (32x32 inputs), shared by the benchmarks."""

# (name, C_in, C_out, kernel, stride, input size)
SHAPES = (
    ("16-16 3x3 s1 32x32", 16, 16, 3, 1, 32),
    ("16-32 3x3 s2 32x32", 16, 32, 3, 2, 32),
    ("32-32 3x3 s1 16x16", 32, 32, 3, 1, 16),
    ("32-64 3x3 s2 16x16", 32, 64, 3, 2, 16),
    ("64-64 3x3 s1 8x8", 64, 64, 3, 1, 8),
    ("16-32 1x1 s2 32x32", 16, 32, 1, 2, 32),
    ("32-64 1x1 s2 16x16", 32, 64, 1, 2, 16),
)
