"""Fault injection at the operating system's seam: `os.write` to chosen files.

Every file the package writes in place goes through an atomic write that opens a hidden temp
file with `os.open` and fills it with `os.write`; wrapping those two calls lets a test fail or
stop a write half-way without reaching into the package's private functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

# (path of the file, its fd, the bytes asked to be written, the real os.write) -> bytes written
Write = Callable[[Path, int, bytes, Callable[[int, bytes], int]], int]


def intercept_writes(
    match: Callable[[Path], bool], write: Write, setattr: Callable = setattr
) -> None:
    """From now on, `os.write` to a file opened by `os.open` at a path where `match(path)` is
    true calls `write` instead. `setattr` installs the patch (pass `monkeypatch.setattr` to
    undo it after the test; in a forked child the plain one)."""
    real_open, real_write, real_close = os.open, os.write, os.close
    chosen: dict[int, Path] = {}

    def opening(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if match(Path(os.fsdecode(path))):
            chosen[fd] = Path(os.fsdecode(path))
        else:
            chosen.pop(fd, None)
        return fd

    def writing(fd, data):
        if fd in chosen:
            return write(chosen[fd], fd, bytes(data), real_write)
        return real_write(fd, data)

    def closing(fd):
        chosen.pop(fd, None)
        return real_close(fd)

    setattr(os, "open", opening)
    setattr(os, "write", writing)
    setattr(os, "close", closing)


def temp_of(target: str) -> Callable[[Path], bool]:
    """Matches the hidden temp files an atomic write of `target` (a path relative to the run
    directory, "datasets/mixed.jsonl") fills."""
    parent, name = target.rsplit("/", 1)
    return lambda path: (
        path.parent.as_posix().endswith(parent) and path.name.startswith(f".{name}.tmp-")
    )


def score_temp(path: Path) -> bool:
    """Matches the temp file of a per-question score file (attribute/.../q/ID.safetensors)."""
    return (
        path.parent.name == "q" and path.name.startswith(".") and ".safetensors.tmp-" in (path.name)
    )
