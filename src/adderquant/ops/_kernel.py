"""ctypes bindings of the compiled adder kernel (``adderquant.ops._adder_kernel``)."""

from __future__ import annotations

import ctypes
import importlib.util
from functools import cache

import torch

_EXTENSION = "adderquant.ops._adder_kernel"
SIMD_PATHS = ("avx512", "avx2", "portable")
# Status codes of the C functions (0: success).
_NO_MEMORY, _UNKNOWN_PATH, _UNSUPPORTED_PATH = 1, 2, 3


class Geometry(ctypes.Structure):
    """Shapes of one call (``adder_geometry`` in adder_kernel.c)."""

    _fields_ = [
        (name, ctypes.c_int64)
        for name in (
            "n", "c_in", "h", "w", "c_out", "kh", "kw", "stride_h", "stride_w", "pad_h",
            "pad_w", "dil_h", "dil_w", "groups", "h_out", "w_out",
        )
    ]


def load_library(extension: str = _EXTENSION) -> ctypes.CDLL:
    """Open the compiled extension ``extension`` with ctypes and declare its functions."""
    spec = importlib.util.find_spec(extension)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"the compiled adder kernel {extension} is missing; build it with `make install` "
            "(or `python setup.py build_ext --inplace`) in the repository root"
        )
    lib = ctypes.CDLL(spec.origin)
    ptr, geom, i32 = ctypes.c_void_p, ctypes.POINTER(Geometry), ctypes.c_int
    for suffix in ("f32", "f64"):
        getattr(lib, f"adder_forward_{suffix}").argtypes = [geom, ptr, ptr, ptr, i32]
        getattr(lib, f"adder_backward_{suffix}").argtypes = [
            geom, ptr, ptr, ptr, ptr, ptr, i32, i32,
        ]
    lib.adder_simd_path.restype = ctypes.c_char_p
    lib.adder_select_simd.argtypes = [ctypes.c_char_p]
    return lib


_library = cache(load_library)


def _check(status: int) -> None:
    if status == _NO_MEMORY:
        raise MemoryError("adder2d: out of memory for the per-thread work buffers")
    if status:
        raise RuntimeError(f"adder kernel failed with status {status}")


def _suffix(t: torch.Tensor) -> str:
    return "f64" if t.dtype == torch.float64 else "f32"


def simd_path() -> str:
    """The instruction-set path the kernel uses: ``avx512``, ``avx2`` or ``portable``."""
    return _library().adder_simd_path().decode()


def select_simd(name: str) -> None:
    """Force a path of :data:`SIMD_PATHS` (``auto``: the best this CPU supports)."""
    status = _library().adder_select_simd(name.encode())
    if status == _UNKNOWN_PATH:
        raise ValueError(f"unknown SIMD path {name!r}; choose auto or one of {SIMD_PATHS}")
    if status == _UNSUPPORTED_PATH:
        raise RuntimeError(f"this CPU does not support the {name} SIMD path")
    _check(status)


def forward(geom: Geometry, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``-sum |x - w|`` per window; x and w contiguous, same dtype."""
    y = torch.empty(geom.n, geom.c_out, geom.h_out, geom.w_out, dtype=x.dtype)
    fn = getattr(_library(), f"adder_forward_{_suffix(x)}")
    _check(fn(ctypes.byref(geom), x.data_ptr(), w.data_ptr(), y.data_ptr(),
              torch.get_num_threads()))
    return y


def backward(
    geom: Geometry,
    x: torch.Tensor,
    w: torch.Tensor,
    grad_out: torch.Tensor,
    need_input: bool,
    need_weight: bool,
    exact: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(grad_x, grad_w)``: AdderNet's ``sum clamp(w - x, -1, 1) g`` and ``sum (x - w) g``
    (unscaled), or with ``exact`` the sign gradients; ``None`` where not needed."""
    gx = torch.empty_like(x) if need_input else None
    gw = torch.empty_like(w) if need_weight else None
    fn = getattr(_library(), f"adder_backward_{_suffix(x)}")
    _check(fn(ctypes.byref(geom), x.data_ptr(), w.data_ptr(), grad_out.data_ptr(),
              gx.data_ptr() if gx is not None else None,
              gw.data_ptr() if gw is not None else None,
              int(exact), torch.get_num_threads()))
    return gx, gw
