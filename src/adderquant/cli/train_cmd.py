"""``adderquant train``: train a zoo model with its dataset's recipe, resumable, on one process
or many (``torchrun --nproc-per-node N -m adderquant train ...``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adderquant.cli.validate import (
    int_in,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    thread_count,
)
from adderquant.data.splits import IMAGE_FOLDER, TRAINING_DATASETS
from adderquant.models import MODEL_NAMES
from adderquant.train.loop import RunFolder

DEFAULT_MODEL = "lenet5"
# Flags that set a TrainConfig field (their defaults come from the dataset's recipe).
CONFIG_FLAGS = ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay",
                "warmup_epochs", "augment", "eta", "val_split", "seed", "sync_bn", "workers")


def eta_value(text: str) -> float | None:
    """An argparse type: a finite number above 0, or ``none`` (no gradient scaling)."""
    return None if text.lower() in ("none", "off") else positive_float(text)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a zoo model with the AdderNet recipe of its dataset",
        description="Train a zoo model. Every setting defaults to the AdderNet paper's recipe "
        "for the dataset (see docs/training.md); a --config file (JSON or YAML) overrides the "
        "recipe and flags override both. Under torchrun the processes share the global "
        "--batch-size and process 0 writes the run folder.")
    p.add_argument("--model", default=None, choices=MODEL_NAMES,
                   help=f"zoo model (default: {DEFAULT_MODEL})")
    p.add_argument("--dataset", default=None, choices=TRAINING_DATASETS,
                   help="default: the model's own dataset (image-folder for ImageNet models)")
    p.add_argument("--data", default=None, help="dataset root (default: the usual locations; "
                   "image-folder needs DIR with train/<class>/ and val/<class>/)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder: last.pt, best.pt, "
                   "log.jsonl, curves.png, and model.pth (the final weights)")
    p.add_argument("--config", dest="recipe_file", metavar="FILE",
                   help="settings file (.json, or YAML otherwise) overriding the recipe")
    p.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                   help="continue the run from DIR/last.pt, or from CHECKPOINT")
    p.add_argument("--stop-after", type=positive_int, default=None, metavar="EPOCH",
                   help="end this invocation after that epoch (continue later with --resume)")
    g = p.add_argument_group("recipe (defaults: the dataset's recipe)")
    g.add_argument("--epochs", type=positive_int)
    g.add_argument("--batch-size", type=positive_int, help="global batch over all processes")
    g.add_argument("--lr", type=positive_float, help="base learning rate of the cosine schedule")
    g.add_argument("--momentum", type=non_negative_float)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--weight-decay", type=non_negative_float)
    g.add_argument("--warmup-epochs", type=non_negative_int)
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="the dataset's standard augmentation (CIFAR crop+flip, ImageNet "
                   "random-resized crop+flip)")
    g.add_argument("--eta", type=eta_value, default=argparse.SUPPRESS,
                   help="adaptive gradient scaling of the adder layers, or none")
    g.add_argument("--val-split", type=non_negative_int, metavar="N",
                   help="validate on the last N training images (0: on the test split)")
    g.add_argument("--seed", type=int_in(0, 2**32 - 1))
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="synchronise BatchNorm over the processes (CUDA)")
    g.add_argument("--workers", type=non_negative_int, help="data-loading processes")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="use the first N images of each split (quick runs)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=thread_count, default=None, help="CPU threads per process")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run, output_dirs={"out": RunFolder.FILES})


def _given(args: argparse.Namespace) -> dict:
    """The recipe flags given on the command line (``--eta`` may be given as none)."""
    given = vars(args)
    return {k: given[k] for k in CONFIG_FLAGS
            if k in given and (k == "eta" or given[k] is not None)}


def run(args: argparse.Namespace) -> int:
    import torch

    from adderquant.data.splits import load_training_data
    from adderquant.data.transforms import NORMALISATION
    from adderquant.models import create_model, model_record
    from adderquant.models.registry import IMAGENET_MEAN, IMAGENET_STD
    from adderquant.train import (
        TrainConfig,
        build_config,
        fit,
        from_environment,
        pick_device,
        process_group,
        read_checkpoint,
        read_config_file,
    )
    from adderquant.train.state import RunIdentity

    if args.threads:
        torch.set_num_threads(args.threads)
    file_settings = read_config_file(args.recipe_file) if args.recipe_file else {}
    record = model_record(args.model or file_settings.get("model", DEFAULT_MODEL))
    dataset = args.dataset or file_settings.get("dataset") or (
        IMAGE_FOLDER if record.dataset == "imagenet" else record.dataset)
    if dataset not in TRAINING_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of "
                         f"{', '.join(TRAINING_DATASETS)}")
    processes = from_environment()
    device = pick_device(processes, args.device)
    folder = RunFolder(Path(args.out))
    if args.resume is None:
        resume, base = None, None
    else:
        resume = folder.last if args.resume == "last" else Path(args.resume)
        saved = read_checkpoint(resume, RunIdentity(record.name, dataset, None))
        base = TrainConfig(**saved["config"])
    cfg = build_config(dataset, file_settings, _given(args), base=base)
    data = load_training_data(dataset, args.data, cfg.val_split, args.limit)
    shape = data.train.sample_shape
    if shape != record.input_size:
        raise ValueError(f"{record.name} takes {'x'.join(map(str, record.input_size))} images, "
                         f"{dataset} has {'x'.join(map(str, shape))}; choose a model made for "
                         f"{dataset}")
    identity = RunIdentity(record.name, dataset, data.num_classes)
    same_data = record.dataset == dataset or (record.dataset, dataset) == ("imagenet",
                                                                           IMAGE_FOLDER)
    normalisation = (record.mean, record.std) if same_data else NORMALISATION.get(
        dataset, (IMAGENET_MEAN, IMAGENET_STD))
    torch.manual_seed(cfg.seed)
    model = create_model(record.name, data.num_classes)

    def report(row: dict) -> None:
        if not args.json:
            print(f"epoch {row['epoch']}/{cfg.epochs}: train loss {row['train_loss']:.4f} "
                  f"top-1 {row['train_top1']:.2f} %  val loss {row['val_loss']:.4f} top-1 "
                  f"{row['val_top1']:.2f} %  ({row['seconds']:.1f} s, "
                  f"{row['images_per_s']:.0f} img/s)", flush=True)

    with process_group(processes, device):
        result = fit(model, data, cfg, identity, normalisation, folder=folder, resume=resume,
                     stop_after=args.stop_after, processes=processes, device=device,
                     progress=not (args.json or args.no_progress), report=report)
    if not processes.main:
        return 0
    summary = {"model": record.name, "dataset": dataset, "processes": processes.world,
               "config": cfg.as_dict(), "validation": data.val_name, "finished": result.finished,
               "epochs": result.history, "best": result.best, "test": result.test,
               "images_per_s": round(result.images_per_second, 1), "out": str(folder.path)}
    if args.json:
        print(json.dumps(summary))
    else:
        if result.test is not None:
            print(f"test top-1 {result.test['top1']:.2f} % ({result.test['images']} images)")
        state = "finished; final weights in " + str(folder.weights) if result.finished else (
            f"stopped after epoch {len(result.history)}; continue with --resume")
        print(f"best val top-1 {result.best['val_top1']:.2f} % (epoch {result.best['epoch']}); "
              f"{state}" if result.best else state)
    return 0

