"""What the zoo's three recipes (SFT, GRPO, DPO) share: the result of training, and how the
TRL ones (GRPO, DPO) configure and run their trainer.

Why: the build writes every recipe's model card from one result type, and the TRL recipes
differ only in their own arguments, not in the seeding, CPU and logging settings below.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl_circuits.zoo.progress import RecipeLog, quiet, recipe_callback


@dataclass
class TrainResult:
    """A trained model (in eval mode) and how its training went.

    `best_step`, `val_accuracy` and `stopped` are SFT's (the step whose weights it kept,
    their validation accuracy, why it stopped); `loss_type` and `loss_weights` are DPO's.
    """

    model: Any
    steps: int
    history: list[dict]
    wall_s: float
    best_step: int | None = None
    val_accuracy: float | None = None
    stopped: str | None = None
    loss_type: list[str] | None = None
    loss_weights: list[float] | None = None


@dataclass(frozen=True)
class TRLJob:
    """What a TRL recipe trains on and how it reports: the model (trained in place), its
    tokenizer and dataset, the device, a progress bar or not, the log file (JSON lines) and
    extra `TrainerCallback`s."""

    model: Any
    tokenizer: Any
    dataset: Any
    device: Any
    progress: bool
    log_path: Path | None
    callbacks: Sequence = ()


def train_with_trl(
    recipe: str,
    trl_classes: tuple[type, type],
    job: TRLJob,
    settings: Any,
    *,
    shown: tuple[str, ...],
    trainer_arguments: dict[str, Any],
    **arguments: Any,
) -> Any:
    """Train `job.model` in place with a TRL trainer; returns the trainer (its model in eval
    mode).

    `trl_classes`: the recipe's TRL (config, trainer) classes. The config gets the arguments
    every recipe shares (`settings`' seed, learning rate and beta; constant learning rate; CPU
    without bf16 or activation checkpointing; no checkpoints; a log entry every step) and the
    recipe's own `arguments`; the trainer gets `trainer_arguments` besides the job's model,
    data, tokenizer and callbacks. One progress bar (when `job.progress`, showing the logged
    values `shown`); every step's log goes to `job.log_path`.
    """
    config_class, trainer_class = trl_classes
    with tempfile.TemporaryDirectory(prefix=f"zoo-{recipe}-") as scratch:
        config = config_class(
            output_dir=scratch,
            learning_rate=settings.learning_rate,
            lr_scheduler_type="constant",
            beta=settings.beta,
            seed=settings.seed,
            data_seed=settings.seed,
            use_cpu=str(job.device) == "cpu",
            bf16=False,
            activation_checkpointing=False,
            save_strategy="no",
            report_to="none",
            logging_steps=1,
            disable_tqdm=True,
            dataloader_num_workers=0,
            **arguments,
        )
        trainer = trainer_class(
            model=job.model,
            args=config,
            train_dataset=job.dataset,
            processing_class=job.tokenizer,
            callbacks=list(job.callbacks),
            **trainer_arguments,
        )
        log = RecipeLog(job.log_path)
        quiet(trainer, recipe_callback(recipe, log, job.progress, shown))
        trainer.train()
    trainer.model.eval()
    return trainer
