"""Shared fixtures: the real data and the released checkpoint (skipped when absent); every
test runs with its own empty download cache and downloads forbidden unless it allows them."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


class FileServer:
    """Serves ``files`` over HTTP on 127.0.0.1 with byte ranges (``Range: bytes=N-``).

    ``drops`` responses are cut off after ``drop_at`` bytes; ``honour_range=False`` answers
    every request with the whole file; ``requests`` records ``(path, Range header)``.
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.drops = 0
        self.drop_at = 0
        self.honour_range = True
        self.requests: list[tuple[str, str | None]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                range_header = self.headers.get("Range")
                state.requests.append((self.path, range_header))
                body = state.files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if range_header and state.honour_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                payload = body[start:]
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if state.drops:
                    state.drops -= 1
                    payload = payload[: state.drop_at]
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        return Handler

    def start(self) -> FileServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def file_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[dict], FileServer]]:
    """Start a :class:`FileServer` on 127.0.0.1 (port 0) for the test; no proxy in between."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    servers: list[FileServer] = []

    def start(files: dict[str, bytes]) -> FileServer:
        servers.append(FileServer(files).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()
