"""``adderquant ptq``: post-training quantization of a model, saved to a file, with its test
top-1 and a per-layer report."""

from __future__ import annotations

import argparse
import json
import time

from adderquant._io import write_json_atomic
from adderquant.cli.common import (
    add_model_args,
    build_model,
    dataset_name,
    num_classes,
    test_loader,
)
from adderquant.cli.config_args import (
    FULL_PRECISION,
    add_config_args,
    config_from_args,
    method_from_args,
)
from adderquant.evaluate import evaluate
from adderquant.quant.config import AdderQuantConfig
from adderquant.quant.io import save_quantized
from adderquant.quant.ptq import CalibrationSet, quantize_with_report
from adderquant.quant.report import format_table, json_ready


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ptq", help="quantize a model after training (calibrate, group, clamp, quantize)",
        description="Quantize every adder layer of a trained model, save it, print its test "
        "top-1 and a per-layer report. Every configuration field is a flag.",
    )
    add_model_args(p)
    p.add_argument("--out", metavar="FILE", help="write the quantized model here")
    p.add_argument("--report", metavar="FILE", help="write the JSON report here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_config_args(p, AdderQuantConfig.method, full_precision=True)
    p.set_defaults(func=run, output_files=("out", "report"))


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    method = method_from_args(args)
    model = build_model(args)
    dataset = dataset_name(args)
    show = not args.no_progress and not args.json
    if method == FULL_PRECISION:
        qmodel, report = model, {"config": {"method": method}, "layers": [], "seconds": {}}
    else:
        cfg = config_from_args(args)
        calib = CalibrationSet.from_config(cfg, dataset, args.data)
        qmodel, report = quantize_with_report(model, cfg, calib, progress=show)
    bits = report["config"].get("bits")
    result = evaluate(qmodel, test_loader(args), progress=show)
    report["seconds"]["evaluate"] = result.seconds
    report["seconds"]["total"] = time.perf_counter() - start
    report.update(model=args.model, dataset=dataset, test=result.as_dict())
    if args.out:
        save_quantized(args.out, qmodel, args.model, num_classes(args), report["config"], report)
    if args.report:
        write_json_atomic(args.report, json_ready(report))
    if args.json:
        print(json.dumps(json_ready({
            "model": args.model, "method": method, "bits": bits, "top1": result.top1,
            "top5": result.top5, "images": result.total, "seconds": report["seconds"],
            "out": args.out, "config": report["config"], "layers": report["layers"],
            "mixed_precision": report.get("mixed_precision"),
        })))
        return 0
    if report["layers"]:
        print(format_table(report["layers"]))
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items())
    mixed = report.get("mixed_precision")
    label = (
        "full precision" if method == FULL_PRECISION
        else f"{method} mixed precision, {mixed['average_bits']:.2f} bits on average"
        if mixed else f"{method} W{bits}A{bits}"
    )
    print(f"{args.model} {label} on {dataset} test "
          f"({result.total} images): top-1 {result.top1:.2f} %  top-5 {result.top5:.2f} %  "
          f"[{steps}]")
    if args.out:
        print(f"saved {args.out}")
    return 0
