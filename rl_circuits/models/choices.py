"""The names of the dtypes a model loads in, as configs write them (`model.dtype`).

Why here: run configs check them when validated, without importing torch or TransformerLens;
`rl_circuits.models.loading.DTYPES` maps each name to its torch dtype.
"""

from __future__ import annotations

DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")
