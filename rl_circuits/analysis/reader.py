"""Reading a run directory: `load_run` -> `Run` (selections, grades, scores, Table 1, figures).

Table 1 uses the paper's "all" reading of Eqs. 14-16 by default (every entry of the
n_upstream x n_downstream matrix, zeros of non-edges included); `analyze.edges = "valid"`
restricts every metric to existing edges. The analyze and report stages that write what this
reads are in `rl_circuits.pipeline` (analyze.py, report.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from rl_circuits.analysis.plots import (
    diversity_bars,
    faithfulness_curves,
    metric_vs_alpha,
    output_entropy_lines,
    relative_change_heatmap,
)
from rl_circuits.analysis.stats import Table1, table1_from_rows
from rl_circuits.config import RunConfig, config_from_resolved, upgrade_resolved
from rl_circuits.data.selection import Selection
from rl_circuits.engine.scores import EdgeScores
from rl_circuits.errors import RLCircuitsError
from rl_circuits.models.pairs import ROLES, PairModel
from rl_circuits.store.layout import RunLayout
from rl_circuits.store.run import RunStore

TABLE_METRICS = ("activation_intensity", "information_complexity", "distribution_kurtosis")


def finished_cells(
    cfg: RunConfig, store: RunStore
) -> Iterator[tuple[str, str, float, EdgeScores, EdgeScores]]:
    """(pair, dataset, alpha, before scores, after scores) for every finished cell."""
    for pair in cfg.pairs.values():
        for dataset in cfg.run.datasets:
            for alpha in cfg.alphas:
                files = [RunLayout.scores(pair.name, role, dataset, alpha) for role in ROLES]
                if all(store.exists(f) for f in files):
                    before, after = (store.read_scores(f) for f in files)
                    if list(before.ids) != list(after.ids):
                        raise RLCircuitsError(
                            f"{files[0]} and {files[1]} hold different questions; delete "
                            "them and rerun the attribute stage"
                        )
                    yield pair.name, dataset, alpha, before, after


def empty_note(skipped: dict[str, str]) -> str:
    """One line naming the cells that are missing from Table 1, and why."""
    if not skipped:
        return ""
    cells = "; ".join(
        f"{key.replace('|', ', ').rsplit(', ', 1)[0]}, alpha={key.rsplit('|', 1)[1]}: {why}"
        for key, why in skipped.items()
    )
    return f"Cells without results (not in the table): {cells}."


def with_empty_note(table: Table1, skipped: dict[str, str]) -> Table1:
    """`table` with its note naming the cells without results (`skipped`)."""
    note = empty_note(skipped)
    return dataclasses.replace(table, note=f"{table.note} {note}") if note else table


def accuracy_table(cfg: RunConfig, store: RunStore) -> pd.DataFrame:
    """Per model and dataset: questions graded, correct, accuracy (%) and the four groups of
    each pair (the paper's Appendix C and the authors' dataset split)."""
    rows = []
    for pair in cfg.pairs.values():
        for dataset in cfg.run.datasets:
            verdicts = {}
            for role in ROLES:
                stage = store.records(RunLayout.grades(PairModel(pair, role).key, dataset))
                if not stage.is_done():
                    break
                verdicts[role] = {g["id"]: g["verdict"] == "correct" for g in stage.load()}
            if len(verdicts) < 2:
                continue
            ids = list(verdicts["before"])
            b, a = verdicts["before"], verdicts["after"]
            row = {"pair": pair.name, "dataset": dataset, "n": len(ids)}
            for role in ROLES:
                correct = sum(verdicts[role].values())
                row[f"correct_{role}"] = correct
                row[f"accuracy_{role}"] = 100.0 * correct / len(ids) if ids else float("nan")
            row["both_correct"] = sum(b[q] and a[q] for q in ids)
            row["both_wrong"] = sum(not b[q] and not a[q] for q in ids)
            row["only_before"] = sum(b[q] and not a[q] for q in ids)
            row["only_after"] = sum(a[q] and not b[q] for q in ids)
            rows.append(row)
    return pd.DataFrame(rows)


def metric_words(metric: str) -> str:
    """A metric's name in words for section titles: "activation_intensity" -> "Activation
    intensity"."""
    return metric.replace("_", " ").capitalize()


@dataclass
class Run:
    """A run directory loaded for notebooks: selections, grades, scores and Table 1."""

    root: Path
    config: RunConfig
    store: RunStore

    def selection(self, pair: str, dataset: str) -> Selection:
        return Selection.from_dict(self.store.read_json(RunLayout.selection(pair, dataset)))

    def _check(self, pair: str, role: str | None, dataset: str, alpha: float | None = None):
        """Refuse names the run does not have, listing the ones it has."""
        for what, value, known in (
            ("pair", pair, list(self.config.pairs)),
            ("role", role, list(ROLES)),
            ("dataset", dataset, list(self.config.run.datasets)),
            ("alpha", alpha, self.config.alphas),
        ):
            if value is not None and value not in known:
                raise RLCircuitsError(
                    f"{what} {value!r} is not in run {self.root}; it has "
                    f"{', '.join(map(repr, known))}"
                )

    def _records(self, stage: str, pair: str, role: str, dataset: str) -> list[dict]:
        self._check(pair, role, dataset)
        where = {"generate": RunLayout.generations, "grade": RunLayout.grades}[stage]
        records = self.store.records(where(PairModel(self.config.pairs[pair], role).key, dataset))
        if not records.is_done() and not records.done_ids():
            raise RLCircuitsError(
                f"run {self.root} has no {stage} records for {pair}/{role} on {dataset} yet: "
                f"run `rl-circuits {stage} CONFIG` (or `rl-circuits run CONFIG`)"
            )
        return records.load()

    def generations(self, pair: str, role: str, dataset: str) -> list[dict]:
        """Each question's prompt, answer and token ids from `pair`'s `role` model."""
        return self._records("generate", pair, role, dataset)

    def grades(self, pair: str, role: str, dataset: str) -> list[dict]:
        """Each question's extracted answer, gold and verdict."""
        return self._records("grade", pair, role, dataset)

    def scores(self, pair: str, role: str, dataset: str, alpha: float) -> EdgeScores:
        """Edge scores [n, n_upstream, n_downstream] with node names and question ids."""
        self._check(pair, role, dataset, float(alpha))
        rel = RunLayout.scores(pair, role, dataset, alpha)
        if not self.store.exists(rel):
            raise RLCircuitsError(
                f"run {self.root} has no scores for {pair}/{role}, {dataset}, alpha={alpha:g}: "
                + (
                    "every question of the cell was skipped (see its skipped.json)"
                    if self.store.exists(RunLayout.skipped(pair, role, dataset, alpha))
                    else "run `rl-circuits attribute CONFIG` (or `rl-circuits run CONFIG`)"
                )
            )
        return self.store.read_scores(rel)

    @property
    def workdir(self) -> Path | None:
        """The directory the run's commands ran in: relative config paths are relative to it."""
        manifest = self.store.manifest()
        return Path(manifest["workdir"]) if manifest.get("workdir") else None

    def resolve_path(self, path: str) -> str:
        """A path of the config (a checkpoint, the data directory) as an absolute path when it
        was given relative to where the run was made; hub ids and absolute paths unchanged."""
        if not path or Path(path).is_absolute() or self.workdir is None:
            return path
        candidate = self.workdir / path
        return str(candidate) if candidate.exists() else path

    def model_path(self, pair: str, role: str) -> str:
        """The checkpoint of `pair`'s `role` ("before"/"after") model, loadable from anywhere."""
        spec = self.config.pairs[pair]
        return self.resolve_path(spec.before if role == "before" else spec.after)

    def accuracy(self) -> pd.DataFrame:
        """Per pair, dataset and model: accuracy and the four correctness groups."""
        return accuracy_table(self.config, self.store)

    def comparisons(self) -> pd.DataFrame:
        return pd.DataFrame(self.store.read_jsonl(RunLayout.COMPARE))

    def table1(self) -> Table1:
        """Table 1, its note naming the cells without results."""
        return with_empty_note(table1_from_rows(self.comparisons()), self.skipped_cells())

    def skipped_cells(self) -> dict[str, str]:
        """ "pair|dataset|alpha" -> why the cell has no row in Table 1."""
        rel = RunLayout.SKIPPED_CELLS
        return self.store.read_json(rel) if self.store.exists(rel) else {}

    def funnel(self) -> pd.DataFrame:
        """Per pair x dataset: questions entering selection, removed by each filter (in order),
        requested (select.n) and kept, from the select stage's reports."""
        rows = []
        for pair in self.config.pairs:
            for dataset in self.config.run.datasets:
                rel = RunLayout.selection(pair, dataset)
                if not self.store.exists(rel):
                    continue
                report = self.store.read_json(rel).get("report", {})
                row = {"pair": pair, "dataset": dataset, "questions": report.get("entering")}
                for step in report.get("filters", []):
                    row[f"− {step['filter'].replace('_', ' ')}"] = step["removed"]
                row["requested"] = report.get("params", {}).get("n")
                row["kept"] = report.get("kept")
                rows.append(row)
        return pd.DataFrame(rows)

    def figures(self) -> dict:
        df = self.comparisons()
        figures = {}
        # the largest alpha with results (a configured larger one may have ended empty)
        largest = max(float(a) for a in df["alpha"]) if "alpha" in df else None
        for pair, dataset, alpha, before, after in finished_cells(self.config, self.store):
            if alpha != largest:
                continue
            figures[f"Relative change: {pair}, {dataset}, alpha={alpha:g}"] = (
                relative_change_heatmap(
                    before.values.numpy(),
                    after.values.numpy(),
                    before.upstream,
                    before.downstream,
                    before.edge_mask.numpy(),
                    title=f"Relative change of mean |W| after {self.config.pairs[pair].algorithm}"
                    f" ({pair}, {dataset}, alpha={alpha:g})",
                )
            )
        figures["Sample diversity"] = diversity_bars(df)
        entropy = self.store.read_json(RunLayout.OUTPUT_ENTROPY)
        for key, value in entropy.items():
            pair, dataset, alpha = key.split("|")
            if float(alpha) == largest:
                figures[f"Output-edge entropy: {pair}, {dataset}, alpha={alpha}"] = (
                    output_entropy_lines(
                        value["before"],
                        value["after"],
                        value["upstream"],
                        title=f"Output-edge entropy per node ({pair}, {dataset}, alpha={alpha})",
                    )
                )
        for metric in TABLE_METRICS:
            figures[f"{metric_words(metric)} against alpha"] = metric_vs_alpha(df, metric)
        if self.store.exists(RunLayout.CIRCUIT_CURVES):
            for key, curves in self.store.read_json(RunLayout.CIRCUIT_CURVES).items():
                pair, dataset, alpha = key.split("|")
                sizes = ", ".join(
                    f"{name.replace('circuit_size_', 'size@')}: {b} -> {a}"
                    for name, (b, a) in curves["sizes"].items()
                )
                figures[f"Faithfulness: {pair}, {dataset}, alpha={alpha}"] = faithfulness_curves(
                    curves,
                    title=f"Faithfulness of the top-k edges ({pair}, {dataset}, alpha={alpha}; "
                    f"{sizes})",
                )
        return figures

    def circuits(self, pair: str, role: str, dataset: str, alpha: float) -> dict:
        """The circuits stage's per-question losses of one cell: ids, ks, losses, clean, none."""
        return self.store.read_json(RunLayout.circuit(pair, role, dataset, alpha))

    def circuit_curves(self) -> dict:
        """Mean faithfulness curves, bands, overlap and sizes per "pair|dataset|alpha"."""
        return self.store.read_json(RunLayout.CIRCUIT_CURVES)


def load_run(path: str | Path) -> Run:
    """Open a finished (or partial) run directory read-only, for notebooks and scripts."""
    store = RunStore.read_only(Path(path))
    cfg = config_from_resolved(
        upgrade_resolved(store.read_json(RunLayout.CONFIG)), str(store.label(RunLayout.CONFIG))
    )
    return Run(Path(path), cfg, store)


def table1(run: Run | str | Path) -> Table1:
    """The paper's Table 1 for a run (a loaded `Run` or its directory)."""
    return (run if isinstance(run, Run) else load_run(run)).table1()
