"""Circuits: run a model with only some edges of a graph, and how much of its behaviour survives.

`evaluate_circuit` keeps the edges of a boolean mask and removes every other edge (u, d) by
subtracting O_u from d's input, all in one forward pass. O_u is what u writes in that same pass
(as EAP-IG's `evaluate_graph` does), so the removals compose exactly as the circuit runs.
`top_k_circuits` on a `log_grid` of k gives the circuits whose losses make a faithfulness curve
(`rl_circuits.analysis.faithfulness`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from functools import partial
from typing import Literal

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from transformer_lens import HookedTransformer

from rl_circuits.engine import efficient, heads, tl_compat
from rl_circuits.engine.attribution import (
    Metric,
    _as_tensor,
    _buffers,
    _check_inputs,
    _frozen,
    _hooks,
    checked_metric,
    masked_nll,
)
from rl_circuits.engine.choices import ABLATIONS, RANKINGS
from rl_circuits.engine.graph import build_graph

Ablation = Literal["zero", "mean"]
Ranking = Literal["abs", "signed"]


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
    removed edge then carries its average message. `circuit` is a bool tensor, numpy array or
    nested list; a stack of k circuits [k, n_up, n_down] gives [k, batch], one forward each
    (an empty stack, k = 0, gives [0, batch]). Entries of `circuit` outside the graph's edge
    mask are ignored. Forward passes only, under `no_grad`: nothing is kept for a backward pass,
    so there is no activation memory for `attribute`'s `checkpoint` to save;
    `efficient_attention` uses the fused kernels as `attribute` does (the heads graph needs
    TransformerLens attention).
    """
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose one of {', '.join(ABLATIONS)}")
    g = build_graph(graph, model.cfg.n_layers, model.cfg.n_heads)
    shape = (len(g.upstream), len(g.downstream))
    circuit = _as_tensor(circuit, "circuit")
    stacked = circuit.ndim == 3
    circuits = circuit if stacked else circuit.unsqueeze(0)
    if circuits.dtype != torch.bool or tuple(circuits.shape[1:]) != shape:
        raise ValueError(
            f"circuit must be a bool mask [n_upstream, n_downstream] = {list(shape)} over the "
            f"{graph!r} graph's edges (or a stack of them), got {circuit.dtype} "
            f"{list(circuit.shape)}"
        )
    tokens, loss_mask = _check_inputs(model, tokens, loss_mask)
    metric = checked_metric(metric, tokens.shape[0])
    batch, pos = tokens.shape
    acc = torch.float64 if model.cfg.dtype == torch.float64 else torch.float32
    if len(circuits) == 0:  # an empty stack: no forward pass
        return torch.zeros(0, batch, dtype=acc)
    if g.name == "heads":
        with _frozen(model), torch.no_grad():
            out = _heads_losses(model, tokens, loss_mask, g, circuits, ablation, metric)
        return out if stacked else out[0]
    chunks = _buffers(model, batch, pos, acc)
    slots = [buf[:, i] for _, buf in chunks for i in range(buf.shape[1])]
    attention = efficient.efficient_attention(model) if efficient_attention else nullcontext()
    flags = tl_compat.single_stream_inputs(model)  # before attention, which checks them
    losses = []
    with _frozen(model), torch.no_grad(), flags, attention:
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


def _heads_losses(model, tokens, loss_mask, g, circuits, ablation: str, metric) -> torch.Tensor:
    """The heads graph's circuits through TransformerLens's per-head input hooks.

    With split q/k/v inputs and one key/value per query head (`tl_compat.ungrouped_kv`),
    `hook_{q,k,v}_input` holds each head's own input [batch, pos, head, d_model]; a removed head
    writer is z_h W_O[h] from `hook_z` of this pass (mean ablation: z_h minus its clean mean,
    which is linear in W_O). TransformerLens attention is used (the fused kernels read no
    per-head inputs).
    """
    heads.check_supported(model)
    acc = torch.float64 if model.cfg.dtype == torch.float64 else torch.float32
    with tl_compat.ungrouped_kv(model, per_head_inputs=True):
        means = None
        if ablation == "mean":
            clean = _HeadsPass(model, g, None, None, acc)
            model.run_with_hooks(tokens, fwd_hooks=clean.record_hooks())
            means = clean.means(_valid_positions(loss_mask).to(acc))
        losses = []
        for keep in circuits:
            run = _HeadsPass(model, g, (g.edge_mask & ~keep.cpu()).to(acc), means, acc)
            logits = model.run_with_hooks(tokens, fwd_hooks=run.hooks())
            losses.append(metric(logits, tokens, loss_mask).to(acc))
    return torch.stack(losses).cpu()


class _HeadsPass:
    """The hooks of one heads-graph forward: record writers, subtract the removed ones."""

    def __init__(self, model, g, removed, means, acc):
        self.model, self.g, self.removed, self.acc = model, g, removed, acc
        self.n_heads, self.n_layers = model.cfg.n_heads, model.cfg.n_layers
        self.mean_full, self.mean_z = means if means is not None else (None, None)
        self.full: dict[int, torch.Tensor] = {}  # 0: embedding, l + 1: MLP of layer l
        self.z: dict[int, torch.Tensor] = {}  # layer -> [b, p, head, d_head]
        self.node = {name: d for d, name in enumerate(g.downstream)}

    def _full_upstream(self, i: int) -> int:
        return 0 if i == 0 else i * (self.n_heads + 1)

    def record_hooks(self) -> list:
        names = ["hook_embed"] + [f"blocks.{i}.hook_mlp_out" for i in range(self.n_layers)]
        hooks = [(name, partial(self._store, self.full, i)) for i, name in enumerate(names)]
        hooks += [
            (f"blocks.{i}.attn.hook_z", partial(self._store, self.z, i))
            for i in range(self.n_layers)
        ]
        return hooks

    def _store(self, into: dict, i: int, act: torch.Tensor, hook) -> None:
        into[i] = act.to(self.acc)

    def means(self, valid: torch.Tensor) -> tuple[dict, dict]:
        """Each writer's clean mean over the valid positions: [d_model] or z's [head, d_head]."""
        total = valid.sum()
        full = {i: torch.einsum("bpm,bp->m", a, valid) / total for i, a in self.full.items()}
        z = {i: torch.einsum("bphj,bp->hj", a, valid) / total for i, a in self.z.items()}
        return full, z

    def hooks(self) -> list:
        hooks = self.record_hooks()
        for layer in range(self.n_layers):
            hooks += [(f"blocks.{layer}.hook_{p}_input", self._per_head) for p in "qkv"]
            hooks.append((f"blocks.{layer}.hook_mlp_in", self._single))
        hooks.append((self.g.downstream[-1], self._single))
        return hooks

    def _correction(self, columns: list[int], device) -> torch.Tensor | None:
        """The removed writers' outputs summed for each of `columns`: [b, p, c, d_model]."""
        n = self.g.n_before[columns[0]]
        w = self.removed[:n, columns].to(device)  # [n, c]
        total = None
        for i, act in self.full.items():
            u = self._full_upstream(i)
            if u < n and w[u].any():
                part = act if self.mean_full is None else act - self.mean_full[i]
                term = part.unsqueeze(2) * w[u].view(1, 1, -1, 1)
                total = term if total is None else total + term
        for layer, z in self.z.items():
            first = 1 + layer * (self.n_heads + 1)
            weights = w[first : first + self.n_heads]  # [head, c]
            if first >= n or not weights.any():
                continue
            if self.mean_z is not None:
                z = z - self.mean_z[layer]
            w_o = self.model.blocks[layer].attn.W_O.to(device, self.acc)  # [head, d_head, m]
            term = torch.einsum("bpgj,gc,gjm->bpcm", z, weights, w_o)
            total = term if total is None else total + term
        return total

    def _per_head(self, act: torch.Tensor, hook) -> torch.Tensor:
        layer, part = hook.name.split(".")[1], hook.name.split("hook_")[1][0]
        columns = [self.node[f"blocks.{layer}.hook_{part}_input[{h}]"] for h in range(act.shape[2])]
        fix = self._correction(columns, act.device)
        return act if fix is None else act - fix.to(act.dtype)

    def _single(self, act: torch.Tensor, hook) -> torch.Tensor:
        fix = self._correction([self.node[hook.name]], act.device)
        return act if fix is None else act - fix[:, :, 0].to(act.dtype)


def _valid_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """[batch, pos] True up to each sample's last loss position (right padding excluded)."""
    pos = loss_mask.shape[1]
    last = pos - 1 - loss_mask.flip(1).int().argmax(1)
    return torch.arange(pos, device=loss_mask.device).unsqueeze(0) <= last.unsqueeze(1)


def _position_means(chunks, loss_mask: torch.Tensor) -> torch.Tensor:
    """Each upstream output [n_up, d_model] averaged over the batch and the positions up to each
    sample's last loss position."""
    valid = _valid_positions(loss_mask)
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
