"""Supervised fine-tuning from scratch on an imperfect teacher's solutions, run to its end.

A hand-written loop rather than TRL's SFTTrainer: it needs no dataset plumbing, is
bit-reproducible on one CPU thread, and can stop on greedy validation accuracy. Recipe:
AdamW (betas 0.9/0.98, weight decay on matrices only), linear warm-up then cosine decay to
10% over `max_steps`, batches of similar lengths, loss on the solution tokens only (the
prompt is context).

The demonstrations are a teacher's (`tasks.teacher_solution`): right, except that it reads
each verb in `teacher_misreads` ("sells") as a gain in a share `teacher_error_rate` (0.85)
of its solutions. Trained to convergence (600 steps: single-digit arithmetic is learnt by
then), the model answers the other questions almost always right and, greedily, adds
where a question says "sells": a settled accuracy that does not hang on the seed, with a
mistake that GRPO's reward and DPO's pairs can correct (docs/zoo.md). The loop can also
evaluate every `eval_every` steps from `min_steps` on and stop at the first evaluation that
reaches `target_accuracy` (else it keeps the best weights seen); the default evaluates once,
at the end (`min_steps = max_steps`).
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rl_circuits.zoo.model import accuracy
from rl_circuits.zoo.progress import RecipeLog
from rl_circuits.zoo.tasks import Problem, teacher_solution
from rl_circuits.zoo.training import TrainResult


@dataclass(frozen=True)
class SFTSettings:
    """Knobs of the SFT recipe (see the module docstring for the stopping rule)."""

    seed: int = 1
    max_steps: int = 600
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    eval_every: int = 25
    eval_size: int = 200
    min_steps: int = 600
    target_accuracy: float = 1.0
    teacher_misreads: tuple[str, ...] = ("sells",)
    teacher_error_rate: float = 0.85


def encode_examples(
    tokenizer, problems: Sequence[Problem], template: str, settings: SFTSettings
) -> list[tuple]:
    """(input ids, index where the solution starts) per problem; `<eos>` ends each solution.

    The solutions are the teacher's (`tasks.teacher_solution`, seeded with `settings.seed`).
    """
    rng = random.Random(settings.seed)
    misread, rate = settings.teacher_misreads, settings.teacher_error_rate
    examples = []
    for problem in problems:
        prompt = tokenizer(template.replace("{q}", problem.question)).input_ids
        solution = teacher_solution(problem, misread, rate, rng) if misread else problem.solution
        answer = tokenizer(solution, add_special_tokens=False).input_ids
        examples.append((prompt + answer + [tokenizer.eos_token_id], len(prompt)))
    return examples


def batches(examples: list[tuple], batch_size: int, rng: random.Random):
    """Endless shuffled batches; lengths are bucketed (sorted within windows) to cut padding."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        window = batch_size * 16
        epoch = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: len(examples[i][0]))
            epoch += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(epoch)
        yield from (b for b in epoch if len(b) == batch_size)


def collate(examples: list[tuple], index: list[int], pad_id: int, device) -> dict:
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding)."""
    width = max(len(examples[i][0]) for i in index)
    ids = torch.full((len(index), width), pad_id, dtype=torch.long)
    labels = torch.full((len(index), width), -100, dtype=torch.long)
    mask = torch.zeros((len(index), width), dtype=torch.long)
    for row, i in enumerate(index):
        tokens, start = examples[i]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        labels[row, start : len(tokens)] = torch.tensor(tokens[start:])
        mask[row, : len(tokens)] = 1
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
    }


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine from 1 down to 0.1 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_sft(
    model,
    tokenizer,
    train: Sequence[Problem],
    validation: Sequence[Problem],
    template: str,
    max_new_tokens: int,
    settings: SFTSettings,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    log_path: Path | None = None,
) -> TrainResult:
    """Train `model` in place on `train`; returns the chosen weights (see module docstring).

    One progress bar (when `progress`); each step's loss and learning rate, and each
    evaluation, go to `log_path` (JSON lines).
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    model.to(device).train()
    examples = encode_examples(tokenizer, train, template, settings)
    stream = batches(examples, settings.batch_size, random.Random(settings.seed))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.learning_rate,
        betas=(0.9, 0.98),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, settings.warmup_steps, settings.max_steps)
    )
    val = list(validation)[: settings.eval_size]
    history: list[dict] = []
    best = (-1.0, 0, None)
    stopped = "max_steps"
    bar = tqdm(range(settings.max_steps), desc="sft", disable=not progress, leave=False)
    step = 0
    log = RecipeLog(log_path)
    for step in bar:
        batch = collate(examples, next(stream), tokenizer.pad_token_id, device)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        log.write({"step": done, "loss": loss.item(), "learning_rate": schedule.get_last_lr()[0]})
        due = done % settings.eval_every == 0 and done >= settings.min_steps
        if due or done == settings.max_steps:
            acc = accuracy(model, tokenizer, val, template, max_new_tokens)
            history.append({"step": done, "loss": round(loss.item(), 4), "val_accuracy": acc})
            log.write(history[-1])
            bar.set_postfix(loss=f"{loss.item():.3f}", val_acc=f"{acc:.2f}")
            if acc > best[0]:
                best = (acc, done, copy.deepcopy(model.state_dict()))
            if acc >= settings.target_accuracy:
                stopped = "target_accuracy"
                break
    bar.close()
    log.close()
    model.load_state_dict(best[2])
    model.eval()
    return TrainResult(
        model=model,
        steps=step + 1,
        history=history,
        wall_s=time.perf_counter() - started,
        best_step=best[1],
        val_accuracy=best[0],
        stopped=stopped,
    )
