"""Two builds of the float-to-code producer in one process, their calls interleaved.

Both builds run ``pack_codes`` (float32 values to uint8 codes on one or two grids, written in
the SAD kernel's packed layout) alternately on the inputs of the ResNet-20 adder-layer shapes
(one thread, best process CPU time of ``--repeats`` rounds) and must write the same bytes.

    cp src/adderquant/ops/_kernels*.so /tmp/baseline.so          # before a change
    # ... change and rebuild (make install) ...
    python benchmarks/pack_codes_ab.py --baseline /tmp/baseline.so
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from adder_kernel_ab import ab_arguments, best_times
from adderquant.ops._loader import open_library
from adderquant.ops.requant import FROM_FLOAT
from adderquant.ops.sad import ConvGeometry, packed_bytes
from resnet20_shapes import SHAPES

BITS = 4


def pack_call(batch: int, c_in: int, size: int, k: int, stride: int, grids: int,
              outputs: list[torch.Tensor]) -> Callable[[ctypes.CDLL], int]:
    """The producer call of one layer's input on ``grids`` grids; call ``i`` of each round
    writes ``outputs[i % 2]`` (so that the two builds' bytes can be compared)."""
    g = torch.Generator().manual_seed(c_in * size + k)
    x = torch.randn(batch, c_in, size, size, generator=g)
    scale = torch.linspace(0.05, 0.15, grids)
    zero = torch.arange(grids, dtype=torch.int32) + 2
    geometry = ConvGeometry((k, k), (stride, stride), (k // 2, k // 2))
    outputs[:] = [torch.empty(grids, batch, packed_bytes(c_in, size, size, geometry),
                              dtype=torch.uint8) for _ in range(2)]
    calls = [0]

    def call(lib: ctypes.CDLL) -> int:
        out = outputs[calls[0] % 2]
        calls[0] += 1
        return lib.pack_codes(FROM_FLOAT, x.data_ptr(), batch, c_in, size, size, grids,
                              scale.data_ptr(), None, None, None, None, zero.data_ptr(),
                              (1 << BITS) - 1, 0, *geometry.args(), out.data_ptr(), 1)

    return call


def main() -> None:
    args = ab_arguments(__doc__.splitlines()[0], batch=64, repeats=100)
    libs = [open_library(path, ("pack_codes",)) for path in (args.baseline, args.candidate)]
    print(f"{'layer input (ms per call, 1 thread)':38s} {'base':>7s} {'new':>7s} {'ratio':>6s}")
    totals = [0.0, 0.0]
    for name, c_in, _, k, stride, size in SHAPES:
        for grids in (1, 2):
            outputs: list[torch.Tensor] = []
            times = best_times(pack_call(args.batch, c_in, size, k, stride, grids, outputs),
                               libs, args.repeats)
            if not torch.equal(outputs[0], outputs[1]):
                raise RuntimeError(f"{name}: the two builds wrote different codes")
            totals = [a + b for a, b in zip(totals, times, strict=True)]
            print(f"{name + f', {grids} grid' + 's' * (grids > 1):38s} {times[0] * 1e3:7.3f} "
                  f"{times[1] * 1e3:7.3f} {times[1] / times[0]:6.3f}")
    print(f"all: {totals[0] * 1e3:.2f} ms -> {totals[1] * 1e3:.2f} ms "
          f"(new/base {totals[1] / totals[0]:.3f})")


if __name__ == "__main__":
    main()
