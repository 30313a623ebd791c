"""The report stage: one self-contained HTML file with Table 1 and every figure."""

from __future__ import annotations

from pathlib import Path

from rl_circuits.analysis.graph_view import cell_graph, viewer_html
from rl_circuits.analysis.reader import Run, accuracy_table
from rl_circuits.analysis.report import png_images, render_report
from rl_circuits.config import RunConfig
from rl_circuits.models.pairs import ROLES
from rl_circuits.store.layout import RunLayout
from rl_circuits.store.run import RunStore

GRAPH_TOP = 30  # edges drawn per cell in the report's graph viewers


def stage_report(cfg: RunConfig, store: RunStore, progress: bool = True) -> Path:
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
        tables=_diff_tables(run),
        links=_graph_views(run, cfg, store),
        methods=run.methods(),
    )
    path = store.write_text(RunLayout.REPORT_HTML, html)
    for name, image in png_images(figures).items():
        store.write_bytes(RunLayout.report_png(name), image)
    store.mark_done("report", {"path": RunLayout.REPORT_HTML})
    print(f"report: {path}")
    return path


def _diff_tables(run: Run) -> dict:
    """The edges that carry the change most, per diff cell with a summary."""
    if not run.store.exists(RunLayout.DIFF_CURVES):
        return {}
    tables = {}
    for key in run.diff():
        pair, direction, dataset, alpha = key.split("|")
        heading = f"Edges that carry the change: {pair}, {direction}, {dataset}, alpha={alpha}"
        tables[heading] = run.diff_edges(pair, direction, dataset, float(alpha))
    return tables


def _graph_views(run: Run, cfg: RunConfig, store: RunStore) -> dict[str, str]:
    """Write a viewer page of the top edges of each pair, role and dataset at the largest
    alpha; label -> its href relative to the report."""
    alpha = max(cfg.alphas)
    links = {}
    for pair in cfg.pairs:
        for dataset in cfg.run.datasets:
            for role in ROLES:
                if not store.exists(RunLayout.scores(pair, role, dataset, alpha)):
                    continue
                rel = RunLayout.graph_view(pair, role, dataset, alpha)
                graph = cell_graph(
                    run, pair, role, alpha, GRAPH_TOP, Path(rel).stem, dataset=dataset
                )
                store.write_text(rel, viewer_html(graph))
                links[f"{pair}, {role}, {dataset}, alpha={alpha:g}"] = str(
                    Path(rel).relative_to(RunLayout.REPORT)
                )
    return links


def _notes(cfg: RunConfig) -> str:
    analyze_cfg = cfg.analyze
    return (
        f"Metrics over {analyze_cfg.edges} entries of each edge matrix; graph {cfg.attribute.graph}"
        f", method {cfg.attribute.method}. Intervals: paired bootstrap over questions "
        f"({analyze_cfg.n_resamples} resamples, 95%); p: paired permutation test; Info. Complex. "
        f"with {analyze_cfg.bins} bins. Grader {cfg.grade.grader}, selection rules "
        f"{cfg.select.rules} (reference {cfg.select.reference}, window "
        f"{cfg.select.window}, subset {cfg.select.subset}), end token "
        f"{cfg.generate.end_token}. "
        "↑/↓/→ direction of the change after post-training (→: none), * interval excludes 0."
        + (
            f" Diff: cross-model patching scores (method {cfg.diff.method}, graph "
            f"{cfg.diff.graph}), the first-order loss change when an edge takes the other "
            "model's output; the gap is the running model's loss minus the other's on the "
            "other's answer."
            if cfg.diff.enabled
            else ""
        )
    )
