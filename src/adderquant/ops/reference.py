"""Plain PyTorch definition of the adder layer (unfold based), kept as the test reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def output_size(
    h: int, w: int, kernel: tuple[int, int], stride, padding, dilation
) -> tuple[int, int]:
    """Spatial output size with the geometry of ``F.conv2d``."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    ho = (h + 2 * ph - dh * (kernel[0] - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kernel[1] - 1) - 1) // sw + 1
    return ho, wo


def adder2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """``Y[n,t,i,j] = -sum_{c,u,v} |X[n,c,i*s+u,j*s+v] - W[t,c,u,v]|`` by explicit unfolding.

    Autograd through this function gives the true (sign) gradients.
    """
    n, c_in, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    ho, wo = output_size(h, w, (kh, kw), stride, padding, dilation)
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = cols.view(n, groups, 1, c_in_g * kh * kw, ho * wo)
    wg = weight.view(1, groups, c_out // groups, c_in_g * kh * kw, 1)
    out = -(cols - wg).abs().sum(dim=3)  # n, groups, c_out/groups, L
    out = out.reshape(n, c_out, ho, wo)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def adder2d_reference_grads(
    x: torch.Tensor,
    weight: torch.Tensor,
    grad_out: torch.Tensor,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AdderNet's modified gradients (before the adaptive rescaling), by explicit unfolding.

    ``grad_w = sum (x - w) * g`` and ``grad_x = sum clamp(w - x, -1, 1) * g``.
    """
    n, c_in, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    ho, wo = grad_out.shape[2:]
    k = c_in_g * kh * kw
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = cols.view(n, groups, 1, k, ho * wo)
    wg = weight.view(1, groups, c_out // groups, k, 1)
    g = grad_out.reshape(n, groups, c_out // groups, 1, ho * wo)
    diff = cols - wg  # n, G, t, k, L
    grad_w = (diff * g).sum(dim=(0, 4)).reshape(weight.shape)
    grad_cols = ((-diff).clamp(-1, 1) * g).sum(dim=2).reshape(n, groups * k, ho * wo)
    grad_x = F.fold(
        grad_cols, (h, w), (kh, kw), dilation=dilation, padding=padding, stride=stride
    )
    return grad_x, grad_w
