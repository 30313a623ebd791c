"""Counterfactual outputs O'_u: what an ablation puts in place of an upstream output.

`prepare` checks the inputs an ablation needs (`methods.ABLATIONS`) and `fill` writes -O'_u
into the engines' output buffers before the clean pass adds O_u, so that one buffer holds
O_u - O'_u (zero ablation: O_u, today's buffer) and no second activation buffer is kept. For
`patch` the counterfactual run is one forward without gradients of `corrupted_model or model`
on `corrupted_tokens or tokens`; its outputs move to `model`'s devices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from transformer_lens import HookedTransformer

from rl_circuits.engine import efficient

# cfg fields two models must share for one's outputs to replace the other's.
_SAME_CFG = (
    "original_architecture",
    "n_layers",
    "d_model",
    "n_heads",
    "d_head",
    "n_key_value_heads",
    "d_mlp",
    "d_vocab",
    "act_fn",
    "gated_mlp",
    "normalization_type",
    "positional_embedding_type",
    "parallel_attn_mlp",
    "attn_only",
)


@dataclass(frozen=True)
class Counterfactual:
    """What O'_u is for one attribution or circuit call.

    `ablation`: one of `methods.ABLATIONS`. `patch`: the run of `model` on `tokens` (both set,
    `tokens` on `model`'s embedding device). `mean`/`mean-positional`: `tokens` are the mean data
    and `valid` the positions that enter the mean.
    """

    ablation: str
    model: HookedTransformer | None = None
    tokens: Int[torch.Tensor, "batch pos"] | None = None
    valid: Bool[torch.Tensor, "batch pos"] | None = None
    cross_model: bool = False


def valid_positions(loss_mask: Bool[torch.Tensor, "batch pos"]) -> Bool[torch.Tensor, "batch pos"]:
    """True up to each sample's last loss position (right padding excluded)."""
    pos = loss_mask.shape[1]
    last = pos - 1 - loss_mask.flip(1).int().argmax(1)
    return torch.arange(pos, device=loss_mask.device).unsqueeze(0) <= last.unsqueeze(1)


def prepare(
    model: HookedTransformer,
    tokens: Int[torch.Tensor, "batch pos"],
    loss_mask: Bool[torch.Tensor, "batch pos"],
    ablation: str,
    corrupted_tokens: Int[torch.Tensor, "batch pos"] | None = None,
    corrupted_model: HookedTransformer | None = None,
    mean_tokens: Int[torch.Tensor, "mean_batch mean_pos"] | None = None,
    mean_mask: Bool[torch.Tensor, "mean_batch mean_pos"] | None = None,
) -> Counterfactual:
    """Check that the inputs fit the ablation (one clear error otherwise) and collect them."""
    patching = (corrupted_tokens is not None) or (corrupted_model is not None)
    means = (mean_tokens is not None) or (mean_mask is not None)
    if ablation != "patch" and patching:
        raise ValueError(
            f"corrupted_tokens / corrupted_model are inputs of ablation='patch', got "
            f"ablation={ablation!r}: pass ablation='patch' or leave them out"
        )
    if "mean" not in ablation and means:
        raise ValueError(
            f"mean_tokens / mean_mask are inputs of the mean ablations, got ablation={ablation!r}: "
            "pass ablation='mean' or 'mean-positional', or leave them out"
        )
    device = tokens.device
    if ablation == "patch":
        if not patching:
            raise ValueError(
                "ablation='patch' needs corrupted_tokens (a counterfactual input shaped like "
                "tokens) or corrupted_model (a model of the same shapes), or both"
            )
        other = model if corrupted_model is None else corrupted_model
        if corrupted_model is not None:
            check_pair(model, corrupted_model)
        run_tokens = tokens
        if corrupted_tokens is not None:
            run_tokens = _token_tensor(corrupted_tokens, "corrupted_tokens", model)
            if run_tokens.shape != tokens.shape:
                raise ValueError(
                    f"corrupted_tokens must have the shape of tokens {tuple(tokens.shape)}, got "
                    f"{tuple(run_tokens.shape)}: pad or truncate the counterfactual to the same "
                    "positions"
                )
        return Counterfactual(
            ablation,
            other,
            run_tokens.to(other.embed.W_E.device),
            cross_model=corrupted_model is not None and corrupted_model is not model,
        )
    if "mean" in ablation:
        data = tokens if mean_tokens is None else _token_tensor(mean_tokens, "mean_tokens", model)
        data = data.to(device)
        if mean_mask is None:
            valid = (
                valid_positions(loss_mask)
                if mean_tokens is None
                else torch.ones_like(data, dtype=torch.bool)
            )
        else:
            valid = mean_mask if isinstance(mean_mask, torch.Tensor) else torch.as_tensor(mean_mask)
            if valid.dtype != torch.bool or valid.shape != data.shape:
                raise ValueError(
                    f"mean_mask must be a bool tensor shaped like the mean data "
                    f"{tuple(data.shape)} (True: the position enters the mean), got "
                    f"{valid.dtype} {tuple(valid.shape)}"
                )
            valid = valid.to(device)
        if not valid.any():
            raise ValueError("mean_mask selects no position: the mean needs at least one")
        if ablation == "mean-positional":
            pos = tokens.shape[1]
            if data.shape[1] < pos:
                raise ValueError(
                    f"mean-positional needs mean data with at least the {pos} positions of "
                    f"tokens, got {data.shape[1]}"
                )
            needed = valid_positions(loss_mask).any(0)
            empty = (~valid[:, :pos].any(0) & needed).nonzero().flatten().tolist()
            if empty:
                raise ValueError(
                    f"mean-positional: no mean sample covers position {empty[0]}, which tokens "
                    "use; give mean data (mean_tokens / mean_mask) reaching every position"
                )
        return Counterfactual(ablation, model, data, valid)
    return Counterfactual(ablation)


def check_pair(model: HookedTransformer, other: HookedTransformer) -> None:
    """Refuse, naming the first mismatch, a corrupted_model whose outputs cannot replace
    `model`'s: a different architecture, shape or vocabulary."""
    for key in _SAME_CFG:
        a, b = getattr(model.cfg, key, None), getattr(other.cfg, key, None)
        if a != b:
            raise ValueError(
                f"corrupted_model does not match model: cfg.{key} is {b!r}, model has {a!r}; "
                "patch across two checkpoints of the same architecture (e.g. a base model and "
                "its post-trained version)"
            )
    theirs = {name: p.shape for name, p in other.named_parameters()}
    for name, p in model.named_parameters():
        if name not in theirs:
            raise ValueError(f"corrupted_model does not match model: it has no parameter {name}")
        if theirs[name] != p.shape:
            raise ValueError(
                f"corrupted_model does not match model: parameter {name} has shape "
                f"{tuple(theirs[name])}, model has {tuple(p.shape)}"
            )


def _token_tensor(x, what: str, model: HookedTransformer) -> torch.Tensor:
    x = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if x.ndim != 2 or x.dtype.is_floating_point or x.dtype == torch.bool:
        raise ValueError(
            f"{what} must be a 2-d tensor of integer token ids [batch, pos], got {x.dtype} "
            f"{tuple(x.shape)}"
        )
    if x.numel() and (x.min() < 0 or x.max() >= model.cfg.d_vocab):
        raise ValueError(
            f"{what} has token ids outside the model's vocabulary (0 to {model.cfg.d_vocab - 1})"
        )
    return x.long()


@contextmanager
def _output_hooks(
    model: HookedTransformer, names: Sequence[str], on_output: Callable[[int, torch.Tensor], None]
) -> Iterator[None]:
    """Call on_output(i, output) whenever the module `names[i]` runs; hooks removed on exit."""
    handles = []
    try:
        for i, name in enumerate(names):
            handles.append(
                model.get_submodule(name).register_forward_hook(
                    lambda mod, args, out, i=i: on_output(i, out.detach())
                )
            )
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_outputs(
    cf: Counterfactual,
    names: Sequence[str],
    on_output: Callable[[int, torch.Tensor], None],
    efficient_attention: bool = True,
) -> None:
    """One forward without gradients of the counterfactual run (patch), or of the mean data
    (means), calling on_output(i, O) with each output of the modules `names`."""
    model = cf.model
    fused = efficient.efficient_attention(model) if efficient_attention else nullcontext()
    attention = fused if cf.cross_model else nullcontext()  # `model` runs in the caller's context
    with torch.no_grad(), attention, _output_hooks(model, names, on_output):
        model(cf.tokens, stop_at_layer=model.cfg.n_layers)  # every output; no logits needed


def means(
    cf: Counterfactual, names: Sequence[str], dtype: torch.dtype, efficient_attention: bool = True
) -> list[Float[torch.Tensor, "*feature"]]:
    """Each output of `names` averaged over the valid positions of the mean data: [*feature]
    (`mean`) or [pos, *feature] (`mean-positional`, each position over the samples covering it;
    0 where none does)."""
    weight = cf.valid.to(dtype)
    out: list[torch.Tensor | None] = [None] * len(names)

    def on_output(i: int, act: torch.Tensor) -> None:
        w = weight.to(act.device)
        if cf.ablation == "mean-positional":
            count = w.sum(0).clamp(min=1).view(-1, *([1] * (act.ndim - 2)))
            out[i] = torch.einsum("bp...,bp->p...", act.to(dtype), w) / count
        else:
            out[i] = torch.einsum("bp...,bp->...", act.to(dtype), w) / w.sum()

    run_outputs(cf, names, on_output, efficient_attention)
    return out


def fill(
    cf: Counterfactual,
    names: Sequence[str],
    slots: Sequence[Float[torch.Tensor, "batch pos d_model"]],
    efficient_attention: bool = True,
) -> None:
    """slots[i] := -O'_i for each output of `names` (slot [batch, pos, d_model]); zero ablation
    leaves the zero slots as they are."""
    if cf.ablation == "zero":
        return
    if cf.ablation == "patch":

        def on_output(i: int, act: torch.Tensor) -> None:
            slots[i].sub_(act.to(slots[i].device, slots[i].dtype))

        run_outputs(cf, names, on_output, efficient_attention)
        return
    pos = slots[0].shape[1]
    for slot, mean in zip(
        slots, means(cf, names, slots[0].dtype, efficient_attention), strict=True
    ):
        mean = mean[:pos] if cf.ablation == "mean-positional" else mean
        slot.copy_(-mean.to(slot.device))
