"""Default locations of datasets and checkpoints: flag, then environment, then ``../shared``."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "ADDERQUANT_DATA"
MODELS_ENV = "ADDERQUANT_MODELS"
DEFAULT_CHECKPOINTS = {"resnet20": "resnet20-adder-cifar10.pth"}
# Where Debian's dataset packages (e.g. ``dataset-fashion-mnist``) install their files.
SYSTEM_DATASETS = Path("/usr/share/datasets")


def _shared_candidates(sub: str) -> list[Path]:
    roots = [Path.cwd(), Path(__file__).resolve().parents[2]]
    return [r.parent / "shared" / sub for r in roots] + [r / "shared" / sub for r in roots]


def data_root(flag: str | os.PathLike | None = None) -> Path:
    """Root folder holding the datasets (``cifar-10-batches-py/`` ...)."""
    if flag:
        return Path(flag)
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    for cand in _shared_candidates("data"):
        if cand.is_dir():
            return cand
    return Path("data")


def dataset_dirs(name: str, flag: str | os.PathLike | None = None) -> list[Path]:
    """Folders that may hold the files of dataset ``name``, in lookup order.

    With ``flag``: ``flag/name`` then ``flag`` itself. Without: ``$ADDERQUANT_DATA/name``, the
    ``../shared/data/name`` folders, then ``/usr/share/datasets/name`` (Debian packages).
    """
    if flag:
        return [Path(flag) / name, Path(flag)]
    roots = [Path(os.environ[DATA_ENV])] if os.environ.get(DATA_ENV) else []
    roots += _shared_candidates("data") + [SYSTEM_DATASETS]
    return [root / name for root in roots]


def models_root(flag: str | os.PathLike | None = None) -> Path:
    """Folder holding pretrained checkpoints."""
    if flag:
        return Path(flag)
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV])
    for cand in _shared_candidates("models"):
        if cand.is_dir():
            return cand
    return Path("models")


def default_checkpoint(model: str) -> Path | None:
    """The released checkpoint for ``model`` if one is known, else ``None``."""
    name = DEFAULT_CHECKPOINTS.get(model)
    return models_root() / name if name else None
