"""Which config keys each stage's outputs depend on, and keeping a run's results true to its config.

Why: a run directory is resumed and re-run under edited configs. Each stage declares (in
`rl_circuits.pipeline.registry.STAGES`) the config keys its outputs depend on, the stages it
reads, and the key that enumerates its cells (one dataset, one model x dataset, one alpha, ...);
here the cells' outputs are named by `RunLayout`. From these, every
cell of every stage gets a fingerprint: a hash of its config values (keys at their default
value left out, so a key that a newer version adds with its default changes nothing), of the
source data file it reads, and of the fingerprints of the cells it reads.

`open_run` compares the fingerprints under the stored config with those under the new one:
without `force` a change is refused with the affected stages and cells named; with `force`
the outputs of changed cells are deleted and the markers of affected stages cleared, so the
next `run` recomputes exactly those, and every stage marker records the fingerprint it was
made under.
"""

from __future__ import annotations

import hashlib
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
from rl_circuits.models.pairs import ROLES, PairModel, direction_roles, pair_models
from rl_circuits.pipeline.registry import STAGE_NAMES, STAGES
from rl_circuits.store.canonical import config_diff
from rl_circuits.store.layout import RunLayout
from rl_circuits.store.paths import check_run_root
from rl_circuits.store.run import RunStore

# Keys that say where a run, its data and its models are, not what they hold: moving a run or
# its data (same bytes: `data_hashes`) changes no result, so no fingerprint includes them.
LOCATION_KEYS = ("run.run_dir", "run.data_dir", "run.tiny_models")


def _hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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


@dataclass
class Cell:
    """One unit of a stage's outputs: its fingerprint and the run-relative paths it wrote."""

    fingerprint: str
    outputs: tuple[str, ...]
    records: tuple[str, ...] = ()  # record stages (RecordStage names) among the outputs


@dataclass
class StagePlan:
    """Every cell of one stage under one config, and the stage's own fingerprint."""

    cells: dict[str, Cell] = field(default_factory=dict)
    fingerprint: str = ""


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
    """The cells and fingerprints of every stage under `cfg` (`hashes`: dataset file hashes)."""
    from rl_circuits.pipeline.common import circuit_alphas, diff_alphas

    plans = {name: StagePlan() for name in STAGE_NAMES}

    def values(stage: str) -> dict:
        spec = STAGES[stage]
        return key_values(cfg, spec.keys, spec.per_cell + LOCATION_KEYS)

    datasets = cfg.run.datasets
    for name in datasets:
        source = hashes.get(name) or cfg.run.data_dir or "hub"
        ids = [i for i in cfg.run.ids if i.startswith(f"{name}-")]
        fp = _hash(["datasets", name, source, {**values("datasets"), "run.ids": ids}])
        plans["datasets"].cells[name] = Cell(fp, (RunLayout.dataset(name),))
    for model in pair_models(cfg.pairs.values()):
        for name in datasets:
            cell = f"{model.key}/{name}"
            up = plans["datasets"].cells[name].fingerprint
            fp = _hash(["generate", model.key, values("generate"), up])
            plans["generate"].cells[cell] = Cell(fp, (), (RunLayout.generations(model.key, name),))
            fp = _hash(["grade", values("grade"), fp])
            plans["grade"].cells[cell] = Cell(fp, (), (RunLayout.grades(model.key, name),))
    attribute_cells = []
    for pair in cfg.pairs.values():
        keys = [PairModel(pair, role).key for role in ROLES]
        for name in datasets:
            up = [plans["grade"].cells[f"{k}/{name}"].fingerprint for k in keys]
            fp = _hash(["select", pair.name, values("select"), up])
            plans["select"].cells[f"{pair.name}/{name}"] = Cell(
                fp, (RunLayout.selection(pair.name, name),)
            )
            for role in ROLES:
                for alpha in cfg.alphas:
                    rel = RunLayout.attribution(pair.name, role, name, alpha)
                    fp = _hash(["attribute", pair.name, role, alpha, values("attribute"), up])
                    plans["attribute"].cells[rel] = Cell(fp, (rel,))
                    attribute_cells.append((pair.name, role, name, alpha, fp))
    enabled = cfg.circuits.enabled
    alphas = set(circuit_alphas(cfg))
    for pair, role, name, alpha, up in attribute_cells:
        if enabled and alpha in alphas:
            rel = RunLayout.circuit(pair, role, name, alpha)
            ranked = RunLayout.method_ranking(pair, role, name, alpha)
            plans["circuits"].cells[rel] = Cell(
                _hash(["circuits", values("circuits"), up]), (rel, ranked)
            )
    if cfg.diff.enabled:
        attributed = plans["attribute"].cells
        for pair in cfg.pairs.values():
            for direction in cfg.diff.directions:
                reads = direction_roles(direction)[1]
                for name in datasets:
                    for alpha in diff_alphas(cfg):
                        up = attributed[RunLayout.attribution(pair.name, reads, name, alpha)]
                        rel = RunLayout.diff(pair.name, direction, name, alpha)
                        fp = _hash(["diff", values("diff"), up.fingerprint])
                        plans["diff"].cells[rel] = Cell(fp, (rel,))
    for stage in ("datasets", "generate", "grade", "select", "attribute", "circuits", "diff"):
        cells = {k: c.fingerprint for k, c in plans[stage].cells.items()}
        own = {"circuits": enabled, "diff": cfg.diff.enabled}.get(stage)
        plans[stage].fingerprint = _hash([stage, values(stage), own, cells])
    if cfg.weights.enabled:
        for pair in cfg.pairs.values():
            models = [[m.path, m.revision] for m in (PairModel(pair, r) for r in ROLES)]
            fp = _hash(["weights", models, values("weights")])
            plans["weights"].cells[pair.name] = Cell(fp, (RunLayout.weights(pair.name),))
    cells = {k: c.fingerprint for k, c in plans["weights"].cells.items()}
    plans["weights"].fingerprint = _hash(["weights", values("weights"), cells])
    # a run without the diff stage keeps the analyze fingerprint it had before the stage existed
    upstream = [plans[s].fingerprint for s in ("attribute", "circuits")]
    upstream += [plans["diff"].fingerprint] if cfg.diff.enabled else []
    algorithms = {p.name: p.algorithm for p in cfg.pairs.values()}
    plans["analyze"].fingerprint = _hash(["analyze", values("analyze"), algorithms, upstream])
    plans["analyze"].cells["analysis"] = Cell(plans["analyze"].fingerprint, (RunLayout.ANALYSIS,))
    whole = [values("report"), _hash(cfg.resolved()["pairs"]), plans["analyze"].fingerprint]
    whole.append(plans["weights"].fingerprint)
    plans["report"].fingerprint = _hash(["report", whole])
    plans["report"].cells["report"] = Cell(plans["report"].fingerprint, (RunLayout.REPORT,))
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
            parts = []
            if self.stale.get(stage):
                parts.append(f"recompute {_cells(self.stale[stage])}")
            if self.new.get(stage):
                parts.append(f"compute new {_cells(self.new[stage])}")
            lines.append(f"  {stage}: {'; '.join(parts) or 'rerun'}")
        return "\n".join(lines)


def _cells(names: list[str]) -> str:
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"{len(names)} cell{'s' if len(names) != 1 else ''} ({shown})"


def compare_plans(old: dict[str, StagePlan], new: dict[str, StagePlan], store) -> Changes:
    """Stale and new cells of each stage, and the stages whose markers no longer hold."""
    changes = Changes()
    for stage in STAGE_NAMES:
        o, n = old[stage], new[stage]
        stale = [
            k
            for k, c in n.cells.items()
            if k in o.cells and o.cells[k].fingerprint != c.fingerprint
        ]
        stale = [k for k in stale if _present(store, o.cells[k])]
        fresh = [k for k in n.cells if k not in o.cells and not _present(store, n.cells[k])]
        if stage in ("analyze", "report"):
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
        old_plan = {name: StagePlan(fingerprint="?") for name in STAGE_NAMES}
        for name, p in new_plan.items():
            for key, cell in p.cells.items():
                old_plan[name].cells[key] = Cell("?", cell.outputs, cell.records)
    changes = compare_plans(old_plan, new_plan, store)
    for stage in STAGE_NAMES:
        for key in changes.stale.get(stage, []):
            cell = old_plan[stage].cells[key]
            for record in cell.records:
                store.records(record).reset()
            for rel in cell.outputs:
                store.remove(rel)
        if stage in changes.stages:
            store.clear_done(stage)
            if stage in ("analyze", "report"):
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
