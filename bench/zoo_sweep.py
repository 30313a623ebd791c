"""Greedy test accuracy vs training steps for a few GRPO and DPO settings, from one SFT model.

The zoo's post-recipes were chosen with this script (results in `docs/zoo.md`).
It takes a built zoo (`--zoo DIR`, default: the default config's zoo, built if absent),
starts every run from its SFT checkpoint, and evaluates greedy accuracy on the test split
(and the validation split) every `--every` steps of each run. The settings are
`ZooConfig`'s GRPO/DPO blocks with the fields given in `GRPO_RUNS`/`DPO_RUNS` replaced
(or `--grpo`/`--dpo` JSON lists of such overrides). One thread, like the zoo build.

    .venv/bin/python bench/zoo_sweep.py [--zoo DIR] [--every 10] [--only grpo|dpo]

Writes `bench/results/zoo_sweep.json` (merged with earlier runs, keyed by setting).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import TrainerCallback

from rl_circuits.zoo import ZooConfig, build_zoo
from rl_circuits.zoo import dpo as dpo_recipe
from rl_circuits.zoo import grpo as grpo_recipe
from rl_circuits.zoo.model import accuracy, load_checkpoint
from rl_circuits.zoo.tasks import DATASET_NAME, read_jsonl

RESULTS = Path(
    os.environ.get("ZOO_SWEEP_RESULTS", Path(__file__).parent / "results" / "zoo_sweep.json")
)
GRPO_RUNS = [
    {"steps": 60, "prompts_per_step": 16, "num_generations": 8, "learning_rate": 1e-4},
    {"steps": 60, "prompts_per_step": 16, "num_generations": 8, "learning_rate": 2e-4},
    {"steps": 60, "prompts_per_step": 8, "num_generations": 8, "learning_rate": 2e-4},
]
DPO_RUNS = [
    {"epochs": 4, "learning_rate": 5e-5},
    {"epochs": 4, "learning_rate": 2e-4},
    {"epochs": 4, "learning_rate": 5e-4},
]


class Evaluate(TrainerCallback):
    """Greedy test and validation accuracy every `every` steps (and at the end)."""

    def __init__(self, splits, template, budget, tokenizer, every, started):
        self.splits, self.template, self.budget = splits, template, budget
        self.tokenizer, self.every, self.started = tokenizer, every, started
        self.curve: list[dict] = []
        self.eval_s = 0.0

    def measure(self, model, step: int) -> None:
        t0 = time.perf_counter()
        point = {"step": step}
        for name, problems in self.splits.items():
            point[name] = accuracy(model, self.tokenizer, problems, self.template, self.budget)
        self.eval_s += time.perf_counter() - t0
        point["train_s"] = round(time.perf_counter() - self.started - self.eval_s, 1)
        self.curve.append(point)
        print(f"    step {step:4d}: " + ", ".join(f"{k} {v}" for k, v in point.items()), flush=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.measure(model, state.global_step)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.curve[-1]["step"] != state.global_step:
            self.measure(model, state.global_step)


def run(kind: str, overrides: dict, zoo, splits, every: int, pair_cache: dict) -> dict:
    """Train one setting from the zoo's SFT checkpoint; returns its accuracy curve."""
    base = getattr(zoo.config, kind)
    settings = dataclasses.replace(base, **overrides)
    model, tokenizer = load_checkpoint(zoo.sft)
    started = time.perf_counter()
    evaluate = Evaluate(splits, zoo.template, zoo.max_new_tokens, tokenizer, every, started)
    evaluate.measure(model, 0)
    evaluate.started = time.perf_counter()
    evaluate.eval_s = 0.0
    train = read_jsonl(zoo.data_dir / DATASET_NAME / "train.jsonl")
    pairs = None
    if kind == "grpo":
        grpo_recipe.train_grpo(
            model, tokenizer, train, zoo.template, zoo.max_new_tokens, settings,
            progress=False, callbacks=[evaluate],
        )  # fmt: skip
    else:
        key = (settings.pair_prompts, settings.samples_per_prompt, settings.sample_temperature)
        if key + (settings.seed,) not in pair_cache:
            pair_cache[key + (settings.seed,)], _ = dpo_recipe.sample_pairs(
                model, tokenizer, train, zoo.template, zoo.max_new_tokens, settings,
                progress=False,
            )  # fmt: skip
        pairs = pair_cache[key + (settings.seed,)]
        evaluate.started = time.perf_counter()  # sampling pairs is not training
        dpo_recipe.train_dpo(
            model, tokenizer, pairs, settings, progress=False, callbacks=[evaluate]
        )
    return {
        "kind": kind,
        "overrides": overrides,
        "settings": dataclasses.asdict(settings),
        "pairs": len(pairs) if pairs is not None else None,
        "curve": evaluate.curve,
    }


def open_zoo(root: Path) -> SimpleNamespace:
    """The parts of a finished zoo the sweep needs (any ZOO_FORMAT: only the SFT is used)."""
    manifest = json.loads((root / "zoo.json").read_text())
    config = ZooConfig.from_dict(manifest["config"])
    return SimpleNamespace(
        config=config,
        sft=root / "sft",
        data_dir=root / "data",
        template=config.task.template,
        max_new_tokens=config.task.max_new_tokens,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, help="a built zoo's folder (default: build one)")
    parser.add_argument("--every", type=int, default=10, help="evaluate every N steps")
    parser.add_argument("--only", choices=["grpo", "dpo"])
    parser.add_argument("--grpo", type=json.loads, help="JSON list of GRPO overrides")
    parser.add_argument("--dpo", type=json.loads, help="JSON list of DPO overrides")
    args = parser.parse_args()
    torch.set_num_threads(1)
    zoo = open_zoo(args.zoo) if args.zoo else build_zoo(register=False)
    folder = zoo.data_dir / DATASET_NAME
    splits = {name: read_jsonl(folder / f"{name}.jsonl") for name in ("test", "validation")}
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    plan = []
    if args.only != "dpo":
        plan += [("grpo", o) for o in (args.grpo or GRPO_RUNS)]
    if args.only != "grpo":
        plan += [("dpo", o) for o in (args.dpo or DPO_RUNS)]
    pair_cache: dict = {}
    for kind, overrides in plan:
        key = f"{zoo.config.digest()} {kind} {json.dumps(overrides, sort_keys=True)}"
        print(f"{kind} {overrides}", flush=True)
        results[key] = {
            "zoo": zoo.config.digest(),
            **run(kind, overrides, zoo, splits, args.every, pair_cache),
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
