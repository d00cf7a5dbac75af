"""Error-driven choice of an adder layer's activation interval(s) on one shared grid.

For an interval ``[a, c]`` (``a ≤ 0 ≤ c``) and ``b`` bits the same grid has step
``Δ = (c − a)/(2^b − 1)`` and the integer zero point ``z = round(−a/Δ)``; it spans
``[lo, hi] = [−z·Δ, (2^b − 1 − z)·Δ]`` and holds 0 exactly (the padding value). Inputs are
clipped into ``[lo, hi]``, weights are clamped into it losslessly (bias ``−Σ dist(w, [lo, hi])``)
and both are rounded to the grid.

The search runs on a sample of the layer's input patches (``LayerSample``): for every candidate
interval it computes, for every output channel, the error of the quantized output against the
float output (``channel_errors``). Since a channel's output depends only on its own weights and
on the grid of its group, that matrix gives the exact error of any grouping; ``select_groups``
picks the G candidate intervals (groups) and the channel assignment of least total error.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from adderquant.ops.sad import sad_conv2d
from adderquant.quant.clamp import lossless_clamp
from adderquant.quant.grid import check_bits


@dataclass(frozen=True)
class IntervalGrid:
    """The same grid of one interval: ``x̂ = scale·(q − zero_point)``, ``q ∈ [0, 2^bits − 1]``."""

    scale: float
    zero_point: int
    bits: int

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def lo(self) -> float:
        return -self.zero_point * self.scale

    @property
    def hi(self) -> float:
        return (self.levels - self.zero_point) * self.scale


def interval_grid(a: float, c: float, bits: int) -> IntervalGrid:
    """The grid of ``bits`` bits covering ``[a, c]`` (``a ≤ 0 ≤ c``, ``a < c``), 0 on it."""
    check_bits(bits)
    if not (a <= 0.0 <= c and a < c) or not np.isfinite([a, c]).all():
        raise ValueError(
            f"the quantization interval must satisfy a <= 0 <= c and a < c, got [{a}, {c}]"
        )
    levels = (1 << bits) - 1
    scale = (c - a) / levels
    return IntervalGrid(scale, int(round(-a / scale)), bits)


def grid_codes(v: torch.Tensor, grid: IntervalGrid) -> torch.Tensor:
    """``clamp(round(v/Δ) + z, 0, 2^b − 1)`` as a float tensor of integers."""
    return torch.clamp(torch.round(v / grid.scale) + grid.zero_point, 0, grid.levels)


def candidate_intervals(x_min: float, x_max: float, count: int, ratio: float) -> np.ndarray:
    """Candidate intervals ``[a, c]`` (rows) below the observed range: each nonzero end shrinks
    geometrically, ``x_max·ratio^j`` (and ``x_min·ratio^i``), ``j < count``; an end at 0 (a
    non-negative or non-positive input) stays at 0."""
    if count < 1 or not 0.0 < ratio < 1.0:
        raise ValueError(f"need count >= 1 and 0 < ratio < 1, got {count} and {ratio}")
    hi, lo = max(x_max, 0.0), min(x_min, 0.0)
    if hi == lo:
        raise ValueError("the layer's calibration inputs are all zero; nothing to quantize")
    steps = ratio ** np.arange(count)
    highs = hi * steps if hi > 0 else np.zeros(1)
    lows = lo * steps if lo < 0 else np.zeros(1)
    return np.array([(a, c) for a in lows for c in highs])


def sample_patches(
    inputs: torch.Tensor, kernel, stride, padding, dilation, count: int, seed: int = 0
) -> torch.Tensor:
    """``count`` rows of the unfolded ``inputs`` (the columns ``F.unfold`` gives, zero padding
    included) at output positions drawn uniformly without replacement (all if fewer)."""
    (kh, kw), (sh, sw) = _pair(kernel), _pair(stride)
    (ph, pw), (dh, dw) = _pair(padding), _pair(dilation)
    n, _, h, w = inputs.shape
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError("the layer's kernel does not fit its input")
    gen = torch.Generator().manual_seed(seed)
    total = n * ho * wo
    pick = torch.randperm(total, generator=gen)[:count] if count < total else torch.arange(total)
    img, rest = pick // (ho * wo), pick % (ho * wo)
    rows = (rest // wo * sh).view(-1, 1) + torch.arange(kh).view(1, -1) * dh  # (P, kh)
    cols = (rest % wo * sw).view(-1, 1) + torch.arange(kw).view(1, -1) * dw  # (P, kw)
    padded = F.pad(inputs, (pw, pw, ph, ph))
    patches = padded[img.view(-1, 1, 1), :, rows.view(-1, kh, 1), cols.view(-1, 1, kw)]
    return patches.permute(0, 3, 1, 2).reshape(len(pick), -1).contiguous()  # (P, C·kh·kw)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass
class LayerSample:
    """Input patches of one adder layer, its weights and float outputs.

    ``patches`` (P, K) are rows of the layer's unfolded input (padding included), ``weight``
    (C, K) its flattened filters and ``output`` (P, C) the float64 output ``−Σ|x − w|``.
    """

    patches: torch.Tensor
    weight: torch.Tensor
    output: torch.Tensor

    @classmethod
    def from_inputs(
        cls,
        inputs: torch.Tensor,
        weight: torch.Tensor,
        stride,
        padding,
        dilation,
        count: int,
        seed: int = 0,
    ) -> LayerSample:
        """Sample ``count`` output positions of ``inputs`` (N, C_in, H, W) uniformly."""
        if inputs.dim() != 4 or len(inputs) == 0:
            raise ValueError(
                "the clipping search needs the kept calibration inputs of the layer "
                "(N, C, H, W); calibrate with keep_images > 0"
            )
        patches = sample_patches(
            inputs.float(), weight.shape[2:], stride, padding, dilation, count, seed
        )
        w = weight.detach().float().flatten(1).contiguous()
        return cls(patches, w, -torch.cdist(patches.double(), w.double(), p=1))


def code_distances(qx: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """``Σ_k |qx[p, k] − qw[c, k]|`` (P, C) int32 of integer codes in 0..255 (float tensors
    (P, K) and (C, K)), by the integer SAD kernel: the P rows are the columns of one 1x1
    "image" of K channels."""
    x = qx.to(torch.uint8).t().contiguous().view(1, qx.shape[1], 1, qx.shape[0])
    w = qw.to(torch.uint8).view(qw.shape[0], qw.shape[1], 1, 1)
    return sad_conv2d(x, w).view(qw.shape[0], qx.shape[0]).t()


def quantized_output(sample: LayerSample, grid: IntervalGrid) -> torch.Tensor:
    """The sampled layer output (P, C, float64) with inputs and clamped weights on ``grid``."""
    clamped, bias = lossless_clamp(sample.weight, grid.lo, grid.hi)
    qx, qw = grid_codes(sample.patches, grid), grid_codes(clamped, grid)
    return -grid.scale * code_distances(qx, qw).double() + bias.double()


def channel_errors(
    sample: LayerSample, candidates: np.ndarray, bits: int, bias_correction: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel output error for every candidate interval: ``(errors, mean_errors)``, both
    (C channels x J candidates). ``mean_errors`` is the mean of quantized minus float output;
    ``errors`` the mean squared error, with the mean removed first when ``bias_correction``
    (a per-channel bias then corrects it), i.e. the error's variance."""
    c_out = sample.weight.shape[0]
    errors, means = np.empty((c_out, len(candidates))), np.empty((c_out, len(candidates)))
    for j, (a, c) in enumerate(candidates):
        diff = quantized_output(sample, interval_grid(float(a), float(c), bits)) - sample.output
        mean = diff.mean(dim=0)
        if bias_correction:
            diff = diff - mean
        errors[:, j] = diff.square().mean(dim=0).numpy()
        means[:, j] = mean.numpy()
    return errors, means


EXHAUSTIVE_LIMIT = 20000  # candidate subsets scored at once by select_groups


def select_groups(errors: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Choose up to ``groups`` columns of ``errors`` (C channels x J candidates) and assign
    every channel to one of them so that the summed error is least.

    Exact (every subset scored) when there are at most ``EXHAUSTIVE_LIMIT`` subsets, else
    greedy addition followed by single swaps until none improves (a local optimum of this
    facility-location problem). Returns ``(chosen columns sorted, label of every channel)``;
    a chosen column that no channel prefers is dropped.
    """
    if errors.ndim != 2 or errors.size == 0:
        raise ValueError("errors must be a non-empty (channels x candidates) matrix")
    if groups < 1:
        raise ValueError(f"groups must be at least 1, got {groups}")
    n_cand = errors.shape[1]
    n_groups = min(groups, errors.shape[0], n_cand)
    if math.comb(n_cand, n_groups) <= EXHAUSTIVE_LIMIT:
        subsets = np.array(list(itertools.combinations(range(n_cand), n_groups)))
        costs = errors[:, subsets].min(axis=2).sum(axis=0)
        chosen = subsets[int(np.argmin(costs))]
    else:
        chosen = np.array(sorted(_local_search(errors, n_groups)))
    labels = np.argmin(errors[:, chosen], axis=1)
    used = np.unique(labels)
    remap = np.full(len(chosen), -1)
    remap[used] = np.arange(len(used))
    return chosen[used], remap[labels]


def _local_search(errors: np.ndarray, n_groups: int) -> list[int]:
    """Greedy addition of columns, then single swaps while one lowers the summed error."""

    def cost(cols: list[int]) -> float:
        return float(errors[:, cols].min(axis=1).sum())

    chosen = [int(np.argmin(errors.sum(axis=0)))]
    while len(chosen) < n_groups:
        best = errors[:, chosen].min(axis=1, keepdims=True)
        gain = np.minimum(errors, best).sum(axis=0)
        gain[chosen] = np.inf
        chosen.append(int(np.argmin(gain)))
    current, improved = cost(chosen), True
    while improved:
        improved = False
        for slot in range(n_groups):
            for j in sorted(set(range(errors.shape[1])) - set(chosen)):
                trial = chosen[:slot] + [j] + chosen[slot + 1 :]
                trial_cost = cost(trial)
                if trial_cost < current - 1e-12 * abs(current):
                    chosen, current, improved = trial, trial_cost, True
    return chosen
