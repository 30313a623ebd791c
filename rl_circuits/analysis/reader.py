"""Reading a run directory: `load_run` -> `Run` (selections, grades, scores, Table 1, figures).

Table 1 uses the paper's "all" reading of Eqs. 14-16 by default (every entry of the
n_upstream x n_downstream matrix, zeros of non-edges included); `analyze.edges = "valid"`
restricts every metric to existing edges. The analyze and report stages that write what this
reads are in `rl_circuits.pipeline` (analyze.py, report.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from rl_circuits.analysis.diff import top_edges
from rl_circuits.analysis.method_ranking import TABLE_COLUMNS
from rl_circuits.analysis.plots import (
    diff_curves,
    diff_heatmap,
    diversity_bars,
    faithfulness_curves,
    metric_vs_alpha,
    output_entropy_lines,
    relative_change_heatmap,
)
from rl_circuits.analysis.table1 import Table1, table1_from_rows
from rl_circuits.analysis.weights import (
    join_edges,
    model_fractions,
    outgoing_mass,
    rank_agreement,
    update_fractions,
    weight_edge_scatter,
    weights_table,
)
from rl_circuits.config import RunConfig, config_from_resolved, upgrade_resolved
from rl_circuits.data.selection import Selection
from rl_circuits.engine.scores import EdgeScores
from rl_circuits.errors import RLCircuitsError
from rl_circuits.models.pairs import DIRECTIONS, ROLES, PairModel
from rl_circuits.store.layout import RunLayout
from rl_circuits.store.run import RunStore

TABLE_METRICS = ("activation_intensity", "information_complexity", "distribution_kurtosis")
# An alpha as a number or its text ("0.3"), matched to the run's alphas up to float rounding.
Alpha = float | int | str


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
        """The questions selected for `pair` on `dataset`, their T_cut per alpha and report."""
        self._check(pair, None, dataset)
        rel = RunLayout.selection(pair, dataset)
        self._require(rel, f"selection for {pair} on {dataset}", "select")
        return Selection.from_dict(self.store.read_json(rel))

    def _require(self, rel: str, what: str, stage: str) -> None:
        """Refuse a file the run does not have yet, naming the stage that writes it."""
        if not self.store.exists(rel):
            raise RLCircuitsError(
                f"run {self.root} has no {what} yet: run `rl-circuits {stage} CONFIG` (or "
                "`rl-circuits run CONFIG`)"
            )

    def _check(self, pair: str, role: str | None, dataset: str | None) -> None:
        """Refuse names the run does not have, listing the ones it has (None: not asked)."""
        for what, value, known in (
            ("pair", pair, list(self.config.pairs)),
            ("role", role, list(ROLES)),
            ("dataset", dataset, list(self.config.run.datasets)),
        ):
            if value is not None and value not in known:
                raise RLCircuitsError(
                    f"{what} {value!r} is not in run {self.root}; it has "
                    f"{', '.join(map(repr, known))}"
                )

    def _alpha(self, alpha: Alpha) -> float:
        """The run's alpha equal to `alpha` up to float rounding (0.1 * 3 is 0.3), else an error
        listing the run's alphas."""
        known = self.config.alphas
        try:
            value = float(alpha)
        except (TypeError, ValueError):
            value = math.nan
        for a in known:
            if math.isclose(value, a, rel_tol=1e-9, abs_tol=1e-12):
                return a
        raise RLCircuitsError(
            f"alpha {alpha!r} is not in run {self.root}; it has {', '.join(map(repr, known))}"
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

    def scores(self, pair: str, role: str, dataset: str, alpha: Alpha) -> EdgeScores:
        """Edge scores [batch, n_upstream, n_downstream] with node names and question ids; `alpha`
        is matched to the run's alphas up to float rounding."""
        self._check(pair, role, dataset)
        alpha = self._alpha(alpha)
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
        """The analyze stage's metric comparisons (Table 1's rows)."""
        self._require(RunLayout.COMPARE, "metric comparisons (Table 1, figures)", "analyze")
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
        self._require(RunLayout.OUTPUT_ENTROPY, "output-edge entropies", "analyze")
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
        figures.update(self._diff_figures())
        figures.update(self._weight_figures(largest))
        return figures

    def weights(self, pair: str | None = None) -> pd.DataFrame:
        """Each node's parameter update (the weights stage): `pair`'s table indexed by node,
        or every pair's under a `pair` index level; `attrs["model"]`: the whole-model totals
        (per pair when all pairs are read)."""
        if pair is not None:
            self._check(pair, None, None)
        records = self._weight_records()
        skipped = {name: r["skipped"] for name, r in records.items() if "skipped" in r}
        if pair is not None and pair in skipped:
            raise RLCircuitsError(
                f"run {self.root} has no weights table for {pair}: {skipped[pair]}"
            )
        names = [pair] if pair is not None else list(self.config.pairs)
        tables = {
            name: weights_table(records[name])
            for name in names
            if name in records and name not in skipped
        }
        if not tables or (pair is not None and pair not in tables):
            enable = "" if self.config.weights.enabled else " with [weights] enabled = true"
            raise RLCircuitsError(
                f"run {self.root} has no weights table{f' for {pair}' if pair else 's'} yet: "
                f"run `rl-circuits weights CONFIG`{enable} (or `rl-circuits run CONFIG`)"
            )
        if pair is not None:
            return tables[pair]
        joined = pd.concat(tables, names=["pair"])
        joined.attrs["model"] = {name: t.attrs["model"] for name, t in tables.items()}
        return joined

    def _weight_records(self) -> dict[str, dict]:
        """The weights stage's file of each pair that has one, when the stage is enabled."""
        if not self.config.weights.enabled:
            return {}
        return {
            pair: self.store.read_json(RunLayout.weights(pair))
            for pair in self.config.pairs
            if self.store.exists(RunLayout.weights(pair))
        }

    def weight_edges(self, pair: str, dataset: str, alpha: Alpha) -> tuple[pd.DataFrame, dict]:
        """`pair`'s weights table joined to the change of each node's outgoing edge mass in
        one cell (and its diff-score mass where the diff stage ran), with (Spearman rho,
        permutation p) of rel_norm against |edge change| and against the diff mass."""
        w = self.config.weights
        before, after = (self.scores(pair, role, dataset, alpha) for role in ROLES)
        masses = [outgoing_mass(s.values.numpy(), s.edge_mask.numpy()) for s in (before, after)]
        diff = self._diff_mass(pair, dataset, alpha)
        joined = join_edges(self.weights(pair), before.upstream, *masses, diff=diff)
        stats = {
            "edge_change": rank_agreement(
                joined["rel_norm"], joined["edge_change"].abs(), w.n_permutations, w.seed
            )
        }
        if diff is not None:
            stats["diff_mass"] = rank_agreement(
                joined["rel_norm"], joined["diff_mass"], w.n_permutations, w.seed
            )
        return joined, stats

    def _diff_mass(self, pair: str, dataset: str, alpha: Alpha):
        """Per upstream node, the outgoing mass of the diff stage's after-into-before scores,
        where the diff stage ran on this cell (else None)."""
        rel = RunLayout.diff_scores(pair, "after_into_before", dataset, alpha)
        if not self.store.exists(rel):
            return None
        scores = self.store.read_scores(rel)
        return outgoing_mass(scores.values.numpy(), scores.edge_mask.numpy())

    def _weight_figures(self, largest: float | None) -> dict:
        """The weights stage's figures: update fractions per node and pair, weight vs edge
        change on the largest alpha's cells, and the whole-model fractions."""
        figures: dict = {}
        pairs = [p for p, record in self._weight_records().items() if "skipped" not in record]
        for pair in pairs:
            table = self.weights(pair)
            model = table.attrs["model"]
            figures[f"Parameters changed per node: {pair}"] = update_fractions(
                table,
                f"Parameters changed by {self.config.pairs[pair].algorithm} per node ({pair}; "
                f"{model['fraction_changed']:.1%} of all, |diff| > {model['tol']:g} at "
                f"{model['dtype']})",
            )
            for dataset in self.config.run.datasets:
                files = [RunLayout.scores(pair, role, dataset, largest or 0) for role in ROLES]
                if largest is None or not all(self.store.exists(f) for f in files):
                    continue
                joined, stats = self.weight_edges(pair, dataset, largest)
                figures[f"Weight change vs edge change: {pair}, {dataset}, alpha={largest:g}"] = (
                    weight_edge_scatter(
                        joined,
                        f"Do the nodes whose weights moved most carry the edges that moved "
                        f"most? ({pair}, {dataset}, alpha={largest:g})",
                        stats,
                    )
                )
        if pairs:
            figures["Parameters changed, whole model"] = model_fractions(
                {p: self.weights(p).attrs["model"] for p in pairs}
            )
        return figures

    def _diff_figures(self) -> dict:
        """Per pair, dataset and alpha the diff circuit curves of both directions; per cell the
        heatmap of mean diff scores."""
        if not self.store.exists(RunLayout.DIFF_CURVES):
            return {}
        figures, groups = {}, {}
        for key, summary in self.diff().items():
            pair, direction, dataset, alpha = key.split("|")
            groups.setdefault((pair, dataset, alpha), {})[direction] = summary
        for (pair, dataset, alpha), summaries in groups.items():
            edges = "; ".join(
                f"{d.replace('_', ' ')}: 80% at k = {s['edges']['80'][0]} of {s['n_edges']}"
                for d, s in summaries.items()
            )
            figures[f"Diff circuit: {pair}, {dataset}, alpha={alpha}"] = diff_curves(
                summaries,
                title=f"Share of the loss gap the top-k edges carry ({pair}, {dataset}, "
                f"alpha={alpha}; {edges})",
            )
            for direction in summaries:
                scores = self.diff_scores(pair, direction, dataset, float(alpha))
                figures[f"Diff scores: {pair}, {direction}, {dataset}, alpha={alpha}"] = (
                    diff_heatmap(
                        scores.values.numpy(),
                        scores.upstream,
                        scores.downstream,
                        scores.edge_mask.numpy(),
                        title=f"Mean cross-model patching score, {direction.replace('_', ' ')}"
                        f" ({pair}, {dataset}, alpha={alpha})",
                    )
                )
        return figures

    def diff(self) -> dict:
        """The diff stage's summaries per "pair|direction|dataset|alpha": the diff circuit curve
        (`ks`, `curve` and its bootstrap band), the mean loss `gap`, the fully `patched` loss
        and its `patched_share`, and `edges` {"50"|"80"|"90": [k, low, high, fraction]}."""
        if not self.store.exists(RunLayout.DIFF_CURVES):
            raise RLCircuitsError(
                f"run {self.root} has no diff results: set `[diff] enabled = true` in the "
                "config and run `rl-circuits run CONFIG` (the diff and analyze stages)"
            )
        return self.store.read_json(RunLayout.DIFF_CURVES)

    def _diff_file(self, locate, what: str, pair, direction, dataset, alpha) -> str:
        """The path `locate` gives one diff cell, the names checked and `alpha` matched to the
        run's alphas; an error naming the stage to run where the file is absent."""
        self._check(pair, None, dataset)
        alpha = self._alpha(alpha)
        if direction not in DIRECTIONS:
            raise RLCircuitsError(
                f"direction {direction!r} is not one of {', '.join(map(repr, DIRECTIONS))}"
            )
        rel = locate(pair, direction, dataset, alpha)
        if not self.store.exists(rel):
            raise RLCircuitsError(
                f"run {self.root} has no diff {what} for {pair}, {direction}, {dataset}, "
                f"alpha={alpha:g}: run `rl-circuits diff CONFIG` with this cell among "
                "diff.directions and diff.alphas"
            )
        return rel

    def diff_scores(self, pair: str, direction: str, dataset: str, alpha: Alpha) -> EdgeScores:
        """Cross-model patching scores [batch, n_upstream, n_downstream] of one diff cell."""
        rel = self._diff_file(RunLayout.diff_scores, "scores", pair, direction, dataset, alpha)
        return self.store.read_scores(rel)

    def diff_losses(self, pair: str, direction: str, dataset: str, alpha: Alpha) -> dict:
        """One diff cell's per-question losses: ids, ks, losses [k][batch], clean, source,
        patched."""
        rel = self._diff_file(RunLayout.diff_curve, "losses", pair, direction, dataset, alpha)
        return self.store.read_json(rel)

    def diff_edges(
        self, pair: str, direction: str, dataset: str, alpha: Alpha, count: int = 20
    ) -> pd.DataFrame:
        """The `count` edges that carry the change most (largest mean |score|) in one cell."""
        s = self.diff_scores(pair, direction, dataset, alpha)
        return top_edges(
            s.values.numpy(), s.upstream, s.downstream, s.edge_mask.numpy(), count=count
        )

    def circuits(self, pair: str, role: str, dataset: str, alpha: Alpha) -> dict:
        """The circuits stage's per-question losses of one cell: ids, ks, losses, clean, none."""
        self._check(pair, role, dataset)
        rel = RunLayout.circuit(pair, role, dataset, self._alpha(alpha))
        self._require(rel, f"circuit losses for {pair}/{role}, {dataset}", "circuits")
        return self.store.read_json(rel)

    def methods(self) -> pd.DataFrame:
        """The method ranking of every cell with one (`[circuits] methods`): one row per pair,
        role, dataset, alpha and method (CPR, CMD with intervals, Spearman with exact, unscored
        nodes, seconds per question); `analysis/methods.md` is its table."""
        alphas = [float(a) for a in self.config.circuits.alphas] or self.config.alphas
        rows = []
        for pair in self.config.pairs:
            for role in ROLES:
                for dataset in self.config.run.datasets:
                    for alpha in alphas:
                        rel = RunLayout.method_ranking(pair, role, dataset, alpha)
                        if not self.store.exists(rel):
                            continue
                        for row in self.store.read_json(rel)["rows"]:
                            cell = {"pair": pair, "role": role, "dataset": dataset, "alpha": alpha}
                            rows.append({**cell, **{k: row[k] for k in TABLE_COLUMNS[4:]}})
        return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))

    def circuit_curves(self) -> dict:
        """Mean faithfulness curves, bands, overlap and sizes per "pair|dataset|alpha"."""
        what = "faithfulness curves (from the circuits stage's losses)"
        self._require(RunLayout.CIRCUIT_CURVES, what, "analyze")
        return self.store.read_json(RunLayout.CIRCUIT_CURVES)


def load_run(path: str | Path) -> Run:
    """Open a finished (or partial) run directory read-only, for notebooks and scripts.
    `run.config.run.run_dir` is the directory opened, wherever the run was made."""
    store = RunStore.read_only(Path(path))
    cfg = config_from_resolved(
        upgrade_resolved(store.read_json(RunLayout.CONFIG)), str(store.label(RunLayout.CONFIG))
    )
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_dir=str(store.root)))
    return Run(Path(path), cfg, store)


def table1(run: Run | str | Path) -> Table1:
    """The paper's Table 1 for a run (a loaded `Run` or its directory)."""
    return (run if isinstance(run, Run) else load_run(run)).table1()
