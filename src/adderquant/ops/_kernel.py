"""ctypes bindings of the compiled adder kernel and the choice of its instruction-set path.

The path is an argument of every kernel call, taken from :func:`use_simd` (a context manager,
per thread and task, as ``contextvars`` go) or else the best one this CPU supports.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from adderquant.ops import _loader
from adderquant.ops._loader import load_library
from adderquant.ops.geometry import Geometry

__all__ = [
    "SIMD_PATHS", "Geometry", "backward", "forward", "load_library", "select_simd", "simd_path",
    "use_simd",
]

SIMD_PATHS = ("avx512", "avx2", "portable")
_chosen: contextvars.ContextVar[str | None] = contextvars.ContextVar("adder_simd", default=None)


def _checked(name: str) -> str | None:
    """``name`` if this CPU runs it, ``None`` for ``auto``; else a clear error."""
    if name == "auto":
        return None
    if name not in SIMD_PATHS:
        raise ValueError(f"unknown SIMD path {name!r}; choose auto or one of {SIMD_PATHS}")
    if name not in _loader.available_paths():
        raise RuntimeError(f"this CPU does not support the {name} SIMD path")
    return name


def simd_path() -> str:
    """The instruction-set path the kernel uses here: ``avx512``, ``avx2`` or ``portable``."""
    return _chosen.get() or _loader.best_path()


@contextlib.contextmanager
def use_simd(name: str) -> Iterator[None]:
    """Run the block on the path ``name`` of :data:`SIMD_PATHS` (``auto``: the best this CPU
    supports), then return to the previous choice."""
    token = _chosen.set(_checked(name))
    try:
        yield
    finally:
        _chosen.reset(token)


def select_simd(name: str) -> None:
    """Choose the path ``name`` (``auto``: the best) for the current context until the next
    choice; prefer :func:`use_simd`, which restores the previous one."""
    _chosen.set(_checked(name))


def _path_id() -> int:
    name = _chosen.get()
    return -1 if name is None else _loader.PATHS.index(name)


def _suffix(t: torch.Tensor) -> str:
    return "f64" if t.dtype == torch.float64 else "f32"


def forward(geom: Geometry, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``-sum |x - w|`` per window; x and w contiguous, same dtype."""
    y = torch.empty(geom.n, geom.c_out, geom.h_out, geom.w_out, dtype=x.dtype)
    fn = getattr(_loader.library(), f"adder_forward_{_suffix(x)}")
    _loader.check(fn(geom, x.data_ptr(), w.data_ptr(), y.data_ptr(), _path_id(),
                     torch.get_num_threads()), "adder2d")
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
    fn = getattr(_loader.library(), f"adder_backward_{_suffix(x)}")
    _loader.check(fn(geom, x.data_ptr(), w.data_ptr(), grad_out.data_ptr(),
                     gx.data_ptr() if gx is not None else None,
                     gw.data_ptr() if gw is not None else None,
                     int(exact), _path_id(), torch.get_num_threads()), "adder2d backward")
    return gx, gw
