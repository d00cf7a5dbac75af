"""Repairs after quantization: BatchNorm re-estimation and per-channel bias correction.

- :func:`reestimate_bn`: the released code's step. The model runs in train mode over calibration
  batches without any weight update, so every BatchNorm layer's running statistics are
  recomputed from the quantized model's own activations (exponential average with
  ``momentum``, or the cumulative average when ``momentum`` is ``None``).
- :func:`correct_adder_bias`: for every quantized adder layer, the mean over calibration
  batches of ``adder(x, W) − quant_layer(x)`` per output channel is added to the layer's
  ``bias``. It removes the systematic part of each layer's quantization error (a per-channel
  offset that BatchNorm would otherwise pass on as a shift of the features) without touching
  any BatchNorm statistic. Rounding clamped weights (``±A``) moves each by about one step in
  the same direction, so this offset dominates the error of the paper's quantizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from tqdm import tqdm

from adderquant.nn import Adder2d
from adderquant.ops import adder2d
from adderquant.quant.layers import QuantAdder2d

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU if it has none)."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def negligible_batches(count: int, momentum: float | None, weight: float) -> int:
    """How many of ``count`` leading batches an exponential average with ``momentum`` may skip
    when every skipped batch's total weight in the result stays below ``weight``.

    After ``K`` batches the running statistic is ``(1 − m)^K·r_0 + Σ_k m(1 − m)^(K−1−k)·b_k``.
    Starting at batch ``j`` instead changes it by ``(1 − m)^(K−j)·(r_j − r_0)``: the first ``j``
    batches and the initial value together weigh ``(1 − m)^(K−j)``. Train-mode outputs do not
    depend on the running statistics, so the batches kept see the same activations."""
    if momentum is None or weight <= 0.0 or momentum >= 1.0:
        return 0
    needed = math.ceil(math.log(weight) / math.log(1.0 - momentum))
    return max(0, count - needed)


@torch.no_grad()
def reestimate_bn(
    model: nn.Module, batches: Batches, momentum: float | None = 0.1, progress: bool = False,
    negligible_weight: float = 0.0,
) -> int:
    """Recompute every BatchNorm's running statistics in train mode over ``batches`` (no weight
    update); returns the number of batches run. ``momentum=None`` restarts the statistics and
    takes the cumulative average. ``negligible_weight`` > 0 (with a momentum and batches of
    known length) skips the leading batches whose weight in the result is below it (see
    :func:`negligible_batches`)."""
    skip = (negligible_batches(len(batches), momentum, negligible_weight)
            if hasattr(batches, "__len__") else 0)
    norms = batch_norms(model)
    if not norms:
        raise ValueError("the model has no BatchNorm layers to re-estimate")
    saved = [bn.momentum for bn in norms]
    for bn in norms:
        bn.momentum = momentum
        if momentum is None:
            bn.reset_running_stats()
    device = model_device(model)
    seen = 0
    model.train()
    try:
        for i, (x, _) in enumerate(tqdm(batches, desc="bn", disable=not progress, leave=False)):
            if i >= skip:
                model(x.to(device))
                seen += 1
    finally:
        model.eval()
        for bn, m in zip(norms, saved, strict=True):
            bn.momentum = m
    if seen == 0:
        raise ValueError("BatchNorm re-estimation got no batches")
    return seen


@torch.no_grad()
def correct_adder_bias(
    qmodel: nn.Module,
    float_model: nn.Module,
    batches: Batches,
    inputs: str = "float",
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Add to every :class:`QuantAdder2d` of ``qmodel`` the per-channel mean of
    ``float_layer(x) − quant_layer(x)`` over ``batches``; ``float_layer`` is the adder layer of
    the same name in ``float_model``. ``inputs="float"``: ``x`` is the layer's input in the float
    model (every layer is corrected for the inputs it should see once all layers are corrected);
    ``inputs="quant"``: ``x`` is its input in the quantized model (one pass, so the corrections
    of deeper layers are measured before the shallower ones are applied). Returns the
    corrections by layer name."""
    if inputs not in ("float", "quant"):
        raise ValueError(f"inputs must be 'float' or 'quant', got {inputs!r}")
    floats = {n: m for n, m in float_model.named_modules() if isinstance(m, Adder2d)}
    quants = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantAdder2d)}
    if not quants:
        raise ValueError("the model has no quantized adder layers to correct")
    missing = sorted(set(quants) - set(floats))
    if missing:
        raise ValueError(f"the float model lacks the adder layers {missing}")
    sums = {n: torch.zeros(q.bias.shape, dtype=torch.float64) for n, q in quants.items()}
    counts = dict.fromkeys(quants, 0)

    def hook(name: str):
        def record(module: nn.Module, args, out: torch.Tensor) -> None:
            x = args[0]
            if inputs == "float":
                y, y_hat = out, quants[name](x)
            else:
                ref = floats[name]
                w = ref.adder.detach().to(device=x.device, dtype=x.dtype)
                y = adder2d(x, w, None, ref.stride, ref.padding, ref.dilation, eta=None)
                y_hat = out
            sums[name] += (y - y_hat).double().sum(dim=(0, 2, 3)).cpu()
            counts[name] += out.shape[0] * out.shape[2] * out.shape[3]

        return record

    runner, hooked = (float_model, floats) if inputs == "float" else (qmodel, quants)
    handles = [hooked[n].register_forward_hook(hook(n)) for n in quants]
    device = model_device(runner)
    runner.eval()
    try:
        for x, _ in tqdm(batches, desc="bias", disable=not progress, leave=False):
            runner(x.to(device))
    finally:
        for h in handles:
            h.remove()
    if not any(counts.values()):
        raise ValueError("bias correction got no batches")
    corrections = {}
    for name, q in quants.items():
        delta = (sums[name] / counts[name]).float()
        q.bias += delta.to(q.bias.device)
        corrections[name] = delta
    return corrections
