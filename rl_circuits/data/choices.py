"""The names of the generation options (backends, end-token handling) that configs choose.

Why here: run configs check them when validated, without importing torch;
`rl_circuits.data.generation` imports them from here.
"""

from __future__ import annotations

BACKENDS: tuple[str, ...] = ("hf", "vllm")  # Hugging Face generate, or vLLM (optional extra)
# What happens to the token that ended an answer: "keep" leaves it in the answer's ids and its
# length (vLLM's token_ids, as the authors stored them); "drop" removes it.
END_TOKENS: tuple[str, ...] = ("drop", "keep")
