"""What a zoo build shows while it trains: one progress bar per recipe, full logs in a file.

TRL's trainers print every logging step as a raw Python dict (`PrinterCallback`, or
`ProgressCallback` when tqdm is on). A build replaces both with `RecipeProgress`: one tqdm bar
per recipe (SFT, GRPO, DPO), and each log entry written as one JSON line to
`<zoo>/logs/<recipe>.jsonl`, the file the recipe's summary line names.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO


class RecipeLog:
    """Append-only JSON-lines log of one recipe's training (`None` path: discard)."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None
        self._handle: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("w")

    def write(self, entry: dict) -> None:
        if self._handle is not None:
            self._handle.write(json.dumps(entry, default=float) + "\n")
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def recipe_callback(desc: str, log: RecipeLog, progress: bool, shown: tuple[str, ...]):
    """A `TrainerCallback`: a tqdm bar over the run's steps; each log entry to `log`.

    `shown` names the logged values the bar displays (e.g. `("reward",)`).
    """
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class RecipeProgress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc=desc, disable=not progress, leave=False)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            log.write({"step": state.global_step, **logs})
            if self.bar is not None:
                values = {k: f"{logs[k]:.3f}" for k in shown if isinstance(logs.get(k), float)}
                if values:
                    self.bar.set_postfix(values, refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
            log.close()

    return RecipeProgress()


def quiet(trainer, callback) -> None:
    """Swap a trainer's dict printers (`PrinterCallback`, `ProgressCallback`) for `callback`."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(callback)


@contextlib.contextmanager
def library_output_off() -> Iterator[None]:
    """Silence what the libraries print during a build, restoring their settings afterwards.

    transformers' weight loading/writing bars, datasets' `map` bars (TRL tokenising its
    dataset) and the deprecation warning about TRL's `gradient_checkpointing` default would
    otherwise interleave with the recipes' bars.
    """
    import datasets
    from transformers.utils import logging as hf_logging

    hf_bars = hf_logging.is_progress_bar_enabled()
    ds_bars = datasets.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*gradient_checkpointing.*", category=FutureWarning
            )
            yield
    finally:
        if hf_bars:
            hf_logging.enable_progress_bar()
        if ds_bars:
            datasets.enable_progress_bars()
