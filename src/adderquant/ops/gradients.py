"""AdderNet's adaptive scaling of the weight gradient, shared by the CPU and CUDA adder2d."""

from __future__ import annotations

import math

import torch


def adaptive_scale(grad_w: torch.Tensor, eta: float) -> torch.Tensor:
    """``grad_w * eta * sqrt(numel) / ||grad_w||``; ``grad_w`` unchanged when its norm is not
    positive (all zeros, or NaN). Written without a branch on the norm so that it traces."""
    norm = torch.linalg.vector_norm(grad_w)
    factor = eta * math.sqrt(grad_w.numel()) / norm
    return grad_w * torch.where(norm > 0, factor, torch.ones_like(factor))


def rescale_(grad_w: torch.Tensor, eta: float) -> None:
    """:func:`adaptive_scale` in place."""
    grad_w.copy_(adaptive_scale(grad_w, eta))
