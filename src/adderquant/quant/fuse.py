"""Folding for inference: an eval-mode BatchNorm, the residual addition and the ReLU that follow
a :class:`~adderquant.quant.layers.QuantAdder2d` computed in the pass that turns the layer's
int32 SAD sums into float32 (:func:`~adderquant.ops.requant.output_from_sums`).

PyTorch's BatchNorm inference computes ``fma(x, α, β)`` per channel with
``α = γ/√(σ² + ε)`` and ``β = fma(−μ, α, b)``; :func:`batch_norm_terms` reads ``α`` and ``β``
back from PyTorch itself (exactly: ``α`` is the output at ``x = 1`` with ``μ = b = 0``, ``β``
the output at ``x = 0``) and :func:`batch_norm_rounding` checks on sample sums that the fused
pass reproduces the BatchNorm of the unfused output bit for bit. Where the check fails, or the
layer's input has no integer path, the folded block runs the unfolded modules, so folding
never changes an output.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from adderquant.models.resnet_cifar import BasicBlock
from adderquant.ops.requant import output_from_sums, sums_to_float
from adderquant.quant.layers import QuantAdder2d, replace_module


def batch_norm_terms(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel float32 ``(α, β)`` of the eval-mode ``bn``, as PyTorch computes them."""
    c = bn.num_features
    zeros = torch.zeros(c)
    weight = bn.weight.detach() if bn.weight is not None else torch.ones(c)
    bias = bn.bias.detach() if bn.bias is not None else zeros
    alpha = F.batch_norm(torch.ones(1, c, 1, 1), zeros, bn.running_var, weight, zeros, False,
                         0.0, bn.eps).flatten()
    beta = F.batch_norm(torch.zeros(1, c, 1, 1), bn.running_mean, bn.running_var, weight, bias,
                        False, 0.0, bn.eps).flatten()
    return alpha, beta


def batch_norm_rounding(adder: QuantAdder2d, bn: nn.BatchNorm2d, samples: int = 4096,
                        seed: int = 0) -> bool:
    """Whether the fused pass (:func:`~adderquant.ops.requant.output_from_sums` with ``α``,
    ``β`` from :func:`batch_norm_terms`) equals ``bn`` applied to the layer's unfused output
    bit for bit, on ``samples`` random sums per channel."""
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    sums = torch.randint(0, 1 << 16, (1, c, samples, 1), dtype=torch.int32, generator=g)
    excess, step, bias = adder.output_terms()
    with torch.no_grad():
        want = F.batch_norm(sums_to_float(sums, excess, step, bias), bn.running_mean,
                            bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    got = output_from_sums(sums, excess, step, bias, *batch_norm_terms(bn))
    return torch.equal(got, want)


class FoldedAdderBN(nn.Module):
    """A :class:`QuantAdder2d` followed by an eval-mode BatchNorm, an optional residual and an
    optional ReLU, computed in one pass from the layer's SAD sums where the integer path
    applies; elsewhere by the original modules."""

    def __init__(self, adder: QuantAdder2d, bn: nn.BatchNorm2d, relu: bool) -> None:
        super().__init__()
        self.adder, self.bn, self.relu = adder, bn, relu
        alpha, beta = batch_norm_terms(bn)
        self.fused = batch_norm_rounding(adder, bn)
        self.register_buffer("alpha", alpha)
        self.register_buffer("beta", beta)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if (self.fused and not self.training and self.adder.use_integer_path
                and self.adder.integer_path_applies(x)
                and (residual is None or residual.dtype == torch.float32)):
            sums = self.adder.integer_sums(x)
            if sums is not None:
                return output_from_sums(sums, *self.adder.output_terms(), self.alpha,
                                        self.beta, residual, self.relu)
        y = self.bn(self.adder(x))
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.relu else y


class FoldedBasicBlock(nn.Module):
    """A :class:`~adderquant.models.resnet_cifar.BasicBlock` whose quantized adder layers carry
    their BatchNorm, residual and ReLU (see :class:`FoldedAdderBN`)."""

    def __init__(self, block: BasicBlock) -> None:
        super().__init__()
        self.first = FoldedAdderBN(block.conv1, block.bn1, relu=True)
        self.second = FoldedAdderBN(block.conv2, block.bn2, relu=True)
        down = block.downsample
        self.downsample = (FoldedAdderBN(down[0], down[1], relu=False)
                           if _foldable_shortcut(down) else down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return self.second(self.first(x), residual)


def _foldable_shortcut(down: nn.Module | None) -> bool:
    return (isinstance(down, nn.Sequential) and len(down) == 2
            and isinstance(down[0], QuantAdder2d) and isinstance(down[1], nn.BatchNorm2d))


def _foldable(block: nn.Module) -> bool:
    return (type(block) is BasicBlock and isinstance(block.conv1, QuantAdder2d)
            and isinstance(block.conv2, QuantAdder2d)
            and isinstance(block.bn1, nn.BatchNorm2d) and isinstance(block.bn2, nn.BatchNorm2d))


def fold_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` whose residual blocks with quantized adder layers run
    :class:`FoldedBasicBlock` (same outputs, fewer passes); ``model`` is left as it is."""
    folded = copy.deepcopy(model).eval()
    for name, module in list(folded.named_modules()):
        if _foldable(module):
            replace_module(folded, name, FoldedBasicBlock(module))
    return folded.eval()
