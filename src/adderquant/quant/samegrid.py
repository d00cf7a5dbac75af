"""The ``adderquant`` method: weights and activations of an adder layer on one unsigned grid.

Per group of output channels an interval ``[a, c]`` (``a ≤ 0 ≤ c``; ``a = 0`` after a ReLU)
defines one grid for both operands (``clipsearch.interval_grid``). Weights are clamped into the
grid's range losslessly, ``|x − w| = |x − clamp(w, lo, hi)| + dist(w, [lo, hi])`` for every
input in ``[lo, hi]``, the removed part going to a per-channel bias; then both are rounded to
unsigned codes in ``[0, 2^b − 1]`` and ``|x̂ − ŵ| = Δ·|q_x − q_w|`` (the zero point cancels).
The intervals and the grouping of the channels are chosen by the output error on sampled
calibration patches (``clipsearch``); the mean error left per channel is removed by a bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from adderquant.nn import Adder2d
from adderquant.quant.calibrate import ActivationObserver
from adderquant.quant.clipsearch import (
    LayerSample,
    candidate_intervals,
    channel_errors,
    interval_grid,
    select_groups,
)
from adderquant.quant.config import AdderQuantConfig
from adderquant.quant.grid import CodeRange
from adderquant.quant.layers import QuantAdder2d
from adderquant.quant.methods import resolve_groups


@dataclass(frozen=True)
class SameGridSettings:
    """Choices of the same-grid quantizer (the :class:`AdderQuantConfig` fields of the same
    names).

    ``clip_search`` off: the fixed interval ``[max(x_min, −A), min(x_max, A)]`` (``A``: the
    observer's per-batch ``|x|`` quantile), one group. On: ``clip_candidates`` intervals
    shrinking by ``clip_shrink`` from the observed range are scored on ``search_positions``
    sampled output positions, and up to ``groups`` of them are chosen. ``mean_correction``
    removes each channel's mean output error with a bias (the search then scores the error
    left after it).
    """

    groups: int = 4
    clip_search: bool = True
    clip_candidates: int = 16
    clip_shrink: float = 2**-0.25
    search_positions: int = 1024
    mean_correction: bool = True
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: AdderQuantConfig, c_out: int) -> SameGridSettings:
        return cls(
            resolve_groups(cfg, c_out), cfg.clip_search, cfg.clip_candidates, cfg.clip_shrink,
            cfg.search_positions, cfg.mean_correction, cfg.seed,
        )


def _candidates(observer: ActivationObserver, settings: SameGridSettings) -> np.ndarray:
    if settings.clip_search:
        return candidate_intervals(
            observer.min, observer.max, settings.clip_candidates, settings.clip_shrink
        )
    a_abs = observer.batch_quantile_max
    a, c = max(min(observer.min, 0.0), -a_abs), min(max(observer.max, 0.0), a_abs)
    if a == c:
        raise ValueError("the layer's calibration inputs are all zero; nothing to quantize")
    return np.array([[a, c]])


def quantize_layer(
    layer: Adder2d,
    observer: ActivationObserver,
    bits: int,
    settings: SameGridSettings = SameGridSettings(),
) -> tuple[QuantAdder2d, dict[str, Any]]:
    """Quantize one float adder layer on the same grid; returns the layer and its report.

    ``observer`` must hold kept calibration inputs (``keep_images > 0``)."""
    if layer.groups != 1:
        raise ValueError("the same-grid quantizer supports adder layers with groups=1 only")
    sample = LayerSample.from_inputs(
        observer.kept_inputs, layer.adder, layer.stride, layer.padding, layer.dilation,
        settings.search_positions, settings.seed,
    )
    candidates = _candidates(observer, settings)
    errors, mean_errors = channel_errors(sample, candidates, bits, settings.mean_correction)
    chosen, labels = select_groups(errors, settings.groups)
    grids = [interval_grid(float(a), float(c), bits) for a, c in candidates[chosen]]
    group = torch.from_numpy(labels).long()
    lo = torch.tensor([g.lo for g in grids])
    hi = torch.tensor([g.hi for g in grids])
    qlayer = QuantAdder2d.from_float(
        layer, group, torch.tensor([g.scale for g in grids]).float(),
        torch.tensor([g.zero_point for g in grids], dtype=torch.int32),
        CodeRange.same_grid(bits), lo, hi,
    )
    per_channel = np.arange(len(labels)), chosen[labels]
    mean_error = torch.from_numpy(mean_errors[per_channel])
    if settings.mean_correction:
        qlayer.bias -= mean_error.float()
    w = layer.adder.detach().float()
    lo_t, hi_t = lo[group].view(-1, 1, 1, 1), hi[group].view(-1, 1, 1, 1)
    sizes = torch.bincount(group, minlength=len(grids))
    x = observer.sample
    clipped = torch.stack([((x < a) | (x > c)).float().mean() for a, c in zip(lo, hi, strict=True)])
    report = {
        "bits": bits,
        "A": float(hi.max()),
        "act_max": observer.max,
        "act_min": observer.min,
        "group_sizes": sizes.tolist(),
        "ranges": (hi - lo).tolist(),
        "intervals": [[float(a), float(c)] for a, c in zip(lo, hi, strict=True)],
        "steps": [g.scale for g in grids],
        "zero_points": [g.zero_point for g in grids],
        "weights_clamped": float(((w < lo_t) | (w > hi_t)).float().mean()),
        "acts_clipped": float((clipped * sizes).sum() / sizes.sum()) if len(x) else 0.0,
        "search_mse": float(errors[per_channel].mean()),
        "mean_correction_abs": float(mean_error.abs().mean()) if settings.mean_correction
        else 0.0,
    }
    return qlayer, report


def quantize_adderquant(
    name: str, layer: Adder2d, observer: ActivationObserver, bits: int, cfg: AdderQuantConfig
) -> tuple[QuantAdder2d, dict[str, Any]]:
    """The project's method: same unsigned grid for weights and inputs, lossless clamp into
    each group's interval, intervals and groups chosen by output error, mean correction."""
    settings = SameGridSettings.from_config(cfg, layer.adder.shape[0])
    qlayer, report = quantize_layer(layer, observer, bits, settings)
    return qlayer, {"layer": name, **report}
