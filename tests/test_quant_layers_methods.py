"""QuantAdder2d and the registered layer quantizers against integer-code references."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adderquant.nn import Adder2d
from adderquant.ops.reference import adder2d_reference
from adderquant.ops.requant import codes_from_float
from adderquant.ops.sad import ConvGeometry
from adderquant.quant import grouping
from adderquant.quant.calibrate import ActivationObserver
from adderquant.quant.config import PaperConfig, QSSFConfig
from adderquant.quant.grid import CodeRange
from adderquant.quant.grouping import kmeans_groups
from adderquant.quant.layers import QuantAdder2d, integer_path
from adderquant.quant.methods import quantize_paper, quantize_qssf, resolve_groups
from adderquant.quant.registry import METHODS, LayerCache, Method, get_method, method_names
from adderquant.quant.report import output_sqnr


def integer_reference(layer: QuantAdder2d, x: torch.Tensor) -> torch.Tensor:
    """``−Δ_g·Σ|q_x − 2·q_w|`` channel by channel, from integer codes (int64), plus biases."""
    codes = layer.codes
    out = []
    for t in range(layer.weight_codes.shape[0]):
        g = int(layer.group[t])
        step = float(layer.scale[g])
        qx = torch.clamp(torch.round(x.double() / step), 0, codes.act_max).long()
        cols = F.unfold(qx.double(), layer.weight_codes.shape[2:], padding=layer.padding,
                        stride=layer.stride).long()  # zero padding is code 0
        qw = layer.weight_codes[t].flatten().long().view(1, -1, 1)
        sad = (cols - codes.weight_ratio * qw).abs().sum(dim=1)  # exact integers
        out.append(-step * sad.double())
    n = x.shape[0]
    ho = (x.shape[2] + 2 * layer.padding[0] - layer.weight_codes.shape[2]) // layer.stride[0] + 1
    y = torch.stack(out, dim=1).view(n, -1, ho, ho)
    return y + (layer.clamp_bias + layer.bias).double().view(1, -1, 1, 1)


def make_layer(group: list[int], scales: list[float], bits: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c_out = len(group)
    float_layer = Adder2d(3, c_out, 3, stride=1, padding=1)
    float_layer.adder.data = torch.randn(c_out, 3, 3, 3, generator=g) * 3
    scale = torch.tensor(scales)
    codes = CodeRange.paper(bits)
    limit = scale * codes.act_max
    q = QuantAdder2d.from_float(float_layer, torch.tensor(group), scale,
                                torch.zeros(len(scales), dtype=torch.int32), codes,
                                -limit, limit)
    x = torch.rand(2, 3, 6, 6, generator=g) * 2
    return float_layer, q, x


@pytest.mark.parametrize(
    ("group", "scales"),
    [
        ([0, 1, 0, 1, 1, 0], [0.1, 0.2]),  # balanced: one grouped kernel call
        ([2, 0, 1, 0, 0, 0, 0, 0], [0.1, 0.15, 0.3]),  # unbalanced: one call per grid
        ([1, 0, 1, 2, 0, 2], [0.1, 0.2, 0.1]),  # two groups on one grid: merged
        ([3, 1, 0, 2], [0.05, 0.1, 0.2, 0.4]),  # one channel per group
    ],
)
def test_groups_are_computed_on_their_grid_and_put_back_in_channel_order(group, scales) -> None:
    _, q, x = make_layer(group, scales)
    y = q(x).double()
    ref = integer_reference(q, x)
    assert torch.allclose(y, ref, rtol=1e-6, atol=1e-3)
    # the same computation for a permuted channel order gives the permuted output
    perm = torch.randperm(len(group), generator=torch.Generator().manual_seed(3))
    permuted = QuantAdder2d(q.weight_codes[perm], q.group[perm], q.scale, q.zero_point,
                            q.clamp_bias[perm], q.codes, q.stride, q.padding, q.dilation,
                            q.bias[perm])
    assert torch.allclose(permuted(x), y[:, perm].float(), rtol=1e-6, atol=1e-3)


def test_clamped_quantized_layer_matches_the_float_layer_at_8_bits() -> None:
    float_layer, q, x = make_layer([0, 1, 0, 1], [2.0 / 255, 2.5 / 255], bits=8)
    y, y_hat = float_layer(x), q(x)
    assert (y - y_hat).abs().max() / y.abs().max() < 0.01


def observer_for(x: torch.Tensor) -> ActivationObserver:
    obs = ActivationObserver(requests=[("released", 0.9997)])
    obs.update(x)
    return obs


def test_g1_without_clamp_equals_a_single_scale_quantizer() -> None:
    g = torch.Generator().manual_seed(5)
    layer = Adder2d(4, 8, 3, padding=1)
    layer.adder.data = torch.randn(8, 4, 3, 3, generator=g) * 10
    x = torch.rand(2, 4, 7, 7, generator=g).double() * 3
    bits = 5
    cfg = PaperConfig(bits=bits, grouping=False, weight_clamp=False)
    q, report = quantize_paper("l", layer, observer_for(x.float()), bits, cfg)
    # the single-scale quantizer written out: s = max|W|, Δ = s/(2^b − 1)
    w = layer.adder.detach().double()
    step = w.abs().max() / (2**bits - 1)
    x_hat = step * torch.clamp(torch.round(x / step), 0, 2**bits - 1)
    w_hat = 2 * step * torch.clamp(torch.round(w / (2 * step)), -(2 ** (bits - 1)),
                                   2 ** (bits - 1) - 1)
    ref = adder2d_reference(x_hat, w_hat, None, 1, 1)
    assert torch.allclose(q(x.float()).double(), ref, rtol=1e-5, atol=1e-3)
    assert report["group_sizes"] == [8] and report["weights_clamped"] == 0.0
    # qssf with the scale from the weights is the same quantizer
    q2, _ = quantize_qssf("l", layer, observer_for(x.float()), bits,
                          QSSFConfig(bits=bits, qssf_source="weights"))
    assert torch.equal(q2(x.float()), q(x.float()))


def test_paper_group_scale_is_min_of_group_max_and_threshold() -> None:
    g = torch.Generator().manual_seed(6)
    layer = Adder2d(2, 6, 1)
    w = torch.rand(6, 2, 1, 1, generator=g) * 0.2 - 0.1  # three small filters: max|w| < A
    w[3:, 0] = torch.tensor([40.0, -50.0, 60.0]).view(3, 1, 1)  # and three large ones
    layer.adder.data = w
    x = torch.rand(64, 2, 4, 4, generator=g) * 2
    cfg = PaperConfig(bits=8, groups=2, act_clip="max")
    q, report = quantize_paper("l", layer, observer_for(x), 8, cfg)
    a = float(x.max())
    small = float(w[:3].abs().max())
    assert sorted(report["group_sizes"]) == [3, 3]
    assert sorted(report["ranges"]) == pytest.approx([small, a], rel=1e-6)
    assert q.clamp_bias[:3].abs().max() == 0 and (q.clamp_bias[3:] < 0).all()
    # large filters: clamped losslessly, the 8-bit output is close to the float one; small
    # filters: their inputs share the group grid, so they are clipped at the group's max|w|
    y, y_hat = layer(x), q(x)
    big = slice(3, 6)
    assert ((y - y_hat)[:, big].abs().mean() / y[:, big].std()) < 0.01
    y_small = layer(x.clamp_max(small))[:, :3]
    assert (y_small - y_hat[:, :3]).abs().max() < 2 * small / 255 * 2


def test_groups_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="exceeds the 16 output channels"):
        resolve_groups(PaperConfig(groups=32), 16)
    assert resolve_groups(PaperConfig(groups="per-channel"), 16) == 16
    assert resolve_groups(PaperConfig(grouping=False, groups=8), 16) == 1
    with pytest.raises(ValueError, match="positive integer"):
        PaperConfig(groups=0)
    with pytest.raises(ValueError, match="unknown quantization method"):
        get_method("nope")
    assert method_names() == ("paper", "qssf", "qssf-repaired", "adderquant")


def same_grid_reference(layer: QuantAdder2d, x: torch.Tensor) -> torch.Tensor:
    """``−Δ_g·Σ|q_x − q_w|`` from integer codes (int64) with the padding at code ``z_g``."""
    out = []
    for t in range(layer.weight_codes.shape[0]):
        g = int(layer.group[t])
        step, z = float(layer.scale[g]), int(layer.zero_point[g])
        qx = torch.clamp(torch.round(x.double() / step) + z, 0, layer.codes.act_max).long()
        cols = F.unfold((qx - z).double(), layer.weight_codes.shape[2:], padding=layer.padding,
                        stride=layer.stride).long() + z  # zero padding is code z
        sad = (cols - layer.weight_codes[t].flatten().long().view(1, -1, 1)).abs().sum(dim=1)
        out.append(-step * sad.double())
    ho = (x.shape[2] + 2 * layer.padding[0] - layer.weight_codes.shape[2]) // layer.stride[0] + 1
    y = torch.stack(out, dim=1).view(x.shape[0], -1, ho, ho)
    return y + (layer.clamp_bias + layer.bias).double().view(1, -1, 1, 1)


@pytest.mark.parametrize("bits", [2, 5, 8])
@pytest.mark.parametrize("stride", [1, 2])
def test_integer_kernel_path_is_exact_on_same_grid_codes(bits: int, stride: int) -> None:
    g = torch.Generator().manual_seed(bits + 10 * stride)
    layer = Adder2d(5, 7, 3, stride=stride, padding=1)
    layer.adder.data = torch.randn(7, 5, 3, 3, generator=g)
    group = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    scale = torch.tensor([0.05, 0.1, 0.2]) * 255 / (2**bits - 1)
    zero = torch.tensor([0, 3, 1], dtype=torch.int32)
    q = QuantAdder2d.from_float(layer, group, scale, zero, CodeRange.same_grid(bits))
    x = torch.randn(3, 5, 9, 9, generator=g) * 3  # negative inputs meet the zero points
    with torch.no_grad():
        assert q.integer_path_applies(x)
        y_int = q(x)
    ref = same_grid_reference(q, x)
    assert torch.allclose(y_int.double(), ref, rtol=1e-6, atol=1e-4)
    # the float kernel path (taken when a gradient is needed) computes the same values
    y_float = q(x.clone().requires_grad_())
    assert y_float.requires_grad
    assert torch.allclose(y_float.detach().double(), ref, rtol=1e-5, atol=1e-3)


def test_integer_kernel_path_covers_paper_codes_up_to_8_bits() -> None:
    # signed weights: 2·q_w reaches −2^b and 2^b − 2, beyond the activation codes [0, 2^b − 1];
    # the clamped part of every weight is added back to its channel's sum
    for bits, steps in ((7, [0.1, 0.2]), (8, [0.01, 0.02])):
        _, q, x = make_layer([0, 1, 0, 1, 1, 0], steps, bits=bits)
        assert int((2 * q.weight_codes).min()) < 0  # some weights lie below the codes
        with torch.no_grad():
            assert q.integer_path_applies(x)
            assert torch.allclose(q(x).double(), integer_reference(q, x), rtol=1e-6, atol=1e-3)


def test_integer_kernel_path_follows_changed_buffers() -> None:
    _, q, x = make_layer([0, 1, 0, 1], [0.1, 0.2], bits=4)
    with torch.no_grad():
        before = q(x)
        q.bias += 0.5  # bias correction edits buffers in place
        assert torch.allclose(q(x), before + 0.5, atol=1e-5)
        q.weight_codes.clamp_(max=0)
        assert torch.allclose(q(x).double(), integer_reference(q, x), rtol=1e-6, atol=1e-3)


def test_integer_kernel_path_hands_nan_and_inf_inputs_to_the_definition() -> None:
    _, q, x = make_layer([0, 1, 0, 1], [0.1, 0.2], bits=4)
    x[0, 1, 2, 3] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    with torch.no_grad():
        y = q(x)
        with integer_path(q, enabled=False):  # the float adder kernel on dequantized values
            expected = q(x)
    assert torch.equal(torch.isnan(y), torch.isnan(expected)) and torch.isnan(y).any()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(y), finite)
    assert torch.allclose(y[finite], expected[finite], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="NaN or infinite"):
        codes_from_float(x, q.scale, q.zero_point, 4, ConvGeometry((3, 3), (1, 1), (1, 1)))


def test_kmeans_hides_only_the_warning_of_fewer_distinct_values_than_groups(
    monkeypatch,
) -> None:
    values = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0])  # 2 distinct values, 3 groups
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels = kmeans_groups(values, 3).tolist()
    assert labels[:3] == [labels[0]] * 3 and labels[3] == labels[4] != labels[0]

    class WarningKMeans(grouping.KMeans):
        def fit(self, data):
            warnings.warn("another warning", UserWarning, stacklevel=1)
            return super().fit(data)

    monkeypatch.setattr(grouping, "KMeans", WarningKMeans)
    with pytest.warns(UserWarning, match="another warning"):
        kmeans_groups(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2)


def test_integer_path_is_chosen_per_model_within_a_block(monkeypatch) -> None:
    _, q, x = make_layer([0, 1, 0, 1], [0.1, 0.2], bits=4)
    other = copy.deepcopy(q)
    calls = []
    original = QuantAdder2d._integer_forward
    monkeypatch.setattr(QuantAdder2d, "_integer_forward",
                        lambda self, x: calls.append(self) or original(self, x))
    with torch.no_grad():
        y_int = q(x)
        with integer_path(nn.Sequential(q), enabled=False):
            y_float = q(x)
            other(x)  # another model keeps its own choice
        assert calls == [q, other]
        with pytest.raises(RuntimeError), integer_path(q, enabled=False):
            raise RuntimeError
        q(x)
    assert calls == [q, other, q] and q.use_integer_path and other.use_integer_path
    assert q.integer_path_applies(x)  # the check reports whether it applies, not the choice
    assert torch.allclose(y_int, y_float, rtol=1e-5, atol=1e-4)


def test_layer_cache_quantizes_each_layer_once_and_hands_out_copies(monkeypatch) -> None:
    float_layer, _, x = make_layer([0, 1, 0, 1, 1, 0], [0.1, 0.2])
    observer = ActivationObserver()
    observer.update(x)
    calls = []
    original = METHODS["paper"].quantize_layer
    monkeypatch.setitem(METHODS, "paper", Method(
        PaperConfig, lambda *args: calls.append(args[3]) or original(*args)))
    cache, cfg = LayerCache(), PaperConfig(groups=2)
    q1, r1 = cache.quantize("l", float_layer, observer, 4, cfg)
    # the width comes from the argument: a configuration differing only in widths shares it
    q2, r2 = cache.quantize("l", float_layer, observer, 4, cfg.replace(bits=6, avg_bits=5.0))
    assert calls == [4] and q1 is not q2 and r1 == r2
    direct, _ = original("l", float_layer, observer, 4, cfg)
    for key, value in direct.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(q2.state_dict()[key], value), key
    q1.bias += 1.0  # bias correction edits a model's layer in place; other copies keep theirs
    assert torch.equal(q2.bias, direct.bias)
    cache.quantize("l", float_layer, observer, 3, cfg)
    cache.quantize("l", float_layer, observer, 4, cfg.replace(act_clip="max"))
    assert calls == [4, 3, 4]


def test_output_sqnr_follows_its_definition_and_its_limits() -> None:
    float_layer, q, x = make_layer([0, 1, 0, 1, 1, 0], [0.1, 0.2])
    with torch.no_grad():
        y, y_hat = float_layer(x).double(), q(x).double()
        signal = (y - y.mean(dim=(0, 2, 3), keepdim=True)).pow(2).sum()
        expected = 10 * torch.log10(signal / (y - y_hat).pow(2).sum())
        assert output_sqnr(float_layer, q, x) == pytest.approx(float(expected), rel=1e-9)
        assert output_sqnr(float_layer, float_layer, x) == float("inf")
        flat = torch.zeros_like(x)  # one value per channel: no signal, only the error
        assert output_sqnr(float_layer, q, flat) == float("-inf")
