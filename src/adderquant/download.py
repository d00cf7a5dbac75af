"""Download one file: resumable, checksum-verified, never half-written.

The file is downloaded to ``<name>.part`` (resumed with an HTTP ``Range`` request when a
previous attempt broke off), its checksum checked, then renamed into place. The checksum is a
hex digest whose length names the algorithm: 64 digits sha256, 32 digits md5 (the official
dataset archives publish only md5s).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

CHUNK = 1 << 20
ALGORITHMS = {64: "sha256", 32: "md5"}


class FetchError(RuntimeError):
    """A download or unpacking that did not complete."""


class DownloadError(FetchError):
    """The transfer failed (network, HTTP status, short read)."""


class ChecksumError(FetchError):
    """A downloaded file whose checksum is not the expected one."""


def checksum_algorithm(digest: str) -> str:
    """``sha256`` or ``md5``, from the length of the hex ``digest``."""
    if len(digest) not in ALGORITHMS or not re.fullmatch(r"[0-9a-fA-F]+", digest):
        raise ValueError(f"checksum {digest!r} is neither a sha256 (64 hex digits) nor an md5 "
                         "(32 hex digits)")
    return ALGORITHMS[len(digest)]


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with Path(path).open("rb") as f:
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
    url: str, dest: str | os.PathLike, checksum: str, progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming it, and verify ``checksum``
    (sha256 or md5 hex digest).

    An existing ``dest`` with the right checksum is kept as is. Raises ``DownloadError`` (the
    ``.part`` is kept for a resume) or ``ChecksumError`` (the ``.part`` is removed).
    """
    algorithm = checksum_algorithm(checksum)
    checksum = checksum.lower()
    dest = Path(dest)
    if dest.is_file():
        actual = file_digest(dest, algorithm)
        if actual == checksum:
            return dest
        raise ChecksumError(f"{dest} exists but its {algorithm} is {actual}, not {checksum}; "
                            "delete it and run the command again")
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
    actual = file_digest(part, algorithm)
    if actual != checksum:
        part.unlink()
        raise ChecksumError(
            f"{url}: {algorithm} of the download is {actual}, expected {checksum}; the partial "
            "file was removed (is the URL the official file? run the command again to retry)"
        )
    os.replace(part, dest)
    return dest
