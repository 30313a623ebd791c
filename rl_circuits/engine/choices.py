"""The names of the engine's options: graphs, rankings, edge sets (methods, ablations: `methods`).

Why here and not beside their code: run configs check these names when they are validated,
and validation must not import torch or TransformerLens (seconds) for a typo's message. The
engine modules import their options from here.
"""

from __future__ import annotations

GRAPHS: tuple[str, ...] = ("paper", "block", "residual", "heads")
# Which entries of an [n_upstream, n_downstream] score matrix a statistic reads: every one,
# zeros of non-edges included, as the paper's equations read ("all"), or the graph's edges
# (`Graph.edge_mask`, "valid").
EDGE_SETS: tuple[str, ...] = ("all", "valid")
RANKINGS: tuple[str, ...] = ("abs", "signed")
# Which scores rank the edges of a question's circuits: their mean over the questions (one
# ranking for all), or that question's own ("sample").
RANK_BY: tuple[str, ...] = ("mean", "sample")
