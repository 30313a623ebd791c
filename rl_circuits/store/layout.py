"""Where everything lives in a run directory: one place that names every path, and a shard.

Why: the pipeline writes these paths, the reader (`rl_circuits.load_run`) and the integrity
checks read and delete them, and a run written by one version must load in the next; naming
each path once keeps them from drifting apart. All paths are relative to the run's root, as
`RunStore` takes them.
"""

from __future__ import annotations

from typing import Any

from rl_circuits.errors import StoreError


class RunLayout:
    """Every path of a run directory, relative to its root (paths are POSIX strings)::

        .lock                                   pid and host of the lock holder (RunStore)
        config.json                             the resolved config (RunStore)
        manifest.json                           versions, times, config hash, dataset hashes
        stages/<stage>.json                     completion markers, written last
        <records>/chunks/[s<i>-]<n>.jsonl       record chunks of an unfinished record table
        <records>/records.jsonl                 its finalised records
        datasets/<dataset>.jsonl                {id, question, gold} per question
        generate/<model>/<dataset>/             records: prompt, answer and token ids
        grade/<model>/<dataset>/                records: extracted answer, gold, verdict
        select/<pair>/<dataset>.json            the selection: ids, T_cut per alpha, report
        attribute/<pair>/<role>/<dataset>/alpha-<a>/
            q/<id>.safetensors                  one question's edge scores (resumable)
            skipped.json                        {id: why} questions left out of the cell
            scores.safetensors                  the merged scores, in selection order
        circuits/<pair>/<role>/<dataset>/alpha-<a>.json   per-question circuit losses
        diff/<pair>/<direction>/<dataset>/alpha-<a>/
            q/<id>.safetensors                  one question's cross-model patching scores
            losses/<id>.json                    its losses along the diff circuit curve
            scores.safetensors                  the merged scores, in selection order
            curve.json                          the merged losses: ids, ks, per-question losses
        weights/<pair>.json                     each node's parameter update (weights stage)
        methods/<pair>/<role>/<dataset>/alpha-<a>.json    each method's MIB curve, CPR, CMD
        analysis/compare.jsonl                  metric comparisons (Table 1 rows)
        analysis/output_entropy.json            output-edge entropy per cell
        analysis/skipped_cells.json             "pair|dataset|alpha" -> why it has no rows
        analysis/circuits.json                  faithfulness curves per cell
        analysis/diff.json                      diff circuit curves and edge counts per cell
        analysis/methods.md                     the method table (CPR, CMD, Spearman)
        analysis/table1.md, analysis/table1.tex Table 1
        report/report.html, report/png/<name>   the report and its figures
        report/graphs/<pair>-<role>-<dataset>-alpha-<a>.html   a cell's top edges, drawn

    `<model>` is `PairModel.key` (pairs sharing a model share its answers), `<role>` is
    "before" or "after", `<direction>` one of `models.pairs.DIRECTIONS`, `<a>` an alpha as
    `format(a, "g")`.
    """

    LOCK = ".lock"
    CONFIG = "config.json"
    MANIFEST = "manifest.json"
    MARKERS = "stages"
    DATASETS = "datasets"
    ANALYSIS = "analysis"
    COMPARE = "analysis/compare.jsonl"
    OUTPUT_ENTROPY = "analysis/output_entropy.json"
    SKIPPED_CELLS = "analysis/skipped_cells.json"
    CIRCUIT_CURVES = "analysis/circuits.json"
    DIFF_CURVES = "analysis/diff.json"
    METHOD_TABLE = "analysis/methods.md"
    TABLE1_MD = "analysis/table1.md"
    TABLE1_TEX = "analysis/table1.tex"
    REPORT = "report"
    REPORT_HTML = "report/report.html"

    # ---- the store's own files

    @staticmethod
    def marker(stage: str) -> str:
        """The completion marker of a stage (or of a record table)."""
        return f"{RunLayout.MARKERS}/{stage}.json"

    @staticmethod
    def record_chunks(records: str) -> str:
        """The folder of a record table's chunks."""
        return f"{records}/chunks"

    @staticmethod
    def record_chunk(records: str, shard: int | None, number: int) -> str:
        """Chunk `number` of a record table, in shard worker `shard`'s namespace (None: the
        single writer's)."""
        prefix = "" if shard is None else f"s{shard:04d}-"
        return f"{records}/chunks/{prefix}{number:05d}.jsonl"

    @staticmethod
    def records_file(records: str) -> str:
        """A record table's finalised records."""
        return f"{records}/records.jsonl"

    # ---- the stages' outputs

    @staticmethod
    def dataset(name: str) -> str:
        return f"{RunLayout.DATASETS}/{name}.jsonl"

    @staticmethod
    def generations(model: str, dataset: str) -> str:
        """The record table of one model's answers (`model`: a `PairModel.key`)."""
        return f"generate/{model}/{dataset}"

    @staticmethod
    def grades(model: str, dataset: str) -> str:
        """The record table of one model's graded answers."""
        return f"grade/{model}/{dataset}"

    @staticmethod
    def selection(pair: str, dataset: str) -> str:
        return f"select/{pair}/{dataset}.json"

    @staticmethod
    def attribution(pair: str, role: str, dataset: str, alpha: float) -> str:
        """The folder of one attribution cell (pair x model x dataset x alpha)."""
        return f"attribute/{pair}/{role}/{dataset}/alpha-{alpha:g}"

    @staticmethod
    def question_scores(pair: str, role: str, dataset: str, alpha: float, qid: str) -> str:
        """One question's edge scores in its attribution cell."""
        return f"{RunLayout.attribution(pair, role, dataset, alpha)}/q/{qid}.safetensors"

    @staticmethod
    def skipped(pair: str, role: str, dataset: str, alpha: float) -> str:
        """The questions an attribution cell leaves out, and why."""
        return f"{RunLayout.attribution(pair, role, dataset, alpha)}/skipped.json"

    @staticmethod
    def scores(pair: str, role: str, dataset: str, alpha: float) -> str:
        """An attribution cell's merged scores."""
        return f"{RunLayout.attribution(pair, role, dataset, alpha)}/scores.safetensors"

    @staticmethod
    def circuit(pair: str, role: str, dataset: str, alpha: float) -> str:
        """The circuits stage's per-question losses of one cell."""
        return f"circuits/{pair}/{role}/{dataset}/alpha-{alpha:g}.json"

    @staticmethod
    def diff(pair: str, direction: str, dataset: str, alpha: float) -> str:
        """The folder of one diff cell (pair x direction x dataset x alpha)."""
        return f"diff/{pair}/{direction}/{dataset}/alpha-{alpha:g}"

    @staticmethod
    def diff_question_scores(
        pair: str, direction: str, dataset: str, alpha: float, qid: str
    ) -> str:
        """One question's cross-model patching scores in its diff cell."""
        return f"{RunLayout.diff(pair, direction, dataset, alpha)}/q/{qid}.safetensors"

    @staticmethod
    def diff_question_losses(
        pair: str, direction: str, dataset: str, alpha: float, qid: str
    ) -> str:
        """One question's losses along its diff cell's circuit curve."""
        return f"{RunLayout.diff(pair, direction, dataset, alpha)}/losses/{qid}.json"

    @staticmethod
    def diff_scores(pair: str, direction: str, dataset: str, alpha: float) -> str:
        """A diff cell's merged scores."""
        return f"{RunLayout.diff(pair, direction, dataset, alpha)}/scores.safetensors"

    @staticmethod
    def diff_curve(pair: str, direction: str, dataset: str, alpha: float) -> str:
        """A diff cell's merged per-question losses (written last: the cell is done)."""
        return f"{RunLayout.diff(pair, direction, dataset, alpha)}/curve.json"

    @staticmethod
    def weights(pair: str) -> str:
        """The weights stage's per-node parameter update of one pair."""
        return f"weights/{pair}.json"

    @staticmethod
    def method_ranking(pair: str, role: str, dataset: str, alpha: float) -> str:
        """The circuits stage's method ranking of one cell (`[circuits] methods`)."""
        return f"methods/{pair}/{role}/{dataset}/alpha-{alpha:g}.json"

    @staticmethod
    def report_png(name: str) -> str:
        return f"{RunLayout.REPORT}/png/{name}"

    @staticmethod
    def graph_view(pair: str, role: str, dataset: str, alpha: float) -> str:
        """The offline viewer page of one cell's top edges, linked from the report."""
        return f"{RunLayout.REPORT}/graphs/{pair}-{role}-{dataset}-alpha-{alpha:g}.html"


def check_shard(
    shard: Any, *, what: str = "shard", error: type[Exception] = StoreError
) -> tuple[int, int]:
    """`shard` as (i, n), integers with 0 <= i < n: shard worker i of n processes every n-th
    unit of work from i. Anything else raises `error` naming `what` (the caller's word)."""
    try:
        index, count = shard
    except (TypeError, ValueError):
        raise error(f"{what} must be a pair (i, n), got {shard!r}") from None
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (index, count))
    if not ints or not 0 <= index < count:
        raise error(f"{what} {shard!r} is out of range: need integers 0 <= i < n, e.g. (0, 4)")
    return index, count
