"""Offline preference recipe: DPO from the SFT checkpoint on pairs sampled once from it.

Pairs: for each of `pair_prompts` training questions the SFT model samples
`samples_per_prompt` completions (temperature `sample_temperature`, seeded); a question with
at least one correct and one incorrect completion gives one pair, chosen = its first correct
completion, rejected = its first incorrect one. The pairs are fixed before training (offline,
unlike GRPO, which samples from the current policy at every step).

Recipe: TRL's `DPOTrainer` with the sigmoid DPO loss (beta 0.1) plus a negative
log-likelihood term on the chosen completion, `loss_type=["sigmoid", "sft"]` with
`loss_weights=[1, rpo_alpha]` (the RPO recipe; TRL 1.x's replacement for the old `rpo_alpha`
argument), learning rate 5e-5, four epochs, on pairs from 3000 questions sampled at
temperature 1.0 (docs/zoo.md: the SFT model rarely samples the right answer where it errs,
and at temperature 0.7 seed set 0 got only 33 pairs from 1500 questions; accuracy levels off
after 4 epochs; 2e-4 lowered accuracy on the earlier task). Plain DPO on a few hundred pairs
lowered greedy accuracy on the earlier task (41% -> 32% with 300 pairs; 54% -> 37% in a
feasibility run): the loss is satisfied by pushing the rejected likelihood down, which also
drains probability from the correct answers (likelihood displacement). The NLL term keeps
the chosen answers likely. Its weight matters because it is a per-token mean while the DPO
term sums log-ratios over the whole answer: with `rpo_alpha=1` accuracy still fell on one
SFT model (48% -> 40%) though not on another (41% -> 42%); `rpo_alpha=5` kept it (48% ->
47-48%, lr 5e-5 or 1e-4). `rpo_alpha=0` gives plain DPO.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rl_circuits.zoo.model import generate
from rl_circuits.zoo.tasks import Problem, is_correct
from rl_circuits.zoo.training import TrainResult, TRLJob, train_with_trl


@dataclass(frozen=True)
class DPOSettings:
    """Knobs of the DPO recipe."""

    seed: int = 3
    pair_prompts: int = 3000
    samples_per_prompt: int = 4
    sample_temperature: float = 1.0
    epochs: int = 4
    batch_size: int = 32
    learning_rate: float = 5e-5
    beta: float = 0.1
    rpo_alpha: float = 5.0


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


def sample_pairs(
    model,
    tokenizer,
    problems: Sequence[Problem],
    template: str,
    max_new_tokens: int,
    settings: DPOSettings,
    *,
    progress: bool = True,
) -> tuple[list[PreferencePair], dict]:
    """Preference pairs from SFT samples (see the module docstring) and sampling statistics."""
    from tqdm.auto import tqdm

    problems = list(problems)[: settings.pair_prompts]
    k = settings.samples_per_prompt
    prompts = [template.replace("{q}", p.question) for p in problems for _ in range(k)]
    completions = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens,
        sample=True,
        temperature=settings.sample_temperature,
        seed=settings.seed,
        progress=(lambda it: tqdm(it, desc="dpo pairs", leave=False)) if progress else None,
    )
    pairs, n_correct = [], 0
    for i, problem in enumerate(problems):
        group = [c.strip() for c in completions[i * k : (i + 1) * k]]
        good = [c for c in group if is_correct(c, problem.answer)]
        bad = [c for c in group if not is_correct(c, problem.answer) and c]
        n_correct += len(good)
        if good and bad:
            pairs.append(PreferencePair(prompts[i * k], good[0], bad[0]))
    stats = {
        "prompts": len(problems),
        "samples": len(prompts),
        "sample_accuracy": n_correct / max(len(prompts), 1),
        "pairs": len(pairs),
    }
    return pairs, stats


def train_dpo(
    model,
    tokenizer,
    pairs: Sequence[PreferencePair],
    settings: DPOSettings,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    log_path: Path | None = None,
    callbacks: Sequence = (),
) -> TrainResult:
    """Run DPO (+ NLL on chosen, weight `rpo_alpha`) on `model` in place; returns it with its
    steps, wall time, losses and their weights.

    One progress bar (when `progress`); every step's TRL log goes to `log_path` (JSON lines).
    `callbacks` are extra `TrainerCallback`s (the sweep's evaluations).
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    if not pairs:
        raise ValueError("DPO needs at least one preference pair; the SFT samples gave none")
    started = time.perf_counter()
    dataset = Dataset.from_dict(
        {
            "prompt": [p.prompt for p in pairs],
            "chosen": [p.chosen for p in pairs],
            "rejected": [p.rejected for p in pairs],
        }
    )
    losses = ["sigmoid", "sft"] if settings.rpo_alpha > 0 else ["sigmoid"]
    weights = [1.0, settings.rpo_alpha] if settings.rpo_alpha > 0 else [1.0]
    trainer = train_with_trl(
        "dpo",
        (DPOConfig, DPOTrainer),
        TRLJob(model, tokenizer, dataset, device, progress, log_path, callbacks),
        settings,
        shown=("loss",),
        trainer_arguments={"ref_model": copy.deepcopy(model).eval()},
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        loss_type=losses,
        loss_weights=weights,
        max_length=None,
    )
    history = [
        {k: round(v, 4) for k, v in h.items() if k in ("step", "loss", "rewards/accuracies")}
        for h in trainer.state.log_history
        if "loss" in h
    ]
    return TrainResult(
        trainer.model,
        trainer.state.global_step,
        history,
        time.perf_counter() - started,
        loss_type=losses,
        loss_weights=weights,
    )
