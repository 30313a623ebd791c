"""The datasets stage: each dataset normalised to {id, question, gold} records."""

from __future__ import annotations

from rl_circuits.config import RunConfig
from rl_circuits.data.datasets import dataset_file, dataset_hash, load_dataset
from rl_circuits.store.layout import RunLayout
from rl_circuits.store.run import RunStore


def stage_datasets(cfg: RunConfig, store: RunStore, progress: bool = True) -> None:
    """Normalise each dataset to {id, question, gold} records in `datasets/NAME.jsonl`."""
    limit = cfg.run.limit or None
    data_dir = cfg.run.data_dir or None
    for name in cfg.run.datasets:
        rel = RunLayout.dataset(name)
        if not store.exists(rel):
            ids = [i for i in cfg.run.ids if i.startswith(f"{name}-")] or None
            records = load_dataset(
                name, data_dir=data_dir, split=cfg.run.split, limit=limit, ids=ids
            )
            # the hash of the file these records came from, recorded before them: a later
            # change of the file is then seen as one (rl_circuits.pipeline.integrity)
            if data_dir:
                path = dataset_file(name, data_dir, cfg.run.split)
                store.update_manifest({"dataset_hashes": {name: dataset_hash(path)}})
            store.write_jsonl(rel, [r.to_dict() for r in records])
    store.mark_done("datasets", {"datasets": cfg.run.datasets})
