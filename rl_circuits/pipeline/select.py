"""The select stage: per pair and dataset, the questions both models got right, filtered and
sampled (`rl_circuits.data.selection`), with T_cut per alpha."""

from __future__ import annotations

import sys

from rl_circuits.config import RunConfig
from rl_circuits.data.selection import select
from rl_circuits.errors import RLCircuitsError
from rl_circuits.models.pairs import ROLES, PairModel
from rl_circuits.pipeline.common import by_id, questions
from rl_circuits.store.layout import RunLayout
from rl_circuits.store.run import RunStore


def stage_select(cfg: RunConfig, store: RunStore, progress: bool = True) -> None:
    """Per pair and dataset: the questions both models got right, filtered and sampled."""
    s = cfg.select
    for pair in cfg.pairs.values():
        keys = {role: PairModel(pair, role).key for role in ROLES}
        for dataset in cfg.run.datasets:
            rel = RunLayout.selection(pair.name, dataset)
            if store.exists(rel):
                continue
            gens = {
                r: by_id(store.records(RunLayout.generations(k, dataset)).load())
                for r, k in keys.items()
            }
            grades = {
                r: by_id(store.records(RunLayout.grades(k, dataset)).load())
                for r, k in keys.items()
            }
            rows = [
                {
                    "id": q["id"],
                    "prompt_len_before": len(gens["before"][q["id"]]["prompt_ids"]),
                    "prompt_len_after": len(gens["after"][q["id"]]["prompt_ids"]),
                    "len_before": len(gens["before"][q["id"]]["answer_ids"]),
                    "len_after": len(gens["after"][q["id"]]["answer_ids"]),
                    "correct_before": grades["before"][q["id"]]["verdict"] == "correct",
                    "correct_after": grades["after"][q["id"]]["verdict"] == "correct",
                }
                for q in questions(store, dataset)
            ]
            try:
                selection = select(
                    rows,
                    n=s.n,
                    seed=s.seed,
                    beta=s.beta,
                    gamma=s.gamma,
                    delta=s.delta,
                    reference=None if s.reference == "preset" else s.reference,
                    window=None if s.window == "preset" else s.window,
                    alphas=cfg.alphas,
                    rules=s.rules,
                    subset=s.subset,
                )
            except RLCircuitsError as exc:
                raise type(exc)(f"pair {pair.name}, dataset {dataset}: {exc}") from exc
            store.write_json(rel, selection.to_dict())
            if selection.shortfall:
                print(
                    f"warning: pair {pair.name}, dataset {dataset}: {selection.shortfall}",
                    file=sys.stderr,
                )
    store.mark_done("select", {})
