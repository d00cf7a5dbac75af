"""The paper's layer quantizers: ``paper`` (Nie et al. 2022: grouping, lossless weight clamp,
activation outlier clamp, each switchable) and ``qssf`` (one scale per layer shared by weights
and activations), with the helpers other methods share.

A layer quantizer turns one float adder layer, the statistics of its input and a bit width into
a :class:`~adderquant.quant.layers.QuantAdder2d` and a report (a JSON-ready dict)::

    quantizer(name, layer, observer, bits, cfg) -> (QuantAdder2d, report)

Quantizers are listed with their configuration classes in :mod:`adderquant.quant.registry`.
"""

from __future__ import annotations

from typing import Any

import torch

from adderquant.nn import Adder2d
from adderquant.quant.calibrate import ActivationObserver
from adderquant.quant.config import PER_CHANNEL, GroupedConfig, PaperConfig, QSSFConfig
from adderquant.quant.grid import CodeRange
from adderquant.quant.grouping import group_filters
from adderquant.quant.layers import QuantAdder2d
from adderquant.quant.observers import MIN_THRESHOLD, mse_optimal_threshold

# --------------------------------------------------------------------------- helpers


def resolve_groups(cfg: GroupedConfig, c_out: int) -> int:
    """The number of groups of a layer with ``c_out`` filters."""
    if not cfg.grouping:
        return 1
    g = c_out if cfg.groups == PER_CHANNEL else int(cfg.groups)
    if not 1 <= g <= c_out:
        raise ValueError(
            f"groups={g} exceeds the {c_out} output channels of a layer; use at most {c_out} "
            f"or {PER_CHANNEL!r}"
        )
    return g


def activation_threshold(observer: ActivationObserver, cfg: PaperConfig, bits: int) -> float:
    """The clipping threshold ``A`` of a layer's input under ``cfg.act_clip``."""
    if cfg.act_clip == "released":
        a = observer.threshold("released", cfg.act_quantile)
    elif cfg.act_clip == "quantile":
        a = observer.threshold("plain", cfg.act_quantile)
    elif cfg.act_clip == "max":
        a = max(abs(observer.max), abs(observer.min))
    else:
        a = mse_optimal_threshold(observer.sample, bits)
    return max(a, MIN_THRESHOLD)


def group_max_abs(weight: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
    """``max|W_g|`` of every group (float32, length G)."""
    per_filter = weight.detach().flatten(1).abs().amax(dim=1).float()
    out = torch.zeros(groups).scatter_reduce(0, group, per_filter, "amax", include_self=False)
    return out.clamp_min(MIN_THRESHOLD)


def layer_report(
    name: str,
    layer: Adder2d,
    quant: QuantAdder2d,
    observer: ActivationObserver,
    threshold: float,
    limit: torch.Tensor,
) -> dict[str, Any]:
    """Per-layer figures shared by the methods here (see :mod:`adderquant.quant.report`);
    ``limit``: the range ``s_g`` of every group (``Δ_g = s_g/(2^b − 1)``)."""
    w = layer.adder.detach().float()
    s = limit[quant.group].view(-1, 1, 1, 1)
    sizes = torch.bincount(quant.group, minlength=quant.num_groups)
    sample = observer.sample
    per_group_clipped = torch.stack([(sample > v).float().mean() for v in limit])
    return {
        "layer": name,
        "bits": quant.bits,
        "A": threshold,
        "act_max": observer.max,
        "group_sizes": sizes.tolist(),
        "ranges": limit.tolist(),
        "steps": quant.scale.tolist(),
        "weights_clamped": float((w.abs() > s).float().mean()),
        "acts_clipped": float((per_group_clipped * sizes).sum() / sizes.sum()),
    }


# --------------------------------------------------------------------------- methods


def quantize_paper(
    name: str, layer: Adder2d, observer: ActivationObserver, bits: int, cfg: PaperConfig
) -> tuple[QuantAdder2d, dict[str, Any]]:
    """Nie et al. 2022: k-means groups of filters (``cfg.grouping``), group scale
    ``s_g = min(max|W_g|, A)`` with the lossless clamp of the weights into ``[−s_g, s_g]``
    (``cfg.weight_clamp``; off: ``s_g = max|W_g|``), ``A`` by ``cfg.act_clip``; unsigned
    activations of step ``Δ_g = s_g/(2^b − 1)``, signed weights of step ``2Δ_g``."""
    w = layer.adder.detach().float()
    groups = resolve_groups(cfg, w.shape[0])
    group = group_filters(w, groups, cfg.feature, cfg.seed)
    threshold = activation_threshold(observer, cfg, bits)
    w_max = group_max_abs(w, group, groups)
    zero = torch.zeros(groups, dtype=torch.int32)
    codes = CodeRange.paper(bits)
    if cfg.weight_clamp:
        limit = w_max.clamp_max(threshold)
        quant = QuantAdder2d.from_float(
            layer, group, limit / codes.act_max, zero, codes, -limit, limit
        )
    else:
        limit = w_max
        quant = QuantAdder2d.from_float(layer, group, limit / codes.act_max, zero, codes)
    return quant, layer_report(name, layer, quant, observer, threshold, limit)


def quantize_qssf(
    name: str, layer: Adder2d, observer: ActivationObserver, bits: int, cfg: QSSFConfig
) -> tuple[QuantAdder2d, dict[str, Any]]:
    """One scale per layer shared by weights and activations (QSSF), taken from ``max|W|``,
    from ``max|X|`` or from the larger of the two (``cfg.qssf_source``); no grouping, no clamp:
    weights beyond the scale saturate in the quantizer. Same code ranges as ``paper``."""
    w = layer.adder.detach().float()
    w_max = float(w.abs().max())
    x_max = max(abs(observer.max), abs(observer.min), MIN_THRESHOLD)
    s = {"weights": w_max, "activations": x_max, "max": max(w_max, x_max)}[cfg.qssf_source]
    limit = torch.tensor([s])
    codes = CodeRange.paper(bits)
    group = torch.zeros(w.shape[0], dtype=torch.long)
    quant = QuantAdder2d.from_float(
        layer, group, limit / codes.act_max, torch.zeros(1, dtype=torch.int32), codes
    )
    return quant, layer_report(name, layer, quant, observer, x_max, limit)
