"""The dtypes a model loads in (`model.dtype`) and weights are compared in (`weights.dtype`).

Why here: run configs check them when validated, without importing torch or TransformerLens;
`rl_circuits.models.loading.DTYPES` maps each name to its torch dtype.
"""

from __future__ import annotations

DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")
# `weights.dtype = "saved"` compares each tensor in the dtype both checkpoints store it in.
SAVED = "saved"
WEIGHT_DTYPES: tuple[str, ...] = (SAVED, *DTYPE_NAMES)
