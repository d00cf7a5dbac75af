"""Activation clipping thresholds ``A``: the released code's quantile rule, plain quantiles,
the maximum, and the MSE-optimal threshold of a uniform unsigned quantizer.

The released code (MindSpore ``QAdder2dKmeansGroupShare``) takes, for every calibration batch,
the values ``|x|`` of the whole input tensor sorted ascending and reads the element at index
``int((round(n·q) − 1)·q)`` with ``q = 0.9997`` (Python's ``round``: half to even). The quantile
enters twice, so the rank read is about ``q² ≈ 0.9994`` of the batch. ``A`` is the maximum of
these values over the calibration batches (floored at ``1e-3``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RULES = ("released", "plain")
RELEASED_QUANTILE = 0.9997
MIN_THRESHOLD = 1e-3  # the released code's floor for A


def released_quantile_index(n: int, q: float) -> int:
    """Sorted index read by the released code: ``int((round(n·q) − 1)·q)``."""
    return min(max(int((round(n * q) - 1) * q), 0), n - 1)


def plain_quantile_index(n: int, q: float) -> int:
    """Sorted index ``int(q·n)``, clamped to the last element."""
    return min(max(int(q * n), 0), n - 1)


def quantile_index(n: int, q: float, rule: str) -> int:
    """Sorted index of the ``q``-quantile of ``n`` values under ``rule`` (see :data:`RULES`)."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {q}")
    if rule == "released":
        return released_quantile_index(n, q)
    if rule == "plain":
        return plain_quantile_index(n, q)
    raise ValueError(f"unknown quantile rule {rule!r}; choose one of {RULES}")


def block_view(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``flat`` as rows of equal length (about ``n/(16k)``, at most 64) and the leftover tail."""
    n = flat.numel()
    width = max(1, min(64, n // max(16 * k, 1)))
    body = (n // width) * width
    return flat[:body].view(-1, width), flat[body:]


def summarize_batch(
    x: torch.Tensor, requests: Sequence[tuple[str, float]]
) -> tuple[float, float, list[float]]:
    """``(min, max, [quantile of |x| for each (rule, q)])`` of one batch, in one pass.

    The quantiles are exact: the ``k`` largest ``|x|`` all lie in the ``k`` rows (of a block
    view of ``x``) with the largest row maxima of ``|x|``, so only those rows are sorted.
    """
    flat = x.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("cannot summarize an empty tensor")
    lo_t, hi_t = torch.aminmax(flat)
    lo, hi = float(lo_t), float(hi_t)
    indices = [quantile_index(n, q, rule) for rule, q in requests]
    if not indices:
        return lo, hi, []
    k = n - min(indices)
    rows, tail = block_view(flat, k)
    if rows.numel() and rows.shape[0] > k:
        # row maxima of |x| (two plain reductions are faster than one aminmax along rows)
        row_abs = rows.amax(dim=1) if lo >= 0 else torch.maximum(rows.amax(dim=1),
                                                                 rows.amin(dim=1).neg())
        chosen = row_abs.topk(k).indices
        candidates = torch.cat([rows[chosen].reshape(-1), tail])
    else:
        candidates = flat
    top = candidates.abs().topk(k).values
    return lo, hi, [float(top[n - 1 - i]) for i in indices]


def batch_abs_quantiles(
    x: torch.Tensor, requests: Sequence[tuple[str, float]]
) -> list[float]:
    """Per-batch quantiles of ``|x|`` over all of ``x``, one for each ``(rule, q)`` request."""
    return summarize_batch(x, requests)[2]


def quantize_unsigned(
    x: torch.Tensor, threshold: float | torch.Tensor, bits: int
) -> torch.Tensor:
    """``Δ·clamp(round(x/Δ), 0, 2^b − 1)`` with ``Δ = threshold/(2^b − 1)`` (a tensor of
    thresholds broadcasts against ``x``)."""
    levels = (1 << bits) - 1
    step = threshold / levels
    return torch.clamp(torch.round(x / step), 0, levels) * step


def mse_optimal_threshold(
    sample: torch.Tensor,
    bits: int,
    candidates: int = 100,
    low: float = 0.05,
    max_values: int = 1 << 16,
) -> float:
    """The threshold ``A`` minimising ``mean (x − Q_A(x))²`` for the unsigned ``bits``-bit
    quantizer on ``[0, A]``, searched on ``candidates`` evenly spaced values in
    ``[low·max, max]`` (float64) over at most ``max_values`` evenly strided values of
    ``sample`` (its maximum always included)."""
    x = sample.detach().double().flatten().clamp_min(0)
    if x.numel() == 0:
        raise ValueError("the activation sample is empty; calibrate on at least one batch")
    top = float(x.max())
    if x.numel() > max_values:
        x = torch.cat([x[:: -(-x.numel() // max_values)], x.new_tensor([top])])
    if top <= 0:
        return MIN_THRESHOLD
    grid = torch.linspace(low * top, top, candidates, dtype=torch.float64)
    errors = [(quantize_unsigned(x, chunk.view(-1, 1), bits) - x).pow_(2).mean(dim=1)
              for chunk in grid.split(25)]  # 25 candidates per broadcast pass
    return float(grid[int(torch.argmin(torch.cat(errors)))])
