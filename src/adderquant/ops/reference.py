"""Plain PyTorch definition of the adder layer (unfold based), kept as the test reference."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F


def _pair(v: int | tuple[int, int], name: str) -> tuple[int, int]:
    """``(v, v)`` for an integer, ``(v[0], v[1])`` for a pair of integers; else a clear error
    naming ``name`` (stride, padding, dilation or kernel_size)."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(
                f"adder2d: {name} takes one integer or two (height, width), got {len(v)} values "
                f"{tuple(v)}"
            )
        return _integer(v[0], name), _integer(v[1], name)
    return (_integer(v, name),) * 2


def _integer(v, name: str) -> int:
    if isinstance(v, bool):
        raise TypeError(f"adder2d: {name} must be an integer, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(
            f"adder2d: {name} must be an integer or a pair of integers, got {v!r} "
            f"({type(v).__name__})"
        ) from None


def output_size(
    h: int, w: int, kernel: tuple[int, int], stride, padding, dilation
) -> tuple[int, int]:
    """Spatial output size with the geometry of ``F.conv2d``."""
    sh, sw = _pair(stride, "stride")
    (ph, pw), (dh, dw) = _pair(padding, "padding"), _pair(dilation, "dilation")
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
