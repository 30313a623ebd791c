"""The run store: everything one run produces lives in one directory, and a crash never corrupts it.

Why: the pipeline (generate -> grade -> select -> attribute -> analyze -> report) runs for hours and
gets killed, resumed and re-run. Every stage gets the same guarantees from this module:

* one resolved config per run directory: ``config.json`` (sorted keys) and its sha256, recorded as
  ``config_hash`` in ``manifest.json``. Re-opening with a different config is refused with the
  differing keys named, unless ``force`` (the change is then recorded in the manifest history; the
  results already in the directory are kept, and each stage marker records the config hash it was
  computed under, so callers can tell stale stages);
* one writer at a time: an exclusive, non-blocking ``flock`` on ``.lock``, which holds the
  writer's pid; the kernel releases it when the process dies;
* or several shard workers at a time (``open(..., shard=(i, n))``, one per GPU or cluster
  task): each holds a *shared* ``flock`` on ``.lock``, so they run alongside each other but
  never alongside an exclusive writer. A shard worker only adds files (per-question outputs,
  record chunks in its own ``s<i>-`` namespace); it never changes the config or manifest, and
  everything that merges (``finalize``, ``merge_scores``, stage markers) needs the exclusive
  lock, so the merged files are byte-identical to a single process's;
* atomic writes: a hidden temp file in the same directory, fsync, ``os.replace``. Readers and
  resumed runs see the old file or the new one, never half of one; a failed write (disk full)
  raises `StoreError` naming the file and leaves the previous version intact;
* no path escapes the run directory: absolute paths, ``..`` and symlinks leading out are refused;
* resumable record stages written in chunks and finalised into one file whose bytes depend only
  on the records and the requested order, not on how often the stage was interrupted;
* attribution scores as single safetensors files with deterministic bytes (the header is written
  here with sorted keys: the safetensors library orders metadata keys randomly per process);
* stage markers, written last, so a stage killed half-way is redone or resumed.

Layout of a run directory::

    .lock                        pid and host of the process holding the lock
    config.json                  the resolved config
    manifest.json                versions, platform, times, config hash, extras, history
    stages/<stage>.json          completion markers (mark_done)
    <stage>/chunks/00001.jsonl   record chunks of an unfinished stage
    <stage>/chunks/s0001-00001.jsonl   ... written by shard worker 1
    <stage>/records.jsonl        the finalised records of a stage
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import platform
import re
import secrets
import socket
import sys
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from rl_circuits.engine.scoreview import ScoreView
from rl_circuits.errors import ConfigError, DataError, LockedError, StoreError
from rl_circuits.store.layout import RunLayout, check_shard

if TYPE_CHECKING:
    import torch

PathArg = str | os.PathLike[str]

LOCK_NAME = RunLayout.LOCK
CONFIG_NAME = RunLayout.CONFIG
MANIFEST_NAME = RunLayout.MANIFEST
RESERVED_NAMES = frozenset({LOCK_NAME, CONFIG_NAME, MANIFEST_NAME})
MANIFEST_FORMAT = "rl-circuits-run/1"
SCORES_FORMAT = "rl-circuits-scores/1"
MERGE_PURPOSE = "merge"
MANIFEST_RESERVED_KEYS = frozenset(
    {"format", "created_at", "updated_at", "config_hash", "package_version", "environment"}
    | {"history"}
)
PACKAGES = ("rl-circuits", "torch", "transformers", "transformer-lens", "numpy", "safetensors")

_TEMP_RE = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]+$")
_CHUNK_RE = re.compile(r"^(?:s(\d+)-)?(\d+)\.jsonl$")
_STAGE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")
_WRITE_BLOCK = 1 << 20
_SAFETENSORS_ALIGN = 8


# --------------------------------------------------------------------------- small helpers


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _reason(exc: OSError) -> str:
    """Human wording of an OSError, spelling out the disk-full cases."""
    if exc.errno == errno.ENOSPC:
        return "disk full (no space left on device)"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return exc.strerror or str(exc)


def _json_bytes(obj: Any, *, what: str) -> bytes:
    """Pretty, sorted, strict JSON (no NaN/Infinity) with a trailing newline."""
    try:
        text = json.dumps(obj, sort_keys=True, ensure_ascii=False, allow_nan=False, indent=2)
    except (TypeError, ValueError) as exc:
        raise DataError(f"cannot store {what} as JSON: {exc}") from exc
    return (text + "\n").encode()


def _canonical(obj: Any) -> str:
    """Compact sorted JSON; NaN/Infinity raise ValueError (they are not JSON)."""
    return json.dumps(
        obj, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":")
    )


def _fmt(value: Any) -> str:
    text = _canonical(value)
    return text if len(text) <= 80 else text[:77] + "..."


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Each differing leaf as ``key.path: old -> new`` (JSON-rendered, so 3 and 3.0 differ)."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                lines.append(f"{path}: (absent) -> {_fmt(new[key])}")
            elif key not in new:
                lines.append(f"{path}: {_fmt(old[key])} -> (absent)")
            else:
                lines.extend(config_diff(old[key], new[key], path))
        return lines
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        lines = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            lines.extend(config_diff(a, b, f"{prefix}[{i}]"))
        return lines
    if _canonical(old) != _canonical(new):
        return [f"{prefix or '(whole config)'}: {_fmt(old)} -> {_fmt(new)}"]
    return []


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _package_version(name: str) -> str | None:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Python, platform and installed versions of the packages that shape a run's results."""
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": {name: _package_version(name) for name in PACKAGES},
    }


# --------------------------------------------------------------------------- atomic file writing


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _write_pieces(path: Path, pieces: Iterable[bytes | memoryview]) -> None:
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


def _fsync_dir(path: Path) -> None:
    """Make a rename durable; best effort (the new file is already in place)."""
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(target: Path, pieces: Iterable[bytes | memoryview], *, label: str) -> None:
    """Write `pieces` to `target` through a hidden temp file; on failure the original stays."""
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
                f"could not write {label}: {_reason(exc)}. "
                "The previous version of the file, if any, is unchanged."
            ) from exc
        raise
    _fsync_dir(target.parent)


# --------------------------------------------------------------------------- locking


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


def _acquire_lock(
    root: Path, *, shared: bool = False, purpose: str = "stage", wait: float = 0.0
) -> int:
    """Non-blocking flock on root/.lock: exclusive (then the file holds our pid, host and
    purpose) or shared (shard workers, which leave the file alone). A shared request waits up
    to `wait` seconds while the exclusive holder is a merge, so shard workers that start while
    a finished one merges join after it instead of failing."""
    path = root / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot create the lock file {path}: {_reason(exc)}") from exc
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
            raise StoreError(f"cannot lock {path}: {_reason(exc)}") from exc
    if not shared:
        with suppress(OSError):  # the pid is informative only; the flock is what excludes
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {purpose}\n".encode(), 0)
    return fd


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


def _release_lock(fd: int) -> None:
    with suppress(OSError):
        os.ftruncate(fd, 0)
    with suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


# --------------------------------------------------------------------------- scores (safetensors)


@dataclass(frozen=True, eq=False, repr=False)
class Scores(ScoreView):
    """Edge scores of `n` questions: values[q, u, d] for upstream node u -> downstream node d
    (a short repr, `index`, `top_edges` and `to_frame` come from `ScoreView`)."""

    values: torch.Tensor  # [n, n_up, n_down] float32
    ids: list[str]
    upstream: tuple[str, ...]
    downstream: tuple[str, ...]
    edge_mask: torch.Tensor  # [n_up, n_down] bool: which (u, d) pairs are edges of the graph
    meta: dict[str, Any] = field(default_factory=dict)


def _check_names(names: Sequence[str], what: str, label: str) -> None:
    if isinstance(names, str):
        raise DataError(f"{label}: {what} must be a sequence of strings, not one string")
    if not all(isinstance(n, str) for n in names):
        raise DataError(f"{label}: {what} must all be strings")
    if len(set(names)) != len(names):
        raise DataError(f"{label}: {what} contain duplicates")


def _validate_scores(scores: Scores, label: str) -> None:
    import torch

    _check_names(scores.ids, "ids", label)
    _check_names(scores.upstream, "upstream node names", label)
    _check_names(scores.downstream, "downstream node names", label)
    values, mask = scores.values, scores.edge_mask
    if not isinstance(values, torch.Tensor) or values.dtype != torch.float32:
        raise DataError(f"{label}: values must be a float32 tensor, got {_describe(values)}")
    want = (len(scores.ids), len(scores.upstream), len(scores.downstream))
    if tuple(values.shape) != want:
        raise DataError(
            f"{label}: values have shape {tuple(values.shape)}, expected {want} "
            "(len(ids), len(upstream), len(downstream))"
        )
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise DataError(f"{label}: edge_mask must be a bool tensor, got {_describe(mask)}")
    if tuple(mask.shape) != want[1:]:
        raise DataError(f"{label}: edge_mask has shape {tuple(mask.shape)}, expected {want[1:]}")
    if not isinstance(scores.meta, dict):
        raise DataError(f"{label}: meta must be a dict")


def _describe(obj: Any) -> str:
    dtype = getattr(obj, "dtype", None)
    return f"{type(obj).__name__} of dtype {dtype}" if dtype is not None else type(obj).__name__


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Little-endian raw bytes of a CPU copy of `tensor` (no copy if already contiguous CPU)."""
    import numpy as np

    array = tensor.detach().cpu().contiguous().numpy()
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not _little_endian()):
        array = array.astype(array.dtype.newbyteorder("<"))
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _little_endian() -> bool:
    return sys.byteorder == "little"


def _scores_header(scores: Scores, label: str) -> bytes:
    """safetensors header (8-byte length + JSON padded to 8 bytes) with sorted, fixed keys."""
    n, n_up, n_down = (len(scores.ids), len(scores.upstream), len(scores.downstream))
    values_size = 4 * n * n_up * n_down
    try:
        info = {
            "__metadata__": {
                "format": SCORES_FORMAT,
                "ids": _canonical(list(scores.ids)),
                "upstream": _canonical(list(scores.upstream)),
                "downstream": _canonical(list(scores.downstream)),
                "meta": _canonical(scores.meta),
            },
            "values": {
                "dtype": "F32",
                "shape": [n, n_up, n_down],
                "data_offsets": [0, values_size],
            },
            "edge_mask": {
                "dtype": "BOOL",
                "shape": [n_up, n_down],
                "data_offsets": [values_size, values_size + n_up * n_down],
            },
        }
        text = json.dumps(info, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise DataError(f"{label}: meta cannot be stored as JSON: {exc}") from exc
    body = text.encode()
    body += b" " * (-len(body) % _SAFETENSORS_ALIGN)
    return len(body).to_bytes(8, "little") + body


def _scores_pieces(
    header: bytes, rows: Iterable[torch.Tensor], edge_mask: torch.Tensor
) -> Iterator[bytes | memoryview]:
    """The file's bytes in order: header, value rows, mask."""
    yield header
    for row in rows:
        yield _tensor_bytes(row)
    yield _tensor_bytes(edge_mask)


def _parse_scores(path: Path, label: str) -> Scores:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except FileNotFoundError:
        raise StoreError(f"{label} does not exist") from None
    except OSError as exc:
        raise StoreError(f"could not read {label}: {_reason(exc)}") from exc
    except Exception as exc:  # safetensors raises its own error type for malformed files
        raise DataError(f"{label} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != SCORES_FORMAT or not {"values", "edge_mask"} <= set(tensors):
        raise DataError(f"{label} is not an rl-circuits score file (format {SCORES_FORMAT})")
    try:
        scores = Scores(
            values=tensors["values"],
            ids=list(json.loads(meta["ids"])),
            upstream=tuple(json.loads(meta["upstream"])),
            downstream=tuple(json.loads(meta["downstream"])),
            edge_mask=tensors["edge_mask"],
            meta=json.loads(meta["meta"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{label} has malformed metadata: {exc}") from exc
    _validate_scores(scores, label)
    return scores


# --------------------------------------------------------------------------- record stages


def _check_stage_name(stage: str) -> str:
    if not isinstance(stage, str) or not _STAGE_RE.match(stage) or ".." in stage.split("/"):
        raise StoreError(
            f"invalid stage name {stage!r}: use letters, digits, '_', '-', '.', "
            "optionally nested with '/'"
        )
    return stage


def _record_line(record: Any, where: str) -> tuple[str, bytes]:
    """(id, serialised line); the serialisation fixes the final file's bytes."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: records must be dicts, got {type(record).__name__}")
    rid = record.get("id")
    if not isinstance(rid, str) or not rid:
        raise DataError(f"{where}: every record needs a non-empty string 'id', got {rid!r}")
    try:
        line = json.dumps(record, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: record {rid!r} cannot be stored as JSON: {exc}") from exc
    return rid, (line + "\n").encode()


def _parse_jsonl(data: bytes, label: str) -> list[Any]:
    # Split on b"\n" only: str.splitlines() would also split on U+2028, which JSON leaves raw.
    records = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            raise DataError(f"{label}, line {number}: not valid JSON ({exc})") from exc
    return records


class RecordStage:
    """A stage's records, written in chunks (resumable), finalised into one ordered file."""

    def __init__(self, store: RunStore, name: str) -> None:
        self.store = store
        self.name = _check_stage_name(name)
        self.chunks_rel = RunLayout.record_chunks(name)
        self.final_rel = RunLayout.records_file(name)

    def __repr__(self) -> str:
        return f"RecordStage({self.name!r}, run={str(self.store.root)!r})"

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
        records = _parse_jsonl(self.store.read_bytes(rel), label)
        for record in records:
            _record_line(record, label)  # validates dict with string id
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
        writing the same stage at once never pick the same name."""
        self.store._check_writable()
        if self.is_done():
            raise StoreError(
                f"stage {self.name!r} of {self.store.root} is already finalised; "
                "call reset() first to redo it"
            )
        if not records:
            return None
        where = f"stage {self.name!r}"
        lines, seen = [], set()
        for record in records:
            rid, line = _record_line(record, where)
            if rid in seen:
                raise DataError(f"{where}: id {rid!r} appears twice in one chunk")
            seen.add(rid)
            lines.append(line)
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
        """Write records.jsonl in `order`, mark the stage done, then delete the chunks.

        The file's bytes depend only on the records and `order`, never on the chunking. Every id
        in `order` must have a record; records whose id is not in `order` are an error unless
        `allow_extra` (then they are left out). Needs the exclusive lock (no shard workers).
        """
        self.store._check_exclusive(f"finalising stage {self.name!r}")
        order = list(order)
        where = f"stage {self.name!r} of {self.store.root}"
        duplicates = sorted(i for i, count in Counter(order).items() if count > 1)
        if duplicates:
            raise DataError(f"{where}: order lists ids more than once: {duplicates[:5]}")
        merged = self._merged()
        missing = [i for i in order if i not in merged]
        if missing:
            raise DataError(
                f"{where}: cannot finalise, {len(missing)} of {len(order)} ids have no record "
                f"(first: {missing[:5]}); write them first (done_ids() lists the stored ones)"
            )
        extra = sorted(set(merged) - set(order))
        if extra and not allow_extra:
            raise DataError(
                f"{where}: {len(extra)} stored records are not in the order (first: {extra[:5]}); "
                "pass allow_extra=True to leave them out"
            )
        data = b"".join(_record_line(merged[i], where)[1] for i in order)
        self.store.write_bytes(self.final_rel, data)
        marker = {**(info or {}), "n_records": len(order), "sha256": _sha256(data)}
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
        """Forget this stage: its marker, final file and chunks."""
        self.store._check_exclusive(f"resetting stage {self.name!r}")
        self.store.clear_done(self.name)
        with suppress(FileNotFoundError):
            self.store.path(self.final_rel).unlink()
        self._remove_chunks()


# --------------------------------------------------------------------------- the store


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
            weakref.finalize(self, _release_lock, lock_fd) if lock_fd is not None else None
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
        upgrade: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> RunStore:
        """Create or re-open `run_dir` for writing; holds its lock until `close()`.

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
        config_bytes = _config_bytes(config)
        extra = _check_extra(manifest_extra)
        root = _prepare_root(run_dir)
        purpose = MERGE_PURPOSE if merging else "stage"
        store = cls(root, lock_fd=_acquire_lock(root, purpose=purpose), config_bytes=config_bytes)
        try:
            store._remove_stale_temp_files()
            events = store._install_config(config_bytes, force=force, upgrade=upgrade)
            store._update_manifest(extra, events)
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
        config_bytes = _config_bytes(config)
        root = Path(run_dir).expanduser()
        stored_path = root / CONFIG_NAME
        if not stored_path.is_file():
            raise StoreError(
                f"run directory {root} has no {CONFIG_NAME}: shard workers join an existing "
                "run, so run the earlier stages (or this stage without --shard) first"
            )
        root = root.resolve()
        store = cls(
            root,
            lock_fd=_acquire_lock(root, shared=True, wait=wait),
            config_bytes=config_bytes,
            shard=(index, count),
        )
        try:
            stored = stored_path.read_bytes()
            if stored != config_bytes:
                try:
                    changes = config_diff(json.loads(stored), json.loads(config_bytes))
                except ValueError as exc:
                    changes = [f"(the stored config.json is unreadable: {exc})"]
                listing = "\n".join(f"  {line}" for line in changes or ["(formatting only)"])
                raise ConfigError(
                    f"shard worker {index}/{count}: run directory {root} holds a different "
                    f"config ({CONFIG_NAME}); differing keys:\n{listing}\nShard workers never "
                    "change the stored config: open the run without a shard (with --force to "
                    "accept the change) first."
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
        config_path = root / CONFIG_NAME
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

    def _check_exclusive(self, what: str) -> None:
        """Merging and marking need the exclusive lock: no other writer may be half-way."""
        self._check_writable()
        if self._shard is not None:
            raise StoreError(
                f"{what} needs the exclusive lock on {self.root}, but this store is shard worker "
                f"{self._shard[0]}/{self._shard[1]} (shared lock): shard workers only add files; "
                "the merge runs in a store opened without shard= once the workers have ended"
            )

    def _check_writable(self) -> None:
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
        return None if self._config_bytes is None else _sha256(self._config_bytes)

    def _install_config(
        self, new_bytes: bytes, *, force: bool, upgrade=None
    ) -> list[dict[str, Any]]:
        path = self.root / CONFIG_NAME
        label = self.label(CONFIG_NAME)
        old_bytes = path.read_bytes() if path.is_file() else None
        if old_bytes == new_bytes:
            return []
        if old_bytes is None:
            _atomic_write(path, [new_bytes], label=label)
            return []
        try:
            old = json.loads(old_bytes)
            changes = config_diff(old if upgrade is None else upgrade(old), json.loads(new_bytes))
        except ValueError as exc:
            old = None
            changes = [f"(the stored config.json is unreadable: {exc})"]
        if changes:
            self.previous_config = old
        if changes and not force:
            listing = "\n".join(f"  {line}" for line in changes)
            raise ConfigError(
                f"run directory {self.root} already holds a run with a different config "
                f"({CONFIG_NAME}); differing keys:\n{listing}\nUse a new run directory for the "
                "new config, or pass --force (force=True) to overwrite the stored config: the "
                "results already there are kept and the change is recorded in manifest.json."
            )
        _atomic_write(path, [new_bytes], label=label)
        if not changes:  # same content, different formatting (hand-edited): normalised
            return []
        event = {
            "event": "config_changed",
            "at": _now(),
            "from_hash": _sha256(old_bytes),
            "to_hash": _sha256(new_bytes),
            "changes": changes,
        }
        return [event]

    def manifest(self) -> dict[str, Any]:
        """The manifest ({} if the run has none yet)."""
        if not (self.root / MANIFEST_NAME).is_file():
            return {}
        manifest = self.read_json(MANIFEST_NAME)
        if not isinstance(manifest, dict):
            raise DataError(f"{self.label(MANIFEST_NAME)} is not a JSON object")
        return manifest

    def _update_manifest(self, extra: dict[str, Any], events: list[dict[str, Any]]) -> None:
        old = self.manifest()
        env = environment()
        now = _now()
        history = list(old.get("history", []))
        if not old:
            history.append({"event": "created", "at": now, "config_hash": self.config_hash})
        else:
            env_changes = config_diff(old.get("environment", {}), env)
            if env_changes:
                history.append({"event": "environment_changed", "at": now, "changes": env_changes})
        history.extend(events)
        manifest = _deep_merge(old, extra)
        manifest.update(
            format=MANIFEST_FORMAT,
            created_at=old.get("created_at", now),
            updated_at=now,
            config_hash=self.config_hash,
            package_version=env["packages"]["rl-circuits"],
            environment=env,
            history=history,
        )
        if {**manifest, "updated_at": None} == {**old, "updated_at": None}:
            return  # nothing new: a re-run that does nothing leaves the directory untouched
        data = _json_bytes(manifest, what=self.label(MANIFEST_NAME))
        _atomic_write(self.root / MANIFEST_NAME, [data], label=self.label(MANIFEST_NAME))

    def update_manifest(self, extra: dict[str, Any]) -> None:
        """Deep-merge `extra` (e.g. model revisions, dataset hashes) into the manifest."""
        self._check_exclusive("updating the manifest")
        self._update_manifest(_check_extra(extra), [])

    def _remove_stale_temp_files(self) -> None:
        """Temp files left by a killed writer (we hold the lock: none is being written)."""
        for directory, _dirs, files in os.walk(self.root):
            for name in files:
                if _TEMP_RE.match(name):
                    with suppress(OSError):
                        os.unlink(os.path.join(directory, name))

    # ---- paths

    def label(self, rel_path: PathArg) -> str:
        """How messages name a file: relative path and run directory."""
        return f"{os.fspath(rel_path)} in run directory {self.root}"

    def path(self, rel_path: PathArg) -> Path:
        """Absolute path of `rel_path`, refused if it is absolute, has '..' or leaves the run."""
        return self._resolve(rel_path)

    def _resolve(self, rel_path: PathArg, *, for_write: bool = False) -> Path:
        text = os.fspath(rel_path)
        if not isinstance(text, str) or not text or "\x00" in text:
            raise StoreError(f"invalid path {text!r} in run directory {self.root}")
        pure = PurePosixPath(text)
        if pure.is_absolute():
            raise StoreError(
                f"path {text!r} is absolute: paths in a run are relative to its directory "
                f"{self.root}, and nothing is written outside it"
            )
        if ".." in pure.parts:
            raise StoreError(f"path {text!r} contains '..': nothing is written outside {self.root}")
        if not pure.parts:
            raise StoreError(f"path {text!r} names the run directory {self.root} itself")
        resolved = Path(os.path.realpath(self.root / pure))
        if resolved == self.root or not resolved.is_relative_to(self.root):
            raise StoreError(
                f"path {text!r} resolves to {resolved}, outside the run directory {self.root} "
                "(through a symbolic link); nothing is written outside it"
            )
        if for_write and resolved.parent == self.root and resolved.name in RESERVED_NAMES:
            raise StoreError(f"{self.label(text)} is managed by the store and cannot be written")
        return resolved

    def exists(self, rel_path: PathArg) -> bool:
        return self._resolve(rel_path).exists()

    # ---- writing

    def write_bytes(self, rel_path: PathArg, data: bytes) -> Path:
        """Atomically write `data`; returns the absolute path."""
        self._check_writable()
        target = self._resolve(rel_path, for_write=True)
        _atomic_write(target, [data], label=self.label(rel_path))
        return target

    def write_text(self, rel_path: PathArg, text: str) -> Path:
        return self.write_bytes(rel_path, text.encode())

    def write_json(self, rel_path: PathArg, obj: Any) -> Path:
        """Indented JSON with sorted keys; NaN/Infinity are refused (not valid JSON)."""
        return self.write_bytes(rel_path, _json_bytes(obj, what=self.label(rel_path)))

    def write_jsonl(self, rel_path: PathArg, records: Iterable[Any]) -> Path:
        """One compact JSON document per line (sorted keys), streamed to disk."""
        self._check_writable()
        target = self._resolve(rel_path, for_write=True)
        label = self.label(rel_path)
        pieces = (_jsonl_line(record, label) for record in records)
        _atomic_write(target, pieces, label=label)
        return target

    # ---- reading

    def read_bytes(self, rel_path: PathArg) -> bytes:
        path = self._resolve(rel_path)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{self.label(rel_path)} does not exist") from None
        except OSError as exc:
            raise StoreError(f"could not read {self.label(rel_path)}: {_reason(exc)}") from exc

    def read_text(self, rel_path: PathArg) -> str:
        return self.read_bytes(rel_path).decode()

    def read_json(self, rel_path: PathArg) -> Any:
        try:
            return json.loads(self.read_bytes(rel_path))
        except ValueError as exc:
            raise DataError(f"{self.label(rel_path)} is not valid JSON: {exc}") from exc

    def read_jsonl(self, rel_path: PathArg) -> list[Any]:
        return _parse_jsonl(self.read_bytes(rel_path), self.label(rel_path))

    # ---- record stages and markers

    def records(self, stage: str) -> RecordStage:
        return RecordStage(self, stage)

    def _marker_rel(self, stage: str) -> str:
        return RunLayout.marker(_check_stage_name(stage))

    def mark_done(self, stage: str, info: dict[str, Any] | None = None) -> None:
        """Record that `stage` completed; call it last, after all of the stage's files."""
        self._check_exclusive(f"marking stage {stage!r} done")
        marker = {
            "stage": stage,
            "completed_at": _now(),
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

    def remove(self, rel_path: PathArg) -> None:
        """Delete a file or a directory tree of the run (absent: nothing to do)."""
        import shutil

        self._check_exclusive(f"removing {os.fspath(rel_path)!r}")
        path = self._resolve(rel_path, for_write=True)
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"could not remove {self.label(rel_path)}: {_reason(exc)}") from exc

    def clear_done(self, stage: str) -> None:
        """Remove the marker so the stage runs again."""
        self._check_exclusive(f"clearing stage {stage!r}")
        with suppress(FileNotFoundError):
            self._resolve(self._marker_rel(stage)).unlink()

    # ---- scores

    def write_scores(
        self,
        rel_path: PathArg,
        values: torch.Tensor,
        *,
        ids: Sequence[str],
        upstream: Sequence[str],
        downstream: Sequence[str],
        edge_mask: torch.Tensor,
        meta: dict[str, Any] | None = None,
    ) -> Path:
        """Atomically save scores as one safetensors file (tensors `values`, `edge_mask`; ids,
        node names and meta JSON-encoded in its metadata). Same inputs -> same bytes."""
        self._check_writable()
        target = self._resolve(rel_path, for_write=True)
        label = self.label(rel_path)
        for names, what in ((ids, "ids"), (upstream, "upstream"), (downstream, "downstream")):
            _check_names(names, what, label)
        scores = Scores(
            values, list(ids), tuple(upstream), tuple(downstream), edge_mask, meta or {}
        )
        _validate_scores(scores, label)
        pieces = _scores_pieces(_scores_header(scores, label), [values], edge_mask)
        _atomic_write(target, pieces, label=label)
        return target

    def read_scores(self, rel_path: PathArg) -> Scores:
        return _parse_scores(self._resolve(rel_path), self.label(rel_path))

    def merge_scores(
        self,
        rel_paths: Sequence[PathArg],
        out_rel_path: PathArg,
        order: Sequence[str],
        *,
        meta: dict[str, Any] | None = None,
    ) -> Path:
        """Stack the questions of several score files into one, in `order` (every stored id
        exactly once). The inputs must share node names and edge mask, and their meta unless
        `meta` is given for the output. Needs the exclusive lock (no shard workers)."""
        self._check_exclusive("merging score files")
        target = self._resolve(out_rel_path, for_write=True)
        label = self.label(out_rel_path)
        parts = [self.read_scores(rel) for rel in rel_paths]
        if not parts:
            raise DataError(f"{label}: no score files to merge")
        _check_compatible(parts, [os.fspath(r) for r in rel_paths], check_meta=meta is None)
        where = _locate_ids(parts, [os.fspath(r) for r in rel_paths])
        order = list(order)
        _check_order(order, where, label)
        first = parts[0]
        out_meta = first.meta if meta is None else meta
        if not isinstance(out_meta, dict):
            raise DataError(f"{label}: meta must be a dict")
        # The header needs only ids, names and meta; the rows are streamed from the inputs.
        layout = Scores(
            first.values, order, first.upstream, first.downstream, first.edge_mask, out_meta
        )
        header = _scores_header(layout, label)
        rows = (parts[where[i][0]].values[where[i][1]] for i in order)
        _atomic_write(target, _scores_pieces(header, rows, first.edge_mask), label=label)
        return target


# --------------------------------------------------------------------------- open() helpers


def _config_bytes(config: dict[str, Any]) -> bytes:
    if not isinstance(config, dict):
        raise ConfigError(f"a run config must be a dict, got {type(config).__name__}")
    try:
        return _json_bytes(config, what="the run config")
    except DataError as exc:
        raise ConfigError(str(exc)) from exc


def _check_extra(extra: dict[str, Any] | None) -> dict[str, Any]:
    extra = dict(extra or {})
    clash = sorted(MANIFEST_RESERVED_KEYS & set(extra))
    if clash:
        raise StoreError(f"manifest_extra cannot set the store's own manifest keys {clash}")
    _json_bytes(extra, what="manifest_extra")
    return extra


def _prepare_root(run_dir: PathArg) -> Path:
    root = Path(run_dir).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StoreError(f"run directory {root} exists and is not a directory") from None
    except OSError as exc:
        raise StoreError(f"cannot create run directory {root}: {_reason(exc)}") from exc
    return root.resolve()


def _jsonl_line(record: Any, label: str) -> bytes:
    try:
        line = json.dumps(record, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{label}: a record cannot be stored as JSON: {exc}") from exc
    return (line + "\n").encode()


# --------------------------------------------------------------------------- merge helpers


def _check_compatible(parts: list[Scores], names: list[str], *, check_meta: bool) -> None:
    import torch

    first = parts[0]
    for part, name in zip(parts[1:], names[1:], strict=True):
        if part.upstream != first.upstream or part.downstream != first.downstream:
            raise DataError(f"cannot merge {name}: its node names differ from {names[0]}'s")
        if not torch.equal(part.edge_mask, first.edge_mask):
            raise DataError(f"cannot merge {name}: its edge mask differs from {names[0]}'s")
        if check_meta and _canonical(part.meta) != _canonical(first.meta):
            diff = "; ".join(config_diff(first.meta, part.meta)[:5])
            raise DataError(
                f"cannot merge {name}: its meta differs from {names[0]}'s ({diff}); "
                "pass meta= to set the merged file's meta"
            )


def _locate_ids(parts: list[Scores], names: list[str]) -> dict[str, tuple[int, int]]:
    """id -> (file index, row); an id in two files is an error."""
    where: dict[str, tuple[int, int]] = {}
    for index, part in enumerate(parts):
        for row, qid in enumerate(part.ids):
            if qid in where:
                raise DataError(f"id {qid!r} is in both {names[where[qid][0]]} and {names[index]}")
            where[qid] = (index, row)
    return where


def _check_order(order: list[str], where: dict[str, tuple[int, int]], label: str) -> None:
    if len(set(order)) != len(order):
        raise DataError(f"{label}: the merge order lists some ids more than once")
    missing = [i for i in order if i not in where]
    if missing:
        raise DataError(f"{label}: ids in the order have no scores: {missing[:5]}")
    extra = sorted(set(where) - set(order))
    if extra:
        raise DataError(f"{label}: scored ids missing from the order: {extra[:5]}")
