"""``sad_conv2d``: the integer adder layer ``Σ|q_x − q_w|`` over uint8 codes, int32 results.

``sad_conv2d`` takes NCHW codes; ``sad_conv2d_packed`` takes images already in the kernel's
packed layout (see ``csrc/sad_layout.h``), as the engine's code producers write them, and
``pack`` converts NCHW codes to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.modules.utils import _pair

from adderquant.ops._loader import PATHS, available_paths, best_path, check, library

__all__ = [
    "PATHS", "ConvGeometry", "active_path", "available_paths", "output_size", "pack",
    "packed_bytes", "sad_conv2d", "sad_conv2d_packed",
]


def active_path() -> str:
    """The path ``sad_conv2d`` uses when none is forced (the widest available)."""
    return best_path()


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel size, stride and padding of an adder layer, each (rows, columns)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]

    def args(self) -> tuple[int, ...]:
        return (*self.kernel, *self.stride, *self.padding)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return (output_size(h, self.kernel[0], self.stride[0], self.padding[0]),
                output_size(w, self.kernel[1], self.stride[1], self.padding[1]))


def packed_bytes(channels: int, h: int, w: int, geometry: ConvGeometry) -> int:
    """Bytes of one image of ``channels`` x ``h`` x ``w`` codes packed for ``geometry``."""
    size = library().sad_packed_bytes(channels, h, w, *geometry.args())
    check(size, "packed_bytes")
    return size


def pack(codes: torch.Tensor, geometry: ConvGeometry, pad_code: int = 0,
         threads: int | None = None) -> torch.Tensor:
    """NCHW uint8 ``codes`` in the packed layout for ``geometry``: (N, packed_bytes)."""
    _check_code_tensor("codes", codes)
    _check_pad_code(pad_code)
    n, c, h, w = codes.shape
    out = torch.empty(n, packed_bytes(c, h, w, geometry), dtype=torch.uint8)
    codes = codes.contiguous()
    check(library().sad_pack(codes.data_ptr(), n, c, h, w, *geometry.args(), pad_code,
                             out.data_ptr(), threads or torch.get_num_threads()), "pack")
    return out


def sad_conv2d_packed(
    packed: torch.Tensor,
    shape: tuple[int, int, int],
    weight_codes: torch.Tensor,
    geometry: ConvGeometry,
    pad_code: int,
    *,
    out: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
    path: str | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """``sad_conv2d`` of images of ``shape`` (C, H, W) already packed for ``geometry``
    (``packed``: (N, packed_bytes) uint8 with ``pad_code`` in every padding position)."""
    c, h, w = shape
    _check_pad_code(pad_code)
    if weight_codes.dtype != torch.uint8 or tuple(weight_codes.shape[1:]) != (c, *geometry.kernel):
        raise ValueError(f"sad_conv2d_packed: weight_codes must be uint8 (T, {c}, "
                         f"{geometry.kernel[0]}, {geometry.kernel[1]}), got "
                         f"{weight_codes.dtype} {tuple(weight_codes.shape)}")
    size = packed_bytes(c, h, w, geometry)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != size:
        raise ValueError(f"sad_conv2d_packed: packed must be uint8 (N, {size}), got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    n, t = packed.shape[0], weight_codes.shape[0]
    out, out_index = _check_output(out, out_index, n, t, *geometry.output_size(h, w))
    _sad_conv2d_packed_op(packed, [c, h, w], weight_codes, geometry.args(), pad_code, out_index,
                          _path_id(path), threads or 0, out)
    return out


def sad_conv2d_packed_grids(
    packed: torch.Tensor,
    shape: tuple[int, int, int],
    weight_codes: torch.Tensor,
    filters: torch.Tensor,
    geometry: ConvGeometry,
    pad_codes: torch.Tensor,
    out: torch.Tensor,
    out_index: torch.Tensor,
    threads: int | None = None,
) -> torch.Tensor:
    """:func:`sad_conv2d_packed` of one layer's G grids in one call: ``packed`` (G, N,
    packed_bytes), grid g padded with ``pad_codes[g]``; ``weight_codes`` (T, C, kH, kW) the
    filters of grid 0, then grid 1, ... (``filters`` (G,) int64 of them); the output of filter
    ``t`` goes to channel ``out_index[t]`` (int32, (T,)) of ``out``. Returns ``out``."""
    c, h, w = shape
    g = packed.shape[0] if packed.dim() == 3 else -1
    size = packed_bytes(c, h, w, geometry)
    if packed.dtype != torch.uint8 or g < 0 or packed.shape[2] != size:
        raise ValueError(f"sad_conv2d_packed_grids: packed must be uint8 (G, N, {size}), got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    if weight_codes.dtype != torch.uint8 or tuple(weight_codes.shape[1:]) != (c, *geometry.kernel):
        raise ValueError(f"sad_conv2d_packed_grids: weight_codes must be uint8 (T, {c}, "
                         f"{geometry.kernel[0]}, {geometry.kernel[1]}), got "
                         f"{weight_codes.dtype} {tuple(weight_codes.shape)}")
    if (filters.dtype != torch.int64 or filters.shape != (g,) or int(filters.min()) < 0
            or int(filters.sum()) != weight_codes.shape[0]):
        raise ValueError(f"sad_conv2d_packed_grids: filters must be {g} int64 counts summing "
                         f"to the {weight_codes.shape[0]} filters")
    if pad_codes.dtype != torch.int32 or pad_codes.shape != (g,):
        raise ValueError(f"sad_conv2d_packed_grids: pad_codes must be int32 ({g},)")
    _check_pad_code(int(pad_codes.min()))
    _check_pad_code(int(pad_codes.max()))
    out, out_index = _check_output(out, out_index, packed.shape[1], weight_codes.shape[0],
                                   *geometry.output_size(h, w))
    packed, weight_codes = packed.contiguous(), weight_codes.contiguous()
    filters, pad_codes = filters.contiguous(), pad_codes.contiguous()
    check(library().sad_conv2d_packed_grids(
        packed.data_ptr(), g, packed.shape[1], c, h, w, weight_codes.data_ptr(),
        filters.data_ptr(), *geometry.args(), pad_codes.data_ptr(), out_index.data_ptr(),
        out.shape[1], out.data_ptr(), -1, threads or torch.get_num_threads()),
        "sad_conv2d_packed_grids")
    return out


def sad_conv2d(
    codes: torch.Tensor,
    weight_codes: torch.Tensor,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    pad_code: int = 0,
    *,
    out: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
    path: str | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """``out[n, t, i, j] = Σ_{c,u,v} |codes[n, c, i·s+u−p, j·s+v−p] − weight_codes[t, c, u, v]|``.

    ``codes`` (N, C, H, W) and ``weight_codes`` (T, C, kH, kW) are uint8; positions in the
    padding take ``pad_code``. The result is int32 (N, T, Ho, Wo), or filter ``t`` is written to
    channel ``out_index[t]`` of a given int32 ``out`` (N, C_out, Ho, Wo), leaving its other
    channels untouched. ``path`` forces ``"portable"``, ``"avx2"`` or ``"avx512"``;
    ``threads`` defaults to ``torch.get_num_threads()``.
    """
    _check_codes(codes, weight_codes, pad_code)
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    if min(sh, sw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"sad_conv2d: stride must be >= 1 and padding >= 0, got "
                         f"stride={stride}, padding={padding}")
    n, c, h, w = codes.shape
    t, _, kh, kw = weight_codes.shape
    if h + 2 * ph < kh or w + 2 * pw < kw:
        raise ValueError(f"sad_conv2d: the {kh}x{kw} kernel does not fit the padded "
                         f"{h + 2 * ph}x{w + 2 * pw} input")
    ho, wo = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    out, out_index = _check_output(out, out_index, n, t, ho, wo)
    _sad_conv2d_op(codes, weight_codes, [kh, kw, sh, sw, ph, pw], pad_code, out_index,
                   _path_id(path), threads or 0, out)
    return out


def _path_id(path: str | None) -> int:
    """The kernel's number of ``path`` (-1: the best available), after checking it."""
    if path is None:
        return -1
    if path not in PATHS:
        raise ValueError(f"sad_conv2d: unknown path {path!r}; choose one of {', '.join(PATHS)}")
    if path not in available_paths():
        raise RuntimeError(f"sad_conv2d: path {path!r} needs CPU features this machine lacks; "
                           f"available: {', '.join(available_paths())}")
    return PATHS.index(path)


def _check_code_tensor(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8:
        raise TypeError(f"sad_conv2d: {name} must be a uint8 torch.Tensor; "
                        f"got {getattr(tensor, 'dtype', type(tensor))}")
    if tensor.dim() != 4:
        raise ValueError(f"sad_conv2d: {name} must be 4-D, got shape {tuple(tensor.shape)}")
    if tensor.device.type != "cpu":
        raise ValueError(f"sad_conv2d: {name} must be on the CPU; call .cpu()")


def _check_pad_code(pad_code: int) -> None:
    if not 0 <= int(pad_code) <= 255:
        raise ValueError(f"sad_conv2d: pad_code must be a uint8 code (0..255), got {pad_code}")


def _check_codes(codes: torch.Tensor, weight_codes: torch.Tensor, pad_code: int) -> None:
    _check_code_tensor("codes", codes)
    _check_code_tensor("weight_codes", weight_codes)
    if codes.shape[1] != weight_codes.shape[1]:
        raise ValueError(f"sad_conv2d: codes have {codes.shape[1]} channels, weight_codes "
                         f"expect {weight_codes.shape[1]}")
    _check_pad_code(pad_code)


def _check_output(
    out: torch.Tensor | None, out_index: torch.Tensor | None, n: int, t: int, ho: int, wo: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if out is None:
        if out_index is not None:
            raise ValueError("sad_conv2d: out_index needs an explicit out tensor")
        return torch.empty(n, t, ho, wo, dtype=torch.int32), None
    if out.dtype != torch.int32 or not out.is_contiguous() or out.device.type != "cpu":
        raise TypeError("sad_conv2d: out must be a contiguous int32 CPU tensor")
    if out.dim() != 4 or (out.shape[0], out.shape[2], out.shape[3]) != (n, ho, wo):
        raise ValueError(f"sad_conv2d: out must have shape ({n}, C_out, {ho}, {wo}), "
                         f"got {tuple(out.shape)}")
    if out_index is None:
        if out.shape[1] != t:
            raise ValueError(f"sad_conv2d: out has {out.shape[1]} channels for {t} filters; "
                             "pass out_index to scatter them")
        return out, None
    out_index = out_index.to(torch.int32).contiguous()
    if out_index.shape != (t,):
        raise ValueError(f"sad_conv2d: out_index must have one entry per filter ({t}), "
                         f"got shape {tuple(out_index.shape)}")
    if t and (int(out_index.min()) < 0 or int(out_index.max()) >= out.shape[1]):
        raise ValueError(f"sad_conv2d: out_index entries must lie in [0, {out.shape[1]})")
    return out, out_index


# The kernels as custom operators writing into ``out`` (so that a scatter through ``out_index``
# keeps the other channels): ``geometry`` is (kH, kW, sH, sW, pH, pW), ``path`` -1 picks the
# best, ``threads`` 0 means ``torch.get_num_threads()``. Arguments are checked by the public
# functions above; the operators only run the kernel.
@torch.library.custom_op("adderquant::sad_conv2d_", mutates_args=("out",), device_types="cpu")
def _sad_conv2d_op(
    codes: torch.Tensor, weight_codes: torch.Tensor, geometry: Sequence[int], pad_code: int,
    out_index: torch.Tensor | None, path: int, threads: int, out: torch.Tensor,
) -> None:
    """SAD of NCHW uint8 ``codes`` against ``weight_codes`` into int32 ``out``."""
    n, c, h, w = codes.shape
    codes, weight_codes = codes.contiguous(), weight_codes.contiguous()
    check(library().sad_conv2d(
        codes.data_ptr(), n, c, h, w, weight_codes.data_ptr(), weight_codes.shape[0], *geometry,
        pad_code, _pointer(out_index), out.shape[1], out.data_ptr(), path,
        threads or torch.get_num_threads()), "sad_conv2d")


@_sad_conv2d_op.register_fake
def _(codes, weight_codes, geometry, pad_code, out_index, path, threads, out) -> None:
    return None


@torch.library.custom_op("adderquant::sad_conv2d_packed_", mutates_args=("out",),
                         device_types="cpu")
def _sad_conv2d_packed_op(
    packed: torch.Tensor, shape: Sequence[int], weight_codes: torch.Tensor,
    geometry: Sequence[int], pad_code: int, out_index: torch.Tensor | None, path: int,
    threads: int, out: torch.Tensor,
) -> None:
    """SAD of images of ``shape`` (C, H, W) packed for ``geometry`` into int32 ``out``."""
    packed, weight_codes = packed.contiguous(), weight_codes.contiguous()
    check(library().sad_conv2d_packed(
        packed.data_ptr(), packed.shape[0], *shape, weight_codes.data_ptr(),
        weight_codes.shape[0], *geometry, pad_code, _pointer(out_index), out.shape[1],
        out.data_ptr(), path, threads or torch.get_num_threads()), "sad_conv2d_packed")


@_sad_conv2d_packed_op.register_fake
def _(packed, shape, weight_codes, geometry, pad_code, out_index, path, threads, out) -> None:
    return None


def _pointer(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None
