"""Edge scores: the one type `attribute()` returns and a run directory stores and reads back.

`values[b, u, d]` scores the edge from upstream node u to downstream node d for each
sample. Scores from `attribute()` carry the samples' clean loss, graph, method and the
`sample_ids` given (else no ids); a run's stored scores carry question ids and `meta` (e.g. the
run's `t_cut`), and their loss, graph and method are whatever the file recorded (None where it
recorded none).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxtyping import Bool, Float

from rl_circuits.errors import DataError

if TYPE_CHECKING:
    import pandas as pd
    import torch


@dataclass(frozen=True, eq=False, repr=False)
class EdgeScores:
    """Per-sample edge scores with the hook names of their nodes.

    `loss` is each sample's clean loss; `ids` the samples' ids (question ids); `meta` any
    further JSON-able facts stored with them. Shapes are checked on construction.
    """

    values: Float[torch.Tensor, "batch n_upstream n_downstream"]
    upstream: Sequence[str]  # stored as a tuple
    downstream: Sequence[str]  # stored as a tuple
    edge_mask: Bool[torch.Tensor, "n_upstream n_downstream"]  # which (u, d) pairs are edges
    loss: Float[torch.Tensor, " batch"] | None = None
    graph: str | None = None
    method: str | None = None
    ids: Sequence[str] | None = None  # stored as a list
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import torch

        object.__setattr__(self, "upstream", _names(self.upstream, "upstream node names"))
        object.__setattr__(self, "downstream", _names(self.downstream, "downstream node names"))
        if self.ids is not None:
            object.__setattr__(self, "ids", list(_names(self.ids, "ids")))
        values, mask = self.values, self.edge_mask
        if not isinstance(values, torch.Tensor) or not values.is_floating_point():
            raise DataError(f"edge scores: values must be a float tensor, got {_describe(values)}")
        n = values.shape[0] if values.dim() == 3 else None
        want = (n, len(self.upstream), len(self.downstream))
        if values.dim() != 3 or tuple(values.shape[1:]) != want[1:]:
            raise DataError(
                f"edge scores: values have shape {tuple(values.shape)}, expected "
                f"(batch, {want[1]}, {want[2]}) (samples, upstream nodes, downstream nodes)"
            )
        if self.ids is not None and len(self.ids) != n:
            raise DataError(
                f"edge scores: values have shape {tuple(values.shape)} but there are "
                f"{len(self.ids)} ids (one per sample)"
            )
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise DataError(f"edge scores: edge_mask must be a bool tensor, got {_describe(mask)}")
        if tuple(mask.shape) != want[1:]:
            raise DataError(
                f"edge scores: edge_mask has shape {tuple(mask.shape)}, expected {want[1:]}"
            )
        if self.loss is not None and (
            not isinstance(self.loss, torch.Tensor) or tuple(self.loss.shape) != (n,)
        ):
            raise DataError(
                f"edge scores: loss must be a tensor of shape ({n},) (one per sample), got "
                f"{_describe(self.loss)} of shape {tuple(getattr(self.loss, 'shape', ()))}"
            )
        if not isinstance(self.meta, dict):
            raise DataError(f"edge scores: meta must be a dict, got {type(self.meta).__name__}")

    def sample_ids(self) -> list[str]:
        """The samples' ids (question ids), or their positions "0", "1", ... without ids."""
        if self.ids is not None:
            return list(self.ids)
        return [str(i) for i in range(self.values.shape[0])]

    def __repr__(self) -> str:
        shown = ""
        if self.ids is not None:
            first = ", ".join(repr(i) for i in self.ids[:2])
            shown = f", ids [{first}{', ...' if len(self.ids) > 2 else ''}]"
        return (
            f"{type(self).__name__}({self.values.shape[0]} samples x {len(self.upstream)} "
            f"upstream x {len(self.downstream)} downstream nodes, {int(self.edge_mask.sum())} "
            f"edges, graph {self.graph}, method {self.method}{shown})"
        )

    def index(self, name: str) -> int:
        """The position of node `name` among the upstream nodes, or else the downstream ones
        (no graph uses a name on both sides)."""
        for nodes in (self.upstream, self.downstream):
            if name in nodes:
                return nodes.index(name)
        near = [n for n in (*self.upstream, *self.downstream) if name.split(".")[-1] in n][:5]
        raise KeyError(
            f"node {name!r} is not in these scores ({len(self.upstream)} upstream, "
            f"{len(self.downstream)} downstream nodes)"
            + (f"; similar: {', '.join(near)}" if near else "")
        )

    def top_edges(self, k: numbers.Integral = 10) -> list[tuple[str, str, float]]:
        """The `k` edges with the largest |mean score| over samples, largest first, as
        (upstream, downstream, mean score)."""
        import torch

        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError(f"top_edges: k must be a whole number >= 0, got {k!r}")
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
        values = self.values[:, rows, cols].float().numpy()  # [batch, n_edges]
        n, n_edges = values.shape
        return pd.DataFrame(
            {
                "id": np.repeat(np.array(self.sample_ids(), dtype=object), n_edges),
                "upstream": np.tile(np.array(self.upstream, dtype=object)[rows.numpy()], n),
                "downstream": np.tile(np.array(self.downstream, dtype=object)[cols.numpy()], n),
                "score": values.reshape(-1),
            }
        )

    def to_eap_ig(
        self, path: str | Path, sample: int | str | None = None, *, d_model: int | None = None
    ) -> None:
        """Write EAP-IG's graph file (`.json` as its `Graph.to_json`, `.pt` as `to_pt`): the
        mean over samples, or one `sample` (position or id). Heads graph: EAP-IG's per-head
        nodes; paper graph: one node per layer's heads, summed (`rl_circuits.engine.eap_ig`).
        `d_model` (EAP-IG's cfg needs it) defaults to `meta["d_model"]`."""
        from rl_circuits.engine import eap_ig

        values = self._sample_values(sample)
        d_model = d_model if d_model is not None else self.meta.get("d_model")
        eap_ig.write(Path(path), values, self.upstream, self.downstream, self.edge_mask, d_model)

    def _sample_values(
        self, sample: int | str | None
    ) -> Float[torch.Tensor, "n_upstream n_downstream"]:
        """One sample's scores (by position or id), or the mean over samples (None)."""
        if sample is None:
            return self.values.double().mean(0)
        if isinstance(sample, str):
            ids = self.sample_ids()
            if sample not in ids:
                raise KeyError(f"no sample with id {sample!r} in these scores (ids: {ids[:5]})")
            return self.values[ids.index(sample)]
        n = self.values.shape[0]
        if isinstance(sample, bool) or not isinstance(sample, int) or not -n <= sample < n:
            raise IndexError(f"sample {sample!r} is out of range for {n} samples")
        return self.values[sample]

    @classmethod
    def from_eap_ig(cls, path: str | Path) -> EdgeScores:
        """An EAP-IG graph file (`Graph.to_json` / `to_pt`) as one sample's scores on the heads
        graph (or the paper graph, for a file `to_eap_ig` wrote from it)."""
        from rl_circuits.engine import eap_ig

        return cls(**eap_ig.read(Path(path)))


def _names(names: Sequence[str], what: str) -> tuple[str, ...]:
    """`names` as a tuple of distinct strings (a lookup key each), else DataError."""
    if isinstance(names, str):
        raise DataError(f"edge scores: {what} must be a sequence of strings, not one string")
    names = tuple(names)
    if not all(isinstance(n, str) for n in names):
        raise DataError(f"edge scores: {what} must all be strings")
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"edge scores: {what} contain duplicates: {twice[:5]}")
    return names


def _describe(obj: Any) -> str:
    dtype = getattr(obj, "dtype", None)
    return f"{type(obj).__name__} of dtype {dtype}" if dtype is not None else type(obj).__name__
