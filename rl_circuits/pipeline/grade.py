"""The grade stage: every generation's extracted answer, the gold, and the verdict."""

from __future__ import annotations

from tqdm.auto import tqdm

from rl_circuits.config import RunConfig
from rl_circuits.data.grading import grade
from rl_circuits.models.pairs import pair_models
from rl_circuits.pipeline.common import questions
from rl_circuits.store.layout import RunLayout
from rl_circuits.store.run import RunStore


def stage_grade(cfg: RunConfig, store: RunStore, progress: bool = True) -> None:
    """Grade every generation: the extracted answer, the gold, and the verdict."""
    for model in pair_models(cfg.pairs.values()):
        for dataset in cfg.run.datasets:
            table = store.records(RunLayout.grades(model.key, dataset))
            if table.is_done():
                continue
            golds = {q["id"]: q["gold"] for q in questions(store, dataset)}
            done = table.done_ids()
            gens = [
                g
                for g in store.records(RunLayout.generations(model.key, dataset)).load()
                if g["id"] not in done
            ]
            rows = []
            with tqdm(gens, desc=f"grade {model.key} {dataset}", disable=not progress) as bar:
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
                table.write_chunk(rows)
            table.finalize(list(golds))
    store.mark_done("grade", {})
