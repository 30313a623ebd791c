"""Path confinement: every path a `RunStore` touches stays inside its run directory.

Why: run paths are built from config values and question ids; an absolute path, a ``..`` or a
symbolic link leading out must never make the store write (or read) outside the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

from rl_circuits.errors import StoreError
from rl_circuits.store.atomic import is_temp_name, os_reason
from rl_circuits.store.lock import LOCK_NAME
from rl_circuits.store.manifest import (
    CONFIG_NAME,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    is_run_manifest,
)

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


def check_run_root(run_dir: str | os.PathLike[str]) -> None:
    """StoreError unless `run_dir` is absent, empty (but for a lock and temp files of ours) or
    a run (its manifest carries the run format): a directory of other files, such as a
    checkpoint or a home directory, is never written into, whatever `force` says."""
    root = Path(run_dir).expanduser()
    if not root.is_dir():
        return  # absent (created by prepare_root), or a file (refused there)
    try:
        names = sorted(n for n in os.listdir(root) if n != LOCK_NAME and not is_temp_name(n))
    except OSError as exc:
        raise StoreError(f"cannot list run directory {root}: {os_reason(exc)}") from exc
    if not names:
        return
    if MANIFEST_NAME in names:
        try:
            manifest = json.loads((root / MANIFEST_NAME).read_bytes())
        except (OSError, ValueError):
            manifest = None
        if is_run_manifest(manifest):
            return
        raise StoreError(
            f"run directory {root} holds a {MANIFEST_NAME} that is not an rl-circuits run "
            f"manifest (format {MANIFEST_FORMAT!r}), so it is not a run and nothing is written "
            "there (--force does not change that): give a new or empty directory"
        )
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise StoreError(
        f"run directory {root} is not a run (no {MANIFEST_NAME}) and not empty: it holds "
        f"{shown}; nothing is written there (--force does not change that): give a new or "
        "empty directory"
    )
