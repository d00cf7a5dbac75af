"""Integer grids shared by an adder layer's weights and activations.

Within one output group, activations and weights live on one grid of step ``scale`` (Δ) and
integer ``zero_point`` (z): ``x̂ = Δ·(q_x − z)`` with ``q_x ∈ [0, 2^b − 1]`` and
``ŵ = Δ·(r·q_w − z)``. The weight step ratio ``r`` is 2 for the paper's signed weights
(``z = 0``, ``q_w ∈ [−2^(b−1), 2^(b−1) − 1]``) and 1 for the same-grid quantizer (unsigned
``q_w ∈ [0, 2^b − 1]``). In both cases ``|x̂ − ŵ| = Δ·|q_x − r·q_w|``: an integer times Δ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: int) -> int:
    """Validate a bit width (2–8)."""
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bit width must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits}")
    return bits


@dataclass(frozen=True)
class CodeRange:
    """Integer code ranges of a layer's activations and weights and the weight step ratio."""

    bits: int
    weight_ratio: int  # r: 1 (same grid) or 2 (paper: signed weights, twice the step)

    @property
    def act_max(self) -> int:
        return (1 << self.bits) - 1

    @property
    def weight_min(self) -> int:
        return 0 if self.weight_ratio == 1 else -(1 << (self.bits - 1))

    @property
    def weight_max(self) -> int:
        return self.act_max if self.weight_ratio == 1 else (1 << (self.bits - 1)) - 1

    @classmethod
    def paper(cls, bits: int) -> CodeRange:
        return cls(check_bits(bits), 2)

    @classmethod
    def same_grid(cls, bits: int) -> CodeRange:
        return cls(check_bits(bits), 1)


def act_codes(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, codes: CodeRange
) -> torch.Tensor:
    """``clamp(round(x/Δ) + z, 0, 2^b − 1)`` (float tensor holding integers); ``scale`` and
    ``zero_point`` broadcast against ``x``."""
    return torch.clamp(torch.round(x / scale) + zero_point, 0, codes.act_max)


def weight_codes(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, codes: CodeRange
) -> torch.Tensor:
    """``clamp(round((w/Δ + z)/r), w_min, w_max)``."""
    r = codes.weight_ratio
    q = torch.round((w / scale + zero_point) / r)
    return torch.clamp(q, codes.weight_min, codes.weight_max)


def fake_quant_act(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, codes: CodeRange
) -> torch.Tensor:
    """Quantize then dequantize activations: ``Δ·(q_x − z)``, computed as
    ``Δ·clamp(round(x/Δ), −z, 2^b − 1 − z)`` in place on one new tensor."""
    y = torch.div(x, scale).round_()
    return y.clamp_(-zero_point, codes.act_max - zero_point).mul_(scale)


def dequant_weight(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, codes: CodeRange
) -> torch.Tensor:
    """``Δ·(r·q_w − z)``."""
    return (codes.weight_ratio * q - zero_point) * scale


def distinct_grids(
    scale: torch.Tensor, zero_point: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct ``(Δ, z)`` grids of a layer's groups: their steps (dtype of ``scale``),
    zero points (float64) and the grid of every group. Groups on one grid share the codes of
    their input."""
    pairs = torch.stack([scale.double(), zero_point.double()], dim=1)
    grids, grid_of_group = torch.unique(pairs, dim=0, return_inverse=True)
    return grids[:, 0].to(scale.dtype), grids[:, 1], grid_of_group


def byte_weights(weight_codes: torch.Tensor, codes: CodeRange) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight values ``v = r·q_w`` clamped into the activation codes ``[0, 2^b − 1]``
    (int64, same shape) and the excess ``Σ|v − clamp(v)|`` of every filter (int64): for every
    activation code ``q_x``, ``|q_x − v| = |q_x − clamp(v)| + |v − clamp(v)|``, so a SAD over
    bytes plus the excess is exact."""
    v = codes.weight_ratio * weight_codes.long()
    clamped = v.clamp(0, codes.act_max)
    return clamped, (v - clamped).abs().flatten(1).sum(1)

