"""``QuantAdder2d``: an adder layer whose weights and inputs live on per-group integer grids.

Fields (buffers, saved with the model):

- ``weight_codes`` int32 (C_out, C_in, kH, kW): integer weight codes ``q_w``.
- ``group`` int64 (C_out): the group of every output channel (0..G−1, every group non-empty).
- ``scale`` float32 (G) and ``zero_point`` int32 (G): the grid of each group; the input is
  quantized once per group, ``x̂ = Δ_g·(q_x − z_g)`` with ``q_x ∈ [0, 2^b − 1]``, and weights
  dequantize to ``ŵ = Δ_g·(r·q_w − z_g)`` (``r = codes.weight_ratio``).
- ``clamp_bias`` float32 (C_out): ``−Σ dist(w, [lo, hi])`` removed by the lossless clamp.
- ``bias`` float32 (C_out): any further additive correction (e.g. bias correction), else zeros.

The output is ``−Σ|x̂ − ŵ| + clamp_bias + bias`` = ``−Δ_g·Σ|q_x − r·q_w| + clamp_bias + bias``.
All groups are computed in one call of the adder kernel: the per-group quantized copies of the
input are stacked along channels and the filters of each group form one convolution group.
"""

from __future__ import annotations

import torch
from torch import nn

from adderquant.nn import Adder2d
from adderquant.ops import adder2d
from adderquant.quant.clamp import lossless_clamp
from adderquant.quant.grid import CodeRange, dequant_weight, fake_quant_act, weight_codes


class QuantAdder2d(nn.Module):
    """Fake-quantized adder layer holding integer codes (see the module docstring)."""

    def __init__(
        self,
        weight_codes: torch.Tensor,
        group: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        clamp_bias: torch.Tensor,
        codes: CodeRange,
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        c_out = weight_codes.shape[0]
        g = len(scale)
        if group.shape != (c_out,) or int(group.min()) < 0 or int(group.max()) >= g:
            raise ValueError("group must give every output channel a label in 0..G-1")
        if torch.any(torch.bincount(group, minlength=g) == 0):
            raise ValueError("every group must hold at least one output channel")
        if torch.any(scale <= 0) or not torch.all(torch.isfinite(scale)):
            raise ValueError("group scales must be positive and finite")
        if weight_codes.min() < codes.weight_min or weight_codes.max() > codes.weight_max:
            raise ValueError("weight codes out of range for the bit width")
        self.codes = codes
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.register_buffer("weight_codes", weight_codes.to(torch.int32))
        self.register_buffer("group", group.to(torch.int64))
        self.register_buffer("scale", scale.to(torch.float32))
        self.register_buffer("zero_point", zero_point.to(torch.int32))
        self.register_buffer("clamp_bias", clamp_bias.to(torch.float32))
        self.register_buffer(
            "bias", torch.zeros(c_out) if bias is None else bias.to(torch.float32).clone()
        )

    @property
    def bits(self) -> int:
        return self.codes.bits

    @property
    def num_groups(self) -> int:
        return len(self.scale)

    @classmethod
    def from_float(
        cls,
        layer: Adder2d,
        group: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        codes: CodeRange,
        clamp_lo: torch.Tensor | None = None,
        clamp_hi: torch.Tensor | None = None,
    ) -> QuantAdder2d:
        """Quantize a float ``Adder2d``: optionally clamp its weights losslessly into the
        per-group interval ``[clamp_lo[g], clamp_hi[g]]``, then round them to the group grids."""
        if layer.groups != 1:
            raise ValueError("quantized adder layers support groups=1 only")
        w = layer.adder.detach().float()
        bias = layer.bias.detach().clone() if layer.bias is not None else None
        clamp_bias = torch.zeros(w.shape[0])
        if clamp_lo is not None and clamp_hi is not None:
            w, clamp_bias = lossless_clamp(w, clamp_lo[group], clamp_hi[group])
        shape = (-1, 1, 1, 1)
        q = weight_codes(w, scale[group].view(shape), zero_point[group].view(shape).float(), codes)
        return cls(
            q, group, scale, zero_point, clamp_bias, codes,
            layer.stride, layer.padding, layer.dilation, bias,
        )

    def dequantized_weight(self) -> torch.Tensor:
        """``ŵ = Δ_g·(r·q_w − z_g)`` per output channel (float32)."""
        shape = (-1, 1, 1, 1)
        s = self.scale[self.group].view(shape)
        z = self.zero_point[self.group].view(shape).float()
        return dequant_weight(self.weight_codes.float(), s, z, self.codes)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x̂`` on every group grid: (N, G, C, H, W)."""
        s = self.scale.view(1, -1, 1, 1, 1)
        z = self.zero_point.view(1, -1, 1, 1, 1).float()
        return fake_quant_act(x.unsqueeze(1), s, z, self.codes)

    def _stacked_slots(self) -> tuple[torch.Tensor, int]:
        """Slot of each output channel when the filters of each group are padded to the size
        of the largest group: ``slot = g·M + rank within g``."""
        g = self.num_groups
        sizes = torch.bincount(self.group, minlength=g)
        order = torch.argsort(self.group, stable=True)
        starts = torch.cumsum(sizes, 0) - sizes
        rank = torch.empty_like(self.group)
        rank[order] = torch.arange(len(order)) - starts[self.group[order]]
        m = int(sizes.max())
        return self.group * m + rank, m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_hat = self.dequantized_weight()
        x_hat = self.quantize_input(x)
        geometry = (self.stride, self.padding, self.dilation)
        if self.num_groups == 1:
            y = adder2d(x_hat[:, 0], w_hat, None, *geometry, eta=None)
        else:
            slot, m = self._stacked_slots()
            w_stack = w_hat.new_zeros((self.num_groups * m,) + w_hat.shape[1:])
            w_stack[slot] = w_hat
            n, g, c, h, wd = x_hat.shape
            y = adder2d(
                x_hat.reshape(n, g * c, h, wd), w_stack, None, *geometry,
                groups=self.num_groups, eta=None,
            )[:, slot]
        return y + (self.clamp_bias + self.bias).view(1, -1, 1, 1)

    def get_extra_state(self) -> dict:
        return {
            "bits": self.codes.bits,
            "weight_ratio": self.codes.weight_ratio,
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
        }

    def set_extra_state(self, state: dict) -> None:
        self.codes = CodeRange(int(state["bits"]), int(state["weight_ratio"]))
        self.stride = tuple(state["stride"])
        self.padding = tuple(state["padding"])
        self.dilation = tuple(state["dilation"])

    def extra_repr(self) -> str:
        return (
            f"{self.weight_codes.shape[1]}, {self.weight_codes.shape[0]}, "
            f"kernel_size={tuple(self.weight_codes.shape[2:])}, stride={self.stride}, "
            f"padding={self.padding}, bits={self.bits}, groups={self.num_groups}, "
            f"weight_ratio={self.codes.weight_ratio}"
        )


def adder_layers(model: nn.Module) -> dict[str, Adder2d]:
    """The model's float adder layers by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Adder2d)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the sub-module called ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
