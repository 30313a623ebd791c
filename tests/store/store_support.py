"""Helpers shared by the store tests: a config, a child Python process, temp-file listing and
sample edge scores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from rl_circuits.engine.scores import EdgeScores

REPO = Path(__file__).resolve().parents[2]
CONFIG = {"model": "base", "select": {"beta": 0.5, "k": 3}, "layers": [1, 2]}


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-c", code, *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def all_names(root: Path) -> list[str]:
    """Every file and directory name under root, hidden ones included."""
    names = []
    for _directory, dirs, files in os.walk(root):
        names += dirs + files
    return names


def temp_files(root: Path) -> list[str]:
    return [name for name in all_names(root) if ".tmp-" in name]


def make_scores(n: int, seed: int = 0, **fields) -> EdgeScores:
    """`n` questions' random scores over a 3 x 4 node graph, ids "q<seed>-<i>"."""
    gen = torch.Generator().manual_seed(seed)
    base = dict(
        values=torch.randn(n, 3, 4, generator=gen),
        ids=[f"q{seed}-{i}" for i in range(n)],
        upstream=("embed", "a0.h0", "m0"),
        downstream=("a1.h0.q", "a1.h0.k", "m1", "logits"),
        edge_mask=torch.rand(3, 4, generator=gen) > 0.3,
        meta={"metric": "logit_diff", "note": "é", "layers": [0, 1]},
    )
    return EdgeScores(**{**base, **fields})
