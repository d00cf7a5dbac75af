"""CIFAR-10/100 in the standard python layout (a folder or the official ``.tar.gz``)."""

from __future__ import annotations

import gzip
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from adderquant.data.errors import CorruptDatasetError, DatasetNotFoundError
from adderquant.data.safe_pickle import safe_load

FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
# CIFAR-100 files carry ``fine_labels`` (100 classes) and ``coarse_labels`` (20 superclasses).
LABEL_KEYS = {"cifar10": "labels", "cifar100": "fine_labels"}
_FILES = {
    ("cifar10", True): [f"data_batch_{i}" for i in range(1, 6)],
    ("cifar10", False): ["test_batch"],
    ("cifar100", True): ["train"],
    ("cifar100", False): ["test"],
}

__all__ = ["ARCHIVES", "FOLDERS", "DatasetNotFoundError", "load_cifar"]


def _resolve(root: Path, name: str) -> Path:
    hint = (
        f"pass --data DIR (the folder holding {FOLDERS[name]}/ or {ARCHIVES[name]}), set "
        f"$ADDERQUANT_DATA, or run `adderquant data fetch {name} --to DIR`"
    )
    if not root.exists():
        raise DatasetNotFoundError(f"{name}: data folder {root} does not exist; {hint}")
    for cand in (root, root / FOLDERS[name], root / ARCHIVES[name]):
        if cand.is_file() and cand.name.endswith((".tar.gz", ".tgz")):
            return cand
        if cand.is_dir() and (cand / _FILES[(name, False)][0]).exists():
            return cand
    raise DatasetNotFoundError(
        f"{name} not found under {root} (looked for {FOLDERS[name]}/ and {ARCHIVES[name]}); {hint}"
    )


def _read_members(src: Path, names: list[str]) -> dict[str, bytes]:
    """The bytes of the files ``names`` from a folder, or from an archive in one pass."""
    if src.is_dir():
        missing = [n for n in names if not (src / n).is_file()]
        if missing:
            raise DatasetNotFoundError(
                f"{src} lacks {', '.join(missing)}; re-download it (adderquant data fetch)"
            )
        return {n: (src / n).read_bytes() for n in names}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(src, "r:gz") as tar:
            for member in tar:
                base = Path(member.name).name
                if member.isfile() and base in names and base not in found:
                    f = tar.extractfile(member)
                    assert f is not None  # a regular file member always has contents
                    found[base] = f.read()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise CorruptDatasetError(
            f"{src}: corrupted or truncated archive ({e.__class__.__name__}: {e}); "
            "re-download it (adderquant data fetch)"
        ) from e
    missing = [n for n in names if n not in found]
    if missing:
        raise CorruptDatasetError(
            f"{src} has no member {', '.join(missing)}; is it a CIFAR archive?"
        )
    return found


def _parse_batch(raw: bytes, source: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_load(raw, source=source)
    if not isinstance(batch, dict):
        raise CorruptDatasetError(f"{source}: expected a dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    key = LABEL_KEYS[name]
    if "data" not in batch or key not in batch:
        raise CorruptDatasetError(f"{source}: missing 'data' or '{key}' entry (is it {name}?)")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise CorruptDatasetError(
            f"{source}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072)"
        )
    labels = np.asarray(batch[key], dtype=np.int64)
    if labels.shape != (len(data),):
        raise CorruptDatasetError(f"{source}: {labels.size} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES[name]):
        raise CorruptDatasetError(
            f"{source}: labels outside 0..{NUM_CLASSES[name] - 1} (is it {name}?)"
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(
    root: str | Path, name: str = "cifar10", train: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images uint8 N x 3 x 32 x 32, labels int64 N)`` (CIFAR-100: fine labels).

    ``root`` is the dataset folder itself, the folder holding it, or the official ``.tar.gz``.
    """
    if name not in FOLDERS:
        raise ValueError(f"unknown CIFAR variant {name!r}; use 'cifar10' or 'cifar100'")
    src = _resolve(Path(root), name)
    names = _FILES[(name, train)]
    raw = _read_members(src, names)
    parts = [_parse_batch(raw[n], str(src / n), name) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)
