"""The experiment's stages over a run store: datasets, generate, grade, select, attribute.

Each stage is a function of (config, store) that skips finished work, so any stage killed at
any point and started again completes with the same final outputs.

Generate and attribute also run data-parallel: `shard=(i, n)` (or a store opened as shard
worker i of n) processes every n-th unit of work from i and only adds per-question outputs; the
merge (`merge_stage`: finalised records, merged score files, stage markers) runs in an
exclusive store once every shard's work is there. The units are the calls a single process
makes (a chunk of `generate.chunk_size` questions, a batch of `attribute.batch_size`
questions), fixed by the full question list, so every question is computed in the same batch
whoever computes it, and the merged files are byte-identical to those of one process.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rl_circuits.config import AttributeSection, RunConfig
from rl_circuits.data.datasets import dataset_file, dataset_hash, load_dataset
from rl_circuits.data.generation import GenerationSettings, make_generator
from rl_circuits.data.grading import grade
from rl_circuits.data.selection import Selection, select
from rl_circuits.errors import ConfigError, NumericalError, RLCircuitsError, StoreError
from rl_circuits.models.pairs import Pair
from rl_circuits.store.run_store import RunStore

ROLES = ("before", "after")


@dataclass(frozen=True)
class ModelRun:
    """One model answering with one pair's template: the unit of generation and grading."""

    pair: Pair
    role: str

    @property
    def path(self) -> str:
        return self.pair.before if self.role == "before" else self.pair.after

    @property
    def revision(self) -> str | None:
        return self.pair.revision_before if self.role == "before" else self.pair.revision_after

    @property
    def key(self) -> str:
        """Shared by pairs that use the same model, revision, template and token limit."""
        parts = [self.path, self.revision, self.pair.template, self.pair.max_new_tokens]
        if self.pair.stop:  # pairs without their own end tokens keep their old keys
            parts.append(list(self.pair.stop))
        ident = json.dumps(parts)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.path.rstrip("/").split("/")[-1])[-40:]
        return f"{slug}-{hashlib.sha256(ident.encode()).hexdigest()[:8]}"


def model_runs(cfg: RunConfig) -> Iterator[ModelRun]:
    """Each model run once: pairs that share a model (and template) share its answers."""
    seen = set()
    for pair in cfg.pairs.values():
        for role in ROLES:
            run = ModelRun(pair, role)
            if run.key not in seen:
                seen.add(run.key)
                yield run


def device_of(cfg: RunConfig) -> str:
    """model.device ("auto": cuda if available), refused clearly when unusable here."""
    from rl_circuits.models.loading import check_device

    try:
        return str(check_device(cfg.model.device))
    except ConfigError as exc:
        raise ConfigError(f"{cfg.source}: model.{exc}") from None


def _data_dir(cfg: RunConfig) -> str | None:
    return cfg.run.data_dir or None


def stage_datasets(cfg: RunConfig, store: RunStore) -> None:
    """Normalise each dataset to {id, question, gold} records in `datasets/NAME.jsonl`."""
    limit = cfg.run.limit or None
    for name in cfg.run.datasets:
        rel = f"datasets/{name}.jsonl"
        if not store.exists(rel):
            ids = [i for i in cfg.run.ids if i.startswith(f"{name}-")] or None
            records = load_dataset(
                name, data_dir=_data_dir(cfg), split=cfg.run.split, limit=limit, ids=ids
            )
            # the hash of the file these records came from, recorded before them: a later
            # change of the file is then seen as one (rl_circuits.pipeline.integrity)
            if _data_dir(cfg):
                path = dataset_file(name, _data_dir(cfg), cfg.run.split)
                store.update_manifest({"dataset_hashes": {name: dataset_hash(path)}})
            store.write_jsonl(rel, [r.to_dict() for r in records])
    store.mark_done("datasets", {"datasets": cfg.run.datasets})


def questions(store: RunStore, dataset: str) -> list[dict]:
    return store.read_jsonl(f"datasets/{dataset}.jsonl")


def shard_of(store: RunStore, shard: tuple[int, int] | None = None) -> tuple[int, int]:
    """The slice (i, n) a stage call processes: `shard`, else the store's, else everything."""
    if shard is None:
        return store.shard or (0, 1)
    index, count = shard
    if not 0 <= index < count:
        raise ConfigError(f"shard {index}/{count} is out of range: need 0 <= i < n")
    if store.shard is not None and (index, count) != store.shard:
        raise ConfigError(
            f"shard {index}/{count} differs from the store's shard "
            f"{store.shard[0]}/{store.shard[1]}"
        )
    return index, count


def _in_shard(position: int, shard: tuple[int, int]) -> bool:
    return position % shard[1] == shard[0]


def stage_generate(
    cfg: RunConfig,
    store: RunStore,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> None:
    """Each model answers each question with its pair's template; chunked and resumable.

    The questions of a dataset form fixed chunks of `generate.chunk_size`, one generator call
    each. `shard=(i, n)` answers only every n-th chunk from i (one vLLM or HF instance per
    GPU). A shard worker's store stops there; an exclusive store then finalises every record
    stage whose questions are all answered (`merge_generate`).
    """
    from rl_circuits.models.checkpoints import resolve
    from rl_circuits.models.loading import DTYPES, model_map_for

    part = shard_of(store, shard)
    gen_cfg = cfg.generate
    size = gen_cfg.chunk_size
    # An architecture the attribute stage cannot load fails now, not after hours of generation.
    for run in model_runs(cfg):
        if not all(store.stage_done(f"generate/{run.key}/{d}") for d in cfg.run.datasets):
            model_map_for(resolve(run.path, run.revision))
    for run in model_runs(cfg):
        todo = {}
        for dataset in cfg.run.datasets:
            stage = store.records(f"generate/{run.key}/{dataset}")
            if stage.is_done():
                continue
            done = stage.done_ids()
            every = questions(store, dataset)
            chunks = [
                [q for q in every[start : start + size] if q["id"] not in done]
                for unit, start in enumerate(range(0, len(every), size))
                if _in_shard(unit, part)
            ]
            if any(chunks):
                todo[dataset] = (stage, [chunk for chunk in chunks if chunk])
        if not todo:
            continue
        generator = make_generator(
            gen_cfg.backend,
            run.path,
            revision=run.revision,
            dtype=DTYPES[cfg.model.dtype],
            device=device_of(cfg),
            allow_pickle=cfg.model.allow_pickle,
        )
        settings = GenerationSettings(
            max_new_tokens=gen_cfg.max_new_tokens or run.pair.max_new_tokens,
            temperature=float(gen_cfg.temperature),
            seed=gen_cfg.seed,
            batch_size=gen_cfg.batch_size,
            stop=tuple(run.pair.stop),
            keep_end_token=gen_cfg.end_token == "keep",
        )
        for dataset, (stage, chunks) in todo.items():
            # `with`: a bar is closed before an error message is printed, not after it
            with tqdm(
                total=sum(map(len, chunks)),
                desc=f"generate {run.key} {dataset}",
                disable=not progress,
            ) as bar:
                for chunk in chunks:
                    prompts = [run.pair.prompt(_question(cfg, q)) for q in chunk]
                    results = list(generator.generate(prompts, settings))
                    stage.write_chunk(
                        [{"id": q["id"], **r} for q, r in zip(chunk, results, strict=True)]
                    )
                    bar.update(len(chunk))
        del generator
    if store.shard is None:
        merge_generate(cfg, store)


def _question(cfg: RunConfig, record: dict) -> str:
    """The question as prompted: stripped under the authors' rules, as their harness does."""
    text = record["question"]
    return text.strip() if cfg.select.rules == "authors-code" else text


def merge_generate(cfg: RunConfig, store: RunStore) -> bool:
    """Finalise each generation record stage whose questions all have an answer (in dataset
    order, whoever wrote them); mark `generate` done and return True once all are."""
    complete = True
    for run in model_runs(cfg):
        for dataset in cfg.run.datasets:
            stage = store.records(f"generate/{run.key}/{dataset}")
            if stage.is_done():
                continue
            order = [q["id"] for q in questions(store, dataset)]
            if set(order) <= stage.done_ids():
                stage.finalize(order)
            else:
                complete = False
    if complete:
        store.mark_done("generate", {})
    return complete


def stage_grade(cfg: RunConfig, store: RunStore, progress: bool = True) -> None:
    """Grade every generation: the extracted answer, the gold, and the verdict."""
    for run in model_runs(cfg):
        for dataset in cfg.run.datasets:
            stage = store.records(f"grade/{run.key}/{dataset}")
            if stage.is_done():
                continue
            golds = {q["id"]: q["gold"] for q in questions(store, dataset)}
            done = stage.done_ids()
            gens = [
                g
                for g in store.records(f"generate/{run.key}/{dataset}").load()
                if g["id"] not in done
            ]
            rows = []
            with tqdm(gens, desc=f"grade {run.key} {dataset}", disable=not progress) as bar:
                for g in bar:
                    result = grade(
                        g["answer"],
                        golds[g["id"]],
                        timeout=cfg.grade.timeout,
                        grader=cfg.grade.grader,
                        dataset=dataset,
                    )
                    rows.append({"id": g["id"], **result.to_dict()})
            if rows:
                stage.write_chunk(rows)
            stage.finalize(list(golds))
    store.mark_done("grade", {})


def stage_select(cfg: RunConfig, store: RunStore) -> None:
    """Per pair and dataset: the questions both models got right, filtered and sampled."""
    s = cfg.select
    for pair in cfg.pairs.values():
        before, after = ModelRun(pair, "before"), ModelRun(pair, "after")
        for dataset in cfg.run.datasets:
            rel = f"select/{pair.name}/{dataset}.json"
            if store.exists(rel):
                continue
            gens = {
                r: _by_id(store.records(f"generate/{m.key}/{dataset}").load())
                for r, m in (("before", before), ("after", after))
            }
            grades = {
                r: _by_id(store.records(f"grade/{m.key}/{dataset}").load())
                for r, m in (("before", before), ("after", after))
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
    store.mark_done("select", {})


def _by_id(records: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in records}


def attribution_dir(pair: str, role: str, dataset: str, alpha: float) -> str:
    return f"attribute/{pair}/{role}/{dataset}/alpha-{alpha:g}"


def load_for_scoring(cfg: RunConfig, run: ModelRun, max_seq_len: int):
    """One model of a pair as the config's [model] section asks, for sequences up to
    `max_seq_len` tokens (the attribute and circuits stages)."""
    from rl_circuits.models.loading import DTYPES, load_model

    return load_model(
        run.path,
        revision=run.revision,
        dtype=DTYPES[cfg.model.dtype],
        device=device_of(cfg),
        n_devices=cfg.model.n_devices,
        max_seq_len=max_seq_len,
        allow_pickle=cfg.model.allow_pickle,
    )


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

    part = shard_of(store, shard)
    merge = store.shard is None
    a = cfg.attribute
    for pair in cfg.pairs.values():
        for role in ROLES:
            run = ModelRun(pair, role)
            jobs = list(_attribution_jobs(cfg, store, run, part))
            if not any(batches for *_, batches in jobs):
                if merge:
                    _merge_all(cfg, store, run)
                continue
            max_len = max(len(t) for *_, batches in jobs for b in batches for _, t, _ in b)
            model = load_for_scoring(cfg, run, max_len)
            for dataset, alpha, batches in jobs:
                out = attribution_dir(pair.name, role, dataset, alpha)
                with tqdm(
                    total=sum(map(len, batches)),
                    desc=f"attribute {pair.name}/{role} {dataset} alpha={alpha:g}",
                    disable=not progress,
                ) as bar:
                    for batch in batches:
                        for qid, scores in _attribute_batch(model, batch, a, dataset):
                            if store.exists(f"{out}/q/{qid}.safetensors"):
                                continue  # same batch as before: the file has these bytes
                            store.write_scores(
                                f"{out}/q/{qid}.safetensors",
                                scores["values"],
                                ids=[qid],
                                upstream=scores["upstream"],
                                downstream=scores["downstream"],
                                edge_mask=scores["edge_mask"],
                                meta=scores["meta"],
                            )
                        bar.update(len(batch))
            del model
            if merge:
                _merge_all(cfg, store, run)
    if merge:
        merge_attribute(cfg, store)


def merge_attribute(cfg: RunConfig, store: RunStore) -> bool:
    """Merge each (model, dataset, alpha) cell whose per-question files all exist; mark
    `attribute` done and return True once every cell is merged."""
    complete = True
    for pair in cfg.pairs.values():
        for role in ROLES:
            complete &= _merge_all(cfg, store, ModelRun(pair, role))
    if complete:
        store.mark_done("attribute", {})
    return complete


def merge_stage(stage: str, cfg: RunConfig, store: RunStore) -> bool:
    """Merge what the shard workers of `stage` ("generate" or "attribute") have finished;
    True once the whole stage is merged and marked done."""
    merges = {"generate": merge_generate, "attribute": merge_attribute}
    if stage not in merges:
        raise ConfigError(f"stage {stage!r} does not run in shards; sharded: {sorted(merges)}")
    return merges[stage](cfg, store)


def _attribution_jobs(cfg: RunConfig, store: RunStore, run: ModelRun, shard):
    """(dataset, alpha, [batch of (id, tokens, t_cut)]) for one model: the batches of
    `shard` with a question still to do."""
    for dataset in cfg.run.datasets:
        selection = Selection.from_dict(store.read_json(f"select/{run.pair.name}/{dataset}.json"))
        gens = {
            role: _by_id(store.records(f"generate/{ModelRun(run.pair, role).key}/{dataset}").load())
            for role in ROLES
        }
        for alpha in cfg.alphas:
            out = attribution_dir(run.pair.name, run.role, dataset, alpha)
            if alpha not in selection.t_cut:
                raise StoreError(
                    f"{store.label(f'select/{run.pair.name}/{dataset}.json')} has no T_cut for "
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
                qid: f"the {role} model's answer has {n} tokens, fewer than "
                + ("T_cut = " if least == cut else "")
                + str(least)
                for qid in selection.ids
                for role in ROLES
                if (n := len(gens[role][qid]["answer_ids"])) < least
            }
            if not store.exists(f"{out}/skipped.json"):
                store.write_json(f"{out}/skipped.json", skipped)
            items = []
            for qid in selection.ids:
                if qid not in skipped:
                    gen = gens[run.role][qid]
                    answer = gen["answer_ids"][:cut]
                    items.append((qid, gen["prompt_ids"] + answer, len(answer)))
            items.sort(key=lambda item: len(item[1]))  # stable: ties keep selection order
            batches = [
                batch
                for unit, batch in enumerate(_batches(items, cfg.attribute.batch_size))
                if _in_shard(unit, shard)
                and not all(store.exists(f"{out}/q/{qid}.safetensors") for qid, _, _ in batch)
            ]
            yield dataset, alpha, batches


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _attribute_batch(model, batch, a: AttributeSection, dataset: str):
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
            graph=a.graph,
            method=a.method,
            ig_steps=a.ig_steps,
            sample_ids=[f"question {q} of {dataset}" for q in ids],
            efficient_attention=a.efficient_attention,
            checkpoint=a.checkpoint,
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
        yield from _attribute_batch(model, batch[:half], a, dataset)
        yield from _attribute_batch(model, batch[half:], a, dataset)
        return
    except NumericalError as exc:
        raise NumericalError(f"attribute stage: {exc}") from exc
    for row, qid in enumerate(ids):
        yield (
            qid,
            {
                "values": scores.values[row : row + 1],
                "upstream": scores.upstream,
                "downstream": scores.downstream,
                "edge_mask": scores.edge_mask,
                "meta": {
                    "loss": float(scores.loss[row]),
                    "t_cut": batch[row][2],
                    "graph": scores.graph,
                    "method": scores.method,
                },
            },
        )


def _merge_all(cfg: RunConfig, store: RunStore, run: ModelRun) -> bool:
    """Merge the complete cells of one model; True if none is left incomplete."""
    complete = True
    for dataset, alpha in ((d, a) for d in cfg.run.datasets for a in cfg.alphas):
        out = attribution_dir(run.pair.name, run.role, dataset, alpha)
        if store.exists(f"{out}/scores.safetensors"):
            continue
        if not store.exists(f"{out}/skipped.json"):  # no worker has reached this cell yet
            complete = False
            continue
        selection = Selection.from_dict(store.read_json(f"select/{run.pair.name}/{dataset}.json"))
        skipped = store.read_json(f"{out}/skipped.json")
        order = [q for q in selection.ids if q not in skipped]
        files = [f"{out}/q/{q}.safetensors" for q in order]
        if not all(store.exists(f) for f in files):
            complete = False
        elif order:
            metas = [store.read_scores(f).meta for f in files]
            meta = {
                "graph": cfg.attribute.graph,
                "method": cfg.attribute.method,
                "t_cut": selection.t_cut[alpha],
                "loss": {q: m["loss"] for q, m in zip(order, metas, strict=True)},
            }
            store.merge_scores(files, f"{out}/scores.safetensors", order, meta=meta)
    return complete
