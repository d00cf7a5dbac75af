"""Plain PyTorch definition of the adder layer (unfold based), kept as the test reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adderquant.ops.geometry import _pair, output_size  # noqa: F401 (nn.adder imports _pair here)


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

    Autograd through this function gives the true (sign) gradients. It is the definition
    also for NaN and inf: ``|x - w|`` and the sum follow IEEE arithmetic term by term (evaluate
    it in float64 to compare with the compiled kernel, whose non-finite results are the
    float64 definition rounded).
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
