"""What both score types offer: `attribute()`'s `EdgeScores` and a run's stored `Scores`.

A short repr, node name -> index lookup, the top edges by |mean score| and a tidy DataFrame,
written once here and mixed into both dataclasses (which need `values`, `upstream`,
`downstream` and `edge_mask`; `ids`, `graph`/`method` or `meta` are used when present).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


class ScoreView:
    """Mixin for per-sample edge scores `values[sample, upstream, downstream]`."""

    def sample_ids(self) -> list[str]:
        """The samples' ids (question ids), or their positions "0", "1", ... without ids."""
        ids = getattr(self, "ids", None)
        if ids is not None:
            return [str(i) for i in ids]
        return [str(i) for i in range(self.values.shape[0])]

    def _labels(self) -> tuple[str | None, str | None]:
        meta = getattr(self, "meta", None) or {}
        graph = getattr(self, "graph", None) or meta.get("graph")
        method = getattr(self, "method", None) or meta.get("method")
        return graph, method

    def __repr__(self) -> str:
        n = self.values.shape[0]
        graph, method = self._labels()
        ids = getattr(self, "ids", None)
        shown = ""
        if ids is not None:
            first = ", ".join(repr(str(i)) for i in list(ids)[:2])
            shown = f", ids [{first}{', ...' if len(ids) > 2 else ''}]"
        return (
            f"{type(self).__name__}({n} samples x {len(self.upstream)} upstream x "
            f"{len(self.downstream)} downstream nodes, {int(self.edge_mask.sum())} edges, "
            f"graph {graph}, method {method}{shown})"
        )

    def index(self, name: str) -> int:
        """The position of node `name` among the upstream nodes, or else the downstream ones
        (no graph uses a name on both sides)."""
        for nodes in (self.upstream, self.downstream):
            if name in nodes:
                return list(nodes).index(name)
        near = [n for n in (*self.upstream, *self.downstream) if name.split(".")[-1] in n][:5]
        raise KeyError(
            f"node {name!r} is not in these scores ({len(self.upstream)} upstream, "
            f"{len(self.downstream)} downstream nodes)"
            + (f"; similar: {', '.join(near)}" if near else "")
        )

    def top_edges(self, k: int = 10) -> list[tuple[str, str, float]]:
        """The `k` edges with the largest |mean score| over samples, largest first, as
        (upstream, downstream, mean score)."""
        import torch

        if k < 0:
            raise ValueError(f"top_edges: k must be >= 0, got {k}")
        mean = self.values.to(torch.float64).mean(0)
        rows, cols = self.edge_mask.nonzero(as_tuple=True)
        edge_means = mean[rows, cols]
        order = torch.argsort(edge_means.abs(), descending=True, stable=True)[:k]
        return [
            (self.upstream[rows[i]], self.downstream[cols[i]], float(edge_means[i]))
            for i in order.tolist()
        ]

    def to_frame(self) -> pd.DataFrame:
        """One row per sample x existing edge: columns id, upstream, downstream, score."""
        import numpy as np
        import pandas as pd

        rows, cols = self.edge_mask.nonzero(as_tuple=True)
        values = self.values[:, rows, cols].float().numpy()  # [n, n_edges]
        n, n_edges = values.shape
        return pd.DataFrame(
            {
                "id": np.repeat(np.array(self.sample_ids(), dtype=object), n_edges),
                "upstream": np.tile(np.array(self.upstream, dtype=object)[rows.numpy()], n),
                "downstream": np.tile(np.array(self.downstream, dtype=object)[cols.numpy()], n),
                "score": values.reshape(-1),
            }
        )
