"""SFT's greedy validation accuracy vs steps, per seed, for the zoo's recipe or a variant of it.

How the SFT recipe's task, teacher and schedule were chosen (docs/zoo.md): each run trains
`ZooConfig()`'s SFT from scratch (init and SFT seeds shifted by the seed set, as in
`bench/zoo_seeds.py`), evaluates greedy validation accuracy every `--every` steps and the
test split at the end, and splits the test accuracy into the questions the teacher misreads
(they contain a verb of `teacher_misreads`) and the others. `--task`, `--sft`, `--model` are
JSON objects of fields to replace. One thread; for the zoo's bytes run it under the build's
pinned environment (`python -c "from rl_circuits.zoo.numerics import pinned_environment;
print(pinned_environment())"`).

    .venv/bin/python bench/zoo_sft.py [--seeds 0 1] [--every 100] [--sft '{"max_steps": 800}']

Appends each run to the list in `bench/results/zoo_sft.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from rl_circuits.zoo import ZooConfig
from rl_circuits.zoo.model import correct, init_model, make_tokenizer
from rl_circuits.zoo.sft import train_sft
from rl_circuits.zoo.tasks import generate_splits

RESULTS = Path(
    os.environ.get("ZOO_SFT_RESULTS", Path(__file__).parent / "results" / "zoo_sft.json")
)


def replaced(block, fields: dict):
    """`block` with `fields` replaced (JSON lists become tuples, as the config stores them)."""
    return dataclasses.replace(
        block, **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    )


def run(config: ZooConfig, seed_set: int, every: int) -> dict:
    """Train one SFT model; its validation curve and test accuracy (misread / other questions)."""
    task = config.task
    sft = dataclasses.replace(
        config.sft, seed=config.sft.seed + seed_set, eval_every=every, min_steps=every
    )
    sizes = {"train": task.train_size, "validation": task.validation_size, "test": task.test_size}
    splits = generate_splits(task.seed, sizes, task.max_amount, task.max_operand, task.step_weights)
    tokenizer = make_tokenizer()
    model = init_model(config.model, tokenizer, config.init_seed + seed_set)
    started = time.perf_counter()
    result = train_sft(
        model, tokenizer, splits["train"], splits["validation"], task.template,
        task.max_new_tokens, sft, progress=False,
    )  # fmt: skip
    wall = time.perf_counter() - started
    model.load_state_dict(result.model.state_dict())
    hits = correct(model, tokenizer, splits["test"], task.template, task.max_new_tokens)
    misread = [any(v in p.question for v in sft.teacher_misreads) for p in splits["test"]]
    right = {
        flag: sum(h for h, m in zip(hits, misread, strict=True) if m == flag) for flag in (0, 1)
    }
    return {
        "seed_set": seed_set,
        "curve": [(h["step"], h["val_accuracy"]) for h in result.history],
        "kept_step": result.best_step,
        "test": sum(hits) / len(hits),
        "test_misread": f"{right[1]}/{sum(misread)}",
        "test_other": f"{right[0]}/{len(hits) - sum(misread)}",
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seed sets")
    parser.add_argument("--every", type=int, default=100, help="evaluate every N steps")
    for block in ("task", "sft", "model"):
        parser.add_argument(f"--{block}", type=json.loads, default={}, help="fields to replace")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    base = ZooConfig()
    config = dataclasses.replace(
        base,
        task=replaced(base.task, args.task),
        sft=replaced(base.sft, args.sft),
        model=replaced(base.model, args.model),
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for seed_set in args.seeds:
        row = {"task": args.task, "sft": args.sft, "model": args.model}
        row.update(run(config, seed_set, args.every))
        print(json.dumps(row), flush=True)
        runs = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
        RESULTS.write_text(json.dumps([*runs, row], indent=1) + "\n")


if __name__ == "__main__":
    main()
