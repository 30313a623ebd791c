"""The run directory's lock: one exclusive writer, or several shard workers sharing it.

Why: two writers of one run would interleave its files. An exclusive, non-blocking ``flock`` on
``.lock`` (which records the holder's pid, host and purpose) admits one writer; shard workers
(one per GPU or cluster task) each hold it *shared*, so they run alongside each other but never
alongside an exclusive writer. The kernel releases a lock when its process dies.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import suppress
from pathlib import Path

from rl_circuits.errors import LockedError, StoreError
from rl_circuits.store.atomic import os_reason
from rl_circuits.store.layout import RunLayout

LOCK_NAME = RunLayout.LOCK
MERGE_PURPOSE = "merge"  # an exclusive hold only to merge finished shards: workers wait for it


def acquire_lock(
    root: Path, *, shared: bool = False, purpose: str = "stage", wait: float = 0.0
) -> int:
    """Non-blocking flock on root/.lock: exclusive (then the file holds our pid, host and
    purpose) or shared (shard workers, which leave the file alone). A shared request waits up
    to `wait` seconds while the exclusive holder is a merge, so shard workers that start while
    a finished one merges join after it instead of failing. Returns the lock's descriptor."""
    path = root / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot create the lock file {path}: {os_reason(exc)}") from exc
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if shared and time.monotonic() < deadline and _merging(fd):
                time.sleep(0.05)
                continue
            message = _locked_message(root, path, fd, shared)
            os.close(fd)
            raise LockedError(message) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock {path}: {os_reason(exc)}") from exc
    if not shared:
        with suppress(OSError):  # the pid is informative only; the flock is what excludes
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {purpose}\n".encode(), 0)
    return fd


def release_lock(fd: int) -> None:
    """Clear the holder record and unlock (closing the descriptor)."""
    with suppress(OSError):
        os.ftruncate(fd, 0)
    with suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _lock_record(fd: int) -> list[str]:
    """Fields of the lock file: pid, host and purpose of the last exclusive holder."""
    try:
        return os.pread(fd, 256, 0).decode(errors="replace").split()
    except OSError:
        return []


def _lock_holder(fd: int) -> str:
    fields = _lock_record(fd)
    if not fields:
        return "another process (pid not yet recorded)"
    pid, host = fields[0], (fields[1] if len(fields) > 1 else "")
    if pid == str(os.getpid()) and host == socket.gethostname():
        return f"this process (pid {pid}) through another open RunStore"
    return f"process {pid}" + (f" on host {host}" if host else "")


def _held_shared(fd: int) -> bool:
    """Whether the processes holding the lock hold it shared (shard workers): we can join them."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def _merging(fd: int) -> bool:
    """Whether the exclusive holder is a short merge (or has not yet written its record)."""
    fields = _lock_record(fd)
    return not fields or fields[2:3] == [MERGE_PURPOSE]


def _locked_message(root: Path, path: Path, fd: int, shared: bool) -> str:
    """Why the lock was refused: an exclusive holder, or shard workers holding it shared."""
    if shared:
        return (
            f"run directory {root} is locked by {_lock_holder(fd)} (lock file {path}), which "
            "runs an exclusive stage: shard workers run alongside each other but not alongside "
            "an exclusive stage. Wait for it to finish or stop it, then start the shard workers."
        )
    if _held_shared(fd):
        return (
            f"run directory {root} is in use by shard workers (processes holding a shared lock "
            f"on {path}, e.g. `rl-circuits attribute --shard i/n` or `--workers`): an exclusive "
            "stage cannot run until they end. Wait for them (the last one to finish merges "
            "their outputs) or stop them; RunStore.read_only() can read the run meanwhile."
        )
    return (
        f"run directory {root} is locked by {_lock_holder(fd)} (lock file {path}): only one "
        "process may write a run at a time. Wait for it to finish or stop it, or use another "
        "run directory; RunStore.read_only() can read the run meanwhile."
    )
