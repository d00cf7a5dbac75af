"""Build the compiled CPU kernels (plain C + OpenMP, loaded through ctypes, no libtorch): one
extension, ``adderquant.ops._kernels``, holding the adder kernel, the SAD convolution, the
requantization and the CPU-feature dispatch they share."""

from setuptools import Extension, setup

CSRC = "src/adderquant/ops/csrc"
SOURCES = ["module.c", "cpu_dispatch.c", "adder_kernel.c", "sad_kernel.c", "requant.c",
           "fakequant.c"]
COMPILE_ARGS = ["-O3", "-fopenmp", "-std=c11", "-fno-math-errno", "-Wall"]
LINK_ARGS = ["-fopenmp"]

setup(
    ext_modules=[
        Extension(
            "adderquant.ops._kernels",
            sources=[f"{CSRC}/{name}" for name in SOURCES],
            depends=[f"{CSRC}/kernel_common.h", f"{CSRC}/sad_layout.h"],
            extra_compile_args=COMPILE_ARGS,
            extra_link_args=LINK_ARGS,
        ),
    ]
)
