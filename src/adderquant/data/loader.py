"""In-memory datasets as batches of normalised float tensors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from adderquant import hub
from adderquant.data.cifar import NUM_CLASSES as CIFAR_CLASSES
from adderquant.data.cifar import load_cifar
from adderquant.data.idx import IDX_VARIANTS, load_idx_dataset
from adderquant.data.idx import NUM_CLASSES as IDX_CLASSES
from adderquant.data.transforms import NORMALISATION, normalize, random_crop_flip

DATASETS = ("cifar10", "cifar100", *IDX_VARIANTS)
DATASET_CLASSES = {**CIFAR_CLASSES, **dict.fromkeys(IDX_VARIANTS, IDX_CLASSES)}


def load_dataset(
    name: str, root: str | Path | None = None, train: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw ``(uint8 images N x C x H x W, int64 labels)`` of a named dataset.

    ``root`` defaults to the folder :func:`adderquant.hub.dataset_root` finds (the environment,
    ``../shared/data``, ``/usr/share/datasets``, the cache) or downloads the dataset into.
    """
    if name in ("cifar10", "cifar100"):
        return load_cifar(hub.dataset_root(name, root), name, train)
    if name in IDX_VARIANTS:
        return load_idx_dataset(name, root, train)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


class TensorLoader:
    """Iterate ``(normalised images, labels)`` batches over uint8 tensors held in memory.

    ``augment=True`` applies the CIFAR pad-4 crop + flip; ``seed`` makes shuffling and
    augmentation reproducible (each pass draws new crops from the same stream);
    ``normalisation`` ``(mean, std)`` replaces the dataset's own (a model trained with other
    statistics).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        dataset: str,
        batch_size: int = 256,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        num_batches: int | None = None,
        normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> None:
        if len(images) == 0:
            raise ValueError("the dataset is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.images, self.labels = images, labels
        self.mean, self.std = normalisation or NORMALISATION[dataset]
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.generator = torch.Generator().manual_seed(seed)
        self.num_batches = num_batches

    def __len__(self) -> int:
        full = -(-len(self.images) // self.batch_size)
        return full if self.num_batches is None else self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        emitted = 0
        while True:
            n = len(self.images)
            order = torch.randperm(n, generator=self.generator) if self.shuffle else None
            for start in range(0, n, self.batch_size):
                if emitted == len(self):
                    return
                idx = slice(start, start + self.batch_size) if order is None else (
                    order[start : start + self.batch_size]
                )
                x = self.images[idx]
                if self.augment:
                    x = random_crop_flip(x, self.generator)
                yield normalize(x, self.mean, self.std), self.labels[idx]
                emitted += 1
            if self.num_batches is None:
                return
