"""The splits of a training run and their batches, sharded over the processes of a
distributed run.

Training batches follow ``torch.utils.data.DistributedSampler`` re-seeded each epoch
(``set_epoch``): with one process it is a plain seeded shuffle, with ``world`` processes each
takes every ``world``-th index of the same permutation, so a global batch of ``B`` images is the
same set of images however many processes share it. Evaluation shards take every ``world``-th
image, without the sampler's padding, so that summed counts are exact.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from adderquant.data.idx import IDX_VARIANTS
from adderquant.data.image_folder import ImageFolder, load_image_folder, sample_seed
from adderquant.data.loader import DATASET_CLASSES, load_dataset
from adderquant.data.transforms import random_crop_flip

IMAGE_FOLDER = "image-folder"
# The augmentation each dataset's training recipe can switch on.
AUGMENTATIONS = {"cifar10": "crop+flip", "cifar100": "crop+flip",
                 IMAGE_FOLDER: "random-resized-crop+flip"}
TRAINING_DATASETS = ("cifar10", "cifar100", *IDX_VARIANTS, IMAGE_FOLDER)

Batch = tuple[torch.Tensor, torch.Tensor]


def epoch_order(length: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                shuffle: bool = True) -> list[int]:
    """The indices process ``rank`` of ``world`` visits in ``epoch``."""
    sampler = DistributedSampler(range(length), num_replicas=world, rank=rank,
                                 shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


class MemorySplit:
    """uint8 images ``N x C x H x W`` and int64 labels held in memory; the CIFAR pad-4 crop
    + flip, where asked, is drawn batch-wise from a generator seeded by (seed, epoch, rank)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def first(self, n: int) -> MemorySplit:
        return MemorySplit(self.images[:n], self.labels[:n])

    def holdout(self, n: int) -> tuple[MemorySplit, MemorySplit]:
        """The first ``len - n`` images and the last ``n``."""
        cut = len(self) - n
        return self.first(cut), MemorySplit(self.images[cut:], self.labels[cut:])

    def batches(self, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                augment: bool = False, workers: int = 0) -> Iterator[Batch]:
        order = torch.tensor(epoch_order(len(self), epoch, seed, rank, world), dtype=torch.long)
        generator = torch.Generator().manual_seed(sample_seed(seed, epoch, rank))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x = self.images[idx]
            yield (random_crop_flip(x, generator) if augment else x), self.labels[idx]

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1,
                     workers: int = 0) -> Iterator[Batch]:
        images, labels = self.images[rank::world], self.labels[rank::world]
        for start in range(0, len(images), batch_size):
            yield images[start:start + batch_size], labels[start:start + batch_size]


class FolderSplit:
    """Images of an image folder, decoded by ``workers`` data-loader processes."""

    def __init__(self, dataset: ImageFolder) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.dataset[0][0].shape)

    def first(self, n: int) -> FolderSplit:
        return FolderSplit(ImageFolder(self.dataset.samples[:n], self.dataset.classes))

    def holdout(self, n: int) -> tuple[FolderSplit, FolderSplit]:
        """The first ``len - n`` images and the last ``n`` (in class order)."""
        cut = len(self) - n
        rest = ImageFolder(self.dataset.samples[cut:], self.dataset.classes)
        return self.first(cut), FolderSplit(rest)

    def batches(self, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                augment: bool = False, workers: int = 0) -> Iterator[Batch]:
        self.dataset.augment, self.dataset.seed, self.dataset.epoch = augment, seed, epoch
        sampler = DistributedSampler(self.dataset, num_replicas=world, rank=rank, seed=seed)
        sampler.set_epoch(epoch)
        yield from DataLoader(self.dataset, batch_size, sampler=sampler, num_workers=workers)

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1,
                     workers: int = 0) -> Iterator[Batch]:
        self.dataset.augment = False
        shard = Subset(self.dataset, range(rank, len(self.dataset), world))
        yield from DataLoader(shard, batch_size, num_workers=workers)


Split = MemorySplit | FolderSplit


@dataclass
class TrainingData:
    """The training split, the split validated after every epoch, the test split (``None``
    when validation already runs on it) and the number of classes."""

    train: Split
    val: Split
    test: Split | None
    num_classes: int
    val_name: str


def load_training_data(dataset: str, root: str | os.PathLike | None = None,
                       val_split: int = 0, limit: int | None = None) -> TrainingData:
    """The splits of ``dataset``: with ``val_split`` N > 0 the last N training images are held
    out for validation and the test split is scored at the end; with 0, validation runs on the
    test split. ``limit`` keeps the first images of the training and test splits only."""
    if dataset not in TRAINING_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of "
                         f"{', '.join(TRAINING_DATASETS)}")
    if dataset == IMAGE_FOLDER:
        if root is None:
            raise ValueError("the image-folder dataset needs --data DIR (a folder holding "
                             "train/<class>/ and val/<class>/)")
        train_set = load_image_folder(root, train=True)
        train = FolderSplit(train_set)
        test = FolderSplit(load_image_folder(root, train=False, classes=train_set.classes))
        classes = len(train_set.classes)
    else:
        train = MemorySplit(*load_dataset(dataset, root, train=True))
        test = MemorySplit(*load_dataset(dataset, root, train=False))
        classes = DATASET_CLASSES[dataset]
    if limit is not None:
        train, test = train.first(limit), test.first(limit)
    if not 0 <= val_split < len(train):
        raise ValueError(f"--val-split {val_split} must hold out fewer than the {len(train)} "
                         f"training images of {dataset}")
    if val_split == 0:
        return TrainingData(train, test, None, classes, "test")
    rest, held_out = train.holdout(val_split)
    return TrainingData(rest, held_out, test, classes, f"last {val_split} training images")
