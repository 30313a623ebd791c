"""Load a Hugging Face checkpoint into a TransformerLens HookedTransformer via `model_maps/`.

Every TransformerLens-specific line of loading lives in this module (parameter-name facts, such
as grouped-query attention's `_W_K`, in `rl_circuits.engine.tl_compat`): the per-architecture
maps say how `config.json` becomes a `HookedTransformerConfig` and which weight conversion applies.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import einops
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from rl_circuits.engine.tl_compat import BIAS_PARAMETER, QKV_BIAS_PARAMETER
from rl_circuits.errors import CheckpointError, ConfigError
from rl_circuits.models.checkpoints import (
    Checkpoint,
    iter_tensors,
    load_tokenizer,
    resolve,
    weight_files,
)
from rl_circuits.models.choices import DTYPE_NAMES
from rl_circuits.resources import resource_dir

DEFAULT_MAX_SEQ_LEN = 2048
# Tensors some checkpoints carry that the model recomputes.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class ModelMap:
    """One `model_maps/*.toml`: config field mapping, fixed values and weight conversion."""

    architecture: str
    config: dict
    fixed: dict
    weights: dict
    qkv_bias: bool
    sliding_window: str
    source: Path


@cache
def model_maps() -> dict[str, ModelMap]:
    """All model maps, keyed by Hugging Face architecture name."""
    root = resource_dir("model_maps")
    maps = {}
    for file in sorted(root.glob("*.toml")):
        raw = tomllib.loads(file.read_text())
        if "architecture" not in raw:
            continue  # pairs.toml and other registries
        conversion = tomllib.loads((root / "conversions" / f"{raw['conversion']}.toml").read_text())
        maps[raw["architecture"]] = ModelMap(
            architecture=raw["architecture"],
            config=raw["config"],
            fixed=raw.get("fixed", {}),
            weights=conversion["weights"],
            qkv_bias=raw.get("qkv_bias", False),
            sliding_window=raw.get("sliding_window", "none"),
            source=file,
        )
    return maps


def model_map_for(ckpt: Checkpoint) -> ModelMap:
    """The map of the checkpoint's architecture (read from config.json, never from its name)."""
    maps = model_maps()
    arch = ckpt.architecture
    if arch not in maps:
        raise CheckpointError(
            f"unsupported architecture {arch!r} in {ckpt.path / 'config.json'}; supported: "
            f"{', '.join(sorted(maps))}. Add a map in model_maps/ to support it."
        )
    return maps[arch]


def _lookup(config: dict, keys: str | list[str]):
    for key in [keys] if isinstance(keys, str) else keys:
        value = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


def hooked_config(
    ckpt: Checkpoint,
    model_map: ModelMap,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    n_devices: int = 1,
    max_seq_len: int | None = None,
) -> HookedTransformerConfig:
    """Translate the checkpoint's config.json into a HookedTransformerConfig through its map."""
    hf = ckpt.config
    fields = {name: _lookup(hf, keys) for name, keys in model_map.config.items()}
    n_heads = fields["n_heads"]
    fields["d_head"] = fields["d_head"] or fields["d_model"] // n_heads
    fields["rotary_base"] = fields["rotary_base"] or 10000.0
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise CheckpointError(
            f"{ckpt.path}: rope type {rope_type!r} is not supported by the "
            f"{model_map.architecture} map ({model_map.source.name}); only plain rotary "
            "embeddings are."
        )
    missing = [name for name, value in fields.items() if value is None]
    if missing:
        raise CheckpointError(
            f"{ckpt.path / 'config.json'} lacks {', '.join(missing)} "
            f"(keys {[model_map.config[m] for m in missing]} in {model_map.source.name})."
        )
    limit = hf.get("max_position_embeddings") or DEFAULT_MAX_SEQ_LEN
    n_ctx = min(max_seq_len or DEFAULT_MAX_SEQ_LEN, limit)
    fields.update(model_map.fixed)
    fields.update(
        n_ctx=n_ctx,
        rotary_dim=fields["d_head"],
        original_architecture=model_map.architecture,
        model_name=ckpt.path.name,
        dtype=dtype,
        device=str(device),
        n_devices=n_devices,
        init_weights=False,
    )
    fields.update(_local_attention(hf, model_map, n_ctx, fields["n_layers"]))
    return HookedTransformerConfig(**fields)


def _local_attention(hf: dict, model_map: ModelMap, n_ctx: int, n_layers: int) -> dict:
    window = hf.get("sliding_window")
    if model_map.sliding_window == "none" or not window or window >= n_ctx:
        return {}  # a window at least as long as the context changes nothing
    if model_map.sliding_window == "all":
        types = ["local"] * n_layers
    else:  # per-layer types, as Qwen2 declares them
        if not hf.get("use_sliding_window"):
            return {}
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if i >= hf.get("max_window_layers", 0) else "full_attention"
            for i in range(n_layers)
        ]
        types = ["local" if t == "sliding_attention" else "global" for t in layer_types]
    if "local" not in types:
        return {}
    return {"use_local_attn": True, "window_size": int(window), "attn_types": types}


_LAYOUTS = {
    "copy": lambda t, cfg: t,
    "transpose": lambda t, cfg: t.T,
    "q_heads": lambda t, cfg: einops.rearrange(t, "(n h) m -> n m h", n=cfg.n_heads),
    "kv_heads": lambda t, cfg: einops.rearrange(t, "(n h) m -> n m h", n=cfg.n_key_value_heads),
    "o_heads": lambda t, cfg: einops.rearrange(t, "m (n h) -> n h m", n=cfg.n_heads),
    "q_bias": lambda t, cfg: einops.rearrange(t, "(n h) -> n h", n=cfg.n_heads),
    "kv_bias": lambda t, cfg: einops.rearrange(t, "(n h) -> n h", n=cfg.n_key_value_heads),
}


def weight_table(model_map: ModelMap, n_layers: int) -> dict[str, tuple[str, dict]]:
    """Hugging Face tensor name -> (TransformerLens parameter name, entry)."""
    table = {}
    for tl_name, entry in model_map.weights.items():
        layers = range(n_layers) if "{l}" in tl_name else [None]
        for layer in layers:
            hf_name = entry["hf"].replace("{l}", str(layer))
            table[hf_name] = (tl_name.replace("{l}", str(layer)), entry)
    return table


def load_weights(
    model: HookedTransformer, ckpt: Checkpoint, model_map: ModelMap, files: list[Path]
):
    """Copy the checkpoint's tensors into `model` one at a time (no second copy of the model)."""
    cfg = model.cfg
    params = dict(model.named_parameters())
    table = weight_table(model_map, cfg.n_layers)
    filled: set[str] = set()
    for hf_name, tensor in iter_tensors(files):
        if hf_name not in table:
            if _IGNORED.match(hf_name):
                continue
            raise CheckpointError(
                f"{ckpt.path}: tensor {hf_name!r} has no place in the {model_map.architecture} map "
                f"({model_map.source.name}); the checkpoint does not match its architecture."
            )
        tl_name, entry = table[hf_name]
        _copy(params, tl_name, _LAYOUTS[entry["layout"]](tensor, cfg), hf_name, ckpt)
        filled.add(tl_name)
    if "unembed.W_U" not in filled and ckpt.config.get("tie_word_embeddings"):
        params["unembed.W_U"].data.copy_(params["embed.W_E"].data.T)
        filled.add("unembed.W_U")
    required = {
        tl_name
        for tl_name, entry in table.values()
        if not entry.get("optional") or (model_map.qkv_bias and QKV_BIAS_PARAMETER.search(tl_name))
    }
    missing = sorted(required - filled)
    if missing:
        raise CheckpointError(
            f"{ckpt.path}: weights missing from the checkpoint: {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    for name, param in params.items():  # biases the family does not have
        if name not in filled:
            if not BIAS_PARAMETER.search(name):
                raise CheckpointError(f"{ckpt.path}: no weight fills parameter {name!r}.")
            param.data.zero_()


def _copy(params, tl_name: str, tensor: torch.Tensor, hf_name: str, ckpt: Checkpoint):
    param = params[tl_name]
    if tuple(param.shape) != tuple(tensor.shape):
        raise CheckpointError(
            f"{ckpt.path}: tensor {hf_name!r} has shape {tuple(tensor.shape)} but "
            f"{tl_name} needs {tuple(param.shape)}; config.json and the weights disagree."
        )
    param.data.copy_(tensor.to(param.dtype))


def _checked_tokenizer(ckpt: Checkpoint, d_vocab: int):
    tokenizer = load_tokenizer(ckpt.path)
    if len(tokenizer) > d_vocab:
        raise CheckpointError(
            f"tokenizer in {ckpt.path} has {len(tokenizer)} tokens but the model's embedding has "
            f"only {d_vocab} rows; the tokenizer does not belong to this model."
        )
    return tokenizer


def tokenizer_size_note(n_tokens: int, d_vocab: int, ratio: float = 0.5) -> str | None:
    """A warning when the tokenizer covers under `ratio` of the embedding's rows.

    Padding a vocabulary to a multiple of 64 or 128 leaves a few hundred unused rows; a
    tokenizer far smaller than the embedding is more likely another model's.
    """
    if n_tokens >= ratio * d_vocab:
        return None
    return (
        f"the tokenizer has {n_tokens} tokens but the embedding has {d_vocab} rows "
        f"({n_tokens / d_vocab:.0%}); check that the tokenizer files belong to this model"
    )


def _attach_tokenizer(model: HookedTransformer, tokenizer) -> None:
    """Use the checkpoint's tokenizer as saved (TransformerLens would reload it by class)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.tokenizer = tokenizer
    model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0


def load_model(
    path_or_hub_id: str | Path,
    *,
    revision: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    n_devices: int = 1,
    max_seq_len: int | None = None,
    allow_pickle: bool = False,
    fold_ln: bool = False,
    center_unembed: bool = False,
) -> HookedTransformer:
    """Load a checkpoint as a HookedTransformer with raw (unprocessed) weights.

    `dtype` is a torch dtype or its name as configs write it (`as_dtype`). `max_seq_len` sets
    n_ctx (default 2048, capped by the checkpoint's limit): TransformerLens allocates an
    n_ctx x n_ctx mask per layer. `fold_ln` and `center_unembed` reparametrise the
    model without changing its function, the residual stream or any edge score (the value
    bias b_V stays with its head, as the heads graph needs); other processing (centring
    writing weights) would change scores and is not offered.
    """
    dtype = as_dtype(dtype)
    device = check_device(device)
    ckpt = resolve(path_or_hub_id, revision)
    model_map = model_map_for(ckpt)
    files = weight_files(ckpt, allow_pickle=allow_pickle)
    cfg = hooked_config(
        ckpt, model_map, dtype=dtype, device=device, n_devices=n_devices, max_seq_len=max_seq_len
    )
    tokenizer = _checked_tokenizer(ckpt, cfg.d_vocab)
    build_device = torch.device(device) if n_devices == 1 else torch.device("cpu")
    with build_device:
        model = HookedTransformer(cfg, move_to_device=False)
    _attach_tokenizer(model, tokenizer)
    load_weights(model, ckpt, model_map, files)
    if n_devices > 1:
        model.move_model_modules_to_device()
    if fold_ln or center_unembed:
        # b_V stays with its head: folded into b_O it would belong to no head of the heads graph
        model.load_and_process_state_dict(
            model.state_dict(),
            fold_ln=fold_ln,
            center_writing_weights=False,
            center_unembed=center_unembed,
            fold_value_biases=False,
            refactor_factored_attn_matrices=False,
        )
    model.checkpoint_max_positions = ckpt.config.get("max_position_embeddings")
    model.eval()
    return model


# The dtypes a model loads in, by the name configs write (`model.dtype`).
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from itself or its name as configs write it ("float32", "bfloat16")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.removeprefix("torch.") if isinstance(dtype, str) else None
    if name not in DTYPES:
        raise ConfigError(
            f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)} (or the torch dtype)"
        )
    return DTYPES[name]


def check_device(device: str | torch.device | None) -> str | torch.device:
    """The device to use ("auto"/None: cuda if available, else cpu), refused clearly when it
    is no torch device or its backend is not available here."""
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"device {device!r} is not a torch device; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r}: this torch has no usable CUDA GPU (torch {torch.__version__}, "
            f"cuda build {torch.version.cuda}); use device = 'cpu' or 'auto', or install a "
            "CUDA build of torch on a GPU machine"
        )
    if parsed.type == "cuda" and parsed.index is not None:
        if parsed.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r}: MPS is not available here; use 'cpu' or 'auto'")
    return device
