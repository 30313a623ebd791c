"""The zoo's tokenizer and tiny Qwen2 model, batched greedy/sampled decoding and checkpoint I/O.

The tokenizer is the character tokenizer of `rl_circuits.models.tiny`, used as Qwen2 tokenizers are:
no `<bos>` is added (the Qwen2 model map loads with `default_prepend_bos = false`), so the
zoo's training loops, TRL, the pipeline's generation (`tokenizer(prompt)`) and
TransformerLens' `to_tokens` all see the same prompt tokens. `<eos>` ends every solution.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rl_circuits.models.checkpoints import load_tokenizer
from rl_circuits.models.tiny import char_tokenizer
from rl_circuits.zoo.tasks import Problem, is_correct


@dataclass(frozen=True)
class ModelShape:
    """Size of the from-scratch Qwen2 base model (defaults: 0.81M parameters)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    rope_theta: float = 10_000.0


def make_tokenizer():
    """The character tokenizer (one token per character, no `<bos>` added)."""
    tokenizer = char_tokenizer()
    tokenizer.padding_side = "left"  # for batched generation
    return tokenizer


def init_model(shape: ModelShape, tokenizer, seed: int):
    """A randomly initialised `Qwen2ForCausalLM` (seeded)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    set_generation_defaults(model, tokenizer, max_new_tokens=64)
    return model


def set_generation_defaults(model, tokenizer, max_new_tokens: int) -> None:
    """Greedy decoding to `<eos>` by default (saved as generation_config.json)."""
    gen = model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.do_sample = False
    gen.max_new_tokens = max_new_tokens
    for key in ("temperature", "top_p", "top_k"):
        setattr(gen, key, None)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    batch_size: int = 128,
    sample: bool = False,
    temperature: float = 1.0,
    seed: int | None = None,
    progress: Callable | None = None,
) -> list[str]:
    """Completions (text after the prompt, special tokens dropped) in prompt order.

    Prompts are sorted by length so batches need little padding. Sampling draws from the
    global torch generator, seeded with `seed` when given.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if seed is not None:
        torch.manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    out: list[str] = [""] * len(prompts)
    starts = range(0, len(order), batch_size)
    for start in progress(starts) if progress else starts:
        index = order[start : start + batch_size]
        batch = tokenizer(
            [prompts[i] for i in index], return_tensors="pt", padding=True, padding_side="left"
        ).to(device)
        kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        tokens = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **(kwargs if sample else dict(do_sample=False)),
        )
        texts = tokenizer.batch_decode(
            tokens[:, batch.input_ids.shape[1] :], skip_special_tokens=True
        )
        for i, text in zip(index, texts, strict=True):
            out[i] = text
    model.train(was_training)
    return out


def correct(
    model, tokenizer, problems: Sequence[Problem], template: str, max_new_tokens: int, **kw
) -> list[bool]:
    """Per problem: is the greedy answer exactly right? (The paired test needs each one.)"""
    prompts = [template.replace("{q}", p.question) for p in problems]
    completions = generate(model, tokenizer, prompts, max_new_tokens, **kw)
    return [is_correct(c, p.answer) for c, p in zip(completions, problems, strict=True)]


def accuracy(
    model, tokenizer, problems: Sequence[Problem], template: str, max_new_tokens: int, **kw
) -> float:
    """Greedy exact-answer accuracy on `problems`."""
    hits = correct(model, tokenizer, problems, template, max_new_tokens, **kw)
    return sum(hits) / max(len(problems), 1)


def save_checkpoint(model, tokenizer, path: Path, max_new_tokens: int) -> Path:
    """`save_pretrained` (safetensors) plus the tokenizer, with greedy generation defaults."""
    path = Path(path)
    set_generation_defaults(model, tokenizer, max_new_tokens)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def load_checkpoint(path: Path, device: str | torch.device = "cpu"):
    """(model, tokenizer) from a zoo checkpoint directory."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(Path(path), dtype=torch.float32).to(device)
    return model, load_tokenizer(path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
