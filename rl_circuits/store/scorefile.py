"""Score files: `EdgeScores` as one safetensors file with deterministic bytes, read and merged.

Why: the attribute stage writes one file per question and merges each cell's files into one;
the merged file must have the same bytes whoever wrote it and however the work was split. The
safetensors library orders metadata keys randomly per process, so the header is written here
(sorted keys, padded to 8 bytes) and the tensors streamed after it.

Format ``rl-circuits-scores/1``: tensors ``values`` (F32 [batch, n_up, n_down]) and ``edge_mask``
(BOOL [n_up, n_down]); string metadata ``format``, ``ids``, ``upstream``, ``downstream`` and
``meta``, each compact sorted JSON. ``meta`` holds the scores' `meta` plus their ``graph``,
``method`` and ``loss`` ({id: clean loss}); files written before these were fields may hold a
single-question file's loss as a bare number, which reads the same.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rl_circuits.engine.scores import EdgeScores
from rl_circuits.errors import DataError, StoreError
from rl_circuits.store.atomic import os_reason, write_atomic
from rl_circuits.store.canonical import compact_json, config_diff
from rl_circuits.store.records import check_order

if TYPE_CHECKING:
    import torch

SCORES_FORMAT = "rl-circuits-scores/1"
FIELDS_IN_META = ("graph", "method", "loss")  # EdgeScores fields stored inside `meta`
_ALIGN = 8


def write_scores(target: Path, scores: EdgeScores, label: str) -> None:
    """Atomically save `scores` (which need ids and float32 values) to `target`."""
    if scores.ids is None:
        raise DataError(f"{label}: stored scores need ids (one question id per sample)")
    _check_storable(scores, label)
    loss = None if scores.loss is None else dict(zip(scores.ids, scores.loss.tolist(), strict=True))
    meta = _disk_meta(scores.meta, scores.graph, scores.method, loss, label)
    header = _header(scores.ids, scores.upstream, scores.downstream, meta, label)
    write_atomic(target, _pieces(header, [scores.values], scores.edge_mask), label=label)


def read_scores(path: Path, label: str) -> EdgeScores:
    """The `EdgeScores` of a score file; DataError if it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except FileNotFoundError:
        raise StoreError(f"{label} does not exist") from None
    except OSError as exc:
        raise StoreError(f"could not read {label}: {os_reason(exc)}") from exc
    except Exception as exc:  # safetensors raises its own error type for malformed files
        raise DataError(f"{label} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != SCORES_FORMAT or not {"values", "edge_mask"} <= set(tensors):
        raise DataError(f"{label} is not an rl-circuits score file (format {SCORES_FORMAT})")
    try:
        ids = json.loads(meta["ids"])
        stored = json.loads(meta["meta"])
        if not isinstance(ids, list) or not isinstance(stored, dict):
            raise TypeError("ids must be a JSON list and meta a JSON object")
        scores = EdgeScores(
            values=tensors["values"],
            upstream=tuple(json.loads(meta["upstream"])),
            downstream=tuple(json.loads(meta["downstream"])),
            edge_mask=tensors["edge_mask"],
            ids=ids,
            **_fields_from_meta(stored, ids),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{label} has malformed metadata: {exc}") from exc
    except DataError as exc:
        raise DataError(f"{label}: {exc}") from exc
    _check_storable(scores, label)
    return scores


def merge_scores(
    sources: Sequence[EdgeScores],
    names: Sequence[str],
    target: Path,
    order: Sequence[str],
    *,
    meta: dict[str, Any] | None,
    label: str,
) -> None:
    """Stack the questions of the score files `sources` (read from the files `names`) into
    `target` in `order`, streaming the rows; the bytes equal writing the stacked scores
    directly."""
    if not sources:
        raise DataError(f"{label}: no score files to merge")
    _check_compatible(sources, names, check_meta=meta is None)
    where = _locate_ids(sources, names)
    order = check_order(order, where, label, what="scores")
    first = sources[0]
    out_meta = first.meta if meta is None else meta
    if not isinstance(out_meta, dict):
        raise DataError(f"{label}: meta must be a dict")
    loss = None
    if all(source.loss is not None for source in sources):
        by_id = {
            q: x
            for source in sources
            for q, x in zip(source.ids, source.loss.tolist(), strict=True)
        }
        loss = {qid: by_id[qid] for qid in order}
    disk_meta = _disk_meta(out_meta, first.graph, first.method, loss, label)
    header = _header(order, first.upstream, first.downstream, disk_meta, label)
    rows = (sources[where[i][0]].values[where[i][1]] for i in order)
    write_atomic(target, _pieces(header, rows, first.edge_mask), label=label)


def _check_storable(scores: EdgeScores, label: str) -> None:
    """What the file format adds to `EdgeScores`' own checks: float32 values."""
    import torch

    if scores.values.dtype != torch.float32:
        raise DataError(f"{label}: values must be a float32 tensor, got {scores.values.dtype}")


def _disk_meta(
    meta: dict[str, Any],
    graph: str | None,
    method: str | None,
    loss: dict[str, float] | None,
    label: str,
) -> dict[str, Any]:
    """The `meta` JSON object of a file: the scores' meta with their graph, method and loss."""
    clash = [key for key in FIELDS_IN_META if key in meta]
    if clash:
        raise DataError(
            f"{label}: meta keys {clash} are fields of EdgeScores (graph, method, loss): set "
            "the fields instead"
        )
    fields = {"graph": graph, "method": method, "loss": loss}
    return {**meta, **{key: value for key, value in fields.items() if value is not None}}


def _fields_from_meta(stored: dict[str, Any], ids: list[str]) -> dict[str, Any]:
    """EdgeScores keyword arguments (graph, method, loss, meta) from a file's meta object."""
    import torch

    meta = dict(stored)
    graph, method, loss = (meta.pop(key, None) for key in FIELDS_IN_META)
    if not all(v is None or isinstance(v, str) for v in (graph, method)):
        raise TypeError(f"meta graph and method must be strings, got {graph!r}, {method!r}")
    if isinstance(loss, dict):
        if set(loss) != set(ids):
            raise ValueError("meta loss must name each id once")
        loss = [loss[i] for i in ids]
    elif isinstance(loss, int | float) and not isinstance(loss, bool) and len(ids) == 1:
        loss = [loss]  # a single question's file written before loss was a field
    elif loss is not None:
        raise TypeError(f"meta loss must map each id to its loss, got {type(loss).__name__}")
    if loss is not None:
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in loss):
            raise TypeError("meta loss values must be numbers")
        loss = torch.tensor(loss, dtype=torch.float32)
    return {"graph": graph, "method": method, "loss": loss, "meta": meta}


def _header(
    ids: Sequence[str],
    upstream: Sequence[str],
    downstream: Sequence[str],
    meta: dict[str, Any],
    label: str,
) -> bytes:
    """safetensors header (8-byte length + JSON padded to 8 bytes) with sorted, fixed keys."""
    batch, n_up, n_down = (len(ids), len(upstream), len(downstream))
    values_size = 4 * batch * n_up * n_down
    try:
        info = {
            "__metadata__": {
                "format": SCORES_FORMAT,
                "ids": compact_json(list(ids)),
                "upstream": compact_json(list(upstream)),
                "downstream": compact_json(list(downstream)),
                "meta": compact_json(meta),
            },
            "values": {
                "dtype": "F32",
                "shape": [batch, n_up, n_down],
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
    body += b" " * (-len(body) % _ALIGN)
    return len(body).to_bytes(8, "little") + body


def _pieces(
    header: bytes, rows: Iterable[torch.Tensor], edge_mask: torch.Tensor
) -> Iterator[bytes | memoryview]:
    """The file's bytes in order: header, value rows, mask."""
    yield header
    for row in rows:
        yield _tensor_bytes(row)
    yield _tensor_bytes(edge_mask)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Little-endian raw bytes of a CPU copy of `tensor` (no copy if already contiguous CPU)."""
    import numpy as np

    array = tensor.detach().cpu().contiguous().numpy()
    little = sys.byteorder == "little"
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not little):
        array = array.astype(array.dtype.newbyteorder("<"))
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _check_compatible(sources: Sequence[EdgeScores], names: Sequence[str], *, check_meta: bool):
    """Files merge only if they share node names, edge mask, graph and method (and meta)."""
    import torch

    first = sources[0]
    for source, name in zip(sources[1:], names[1:], strict=True):
        if source.upstream != first.upstream or source.downstream != first.downstream:
            raise DataError(f"cannot merge {name}: its node names differ from {names[0]}'s")
        if not torch.equal(source.edge_mask, first.edge_mask):
            raise DataError(f"cannot merge {name}: its edge mask differs from {names[0]}'s")
        if (source.graph, source.method) != (first.graph, first.method):
            raise DataError(
                f"cannot merge {name}: its graph/method {source.graph}/{source.method} differ from "
                f"{names[0]}'s {first.graph}/{first.method}"
            )
        if check_meta and compact_json(source.meta) != compact_json(first.meta):
            diff = "; ".join(config_diff(first.meta, source.meta)[:5])
            raise DataError(
                f"cannot merge {name}: its meta differs from {names[0]}'s ({diff}); "
                "pass meta= to set the merged file's meta"
            )


def _locate_ids(sources: Sequence[EdgeScores], names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """id -> (file index, row); an id in two files is an error."""
    where: dict[str, tuple[int, int]] = {}
    for index, source in enumerate(sources):
        for row, qid in enumerate(source.ids):
            if qid in where:
                raise DataError(f"id {qid!r} is in both {names[where[qid][0]]} and {names[index]}")
            where[qid] = (index, row)
    return where
