"""Activation thresholds: the released quantile rule, exact per-batch quantiles, MSE clipping,
and calibration errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adderquant.nn import Adder2d
from adderquant.quant.calibrate import ActivationObserver, calibrate
from adderquant.quant.observers import (
    mse_optimal_threshold,
    quantile_index,
    quantize_unsigned,
    released_quantile_index,
    summarize_batch,
)


def test_released_rule_on_hand_computed_examples() -> None:
    # n = 20, q = 0.9: round(18.0) = 18; (18 − 1)·0.9 = 15.3 -> index 15
    assert released_quantile_index(20, 0.9) == 15
    # n = 5, q = 0.9: 4.5 rounds half to even -> 4; (4 − 1)·0.9 = 2.7 -> index 2
    assert released_quantile_index(5, 0.9) == 2
    # n = 10000, q = 0.9997: round(9997.0) = 9997; 9996·0.9997 = 9993.0012 -> index 9993
    assert released_quantile_index(10000, 0.9997) == 9993
    assert quantile_index(10000, 0.9997, "plain") in (9996, 9997)  # int(q·n), float rounding
    assert released_quantile_index(7, 1.0) == 6  # q = 1: the maximum


def test_released_rule_on_a_batch_and_max_over_batches() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.arange(1, 10001, dtype=torch.float32)  # |x| sorted: value = index + 1
    x1 = values[torch.randperm(10000, generator=g)].view(10, 1, 10, 100)
    x2 = x1 * 0.5
    obs = ActivationObserver(requests=[("released", 0.9997)])
    obs.update(x2)
    assert obs.threshold("released", 0.9997) == 4997.0  # 0.5 · 9994
    obs.update(x1)
    obs.update(x2)
    assert obs.threshold("released", 0.9997) == 9994.0  # max over batches
    assert obs.batch_quantile_max in (9997.0, 9998.0)  # plain rule, one application
    assert obs.max == 10000.0 and obs.min == 0.5 and obs.batches == 3
    with pytest.raises(KeyError, match="did not track"):
        obs.threshold("released", 0.99)


@pytest.mark.parametrize("shape", [(128, 16, 8, 8), (3, 5, 7), (1,), (2, 1000)])
def test_summarize_batch_matches_a_full_sort(shape) -> None:
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g) * 3
    requests = [("released", 0.9997), ("plain", 0.9997), ("plain", 0.99), ("plain", 1.0),
                ("released", 0.5)]
    lo, hi, quantiles = summarize_batch(x, requests)
    ordered = x.flatten().abs().sort().values
    n = ordered.numel()
    assert quantiles == [float(ordered[quantile_index(n, q, r)]) for r, q in requests]
    assert (lo, hi) == (float(x.min()), float(x.max()))


def test_mse_threshold_beats_the_max_and_the_half_max() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.rand(50000, generator=g), torch.tensor([40.0])])  # one far outlier
    for bits in (3, 6):
        a = mse_optimal_threshold(x, bits)
        assert 0 < a < 40.0

        def mse(t: float, b: int = bits) -> float:
            return float((x.double() - quantize_unsigned(x.double(), t, b)).pow(2).mean())

        assert mse(a) < mse(40.0) and mse(a) <= mse(20.0)
    with pytest.raises(ValueError, match="empty"):
        mse_optimal_threshold(torch.empty(0), 4)


def tiny_adder_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Adder2d(4, 4, 3, padding=1),
                         nn.BatchNorm2d(4))


def test_calibration_errors_are_clear() -> None:
    model = tiny_adder_model()
    with pytest.raises(ValueError, match="calibration set is empty"):
        calibrate(model, [], progress=False)
    with pytest.raises(ValueError, match="no adder layers"):
        calibrate(nn.Sequential(nn.Conv2d(3, 4, 1)), [(torch.rand(1, 3, 4, 4), None)],
                  progress=False)
    model[0].weight.data[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"non-finite .* adder layer '2'"):
        calibrate(model, [(torch.rand(2, 3, 4, 4), None)], progress=False)
