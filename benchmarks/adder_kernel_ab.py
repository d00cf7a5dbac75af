"""Two builds of the compiled adder kernel in one process, their calls interleaved.

On a busy machine, separate benchmark runs drift by more than a small change in the kernel
costs; calling a saved build and the current one alternately on the same tensors in one
process makes both see the same load. Times are the best process CPU time of ``--repeats``
rounds (one thread) for the ResNet-20 adder layer shapes, forward and AdderNet backward.

    cp src/adderquant/ops/_kernels*.so /tmp/baseline.so          # before a change
    # ... change and rebuild (make install) ...
    python benchmarks/adder_kernel_ab.py --baseline /tmp/baseline.so
"""

from __future__ import annotations

import argparse
import ctypes
import math
import time
from collections.abc import Callable

import torch

from adderquant.ops._loader import load_library, open_library
from adderquant.ops.geometry import adder_geometry
from resnet20_shapes import SHAPES

BEST_PATH = -1  # the kernels' argument for the best instruction set this CPU runs


def best_times(call: Callable[[ctypes.CDLL], int], libs: list[ctypes.CDLL],
               repeats: int) -> list[float]:
    """Best CPU time of ``call(lib)`` for each library, the libraries called alternately."""
    for lib in libs:
        call(lib)
    best = [math.inf] * len(libs)
    for _ in range(repeats):
        for i, lib in enumerate(libs):
            start = time.process_time()
            if call(lib):
                raise RuntimeError("a kernel call failed")
            best[i] = min(best[i], time.process_time() - start)
    return best


def layer_calls(batch: int, c_in: int, c_out: int, size: int, k: int,
                stride: int) -> dict[str, Callable[[ctypes.CDLL], int]]:
    """The forward and the AdderNet backward call of one layer shape on random tensors."""
    x = torch.randn(batch, c_in, size, size)
    w = torch.randn(c_out, c_in, k, k)
    geom = adder_geometry(x, w, stride, k // 2, 1, 1)
    y = torch.empty(batch, c_out, geom.h_out, geom.w_out)
    gy, gx, gw = torch.randn_like(y), torch.empty_like(x), torch.empty_like(w)
    return {
        "forward": lambda lib: lib.adder_forward_f32(
            geom, x.data_ptr(), w.data_ptr(), y.data_ptr(), BEST_PATH, 1),
        "backward": lambda lib: lib.adder_backward_f32(
            geom, x.data_ptr(), w.data_ptr(), gy.data_ptr(), gx.data_ptr(), gw.data_ptr(), 0,
            BEST_PATH, 1),
    }


def ab_arguments(description: str, batch: int, repeats: int) -> argparse.Namespace:
    """The options of a two-build comparison: ``--baseline``, ``--candidate`` (default: the
    installed build, its path in ``candidate``), ``--batch``, ``--repeats``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--baseline", required=True, help="a saved _kernels*.so")
    parser.add_argument("--candidate", default=None,
                        help="the build to compare (default: the installed one)")
    parser.add_argument("--batch", type=int, default=batch, help="images per call")
    parser.add_argument("--repeats", type=int, default=repeats,
                        help="timed rounds per measurement")
    args = parser.parse_args()
    args.candidate = args.candidate or load_library()._name
    return args


def main() -> None:
    args = ab_arguments(__doc__.splitlines()[0], batch=32, repeats=20)
    candidate = args.candidate
    names = ("adder_forward_f32", "adder_backward_f32")
    libs = [open_library(args.baseline, names), open_library(candidate, names)]
    ratios: dict[str, list[float]] = {"forward": [], "backward": []}
    print(f"{'layer (ms per call, 1 thread)':30s} {'fwd base':>9s} {'new':>7s} {'ratio':>6s} "
          f"{'bwd base':>9s} {'new':>7s} {'ratio':>6s}")
    for name, c_in, c_out, k, stride, size in SHAPES:
        calls = layer_calls(args.batch, c_in, c_out, size, k, stride)
        cells = []
        for kind, call in calls.items():
            base, new = best_times(call, libs, args.repeats)
            ratios[kind].append(new / base)
            cells.append(f"{base * 1e3:9.2f} {new * 1e3:7.2f} {new / base:6.3f}")
        print(f"{name:30s} {' '.join(cells)}")
    mean = {kind: math.exp(sum(map(math.log, r)) / len(r)) for kind, r in ratios.items()}
    print(f"geometric mean new/base: forward {mean['forward']:.3f}, "
          f"backward {mean['backward']:.3f}")


if __name__ == "__main__":
    main()
