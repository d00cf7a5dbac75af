"""Mixed precision: per-layer bit widths under an average-bit budget, from measured sensitivity.

Every adder layer ``l`` is quantized at every candidate bit width ``b``. Its sensitivity
``S_l(b)`` is the KL divergence of the model's output from the float model's output on
calibration images when only ``l`` is quantized: measured at one reference width, and carried
to the others by the layer's output MSE (for small perturbations the divergence is
proportional to the noise power). Taking the effects of the layers as additive, the
allocation minimises ``Σ_l S_l(b_l)`` subject to ``Σ_l n_l·b_l ≤ B·Σ_l n_l``, ``n_l`` being
the layer's adder operations per image: the energy of an integer adder grows linearly with
its width, so the budget ``B`` is an energy budget as much as an average width. This
multiple-choice knapsack is solved exactly by dynamic programming over the budget in units of
the greatest common divisor of the operation counts.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adderquant.nn import Adder2d
from adderquant.quant.calibrate import ActivationObserver
from adderquant.quant.config import QuantConfig
from adderquant.quant.grid import MAX_BITS, MIN_BITS
from adderquant.quant.layers import QuantAdder2d, adder_layers, replace_module
from adderquant.quant.registry import LayerCache, quantize_layer


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
def output_mse(float_layer: nn.Module, quant_layer: nn.Module, inputs: torch.Tensor) -> float:
    """Mean squared difference of the two layers' outputs on ``inputs``."""
    return float((quant_layer(inputs).double() - float_layer(inputs).double()).square().mean())


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    variants: dict[str, dict[int, nn.Module]],
    images: torch.Tensor,
    layer_inputs: dict[str, torch.Tensor],
    reference_bits: int,
) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    """``S_l(b)`` for every layer ``l`` and width ``b`` of ``variants[l]``; also returns the
    layer output MSEs it is built from.

    The KL divergence (nats, mean over ``images``) of the model's output with only layer ``l``
    replaced by ``variants[l][reference_bits]`` from the float output is measured; the other
    widths follow from the layer's own output MSE on ``layer_inputs[l]``, since for small
    perturbations the KL divergence grows in proportion to the noise power:
    ``S_l(b) = KL_l(ref) · MSE_l(b) / MSE_l(ref)``.
    """
    model.eval()
    reference = model(images).log_softmax(dim=1)
    work = copy.deepcopy(model)
    floats = adder_layers(work)
    sensitivity: dict[str, dict[int, float]] = {}
    mse: dict[str, dict[int, float]] = {}
    for name, by_bits in variants.items():
        if reference_bits not in by_bits:
            raise ValueError(f"no {reference_bits}-bit variant of layer {name!r} to measure")
        x = layer_inputs[name].to(images.device)
        mse[name] = {b: output_mse(floats[name], q.to(images.device), x)
                     for b, q in by_bits.items()}
        replace_module(work, name, by_bits[reference_bits])
        out = work(images).log_softmax(dim=1)
        kl = max(float(F.kl_div(out, reference, log_target=True, reduction="batchmean")), 0.0)
        replace_module(work, name, floats[name])
        ref = mse[name][reference_bits]
        sensitivity[name] = {b: kl * m / ref if ref > 0 else 0.0 for b, m in mse[name].items()}
    return sensitivity, mse


def allocate_bits(
    sensitivity: dict[str, dict[int, float]],
    costs: dict[str, int],
    budget: float,
    max_units: int = 200_000,
) -> dict[str, int]:
    """Bits per layer minimising ``Σ S_l(b_l)`` with ``Σ costs_l·b_l ≤ budget·Σ costs_l``.

    Exact: the integer costs are divided by their greatest common divisor (the operation
    counts of a network share large powers of two) and the budget is spent in those units.
    Only if that leaves more than ``max_units`` units are the item costs rounded up to a
    coarser unit, which keeps the budget but may miss the optimum.
    """
    names = list(sensitivity)
    if not names:
        raise ValueError("no layers to allocate bits to")
    if set(names) - set(costs):
        raise ValueError(f"no cost for the layers {sorted(set(names) - set(costs))}")
    if any(int(costs[n]) != costs[n] or costs[n] < 1 for n in names):
        raise ValueError("layer costs must be positive integers (operation counts)")
    options = [sorted(sensitivity[n]) for n in names]
    divisor = math.gcd(*(int(costs[n]) for n in names))
    units = [int(costs[n]) // divisor for n in names]
    capacity = math.floor(budget * sum(units) + 1e-9)
    if sum(u * opts[0] for u, opts in zip(units, options, strict=True)) > capacity:
        raise ValueError(
            f"an average of {budget} bits is below the narrowest widths measured; raise it"
        )
    scale = min(1.0, max_units / capacity)
    weights = [[math.ceil(u * b * scale - 1e-9) for b in opts]
               for u, opts in zip(units, options, strict=True)]
    capacity = math.floor(capacity * scale)
    best = np.zeros(capacity + 1)
    choices = []
    for n, opts, ws in zip(names, options, weights, strict=True):
        step = np.full((len(opts), capacity + 1), np.inf)
        for i, (b, w) in enumerate(zip(opts, ws, strict=True)):
            if w <= capacity:
                step[i, w:] = best[: capacity + 1 - w] + sensitivity[n][b]
        choices.append(step.argmin(axis=0))
        best = step.min(axis=0)
    if not np.isfinite(best[capacity]):  # only after rounding up: the narrowest widths fit
        return {n: opts[0] for n, opts in zip(names, options, strict=True)}
    allocation, room = {}, capacity
    for i in reversed(range(len(names))):
        k = int(choices[i][room])
        allocation[names[i]] = options[i][k]
        room -= weights[i][k]
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


MSE_IMAGES = 64  # kept calibration inputs per layer for the output MSE of each width


def allocate_mixed_precision(
    model: nn.Module,
    observers: dict[str, ActivationObserver],
    images: torch.Tensor,
    cfg: QuantConfig,
    cache: LayerCache | None = None,
    names: set[str] | None = None,
) -> tuple[dict[str, int], dict[str, Any], dict[str, tuple[QuantAdder2d, dict[str, Any]]]]:
    """Per-layer bits for ``cfg.bit_budget`` with ``cfg.method`` over the adder layers
    ``names`` (default: all). Returns the widths, a report (widths, sensitivities, output MSEs,
    operations, the average reached) and the layers quantized at the chosen widths with their
    reports (every candidate is quantized once). The KL divergence is measured at the
    candidate width nearest the budget's floor."""
    budget = cfg.bit_budget
    if budget is None:
        raise ValueError("mixed precision needs avg_bits (or mixed_precision with bits)")
    if cfg.layer_bits:
        raise ValueError("give either layer_bits or a mixed-precision budget, not both")
    bits = candidate_bits(budget)
    reference_bits = min(max(math.floor(budget), bits[0]), bits[-1])
    quantized = {
        name: {b: quantize_layer(name, copy.deepcopy(layer).cpu(), observers[name], b, cfg,
                                 cache)
               for b in bits}
        for name, layer in adder_layers(model).items() if names is None or name in names
    }
    inputs = {}
    for name, obs in observers.items():
        if name not in quantized:
            continue
        if len(obs.kept_inputs) == 0:
            raise ValueError("mixed precision needs kept calibration inputs (report_images > 0)")
        inputs[name] = obs.kept_inputs[:MSE_IMAGES]
    variants = {n: {b: q for b, (q, _) in by_bits.items()} for n, by_bits in quantized.items()}
    sensitivity, mse = measure_sensitivity(model, variants, images, inputs, reference_bits)
    costs = {n: c for n, c in adder_operations(model, images).items() if n in quantized}
    allocation = allocate_bits(sensitivity, costs, budget)
    report = {
        "budget": budget,
        "candidate_bits": list(bits),
        "reference_bits": reference_bits,
        "average_bits": sum(costs[n] * b for n, b in allocation.items()) / sum(costs.values()),
        "layers": [
            {"layer": n, "bits": b, "operations": costs[n],
             "sensitivity": {str(k): v for k, v in sensitivity[n].items()},
             "output_mse": {str(k): v for k, v in mse[n].items()}}
            for n, b in allocation.items()
        ],
    }
    return allocation, report, {n: quantized[n][b] for n, b in allocation.items()}
