"""Which config keys each stage's outputs depend on, and keeping a run's results true to its config.

Why: a run directory is resumed and re-run under edited configs. Each stage declares (in
`rl_circuits.pipeline.registry.STAGES`) the config keys its outputs depend on, the stages it
reads, and its cells (one dataset, one model x dataset, one alpha, ...; its `plan`, with the
outputs named by `RunLayout`). Every cell of every stage gets a fingerprint: a hash of its
config values (keys at their default value left out, so a key that a newer version adds with
its default changes nothing), of the source data file it reads, and of the fingerprints of
the cells it reads.

`open_run` compares the fingerprints under the stored config with those under the new one:
without `force` a change is refused with the affected stages and cells named; with `force`
the outputs of changed cells are deleted and the markers of affected stages cleared, so the
next `run` recomputes exactly those, and every stage marker records the fingerprint it was
made under.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rl_circuits.config import (
    RunConfig,
    config_from_resolved,
    defaults,
    upgrade_resolved,
)
from rl_circuits.errors import ConfigError, RLCircuitsError
from rl_circuits.pipeline.cells import Cell, PlanInputs, StagePlan
from rl_circuits.pipeline.registry import STAGES, upstream_of
from rl_circuits.store.canonical import config_diff
from rl_circuits.store.layout import RunLayout
from rl_circuits.store.paths import check_run_root
from rl_circuits.store.run import RunStore

# Keys that say where a run, its data and its models are, not what they hold: moving a run or
# its data (same bytes: `data_hashes`) changes no result, so no fingerprint includes them.
LOCATION_KEYS = ("run.run_dir", "run.data_dir", "run.tiny_models")


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def key_values(cfg: RunConfig, keys: tuple[str, ...], drop: tuple[str, ...] = ()) -> dict:
    """The values of `keys` that differ from their defaults ({"section.key": value})."""
    out = {}
    tables, default = cfg.resolved(), defaults()
    for key in keys:
        section, _, name = key.partition(".")
        for k in [name] if name else list(default[section]):
            full = f"{section}.{k}"
            value = tables[section][k]
            if full not in drop and not _same(value, default[section][k]):
                out[full] = value
    return out


def data_hashes(cfg: RunConfig) -> dict[str, str]:
    """sha256 of each local dataset file the config reads (datasets from the hub: none)."""
    from rl_circuits.data.datasets import dataset_file, dataset_hash

    out = {}
    if cfg.run.data_dir:
        for name in cfg.run.datasets:
            path = dataset_file(name, cfg.run.data_dir, cfg.run.split)
            if path.is_file():
                out[name] = dataset_hash(path)
    return out


def plan(cfg: RunConfig, hashes: dict[str, str]) -> dict[str, StagePlan]:
    """The cells and fingerprints of every stage under `cfg` (`hashes`: dataset file hashes),
    each from its stage's own `plan` and the plans of the stages it reads."""
    plans: dict[str, StagePlan] = {}
    for name, stage in STAGES.items():
        values = key_values(cfg, stage.keys, stage.per_cell + LOCATION_KEYS)
        upstream = {required: plans[required] for required in upstream_of(name)}
        plans[name] = stage.plan(cfg, PlanInputs(values, upstream, hashes))
    return plans


@dataclass
class Changes:
    """What a config (or data) change does to a run: per stage, the cells whose outputs are
    stale (recomputed) and the cells that are new (computed for the first time)."""

    stale: dict[str, list[str]] = field(default_factory=dict)
    new: dict[str, list[str]] = field(default_factory=dict)
    stages: list[str] = field(default_factory=list)  # every stage whose marker is cleared

    def describe(self) -> str:
        lines = []
        for stage in self.stages:
            actions = []
            if self.stale.get(stage):
                actions.append(f"recompute {_cells(self.stale[stage])}")
            if self.new.get(stage):
                actions.append(f"compute new {_cells(self.new[stage])}")
            lines.append(f"  {stage}: {'; '.join(actions) or 'rerun'}")
        return "\n".join(lines)


def _cells(names: list[str]) -> str:
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"{len(names)} cell{'s' if len(names) != 1 else ''} ({shown})"


def compare_plans(old: dict[str, StagePlan], new: dict[str, StagePlan], store: RunStore) -> Changes:
    """Stale and new cells of each stage, and the stages whose markers no longer hold."""
    changes = Changes()
    for stage in STAGES:
        o, n = old[stage], new[stage]
        stale = [
            k
            for k, c in n.cells.items()
            if k in o.cells and o.cells[k].fingerprint != c.fingerprint
        ]
        stale = [k for k in stale if _present(store, o.cells[k])]
        fresh = [k for k in n.cells if k not in o.cells and not _present(store, n.cells[k])]
        if STAGES[stage].whole_run:
            stale, fresh = [], []
        if stale:
            changes.stale[stage] = stale
        if fresh:
            changes.new[stage] = fresh
        if o.fingerprint != n.fingerprint and (store.stage_done(stage) or stale or fresh):
            changes.stages.append(stage)
    return changes


def _present(store: RunStore, cell: Cell) -> bool:
    return any(store.exists(p) for p in cell.outputs) or any(
        store.exists(r) or store.stage_done(r) for r in cell.records
    )


def previous_plan(store_root: Path, stored: dict, manifest: dict) -> dict[str, StagePlan] | None:
    """The plan under the stored config (None if that config no longer parses)."""
    try:
        cfg = config_from_resolved(upgrade_resolved(stored), str(store_root / RunLayout.CONFIG))
    except RLCircuitsError:
        return None
    return plan(cfg, dict(manifest.get("dataset_hashes") or {}))


def _read_stored(root: Path) -> tuple[dict | None, dict]:
    """The stored config and manifest of a run directory, read without its lock."""
    stored = manifest = None
    if (root / RunLayout.CONFIG).is_file():
        try:
            stored = json.loads((root / RunLayout.CONFIG).read_bytes())
        except ValueError:
            stored = None
    with_manifest = root / RunLayout.MANIFEST
    if with_manifest.is_file():
        try:
            manifest = json.loads(with_manifest.read_bytes())
        except ValueError:
            manifest = None
    return stored, manifest if isinstance(manifest, dict) else {}


def _data_changes(old_hashes: dict, new_hashes: dict) -> list[str]:
    return [
        f"data file of dataset {name!r}: sha256 {old_hashes[name][:12]}... -> {h[:12]}..."
        for name, h in sorted(new_hashes.items())
        if name in old_hashes and old_hashes[name] != h
    ]


def open_run(
    run_dir: str | os.PathLike[str], cfg: RunConfig, *, force: bool = False, **kwargs
) -> tuple[RunStore, Changes]:
    """Open a run for writing under `cfg`, keeping its results true to the config.

    `run_dir` must be absent, empty or a run (`check_run_root`). A change of config or of a
    dataset file that makes stored results stale is refused unless `force`, naming the
    differing keys and the stages and cells that would be recomputed; with `force` those cells'
    outputs are deleted and the stages' markers cleared (returned as `Changes`). A change of
    LOCATION_KEYS alone (a moved run, or data moved with the same bytes) is accepted without
    `force`. Other keyword arguments go to `RunStore.open` (`shard=` opens a shard worker,
    which never changes a run).
    """
    root = Path(run_dir).expanduser()
    check_run_root(root)  # before its files are read as a run's: a checkpoint is not a run
    resolved = cfg.resolved()
    if kwargs.get("shard") is not None:
        store = RunStore.open(root, resolved, **kwargs)
        return store, Changes()
    hashes = data_hashes(cfg)
    new_plan = plan(cfg, hashes)
    stored, manifest = _read_stored(root) if root.is_dir() else (None, {})
    moved = False  # only LOCATION_KEYS differ: accepted without force, recorded in the manifest
    if stored is not None and not force:
        upgraded = upgrade_resolved(stored)
        diff = config_diff(upgraded, resolved)
        data = _data_changes(manifest.get("dataset_hashes") or {}, hashes)
        if diff or data:
            old_plan = previous_plan(root, stored, manifest)
            with RunStore.read_only(root) as reader:
                changes = (
                    compare_plans(old_plan, new_plan, reader) if old_plan is not None else None
                )
            content = [line for line in diff if line.split(":", 1)[0] not in LOCATION_KEYS]
            if changes is None or changes.stages or content:
                listing = "\n".join(f"  {line}" for line in [*diff, *data])
                affected = (
                    changes.describe()
                    if changes is not None
                    else "  every stage (the stored config no longer validates)"
                )
                raise ConfigError(
                    f"run directory {root.resolve()} was made under a different config or data"
                    f":\n{listing}\nWith --force (force=True) the run keeps what still matches "
                    f"and these stages recompute:\n{affected or '  none'}\nOr use a new run "
                    "directory."
                )
            moved = bool(diff)
    store = RunStore.open(root, resolved, force=force or moved, upgrade=upgrade_resolved, **kwargs)
    changes = Changes()
    try:
        previous = store.previous_config
        if previous is not None or _data_changes(manifest.get("dataset_hashes") or {}, hashes):
            old = previous if previous is not None else stored
            old_plan = previous_plan(store.root, old, manifest)
            changes = _reconcile(store, old_plan, new_plan)
        store.fingerprints = {name: p.fingerprint for name, p in new_plan.items()}
        store.update_manifest({"workdir": os.getcwd()})
    except BaseException:
        store.close()
        raise
    return store, changes


def stage_current(store: RunStore, stage: str) -> bool:
    """Whether `stage` is done under the store's config (its marker's fingerprint matches)."""
    info = store.stage_info(stage)
    if info is None:
        return False
    recorded, expected = info.get("fingerprint"), store.fingerprints.get(stage)
    return recorded is None or expected is None or recorded == expected


def _reconcile(store: RunStore, old_plan: dict[str, StagePlan] | None, new_plan) -> Changes:
    """Delete the outputs of stale cells and clear the markers of affected stages."""
    if old_plan is None:  # the old config no longer validates: nothing can be trusted
        old_plan = {name: StagePlan(fingerprint="?") for name in STAGES}
        for name, p in new_plan.items():
            for key, cell in p.cells.items():
                old_plan[name].cells[key] = Cell("?", cell.outputs, cell.records)
    changes = compare_plans(old_plan, new_plan, store)
    for stage in STAGES:
        for key in changes.stale.get(stage, []):
            cell = old_plan[stage].cells[key]
            for record in cell.records:
                store.records(record).reset()
            for rel in cell.outputs:
                store.remove(rel)
        if stage in changes.stages:
            store.clear_done(stage)
            if STAGES[stage].whole_run:
                for cell in new_plan[stage].cells.values():
                    for rel in cell.outputs:
                        store.remove(rel)
    return changes


def iter_missing(store: RunStore, stage: str) -> Iterator[str]:
    """Prerequisite stages of `stage` (transitively) that are not done, upstream first."""
    seen: list[str] = []

    def visit(name: str) -> None:
        for req in STAGES[name].requires:
            visit(req)
            if req not in seen and not stage_current(store, req):
                seen.append(req)

    visit(stage)
    yield from seen
