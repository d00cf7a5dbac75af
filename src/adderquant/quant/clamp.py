"""The lossless weight range clamp of an adder layer.

For every input ``x`` in ``[lo, hi]``: ``|x − w| = |x − clamp(w, lo, hi)| + dist(w, [lo, hi])``.
Clamping the weights therefore only removes a per-output-channel constant, returned as the bias
``−Σ dist(w, [lo, hi])`` to add to the adder output.
"""

from __future__ import annotations

import torch


def distance_to_interval(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``dist(w, [lo, hi]) = max(lo − w, 0) + max(w − hi, 0)``, elementwise."""
    return (lo - w).clamp_min(0) + (w - hi).clamp_min(0)


def _per_channel(v: torch.Tensor | float, weight: torch.Tensor) -> torch.Tensor:
    """A scalar, or a per-output-channel vector shaped to broadcast against ``weight``."""
    t = torch.as_tensor(v, dtype=weight.dtype)
    return t.reshape((-1,) + (1,) * (weight.dim() - 1)) if t.dim() else t


def lossless_clamp(
    weight: torch.Tensor, lo: torch.Tensor | float, hi: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp ``weight`` (C_out x ...) into ``[lo, hi]`` (scalars or per-output-channel tensors).

    Returns ``(clamped weight, bias)`` with ``bias[t] = −Σ dist(W[t], [lo_t, hi_t])`` so that
    ``adder(x, W) == adder(x, clamped) + bias`` for every input in ``[lo, hi]``.
    """
    lo_t, hi_t = _per_channel(lo, weight), _per_channel(hi, weight)
    if torch.any(lo_t > hi_t):
        raise ValueError("clamp interval has lo > hi")
    bias = -distance_to_interval(weight, lo_t, hi_t).flatten(1).sum(dim=1)
    return torch.maximum(torch.minimum(weight, hi_t), lo_t), bias
