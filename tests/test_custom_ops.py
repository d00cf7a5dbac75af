"""The kernels as torch.library custom operators: schema, fake tensors and the registered
gradients (opcheck), torch.compile without graph breaks and torch.export."""

from __future__ import annotations

import threading

import pytest
import torch

from adderquant.models import create_model
from adderquant.nn import Adder2d
from adderquant.ops import _kernel, adder2d
from adderquant.ops.reference import adder2d_reference_grads
from adderquant.ops.sad import ConvGeometry, pack, sad_conv2d, sad_conv2d_packed


def _sad_reference(codes, weights, stride, padding, pad_code):
    """Σ|x − w| over each window in int64, by unfolding the padded codes."""
    x = torch.nn.functional.pad(codes.long(), (padding,) * 4, value=pad_code)
    cols = torch.nn.functional.unfold(x.double(), weights.shape[2:], stride=stride).long()
    w = weights.long().flatten(1)
    out = (cols.unsqueeze(1) - w[None, :, :, None]).abs().sum(2)
    ho = (codes.shape[2] + 2 * padding - weights.shape[2]) // stride + 1
    return out.view(codes.shape[0], weights.shape[0], ho, -1)


@pytest.mark.parametrize(
    ("dtype", "stride", "padding", "dilation", "groups", "eta", "true_gradient"),
    [
        (torch.float64, [1, 1], [1, 1], [1, 1], 1, 0.2, False),
        (torch.float32, [2, 1], [0, 1], [1, 2], 2, None, False),
        (torch.float64, [1, 2], [1, 0], [1, 1], 1, None, True),
    ],
)
def test_adder2d_opcheck(dtype, stride, padding, dilation, groups, eta, true_gradient):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 6, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 4 // groups, 3, 3, generator=gen, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.adderquant.adder2d.default,
                          (x, w, stride, padding, dilation, groups, eta, true_gradient))


def test_adder2d_backward_opcheck_and_values():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 5, 6, 6, generator=gen, dtype=torch.float64)
    args = (g, x, w, [1, 1], [1, 1], [1, 1], 1)
    torch.library.opcheck(torch.ops.adderquant.adder2d_backward.default, (*args, True, True, False))
    torch.library.opcheck(torch.ops.adderquant.adder2d_backward.default, (*args, False, True, True))
    gx, gw = torch.ops.adderquant.adder2d_backward(*args, True, False, False)
    expected_gx, _ = adder2d_reference_grads(x, w, g, 1, 1)
    torch.testing.assert_close(gx, expected_gx)
    assert gw.numel() == 0  # not asked for


def test_compiled_resnet20_matches_eager_in_inference_and_training():
    torch.manual_seed(0)
    model = create_model("resnet20")
    x = torch.randn(2, 3, 32, 32)
    target = torch.tensor([3, 7])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")

    def step(net):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), target)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    model.train()
    loss, grads = step(model)
    compiled_loss, compiled_grads = step(compiled)
    assert torch.equal(compiled_loss, loss)
    for got, expected in zip(compiled_grads, grads, strict=True):
        assert torch.equal(got, expected)
    model.eval()
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))


@pytest.mark.slow
def test_inductor_compiled_resnet20_matches_eager():
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


def test_export_captures_the_adder_operator():
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,))
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    adders = sum(isinstance(m, Adder2d) for m in model.modules())
    assert adders == 20
    assert targets.count(torch.ops.adderquant.adder2d.default) == adders
    with torch.no_grad():
        assert torch.equal(program.module()(x), model(x))


def test_sad_opcheck_and_compile():
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 256, (2, 5, 7, 7), dtype=torch.uint8, generator=gen)
    weights = torch.randint(0, 256, (6, 5, 3, 3), dtype=torch.uint8, generator=gen)
    out = torch.zeros(2, 6, 7, 7, dtype=torch.int32)
    index = torch.tensor([5, 3, 1, 0, 2, 4], dtype=torch.int32)
    geometry = ConvGeometry((3, 3), (1, 1), (1, 1))
    for out_index in (None, index):
        torch.library.opcheck(torch.ops.adderquant.sad_conv2d_.default,
                              (codes, weights, list(geometry.args()), 3, out_index, -1, 0, out))
    torch.library.opcheck(
        torch.ops.adderquant.sad_conv2d_packed_.default,
        (pack(codes, geometry, 3), [5, 7, 7], weights, list(geometry.args()), 3, None, -1, 0,
         out))
    expected = _sad_reference(codes, weights, 1, 1, 3).int()
    compiled = torch.compile(lambda c, w: sad_conv2d(c, w, 1, 1, 3), fullgraph=True,
                             backend="aot_eager")
    assert torch.equal(compiled(codes, weights), expected)
    scattered = sad_conv2d_packed(pack(codes, geometry, 3), (5, 7, 7), weights, geometry, 3,
                                  out=torch.zeros_like(out), out_index=index)
    assert torch.equal(scattered[:, index.long()], expected)


def test_export_captures_the_sad_operator():
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, (1, 3, 6, 6), dtype=torch.uint8, generator=gen)
    weights = torch.randint(0, 256, (4, 3, 3, 3), dtype=torch.uint8, generator=gen)

    class Sad(torch.nn.Module):
        def forward(self, c, w):
            return sad_conv2d(c, w, 2, 1, 9)

    program = torch.export.export(Sad(), (codes, weights))
    assert "adderquant.sad_conv2d_" in str(program.graph)
    assert torch.equal(program.module()(codes, weights),
                       _sad_reference(codes, weights, 2, 1, 9).int())


def test_simd_choice_is_scoped_to_the_block_and_the_thread():
    best = _kernel.simd_path()
    seen = []
    with _kernel.use_simd("portable"):
        assert _kernel.simd_path() == "portable"
        worker = threading.Thread(target=lambda: seen.append(_kernel.simd_path()))
        worker.start()
        worker.join()
        x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
        portable = adder2d(x, w, None, 1, 1)
    assert seen == [best]
    assert _kernel.simd_path() == best
    assert torch.equal(portable, adder2d(x, w, None, 1, 1))
    with pytest.raises(ValueError, match="unknown SIMD path"), _kernel.use_simd("sse9"):
        pass


def test_compiled_adder2d_on_channels_last_input_matches_eager():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 6, 6, generator=gen).to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(3, 4, 3, 3, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.adderquant.adder2d.default,
                          (x, w, [1, 1], [1, 1], [1, 1], 1, 0.2, False))

    def loss(fn):
        return (fn(x, w, None, 1, 1) ** 2).sum()

    expected = torch.autograd.grad(loss(adder2d), (x, w))
    got = torch.autograd.grad(loss(torch.compile(adder2d, fullgraph=True, backend="aot_eager")),
                              (x, w))
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
