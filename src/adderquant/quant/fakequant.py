"""Fake quantization with learnable steps: straight-through rounding and LSQ step gradients.

A value ``v`` on a grid of step ``Δ``, integer zero point ``z``, code range ``[q_min, q_max]``
and weight step ratio ``r`` (1 for activations and same-grid weights, 2 for the paper's signed
weights), optionally clamped first into ``[lo, hi]`` (the lossless weight clamp), becomes::

    u = r·clamp(round((clamp(v, lo, hi)/Δ + z)/r), q_min, q_max) − z      (an integer)
    v̂ = Δ·u

Gradients (straight-through estimator, LSQ of Esser et al. 2020): with ``pass`` true where
``v`` lies in ``[lo, hi]`` and its rounded code in ``[q_min, q_max]``,

    ∂v̂/∂v = pass,        ∂v̂/∂Δ = u − pass·v/Δ   (= (v̂ − v)/Δ inside, the code outside)

and the step's gradient is multiplied by the LSQ scale ``1/sqrt(n·q_max)`` given by the caller
(``n``: the values that share the step). :func:`grid_codes` is the forward in one place, used
by :class:`FakeQuant` and by the fake-quantized adder layer. :func:`act_on_grids` and
:func:`act_backward` are the activation side of that layer: for float32 CPU tensors one fused
pass of the compiled kernel (``csrc/fakequant_kernel.c``), else the same formulas in torch.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from adderquant.ops._loader import library
from adderquant.quant.grid import CodeRange


def lsq_grad_scale(count: int, codes: CodeRange) -> float:
    """LSQ's step-gradient scale ``1/sqrt(count·q_max)`` for ``count`` values on one grid."""
    return 1.0 / math.sqrt(max(count, 1) * codes.act_max)


def grid_codes(
    v: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, q_min: int, q_max: int,
    ratio: int = 1, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None,
    weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, pass)`` of the module docstring; ``step``, ``zero_point`` (float) and the bounds
    broadcast against ``v``. ``u`` holds integers in ``v``'s dtype; ``pass`` is boolean.
    Rounding follows the integer path bit for bit: activations ``round(v/Δ) + z`` (as the
    engine's code producers), weights ``round((v/Δ + z)/r)`` (as ``grid.weight_codes``)."""
    inside = None
    if lo is not None and hi is not None:
        inside = (v >= lo) & (v <= hi)
        v = torch.maximum(torch.minimum(v, hi), lo)
    t = torch.div(v, step)
    if weights:
        t = t.add_(zero_point)
        t = (t.div_(ratio) if ratio != 1 else t).round_()
    else:
        t = t.round_().add_(zero_point)
    unsaturated = (t >= q_min) & (t <= q_max)
    u = t.clamp_(q_min, q_max)
    if ratio != 1:
        u = u.mul_(ratio)
    u = u.sub_(zero_point)
    return u, unsaturated if inside is None else unsaturated & inside


def step_gradient(
    grad: torch.Tensor, u: torch.Tensor, passed: torch.Tensor, v: torch.Tensor,
    step: torch.Tensor,
) -> torch.Tensor:
    """Elementwise ``grad·∂v̂/∂Δ = grad·(u − pass·v/Δ)`` (to be summed over each step's values)."""
    return grad * (u - torch.where(passed, v / step, torch.zeros((), dtype=v.dtype)))


class FakeQuant(torch.autograd.Function):
    """``v̂ = Δ·u`` with the gradients of the module docstring. Arguments: ``v``, ``step``
    (a tensor broadcasting against ``v``, of the step parameters' shape after ``view``),
    ``zero_point``, ``q_min``, ``q_max``, ``ratio``, ``lo``, ``hi`` (``None`` for no clamp),
    ``grad_scale`` (LSQ scale of the step's gradient), ``weights`` (rounding of weights)."""

    @staticmethod
    def forward(ctx, v, step, zero_point, q_min, q_max, ratio, lo, hi, grad_scale, weights):
        u, passed = grid_codes(v, step, zero_point, q_min, q_max, ratio, lo, hi, weights)
        ctx.save_for_backward(v, step, u, passed)
        ctx.grad_scale = grad_scale
        return u * step

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        v, step, u, passed = ctx.saved_tensors
        grad_v = grad * passed
        grad_step = step_gradient(grad, u, passed, v, step) * ctx.grad_scale
        grad_step = _sum_to(grad_step, step.shape)
        return grad_v, grad_step, None, None, None, None, None, None, None, None


def fake_quant(
    v: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, codes: CodeRange,
    lo: torch.Tensor | None = None, hi: torch.Tensor | None = None, grad_scale: float = 1.0,
    weights: bool = False,
) -> torch.Tensor:
    """Fake-quantize ``v`` as an activation (``weights=False``: codes ``[0, 2^b − 1]``) or as
    weights (the code range and step ratio of ``codes``)."""
    q_min, q_max, ratio = ((codes.weight_min, codes.weight_max, codes.weight_ratio) if weights
                           else (0, codes.act_max, 1))
    return FakeQuant.apply(v, step, zero_point.to(v.dtype), q_min, q_max, ratio, lo, hi,
                           grad_scale, weights)


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``t`` down to ``shape`` (the reverse of broadcasting)."""
    lead = t.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, s in enumerate(shape) if s == 1]
    return t.sum(dim=dims, keepdim=True).view(shape) if dims else t


# --------------------------------------------------------------------------- fused activations

def _compiled(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu"


def _code_bounds(zero_point: torch.Tensor, codes: CodeRange) -> tuple[torch.Tensor, ...]:
    lo = -zero_point.to(torch.float32)
    return lo.contiguous(), (lo + codes.act_max).contiguous()


def act_on_grids(
    x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, codes: CodeRange,
    dequant: bool,
) -> torch.Tensor:
    """Activation codes ``u`` (``dequant``: values ``Δ_g·u``) of ``x`` (N, C, H, W) on each of
    the G grids (``step``, integer ``zero_point``), stacked along channels: (N, G·C, H, W),
    grid ``g`` in channels ``g·C .. (g+1)·C − 1``."""
    n, c, h, w = x.shape
    g = len(step)
    lo, hi = _code_bounds(zero_point, codes)
    if not _compiled(x):
        shape = (1, -1, 1, 1, 1)
        s = step.detach().to(x.dtype).view(shape)
        u = torch.round(x.unsqueeze(1) / s)
        u = torch.maximum(torch.minimum(u, hi.to(x.dtype).view(shape)), lo.to(x.dtype).view(shape))
        return (u * s if dequant else u).reshape(n, g * c, h, w)
    x = x.contiguous()
    step = step.detach().to(torch.float32).contiguous()
    out = torch.empty((n, g * c, h, w), dtype=torch.float32)
    library().fq_act_forward(x.data_ptr(), n, c * h * w, g, step.data_ptr(), lo.data_ptr(),
                              hi.data_ptr(), int(dequant), out.data_ptr(),
                              torch.get_num_threads())
    return out


def act_backward(
    x: torch.Tensor, grad: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor,
    codes: CodeRange,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of :func:`act_on_grids` (``dequant``) given the gradient ``grad`` (N, G·C, H, W)
    of its output: ``(grad_x = Σ_g grad_g·pass_g, step gradients Σ grad_g·(u − pass·x/Δ_g))``
    (unscaled, in ``step``'s dtype)."""
    n, c, h, w = x.shape
    g = len(step)
    lo, hi = _code_bounds(zero_point, codes)
    if not _compiled(x):
        grad5 = grad.reshape(n, g, c, h, w)
        shape = (1, -1, 1, 1, 1)
        u, passed = grid_codes(x.unsqueeze(1), step.view(shape), zero_point.to(x.dtype).view(
            shape), 0, codes.act_max)
        grad_x = (grad5 * passed).sum(dim=1)
        dims = (0, 2, 3, 4)
        return grad_x, step_gradient(grad5, u, passed, x.unsqueeze(1), step.view(shape)).sum(
            dim=dims)
    x, grad = x.contiguous(), grad.contiguous()
    step32 = step.detach().to(torch.float32).contiguous()
    grad_x = torch.empty_like(x)
    sums = torch.empty(g, dtype=torch.float64)
    library().fq_act_backward(x.data_ptr(), grad.data_ptr(), n, c * h * w, g,
                               step32.data_ptr(), lo.data_ptr(), hi.data_ptr(),
                               grad_x.data_ptr(), sums.data_ptr(), torch.get_num_threads())
    return grad_x, sums.to(step.dtype)
