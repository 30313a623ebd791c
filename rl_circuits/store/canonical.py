"""Canonical JSON: the one serialisation of configs, manifests, records and score metadata.

Why: a run's files must have the same bytes for the same content (resumed, sharded or not), so
every JSON document is written with sorted keys, no NaN/Infinity (not JSON), raw UTF-8.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from rl_circuits.errors import DataError


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pretty_json(obj: Any, *, what: str) -> bytes:
    """Indented, sorted, strict JSON with a trailing newline (configs, manifests, markers)."""
    try:
        text = json.dumps(obj, sort_keys=True, ensure_ascii=False, allow_nan=False, indent=2)
    except (TypeError, ValueError) as exc:
        raise DataError(f"cannot store {what} as JSON: {exc}") from exc
    return (text + "\n").encode()


def compact_json(obj: Any) -> str:
    """Compact sorted JSON; NaN/Infinity raise ValueError (they are not JSON)."""
    return json.dumps(
        obj, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":")
    )


def jsonl_line(record: Any, where: str) -> bytes:
    """One JSON-lines line: sorted keys, a trailing newline. It fixes a record file's bytes."""
    try:
        line = json.dumps(record, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        rid = record.get("id") if isinstance(record, dict) else None
        name = f"record {rid!r}" if isinstance(rid, str) else "a record"
        raise DataError(f"{where}: {name} cannot be stored as JSON: {exc}") from exc
    return (line + "\n").encode()


def parse_jsonl(data: bytes, label: str) -> list[Any]:
    """The documents of a JSON-lines file; blank lines are skipped."""
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


def _short(value: Any) -> str:
    text = compact_json(value)
    return text if len(text) <= 80 else text[:77] + "..."


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Each differing leaf as ``key.path: old -> new`` (JSON-rendered, so 3 and 3.0 differ)."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                lines.append(f"{path}: (absent) -> {_short(new[key])}")
            elif key not in new:
                lines.append(f"{path}: {_short(old[key])} -> (absent)")
            else:
                lines.extend(config_diff(old[key], new[key], path))
        return lines
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        lines = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            lines.extend(config_diff(a, b, f"{prefix}[{i}]"))
        return lines
    if compact_json(old) != compact_json(new):
        return [f"{prefix or '(whole config)'}: {_short(old)} -> {_short(new)}"]
    return []
