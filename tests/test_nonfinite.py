"""Non-finite numbers (NaN, inf, overflow): the adder ops against the float64 definition, and
the loaders and the integer engine refusing them at the door."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch

from adderquant.cli import main
from adderquant.engine import IntegerEngine, lower
from adderquant.models import CheckpointError, create_model, load_pretrained
from adderquant.ops import _kernel, adder2d
from adderquant.ops.reference import adder2d_reference, adder2d_reference_grads
from adderquant.quant import CodeRange, QuantAdder2d, adder_layers, replace_module
from adderquant.quant.io import load_quantized, save_quantized

SIMD_PATHS = [p for p in _kernel.SIMD_PATHS if p != "avx512" or _kernel.simd_path() == "avx512"]


@contextmanager
def simd(name: str):
    """Run the block on one instruction-set path of the kernel (skip it if this CPU lacks it)."""
    try:
        _kernel.select_simd(name)
    except RuntimeError:
        pytest.skip(f"this CPU has no {name} path")
    try:
        yield
    finally:
        _kernel.select_simd("auto")


@contextmanager
def threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_same_numbers(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """NaN where ``expected`` (the float64 definition) is NaN, the same infinities, and the
    finite values close once ``expected`` is rounded to ``actual``'s dtype."""
    expected = expected.to(actual.dtype)
    assert actual.shape == expected.shape
    assert torch.equal(actual.isnan(), expected.isnan()), "NaN positions differ"
    assert torch.equal(actual.isposinf(), expected.isposinf()), "+inf positions differ"
    assert torch.equal(actual.isneginf(), expected.isneginf()), "-inf positions differ"
    finite = expected.isfinite()
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-4, atol=1e-4)


def sprinkle(t: torch.Tensor, gen: torch.Generator, fraction: float = 0.03) -> torch.Tensor:
    """``t`` with a ``fraction`` of its entries replaced by NaN, +inf, -inf or +-0.9 x the
    largest float32 (sums of two of those overflow in float32; float64 sums whose partial sums
    overflow depend on the order of summation, so no definition to compare with)."""
    big = 0.9 * torch.finfo(torch.float32).max
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), big, -big],
                            dtype=t.dtype)
    hit = torch.rand(t.shape, generator=gen) < fraction
    pick = torch.randint(len(specials), t.shape, generator=gen)
    return torch.where(hit, specials[pick], t)


def exact_reference_grads(x, w, grad_out, **geo):
    """The exact (sign) gradients: autograd through the float64 definition."""
    xr = x.double().requires_grad_()
    wr = w.double().requires_grad_()
    return torch.autograd.grad(adder2d_reference(xr, wr, **geo), (xr, wr), grad_out.double())


def check_layer(x, w, grad_out, **geo) -> None:
    """Forward, AdderNet's gradients and the exact gradients against the float64 definition."""
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = adder2d(xa, wa, eta=None, **geo)
    assert_same_numbers(out, adder2d_reference(x.double(), w.double(), **geo))

    gx, gw = torch.autograd.grad(out, (xa, wa), grad_out)
    ref_gx, ref_gw = adder2d_reference_grads(x.double(), w.double(), grad_out.double(), **geo)
    assert_same_numbers(gx, ref_gx)
    assert_same_numbers(gw, ref_gw)

    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    true_gx, true_gw = torch.autograd.grad(
        adder2d(xt, wt, true_gradient=True, **geo), (xt, wt), grad_out
    )
    exact_gx, exact_gw = exact_reference_grads(x, w, grad_out, **geo)
    assert_same_numbers(true_gx, exact_gx)
    assert_same_numbers(true_gw, exact_gw)


# ---- case 10: the forward pass gives the definition's infinities, not NaN -------------------


@pytest.mark.parametrize("path", SIMD_PATHS)
def test_case10_opposite_extremes_give_minus_inf(path):
    with simd(path):
        out = adder2d(torch.full((1, 1, 1, 4), 3e38), torch.full((1, 1, 1, 4), -3e38))
    assert out.item() == -float("inf")


@pytest.mark.parametrize("path", SIMD_PATHS)
def test_case10_equal_extremes_give_zero(path):
    """The definition is finite (|x - w| = 0) although every partial sum of the fast identity
    sum x + sum w - 2 sum min(x, w) overflows."""
    with simd(path):
        out = adder2d(torch.full((1, 2, 3, 3), 3e38), torch.full((1, 2, 3, 3), 3e38))
    assert out.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_case10_overflow_at_extreme_scale_matches_definition(dtype):
    gen = torch.Generator().manual_seed(10)
    scale = torch.finfo(dtype).max / 40  # windows of 36 terms: about 40 % of the sums overflow
    x = (torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64) * scale).to(dtype)
    w = (torch.randn(8, 4, 3, 3, generator=gen, dtype=torch.float64) * scale).to(dtype)
    out = adder2d(x, w, padding=1)
    expected = adder2d_reference(x.double(), w.double(), padding=1)
    assert expected.to(dtype).isinf().any() and expected.to(dtype).isfinite().any()
    assert_same_numbers(out, expected)


# ---- cases 10 and 11: NaN, inf and overflow anywhere, forward and both gradients ------------


@pytest.mark.parametrize("path", SIMD_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "geo", [{"padding": 1}, {"stride": 2, "padding": 2, "dilation": 2, "groups": 2}]
)
def test_case10_case11_nonfinite_inputs_match_definition(path, dtype, geo):
    gen = torch.Generator().manual_seed(11)
    x = sprinkle(torch.randn(3, 4, 9, 8, generator=gen, dtype=dtype), gen)
    w = sprinkle(torch.randn(6, 4 // geo.get("groups", 1), 3, 3, generator=gen, dtype=dtype),
                 gen)
    with simd(path):
        out_shape = adder2d(x, w, **geo).shape
        grad_out = sprinkle(torch.randn(out_shape, generator=gen, dtype=dtype), gen, 0.01)
        check_layer(x, w, grad_out, **geo)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_case10_case11_threads_sharing_one_image_match_definition(dtype):
    """One image, three threads: the threads split the image's panels and channels."""
    gen = torch.Generator().manual_seed(12)
    x = sprinkle(torch.randn(1, 16, 32, 32, generator=gen, dtype=dtype), gen, 0.002)
    w = sprinkle(torch.randn(16, 16, 3, 3, generator=gen, dtype=dtype), gen, 0.002)
    assert 16 * 16 * 9 * 32 * 32 > 3 * 2**19  # enough work for the kernel to start 3 threads
    grad_out = torch.randn(1, 16, 32, 32, generator=gen, dtype=dtype)
    with threads(3):
        check_layer(x, w, grad_out, padding=1)


# ---- case 11: a NaN pixel has a NaN gradient -------------------------------------------------


@pytest.mark.parametrize("path", SIMD_PATHS)
def test_case11_nan_pixel_has_nan_gradient(path):
    """AdderNet's input gradient clamp(w - x, -1, 1) g is NaN at a NaN pixel (torch.clamp keeps
    NaN); so is the weight gradient sum (x - w) g of every weight that meets the pixel."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 6, 6, generator=gen)
    x[0, 0, 2, 3] = float("nan")
    w = torch.randn(4, 2, 3, 3, generator=gen)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    with simd(path):
        adder2d(xa, wa, padding=1, eta=None).sum().backward()
    assert xa.grad[0, 0, 2, 3].isnan()
    assert xa.grad.isnan().sum() == 1  # no other pixel's gradient reads that pixel
    assert wa.grad[:, 0].isnan().all()  # with padding 1 every weight of channel 0 meets it
    assert wa.grad[:, 1].isfinite().all()


@pytest.mark.parametrize("path", SIMD_PATHS)
def test_case11_exact_gradients_at_nan_pixel_follow_autograd_of_definition(path):
    """``true_gradient`` gives autograd's gradients of -sum |x - w|, whose sign(NaN) is 0."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2, 5, 5, generator=gen, dtype=torch.float64)
    x[1, 1, 0, 4] = float("nan")
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    with simd(path):
        gx, gw = torch.autograd.grad(adder2d(xa, wa, padding=1, true_gradient=True), (xa, wa),
                                     grad_out)
    exact_gx, exact_gw = exact_reference_grads(x, w, grad_out, padding=1)
    assert_same_numbers(gx, exact_gx)
    assert_same_numbers(gw, exact_gw)


# ---- stride, padding and dilation of the wrong type ------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"stride": 1.5}, TypeError, "stride must be an integer or a pair of integers"),
        ({"stride": (1, 1, 1)}, ValueError, "stride takes one integer or two"),
        ({"padding": "1"}, TypeError, "padding must be an integer"),
        ({"dilation": (1, 2.0)}, TypeError, "dilation must be an integer"),
        ({"padding": True}, TypeError, "padding must be an integer"),
    ],
)
def test_geometry_of_wrong_type_or_length_raises_clear_error(kwargs, error, message):
    with pytest.raises(error, match=message):
        adder2d(torch.randn(1, 1, 5, 5), torch.randn(2, 1, 3, 3), **kwargs)


def test_geometry_accepts_integer_like_values():
    x, w = torch.randn(1, 1, 6, 6), torch.randn(2, 1, 3, 3)
    expected = adder2d_reference(x, w, stride=(1, 2), padding=1)
    torch.testing.assert_close(adder2d(x, w, stride=[1, torch.tensor(2)], padding=1), expected)


# ---- case 3: checkpoints and quantized models with NaN/inf are refused, naming the tensor ----


def _poisoned_resnet20(name: str, value: float) -> torch.nn.Module:
    """A random ResNet-20 whose tensor ``name`` holds ``value`` in one entry."""
    model = create_model("resnet20")
    with torch.no_grad():
        model.state_dict()[name].view(-1)[1] = value
    return model


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("layer2.1.conv1.adder", float("nan")),
        ("layer1.0.bn2.running_mean", float("nan")),
        ("bn1.running_var", float("inf")),
        ("layer3.2.bn1.running_var", -0.5),
    ],
)
def test_case03_checkpoint_with_bad_numbers_is_refused(tmp_path, name, value):
    path = tmp_path / "bad.pth"
    torch.save(_poisoned_resnet20(name, value).state_dict(), path)
    with pytest.raises(CheckpointError, match=rf"{name} \(1 "):
        load_pretrained(create_model("resnet20"), path)


def test_case03_eval_of_nan_checkpoint_exits_2_naming_the_tensor(tmp_path, capsys):
    path = tmp_path / "nan.pth"
    torch.save({"state_dict": _poisoned_resnet20("layer1.1.bn1.running_var", float("nan"))
                .state_dict()}, path)
    assert main(["eval", "--model", "resnet20", "--checkpoint", str(path), "--limit", "8",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "layer1.1.bn1.running_var (1 of 16 values NaN/inf)" in err
    assert "Traceback" not in err


def test_case03_finite_checkpoint_still_loads(tmp_path):
    model = create_model("resnet20")
    torch.save(model.state_dict(), tmp_path / "ok.pth")
    loaded = load_pretrained(create_model("resnet20"), tmp_path / "ok.pth")
    assert torch.equal(loaded.fc.weight, model.fc.weight)


@pytest.fixture(scope="module")
def quantized_resnet20() -> torch.nn.Module:
    """A random ResNet-20 with every adder layer quantized to 4 bits on two grids (shared: copy
    it before changing it)."""
    model = create_model("resnet20").eval()
    codes = CodeRange(4, 1)
    for name, layer in adder_layers(model).items():
        w = layer.adder.detach()
        group = torch.arange(len(w)) % 2
        top = torch.stack([w[group == g].abs().max() for g in range(2)])
        replace_module(model, name, QuantAdder2d.from_float(
            layer, group, top / codes.act_max, torch.zeros(2, dtype=torch.int32), codes,
            torch.zeros(2), top))
    return model.eval()


@pytest.mark.parametrize("name", ["layer1.0.conv1.scale", "layer3.0.bn2.running_mean"])
def test_case03_quantized_model_with_nan_is_refused(tmp_path, capsys, quantized_resnet20, name):
    model = copy.deepcopy(quantized_resnet20)
    with torch.no_grad():
        model.state_dict()[name].view(-1)[0] = float("nan")
    path = tmp_path / "bad.aq"
    save_quantized(path, model, "resnet20", 10, {})
    with pytest.raises(ValueError, match=rf"{name} \(1 of"):
        load_quantized(path)
    assert main(["export", str(path), "--out", str(tmp_path / "pkg")]) == 2
    assert name in capsys.readouterr().err
    assert not (tmp_path / "pkg").exists()


# ---- case 12: the integer engine refuses non-finite images ------------------------------------


@pytest.fixture(scope="module")
def engine(quantized_resnet20) -> IntegerEngine:
    return IntegerEngine(lower(quantized_resnet20, "resnet20"))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_case12_engine_refuses_non_finite_pixels(engine, value):
    images = torch.randn(3, 3, 32, 32)
    images[1, 2, 5, 7] = value
    with pytest.raises(ValueError, match=r"1 of 3 images hold NaN or infinite pixels.*image 1"):
        engine(images)


def test_case12_engine_refuses_float64_pixels_beyond_float32(engine):
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    images[0, 0, 0, 0] = 1e39
    with pytest.raises(ValueError, match="beyond the float32 range"):
        engine(images)


def test_case12_engine_runs_finite_images(engine):
    logits = engine(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and logits.isfinite().all()
