"""Download official dataset files: resumable, checksum-verified, never half-written.

Each file is downloaded to ``<name>.part`` (resumed with an HTTP ``Range`` request when a
previous attempt broke off), its md5 checked, then renamed into place. Archives are unpacked
into a temporary folder beside the target, which is renamed into place when complete.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """Where a dataset is published and what it unpacks to.

    ``url`` is the archive itself when ``archive`` is true, else the folder URL the ``files``
    are fetched from; ``folder`` is what appears under the target directory.
    """

    url: str
    files: Mapping[str, str]  # file name -> md5
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


class FetchError(RuntimeError):
    """A download or unpacking that did not complete."""


class DownloadError(FetchError):
    """The transfer failed (network, HTTP status, short read)."""


class ChecksumError(FetchError):
    """A downloaded file whose md5 is not the expected one."""


def file_md5(path: Path) -> str:
    """Hex md5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _range_start(content_range: str | None) -> int | None:
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (content_range or "").strip())
    return int(match.group(1)) if match else None


def _transfer(url: str, part: Path, progress: bool, timeout: float) -> None:
    """Append the rest of ``url`` to ``part`` (restarting it if the server ignores Range)."""
    done = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={done}-"} if done else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and done:  # nothing left to send: the .part is already complete
            return
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}; check the URL") from e
    with response:
        if done and response.status == 206:
            if _range_start(response.headers.get("Content-Range")) != done:
                raise DownloadError(
                    f"{url}: the server resumed at the wrong offset "
                    f"({response.headers.get('Content-Range')!r}); delete {part} and retry"
                )
        else:
            done = 0  # a full response: start the file over
        length = response.headers.get("Content-Length")
        total = done + int(length) if length is not None else None
        with part.open("ab" if done else "wb") as f, tqdm(
            total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
            desc=part.name.removesuffix(".part"), disable=not progress,
        ) as bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
            received = f.tell()
    if total is not None and received < total:
        raise ConnectionError(f"connection closed with {total - received} of {total} bytes "
                              "still to come")


def download(
    url: str, dest: str | os.PathLike, md5: str, progress: bool = True, timeout: float = 60.0
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming it, and verify ``md5``.

    An existing ``dest`` with the right md5 is kept as is. Raises ``DownloadError`` (the
    ``.part`` is kept for a resume) or ``ChecksumError`` (the ``.part`` is removed).
    """
    dest = Path(dest)
    if dest.is_file():
        actual = file_md5(dest)
        if actual == md5:
            return dest
        raise ChecksumError(f"{dest} exists but its md5 is {actual}, not {md5}; delete it and "
                            "run the command again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        _transfer(url, part, progress, timeout)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        if isinstance(reason, BaseException):
            reason = f"{reason.__class__.__name__}: {reason}"
        kept = part.stat().st_size if part.exists() else 0
        retry = (f"{part} is kept: run the same command again to resume it" if kept
                 else "check the network and the URL, then run the command again")
        raise DownloadError(
            f"download of {url} failed after {kept} bytes ({reason}); {retry}"
        ) from e
    actual = file_md5(part)
    if actual != md5:
        part.unlink()
        raise ChecksumError(
            f"{url}: md5 of the download is {actual}, expected {md5}; the partial file was "
            "removed (is the URL the official file? run the command again to retry)"
        )
    os.replace(part, dest)
    return dest


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
    the four files for Fashion-MNIST); ``checksums`` replaces expected md5s by file name.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(SOURCES)}")
    source = SOURCES[name]
    md5s = {**source.files, **(checksums or {})}
    to = Path(to)
    base = url or source.url
    if source.archive:
        (file_name,) = source.files
        archive = download(base, to / file_name, md5s[file_name], progress, timeout)
        return extract(archive, to, source.folder)
    folder = to / source.folder
    for file_name in source.files:
        file_url = base.rstrip("/") + "/" + file_name
        download(file_url, folder / file_name, md5s[file_name], progress, timeout)
    return folder
