"""GPU time of the Triton adder layer against ``F.conv2d`` and the unfold reference.

ResNet-20 adder-layer shapes at batch 128, float32, all on one CUDA device in this one process:
forward, and forward + backward (AdderNet gradients, eta = 0.2, for the adder layer; autograd
for ``F.conv2d``; the explicit AdderNet gradients of ``adderquant.ops.reference`` for the
reference). ``F.conv2d`` runs with PyTorch's defaults (cuDNN may use TF32) and again with TF32
off. ``--json`` prints one object whose ``fwd_vs_conv2d`` and ``fwdbwd_vs_conv2d`` are geometric
means over the shapes of time ratios (> 1 means the Triton adder layer is faster).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from adderquant.ops import adder2d
from adderquant.ops.reference import adder2d_reference, adder2d_reference_grads, output_size
from resnet20_shapes import SHAPES

METHODS = ("triton", "conv2d", "conv2d_fp32", "reference")


def ms_per_call(fn: Callable[[], object], reps: int, samples: int = 5) -> float:
    """Median over ``samples`` of the mean CUDA-event time of ``reps`` back-to-back calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def training_step(op: Callable, x: torch.Tensor, w: torch.Tensor, grad_out: torch.Tensor):
    """A closure running ``op(x, w)`` forward and backward into fresh ``.grad`` fields."""
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()

    def step() -> None:
        xg.grad = wg.grad = None
        op(xg, wg).backward(grad_out)

    return step


def bench_shape(
    c_in: int, c_out: int, k: int, stride: int, size: int, batch: int, reps: int
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    pad = k // 2
    x = torch.rand(batch, c_in, size, size, generator=gen).cuda()
    w = torch.randn(c_out, c_in, k, k, generator=gen).cuda()
    out_h, out_w = output_size(size, size, (k, k), stride, pad, 1)
    grad_out = torch.randn(batch, c_out, out_h, out_w, generator=gen).cuda()

    def adder(a, b):
        return adder2d(a, b, None, stride, pad)

    def conv(a, b):
        return F.conv2d(a, b, None, stride, pad)

    def reference_step() -> None:
        adder2d_reference(x, w, None, stride, pad)
        adder2d_reference_grads(x, w, grad_out, stride, pad)

    t = {}
    with torch.no_grad():
        t["triton_fwd_ms"] = ms_per_call(lambda: adder(x, w), reps)
        t["conv2d_fwd_ms"] = ms_per_call(lambda: conv(x, w), reps)
        t["reference_fwd_ms"] = ms_per_call(lambda: adder2d_reference(x, w, None, stride, pad),
                                            reps)
        t["reference_fwdbwd_ms"] = ms_per_call(reference_step, reps)
    t["triton_fwdbwd_ms"] = ms_per_call(training_step(adder, x, w, grad_out), reps)
    t["conv2d_fwdbwd_ms"] = ms_per_call(training_step(conv, x, w, grad_out), reps)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            t["conv2d_fp32_fwd_ms"] = ms_per_call(lambda: conv(x, w), reps)
        t["conv2d_fp32_fwdbwd_ms"] = ms_per_call(training_step(conv, x, w, grad_out), reps)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return t


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summarize(rows: list[dict], batch: int) -> dict:
    """Per-shape ratios ``other / triton`` and their geometric means (> 1: Triton faster)."""
    summary: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "batch": batch,
        "conv2d_tf32_default": torch.backends.cudnn.allow_tf32,
    }
    for row in rows:
        for other in METHODS[1:]:
            for phase in ("fwd", "fwdbwd"):
                row[f"{phase}_vs_{other}"] = row[f"{other}_{phase}_ms"] / row[f"triton_{phase}_ms"]
    for other in METHODS[1:]:
        for phase in ("fwd", "fwdbwd"):
            key = f"{phase}_vs_{other}"
            summary[key] = geometric_mean([row[key] for row in rows])
    summary["shapes"] = rows
    return summary


def print_table(summary: dict) -> None:
    print(f"{summary['device']}, batch {summary['batch']}, float32; milliseconds per call "
          "(median); ratios = other / Triton (> 1: Triton faster)")
    for phase, title in (("fwd", "forward"), ("fwdbwd", "forward + backward")):
        print(f"\n{title}")
        print(f"{'shape':<20}" + "".join(f"{m:>12}" for m in METHODS)
              + "".join(f"{'vs ' + m:>16}" for m in METHODS[1:]))
        for row in summary["shapes"]:
            print(f"{row['shape']:<20}"
                  + "".join(f"{row[f'{m}_{phase}_ms']:12.3f}" for m in METHODS)
                  + "".join(f"{row[f'{phase}_vs_{m}']:16.2f}" for m in METHODS[1:]))
        print(f"{'geometric mean':<{20 + 12 * len(METHODS)}}"
              + "".join(f"{summary[f'{phase}_vs_{m}']:16.2f}" for m in METHODS[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=10, help="calls per timed sample")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (and Triton); run it on a machine with a GPU")

    rows = []
    for name, c_in, c_out, k, stride, size in SHAPES:
        times = bench_shape(c_in, c_out, k, stride, size, args.batch, args.reps)
        rows.append({"shape": name, **{key: round(v, 5) for key, v in times.items()}})
    summary = summarize(rows, args.batch)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table(summary)


if __name__ == "__main__":
    main()
