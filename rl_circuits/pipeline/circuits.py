"""The optional `circuits` stage: faithfulness curves of each model's own top-k circuits.

For every (pair, model, dataset, alpha) cell of the attribute stage, edges are ranked by the
model's mean score over the cell's questions (or, with `rank_by = "sample"`, each question by
its own scores); the top-k circuits on a log grid of k, plus the empty circuit, are run with
`evaluate_circuit` on the same tokens and loss positions that were attributed. One JSON file per
cell (`circuits/PAIR/ROLE/DATASET/alpha-A.json`) holds the per-question losses, so a killed
stage resumes at the first cell without one. With `methods`, each listed method is also ranked
on the cell's questions (`rl_circuits.analysis.method_ranking`: MIB's curve, CPR, CMD,
Spearman with exact): `methods/PAIR/ROLE/DATASET/alpha-A.json`.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from rl_circuits.analysis.method_ranking import rank_methods
from rl_circuits.config import RunConfig
from rl_circuits.engine.circuits import evaluate_circuit, log_grid, top_k_circuits
from rl_circuits.models.pairs import ROLES, PairModel
from rl_circuits.pipeline.common import by_id, circuit_alphas, load_for_scoring
from rl_circuits.store.layout import RunLayout
from rl_circuits.store.run import RunStore


def stage_circuits(cfg: RunConfig, store: RunStore, progress: bool = True) -> None:
    """Losses of every grid circuit per question; a no-op marked done when not enabled."""
    circuits_cfg = cfg.circuits
    if not circuits_cfg.enabled:
        store.mark_done("circuits", {"enabled": False})
        return
    for pair in cfg.pairs.values():
        for role in ROLES:
            member = PairModel(pair, role)
            cells = [
                (dataset, alpha)
                for dataset in cfg.run.datasets
                for alpha in circuit_alphas(cfg)
                if not store.exists(RunLayout.circuit(pair.name, role, dataset, alpha))
                or (
                    circuits_cfg.methods
                    and not store.exists(RunLayout.method_ranking(pair.name, role, dataset, alpha))
                )
            ]
            if not cells:
                continue
            work = []
            for dataset, alpha in cells:
                rel = RunLayout.scores(pair.name, role, dataset, alpha)
                if not store.exists(rel):  # every question of the cell was skipped
                    store.write_json(
                        RunLayout.circuit(pair.name, role, dataset, alpha), {"ids": []}
                    )
                    if circuits_cfg.methods:
                        store.write_json(
                            RunLayout.method_ranking(pair.name, role, dataset, alpha),
                            {"ids": [], "rows": []},
                        )
                    continue
                scores = store.read_scores(rel)
                gens = by_id(store.records(RunLayout.generations(member.key, dataset)).load())
                cut = int(scores.meta["t_cut"])
                # As attributed: the first T_cut answer tokens, or all of a shorter answer
                # (kept under the authors' rules), the loss over those answer tokens.
                answers = {qid: gens[qid]["answer_ids"][:cut] for qid in scores.ids}
                items = [
                    (qid, gens[qid]["prompt_ids"] + answers[qid], len(answers[qid]))
                    for qid in scores.ids
                ]
                work.append((dataset, alpha, scores, items))
            if not work:
                continue
            max_len = max(len(t) for *_, items in work for _, t, _ in items)
            model = load_for_scoring(cfg, member, max_len)
            for dataset, alpha, scores, items in work:
                desc = f"circuits {pair.name}/{role} {dataset} alpha={alpha:g}"
                rel = RunLayout.circuit(pair.name, role, dataset, alpha)
                if not store.exists(rel):
                    store.write_json(rel, _cell_losses(model, scores, items, cfg, desc, progress))
                rel = RunLayout.method_ranking(pair.name, role, dataset, alpha)
                if circuits_cfg.methods and not store.exists(rel):
                    store.write_json(rel, _cell_methods(model, scores, items, cfg, desc, progress))
            del model
    store.mark_done("circuits", {"enabled": True})


def _cell_methods(model, scores, items, cfg: RunConfig, desc: str, progress: bool) -> dict:
    """{ids, rows}: each of `[circuits] methods` ranked on the cell's questions (MIB's curve,
    CPR, CMD, Spearman with exact on `n_exact` edges; `rank_methods` at its default seed and
    resamples, so the stage depends on the circuits section alone)."""
    circuits_cfg, attribute_cfg = cfg.circuits, cfg.attribute
    if len(items) < 2:  # intervals and ratios of means need two questions
        return {"ids": list(scores.ids), "rows": [], "why": f"{len(items)} question(s)"}
    groups = [
        list(range(i, min(i + circuits_cfg.batch_size, len(items))))
        for i in range(0, len(items), circuits_cfg.batch_size)
    ]
    rows = rank_methods(
        model,
        [_tokens(items, group) for group in groups],
        circuits_cfg.methods,
        attribute_cfg.graph,
        ablation=circuits_cfg.ablation,
        ranking=circuits_cfg.ranking,
        n_exact=circuits_cfg.n_exact,
        ig_steps=attribute_cfg.ig_steps,
        efficient_attention=attribute_cfg.efficient_attention,
        desc=f"methods {desc.removeprefix('circuits ')}",
        progress=progress,
    )
    return {
        "ids": list(scores.ids),
        "rows": rows,
        "ranking": circuits_cfg.ranking,
        "ablation": circuits_cfg.ablation,
    }


def _tokens(items, group: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's questions right-padded into one batch, with their loss positions."""
    width = max(len(items[i][1]) for i in group)
    tokens = torch.zeros(len(group), width, dtype=torch.long)
    loss_mask = torch.zeros(len(group), width, dtype=torch.bool)
    for row, i in enumerate(group):
        _, toks, n_loss = items[i]
        tokens[row, : len(toks)] = torch.tensor(toks)
        loss_mask[row, len(toks) - n_loss : len(toks)] = True
    return tokens, loss_mask


def _cell_losses(model, scores, items, cfg: RunConfig, desc: str, progress: bool):
    """{ids, ks, losses [k][batch], none [batch], clean [batch]} of one cell; clean is the
    all-edge circuit."""
    circuits_cfg, attribute_cfg = cfg.circuits, cfg.attribute
    mask = scores.edge_mask.numpy()
    values = scores.values.double().numpy()
    ks = log_grid(int(mask.sum()), circuits_cfg.points)
    key = np.abs(values) if circuits_cfg.ranking == "abs" else values
    if circuits_cfg.rank_by == "mean":
        shared = torch.from_numpy(top_k_circuits(key.mean(0), mask, ks, circuits_cfg.ranking))
        groups = [
            list(range(i, min(i + circuits_cfg.batch_size, len(items))))
            for i in range(0, len(items), circuits_cfg.batch_size)
        ]
    else:
        groups = [[i] for i in range(len(items))]
    empty = torch.zeros((1, *mask.shape), dtype=torch.bool)
    losses = np.zeros((len(ks) + 1, len(items)))
    with tqdm(total=len(items), desc=desc, disable=not progress) as bar:
        for group in groups:
            if circuits_cfg.rank_by == "mean":
                circuits = shared
            else:
                circuits = torch.from_numpy(
                    top_k_circuits(key[group[0]], mask, ks, circuits_cfg.ranking)
                )
            tokens, loss_mask = _tokens(items, group)
            out = evaluate_circuit(
                model,
                tokens,
                loss_mask,
                torch.cat([empty, circuits]),
                graph=attribute_cfg.graph,
                ablation=circuits_cfg.ablation,
                efficient_attention=attribute_cfg.efficient_attention,
            )
            losses[:, group] = out.double().numpy()
            bar.update(len(group))
    return {
        "ids": list(scores.ids),
        "ks": ks,
        "losses": losses[1:].tolist(),
        "none": losses[0].tolist(),
        "clean": losses[-1].tolist(),
        "ranking": circuits_cfg.ranking,
        "rank_by": circuits_cfg.rank_by,
        "ablation": circuits_cfg.ablation,
        "graph": attribute_cfg.graph,
    }
