"""Find a checkpoint (local directory or hub id) and read its config and safetensors weights.

Nothing here knows about TransformerLens: `loading` turns what this module reads into a
HookedTransformer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rl_circuits.errors import CheckpointError

HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory on disk with its parsed `config.json`."""

    path: Path
    config: dict
    revision: str | None = None

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if not archs:
            raise CheckpointError(
                f"{self.path / 'config.json'} has no 'architectures' entry; add the Hugging Face "
                'class name, e.g. "architectures": ["LlamaForCausalLM"].'
            )
        return archs[0]


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not name.startswith((".", "/", "~"))
        and not Path(parts[0]).exists()
    )


def resolve(path_or_hub_id: str | Path, revision: str | None = None) -> Checkpoint:
    """Return the local checkpoint for a directory, or download config and weights from the hub."""
    name = str(path_or_hub_id)
    path = Path(name).expanduser()
    if not path.exists():
        if not _looks_like_hub_id(name):
            raise CheckpointError(
                f"model path {name!r} does not exist; give a checkpoint directory "
                "or a hub id such as 'org/model'."
            )
        path = _download(name, revision)
    if not path.is_dir():
        raise CheckpointError(f"model path {str(path)!r} is a file; give its directory.")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"model directory {str(path)!r} has no config.json; is it a Hugging Face checkpoint?"
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file} is not valid JSON ({exc}).") from exc
    return Checkpoint(path=path, config=config, revision=revision)


def _download(hub_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # network, auth, missing repo: one message for all
        raise CheckpointError(
            f"could not fetch {hub_id!r} (revision {revision or 'main'}) from the Hugging Face "
            f"hub: {type(exc).__name__}: {exc}. Download it elsewhere and pass its directory."
        ) from exc


def weight_files(ckpt: Checkpoint, allow_pickle: bool = False) -> list[Path]:
    """The checkpoint's weight files: safetensors, or pickle files only when allowed.

    Each safetensors file's header is checked here (no tensor is read), so a truncated or
    corrupted file is named before any model is built, whichever library loads it.
    """
    files = _indexed_shards(ckpt.path) or sorted(ckpt.path.glob("*.safetensors"))
    if files:
        for file in files:
            _check_safetensors(file)
        return files
    pickles = sorted(ckpt.path.glob("*.bin")) + sorted(ckpt.path.glob("*.pt"))
    if pickles and not allow_pickle:
        raise CheckpointError(
            f"{ckpt.path} has only pickle weights ({', '.join(p.name for p in pickles)}). "
            "Unpickling can run arbitrary code, so it is refused: convert the checkpoint to "
            "safetensors, or, if you trust its source, set model.allow_pickle = true in the run "
            "config (allow_pickle=True in Python)."
        )
    if not pickles:
        raise CheckpointError(f"{ckpt.path} has no weight files (*.safetensors).")
    return pickles


SHARD_INDEX = "model.safetensors.index.json"


def _indexed_shards(path: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index names, each required to be present."""
    index = path / SHARD_INDEX
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"{index} is not a valid shard index (a JSON object with a 'weight_map' of tensor "
            f"name -> file): {type(exc).__name__}: {exc}"
        ) from exc
    missing = [name for name in names if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{path}: shard file{'s' if len(missing) > 1 else ''} {', '.join(missing)} named in "
            f"{SHARD_INDEX} {'are' if len(missing) > 1 else 'is'} missing "
            f"({len(names) - len(missing)} of {len(names)} shards present); download "
            f"{'them' if len(missing) > 1 else 'it'} again."
        )
    return [path / name for name in names]


def _corrupted(file: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"weight file {file} is truncated or corrupted ({exc}); download it again."
    )


def _check_safetensors(file: Path) -> None:
    """Parse the header and check that the file holds every byte it declares."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            handle.keys()
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise _corrupted(file, exc) from exc


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every weight file, naming the file on any read error."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        if file.suffix != ".safetensors":
            try:
                state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CheckpointError(f"cannot read weight file {file}: {exc}") from exc
            yield from state.items()
            continue
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise _corrupted(file, exc) from exc


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a checkpoint directory, exactly as saved.

    transformers 5 replaces a generic fast tokenizer by the model family's own class (which
    rewrites its pre-tokenizer); a tokenizer saved as a generic one is loaded as one.
    """
    import transformers

    path = Path(path)
    _require_tokenizer_files(path)
    declared = None
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        declared = json.loads(config_file.read_text()).get("tokenizer_class")
    cls = (
        transformers.PreTrainedTokenizerFast
        if declared in ("TokenizersBackend", "PreTrainedTokenizerFast")
        else transformers.AutoTokenizer
    )
    try:
        tokenizer = cls.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(
            f"cannot load the tokenizer in {path}: {type(exc).__name__}: {exc}"
        ) from exc
    if len(tokenizer) < MIN_TOKENIZER_SIZE:  # a class built from defaults, not from files
        raise CheckpointError(
            f"the tokenizer in {path} has only {len(tokenizer)} token(s); its vocabulary files "
            f"are missing or empty. {_TOKENIZER_FIX}"
        )
    return tokenizer


# Files that hold a vocabulary, in the formats transformers reads (any one is enough).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
)
MIN_TOKENIZER_SIZE = 2
_TOKENIZER_FIX = (
    "Copy the tokenizer files saved with the model into the directory "
    "(tokenizer.save_pretrained(directory) writes them)."
)


def _require_tokenizer_files(path: Path) -> None:
    """Refuse a checkpoint without vocabulary files: some tokenizer classes would otherwise be
    built from their defaults with a vocabulary of one token."""
    if any((path / name).is_file() for name in TOKENIZER_FILES) or any(path.glob("*.tiktoken")):
        return
    present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    raise CheckpointError(
        f"checkpoint directory {path} has no tokenizer: none of "
        f"{', '.join(TOKENIZER_FILES)} or *.tiktoken is there (it holds "
        f"{', '.join(present) or 'nothing'}). {_TOKENIZER_FIX}"
    )
