"""The report stage: one self-contained HTML file with Table 1 and every figure."""

from __future__ import annotations

from pathlib import Path

from rl_circuits.analysis.reader import Run, accuracy_table
from rl_circuits.analysis.report import png_images, render_report
from rl_circuits.config import RunConfig
from rl_circuits.store.layout import RunLayout
from rl_circuits.store.run import RunStore


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
        methods=run.methods(),
    )
    path = store.write_text(RunLayout.REPORT_HTML, html)
    for name, image in png_images(figures).items():
        store.write_bytes(RunLayout.report_png(name), image)
    store.mark_done("report", {"path": RunLayout.REPORT_HTML})
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
