"""Where checkpoints and datasets come from, and fetching them when they are nowhere.

Look-up order, for a model's checkpoint and for a dataset alike:

1. the explicit flag (``--checkpoint FILE``, ``--data DIR``), taken as given;
2. the environment (``$ADDERQUANT_MODELS``, ``$ADDERQUANT_DATA``: the folder holding them),
   taken as given;
3. ``../shared/models`` and ``../shared/data`` beside the working folder or the repository
   (off with ``ADDERQUANT_NO_SHARED=1``); datasets also ``/usr/share/datasets`` (Debian);
4. the per-user cache, ``$ADDERQUANT_HOME`` (default ``~/.cache/adderquant``), in its
   ``models/`` and ``data/`` folders;
5. a download into that cache (progress bar, resume, checksum check, atomic rename), from the
   record's public URL or, with ``$ADDERQUANT_BASE_URL``, from ``<base>/<file name>``. Forbidden
   by ``--offline`` or ``ADDERQUANT_OFFLINE=1``.

``$ADDERQUANT_CHECKSUMS`` names a file in ``sha256sum`` format whose digests replace the
expected ones by file name (for a mirror that repackages a dataset). A file that cannot be had
raises :class:`NotAvailableError`, whose message names the URL, the checksum and the path where
the file may be put by hand.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING

from adderquant.data.errors import DatasetNotFoundError
from adderquant.data.fetch import SOURCES, fetch, mirror_url, planned_files
from adderquant.download import DownloadError, checksum_algorithm, download

if TYPE_CHECKING:
    from adderquant.models.registry import ModelRecord

HOME_ENV = "ADDERQUANT_HOME"
DATA_ENV = "ADDERQUANT_DATA"
MODELS_ENV = "ADDERQUANT_MODELS"
OFFLINE_ENV = "ADDERQUANT_OFFLINE"
BASE_URL_ENV = "ADDERQUANT_BASE_URL"
NO_SHARED_ENV = "ADDERQUANT_NO_SHARED"
CHECKSUMS_ENV = "ADDERQUANT_CHECKSUMS"
DEFAULT_HOME = "~/.cache/adderquant"
# Where Debian's dataset packages (e.g. ``dataset-fashion-mnist``) install their files.
SYSTEM_DATASETS = Path("/usr/share/datasets")
# What a dataset root holds: the dataset's folder (or, for CIFAR, its official archive).
DATASET_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python",
                   "mnist": "mnist", "fashion-mnist": "fashion-mnist"}
# Debian packages that install a dataset into SYSTEM_DATASETS.
SYSTEM_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}
OFF_HINT = f"downloads are off (--offline or {OFFLINE_ENV}=1)"

_offline: ContextVar[bool] = ContextVar("offline", default=False)
_progress: ContextVar[bool] = ContextVar("progress", default=True)


class NotAvailableError(FileNotFoundError):
    """A checkpoint or dataset found nowhere and not downloadable."""


class DatasetNotAvailableError(NotAvailableError, DatasetNotFoundError):
    """A dataset found nowhere and not downloadable."""


@contextmanager
def settings(offline: bool = False, progress: bool = True) -> Iterator[None]:
    """Within the block: forbid downloads (``offline``), show download progress bars."""
    tokens = _offline.set(offline), _progress.set(progress)
    try:
        yield
    finally:
        _offline.reset(tokens[0])
        _progress.reset(tokens[1])


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def offline() -> bool:
    """Whether downloads are forbidden (``settings(offline=True)`` or ``ADDERQUANT_OFFLINE``)."""
    return _offline.get() or _env_flag(OFFLINE_ENV)


def cache_dir() -> Path:
    """The per-user cache: ``$ADDERQUANT_HOME``, default ``~/.cache/adderquant``."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser()


def shared_dir(sub: str) -> Path | None:
    """``../shared/<sub>`` beside the working folder or the repository (or ``shared/<sub>``
    inside either), unless ``ADDERQUANT_NO_SHARED`` is set."""
    if _env_flag(NO_SHARED_ENV):
        return None
    roots = [Path.cwd(), Path(__file__).resolve().parents[2]]
    for cand in [r.parent / "shared" / sub for r in roots] + [r / "shared" / sub for r in roots]:
        if cand.is_dir():
            return cand
    return None


def checksum_overrides() -> dict[str, str]:
    """File name -> digest from the ``sha256sum``-format file named by ``$ADDERQUANT_CHECKSUMS``."""
    path = os.environ.get(CHECKSUMS_ENV)
    if not path:
        return {}
    out = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        match = re.fullmatch(r"([0-9a-fA-F]{32}|[0-9a-fA-F]{64}) [ *]?(\S.*)", line.strip())
        if not match:
            raise ValueError(f"{path}:{number}: expected '<sha256 or md5>  <file name>', got "
                             f"{line!r}")
        out[Path(match.group(2)).name] = match.group(1).lower()
    return out


def _by_hand(url: str, checksum: str, dest: Path) -> str:
    return f"download {url} ({checksum_algorithm(checksum)} {checksum}) and put it at {dest}"


def checkpoint_path(record: ModelRecord, flag: str | os.PathLike | None = None) -> Path:
    """The checkpoint file of ``record``, downloaded into the cache if it is nowhere else."""
    if flag:
        return Path(flag)
    if record.file is None:
        raise ValueError(f"no released checkpoint for {record.name}; pass --checkpoint PATH")
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV]) / record.file
    shared = shared_dir("models")
    if shared is not None and (shared / record.file).is_file():
        return shared / record.file
    dest = cache_dir() / "models" / record.file
    where = ", ".join(str(d) for d in (shared, dest.parent) if d is not None)
    assert record.url is not None and record.sha256 is not None
    base = os.environ.get(BASE_URL_ENV)
    url = base.rstrip("/") + "/" + record.file if base else record.url
    checksum = checksum_overrides().get(record.file, record.sha256)
    fix = f"{_by_hand(url, checksum, dest)}, or pass --checkpoint PATH"
    if dest.is_file():
        return download(url, dest, checksum, progress=False)  # verified, nothing fetched
    if offline():
        raise NotAvailableError(f"{record.file} (checkpoint of {record.name}) not found in {where} "
                                f"and {OFF_HINT}: {fix}")
    try:
        return download(url, dest, checksum, progress=_progress.get())
    except DownloadError as e:
        raise NotAvailableError(f"checkpoint of {record.name}: {e}. Or {fix}") from e


def dataset_mirror_url(name: str) -> str | None:
    """The ``url`` of :func:`adderquant.data.fetch.fetch` under ``$ADDERQUANT_BASE_URL``, or
    ``None`` (the official location) when it is not set."""
    base = os.environ.get(BASE_URL_ENV)
    return mirror_url(name, base) if base else None


def _holds(root: Path, name: str) -> bool:
    """Whether ``root`` holds dataset ``name``: its folder or its archive (a folder of single
    files counts once one of them, compressed or not, is there and no download is unfinished)."""
    folder, source = root / DATASET_FOLDERS[name], SOURCES.get(name)
    if source is None:
        return folder.is_dir()
    if source.archive:
        return folder.is_dir() or any((root / f).is_file() for f in source.files)
    return not any(folder.glob("*.part")) and any(
        (folder / f).is_file() or (folder / f.removesuffix(".gz")).is_file()
        for f in source.files)


def dataset_root(name: str, flag: str | os.PathLike | None = None) -> Path:
    """The folder holding dataset ``name`` (its folder or archive), downloaded into the cache
    if it is nowhere else."""
    if name not in DATASET_FOLDERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_FOLDERS)}")
    if flag:
        return Path(flag)
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    cache = cache_dir() / "data"
    looked = [r for r in (shared_dir("data"), SYSTEM_DATASETS, cache) if r is not None]
    for root in looked:
        if _holds(root, name):
            return root
    where = ", ".join(map(str, looked))
    package = (f", or `apt-get install {SYSTEM_PACKAGES[name]}`" if name in SYSTEM_PACKAGES
               else "")
    if name not in SOURCES:
        raise DatasetNotAvailableError(
            f"{name} not found in {where}: put its folder {DATASET_FOLDERS[name]}/ in {cache}, "
            f"or pass --data DIR{package}")
    url = dataset_mirror_url(name)
    checksums = checksum_overrides()
    files = planned_files(name, cache, url, checksums)
    fix = "; ".join(_by_hand(u, c, d) for u, d, c in files) + f", or pass --data DIR{package}"
    if offline():
        raise DatasetNotAvailableError(f"{name} not found in {where} and {OFF_HINT}: {fix}")
    try:
        fetch(name, cache, url, checksums, progress=_progress.get())
    except DownloadError as e:
        raise DatasetNotAvailableError(f"{name}: {e}. Or {fix}") from e
    return cache
