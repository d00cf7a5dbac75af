"""The lossless clamp and the integer grids of the paper's quantizer, against float64
definitions."""

from __future__ import annotations

import pytest
import torch

from adderquant.ops.reference import adder2d_reference
from adderquant.quant.clamp import lossless_clamp
from adderquant.quant.grid import CodeRange, act_codes, dequant_weight, fake_quant_act, weight_codes


def dyadic(shape, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Random multiples of 2^-12 in [-scale, scale]: every sum and difference below is exact
    in float64."""
    steps = int(scale * 4096)
    return torch.randint(-steps, steps + 1, shape, generator=generator).double() / 4096


@pytest.mark.parametrize("a", [0.75, 2.5, 3.0])
def test_clamp_is_exact_for_every_input_in_0_a(a: float) -> None:
    g = torch.Generator().manual_seed(1)
    w = dyadic((6, 3, 3, 3), 40.0, g)  # weights far beyond A, as in trained AdderNets
    clamped, bias = lossless_clamp(w, -a, a)
    assert clamped.abs().max() <= a and (clamped != w).any()
    xs = torch.arange(0, int(a * 4096) + 1, 7, dtype=torch.float64) / 4096  # a dense grid
    xs = torch.cat([xs, torch.tensor([0.0, a], dtype=torch.float64)])
    per_weight = (xs.view(-1, 1) - w.flatten().view(1, -1)).abs()
    split = ((xs.view(-1, 1) - clamped.flatten().view(1, -1)).abs()
             + (w.flatten().abs() - a).clamp_min(0).view(1, -1))
    assert torch.equal(per_weight, split)
    # whole layer: adder(x, W) == adder(x, clamp(W)) + bias, zero padding included
    x = (torch.randint(0, int(a * 4096) + 1, (2, 3, 5, 5), generator=g).double() / 4096)
    full = adder2d_reference(x, w, None, 1, 1)
    parts = adder2d_reference(x, clamped, None, 1, 1) + bias.view(1, -1, 1, 1)
    assert torch.equal(full, parts)
    assert torch.equal(bias, -(w.abs() - a).clamp_min(0).flatten(1).sum(1))


def test_clamp_per_channel_interval_and_errors() -> None:
    w = torch.tensor([[-5.0, 0.5, 7.0], [2.0, -1.0, 3.0]]).view(2, 3, 1, 1)
    clamped, bias = lossless_clamp(w, torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 2.0]))
    assert clamped.flatten(1).tolist() == [[-1.0, 0.5, 1.0], [2.0, 0.0, 2.0]]
    assert bias.tolist() == [-(4.0 + 6.0), -(1.0 + 1.0)]
    with pytest.raises(ValueError, match="lo > hi"):
        lossless_clamp(w, 1.0, -1.0)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_distance_is_an_integer_times_one_step(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = CodeRange.paper(bits)
    s = torch.tensor(1.7, dtype=torch.float64)
    step = s / codes.act_max
    x = torch.rand(2000, generator=g, dtype=torch.float64) * 2.5
    w = (torch.rand(2000, generator=g, dtype=torch.float64) - 0.5) * 5
    z = torch.zeros((), dtype=torch.float64)
    qx, qw = act_codes(x, step, z, codes), weight_codes(w, step, z, codes)
    assert qx.min() >= 0 and qx.max() <= 2**bits - 1
    assert qw.min() >= -(2 ** (bits - 1)) and qw.max() <= 2 ** (bits - 1) - 1
    assert torch.equal(qx, qx.round()) and torch.equal(qw, qw.round())
    x_hat, w_hat = fake_quant_act(x, step, z, codes), dequant_weight(qw, step, z, codes)
    # the paper's formulas: x̂ = Δ·clamp(round(x/Δ), 0, 2^b − 1), ŵ = 2Δ·clamp(round(w/2Δ), ...)
    ref_x = step * torch.clamp(torch.round(x / step), 0, 2**bits - 1)
    ref_w = 2 * step * torch.clamp(torch.round(w / (2 * step)), -(2 ** (bits - 1)),
                                   2 ** (bits - 1) - 1)
    assert torch.allclose(x_hat, ref_x, rtol=0, atol=1e-12)
    assert torch.allclose(w_hat, ref_w, rtol=0, atol=1e-12)
    assert torch.allclose((x_hat - w_hat).abs(), step * (qx - 2 * qw).abs(), rtol=1e-12,
                          atol=1e-12)


def test_bit_widths_outside_2_to_8_are_refused() -> None:
    for bits in (0, 1, 9, 16):
        with pytest.raises(ValueError, match="from 2 to 8"):
            CodeRange.paper(bits)
