"""Every TransformerLens internal the project relies on: the one file to port to TransformerLens 4.

Written for TransformerLens 3.9 (`HookedTransformer`); `tests/engine/test_tl_compat.py` checks
each fact below against the installed version. The rest of the project uses only TransformerLens's
public API (HookedTransformer, its public hook-point names, public `cfg` fields and weight
properties) and calls this module for everything else. It owns:

* `WRITTEN_FOR`, `installed_version`: the TransformerLens version these facts were read from.
* `LN1_CALLS`: `TransformerBlock.forward` calls `ln1` three times, for the query, key and value
  inputs in that order (also with `use_split_qkv_input`); the graphs' norm-input sites count on it.
* `ungrouped_kv`: the `cfg` flags toggled while attributing (`ungroup_grouped_query_attention`,
  `use_split_qkv_input`, `use_attn_in`, `use_attn_result`, `use_hook_mlp_in`), set on every
  component's config; `single_stream_inputs` turns off the last four for the layer graphs.
* `hook_flags`: which `cfg` flag makes each optional hook point fire (`HOOK_FLAGS`), the hooks
  with a head axis (`HEAD_AXIS_HOOKS`), and `flags_set`, which sets flags on every component's
  config and restores them; `set_use_attn_in`'s refusal of grouped-query attention is bypassed by
  also ungrouping keys and values (then every q/k/v projection reads a per-query-head copy).
* `qkv_weight`: the grouped key/value weights `_W_K` / `_W_V` of `GroupedQueryAttention`.
* `norm_kind`, `has_post_norm`: which norm classes and post-norm architectures a block has
  (`POST_NORM_ARCHITECTURES` lives in a TransformerLens utility module).
* The attention stand-in used by `rl_circuits.engine.efficient`: `is_attention`,
  `runs_reference_forward`, `unsupported_features` (the branches of TransformerLens 3.9's
  `AbstractAttention.forward` the stand-in leaves out, e.g. `_attention_dir_override`),
  `PATTERN_HOOKS`, `hooks_registered` (torch's private hook dicts of a HookPoint),
  `AttentionCall` and `attention_forward` (a copy of that forward's steps, signature and hook
  order, with the scores-softmax-pattern middle supplied by the caller), `score_scale`,
  `sliding_window`.
* `BIAS_PARAMETER`, `QKV_BIAS_PARAMETER`: parameter names of biases, grouped ones included
  (`_b_K`, `_b_V`); `model_maps/conversions/*.toml` name the grouped weights the same way.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal, NamedTuple

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from transformer_lens import HookedTransformer
from transformer_lens.components import (
    AbstractAttention,
    GroupedQueryAttention,
    RMSNorm,
    RMSNormPre,
)
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

WRITTEN_FOR = "3.9"


def installed_version() -> str:
    """The installed TransformerLens version (pyproject pins >=3.9,<4)."""
    return importlib.metadata.version("transformer_lens")


# --- call order ---------------------------------------------------------------------------

# TL 3.9 TransformerBlock.forward: `self.attn(query_input=self.ln1(q_in), key_input=self.ln1(k_in),
# value_input=self.ln1(v_in))`, so call i of a block's ln1 is the input LN1_CALLS[i] (q, k or v).
LN1_CALLS: tuple[str, ...] = ("q", "k", "v")


# --- cfg flags ----------------------------------------------------------------------------

# TL 3.9 flags set while attributing: one key and value per query head, and none of the optional
# per-head copies of the residual stream (same function, hooks the engines do not need).
_ATTRIBUTION_FLAGS = {
    "ungroup_grouped_query_attention": True,
    "use_split_qkv_input": False,
    "use_attn_in": False,
    "use_attn_result": False,
    "use_hook_mlp_in": False,
}


@contextmanager
def ungrouped_kv(model: HookedTransformer, *, per_head_inputs: bool = False) -> Iterator[None]:
    """One key and value per query head and no per-head input/output copies; the user's flags
    restored on exit, also after an error. These TL 3.9 flags leave the model's function unchanged.

    `per_head_inputs=True` also turns on `use_split_qkv_input` and `use_hook_mlp_in`: then
    `blocks.{l}.hook_{q,k,v}_input` hold each query head's own input [batch, pos, n_heads,
    d_model] and `blocks.{l}.hook_mlp_in` fires.
    """
    flags = dict(_ATTRIBUTION_FLAGS)
    if per_head_inputs:
        flags.update(use_split_qkv_input=True, use_hook_mlp_in=True)
    with flags_set(model, flags):
        yield


@contextmanager
def single_stream_inputs(model: HookedTransformer) -> Iterator[None]:
    """No per-head copies of attention inputs or outputs (`ln1` then sees the residual stream
    [batch, pos, d_model], as the layer graphs' sites need), whatever the user left set; the
    user's flags restored on exit. Grouped keys and values stay as they are."""
    flags = {k: v for k, v in _ATTRIBUTION_FLAGS.items() if k != "ungroup_grouped_query_attention"}
    with flags_set(model, flags):
        yield


# TL 3.9: the optional hook points (by the end of their name) and the cfg flag that makes each
# fire; without it the hook exists in `hook_dict` but is never called.
HOOK_FLAGS: dict[str, str] = {
    "hook_q_input": "use_split_qkv_input",
    "hook_k_input": "use_split_qkv_input",
    "hook_v_input": "use_split_qkv_input",
    "hook_attn_in": "use_attn_in",
    "attn.hook_result": "use_attn_result",
    "hook_mlp_in": "use_hook_mlp_in",
}
# Hook points whose activation is [batch, pos, head, d_model]: one copy of the residual stream
# per head (q/k/v inputs, attn_in) or one output per head (hook_result).
HEAD_AXIS_HOOKS: tuple[str, ...] = (
    "hook_q_input",
    "hook_k_input",
    "hook_v_input",
    "hook_attn_in",
    "attn.hook_result",
)


def hook_flags(hook_name: str, per_query_head: bool) -> dict[str, bool]:
    """The TL 3.9 cfg flags under which `hook_name` fires and means what its name says.

    `hook_attn_in` holds one copy per query head, which grouped key/value weights cannot read
    (TL's `set_use_attn_in` refuses GQA): it needs ungrouped keys and values, and
    `use_split_qkv_input` off (else TL computes it and feeds the q/k/v inputs past it).
    `per_query_head`: the name picks one query head's key or value input, which exists only
    ungrouped (grouped, `hook_k_input[1]` would be key/value head 1's copy, shared by several
    query heads).
    """
    flags: dict[str, bool] = {}
    for suffix, flag in HOOK_FLAGS.items():
        if hook_name.endswith(suffix):
            flags[flag] = True
    if hook_name.endswith("hook_attn_in"):
        flags.update(ungroup_grouped_query_attention=True, use_split_qkv_input=False)
    if per_query_head and hook_name.endswith(("hook_k_input", "hook_v_input")):
        flags["ungroup_grouped_query_attention"] = True
    return flags


@contextmanager
def flags_set(model: HookedTransformer, flags: dict[str, bool]) -> Iterator[None]:
    """Set TL cfg `flags` on the model and every component's config (components may carry their
    own config object); the previous values restored on exit, also after an error."""
    configs = {id(model.cfg): model.cfg}
    for module in model.modules():
        cfg = getattr(module, "cfg", None)
        if cfg is not None and hasattr(cfg, "ungroup_grouped_query_attention"):
            configs[id(cfg)] = cfg
    saved = [(cfg, {k: getattr(cfg, k) for k in flags}) for cfg in configs.values()]
    try:
        for cfg, _ in saved:
            for key, value in flags.items():
                setattr(cfg, key, value)
        yield
    finally:
        for cfg, values in saved:
            for key, value in values.items():
                setattr(cfg, key, value)


# --- weights and norms --------------------------------------------------------------------


def qkv_weight(
    attn: AbstractAttention, letter: Literal["Q", "K", "V"]
) -> tuple[Float[torch.Tensor, "weight_head d_model d_head"], int]:
    """A projection weight as stored, and how many query heads share each of its heads.

    TL 3.9 `GroupedQueryAttention` stores keys and values once per key/value head in `_W_K` /
    `_W_V` (its public `W_K` / `W_V` repeat them per query head); other layers store `W_{letter}`.
    """
    grouped = getattr(attn, f"_W_{letter}", None)
    weight = grouped if grouped is not None else getattr(attn, f"W_{letter}")
    return weight, attn.cfg.n_heads // weight.shape[0]


def norm_kind(norm: torch.nn.Module) -> Literal["rms", "rmspre", "none"]:
    """`rms` (TL's RMSNorm, with weight `w`), `rmspre` (no weight) or `none` (anything else)."""
    if isinstance(norm, RMSNorm):
        return "rms"
    if isinstance(norm, RMSNormPre):
        return "rmspre"
    return "none"


def has_post_norm(cfg) -> bool:
    """Whether a block normalises the attention output before adding it to the stream
    (`use_normalization_before_and_after`, or TL 3.9's post-norm architectures such as OLMo 2)."""
    return bool(cfg.use_normalization_before_and_after) or (
        cfg.original_architecture in POST_NORM_ARCHITECTURES
    )


# Parameter names of HookedTransformer biases: b_* and GroupedQueryAttention's _b_K / _b_V.
BIAS_PARAMETER = re.compile(r"\.b_\w+$|\._b_\w+$")
QKV_BIAS_PARAMETER = re.compile(r"\.(b_Q|_b_K|_b_V)$")


# --- the attention stand-in ---------------------------------------------------------------

# Architectures whose TL 3.9 attention forward applies q/k norms to whole projections.
_QK_NORM_ON_FULL_VECTORS = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")

# Hook points of TL's attention that only its own scores/softmax computation fires.
PATTERN_HOOKS: tuple[str, ...] = ("hook_attn_scores", "hook_pattern")


def is_attention(module: torch.nn.Module) -> bool:
    """Whether `module` is a TransformerLens attention layer."""
    return isinstance(module, AbstractAttention)


def runs_reference_forward(attn: AbstractAttention) -> bool:
    """Whether the layer computes attention with TL 3.9's own `AbstractAttention.forward` and
    z scores (plain or grouped-query), the code `attention_forward` copies."""
    return type(attn).forward is AbstractAttention.forward and type(attn).calculate_z_scores in (
        AbstractAttention.calculate_z_scores,
        GroupedQueryAttention.calculate_z_scores,
    )


def attention_direction(attn: AbstractAttention) -> str:
    """`causal` or `bidirectional`: the layer's override (a TL 3.9 private attribute) or cfg's."""
    return attn._attention_dir_override or attn.cfg.attention_dir


def unsupported_features(attn: AbstractAttention) -> list[str]:
    """The branches of TL 3.9's `AbstractAttention.forward` that `attention_forward` leaves out
    and that this layer would take (empty: the stand-in computes the same function)."""
    cfg = attn.cfg
    cap = cfg.attn_scores_soft_cap
    features = {
        "4-bit weights (load_in_4bit)": cfg.load_in_4bit,
        "per-head results (use_attn_result)": cfg.use_attn_result,
        f"{cfg.positional_embedding_type} positional embeddings": (
            cfg.positional_embedding_type not in ("standard", "rotary", "shortformer")
        ),
        "attention-score soft capping": cap is not None and cap > 0,
        "attention sinks": cfg.use_attention_sinks,
        "clip_qkv": cfg.clip_qkv is not None,
        "log-n query scaling (use_logn_attn)": cfg.use_logn_attn,
        "QK norm on whole projections (OLMo)": cfg.original_architecture
        in _QK_NORM_ON_FULL_VECTORS,
        "non-causal attention": attention_direction(attn) != "causal",
    }
    return [name for name, present in features.items() if present]


def hooks_registered(hook_point: HookPoint) -> bool:
    """Whether any forward or backward hook is registered on `hook_point`, by TL's `add_hook`
    or by torch's `register_*_hook` (both land in torch's private per-module hook dicts)."""
    return bool(
        hook_point._forward_hooks
        or hook_point._forward_pre_hooks
        or hook_point._backward_hooks
        or hook_point._backward_pre_hooks
    )


def score_scale(attn: AbstractAttention) -> float:
    """The factor TL 3.9 multiplies q.k by before the softmax (it divides by `attn_scale`)."""
    return 1.0 / attn.attn_scale


def sliding_window(attn: AbstractAttention) -> int | None:
    """The window of a local (sliding-window) layer: key j is seen from query i when
    i - window < j <= i; None for a global layer."""
    return attn.cfg.window_size if attn.attn_type == "local" else None


class AttentionCall(NamedTuple):
    """What a call of TL 3.9's `AbstractAttention.forward` asks beyond the q/k/v inputs."""

    kv_cache: bool  # a past_kv_cache_entry (generation)
    additive_mask: bool  # an additive_attention_mask or a position_bias
    padding_mask: bool  # an attention_mask that hides some position (an all-ones one does not)


Attend = Callable[
    [
        Float[torch.Tensor, "batch pos head d_head"],
        Float[torch.Tensor, "batch pos kv_head d_head"],
        Float[torch.Tensor, "batch pos kv_head d_head"],
    ],
    Float[torch.Tensor, "batch pos head d_head"],
]


def attention_forward(
    attn: AbstractAttention, check: Callable[[AttentionCall], None], attend: Attend
) -> Callable[..., Float[torch.Tensor, "batch pos d_model"]]:
    """A stand-in for `attn.forward`: TL 3.9's `AbstractAttention.forward`, same signature, steps
    and hooks, for layers where `unsupported_features` is empty, with `attend` in the middle.

    `check(call)` runs first and may refuse the call (raise). Then, as TL: `calculate_qkv_matrices`
    (hook_q, hook_k, hook_v; keys and values per key/value head unless ungrouped),
    `apply_rotary` (hook_rot_q, hook_rot_k), `attend(q, k, v)` -> z in place of scores, mask,
    softmax and pattern (so `PATTERN_HOOKS` never fire), `hook_z`, and the output projection
    `F.linear(z, W_O, b_O)`. Positions start at 0 (no cache) and the mask is plain causal.
    """

    def forward(
        query_input: Float[torch.Tensor, "batch pos d_model"]
        | Float[torch.Tensor, "batch pos head d_model"],
        key_input: Float[torch.Tensor, "batch pos d_model"]
        | Float[torch.Tensor, "batch pos kv_head d_model"],
        value_input: Float[torch.Tensor, "batch pos d_model"]
        | Float[torch.Tensor, "batch pos kv_head d_model"],
        past_kv_cache_entry=None,
        additive_attention_mask: torch.Tensor | None = None,
        attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
        position_bias: torch.Tensor | None = None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        check(
            AttentionCall(
                kv_cache=past_kv_cache_entry is not None,
                additive_mask=additive_attention_mask is not None or position_bias is not None,
                # TL passes a mask whenever the tokenizer pads on the left; an all-ones mask
                # changes nothing (positions 0..pos-1, plain causal mask), any other does.
                padding_mask=attention_mask is not None and not bool(attention_mask.bool().all()),
            )
        )
        q, k, v = attn.calculate_qkv_matrices(query_input, key_input, value_input)
        if attn.cfg.positional_embedding_type == "rotary":
            q = attn.hook_rot_q(attn.apply_rotary(q, 0, None))
            k = attn.hook_rot_k(attn.apply_rotary(k, 0, None))
        z = attn.hook_z(attend(q, k, v))  # [batch, pos, head, d_head]
        batch, pos, n_heads, d_head = z.shape
        w = einops.rearrange(attn.W_O, "head_index d_head d_model -> d_model (head_index d_head)")
        w = w.contiguous().to(z.device)
        b_O = attn.b_O.to(z.device)
        z = z.to(w.dtype).reshape(batch, pos, n_heads * d_head)
        return F.linear(z, w, b_O)

    return forward
