"""Clustering-based weight grouping: 1-D k-means++ over a per-filter feature."""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

FEATURES = ("max_abs", "mean_abs", "std", "range")


def filter_feature(weight: torch.Tensor, feature: str = "max_abs") -> torch.Tensor:
    """One value per output filter: ``max|w|`` (the paper's), ``mean|w|``, ``std`` or
    ``range`` (max − min)."""
    flat = weight.detach().flatten(1).double()
    if feature == "max_abs":
        return flat.abs().amax(dim=1)
    if feature == "mean_abs":
        return flat.abs().mean(dim=1)
    if feature == "std":
        return flat.std(dim=1, unbiased=False)
    if feature == "range":
        return flat.amax(dim=1) - flat.amin(dim=1)
    raise ValueError(f"unknown clustering feature {feature!r}; choose one of {FEATURES}")


def kmeans_groups(values: torch.Tensor, groups: int, seed: int = 0) -> torch.Tensor:
    """Cluster 1-D ``values`` into ``groups`` clusters (k-means++); labels are renumbered so
    that group 0 has the smallest centre. ``groups == len(values)`` is one group per channel."""
    n = len(values)
    if not 1 <= groups <= n:
        raise ValueError(f"groups must be between 1 and C_out={n}, got {groups}")
    if groups == 1:
        return torch.zeros(n, dtype=torch.long)
    if groups == n:
        return torch.argsort(torch.argsort(values)).long()
    data = values.detach().double().numpy().reshape(-1, 1)
    # one thread: a few dozen points, where OpenMP start-up and contention dominate
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        # fewer distinct values than clusters: the labels are still a valid grouping
        warnings.filterwarnings("ignore", message="Number of distinct clusters",
                                category=ConvergenceWarning)
        km = KMeans(n_clusters=groups, init="k-means++", n_init=10, random_state=seed).fit(data)
    order = np.argsort(km.cluster_centers_.ravel())
    rank = np.empty_like(order)
    rank[order] = np.arange(groups)
    return torch.from_numpy(rank[km.labels_]).long()


def group_filters(
    weight: torch.Tensor, groups: int, feature: str = "max_abs", seed: int = 0
) -> torch.Tensor:
    """Group label (0..G−1) of every output filter of ``weight`` (memoised: the same layer is
    grouped once for every bit width and configuration of a run)."""
    values = filter_feature(weight, feature).cpu()
    return _cached_groups(values.numpy().tobytes(), groups, seed).clone()


@lru_cache(maxsize=1024)
def _cached_groups(values: bytes, groups: int, seed: int) -> torch.Tensor:
    return kmeans_groups(torch.from_numpy(np.frombuffer(values, dtype=np.float64).copy()),
                         groups, seed)
