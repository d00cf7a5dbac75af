"""CIFAR-10/100 in the standard python layout (a folder or the official ``.tar.gz``)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import torch

from adderquant.data.safe_pickle import safe_load

FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
_FILES = {
    ("cifar10", True): [f"data_batch_{i}" for i in range(1, 6)],
    ("cifar10", False): ["test_batch"],
    ("cifar100", True): ["train"],
    ("cifar100", False): ["test"],
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset that is not where it was looked for."""


def _resolve(root: Path, name: str) -> Path:
    for cand in (root, root / FOLDERS[name], root / ARCHIVES[name]):
        if cand.is_file() and cand.name.endswith((".tar.gz", ".tgz")):
            return cand
        if cand.is_dir() and (cand / _FILES[(name, False)][0]).exists():
            return cand
    raise DatasetNotFoundError(
        f"{name} not found under {root} (looked for {FOLDERS[name]}/ and {ARCHIVES[name]}); "
        f"pass --data DIR, set $ADDERQUANT_DATA, or run `adderquant data fetch {name} --to DIR`"
    )


def _read_member(src: Path, name: str) -> bytes:
    if src.is_dir():
        return (src / name).read_bytes()
    with tarfile.open(src, "r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile() and Path(member.name).name == name:
                f = tar.extractfile(member)
                assert f is not None
                return f.read()
    raise DatasetNotFoundError(f"{src} has no member {name}")


def load_cifar(
    root: str | Path, name: str = "cifar10", train: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images uint8 N x 3 x 32 x 32, labels int64 N)``."""
    if name not in FOLDERS:
        raise ValueError(f"unknown CIFAR variant {name!r}; use 'cifar10' or 'cifar100'")
    src = _resolve(Path(root), name)
    images, labels = [], []
    for fname in _FILES[(name, train)]:
        batch = safe_load(_read_member(src, fname), source=str(src / fname))
        if not isinstance(batch, dict):
            raise ValueError(f"{src / fname}: expected a dict, got {type(batch).__name__}")
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        key = "labels" if "labels" in batch else "fine_labels"
        if "data" not in batch or key not in batch:
            raise ValueError(f"{src / fname}: missing 'data' or '{key}' entry")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{src / fname}: data has shape {data.shape}, expected (N, 3072)")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))
