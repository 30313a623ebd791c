"""The analyze and report stages, and `load_run`: stored edge scores -> Table 1 and figures.

Table 1 uses the paper's "all" reading of Eqs. 14-16 by default (every entry of the
n_upstream x n_downstream matrix, zeros of non-edges included); `analyze.edges = "valid"`
restricts every metric to existing edges.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rl_circuits.analysis.faithfulness import compare_circuit_sizes, faithfulness, overlap_curve
from rl_circuits.analysis.metrics import output_entropy
from rl_circuits.analysis.plots import (
    diversity_bars,
    faithfulness_curves,
    metric_vs_alpha,
    output_entropy_lines,
    relative_change_heatmap,
)
from rl_circuits.analysis.report import png_images, render_report
from rl_circuits.analysis.stats import METRICS, Table1, compare
from rl_circuits.analysis.stats import table1 as layout_table1
from rl_circuits.config import RunConfig, config_from_resolved, upgrade_resolved
from rl_circuits.data.selection import Selection
from rl_circuits.errors import RLCircuitsError
from rl_circuits.pipeline.circuits import circuit_alphas, circuit_file
from rl_circuits.pipeline.stages import ROLES, ModelRun, attribution_dir
from rl_circuits.store.run_store import RunStore, Scores

TABLE_METRICS = ("activation_intensity", "information_complexity", "distribution_kurtosis")


def _cells(cfg: RunConfig, store: RunStore) -> Iterator[tuple[str, str, float, Scores, Scores]]:
    """(pair, dataset, alpha, before scores, after scores) for every finished cell."""
    for pair in cfg.pairs.values():
        for dataset in cfg.run.datasets:
            for alpha in cfg.alphas:
                files = [
                    f"{attribution_dir(pair.name, role, dataset, alpha)}/scores.safetensors"
                    for role in ROLES
                ]
                if all(store.exists(f) for f in files):
                    before, after = (store.read_scores(f) for f in files)
                    if list(before.ids) != list(after.ids):
                        raise RLCircuitsError(
                            f"{files[0]} and {files[1]} hold different questions; delete "
                            "them and rerun the attribute stage"
                        )
                    yield pair.name, dataset, alpha, before, after


def empty_cells(cfg: RunConfig, store: RunStore) -> dict[str, str]:
    """ "pair|dataset|alpha" -> why, for each configured cell every question left (all were
    skipped by the attribute stage, or none was selected): shown in Table 1 and the report."""
    out = {}
    for pair in cfg.pairs.values():
        for dataset in cfg.run.datasets:
            for alpha in cfg.alphas:
                rels = [attribution_dir(pair.name, role, dataset, alpha) for role in ROLES]
                if any(store.exists(f"{r}/scores.safetensors") for r in rels):
                    continue
                if not store.exists(f"{rels[0]}/skipped.json"):
                    continue  # not attributed yet
                skipped = store.read_json(f"{rels[0]}/skipped.json")
                reasons = sorted(set(skipped.values()))
                out[f"{pair.name}|{dataset}|{alpha:g}"] = (
                    f"no question left: all {len(skipped)} selected were skipped"
                    + (f" (e.g. {reasons[0]})" if reasons else "")
                    if skipped
                    else "no question was selected"
                )
    return out


def empty_note(skipped: dict[str, str]) -> str:
    """One line naming the cells that are missing from Table 1, and why."""
    if not skipped:
        return ""
    cells = "; ".join(
        f"{key.replace('|', ', ').rsplit(', ', 1)[0]}, alpha={key.rsplit('|', 1)[1]}: {why}"
        for key, why in skipped.items()
    )
    return f"Cells without results (not in the table): {cells}."


def stage_analyze(cfg: RunConfig, store: RunStore) -> None:
    """Each metric before/after with paired bootstrap intervals, per pair x dataset x alpha."""
    a = cfg.analyze
    rows, entropy = [], {}
    skipped = {}
    for pair, dataset, alpha, before, after in _cells(cfg, store):
        if len(before.ids) < 2:  # diversity and the bootstrap need two questions
            skipped[f"{pair}|{dataset}|{alpha:g}"] = f"{len(before.ids)} question(s) left"
            continue
        mask = before.edge_mask.numpy() if a.edges == "valid" else None
        frame = compare(
            before.values.numpy(),
            after.values.numpy(),
            edge_mask=mask,
            metrics=_metrics(a.bins),
            n_resamples=a.n_resamples,
            seed=a.seed,
        )
        info = {"pair": pair, "algorithm": cfg.pairs[pair].algorithm, "dataset": dataset}
        for record in frame.to_dict("records"):
            rows.append({**info, "alpha": alpha, **_plain(record)})
        entropy[f"{pair}|{dataset}|{alpha:g}"] = {
            "upstream": list(before.upstream),
            "before": output_entropy(before.values.numpy(), mask).tolist(),
            "after": output_entropy(after.values.numpy(), mask).tolist(),
        }
    skipped.update(empty_cells(cfg, store))
    if cfg.circuits.enabled:
        circuit_rows, curves = _circuit_comparisons(cfg, store)
        rows += circuit_rows
        store.write_json("analysis/circuits.json", curves)
    if not rows:
        raise RLCircuitsError(
            "no attribution cell with at least two questions to analyze "
            f"(skipped: {skipped or 'none finished'}); run the attribute stage or select more"
        )
    store.write_json("analysis/skipped_cells.json", skipped)
    store.write_jsonl("analysis/compare.jsonl", rows)
    store.write_json("analysis/output_entropy.json", entropy)
    table = _with_empty(layout_table1(rows), skipped)
    store.write_text("analysis/table1.md", table.to_markdown())
    store.write_text("analysis/table1.tex", table.to_latex())
    store.mark_done("analyze", {"cells": len(rows)})


def _with_empty(table: Table1, skipped: dict[str, str]) -> Table1:
    note = empty_note(skipped)
    return dataclasses.replace(table, note=f"{table.note} {note}") if note else table


def _circuit_comparisons(cfg: RunConfig, store: RunStore) -> tuple[list[dict], dict]:
    """Circuit-size rows for Table 1 and the faithfulness curves, per pair x dataset x alpha."""
    a, c = cfg.analyze, cfg.circuits
    rows, curves = [], {}
    for pair in cfg.pairs.values():
        for dataset in cfg.run.datasets:
            for alpha in circuit_alphas(cfg):
                files = [circuit_file(pair.name, role, dataset, alpha) for role in ROLES]
                if not all(store.exists(f) for f in files):
                    continue
                before, after = (store.read_json(f) for f in files)
                if len(before["ids"]) < 2 or before["ids"] != after["ids"]:
                    continue
                f_before, f_after = (
                    faithfulness(
                        np.asarray(r["losses"]), np.asarray(r["clean"]), np.asarray(r["none"])
                    )
                    for r in (before, after)
                )
                size_rows, band = compare_circuit_sizes(
                    f_before,
                    f_after,
                    before["ks"],
                    c.thresholds,
                    n_resamples=a.n_resamples,
                    seed=a.seed,
                )
                info = {"pair": pair.name, "algorithm": pair.algorithm, "dataset": dataset}
                rows += [_plain({**info, "alpha": alpha, **r}) for r in size_rows]
                scores = [
                    store.read_scores(
                        f"{attribution_dir(pair.name, role, dataset, alpha)}/scores.safetensors"
                    )
                    for role in ROLES
                ]
                key = (lambda v: v.abs()) if c.ranking == "abs" else (lambda v: v)
                band["overlap"] = overlap_curve(
                    key(scores[0].values.double()).mean(0).numpy(),
                    key(scores[1].values.double()).mean(0).numpy(),
                    scores[0].edge_mask.numpy(),
                    before["ks"],
                    c.ranking,
                )
                band["sizes"] = {r["metric"]: [r["before"], r["after"]] for r in size_rows}
                curves[f"{pair.name}|{dataset}|{alpha:g}"] = _plain_tree(band)
    return rows, curves


def _plain_tree(obj):
    """NaN -> None throughout nested lists and dicts (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: _plain_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain_tree(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _metrics(bins: int) -> dict:
    """The Table 1 metrics and diversity, Info. Complex. with `analyze.bins` histogram bins."""
    chosen = {name: METRICS[name] for name in (*TABLE_METRICS, "sample_diversity")}
    chosen["information_complexity"] = functools.partial(
        chosen["information_complexity"], bins=bins
    )
    return chosen


def accuracy_table(cfg: RunConfig, store: RunStore) -> pd.DataFrame:
    """Per model and dataset: questions graded, correct, accuracy (%) and the four groups of
    each pair (the paper's Appendix C and the authors' dataset split)."""
    rows = []
    for pair in cfg.pairs.values():
        for dataset in cfg.run.datasets:
            verdicts = {}
            for role in ROLES:
                stage = store.records(f"grade/{ModelRun(pair, role).key}/{dataset}")
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


def _plain(record: dict) -> dict:
    """JSON-ready values: numpy scalars as Python ones, NaN (an undefined metric) as null."""
    out = {}
    for key, value in record.items():
        value = value.item() if isinstance(value, np.generic) else value
        out[key] = None if isinstance(value, float) and not np.isfinite(value) else value
    return out


def stage_report(cfg: RunConfig, store: RunStore) -> Path:
    """One self-contained HTML file with Table 1 and every figure (PNGs where possible)."""
    run = Run(store.root, cfg, store)
    figures = run.figures()
    html = render_report(
        title=f"rl-circuits: {', '.join(cfg.pairs)} on {', '.join(cfg.run.datasets)}",
        table=run.table1(),
        figures=figures,
        notes=_notes(cfg),
        accuracy=accuracy_table(cfg, store),
        funnel=run.funnel(),
        skipped=run.skipped_cells(),
    )
    path = store.write_text("report/report.html", html)
    for name, image in png_images(figures).items():
        store.write_bytes(f"report/png/{name}", image)
    store.mark_done("report", {"path": "report/report.html"})
    print(f"report: {path}")
    return path


def _notes(cfg: RunConfig) -> str:
    a = cfg.analyze
    return (
        f"Metrics over {a.edges} entries of each edge matrix; graph {cfg.attribute.graph}"
        f", method {cfg.attribute.method}. Intervals: paired bootstrap over questions "
        f"({a.n_resamples} resamples, 95%); p: paired permutation test; Info. Complex. "
        f"with {a.bins} bins. Grader {cfg.grade.grader}, selection rules "
        f"{cfg.select.rules} (reference {cfg.select.reference}, window "
        f"{cfg.select.window}, subset {cfg.select.subset}), end token "
        f"{cfg.generate.end_token}. "
        "↑/↓/→ direction of the change after post-training (→: none), * interval excludes 0."
    )


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
        return Selection.from_dict(self.store.read_json(f"select/{pair}/{dataset}.json"))

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
        name = f"{stage}/{ModelRun(self.config.pairs[pair], role).key}/{dataset}"
        records = self.store.records(name)
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

    def scores(self, pair: str, role: str, dataset: str, alpha: float) -> Scores:
        """Edge scores [n, n_upstream, n_downstream] with node names and question ids."""
        self._check(pair, role, dataset, float(alpha))
        rel = f"{attribution_dir(pair, role, dataset, alpha)}/scores.safetensors"
        if not self.store.exists(rel):
            raise RLCircuitsError(
                f"run {self.root} has no scores for {pair}/{role}, {dataset}, alpha={alpha:g}: "
                + (
                    "every question of the cell was skipped (see its skipped.json)"
                    if self.store.exists(
                        f"{attribution_dir(pair, role, dataset, alpha)}/skipped.json"
                    )
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
        return pd.DataFrame(self.store.read_jsonl("analysis/compare.jsonl"))

    def table1(self) -> Table1:
        """Table 1, its note naming the cells without results."""
        return _with_empty(layout_table1(self.comparisons()), self.skipped_cells())

    def skipped_cells(self) -> dict[str, str]:
        """ "pair|dataset|alpha" -> why the cell has no row in Table 1."""
        rel = "analysis/skipped_cells.json"
        return self.store.read_json(rel) if self.store.exists(rel) else {}

    def funnel(self) -> pd.DataFrame:
        """Per pair x dataset: questions entering selection, removed by each filter (in order),
        and kept, from the select stage's reports."""
        rows = []
        for pair in self.config.pairs:
            for dataset in self.config.run.datasets:
                rel = f"select/{pair}/{dataset}.json"
                if not self.store.exists(rel):
                    continue
                report = self.store.read_json(rel).get("report", {})
                row = {"pair": pair, "dataset": dataset, "questions": report.get("entering")}
                for step in report.get("filters", []):
                    row[f"− {step['filter'].replace('_', ' ')}"] = step["removed"]
                row["kept"] = report.get("kept")
                rows.append(row)
        return pd.DataFrame(rows)

    def figures(self) -> dict:
        df = self.comparisons()
        figures = {}
        # the largest alpha with results (a configured larger one may have ended empty)
        largest = max(float(a) for a in df["alpha"]) if "alpha" in df else None
        for pair, dataset, alpha, before, after in _cells(self.config, self.store):
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
        entropy = self.store.read_json("analysis/output_entropy.json")
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
        if self.store.exists("analysis/circuits.json"):
            for key, curves in self.store.read_json("analysis/circuits.json").items():
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
        return self.store.read_json(circuit_file(pair, role, dataset, alpha))

    def circuit_curves(self) -> dict:
        """Mean faithfulness curves, bands, overlap and sizes per "pair|dataset|alpha"."""
        return self.store.read_json("analysis/circuits.json")


def load_run(path: str | Path) -> Run:
    """Open a finished (or partial) run directory read-only, for notebooks and scripts."""
    store = RunStore.read_only(Path(path))
    cfg = config_from_resolved(
        upgrade_resolved(store.read_json("config.json")), str(store.label("config.json"))
    )
    return Run(Path(path), cfg, store)


def table1(run: Run | str | Path) -> Table1:
    """The paper's Table 1 for a run (a loaded `Run` or its directory)."""
    return (run if isinstance(run, Run) else load_run(run)).table1()
