"""Let a model answer questions: greedy (or sampled) generation with Hugging Face or vLLM.

Each result keeps the prompt text, its token ids, the answer's token ids and text, and why
generation stopped ("stop": end-of-sequence token, "length": hit the token limit).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from rl_circuits.checkpoints import load_tokenizer, resolve, weight_files
from rl_circuits.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 8


class HFGenerator:
    """Batched `generate` with left padding; weights from safetensors, no remote code."""

    def __init__(
        self, path: str, *, revision=None, dtype=torch.float32, device="cpu", allow_pickle=False
    ):
        from transformers import AutoModelForCausalLM

        ckpt = resolve(path, revision)
        use_safetensors = weight_files(ckpt, allow_pickle)[0].suffix == ".safetensors"
        self.tokenizer = load_tokenizer(ckpt.path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                str(ckpt.path),
                dtype=dtype,
                use_safetensors=use_safetensors,
                trust_remote_code=False,
            ).to(device)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise CheckpointError(
                f"transformers cannot load the checkpoint {ckpt.path} for generation: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        rows = self.model.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > rows:
            raise CheckpointError(
                f"tokenizer in {ckpt.path} has {len(self.tokenizer)} tokens but the model's "
                f"embedding has only {rows} rows; the tokenizer does not belong to this model."
            )
        self.model.eval()
        self.device = device

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids

    def generate(self, prompts: Sequence[str], settings: GenerationSettings) -> Iterator[dict]:
        """Yield one result per prompt, in order."""
        eos = self.tokenizer.eos_token_id
        for start in range(0, len(prompts), settings.batch_size):
            batch = list(prompts[start : start + settings.batch_size])
            ids = [self.encode(p) for p in batch]
            width = max(map(len, ids))
            pad = self.tokenizer.pad_token_id
            tokens = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=self.device)
            attention = torch.tensor(
                [[0] * (width - len(i)) + [1] * len(i) for i in ids], device=self.device
            )
            sample = settings.temperature > 0
            if sample:
                torch.manual_seed(settings.seed + start)
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=tokens,
                    attention_mask=attention,
                    max_new_tokens=settings.max_new_tokens,
                    do_sample=sample,
                    temperature=settings.temperature if sample else None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=pad,
                    eos_token_id=eos,
                )
            for prompt, prompt_ids, row in zip(batch, ids, out[:, width:].tolist(), strict=True):
                yield _result(prompt, prompt_ids, row, eos, self.tokenizer)


class VLLMGenerator:
    """vLLM for real runs on GPUs (`pip install rl-circuits[vllm]`); data-parallel over GPUs
    with `data_parallel_size`, tensor-parallel with `tensor_parallel_size`."""

    def __init__(
        self,
        path: str,
        *,
        revision=None,
        dtype=torch.bfloat16,
        device="cuda",
        allow_pickle=False,
        tensor_parallel_size: int = 1,
    ):
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ConfigError(
                "generate.backend = 'vllm' needs vLLM: pip install 'rl-circuits[vllm]'"
            ) from exc
        ckpt = resolve(path, revision)
        weight_files(ckpt, allow_pickle)
        self.tokenizer = load_tokenizer(ckpt.path)
        self.llm = LLM(
            model=str(ckpt.path),
            dtype=str(dtype).removeprefix("torch."),
            trust_remote_code=False,
            tensor_parallel_size=tensor_parallel_size,
            seed=0,
        )

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids

    def generate(self, prompts: Sequence[str], settings: GenerationSettings) -> Iterator[dict]:
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=settings.temperature,
            max_tokens=settings.max_new_tokens,
            seed=settings.seed,
        )
        ids = [self.encode(p) for p in prompts]
        outputs = self.llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
        eos = self.tokenizer.eos_token_id
        for prompt, prompt_ids, out in zip(prompts, ids, outputs, strict=True):
            yield _result(prompt, prompt_ids, list(out.outputs[0].token_ids), eos, self.tokenizer)


def _result(prompt: str, prompt_ids: list[int], generated: list[int], eos, tokenizer) -> dict:
    """Cut the answer at the first end-of-sequence token (dropped, and padding after it)."""
    finish = "length"
    if eos is not None and eos in generated:
        generated = generated[: generated.index(eos)]
        finish = "stop"
    return {
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "answer_ids": generated,
        "answer": tokenizer.decode(generated, skip_special_tokens=True),
        "finish_reason": finish,
    }


def make_generator(backend: str, path: str, **kwargs):
    if backend == "vllm":
        return VLLMGenerator(path, **kwargs)
    return HFGenerator(path, **kwargs)
