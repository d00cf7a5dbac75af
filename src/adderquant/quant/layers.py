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
Inference on the CPU (no gradient needed, codes that fit in a byte, no dilation) runs on the
integer codes with the uint8 SAD kernel: per grid, ``Σ|q_x − r·q_w|`` in int32, exact, then
scaled by ``−Δ``. Otherwise (training, CUDA, 8-bit paper codes) the float adder kernel runs on
dequantized values. Groups that share a grid are computed together. When the grids hold about
equally many filters, all are computed in one call of the adder kernel: the per-grid quantized
copies of the input are stacked along channels and the filters of each grid form one convolution
group (padded with unused filters to the largest grid). When padding would add more than a
quarter of the work, the kernel is called once per grid instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from adderquant.nn import Adder2d
from adderquant.ops import adder2d
from adderquant.quant.clamp import lossless_clamp
from adderquant.quant.grid import (
    CodeRange,
    byte_weights,
    dequant_weight,
    distinct_grids,
    fake_quant_act,
    weight_codes,
)

if TYPE_CHECKING:  # the engine package imports this module
    from adderquant.ops.sad import ConvGeometry

STACKED_WASTE = 1.25  # largest padded/real filter ratio for the single grouped kernel call


class QuantAdder2d(nn.Module):
    """Fake-quantized adder layer holding integer codes (see the module docstring).

    ``use_integer_path`` (default ``True``): run the SAD kernel where
    :meth:`integer_path_applies`; ``False`` always runs the float adder kernel on dequantized
    values (for comparisons). :func:`integer_path` sets it for every layer of a model within
    a ``with`` block."""

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
        self.use_integer_path = True
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

    def _grids(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The distinct ``(scale, zero point)`` grids of the groups: their scales, zero points
        and the grid of every output channel. Groups on one grid are computed together."""
        scales, zero_points, grid_of_group = distinct_grids(self.scale, self.zero_point)
        return scales, zero_points, grid_of_group[self.group]

    @staticmethod
    def _stacked_slots(label: torch.Tensor, g: int) -> tuple[torch.Tensor, int]:
        """Slot of each output channel when the filters of each of the ``g`` grids are padded
        to the size ``M`` of the largest: ``slot = grid·M + rank within the grid``."""
        sizes = torch.bincount(label, minlength=g)
        order = torch.argsort(label, stable=True)
        starts = torch.cumsum(sizes, 0) - sizes
        rank = torch.empty_like(label)
        rank[order] = torch.arange(len(order), device=label.device) - starts[label[order]]
        m = int(sizes.max())
        return label * m + rank, m

    def _sad_plan(self) -> _SadPlan:
        """The SAD kernel's operands, rebuilt whenever a buffer they come from changes."""
        tensors = (self.weight_codes, self.group, self.scale, self.zero_point)
        key = (*((t.data_ptr(), t._version) for t in tensors), self.codes, self.stride,
               self.padding)
        plan = self.__dict__.get("_plan")
        if plan is None or plan.key != key:
            plan = _SadPlan.build(self, key)
            self.__dict__["_plan"] = plan
        return plan

    def integer_path_applies(self, x: torch.Tensor) -> bool:
        """Whether the integer SAD kernel can compute this layer on ``x``: CPU float32
        inference (no gradient to ``x``) without dilation, with zero points that are
        activation codes (so that zero padding has a code). Whatever :attr:`use_integer_path`
        says."""
        if x.device.type != "cpu" or x.dtype != torch.float32:
            return False
        if self.dilation != (1, 1) or (torch.is_grad_enabled() and x.requires_grad):
            return False
        return self._sad_plan().zero_points_are_codes

    def integer_sums(self, x: torch.Tensor) -> torch.Tensor | None:
        """int32 ``Σ|q_x − r·q_w|`` of the clamped byte weights (N, C_out, H', W'): the input's
        codes on every grid in one pass and one SAD kernel call for all grids; ``None`` when ``x``
        holds NaN or infinite values, which have no code. Only where
        :meth:`integer_path_applies`; the output is ``(sums + excess)·step + biases`` (see
        :meth:`output_terms`)."""
        from adderquant.ops._loader import NonFiniteInputError
        from adderquant.ops.requant import codes_from_float
        from adderquant.ops.sad import sad_conv2d_packed_grids

        plan = self._sad_plan()
        n, c, h, w = x.shape
        try:
            packed = codes_from_float(x, plan.scales, plan.zero_points, self.bits,
                                      plan.geometry)
        except NonFiniteInputError:
            return None
        sums = torch.empty(n, len(self.group), *plan.geometry.output_size(h, w),
                           dtype=torch.int32)
        return sad_conv2d_packed_grids(packed, (c, h, w), plan.weights, plan.filters,
                                       plan.geometry, plan.zero_points, sums, plan.channels)

    def output_terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per output channel, int32 ``excess``, float32 ``step`` and ``bias`` with which
        :meth:`integer_sums` become the layer's output ``(sums + excess)·step + bias``."""
        plan = self._sad_plan()
        return plan.excess, plan.step, self.clamp_bias + self.bias

    def _integer_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """``−Δ·Σ|q_x − r·q_w|`` + biases from :meth:`integer_sums`, scaled to float32 in one
        pass; ``None`` for NaN or infinite inputs."""
        from adderquant.ops.requant import sums_to_float

        sums = self.integer_sums(x)
        return None if sums is None else sums_to_float(sums, *self.output_terms())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_integer_path and self.integer_path_applies(x):
            y = self._integer_forward(x)
            if y is not None:
                return y  # else NaN/inf inputs: the float path follows the definition
        y = self.adder_on_grids(x, self.dequantized_weight())
        return y + (self.clamp_bias + self.bias).view(1, -1, 1, 1)

    def adder_on_grids(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``−Σ|x̂ − w|`` per output channel, ``x̂`` the input on that channel's grid and ``w``
        the given weights: the float path of :meth:`forward` with ``ŵ``, or any other weights
        of the same shape (e.g. the float layer's)."""
        scales, zero_points, label = self._grids()
        g, c_out = len(scales), w.shape[0]
        geometry = (self.stride, self.padding, self.dilation)
        if g == 1:
            x_hat = fake_quant_act(x, scales[0], zero_points[0], self.codes)
            y = adder2d(x_hat, w, None, *geometry, eta=None)
        else:
            x_hat = fake_quant_act(
                x.unsqueeze(1), scales.view(1, -1, 1, 1, 1), zero_points.view(1, -1, 1, 1, 1),
                self.codes,
            )
            slot, m = self._stacked_slots(label, g)
            if g * m <= STACKED_WASTE * c_out:  # one grouped call, little padding
                w_stack = w.new_zeros((g * m,) + w.shape[1:])
                w_stack[slot] = w
                n, _, c, h, wd = x_hat.shape
                y = adder2d(
                    x_hat.reshape(n, g * c, h, wd), w_stack, None, *geometry, groups=g, eta=None
                )[:, slot]
            else:  # unbalanced grids: one call per grid, no padded filters
                parts = [torch.nonzero(label == j).squeeze(1) for j in range(g)]
                outs = [adder2d(x_hat[:, j], w[idx], None, *geometry, eta=None)
                        for j, idx in enumerate(parts)]
                y = torch.cat(outs, dim=1)[:, torch.argsort(torch.cat(parts))]
        return y

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


@dataclass(frozen=True)
class _SadPlan:
    """A layer's operands for the SAD kernel: byte weights and their excess
    (:func:`~adderquant.quant.grid.byte_weights`), one set of filters per grid."""

    key: tuple
    scales: torch.Tensor  # float32 (G'): the distinct grids
    zero_points: torch.Tensor  # int32 (G')
    channels: torch.Tensor  # int32 (C_out): output channels of grid 0, then of grid 1, ...
    weights: torch.Tensor  # uint8 (C_out, C, kH, kW): clamped r·q_w of those channels
    filters: torch.Tensor  # int64 (G'): the number of channels on each grid
    excess: torch.Tensor  # int32 (C_out): Σ|v − clamp(v)| of every filter
    step: torch.Tensor  # float32 (C_out): −Δ of every channel's grid
    geometry: ConvGeometry
    zero_points_are_codes: bool  # else zero padding has no code: the float kernel runs

    @classmethod
    def build(cls, layer: QuantAdder2d, key: tuple) -> _SadPlan:
        from adderquant.ops.sad import ConvGeometry

        scales, zero_points, label = layer._grids()
        clamped, excess = byte_weights(layer.weight_codes, layer.codes)
        channels = torch.argsort(label, stable=True)
        return cls(
            key=key,
            scales=scales.float(),
            zero_points=zero_points.to(torch.int32),
            channels=channels.to(torch.int32),
            weights=clamped[channels].to(torch.uint8).contiguous(),
            filters=torch.bincount(label, minlength=len(scales)).to(torch.int64),
            excess=excess.to(torch.int32),
            step=-scales[label].float(),
            geometry=ConvGeometry(tuple(layer.weight_codes.shape[2:]), layer.stride,
                                  layer.padding),
            zero_points_are_codes=bool(((zero_points >= 0)
                                        & (zero_points <= layer.codes.act_max)).all()),
        )


@contextmanager
def integer_path(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block, every :class:`QuantAdder2d` of ``model`` runs the integer SAD kernel
    where it applies (``enabled``) or always the float adder kernel on dequantized values;
    afterwards each layer's previous choice is restored. Only ``model`` is affected."""
    layers = [m for m in model.modules() if isinstance(m, QuantAdder2d)]
    previous = [m.use_integer_path for m in layers]
    for m in layers:
        m.use_integer_path = enabled
    try:
        yield model
    finally:
        for m, p in zip(layers, previous, strict=True):
            m.use_integer_path = p


def adder_layers(model: nn.Module) -> dict[str, Adder2d]:
    """The model's float adder layers by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Adder2d)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the sub-module called ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
