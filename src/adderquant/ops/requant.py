"""Code producers and fixed-point requantization (compiled loops of the engine's kernels).

Every producer writes uint8 codes on G grids straight into the SAD kernel's packed layout for
the consuming layer's geometry (see ``sad.pack``), with the grid's zero point in the padding.

A real multiplier ``m`` and offset ``o`` become int64 ``M`` and ``O`` and a shift ``k`` with
``m ≈ M·2^−k`` and ``o ≈ O·2^−k``; an int32 ``s`` with ``|s| < 2^b`` maps to
``u = (M·s + O + 2^(k−1)) >> k`` = ``round(m·s + o)`` with halves rounded up. The shift is the
largest that keeps ``|M| < 2^(62−b)`` and ``|O| < 2^62``, so int64 never overflows and M keeps
``62 − b − 1`` significant bits (44 for the largest ResNet-20 sums, b = 18).

Stream values ``X`` (int64, units ``2^−F``) become codes by an exact integer division,
``round_half_up(X / D_g)`` with the integer ``D_g = Δ_g·2^F``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from adderquant.ops._loader import check, library
from adderquant.ops.sad import ConvGeometry, packed_bytes

LIMIT_BITS = 62
MAX_SHIFT = 62


def fixed_point(
    m: np.ndarray, o: np.ndarray, input_bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(M int64, O int64, k int32)`` representing ``m·s + o`` elementwise for ``|s| <
    2^input_bits``, with the largest shift that keeps ``|M| < 2^(62 − input_bits)`` and
    ``|O| < 2^62``."""
    m, o = np.broadcast_arrays(np.asarray(m, np.float64), np.asarray(o, np.float64))
    if not (np.isfinite(m).all() and np.isfinite(o).all()):
        raise ValueError("requantization parameters must be finite; check the BatchNorm "
                         "statistics and the quantization scales")
    m_bits = LIMIT_BITS - input_bits
    with np.errstate(divide="ignore"):
        k_m = np.where(m != 0, m_bits - 1 - np.floor(np.log2(np.abs(m))), MAX_SHIFT)
        k_o = np.where(o != 0, LIMIT_BITS - 1 - np.floor(np.log2(np.abs(o))), MAX_SHIFT)
    k = np.minimum(np.minimum(k_m, k_o), MAX_SHIFT)
    if (k < 0).any():
        raise ValueError(f"requantization multiplier or offset too large for fixed point "
                         f"(max |m| = {np.abs(m).max():.3g}, max |o| = {np.abs(o).max():.3g})")
    scale = np.exp2(k)
    mult = np.clip(np.round(m * scale), 1 - 2.0**m_bits, 2.0**m_bits - 1)
    off = np.clip(np.round(o * scale), 1 - 2.0**LIMIT_BITS, 2.0**LIMIT_BITS - 1)
    return mult.astype(np.int64), off.astype(np.int64), k.astype(np.int32)


def _threads(threads: int | None) -> int:
    return threads or torch.get_num_threads()


FROM_FLOAT, FROM_SUMS, FROM_STREAM = 0, 1, 2


def _pack_codes(
    kind: int, values: torch.Tensor, groups: int, zero_point: torch.Tensor, bits: int,
    geometry: ConvGeometry, threads: int | None, *, scale=None, multiplier=None, offset=None,
    shift=None, divisor=None, relu: bool = False,
) -> torch.Tensor:
    n, c, h, w = values.shape
    out = torch.empty(groups, n, packed_bytes(c, h, w, geometry), dtype=torch.uint8)
    values = values.contiguous()
    zero_point = zero_point.to(torch.int32).contiguous()
    if zero_point.shape != (groups,) or int(zero_point.min()) < 0 or int(
            zero_point.max()) > (1 << bits) - 1:
        raise ValueError(f"zero points must be {groups} codes in 0..{(1 << bits) - 1}")
    ptrs = [t.data_ptr() if t is not None else None
            for t in (scale, multiplier, offset, shift, divisor)]
    check(library().pack_codes(
        kind, values.data_ptr(), n, c, h, w, groups, *ptrs, zero_point.data_ptr(),
        (1 << bits) - 1, int(relu), *geometry.args(), out.data_ptr(), _threads(threads)),
        "pack_codes")
    return out


def codes_from_float(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
    geometry: ConvGeometry, threads: int | None = None,
) -> torch.Tensor:
    """Codes of float32 ``x`` (N, C, H, W) on G grids, ``clamp(round(x / Δ_g) + z_g, 0,
    2^bits − 1)`` (half to even, as ``torch.round``), packed for ``geometry``: (G, N, bytes)."""
    scale = scale.float().contiguous()
    return _pack_codes(FROM_FLOAT, x.float(), len(scale), zero_point, bits, geometry, threads,
                       scale=scale)


def codes_from_sums(
    sums: torch.Tensor, multiplier: torch.Tensor, offset: torch.Tensor, shift: torch.Tensor,
    zero_point: torch.Tensor, bits: int, relu: bool, geometry: ConvGeometry,
    threads: int | None = None,
) -> torch.Tensor:
    """Codes of int32 ``sums`` (N, C, H, W) on G grids, ``clamp(u + z_g, 0, 2^bits − 1)`` with
    ``u`` (``max(u, 0)`` if ``relu``) from the fixed-point parameters (G, C), packed for
    ``geometry``: (G, N, bytes)."""
    if sums.dtype != torch.int32:
        raise TypeError(f"codes_from_sums: sums must be int32, got {sums.dtype}")
    return _pack_codes(FROM_SUMS, sums, multiplier.shape[0], zero_point, bits, geometry,
                       threads, multiplier=multiplier.contiguous(), offset=offset.contiguous(),
                       shift=shift.contiguous(), relu=relu)


def codes_from_stream(
    x: torch.Tensor, divisor: torch.Tensor, zero_point: torch.Tensor, bits: int,
    geometry: ConvGeometry, threads: int | None = None,
) -> torch.Tensor:
    """Codes of int64 stream values ``x`` (N, C, H, W) on G grids, ``clamp(round_half_up(x /
    D_g) + z_g, 0, 2^bits − 1)`` (exact for ``|x| < 2^51``), packed: (G, N, bytes)."""
    if x.dtype != torch.int64:
        raise TypeError(f"codes_from_stream: values must be int64, got {x.dtype}")
    return _pack_codes(FROM_STREAM, x, divisor.shape[0], zero_point, bits, geometry, threads,
                       divisor=divisor.contiguous())


def float_to_stream(x: torch.Tensor, frac_bits: int, threads: int | None = None) -> torch.Tensor:
    """int64 stream values ``round(x·2^F)`` (half to even) of float32 ``x``."""
    x = x.float().contiguous()
    out = torch.empty(x.shape, dtype=torch.int64)
    library().float_to_stream(x.data_ptr(), x.numel(), frac_bits, out.data_ptr(),
                              _threads(threads))
    return out


def requant_fixed(
    values: torch.Tensor,
    multiplier: torch.Tensor,
    offset: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
    threads: int | None = None,
) -> torch.Tensor:
    """int64 stream values ``u (+ residual)`` (then ``max(·, 0)`` if ``relu``) from int32
    ``values`` (N, C, H, W) and per-channel fixed-point parameters (C)."""
    if values.dtype != torch.int32:
        raise TypeError(f"requant_fixed: values must be int32, got {values.dtype}")
    n, c = values.shape[:2]
    out = torch.empty(values.shape, dtype=torch.int64)
    values = values.contiguous()
    if residual is not None:
        if residual.shape != values.shape or residual.dtype != torch.int64:
            raise ValueError(f"residual must be int64 of shape {tuple(values.shape)}, got "
                             f"{residual.dtype} {tuple(residual.shape)}")
        residual = residual.contiguous()
    library().requant_fixed(
        values.data_ptr(), n, c, math.prod(values.shape[2:]), multiplier.data_ptr(),
        offset.data_ptr(), shift.data_ptr(), residual.data_ptr() if residual is not None else None,
        int(relu), out.data_ptr(), _threads(threads))
    return out


def sums_to_float(
    sums: torch.Tensor, excess: torch.Tensor, step: torch.Tensor, bias: torch.Tensor,
    threads: int | None = None,
) -> torch.Tensor:
    """float32 ``(sums + excess)·step + bias`` of int32 ``sums`` (N, C, H, W) with per-channel
    int32 ``excess`` and float32 ``step`` and ``bias`` (C), the product rounded before the sum
    (as PyTorch's ``(sums + excess).float() * step + bias``), in one pass."""
    if sums.dtype != torch.int32 or sums.dim() < 2:
        raise TypeError(f"sums_to_float: sums must be int32 (N, C, ...), got {sums.dtype} "
                        f"{tuple(sums.shape)}")
    n, c = sums.shape[:2]
    params = [excess.to(torch.int32).contiguous(), step.to(torch.float32).contiguous(),
              bias.to(torch.float32).contiguous()]
    if any(p.shape != (c,) for p in params):
        raise ValueError(f"sums_to_float: excess, step and bias must have shape ({c},)")
    sums = sums.contiguous()
    out = torch.empty(sums.shape, dtype=torch.float32)
    library().sums_to_float(sums.data_ptr(), n, c, math.prod(sums.shape[2:]),
                            *(p.data_ptr() for p in params), out.data_ptr(), _threads(threads))
    return out


def output_from_sums(
    sums: torch.Tensor, excess: torch.Tensor, step: torch.Tensor, bias: torch.Tensor,
    alpha: torch.Tensor, beta: torch.Tensor, residual: torch.Tensor | None = None,
    relu: bool = False, threads: int | None = None,
) -> torch.Tensor:
    """float32 ``relu?(fma(y, alpha, beta) + residual)`` of ``y`` = :func:`sums_to_float`
    of int32 ``sums`` (N, C, H, W), with per-channel float32 ``alpha`` and ``beta`` (C) of an
    eval-mode BatchNorm (``fma``: one rounding, as PyTorch's BatchNorm inference) and an
    optional float32 ``residual`` of the shape of ``sums``, in one pass."""
    if sums.dtype != torch.int32 or sums.dim() < 2:
        raise TypeError(f"output_from_sums: sums must be int32 (N, C, ...), got {sums.dtype} "
                        f"{tuple(sums.shape)}")
    n, c = sums.shape[:2]
    params = [excess.to(torch.int32).contiguous()] + [
        p.to(torch.float32).contiguous() for p in (step, bias, alpha, beta)]
    if any(p.shape != (c,) for p in params):
        raise ValueError(f"output_from_sums: the per-channel terms must have shape ({c},)")
    if residual is not None:
        if residual.shape != sums.shape or residual.dtype != torch.float32:
            raise ValueError(f"output_from_sums: residual must be float32 of shape "
                             f"{tuple(sums.shape)}, got {residual.dtype} "
                             f"{tuple(residual.shape)}")
        residual = residual.contiguous()
    sums = sums.contiguous()
    out = torch.empty(sums.shape, dtype=torch.float32)
    library().sums_to_bn(sums.data_ptr(), n, c, math.prod(sums.shape[2:]),
                         *(p.data_ptr() for p in params),
                         residual.data_ptr() if residual is not None else None, int(relu),
                         out.data_ptr(), _threads(threads))
    return out
