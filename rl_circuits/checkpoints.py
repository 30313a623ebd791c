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
    files = sorted(ckpt.path.glob("*.safetensors"))
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
        return cls.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(
            f"cannot load the tokenizer in {path}: {type(exc).__name__}: {exc}"
        ) from exc
