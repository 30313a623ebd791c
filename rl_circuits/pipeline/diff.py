"""The optional `diff` stage: cross-model patching, where post-training changed the circuit.

For each pair, direction (`models.pairs.DIRECTIONS`), dataset and alpha in `diff.alphas`: in
"A_into_B" model B runs on model A's answer (the tokens and loss positions the attribute
stage used for A) and every edge is scored for taking A's upstream output
(`attribute(..., ablation="patch", corrupted_model=A)`); then, with edges ranked by mean |score|
over the cell, B runs with its top-k edges on a log grid carrying A's outputs
(`evaluate_circuit`), and A runs alone for L_A(x). Questions run in fixed batches of
`diff.batch_size` (sorted by length, as the attribute stage), and each question's scores and
losses are files of their own, so a killed stage resumes at the first batch with a file
missing; a cell's merged `curve.json` is written last. `rl_circuits.analysis.diff` turns the
losses into the diff circuit curve.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from tqdm.auto import tqdm

from rl_circuits.config import RunConfig
from rl_circuits.data.selection import Selection
from rl_circuits.engine.attribution import attribute
from rl_circuits.engine.circuits import evaluate_circuit, log_grid, top_k_circuits
from rl_circuits.errors import NumericalError, StoreError
from rl_circuits.models.pairs import ROLES, Pair, PairModel, direction_roles
from rl_circuits.pipeline.common import by_id, diff_alphas, load_for_scoring
from rl_circuits.store.layout import RunLayout
from rl_circuits.store.run import RunStore


def stage_diff(cfg: RunConfig, store: RunStore, progress: bool = True) -> None:
    """Cross-model scores and diff circuit losses per question; a no-op marked done when not
    enabled."""
    if not cfg.diff.enabled:
        store.mark_done("diff", {"enabled": False})
        return
    for pair in cfg.pairs.values():
        work = []
        for direction in cfg.diff.directions:
            for dataset in cfg.run.datasets:
                for alpha in diff_alphas(cfg):
                    if store.exists(RunLayout.diff_curve(pair.name, direction, dataset, alpha)):
                        continue
                    items = _items(cfg, store, pair, direction, dataset, alpha)
                    if items:
                        work.append((direction, dataset, alpha, items))
                    else:  # every question of the cell was skipped
                        rel = RunLayout.diff_curve(pair.name, direction, dataset, alpha)
                        store.write_json(rel, {"ids": []})
        if not work:
            continue
        max_len = max(len(t) for *_, items in work for _, t, _ in items)
        models = {role: load_for_scoring(cfg, PairModel(pair, role), max_len) for role in ROLES}
        for direction, dataset, alpha, items in work:
            runs, reads = direction_roles(direction)
            cell = (pair.name, direction, dataset, alpha)
            desc = f"diff {pair.name} {direction} {dataset} alpha={alpha:g}"
            _score(cfg, store, cell, models[runs], models[reads], items, desc, progress)
            _curve(cfg, store, cell, models[runs], models[reads], items, desc, progress)
        del models
    store.mark_done("diff", {"enabled": True})


def _items(cfg: RunConfig, store: RunStore, pair: Pair, direction: str, dataset: str, alpha):
    """[(id, tokens, number of loss tokens)] of a cell: the answers of the model being read,
    as the attribute stage scored them (its skipped questions left out), in selection order."""
    _, reads = direction_roles(direction)
    skipped_rel = RunLayout.skipped(pair.name, reads, dataset, alpha)
    if not store.exists(skipped_rel):
        raise StoreError(
            f"{store.label(skipped_rel)} is missing: the diff stage reads the questions the "
            "attribute stage scored; run `rl-circuits attribute CONFIG` first"
        )
    skipped = store.read_json(skipped_rel)
    selection = Selection.from_dict(store.read_json(RunLayout.selection(pair.name, dataset)))
    cut = selection.t_cut[alpha]
    gens = by_id(store.records(RunLayout.generations(PairModel(pair, reads).key, dataset)).load())
    items = []
    for qid in selection.ids:
        if qid not in skipped:
            answer = gens[qid]["answer_ids"][:cut]
            items.append((qid, gens[qid]["prompt_ids"] + answer, len(answer)))
    return items


def _batches(items: list, size: int) -> list[list]:
    """A cell's questions sorted by length in fixed batches of `size`: every run groups them
    alike, so a resumed question gets the numbers it would have had (as the attribute stage)."""
    ordered = sorted(items, key=lambda item: len(item[1]))  # stable: ties keep selection order
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def _padded(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens of a batch and the mask of each question's loss tokens."""
    width = max(len(t) for _, t, _ in batch)
    tokens = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.bool)
    for row, (_, toks, n_loss) in enumerate(batch):
        tokens[row, : len(toks)] = torch.tensor(toks)
        mask[row, len(toks) - n_loss : len(toks)] = True
    return tokens, mask


def _pending(store: RunStore, items: list, size: int, where, desc: str, progress: bool):
    """The batches (of `size`) with a question whose file `where(qid)` is missing, computed
    whole, under one progress bar that starts at the questions already done (resume)."""
    batches = _batches(items, size)
    todo = [b for b in batches if not all(store.exists(where(qid)) for qid, _, _ in b)]
    left = sum(map(len, todo))
    with tqdm(total=len(items), initial=len(items) - left, desc=desc, disable=not progress) as bar:
        for batch in todo:
            yield batch
            bar.update(len(batch))


def _score(cfg: RunConfig, store: RunStore, cell, model, source, items, desc, progress) -> None:
    """Each question's cross-model scores, then the cell's merged scores file."""
    d = cfg.diff
    pair, direction, dataset, alpha = cell
    merged = RunLayout.diff_scores(*cell)
    if store.exists(merged):
        return

    def where(qid: str) -> str:
        return RunLayout.diff_question_scores(*cell, qid)

    for batch in _pending(store, items, d.batch_size, where, f"{desc} scores", progress):
        tokens, mask = _padded(batch)
        try:
            scores = attribute(
                model,
                tokens,
                mask,
                graph=d.graph,
                method=d.method,
                ablation="patch",
                corrupted_model=source,
                ig_steps=cfg.attribute.ig_steps,
                sample_ids=[f"question {qid} of {dataset}" for qid, _, _ in batch],
                efficient_attention=cfg.attribute.efficient_attention,
            )
        except NumericalError as exc:
            raise NumericalError(f"diff stage ({direction}): {exc}") from exc
        for row, (qid, _, n_loss) in enumerate(batch):
            if not store.exists(where(qid)):  # same batch as before: the same bytes
                one = slice(row, row + 1)
                question_scores = replace(
                    scores,
                    values=scores.values[one],
                    loss=scores.loss[one],
                    ids=[qid],
                    meta={"t_cut": n_loss},
                )
                store.write_scores(where(qid), question_scores)
    cut = Selection.from_dict(store.read_json(RunLayout.selection(pair, dataset))).t_cut[alpha]
    order = [qid for qid, _, _ in items]
    files = [where(qid) for qid in order]
    store.merge_scores(files, merged, order, meta={"t_cut": cut, "direction": direction})


def _curve(cfg: RunConfig, store: RunStore, cell, model, source, items, desc, progress) -> None:
    """Each question's losses along the diff circuit curve, then the cell's curve.json.

    Circuits keep the model's own outputs: [every edge, every edge but the top k for each k];
    the last k is every edge, so its loss is the fully patched run's.
    """
    d = cfg.diff
    scores = store.read_scores(RunLayout.diff_scores(*cell))
    mask = scores.edge_mask.numpy()
    ks = log_grid(int(mask.sum()), d.points)
    top = top_k_circuits(scores.values.double().abs().mean(0).numpy(), mask, ks, "abs")
    every = torch.ones((1, *mask.shape), dtype=torch.bool)
    circuits = torch.cat([every, torch.from_numpy(~top)])

    def where(qid: str) -> str:
        return RunLayout.diff_question_losses(*cell, qid)

    for batch in _pending(store, items, d.batch_size, where, f"{desc} curve", progress):
        tokens, loss_mask = _padded(batch)
        out = evaluate_circuit(
            model,
            tokens,
            loss_mask,
            circuits,
            graph=d.graph,
            ablation="patch",
            corrupted_model=source,
            efficient_attention=cfg.attribute.efficient_attention,
        ).double()  # [k + 1, batch]
        own = evaluate_circuit(
            source,
            tokens,
            loss_mask,
            every[0],
            graph=d.graph,
            efficient_attention=cfg.attribute.efficient_attention,
        ).double()  # [batch]
        for row, (qid, _, _) in enumerate(batch):
            if not store.exists(where(qid)):
                losses = out[:, row].tolist()
                record = {"clean": losses[0], "losses": losses[1:], "source": own[row].item()}
                store.write_json(where(qid), record)
    per_question = [store.read_json(where(qid)) for qid, _, _ in items]
    losses = np.array([q["losses"] for q in per_question]).T  # [k, batch]
    store.write_json(
        RunLayout.diff_curve(*cell),
        {
            "ids": [qid for qid, _, _ in items],
            "ks": ks,
            "losses": losses.tolist(),
            "clean": [q["clean"] for q in per_question],
            "source": [q["source"] for q in per_question],
            "patched": losses[-1].tolist(),
            "direction": cell[1],
            "graph": d.graph,
            "method": d.method,
        },
    )
