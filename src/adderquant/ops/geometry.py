"""Geometry of the adder layer: argument pairs, output sizes, shape checks and the compiled
kernels' shape record, shared by the CPU and CUDA implementations of ``adder2d``."""

from __future__ import annotations

import ctypes
import operator
from collections.abc import Sequence

import torch


class Geometry(ctypes.Structure):
    """Shapes of one adder kernel call (``adder_geometry`` in ``csrc/adder_kernel.c``)."""

    _fields_ = [
        (name, ctypes.c_int64)
        for name in (
            "n", "c_in", "h", "w", "c_out", "kh", "kw", "stride_h", "stride_w", "pad_h",
            "pad_w", "dil_h", "dil_w", "groups", "h_out", "w_out",
        )
    ]


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    """``(v, v)`` for an integer, ``(v[0], v[1])`` for a pair of integers; else a clear error
    naming ``name`` (stride, padding, dilation or kernel_size)."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(
                f"adder2d: {name} takes one integer or two (height, width), got {len(v)} values "
                f"{tuple(v)}"
            )
        return _integer(v[0], name), _integer(v[1], name)
    return (_integer(v, name),) * 2


def _integer(v, name: str) -> int:
    if isinstance(v, bool):
        raise TypeError(f"adder2d: {name} must be an integer, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(
            f"adder2d: {name} must be an integer or a pair of integers, got {v!r} "
            f"({type(v).__name__})"
        ) from None


def output_size(
    h: int, w: int, kernel: tuple[int, int], stride, padding, dilation
) -> tuple[int, int]:
    """Spatial output size with the geometry of ``F.conv2d``."""
    sh, sw = _pair(stride, "stride")
    (ph, pw), (dh, dw) = _pair(padding, "padding"), _pair(dilation, "dilation")
    ho = (h + 2 * ph - dh * (kernel[0] - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kernel[1] - 1) - 1) // sw + 1
    return ho, wo


def check_adder_shapes(x: torch.Tensor, weight: torch.Tensor, bias, groups: int) -> None:
    """Raise a clear error unless ``x``, ``weight``, ``bias`` and ``groups`` fit together."""
    if x.dim() != 4:
        raise ValueError(f"adder2d: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(
            f"adder2d: weight must be 4-D (C_out, C_in/groups, kH, kW), got {tuple(weight.shape)}"
        )
    if groups < 1 or x.shape[1] % groups or weight.shape[0] % groups:
        raise ValueError(
            f"adder2d: groups={groups} must divide C_in={x.shape[1]} and C_out={weight.shape[0]}"
        )
    if weight.shape[1] * groups != x.shape[1]:
        raise ValueError(
            f"adder2d: weight expects {weight.shape[1] * groups} input channels "
            f"(C_in/groups={weight.shape[1]}, groups={groups}), x has {x.shape[1]}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"adder2d: bias must have shape ({weight.shape[0]},)")


def conv_arguments(
    x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """``(stride, padding, dilation)`` as pairs, after checking them and that the output is
    not empty (plain Python, so that ``torch.compile`` traces it)."""
    sh, sw = _pair(stride, "stride")
    (ph, pw), (dh, dw) = _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(
            f"adder2d: stride {(sh, sw)} and dilation {(dh, dw)} must be >= 1 and padding "
            f"{(ph, pw)} >= 0"
        )
    h, w = x.shape[2:]
    kh, kw = weight.shape[2:]
    ho, wo = output_size(h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    if ho < 1 or wo < 1:
        raise ValueError(
            f"adder2d: the {kh}x{kw} kernel (dilation {(dh, dw)}) does not fit the {h}x{w} input "
            f"with padding {(ph, pw)}; enlarge the input or the padding"
        )
    return (sh, sw), (ph, pw), (dh, dw)


def adder_geometry(
    x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int
) -> Geometry:
    """The kernels' shape record, after the checks of :func:`conv_arguments`."""
    (sh, sw), (ph, pw), (dh, dw) = conv_arguments(x, weight, stride, padding, dilation)
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    ho, wo = output_size(h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    return Geometry(n, c_in, h, w, c_out, kh, kw, sh, sw, ph, pw, dh, dw, groups, ho, wo)
