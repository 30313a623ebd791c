"""The attribute stage: edge scores of each model on its own first T_cut answer tokens.

One file per question (so a killed run resumes), merged per cell in selection order. A cell's
questions, sorted by length, form fixed batches of `attribute.batch_size`, so each question's
scores come from the same batch on every run and in every shard (`shard=(i, n)`: every n-th
batch from i); `merge_attribute` merges the cells once every shard's files are there.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from rl_circuits.config import AttributeSection, RunConfig
from rl_circuits.data.selection import Selection
from rl_circuits.errors import NumericalError, RLCircuitsError, StoreError
from rl_circuits.models.pairs import ROLES, PairModel
from rl_circuits.pipeline.common import by_id, in_shard, load_for_scoring, shard_of
from rl_circuits.store.layout import RunLayout
from rl_circuits.store.run import RunStore


def stage_attribute(
    cfg: RunConfig,
    store: RunStore,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> None:
    """Edge scores of each model on its own first T_cut answer tokens (paper Eq. 13).

    One file per question (so a killed run resumes), merged in selection order when all exist.
    A cell's questions, sorted by length, form fixed batches of `attribute.batch_size`; a batch
    with any file missing is computed whole, so each question's scores come from the same
    batch on every run. `shard=(i, n)` processes every n-th batch from i, for one worker per
    GPU; a shard worker's store leaves the merging to an exclusive one (`merge_attribute`).
    """

    shard = shard_of(store, shard)
    merge = store.shard is None
    attribute_cfg = cfg.attribute
    for pair in cfg.pairs.values():
        for role in ROLES:
            member = PairModel(pair, role)
            jobs = list(_attribution_jobs(cfg, store, member, shard))
            if not any(batches for *_, batches in jobs):
                if merge:
                    _merge_all(cfg, store, member)
                continue
            max_len = max(len(t) for *_, batches in jobs for b in batches for _, t, _ in b)
            model = load_for_scoring(cfg, member, max_len)
            for dataset, alpha, batches in jobs:
                with tqdm(
                    total=sum(map(len, batches)),
                    desc=f"attribute {pair.name}/{role} {dataset} alpha={alpha:g}",
                    disable=not progress,
                ) as bar:
                    for batch in batches:
                        for qid, scores in _attribute_batch(model, batch, attribute_cfg, dataset):
                            rel = RunLayout.question_scores(pair.name, role, dataset, alpha, qid)
                            if store.exists(rel):
                                continue  # same batch as before: the file has these bytes
                            store.write_scores(rel, scores)
                        bar.update(len(batch))
            del model
            if merge:
                _merge_all(cfg, store, member)
    if merge:
        merge_attribute(cfg, store)


def merge_attribute(cfg: RunConfig, store: RunStore) -> bool:
    """Merge each (model, dataset, alpha) cell whose per-question files all exist; mark
    `attribute` done and return True once every cell is merged."""
    complete = True
    for pair in cfg.pairs.values():
        for role in ROLES:
            complete &= _merge_all(cfg, store, PairModel(pair, role))
    if complete:
        store.mark_done("attribute", {})
    return complete


def _attribution_jobs(cfg: RunConfig, store: RunStore, member: PairModel, shard):
    """(dataset, alpha, [batch of (id, tokens, t_cut)]) for one model: the batches of
    `shard` with a question still to do."""
    pair, role = member.pair.name, member.role
    for dataset in cfg.run.datasets:
        selection_rel = RunLayout.selection(pair, dataset)
        selection = Selection.from_dict(store.read_json(selection_rel))
        gens = {
            r: by_id(
                store.records(RunLayout.generations(PairModel(member.pair, r).key, dataset)).load()
            )
            for r in ROLES
        }
        for alpha in cfg.alphas:
            if alpha not in selection.t_cut:
                raise StoreError(
                    f"{store.label(selection_rel)} has no T_cut for "
                    f"alpha {alpha:g} (it was made under other select.alphas); rerun the select "
                    "stage (`rl-circuits run CONFIG --force` recomputes what a config change "
                    "made stale)"
                )
            cut = selection.t_cut[alpha]
            # Paper text: both models skip a question either answered in fewer than T_cut
            # tokens, so the comparison stays paired. Authors' code: such a question is kept
            # and its loss covers the answer tokens it has (none: skipped).
            least = 1 if cfg.select.rules == "authors-code" else cut
            skipped = {
                qid: f"the {r} model's answer has {n} tokens, fewer than "
                + ("T_cut = " if least == cut else "")
                + str(least)
                for qid in selection.ids
                for r in ROLES
                if (n := len(gens[r][qid]["answer_ids"])) < least
            }
            skipped_rel = RunLayout.skipped(pair, role, dataset, alpha)
            if not store.exists(skipped_rel):
                store.write_json(skipped_rel, skipped)
            items = []
            for qid in selection.ids:
                if qid not in skipped:
                    gen = gens[role][qid]
                    answer = gen["answer_ids"][:cut]
                    items.append((qid, gen["prompt_ids"] + answer, len(answer)))
            items.sort(key=lambda item: len(item[1]))  # stable: ties keep selection order
            batches = [
                batch
                for unit, batch in enumerate(_batches(items, cfg.attribute.batch_size))
                if in_shard(unit, shard)
                and not all(
                    store.exists(RunLayout.question_scores(pair, role, dataset, alpha, qid))
                    for qid, _, _ in batch
                )
            ]
            yield dataset, alpha, batches


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _attribute_batch(model, batch, attribute_cfg: AttributeSection, dataset: str):
    """Right-padded batch -> per-question scores; halves the batch on CUDA out-of-memory."""
    from rl_circuits.engine.attribution import attribute

    width = max(len(t) for _, t, _ in batch)
    tokens = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.bool)
    for row, (_, toks, cut) in enumerate(batch):
        tokens[row, : len(toks)] = torch.tensor(toks)
        mask[row, len(toks) - cut : len(toks)] = True
    ids = [qid for qid, _, _ in batch]
    try:
        scores = attribute(
            model,
            tokens,
            mask,
            graph=attribute_cfg.graph,
            method=attribute_cfg.method,
            ig_steps=attribute_cfg.ig_steps,
            sample_ids=[f"question {q} of {dataset}" for q in ids],
            efficient_attention=attribute_cfg.efficient_attention,
            checkpoint=attribute_cfg.checkpoint,
        )
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        if len(batch) == 1:
            raise RLCircuitsError(
                f"CUDA out of memory attributing question {ids[0]} of {dataset} "
                f"({width} tokens) at batch size 1. Options: attribute.efficient_attention = "
                "true, attribute.checkpoint = true, model.n_devices > 1, or a smaller alpha."
            ) from None
        half = len(batch) // 2
        yield from _attribute_batch(model, batch[:half], attribute_cfg, dataset)
        yield from _attribute_batch(model, batch[half:], attribute_cfg, dataset)
        return
    except NumericalError as exc:
        raise NumericalError(f"attribute stage: {exc}") from exc
    for row, qid in enumerate(ids):
        one = slice(row, row + 1)
        yield (
            qid,
            replace(
                scores,
                values=scores.values[one],
                loss=scores.loss[one],
                ids=[qid],
                meta={"t_cut": batch[row][2]},
            ),
        )


def _merge_all(cfg: RunConfig, store: RunStore, member: PairModel) -> bool:
    """Merge the complete cells of one model; True if none is left incomplete."""
    pair, role = member.pair.name, member.role
    complete = True
    for dataset, alpha in ((d, a) for d in cfg.run.datasets for a in cfg.alphas):
        if store.exists(RunLayout.scores(pair, role, dataset, alpha)):
            continue
        skipped_rel = RunLayout.skipped(pair, role, dataset, alpha)
        if not store.exists(skipped_rel):  # no worker has reached this cell yet
            complete = False
            continue
        selection = Selection.from_dict(store.read_json(RunLayout.selection(pair, dataset)))
        skipped = store.read_json(skipped_rel)
        order = [q for q in selection.ids if q not in skipped]
        files = [RunLayout.question_scores(pair, role, dataset, alpha, q) for q in order]
        if not all(store.exists(f) for f in files):
            complete = False
        elif order:  # graph, method and each question's loss come from the files
            meta = {"t_cut": selection.t_cut[alpha]}
            store.merge_scores(
                files, RunLayout.scores(pair, role, dataset, alpha), order, meta=meta
            )
    return complete
