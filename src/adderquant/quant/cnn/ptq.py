"""Post-training quantization of a CNN with the standard methods, W = A bits.

Pipeline: fold BatchNorm into the convolutions → one calibration pass over the float model
recording every quantized convolution's input (:class:`ActivationObserver`: exact min/max, a
per-batch percentile, a value sample, the inputs of the first images) → per layer, the weight
quantizer of the method, the input threshold ``A`` of the method, optionally learned rounding
and bias correction, both computed from the kept inputs. The first convolution (it sees the
image) and every ``Linear`` stay in full precision, as the first convolution and the classifier
of the adder models do.

Methods (:data:`CNN_METHODS`):

- ``minmax``: per-tensor weight scale from ``max|W|``, ``A = max x``;
- ``percentile``: per-channel weight scales, ``A`` = the 99.99th percentile of each batch's
  inputs (maximum over batches);
- ``mse``: per-channel weight scales, ``A`` minimising the input quantization MSE at the width;
- ``mse-bc``: ``mse`` with bias correction: every output channel's mean error
  ``W·E[x] − Ŵ·E[Q(x)]`` is added to its bias (Nagel et al. 2019, empirical form);
- ``adaround``: ``mse`` inputs, per-channel weight scales minimising the weight MSE, learned
  rounding (AdaRound, Nagel et al. 2020) and bias correction. The rounding of every weight
  (down or up) minimises the layer's output error ``E‖Ŵ·Q(x) − W·x‖²`` plus AdaRound's
  annealed regulariser, with Adam. The objective is quadratic in ``Ŵ``, so it is evaluated
  exactly over every output position of the kept images through the second moments
  ``E[Q(x)Q(x)ᵀ]`` and ``E[Q(x)xᵀ]`` of the unfolded inputs instead of on sampled mini-batches.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adderquant.quant.calibrate import ActivationObserver, observe_inputs
from adderquant.quant.cnn.layers import (
    QuantConv2d,
    activation_fake_quant,
    fold_batchnorm,
    signed_range,
    weight_fake_quant,
)
from adderquant.quant.grid import check_bits
from adderquant.quant.layers import replace_module
from adderquant.quant.observers import mse_optimal_threshold

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class CNNMethod:
    """One CNN quantization method: weight scheme and clip, input clip, repairs."""

    name: str
    weights: str  # per-tensor | per-channel
    weight_clip: str  # max | mse
    act_clip: str  # max | percentile | mse
    bias_correction: bool = False
    adaround: bool = False


CNN_METHODS: dict[str, CNNMethod] = {m.name: m for m in (
    CNNMethod("minmax", "per-tensor", "max", "max"),
    CNNMethod("percentile", "per-channel", "max", "percentile"),
    CNNMethod("mse", "per-channel", "max", "mse"),
    CNNMethod("mse-bc", "per-channel", "max", "mse", bias_correction=True),
    CNNMethod("adaround", "per-channel", "mse", "mse", bias_correction=True, adaround=True),
)}


def cnn_method(name: str) -> CNNMethod:
    if name not in CNN_METHODS:
        raise ValueError(f"unknown CNN quantization method {name!r}; choose one of "
                         f"{', '.join(CNN_METHODS)}")
    return CNN_METHODS[name]


@dataclass(frozen=True)
class CNNPTQConfig:
    """Settings shared by the CNN methods."""

    calib_batches: int = 8  # calibration batches of the calibration set (8 x 128 images)
    keep_images: int = 128  # images whose layer inputs are kept for rounding and bias
    percentile: float = 0.9999  # the percentile method's per-batch quantile
    adaround_iters: int = 200
    adaround_positions: int = 4096  # output positions of the kept images per layer
    adaround_lr: float = 0.01
    adaround_reg: float = 0.01  # weight of the rounding regulariser
    adaround_warmup: float = 0.2  # share of the iterations without the regulariser
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("calib_batches", "keep_images", "adaround_iters", "adaround_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 < self.percentile <= 1.0:
            raise ValueError(f"percentile must be in (0, 1], got {self.percentile}")
        if not self.adaround_lr > 0 or not self.adaround_reg >= 0:
            raise ValueError("adaround_lr must be positive and adaround_reg non-negative")
        if not 0.0 <= self.adaround_warmup < 1.0:
            raise ValueError(f"adaround_warmup must be in [0, 1), got {self.adaround_warmup}")


def quantizable_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Every ``Conv2d`` of ``model`` but the first one registered (the one that sees the
    image), by name."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if len(convs) < 2:
        raise ValueError("the model has no convolution to quantize besides its first one")
    return dict(convs[1:])


@torch.no_grad()
def calibrate_cnn(
    folded: nn.Module, batches: Batches, cfg: CNNPTQConfig, progress: bool = False
) -> dict[str, ActivationObserver]:
    """Statistics of the input of every quantizable convolution of ``folded`` (eval mode)."""
    layers = quantizable_convs(folded)
    observers = observe_inputs(
        folded, layers, batches,
        lambda: ActivationObserver(quantile=cfg.percentile, keep_images=cfg.keep_images,
                                   seed=cfg.seed),
        progress, desc="calibrate cnn")
    for name, obs in observers.items():
        if obs.min < 0:
            raise ValueError(f"convolution {name!r} sees negative inputs ({obs.min:.3g}); the "
                             "unsigned input grid needs inputs after a ReLU")
    return observers


def activation_threshold(observer: ActivationObserver, clip: str, bits: int,
                         cfg: CNNPTQConfig, cache: dict[tuple, Any] | None = None) -> float:
    """``A`` of the input grid ``[0, A]`` under ``clip``; with ``cache``, each threshold is
    computed once per observer and clip (and width, for ``mse``, the only clip that depends on
    it) and reused."""
    if cache is not None:
        key = (id(observer), clip, bits if clip == "mse" else None)
        if key not in cache:
            cache[key] = activation_threshold(observer, clip, bits, cfg)
        return cache[key]
    if clip == "max":
        value = observer.max
    elif clip == "percentile":
        value = observer.threshold("plain", cfg.percentile)
    elif clip == "mse":
        value = mse_optimal_threshold(observer.sample, bits)
    else:
        raise ValueError(f"unknown activation clip {clip!r}; choose max, percentile or mse")
    return max(float(value), 1e-6)


@torch.no_grad()
def input_patches(
    conv: QuantConv2d, inputs: torch.Tensor, positions: int | None = None, seed: int = 0,
    chunk: int = 16,
) -> torch.Tensor:
    """The unfolded float inputs of ``conv`` (N × K) at about ``positions`` output positions of
    ``inputs`` drawn at random (or all of them)."""
    k = conv.in_channels * math.prod(conv.kernel_size)
    generator = torch.Generator().manual_seed(seed)
    total = len(inputs) * conv_positions(conv, inputs.shape[-2:])
    share = 1.0 if positions is None else min(1.0, positions / total)
    parts = []
    for x in inputs.split(chunk):
        fx = (F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
              .transpose(1, 2).reshape(-1, k))
        if share < 1.0:
            fx = fx[torch.randperm(len(fx), generator=generator)[: max(1, round(share * len(fx)))]]
        parts.append(fx)
    return torch.cat(parts)


@torch.no_grad()
def input_moments(
    conv: QuantConv2d, inputs: torch.Tensor, positions: int | None = None, seed: int = 0,
    patches: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Second moments of the unfolded float inputs ``x`` and quantized inputs ``Q(x)`` over the
    output positions of ``inputs`` (about ``positions`` of them drawn at random, or all):
    ``qq = E[Q(x)Q(x)ᵀ]``, ``qx = E[Q(x)xᵀ]``, ``xx = E[xxᵀ]`` (K × K, float64). ``patches``:
    the :func:`input_patches` of the same arguments, if already computed (``Q`` acts
    elementwise and keeps the zero padding zero, so it commutes with unfolding)."""
    fx = input_patches(conv, inputs, positions, seed) if patches is None else patches
    fq = conv.act_quant(fx)
    return {key: (a.T @ c).double() / len(fx)
            for key, a, c in (("qq", fq, fq), ("qx", fq, fx), ("xx", fx, fx))}


def conv_positions(conv: QuantConv2d, size: torch.Size) -> int:
    """Output positions of ``conv`` on an input of spatial ``size``."""
    out = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
           zip(size, conv.padding, conv.dilation, conv.kernel_size, conv.stride, strict=True)]
    return math.prod(out)


@torch.no_grad()
def output_bias(
    float_weight: torch.Tensor, quant: QuantConv2d, inputs: torch.Tensor, chunk: int = 32
) -> torch.Tensor:
    """Per output channel, the mean over ``inputs`` and positions of
    ``conv(x, W) − conv(Q(x), Q(W))``: the correction that bias correction adds (float64)."""
    total = torch.zeros(quant.out_channels, dtype=torch.float64)
    count = 0
    w_hat = quant.quantized_weight()
    for x in inputs.split(chunk):
        y = F.conv2d(x, float_weight, None, quant.stride, quant.padding, quant.dilation)
        y_hat = F.conv2d(quant.act_quant(x), w_hat, None, quant.stride, quant.padding,
                         quant.dilation)
        total += (y - y_hat).double().sum(dim=(0, 2, 3))
        count += y.shape[0] * y.shape[2] * y.shape[3]
    return total / count


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread inside the block (small matrix products lose to thread
    start-up on a loaded machine), then restore the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretches σ(v) to [γ, ζ]


def adaround_gradient(
    v: torch.Tensor, floor: torch.Tensor, scale: torch.Tensor, bits: int, qq: torch.Tensor,
    cross: torch.Tensor, reg: float, beta: float | None,
) -> torch.Tensor:
    """The gradient in ``v`` of AdaRound's loss, in closed form: the output error
    ``Σ_t ŵ_t·qq·ŵ_t − 2 ŵ_t·cross_t`` of ``ŵ = scale·clamp(floor + h(v), q_min, q_max)``
    (``qq`` symmetric) plus ``reg·Σ (1 − |2h − 1|^β)`` (no regulariser when ``beta`` is
    ``None``). Clamps pass the gradient on their closed range, as autograd's do."""
    lo, hi = signed_range(bits)
    sig = torch.sigmoid(v)
    pre = sig * (ZETA - GAMMA) + GAMMA
    h = pre.clamp(0, 1)
    u = floor + h
    w_hat = scale * u.clamp(lo, hi)
    grad_h = (2 * (w_hat @ qq - cross)) * scale * ((u >= lo) & (u <= hi))
    if beta is not None and reg:
        c = 2 * h - 1
        grad_h -= (2 * reg * beta) * c.abs().pow(beta - 1) * c.sign()
    return grad_h * ((pre >= 0) & (pre <= 1)) * ((ZETA - GAMMA) * sig * (1 - sig))


def adaround(
    weight: torch.Tensor, scale: torch.Tensor, bits: int, moments: dict[str, torch.Tensor],
    cfg: CNNPTQConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Learned rounding of ``weight`` (C_out × K) on the grid of step ``scale`` (C_out × 1 or
    1 × 1): each weight rounds down or up, chosen by minimising
    ``Σ_t E[(ŵ_t·Q(x) − w_t·x)²] + λ·Σ (1 − |2h(V) − 1|^β)`` (AdaRound: rectified sigmoid
    ``h``, ``β`` annealed from 20 to 2 after the warm-up) with Adam on the closed-form
    gradient (:func:`adaround_gradient`). Returns the rounded weight (on the grid) and the
    mean output MSE per channel of nearest and of learned rounding."""
    qq, qx, xx = moments["qq"], moments["qx"], moments["xx"]
    lo, hi = signed_range(bits)
    w = weight.float()
    s = scale.float()
    qq32, b = ((qq + qq.T) / 2).float(), (w @ qx.float().T)  # cross term Σ ŵ_t·(qx w_t)

    def error(w_hat: torch.Tensor) -> torch.Tensor:
        """Σ_t E[(ŵ_t·Q(x) − w_t·x)²] without the constant E[(w_t·x)²]."""
        return ((w_hat @ qq32) * w_hat).sum() - 2 * (w_hat * b).sum()

    floor = torch.floor(w / s)
    rest = (w / s - floor).clamp(1e-4, 1 - 1e-4)
    v = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
    nearest = s * torch.clamp(torch.round(w / s), lo, hi)
    optimizer = torch.optim.Adam([v], lr=cfg.adaround_lr)
    warmup = int(cfg.adaround_warmup * cfg.adaround_iters)
    with torch.no_grad(), single_thread():
        for it in range(cfg.adaround_iters):
            beta = None
            if it >= warmup and cfg.adaround_reg:
                progress = (it - warmup) / max(1, cfg.adaround_iters - warmup)
                beta = 2 + 18 * (1 + math.cos(math.pi * progress)) / 2  # 20 → 2
            v.grad = adaround_gradient(v, floor, s, bits, qq32, b, cfg.adaround_reg, beta)
            optimizer.step()
        rounded = s * torch.clamp(floor + (v >= 0).float(), lo, hi)
        constant = float(((w.double() @ xx) * w.double()).sum())
        return rounded, {"output_mse_nearest": (float(error(nearest)) + constant) / len(w),
                         "output_mse_learned": (float(error(rounded)) + constant) / len(w)}


def quantize_cnn(
    folded: nn.Module,
    observers: dict[str, ActivationObserver],
    method: str,
    bits: int,
    cfg: CNNPTQConfig,
    cache: dict[tuple, Any] | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A copy of the BatchNorm-folded ``folded`` with every quantizable convolution replaced
    by a :class:`QuantConv2d` quantized by ``method`` at ``bits``, and per-layer reports.
    ``cache``: input thresholds and learned rounding's input patches, shared by calls on the
    same ``observers`` and ``cfg``."""
    check_bits(bits)
    cache = {} if cache is None else cache
    spec = cnn_method(method)
    qmodel = copy.deepcopy(folded).eval()
    reports = []
    for name, conv in quantizable_convs(qmodel).items():
        obs = observers.get(name)
        if obs is None:
            raise ValueError(f"no calibration statistics for the convolution {name!r}")
        threshold = activation_threshold(obs, spec.act_clip, bits, cfg, cache)
        wq = weight_fake_quant(conv.weight, bits, spec.weights, spec.weight_clip)
        quant = QuantConv2d(conv, bits, wq, activation_fake_quant(threshold, bits))
        report: dict[str, Any] = {"layer": name, "bits": bits, "A": threshold,
                                  "act_max": obs.max,
                                  "acts_clipped": float((obs.sample > threshold).float().mean())}
        if spec.adaround:
            w = quant.weight.detach().flatten(1)
            scale = wq.scale.view(-1, 1) if wq.scale.numel() > 1 else wq.scale.view(1, 1)
            key = (id(obs), "patches")
            if key not in cache:
                cache[key] = input_patches(quant, obs.kept_inputs, cfg.adaround_positions,
                                           cfg.seed)
            moments = input_moments(quant, obs.kept_inputs, patches=cache[key])
            rounded, errors = adaround(w, scale, bits, moments, cfg)
            quant.weight.data.copy_(rounded.view_as(quant.weight))
            report.update(errors)
        if spec.bias_correction:
            delta = output_bias(conv.weight.detach(), quant, obs.kept_inputs)
            quant.bias += delta.float()
            report["bias_correction_mean_abs"] = float(delta.abs().mean())
        quant.freeze()
        replace_module(qmodel, name, quant)
        reports.append(report)
    return qmodel, reports


def cnn_ptq(
    model: nn.Module, batches: Batches, method: str, bits: int,
    cfg: CNNPTQConfig | None = None, progress: bool = False,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Fold, calibrate on ``batches`` (the first ``cfg.calib_batches``) and quantize
    ``model`` with ``method`` at ``bits``; returns the quantized model and per-layer reports."""
    cfg = cfg or CNNPTQConfig()
    cnn_method(method)
    folded = fold_batchnorm(model)
    limited = (b for _, b in zip(range(cfg.calib_batches), batches, strict=False))
    observers = calibrate_cnn(folded, limited, cfg, progress)
    return quantize_cnn(folded, observers, method, bits, cfg)
