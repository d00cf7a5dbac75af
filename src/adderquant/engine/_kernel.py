"""ctypes bindings of the compiled SAD kernel (``adderquant.engine._sad_kernel``)."""

from __future__ import annotations

import ctypes
import importlib.util
from functools import cache

_I64 = ctypes.c_int64
_INT = ctypes.c_int
_PTR = ctypes.c_void_p

_GEOMETRY = [_I64, _I64, _I64, _I64, _I64, _I64]  # kh, kw, sh, sw, ph, pw
_SAD_ARGS = ([_PTR, _I64, _I64, _I64, _I64, _PTR, _I64] + _GEOMETRY  # x, n, c, h, w, weight, t
             + [_INT, _PTR, _I64, _PTR, _INT, _INT])  # pad, out_index, out_channels, out, path,
#                                                       threads

# Return and argument types of every exported function, by name.
_SIGNATURES: dict[str, tuple[type | None, list]] = {
    "sad_available_paths": (_INT, []),
    "sad_best_path": (_INT, []),
    "sad_packed_bytes": (_I64, [_I64, _I64, _I64] + _GEOMETRY),  # c, h, w, geometry
    "sad_conv2d": (_INT, _SAD_ARGS),
    "sad_conv2d_packed": (_INT, _SAD_ARGS),
    "sad_pack": (_INT, [_PTR, _I64, _I64, _I64, _I64] + _GEOMETRY + [_INT, _PTR, _INT]),
    "pack_codes": (
        _INT,
        [_INT, _PTR, _I64, _I64, _I64, _I64, _I64,  # kind, values, n, c, h, w, groups
         _PTR, _PTR, _PTR, _PTR, _PTR, _PTR,  # scale, mult, offset, shift, divisor, zero
         _INT, _INT] + _GEOMETRY + [_PTR, _INT],  # qmax, relu, geometry, out, threads
    ),
    "float_to_stream": (None, [_PTR, _I64, _INT, _PTR, _INT]),  # x, count, frac bits, out,
    #                                                             threads
    "requant_fixed": (
        None,
        [_PTR, _I64, _I64, _I64,  # in, n, channels, pixels
         _PTR, _PTR, _PTR, _PTR, _INT, _PTR, _INT],  # mult, offset, shift, residual, relu, out,
    ),                                              # threads
    "sums_to_float": (
        None,
        [_PTR, _I64, _I64, _I64,  # in, n, channels, pixels
         _PTR, _PTR, _PTR, _PTR, _INT],  # excess, step, bias, out, threads
    ),
}

ERRORS = {
    -1: "the requested SAD kernel path is not available on this CPU",
    -2: "out of memory while packing the SAD kernel's operands",
    -3: "invalid convolution geometry",
    -4: "NaN or infinite values cannot be quantized to codes",
}


@cache
def library() -> ctypes.CDLL:
    """The loaded shared library with argument and return types declared."""
    spec = importlib.util.find_spec("adderquant.engine._sad_kernel")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the compiled SAD kernel is missing; build it with "
            "`python setup.py build_ext --inplace` (or `make install`)"
        )
    lib = ctypes.CDLL(spec.origin)
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


class NonFiniteInputError(ValueError):
    """Values that are NaN or infinite have no integer code."""


NONFINITE = -4


def check(code: int, what: str) -> None:
    """Raise ``RuntimeError`` for a negative status code returned by the kernel
    (:class:`NonFiniteInputError` for NaN or infinite inputs)."""
    if code == NONFINITE:
        raise NonFiniteInputError(f"{what}: {ERRORS[code]}")
    if code < 0:
        raise RuntimeError(f"{what}: {ERRORS.get(code, f'kernel error {code}')}")
