"""Train the zoo's recipes into a prepared folder: the task's data, SFT from scratch, then GRPO
and DPO from the SFT checkpoint; each checkpoint saved with its model card, and the manifest.

Why: `rl_circuits.zoo.build` runs this in a subprocess with a pinned numeric environment and
keeps the cache; here is only what the training does, one function per recipe
(`rl_circuits.zoo.sft`, `grpo`, `dpo` hold each recipe's training loop).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rl_circuits.zoo import dpo as dpo_recipe
from rl_circuits.zoo import grpo as grpo_recipe
from rl_circuits.zoo import sft as sft_recipe
from rl_circuits.zoo.cards import write_card
from rl_circuits.zoo.config import ZOO_FORMAT, ZooConfig
from rl_circuits.zoo.model import (
    correct,
    count_parameters,
    init_model,
    load_checkpoint,
    make_tokenizer,
    save_checkpoint,
    sha256_file,
)
from rl_circuits.zoo.paired import describe, mcnemar_exact
from rl_circuits.zoo.tasks import DATASET_NAME, Problem, generate_splits, summary, write_splits

RECIPES = ("sft", "grpo", "dpo")  # SFT from scratch, then GRPO and DPO from SFT


@dataclass(frozen=True)
class _Build:
    """What every recipe of one build shares: the config, the folder, the data splits, the
    tokenizer, where it trains and how it reports."""

    config: ZooConfig
    root: Path
    splits: dict[str, list[Problem]]
    tokenizer: Any
    device: str
    progress: bool
    log: Callable[[str], None]

    @property
    def template(self) -> str:
        return self.config.task.template

    @property
    def budget(self) -> int:
        return self.config.task.max_new_tokens

    def log_path(self, recipe: str) -> Path:
        return self.root / "logs" / f"{recipe}.jsonl"

    def answers(self, model, split: str) -> list[bool]:
        """Whether greedy decoding answers each question of `split` correctly."""
        problems = self.splits[split]
        return correct(model.to(self.device), self.tokenizer, problems, self.template, self.budget)

    def accuracy(self, model, split: str) -> float:
        return sum(self.answers(model, split)) / len(self.splits[split])

    def save(self, model, recipe: str) -> Path:
        """Save the trained `model` as checkpoint `recipe`/; its folder."""
        return save_checkpoint(model, self.tokenizer, self.root / recipe, self.budget)

    def load(self, recipe: str):
        """The saved checkpoint `recipe`/, loaded afresh: what the zoo ships is evaluated."""
        return load_checkpoint(self.root / recipe, self.device)[0]


@dataclass(frozen=True)
class _Parent:
    """The SFT checkpoint the other recipes start from: its test answers, its accuracies and
    its size (the children's too)."""

    test_correct: list[bool]
    test_accuracy: float
    validation_accuracy: float
    parameters: int


def train_recipes(
    config: ZooConfig, root: Path, env: dict[str, str], digest: str, *, progress: bool, device
) -> dict:
    """Train every recipe into the prepared `root` (the zoo with cache digest `digest`, in
    the pinned environment `env`); write the model cards; returns the manifest."""
    started = time.perf_counter()
    log = _logger(progress)
    tokenizer = make_tokenizer()
    splits, data_card = _write_data(config, root, tokenizer, log)
    build = _Build(config, root, splits, tokenizer, str(device), progress, log)
    cards: dict[str, dict] = {}
    cards["sft"], parent = _train_sft(build)
    cards["grpo"] = _train_grpo(build, parent)
    cards["dpo"] = _train_dpo(build, parent)
    for recipe, card in cards.items():
        card["sha256"] = sha256_file(root / recipe / "model.safetensors")
    manifest = {
        "format": ZOO_FORMAT,
        "digest": digest,
        "config_digest": config.digest(),
        "config": config.to_dict(),
        "dataset": {"name": DATASET_NAME, "data_dir": "data", "splits": data_card},
        "template": build.template,
        "max_new_tokens": build.budget,
        "parameters": parent.parameters,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "environment": env,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "versions": _versions(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": round(time.perf_counter() - started, 1),
        "stages": cards,  # the key predates the word "recipe": zoo.json keeps its format
    }
    for recipe in RECIPES:
        write_card(root / recipe, recipe, manifest)
    log(f"zoo: built in {manifest['wall_s']:.0f} s at {root}")
    return manifest


def _write_data(
    config: ZooConfig, root: Path, tokenizer, log
) -> tuple[dict[str, list[Problem]], dict]:
    """Generate and write the task's splits (refused if an answer exceeds the token budget);
    the splits and their summary for the manifest."""
    task = config.task
    log("data: generating splits")
    sizes = {"train": task.train_size, "validation": task.validation_size, "test": task.test_size}
    splits = generate_splits(task.seed, sizes, task.max_amount, task.max_operand, task.step_weights)
    write_splits(root / "data", splits)
    longest = max(
        len(tokenizer(p.solution, add_special_tokens=False).input_ids) + 1
        for split in splits.values()
        for p in split
    )
    if longest > task.max_new_tokens:
        raise ValueError(
            f"max_new_tokens={task.max_new_tokens} is below the longest solution ({longest})"
        )
    return splits, {name: summary(problems) for name, problems in splits.items()}


def _train_sft(build: _Build) -> tuple[dict, _Parent]:
    """SFT from scratch; its model-card entries and what its children compare against."""
    config, log = build.config, build.log
    model = init_model(config.model, build.tokenizer, config.init_seed).to(build.device)
    base_test = build.accuracy(model, "test")
    log(f"sft: {count_parameters(model):,} parameters, untrained test accuracy {base_test:.1%}")
    result = sft_recipe.train_sft(
        model,
        build.tokenizer,
        build.splits["train"],
        build.splits["validation"],
        build.template,
        build.budget,
        config.sft,
        device=build.device,
        progress=build.progress,
        log_path=build.log_path("sft"),
    )
    build.save(result.model, "sft")
    model = build.load("sft")
    hits = build.answers(model, "test")
    parent = _Parent(hits, sum(hits) / len(hits), result.val_accuracy, count_parameters(model))
    card = {
        "algorithm": "SFT",
        "parent": None,
        "settings": dataclasses.asdict(config.sft),
        "steps": result.steps,
        "best_step": result.best_step,
        "stopped": result.stopped,
        "history": result.history,
        "train_wall_s": round(result.wall_s, 1),
        "test_accuracy_before": base_test,
        "test_accuracy": parent.test_accuracy,
        "test_correct": _bits(hits),
        "validation_accuracy": result.val_accuracy,
        "log": "logs/sft.jsonl",
    }
    log(
        f"sft: {result.steps} steps in {result.wall_s:.0f} s ({result.stopped}), validation "
        f"accuracy {result.val_accuracy:.1%}, test {parent.test_accuracy:.1%}; "
        f"log {build.log_path('sft')}"
    )
    return card, parent


def _train_grpo(build: _Build, parent: _Parent) -> dict:
    """GRPO from SFT (online: samples from the current policy); its model-card entries."""
    result = grpo_recipe.train_grpo(
        build.load("sft"),
        build.tokenizer,
        build.splits["train"],
        build.template,
        build.budget,
        build.config.grpo,
        device=build.device,
        progress=build.progress,
        log_path=build.log_path("grpo"),
    )
    build.save(result.model, "grpo")
    card = _child_card(build, parent, "grpo", build.config.grpo, result)
    return {"algorithm": "GRPO", **card}


def _train_dpo(build: _Build, parent: _Parent) -> dict:
    """DPO from SFT (offline: pairs sampled once from the SFT model); its model-card entries."""
    settings = build.config.dpo
    model = build.load("sft")
    t0 = time.perf_counter()
    pairs, pair_stats = dpo_recipe.sample_pairs(
        model,
        build.tokenizer,
        build.splits["train"],
        build.template,
        build.budget,
        settings,
        progress=build.progress,
    )
    pair_stats["wall_s"] = round(time.perf_counter() - t0, 1)
    build.log(
        f"dpo: {pair_stats['pairs']} preference pairs from {pair_stats['prompts']} questions "
        f"sampled in {pair_stats['wall_s']:.0f} s"
    )
    result = dpo_recipe.train_dpo(
        model,
        build.tokenizer,
        pairs,
        settings,
        device=build.device,
        progress=build.progress,
        log_path=build.log_path("dpo"),
    )
    result.wall_s += pair_stats["wall_s"]
    path = build.save(result.model, "dpo")
    with (path / "preference_pairs.jsonl").open("w") as handle:
        for pair in pairs:
            handle.write(json.dumps(dataclasses.asdict(pair)) + "\n")
    return {
        "algorithm": "DPO",
        "recipe": "DPO + NLL on chosen (RPO)" if settings.rpo_alpha > 0 else "plain DPO",
        "loss_type": result.loss_type,
        "loss_weights": result.loss_weights,
        "pairs": pair_stats,
        **_child_card(build, parent, "dpo", settings, result),
    }


def _child_card(build: _Build, parent: _Parent, recipe: str, settings, result) -> dict:
    """Model-card entries of a recipe trained from the SFT checkpoint (its saved weights
    reloaded); logs its summary line."""
    model = build.load(recipe)
    hits = build.answers(model, "test")
    card = {
        "parent": "sft",
        "settings": dataclasses.asdict(settings),
        "steps": result.steps,
        "history": result.history,
        "train_wall_s": round(result.wall_s, 1),
        "test_accuracy_before": parent.test_accuracy,
        "test_accuracy": sum(hits) / len(hits),
        "test_correct": _bits(hits),
        "paired_test": mcnemar_exact(parent.test_correct, hits),
        "validation_accuracy_before": parent.validation_accuracy,
        "validation_accuracy": build.accuracy(model, "validation"),
        "log": f"logs/{recipe}.jsonl",
    }
    build.log(
        f"{recipe}: {result.steps} steps in {result.wall_s:.0f} s, validation accuracy "
        f"{parent.validation_accuracy:.1%} -> {card['validation_accuracy']:.1%}, test "
        f"{describe(card['paired_test'])}; log {build.log_path(recipe)}"
    )
    return card


def _bits(hits: list[bool]) -> str:
    """Per-question correctness as a compact string of 0/1 (test-split order)."""
    return "".join("1" if hit else "0" for hit in hits)


def _versions() -> dict:
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def _logger(progress: bool):
    from tqdm.auto import tqdm

    return tqdm.write if progress else (lambda _msg: None)
