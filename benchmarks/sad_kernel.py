"""Throughput of the integer SAD kernel against float32 ``F.conv2d`` and the float adder kernel.

ResNet-20 adder-layer shapes at batch 128, all three run in this one process on the same
threads. ``--json`` prints one object whose ``sad_vs_conv2d`` and ``sad_vs_float_adder`` are
geometric means over the shapes of throughput ratios (> 1 means the SAD kernel is faster).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from adderquant.ops import adder2d
from adderquant.ops.sad import active_path, available_paths, sad_conv2d
from resnet20_shapes import SHAPES

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def seconds_per_call(fn: Callable[[], object], reps: int, clock: Callable[[], float]) -> float:
    """Fastest time of ``reps`` calls after one warm-up call (the machine is shared: the
    fastest call is the one least disturbed by other processes)."""
    fn()
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


@torch.no_grad()
def bench_shape(
    c_in: int, c_out: int, k: int, stride: int, size: int, batch: int, reps: int,
    path: str | None, clock: Callable[[], float],
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    pad = k // 2
    x = torch.rand(batch, c_in, size, size, generator=gen)
    w = torch.randn(c_out, c_in, k, k, generator=gen)
    qx = torch.randint(0, 256, x.shape, dtype=torch.uint8, generator=gen)
    qw = torch.randint(0, 256, w.shape, dtype=torch.uint8, generator=gen)
    return {
        "sad_s": seconds_per_call(lambda: sad_conv2d(qx, qw, stride, pad, path=path), reps,
                                  clock),
        "conv2d_s": seconds_per_call(lambda: F.conv2d(x, w, None, stride, pad), reps, clock),
        "float_adder_s": seconds_per_call(lambda: adder2d(x, w, None, stride, pad), reps, clock),
    }


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=10, help="timed calls per measurement")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--path", choices=available_paths(), default=None,
                        help="force a SAD kernel path (default: the widest available)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (meaningful on 1 thread)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for name, c_in, c_out, k, stride, size in SHAPES:
        t = bench_shape(c_in, c_out, k, stride, size, args.batch, args.reps, args.path,
                        CLOCKS[args.clock])
        rows.append({"shape": name, **{key: round(v, 6) for key, v in t.items()},
                     "sad_vs_conv2d": t["conv2d_s"] / t["sad_s"],
                     "sad_vs_float_adder": t["float_adder_s"] / t["sad_s"]})
    summary = {
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "path": args.path or active_path(),
        "clock": args.clock,
        "sad_vs_conv2d": geometric_mean([r["sad_vs_conv2d"] for r in rows]),
        "sad_vs_float_adder": geometric_mean([r["sad_vs_float_adder"] for r in rows]),
        "shapes": rows,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"batch {args.batch}, {summary['threads']} threads, SAD path {summary['path']}; "
          f"{args.clock} milliseconds per call (fastest of {args.reps}), ratios > 1 = SAD faster")
    print(f"{'shape':<20} {'SAD':>9} {'conv2d':>9} {'adder':>9} {'vs conv2d':>10} {'vs adder':>9}")
    for r in rows:
        print(f"{r['shape']:<20} {1e3 * r['sad_s']:9.2f} {1e3 * r['conv2d_s']:9.2f} "
              f"{1e3 * r['float_adder_s']:9.2f} {r['sad_vs_conv2d']:10.2f} "
              f"{r['sad_vs_float_adder']:9.2f}")
    print(f"{'geometric mean':<50} {summary['sad_vs_conv2d']:10.2f} "
          f"{summary['sad_vs_float_adder']:9.2f}")


if __name__ == "__main__":
    main()
