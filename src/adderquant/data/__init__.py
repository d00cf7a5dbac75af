"""Datasets (CIFAR, MNIST/Fashion-MNIST), normalisation, augmentation and batching."""

from adderquant.data.cifar import DatasetNotFoundError, load_cifar
from adderquant.data.loader import TensorLoader, load_dataset
from adderquant.data.safe_pickle import UnsafePickleError, safe_load
from adderquant.data.transforms import NORMALISATION, normalize, random_crop_flip

__all__ = [
    "NORMALISATION",
    "DatasetNotFoundError",
    "TensorLoader",
    "UnsafePickleError",
    "load_cifar",
    "load_dataset",
    "normalize",
    "random_crop_flip",
    "safe_load",
]
