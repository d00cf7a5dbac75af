"""Model zoo: ``create_model(name, num_classes)``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from adderquant.models.lenet import AdderLeNet5
from adderquant.models.resnet_cifar import BasicBlock, CifarResNet
from adderquant.models.resnet_imagenet import Bottleneck, ImageNetResNet

_MODELS: dict[str, tuple[Callable[[int], nn.Module], int]] = {
    "resnet20": (lambda k: CifarResNet(20, k), 10),
    "resnet32": (lambda k: CifarResNet(32, k), 10),
    "resnet56": (lambda k: CifarResNet(56, k), 10),
    "resnet18": (lambda k: ImageNetResNet(BasicBlock, [2, 2, 2, 2], k), 1000),
    "resnet50": (lambda k: ImageNetResNet(Bottleneck, [3, 4, 6, 3], k), 1000),
    "lenet5": (lambda k: AdderLeNet5(k), 10),
}

MODEL_NAMES = tuple(_MODELS)


def create_model(name: str, num_classes: int | None = None) -> nn.Module:
    """Build an adder network by name (``resnet20``, ``resnet32``, ``resnet56``, ``resnet18``,
    ``resnet50``, ``lenet5``); ``num_classes`` defaults to the model's usual dataset."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    build, default_classes = _MODELS[key]
    classes = default_classes if num_classes is None else num_classes
    if classes < 1:
        raise ValueError(f"num_classes must be positive, got {classes}")
    return build(classes)
