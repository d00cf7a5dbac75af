"""``adderquant train``: train an AdderNet from scratch and save its state dict."""

from __future__ import annotations

import argparse
import io
import json

import torch

from adderquant._io import write_bytes_atomic
from adderquant.cli.validate import non_negative_float, positive_float, positive_int
from adderquant.data import DATASET_CLASSES, TensorLoader, load_dataset
from adderquant.evaluate import evaluate
from adderquant.models import MODEL_NAMES, create_model
from adderquant.train import TrainConfig, train


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an AdderNet from scratch")
    p.add_argument("--model", default="lenet5", choices=MODEL_NAMES)
    p.add_argument("--dataset", default="fashion-mnist", choices=tuple(DATASET_CLASSES))
    p.add_argument("--data", default=None, help="dataset root (default: the usual locations)")
    p.add_argument("--out", required=True, help="where to save the trained state dict (.pth)")
    p.add_argument("--epochs", type=positive_int, default=TrainConfig.epochs)
    p.add_argument("--batch-size", type=positive_int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=positive_float, default=TrainConfig.lr,
                   help="base learning rate, a finite number above 0 (default: %(default)s)")
    p.add_argument("--weight-decay", type=non_negative_float, default=TrainConfig.weight_decay)
    p.add_argument("--augment", action="store_true", help="CIFAR crop + flip augmentation")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="train on the first N images only")
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run, output_files=("out",))


def run(args: argparse.Namespace) -> int:
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, augment=args.augment, seed=args.seed,
    )
    images, labels = load_dataset(args.dataset, args.data, train=True)
    if args.limit is not None:
        images, labels = images[: args.limit], labels[: args.limit]
    torch.manual_seed(args.seed)
    model = create_model(args.model, DATASET_CLASSES[args.dataset])
    log = train(model, images, labels, args.dataset, cfg, progress=not args.json)
    test_images, test_labels = load_dataset(args.dataset, args.data, train=False)
    result = evaluate(
        model, TensorLoader(test_images, test_labels, args.dataset, 500), progress=False
    )
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    write_bytes_atomic(args.out, buf.getvalue())
    summary = {"model": args.model, "dataset": args.dataset, "epochs": log,
               "test": result.as_dict(), "out": str(args.out)}
    if args.json:
        print(json.dumps(summary))
    else:
        for row in log:
            print(f"epoch {row['epoch']}: loss {row['loss']:.4f}  train top-1 "
                  f"{row['train_top1']:.2f} %  ({row['seconds']:.1f} s)")
        print(f"test top-1 {result.top1:.2f} % ({result.correct}/{result.total}); "
              f"saved {args.out}")
    return 0
