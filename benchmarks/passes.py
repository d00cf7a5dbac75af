"""Whole-model timing shared by the benchmarks: the fastest of several passes over images."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


@torch.no_grad()
def fastest_pass(model: Callable[[torch.Tensor], torch.Tensor], batches: list[torch.Tensor],
                 reps: int) -> tuple[float, torch.Tensor]:
    """Fastest of ``reps`` passes over ``batches`` after one warm-up call: (seconds, top-1
    predictions). On a shared machine the fastest pass is the one least disturbed."""
    model(batches[0])
    best, preds = float("inf"), torch.empty(0)
    for _ in range(reps):
        start = time.perf_counter()
        preds = torch.cat([model(x).argmax(dim=1) for x in batches])
        best = min(best, time.perf_counter() - start)
    return best, preds
