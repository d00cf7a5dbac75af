"""The adder operator ``adder2d``: forward ``-sum |x - w|`` and AdderNet's training gradients."""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from adderquant.ops import _kernel
from adderquant.ops.reference import _pair, output_size


def check_adder_shapes(x: torch.Tensor, weight: torch.Tensor, bias, groups: int) -> None:
    """Raise a clear error unless ``x``, ``weight``, ``bias`` and ``groups`` fit together."""
    if x.dim() != 4:
        raise ValueError(f"adder2d: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(
            f"adder2d: weight must be 4-D (C_out, C_in/groups, kH, kW), got {tuple(weight.shape)}"
        )
    if groups < 1 or x.shape[1] % groups or weight.shape[0] % groups:
        raise ValueError(
            f"adder2d: groups={groups} must divide C_in={x.shape[1]} and C_out={weight.shape[0]}"
        )
    if weight.shape[1] * groups != x.shape[1]:
        raise ValueError(
            f"adder2d: weight expects {weight.shape[1] * groups} input channels "
            f"(C_in/groups={weight.shape[1]}, groups={groups}), x has {x.shape[1]}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"adder2d: bias must have shape ({weight.shape[0]},)")


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


def _geometry(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int):
    """The kernel's shape record, after checking stride, padding, dilation and output size."""
    sh, sw = _pair(stride, "stride")
    (ph, pw), (dh, dw) = _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(
            f"adder2d: stride {(sh, sw)} and dilation {(dh, dw)} must be >= 1 and padding "
            f"{(ph, pw)} >= 0"
        )
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    ho, wo = output_size(h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    if ho < 1 or wo < 1:
        raise ValueError(
            f"adder2d: the {kh}x{kw} kernel (dilation {(dh, dw)}) does not fit the {h}x{w} input "
            f"with padding {(ph, pw)}; enlarge the input or the padding"
        )
    return _kernel.Geometry(n, c_in, h, w, c_out, kh, kw, sh, sw, ph, pw, dh, dw, groups, ho, wo)


class _Adder2dFunction(torch.autograd.Function):
    """Compiled forward and backward; see :func:`adder2d`."""

    @staticmethod
    def forward(ctx, x, weight, geom, eta, true_gradient):
        ctx.save_for_backward(x, weight)
        ctx.geom, ctx.eta, ctx.true_gradient = geom, eta, true_gradient
        if geom.n == 0:
            return x.new_empty(0, geom.c_out, geom.h_out, geom.w_out)
        return _kernel.forward(geom, x, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        if ctx.geom.n == 0:
            grad_x, grad_w = torch.zeros_like(x), torch.zeros_like(weight)
        else:
            grad_x, grad_w = _kernel.backward(
                ctx.geom, x, weight, grad_out.contiguous(), need_x, need_w, ctx.true_gradient
            )
        if need_w and not ctx.true_gradient and ctx.eta is not None:
            _rescale_(grad_w, ctx.eta)
        return grad_x if need_x else None, grad_w if need_w else None, None, None, None


def _rescale_(grad_w: torch.Tensor, eta: float) -> None:
    """AdderNet's adaptive scaling, in place: ``grad_w *= eta * sqrt(numel) / ||grad_w||``."""
    norm = torch.linalg.vector_norm(grad_w)
    if norm > 0:
        grad_w *= eta * math.sqrt(grad_w.numel()) / norm


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
    geom = _geometry(x, weight, stride, padding, dilation, groups)
    out = _Adder2dFunction.apply(x.contiguous(), weight.contiguous(), geom, eta, true_gradient)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out
