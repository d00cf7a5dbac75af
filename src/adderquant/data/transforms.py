"""Normalisation and the CIFAR augmentation on uint8 tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Per-channel mean/std of the training sets, on pixels scaled to [0, 1]. CIFAR10_STD is the
# customary value the released AdderNet models were trained with, not the per-pixel standard
# deviation of the training set (0.2470, 0.2435, 0.2616): keep it, or those models lose accuracy.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)

NORMALISATION = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "mnist": (MNIST_MEAN, MNIST_STD),
    "fashion-mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD),
}


def normalize(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 N x C x H x W -> float32 ``(x/255 - mean) / std``."""
    x = images.float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def random_crop_flip(
    images: torch.Tensor, generator: torch.Generator, padding: int = 4
) -> torch.Tensor:
    """Pad-``padding`` (zeros) random crop and random horizontal flip, per image; works on any
    dtype, N x C x H x W.

    Draws from ``generator``, in this order: N row offsets and N column offsets in
    ``[0, 2 * padding]``, then N coins (``rand < 0.5`` flips the image).
    """
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
    cols = dx.view(n, 1) + torch.arange(w).view(1, w)
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols).view(n, 1, 1, w)
    idx_n = torch.arange(n).view(n, 1, 1, 1)
    idx_c = torch.arange(images.shape[1]).view(1, -1, 1, 1)
    return padded[idx_n, idx_c, rows, cols]
