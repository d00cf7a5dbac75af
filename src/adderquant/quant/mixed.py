"""Mixed precision: per-layer bit widths under an average-bit budget, from measured sensitivity.

Every adder layer ``l`` is quantized alone at every candidate bit width ``b`` (the other layers
stay in float) and the KL divergence of the model's output from the float model's output on a
few calibration images is its sensitivity ``S_l(b)``. Taking the effects of the layers as
additive, the allocation minimises ``Σ_l S_l(b_l)`` subject to ``Σ_l n_l·b_l ≤ B·Σ_l n_l``,
``n_l`` being the layer's adder operations per image: the energy of an integer adder grows
linearly with its width, so the budget ``B`` is an energy budget as much as an average width.
This multiple-choice knapsack is solved exactly by dynamic programming on a budget discretised
into ``resolution`` units (item costs rounded up, so the budget always holds).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adderquant.nn import Adder2d
from adderquant.quant.calibrate import ActivationObserver
from adderquant.quant.config import PTQConfig
from adderquant.quant.grid import MAX_BITS, MIN_BITS
from adderquant.quant.layers import QuantAdder2d, adder_layers, replace_module
from adderquant.quant.methods import get_method

LayerQuantizer = Callable[[str, Adder2d, int], QuantAdder2d]


@torch.no_grad()
def adder_operations(model: nn.Module, images: torch.Tensor) -> dict[str, int]:
    """Absolute differences per image of every adder layer (``C_out·C_in/groups·kh·kw·H·W`` of
    its output), found by running ``images[:1]``."""
    ops: dict[str, int] = {}

    def record(name: str, layer: Adder2d, out: torch.Tensor) -> None:
        c_in, kh, kw = layer.adder.shape[1:]
        ops[name] = int(out[0].numel()) * c_in * kh * kw

    layers = adder_layers(model)
    hooks = [
        layer.register_forward_hook(lambda mod, args, out, name=name: record(name, mod, out))
        for name, layer in layers.items()
    ]
    try:
        model.eval()(images[:1])
    finally:
        for h in hooks:
            h.remove()
    return ops


def candidate_bits(budget: float) -> tuple[int, ...]:
    """Bit widths an allocation for the average ``budget`` chooses from: one below its floor
    to one above its ceiling, within 2–8."""
    if not MIN_BITS <= budget <= MAX_BITS:
        raise ValueError(f"the average bit width must be in [{MIN_BITS}, {MAX_BITS}], got {budget}")
    lo = max(MIN_BITS, math.floor(budget) - 1)
    hi = min(MAX_BITS, math.ceil(budget) + 1)
    return tuple(range(lo, hi + 1))


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module, quantize: LayerQuantizer, images: torch.Tensor, bits: Sequence[int]
) -> dict[str, dict[int, float]]:
    """``S_l(b)``: KL divergence (nats, mean over ``images``) of the output of ``model`` with
    only layer ``l`` replaced by ``quantize(l, layer, b)`` from the float output."""
    model.eval()
    reference = model(images).log_softmax(dim=1)
    work = copy.deepcopy(model)
    sensitivity: dict[str, dict[int, float]] = {}
    device = images.device
    for name, layer in adder_layers(work).items():
        sensitivity[name] = {}
        for b in bits:
            replace_module(work, name, quantize(name, layer, b).to(device))
            out = work(images).log_softmax(dim=1)
            kl = F.kl_div(out, reference, log_target=True, reduction="batchmean")
            sensitivity[name][b] = max(float(kl), 0.0)
        replace_module(work, name, layer)
    return sensitivity


def allocate_bits(
    sensitivity: dict[str, dict[int, float]],
    costs: dict[str, float],
    budget: float,
    resolution: int = 10000,
) -> dict[str, int]:
    """Bits per layer minimising ``Σ S_l(b_l)`` with ``Σ costs_l·b_l ≤ budget·Σ costs_l``."""
    names = list(sensitivity)
    if not names:
        raise ValueError("no layers to allocate bits to")
    if set(names) - set(costs):
        raise ValueError(f"no cost for the layers {sorted(set(names) - set(costs))}")
    total = sum(costs[n] for n in names)
    unit = budget * total / resolution
    options = [sorted(sensitivity[n]) for n in names]
    floor_cost = sum(costs[n] * opts[0] for n, opts in zip(names, options))
    if floor_cost > budget * total * (1 + 1e-12):
        raise ValueError(
            f"an average of {budget} bits is below the narrowest widths measured "
            f"({floor_cost / total:.3f} bits on average); raise the budget"
        )
    best = np.zeros(resolution + 1)
    choices = []
    for n, opts in zip(names, options):
        step = np.full((len(opts), resolution + 1), np.inf)
        for i, b in enumerate(opts):
            w = min(math.ceil(costs[n] * b / unit - 1e-9), resolution + 1)
            if w <= resolution:
                step[i, w:] = best[: resolution + 1 - w] + sensitivity[n][b]
        choices.append(step.argmin(axis=0))
        best = step.min(axis=0)
    if not np.isfinite(best[resolution]):
        # rounding the costs up left no room: only the narrowest widths fit
        return {n: opts[0] for n, opts in zip(names, options)}
    allocation, room = {}, resolution
    for n, opts, choice in zip(reversed(names), reversed(options), reversed(choices)):
        b = opts[int(choice[room])]
        allocation[n] = b
        room -= math.ceil(costs[n] * b / unit - 1e-9)
    return {n: allocation[n] for n in names}


def first_images(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], count: int) -> torch.Tensor:
    """The first ``count`` images of ``batches`` as one tensor."""
    taken, total = [], 0
    for x, _ in batches:
        taken.append(x[: count - total])
        total += len(taken[-1])
        if total >= count:
            break
    if not taken:
        raise ValueError("no calibration images for the sensitivity measurement")
    return torch.cat(taken)


def allocate_mixed_precision(
    model: nn.Module,
    observers: dict[str, ActivationObserver],
    images: torch.Tensor,
    cfg: PTQConfig,
) -> tuple[dict[str, int], dict[str, Any]]:
    """Per-layer bits for ``cfg.bit_budget`` with ``cfg.method``, and a report: the widths,
    the measured sensitivities, each layer's operations and the average reached."""
    budget = cfg.bit_budget
    if budget is None:
        raise ValueError("mixed precision needs avg_bits (or mixed_precision with bits)")
    if cfg.layer_bits:
        raise ValueError("give either layer_bits or a mixed-precision budget, not both")
    method = get_method(cfg.method)
    bits = candidate_bits(budget)

    def quantize(name: str, layer: Adder2d, b: int) -> QuantAdder2d:
        return method(name, copy.deepcopy(layer).cpu(), observers[name], b, cfg)[0]

    sensitivity = measure_sensitivity(model, quantize, images, bits)
    costs = adder_operations(model, images)
    allocation = allocate_bits(sensitivity, costs, budget)
    total = sum(costs.values())
    report = {
        "budget": budget,
        "candidate_bits": list(bits),
        "average_bits": sum(costs[n] * b for n, b in allocation.items()) / total,
        "layers": [
            {"layer": n, "bits": b, "operations": costs[n],
             "sensitivity": {str(k): v for k, v in sensitivity[n].items()}}
            for n, b in allocation.items()
        ],
    }
    return allocation, report
