"""Fake-quantized convolutions of a CNN on ``torch.ao.quantization`` fake-quantize modules.

- Weights: signed ``b``-bit codes ``[−2^(b−1), 2^(b−1) − 1]``, symmetric, one scale per tensor
  or per output channel, from torch's ``MinMaxObserver`` / ``PerChannelMinMaxObserver``
  (``Δ = max|w| / ((q_max − q_min)/2)``) or from a per-channel MSE search.
- Inputs: unsigned ``b``-bit codes ``[0, 2^b − 1]`` on ``[0, A]`` (the inputs follow a ReLU),
  ``Δ = A/(2^b − 1)``, zero point 0; ``A`` comes from the caller (maximum, percentile or
  MSE-optimal threshold of the calibration statistics). torch's ``HistogramObserver`` is not
  used for ``A``: its error search assumes a 256-level grid whatever the bit width.
- BatchNorm is folded into the preceding convolution first (``torch.ao.quantization.fuse_modules``),
  so the quantized weights are the ones an integer kernel would use.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import (
    FakeQuantize,
    MinMaxObserver,
    PerChannelMinMaxObserver,
    fuse_modules,
)

from adderquant.quant.grid import check_bits

WEIGHT_SCHEMES = ("per-tensor", "per-channel")
WEIGHT_CLIPS = ("max", "mse")


def signed_range(bits: int) -> tuple[int, int]:
    check_bits(bits)
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def unsigned_range(bits: int) -> tuple[int, int]:
    check_bits(bits)
    return 0, (1 << bits) - 1


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every ``BatchNorm2d`` registered right after a
    ``Conv2d`` of as many channels folded into that convolution (its weight and a bias), the
    BatchNorm left as an identity. The models of the zoo register each BatchNorm right after
    the convolution that feeds it."""
    pairs: list[list[str]] = []
    previous: tuple[str, nn.Module] | None = None
    for name, m in model.named_modules():
        if (isinstance(m, nn.BatchNorm2d) and previous is not None
                and isinstance(previous[1], nn.Conv2d)
                and previous[1].out_channels == m.num_features):
            pairs.append([previous[0], name])
        previous = (name, m)
    folded = copy.deepcopy(model).eval()
    return fuse_modules(folded, pairs) if pairs else folded


def weight_fake_quant(
    weight: torch.Tensor, bits: int, scheme: str = "per-channel", clip: str = "max"
) -> FakeQuantize:
    """A frozen fake-quantize module for ``weight`` (C_out first): symmetric signed codes,
    scales from torch's min-max observers (``clip="max"``) or, per channel, the scale
    minimising ``Σ (w − Q(w))²`` (``clip="mse"``)."""
    if scheme not in WEIGHT_SCHEMES:
        raise ValueError(f"weight scheme must be one of {WEIGHT_SCHEMES}, got {scheme!r}")
    if clip not in WEIGHT_CLIPS:
        raise ValueError(f"weight clip must be one of {WEIGHT_CLIPS}, got {clip!r}")
    lo, hi = signed_range(bits)
    if scheme == "per-channel":
        fq = FakeQuantize(observer=PerChannelMinMaxObserver, quant_min=lo, quant_max=hi,
                          dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    else:
        fq = FakeQuantize(observer=MinMaxObserver, quant_min=lo, quant_max=hi,
                          dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    w = weight.detach().float()
    fq(w)  # observes once and sets the scales
    fq.disable_observer()
    if clip == "mse":
        if scheme != "per-channel":
            raise ValueError("the MSE weight clip searches one scale per channel")
        fq.scale.copy_(mse_weight_scale(w, bits, fq.scale))
    return fq


def mse_weight_scale(
    weight: torch.Tensor, bits: int, max_scale: torch.Tensor, candidates: int = 40,
    low: float = 0.4,
) -> torch.Tensor:
    """Per output channel, the scale among ``candidates`` fractions in ``[low, 1]`` of
    ``max_scale`` that minimises ``Σ (w − Δ·clamp(round(w/Δ), q_min, q_max))²`` (float64)."""
    lo, hi = signed_range(bits)
    w = weight.detach().double().flatten(1)
    fractions = torch.linspace(low, 1.0, candidates, dtype=torch.float64)
    steps = max_scale.double().view(1, -1, 1) * fractions.view(-1, 1, 1)
    q = torch.clamp(torch.round(w / steps), lo, hi) * steps
    errors = (q - w).pow(2).sum(dim=2)  # (candidates, C_out)
    best = errors.argmin(dim=0)
    return (max_scale.double() * fractions[best]).float()


def activation_fake_quant(threshold: float, bits: int) -> FakeQuantize:
    """A frozen fake-quantize module of the unsigned grid on ``[0, threshold]``."""
    if not threshold > 0:
        raise ValueError(f"activation threshold must be positive, got {threshold}")
    lo, hi = unsigned_range(bits)
    fq = FakeQuantize(observer=MinMaxObserver, quant_min=lo, quant_max=hi, dtype=torch.quint8,
                      qscheme=torch.per_tensor_affine)
    fq.disable_observer()
    fq.scale.copy_(torch.tensor([threshold / hi]))
    fq.zero_point.zero_()
    return fq


class QuantConv2d(nn.Module):
    """A convolution (BatchNorm folded) whose input and weight pass through frozen fake-quantize
    modules: ``conv(Q_x(x), Q_w(W)) + bias``, with ``Q_x`` unsigned and ``Q_w`` signed, both of
    ``bits`` bits. ``weight`` may be replaced by values already on its grid (learned
    rounding); ``bias`` is float (it absorbs BatchNorm and bias correction)."""

    def __init__(self, conv: nn.Conv2d, bits: int, weight_quant: FakeQuantize,
                 act_quant: FakeQuantize) -> None:
        super().__init__()
        if conv.groups != 1:
            raise ValueError("quantized convolutions support groups=1 only")
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError("quantized convolutions need explicit zero padding")
        self.bits = bits
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = tuple(conv.padding), tuple(conv.dilation)
        self.weight = nn.Parameter(conv.weight.detach().float().clone(), requires_grad=False)
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.register_buffer("bias", bias.float().clone())
        self.weight_quant = weight_quant
        self.act_quant = act_quant
        self.register_buffer("_frozen", None, persistent=False)

    def freeze(self) -> None:
        """Compute ``Q_w(W)`` once and use it in every later forward; call again after
        changing ``weight``."""
        self._frozen = None
        self._frozen = self.quantized_weight().detach()

    def quantized_weight(self) -> torch.Tensor:
        """``Q_w(W)``: the weight on its grid (float32); the frozen copy after :meth:`freeze`."""
        if self._frozen is not None:
            return self._frozen
        return self.weight_quant(self.weight)

    def weight_codes(self) -> torch.Tensor:
        """The integer weight codes (int32)."""
        shape = (-1, 1, 1, 1) if self.weight_quant.scale.numel() > 1 else (1, 1, 1, 1)
        return torch.round(self.quantized_weight() / self.weight_quant.scale.view(shape)).int()

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """``Q_x(x)`` as ``act_quant`` computes it (``round(x·(1/Δ))`` clamped, times ``Δ``,
        zero point 0), in one new tensor and in-place passes: cheaper than torch's
        fake-quantize kernel on the CPU."""
        fq = self.act_quant
        inv_scale = 1.0 / fq.scale.float()
        return (x * inv_scale).round_().clamp_(fq.quant_min, fq.quant_max).mul_(fq.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.quantized_input(x), self.quantized_weight(), self.bias,
                        self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bits={self.bits}")
