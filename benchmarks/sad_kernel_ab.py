"""Two builds of the integer SAD kernel in one process, their calls interleaved.

The counterpart of ``adder_kernel_ab.py``: both builds run ``sad_conv2d_packed`` alternately on
the same packed uint8 codes (one thread, best process CPU time of ``--repeats`` rounds), first
on the ResNet-20 adder-layer shapes, then on layers of one output size (16 filters, 32×32) with
1 to 72 taps per output, whose times split into a fixed cost per register tile of 4 filters ×
8 output columns and a cost per tap (least-squares line over the tap counts).

    cp src/adderquant/ops/_kernels*.so /tmp/baseline.so          # before a change
    # ... change and rebuild (make install) ...
    python benchmarks/sad_kernel_ab.py --baseline /tmp/baseline.so
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable

import numpy as np
import torch

from adder_kernel_ab import BEST_PATH, ab_arguments, best_times
from adderquant.ops._loader import open_library
from adderquant.ops.sad import ConvGeometry, pack
from resnet20_shapes import SHAPES

TILE_FILTERS, TILE_COLUMNS = 4, 8  # the AVX2 register tile


def layer_call(batch: int, c_in: int, c_out: int, size: int, k: int,
               stride: int) -> Callable[[ctypes.CDLL], int]:
    """The SAD call of one layer shape on random 4-bit codes, packed once."""
    x = torch.randint(0, 16, (batch, c_in, size, size), dtype=torch.uint8)
    w = torch.randint(0, 16, (c_out, c_in, k, k), dtype=torch.uint8)
    geometry = ConvGeometry((k, k), (stride, stride), (k // 2, k // 2))
    packed = pack(x, geometry, 0)
    h_out, w_out = geometry.output_size(size, size)
    out = torch.empty(batch, c_out, h_out, w_out, dtype=torch.int32)
    return lambda lib: lib.sad_conv2d_packed(
        packed.data_ptr(), batch, c_in, size, size, w.data_ptr(), c_out, *geometry.args(), 0,
        None, c_out, out.data_ptr(), BEST_PATH, 1)


def main() -> None:
    args = ab_arguments(__doc__.splitlines()[0], batch=64, repeats=40)
    names = ("sad_conv2d_packed",)
    libs = [open_library(args.baseline, names), open_library(args.candidate, names)]
    print(f"{'layer (ms per call, 1 thread)':30s} {'base':>7s} {'new':>7s} {'ratio':>6s}")
    totals, ratios = np.zeros(2), []
    for name, c_in, c_out, k, stride, size in SHAPES:
        times = best_times(layer_call(args.batch, c_in, c_out, size, k, stride), libs,
                           args.repeats)
        totals += times
        ratios.append(times[1] / times[0])
        print(f"{name:30s} {times[0] * 1e3:7.2f} {times[1] * 1e3:7.2f} {ratios[-1]:6.3f}")
    print(f"all shapes: {totals[0] * 1e3:.2f} ms -> {totals[1] * 1e3:.2f} ms "
          f"(new/base {totals[1] / totals[0]:.3f}); geometric mean of the ratios "
          f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}")

    tiles = args.batch * (16 // TILE_FILTERS) * (32 * 32 // TILE_COLUMNS)
    rows = []
    for c_in, k in ((8, 1), (16, 1), (8, 3), (16, 3), (32, 3), (64, 3)):
        taps = c_in // 8 * k * k
        times = best_times(layer_call(args.batch, c_in, 16, 32, k, 1), libs, args.repeats)
        rows.append((taps, *(t / tiles * 1e9 for t in times)))
    table = np.array(rows)
    print(f"\nns per register tile ({TILE_FILTERS} filters x {TILE_COLUMNS} columns) against "
          "taps per output:")
    for taps, base, new in rows:
        print(f"  {int(taps):3d} taps: base {base:6.1f}  new {new:6.1f}")
    for label, column in (("base", 1), ("new", 2)):
        per_tap, fixed = np.polyfit(table[:, 0], table[:, column], 1)
        print(f"{label}: {fixed:.1f} ns per tile + {per_tap:.2f} ns per tap")


if __name__ == "__main__":
    main()
