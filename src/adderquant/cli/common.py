"""Arguments and helpers shared by the sub-commands (model, checkpoint, data, output)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from adderquant.data import TensorLoader, load_dataset
from adderquant.models import MODEL_NAMES, create_model, load_pretrained
from adderquant.paths import default_checkpoint

MODEL_DATASET = {"resnet20": "cifar10", "resnet32": "cifar10", "resnet56": "cifar10",
                 "lenet5": "fashion-mnist"}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet20", choices=MODEL_NAMES, help="architecture")
    p.add_argument("--checkpoint", default=None,
                   help="state dict to load (default: the released checkpoint of --model)")
    p.add_argument("--data", default=None,
                   help="dataset root (default: $ADDERQUANT_DATA, then ../shared/data; "
                   "Fashion-MNIST also /usr/share/datasets)")
    p.add_argument("--dataset", default=None, help="dataset name (default: the model's)")
    p.add_argument("--batch-size", type=int, default=250, help="evaluation batch size")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use only the first N test images (default: all)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def dataset_name(args: argparse.Namespace) -> str:
    return args.dataset or MODEL_DATASET.get(args.model, "cifar10")


def build_model(args: argparse.Namespace) -> nn.Module:
    """The model of ``--model`` with ``--checkpoint`` (or its released one) loaded."""
    if args.threads:
        torch.set_num_threads(args.threads)
    num_classes = 100 if dataset_name(args) == "cifar100" else 10
    model = create_model(args.model, num_classes)
    ckpt = args.checkpoint or default_checkpoint(args.model)
    if ckpt is None:
        raise ValueError(f"no released checkpoint for {args.model}; pass --checkpoint PATH")
    return load_pretrained(model, ckpt).eval()


def test_loader(args: argparse.Namespace) -> TensorLoader:
    """Batches of the test set of ``--dataset`` (its first ``--limit`` images if given)."""
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive number of images, got {args.limit}")
    images, labels = load_dataset(dataset_name(args), args.data, train=False)
    if args.limit is not None:
        images, labels = images[: args.limit], labels[: args.limit]
    return TensorLoader(images, labels, dataset_name(args), batch_size=args.batch_size)


def write_json_atomic(path: str | Path, obj) -> None:
    """Write JSON to a temporary file beside ``path``, then rename it into place."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
