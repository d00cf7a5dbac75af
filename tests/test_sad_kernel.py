"""The SAD kernel equals a numpy int64 reference exactly, on every path this CPU has."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adderquant.ops.requant import sums_to_float
from adderquant.ops.sad import (
    PATHS,
    ConvGeometry,
    active_path,
    available_paths,
    pack,
    packed_bytes,
    sad_conv2d,
    sad_conv2d_packed,
    sad_conv2d_packed_grids,
)


def sad_reference(x: np.ndarray, w: np.ndarray, stride: int, padding: int, pad_code: int):
    """``Σ |x − w|`` by explicit padding and a loop over the kernel taps, in int64."""
    x, w = x.astype(np.int64), w.astype(np.int64)
    n, c, h, wd = x.shape
    t, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)),
                constant_values=pad_code)
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (wd + 2 * padding - kw) // stride + 1
    out = np.zeros((n, t, ho, wo), np.int64)
    for u in range(kh):
        for v in range(kw):
            patch = xp[:, :, u:u + stride * (ho - 1) + 1:stride, v:v + stride * (wo - 1) + 1:stride]
            out += np.abs(patch[:, None] - w[None, :, :, u, v, None, None]).sum(axis=2)
    return out


def codes(rng: np.random.Generator, shape: tuple[int, ...], pattern: str) -> torch.Tensor:
    if pattern == "zeros":
        a = np.zeros(shape, np.uint8)
    elif pattern == "max":
        a = np.full(shape, 255, np.uint8)
    elif pattern == "extremes":
        a = rng.choice(np.array([0, 255], np.uint8), size=shape)
    else:
        a = rng.integers(0, 256, size=shape, dtype=np.uint8)
    return torch.from_numpy(a)


path_param = pytest.mark.parametrize(
    "path", [pytest.param(p, marks=pytest.mark.skipif(
        p not in available_paths(), reason=f"CPU lacks the {p} path")) for p in PATHS])
patterns = st.sampled_from(["random", "zeros", "max", "extremes"])


@path_param
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3), c=st.integers(1, 20), t=st.integers(1, 9),
    h=st.integers(1, 12), w=st.integers(1, 12), k=st.sampled_from([1, 2, 3, 5]),
    stride=st.integers(1, 3), padding=st.integers(0, 2), pad_code=st.integers(0, 255),
    x_pattern=patterns, w_pattern=patterns, threads=st.integers(1, 3), seed=st.integers(0, 2**16),
)
def test_matches_reference(path, n, c, t, h, w, k, stride, padding, pad_code, x_pattern,
                           w_pattern, threads, seed):
    if h + 2 * padding < k or w + 2 * padding < k:
        padding = k  # make the kernel fit; the geometry stays drawn otherwise
    rng = np.random.default_rng(seed)
    x = codes(rng, (n, c, h, w), x_pattern)
    wt = codes(rng, (t, c, k, k), w_pattern)
    got = sad_conv2d(x, wt, stride, padding, pad_code, path=path, threads=threads)
    want = sad_reference(x.numpy(), wt.numpy(), stride, padding, pad_code)
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy(), want)


@path_param
@pytest.mark.parametrize("c,k,stride", [(16, 3, 1), (32, 3, 2), (64, 3, 1), (16, 1, 2)])
def test_resnet_shapes_with_extreme_codes(path, c, k, stride):
    """Largest sums of the ResNet-20 layers (all 255 against all 0) and random codes."""
    rng = np.random.default_rng(c + k)
    for xp, wp in [("max", "zeros"), ("zeros", "max"), ("random", "random")]:
        x = codes(rng, (4, c, 16, 16), xp)
        wt = codes(rng, (2 * c, c, k, k), wp)
        got = sad_conv2d(x, wt, stride, k // 2, 0, path=path)
        np.testing.assert_array_equal(got.numpy(), sad_reference(x.numpy(), wt.numpy(), stride,
                                                                 k // 2, 0))
    assert int(sad_conv2d(codes(rng, (1, c, 8, 8), "max"), codes(rng, (1, c, k, k), "zeros"),
                          1, 0).max()) == 255 * c * k * k


@path_param
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3), c=st.integers(1, 20), h=st.integers(1, 10), w=st.integers(1, 10),
    k=st.sampled_from([1, 3]), stride=st.integers(1, 2), padding=st.integers(0, 1),
    pad_code=st.integers(0, 255), threads=st.integers(1, 3), seed=st.integers(0, 2**16),
)
def test_packed_input_matches_reference(path, n, c, h, w, k, stride, padding, pad_code, threads,
                                        seed):
    if h + 2 * padding < k or w + 2 * padding < k:
        padding = k
    rng = np.random.default_rng(seed)
    x = codes(rng, (n, c, h, w), "random")
    wt = codes(rng, (4, c, k, k), "random")
    geometry = ConvGeometry((k, k), (stride, stride), (padding, padding))
    packed = pack(x, geometry, pad_code, threads=threads)
    assert packed.shape == (n, packed_bytes(c, h, w, geometry))
    got = sad_conv2d_packed(packed, (c, h, w), wt, geometry, pad_code, path=path,
                            threads=threads)
    np.testing.assert_array_equal(got.numpy(), sad_reference(x.numpy(), wt.numpy(), stride,
                                                             padding, pad_code))


@path_param
def test_out_index_scatters_filters(path):
    rng = np.random.default_rng(1)
    x = codes(rng, (2, 8, 6, 6), "random")
    wt = codes(rng, (3, 8, 3, 3), "random")
    out = torch.full((2, 5, 6, 6), -7, dtype=torch.int32)
    index = torch.tensor([4, 0, 2])
    sad_conv2d(x, wt, 1, 1, 3, out=out, out_index=index, path=path)
    want = sad_reference(x.numpy(), wt.numpy(), 1, 1, 3)
    np.testing.assert_array_equal(out[:, index].numpy(), want)
    assert (out[:, [1, 3]] == -7).all()


def test_grids_in_one_call_match_the_reference_per_grid():
    """Three grids (one without filters), each with its own codes and padding code, their
    filters scattered over the output channels; a filter count that does not add up is
    refused."""
    rng = np.random.default_rng(4)
    geometry = ConvGeometry((3, 3), (2, 2), (1, 1))
    pads, filters = [0, 9, 200], [3, 0, 4]
    x = [codes(rng, (3, 11, 9, 13), "random") for _ in pads]
    wt = codes(rng, (sum(filters), 11, 3, 3), "random")
    index = torch.tensor([5, 0, 6, 2, 1, 4, 3], dtype=torch.int32)
    packed = torch.stack([pack(xg, geometry, p) for xg, p in zip(x, pads, strict=True)])
    out = torch.empty(3, 7, 5, 7, dtype=torch.int32)
    sad_conv2d_packed_grids(packed, (11, 9, 13), wt, torch.tensor(filters), geometry,
                            torch.tensor(pads, dtype=torch.int32), out, index, threads=2)
    first = 0
    for xg, p, f in zip(x, pads, filters, strict=True):
        want = sad_reference(xg.numpy(), wt[first:first + f].numpy(), 2, 1, p)
        np.testing.assert_array_equal(out[:, index[first:first + f].long()].numpy(), want)
        first += f
    with pytest.raises(ValueError, match="summing"):
        sad_conv2d_packed_grids(packed, (11, 9, 13), wt, torch.tensor([3, 0, 3]), geometry,
                                torch.tensor(pads, dtype=torch.int32), out, index)


def test_active_path_is_the_widest_available():
    assert active_path() == available_paths()[-1]
    assert available_paths()[0] == "portable"


def test_bad_inputs_give_clear_errors():
    x = torch.zeros(1, 4, 5, 5, dtype=torch.uint8)
    w = torch.zeros(2, 4, 3, 3, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8"):
        sad_conv2d(x.float(), w)
    with pytest.raises(ValueError, match="channels"):
        sad_conv2d(x, torch.zeros(2, 3, 3, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="pad_code"):
        sad_conv2d(x, w, pad_code=256)
    with pytest.raises(ValueError, match="does not fit"):
        sad_conv2d(x, torch.zeros(2, 4, 7, 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown path"):
        sad_conv2d(x, w, path="neon")
    with pytest.raises(ValueError, match="out_index"):
        sad_conv2d(x, w, out=torch.zeros(1, 3, 3, 3, dtype=torch.int32),
                   out_index=torch.tensor([0, 3]))


def test_sums_to_float_matches_pytorch_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(3)
    sums = torch.randint(0, 150_000, (3, 5, 7, 9), dtype=torch.int32, generator=g)
    excess = torch.randint(0, 2_000, (5,), dtype=torch.int32, generator=g)
    step = -torch.rand(5, generator=g) * 0.1
    bias = torch.randn(5, generator=g)
    expected = ((sums + excess.view(1, -1, 1, 1)).float() * step.view(1, -1, 1, 1)
                + bias.view(1, -1, 1, 1))
    assert torch.equal(sums_to_float(sums, excess, step, bias), expected)
    with pytest.raises(ValueError, match="shape"):
        sums_to_float(sums, excess[:4], step, bias)
