"""Build the compiled CPU kernels (plain C + OpenMP, loaded through ctypes, no libtorch)."""

from setuptools import Extension, setup

COMPILE_ARGS = ["-O3", "-fopenmp", "-std=c11", "-fno-math-errno", "-Wall"]
LINK_ARGS = ["-fopenmp"]

setup(
    ext_modules=[
        Extension(
            "adderquant.ops._adder_kernel",
            sources=["src/adderquant/ops/csrc/adder_kernel.c"],
            extra_compile_args=COMPILE_ARGS,
            extra_link_args=LINK_ARGS,
        ),
        Extension(
            "adderquant.quant._fakequant_kernel",
            sources=["src/adderquant/quant/csrc/fakequant_kernel.c"],
            extra_compile_args=COMPILE_ARGS,
            extra_link_args=LINK_ARGS,
        ),
        Extension(
            "adderquant.engine._sad_kernel",
            sources=["src/adderquant/engine/csrc/sad_kernel.c"],
            extra_compile_args=COMPILE_ARGS,
            extra_link_args=LINK_ARGS,
        ),
    ]
)
