"""Atomic file writes: a hidden temp file in the same directory, fsync, ``os.replace``.

Why: readers and resumed runs must see the old file or the new one, never half of one. Every
file the package writes in place (run files, reports, the zoo's markers, the demo config) goes
through `write_atomic`; a failed write (disk full) raises `StoreError` naming the file and
leaves the previous version intact, and no temp file is left behind.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

from rl_circuits.errors import StoreError

_TEMP_RE = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]+$")
_WRITE_BLOCK = 1 << 20

Pieces = Iterable[bytes | bytearray | memoryview]


def is_temp_name(name: str) -> bool:
    """Whether `name` is one of `write_atomic`'s hidden temp files."""
    return bool(_TEMP_RE.match(name))


def os_reason(exc: OSError) -> str:
    """Human wording of an OSError, spelling out the disk-full cases."""
    if exc.errno == errno.ENOSPC:
        return "disk full (no space left on device)"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return exc.strerror or str(exc)


def write_atomic(
    path: str | os.PathLike[str],
    data: str | bytes | Pieces,
    *,
    label: str | None = None,
    if_changed: bool = False,
) -> Path:
    """Write `data` (text as UTF-8, bytes, or byte pieces streamed in ~1 MiB blocks) to `path`
    atomically, creating its folder; returns the path. `label` names the file in errors.
    `if_changed` leaves a file that already holds these bytes untouched (not for pieces)."""
    target = Path(path)
    label = label or str(target)
    if isinstance(data, str):
        pieces: Pieces = [data.encode()]
    elif isinstance(data, bytes | bytearray | memoryview):
        pieces = [data]
    else:
        pieces = data
    if if_changed:
        if not isinstance(pieces, list):
            raise TypeError("write_atomic(if_changed=True) needs str or bytes, not pieces")
        with suppress(OSError):
            if target.is_file() and target.read_bytes() == b"".join(pieces):
                return target
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_pieces(tmp, pieces)
        os.replace(tmp, target)
    except BaseException as exc:
        with suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise StoreError(
                f"could not write {label}: {os_reason(exc)}. "
                "The previous version of the file, if any, is unchanged."
            ) from exc
        raise
    _fsync_dir(target.parent)
    return target


def remove_temp_files(root: Path) -> None:
    """Delete the temp files a killed writer left under `root`; call it only while no other
    process can be writing there (under an exclusive lock)."""
    for directory, _dirs, files in os.walk(root):
        for name in files:
            if is_temp_name(name):
                with suppress(OSError):
                    os.unlink(os.path.join(directory, name))


def _write_pieces(path: Path, pieces: Pieces) -> None:
    """Create `path` (must not exist), write the pieces in ~1 MiB blocks, fsync, close."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o644)
    try:
        pending = bytearray()
        for piece in pieces:
            if len(piece) >= _WRITE_BLOCK:
                _write_all(fd, pending)
                pending = bytearray()
                _write_all(fd, piece)
                continue
            pending += piece
            if len(pending) >= _WRITE_BLOCK:
                _write_all(fd, pending)
                pending = bytearray()
        _write_all(fd, pending)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _fsync_dir(path: Path) -> None:
    """Make a rename durable; best effort (the new file is already in place)."""
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
