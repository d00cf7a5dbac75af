"""Error-driven choice of intervals and groups: patch sampling, candidates, the per-channel
error matrix against a float64 brute force, group selection against exhaustive search, and
the search on a layer of the released model."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adderquant.ops.reference import adder2d_reference
from adderquant.quant import clipsearch
from adderquant.quant.calibrate import ActivationObserver
from adderquant.quant.clamp import lossless_clamp
from adderquant.quant.clipsearch import (
    LayerSample,
    candidate_intervals,
    channel_errors,
    code_distances,
    interval_grid,
    sample_patches,
    select_groups,
)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"),
    [((3, 3), 1, 1, 1), ((1, 1), 2, 0, 1), ((3, 2), (2, 1), (2, 1), (2, 1))],
)
def test_sample_patches_are_rows_of_unfold(kernel, stride, padding, dilation) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 9, 11, generator=g)
    cols = F.unfold(x, kernel, dilation, padding, stride).transpose(1, 2).reshape(-1, 5 * kernel[0]
                                                                                    * kernel[1])
    every = sample_patches(x, kernel, stride, padding, dilation, 10**6)
    assert torch.equal(every, cols)  # all positions, in order, when asking for more
    some = sample_patches(x, kernel, stride, padding, dilation, 17, seed=3)
    assert some.shape == (17, cols.shape[1])
    matches = (some.unsqueeze(1) == cols.unsqueeze(0)).all(dim=2)
    assert bool(matches.any(dim=1).all())  # every sampled row is a real patch
    assert len({tuple(r.tolist()) for r in some}) == 17  # without replacement


def test_candidate_intervals() -> None:
    c = candidate_intervals(0.0, 4.0, 5, 0.5)
    np.testing.assert_allclose(c, [[0, 4], [0, 2], [0, 1], [0, 0.5], [0, 0.25]])
    signed = candidate_intervals(-1.0, 2.0, 3, 0.5)
    assert signed.shape == (9, 2)
    assert set(signed[:, 0]) == {-1.0, -0.5, -0.25} and set(signed[:, 1]) == {2.0, 1.0, 0.5}
    negative = candidate_intervals(-3.0, -1.0, 2, 0.5)  # a non-positive input: c stays 0
    np.testing.assert_allclose(negative, [[-3, 0], [-1.5, 0]])
    with pytest.raises(ValueError, match="all zero"):
        candidate_intervals(0.0, 0.0, 4, 0.5)
    with pytest.raises(ValueError, match="ratio"):
        candidate_intervals(0.0, 1.0, 4, 1.0)


def _brute_force_errors(x, w, candidates, bits, centre):
    """Per-channel MSE of the fake-quantized layer on all output positions, float64, from
    the definitions alone (clamp, round to the grid, plain adder)."""
    y = adder2d_reference(x, w, None, 1, 1)
    out = np.empty((w.shape[0], len(candidates)))
    means = np.empty_like(out)
    for j, (a, c) in enumerate(candidates):
        grid = interval_grid(float(a), float(c), bits)
        lo, hi, step, z = grid.lo, grid.hi, grid.scale, grid.zero_point
        x_hat = step * (torch.clamp(torch.round(x / step) + z, 0, grid.levels) - z)
        w_c, bias = lossless_clamp(w, lo, hi)
        w_hat = step * (torch.round(w_c / step) + z - z)
        diff = adder2d_reference(x_hat, w_hat, None, 1, 1) + bias.view(1, -1, 1, 1) - y
        diff = diff.transpose(0, 1).reshape(w.shape[0], -1)
        means[:, j] = diff.mean(dim=1).numpy()
        if centre:
            diff = diff - diff.mean(dim=1, keepdim=True)
        out[:, j] = diff.square().mean(dim=1).numpy()
    return out, means


@pytest.mark.parametrize("centre", [True, False])
@pytest.mark.parametrize("signed", [False, True])
def test_channel_errors_match_a_float64_brute_force(centre, signed) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 4, 6, 6, generator=g, dtype=torch.float64) * 3.0 - (1.0 if signed else 0.0)
    w = 8.0 * torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    sample = LayerSample.from_inputs(x, w, 1, 1, 1, count=10**6)  # every position
    candidates = candidate_intervals(float(x.min()), float(x.max()), 4, 0.7)
    errors, means = channel_errors(sample, candidates, 3, bias_correction=centre)
    expected, expected_means = _brute_force_errors(x, w, candidates, 3, centre)
    np.testing.assert_allclose(errors, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(means, expected_means, rtol=1e-4, atol=1e-5)


def _cost(errors, cols):
    return errors[:, list(cols)].min(axis=1).sum()


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_select_groups_matches_exhaustive_search(seed, groups) -> None:
    rng = np.random.default_rng(seed)
    # errors shaped like real ones: each channel has a smooth optimum along the candidates
    centres = rng.uniform(0, 9, size=(10, 1))
    errors = (np.arange(10)[None, :] - centres) ** 2 + rng.uniform(0, 3, size=(10, 10))
    chosen, labels = select_groups(errors, groups)
    best = min(_cost(errors, cols) for cols in itertools.combinations(range(10), groups))
    assert _cost(errors, chosen) == pytest.approx(best)
    assert list(chosen) == sorted(chosen) and len(chosen) <= groups
    assert set(labels) == set(range(len(chosen)))  # every group holds a channel
    np.testing.assert_array_equal(labels, errors[:, chosen].argmin(axis=1))


def test_select_groups_local_search_beyond_the_exhaustive_limit() -> None:
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 39, size=(30, 1))
    errors = (np.arange(40)[None, :] - centres) ** 2 + rng.uniform(0, 30, size=(30, 40))
    assert math.comb(40, 6) > clipsearch.EXHAUSTIVE_LIMIT
    chosen, labels = select_groups(errors, 6)
    cost = _cost(errors, chosen)
    # a local optimum: no single swap of a chosen column lowers the error
    for slot, j in itertools.product(range(len(chosen)), range(40)):
        trial = list(chosen)
        trial[slot] = j
        assert _cost(errors, trial) >= cost - 1e-9
    # and far better than one group, close to the per-channel optimum
    assert cost < 0.5 * errors.sum(axis=0).min()
    np.testing.assert_array_equal(labels, errors[:, chosen].argmin(axis=1))


def test_select_groups_limits_and_errors() -> None:
    errors = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    chosen, labels = select_groups(errors, 8)  # more groups than candidates
    assert list(chosen) == [0, 1] and list(labels[:2]) == [1, 0]
    same = np.ones((4, 3))
    chosen, labels = select_groups(same, 3)  # ties: one group is enough
    assert len(chosen) == 1 and set(labels) == {0}
    with pytest.raises(ValueError, match="groups"):
        select_groups(errors, 0)
    with pytest.raises(ValueError, match="non-empty"):
        select_groups(np.empty((0, 3)), 1)


def test_search_beats_the_fixed_quantile_on_the_released_model(released_resnet20,
                                                               cifar10_test) -> None:
    """On a layer of the released model at 3 bits, the searched interval has a lower output
    error than the act_quantile interval, and G = 4 groups lower it further."""
    from adderquant.data import TensorLoader
    from adderquant.quant.calibrate import calibrate

    images, labels = cifar10_test
    loader = TensorLoader(images[:64], labels[:64], "cifar10", batch_size=32)
    obs = calibrate(released_resnet20, loader, lambda: ActivationObserver(keep_images=32),
                    progress=False)["layer2.1.conv1"]
    layer = released_resnet20.layer2[1].conv1
    sample = LayerSample.from_inputs(obs.kept_inputs, layer.adder, 1, 1, 1, 1024)
    candidates = candidate_intervals(obs.min, obs.max, 16, 2**-0.25)
    errors, _ = channel_errors(sample, candidates, 3)
    fixed, _ = channel_errors(sample, np.array([[0.0, obs.batch_quantile_max]]), 3)
    one, _ = select_groups(errors, 1)
    four, labels = select_groups(errors, 4)
    assert _cost(errors, one) < 0.8 * fixed.sum()
    assert _cost(errors, four) <= _cost(errors, one)


def test_code_distances_match_the_l1_definition():
    """The integer kernel's distances between code rows equal ``Σ|x − w|`` in float64, for
    codes over the whole byte range and row lengths that are no multiple of 8."""
    g = torch.Generator().manual_seed(3)
    for p, c, k in [(1, 1, 1), (37, 5, 13), (300, 16, 144)]:
        qx = torch.randint(0, 256, (p, k), generator=g).float()
        qw = torch.randint(0, 256, (c, k), generator=g).float()
        qx[0], qw[0] = 255.0, 0.0
        want = (qx.double()[:, None, :] - qw.double()[None]).abs().sum(-1)
        got = code_distances(qx, qw)
        assert got.dtype == torch.int32 and got.shape == (p, c)
        assert torch.equal(got.double(), want)
