"""Path confinement: every path a `RunStore` touches stays inside its run directory.

Why: run paths are built from config values and question ids; an absolute path, a ``..`` or a
symbolic link leading out must never make the store write (or read) outside the run.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from rl_circuits.errors import StoreError
from rl_circuits.store.atomic import os_reason
from rl_circuits.store.lock import LOCK_NAME
from rl_circuits.store.manifest import CONFIG_NAME, MANIFEST_NAME

RESERVED_NAMES = frozenset({LOCK_NAME, CONFIG_NAME, MANIFEST_NAME})  # the store's own files


def confine(root: Path, rel_path: str | os.PathLike[str], *, for_write: bool = False) -> Path:
    """Absolute path of `rel_path` under the resolved `root`; StoreError if it is absolute,
    has '..', names `root` itself or leaves it through a symlink, or (`for_write`) names one
    of the store's own files."""
    text = os.fspath(rel_path)
    if not isinstance(text, str) or not text or "\x00" in text:
        raise StoreError(f"invalid path {text!r} in run directory {root}")
    pure = PurePosixPath(text)
    if pure.is_absolute():
        raise StoreError(
            f"path {text!r} is absolute: paths in a run are relative to its directory "
            f"{root}, and nothing is written outside it"
        )
    if ".." in pure.parts:
        raise StoreError(f"path {text!r} contains '..': nothing is written outside {root}")
    if not pure.parts:
        raise StoreError(f"path {text!r} names the run directory {root} itself")
    resolved = Path(os.path.realpath(root / pure))
    if resolved == root or not resolved.is_relative_to(root):
        raise StoreError(
            f"path {text!r} resolves to {resolved}, outside the run directory {root} "
            "(through a symbolic link); nothing is written outside it"
        )
    if for_write and resolved.parent == root and resolved.name in RESERVED_NAMES:
        raise StoreError(
            f"{text} in run directory {root} is managed by the store and cannot be written"
        )
    return resolved


def prepare_root(run_dir: str | os.PathLike[str]) -> Path:
    """The resolved run directory, created if missing."""
    root = Path(run_dir).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StoreError(f"run directory {root} exists and is not a directory") from None
    except OSError as exc:
        raise StoreError(f"cannot create run directory {root}: {os_reason(exc)}") from exc
    return root.resolve()
