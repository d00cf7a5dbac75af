"""The integer engine against the fake-quant model evaluated in float64, on real CIFAR-10."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from adderquant.cli import main
from adderquant.data import TensorLoader, load_dataset
from adderquant.engine import IntegerEngine, export_model, load, lower
from adderquant.models import create_model, load_pretrained
from adderquant.ops.requant import (
    codes_from_float,
    codes_from_stream,
    codes_from_sums,
    fixed_point,
    requant_fixed,
)
from adderquant.ops.sad import ConvGeometry, pack
from adderquant.quant import (
    CodeRange,
    QuantAdder2d,
    adder_layers,
    calibrate,
    group_filters,
    replace_module,
)
from adderquant.quant.io import save_quantized


def input_thresholds(model: torch.nn.Module, calib: torch.Tensor) -> dict[str, float]:
    """A per adder layer: the 0.9997 quantile of its input on ``calib`` (at least 1e-3, so that
    a layer of a random model whose inputs are all zero still gets a grid)."""
    observers = calibrate(model.eval(), [(calib, None)], progress=False)
    return {name: max(obs.batch_quantile_max, 1e-3) for name, obs in observers.items()}


def quantize_resnet(
    model: torch.nn.Module, thresholds: dict[str, float], bits: int, groups: int = 4,
    weight_ratio: int = 1, zero_point: int = 0,
) -> torch.nn.Module:
    """A fake-quant copy of ``model``: every adder layer on ``groups`` grids whose range is
    ``min(max|W_g|, A)``, weights clamped losslessly into the grid and rounded (same grid:
    r = 1; paper: signed, r = 2)."""
    model = copy.deepcopy(model).eval()
    codes = CodeRange(bits, weight_ratio)
    for name, layer in adder_layers(model).items():
        a = torch.tensor(thresholds[name])
        w = layer.adder.detach()
        group = group_filters(w, groups)
        top = torch.stack([torch.minimum(w[group == g].abs().max(), a) for g in range(groups)])
        z = torch.full((groups,), zero_point, dtype=torch.int32)
        if weight_ratio == 1:
            step = top / (codes.act_max - zero_point)
            lo, hi = -zero_point * step, top
        else:
            step, lo, hi = top / codes.act_max, -top, top
        replace_module(model, name, QuantAdder2d.from_float(layer, group, step, z, codes, lo, hi))
    return model.eval()


@pytest.fixture(scope="module")
def pretrained(released_checkpoint: Path) -> torch.nn.Module:
    return load_pretrained(create_model("resnet20"), released_checkpoint).eval()


@pytest.fixture(scope="module")
def cifar(shared_data_root: Path) -> dict[str, torch.Tensor]:
    train_x, train_y = load_dataset("cifar10", shared_data_root, train=True)
    test_x, test_y = load_dataset("cifar10", shared_data_root, train=False)
    calib, _ = next(iter(TensorLoader(train_x[:128], train_y[:128], "cifar10", 128)))
    test, labels = next(iter(TensorLoader(test_x[:32], test_y[:32], "cifar10", 32)))
    return {"calib": calib, "test": test, "labels": labels}


@pytest.fixture(scope="module")
def thresholds(pretrained, cifar) -> dict[str, float]:
    return input_thresholds(pretrained, cifar["calib"])


GEOMETRIES = [ConvGeometry((1, 1), (1, 1), (0, 0)), ConvGeometry((1, 1), (2, 2), (0, 0)),
              ConvGeometry((3, 3), (2, 2), (1, 1)), ConvGeometry((3, 3), (1, 1), (1, 1))]


def packed_reference(codes: np.ndarray, zero: torch.Tensor, geometry: ConvGeometry):
    """Reference codes (G, N, C, H, W) packed grid by grid with the sad kernel's packer."""
    return torch.stack([pack(torch.from_numpy(codes[g]), geometry, int(zero[g]))
                        for g in range(len(codes))])


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_codes_from_sums_is_exact_integer_arithmetic(geometry):
    rng = np.random.default_rng(0)
    c, g, input_bits = 11, 3, 21
    m = rng.normal(0, 1, (g, c)) * 10.0 ** rng.integers(-6, 3, (g, c))
    o = rng.normal(0, 50, (g, c))
    mult, off, shift = fixed_point(m, o, input_bits)
    assert np.abs(mult).max() < 2 ** (62 - input_bits) and shift.min() >= 0
    values = torch.from_numpy(rng.integers(-2**20, 2**20, (2, c, 5, 7)).astype(np.int32))
    zero = torch.tensor([0, 3, 7], dtype=torch.int32)
    got = codes_from_sums(values, torch.from_numpy(mult), torch.from_numpy(off),
                          torch.from_numpy(shift), zero, 4, True, geometry)
    s = values.numpy().astype(object)  # Python integers: no overflow in the reference
    want = np.zeros((g, *values.shape), np.uint8)
    for gi in range(g):
        for ci in range(c):
            k = int(shift[gi, ci])
            u = (int(mult[gi, ci]) * s[:, ci] + int(off[gi, ci]) + (1 << k >> 1)) >> k
            want[gi, :, ci] = np.clip(np.maximum(u, 0) + int(zero[gi]), 0, 15)
            exact = m[gi, ci] * s[:, ci].astype(np.float64) + o[gi, ci]
            assert np.abs(u.astype(np.float64) - exact).max() <= 0.5 + 1e-6
    assert torch.equal(got, packed_reference(want, zero, geometry))


def test_requant_fixed_adds_the_residual_exactly():
    rng = np.random.default_rng(2)
    c, input_bits = 6, 21
    mult, off, shift = (torch.from_numpy(a) for a in fixed_point(
        rng.normal(0, 1e6, c), rng.normal(0, 1e9, c), input_bits))
    values = torch.from_numpy(rng.integers(-2**20, 2**20, (2, c, 5, 7)).astype(np.int32))
    res = torch.from_numpy(rng.integers(-2**40, 2**40, (2, c, 5, 7)))
    fixed = requant_fixed(values, mult, off, shift, res, relu=True)
    s = values.numpy().astype(object)
    for ci in range(c):
        k = int(shift[ci])
        u = (int(mult[ci]) * s[:, ci] + int(off[ci]) + (1 << k >> 1)) >> k
        want = np.maximum(u + res[:, ci].numpy().astype(object), 0)
        np.testing.assert_array_equal(fixed[:, ci].numpy().astype(object), want)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_codes_from_stream_divide_exactly(geometry):
    rng = np.random.default_rng(1)
    divisor = torch.tensor([3, 2**20 + 7, 12345678901], dtype=torch.int64)
    zero = torch.tensor([0, 5, 2], dtype=torch.int32)
    x = torch.from_numpy(rng.integers(-2**45, 2**45, (2, 9, 4, 9)))
    x[0, 0, 0, :4] = torch.tensor([1, -1, 4, -5])  # near and at halves of the first grid
    got = codes_from_stream(x, divisor, zero, 8, geometry)
    want = np.zeros((3, *x.shape), np.uint8)
    for g in range(3):
        d = int(divisor[g])
        q = (2 * x.numpy().astype(object) + d) // (2 * d)  # floor division of Python ints
        want[g] = np.clip(q + int(zero[g]), 0, 255)
    assert torch.equal(got, packed_reference(want, zero, geometry))


def _fixed_reference(s: np.ndarray, mult: int, off: int, k: int) -> np.ndarray:
    """``(M·s + O + 2^(k−1)) >> k`` in Python integers (no overflow, floor shift)."""
    return (mult * s.astype(object) + off + (1 << k >> 1)) >> k


@pytest.mark.parametrize("relu", [False, True])
def test_integer_producers_on_long_rows(relu):
    """Rows long enough for the vector paths (and a tail): codes of sums across the whole code
    range, stream values at and around every half, and values beyond 2^51 that the vector
    path hands to the exact baseline; the stream requantization with and without a residual."""
    rng = np.random.default_rng(7)
    geometry = ConvGeometry((3, 3), (1, 1), (1, 1))
    c, g, input_bits, shape = 5, 2, 21, (2, 5, 3, 37)
    # codes of sums: m spreads the sums over about twice the code range, both signs
    m = rng.uniform(-1, 1, (g, c)) * 31 / 2**20
    o = rng.normal(0, 8, (g, c))
    mult, off, shift = fixed_point(m, o, input_bits)
    values = rng.integers(-2**20, 2**20, shape).astype(np.int32)
    values[0, 0, 0, :4] = [2**21 - 1, -(2**21 - 1), 0, -1]
    zero = torch.tensor([0, 9], dtype=torch.int32)
    got = codes_from_sums(torch.from_numpy(values), *(torch.from_numpy(a) for a in
                          (mult, off, shift)), zero, 5, relu, geometry)
    want = np.zeros((g, *shape), np.uint8)
    for gi in range(g):
        for ci in range(c):
            u = _fixed_reference(values[:, ci], int(mult[gi, ci]), int(off[gi, ci]),
                                 int(shift[gi, ci]))
            u = np.maximum(u, 0) if relu else u
            want[gi, :, ci] = np.clip(u + int(zero[gi]), 0, 31)
    inside = (want > 0) & (want < 31)
    assert 0.2 < inside.mean() and (want == 0).any() and (want == 31).any()
    assert torch.equal(got, packed_reference(want, zero, geometry))

    # stream requantization, residual or not
    mult1, off1, shift1 = fixed_point(rng.normal(0, 1e6, c), rng.normal(0, 1e9, c), input_bits)
    res = rng.integers(-2**40, 2**40, shape)
    for residual in (None, torch.from_numpy(res)):
        fixed = requant_fixed(torch.from_numpy(values), *(torch.from_numpy(a) for a in
                              (mult1, off1, shift1)), residual, relu=relu).numpy()
        for ci in range(c):
            u = _fixed_reference(values[:, ci], int(mult1[ci]), int(off1[ci]), int(shift1[ci]))
            if residual is not None:
                u = u + res[:, ci].astype(object)
            u = np.maximum(u, 0) if relu else u
            np.testing.assert_array_equal(fixed[:, ci].astype(object), u)

    # codes of stream values: quotients across the code range, halves, huge values
    divisor = torch.tensor([1, 3, 1_000_003, 2**40 + 5], dtype=torch.int64)
    zero4 = torch.tensor([0, 100, 7, 255], dtype=torch.int32)
    for d, z in zip(divisor.tolist(), zero4.tolist(), strict=True):
        q = rng.integers(-300, 300, shape)
        nudge = rng.choice([0, d // 2, -(d // 2), d // 2 + 1, -(d // 2) - 1, d - 1], shape)
        x = q * d + nudge
        x[1, 1, 1, :8] = [2**51, -(2**51), 2**60, -(2**60), 2**50, -(2**50), 3, -3]
        x[1, 2, 2, 30:] = [2**51 - 1, -(2**51) + 1, 2**52, -(2**52), 5, 6, 7]
        got = codes_from_stream(torch.from_numpy(x), torch.tensor([d]),
                                torch.tensor([z], dtype=torch.int32), 8, geometry)
        exact = (2 * x.astype(object) + d) // (2 * d)
        want = np.clip(exact + z, 0, 255).astype(np.uint8)[None]
        assert torch.equal(got, packed_reference(want, torch.tensor([z]), geometry))


def float_codes_reference(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                          geometry: ConvGeometry) -> torch.Tensor:
    """torch's codes of ``x`` on every grid (division, round half to even, clamp), packed grid
    by grid with the sad kernel's packer."""
    codes = torch.clamp(torch.round(x.unsqueeze(0) / scale.view(-1, 1, 1, 1, 1))
                        + zero.view(-1, 1, 1, 1, 1).float(), 0, (1 << bits) - 1)
    return packed_reference(codes.to(torch.uint8).numpy(), zero, geometry)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_codes_from_float_match_torch_rounding(geometry):
    x = torch.randn(3, 5, 6, 6) * 4
    x[0, 0, 0, :4] = torch.tensor([0.5, 1.5, 2.5, -0.5])  # ties round to even
    scale = torch.tensor([1.0, 0.37, 0.05])
    zero = torch.tensor([0, 2, 9], dtype=torch.int32)
    got = codes_from_float(x, scale, zero, 5, geometry)
    assert torch.equal(got, float_codes_reference(x, scale, zero, 5, geometry))


def test_codes_from_float_long_rows_with_ties_clamps_and_nonfinite_values():
    """Rows of 8-value vectors and a tail: ties, values beyond both clamps, and a NaN or an
    infinity in the vector part or in the tail each make the producer refuse the input."""
    geometry = ConvGeometry((3, 3), (1, 1), (1, 1))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 11, 13, generator=g) * 6
    x[0, 0, 0, :6] = torch.tensor([0.25, 0.75, -0.25, 100.0, -100.0, 1.25])
    scale = torch.tensor([0.5, 0.125])
    zero = torch.tensor([3, 0], dtype=torch.int32)
    got = codes_from_float(x, scale, zero, 6, geometry)
    assert torch.equal(got, float_codes_reference(x, scale, zero, 6, geometry))
    for index, value in [((1, 2, 3, 4), float("nan")), ((0, 1, 10, 12), float("-inf"))]:
        bad = x.clone()
        bad[index] = value
        with pytest.raises(ValueError, match="NaN or infinite"):
            codes_from_float(bad, scale, zero, 6, geometry)


@pytest.mark.parametrize("width", [16, 33, 70])
@pytest.mark.parametrize("geometry", [
    ConvGeometry((3, 3), (2, 2), (1, 1)), ConvGeometry((1, 1), (2, 2), (0, 0)),
    ConvGeometry((2, 2), (2, 2), (0, 0)), ConvGeometry((3, 3), (3, 3), (1, 1)),
    ConvGeometry((3, 3), (1, 2), (2, 1)),
])
def test_codes_from_float_strided_rows(geometry, width):
    """Strided layers split each row into its column phases (vector paths for 16 and 32
    columns, and a tail); the packed codes equal the sad kernel's packer on torch's codes."""
    g = torch.Generator().manual_seed(width)
    x = torch.randn(2, 9, 7, width, generator=g) * 3
    scale = torch.tensor([0.3, 0.11])
    zero = torch.tensor([5, 0], dtype=torch.int32)
    got = codes_from_float(x, scale, zero, 4, geometry)
    assert torch.equal(got, float_codes_reference(x, scale, zero, 4, geometry))


@pytest.mark.parametrize("scale", [0.37, 0.1, 1 / 3, 0.0123, 7.7, 1e-39, 1e38, 2.0**-20])
def test_codes_from_float_next_to_half_steps(scale):
    """Values a few ulps from (k + 1/2)·scale, where a product with the reciprocal of the scale
    may round the other way than the quotient: the codes must still be those of the quotient
    (the reference is torch's division), also for scales whose reciprocal is not normal."""
    geometry = ConvGeometry((1, 1), (1, 1), (0, 0))
    s = torch.tensor([scale], dtype=torch.float32)
    k = torch.arange(-300, 300, dtype=torch.float32)
    centre = ((k + 0.5) * s).view(-1, 1)
    x = torch.nextafter(centre, torch.full_like(centre, math.inf))
    values = [centre, x]
    for _ in range(3):
        values.append(torch.nextafter(values[-1], torch.full_like(centre, math.inf)))
    below = centre
    for _ in range(4):
        below = torch.nextafter(below, torch.full_like(centre, -math.inf))
        values.append(below)
    x = torch.cat(values, dim=1).flatten()
    x = torch.where(torch.isfinite(x), x, 0.0)[: len(x) // 64 * 64].view(4, 1, -1, 16)
    zero = torch.tensor([128], dtype=torch.int32)
    got = codes_from_float(x, s, zero, 8, geometry)
    assert torch.equal(got, float_codes_reference(x, s, zero, 8, geometry))


def fakequant64(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


@pytest.mark.parametrize("bits,ratio,zero", [(8, 1, 0), (4, 1, 0), (4, 2, 0), (6, 1, 3)])
def test_engine_matches_exact_fakequant(pretrained, cifar, thresholds, bits, ratio, zero):
    model = quantize_resnet(pretrained, thresholds, bits, weight_ratio=ratio, zero_point=zero)
    engine = IntegerEngine(lower(model, "resnet20"))
    x = cifar["test"]
    got = engine(x)
    want = fakequant64(model, x)
    assert got.dtype == torch.float32 and got.shape == (len(x), 10)
    assert torch.equal(got.argmax(1), want.argmax(1))
    assert float((got.double() - want).abs().mean()) < 0.02


def test_single_group_and_per_channel_groups(pretrained, cifar, thresholds):
    for groups in (1, 16):
        model = quantize_resnet(pretrained, thresholds, 5, groups=groups)
        x = cifar["test"][:8]
        got = IntegerEngine(lower(model, "resnet20"))(x)
        assert torch.equal(got.argmax(1), fakequant64(model, x).argmax(1))


def test_engine_rejects_wrong_input_shape():
    model = create_model("resnet20")
    model = quantize_resnet(model, input_thresholds(model, torch.rand(2, 3, 32, 32)), 4)
    engine = IntegerEngine(lower(model, "resnet20"))
    with pytest.raises(ValueError, match="shape"):
        engine(torch.rand(2, 3, 28, 28))


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_agreement_on_11000_images(pretrained, bits, tmp_path):
    """Top-1 of the integer engine equals the exact fake-quant model's on >= 99.9 % of the 1,000
    test and 10,000 training images, and the fake-quant model is accurate."""
    train_x, train_y = load_dataset("cifar10", train=True)
    calib, _ = next(iter(TensorLoader(train_x[-2048:], train_y[-2048:], "cifar10", 2048)))
    model = quantize_resnet(pretrained, input_thresholds(pretrained, calib), bits)
    export_model(model, "resnet20", tmp_path / "pkg", "cifar10")
    engine = load(tmp_path / "pkg")
    reference = copy.deepcopy(model).double()
    test_x, test_y = load_dataset("cifar10", train=False)
    for images, labels, min_top1 in [(test_x, test_y, 85.0), (train_x[:10000], train_y[:10000], 0)]:
        agree = correct = 0
        for x, y in TensorLoader(images, labels, "cifar10", batch_size=500):
            pred = engine(x).argmax(1)
            with torch.no_grad():
                ref = reference(x.double()).argmax(1)
            agree += int((pred == ref).sum())
            correct += int((ref == y).sum())
        assert 100.0 * agree / len(images) >= 99.9
        assert 100.0 * correct / len(images) >= min_top1


@pytest.mark.slow
def test_infer_int_is_faster_than_float(pretrained, thresholds, tmp_path, capsys):
    """End to end on the 1,000 test images, one thread each: the integer engine needs less CPU
    time than the float model (CPU time, so that other processes on the machine do not decide
    the outcome)."""
    model = quantize_resnet(pretrained, thresholds, 4)
    save_quantized(tmp_path / "q.pt", model, "resnet20", 10, {})
    assert main(["export", str(tmp_path / "q.pt"), "--out", str(tmp_path / "pkg")]) == 0
    capsys.readouterr()
    results = {}
    for engine in ("int", "float"):
        assert main(["infer", str(tmp_path / "pkg"), "--engine", engine, "--reference", "none",
                     "--threads", "1", "--json"]) == 0
        results[engine] = json.loads(capsys.readouterr().out)
    assert results["int"]["images"] == 1000
    assert results["int"]["cpu_seconds"] < results["float"]["cpu_seconds"]
    assert results["int"]["top1"] > 85.0
