"""Arguments and helpers shared by the sub-commands (model, checkpoint, data, output)."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from adderquant.cli.validate import positive_int, thread_count
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
    p.add_argument("--batch-size", type=positive_int, default=250, help="evaluation batch size")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="use only the first N test images (default: all)")
    p.add_argument("--threads", type=thread_count, default=None,
                   help="CPU threads (default: all)")
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
    images, labels = load_dataset(dataset_name(args), args.data, train=False)
    if args.limit is not None:
        images, labels = images[: args.limit], labels[: args.limit]
    return TensorLoader(images, labels, dataset_name(args), batch_size=args.batch_size)
