"""``QATAdder2d``: a trainable fake-quantized adder layer, converted to and from
:class:`~adderquant.quant.layers.QuantAdder2d`.

What learns: the float weights behind the codes (``weight``), the step ``Δ_g`` of every group's
grid (``step``; LSQ gradient, :mod:`adderquant.quant.fakequant`) and a per-channel ``bias``.
Zero points, groups and code ranges stay those of the post-training result.

Lossless clamp as a parameterisation: where the source layer clamps its weights into the
group's interval ``[lo, hi] = Δ_g·[m_lo, m_hi]`` (same grid: the grid's range; paper:
``±(2^b − 1)Δ_g``), the output is ``−Σ|x̂ − ŵ(clamp(w))| − Σ dist(w, [lo, hi]) + bias``. For
every input in ``[lo, hi]`` this is the float layer's output at ``w`` (before rounding), so a
weight beyond the interval keeps a gradient (through the distance term) and can come back.
The weights start clamped into the interval and the excess removed by the post-training clamp
starts in ``bias``: the layer starts as the quantized layer it comes from.

Forward and backward: the forward computes ``−Δ_g·Σ|u_x − u_w|`` on the integer codes ``u``
(exact in float32) and adds ``(excess + bias)``: bit for bit the output of ``QuantAdder2d``'s
integer path on the same codes. The backward treats the forward as the adder op on the
dequantized values ``x̂ = Δu_x``, ``ŵ = Δu_w`` and uses the op's own gradients (AdderNet's
``x̂ − ŵ`` and ``HardTanh(ŵ − x̂)``, or with ``true_gradient`` the sign gradients; no η
rescaling), then the straight-through and LSQ gradients of the fake quantizers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from adderquant.ops import adder2d
from adderquant.quant.clamp import distance_to_interval
from adderquant.quant.fakequant import (
    act_backward,
    act_on_grids,
    grid_codes,
    lsq_grad_scale,
    step_gradient,
)
from adderquant.quant.grid import CodeRange
from adderquant.quant.layers import QuantAdder2d

_CHANNEL = (-1, 1, 1, 1)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward (the same values), gradient times ``scale`` (a number or a tensor of
    the input's shape) backward."""

    @staticmethod
    def forward(ctx, t, scale):
        ctx.scale = scale
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class QATAdder2d(nn.Module):
    """Fake-quantized adder layer with learnable weights, steps and bias (module docstring).

    ``true_gradient`` (attribute, default ``False``): exact sign gradients through the adder op
    instead of AdderNet's."""

    true_gradient = False

    def __init__(
        self,
        weight: torch.Tensor,
        group: torch.Tensor,
        step: torch.Tensor,
        zero_point: torch.Tensor,
        codes: CodeRange,
        clamp: tuple[torch.Tensor, torch.Tensor] | None,
        bias: torch.Tensor,
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
    ) -> None:
        super().__init__()
        g = len(step)
        self.codes = codes
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.step = nn.Parameter(step.detach().float().clone())
        self.bias = nn.Parameter(bias.detach().float().clone())
        self.register_buffer("group", group.detach().long().clone())
        self.register_buffer("zero_point", zero_point.detach().to(torch.int32).clone())
        self.has_clamp = clamp is not None
        lo, hi = clamp if clamp is not None else (torch.zeros(g), torch.zeros(g))
        self.register_buffer("clamp_lo", lo.detach().float().clone())  # in units of Δ_g
        self.register_buffer("clamp_hi", hi.detach().float().clone())

    # ------------------------------------------------------------------ conversions

    @classmethod
    def from_quant(cls, quant: QuantAdder2d, float_weight: torch.Tensor | None = None
                   ) -> QATAdder2d:
        """A trainable copy of ``quant``. Latent weights: ``float_weight`` clamped into the
        groups' intervals if it rounds to ``quant``'s codes (the float layer ``quant`` was made
        from), else ``quant``'s dequantized weights. The clamp is on where ``quant`` clamps:
        same-grid layers always, paper layers where they removed any excess."""
        codes = quant.codes
        z = quant.zero_point.float()
        if codes.weight_ratio == 1:
            clamp = (-z, codes.act_max - z)
        elif bool((quant.clamp_bias != 0).any()):
            limit = torch.full_like(z, float(codes.act_max))
            clamp = (-limit, limit)
        else:
            clamp = None
        layer = cls(quant.dequantized_weight(), quant.group, quant.scale, quant.zero_point,
                    codes, clamp, quant.bias + quant.clamp_bias, quant.stride, quant.padding,
                    quant.dilation)
        with torch.no_grad():
            layer.weight.copy_(layer._clamped(layer.weight))
            if float_weight is not None and float_weight.shape == layer.weight.shape:
                candidate = layer._clamped(float_weight.detach().float())
                if torch.equal(layer._weight_codes(candidate), quant.weight_codes):
                    layer.weight.copy_(candidate)
        return layer

    def to_quant(self) -> QuantAdder2d:
        """The :class:`QuantAdder2d` of the current codes: its integer path computes this
        layer's forward bit for bit."""
        with torch.no_grad():
            clamp_bias = self._excess(self.step) if self.has_clamp else torch.zeros_like(
                self.bias)
            return QuantAdder2d(
                self._weight_codes(self.weight), self.group, self.step.detach().clone(),
                self.zero_point, clamp_bias.detach().clone(), self.codes, self.stride,
                self.padding, self.dilation, self.bias.detach().clone(),
            )

    # ------------------------------------------------------------------ pieces

    def _bounds(self, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel clamp interval ``Δ_g·[m_lo, m_hi]`` (C_out, 1, 1, 1)."""
        s = step[self.group]
        return ((s * self.clamp_lo[self.group]).view(_CHANNEL),
                (s * self.clamp_hi[self.group]).view(_CHANNEL))

    def _clamped(self, w: torch.Tensor) -> torch.Tensor:
        if not self.has_clamp:
            return w
        lo, hi = self._bounds(self.step.detach())
        return torch.maximum(torch.minimum(w, hi), lo)

    def _excess(self, step: torch.Tensor) -> torch.Tensor:
        """``−Σ dist(w, [lo, hi])`` per output channel."""
        lo, hi = self._bounds(step)
        return -distance_to_interval(self.weight, lo, hi).flatten(1).sum(dim=1)

    def _weight_codes(self, w: torch.Tensor) -> torch.Tensor:
        """int32 weight codes ``q_w = (u_w + z)/r`` of ``w`` (after the clamp)."""
        u, _ = self.weight_operand(w.float(), self.step.detach())
        z = self.zero_point[self.group].view(_CHANNEL).float()
        return torch.round((u + z) / self.codes.weight_ratio).to(torch.int32)

    def weight_grad_scales(self) -> torch.Tensor:
        """LSQ scale of each step's gradient from the weight side: ``1/sqrt(n_g·q_max)`` with
        ``n_g`` the weights of group ``g``."""
        per_filter = self.weight[0].numel()
        counts = torch.bincount(self.group, minlength=len(self.step)).tolist()
        return torch.tensor([lsq_grad_scale(k * per_filter, self.codes) for k in counts],
                            dtype=self.step.dtype)

    def slots(self) -> tuple[torch.Tensor, int]:
        """Slot of every output channel in the grouped call (``group·M + rank in the group``)
        and the padded group size ``M``."""
        key = (self.group.data_ptr(), self.group._version)
        cached = self.__dict__.get("_slots")
        if cached is None or cached[0] != key:
            cached = (key, QuantAdder2d._stacked_slots(self.group, len(self.step)))
            self.__dict__["_slots"] = cached
        return cached[1]

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FakeQuantAdder.apply(x, self.weight, self.step, self)
        if self.has_clamp:
            extra = self._excess(_ScaleGrad.apply(self.step, self.weight_grad_scales())
                                 ) + self.bias
        else:
            extra = self.bias
        return y + extra.view(1, -1, 1, 1)

    def weight_operand(self, w: torch.Tensor, step: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes ``u_w`` and pass mask of the latent weights ``w`` (all channels)."""
        s = step[self.group].view(_CHANNEL)
        z = self.zero_point[self.group].to(w.dtype).view(_CHANNEL)
        lo = hi = None
        if self.has_clamp:
            lo, hi = self._bounds(step)
        c = self.codes
        return grid_codes(w, s, z, c.weight_min, c.weight_max, c.weight_ratio, lo, hi,
                          weights=True)

    def get_extra_state(self) -> dict:
        return {
            "bits": self.codes.bits, "weight_ratio": self.codes.weight_ratio,
            "stride": list(self.stride), "padding": list(self.padding),
            "dilation": list(self.dilation), "has_clamp": self.has_clamp,
        }

    def set_extra_state(self, state: dict) -> None:
        self.codes = CodeRange(int(state["bits"]), int(state["weight_ratio"]))
        self.stride = tuple(state["stride"])
        self.padding = tuple(state["padding"])
        self.dilation = tuple(state["dilation"])
        self.has_clamp = bool(state["has_clamp"])

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, "
                f"kernel_size={tuple(self.weight.shape[2:])}, stride={self.stride}, "
                f"padding={self.padding}, bits={self.codes.bits}, groups={len(self.step)}, "
                f"clamp={self.has_clamp}")


class _FakeQuantAdder(torch.autograd.Function):
    """The adder part ``−Σ|x̂ − ŵ|`` of :class:`QATAdder2d` (see the module docstring): one
    grouped adder call over the input's copies on the G grids, each grid's filters padded to
    the largest group."""

    @staticmethod
    def forward(ctx, x, weight, step, layer):
        ctx.layer = layer
        ctx.save_for_backward(x, weight, step)
        slot, width = layer.slots()
        g = len(step)
        u_x = act_on_grids(x, step, layer.zero_point, layer.codes, dequant=False)
        u_w, _ = layer.weight_operand(weight, step)
        stacked = u_w.new_zeros((g * width,) + u_w.shape[1:])
        stacked[slot] = u_w
        out = adder2d(u_x, stacked, None, layer.stride, layer.padding, layer.dilation,
                      groups=g, eta=None)
        return out[:, slot].mul_(step[layer.group].view(1, -1, 1, 1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, step = ctx.saved_tensors
        layer = ctx.layer
        slot, width = layer.slots()
        g = len(step)
        x_hat = act_on_grids(x, step, layer.zero_point, layer.codes, dequant=True)
        u_w, pass_w = layer.weight_operand(weight, step)
        s = step[layer.group].view(_CHANNEL)
        w_hat = u_w.new_zeros((g * width,) + u_w.shape[1:])
        w_hat[slot] = u_w * s
        grad_stacked = grad.new_zeros(grad.shape[0], g * width, *grad.shape[2:])
        grad_stacked[:, slot] = grad
        gx, gw = torch.ops.adderquant.adder2d_backward(
            grad_stacked, x_hat, w_hat, layer.stride, layer.padding, layer.dilation, g, True, True,
            layer.true_gradient)
        grad_x, act_step = act_backward(x, gx, step, layer.zero_point, layer.codes)
        gw = gw[slot]
        per_channel = step_gradient(gw, u_w, pass_w, weight, s).flatten(1).sum(dim=1)
        weight_step = torch.zeros_like(step).index_add_(0, layer.group, per_channel)
        grad_step = (lsq_grad_scale(x[0].numel(), layer.codes) * act_step
                     + layer.weight_grad_scales().to(step.dtype) * weight_step)
        return grad_x if ctx.needs_input_grad[0] else None, gw * pass_w, grad_step, None
