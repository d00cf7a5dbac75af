"""``adderquant infer``: top-1 of a deployment package with the integer engine, its fake-quant
model or the full-precision model, and agreement with the fake-quant model."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from adderquant.cli.validate import positive_int, thread_count
from adderquant.data import TensorLoader, load_dataset
from adderquant.engine.engine import IntegerEngine
from adderquant.engine.export import fakequant_model
from adderquant.engine.package import Package, load_package
from adderquant.hub import checkpoint_path
from adderquant.models import create_model, load_pretrained, model_record

ENGINES = ("int", "fakequant", "float")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="run a deployment package (integer engine) on a dataset")
    p.add_argument("package", metavar="DIR", help="package written by adderquant export")
    p.add_argument("--engine", choices=ENGINES, default="int",
                   help="int: the integer engine; fakequant: the fake-quant model in the "
                        "package; float: the full-precision model of the architecture")
    p.add_argument("--checkpoint", default=None,
                   help="full-precision weights for --engine float (default: the released)")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="first N images only")
    p.add_argument("--data", default=None, help="dataset root (default: the usual locations)")
    p.add_argument("--batch-size", type=positive_int, default=250)
    p.add_argument("--threads", type=thread_count, default=None, help="CPU threads (default: all)")
    p.add_argument("--reference", choices=("float64", "float32", "none"), default="float64",
                   help="precision of the fake-quant model that agreement is measured against "
                        "(float64: its exact value; none: skip)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def build_engine(args: argparse.Namespace, package: Package) -> Callable:
    if args.engine == "int":
        return IntegerEngine(package, args.threads)
    if args.engine == "fakequant":
        return fakequant_model(package)
    arch = package.graph["architecture"]
    ckpt = checkpoint_path(model_record(arch), args.checkpoint)
    return load_pretrained(create_model(arch, package.graph["num_classes"]), ckpt).eval()


@torch.no_grad()
def predict(fn: Callable, loader: TensorLoader, progress: bool, desc: str):
    """(top-1 predictions, labels, wall seconds, CPU seconds of this process) of ``fn`` over
    the loader, data normalisation included."""
    preds, labels = [], []
    start, cpu = time.perf_counter(), time.process_time()
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        preds.append(fn(x).argmax(dim=1))
        labels.append(y)
    return (torch.cat(preds), torch.cat(labels), time.perf_counter() - start,
            time.process_time() - cpu)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    package = load_package(args.package)
    graph = package.graph
    dataset = graph.get("dataset") or model_record(graph["architecture"]).dataset
    images, labels = load_dataset(dataset, args.data, train=args.split == "train")
    if args.limit is not None:
        images, labels = images[: args.limit], labels[: args.limit]
    loader = TensorLoader(images, labels, dataset, batch_size=args.batch_size)
    progress = not args.no_progress and not args.json

    engine = build_engine(args, package)
    preds, truth, seconds, cpu_seconds = predict(engine, loader, progress, args.engine)
    result = {
        "engine": args.engine, "package": str(args.package), "dataset": dataset,
        "split": args.split, "images": len(truth),
        "top1": 100.0 * float((preds == truth).float().mean()),
        "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
        "images_per_second": round(len(truth) / seconds, 1),
        "threads": torch.get_num_threads(),
    }
    if args.reference != "none":
        dtype = torch.float64 if args.reference == "float64" else torch.float32
        reference = fakequant_model(package).to(dtype)
        ref_preds, *_ = predict(lambda x: reference(x.to(dtype)), loader, progress,
                                  f"fakequant {args.reference}")
        result["reference"] = f"fakequant-{args.reference}"
        result["agreement"] = 100.0 * float((preds == ref_preds).float().mean())
    if args.json:
        print(json.dumps(result))
        return 0
    line = (f"{args.engine} engine on {result['images']} {dataset} {args.split} images: top-1 "
            f"{result['top1']:.2f} % in {seconds:.2f} s ({result['images_per_second']} images/s)")
    if "agreement" in result:
        line += f"; agrees with {result['reference']} on {result['agreement']:.2f} %"
    print(line)
    return 0
