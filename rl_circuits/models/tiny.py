"""Tiny random checkpoints of each supported architecture, and a character tokenizer.

Used by the tests, `configs/tiny.toml` and the demo zoo: real Hugging Face checkpoints
(safetensors, config.json, tokenizer) that need no network.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARACTERS = string.digits + string.ascii_letters + string.punctuation + " \n"


def char_tokenizer(extra_tokens: tuple[str, ...] = ()):
    """A character-level `PreTrainedTokenizerFast` (special tokens first, then characters).

    Built the way transformers builds a Qwen2 tokenizer (NFC, Qwen2's split regex, byte-level
    alphabet, BPE) but with no merges, so every character is one token. transformers 5's
    `AutoTokenizer` rebuilds any Qwen2 checkpoint's tokenizer as `Qwen2Tokenizer` from the saved
    vocabulary; built this way, that rebuild is this exact tokenizer (a word-level tokenizer
    would lose its spaces). Characters outside `CHARACTERS` are dropped, as `Qwen2Tokenizer`
    drops them (it has no unknown token).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_char = _byte_level_alphabet()
    symbols = [*SPECIAL_TOKENS, *extra_tokens, *(byte_char[ord(c)] for c in CHARACTERS)]
    vocab = {tok: i for i, tok in enumerate(symbols)}
    core = Tokenizer(models.BPE(vocab, [], unk_token=None, fuse_unk=False, byte_fallback=False))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


# transformers' Qwen2Tokenizer pre-tokenizer regex (models/qwen2/tokenization_qwen2.py)
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (space -> "\u0120", newline -> "\u010a")."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    return {
        **{b: chr(b) for b in printable},
        **{b: chr(256 + i) for i, b in enumerate(extra)},
    }


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
    path: str | Path,
    architecture: str = "Qwen2ForCausalLM",
    seed: int = 0,
    answer: str | None = None,
    **overrides,
) -> Path:
    """Save a tiny checkpoint (safetensors + tokenizer) to `path`.

    Random weights; with `answer`, briefly trained to reply `answer` to any question, so that
    a pipeline run on it has questions answered correctly.
    """
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
    if answer is not None:
        _fit_answer(model, tokenizer, answer, seed)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _fit_answer(model, tokenizer, answer: str, seed: int, steps: int = 150) -> None:
    """Teach the model to reply `answer` + end-of-sequence after any `Q: ...?\nA:` prompt."""
    gen = torch.Generator().manual_seed(seed)
    target = tokenizer(answer).input_ids + [tokenizer.eos_token_id]
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        rows = []
        for _ in range(8):
            n = int(torch.randint(3, 12, (1,), generator=gen))
            chars = "".join(CHARACTERS[int(i)] for i in torch.randint(0, 62, (n,), generator=gen))
            rows.append(tokenizer(f"Q: {chars}?\nA:").input_ids)
        width = max(map(len, rows)) + len(target)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        labels = torch.full_like(ids, -100)
        for i, prompt in enumerate(rows):
            seq = prompt + target
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(prompt) : len(seq)] = torch.tensor(target)
        loss = model(input_ids=ids, labels=labels).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval()


# The questions of the tiny run's dataset 'sevens' (GSM8K format): five answers are 7.
TINY_QUESTIONS = (
    ("What is 3+4", 7),
    ("What is 2+5", 7),
    ("What is 9-2", 7),
    ("What is 1+6", 7),
    ("What is 14/2", 7),
    ("What is 2+2", 4),
)


def write_tiny_models(directory: str | Path) -> list[Path]:
    """Write what `configs/tiny.toml` runs on: `before/`, `after/` and `data/sevens/test.jsonl`.

    Two tiny Qwen2 checkpoints trained to answer 7 in different words, so that a run on them has
    correct answers of different lengths. Returns the paths written.
    """
    from rl_circuits.errors import ConfigError

    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"tiny-models: {str(out)!r} is a file; name a directory (it is created if absent)"
        )
    data = out / "data" / "sevens"
    targets = (out / "before", out / "after", data / "test.jsonl")
    taken = [p for p in targets if p.exists() and not (p.is_dir() and not any(p.iterdir()))]
    if taken:  # never replace files this call did not write
        raise ConfigError(
            f"tiny-models: {', '.join(map(str, taken))} already exist"
            f"{'s' if len(taken) == 1 else ''} in {out}; nothing was written: remove "
            f"{'it' if len(taken) == 1 else 'them'} or name another directory"
        )
    written = []
    for role, seed, answer in (
        ("before", 1, "3+4 is 7, so \\boxed{7}"),
        ("after", 2, "We add: 3+4 = 7. The total is \\boxed{7}"),
    ):
        written.append(
            make_tiny_checkpoint(out / role, "Qwen2ForCausalLM", seed=seed, answer=answer)
        )
    data.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"question": q, "answer": f"#### {a}"}) for q, a in TINY_QUESTIONS]
    (data / "test.jsonl").write_text("\n".join(lines) + "\n")
    written.append(data / "test.jsonl")
    return written
