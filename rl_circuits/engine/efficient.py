"""Memory-efficient attention and per-block activation checkpointing for a HookedTransformer.

TransformerLens's attention builds [batch, heads, pos, pos] scores and patterns and keeps them
for the backward pass, so the memory of one attribution grows with pos^2: at 8k tokens these
dwarf everything else in a 7B model. `efficient_attention(model)` swaps each attention layer's
forward for one that calls `torch.nn.functional.scaled_dot_product_attention` (flash or
memory-efficient kernels: no pattern is ever stored), while every hook that edge attribution
reads still fires with the values TransformerLens would give it: `hook_q`, `hook_k`, `hook_v`,
`hook_rot_q`, `hook_rot_k`, `hook_z`, `hook_attn_out`, the residual hooks and the three `ln1`
calls of each block (query, key and value inputs, in that order). Only `hook_attn_scores` and
`hook_pattern` cannot fire, because nothing computes them: a hook on either is refused.

`checkpoint_blocks(model)` recomputes each block's activations during the backward pass
instead of keeping them (torch.utils.checkpoint, non-reentrant), trading one more forward for
memory that no longer grows with the number of layers.

Both are context managers that patch module instances only while active (an instance
attribute `forward` shadowing the class method) and restore them on exit, even on error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch.utils.checkpoint import checkpoint
from transformer_lens import HookedTransformer

from rl_circuits.engine import tl_compat
from rl_circuits.errors import RLCircuitsError

# scaled_dot_product_attention shares key/value heads itself from torch 2.5 (enable_gqa).
_SDPA_SHARES_HEADS = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)
_OFF = "pass efficient_attention=False to attribute() (or leave the efficient_attention context)"


class EfficientAttentionError(RLCircuitsError):
    """The efficient attention path cannot run this model or this call as asked."""


@contextmanager
def efficient_attention(model: HookedTransformer) -> Iterator[None]:
    """Run every attention layer of `model` with fused scaled-dot-product attention.

    Same function and same hook values as TransformerLens (up to floating-point rounding of
    the fused kernel), causal, with grouped-query heads, qkv biases, rotary embeddings and
    sliding-window (`local`) layers; memory linear in the sequence length. Hooks on
    `hook_attn_scores` / `hook_pattern` raise `EfficientAttentionError`, on entry or when
    added later, as do a KV cache and a padding attention mask. Nests; restores each layer's
    own forward on exit, also after an exception.
    """
    attns = [block.attn for block in model.blocks]
    for layer, attn in enumerate(attns):
        _check_supported(attn, layer)
        _refuse_pattern_hooks(attn, layer)
    masks: dict[tuple, torch.Tensor] = {}  # one sliding-window mask per shape, shared by layers
    with _shadowed_forwards(attns, lambda layer, attn, inner: _sdpa_forward(attn, layer, masks)):
        yield


@contextmanager
def checkpoint_blocks(model: HookedTransformer) -> Iterator[None]:
    """Recompute each TransformerBlock's activations in the backward pass (non-reentrant).

    Saves every activation inside a block except its input; costs one more forward per block.
    Forward hooks inside a block fire again during that recomputation, on tensors whose graph
    is discarded (their gradient hooks never fire); a hook that writes a side buffer must
    tolerate the second call, as the attribution engine's do (first write wins). Without
    gradients (e.g. under torch.no_grad) blocks run as usual. Restores the blocks on exit.
    """
    with _shadowed_forwards(
        model.blocks, lambda index, block, inner: partial(_checkpointed, inner)
    ):
        yield


@contextmanager
def _shadowed_forwards(
    modules, make: Callable[[int, torch.nn.Module, Callable], Callable]
) -> Iterator[None]:
    """Give each module an instance `forward` = make(index, module, its current forward);
    put back what was there (nothing, or an outer context's forward) on exit, even on error."""
    saved: list[tuple[torch.nn.Module, Callable | None]] = []
    try:
        for index, module in enumerate(modules):
            previous = module.__dict__.get("forward")
            inner = previous if previous is not None else type(module).forward.__get__(module)
            saved.append((module, previous))
            module.forward = make(index, module, inner)
        yield
    finally:
        for module, previous in reversed(saved):
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def _checkpointed(forward: Callable, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _check_supported(attn: torch.nn.Module, layer: int) -> None:
    """Refuse, on entry, every attention variant the fused path does not reproduce exactly."""
    where = f"blocks.{layer}.attn"
    if not tl_compat.is_attention(attn):
        raise EfficientAttentionError(f"{where} is a {type(attn).__name__}; {_OFF}.")
    if not tl_compat.runs_reference_forward(attn):
        raise EfficientAttentionError(
            f"{where} ({type(attn).__name__}) has its own attention computation; {_OFF}."
        )
    found = tl_compat.unsupported_features(attn)
    if found:
        raise EfficientAttentionError(
            f"{where}: the efficient attention path does not support {', '.join(found)}; {_OFF}."
        )


def _refuse_pattern_hooks(attn: torch.nn.Module, layer: int) -> None:
    for name in tl_compat.PATTERN_HOOKS:
        if tl_compat.hooks_registered(getattr(attn, name)):
            raise EfficientAttentionError(
                f"a hook is registered on blocks.{layer}.attn.{name}, but efficient attention "
                f"computes no attention scores or pattern, so it could never fire; {_OFF}."
            )


def _sdpa_forward(
    attn: torch.nn.Module, layer: int, masks: dict[tuple, torch.Tensor]
) -> Callable[..., torch.Tensor]:
    """The layer's forward with TransformerLens's steps and hooks around fused attention
    (`tl_compat.attention_forward`): no scores or pattern tensor, and key/value heads shared by
    query groups inside the kernel."""

    def check(call: tl_compat.AttentionCall) -> None:
        _refuse_pattern_hooks(attn, layer)
        if call.kv_cache:
            raise EfficientAttentionError(
                f"blocks.{layer}.attn: a KV cache (generation) is not supported by efficient "
                f"attention; {_OFF}."
            )
        if call.additive_mask:
            raise EfficientAttentionError(
                f"blocks.{layer}.attn: additive masks and position biases are not supported by "
                f"efficient attention; {_OFF}."
            )
        if call.padding_mask:
            raise EfficientAttentionError(
                f"blocks.{layer}.attn: a padding attention mask is not supported by efficient "
                f"attention; pad on the right (causal attention never sees right padding), or "
                f"{_OFF}."
            )

    return tl_compat.attention_forward(attn, check, partial(_attend, attn, masks))


def _attend(
    attn: torch.nn.Module,
    masks: dict[tuple, torch.Tensor],
    q: Float[torch.Tensor, "batch pos head d_head"],
    k: Float[torch.Tensor, "batch pos kv_head d_head"],
    v: Float[torch.Tensor, "batch pos kv_head d_head"],
) -> Float[torch.Tensor, "batch pos head d_head"]:
    """softmax(q k^T * scale + causal or sliding-window mask) v with one fused kernel."""
    n_heads = q.shape[2]
    q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))  # [batch, head, pos, d_head]
    k_ = k_.to(q_.device)
    v_ = v_.to(device=q_.device, dtype=q_.dtype)
    mask = _window_mask(tl_compat.sliding_window(attn), q.shape[1], q_.device, masks)
    grouped = k_.shape[1] != n_heads
    if grouped and (mask is not None or not _SDPA_SHARES_HEADS):
        # Fused kernels with an explicit mask may not share heads: repeat (linear memory).
        repeats = n_heads // k_.shape[1]
        k_ = k_.repeat_interleave(repeats, dim=1)
        v_ = v_.repeat_interleave(repeats, dim=1)
        grouped = False
    z = F.scaled_dot_product_attention(
        q_,
        k_,
        v_,
        attn_mask=mask,
        is_causal=mask is None,
        scale=tl_compat.score_scale(attn),
        **({"enable_gqa": True} if grouped else {}),
    )
    return z.transpose(1, 2)


def _window_mask(
    window: int | None, pos: int, device: torch.device, masks: dict[tuple, torch.Tensor]
) -> Bool[torch.Tensor, "pos pos"] | None:
    """Sliding-window causal mask (True: may attend), or None where plain causal is exact.

    [pos, pos] booleans, built once per length and shared by every local layer of the pass
    (so kept once for backward, not per layer); a global layer (`window` None) or a local one
    whose window covers the whole sequence needs none.
    """
    if window is None or pos <= window:
        return None
    key = (pos, window, device)
    if key not in masks:
        i = torch.arange(pos, device=device)
        masks[key] = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    return masks[key]
