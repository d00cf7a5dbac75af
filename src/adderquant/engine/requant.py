"""Requantization as the engine names it; the kernels live in :mod:`adderquant.ops.requant`."""

from adderquant.ops.requant import (
    FROM_FLOAT,
    FROM_STREAM,
    FROM_SUMS,
    LIMIT_BITS,
    MAX_SHIFT,
    codes_from_float,
    codes_from_stream,
    codes_from_sums,
    fixed_point,
    float_to_stream,
    requant_fixed,
    sums_to_float,
)

__all__ = [
    "FROM_FLOAT",
    "FROM_STREAM",
    "FROM_SUMS",
    "LIMIT_BITS",
    "MAX_SHIFT",
    "codes_from_float",
    "codes_from_stream",
    "codes_from_sums",
    "fixed_point",
    "float_to_stream",
    "requant_fixed",
    "sums_to_float",
]
