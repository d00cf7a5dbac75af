"""Arguments and helpers shared by the sub-commands (model, checkpoint, data, output)."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from adderquant.cli.validate import positive_int, thread_count
from adderquant.data import DATASET_CLASSES, NORMALISATION, TensorLoader, load_dataset
from adderquant.hub import checkpoint_path
from adderquant.models import (
    ADDER_MODELS,
    MODEL_NAMES,
    ModelRecord,
    create_model,
    load_pretrained,
    model_record,
)


def add_model_args(p: argparse.ArgumentParser, adder_only: bool = True) -> None:
    p.add_argument("--model", default="resnet20", choices=ADDER_MODELS if adder_only
                   else MODEL_NAMES, help="architecture (see `adderquant models`)")
    p.add_argument("--checkpoint", default=None,
                   help="state dict to load (default: the released checkpoint of --model: "
                   "$ADDERQUANT_MODELS, ../shared/models, the cache, else downloaded)")
    p.add_argument("--data", default=None,
                   help="dataset root (default: $ADDERQUANT_DATA, ../shared/data, "
                   "/usr/share/datasets, the cache, else downloaded)")
    p.add_argument("--dataset", default=None, help="dataset name (default: the model's)")
    p.add_argument("--batch-size", type=positive_int, default=250, help="evaluation batch size")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="use only the first N test images (default: all)")
    p.add_argument("--threads", type=thread_count, default=None,
                   help="CPU threads (default: all)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def dataset_name(args: argparse.Namespace) -> str:
    return args.dataset or model_record(args.model).dataset


def _record_fits(args: argparse.Namespace) -> ModelRecord | None:
    """The record of ``--model`` if ``--dataset`` is the one it describes, else ``None``."""
    record = model_record(args.model)
    return record if dataset_name(args) == record.dataset else None


def num_classes(args: argparse.Namespace) -> int:
    """Classes of ``--model`` on ``--dataset``."""
    record = _record_fits(args)
    if record is not None:
        return record.num_classes
    if dataset_name(args) not in DATASET_CLASSES:
        raise ValueError(f"unknown dataset {dataset_name(args)!r}; choose one of "
                         f"{', '.join(DATASET_CLASSES)}")
    return DATASET_CLASSES[dataset_name(args)]


def normalisation(args: argparse.Namespace) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input mean and std: the record's on its own dataset, else the dataset's."""
    record = _record_fits(args)
    return (record.mean, record.std) if record is not None else NORMALISATION[dataset_name(args)]


def build_model(args: argparse.Namespace) -> nn.Module:
    """The model of ``--model`` with ``--checkpoint`` (or its released one) loaded."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = create_model(args.model, num_classes(args))
    if args.checkpoint is None and _record_fits(args) is None:
        raise ValueError(f"the released {args.model} is trained on "
                         f"{model_record(args.model).dataset}, not {dataset_name(args)}; pass "
                         "--checkpoint PATH")
    return load_pretrained(model, checkpoint_path(model_record(args.model), args.checkpoint)).eval()


def test_loader(args: argparse.Namespace) -> TensorLoader:
    """Batches of the test set of ``--dataset`` (its first ``--limit`` images if given)."""
    images, labels = load_dataset(dataset_name(args), args.data, train=False)
    if args.limit is not None:
        images, labels = images[: args.limit], labels[: args.limit]
    return TensorLoader(images, labels, dataset_name(args), batch_size=args.batch_size,
                        normalisation=normalisation(args))

