"""The adder operator ``adder2d``: forward ``-sum |x - w|`` and AdderNet's training gradients."""

from __future__ import annotations

import torch

from adderquant.ops import reference


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias, groups: int) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("adder2d: x and weight must be torch.Tensor")
    if x.dim() != 4:
        raise ValueError(f"adder2d: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(
            f"adder2d: weight must be 4-D (C_out, C_in/groups, kH, kW), got {tuple(weight.shape)}"
        )
    if x.dtype not in (torch.float32, torch.float64) or x.dtype != weight.dtype:
        raise TypeError(
            f"adder2d: x and weight must share a float32 or float64 dtype, got {x.dtype} and "
            f"{weight.dtype}; convert with .float()"
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
    """Adder convolution with the geometry of ``F.conv2d``.

    ``eta`` rescales the weight gradient to ``eta * sqrt(numel(w)) / ||grad_w||`` times itself
    (``None`` disables it). ``true_gradient=True`` uses the exact sign gradients instead of
    AdderNet's full-precision / HardTanh ones.
    """
    _check_inputs(x, weight, bias, groups)
    out = reference.adder2d_reference(x, weight, None, stride, padding, dilation, groups)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out
