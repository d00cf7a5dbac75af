"""Atomic file writes, output-path checks and the lock of a folder being written.

Every file adderquant writes goes through :func:`write_bytes_atomic`: the data goes to a
temporary file beside the target, which is then renamed over it, so a reader sees the old file
or the new one, never a part. Targets must be regular files or absent: a device, FIFO, socket or
folder (or a symbolic link to one) is refused rather than replaced. A symbolic link to a regular
file is written through (the link stays, its target is replaced).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOCK_FILE = ".adderquant.lock"


class OutputError(OSError):
    """An output path that cannot or must not be written; the message names it and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0])


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _writable_folder(folder: Path, target: Path) -> None:
    """The nearest existing folder at or above ``folder`` must be a writable folder."""
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write {target}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {target}: the folder {existing} is not writable; "
                          "choose another output path")


def check_output_file(path: str | os.PathLike) -> Path:
    """The path to write for output file ``path`` (a symbolic link resolved to its target), after
    checking it is a regular file or absent and that its folder can be written."""
    target = Path(path)
    real = Path(os.path.realpath(target)) if target.is_symlink() else target
    if os.path.lexists(real):
        mode = os.lstat(real).st_mode
        if not stat.S_ISREG(mode):
            via = f" (the link {target} points to {real})" if real != target else ""
            raise OutputError(f"refusing to write {target}: it is {_kind(mode)}{via}, not a "
                              "regular file; give a file path")
    _writable_folder(real.parent, target)
    return real


def check_output_dir(path: str | os.PathLike) -> Path:
    """``path`` after checking it is a folder (or absent) inside a writable folder."""
    target = Path(path)
    if target.exists():
        if not target.is_dir():
            mode = os.stat(target).st_mode
            raise OutputError(f"refusing to write into {target}: it is {_kind(mode)}, not a "
                              "folder; give a folder path")
        if not os.access(target, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write into {target}: the folder is not writable; choose "
                              "another output folder")
    elif os.path.lexists(target):
        raise OutputError(f"refusing to write into {target}: it is a broken symbolic link")
    else:
        _writable_folder(target.parent, target)
    return target


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it and a rename; errors name
    ``path``, and nothing is left behind when writing fails or is interrupted."""
    target = Path(path)
    real = check_output_file(target)
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=".tmp")
    except OSError as e:
        raise OutputError(f"cannot write {target}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, real)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {target}: {e.strerror or e}") from e
        raise


def write_torch_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` with ``torch.save`` through :func:`write_bytes_atomic`."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON with :func:`write_bytes_atomic`."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def _holder(lock: Path) -> int | None:
    """The live process id recorded in ``lock``; -1 if the file cannot be read (held by an
    unknown writer); ``None`` if the recorded process is gone (a stale lock)."""
    try:
        pid = int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        return -1  # unreadable or being written: treat as held
    if pid <= 0:
        return -1
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


@contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``folder/.adderquant.lock`` (created exclusively, holding the process id) while
    writing into ``folder``; a second writer fails at once with a clear error. A lock left by a
    process that no longer runs is taken over."""
    directory = check_output_dir(folder)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write into {directory}: {e.strerror or e}") from e
    lock = directory / LOCK_FILE
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            pid = _holder(lock)
            if pid is None and attempt == 0:
                lock.unlink(missing_ok=True)
                continue
            who = f"process {pid}" if pid and pid > 0 else "another process"
            raise OutputError(
                f"{directory} is being written by {who} (lock file {lock}); wait for it to "
                "finish or choose another folder (delete the lock file only if no adderquant "
                "process is writing there)") from None
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise OutputError(f"cannot write into {directory}: {e.strerror}") from e
            raise
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        yield directory
    finally:
        lock.unlink(missing_ok=True)
