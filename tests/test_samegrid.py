"""The same-grid quantizer (``--method adderquant``): the generalised lossless clamp, the
integer identity on one unsigned grid, zero points, the layer quantizer and the method on the
released model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adderquant.nn import Adder2d
from adderquant.ops.reference import adder2d_reference
from adderquant.quant.calibrate import ActivationObserver
from adderquant.quant.clamp import lossless_clamp
from adderquant.quant.clipsearch import grid_codes, interval_grid
from adderquant.quant.config import AdderQuantConfig
from adderquant.quant.grid import CodeRange
from adderquant.quant.layers import QuantAdder2d
from adderquant.quant.samegrid import SameGridSettings, quantize_adderquant, quantize_layer

INTERVALS = [(0.0, 2.5), (-1.25, 3.0), (-4.0, 0.5), (-2.0, 0.0)]


def _inputs_in(lo: float, hi: float, shape, seed: int) -> torch.Tensor:
    """Uniform float64 inputs in ``[lo, hi]`` with both ends and 0 present."""
    g = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)
    flat = x.view(-1)
    flat[:3] = torch.tensor([lo, hi, 0.0], dtype=torch.float64)
    return x


@pytest.mark.parametrize(("a", "c"), INTERVALS)
def test_generalised_clamp_is_exact_in_float64_for_every_input_in_the_interval(a, c) -> None:
    g = torch.Generator().manual_seed(0)
    w = 20.0 * torch.randn(6, 3, 3, 3, generator=g, dtype=torch.float64)  # 10-50x the inputs
    x = _inputs_in(a, c, (4, 3, 7, 7), seed=1)
    clamped, bias = lossless_clamp(w, a, c)
    assert clamped.min() >= a and clamped.max() <= c
    # padding=1: padded zeros lie in [a, c] too, so they are exact as well
    y = adder2d_reference(x, w, None, 1, 1)
    y_clamped = adder2d_reference(x, clamped, None, 1, 1) + bias.view(1, -1, 1, 1)
    torch.testing.assert_close(y_clamped, y, rtol=0, atol=1e-9 * float(y.abs().max()))
    # the bias is exactly the summed distance of each filter to the interval
    dist = (a - w).clamp_min(0) + (w - c).clamp_min(0)
    torch.testing.assert_close(bias, -dist.flatten(1).sum(1), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("a", "c"), INTERVALS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_interval_grid_holds_zero_and_covers_the_interval(a, c, bits) -> None:
    grid = interval_grid(a, c, bits)
    assert 0 <= grid.zero_point <= grid.levels == 2**bits - 1
    assert grid.hi - grid.lo == pytest.approx(c - a)
    assert grid.lo <= 0.0 <= grid.hi
    # the grid is shifted by less than half a step from [a, c]
    assert abs(grid.lo - a) <= grid.scale / 2 + 1e-12
    # 0 has a code and dequantizes exactly to 0 (the padding value)
    zero = grid_codes(torch.zeros(1, dtype=torch.float64), grid)
    assert float(zero) == grid.zero_point
    assert grid.scale * (float(zero) - grid.zero_point) == 0.0
    if a == 0.0:
        assert grid.zero_point == 0 and grid.hi == pytest.approx(c)


@pytest.mark.parametrize("bad", [(0.5, 2.0), (-2.0, -0.5), (1.0, 1.0), (0.0, 0.0),
                                 (0.0, float("inf"))])
def test_interval_grid_rejects_intervals_without_zero_or_empty(bad) -> None:
    with pytest.raises(ValueError, match="interval"):
        interval_grid(*bad, 4)


@pytest.mark.parametrize(("a", "c"), INTERVALS)
def test_integer_identity_on_one_unsigned_grid(a, c) -> None:
    """``|x̂ − ŵ| = Δ·|q_x − q_w|`` elementwise: the zero point cancels."""
    grid = interval_grid(a, c, 4)
    x = _inputs_in(grid.lo, grid.hi, (1000,), seed=2)
    w = _inputs_in(grid.lo, grid.hi, (1000,), seed=3)
    qx, qw = grid_codes(x, grid), grid_codes(w, grid)
    assert qx.min() >= 0 and qx.max() <= grid.levels and torch.equal(qx, qx.round())
    x_hat = grid.scale * (qx - grid.zero_point)
    w_hat = grid.scale * (qw - grid.zero_point)
    torch.testing.assert_close((x_hat - w_hat).abs(), grid.scale * (qx - qw).abs(),
                               rtol=0, atol=1e-12)
    # rounding error at most half a step inside the grid's range
    assert float((x_hat - x).abs().max()) <= grid.scale / 2 + 1e-12


def _quant_layer(a: float, c: float, bits: int, seed: int = 0):
    """A float adder layer (padding 1, stride 2) and its same-grid quantization with the
    clamp into the grid of ``[a, c]`` (two groups sharing one grid)."""
    g = torch.Generator().manual_seed(seed)
    layer = Adder2d(3, 5, 3, stride=2, padding=1)
    with torch.no_grad():
        layer.adder.copy_(15.0 * torch.randn(5, 3, 3, 3, generator=g))
    grid = interval_grid(a, c, bits)
    group = torch.tensor([0, 1, 0, 1, 1])
    scale = torch.full((2,), grid.scale, dtype=torch.float32)
    zero = torch.full((2,), grid.zero_point, dtype=torch.int32)
    lo, hi = torch.full((2,), grid.lo), torch.full((2,), grid.hi)
    quant = QuantAdder2d.from_float(layer, group, scale, zero, CodeRange.same_grid(bits), lo, hi)
    return layer, quant, grid


@pytest.mark.parametrize(("a", "c"), INTERVALS)
def test_quantized_layer_is_delta_times_integer_sad_with_zero_point_padding(a, c) -> None:
    """The layer's output equals ``−Δ·Σ|q_x − q_w| + clamp bias`` computed on the integer
    codes alone (int64, padding with the code of 0, i.e. the zero point)."""
    layer, quant, grid = _quant_layer(a, c, 4)
    x = _inputs_in(grid.lo, grid.hi, (2, 3, 9, 9), seed=4).float()
    qx = grid_codes(x.double(), grid).long()
    padded = F.pad(qx, (1, 1, 1, 1), value=grid.zero_point)
    cols = F.unfold(padded.double(), 3, stride=2).long()  # (N, 27, L)
    qw = quant.weight_codes.long().view(5, 27, 1)
    sad = (cols.unsqueeze(1) - qw.unsqueeze(0)).abs().sum(dim=2)  # (N, 5, L), exact int64
    expected = -grid.scale * sad.double() + quant.clamp_bias.double().view(1, -1, 1)
    out = quant(x).double().flatten(2)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize(("a", "c"), INTERVALS)
def test_quantized_layer_error_is_bounded_by_one_step_per_term(a, c) -> None:
    """Inside the grid's range, |x̂ − x| ≤ Δ/2 and the clamped weights move ≤ Δ/2, so every
    output is within K·Δ of the float layer (the clamp itself costs nothing)."""
    layer, quant, grid = _quant_layer(a, c, 3)
    x = _inputs_in(grid.lo, grid.hi, (2, 3, 9, 9), seed=5)
    y = adder2d_reference(x, layer.adder.detach().double(), None, 2, 1)
    y_hat = quant(x.float()).double()
    assert float((y_hat - y).abs().max()) <= 27 * grid.scale + 1e-3


def _observer(x: torch.Tensor, keep: int) -> ActivationObserver:
    obs = ActivationObserver(keep_images=keep)
    for batch in x.split(16):
        obs.update(batch)
    return obs


@pytest.mark.parametrize("signed", [False, True])
def test_quantize_layer_chooses_grids_and_removes_the_mean_error(signed) -> None:
    g = torch.Generator().manual_seed(6)
    layer = Adder2d(4, 8, 3, padding=1)
    with torch.no_grad():
        layer.adder.copy_(10.0 * torch.randn(8, 4, 3, 3, generator=g))
    x = torch.randn(64, 4, 8, 8, generator=g).abs() ** 1.5
    if signed:
        x = x - 0.7
    obs = _observer(x, keep=32)
    quant, report = quantize_layer(layer, obs, 4, SameGridSettings(groups=3,
                                                                   search_positions=512))
    zero = quant.zero_point
    if signed:
        assert torch.all(zero > 0)  # a < 0: the zero point moves off code 0
        assert all(lo < 0 for lo, _ in report["intervals"])
    else:
        assert torch.all(zero == 0) and all(lo == 0 for lo, _ in report["intervals"])
    assert quant.num_groups == len(report["group_sizes"]) <= 3
    assert sum(report["group_sizes"]) == 8
    # on the kept inputs, the mean output error per channel is (nearly) removed
    held = x[:32]
    with torch.no_grad():
        y = layer(held).double()
    err = (quant(held).double() - y).mean(dim=(0, 2, 3))
    plain = quantize_layer(layer, obs, 4, SameGridSettings(groups=3, search_positions=512,
                                                           mean_correction=False))[0]
    err_plain = (plain(held).double() - y).mean(dim=(0, 2, 3))
    assert float(err.abs().mean()) < 0.5 * float(err_plain.abs().mean())
    # and the quantized layer tracks the float one closely at 4 bits
    sqnr = 10 * torch.log10(((y - y.mean()) ** 2).sum() / ((quant(held).double() - y) ** 2).sum())
    assert float(sqnr) > 25.0


def test_fixed_interval_without_search_is_the_quantile_interval() -> None:
    g = torch.Generator().manual_seed(7)
    layer = Adder2d(2, 3, 1)
    x = torch.rand(32, 2, 5, 5, generator=g) * 3.0
    obs = _observer(x, keep=8)
    _, report = quantize_layer(layer, obs, 4, SameGridSettings(clip_search=False,
                                                               mean_correction=False))
    assert report["intervals"] == [[0.0, pytest.approx(obs.batch_quantile_max, rel=1e-6)]]
    assert report["group_sizes"] == [3]


def test_quantize_layer_needs_kept_inputs() -> None:
    obs = _observer(torch.rand(8, 2, 4, 4), keep=0)
    with pytest.raises(ValueError, match="keep_images"):
        quantize_layer(Adder2d(2, 3, 1), obs, 4)


def test_registered_method_reads_the_configuration() -> None:
    g = torch.Generator().manual_seed(8)
    layer = Adder2d(3, 6, 3, padding=1)
    obs = _observer(torch.rand(32, 3, 6, 6, generator=g), keep=16)
    cfg = AdderQuantConfig(grouping=False, clip_candidates=4, bits=3)
    quant, report = quantize_adderquant("block.conv", layer, obs, 3, cfg)
    assert report["layer"] == "block.conv" and report["bits"] == 3 == quant.bits
    assert quant.num_groups == 1 and quant.codes == CodeRange.same_grid(3)
    assert {"A", "act_max", "group_sizes", "ranges", "weights_clamped",
            "acts_clipped"} <= set(report)


@pytest.mark.slow
def test_adderquant_on_the_released_model(released_resnet20, shared_data_root) -> None:
    """W8A8 and W4A4 on the 1,000-image test subset (full precision 91.6 %)."""
    from adderquant.data import TensorLoader, load_cifar
    from adderquant.evaluate import evaluate
    from adderquant.quant.ptq import CalibrationSet, quantize

    images, labels = load_cifar(shared_data_root, "cifar10", train=False)
    test = TensorLoader(images, labels, "cifar10", batch_size=500)
    cfg = AdderQuantConfig()
    calib = CalibrationSet.from_config(cfg, "cifar10", shared_data_root)
    top1 = {}
    for bits in (8, 4):
        qmodel = quantize(released_resnet20, cfg.replace(bits=bits), calib)
        top1[bits] = evaluate(qmodel, test, progress=False).top1
    assert top1[8] >= 91.0
    assert top1[4] >= 90.0
