"""Configs for tests, built from the repository's configs with `load_config` overrides.

A test that needs a changed config writes one with `write_config` (valid, checked on writing);
a test of a config's error messages writes the bad values with `write_unchecked_config`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from rl_circuits.config import dump_config, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"


def tiny_models_overrides(models: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The overrides and pairs that point configs/tiny.toml at the tiny models (and their
    data) that `rl-circuits tiny-models MODELS` wrote to `models`."""
    overrides = {"run": {"tiny_models": str(models), "data_dir": str(models / "data")}}
    pairs = {"tiny": {"before": str(models / "before"), "after": str(models / "after")}}
    return overrides, pairs


def merge(*tables: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Overrides {section: {key: value}} merged key by key, later ones winning."""
    out: dict[str, dict[str, Any]] = {}
    for table in tables:
        for section, values in (table or {}).items():
            out.setdefault(section, {}).update(values)
    return out


def write_config(
    path: Path,
    overrides: dict[str, dict[str, Any]] | None = None,
    base: Path = TINY,
    pairs: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write to `path` the config `base` with `overrides` ({section: {key: value}}, as
    `load_config` takes them) as TOML; `pairs` ({name: {field: value}}) changes fields of
    `base`'s inline pairs or defines new ones (usable by name in `overrides`)."""
    if pairs:
        doc = tomllib.loads(dump_config(load_config(base)))
        for name, values in pairs.items():
            doc["pairs_inline"].setdefault(name, {}).update(values)
        path.write_text(tomli_w.dumps(doc))
        base = path
    path.write_text(dump_config(load_config(base, overrides)))
    return path


def write_unchecked_config(path: Path, edits: dict[str, Any], base: Path = TINY) -> Path:
    """Write to `path` the config `base` with `edits` set without validation, for tests of the
    messages a bad config gets: {section: {key: value}} (`pairs_inline` included) changes keys
    of a section, {key: value} with a value that is not a table sets a top-level key."""
    doc = tomllib.loads(dump_config(load_config(base)))
    for key, value in edits.items():
        if isinstance(value, dict):
            doc.setdefault(key, {}).update(value)
        else:
            doc[key] = value
    path.write_text(tomli_w.dumps(doc))
    return path
