"""`RunStore`: one run directory, written by one process (or shard workers) and never corrupted.

Why: the pipeline (generate -> grade -> select -> attribute -> analyze -> report) runs for hours
and gets killed, resumed and re-run. Every stage writes through a `RunStore`, which gives:

* one resolved config per run (`manifest`): re-opening with a different config is refused with
  the differing keys named, unless ``force`` (the change is recorded in the manifest history;
  stage markers record the config hash they were computed under, so callers can tell stale
  stages);
* one writer at a time, or several shard workers (``open(..., shard=(i, n))``) that only add
  files (`lock`); everything that merges (``finalize``, ``merge_scores``, stage markers) needs
  the exclusive lock, so merged files are byte-identical to a single process's;
* atomic writes (`atomic`), resumable record tables (`records`), deterministic score files
  (`scorefile`), and stage markers written last, so a stage killed half-way is redone;
* no path escapes the run directory: absolute paths, ``..`` and symlinks leading out are refused.

Every path of a run directory is named in `rl_circuits.store.layout.RunLayout`.
"""

from __future__ import annotations

import json
import os
import shutil
import weakref
from collections.abc import Iterable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from rl_circuits.engine.scores import EdgeScores
from rl_circuits.errors import ConfigError, DataError, StoreError
from rl_circuits.store import manifest as mf
from rl_circuits.store import scorefile
from rl_circuits.store.atomic import os_reason, remove_temp_files, write_atomic
from rl_circuits.store.canonical import jsonl_line, parse_jsonl, pretty_json, sha256
from rl_circuits.store.layout import RunLayout, check_shard
from rl_circuits.store.lock import MERGE_PURPOSE, acquire_lock, release_lock
from rl_circuits.store.paths import check_run_root, confine, prepare_root
from rl_circuits.store.records import RecordTable, check_name

PathArg = str | os.PathLike[str]


class RunStore:
    """One run directory. Create with `RunStore.open` (writer, or shard worker with `shard=`)
    or `RunStore.read_only`."""

    def __init__(
        self,
        root: Path,
        *,
        lock_fd: int | None,
        config_bytes: bytes | None,
        shard: tuple[int, int] | None = None,
    ) -> None:
        """Internal: use `open` or `read_only`."""
        self.root = root
        self._config_bytes = config_bytes
        self._shard = shard
        # the stored config this open replaced (force=True), for callers that invalidate results
        self.previous_config: dict[str, Any] | None = None
        # stage -> fingerprint of the config keys its outputs depend on, recorded in markers
        self.fingerprints: dict[str, str] = {}
        self._writable = lock_fd is not None
        self._closed = False
        self._release = (
            weakref.finalize(self, release_lock, lock_fd) if lock_fd is not None else None
        )

    # ---- opening and closing

    @classmethod
    def open(
        cls,
        run_dir: PathArg,
        config: dict[str, Any],
        *,
        force: bool = False,
        manifest_extra: dict[str, Any] | None = None,
        shard: tuple[int, int] | None = None,
        wait: float = 0.0,
        merging: bool = False,
        upgrade: mf.Upgrade | None = None,
    ) -> RunStore:
        """Create or re-open `run_dir` for writing; holds its lock until `close()`.

        `run_dir` must be absent, empty or a run (`check_run_root`): a directory of other files
        is refused, with or without `force`.

        A different config than the stored one raises `ConfigError` naming each differing key,
        unless `force` (the stored config is then replaced, the change recorded in the manifest
        history; existing results are kept, and whether they are stale is the caller's call —
        stage markers record the config hash they were made under).

        `shard=(i, n)` joins an existing run as shard worker i of n (see `_open_shard`); `wait`
        is how long it waits for a merge in progress. `merging` marks an exclusive store opened
        only to merge finished shards, a short hold that shard workers wait for. `upgrade` maps
        a stored config to the current format (keys added since, at their defaults) before the
        comparison, so such keys are no change. `previous_config` then holds the stored config
        when it was replaced (else None).
        """
        if shard is not None:
            if force or manifest_extra:
                raise StoreError(
                    "a shard worker cannot change the config or the manifest (force, "
                    "manifest_extra): open the run without shard= first"
                )
            return cls._open_shard(run_dir, config, shard, wait)
        new_bytes = mf.config_bytes(config)
        extra = mf.check_extra(manifest_extra)
        check_run_root(run_dir)  # a directory of other files is never written into
        root = prepare_root(run_dir)
        purpose = MERGE_PURPOSE if merging else "stage"
        store = cls(root, lock_fd=acquire_lock(root, purpose=purpose), config_bytes=new_bytes)
        try:
            remove_temp_files(root)  # left by a killed writer: we hold the lock, none is live
            if not (root / mf.MANIFEST_NAME).is_file():  # a new run: its marker comes first
                first = mf.updated_manifest({}, extra, [], store.config_hash)
                store._write_own(mf.MANIFEST_NAME, pretty_json(first, what="the manifest"))
            events, store.previous_config = mf.install_config(
                root, new_bytes, force=force, upgrade=upgrade
            )
            manifest = mf.updated_manifest(store.manifest(), extra, events, store.config_hash)
            if manifest is not None:
                store._write_own(mf.MANIFEST_NAME, pretty_json(manifest, what="the manifest"))
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def _open_shard(
        cls, run_dir: PathArg, config: dict[str, Any], shard: tuple[int, int], wait: float
    ) -> RunStore:
        """A shard worker's store: shared lock, the stored config must equal `config` exactly.

        Why: several workers (one per GPU or cluster task) write one run at once. They share
        the lock, so they exclude exclusive stages but not each other, and they never rewrite
        config.json or manifest.json (which would race); nor do they remove temp files (those
        may be another worker's writes in progress) — the next exclusive open does.
        """
        index, count = check_shard(shard)
        new_bytes = mf.config_bytes(config)
        root = Path(run_dir).expanduser()
        check_run_root(root)
        stored_path = root / mf.CONFIG_NAME
        if not stored_path.is_file():
            raise StoreError(
                f"run directory {root} has no {mf.CONFIG_NAME}: shard workers join an existing "
                "run, so run the earlier stages (or this stage without --shard) first"
            )
        root = root.resolve()
        lock_fd = acquire_lock(root, shared=True, wait=wait)
        store = cls(root, lock_fd=lock_fd, config_bytes=new_bytes, shard=(index, count))
        try:
            stored = stored_path.read_bytes()
            if stored != new_bytes:
                _old, changes = mf.config_changes(stored, new_bytes)
                raise ConfigError(
                    f"shard worker {index}/{count}: run directory {root} holds a different "
                    f"config ({mf.CONFIG_NAME}); differing keys:\n{mf.change_listing(changes)}\n"
                    "Shard workers never change the stored config: open the run without a "
                    "shard (with --force to accept the change) first."
                )
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def read_only(cls, run_dir: PathArg) -> RunStore:
        """Open an existing run for reading: no lock, no config check (notebooks, reports)."""
        root = Path(run_dir).expanduser()
        if not root.is_dir():
            raise StoreError(f"no run directory at {root}")
        root = root.resolve()
        config_path = root / mf.CONFIG_NAME
        config_bytes = config_path.read_bytes() if config_path.is_file() else None
        return cls(root, lock_fd=None, config_bytes=config_bytes)

    def close(self) -> None:
        """Release the lock; further writes raise. Idempotent."""
        self._closed = True
        if self._release is not None:
            self._release()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "closed" if self._closed else ("writer" if self._writable else "read-only")
        if self._shard is not None and not self._closed:
            mode = f"shard worker {self._shard[0]}/{self._shard[1]}"
        return f"RunStore({str(self.root)!r}, {mode})"

    @property
    def writable(self) -> bool:
        return self._writable and not self._closed

    @property
    def shard(self) -> tuple[int, int] | None:
        """(i, n) for shard worker i of n (shared lock); None if exclusive or read-only."""
        return self._shard

    def require_exclusive(self, what: str) -> None:
        """Merging and marking need the exclusive lock: no other writer may be half-way."""
        self.require_writable()
        if self._shard is not None:
            raise StoreError(
                f"{what} needs the exclusive lock on {self.root}, but this store is shard worker "
                f"{self._shard[0]}/{self._shard[1]} (shared lock): shard workers only add files; "
                "the merge runs in a store opened without shard= once the workers have ended"
            )

    def require_writable(self) -> None:
        """StoreError unless this store is open for writing."""
        if self._closed:
            raise StoreError(f"the store for {self.root} is closed; open it again to write")
        if not self._writable:
            raise StoreError(
                f"{self.root} was opened read-only; use RunStore.open(run_dir, config) to write"
            )

    # ---- config and manifest

    @property
    def config(self) -> dict[str, Any] | None:
        """A fresh copy of the stored config (None for a read-only run without one)."""
        return None if self._config_bytes is None else json.loads(self._config_bytes)

    @property
    def config_hash(self) -> str | None:
        """sha256 of config.json's bytes."""
        return None if self._config_bytes is None else sha256(self._config_bytes)

    def _write_own(self, name: str, data: bytes) -> None:
        """Write one of the store's own files (config.json, manifest.json)."""
        write_atomic(self.root / name, data, label=self.label(name))

    def manifest(self) -> dict[str, Any]:
        """The manifest ({} if the run has none yet)."""
        if not (self.root / mf.MANIFEST_NAME).is_file():
            return {}
        manifest = self.read_json(mf.MANIFEST_NAME)
        if not isinstance(manifest, dict):
            raise DataError(f"{self.label(mf.MANIFEST_NAME)} is not a JSON object")
        return manifest

    def update_manifest(self, extra: dict[str, Any]) -> None:
        """Deep-merge `extra` (e.g. model revisions, dataset hashes) into the manifest."""
        self.require_exclusive("updating the manifest")
        manifest = mf.updated_manifest(self.manifest(), mf.check_extra(extra), [], self.config_hash)
        if manifest is not None:
            self._write_own(mf.MANIFEST_NAME, pretty_json(manifest, what="the manifest"))

    # ---- paths

    def label(self, rel_path: PathArg) -> str:
        """How messages name a file: relative path and run directory."""
        return f"{os.fspath(rel_path)} in run directory {self.root}"

    def path(self, rel_path: PathArg) -> Path:
        """Absolute path of `rel_path`, refused if it is absolute, has '..' or leaves the run."""
        return self._resolve(rel_path)

    def _resolve(self, rel_path: PathArg, *, for_write: bool = False) -> Path:
        return confine(self.root, rel_path, for_write=for_write)

    def _writable_path(self, rel_path: PathArg) -> Path:
        self.require_writable()
        return self._resolve(rel_path, for_write=True)

    def exists(self, rel_path: PathArg) -> bool:
        return self._resolve(rel_path).exists()

    # ---- writing and reading

    def write_bytes(self, rel_path: PathArg, data: bytes) -> Path:
        """Atomically write `data`; returns the absolute path."""
        return write_atomic(self._writable_path(rel_path), data, label=self.label(rel_path))

    def write_text(self, rel_path: PathArg, text: str) -> Path:
        return self.write_bytes(rel_path, text.encode())

    def write_json(self, rel_path: PathArg, obj: Any) -> Path:
        """Indented JSON with sorted keys; NaN/Infinity are refused (not valid JSON)."""
        return self.write_bytes(rel_path, pretty_json(obj, what=self.label(rel_path)))

    def write_jsonl(self, rel_path: PathArg, records: Iterable[Any]) -> Path:
        """One compact JSON document per line (sorted keys), streamed to disk."""
        target = self._writable_path(rel_path)
        label = self.label(rel_path)
        return write_atomic(target, (jsonl_line(r, label) for r in records), label=label)

    def read_bytes(self, rel_path: PathArg) -> bytes:
        path = self._resolve(rel_path)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{self.label(rel_path)} does not exist") from None
        except OSError as exc:
            raise StoreError(f"could not read {self.label(rel_path)}: {os_reason(exc)}") from exc

    def read_text(self, rel_path: PathArg) -> str:
        return self.read_bytes(rel_path).decode()

    def read_json(self, rel_path: PathArg) -> Any:
        try:
            return json.loads(self.read_bytes(rel_path))
        except ValueError as exc:
            raise DataError(f"{self.label(rel_path)} is not valid JSON: {exc}") from exc

    def read_jsonl(self, rel_path: PathArg) -> list[Any]:
        return parse_jsonl(self.read_bytes(rel_path), self.label(rel_path))

    def remove(self, rel_path: PathArg) -> None:
        """Delete a file or a directory tree of the run (absent: nothing to do)."""
        self.require_exclusive(f"removing {os.fspath(rel_path)!r}")
        path = self._resolve(rel_path, for_write=True)
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"could not remove {self.label(rel_path)}: {os_reason(exc)}") from exc

    # ---- record tables and markers

    def records(self, name: str) -> RecordTable:
        """The record table `name` (e.g. `RunLayout.generations(model, dataset)`)."""
        return RecordTable(self, name)

    def _marker_rel(self, stage: str) -> str:
        return RunLayout.marker(check_name(stage))

    def mark_done(self, stage: str, info: dict[str, Any] | None = None) -> None:
        """Record that `stage` completed; call it last, after all of the stage's files."""
        self.require_exclusive(f"marking stage {stage!r} done")
        marker = {
            "stage": stage,
            "completed_at": mf.now(),
            "config_hash": self.config_hash,
            "info": info or {},
        }
        if stage in self.fingerprints:
            marker["fingerprint"] = self.fingerprints[stage]
        self.write_json(self._marker_rel(stage), marker)

    def stage_done(self, stage: str) -> bool:
        return self.exists(self._marker_rel(stage))

    def stage_info(self, stage: str) -> dict[str, Any] | None:
        """The marker: {stage, completed_at, config_hash, info}; None if not done."""
        rel = self._marker_rel(stage)
        return self.read_json(rel) if self.exists(rel) else None

    def clear_done(self, stage: str) -> None:
        """Remove the marker so the stage runs again."""
        self.require_exclusive(f"clearing stage {stage!r}")
        with suppress(FileNotFoundError):
            self._resolve(self._marker_rel(stage)).unlink()

    # ---- edge scores (the format: `scorefile`)

    def write_scores(self, rel_path: PathArg, scores: EdgeScores) -> Path:
        """Atomically save `scores` (with ids) as one safetensors file; same scores, same
        bytes. Returns the absolute path."""
        target = self._writable_path(rel_path)
        scorefile.write_scores(target, scores, self.label(rel_path))
        return target

    def read_scores(self, rel_path: PathArg) -> EdgeScores:
        return scorefile.read_scores(self._resolve(rel_path), self.label(rel_path))

    def merge_scores(
        self,
        rel_paths: Sequence[PathArg],
        out_rel_path: PathArg,
        order: Sequence[str],
        *,
        meta: dict[str, Any] | None = None,
    ) -> Path:
        """Stack the questions of several score files into one, in `order` (every stored id
        exactly once). The inputs must share node names, edge mask, graph and method, and
        their meta unless `meta` is given for the output; losses are kept when every input
        has them. Needs the exclusive lock (no shard workers)."""
        self.require_exclusive("merging score files")
        target = self._resolve(out_rel_path, for_write=True)
        sources = [self.read_scores(rel) for rel in rel_paths]
        names = [os.fspath(rel) for rel in rel_paths]
        scorefile.merge_scores(
            sources, names, target, order, meta=meta, label=self.label(out_rel_path)
        )
        return target
