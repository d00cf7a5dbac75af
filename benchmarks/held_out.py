"""Shared set-up of the held-out analyses of a quantized adder ResNet-20 (``bn_refresh_images``,
``quant_error_split``): the command line, the released float model, the quantized model and the
CIFAR-10 training images split as QAT splits them."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from adderquant.data import NORMALISATION, load_dataset, normalize
from adderquant.hub import checkpoint_path
from adderquant.models import create_model, load_pretrained, model_record
from adderquant.quant.io import load_quantized

HOLDOUT = 10_000  # the last training images, never trained on


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quantized", required=True,
                   help="a quantized adder ResNet-20 (adderquant ptq --out FILE)")
    p.add_argument("--held", type=int, default=2000, help="held-out images scored")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    return p


@dataclass
class Setup:
    model: nn.Module  # the released float model, eval mode
    quantized: nn.Module
    train: torch.Tensor  # uint8 training images QAT trains on
    held: torch.Tensor  # the first --held held-out images
    prepare: Callable[[torch.Tensor], torch.Tensor]


def load(p: argparse.ArgumentParser, args: argparse.Namespace) -> Setup:
    if not 0 < args.held <= HOLDOUT:
        p.error(f"--held must be in 1..{HOLDOUT}")
    torch.set_num_threads(args.threads)
    model = load_pretrained(create_model("resnet20"),
                            checkpoint_path(model_record("resnet20"))).eval()
    try:
        quantized, _ = load_quantized(args.quantized)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    images, _ = load_dataset("cifar10", train=True)
    mean, std = NORMALISATION["cifar10"]
    return Setup(model, quantized, images[:-HOLDOUT], images[-HOLDOUT:][: args.held],
                 lambda x: normalize(x, mean, std))
