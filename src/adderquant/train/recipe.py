"""Training settings: one dataclass, the AdderNet paper's recipe per dataset, config files.

CIFAR-10/100 (AdderNet, Chen et al., CVPR 2020, and its released code): SGD momentum 0.9,
weight decay 5e-4, batch 256, cosine schedule from 0.1 over 400 epochs, pad-4 crop + flip, the
adder layers' adaptive gradient scaling with eta = 0.2. MNIST (the paper's LeNet-5-BN run):
Nesterov momentum 0.9, weight decay 5e-4, batch 256, cosine from 0.1 over 50 epochs, no
augmentation; Fashion-MNIST, absent from the paper, takes the MNIST recipe. ImageNet-style image
folders: Nesterov momentum 0.9, weight decay 1e-4, batch 256, cosine from 0.1 over 150 epochs,
random-resized crop + flip.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from adderquant.data.splits import AUGMENTATIONS, IMAGE_FOLDER, TRAINING_DATASETS


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; the defaults are the CIFAR recipe.

    ``batch_size`` is the global batch, split evenly over the processes of a distributed run;
    ``eta`` is the adaptive gradient scaling of the adder layers' weight gradients (``None``
    turns it off); ``val_split`` N > 0 holds out the last N training images for validation
    (0 validates on the test split); ``warmup_epochs`` ramps the learning rate linearly before
    the cosine schedule; ``sync_bn`` synchronises BatchNorm statistics over the processes
    (CUDA only); ``workers`` are data-loading processes for image folders.
    """

    epochs: int = 400
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    augment: bool = True
    eta: float | None = 0.2
    val_split: int = 0
    seed: int = 0
    sync_bn: bool = False
    workers: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            _check(name, getattr(self, name), int, lambda v: v >= 1, "an integer of at least 1")
        for name in ("warmup_epochs", "val_split", "workers"):
            _check(name, getattr(self, name), int, lambda v: v >= 0, "an integer of at least 0")
        _check("seed", self.seed, int, lambda v: 0 <= v < 2**32, "an integer from 0 to 2**32-1")
        _check("lr", self.lr, float, lambda v: v > 0, "a finite number above 0")
        for name in ("momentum", "weight_decay"):
            _check(name, getattr(self, name), float, lambda v: v >= 0,
                   "a finite number of at least 0")
        if self.eta is not None:
            _check("eta", self.eta, float, lambda v: v > 0, "a finite number above 0 or null")
        for name in ("nesterov", "augment", "sync_bn"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs a momentum above 0")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be fewer than epochs "
                             f"({self.epochs})")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(name: str, value: Any, kind: type, ok, what: str) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        number = number and float(value).is_integer()
    if not number or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")


FIELDS = tuple(f.name for f in fields(TrainConfig))
_MNIST = TrainConfig(epochs=50, nesterov=True, augment=False)
RECIPES: dict[str, TrainConfig] = {
    "cifar10": TrainConfig(),
    "cifar100": TrainConfig(),
    "mnist": _MNIST,
    "fashion-mnist": _MNIST,
    IMAGE_FOLDER: TrainConfig(epochs=150, nesterov=True, weight_decay=1e-4, workers=8),
}


def recipe(dataset: str) -> TrainConfig:
    """The paper's recipe for ``dataset``."""
    if dataset not in RECIPES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of "
                         f"{', '.join(TRAINING_DATASETS)}")
    return RECIPES[dataset]


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings of a JSON (``.json``) or YAML file: a mapping of :class:`TrainConfig`
    fields (``model`` and ``dataset`` may also be given)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise FileNotFoundError(f"cannot read the config file {path}: {e.strerror or e}") from e
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except ValueError as e:  # json.JSONDecodeError and yaml.YAMLError's parse errors
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                         f"{e}") from e
    except Exception as e:  # yaml.YAMLError does not derive from ValueError
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(FIELDS) - {"model", "dataset"})
    if unknown:
        raise ValueError(f"{path}: unknown settings {', '.join(unknown)}; known: "
                         f"model, dataset, {', '.join(FIELDS)}")
    return data


def build_config(dataset: str, *overrides: dict[str, Any],
                 base: TrainConfig | None = None) -> TrainConfig:
    """The recipe of ``dataset`` (or ``base``) with each mapping of ``overrides`` applied in
    turn (a config file's settings, then the flags given); an augmentation the dataset lacks is
    refused."""
    settings: dict[str, Any] = {}
    for layer in overrides:
        settings.update({k: v for k, v in layer.items() if k in FIELDS})
    for name in ("lr", "momentum", "weight_decay", "eta"):
        if isinstance(settings.get(name), int) and not isinstance(settings[name], bool):
            settings[name] = float(settings[name])
    cfg = replace(recipe(dataset) if base is None else base, **settings)
    if cfg.augment and dataset not in AUGMENTATIONS:
        raise ValueError(f"{dataset} has no standard augmentation; set augment to false")
    return cfg


def cosine_lr(base_lr: float, epoch: float, epochs: int) -> float:
    """``base_lr/2 · (1 + cos(π·epoch/epochs))``: the released code's schedule with
    ``base_lr = 0.1`` gives ``0.05·(1 + cos(...))``."""
    return 0.5 * base_lr * (1 + math.cos(math.pi * epoch / epochs))


class CosineFactor:
    """The learning-rate factor of step ``t`` of ``total`` (``torch.optim.lr_scheduler.LambdaLR``
    state is plain numbers): linear from ``1/warmup`` to 1 over ``warmup`` steps, then the
    cosine from 1 to 0 over the remaining steps."""

    def __init__(self, total: int, warmup: int = 0) -> None:
        self.total, self.warmup = total, warmup

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            return (t + 1) / self.warmup
        return cosine_lr(1.0, t - self.warmup, max(self.total - self.warmup, 1))
