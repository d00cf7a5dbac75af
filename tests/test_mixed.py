"""Mixed precision: candidate widths, the exact allocation against exhaustive search, the
operation counts of ResNet-20, the sensitivity measurement and the pipeline hook."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from adderquant.models import create_model
from adderquant.quant.bn import reestimate_bn
from adderquant.quant.config import AdderQuantConfig
from adderquant.quant.layers import QuantAdder2d
from adderquant.quant.mixed import (
    adder_operations,
    allocate_bits,
    candidate_bits,
    first_images,
    measure_sensitivity,
)
from adderquant.quant.ptq import CalibrationSet, quantize_with_report


def test_candidate_bits() -> None:
    assert candidate_bits(3.0) == (2, 3, 4)
    assert candidate_bits(3.5) == (2, 3, 4, 5)
    assert candidate_bits(2.0) == (2, 3)
    assert candidate_bits(8.0) == (7, 8)
    with pytest.raises(ValueError, match="average bit width"):
        candidate_bits(1.5)


def _brute_force(sensitivity, costs, budget):
    names = list(sensitivity)
    best = None
    for combo in itertools.product(*(sorted(sensitivity[n]) for n in names)):
        if sum(costs[n] * b for n, b in zip(names, combo, strict=True)) > budget * sum(
                costs.values()) + 1e-9:
            continue
        value = sum(sensitivity[n][b] for n, b in zip(names, combo, strict=True))
        if best is None or value < best:
            best = value
    return best


@pytest.mark.parametrize("seed", range(12))
def test_allocation_is_optimal_and_within_budget(seed) -> None:
    g = torch.Generator().manual_seed(seed)
    names = [f"l{i}" for i in range(5)]
    # operation counts sharing a power of two, as a network's do
    costs = {n: int(c) * 4096 for n, c in zip(names, torch.randint(1, 20, (5,), generator=g),
                                              strict=True)}
    sensitivity = {}
    for n in names:  # decreasing with the width, as measured ones are
        drops = torch.rand(3, generator=g).double()
        sensitivity[n] = {2: float(drops.sum()), 3: float(drops[1:].sum()), 4: float(drops[2])}
    budget = 2.0 + 2.0 * float(torch.rand(1, generator=g))
    alloc = allocate_bits(sensitivity, costs, budget)
    assert sum(costs[n] * b for n, b in alloc.items()) <= budget * sum(costs.values())
    value = sum(sensitivity[n][b] for n, b in alloc.items())
    assert value == pytest.approx(_brute_force(sensitivity, costs, budget))


def test_allocation_on_resnet20_costs() -> None:
    costs = {"a": 2_359_296, "b": 131_072, "c": 1_179_648}
    sensitivity = {"a": {2: 1.0, 3: 0.3, 4: 0.1}, "b": {2: 0.5, 3: 0.4, 4: 0.0},
                   "c": {2: 0.9, 3: 0.2, 4: 0.05}}
    # the uniform choice at the budget fits exactly (no rounding loses it)
    assert allocate_bits(sensitivity, costs, 3.0) == {"a": 3, "b": 3, "c": 3}
    assert allocate_bits(sensitivity, costs, 3.1) == {"a": 3, "b": 4, "c": 3}
    assert allocate_bits(sensitivity, costs, 4.0) == {"a": 4, "b": 4, "c": 4}
    assert allocate_bits(sensitivity, costs, 2.0) == {"a": 2, "b": 2, "c": 2}
    for budget in (2.3, 2.7, 3.5):
        alloc = allocate_bits(sensitivity, costs, budget)
        assert sum(sensitivity[n][b] for n, b in alloc.items()) == pytest.approx(
            _brute_force(sensitivity, costs, budget))
    with pytest.raises(ValueError, match="below the narrowest"):
        allocate_bits(sensitivity, costs, 1.9)
    with pytest.raises(ValueError, match="positive integers"):
        allocate_bits(sensitivity, {**costs, "a": 2.5}, 3.0)


def test_allocation_with_coarsened_units_keeps_the_budget() -> None:
    costs = {"a": 1_000_003, "b": 999_983, "c": 7}  # coprime: no common unit
    sensitivity = {n: {2: 1.0, 3: 0.5, 4: 0.2} for n in costs}
    alloc = allocate_bits(sensitivity, costs, 3.0, max_units=1000)
    assert sum(costs[n] * b for n, b in alloc.items()) <= 3.0 * sum(costs.values())


def test_adder_operations_of_resnet20() -> None:
    model = create_model("resnet20").eval()
    ops = adder_operations(model, torch.zeros(2, 3, 32, 32))
    assert len(ops) == 20
    assert ops["layer1.0.conv1"] == 16 * 16 * 9 * 32 * 32
    assert ops["layer2.0.conv1"] == 32 * 16 * 9 * 16 * 16  # stride 2
    assert ops["layer2.0.downsample.0"] == 32 * 16 * 16 * 16
    assert ops["layer3.2.conv2"] == 64 * 64 * 9 * 8 * 8


def test_first_images() -> None:
    batches = [(torch.full((4, 1), float(i)), torch.zeros(4)) for i in range(3)]
    assert first_images(batches, 6).view(-1).tolist() == [0, 0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="no calibration images"):
        first_images([], 3)


@pytest.fixture(scope="module")
def small_model() -> nn.Module:
    torch.manual_seed(0)
    m = create_model("resnet20")
    with torch.no_grad():
        reestimate_bn(m, [(torch.randn(16, 3, 32, 32), None)], momentum=None)
    return m.eval()


class Noisy(nn.Module):
    """A layer plus deterministic Gaussian noise of ``scale`` times its output's std."""

    def __init__(self, inner: nn.Module, scale: float) -> None:
        super().__init__()
        self.inner, self.scale = copy.deepcopy(inner), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
        return y + self.scale * y.std() * noise


def test_sensitivity_is_measured_at_the_reference_and_scaled_by_the_mse(small_model) -> None:
    images = torch.randn(8, 3, 32, 32)
    name, layer = "layer2.1.conv1", small_model.layer2[1].conv1
    inputs = {name: torch.rand(4, 32, 16, 16)}
    variants = {name: {8: copy.deepcopy(layer), 4: Noisy(layer, 0.05), 2: Noisy(layer, 0.5)}}
    s, mse = measure_sensitivity(small_model, variants, images, inputs, reference_bits=4)
    assert mse[name][8] == pytest.approx(0.0, abs=1e-9)
    assert mse[name][2] / mse[name][4] == pytest.approx(100.0, rel=1e-4)
    # the reference width's sensitivity is the measured divergence of the output
    work = copy.deepcopy(small_model)
    work.layer2[1].conv1 = variants[name][4]
    with torch.no_grad():
        kl = torch.nn.functional.kl_div(work(images).log_softmax(1),
                                        small_model(images).log_softmax(1),
                                        log_target=True, reduction="batchmean")
    assert s[name][4] == pytest.approx(float(kl), rel=1e-5) and s[name][4] > 0
    assert s[name][2] == pytest.approx(100.0 * s[name][4], rel=1e-4)
    assert s[name][8] == pytest.approx(0.0, abs=1e-12)
    assert isinstance(small_model.layer2[1].conv1, type(layer))  # the model is untouched
    unchanged, _ = measure_sensitivity(small_model, {name: {8: copy.deepcopy(layer)}}, images,
                                       inputs, reference_bits=8)
    assert unchanged[name][8] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="no 3-bit variant"):
        measure_sensitivity(small_model, variants, images, inputs, reference_bits=3)


def test_ptq_with_an_average_bit_budget(small_model) -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g)
    calib = CalibrationSet(images, torch.zeros(32, dtype=torch.long), "cifar10", batch_size=16)
    cfg = AdderQuantConfig(avg_bits=3.0, calib_batches=1, report_images=4,
                           clip_candidates=3, search_positions=64, mp_images=8, grouping=False)
    qmodel, report = quantize_with_report(small_model, cfg, calib)
    mp = report["mixed_precision"]
    bits = {n: m.bits for n, m in qmodel.named_modules() if isinstance(m, QuantAdder2d)}
    assert bits == report["config"]["layer_bits"] == {e["layer"]: e["bits"] for e in mp["layers"]}
    assert set(bits.values()) <= {2, 3, 4}
    assert mp["average_bits"] <= 3.0 + 1e-9 and mp["reference_bits"] == 3
    assert all(set(e["sensitivity"]) == {"2", "3", "4"} for e in mp["layers"])
    assert "mixed_precision" in report["seconds"]
    with pytest.raises(ValueError, match="either layer_bits"):
        quantize_with_report(small_model, cfg.replace(layer_bits={"layer1.0.conv1": 4}), calib)
