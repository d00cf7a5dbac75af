"""The Triton adder kernels against the plain PyTorch definition (float64): on CUDA devices
where present, and everywhere through Triton's interpreter (``TRITON_INTERPRET=1``), which runs
the same kernels on CPU tensors with NumPy.

The interpreter is slow, so it runs ResNet-20's channel counts and strides on small images in
the fast suite and the full shapes under ``-m slow``. Skipped where Triton is missing, except
the checks that importing the package leaves Triton alone.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from adderquant.nn import Adder2d
from adderquant.ops import adder2d
from adderquant.ops.reference import adder2d_reference, adder2d_reference_grads

RTOL = 1e-4

# Without CUDA the kernels run in Triton's interpreter, which must be chosen before Triton is
# first imported: ``triton.jit`` picks it when decorating, Triton's own helpers included.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

HAS_GPU = HAS_TRITON and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and Triton")

# (n, c_in, c_out, h, w, kernel (kh, kw), stride, padding, dilation, groups)
RESNET20_LAYERS = {
    "16-16 3x3 s1 32x32": (4, 16, 16, 32, 32, (3, 3), 1, 1, 1, 1),
    "16-32 3x3 s2 32x32": (4, 16, 32, 32, 32, (3, 3), 2, 1, 1, 1),
    "32-32 3x3 s1 16x16": (4, 32, 32, 16, 16, (3, 3), 1, 1, 1, 1),
    "32-64 3x3 s2 16x16": (4, 32, 64, 16, 16, (3, 3), 2, 1, 1, 1),
    "64-64 3x3 s1 8x8": (4, 64, 64, 8, 8, (3, 3), 1, 1, 1, 1),
    "16-32 1x1 s2 32x32": (4, 16, 32, 32, 32, (1, 1), 2, 0, 1, 1),
}
OTHER_LAYERS = {
    "groups2 dilation2 pad2": (3, 6, 10, 13, 11, (3, 3), 1, 2, 2, 2),
    "groups4 stride2 5x5": (2, 8, 12, 17, 15, (5, 5), 2, 2, 1, 4),
    "3x1 stride(2,1) pad(1,0)": (2, 5, 7, 12, 9, (3, 1), (2, 1), (1, 0), 1, 1),
    "stride3 uncovered pixels": (2, 3, 5, 10, 11, (2, 2), 3, 0, 1, 1),
    "one image, 100 channels": (1, 24, 100, 9, 9, (3, 3), 1, 1, 1, 1),
    "depthwise": (2, 8, 8, 10, 10, (3, 3), 1, 1, 1, 8),
}
LAYERS = {**RESNET20_LAYERS, **OTHER_LAYERS}
# The interpreter's fast cases: ResNet-20's channels and strides on small, odd images.
SMALL_LAYERS = {
    "16-16 3x3 s1 8x8": (1, 16, 16, 8, 8, (3, 3), 1, 1, 1, 1),
    "16-32 3x3 s2 9x9": (1, 16, 32, 9, 9, (3, 3), 2, 1, 1, 1),
    "32-64 1x1 s2 7x7": (1, 32, 64, 7, 7, (1, 1), 2, 0, 1, 1),
    "groups2 dilation2 pad2 7x6": (1, 4, 6, 7, 6, (3, 3), 1, 2, 2, 2),
    "depthwise 6x5": (1, 4, 4, 6, 5, (3, 3), 1, 1, 1, 4),
    "3x1 s(2,1) p(1,0) 12x9": (1, 5, 7, 12, 9, (3, 1), (2, 1), (1, 0), 1, 1),
    "2x2 stride3 uncovered 10x11": (2, 3, 5, 10, 11, (2, 2), 3, 0, 1, 1),
}
SPECS = {**LAYERS, **SMALL_LAYERS}
EXACT_CASES = ["16-32 3x3 s2 32x32", "groups2 dilation2 pad2", "3x1 stride(2,1) pad(1,0)",
               "stride3 uncovered pixels"]
SMALL_EXACT_CASES = ["16-32 3x3 s2 9x9", "groups2 dilation2 pad2 7x6",
                     "3x1 s(2,1) p(1,0) 12x9", "2x2 stride3 uncovered 10x11"]


@dataclass(frozen=True)
class Backend:
    """Where the kernels run: ``adder2d`` of the Triton path and the tensors' device."""

    name: str
    adder2d: object
    device: str


@pytest.fixture(scope="module")
def interpreter() -> Backend:
    if not (HAS_TRITON and INTERPRETED):
        pytest.skip("needs Triton, and TRITON_INTERPRET=1 set before its import (it is set "
                    "here where CUDA is missing; CUDA devices run the compiled kernels)")
    module = importlib.import_module("adderquant.ops.triton_adder")
    return Backend("interpreter", module.adder2d_cuda, "cpu")


@pytest.fixture(scope="module")
def gpu() -> Backend:
    if not HAS_GPU:
        pytest.skip("needs a CUDA device and Triton")
    return Backend("cuda", adder2d, "cuda")


def _cases(names: list[str], slow_names: list[str]) -> list:
    """(backend, case) parameters: every case on CUDA, ``names`` in the interpreter, and
    ``slow_names`` in the interpreter under ``-m slow``."""
    return ([pytest.param("gpu", n, id=f"cuda-{n}") for n in slow_names]
            + [pytest.param("interpreter", n, id=f"interpreter-{n}") for n in names]
            + [pytest.param("interpreter", n, id=f"interpreter-{n}", marks=pytest.mark.slow)
               for n in slow_names])


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Agreement to RTOL relative to each value, with a floor of RTOL x the largest value."""
    assert actual.shape == expected.shape
    assert actual.device == expected.device
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=RTOL, atol=RTOL * max(scale, 1e-12)
    )


def make_layer(spec: tuple, device: str, seed: int = 0):
    """float32 ``x``, ``weight``, ``grad_out`` of one layer on ``device``, plus its geometry."""
    n, c_in, c_out, h, w, (kh, kw), stride, padding, dilation, groups = spec
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=gen).relu()  # adder inputs follow a ReLU
    weight = torch.randn(c_out, c_in // groups, kh, kw, generator=gen)
    geometry = (stride, padding, dilation, groups)
    out_shape = adder2d_reference(x, weight, None, *geometry).shape
    grad_out = torch.randn(out_shape, generator=gen)
    return x.to(device), weight.to(device), grad_out.to(device), geometry


@pytest.fixture(autouse=True)
def full_precision_cudnn(monkeypatch: pytest.MonkeyPatch) -> None:
    """The AdderNet weight gradient uses cuDNN: keep it in float32, not TF32."""
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.mark.parametrize("backend, name", _cases(list(SMALL_LAYERS), list(LAYERS)))
def test_forward_and_addernet_gradients_match_reference(request, backend, name):
    run = request.getfixturevalue(backend)
    x, w, grad_out, geometry = make_layer(SPECS[name], run.device)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = run.adder2d(xa, wa, None, *geometry, eta=None)
    assert out.device.type == run.device and out.dtype == torch.float32
    assert_close(out, adder2d_reference(x.double(), w.double(), None, *geometry))

    gx, gw = torch.autograd.grad(out, (xa, wa), grad_out)
    ref_gx, ref_gw = adder2d_reference_grads(x.double(), w.double(), grad_out.double(), *geometry)
    assert_close(gx, ref_gx)
    assert_close(gw, ref_gw)


@pytest.mark.parametrize("backend, name", _cases(SMALL_EXACT_CASES, EXACT_CASES))
def test_true_gradients_match_autograd_of_reference(request, backend, name):
    run = request.getfixturevalue(backend)
    x, w, grad_out, geometry = make_layer(SPECS[name], run.device, seed=1)
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = run.adder2d(xt, wt, None, *geometry, true_gradient=True)
    gx, gw = torch.autograd.grad(out, (xt, wt), grad_out)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    exact_gx, exact_gw = torch.autograd.grad(
        adder2d_reference(xr, wr, None, *geometry), (xr, wr), grad_out.double()
    )
    assert_close(gx, exact_gx)
    assert_close(gw, exact_gw)


@pytest.mark.parametrize("backend", ["interpreter", "gpu"])
def test_eta_rescales_weight_gradient_norm(request, backend):
    run = request.getfixturevalue(backend)
    spec = (1, 32, 32, 6, 6, (3, 3), 1, 1, 1, 1)  # a 32-32 ResNet-20 layer on a small image
    x, w, grad_out, geometry = make_layer(spec, run.device, seed=2)
    w.requires_grad_()
    eta = 0.37
    (gw,) = torch.autograd.grad(run.adder2d(x, w, None, *geometry, eta=eta), (w,), grad_out)
    _, raw = adder2d_reference_grads(x.double(), w.detach().double(), grad_out.double(),
                                     *geometry)
    expected = raw * (eta * math.sqrt(w.numel()) / raw.norm())
    assert gw.norm().item() == pytest.approx(eta * math.sqrt(w.numel()), rel=1e-5)
    assert_close(gw, expected)


@pytest.mark.parametrize("backend", ["interpreter", "gpu"])
def test_bias_empty_batch_and_non_contiguous_inputs(request, backend):
    run = request.getfixturevalue(backend)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 9, 8, 5, generator=gen).transpose(2, 3)[:, 1:7].to(run.device)
    w = torch.randn(4, 3, 3, 6, generator=gen).permute(0, 3, 1, 2).to(run.device)
    bias = torch.randn(4, generator=gen).to(run.device).requires_grad_()
    assert not x.is_contiguous() and not w.is_contiguous()
    out = run.adder2d(x, w, bias, 2, 1)
    # the reference views its weight: give it a contiguous copy
    assert_close(out, adder2d_reference(x.double(), w.double().contiguous(), bias.double(), 2, 1))
    (gb,) = torch.autograd.grad(out.sum(), (bias,))
    assert torch.equal(gb.cpu(), torch.full((4,), float(out[:, 0].numel())))

    xe = torch.zeros(0, 6, 5, 8, device=run.device, requires_grad=True)
    we = w.clone().requires_grad_()
    empty = run.adder2d(xe, we, None, 2, 1)
    assert empty.shape == (0, 4, 3, 4)
    gx, gw = torch.autograd.grad(empty.sum(), (xe, we))
    assert gx.shape == xe.shape and torch.equal(gw, torch.zeros_like(we))


@needs_gpu
def test_adder2d_module_on_cuda_trains_with_addernet_gradients():
    layer = Adder2d(16, 32, 3, stride=2, padding=1, eta=None).cuda()
    x = torch.rand(8, 16, 32, 32, device="cuda", requires_grad=True)
    out = layer(x)
    grad_out = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, layer.adder), grad_out)
    w64 = layer.adder.detach().double()
    assert_close(out, adder2d_reference(x.detach().double(), w64, None, 2, 1))
    ref_gx, ref_gw = adder2d_reference_grads(x.detach().double(), w64, grad_out.double(), 2, 1)
    assert_close(gx, ref_gx)
    assert_close(gw, ref_gw)


@needs_gpu
def test_bad_cuda_inputs_raise_clear_errors():
    x, w = torch.randn(1, 4, 8, 8, device="cuda"), torch.randn(2, 4, 3, 3, device="cuda")
    with pytest.raises(TypeError, match="take float32"):
        adder2d(x.double(), w.double())
    with pytest.raises(ValueError, match="same device"):
        adder2d(x, w.cpu())
    with pytest.raises(ValueError, match="weight expects 3 input channels"):
        adder2d(x, w[:, :3])
    with pytest.raises(ValueError, match="does not fit"):
        adder2d(x[:, :, :2, :2], w)


def test_importing_the_package_leaves_triton_unloaded():
    """CUDA support is optional: ``adderquant.ops`` imports the Triton module on first use."""
    code = (
        "import sys, adderquant.ops, adderquant.nn; "
        "sys.exit('adderquant.ops.triton_adder' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_names_the_triton_module_takes_from_the_package_exist():
    """Without Triton the module cannot be imported, so check its package imports by name."""
    origin = importlib.util.find_spec("adderquant.ops.triton_adder").origin
    imports = [
        node for node in ast.walk(ast.parse(Path(origin).read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adderquant")
    ]
    assert imports
    for node in imports:
        module = importlib.import_module(node.module)
        missing = [a.name for a in node.names if not hasattr(module, a.name)]
        assert not missing, f"{node.module} no longer defines {missing}"
