"""The `weights` stage: each node's parameter update between a pair's two checkpoints.

No forward pass: `rl_circuits.models.weight_diff` streams both checkpoints tensor by tensor, so
the stage costs about one read of each model and is on by default. One JSON file per pair
(`weights/PAIR.json`): the whole-model totals and one row per node of the attribute stage's
graph (the report joins them with the edge scores), so a killed stage resumes at the next pair.
A pair whose checkpoints cannot be compared (two architectures, pickle-only weights) gets the
reason in its file instead, and the report goes on without it.
"""

from __future__ import annotations

import sys

from rl_circuits.config import RunConfig
from rl_circuits.errors import CheckpointError
from rl_circuits.models.pairs import ROLES, PairModel
from rl_circuits.store.layout import RunLayout
from rl_circuits.store.run import RunStore


def stage_weights(cfg: RunConfig, store: RunStore, progress: bool = True) -> None:
    """One table per pair; a no-op marked done when not enabled."""
    from rl_circuits.models.weight_diff import weight_diff

    w = cfg.weights
    if not w.enabled:
        store.mark_done("weights", {"enabled": False})
        return
    for pair in cfg.pairs.values():
        rel = RunLayout.weights(pair.name)
        if store.exists(rel) and "skipped" not in store.read_json(rel):
            continue  # done; a skipped pair is tried again (a download may have failed)
        before, after = (PairModel(pair, role) for role in ROLES)
        try:
            frame = weight_diff(
                before.path,
                after.path,
                graph=cfg.attribute.graph,
                tol=w.tol,
                dtype=w.dtype,
                rank_rows=w.rank_rows,
                seed=w.seed,
                revisions=(before.revision, after.revision),
                progress=progress,
            )
        except CheckpointError as exc:  # e.g. two architectures: the rest of the run stands
            store.write_json(rel, {"before": before.path, "after": after.path, "skipped": str(exc)})
            print(f"warning: weights {pair.name}: no table: {exc}", file=sys.stderr)
            continue
        store.write_json(
            rel,
            {
                "before": before.path,
                "after": after.path,
                "model": frame.attrs["model"],
                "nodes": frame.reset_index().to_dict(orient="records"),
            },
        )
        model = frame.attrs["model"]
        print(
            f"weights {pair.name}: {model['fraction_changed']:.1%} of {model['n_params']:,} "
            f"parameters changed at {model['dtype']} (|diff| > {model['tol']:g})"
        )
    store.mark_done("weights", {"enabled": True})
