"""Circuits: run a model with only some edges of a graph, and how much of its behaviour survives.

`evaluate_circuit` keeps the edges of a boolean mask and removes every other edge (u, d) by
subtracting O_u from d's input, all in one forward pass. O_u is what u writes in that same pass
(as EAP-IG's `evaluate_graph` does), so the removals compose exactly as the circuit runs.
`top_k_circuits` on a `log_grid` of k gives the circuits whose losses make a faithfulness curve
(`rl_circuits.faithfulness`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Literal

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from transformer_lens import HookedTransformer

from rl_circuits import efficient
from rl_circuits.attribution import Metric, _buffers, _check_inputs, _frozen, _hooks, masked_nll
from rl_circuits.graph import build_graph

Ablation = Literal["zero", "mean"]
ABLATIONS: tuple[str, ...] = ("zero", "mean")
Ranking = Literal["abs", "signed"]
RANKINGS: tuple[str, ...] = ("abs", "signed")


def evaluate_circuit(
    model: HookedTransformer,
    tokens: Int[torch.Tensor, "batch pos"],
    loss_mask: Bool[torch.Tensor, "batch pos"],
    circuit: Bool[torch.Tensor, "*k n_upstream n_downstream"],
    graph: str = "paper",
    ablation: str = "zero",
    *,
    metric: Metric = masked_nll,
    efficient_attention: bool = True,
) -> Float[torch.Tensor, "*k batch"]:
    """Each sample's loss when only the edges in `circuit` are present.

    Every removed edge (u, d) of the graph subtracts O_u from d's input, O_u taken in the same
    forward pass (a residual-state node of the `residual` graph is rebuilt as the sum of its kept
    inputs, the same thing on a stream no earlier ablation has changed). `ablation="mean"`
    subtracts O_u - mean(O_u) instead, the mean being the clean run's O_u averaged over the
    batch's positions up to each sample's last loss position (right padding is left out): the
    removed edge then carries its average message. A stack of k circuits [k, n_up, n_down]
    gives [k, batch], one forward each. Entries of `circuit` outside the graph's edge mask are
    ignored.
    """
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose one of {', '.join(ABLATIONS)}")
    g = build_graph(graph, model.cfg.n_layers)
    shape = (len(g.upstream), len(g.downstream))
    stacked = circuit.ndim == 3
    circuits = circuit if stacked else circuit.unsqueeze(0)
    if circuits.dtype != torch.bool or tuple(circuits.shape[1:]) != shape:
        raise ValueError(
            f"circuit must be a bool mask [n_upstream, n_downstream] = {list(shape)} over the "
            f"{graph!r} graph's edges (or a stack of them), got {circuit.dtype} "
            f"{list(circuit.shape)}"
        )
    tokens, loss_mask = _check_inputs(model, tokens, loss_mask)
    batch, pos = tokens.shape
    acc = torch.float64 if model.cfg.dtype == torch.float64 else torch.float32
    chunks = _buffers(model, batch, pos, acc)
    slots = [buf[:, i] for _, buf in chunks for i in range(buf.shape[1])]
    attention = efficient.efficient_attention(model) if efficient_attention else nullcontext()
    losses = []
    with _frozen(model), torch.no_grad(), attention:
        mean = None
        if ablation == "mean":
            with _hooks(model, g, record=slots):
                model(tokens)
            mean = _position_means(chunks, loss_mask)
        for keep in circuits:
            removed = (g.edge_mask & ~keep.cpu()).to(acc)  # [n_up, n_down]

            def ablate(d: int, x: torch.Tensor, removed=removed) -> torch.Tensor:
                n = g.n_before[d]
                if not removed[:n, d].any():
                    return x
                # A residual-state node (kind "output") also carries what earlier ablations
                # did to the stream, so it is rebuilt from its inputs; a norm input is read
                # off an untouched stream, so the removed messages are subtracted.
                rebuild = g.sites[d].kind == "output"
                weights = (1.0 - removed[:n, d]) if rebuild else removed[:n, d]
                total = torch.zeros_like(x, dtype=acc)
                for start, buf in chunks:  # one contraction per device's run of nodes
                    k = min(n - start, buf.shape[1])
                    if k <= 0:
                        break
                    w = weights[start : start + k].to(buf.device)
                    total += torch.einsum("bupm,u->bpm", buf[:, :k], w).to(x.device)
                    if mean is not None:
                        dropped = removed[start : start + k, d].to(buf.device)
                        kept_mean = torch.einsum(
                            "um,u->m", mean[start : start + k].to(buf.device), dropped
                        )
                        total += (1 if rebuild else -1) * kept_mean.to(x.device)
                return total.to(x.dtype) if rebuild else x - total.to(x.dtype)

            with _hooks(model, g, transform=ablate, record=slots):
                losses.append(metric(model(tokens), tokens, loss_mask).to(acc))
    out = torch.stack(losses).cpu()
    return out if stacked else out[0]


def _position_means(chunks, loss_mask: torch.Tensor) -> torch.Tensor:
    """Each upstream output [n_up, d_model] averaged over the batch and the positions up to each
    sample's last loss position."""
    pos = loss_mask.shape[1]
    last = pos - 1 - loss_mask.flip(1).int().argmax(1)  # last predicted position per sample
    valid = torch.arange(pos, device=loss_mask.device).unsqueeze(0) <= last.unsqueeze(1)
    means = []
    for _, buf in chunks:
        weight = valid.to(buf.device, buf.dtype)  # [b, p]
        means.append(torch.einsum("bupm,bp->um", buf, weight) / weight.sum())
    return torch.cat([m.to(chunks[0][1].device) for m in means])


def log_grid(n_edges: int, points: int) -> list[int]:
    """About `points` distinct edge counts from 1 to `n_edges`, evenly spaced in log k."""
    if n_edges < 1 or points < 2:
        raise ValueError(f"log_grid needs n_edges >= 1 and points >= 2, got {n_edges}, {points}")
    ks = np.unique(np.round(np.geomspace(1, n_edges, points)).astype(int))
    return [int(k) for k in ks]


def top_k_circuits(
    scores: Float[np.ndarray, "n_upstream n_downstream"],
    edge_mask: Bool[np.ndarray, "n_upstream n_downstream"],
    ks: Sequence[int],
    ranking: str = "abs",
) -> Bool[np.ndarray, "k n_upstream n_downstream"]:
    """The top-k edges by |score| (`abs`) or by score (`signed`), for each k; ties keep the
    lower flat index, so the circuits are nested and deterministic."""
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; choose one of {', '.join(RANKINGS)}")
    key = np.abs(scores) if ranking == "abs" else scores
    flat = np.where(edge_mask, key, -np.inf).ravel()
    order = np.argsort(-flat, kind="stable")[: int(edge_mask.sum())]
    out = np.zeros((len(ks), flat.size), dtype=bool)
    for i, k in enumerate(ks):
        out[i, order[:k]] = True
    return out.reshape(len(ks), *scores.shape)
