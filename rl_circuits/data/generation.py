"""Let a model answer questions: greedy (or sampled) generation with Hugging Face or vLLM.

An answer ends at the first end token: the tokenizer's EOS, any id of `eos_token_id` in the
checkpoint's generation_config.json, or an entry of the pair's `stop` list (a string such as
"<|im_end|>", or a token id). Both backends cut their output with the same function, so they
agree. Each result keeps the prompt text, its token ids, the answer's token ids and text, why
generation stopped ("stop": an end token, "length": the token limit) and which token ended
it (`end_token_id`, `end_text`). With `keep_end_token` the answer's ids include that token
(vLLM's `token_ids`, which the authors stored and counted); otherwise it is dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rl_circuits.errors import CheckpointError, ConfigError
from rl_circuits.models.checkpoints import load_tokenizer, resolve, weight_files


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 8
    stop: tuple[str | int, ...] = ()
    keep_end_token: bool = False


@dataclass(frozen=True)
class EndTokens:
    """What ends an answer: token ids, and strings that are not a single token."""

    ids: frozenset[int]
    strings: tuple[str, ...]


def checkpoint_eos_ids(path: str | Path) -> list[int]:
    """The `eos_token_id` entries of a checkpoint's generation_config.json (int or list)."""
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return []
    try:
        value = json.loads(file.read_text()).get("eos_token_id")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from exc
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def end_tokens(tokenizer, checkpoint_ids=(), stop=()) -> EndTokens:
    """The end tokens of a model: its EOS, its generation-config ids, and the pair's `stop`
    entries; a stop string that is one token of the vocabulary becomes that token's id."""
    ids = {int(i) for i in checkpoint_ids}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    strings = []
    vocab = tokenizer.get_vocab()
    for entry in stop:
        if isinstance(entry, int):
            ids.add(entry)
        elif entry in vocab:
            ids.add(int(vocab[entry]))
        else:
            strings.append(entry)
    return EndTokens(frozenset(ids), tuple(strings))


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
        self.checkpoint_ids = checkpoint_eos_ids(ckpt.path)

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids

    def generate(self, prompts: Sequence[str], settings: GenerationSettings) -> Iterator[dict]:
        """Yield one result per prompt, in order."""
        ends = end_tokens(self.tokenizer, self.checkpoint_ids, settings.stop)
        extra = {"stop_strings": list(ends.strings), "tokenizer": self.tokenizer}
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
                    eos_token_id=sorted(ends.ids),
                    **(extra if ends.strings else {}),
                )
            for prompt, prompt_ids, row in zip(batch, ids, out[:, width:].tolist(), strict=True):
                yield _result(prompt, prompt_ids, row, ends, self.tokenizer, settings)


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
        self.checkpoint_ids = checkpoint_eos_ids(ckpt.path)
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

        ends = end_tokens(self.tokenizer, self.checkpoint_ids, settings.stop)
        params = SamplingParams(
            temperature=settings.temperature,
            max_tokens=settings.max_new_tokens,
            seed=settings.seed,
            stop=list(ends.strings) or None,
            stop_token_ids=sorted(ends.ids),
        )
        ids = [self.encode(p) for p in prompts]
        outputs = self.llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
        for prompt, prompt_ids, out in zip(prompts, ids, outputs, strict=True):
            generated = list(out.outputs[0].token_ids)
            yield _result(prompt, prompt_ids, generated, ends, self.tokenizer, settings)


def _end_position(generated: list[int], ends: EndTokens, tokenizer) -> int | None:
    """Index of the token that ends the answer: the first end id, or the token that completes
    the first stop string (found by bisection on decoded prefixes); None if none does."""
    first_id = next((i for i, t in enumerate(generated) if t in ends.ids), None)
    if ends.strings:
        limit = len(generated) if first_id is None else first_id
        decode = lambda n: tokenizer.decode(generated[:n], skip_special_tokens=False)  # noqa: E731
        if any(s in decode(limit) for s in ends.strings):
            low, high = 1, limit  # the shortest prefix whose text holds a stop string
            while low < high:
                middle = (low + high) // 2
                if any(s in decode(middle) for s in ends.strings):
                    high = middle
                else:
                    low = middle + 1
            return low - 1
    return first_id


def _result(
    prompt: str,
    prompt_ids: list[int],
    generated: list[int],
    ends: EndTokens,
    tokenizer,
    settings: GenerationSettings,
) -> dict:
    """Cut the answer at its end token (kept or dropped) and drop everything after it."""
    end = _end_position(generated, ends, tokenizer)
    end_id = None if end is None else generated[end]
    if end is not None:
        generated = generated[: end + 1] if settings.keep_end_token else generated[:end]
    text = tokenizer.decode(generated, skip_special_tokens=True)
    for marker in ends.strings:  # a stop string never shows in the answer text
        text = text.split(marker)[0]
    return {
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "answer_ids": generated,
        "answer": text,
        "finish_reason": "length" if end is None else "stop",
        "end_token_id": end_id,
        "end_text": None if end_id is None else tokenizer.decode([end_id]),
    }


def make_generator(backend: str, path: str, **kwargs):
    if backend == "vllm":
        return VLLMGenerator(path, **kwargs)
    return HFGenerator(path, **kwargs)
