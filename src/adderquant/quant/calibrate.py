"""Calibration: statistics of every adder layer's input over calibration batches."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from adderquant.quant.layers import adder_layers
from adderquant.quant.observers import batch_abs_quantiles, summarize_batch


class ActivationObserver:
    """Running statistics of one layer's input.

    Keeps the exact min and max, the maximum over batches of a per-batch quantile of ``|x|``
    (``quantile``, index ``int(q·n)``) in ``batch_quantile_max``, the same maximum for every
    further ``(rule, q)`` of ``requests`` in ``quantile_maxima`` (rules of
    :mod:`adderquant.quant.observers`, e.g. the released code's ``("released", 0.9997)``), a
    uniform random sample of ``sample_per_batch`` values per batch (for histograms, quantiles
    and clipping searches) and the full inputs of the first ``keep_images`` images (for
    searches that need the layer's output).
    """

    def __init__(
        self,
        quantile: float = 0.9997,
        sample_per_batch: int = 4096,
        keep_images: int = 0,
        seed: int = 0,
        requests: Sequence[tuple[str, float]] = (),
    ) -> None:
        self.quantile = quantile
        self.requests = tuple(dict.fromkeys([("plain", quantile), *requests]))
        self.sample_per_batch = sample_per_batch
        self.keep_images = keep_images
        self.generator = torch.Generator().manual_seed(seed)
        self.min = float("inf")
        self.max = float("-inf")
        self.quantile_maxima: dict[tuple[str, float], float] = dict.fromkeys(self.requests, 0.0)
        self.count = 0
        self.batches = 0
        self._sample = torch.empty(0)  # grows by doubling: few long-lived allocations
        self._sample_len = 0
        self.inputs: list[torch.Tensor] = []

    @property
    def batch_quantile_max(self) -> float:
        """Maximum over batches of the per-batch ``quantile`` of ``|x|`` (plain index rule)."""
        return self.quantile_maxima[("plain", self.quantile)]

    def threshold(self, rule: str, q: float) -> float:
        """Maximum over batches of the per-batch ``(rule, q)`` quantile of ``|x|``."""
        if (rule, q) not in self.quantile_maxima:
            raise KeyError(
                f"the observer did not track the {rule} {q}-quantile; add ({rule!r}, {q}) to "
                "its requests before calibrating"
            )
        return self.quantile_maxima[(rule, q)]

    def update(self, x: torch.Tensor, name: str = "") -> None:
        x = x.detach().float()
        flat = x.flatten()
        lo, hi, quantiles = summarize_batch(flat, self.requests)
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN propagates into min/max
            raise ValueError(
                f"non-finite (NaN/inf) activations at the input of adder layer {name!r} during "
                "calibration; check the model's weights and the input normalisation"
            )
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        for request, value in zip(self.requests, quantiles, strict=True):
            self.quantile_maxima[request] = max(self.quantile_maxima[request], value)
        self.count += flat.numel()
        self.batches += 1
        k = min(self.sample_per_batch, flat.numel())
        idx = torch.randint(0, flat.numel(), (k,), generator=self.generator)
        self._append_sample(flat[idx.to(flat.device)].cpu())
        kept = sum(len(t) for t in self.inputs)
        if kept < self.keep_images:
            self.inputs.append(x[: self.keep_images - kept].cpu().clone())

    def _append_sample(self, values: torch.Tensor) -> None:
        """Append to the sample buffer, doubling its capacity when full (one small tensor
        kept per batch and layer, between the large short-lived activations of the pass,
        fragments the C heap)."""
        end = self._sample_len + len(values)
        if end > len(self._sample):
            grown = torch.empty(max(end, 2 * len(self._sample)), dtype=values.dtype)
            grown[: self._sample_len] = self._sample[: self._sample_len]
            self._sample = grown
        self._sample[self._sample_len : end] = values
        self._sample_len = end

    @property
    def sample(self) -> torch.Tensor:
        """All sampled values, in the order observed."""
        return self._sample[: self._sample_len].clone()

    @property
    def kept_inputs(self) -> torch.Tensor:
        return torch.cat(self.inputs) if self.inputs else torch.empty(0)


def batch_abs_quantile(flat: torch.Tensor, q: float) -> float:
    """The ``q``-quantile of ``|x|`` in one batch, taken as the value at sorted index
    ``int(q · n)`` (clamped to the last element)."""
    return batch_abs_quantiles(flat, [("plain", q)])[0]


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    make_observer=ActivationObserver,
    progress: bool = True,
) -> dict[str, ActivationObserver]:
    """Run ``model`` (eval mode) over ``batches`` and observe the input of every adder layer."""
    layers = adder_layers(model)
    if not layers:
        raise ValueError("the model has no adder layers (adderquant.nn.Adder2d) to quantize")
    return observe_inputs(model, layers, batches, make_observer, progress)


@torch.no_grad()
def observe_inputs(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    make_observer=ActivationObserver,
    progress: bool = True,
    desc: str = "calibrate",
) -> dict[str, ActivationObserver]:
    """Run ``model`` (eval mode) over ``batches``, observing the input of each of ``layers``
    (by name) with an observer of its own."""
    observers = {name: make_observer() for name in layers}
    hooks = [
        layer.register_forward_pre_hook(
            lambda mod, args, name=name: observers[name].update(args[0], name)
        )
        for name, layer in layers.items()
    ]
    model.eval()
    seen = 0
    try:
        for x, _ in tqdm(batches, desc=desc, disable=not progress, leave=False):
            model(x)
            seen += 1
    finally:
        for h in hooks:
            h.remove()
    if seen == 0:
        raise ValueError("the calibration set is empty")
    return observers
