"""Folded inference (BatchNorm, residual and ReLU in the pass from SAD sums) against the
unfolded quantized model, bit for bit, on real layers and images."""

from __future__ import annotations

import torch

from adderquant.data import TensorLoader
from adderquant.ops.requant import output_from_sums, sums_to_float
from adderquant.quant import AdderQuantConfig, PaperConfig, quantize
from adderquant.quant.config import FAITHFUL
from adderquant.quant.fuse import (
    FoldedBasicBlock,
    batch_norm_rounding,
    batch_norm_terms,
    fold_for_inference,
)
from adderquant.quant.layers import QuantAdder2d


def batches(images: torch.Tensor, labels: torch.Tensor, size: int = 32):
    return list(TensorLoader(images, labels, "cifar10", batch_size=size))


def test_output_from_sums_matches_the_unfused_operations():
    g = torch.Generator().manual_seed(1)
    sums = torch.randint(0, 90_000, (2, 6, 5, 7), dtype=torch.int32, generator=g)
    excess = torch.randint(0, 500, (6,), dtype=torch.int32, generator=g)
    step, bias = -torch.rand(6, generator=g) * 0.01, torch.randn(6, generator=g)
    bn = torch.nn.BatchNorm2d(6).eval()
    bn.running_mean.normal_(generator=g).mul_(100)
    bn.running_var.uniform_(0.5, 50, generator=g)
    bn.weight.data.normal_(generator=g)
    bn.bias.data.normal_(generator=g)
    residual = torch.randn(sums.shape, generator=g)
    alpha, beta = batch_norm_terms(bn)
    with torch.no_grad():
        y = bn(sums_to_float(sums, excess, step, bias))
    assert torch.equal(output_from_sums(sums, excess, step, bias, alpha, beta), y)
    assert torch.equal(
        output_from_sums(sums, excess, step, bias, alpha, beta, residual, relu=True),
        torch.relu(y + residual))


def test_folded_model_equals_unfolded_on_real_layers(released_resnet20, cifar10_test):
    images, labels = cifar10_test
    calib = batches(images[:64], labels[:64])
    test = batches(images[64:192], labels[64:192])
    configs = [PaperConfig(**FAITHFUL, bits=4, calib_batches=2, calib_batch_size=32,
                           bn_batches=2),
               PaperConfig(bits=8, calib_batches=2, calib_batch_size=32,
                           bias_correction_batches=1),
               AdderQuantConfig(bits=3, calib_batches=2, calib_batch_size=32)]
    for cfg in configs:
        qmodel = quantize(released_resnet20, cfg, calib).eval()
        folded = fold_for_inference(qmodel)
        blocks = [m for m in folded.modules() if isinstance(m, FoldedBasicBlock)]
        assert len(blocks) == 9 and all(b.first.fused and b.second.fused for b in blocks)
        with torch.no_grad():
            for x, _ in test:
                assert torch.equal(folded(x), qmodel(x)), cfg.method


def test_rounding_check_and_fallback_agree_with_the_unfolded_layer(released_resnet20,
                                                                     cifar10_test):
    images, labels = cifar10_test
    qmodel = quantize(released_resnet20, AdderQuantConfig(bits=4, calib_batches=1,
                                                          calib_batch_size=32),
                      batches(images[:32], labels[:32])).eval()
    block = qmodel.layer2[0]
    assert isinstance(block.conv1, QuantAdder2d)
    assert batch_norm_rounding(block.conv1, block.bn1)
    folded = fold_for_inference(qmodel)
    x = batches(images[32:48], labels[32:48], 16)[0][0]
    x[0, 0, 0, 0] = float("nan")  # no integer codes: the unfolded modules run
    for first in (m.first for m in folded.modules() if isinstance(m, FoldedBasicBlock)):
        first.fused = False
    with torch.no_grad():
        want, got = qmodel(x), folded(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite = torch.isfinite(want)
    assert torch.equal(got[finite], want[finite])
