"""Tiny random checkpoints of each supported architecture, and a character tokenizer.

Used by the tests, `configs/tiny.toml` and the demo zoo: real Hugging Face checkpoints
(safetensors, config.json, tokenizer) that need no network.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARACTERS = string.digits + string.ascii_letters + string.punctuation + " \n"


def char_tokenizer(extra_tokens: tuple[str, ...] = ()):
    """A character-level `PreTrainedTokenizerFast` (special tokens first, then characters)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *extra_tokens, *CHARACTERS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def tiny_config(architecture: str, vocab_size: int, **overrides):
    """A 2-layer config with the family's quirks: GQA, Qwen2 qkv bias, Mistral sliding window."""
    import transformers

    base = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if architecture == "MistralForCausalLM":
        base["sliding_window"] = 6
    if architecture == "Qwen2ForCausalLM":
        base["rope_theta"] = 1_000_000.0
    base.update(overrides)
    cls = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    config = cls(**base)
    config.architectures = [architecture]
    return config


def make_tiny_checkpoint(
    path: str | Path, architecture: str = "Qwen2ForCausalLM", seed: int = 0, **overrides
) -> Path:
    """Save a randomly initialised tiny checkpoint (safetensors + tokenizer) to `path`."""
    import transformers

    path = Path(path)
    tokenizer = char_tokenizer()
    config = tiny_config(architecture, vocab_size=len(tokenizer), **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config)
    with torch.no_grad():  # HF initialises biases to zero; make the Qwen2 qkv biases matter
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
