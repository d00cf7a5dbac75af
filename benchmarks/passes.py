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
    return fastest_passes({"model": (model, batches)}, reps)["model"]


@torch.no_grad()
def fastest_passes(models: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor],
                                           list[torch.Tensor]]],
                   reps: int) -> dict[str, tuple[float, torch.Tensor]]:
    """:func:`fastest_pass` of several models on their batches, the passes interleaved (one
    pass of each model per round), so that a change in the machine's load falls on all of
    them alike: {name: (seconds, top-1 predictions)}."""
    for model, batches in models.values():
        model(batches[0])
    best = {name: (float("inf"), torch.empty(0)) for name in models}
    for _ in range(reps):
        for name, (model, batches) in models.items():
            start = time.perf_counter()
            preds = torch.cat([model(x).argmax(dim=1) for x in batches])
            seconds = time.perf_counter() - start
            if seconds < best[name][0]:
                best[name] = (seconds, preds)
    return best
