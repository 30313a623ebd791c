"""A stage's cells and their fingerprints: what every stage's `plan` returns.

Why: each stage declares its own cells (`rl_circuits.pipeline.registry`) and
`rl_circuits.pipeline.integrity` compares them across configs; both need the same types and
the same hash, which live here (no torch, no stage code).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


def digest(obj: Any) -> str:
    """The fingerprint of a JSON value: 16 hex digits of the sha256 of its canonical text."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Cell:
    """One unit of a stage's outputs: its fingerprint and the run-relative paths it wrote."""

    fingerprint: str
    outputs: tuple[str, ...]
    records: tuple[str, ...] = ()  # record tables (`RecordTable` names) among the outputs


@dataclass
class StagePlan:
    """Every cell of one stage under one config, and the stage's own fingerprint."""

    cells: dict[str, Cell] = field(default_factory=dict)
    fingerprint: str = ""

    @classmethod
    def of(cls, stage: str, values: dict, cells: dict[str, Cell], *extra: Any) -> StagePlan:
        """A stage's plan, fingerprinted by its config values and its cells' fingerprints;
        `extra`: whether an optional stage is enabled (None for the others, as ever)."""
        return cls(
            cells, digest([stage, values, *extra, {k: c.fingerprint for k, c in cells.items()}])
        )


@dataclass(frozen=True)
class PlanInputs:
    """What a stage's plan reads besides the config: its own config values that differ from
    their defaults, the plans of the stages it requires (directly or through another), and
    the sha256 of each local dataset file."""

    values: dict[str, Any]
    upstream: dict[str, StagePlan]
    data_hashes: dict[str, str]

    def fingerprints(self, required: tuple[str, ...]) -> list[str]:
        """The fingerprints of the stages `required`, in that order: the stage's links."""
        return [self.upstream[name].fingerprint for name in required]
