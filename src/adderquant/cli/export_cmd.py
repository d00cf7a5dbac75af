"""``adderquant export``: write a quantized model as an integer deployment package."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adderquant.cli.validate import int_in
from adderquant.data import DATASET_CLASSES
from adderquant.engine.export import FRAC_BITS, lower
from adderquant.engine.package import FRAC_BITS_RANGE, PACKAGE_FILES, save_package
from adderquant.models import model_record
from adderquant.quant.io import load_quantized


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a quantized model as an integer deployment package")
    p.add_argument("model", metavar="MODEL", help="quantized model file (adderquant ptq --out)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help=f"package directory ({', '.join(PACKAGE_FILES)})")
    p.add_argument("--dataset", default=None,
                   help="dataset the model classifies (default: the one it was quantized on, "
                        "else its architecture's)")
    p.add_argument("--frac-bits", type=int_in(*FRAC_BITS_RANGE), default=FRAC_BITS,
                   help="fractional bits F of the int64 residual streams (values up to "
                        "±2^(51-F) are exact)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run, output_dirs={"out": PACKAGE_FILES})


def run(args: argparse.Namespace) -> int:
    model, payload = load_quantized(args.model)
    dataset = (args.dataset or payload.get("report", {}).get("dataset")
               or model_record(payload["model"]).dataset)
    if DATASET_CLASSES.get(dataset) != payload["num_classes"]:
        raise ValueError(f"{args.model} ({payload['model']}) has {payload['num_classes']} "
                         f"classes, {dataset} has {DATASET_CLASSES.get(dataset, 'unknown')}; "
                         "pass --dataset NAME")
    package = lower(model, payload["model"], dataset, args.frac_bits)
    out = save_package(package, args.out)
    layers = package.graph["layers"]
    summary = {
        "package": str(out),
        "architecture": payload["model"],
        "adder_layers": len(layers),
        "bits": sorted({lay["bits"] for lay in layers.values()}),
        "groups": sorted({lay["groups"] for lay in layers.values()}),
        "ops": len(package.graph["ops"]),
        "bytes": sum((Path(out) / f).stat().st_size for f in PACKAGE_FILES),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"exported {summary['architecture']} ({summary['adder_layers']} integer adder "
              f"layers, bits {summary['bits']}, groups {summary['groups']}) to {out} "
              f"({summary['bytes'] / 1024:.0f} KiB)")
    return 0
