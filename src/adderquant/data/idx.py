"""MNIST and Fashion-MNIST from their IDX files (``.gz`` or raw)."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from adderquant import hub
from adderquant.data.errors import CorruptDatasetError, DatasetNotFoundError

# IDX type codes (third byte of the magic number) and their big-endian numpy dtypes.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_VARIANTS = ("mnist", "fashion-mnist")
IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_SIZE = 28
NUM_CLASSES = 10


def parse_idx(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of an (uncompressed) IDX file into a native-endian array."""
    if len(raw) < 4:
        raise CorruptDatasetError(f"{source}: truncated IDX file ({len(raw)} bytes, no header)")
    code, ndim = raw[2], raw[3]
    if raw[:2] != b"\0\0" or code not in IDX_DTYPES or ndim == 0:
        raise CorruptDatasetError(
            f"{source}: not an IDX file (magic number 0x{raw[:4].hex()}; expected 0x0000, a "
            "type code 08/09/0b/0c/0d/0e and the number of dimensions)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptDatasetError(
            f"{source}: truncated IDX header ({len(raw)} bytes, {header} needed)"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_DTYPES[code])
    expected = math.prod(shape) * dtype.itemsize
    present = len(raw) - header
    if present != expected:
        problem = "truncated" if present < expected else "has trailing bytes"
        raise CorruptDatasetError(
            f"{source}: {problem}: the header announces {dtype.name} {shape} ({expected} bytes "
            f"of data) but {present} bytes follow; re-download it"
        )
    array = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzip-compressed (whatever its name) or raw."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise CorruptDatasetError(
                f"{path}: corrupted or truncated gzip file ({e}); re-download it"
            ) from e
    return parse_idx(raw, str(path))


def _find(folder: Path, stem: str) -> Path | None:
    for cand in (folder / stem, folder / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


def find_idx_files(
    name: str, root: str | os.PathLike | None = None, train: bool = False
) -> tuple[Path, Path]:
    """The ``(images, labels)`` IDX files of a split: in ``root/name`` or ``root``, where
    ``root`` defaults to the one :func:`adderquant.hub.dataset_root` finds."""
    stems = IDX_FILES[train]
    root = hub.dataset_root(name, root)
    looked = [root / name, root]
    for folder in looked:
        files = [_find(folder, stem) for stem in stems]
        if files[0] is not None and files[1] is not None:
            return files[0], files[1]
    fixes = ["pass --data DIR", f"set $ADDERQUANT_DATA to a folder holding {name}/"]
    if name == "fashion-mnist":
        fixes += [
            "run `adderquant data fetch fashion-mnist --to DIR`",
            "or `apt-get install dataset-fashion-mnist`",
        ]
    raise DatasetNotFoundError(
        f"{name} {'train' if train else 'test'} files ({stems[0]}[.gz], {stems[1]}[.gz]) not "
        f"found in: {', '.join(map(str, looked))}; {', '.join(fixes)}"
    )


def load_idx_dataset(
    name: str, root: str | os.PathLike | None = None, train: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images uint8 N x 1 x 28 x 28, labels int64 N)`` of MNIST or Fashion-MNIST."""
    if name not in IDX_VARIANTS:
        raise ValueError(f"unknown IDX dataset {name!r}; use one of {', '.join(IDX_VARIANTS)}")
    image_path, label_path = find_idx_files(name, root, train)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise CorruptDatasetError(
            f"{image_path}: holds {images.dtype} {images.shape}, expected uint8 (N, 28, 28)"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise CorruptDatasetError(
            f"{label_path}: holds {labels.dtype} {labels.shape}, expected uint8 (N,)"
        )
    if len(labels) != len(images):
        raise CorruptDatasetError(
            f"{label_path} has {len(labels)} labels but {image_path} has {len(images)} images"
        )
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise CorruptDatasetError(f"{label_path}: labels outside 0..{NUM_CLASSES - 1}")
    return (
        torch.from_numpy(images).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
    )
