"""Datasets (CIFAR, MNIST/Fashion-MNIST), normalisation, augmentation and batching."""

from adderquant.data.cifar import load_cifar
from adderquant.data.errors import CorruptDatasetError, DatasetNotFoundError
from adderquant.data.idx import load_idx_dataset, read_idx
from adderquant.data.loader import DATASET_CLASSES, DATASETS, TensorLoader, load_dataset
from adderquant.data.safe_pickle import CorruptPickleError, UnsafePickleError, safe_load
from adderquant.data.transforms import NORMALISATION, normalize, random_crop_flip

__all__ = [
    "DATASETS",
    "DATASET_CLASSES",
    "NORMALISATION",
    "CorruptDatasetError",
    "CorruptPickleError",
    "DatasetNotFoundError",
    "TensorLoader",
    "UnsafePickleError",
    "load_cifar",
    "load_dataset",
    "load_idx_dataset",
    "normalize",
    "random_crop_flip",
    "read_idx",
    "safe_load",
]
