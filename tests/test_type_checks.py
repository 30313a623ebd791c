"""The hints are checked while the tests run: pyproject's addopts install jaxtyping's import hook
with beartype for the packages named there, so a call that breaks a hint (a shape, a dtype)
fails in any test instead of passing unnoticed."""

from __future__ import annotations

import jaxtyping
import numpy as np
import pytest
import torch
from checker import unchecked

from rl_circuits.analysis.metrics import activation_intensity
from rl_circuits.engine.attribution import masked_nll
from rl_circuits.models.weight_diff import effective_rank
from rl_circuits.pipeline.common import in_shard


def _mismatched() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits with one position more than the tokens: `masked_nll` itself does not notice."""
    logits = torch.zeros(2, 5, 7)
    tokens = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[:, 0] = False
    return logits, tokens, mask


def test_a_wrong_shape_in_the_engine_is_refused_by_the_checker():
    logits, tokens, mask = _mismatched()
    with pytest.raises(jaxtyping.TypeCheckError, match="masked_nll"):
        masked_nll(logits, tokens, mask)
    with unchecked():  # what runs without the checker: a loss, from the wrong positions
        assert masked_nll(logits, tokens, mask).shape == (2,)


def test_a_wrong_dtype_in_the_analysis_is_refused_by_the_checker():
    counts = np.ones((2, 3, 4), dtype=np.int64)  # the hint asks for float scores
    with pytest.raises(jaxtyping.TypeCheckError, match="activation_intensity"):
        activation_intensity(counts)
    with unchecked():
        assert activation_intensity(counts) == 1.0


def test_a_wrong_shape_in_the_models_is_refused_by_the_checker():
    matrix = np.eye(3)  # the hint asks for singular values, one axis
    with pytest.raises(jaxtyping.TypeCheckError, match="effective_rank"):
        effective_rank(matrix)
    with unchecked():  # a rank of the flattened matrix's entries
        assert effective_rank(matrix) == pytest.approx(3.0)


def test_a_wrong_type_in_the_pipeline_is_refused_by_the_checker():
    with pytest.raises(jaxtyping.TypeCheckError, match="in_shard"):
        in_shard(3.0, (1, 2))
    with unchecked():
        assert in_shard(3.0, (1, 2))
