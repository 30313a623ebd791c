"""The generate stage: each model answers each question with its pair's template.

Chunked and resumable; data-parallel with `shard=(i, n)` (every n-th chunk from i), the chunks
fixed by the full question list, so every answer comes from the same generator call whoever
makes it. `merge_generate` finalises the records once every shard's answers are there.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from rl_circuits.config import RunConfig
from rl_circuits.data.generation import GenerationSettings, make_generator
from rl_circuits.models.pairs import pair_models
from rl_circuits.pipeline.common import device_of, in_shard, questions, shard_of
from rl_circuits.store.layout import RunLayout
from rl_circuits.store.run import RunStore


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
    table whose questions are all answered (`merge_generate`).
    """
    from rl_circuits.models.checkpoints import resolve
    from rl_circuits.models.loading import as_dtype, model_map_for

    shard = shard_of(store, shard)
    gen_cfg = cfg.generate
    size = gen_cfg.chunk_size
    datasets = cfg.run.datasets
    # An architecture the attribute stage cannot load fails now, not after hours of generation.
    for model in pair_models(cfg.pairs.values()):
        if not all(store.stage_done(RunLayout.generations(model.key, d)) for d in datasets):
            model_map_for(resolve(model.path, model.revision))
    for model in pair_models(cfg.pairs.values()):
        todo = {}
        for dataset in datasets:
            table = store.records(RunLayout.generations(model.key, dataset))
            if table.is_done():
                continue
            done = table.done_ids()
            every = questions(store, dataset)
            chunks = [
                [q for q in every[start : start + size] if q["id"] not in done]
                for unit, start in enumerate(range(0, len(every), size))
                if in_shard(unit, shard)
            ]
            if any(chunks):
                todo[dataset] = (table, [chunk for chunk in chunks if chunk])
        if not todo:
            continue
        generator = make_generator(
            gen_cfg.backend,
            model.path,
            revision=model.revision,
            dtype=as_dtype(cfg.model.dtype),
            device=device_of(cfg),
            allow_pickle=cfg.model.allow_pickle,
        )
        settings = GenerationSettings(
            max_new_tokens=gen_cfg.max_new_tokens or model.pair.max_new_tokens,
            temperature=float(gen_cfg.temperature),
            seed=gen_cfg.seed,
            batch_size=gen_cfg.batch_size,
            stop=tuple(model.pair.stop),
            keep_end_token=gen_cfg.end_token == "keep",
        )
        for dataset, (table, chunks) in todo.items():
            # `with`: a bar is closed before an error message is printed, not after it
            with tqdm(
                total=sum(map(len, chunks)),
                desc=f"generate {model.key} {dataset}",
                disable=not progress,
            ) as bar:
                for chunk in chunks:
                    prompts = [model.pair.prompt(_question(cfg, q)) for q in chunk]
                    results = list(generator.generate(prompts, settings))
                    table.write_chunk(
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
    """Finalise each generation record table whose questions all have an answer (in dataset
    order, whoever wrote them); mark `generate` done and return True once all are."""
    complete = True
    for model in pair_models(cfg.pairs.values()):
        for dataset in cfg.run.datasets:
            table = store.records(RunLayout.generations(model.key, dataset))
            if table.is_done():
                continue
            order = [q["id"] for q in questions(store, dataset)]
            if set(order) <= table.done_ids():
                table.finalize(order)
            else:
                complete = False
    if complete:
        store.mark_done("generate", {})
    return complete
