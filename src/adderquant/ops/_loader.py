"""The one ctypes loader of the compiled kernels (``adderquant.ops._kernels``): the adder
kernel, the SAD convolution, the requantization, the fused fake quantization of training and
their shared CPU-feature dispatch.

Every C function that can fail returns 0 or a negative status code (``csrc/kernel_common.h``);
:func:`check` turns one into an exception. Instruction-set paths are named by :data:`PATHS`
(the C enumeration's order, narrowest first).
"""

from __future__ import annotations

import ctypes
import importlib.util
from collections.abc import Iterable
from functools import cache

from adderquant.ops.geometry import Geometry

EXTENSION = "adderquant.ops._kernels"
PATHS = ("portable", "avx2", "avx512")

_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_GEOM = ctypes.POINTER(Geometry)
_CONV = [_I64, _I64, _I64, _I64, _I64, _I64]  # kh, kw, sh, sw, ph, pw
_SAD = ([_PTR, _I64, _I64, _I64, _I64, _PTR, _I64] + _CONV  # x, n, c, h, w, weight, t
        + [_INT, _PTR, _I64, _PTR, _INT, _INT])  # pad, out_index, out_channels, out, path,
#                                                  threads

# Return and argument types of every exported function, by name.
SIGNATURES: dict[str, tuple[type | None, list]] = {
    "kernel_available_paths": (_INT, []),
    "kernel_best_path": (_INT, []),
    **{f"adder_forward_{t}": (_INT, [_GEOM, _PTR, _PTR, _PTR, _INT, _INT])  # path, threads
       for t in ("f32", "f64")},
    **{f"adder_backward_{t}": (_INT, [_GEOM, _PTR, _PTR, _PTR, _PTR, _PTR, _INT, _INT, _INT])
       for t in ("f32", "f64")},  # x, w, gy, gx, gw, exact, path, threads
    "sad_packed_bytes": (_I64, [_I64, _I64, _I64] + _CONV),  # c, h, w, geometry
    "sad_conv2d": (_INT, _SAD),
    "sad_conv2d_packed": (_INT, _SAD),
    "sad_conv2d_packed_grids": (
        _INT,
        [_PTR, _I64, _I64, _I64, _I64, _I64,  # packed, grids, n, c, h, w
         _PTR, _PTR] + _CONV  # weight, filters per grid, geometry
        + [_PTR, _PTR, _I64, _PTR, _INT, _INT],  # pad codes, out_index, out_channels, out,
    ),                                            # path, threads
    "sad_pack": (_INT, [_PTR, _I64, _I64, _I64, _I64] + _CONV + [_INT, _PTR, _INT]),
    "pack_codes": (
        _INT,
        [_INT, _PTR, _I64, _I64, _I64, _I64, _I64,  # kind, values, n, c, h, w, groups
         _PTR, _PTR, _PTR, _PTR, _PTR, _PTR,  # scale, mult, offset, shift, divisor, zero
         _INT, _INT] + _CONV + [_PTR, _INT],  # qmax, relu, geometry, out, threads
    ),
    "float_to_stream": (None, [_PTR, _I64, _INT, _PTR, _INT]),  # x, count, frac bits, out,
    #                                                             threads
    "requant_fixed": (
        None,
        [_PTR, _I64, _I64, _I64,  # in, n, channels, pixels
         _PTR, _PTR, _PTR, _PTR, _INT, _PTR, _INT],  # mult, offset, shift, residual, relu, out,
    ),                                              # threads
    "fq_act_forward": (None, [_PTR, _I64, _I64, _I64,  # x, n, inner, grids
                              _PTR, _PTR, _PTR, _INT, _PTR, _INT]),  # step, lo, hi, dequant,
    #                                                                  out, threads
    "fq_act_backward": (None, [_PTR, _PTR, _I64, _I64, _I64,  # x, grad, n, inner, grids
                               _PTR, _PTR, _PTR, _PTR, _PTR, _INT]),  # step, lo, hi, grad_x,
    #                                                                   step_grad, threads
    "sums_to_float": (
        None,
        [_PTR, _I64, _I64, _I64,  # in, n, channels, pixels
         _PTR, _PTR, _PTR, _PTR, _INT],  # excess, step, bias, out, threads
    ),
    "sums_to_bn": (
        None,
        [_PTR, _I64, _I64, _I64,  # in, n, channels, pixels
         _PTR, _PTR, _PTR, _PTR, _PTR,  # excess, step, bias, alpha, beta
         _PTR, _INT, _PTR, _INT],  # residual, relu, out, threads
    ),
}

PATH_UNAVAILABLE, NO_MEMORY, BAD_GEOMETRY, NONFINITE = -1, -2, -3, -4


class KernelError(RuntimeError):
    """A compiled kernel refused its arguments or could not run them."""


class NonFiniteInputError(ValueError):
    """Values that are NaN or infinite have no integer code."""


def open_library(path: str, names: Iterable[str] | None = None) -> ctypes.CDLL:
    """The kernel library at ``path`` with the types of its functions declared: all of
    :data:`SIGNATURES`, or only ``names`` (e.g. for an older build that lacks some)."""
    lib = ctypes.CDLL(path)
    for name in SIGNATURES if names is None else names:
        restype, argtypes = SIGNATURES[name]
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


def load_library(extension: str = EXTENSION) -> ctypes.CDLL:
    """Open the compiled extension ``extension`` (see :func:`open_library`)."""
    spec = importlib.util.find_spec(extension)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"the compiled kernels {extension} are missing; build them with `make install` "
            "(or `python setup.py build_ext --inplace`) in the repository root"
        )
    return open_library(spec.origin)


library = cache(load_library)


def check(status: int, what: str) -> None:
    """Raise for a negative status code of a kernel call named ``what``: ``MemoryError``,
    :class:`NonFiniteInputError` for NaN or infinite inputs, else :class:`KernelError`."""
    if status >= 0:
        return
    if status == NO_MEMORY:
        raise MemoryError(f"{what}: out of memory for the kernel's work buffers")
    if status == NONFINITE:
        raise NonFiniteInputError(f"{what}: NaN or infinite values cannot be quantized to codes")
    if status == PATH_UNAVAILABLE:
        raise KernelError(f"{what}: the requested kernel path is not available on this CPU")
    if status == BAD_GEOMETRY:
        raise KernelError(f"{what}: invalid convolution geometry")
    raise KernelError(f"{what}: kernel error {status}")


def available_paths() -> tuple[str, ...]:
    """The instruction-set paths this CPU can run, narrowest first."""
    mask = library().kernel_available_paths()
    return tuple(name for bit, name in enumerate(PATHS) if mask >> bit & 1)


def best_path() -> str:
    """The widest path this CPU can run (the one used when none is chosen)."""
    return PATHS[library().kernel_best_path()]
