"""The quantization-aware training configuration: one dataclass holding every default."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

LOSSES = ("kl", "ce")


@dataclass
class QATConfig:
    """Settings of one quantization-aware training run (see docs/method.md, "Quantization-aware
    training")."""

    epochs: int = 4  # passes over the training images (ignored when steps is set)
    steps: int | None = None  # optimizer steps in all (overrides epochs)
    batch_size: int = 128
    # Adam learning rate of the adder layers' weights and biases, in units of each layer's mean
    # grid step (scale-free across layers and networks); cosine decay to 0
    lr: float = 5e-4
    # Adam learning rate of the grid steps, relative to each step (Adam's update ignores the
    # gradient's scale, so the steps need their own, smaller rate)
    step_lr: float = 5e-5
    float_lr: float = 1e-5  # Adam learning rate of the float layers (first conv, classifier, BN)
    warmup: float = 0.0  # first fraction of the steps with the learning rates rising linearly
    loss: str = "kl"  # kl: distillation from the float model's logits; ce: cross-entropy
    temperature: float = 1.0  # of the distillation loss (multiplied back by T^2)
    bn_refresh_batches: int = 50  # train-mode batches re-estimating BatchNorm at start/freeze
    # keep refreshed statistics only where they lower the KL to the float model's logits on the
    # refresh images (else the statistics the model had); false: always keep them
    bn_refresh_check: bool = True
    # last fraction of the steps with BatchNorm frozen (eval mode); 1: frozen throughout, with
    # the statistics of the start (refreshed if bn_refresh_batches, else the model's own)
    bn_freeze: float = 0.25
    true_gradient: bool = False  # exact sign gradients through the adder op (else AdderNet's)
    holdout: int = 10000  # last training images never trained on (agreement and KL)
    eval_images: int = 10000  # held-out images evaluated after every epoch (0: none)
    # pad-4 crop + flip of the training images (None: where the dataset's training recipe has
    # it, CIFAR; MNIST and Fashion-MNIST models are trained without)
    augment: bool | None = None
    views: int = 2  # distinct augmentations of the training images; epoch e uses view e % views
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("epochs", "batch_size", "views"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        for name in ("lr", "step_lr", "float_lr", "temperature"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number above 0, got {value}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if not 0.0 <= self.bn_freeze <= 1.0:
            raise ValueError(f"bn_freeze must be in [0, 1], got {self.bn_freeze}")
        for name in ("bn_refresh_batches", "holdout", "eval_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_images > self.holdout:
            raise ValueError(f"eval_images={self.eval_images} exceeds holdout={self.holdout}; "
                             "the evaluation uses held-out images only")

    def replace(self, **changes: Any) -> QATConfig:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QATConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QAT configuration field(s) {unknown}; known: "
                             f"{sorted(known)}")
        return cls(**data)
