"""Whole-model inference speed: the integer engine on a quantized adder ResNet-20 against the
float convolutional ResNet-20 (``F.conv2d``) and the float adder ResNet-20.

All three run in this one process on the same test images (each normalised as its model was
trained), the same batch size and the same threads; each time is the fastest of ``--reps``
passes over the images, the passes of the three models interleaved (a change in the machine's
load falls on all three). ``--json`` prints one object with ``images_per_s`` of every model and
the throughput ratios ``int_vs_cnn_fp32`` and ``int_vs_adder_fp32`` (> 1: the integer engine is
faster). Needs the released checkpoints and CIFAR-10 (``../shared`` or the download cache).
"""

from __future__ import annotations

import argparse
import json

import torch

from adderquant.data import load_dataset, normalize
from adderquant.engine import IntegerEngine, lower
from adderquant.hub import checkpoint_path
from adderquant.models import create_model, load_pretrained, model_record
from adderquant.quant import quantize
from adderquant.quant.ptq import CalibrationSet
from adderquant.quant.registry import get_method
from passes import fastest_passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="test images (default 1000)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--bits", type=int, default=4, help="bit width of the adder model")
    parser.add_argument("--method", default="paper", choices=("paper", "adderquant"),
                        help="quantization method of the adder model (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    images, labels = load_dataset("cifar10", None, train=False)
    images, labels = images[: args.images], labels[: args.images]
    adder_rec, cnn_rec = model_record("resnet20"), model_record("resnet20-cnn")
    adder_x = normalize(images, adder_rec.mean, adder_rec.std).split(args.batch_size)
    cnn_x = normalize(images, cnn_rec.mean, cnn_rec.std).split(args.batch_size)
    adder = load_pretrained(create_model("resnet20"), checkpoint_path(adder_rec)).eval()
    cnn = load_pretrained(create_model("resnet20-cnn"), checkpoint_path(cnn_rec)).eval()
    cfg = get_method(args.method).config(bits=args.bits, calib_batches=4)
    qmodel = quantize(adder, cfg, CalibrationSet.from_config(cfg))
    engine = IntegerEngine(lower(qmodel, "resnet20", "cifar10"), threads=args.threads)

    runs = fastest_passes({"int_adder": (engine, list(adder_x)), "cnn_fp32": (cnn, list(cnn_x)),
                           "adder_fp32": (adder, list(adder_x))}, args.reps)
    n = len(labels)
    ips = {k: n / t for k, (t, _) in runs.items()}
    top1 = {k: 100.0 * float((p == labels).float().mean()) for k, (_, p) in runs.items()}
    result = {
        "images": n, "threads": args.threads, "batch_size": args.batch_size, "bits": args.bits,
        "method": args.method,
        "images_per_s": ips, "top1": top1,
        "int_vs_cnn_fp32": ips["int_adder"] / ips["cnn_fp32"],
        "int_vs_adder_fp32": ips["int_adder"] / ips["adder_fp32"],
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{n} test images, batch {args.batch_size}, {args.threads} threads, fastest of "
          f"{args.reps} passes")
    print("| model | images/s | top-1 (%) |")
    print("| --- | ---: | ---: |")
    names = {"int_adder": f"adder ResNet-20, {args.bits}-bit {args.method}, integer engine",
             "cnn_fp32": "convolutional ResNet-20, float32 (F.conv2d)",
             "adder_fp32": "adder ResNet-20, float32 (adder kernel)"}
    for k, name in names.items():
        print(f"| {name} | {ips[k]:.0f} | {top1[k]:.1f} |")
    print(f"\nint_vs_cnn_fp32 {result['int_vs_cnn_fp32']:.2f}, "
          f"int_vs_adder_fp32 {result['int_vs_adder_fp32']:.2f}")


if __name__ == "__main__":
    main()
