"""CNN post-training quantization: the fake-quantized convolution against a float64 reference,
BatchNorm folding, the repairs (bias correction, learned rounding), the operation counts of a
quantized CNN by hand, and the released convolutional checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adderquant.data import TensorLoader
from adderquant.engine.energy import EnergyTable, count_ops, summarize
from adderquant.models import create_model, load_pretrained, model_record
from adderquant.quant.cnn import (
    CNNPTQConfig,
    QuantConv2d,
    calibrate_cnn,
    fold_batchnorm,
    quantize_cnn,
)
from adderquant.quant.cnn.layers import (
    activation_fake_quant,
    mse_weight_scale,
    weight_fake_quant,
)
from adderquant.quant.cnn.ptq import (
    adaround,
    adaround_gradient,
    input_moments,
)
from adderquant.studies.comparison import Renormalize

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def reference_quant_conv(x, weight, bias, bits, threshold, per_channel, stride, padding):
    """float64: unsigned input codes on [0, A], symmetric signed weight codes with torch's
    symmetric scale max|w| / ((q_max − q_min) / 2)."""
    x, w = x.double(), weight.double()
    levels = 2**bits - 1
    step = threshold / levels
    x_hat = torch.clamp(torch.round(x / step), 0, levels) * step
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    max_abs = w.abs().flatten(1).amax(1) if per_channel else w.abs().max().expand(w.shape[0])
    s = (max_abs / ((hi - lo) / 2)).view(-1, 1, 1, 1)
    w_hat = torch.clamp(torch.round(w / s), lo, hi) * s
    return F.conv2d(x_hat, w_hat, bias.double(), stride, padding)


@pytest.mark.parametrize("bits", [8, 5, 4, 2])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_case01_fake_quant_conv_matches_float64_reference(bits, per_channel, stride):
    gen = torch.Generator().manual_seed(bits * 10 + stride)
    conv = nn.Conv2d(5, 6, 3, stride=stride, padding=1, bias=True)
    spread = torch.linspace(0.1, 1.0, 6).view(-1, 1, 1, 1)
    w = torch.randn(conv.weight.shape, generator=gen) * spread
    # torch's symmetric grid puts max|w| exactly half a step beyond the last code; with the
    # largest weight positive, both roundings of that tie give the top code after clamping
    flat = w.flatten(1)
    w *= flat.gather(1, flat.abs().argmax(1, keepdim=True)).sign().view(-1, 1, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(torch.randn(6, generator=gen))
    x = torch.relu(torch.randn(3, 5, 9, 9, generator=gen) * 1.5)  # zeros, and values beyond A
    threshold = 2.0
    scheme = "per-channel" if per_channel else "per-tensor"
    layer = QuantConv2d(conv, bits, weight_fake_quant(conv.weight, bits, scheme),
                        activation_fake_quant(threshold, bits))
    got = layer(x)
    want = reference_quant_conv(x, conv.weight, conv.bias, bits, threshold, per_channel,
                                stride, 1)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)
    codes = layer.weight_codes()
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    assert codes.abs().max() >= 2 ** (bits - 1) - 1  # the largest weight reaches the edge
    scale = layer.weight_quant.scale.view(-1, 1, 1, 1) if per_channel else layer.weight_quant.scale
    assert torch.allclose(codes.float() * scale, layer.quantized_weight(), atol=1e-6)


def test_mse_weight_scale_is_the_best_candidate():
    w = torch.randn(4, 500, generator=torch.Generator().manual_seed(1))
    max_scale = w.abs().amax(1) / 3.5
    scale = mse_weight_scale(w, 3, max_scale, candidates=40, low=0.4)

    def error(s):
        return (torch.clamp(torch.round(w.double() / s.double().view(-1, 1)), -4, 3)
                * s.double().view(-1, 1) - w.double()).pow(2).sum(1)

    assert torch.all(scale < 0.95 * max_scale)  # Gaussian weights: clipping the tails pays
    assert torch.all(error(scale) <= error(max_scale) + 1e-12)
    for f in torch.linspace(0.4, 1.0, 40):  # no candidate beats the chosen one
        assert torch.all(error(scale) <= error(max_scale * f) + 1e-9)


class TinyCNN(nn.Module):
    """1x4x4 input: conv 3x3 (1->2) + BN, conv 3x3 (2->2) + BN + residual, global average
    pool, linear (2->3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(2)
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn0(self.conv0(x)))
        h = torch.relu(self.bn1(self.conv1(h)) + h)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def tiny_model(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    model = TinyCNN()
    for bn in (model.bn0, model.bn1):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def batches(n: int, size: int = 16, shape=(1, 4, 4), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=gen), torch.zeros(size)) for _ in range(n)]


def test_fold_batchnorm_keeps_the_function():
    model = tiny_model()
    folded = fold_batchnorm(model)
    x = torch.randn(8, 1, 4, 4)
    assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert isinstance(folded.bn0, nn.Identity) and isinstance(folded.bn1, nn.Identity)
    assert folded.conv1.bias is not None
    assert isinstance(model.bn1, nn.BatchNorm2d)  # the original is untouched


def test_first_convolution_and_linear_stay_float():
    folded = fold_batchnorm(tiny_model())
    observers = calibrate_cnn(folded, batches(2), CNNPTQConfig(keep_images=8))
    qmodel, reports = quantize_cnn(folded, observers, "mse", 4, CNNPTQConfig())
    assert type(qmodel.conv0) is nn.Conv2d and type(qmodel.fc) is nn.Linear
    assert isinstance(qmodel.conv1, QuantConv2d) and qmodel.conv1.bits == 4
    assert [r["layer"] for r in reports] == ["conv1"]


def test_bias_correction_removes_the_mean_output_error():
    folded = fold_batchnorm(tiny_model(3))
    cfg = CNNPTQConfig(keep_images=32)
    observers = calibrate_cnn(folded, batches(4), cfg)
    x = observers["conv1"].kept_inputs

    def mean_error(method: str) -> torch.Tensor:
        q, _ = quantize_cnn(folded, observers, method, 2, cfg)
        return (folded.conv1(x) - q.conv1(x)).double().mean(dim=(0, 2, 3))

    assert mean_error("mse").abs().max() > 1e-3
    assert mean_error("mse-bc").abs().max() < 1e-5


def test_adaround_rounds_each_weight_down_or_up_and_lowers_the_output_error():
    gen = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(8, 6, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.2)
    x = torch.relu(torch.randn(16, 8, 6, 6, generator=gen))
    fq = weight_fake_quant(conv.weight, 3, "per-channel", "mse")
    layer = QuantConv2d(conv, 3, fq, activation_fake_quant(float(x.max()), 3))
    moments = input_moments(layer, x)
    w = conv.weight.detach().flatten(1)
    s = fq.scale.view(-1, 1)
    rounded, errors = adaround(w, s, 3, moments, CNNPTQConfig(adaround_iters=60))
    codes = rounded / s
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    step = codes.round() - torch.floor(w / s)
    assert torch.all((step == 0) | (step == 1) | (codes.round() == -4) | (codes.round() == 3))
    assert errors["output_mse_learned"] < errors["output_mse_nearest"]

    @torch.no_grad()
    def output_mse(weight):  # the reported error, measured on the layer's outputs
        y = F.conv2d(x, conv.weight, None, 1, 1)
        y_hat = F.conv2d(layer.act_quant(x), weight.view_as(conv.weight), None, 1, 1)
        return float((y - y_hat).double().pow(2).mean(dim=(0, 2, 3)).sum()) / 6

    nearest = torch.clamp(torch.round(w / s), -4, 3) * s
    assert output_mse(rounded) == pytest.approx(errors["output_mse_learned"], rel=1e-3)
    assert output_mse(nearest) == pytest.approx(errors["output_mse_nearest"], rel=1e-3)


@pytest.mark.parametrize("beta", [None, 20.0, 2.0])
def test_adaround_gradient_matches_autograd(beta):
    gen = torch.Generator().manual_seed(7)
    bits, lo, hi = 3, -4, 3
    w = torch.randn(5, 12, generator=gen, dtype=torch.float64) * 0.3
    s = torch.rand(5, 1, generator=gen, dtype=torch.float64) * 0.05 + 0.05
    a = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    qq = a.T @ a / 40
    cross = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    floor = torch.floor(w / s)
    floor[0, :3] = torch.tensor([hi, lo - 1, hi + 1.0])  # clamped at and beyond the grid
    v = torch.randn(5, 12, generator=gen, dtype=torch.float64) * 3
    v[1, :2] = torch.tensor([-40.0, 40.0])  # h saturated at 0 and 1
    reg = 0.05
    leaf = v.clone().requires_grad_(True)
    h = torch.clamp(torch.sigmoid(leaf) * 1.2 - 0.1, 0, 1)  # AdaRound's h, ζ = 1.1, γ = -0.1
    w_hat = s * torch.clamp(floor + h, lo, hi)
    loss = ((w_hat @ qq) * w_hat).sum() - 2 * (w_hat * cross).sum()
    if beta is not None:
        loss = loss + reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
    loss.backward()
    grad = adaround_gradient(v, floor, s, bits, qq, cross, reg, beta)
    assert torch.allclose(grad, leaf.grad, rtol=1e-10, atol=1e-12)
    assert grad[1, :2].abs().max() == 0


def test_frozen_weight_is_the_fake_quantized_weight():
    gen = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.relu(torch.randn(2, 3, 5, 5, generator=gen))
    layer = QuantConv2d(conv, 4, weight_fake_quant(conv.weight, 4),
                        activation_fake_quant(float(x.max()), 4))
    before = layer(x)
    layer.freeze()
    assert torch.equal(layer(x), before)
    with torch.no_grad():
        layer.weight.mul_(0.5)
    assert torch.equal(layer(x), before)  # frozen until frozen again
    layer.freeze()
    expected = F.conv2d(layer.act_quant(x), layer.weight_quant(layer.weight), layer.bias,
                        1, 1)
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantized_input_is_torch_fake_quantize(bits):
    gen = torch.Generator().manual_seed(bits)
    threshold = 1.7
    fq = activation_fake_quant(threshold, bits)
    layer = QuantConv2d(nn.Conv2d(3, 2, 1), bits, weight_fake_quant(torch.randn(2, 3, 1, 1),
                                                                   bits), fq)
    x = torch.rand(4, 3, 9, 9, generator=gen) * 2.5 - 0.2  # beyond both ends of [0, A]
    x[0, 0, 0, :5] = (torch.arange(5) + 0.5) * float(fq.scale)  # ties
    assert torch.equal(layer.quantized_input(x), fq(x))


def test_shared_thresholds_change_no_model():
    folded = fold_batchnorm(tiny_model(4))
    cfg = CNNPTQConfig(keep_images=16)
    observers = calibrate_cnn(folded, batches(3), cfg)
    x = torch.randn(8, 1, 4, 4)
    cache: dict[tuple, float] = {}
    for method in ("minmax", "percentile", "mse", "mse-bc", "adaround"):
        for bits in (6, 3):
            alone, reports = quantize_cnn(folded, observers, method, bits, cfg)
            shared, shared_reports = quantize_cnn(folded, observers, method, bits, cfg, cache)
            assert torch.equal(alone(x), shared(x))
            assert reports == shared_reports
    # max and percentile once per layer, mse once per layer and width, patches once per layer
    assert sorted(map(str, (k[1:] for k in cache))) == [
        "('max', None)", "('mse', 3)", "('mse', 6)", "('patches',)", "('percentile', None)"]


def test_calibration_refuses_negative_inputs():
    class Signed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(1, 2, 1)
            self.b = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.b(self.a(x))

    with pytest.raises(ValueError, match="negative inputs"):
        calibrate_cnn(Signed().eval(), batches(1), CNNPTQConfig())


def test_case02_quantized_cnn_operations_by_hand():
    """conv0 (float, folded BN bias): 32 outputs x 9 terms; conv1 (4 bits): 32 outputs x 18
    terms, accumulator ceil(log2(18·8·15 + 1)) + 1 = 13 bits, rescale + bias per output and
    input quantization per input element (32 each, int32); residual 32 (int32); functional
    average pool: 32 additions, 2 multiplies; linear: 6 terms + 3 biases."""
    folded = fold_batchnorm(tiny_model())
    observers = calibrate_cnn(folded, batches(2), CNNPTQConfig(keep_images=4))
    qmodel, _ = quantize_cnn(folded, observers, "minmax", 4, CNNPTQConfig())
    summary = summarize(count_ops(qmodel, (1, 1, 4, 4)), EnergyTable())
    assert summary["ops"] == {
        "float_add32": 288 + 32 + 32 + 6 + 3,
        "float_mul32": 288 + 2 + 6,
        "int_add13": 576,
        "int_add32": 32 + 32 + 32,
        "int_mul32": 32 + 32,
        "int_mul4": 576,
    }
    pj = (576 * 0.2 * 4**2 / 8**2 + 576 * (0.03 + 0.07 * 5 / 24) + 64 * 3.1 + 96 * 0.1
          + 296 * 3.7 + 361 * 0.9)
    assert summary["energy_uj"] == pytest.approx(pj / 1e6, rel=1e-9)


def test_case03_float_cnn_operations_by_hand():
    """The float model: BatchNorm free after each convolution, float residual, functional
    pooling counted."""
    summary = summarize(count_ops(tiny_model(), (1, 1, 4, 4)), EnergyTable())
    assert summary["ops"] == {"float_mul32": 288 + 576 + 2 + 6,
                              "float_add32": 288 + 576 + 32 + 32 + 6 + 3}


def test_renormalize_maps_one_normalisation_to_another():
    src = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    dst = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    pixels = torch.rand(2, 3, 5, 5)
    mean0, std0 = (torch.tensor(v).view(1, 3, 1, 1) for v in src)
    mean1, std1 = (torch.tensor(v).view(1, 3, 1, 1) for v in dst)
    got = Renormalize(src, dst)((pixels - mean0) / std0)
    assert torch.allclose(got, (pixels - mean1) / std1, atol=1e-6)


@pytest.mark.slow
def test_cnn_checkpoint_scores_915_of_1000(cifar10_test):
    record = model_record("resnet20-cnn")
    path = SHARED / "models" / record.file
    if not path.is_file():
        pytest.skip(f"{path} not available")
    model = load_pretrained(create_model("resnet20-cnn"), path).eval()
    images, labels = cifar10_test
    own = TensorLoader(images, labels, "cifar10", 250, normalisation=(record.mean, record.std))
    dataset = TensorLoader(images, labels, "cifar10", 250)
    wrapped = nn.Sequential(Renormalize((dataset.mean, dataset.std), (record.mean, record.std)),
                            model).eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in own)
        via_dataset = sum(int((wrapped(x).argmax(1) == y).sum()) for x, y in dataset)
    assert len(labels) == 1000 and correct == 915 and via_dataset == 915
