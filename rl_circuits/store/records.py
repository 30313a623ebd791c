"""Record tables: a stage's JSON records (one model's answers, or their grades) written in
resumable chunks, then one ordered file.

Why: a stage that runs for hours is killed and resumed. Each batch of records is written as its
own numbered chunk (atomically), so a resumed stage skips the ids already stored; finalising
writes ``<table>/records.jsonl`` whose bytes depend only on the records and the requested order,
never on how often the stage was interrupted. Shard workers number their chunks in their own
``s<i>-`` namespace. Layout: ``<table>/chunks/00001.jsonl``, ``<table>/chunks/s0001-00001.jsonl``
(shard worker 1), ``<table>/records.jsonl``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Collection, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from rl_circuits.errors import DataError, StoreError
from rl_circuits.store.canonical import jsonl_line, parse_jsonl, sha256
from rl_circuits.store.layout import RunLayout

_CHUNK_RE = re.compile(r"^(?:s(\d+)-)?(\d+)\.jsonl$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")


def check_name(name: str) -> str:
    """`name` if it is a valid (optionally nested) name of a stage or record table, which
    names its marker and folder in the run directory; else StoreError."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name.split("/"):
        raise StoreError(
            f"invalid stage or record table name {name!r}: use letters, digits, '_', '-', '.', "
            "optionally nested with '/'"
        )
    return name


def check_order(
    order: Sequence[str],
    stored: Collection[str],
    where: str,
    *,
    what: str,
    allow_extra: bool = False,
    missing_hint: str = "",
    extra_hint: str = "",
) -> list[str]:
    """`order` as a list if it names each stored id exactly once (ids not in `order` are allowed
    with `allow_extra`); else DataError saying which ids are doubled, missing or left over."""
    order = list(order)
    duplicates = sorted(i for i, count in Counter(order).items() if count > 1)
    if duplicates:
        raise DataError(f"{where}: the order lists ids more than once: {duplicates[:5]}")
    missing = [i for i in order if i not in stored]
    if missing:
        raise DataError(
            f"{where}: {len(missing)} of {len(order)} ids in the order have no {what} "
            f"(first: {missing[:5]}){missing_hint}"
        )
    extra = sorted(set(stored) - set(order))
    if extra and not allow_extra:
        raise DataError(
            f"{where}: {len(extra)} ids with a {what} are not in the order "
            f"(first: {extra[:5]}){extra_hint}"
        )
    return order


def record_id(record: Any, where: str) -> str:
    """The record's id: records are dicts with a non-empty string 'id'."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: records must be dicts, got {type(record).__name__}")
    rid = record.get("id")
    if not isinstance(rid, str) or not rid:
        raise DataError(f"{where}: every record needs a non-empty string 'id', got {rid!r}")
    return rid


@runtime_checkable
class Store(Protocol):
    """What a record table needs of its `RunStore` (declared here: `run` imports this module;
    runtime-checkable, so that a type checker can check a store against it)."""

    root: Path

    @property
    def shard(self) -> tuple[int, int] | None: ...
    def label(self, rel_path: str) -> str: ...
    def path(self, rel_path: str) -> Path: ...
    def exists(self, rel_path: str) -> bool: ...
    def read_bytes(self, rel_path: str) -> bytes: ...
    def write_bytes(self, rel_path: str, data: bytes) -> Path: ...
    def require_writable(self) -> None: ...
    def require_exclusive(self, what: str) -> None: ...
    def stage_done(self, stage: str) -> bool: ...
    def mark_done(self, stage: str, info: dict[str, Any] | None = None) -> None: ...
    def clear_done(self, stage: str) -> None: ...


class RecordTable:
    """A stage's records, written in chunks (resumable), finalised into one ordered file."""

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = check_name(name)
        self.chunks_rel = RunLayout.record_chunks(name)
        self.final_rel = RunLayout.records_file(name)

    def __repr__(self) -> str:
        return f"RecordTable({self.name!r}, run={str(self.store.root)!r})"

    def _chunk_keys(self) -> list[tuple[int, int]]:
        """(shard, number) of each chunk, sorted: a single writer's chunks (shard -1) first,
        then each shard worker's, so reading them is deterministic whoever wrote them."""
        directory = self.store.path(self.chunks_rel)
        if not directory.is_dir():
            return []
        keys = []
        for entry in os.scandir(directory):
            match = _CHUNK_RE.match(entry.name)
            if match and entry.is_file(follow_symlinks=False):
                shard = -1 if match.group(1) is None else int(match.group(1))
                keys.append((shard, int(match.group(2))))
        return sorted(keys)

    def _chunk_rel(self, key: tuple[int, int]) -> str:
        shard, number = key
        return RunLayout.record_chunk(self.name, None if shard < 0 else shard, number)

    def _read_records(self, rel: str) -> list[dict[str, Any]]:
        label = self.store.label(rel)
        records = parse_jsonl(self.store.read_bytes(rel), label)
        for record in records:
            record_id(record, label)
        return records

    def _merged(self) -> dict[str, dict[str, Any]]:
        """id -> record: the final file (if any), then chunks in order; the last write wins."""
        merged: dict[str, dict[str, Any]] = {}
        sources = [self.final_rel] if self.store.exists(self.final_rel) else []
        sources += [self._chunk_rel(key) for key in self._chunk_keys()]
        for rel in sources:
            for record in self._read_records(rel):
                merged[record["id"]] = record
        return merged

    def done_ids(self) -> set[str]:
        """Ids that already have a record (in chunks or the final file)."""
        return set(self._merged())

    def is_done(self) -> bool:
        return self.store.stage_done(self.name)

    def load(self) -> list[dict[str, Any]]:
        """The records: final order once finalised; otherwise chunk order (first appearance)."""
        return list(self._merged().values())

    def write_chunk(self, records: Sequence[dict[str, Any]]) -> Path | None:
        """Atomically write the next numbered chunk; returns its path (None if `records` empty).

        A shard worker numbers its chunks in its own namespace (``s<i>-<n>.jsonl``): workers
        writing the same table at once never pick the same name."""
        self.store.require_writable()
        if self.is_done():
            raise StoreError(
                f"record table {self.name!r} of {self.store.root} is already finalised; "
                "call reset() first to redo it"
            )
        if not records:
            return None
        where = f"record table {self.name!r}"
        lines, seen = [], set()
        for record in records:
            rid = record_id(record, where)
            if rid in seen:
                raise DataError(f"{where}: id {rid!r} appears twice in one chunk")
            seen.add(rid)
            lines.append(jsonl_line(record, where))
        shard = -1 if self.store.shard is None else self.store.shard[0]
        last = max((n for s, n in self._chunk_keys() if s == shard), default=0)
        rel = self._chunk_rel((shard, last + 1))
        self.store.write_bytes(rel, b"".join(lines))
        return self.store.path(rel)

    def finalize(
        self,
        order: Sequence[str],
        *,
        info: dict[str, Any] | None = None,
        allow_extra: bool = False,
    ) -> Path:
        """Write records.jsonl in `order`, mark the table done, then delete the chunks.

        The file's bytes depend only on the records and `order`, never on the chunking. Every id
        in `order` must have a record; records whose id is not in `order` are an error unless
        `allow_extra` (then they are left out). Needs the exclusive lock (no shard workers).
        """
        self.store.require_exclusive(f"finalising record table {self.name!r}")
        where = f"record table {self.name!r} of {self.store.root}"
        merged = self._merged()
        order = check_order(
            order,
            merged,
            f"{where}: cannot finalise",
            what="record",
            allow_extra=allow_extra,
            missing_hint="; write them first (done_ids() lists the stored ones)",
            extra_hint="; pass allow_extra=True to leave them out",
        )
        data = b"".join(jsonl_line(merged[i], where) for i in order)
        self.store.write_bytes(self.final_rel, data)
        marker = {**(info or {}), "n_records": len(order), "sha256": sha256(data)}
        self.store.mark_done(self.name, marker)
        self._remove_chunks()
        return self.store.path(self.final_rel)

    def _remove_chunks(self) -> None:
        for key in self._chunk_keys():
            with suppress(FileNotFoundError):
                self.store.path(self._chunk_rel(key)).unlink()
        with suppress(OSError):
            self.store.path(self.chunks_rel).rmdir()

    def reset(self) -> None:
        """Forget this table: its marker, final file and chunks."""
        self.store.require_exclusive(f"resetting record table {self.name!r}")
        self.store.clear_done(self.name)
        with suppress(FileNotFoundError):
            self.store.path(self.final_rel).unlink()
        self._remove_chunks()
