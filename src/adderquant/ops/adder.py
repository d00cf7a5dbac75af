"""The adder operator ``adder2d``: forward ``-sum |x - w|`` and AdderNet's training gradients.

On the CPU it is the custom operator ``torch.ops.adderquant.adder2d`` over the compiled kernel,
with a fake (meta) implementation and its gradient formula registered on the operator, so that
``torch.compile`` traces through it without a graph break and ``torch.export`` captures it.
The gradients are the operator ``torch.ops.adderquant.adder2d_backward``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adderquant.ops import _kernel
from adderquant.ops.geometry import (
    adder_geometry,
    check_adder_shapes,
    conv_arguments,
    output_size,
)
from adderquant.ops.gradients import adaptive_scale
from adderquant.ops.gradients import rescale_ as _rescale_  # noqa: F401 (its old home; use gradients)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias, groups: int) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("adder2d: x and weight must be torch.Tensor")
    check_adder_shapes(x, weight, bias, groups)
    if x.dtype not in (torch.float32, torch.float64) or x.dtype != weight.dtype:
        raise TypeError(
            f"adder2d: x and weight must share a float32 or float64 dtype, got {x.dtype} and "
            f"{weight.dtype}; convert with .float()"
        )
    if x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError(
            f"adder2d: the compiled kernel runs on the CPU, got x on {x.device} and weight on "
            f"{weight.device}; move them with .cpu()"
        )


@torch.library.custom_op("adderquant::adder2d", mutates_args=(), device_types="cpu")
def _adder2d_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    eta: float | None,
    true_gradient: bool,
) -> torch.Tensor:
    """``-sum |x - w|`` per window (``eta`` and ``true_gradient`` choose the gradients)."""
    geom = adder_geometry(x, weight, stride, padding, dilation, groups)
    if geom.n == 0:
        return x.new_empty(0, geom.c_out, geom.h_out, geom.w_out)
    return _kernel.forward(geom, x.contiguous(), weight.contiguous())


@_adder2d_op.register_fake
def _(x, weight, stride, padding, dilation, groups, eta, true_gradient):
    ho, wo = output_size(x.shape[2], x.shape[3], tuple(weight.shape[2:]), stride, padding,
                         dilation)
    return x.new_empty(x.shape[0], weight.shape[0], ho, wo)


@torch.library.custom_op("adderquant::adder2d_backward", mutates_args=(), device_types="cpu")
def _adder2d_backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    need_input: bool,
    need_weight: bool,
    exact: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_w)``: AdderNet's ``sum clamp(w - x, -1, 1) g`` and ``sum (x - w) g``
    (unscaled), or with ``exact`` the sign gradients; an empty tensor where not needed."""
    geom = adder_geometry(x, weight, stride, padding, dilation, groups)
    if geom.n == 0:
        grad_x, grad_w = x.new_zeros(x.shape), weight.new_zeros(weight.shape)
    else:
        grad_x, grad_w = _kernel.backward(
            geom, x.contiguous(), weight.contiguous(), grad_out.contiguous(), need_input,
            need_weight, exact,
        )
    return (grad_x if need_input else x.new_empty(0),
            grad_w if need_weight else weight.new_empty(0))


@_adder2d_backward_op.register_fake
def _(grad_out, x, weight, stride, padding, dilation, groups, need_input, need_weight, exact):
    return (x.new_empty(x.shape if need_input else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, stride, padding, dilation, groups, eta, true_gradient = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.eta, ctx.true_gradient = eta, true_gradient


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[:2]
    grad_x, grad_w = _adder2d_backward_op(
        grad_out, x, weight, *ctx.geometry, need_x, need_w, ctx.true_gradient
    )
    if need_w and not ctx.true_gradient and ctx.eta is not None:
        grad_w = adaptive_scale(grad_w, ctx.eta)
    no_grad = (None,) * 6  # geometry, eta and true_gradient
    return (grad_x if need_x else None, grad_w if need_w else None, *no_grad)


torch.library.register_autograd("adderquant::adder2d", _backward, setup_context=_setup_context)


def adder2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    eta: float | None = 0.2,
    true_gradient: bool = False,
) -> torch.Tensor:
    """Adder convolution ``-sum |x - w|`` with the geometry of ``F.conv2d`` (compiled, CPU).

    Backward gives AdderNet's gradients: ``grad_w = sum (x - w) * g`` rescaled to
    ``eta * sqrt(numel(w)) / ||grad_w||`` times itself (``eta=None`` disables it) and
    ``grad_x = sum clamp(w - x, -1, 1) * g``. ``true_gradient=True`` gives the exact sign
    gradients of the forward instead (no rescaling). CUDA tensors go to the Triton kernels of
    :mod:`adderquant.ops.triton_adder` (float32).

    NaN and inf follow the definition as PyTorch evaluates it in float64, rounded to the
    dtype (docs/errors.md, "Non-finite numbers"): an output is NaN when its window holds a NaN
    or meets ``inf - inf``, -inf when a term or the sum is infinite, and finite sums that
    overflow the dtype give -inf (never NaN). AdderNet's input gradient is NaN where
    ``clamp(w - x, -1, 1) * g`` meets NaN; the exact gradients use ``sign(NaN) = 0`` as
    ``torch.sign`` does. Results the fast kernel leaves non-finite are recomputed term by term
    in double precision, so finite inputs keep the fast path's speed.
    """
    if isinstance(x, torch.Tensor) and x.is_cuda:
        from adderquant.ops.triton_adder import adder2d_cuda  # Triton is imported on first use

        return adder2d_cuda(x, weight, bias, stride, padding, dilation, groups, eta, true_gradient)
    _check_inputs(x, weight, bias, groups)
    pairs = conv_arguments(x, weight, stride, padding, dilation)
    out = _adder2d_op(x, weight, *(list(p) for p in pairs), groups, eta, true_gradient)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out
