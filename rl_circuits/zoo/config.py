"""`ZooConfig`: every knob and seed of a zoo build, and the hash that names its cache folder.

The config is a frozen dataclass of frozen dataclasses (task, model shape, one block per
recipe), so it hashes to a stable digest: a zoo is cached under
`<home>/zoo/<digest>/` and rebuilt only when a field changes. `reduced()` is the same build
with smaller data and fewer steps, for tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields

from rl_circuits.zoo.dpo import DPOSettings
from rl_circuits.zoo.grpo import GRPOSettings
from rl_circuits.zoo.model import ModelShape
from rl_circuits.zoo.sft import SFTSettings

# Bump when the build code changes what a given config produces (invalidates cached zoos).
ZOO_FORMAT = 4


@dataclass(frozen=True)
class TaskSettings:
    """The synthetic task: split sizes, number ranges, prompt template and answer budget."""

    seed: int = 0
    train_size: int = 20_000
    validation_size: int = 200
    test_size: int = 300
    max_amount: int = 9
    max_operand: int = 4
    step_weights: tuple[float, ...] = (0.5, 0.5)
    template: str = "Q: {q}\nA: "
    max_new_tokens: int = 40


@dataclass(frozen=True)
class ZooConfig:
    """All knobs of a zoo build (seeds included); see the recipe modules for each block."""

    task: TaskSettings = field(default_factory=TaskSettings)
    model: ModelShape = field(default_factory=ModelShape)
    init_seed: int = 0
    sft: SFTSettings = field(default_factory=SFTSettings)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    dpo: DPOSettings = field(default_factory=DPOSettings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> ZooConfig:
        """Inverse of `to_dict`; unknown keys are an error (a typo must not go unnoticed)."""
        kinds = {f.name: f for f in fields(cls)}
        unknown = set(raw) - set(kinds)
        if unknown:
            raise ValueError(f"unknown zoo config keys: {', '.join(sorted(unknown))}")
        values = {}
        for name, value in raw.items():
            default = getattr(cls(), name)
            if dataclasses.is_dataclass(default):
                known = {f.name for f in fields(default)}
                bad = set(value) - known
                if bad:
                    listed = ", ".join(sorted(bad))
                    raise ValueError(f"unknown keys in zoo config [{name}]: {listed}")
                value = dataclasses.replace(
                    default, **{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
                )
            values[name] = value
        return cls(**values)

    def digest(self) -> str:
        """Short sha256 of the config (and `ZOO_FORMAT`): the cache folder name."""
        text = json.dumps({"format": ZOO_FORMAT, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def reduced(self) -> ZooConfig:
        """A test-sized zoo: a 0.1M-parameter model on one-step problems, few steps per recipe.

        It checks that every recipe runs and moves the model (SFT to about 30% in 300 steps),
        not that it reaches the full zoo's accuracies.
        """
        return dataclasses.replace(
            self,
            task=dataclasses.replace(
                self.task,
                train_size=8000,
                validation_size=64,
                test_size=64,
                step_weights=(1.0,),
            ),
            model=dataclasses.replace(
                self.model, hidden_size=64, intermediate_size=192, num_hidden_layers=2
            ),
            sft=dataclasses.replace(
                self.sft,
                max_steps=300,
                learning_rate=5e-3,
                warmup_steps=30,
                eval_every=50,
                min_steps=200,
                eval_size=64,
                target_accuracy=0.3,
            ),
            grpo=dataclasses.replace(self.grpo, steps=4, prompts_per_step=4, train_prompts=64),
            dpo=dataclasses.replace(self.dpo, pair_prompts=48, epochs=1, batch_size=8),
        )
