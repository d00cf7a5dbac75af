"""Official dataset files: where they are published, and their download and unpacking.

Each file goes through :func:`adderquant.download.download` (resumable, checksum-verified,
renamed into place when complete). Archives are unpacked into a temporary folder beside the
target, which is renamed into place when complete.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from adderquant.download import ChecksumError, DownloadError, FetchError, download

__all__ = ["SOURCES", "ChecksumError", "DownloadError", "FetchError", "Source", "extract",
           "fetch", "mirror_url", "planned_files"]


@dataclass(frozen=True)
class Source:
    """Where a dataset is published and what it unpacks to.

    ``url`` is the archive itself when ``archive`` is true, else the folder URL the ``files``
    are fetched from; ``folder`` is what appears under the target directory.
    """

    url: str
    files: Mapping[str, str]  # file name -> md5 (all the official sites publish)
    folder: str
    archive: bool


SOURCES = {
    "cifar10": Source(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
        "cifar-10-batches-py",
        archive=True,
    ),
    "cifar100": Source(
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"},
        "cifar-100-python",
        archive=True,
    ),
    "fashion-mnist": Source(
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        "fashion-mnist",
        archive=False,
    ),
}


def extract(archive: Path, to: Path, folder: str) -> Path:
    """Unpack ``folder`` of a ``.tar.gz`` into ``to/folder`` through a temporary folder."""
    final = to / folder
    if final.is_dir():
        return final
    tmp = Path(tempfile.mkdtemp(dir=to, prefix=f".{folder}.", suffix=".extracting"))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
        if not (tmp / folder).is_dir():
            raise FetchError(f"{archive} does not contain {folder}/; is it the right archive?")
        (tmp / folder).rename(final)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise FetchError(f"cannot unpack {archive} ({e.__class__.__name__}: {e}); delete it "
                         "and run the command again") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def mirror_url(name: str, base: str) -> str:
    """The ``url`` argument of :func:`fetch` for a mirror holding the dataset's files flat
    under ``base`` (the archive's URL, or the folder URL itself)."""
    source = _source(name)
    if not source.archive:
        return base
    (file_name,) = source.files
    return base.rstrip("/") + "/" + file_name


def planned_files(
    name: str, to: str | os.PathLike, url: str | None = None,
    checksums: Mapping[str, str] | None = None,
) -> list[tuple[str, Path, str]]:
    """``(url, destination, checksum)`` of every file :func:`fetch` downloads for ``name``."""
    source = _source(name)
    expected = {**source.files, **(checksums or {})}
    to, base = Path(to), url or source.url
    if source.archive:
        (file_name,) = source.files
        return [(base, to / file_name, expected[file_name])]
    return [(base.rstrip("/") + "/" + f, to / source.folder / f, expected[f])
            for f in source.files]


def fetch(
    name: str,
    to: str | os.PathLike,
    url: str | None = None,
    checksums: Mapping[str, str] | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download (and unpack) dataset ``name`` under ``to``; return its folder.

    ``url`` replaces the official location (the archive's URL for CIFAR, the folder URL holding
    the four files for Fashion-MNIST); ``checksums`` replaces expected checksums (md5 or
    sha256) by file name.
    """
    source = _source(name)
    files = [download(u, dest, checksum, progress, timeout)
             for u, dest, checksum in planned_files(name, to, url, checksums)]
    if source.archive:
        return extract(files[0], Path(to), source.folder)
    return Path(to) / source.folder


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(SOURCES)}")
    return SOURCES[name]
