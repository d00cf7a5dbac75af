"""``Adder2d``: a drop-in replacement for ``nn.Conv2d`` computing ``-sum |x - w|``."""

from __future__ import annotations

import torch
from torch import nn

from adderquant.ops import adder2d
from adderquant.ops.reference import _pair


class Adder2d(nn.Module):
    """Adder layer with the ``nn.Conv2d`` argument list.

    The weight parameter is named ``adder`` (C_out x C_in/groups x kH x kW) so that the released
    AdderNet checkpoints load unchanged. Weights are initialised N(0, 1) as in AdderNet, on
    ``device`` with ``dtype`` (default: torch's defaults), as ``nn.Conv2d`` does.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        eta: float | None = 0.2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide in_channels={in_channels} and "
                f"out_channels={out_channels}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.groups = groups
        self.eta = eta
        factory = {"device": device, "dtype": dtype}
        self.adder = nn.Parameter(
            torch.randn(out_channels, in_channels // groups, *self.kernel_size, **factory)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels, **factory)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adder2d(
            x, self.adder, self.bias, self.stride, self.padding, self.dilation, self.groups,
            eta=self.eta,
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s
