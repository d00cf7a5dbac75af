"""``adderquant data fetch`` against a local HTTP server: resume, checksum, atomic results."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import socket
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from adderquant.cli import main
from adderquant.data import fetch as fetch_module
from adderquant.data import load_cifar, load_dataset
from adderquant.data.fetch import ChecksumError, DownloadError, FetchError, Source, fetch
from conftest import FileServer

ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


@pytest.fixture(scope="module")
def small_cifar(cifar10_dir: Path) -> tuple[bytes, dict[str, np.ndarray]]:
    """A CIFAR-10 archive in the official layout holding the first 40 images of each real
    batch, and the expected images per batch."""
    buf, expected = io.BytesIO(), {}
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in CIFAR_FILES:
            with (cifar10_dir / name).open("rb") as f:
                batch = pickle.load(f, encoding="latin1")
            data, labels = batch[b"data"][:40], batch[b"labels"][:40]
            expected[name] = (data.reshape(-1, 3, 32, 32), np.array(labels))
            raw = pickle.dumps({b"batch_label": name.encode(), b"labels": labels, b"data": data},
                               protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue(), expected


@pytest.fixture
def server(small_cifar, file_server) -> FileServer:
    return file_server({ARCHIVE: small_cifar[0]})


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def fetch_small(server: FileServer, to: Path, **kwargs) -> Path:
    archive = server.files[ARCHIVE]
    return fetch("cifar10", to, url=f"{server.url}/{ARCHIVE}",
                 checksums={ARCHIVE: md5(archive)}, progress=False, **kwargs)


def assert_unpacked(to: Path, small_cifar) -> None:
    _, expected = small_cifar
    assert sorted(os.listdir(to)) == ["cifar-10-batches-py", ARCHIVE]  # no .part, no temp dir
    assert (to / ARCHIVE).read_bytes() == small_cifar[0]
    images, labels = load_cifar(to, "cifar10", train=False)
    assert np.array_equal(images.numpy(), expected["test_batch"][0])
    assert np.array_equal(labels.numpy(), expected["test_batch"][1])
    images, _ = load_cifar(to, "cifar10", train=True)
    assert np.array_equal(images.numpy(), np.concatenate([expected[n][0] for n in CIFAR_FILES[:5]]))


def test_fetch_downloads_verifies_and_unpacks(server: FileServer, small_cifar, tmp_path) -> None:
    folder = fetch_small(server, tmp_path / "data")
    assert folder == tmp_path / "data" / "cifar-10-batches-py"
    assert_unpacked(tmp_path / "data", small_cifar)
    assert server.requests == [(f"/{ARCHIVE}", None)]
    fetch_small(server, tmp_path / "data")  # already there: verified locally, nothing fetched
    assert len(server.requests) == 1


def test_dropped_connection_keeps_part_and_resumes(
    server: FileServer, small_cifar, tmp_path: Path
) -> None:
    half = len(small_cifar[0]) // 2
    server.drops, server.drop_at = 1, half
    with pytest.raises(DownloadError, match=r"\.part is kept: run the same command again"):
        fetch_small(server, tmp_path)
    part = tmp_path / f"{ARCHIVE}.part"
    assert os.listdir(tmp_path) == [part.name] and part.read_bytes() == small_cifar[0][:half]
    fetch_small(server, tmp_path)
    assert server.requests[1] == (f"/{ARCHIVE}", f"bytes={half}-")
    assert_unpacked(tmp_path, small_cifar)


def test_resume_restarts_when_the_server_ignores_range(
    server: FileServer, small_cifar, tmp_path: Path
) -> None:
    server.honour_range = False
    (tmp_path / f"{ARCHIVE}.part").write_bytes(b"stale bytes of another attempt")
    fetch_small(server, tmp_path)
    assert server.requests[0][1] == "bytes=30-"
    assert_unpacked(tmp_path, small_cifar)


def test_complete_part_is_verified_and_used(server: FileServer, small_cifar, tmp_path) -> None:
    (tmp_path / f"{ARCHIVE}.part").write_bytes(small_cifar[0])
    fetch_small(server, tmp_path)  # the server answers 416: nothing left to send
    assert server.requests == [(f"/{ARCHIVE}", f"bytes={len(small_cifar[0])}-")]
    assert_unpacked(tmp_path, small_cifar)


def test_checksum_mismatch_removes_the_part(server: FileServer, small_cifar, tmp_path) -> None:
    wrong = "0" * 32
    with pytest.raises(ChecksumError) as err:
        fetch("cifar10", tmp_path, url=f"{server.url}/{ARCHIVE}", checksums={ARCHIVE: wrong},
              progress=False)
    message = str(err.value)
    assert md5(small_cifar[0]) in message and wrong in message and "removed" in message
    assert os.listdir(tmp_path) == []


def test_existing_archive_with_wrong_md5_is_reported(server: FileServer, tmp_path) -> None:
    (tmp_path / ARCHIVE).write_bytes(b"not the archive")
    with pytest.raises(ChecksumError, match="exists but its md5 is .*delete it"):
        fetch_small(server, tmp_path)
    assert server.requests == []


def test_http_error_is_reported(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch("cifar10", tmp_path, url=f"{server.url}/missing.tar.gz", progress=False)
    assert os.listdir(tmp_path) == []


def test_unreachable_server_is_reported(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="failed after 0 bytes .*Connection refused.*check "
                                            "the network and the URL"):
        fetch("cifar10", tmp_path, url=f"http://127.0.0.1:{port}/{ARCHIVE}", progress=False)
    assert os.listdir(tmp_path) == []


def test_archive_without_the_folder_leaves_nothing_unpacked(
    server: FileServer, tmp_path: Path
) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("something-else/file")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    server.files[ARCHIVE] = buf.getvalue()
    with pytest.raises(FetchError, match="does not contain cifar-10-batches-py/"):
        fetch_small(server, tmp_path)
    assert os.listdir(tmp_path) == [ARCHIVE]


def test_progress_bar_is_shown(server: FileServer, small_cifar, tmp_path, capsys) -> None:
    fetch("cifar10", tmp_path, url=f"{server.url}/{ARCHIVE}",
          checksums={ARCHIVE: md5(small_cifar[0])}, progress=True)
    err = capsys.readouterr().err
    assert ARCHIVE in err and "100%" in err


def test_fashion_mnist_fetch(fashion_mnist_dir: Path, tmp_path: Path, file_server) -> None:
    files, expected = {}, {}
    for prefix in ("train", "t10k"):
        raw = gzip.decompress((fashion_mnist_dir / f"{prefix}-images-idx3-ubyte.gz").read_bytes())
        images = np.frombuffer(raw, np.uint8, offset=16)[: 50 * 784].reshape(50, 28, 28)
        raw = gzip.decompress((fashion_mnist_dir / f"{prefix}-labels-idx1-ubyte.gz").read_bytes())
        labels = np.frombuffer(raw, np.uint8, offset=8)[:50]
        files[f"mirror/{prefix}-images-idx3-ubyte.gz"] = gzip.compress(
            struct.pack(">4I", 2051, 50, 28, 28) + images.tobytes())
        files[f"mirror/{prefix}-labels-idx1-ubyte.gz"] = gzip.compress(
            struct.pack(">2I", 2049, 50) + labels.tobytes())
        expected[prefix == "train"] = images, labels
    srv = file_server(files)
    folder = fetch("fashion-mnist", tmp_path, url=f"{srv.url}/mirror/", progress=False,
                   checksums={k.removeprefix("mirror/"): md5(v) for k, v in files.items()})
    assert folder == tmp_path / "fashion-mnist"
    assert sorted(os.listdir(folder)) == sorted(k.removeprefix("mirror/") for k in files)
    for train in (False, True):
        images, labels = load_dataset("fashion-mnist", tmp_path, train=train)
        assert np.array_equal(images[:, 0].numpy(), expected[train][0])
        assert np.array_equal(labels.numpy(), expected[train][1])


def test_cli_fetch(server: FileServer, small_cifar, tmp_path, monkeypatch, capsys) -> None:
    url = f"{server.url}/{ARCHIVE}"
    argv = ["data", "fetch", "cifar10", "--to", str(tmp_path), "--url", url, "--no-progress"]
    assert main(argv) == 2  # the official md5 does not match the small archive
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adderquant data: error: ")
    assert fetch_module.SOURCES["cifar10"].files[ARCHIVE] in err[0]
    assert os.listdir(tmp_path) == []
    official = fetch_module.SOURCES["cifar10"]
    monkeypatch.setitem(fetch_module.SOURCES, "cifar10", Source(
        official.url, {ARCHIVE: md5(small_cifar[0])}, official.folder, archive=True))
    assert main(argv) == 0
    assert f"ready in {tmp_path / 'cifar-10-batches-py'}" in capsys.readouterr().out
    assert_unpacked(tmp_path, small_cifar)


def test_fetch_rejects_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="choose one of cifar10, cifar100, fashion-mnist"):
        fetch("imagenet", tmp_path)
