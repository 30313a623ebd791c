"""The stages of a run, each declared once: what it runs, reads and depends on, its cells, and
how it shards.

Why: the CLI, `run_pipeline`, the demo, the shard workers (local and Ray) and the integrity
checks (`rl_circuits.pipeline.integrity`) all need to know the stages; they all read `STAGES`.
A stage's code is named as a `"module:function"` string and imported when it first runs, so
the CLI starts (and fails on bad input, or finds nothing to do) without loading torch. Every
stage function takes `(cfg, store, progress=True)`; a sharded stage also takes `shard=(i, n)`
and has a merge `(cfg, store) -> bool`. Each stage's `plan` (below, next to its declaration)
names its cells and their fingerprints from the config and the plans of the stages it reads.
Adding a stage: its module, its `Stage` and plan here, and its config section.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rl_circuits.config import SECTIONS
from rl_circuits.errors import ConfigError
from rl_circuits.models.pairs import ROLES, PairModel, direction_roles, pair_models
from rl_circuits.pipeline.cells import Cell, PlanInputs, StagePlan, digest
from rl_circuits.store.layout import RunLayout

if TYPE_CHECKING:
    from rl_circuits.config import RunConfig
    from rl_circuits.store.run import RunStore

StageFn = Callable[..., Any]  # (cfg, store, progress=True[, shard=None])
MergeFn = Callable[["RunConfig", "RunStore"], bool]
PlanFn = Callable[["RunConfig", PlanInputs], StagePlan]
WHOLE_RUN = "run"  # the cells of a stage with one output for the whole run (analyze, report)


@dataclass(frozen=True)
class Implementation:
    """A stage's code: the function that runs it and, for a sharded stage, the merge."""

    run: StageFn
    merge: MergeFn | None = None


def _resolve(target: str) -> Callable[..., Any]:
    """The function a `"module:function"` string names, its module imported now."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Stage:
    """One stage of a run.

    `summary`: what it does, in one line (its command's help); `keys`: the config keys its
    outputs depend on ("section" for all of a section's keys, "section.key" for one);
    `requires`: the stages whose outputs it reads; `cells`: what one cell of its outputs is,
    for messages (`WHOLE_RUN`: one output for the whole run); `plan`: its cells and
    fingerprints under a config; `function`: the `"module:function"` that runs it;
    `merge_function`: for a stage that runs data-parallel in shard workers, the one that
    merges them; `per_cell`: config keys whose entries are its cells rather than part of
    every cell's fingerprint; `devices_key`: the config key saying how many GPUs one shard
    worker needs (None: one).
    """

    name: str
    keys: tuple[str, ...]
    requires: tuple[str, ...]
    cells: str
    plan: PlanFn
    function: str
    summary: str
    merge_function: str | None = None
    per_cell: tuple[str, ...] = ()
    devices_key: str | None = None

    @property
    def sharded(self) -> bool:
        """Whether it runs in shard workers and then merges."""
        return self.merge_function is not None

    @property
    def whole_run(self) -> bool:
        """Whether its one output covers the whole run (no per-cell recomputation)."""
        return self.cells == WHOLE_RUN

    def load(self) -> Implementation:
        """Import the stage's code (its module pulls in torch, pandas or plots)."""
        merge = _resolve(self.merge_function) if self.merge_function else None
        return Implementation(_resolve(self.function), merge)

    def devices_per_shard(self, cfg: RunConfig) -> int:
        """The GPUs one shard worker of this stage needs under `cfg`."""
        if self.devices_key is None:
            return 1
        section, _, key = self.devices_key.partition(".")
        return int(getattr(getattr(cfg, section), key))

    def run(
        self,
        cfg: RunConfig,
        store: RunStore,
        *,
        progress: bool = True,
        shard: tuple[int, int] | None = None,
    ) -> None:
        """Run the stage (skipping finished work); `shard` only for a sharded stage."""
        if shard is not None and not self.sharded:
            raise ConfigError(f"stage {self.name!r} does not run in shards; {_sharded_note()}")
        code = self.load()
        if self.sharded:
            code.run(cfg, store, progress=progress, shard=shard)
        else:
            code.run(cfg, store, progress=progress)

    def merge(self, cfg: RunConfig, store: RunStore) -> bool:
        """Merge what the shard workers finished; True once the stage is done."""
        code = self.load()
        if code.merge is None:
            raise ConfigError(f"stage {self.name!r} does not run in shards; {_sharded_note()}")
        return code.merge(cfg, store)


# --------------------------------------------------------------------------- each stage's cells
# A cell's fingerprint hashes its config values and the fingerprints of the cells it reads; a
# stage's fingerprint hashes its values and its cells' fingerprints (the links: `requires`).


def _plan_datasets(cfg: RunConfig, given: PlanInputs) -> StagePlan:
    """One cell per dataset; a local data file enters as its sha256 (else where it is read)."""
    cells: dict[str, Cell] = {}
    for name in cfg.run.datasets:
        source = given.data_hashes.get(name) or cfg.run.data_dir or "hub"
        ids = [i for i in cfg.run.ids if i.startswith(f"{name}-")]
        fp = digest(["datasets", name, source, {**given.values, "run.ids": ids}])
        cells[name] = Cell(fp, (RunLayout.dataset(name),))
    return StagePlan.of("datasets", given.values, cells, None)


def _plan_generate(cfg: RunConfig, given: PlanInputs) -> StagePlan:
    """One record table per model x dataset."""
    cells: dict[str, Cell] = {}
    for model in pair_models(cfg.pairs.values()):
        for name in cfg.run.datasets:
            up = given.upstream["datasets"].cells[name].fingerprint
            fp = digest(["generate", model.key, given.values, up])
            records = (RunLayout.generations(model.key, name),)
            cells[f"{model.key}/{name}"] = Cell(fp, (), records)
    return StagePlan.of("generate", given.values, cells, None)


def _plan_grade(cfg: RunConfig, given: PlanInputs) -> StagePlan:
    """One record table per model x dataset, from that model's generations."""
    cells: dict[str, Cell] = {}
    for model in pair_models(cfg.pairs.values()):
        for name in cfg.run.datasets:
            cell = f"{model.key}/{name}"
            fp = digest(["grade", given.values, given.upstream["generate"].cells[cell].fingerprint])
            cells[cell] = Cell(fp, (), (RunLayout.grades(model.key, name),))
    return StagePlan.of("grade", given.values, cells, None)


def _graded(given: PlanInputs, pair, dataset: str) -> list[str]:
    """The fingerprints of the grades of a pair's two models on `dataset`."""
    grades = given.upstream["grade"].cells
    return [grades[f"{PairModel(pair, role).key}/{dataset}"].fingerprint for role in ROLES]


def _plan_select(cfg: RunConfig, given: PlanInputs) -> StagePlan:
    """One selection per pair x dataset, from both models' grades."""
    cells: dict[str, Cell] = {}
    for pair in cfg.pairs.values():
        for name in cfg.run.datasets:
            fp = digest(["select", pair.name, given.values, _graded(given, pair, name)])
            cells[f"{pair.name}/{name}"] = Cell(fp, (RunLayout.selection(pair.name, name),))
    return StagePlan.of("select", given.values, cells, None)


def _plan_attribute(cfg: RunConfig, given: PlanInputs) -> StagePlan:
    """One score directory per pair x model x dataset x alpha (the selection's keys are among
    its values, so it links to the grades the selection read)."""
    cells: dict[str, Cell] = {}
    for pair in cfg.pairs.values():
        for name in cfg.run.datasets:
            up = _graded(given, pair, name)
            for role in ROLES:
                for alpha in cfg.alphas:
                    rel = RunLayout.attribution(pair.name, role, name, alpha)
                    fp = digest(["attribute", pair.name, role, alpha, given.values, up])
                    cells[rel] = Cell(fp, (rel,))
    return StagePlan.of("attribute", given.values, cells, None)


def _plan_circuits(cfg: RunConfig, given: PlanInputs) -> StagePlan:
    """When enabled, one curve and one method ranking per attributed cell of its alphas."""
    from rl_circuits.pipeline.common import circuit_alphas

    cells: dict[str, Cell] = {}
    alphas = set(circuit_alphas(cfg))
    attributed = given.upstream["attribute"].cells
    for pair in cfg.pairs.values() if cfg.circuits.enabled else ():
        for name in cfg.run.datasets:
            for role in ROLES:
                for alpha in (a for a in cfg.alphas if a in alphas):
                    up = attributed[RunLayout.attribution(pair.name, role, name, alpha)]
                    rel = RunLayout.circuit(pair.name, role, name, alpha)
                    ranked = RunLayout.method_ranking(pair.name, role, name, alpha)
                    fp = digest(["circuits", given.values, up.fingerprint])
                    cells[rel] = Cell(fp, (rel, ranked))
    return StagePlan.of("circuits", given.values, cells, cfg.circuits.enabled)


def _plan_diff(cfg: RunConfig, given: PlanInputs) -> StagePlan:
    """When enabled, one patching curve per pair x direction x dataset x alpha, from the
    scores of the model whose answers it reads."""
    from rl_circuits.pipeline.common import diff_alphas

    cells: dict[str, Cell] = {}
    attributed = given.upstream["attribute"].cells
    for pair in cfg.pairs.values() if cfg.diff.enabled else ():
        for direction in cfg.diff.directions:
            reads = direction_roles(direction)[1]
            for name in cfg.run.datasets:
                for alpha in diff_alphas(cfg):
                    up = attributed[RunLayout.attribution(pair.name, reads, name, alpha)]
                    rel = RunLayout.diff(pair.name, direction, name, alpha)
                    cells[rel] = Cell(digest(["diff", given.values, up.fingerprint]), (rel,))
    return StagePlan.of("diff", given.values, cells, cfg.diff.enabled)


def _plan_analyze(cfg: RunConfig, given: PlanInputs) -> StagePlan:
    """The whole run's analysis; a run without the diff stage keeps the fingerprint it had
    before that stage existed."""
    links = given.fingerprints(tuple(s for s in ANALYZE_READS if cfg.diff.enabled or s != "diff"))
    algorithms = {p.name: p.algorithm for p in cfg.pairs.values()}
    fp = digest(["analyze", given.values, algorithms, links])
    return StagePlan({"analysis": Cell(fp, (RunLayout.ANALYSIS,))}, fp)


def _plan_weights(cfg: RunConfig, given: PlanInputs) -> StagePlan:
    """When enabled, one table per pair, from its two checkpoints (no upstream stage)."""
    cells: dict[str, Cell] = {}
    for pair in cfg.pairs.values() if cfg.weights.enabled else ():
        models = [[m.path, m.revision] for m in (PairModel(pair, r) for r in ROLES)]
        fp = digest(["weights", models, given.values])
        cells[pair.name] = Cell(fp, (RunLayout.weights(pair.name),))
    return StagePlan.of("weights", given.values, cells)


def _plan_report(cfg: RunConfig, given: PlanInputs) -> StagePlan:
    """The whole run's report: its notes name the pairs and every stage's settings."""
    links = given.fingerprints(REPORT_READS)
    fp = digest(["report", [given.values, digest(cfg.resolved()["pairs"]), *links]])
    return StagePlan({"report": Cell(fp, (RunLayout.REPORT,))}, fp)


# the weights table's settings (n_permutations is the report's)
WEIGHTS_KEYS = tuple(f"weights.{k}" for k in ("enabled", "dtype", "tol", "rank_rows", "seed"))
WEIGHTS_KEYS += ("attribute.graph",)
ANALYZE_READS = ("attribute", "circuits", "diff")
REPORT_READS = ("analyze", "weights")

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        # run.data_dir enters as the data file's sha256 when the file exists
        Stage(
            "datasets",
            keys=("run.split", "run.limit", "run.ids"),
            requires=(),
            cells="dataset",
            plan=_plan_datasets,
            function="rl_circuits.pipeline.datasets:stage_datasets",
            summary="read each dataset of the config into question/gold records",
        ),
        Stage(
            "generate",
            keys=("model", "generate", "select.rules"),
            requires=("datasets",),
            cells="model x dataset",
            plan=_plan_generate,
            function="rl_circuits.pipeline.generate:stage_generate",
            merge_function="rl_circuits.pipeline.generate:merge_generate",
            summary="let the before and after model of every pair answer the questions",
        ),
        Stage(
            "grade",
            keys=("grade",),
            requires=("generate",),
            cells="model x dataset",
            plan=_plan_grade,
            function="rl_circuits.pipeline.grade:stage_grade",
            summary="grade every answer against the gold answer",
        ),
        Stage(
            "select",
            keys=("select",),
            requires=("grade",),
            cells="pair x dataset",
            plan=_plan_select,
            function="rl_circuits.pipeline.select:stage_select",
            summary="select the questions to score (the paper's Eqs. 10-12) and their T_cut",
        ),
        Stage(
            "attribute",
            keys=("model", "attribute", "select"),
            requires=("select",),
            cells="pair x model x dataset x alpha",
            plan=_plan_attribute,
            function="rl_circuits.pipeline.attribute:stage_attribute",
            merge_function="rl_circuits.pipeline.attribute:merge_attribute",
            summary="score every edge on each selected question, for each model and alpha",
            per_cell=("select.alphas",),
            devices_key="model.n_devices",  # a model may be split over several GPUs
        ),
        Stage(
            "circuits",
            keys=("model", "circuits"),
            requires=("attribute",),
            cells="pair x model x dataset x alpha",
            plan=_plan_circuits,
            function="rl_circuits.pipeline.circuits:stage_circuits",
            summary="faithfulness of top-k circuits (when circuits.enabled)",
            per_cell=("circuits.alphas", "circuits.enabled"),
        ),
        Stage(
            "diff",
            keys=("model", "diff", "attribute.ig_steps"),
            requires=("attribute",),
            cells="pair x direction x dataset x alpha",
            plan=_plan_diff,
            function="rl_circuits.pipeline.diff:stage_diff",
            summary="patch each pair across its two models: which edges carry the change",
            per_cell=("diff.alphas", "diff.directions", "diff.enabled"),
        ),
        Stage(
            "analyze",
            keys=("analyze", "circuits.thresholds"),
            requires=ANALYZE_READS,
            cells=WHOLE_RUN,
            plan=_plan_analyze,
            function="rl_circuits.pipeline.analyze:stage_analyze",
            summary="compare the before and after edge scores: Table 1, intervals, figures' data",
        ),
        # reads only the pairs' checkpoints: no forward pass
        Stage(
            "weights",
            keys=WEIGHTS_KEYS,
            requires=(),
            cells="pair",
            plan=_plan_weights,
            function="rl_circuits.pipeline.weights:stage_weights",
            summary="the parameter update of each node, checkpoint against checkpoint",
        ),
        # the report's notes name settings of every stage: all of the config
        Stage(
            "report",
            keys=tuple(SECTIONS),
            requires=REPORT_READS,
            cells=WHOLE_RUN,
            plan=_plan_report,
            function="rl_circuits.pipeline.report:stage_report",
            summary="write report/report.html from the analysis",
        ),
    )
}
STAGE_NAMES = tuple(STAGES)  # in running order
SHARDED_STAGES = tuple(name for name, stage in STAGES.items() if stage.sharded)


def _sharded_note() -> str:
    return f"sharded: {', '.join(SHARDED_STAGES)}"


def get_stage(name: str, *, sharded: bool = False) -> Stage:
    """The stage called `name` (with `sharded`: one that runs in shards), else a clear error."""
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; the stages: {', '.join(STAGE_NAMES)}")
    if sharded and not STAGES[name].sharded:
        raise ConfigError(f"stage {name!r} does not run in shards; {_sharded_note()}")
    return STAGES[name]


def upstream_of(name: str) -> tuple[str, ...]:
    """Every stage `name` reads, directly or through another, in running order."""
    seen: set[str] = set()
    stack = list(STAGES[name].requires)
    while stack:
        required = stack.pop()
        if required not in seen:
            seen.add(required)
            stack.extend(STAGES[required].requires)
    return tuple(s for s in STAGES if s in seen)
