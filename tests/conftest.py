"""Shared fixtures: the real data and the released checkpoint (skipped when absent); every
test runs with its own empty download cache and downloads forbidden unless it allows them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adderquant.data import load_cifar
from adderquant.hub import (
    BASE_URL_ENV,
    CHECKSUMS_ENV,
    DATA_ENV,
    HOME_ENV,
    MODELS_ENV,
    OFFLINE_ENV,
    SYSTEM_DATASETS,
)
from adderquant.models import create_model, load_pretrained

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """A fresh ``$ADDERQUANT_HOME``, downloads off, no mirror or checksum overrides."""
    monkeypatch.setenv(HOME_ENV, str(tmp_path_factory.mktemp("adderquant-home")))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    monkeypatch.delenv(BASE_URL_ENV, raising=False)
    monkeypatch.delenv(CHECKSUMS_ENV, raising=False)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not available at {path}")
    return path


@pytest.fixture(scope="session")
def shared_data_root() -> Path:
    """``../shared/data`` (the folder holding ``cifar-10-batches-py/``)."""
    return _require(SHARED / "data" / "cifar-10-batches-py", "CIFAR-10").parent


@pytest.fixture(scope="session")
def cifar10_dir(shared_data_root: Path) -> Path:
    """The shared CIFAR-10 folder (full train set, first 1,000 test images)."""
    return shared_data_root / "cifar-10-batches-py"


@pytest.fixture(scope="session")
def cifar10_test(shared_data_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uint8 images, int64 labels)`` of the shared 1,000-image CIFAR-10 test subset."""
    return load_cifar(shared_data_root, "cifar10", train=False)


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """Fashion-MNIST as installed by Debian's ``dataset-fashion-mnist``."""
    return _require(SYSTEM_DATASETS / "fashion-mnist", "Fashion-MNIST (dataset-fashion-mnist)")


@pytest.fixture(scope="session")
def released_checkpoint() -> Path:
    """The released adder ResNet-20 CIFAR-10 checkpoint."""
    return _require(SHARED / "models" / "resnet20-adder-cifar10.pth", "released checkpoint")


@pytest.fixture(scope="session")
def released_resnet20(released_checkpoint: Path) -> torch.nn.Module:
    """The released adder ResNet-20 in eval mode (shared: do not modify it)."""
    return load_pretrained(create_model("resnet20"), released_checkpoint).eval()


@pytest.fixture
def no_path_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset ``$ADDERQUANT_DATA``/``$ADDERQUANT_MODELS`` so defaults are the ones tested."""
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.delenv(MODELS_ENV, raising=False)
