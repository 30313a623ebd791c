"""The stages of a run, each declared once: what it runs, reads and depends on, and how it shards.

Why: the CLI, `run_pipeline`, the demo, the shard workers (local and Ray) and the integrity
checks (`rl_circuits.pipeline.integrity`) all need to know the stages; they all read `STAGES`.
A stage's implementation is imported when it first runs, so the CLI starts (and fails on bad
input) without loading torch. Every stage function takes `(cfg, store, progress=True)`;
a sharded stage also takes `shard=(i, n)` and has a merge `(cfg, store) -> bool`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rl_circuits.config import SECTIONS
from rl_circuits.errors import ConfigError

if TYPE_CHECKING:
    from rl_circuits.config import RunConfig
    from rl_circuits.store.run import RunStore

StageFn = Callable[..., Any]  # (cfg, store, progress=True[, shard=None])
MergeFn = Callable[["RunConfig", "RunStore"], bool]


@dataclass(frozen=True)
class Implementation:
    """A stage's code: the function that runs it and, for a sharded stage, the merge."""

    run: StageFn
    merge: MergeFn | None = None


@dataclass(frozen=True)
class Stage:
    """One stage of a run.

    `summary`: what it does, in one line (its command's help); `keys`: the config keys its
    outputs depend on ("section" for all of a section's keys,
    "section.key" for one); `requires`: the stages whose outputs it reads; `cells`: what one
    cell of its outputs is, for messages; `per_cell`: config keys whose entries are its cells
    rather than part of every cell's fingerprint; `sharded`: runs data-parallel in shard
    workers, then merges; `load`: imports and returns its `Implementation`.
    """

    name: str
    keys: tuple[str, ...]
    requires: tuple[str, ...]
    cells: str
    load: Callable[[], Implementation]
    summary: str
    per_cell: tuple[str, ...] = ()
    sharded: bool = False

    def run(
        self,
        cfg: RunConfig,
        store: RunStore,
        *,
        progress: bool = True,
        shard: tuple[int, int] | None = None,
    ) -> None:
        """Run the stage (skipping finished work); `shard` only for a sharded stage."""
        code = self.load()
        if self.sharded:
            code.run(cfg, store, progress=progress, shard=shard)
        elif shard is not None:
            raise ConfigError(f"stage {self.name!r} does not run in shards; {_sharded_note()}")
        else:
            code.run(cfg, store, progress=progress)

    def merge(self, cfg: RunConfig, store: RunStore) -> bool:
        """Merge what the shard workers finished; True once the stage is done."""
        code = self.load()
        if code.merge is None:
            raise ConfigError(f"stage {self.name!r} does not run in shards; {_sharded_note()}")
        return code.merge(cfg, store)


# Each loader imports its stage's module: the stage modules pull in torch, pandas and plots.


def _datasets() -> Implementation:
    from rl_circuits.pipeline.datasets import stage_datasets

    return Implementation(stage_datasets)


def _generate() -> Implementation:
    from rl_circuits.pipeline.generate import merge_generate, stage_generate

    return Implementation(stage_generate, merge_generate)


def _grade() -> Implementation:
    from rl_circuits.pipeline.grade import stage_grade

    return Implementation(stage_grade)


def _select() -> Implementation:
    from rl_circuits.pipeline.select import stage_select

    return Implementation(stage_select)


def _attribute() -> Implementation:
    from rl_circuits.pipeline.attribute import merge_attribute, stage_attribute

    return Implementation(stage_attribute, merge_attribute)


def _circuits() -> Implementation:
    from rl_circuits.pipeline.circuits import stage_circuits

    return Implementation(stage_circuits)


def _diff() -> Implementation:
    from rl_circuits.pipeline.diff import stage_diff

    return Implementation(stage_diff)


def _analyze() -> Implementation:
    from rl_circuits.pipeline.analyze import stage_analyze

    return Implementation(stage_analyze)


def _weights() -> Implementation:
    from rl_circuits.pipeline.weights import stage_weights

    return Implementation(stage_weights)


def _report() -> Implementation:
    from rl_circuits.pipeline.report import stage_report

    return Implementation(stage_report)


# the weights table's settings (n_permutations is the report's)
WEIGHTS_KEYS = tuple(f"weights.{k}" for k in ("enabled", "dtype", "tol", "rank_rows", "seed"))
WEIGHTS_KEYS += ("attribute.graph",)

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        # run.data_dir enters as the data file's sha256 when the file exists
        Stage(
            "datasets",
            ("run.split", "run.limit", "run.ids"),
            (),
            "dataset",
            _datasets,
            summary="read each dataset of the config into question/gold records",
        ),
        Stage(
            "generate",
            ("model", "generate", "select.rules"),
            ("datasets",),
            "model x dataset",
            _generate,
            summary="let the before and after model of every pair answer the questions",
            sharded=True,
        ),
        Stage(
            "grade",
            ("grade",),
            ("generate",),
            "model x dataset",
            _grade,
            summary="grade every answer against the gold answer",
        ),
        Stage(
            "select",
            ("select",),
            ("grade",),
            "pair x dataset",
            _select,
            summary="select the questions to score (the paper's Eqs. 10-12) and their T_cut",
        ),
        Stage(
            "attribute",
            ("model", "attribute", "select"),
            ("select",),
            "pair x model x dataset x alpha",
            _attribute,
            summary="score every edge on each selected question, for each model and alpha",
            per_cell=("select.alphas",),
            sharded=True,
        ),
        Stage(
            "circuits",
            ("model", "circuits"),
            ("attribute",),
            "pair x model x dataset x alpha",
            _circuits,
            summary="faithfulness of top-k circuits (when circuits.enabled)",
            per_cell=("circuits.alphas", "circuits.enabled"),
        ),
        Stage(
            "diff",
            ("model", "diff", "attribute.ig_steps"),
            ("attribute",),
            "pair x direction x dataset x alpha",
            _diff,
            summary="patch each pair across its two models: which edges carry the change",
            per_cell=("diff.alphas", "diff.directions", "diff.enabled"),
        ),
        Stage(
            "analyze",
            ("analyze", "circuits.thresholds"),
            ("attribute", "circuits", "diff"),
            "run",
            _analyze,
            summary="compare the before and after edge scores: Table 1, intervals, figures' data",
        ),
        # reads only the pairs' checkpoints: no forward pass
        Stage(
            "weights",
            WEIGHTS_KEYS,
            (),
            "pair",
            _weights,
            summary="the parameter update of each node, checkpoint against checkpoint",
        ),
        # the report's notes name settings of every stage: all of the config
        Stage(
            "report",
            tuple(SECTIONS),
            ("analyze", "weights"),
            "run",
            _report,
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
