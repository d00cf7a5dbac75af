"""Model zoo: one pretrained record per model, and ``create_model(name, num_classes)``.

A record says what the model is (architecture, dataset, classes, input size), how its inputs
are normalised, which of its layers stay in full precision when it is quantized, and, where a
checkpoint is published, the file's name, pinned public URL, sha256, origin and licence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase

from torch import nn

from adderquant.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
)
from adderquant.models.lenet import AdderLeNet5
from adderquant.models.resnet_cifar import BasicBlock, CifarResNet
from adderquant.models.resnet_cnn import CifarConvResNet
from adderquant.models.resnet_imagenet import Bottleneck, ImageNetResNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ADDERNET_COMMIT = "d94dc43a0f2a7448c8c38bcf638062de89f2d34d"
IDELBAYEV_COMMIT = "d5489e8995e81e91ce6b1d69dcc98ad579b0b153"


@dataclass(frozen=True)
class ModelRecord:
    """A zoo model and, where one is published, its pretrained checkpoint.

    ``full_precision`` holds glob patterns of the module names that stay in floating point
    when the model is quantized (every other weight layer is an adder layer).
    """

    name: str
    architecture: str
    build: Callable[[int], nn.Module] = field(repr=False, compare=False)
    dataset: str
    num_classes: int
    input_size: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    full_precision: tuple[str, ...]
    file: str | None = None
    url: str | None = None
    sha256: str | None = None
    origin: str | None = None
    licence: str | None = None

    @property
    def pretrained(self) -> bool:
        return self.file is not None

    @property
    def adder(self) -> bool:
        """Whether the model has adder layers (a convolutional twin keeps every layer)."""
        return "*" not in self.full_precision

    def stays_full_precision(self, module_name: str) -> bool:
        return any(fnmatchcase(module_name, p) for p in self.full_precision)

    def as_dict(self) -> dict:
        """The record as plain JSON-ready values (without the constructor)."""
        out = asdict(self)
        out.pop("build")
        out.update(adder=self.adder, pretrained=self.pretrained)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _cifar_adder(depth: int, **checkpoint) -> ModelRecord:
    return ModelRecord(
        f"resnet{depth}", f"adder ResNet-{depth} (CIFAR)", lambda k: CifarResNet(depth, k),
        "cifar10", 10, (3, 32, 32), CIFAR10_MEAN, CIFAR10_STD, ("conv1", "fc"), **checkpoint,
    )


RECORDS: dict[str, ModelRecord] = {r.name: r for r in (
    _cifar_adder(
        20,
        file="resnet20-adder-cifar10.pth",
        url=f"https://github.com/huawei-noah/AdderNet/raw/{ADDERNET_COMMIT}/models/"
            "ResNet20-AdderNet.pth",
        sha256="fe3ad7c15573d34cddd9b3ec2eed12d9c2c818e59cd7d0797a954d6f76ea375b",
        origin="github.com/huawei-noah/AdderNet (AdderNet, Chen et al., CVPR 2020)",
        licence="BSD-3-Clause, Huawei Technologies",
    ),
    _cifar_adder(32),
    _cifar_adder(56),
    ModelRecord(
        "resnet20-cnn", "convolutional ResNet-20 (CIFAR, option-A shortcuts)",
        lambda k: CifarConvResNet(20, k), "cifar10", 10, (3, 32, 32), IMAGENET_MEAN,
        IMAGENET_STD, ("*",),
        file="resnet20-cnn-cifar10.th",
        url=f"https://github.com/akamaster/pytorch_resnet_cifar10/raw/{IDELBAYEV_COMMIT}/"
            "pretrained_models/resnet20-12fca82f.th",
        sha256="12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
        origin="github.com/akamaster/pytorch_resnet_cifar10",
        licence="BSD-2-Clause, Copyright (c) 2018 Yerlan Idelbayev",
    ),
    ModelRecord(
        "resnet18", "adder ResNet-18 (ImageNet)",
        lambda k: ImageNetResNet(BasicBlock, [2, 2, 2, 2], k), "imagenet", 1000,
        (3, 224, 224), IMAGENET_MEAN, IMAGENET_STD, ("conv1", "fc"),
    ),
    ModelRecord(
        "resnet50", "adder ResNet-50 (ImageNet)",
        lambda k: ImageNetResNet(Bottleneck, [3, 4, 6, 3], k), "imagenet", 1000,
        (3, 224, 224), IMAGENET_MEAN, IMAGENET_STD, ("conv1", "fc"),
    ),
    ModelRecord(
        "lenet5", "adder LeNet-5", AdderLeNet5, "fashion-mnist", 10, (1, 28, 28),
        FASHION_MNIST_MEAN, FASHION_MNIST_STD, ("conv1", "fc"),
    ),
)}

MODEL_NAMES = tuple(RECORDS)
ADDER_MODELS = tuple(name for name, record in RECORDS.items() if record.adder)


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def model_record(name: str) -> ModelRecord:
    """The record of a zoo model (``resnet20``, ``ResNet-20``, ``resnet20-cnn`` ...)."""
    for record in RECORDS.values():
        if _key(record.name) == _key(name):
            return record
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def create_model(name: str, num_classes: int | None = None) -> nn.Module:
    """Build a zoo model by name; ``num_classes`` defaults to its record's dataset."""
    record = model_record(name)
    classes = record.num_classes if num_classes is None else num_classes
    if classes < 1:
        raise ValueError(f"num_classes must be positive, got {classes}")
    return record.build(classes)
