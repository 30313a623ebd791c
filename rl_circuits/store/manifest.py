"""A run's config and manifest: one resolved ``config.json`` per run, and ``manifest.json``.

Why: results are only comparable under the config they were made with. ``config.json`` holds
the resolved config (sorted keys); ``manifest.json`` its sha256 (``config_hash``), the package
and Python versions, the platform, caller extras (model revisions, dataset hashes) and a
history of creations, forced config changes and environment changes.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from rl_circuits.errors import ConfigError, DataError, StoreError
from rl_circuits.store.atomic import write_atomic
from rl_circuits.store.canonical import config_diff, pretty_json, sha256
from rl_circuits.store.layout import RunLayout

CONFIG_NAME = RunLayout.CONFIG
MANIFEST_NAME = RunLayout.MANIFEST
MANIFEST_FORMAT = "rl-circuits-run/1"
MANIFEST_RESERVED_KEYS = frozenset(
    {"format", "created_at", "updated_at", "config_hash", "package_version", "environment"}
    | {"history"}
)
PACKAGES = ("rl-circuits", "torch", "transformers", "transformer-lens", "numpy", "safetensors")

Upgrade = Callable[[dict[str, Any]], dict[str, Any]]


def is_run_manifest(manifest: Any) -> bool:
    """Whether `manifest` (a parsed manifest.json) is a run's: its format tag is ours."""
    tag = manifest.get("format") if isinstance(manifest, dict) else None
    return isinstance(tag, str) and tag.startswith(MANIFEST_FORMAT.split("/")[0] + "/")


def now() -> str:
    """The current UTC time in ISO format, to the second (manifest and marker times)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


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


def config_bytes(config: dict[str, Any]) -> bytes:
    """The bytes of ``config.json`` for `config` (sorted, indented JSON)."""
    if not isinstance(config, dict):
        raise ConfigError(f"a run config must be a dict, got {type(config).__name__}")
    try:
        return pretty_json(config, what="the run config")
    except DataError as exc:
        raise ConfigError(str(exc)) from exc


def check_extra(extra: dict[str, Any] | None) -> dict[str, Any]:
    """Caller extras for the manifest: JSON-able, and never one of the store's own keys."""
    extra = dict(extra or {})
    clash = sorted(MANIFEST_RESERVED_KEYS & set(extra))
    if clash:
        raise StoreError(f"manifest_extra cannot set the store's own manifest keys {clash}")
    pretty_json(extra, what="manifest_extra")
    return extra


def config_changes(
    old_bytes: bytes, new_bytes: bytes, upgrade: Upgrade | None = None
) -> tuple[dict[str, Any] | None, list[str]]:
    """(the stored config or None if unreadable, its differing keys from the new one); the
    stored config is first mapped by `upgrade` (keys added since, at their defaults)."""
    try:
        old = json.loads(old_bytes)
        return old, config_diff(old if upgrade is None else upgrade(old), json.loads(new_bytes))
    except ValueError as exc:
        return None, [f"(the stored {CONFIG_NAME} is unreadable: {exc})"]


def change_listing(changes: list[str]) -> str:
    """The differing keys as indented lines, for error messages."""
    return "\n".join(f"  {line}" for line in changes or ["(formatting only)"])


def install_config(
    root: Path, new_bytes: bytes, *, force: bool, upgrade: Upgrade | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Write root/config.json unless it holds `new_bytes`; a changed config raises ConfigError
    naming the differing keys unless `force`. Returns (manifest history events, the stored
    config it replaced or None)."""
    path = root / CONFIG_NAME
    label = f"{CONFIG_NAME} in run directory {root}"
    old_bytes = path.read_bytes() if path.is_file() else None
    if old_bytes == new_bytes:
        return [], None
    if old_bytes is None:
        write_atomic(path, new_bytes, label=label)
        return [], None
    old, changes = config_changes(old_bytes, new_bytes, upgrade)
    if changes and not force:
        raise ConfigError(
            f"run directory {root} already holds a run with a different config "
            f"({CONFIG_NAME}); differing keys:\n{change_listing(changes)}\nUse a new run "
            "directory for the new config, or pass --force (force=True) to overwrite the stored "
            "config: the results already there are kept and the change is recorded in "
            "manifest.json."
        )
    write_atomic(path, new_bytes, label=label)
    if not changes:  # same content, different formatting (hand-edited): normalised
        return [], None
    return [config_event(old_bytes, new_bytes, changes)], old


def config_event(old_bytes: bytes, new_bytes: bytes, changes: list[str]) -> dict[str, Any]:
    """The manifest history entry of a forced config change."""
    return {
        "event": "config_changed",
        "at": now(),
        "from_hash": sha256(old_bytes),
        "to_hash": sha256(new_bytes),
        "changes": changes,
    }


def updated_manifest(
    old: dict[str, Any],
    extra: dict[str, Any],
    events: list[dict[str, Any]],
    config_hash: str | None,
) -> dict[str, Any] | None:
    """The manifest after this open: `extra` deep-merged, the environment and `events`
    recorded; None if nothing but the time would change (a re-run leaves the file alone)."""
    env = environment()
    stamp = now()
    history = list(old.get("history", []))
    if not old:
        history.append({"event": "created", "at": stamp, "config_hash": config_hash})
    else:
        env_changes = config_diff(old.get("environment", {}), env)
        if env_changes:
            history.append({"event": "environment_changed", "at": stamp, "changes": env_changes})
    history.extend(events)
    manifest = _deep_merge(old, extra)
    manifest.update(
        format=MANIFEST_FORMAT,
        created_at=old.get("created_at", stamp),
        updated_at=stamp,
        config_hash=config_hash,
        package_version=env["packages"]["rl-circuits"],
        environment=env,
        history=history,
    )
    if {**manifest, "updated_at": None} == {**old, "updated_at": None}:
        return None
    return manifest


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
