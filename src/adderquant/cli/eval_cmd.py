"""``adderquant eval``: top-1/top-5 of a (pretrained) model on a test set."""

from __future__ import annotations

import argparse
import json

from adderquant.cli.common import add_model_args, build_model, dataset_name, test_loader
from adderquant.evaluate import evaluate


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on its test set")
    add_model_args(p, adder_only=False)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = build_model(args)
    result = evaluate(model, test_loader(args), progress=not args.no_progress and not args.json)
    if args.json:
        print(json.dumps({"model": args.model, "dataset": dataset_name(args), **result.as_dict()}))
    else:
        print(f"{args.model} on {dataset_name(args)} test ({result.total} images): "
              f"top-1 {result.top1:.2f} %  top-5 {result.top5:.2f} %  "
              f"({result.correct}/{result.total}) in {result.seconds:.1f} s")
    return 0
