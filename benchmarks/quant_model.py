"""Evaluation speed of a quantized ResNet-20: quantized adder layers on integer codes (uint8
SAD kernel) against the same layers on dequantized values (float adder kernel).

Both paths run in this one process on the same model, images and threads; the ratio is
float-path time over integer-path time (> 1: the integer path is faster). Also prints the
share of images on which the two paths predict the same class (they differ only by float
rounding inside the adder layers, which can move a later layer's codes across a rounding
boundary). Needs the released checkpoint and CIFAR-10 (``../shared``).
"""

from __future__ import annotations

import argparse
import json

import torch

from adderquant.data import TensorLoader, load_dataset
from adderquant.hub import checkpoint_path
from adderquant.models import create_model, load_pretrained, model_record
from adderquant.quant import CalibrationSet, integer_path, quantize
from adderquant.quant.registry import get_method
from passes import fastest_pass


def timed_predictions(model: torch.nn.Module, batches: list[torch.Tensor], integer: bool,
                      reps: int) -> tuple[float, torch.Tensor]:
    """:func:`fastest_pass` with the integer kernel of the quantized layers on or off."""
    with integer_path(model, integer):
        return fastest_pass(model, batches, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="test images (default 1000)")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = checkpoint_path(model_record("resnet20"))
    model = load_pretrained(create_model("resnet20", 10), checkpoint).eval()
    images, labels = load_dataset("cifar10", None, train=False)
    batches = [x for x, _ in TensorLoader(images[: args.images], labels[: args.images],
                                          "cifar10", batch_size=250)]
    rows = []
    for method in ("adderquant", "paper"):
        for bits in args.bits:
            cfg = get_method(method).config(bits=bits, calib_batches=2)
            qmodel = quantize(model, cfg, CalibrationSet.from_config(cfg))
            t_float, p_float = timed_predictions(qmodel, batches, False, args.reps)
            t_int, p_int = timed_predictions(qmodel, batches, True, args.reps)
            rows.append({"method": method, "bits": bits, "float_s": t_float, "integer_s": t_int,
                         "ratio": t_float / t_int,
                         "same_prediction": float((p_int == p_float).float().mean())})
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "images": args.images,
                          "rows": rows}))
        return
    print(f"{args.images} test images, {torch.get_num_threads()} threads")
    print("| method | bits | float kernel s | integer kernel s | ratio | same prediction |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['method']} | {r['bits']} | {r['float_s']:.2f} | {r['integer_s']:.2f} | "
              f"{r['ratio']:.2f} | {100 * r['same_prediction']:.1f} % |")


if __name__ == "__main__":
    main()
