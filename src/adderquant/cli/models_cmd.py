"""``adderquant models``: the model zoo's records (architecture, data, checkpoint origin)."""

from __future__ import annotations

import argparse
import json

from adderquant.models import RECORDS

COLUMNS = ("name", "architecture", "dataset", "classes", "input", "full precision",
           "checkpoint")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the zoo's models and their released checkpoints",
                       description="One record per model: architecture, dataset, classes, input "
                       "size, normalisation, layers kept in full precision and, where one is "
                       "published, the checkpoint's file, URL, sha256, origin and licence.")
    p.add_argument("--json", action="store_true", help="print the records as a JSON list")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps([r.as_dict() for r in RECORDS.values()], indent=2))
        return 0
    rows = [(r.name, r.architecture, r.dataset, str(r.num_classes),
             "x".join(map(str, r.input_size)), ",".join(r.full_precision), r.file or "-")
            for r in RECORDS.values()]
    widths = [max(len(row[i]) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    for row in [COLUMNS, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print("\nadderquant models --json adds normalisation, URLs, sha256s, origins and licences.")
    return 0
