"""A small SFT / GRPO / DPO model zoo trained offline on CPU: the paper's question in miniature.

`build_zoo()` generates a synthetic arithmetic word-problem task, trains a 0.8M-parameter
Qwen2 from scratch by SFT on an imperfect teacher's solutions (it converges near 81%: right
except where the teacher misreads "sells"), then post-trains two children from that SFT
checkpoint: GRPO with a correctness reward (online, TRL
`GRPOTrainer`) and DPO on preference pairs sampled once from the SFT model (offline, TRL
`DPOTrainer`, with an NLL term on the chosen answers). It registers the pairs `toy-grpo` and
`toy-dpo` for the pipeline. See `build.py` for the cache layout, `recipes.py` for the build's
training, and `sft.py`, `grpo.py`, `dpo.py` for each recipe.
"""

from __future__ import annotations

from rl_circuits.zoo.build import (
    Zoo,
    build_zoo,
    default_root,
    load_zoo,
    main,
    register_pairs,
    summary_lines,
)
from rl_circuits.zoo.config import TaskSettings, ZooConfig
from rl_circuits.zoo.dpo import DPOSettings
from rl_circuits.zoo.grpo import GRPOSettings
from rl_circuits.zoo.model import ModelShape
from rl_circuits.zoo.sft import SFTSettings

__all__ = [
    "DPOSettings",
    "GRPOSettings",
    "ModelShape",
    "SFTSettings",
    "TaskSettings",
    "Zoo",
    "ZooConfig",
    "build_zoo",
    "default_root",
    "load_zoo",
    "main",
    "register_pairs",
    "summary_lines",
]
