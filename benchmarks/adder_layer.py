"""Adder layer speed: the compiled kernel against the unfold reference and F.conv2d.

For every adder layer shape of ResNet-20 (CIFAR, batch 128) and one ResNet-18 shape, times the
forward and forward+backward passes of ``adderquant.ops.adder2d``, of the plain PyTorch reference
(smaller batch, scaled per image) and of ``F.conv2d`` on the same shape, in one process.
Times are the best of ``--repeats`` runs after one warm-up run, the kernel and ``F.conv2d``
interleaved so that a burst of other work on the machine slows both alike; ``--clock cpu``
measures process CPU time instead of wall time.

    python benchmarks/adder_layer.py            # table
    python benchmarks/adder_layer.py --json     # one JSON object (geometric-mean ratios)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from adderquant.ops import _kernel, adder2d
from adderquant.ops.reference import adder2d_reference

# The reference unfolds every window for every output channel; its batch is cut so that this
# tensor stays below REFERENCE_BYTES (at least one image).
REFERENCE_BYTES = 512 * 2**20
REFERENCE_MAX_BATCH = 8


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    c_in: int
    c_out: int
    size: int
    kernel: int
    stride: int

    @property
    def padding(self) -> int:
        return self.kernel // 2


SHAPES = (
    Shape("r20 16->16 3x3 s1 32x32", 128, 16, 16, 32, 3, 1),
    Shape("r20 16->32 3x3 s2 32x32", 128, 16, 32, 32, 3, 2),
    Shape("r20 32->32 3x3 s1 16x16", 128, 32, 32, 16, 3, 1),
    Shape("r20 32->64 3x3 s2 16x16", 128, 32, 64, 16, 3, 2),
    Shape("r20 64->64 3x3 s1 8x8", 128, 64, 64, 8, 3, 1),
    Shape("r20 16->32 1x1 s2 32x32", 128, 16, 32, 32, 1, 2),
    Shape("r20 32->64 1x1 s2 16x16", 128, 32, 64, 16, 1, 2),
    Shape("r18 128->128 3x3 s1 28x28", 8, 128, 128, 28, 3, 1),
)


@dataclass
class Result:
    """Milliseconds per image of each implementation, and the throughput ratios."""

    name: str
    batch: int
    reference_batch: int
    kernel_fwd: float
    kernel_fwdbwd: float
    conv2d_fwd: float
    conv2d_fwdbwd: float
    reference_fwd: float
    reference_fwdbwd: float

    @property
    def fwd_vs_conv2d(self) -> float:
        return self.conv2d_fwd / self.kernel_fwd

    @property
    def fwdbwd_vs_conv2d(self) -> float:
        return self.conv2d_fwdbwd / self.kernel_fwdbwd

    @property
    def fwd_vs_reference(self) -> float:
        return self.reference_fwd / self.kernel_fwd


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def best_times(fns: list[Callable[[], object]], repeats: int, clock: str) -> list[float]:
    """Best time in seconds (``clock``: wall or process CPU time) of each of ``fns`` over
    ``repeats`` rounds after a warm-up round; each round runs every function once, so a burst of
    load hits them alike."""
    now = CLOCKS[clock]
    for fn in fns:
        fn()
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = now()
            fn()
            best[i] = min(best[i], now() - start)
    return best


def passes(layer: Callable, x: torch.Tensor, w: torch.Tensor) -> list[Callable[[], None]]:
    """The forward and the forward+backward (gradients of x and w) pass of ``layer(x, w)``."""
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    grad_out = torch.randn_like(layer(x, w))

    def forward():
        with torch.no_grad():
            layer(x, w)

    def forward_backward():
        torch.autograd.backward(layer(xg, wg), grad_out)
        xg.grad = wg.grad = None

    return [forward, forward_backward]


def measure(shape: Shape, repeats: int, reference_repeats: int, clock: str) -> Result:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(shape.batch, shape.c_in, shape.size, shape.size, generator=gen)
    w = torch.randn(shape.c_out, shape.c_in, shape.kernel, shape.kernel, generator=gen)
    s, p = shape.stride, shape.padding
    k_fwd, k_all, c_fwd, c_all = best_times(
        passes(lambda a, b: adder2d(a, b, None, s, p), x, w)
        + passes(lambda a, b: F.conv2d(a, b, None, s, p), x, w),
        repeats,
        clock,
    )
    out = (shape.size + 2 * p - shape.kernel) // s + 1
    unfolded = shape.c_out * shape.c_in * shape.kernel**2 * out * out * x.element_size()
    ref_batch = max(1, min(shape.batch, REFERENCE_MAX_BATCH, REFERENCE_BYTES // unfolded))
    r_fwd, r_all = best_times(
        passes(lambda a, b: adder2d_reference(a, b, None, s, p), x[:ref_batch], w),
        reference_repeats,
        clock,
    )
    per_image = 1e3 / shape.batch
    per_ref_image = 1e3 / ref_batch
    return Result(
        shape.name, shape.batch, ref_batch,
        k_fwd * per_image, k_all * per_image, c_fwd * per_image, c_all * per_image,
        r_fwd * per_ref_image, r_all * per_ref_image,
    )


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summary(results: list[Result], clock: str) -> dict:
    return {
        "simd": _kernel.simd_path(),
        "threads": torch.get_num_threads(),
        "clock": clock,
        "fwd_vs_conv2d": geometric_mean([r.fwd_vs_conv2d for r in results]),
        "fwdbwd_vs_conv2d": geometric_mean([r.fwdbwd_vs_conv2d for r in results]),
        "fwd_vs_reference": geometric_mean([r.fwd_vs_reference for r in results]),
        "layers": [
            {**asdict(r), "fwd_vs_conv2d": r.fwd_vs_conv2d,
             "fwdbwd_vs_conv2d": r.fwdbwd_vs_conv2d, "fwd_vs_reference": r.fwd_vs_reference}
            for r in results
        ],
    }


def print_table(results: list[Result], info: dict) -> None:
    print(f"adder layer, {info['clock']} ms per image (SIMD path {info['simd']}, threads "
          f"{info['threads']}); ratios are throughput (>1: the kernel is faster)")
    header = (f"{'layer':<27}{'batch':>6}{'fwd':>8}{'f+b':>8}{'conv fwd':>9}{'conv f+b':>9}"
              f"{'ref fwd':>9}{'ref f+b':>9}{'fwd/conv':>9}{'f+b/conv':>9}{'fwd/ref':>8}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.name:<27}{r.batch:>6}{r.kernel_fwd:>8.3f}{r.kernel_fwdbwd:>8.3f}"
              f"{r.conv2d_fwd:>9.3f}{r.conv2d_fwdbwd:>9.3f}{r.reference_fwd:>9.2f}"
              f"{r.reference_fwdbwd:>9.2f}{r.fwd_vs_conv2d:>9.2f}{r.fwdbwd_vs_conv2d:>9.2f}"
              f"{r.fwd_vs_reference:>8.0f}")
    print(f"geometric means: fwd vs conv2d {info['fwd_vs_conv2d']:.2f}, fwd+bwd vs conv2d "
          f"{info['fwdbwd_vs_conv2d']:.2f}, fwd vs reference {info['fwd_vs_reference']:.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement")
    parser.add_argument("--reference-repeats", type=int, default=2,
                        help="timed runs per reference measurement")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--simd", default="auto", choices=("auto", *_kernel.SIMD_PATHS),
                        help="kernel instruction-set path")
    parser.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                        help="wall time, or CPU time of the process (all threads, steadier on a "
                        "busy machine; compare like with like at --threads 1)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.reference_repeats < 1:
        parser.error("--repeats and --reference-repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    _kernel.select_simd(args.simd)
    results = [measure(s, args.repeats, args.reference_repeats, args.clock) for s in SHAPES]
    info = summary(results, args.clock)
    if args.json:
        print(json.dumps(info))
    else:
        print_table(results, info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
