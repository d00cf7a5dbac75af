"""Top-k accuracy of a model over a loader."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm


@dataclass
class EvalResult:
    """Accuracy figures of one evaluation pass (top1/top5 in percent)."""

    top1: float
    top5: float
    correct: int
    total: int
    seconds: float
    predictions: torch.Tensor

    def as_dict(self) -> dict:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "correct": self.correct,
            "total": self.total,
            "seconds": round(self.seconds, 3),
        }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    progress: bool = True,
    desc: str = "eval",
) -> EvalResult:
    """Run ``model`` in eval mode over ``(images, labels)`` batches."""
    model.eval()
    start = time.perf_counter()
    correct1 = correct5 = total = 0
    preds = []
    for x, y in tqdm(batches, desc=desc, disable=not progress, leave=False):
        logits = model(x)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        preds.append(top[:, 0])
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y.view(-1, 1)).any(dim=1).sum())
        total += len(y)
    if total == 0:
        raise ValueError("evaluation saw no images")
    return EvalResult(
        top1=100.0 * correct1 / total,
        top5=100.0 * correct5 / total,
        correct=correct1,
        total=total,
        seconds=time.perf_counter() - start,
        predictions=torch.cat(preds),
    )
