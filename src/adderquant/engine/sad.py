"""The SAD convolution as the engine names it; the kernel lives in :mod:`adderquant.ops.sad`."""

from adderquant.ops.sad import (
    PATHS,
    ConvGeometry,
    active_path,
    available_paths,
    output_size,
    pack,
    packed_bytes,
    sad_conv2d,
    sad_conv2d_packed,
)

__all__ = [
    "PATHS",
    "ConvGeometry",
    "active_path",
    "available_paths",
    "output_size",
    "pack",
    "packed_bytes",
    "sad_conv2d",
    "sad_conv2d_packed",
]
