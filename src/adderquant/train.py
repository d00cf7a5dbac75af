"""Training AdderNets from scratch with the released recipe (SGD, cosine schedule)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from adderquant.data import TensorLoader


@dataclass
class TrainConfig:
    """The AdderNet CIFAR recipe by default (lr 0.05·(1 + cos(π·epoch/E)), momentum 0.9,
    weight decay 5e-4, batch 256)."""

    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number above 0, got {self.lr}")
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number of at least 0, got {value}")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the model's weights are no longer usable."""


def cosine_lr(base_lr: float, epoch: float, epochs: int) -> float:
    """``base_lr/2 · (1 + cos(π·epoch/epochs))``: the released code's schedule with
    ``base_lr = 0.1`` gives ``0.05·(1 + cos(...))``."""
    return 0.5 * base_lr * (1 + math.cos(math.pi * epoch / epochs))


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    dataset: str,
    cfg: TrainConfig,
    progress: bool = True,
) -> list[dict]:
    """Train ``model`` in place; returns one log row (epoch, loss, accuracy, seconds) per
    epoch."""
    torch.manual_seed(cfg.seed)
    loader = TensorLoader(
        images, labels, dataset, cfg.batch_size, shuffle=True, augment=cfg.augment, seed=cfg.seed
    )
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    loss_fn = nn.CrossEntropyLoss()
    steps = len(loader)
    log = []
    for epoch in range(cfg.epochs):
        model.train()
        start = time.perf_counter()
        total_loss = correct = seen = 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   leave=False)
        for step, (x, y) in enumerate(bar):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(cfg.lr, epoch + step / steps, cfg.epochs)
            logits = model(x)
            loss = loss_fn(logits, y)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"training diverged: the loss became {float(loss.detach())} at epoch "
                    f"{epoch + 1}, step {step + 1} (base learning rate {cfg.lr}); lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}")
        log.append({
            "epoch": epoch + 1,
            "loss": total_loss / seen,
            "train_top1": 100.0 * correct / seen,
            "seconds": time.perf_counter() - start,
        })
    return log
