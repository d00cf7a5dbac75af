"""The compiled adder operator against the plain PyTorch definition (float64 reference)."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adderquant.nn import Adder2d
from adderquant.ops import _kernel, adder2d
from adderquant.ops.reference import adder2d_reference, adder2d_reference_grads

RTOL = 1e-4


def _available_paths() -> list[str]:
    """The instruction-set paths this CPU can run."""
    paths = []
    for name in _kernel.SIMD_PATHS:
        try:
            with simd(name):
                paths.append(name)
        except RuntimeError:
            pass
    return paths


@contextmanager
def simd(name: str):
    """Run the block on one instruction-set path of the kernel, then restore the default."""
    _kernel.select_simd(name)
    try:
        yield
    finally:
        _kernel.select_simd("auto")


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Agreement to RTOL relative to each value, with a floor of RTOL x the largest value."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=RTOL, atol=RTOL * max(scale, 1e-12)
    )


@st.composite
def layer_cases(draw):
    """A random adder layer: geometry, sizes, batch 0-8, dtype and a data seed."""
    kernel = draw(st.sampled_from([1, 3, 5]))
    stride = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 2))
    dilation = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 2, 4]))
    span = dilation * (kernel - 1) + 1
    smallest = max(1, span - 2 * padding)
    return {
        "n": draw(st.integers(0, 8)),
        "c_in": groups * draw(st.integers(1, 5)),
        "c_out": groups * draw(st.integers(1, 9)),
        "h": smallest + draw(st.integers(0, 9)),
        "w": smallest + draw(st.integers(0, 9)),
        "kernel": kernel,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _make(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["n"], case["c_in"], case["h"], case["w"], generator=gen,
                    dtype=torch.float64)
    w = torch.randn(case["c_out"], case["c_in"] // case["groups"], case["kernel"], case["kernel"],
                    generator=gen, dtype=torch.float64)
    return x.to(case["dtype"]), w.to(case["dtype"])


def _geometry(case: dict) -> tuple:
    return case["stride"], case["padding"], case["dilation"], case["groups"]


def check_against_reference(case: dict) -> None:
    """Forward, AdderNet gradients and exact gradients of one case against the reference."""
    x, w = _make(case)
    geo = _geometry(case)
    x64, w64 = x.double(), w.double()
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = adder2d(xa, wa, None, *geo, eta=None)
    assert out.dtype == case["dtype"]
    assert_close(out, adder2d_reference(x64, w64, None, *geo))

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(case["seed"] + 1),
                           dtype=torch.float64).to(case["dtype"])
    gx, gw = torch.autograd.grad(out, (xa, wa), grad_out)
    ref_gx, ref_gw = adder2d_reference_grads(x64, w64, grad_out.double(), *geo)
    assert_close(gx, ref_gx)
    assert_close(gw, ref_gw)

    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    true_gx, true_gw = torch.autograd.grad(
        adder2d(xt, wt, None, *geo, true_gradient=True), (xt, wt), grad_out
    )
    xr, wr = x64.clone().requires_grad_(), w64.clone().requires_grad_()
    exact_gx, exact_gw = torch.autograd.grad(
        adder2d_reference(xr, wr, None, *geo), (xr, wr), grad_out.double()
    )
    assert_close(true_gx, exact_gx)
    assert_close(true_gw, exact_gw)


@pytest.mark.parametrize("path", _available_paths())
@settings(max_examples=30, deadline=None)
@given(case=layer_cases())
def test_random_layers_match_reference(path, case):
    with simd(path):
        check_against_reference(case)


@pytest.mark.parametrize("path", _available_paths())
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resnet_sized_layer_matches_reference(path, n, dtype):
    """Several panels and output-channel blocks, one image (threads share it) and several."""
    case = {"n": n, "c_in": 16, "c_out": 24, "h": 19, "w": 17, "kernel": 3, "stride": 1,
            "padding": 1, "dilation": 1, "groups": 1, "dtype": dtype, "seed": n}
    with simd(path):
        check_against_reference(case)


def test_more_threads_than_images():
    """Three threads on two items (one image, two groups): the threads split each item."""
    case = {"n": 1, "c_in": 32, "c_out": 32, "h": 24, "w": 23, "kernel": 3, "stride": 1,
            "padding": 1, "dilation": 1, "groups": 2, "dtype": torch.float64, "seed": 7}
    terms = 32 * 16 * 9 * 24 * 23
    assert terms > 3 * 2**19  # enough work for the kernel to start all three threads
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        check_against_reference(case)
    finally:
        torch.set_num_threads(threads)


def test_gradients_are_reproducible_bit_for_bit():
    """Per-thread weight-gradient sums are combined in thread order, not in finishing order."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(12, 16, 16, 16, generator=gen)
    w = torch.randn(32, 16, 3, 3, generator=gen, requires_grad=True)
    grad_out = torch.randn(12, 32, 16, 16, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        first, second = (
            torch.autograd.grad(adder2d(x, w, None, 1, 1, eta=None), (w,), grad_out)[0]
            for _ in range(2)
        )
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, second)


def test_simd_path_is_reported_and_selectable():
    assert _kernel.simd_path() in _kernel.SIMD_PATHS
    with simd("portable"):
        assert _kernel.simd_path() == "portable"
    with pytest.raises(ValueError, match="unknown SIMD path"):
        _kernel.select_simd("sse9")


def test_missing_build_says_how_to_build():
    with pytest.raises(ImportError, match="make install"):
        _kernel.load_library("adderquant.ops._no_such_kernel")


def test_eta_rescales_weight_gradient_norm():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 9, 9, generator=gen)
    w = torch.randn(8, 6, 3, 3, generator=gen, requires_grad=True)
    grad_out = torch.randn(4, 8, 9, 9, generator=gen)
    eta = 0.37
    (gw,) = torch.autograd.grad(adder2d(x, w, None, 1, 1, eta=eta), (w,), grad_out)
    _, raw = adder2d_reference_grads(x.double(), w.detach().double(), grad_out.double(), 1, 1)
    expected = raw * (eta * math.sqrt(w.numel()) / raw.norm())
    assert gw.norm().item() == pytest.approx(eta * math.sqrt(w.numel()), rel=1e-5)
    assert_close(gw, expected)


def test_eta_with_zero_gradient_stays_zero():
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    out = adder2d(torch.randn(2, 3, 6, 6), w, None, 1, 1)
    (gw,) = torch.autograd.grad(out, (w,), torch.zeros_like(out))
    assert torch.equal(gw, torch.zeros_like(w))


def test_bias_is_added_and_differentiated():
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 3, 7, 7, generator=gen), torch.randn(5, 3, 3, 3, generator=gen)
    bias = torch.randn(5, generator=gen, requires_grad=True)
    out = adder2d(x, w, bias, 2, 1)
    assert_close(out, adder2d_reference(x.double(), w.double(), bias.double(), 2, 1))
    (gb,) = torch.autograd.grad(out.sum(), (bias,))
    assert torch.equal(gb, torch.full((5,), float(out[:, 0].numel())))


@pytest.mark.parametrize(
    "geometry",
    [(1, 0, 1, 1), (2, 1, 1, 1), (1, 2, 2, 2), (2, 2, 1, 3)],
    ids=["plain", "stride2", "dilation2-groups2", "stride2-groups3"],
)
def test_true_gradient_passes_gradcheck(geometry):
    stride, padding, dilation, groups = geometry
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 2 * groups, 7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2 * groups, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: adder2d(a, b, None, stride, padding, dilation, groups, true_gradient=True),
        (x, w),
    )


def test_empty_batch():
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    x = torch.randn(0, 4, 8, 8, requires_grad=True)
    out = adder2d(x, w, None, 2, 1)
    assert out.shape == (0, 6, 4, 4)
    gx, gw = torch.autograd.grad(out.sum(), (x, w))
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w))


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 9, 8, 5, generator=gen).transpose(2, 3)  # 3 x 5 x 9 x 8, strided
    x = x.contiguous(memory_format=torch.channels_last)[:, 1:4]
    w = torch.randn(3, 7, 3, 4, generator=gen).permute(0, 3, 1, 2)  # 3 x 4 x 7 x 3 view
    w = w[:, 1:4, :3]
    assert not x.is_contiguous() and not w.is_contiguous()
    expected = adder2d_reference(x.double(), w.double().contiguous(), None, 1, 1)
    assert_close(adder2d(x, w, None, 1, 1), expected)


def test_module_uses_compiled_gradients():
    """Adder2d (eta=None) gives AdderNet's gradients: x - w for weights, HardTanh for inputs."""
    layer = Adder2d(4, 6, 3, stride=1, padding=1, eta=None)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    out = layer(x)
    grad_out = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, layer.adder), grad_out)
    ref_gx, ref_gw = adder2d_reference_grads(
        x.detach().double(), layer.adder.detach().double(), grad_out.double(), 1, 1
    )
    assert_close(gx, ref_gx)
    assert_close(gw, ref_gw)


@pytest.mark.parametrize(
    "x_shape, w_shape, kwargs, error, message",
    [
        ((4, 8, 8), (2, 4, 3, 3), {}, ValueError, "x must be 4-D"),
        ((1, 4, 8, 8), (2, 4, 3), {}, ValueError, "weight must be 4-D"),
        ((1, 4, 8, 8), (2, 3, 3, 3), {}, ValueError, "weight expects 3 input channels"),
        ((1, 4, 8, 8), (3, 2, 3, 3), {"groups": 2}, ValueError, "groups=2 must divide"),
        ((1, 4, 8, 8), (2, 4, 3, 3), {"stride": 0}, ValueError, "stride"),
        ((1, 4, 8, 8), (2, 4, 3, 3), {"padding": -1}, ValueError, "padding"),
        ((1, 4, 2, 2), (2, 4, 3, 3), {}, ValueError, "does not fit"),
    ],
)
def test_bad_shapes_raise_clear_errors(x_shape, w_shape, kwargs, error, message):
    with pytest.raises(error, match=message):
        adder2d(torch.randn(x_shape), torch.randn(w_shape), **kwargs)


def test_bad_dtypes_and_bias_raise_clear_errors():
    x, w = torch.randn(1, 4, 8, 8), torch.randn(2, 4, 3, 3)
    with pytest.raises(TypeError, match="float32 or float64"):
        adder2d(x.double(), w)
    with pytest.raises(TypeError, match="float32 or float64"):
        adder2d(x.half(), w.half())
    with pytest.raises(TypeError, match="float32 or float64"):
        adder2d(x.int(), w.int())
    with pytest.raises(TypeError, match="must be torch.Tensor"):
        adder2d(x.numpy(), w)
    with pytest.raises(ValueError, match="bias must have shape"):
        adder2d(x, w, torch.zeros(3))
    with pytest.raises(ValueError, match="runs on the CPU"):
        adder2d(x.to("meta"), w.to("meta"))
