"""Per-layer quantization report: a printed table and JSON.

Columns: bit width, activation threshold ``A`` and the input's maximum, group sizes and
ranges ``s_g`` (the step is ``Δ_g = s_g/(2^b − 1)``), the fraction of weights beyond their
group range (clamped or saturated), the fraction of sampled activations beyond it (clipped),
and the output SQNR against the full-precision layer.

SQNR (dB) is measured on calibration images kept by the observer, with the full-precision input
of the layer fed to both layers: ``10·log10(Σ(y − ȳ_c)² / Σ(y − ŷ)²)``, where ``ȳ_c`` is the
per-channel mean of the float output ``y``. The channel means are left out of the signal
because adder outputs carry a large negative offset that the next BatchNorm removes; an offset
error of ``ŷ`` still counts as noise.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from adderquant.nn import Adder2d
from adderquant.quant.layers import QuantAdder2d


@torch.no_grad()
def output_sqnr(float_layer: Adder2d, quant_layer: QuantAdder2d, x: torch.Tensor) -> float:
    """SQNR in dB of ``quant_layer(x)`` against ``float_layer(x)`` (see module docstring)."""
    if x.numel() == 0:
        return float("nan")
    y = float_layer(x).double()
    y_hat = quant_layer(x).double()
    signal = (y - y.mean(dim=(0, 2, 3), keepdim=True)).pow(2).sum()
    noise = (y - y_hat).pow(2).sum()
    if noise == 0:
        return float("inf")
    if signal == 0:  # the float output does not vary: nothing but noise
        return float("-inf")
    return 10.0 * math.log10(float(signal / noise))


def add_sqnr(
    layers: list[dict[str, Any]],
    float_model: nn.Module,
    quant_model: nn.Module,
    inputs: dict[str, torch.Tensor],
) -> None:
    """Fill ``sqnr_db`` of every layer report from the kept calibration ``inputs``."""
    floats = dict(float_model.named_modules())
    quants = dict(quant_model.named_modules())
    for entry in layers:
        name = entry["layer"]
        x = inputs.get(name, torch.empty(0))
        q = quants[name]
        x = x.to(next(q.buffers()).device)
        entry["sqnr_db"] = output_sqnr(floats[name], q, x)


def _fmt_scales(scales: list[float]) -> str:
    if len(scales) == 1:
        return f"{scales[0]:.3g}"
    return f"{min(scales):.3g}..{max(scales):.3g}"


def _fmt_sizes(sizes: list[int]) -> str:
    if len(sizes) <= 8:
        return "/".join(str(s) for s in sizes)
    return f"{len(sizes)} groups"


def format_table(layers: list[dict[str, Any]]) -> str:
    """The per-layer report as a Markdown table."""
    head = ("| layer | bits | A | max x | groups | ranges s_g | W clamped % | X clipped % | "
            "SQNR dB |")
    rule = "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |"
    rows = [head, rule]
    for e in layers:
        sqnr = e.get("sqnr_db", float("nan"))
        rows.append(
            f"| {e['layer']} | {e['bits']} | {e['A']:.3f} | {e['act_max']:.3f} | "
            f"{_fmt_sizes(e['group_sizes'])} | {_fmt_scales(e['ranges'])} | "
            f"{100 * e['weights_clamped']:.1f} | {100 * e['acts_clipped']:.3f} | {sqnr:.1f} |"
        )
    return "\n".join(rows)


def json_ready(obj: Any) -> Any:
    """``obj`` with non-finite floats turned into strings (strict JSON has no NaN/inf)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    return obj
