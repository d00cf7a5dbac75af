"""Checkpoints and datasets resolved as a user without ``../shared`` sees them: look-up order,
downloads from a loopback mirror into the cache (verified, resumed, never half-written), and
the message when a file cannot be had."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import tarfile
from pathlib import Path

import pytest

from adderquant import hub
from adderquant.cli import main
from adderquant.download import ChecksumError, file_digest
from adderquant.models import RECORDS, model_record
from conftest import FileServer

ADDER = model_record("resnet20")
ARCHIVE = "cifar-10-python.tar.gz"


@pytest.fixture(scope="module")
def mirror_files(released_checkpoint: Path, cifar10_dir: Path) -> dict[str, bytes]:
    """The released checkpoint, and a CIFAR-10 archive in the official layout holding the
    shared test batch (the 1,000-image test subset) and the class names."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("batches.meta", "test_batch"):
            tar.add(cifar10_dir / name, f"cifar-10-batches-py/{name}")
    return {ADDER.file: released_checkpoint.read_bytes(), ARCHIVE: buf.getvalue()}


@pytest.fixture
def user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No ``../shared``, an empty cache in ``tmp_path/home``, downloads allowed, nothing in the
    environment pointing elsewhere; returns the cache."""
    for var in (hub.DATA_ENV, hub.MODELS_ENV, hub.OFFLINE_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(hub.NO_SHARED_ENV, "1")
    monkeypatch.setenv(hub.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


@pytest.fixture
def mirror(user: Path, mirror_files, file_server, monkeypatch, tmp_path: Path) -> FileServer:
    """A loopback mirror of the files, named by ``$ADDERQUANT_BASE_URL``; the repackaged
    archive's sha256 is declared in ``$ADDERQUANT_CHECKSUMS``."""
    server = file_server(dict(mirror_files))
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{hashlib.sha256(mirror_files[ARCHIVE]).hexdigest()}  {ARCHIVE}\n")
    monkeypatch.setenv(hub.BASE_URL_ENV, server.url + "/")
    monkeypatch.setenv(hub.CHECKSUMS_ENV, str(sums))
    return server


def cache_listing(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*")) if home.exists() else []


def eval_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["eval", "--json", "--no-progress", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_empty_cache_downloads_verifies_and_scores(mirror: FileServer, user: Path, capsys,
                                                   mirror_files) -> None:
    result = eval_json(capsys)
    # The release notes: 916/1000 on the 1,000-image test subset.
    assert (result["correct"], result["total"]) == (916, 1000)
    assert mirror.requests == [(f"/{ADDER.file}", None), (f"/{ARCHIVE}", None)]
    model = user / "models" / ADDER.file
    assert file_digest(model) == ADDER.sha256
    assert ADDER.sha256 == hashlib.sha256(mirror_files[ADDER.file]).hexdigest()
    assert cache_listing(user) == ["data", "data/cifar-10-batches-py",
                                   "data/cifar-10-batches-py/batches.meta",
                                   "data/cifar-10-batches-py/test_batch", f"data/{ARCHIVE}",
                                   "models", f"models/{ADDER.file}"]
    # Second run (a shorter one): everything from the cache, not one request.
    assert eval_json(capsys, "--limit", "100")["total"] == 100
    assert len(mirror.requests) == 2


def test_corrupted_download_is_refused_and_nothing_is_kept(
    mirror: FileServer, user: Path, shared_data_root: Path, capsys
) -> None:
    body = bytearray(mirror.files[ADDER.file])
    body[len(body) // 2] ^= 0xFF
    mirror.files[ADDER.file] = bytes(body)
    capsys.readouterr()
    assert main(["eval", "--no-progress", "--data", str(shared_data_root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adderquant eval: error: ")
    bad = hashlib.sha256(body).hexdigest()
    assert f"sha256 of the download is {bad}, expected {ADDER.sha256}" in err[0]
    assert cache_listing(user) == ["models"]


def test_broken_off_download_resumes(mirror: FileServer, user: Path) -> None:
    size = len(mirror.files[ADDER.file])
    mirror.drops, mirror.drop_at = 1, size // 2
    with pytest.raises(hub.NotAvailableError, match=r"\.part is kept: run the same command "
                                                    r"again to resume it"):
        hub.checkpoint_path(ADDER)
    part = user / "models" / f"{ADDER.file}.part"
    assert part.stat().st_size == size // 2
    path = hub.checkpoint_path(ADDER)
    assert mirror.requests[1] == (f"/{ADDER.file}", f"bytes={size // 2}-")
    assert path == user / "models" / ADDER.file and file_digest(path) == ADDER.sha256
    assert cache_listing(user) == ["models", f"models/{ADDER.file}"]


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_offline_with_an_empty_cache_says_where_to_put_the_file(
    how: str, user: Path, shared_data_root: Path, monkeypatch, capsys
) -> None:
    args = ["eval", "--no-progress", "--data", str(shared_data_root)]
    if how == "flag":
        args.append("--offline")
    else:
        monkeypatch.setenv(hub.OFFLINE_ENV, "1")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "downloads are off" in err[0]
    assert (f"download {ADDER.url} (sha256 {ADDER.sha256}) and put it at "
            f"{user / 'models' / ADDER.file}") in err[0]
    assert cache_listing(user) == []


def test_offline_dataset_says_where_to_put_the_archive(user: Path, monkeypatch) -> None:
    monkeypatch.setenv(hub.OFFLINE_ENV, "1")
    with pytest.raises(hub.NotAvailableError) as err:
        hub.dataset_root("cifar10")
    assert ("download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (md5 "
            f"c58f30108f718f92721af3b95e74349a) and put it at {user / 'data' / ARCHIVE}"
            ) in str(err.value)


def test_unreachable_mirror_names_the_url_checksum_and_path(user: Path, monkeypatch) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(hub.BASE_URL_ENV, f"http://127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}/{ADDER.file}"
    with pytest.raises(hub.NotAvailableError) as err:
        hub.checkpoint_path(ADDER)
    message = str(err.value)
    assert f"download of {url} failed after 0 bytes" in message and "Connection refused" in message
    assert f"download {url} (sha256 {ADDER.sha256}) and put it at {user / 'models'}" in message


def test_checkpoint_look_up_order(
    user: Path, released_checkpoint: Path, monkeypatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(hub.OFFLINE_ENV, "1")
    cached = user / "models" / ADDER.file
    cached.parent.mkdir(parents=True)
    cached.write_bytes(released_checkpoint.read_bytes())
    assert hub.checkpoint_path(ADDER) == cached
    (tmp_path / "shared" / "models").mkdir(parents=True)
    (tmp_path / "shared" / "models" / ADDER.file).write_bytes(b"shared copy")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert hub.checkpoint_path(ADDER) == cached  # ../shared is switched off
    monkeypatch.delenv(hub.NO_SHARED_ENV)
    assert hub.checkpoint_path(ADDER) == tmp_path / "shared" / "models" / ADDER.file
    monkeypatch.setenv(hub.MODELS_ENV, str(tmp_path / "env"))
    assert hub.checkpoint_path(ADDER) == tmp_path / "env" / ADDER.file
    assert hub.checkpoint_path(ADDER, tmp_path / "flag.pth") == tmp_path / "flag.pth"
    with pytest.raises(ValueError, match="no released checkpoint for resnet56; pass --checkpoint"):
        hub.checkpoint_path(model_record("resnet56"))


def test_cached_checkpoint_with_wrong_bytes_is_reported(user: Path) -> None:
    cached = user / "models" / ADDER.file
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the checkpoint")
    with pytest.raises(ChecksumError, match=f"{cached} exists but its sha256 is .*delete it"):
        hub.checkpoint_path(ADDER)


def test_the_shared_checkpoint_is_found_from_any_folder(
    released_checkpoint: Path, monkeypatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(hub.MODELS_ENV, raising=False)
    monkeypatch.delenv(hub.NO_SHARED_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # found relative to the package, wherever the command runs
    assert hub.checkpoint_path(ADDER).resolve() == released_checkpoint.resolve()


def test_dataset_look_up_order(user: Path, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv(hub.OFFLINE_ENV, "1")
    monkeypatch.setattr(hub, "SYSTEM_DATASETS", tmp_path / "system")
    (user / "data" / "cifar-10-batches-py").mkdir(parents=True)
    assert hub.dataset_root("cifar10") == user / "data"
    (tmp_path / "shared" / "data" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert hub.dataset_root("cifar10") == user / "data"  # ../shared is switched off
    monkeypatch.delenv(hub.NO_SHARED_ENV)
    assert hub.dataset_root("cifar10") == tmp_path / "shared" / "data"
    monkeypatch.setenv(hub.DATA_ENV, str(tmp_path / "env"))
    assert hub.dataset_root("cifar10") == tmp_path / "env"
    assert hub.dataset_root("cifar10", tmp_path / "flag") == tmp_path / "flag"


def test_checksum_overrides_file(tmp_path: Path, monkeypatch) -> None:
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{'a' * 64}  mirror/{ARCHIVE}\n\n{'B' * 32} *other.gz\n")
    monkeypatch.setenv(hub.CHECKSUMS_ENV, str(sums))
    assert hub.checksum_overrides() == {ARCHIVE: "a" * 64, "other.gz": "b" * 32}
    sums.write_text("not-a-digest  file\n")
    with pytest.raises(ValueError, match=r"SHA256SUMS:1: expected '<sha256 or md5>  <file name>'"):
        hub.checksum_overrides()


def test_models_command_lists_the_records(capsys) -> None:
    assert main(["models", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert records == [json.loads(json.dumps(r.as_dict())) for r in RECORDS.values()]
    cnn = next(r for r in records if r["name"] == "resnet20-cnn")
    assert (cnn["mean"], cnn["std"], cnn["adder"]) == ([0.485, 0.456, 0.406],
                                                       [0.229, 0.224, 0.225], False)
    assert main(["models"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["name", "architecture", "dataset"]
    assert [line.split()[0] for line in table[1:1 + len(RECORDS)]] == list(RECORDS)
    assert table[1].split()[:4] == ["resnet20", *ADDER.architecture.split()[:3]]
    assert table[1].split()[-1] == ADDER.file


def test_environment_flags_are_read_as_booleans(monkeypatch) -> None:
    for value, expected in (("1", True), ("yes", True), ("0", False), ("", False)):
        monkeypatch.setenv(hub.OFFLINE_ENV, value)
        assert hub.offline() is expected
    with hub.settings(offline=True):
        assert hub.offline()
    assert not hub.offline()
    assert os.environ[hub.OFFLINE_ENV] == ""



def test_data_fetch_defaults_to_the_cache_and_the_mirror(
    mirror: FileServer, user: Path, monkeypatch, capsys
) -> None:
    assert main(["data", "fetch", "cifar10", "--no-progress"]) == 0
    assert f"ready in {user / 'data' / 'cifar-10-batches-py'}" in capsys.readouterr().out
    assert mirror.requests == [(f"/{ARCHIVE}", None)]
    monkeypatch.setenv(hub.OFFLINE_ENV, "1")
    assert hub.dataset_root("cifar10") == user / "data" and len(mirror.requests) == 1
