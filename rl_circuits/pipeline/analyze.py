"""The analyze stage: each metric before/after with paired bootstrap intervals per cell, the
circuit sizes and faithfulness curves, and Table 1 (`analysis/`)."""

from __future__ import annotations

import functools

import numpy as np

from rl_circuits.analysis.diff import TABLE_THRESHOLD, diff_summary, gap_metric
from rl_circuits.analysis.faithfulness import compare_circuit_sizes, faithfulness, overlap_curve
from rl_circuits.analysis.method_ranking import method_markdown
from rl_circuits.analysis.metrics import output_entropy
from rl_circuits.analysis.reader import TABLE_METRICS, Run, finished_cells, with_empty_note
from rl_circuits.analysis.stats import METRICS, compare, table1_from_rows
from rl_circuits.config import RunConfig
from rl_circuits.errors import RLCircuitsError
from rl_circuits.models.pairs import ROLES
from rl_circuits.pipeline.common import circuit_alphas, diff_alphas
from rl_circuits.store.layout import RunLayout
from rl_circuits.store.run import RunStore


def stage_analyze(cfg: RunConfig, store: RunStore, progress: bool = True) -> None:
    """Each metric before/after with paired bootstrap intervals, per pair x dataset x alpha."""
    analyze_cfg = cfg.analyze
    rows, entropy = [], {}
    skipped = {}
    for pair, dataset, alpha, before, after in finished_cells(cfg, store):
        if len(before.ids) < 2:  # diversity and the bootstrap need two questions
            skipped[f"{pair}|{dataset}|{alpha:g}"] = f"{len(before.ids)} question(s) left"
            continue
        mask = before.edge_mask.numpy() if analyze_cfg.edges == "valid" else None
        frame = compare(
            before.values.numpy(),
            after.values.numpy(),
            edge_mask=mask,
            metrics=_metrics(analyze_cfg.bins),
            n_resamples=analyze_cfg.n_resamples,
            seed=analyze_cfg.seed,
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
        store.write_json(RunLayout.CIRCUIT_CURVES, curves)
        if cfg.circuits.methods:
            ranked = Run(store.root, cfg, store).methods()
            store.write_text(RunLayout.METHOD_TABLE, method_markdown(ranked))
    if cfg.diff.enabled:
        diff_rows, summaries = _diff_summaries(cfg, store)
        rows += diff_rows
        store.write_json(RunLayout.DIFF_CURVES, summaries)
    if not rows:
        raise RLCircuitsError(
            "no attribution cell with at least two questions to analyze "
            f"(skipped: {skipped or 'none finished'}); run the attribute stage or select more"
        )
    store.write_json(RunLayout.SKIPPED_CELLS, skipped)
    store.write_jsonl(RunLayout.COMPARE, rows)
    store.write_json(RunLayout.OUTPUT_ENTROPY, entropy)
    table = with_empty_note(table1_from_rows(rows), skipped)
    store.write_text(RunLayout.TABLE1_MD, table.to_markdown())
    store.write_text(RunLayout.TABLE1_TEX, table.to_latex())
    store.mark_done("analyze", {"cells": len(rows)})


def empty_cells(cfg: RunConfig, store: RunStore) -> dict[str, str]:
    """ "pair|dataset|alpha" -> why, for each configured cell every question left (all were
    skipped by the attribute stage, or none was selected): shown in Table 1 and the report."""
    out = {}
    for pair in cfg.pairs.values():
        for dataset in cfg.run.datasets:
            for alpha in cfg.alphas:
                if any(
                    store.exists(RunLayout.scores(pair.name, role, dataset, alpha))
                    for role in ROLES
                ):
                    continue
                rel = RunLayout.skipped(pair.name, ROLES[0], dataset, alpha)
                if not store.exists(rel):
                    continue  # not attributed yet
                skipped = store.read_json(rel)
                reasons = sorted(set(skipped.values()))
                out[f"{pair.name}|{dataset}|{alpha:g}"] = (
                    f"no question left: all {len(skipped)} selected were skipped"
                    + (f" (e.g. {reasons[0]})" if reasons else "")
                    if skipped
                    else "no question was selected"
                )
    return out


def _circuit_comparisons(cfg: RunConfig, store: RunStore) -> tuple[list[dict], dict]:
    """Circuit-size rows for Table 1 and the faithfulness curves, per pair x dataset x alpha."""
    analyze_cfg, circuits_cfg = cfg.analyze, cfg.circuits
    rows, curves = [], {}
    for pair in cfg.pairs.values():
        for dataset in cfg.run.datasets:
            for alpha in circuit_alphas(cfg):
                files = [RunLayout.circuit(pair.name, role, dataset, alpha) for role in ROLES]
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
                    circuits_cfg.thresholds,
                    n_resamples=analyze_cfg.n_resamples,
                    seed=analyze_cfg.seed,
                )
                info = {"pair": pair.name, "algorithm": pair.algorithm, "dataset": dataset}
                rows += [_plain({**info, "alpha": alpha, **r}) for r in size_rows]
                scores = [
                    store.read_scores(RunLayout.scores(pair.name, role, dataset, alpha))
                    for role in ROLES
                ]
                key = (lambda v: v.abs()) if circuits_cfg.ranking == "abs" else (lambda v: v)
                band["overlap"] = overlap_curve(
                    key(scores[0].values.double()).mean(0).numpy(),
                    key(scores[1].values.double()).mean(0).numpy(),
                    scores[0].edge_mask.numpy(),
                    before["ks"],
                    circuits_cfg.ranking,
                )
                band["sizes"] = {r["metric"]: [r["before"], r["after"]] for r in size_rows}
                curves[f"{pair.name}|{dataset}|{alpha:g}"] = _plain_tree(band)
    return rows, curves


def _diff_summaries(cfg: RunConfig, store: RunStore) -> tuple[list[dict], dict]:
    """Table 1's "edges for 80% of the gap" rows (the count in the after column, with its
    bootstrap interval) and each diff cell's summary, per "pair|direction|dataset|alpha"."""
    analyze_cfg = cfg.analyze
    rows, summaries = [], {}
    for pair in cfg.pairs.values():
        for direction in cfg.diff.directions:
            for dataset in cfg.run.datasets:
                for alpha in diff_alphas(cfg):
                    rel = RunLayout.diff_curve(pair.name, direction, dataset, alpha)
                    if not store.exists(rel):
                        continue
                    cell = store.read_json(rel)
                    if len(cell["ids"]) < 2:
                        continue
                    summary = diff_summary(
                        np.asarray(cell["losses"]),
                        np.asarray(cell["clean"]),
                        np.asarray(cell["source"]),
                        cell["ks"],
                        n_resamples=analyze_cfg.n_resamples,
                        seed=analyze_cfg.seed,
                    )
                    summaries[f"{pair.name}|{direction}|{dataset}|{alpha:g}"] = _plain_tree(summary)
                    k, low, high, _ = summary["edges"][str(round(TABLE_THRESHOLD * 100))]
                    rows.append(
                        _plain(
                            {
                                "pair": pair.name,
                                "algorithm": pair.algorithm,
                                "dataset": dataset,
                                "alpha": alpha,
                                "metric": gap_metric(TABLE_THRESHOLD, direction),
                                "before": float("nan"),
                                "after": k,
                                "ci_low": low,
                                "ci_high": high,
                                "significant": False,
                                "n": summary["n"],
                                "n_resamples": analyze_cfg.n_resamples,
                                "ci": 0.95,
                            }
                        )
                    )
    return rows, summaries


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


def _plain(record: dict) -> dict:
    """JSON-ready values: numpy scalars as Python ones, NaN (an undefined metric) as null."""
    out = {}
    for key, value in record.items():
        value = value.item() if isinstance(value, np.generic) else value
        out[key] = None if isinstance(value, float) and not np.isfinite(value) else value
    return out
