"""Checks of what the engine's public functions are given: tokens and loss masks, sample ids,
and the metric whose change a score measures (each sample's loss, by default `masked_nll`).

Each check names the input and what to pass instead; they run whether or not a type checker
runs the jaxtyping hints.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int, Shaped
from transformer_lens import HookedTransformer

# What `as_tensor` reads: a tensor, a numpy array or a (rectangular) nested list.
TensorLike = torch.Tensor | np.ndarray | Sequence
# The token ids and loss mask of a batch, as the public functions take them.
Tokens = Int[torch.Tensor, "batch pos"] | Int[np.ndarray, "batch pos"] | Sequence
LossMask = Bool[torch.Tensor, "batch pos"] | Bool[np.ndarray, "batch pos"] | Sequence

Metric = Callable[
    [Float[torch.Tensor, "batch pos vocab"], Int[torch.Tensor, "batch pos"], torch.Tensor],
    Float[torch.Tensor, " batch"],
]


def masked_nll(
    logits: Float[torch.Tensor, "batch pos vocab"],
    tokens: Int[torch.Tensor, "batch pos"],
    loss_mask: Bool[torch.Tensor, "batch pos"],
) -> Float[torch.Tensor, " batch"]:
    """Each sample's mean negative log-likelihood of its masked tokens (paper Eq. 13)."""
    target_mask = loss_mask[:, 1:]
    rows, cols = target_mask.nonzero(as_tuple=True)  # only the predicting positions
    selected = logits[rows, cols]
    logp = selected.to(torch.promote_types(selected.dtype, torch.float32)).log_softmax(-1)
    nll = -logp.gather(-1, tokens[rows, cols + 1].unsqueeze(-1)).squeeze(-1)
    total = torch.zeros(tokens.shape[0], dtype=nll.dtype, device=nll.device)
    total = total.index_add(0, rows, nll)
    return total / target_mask.sum(1).to(nll.dtype)


def check_inputs(
    model: HookedTransformer, tokens: TensorLike, loss_mask: TensorLike
) -> tuple[Int[torch.Tensor, "batch pos"], Bool[torch.Tensor, "batch pos"]]:
    """`tokens` and `loss_mask` as tensors on the model's device, or ValueError naming what is
    wrong and what to pass instead."""
    tokens = as_tensor(tokens, "tokens")
    loss_mask = as_tensor(loss_mask, "loss_mask")
    if tokens.ndim != 2:
        raise ValueError(
            f"tokens must be a 2-d tensor [batch, pos], got shape {tuple(tokens.shape)}"
        )
    if tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)}: give at least one sample of at least 2 "
            "positions (a token, and one that the loss predicts from it)"
        )
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
        raise ValueError(
            f"tokens must hold integer token ids, got dtype {tokens.dtype}: pass token ids from "
            "the tokenizer (e.g. tokens.long())"
        )
    if loss_mask.shape != tokens.shape or loss_mask.dtype != torch.bool:
        raise ValueError(
            f"loss_mask must be a bool tensor shaped like tokens {tuple(tokens.shape)}, "
            f"got {loss_mask.dtype} {tuple(loss_mask.shape)}"
        )
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= model.cfg.d_vocab):
        bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
        raise ValueError(
            f"token id {bad} is outside the model's vocabulary (0 to {model.cfg.d_vocab - 1}); "
            "tokenize with this model's tokenizer, and pad with a valid id (e.g. 0)"
        )
    if loss_mask[:, 0].any():
        raise ValueError("loss_mask[:, 0] must be False: no position predicts the first token")
    empty = (~loss_mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"samples {empty} have no masked position to compute a loss on")
    if tokens.shape[1] > model.cfg.n_ctx:
        limit = getattr(model, "checkpoint_max_positions", None)
        if limit is not None and tokens.shape[1] > limit:
            hint = (
                f"the checkpoint itself allows at most {limit} positions: truncate or split the "
                "input"
            )
        else:
            hint = f"load the model with max_seq_len >= {tokens.shape[1]}" + (
                f" (the checkpoint allows up to {limit})" if limit else ""
            )
        raise ValueError(
            f"sequence length {tokens.shape[1]} exceeds the model's n_ctx {model.cfg.n_ctx}; "
            + hint
        )
    device = model.embed.W_E.device
    return tokens.long().to(device), loss_mask.to(device)


def check_sample_ids(sample_ids: object, batch: int) -> list[str] | None:
    """`sample_ids` as a list of `batch` distinct strings (None stays None), else ValueError."""
    if sample_ids is None:
        return None
    try:
        ids = None if isinstance(sample_ids, str | bytes) else list(sample_ids)
    except TypeError:
        ids = None
    if ids is None:
        raise ValueError(
            f"sample_ids must be a list of {batch} strings (one per sample), got "
            f"{type(sample_ids).__name__}"
        )
    if len(ids) != batch or not all(isinstance(i, str) for i in ids):
        raise ValueError(
            f"sample_ids must be {batch} strings, one per sample of tokens; got {len(ids)} "
            f"({', '.join(sorted({type(i).__name__ for i in ids})) or 'none'})"
        )
    twice = sorted(i for i, n in Counter(ids).items() if n > 1)
    if twice:
        raise ValueError(f"sample_ids must be distinct (one id per sample); repeated: {twice[:5]}")
    return ids


def checked_metric(metric: Metric, batch: int) -> Metric:
    """`metric` refusing, with its name, a result that is not one float per sample [batch]."""
    name = getattr(metric, "__name__", type(metric).__name__)

    def checked(logits, tokens, loss_mask):
        out = metric(logits, tokens, loss_mask)
        if (
            not isinstance(out, torch.Tensor)
            or tuple(out.shape) != (batch,)
            or not out.is_floating_point()
        ):
            got = (
                f"{out.dtype} of shape {list(out.shape)}"
                if isinstance(out, torch.Tensor)
                else type(out).__name__
            )
            raise ValueError(
                f"metric {name} must return one float per sample, a tensor of shape [{batch}]; "
                f"it returned {got} (reduce it over everything but the batch dimension)"
            )
        return out

    return checked


def as_tensor(x: TensorLike, what: str) -> Shaped[torch.Tensor, "*shape"]:
    """A tensor from a tensor, numpy array or nested list (as `torch.as_tensor` reads them)."""
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{what} must be a tensor, a numpy array or a rectangular nested list, got "
            f"{type(x).__name__} ({exc})"
        ) from None
