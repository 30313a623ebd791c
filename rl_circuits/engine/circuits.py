"""Circuits: run a model with only some edges of a graph, and how much of its behaviour survives.

`evaluate_circuit` keeps the edges of a boolean mask and replaces every other edge (u, d) by its
counterfactual: O_u - O'_u is subtracted from d's input (`methods.ABLATIONS`; zero ablation
removes O_u), all in one forward pass. O_u is what u writes in that same pass (as EAP-IG's
`evaluate_graph` does), so the replacements compose exactly as the circuit runs.
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

from rl_circuits.engine import counterfactual, efficient, heads, methods, tl_compat
from rl_circuits.engine.choices import RANKINGS
from rl_circuits.engine.graph import build_graph, node_key
from rl_circuits.engine.inputs import (
    LossMask,
    Metric,
    Tokens,
    as_tensor,
    check_inputs,
    checked_metric,
    masked_nll,
)
from rl_circuits.engine.passes import frozen, node_hooks, output_buffers

Ablation = Literal["zero", "mean", "mean-positional", "patch"]
Ranking = Literal["abs", "signed"]
# One circuit [n_upstream, n_downstream] or a stack of k: a bool tensor, array or nested list.
Circuit = (
    Bool[torch.Tensor, "*k n_upstream n_downstream"]
    | Bool[np.ndarray, "*k n_upstream n_downstream"]
    | Sequence
)


def evaluate_circuit(
    model: HookedTransformer,
    tokens: Tokens,
    loss_mask: LossMask,
    circuit: Circuit,
    graph: str = "paper",
    *,
    ablation: str = "zero",
    corrupted_tokens: Int[torch.Tensor, "batch pos"] | None = None,
    corrupted_model: HookedTransformer | None = None,
    mean_tokens: Int[torch.Tensor, "mean_batch mean_pos"] | None = None,
    mean_mask: Bool[torch.Tensor, "mean_batch mean_pos"] | None = None,
    metric: Metric = masked_nll,
    efficient_attention: bool = True,
) -> Float[torch.Tensor, "*k batch"]:
    """Each sample's loss when only the edges in `circuit` carry O_u; the others carry O'_u.

    Every edge (u, d) of the graph outside the circuit gets O'_u in place of O_u in d's input,
    O_u taken in the same forward pass (a residual-state node of the `residual` graph is
    rebuilt as the sum of its kept inputs and the others' O'_u, the same thing on a stream no
    earlier replacement has changed). O'_u as in `attribute` (`ablation`): `zero` removes O_u;
    `mean` / `mean-positional` put in the mean of O_u over `mean_tokens` (default: the batch's
    positions up to each sample's last loss position, right padding left out), overall or per
    position; `patch` puts in O_u of `corrupted_model or model` run on `corrupted_tokens or
    tokens`. All edges in: the clean loss. No edge in: the fully patched loss, every node
    reading only counterfactual outputs: for `patch` within one model, the corrupted run's
    loss on the clean targets; across models, the after model's final residual stream read by
    `model`'s final norm and unembedding (docs/metrics.md). A stack of k circuits [k, n_up,
    n_down] gives [k, batch], one forward each (an empty stack gives [0, batch]); `circuit` may
    be a bool tensor, numpy array or nested list. Entries of `circuit` outside the graph's edge
    mask are ignored. Forward passes only, under `no_grad`; `efficient_attention` uses the fused
    kernels as `attribute` does (the heads graph needs TransformerLens attention).
    """
    methods.check_ablation(ablation)
    g = build_graph(graph, model.cfg.n_layers, model.cfg.n_heads)
    shape = (len(g.upstream), len(g.downstream))
    circuit = as_tensor(circuit, "circuit")
    stacked = circuit.ndim == 3
    circuits = circuit if stacked else circuit.unsqueeze(0)
    if circuits.dtype != torch.bool or tuple(circuits.shape[1:]) != shape:
        raise ValueError(
            f"circuit must be a bool mask [n_upstream, n_downstream] = {list(shape)} over the "
            f"{graph!r} graph's edges (or a stack of them), got {circuit.dtype} "
            f"{list(circuit.shape)}"
        )
    tokens, loss_mask = check_inputs(model, tokens, loss_mask)
    metric = checked_metric(metric, tokens.shape[0])
    batch, pos = tokens.shape
    acc = torch.float64 if model.cfg.dtype == torch.float64 else torch.float32
    if len(circuits) == 0:  # an empty stack: no forward pass
        return torch.zeros(0, batch, dtype=acc)
    cf = counterfactual.prepare(
        model,
        tokens,
        loss_mask,
        ablation,
        corrupted_tokens,
        corrupted_model,
        mean_tokens,
        mean_mask,
    )
    if g.name == "heads":
        with frozen(model), torch.no_grad():
            out = _heads_losses(model, tokens, loss_mask, g, circuits, cf, metric)
        return out if stacked else out[0]
    chunks = output_buffers(model, batch, pos, acc)
    slots = [buf[:, i] for _, buf in chunks for i in range(buf.shape[1])]
    attention = efficient.efficient_attention(model) if efficient_attention else nullcontext()
    flags = tl_compat.single_stream_inputs(model)  # before attention, which checks them
    losses = []
    with frozen(model), torch.no_grad(), flags, attention:
        replaced = _counterfactual_sum(model, g, cf, batch, pos, acc, efficient_attention)
        for keep in circuits:
            removed = (g.edge_mask & ~keep.cpu()).to(acc)  # [n_up, n_down]

            def ablate(d: int, x: torch.Tensor, removed=removed) -> torch.Tensor:
                n = g.n_before[d]
                if not removed[:n, d].any():
                    return x
                # A residual-state node (kind "output") also carries what earlier replacements
                # did to the stream, so it is rebuilt from its inputs; a norm input is read
                # off an untouched stream, so the replaced messages are subtracted.
                rebuild = g.sites[d].kind == "output"
                weights = (1.0 - removed[:n, d]) if rebuild else removed[:n, d]
                total = torch.zeros_like(x, dtype=acc)
                for start, buf in chunks:  # one contraction per device's run of nodes
                    k = min(n - start, buf.shape[1])
                    if k <= 0:
                        break
                    w = weights[start : start + k].to(buf.device)
                    total += torch.einsum("bupm,u->bpm", buf[:, :k], w).to(x.device)
                if replaced is not None:
                    total += (1 if rebuild else -1) * replaced(removed[:n, d]).to(x.device)
                return total.to(x.dtype) if rebuild else x - total.to(x.dtype)

            with node_hooks(model, g, transform=ablate, record=slots):
                losses.append(metric(model(tokens), tokens, loss_mask).to(acc))
    out = torch.stack(losses).cpu()
    return out if stacked else out[0]


def _counterfactual_sum(model, g, cf, batch: int, pos: int, acc, efficient_attention: bool):
    """A function: weights [n] over the first n upstream nodes -> sum_u w_u O'_u, broadcastable
    to [batch, pos, d_model]; None for zero ablation (O'_u = 0)."""
    if cf.ablation == "zero":
        return None
    if cf.ablation == "patch":
        chunks = output_buffers(model, batch, pos, acc)  # the one extra activation buffer
        slots = [buf[:, i] for _, buf in chunks for i in range(buf.shape[1])]
        counterfactual.fill(cf, g.upstream, slots, efficient_attention)  # -O'_u

        def patched(w: torch.Tensor) -> torch.Tensor:
            total = 0
            for start, buf in chunks:
                k = min(len(w) - start, buf.shape[1])
                if k <= 0:
                    break
                term = torch.einsum("bupm,u->bpm", buf[:, :k], w[start : start + k].to(buf.device))
                total = total - term.to(chunks[0][1].device)
            return total

        return patched
    device = model.embed.W_E.device
    means = counterfactual.means(cf, g.upstream, acc, efficient_attention)
    stacked = torch.stack([m.to(device) for m in means])  # [n_up, (pos,) d_model]
    if cf.ablation == "mean-positional":
        stacked = stacked[:, :pos]
    return lambda w: torch.einsum("u...,u->...", stacked[: len(w)], w.to(device))


def _heads_losses(model, tokens, loss_mask, g, circuits, cf, metric) -> torch.Tensor:
    """The heads graph's circuits through TransformerLens's per-head input hooks.

    With split q/k/v inputs and one key/value per query head (`tl_compat.ungrouped_kv`),
    `hook_{q,k,v}_input` holds each head's own input [batch, pos, head, d_model]; a replaced head
    writer is z_h W_O[h] - z'_h W_O'[h], z_h from `hook_z` of this pass and z'_h, W_O' from the
    counterfactual (the same W_O within one model: (z_h - z'_h) W_O[h]). TransformerLens
    attention is used (the fused kernels read no per-head inputs).
    """
    heads.check_supported(model)
    acc = torch.float64 if model.cfg.dtype == torch.float64 else torch.float32
    n_layers = model.cfg.n_layers
    names = ["hook_embed"] + [f"blocks.{i}.hook_mlp_out" for i in range(n_layers)]
    names += [f"blocks.{i}.attn.hook_z" for i in range(n_layers)]
    with tl_compat.ungrouped_kv(model, per_head_inputs=True):
        values = None
        if cf.ablation == "patch":
            values = [None] * len(names)

            def on_output(i: int, act: torch.Tensor) -> None:
                values[i] = act.to(tokens.device, acc)

            counterfactual.run_outputs(cf, names, on_output, efficient_attention=False)
        elif cf.ablation != "zero":
            values = counterfactual.means(cf, names, acc, efficient_attention=False)
            if cf.ablation == "mean-positional":
                values = [v[: tokens.shape[1]] for v in values]
        replaced = None
        if values is not None:
            w_o = None
            if cf.cross_model:
                w_o = [b.attn.W_O.detach().to(tokens.device, acc) for b in cf.model.blocks]
            replaced = (
                dict(enumerate(values[: n_layers + 1])),
                dict(enumerate(values[n_layers + 1 :])),
                w_o,
            )
        losses = []
        for keep in circuits:
            run = _HeadsPass(model, g, (g.edge_mask & ~keep.cpu()).to(acc), replaced, acc)
            logits = model.run_with_hooks(tokens, fwd_hooks=run.hooks())
            losses.append(metric(logits, tokens, loss_mask).to(acc))
    return torch.stack(losses).cpu()


class _HeadsPass:
    """The hooks of one heads-graph forward: record writers, replace the removed ones."""

    def __init__(self, model, g, removed, replaced, acc):
        self.model, self.g, self.removed, self.acc = model, g, removed, acc
        self.n_heads, self.n_layers = model.cfg.n_heads, model.cfg.n_layers
        # O' of the embedding / MLPs, z' of each layer, and W_O' when from another model.
        self.cf_full, self.cf_z, self.cf_w_o = replaced if replaced is not None else (None,) * 3
        self.full: dict[int, torch.Tensor] = {}  # 0: embedding, l + 1: MLP of layer l
        self.z: dict[int, torch.Tensor] = {}  # layer -> [b, p, head, d_head]
        self.node = {name: d for d, name in enumerate(g.downstream)}

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

    def hooks(self) -> list:
        hooks = self.record_hooks()
        for layer in range(self.n_layers):
            hooks += [(f"blocks.{layer}.hook_{p}_input", self._per_head) for p in "qkv"]
            hooks.append((f"blocks.{layer}.hook_mlp_in", self._single))
        hooks.append((self.g.downstream[-1], self._single))
        return hooks

    def _correction(self, columns: list[int], device) -> torch.Tensor | None:
        """O_u - O'_u of the removed writers, summed for each of `columns`: [b, p, c, d_model]."""
        n = self.g.n_before[columns[0]]
        w = self.removed[:n, columns].to(device)  # [n, c]
        total = None
        for i, act in self.full.items():
            u = self.g.forward_index("embed") if i == 0 else self.g.forward_index("mlp", i - 1)
            if u < n and w[u].any():
                delta = act if self.cf_full is None else act - self.cf_full[i]
                term = delta.unsqueeze(2) * w[u].view(1, 1, -1, 1)
                total = term if total is None else total + term
        for layer, z in self.z.items():
            rows = self.g.forward_heads(layer)
            weights = w[rows]  # [head, c]
            if rows.start >= n or not weights.any():
                continue
            w_o = self.model.blocks[layer].attn.W_O.to(device, self.acc)  # [head, d_head, m]
            if self.cf_z is not None and self.cf_w_o is None:
                z = z - self.cf_z[layer]  # one W_O: (z - z') W_O
            term = torch.einsum("bpgj,gc,gjm->bpcm", z, weights, w_o)
            if self.cf_w_o is not None:
                theirs = self.cf_w_o[layer]
                term = term - torch.einsum("bpgj,gc,gjm->bpcm", self.cf_z[layer], weights, theirs)
            total = term if total is None else total + term
        return total

    def _per_head(self, act: torch.Tensor, hook) -> torch.Tensor:
        key = node_key(hook.name)  # e.g. NodeKey("q", layer, None): the layer's q inputs
        heads = self.g.backward_heads(key.component, key.layer)
        columns = list(range(heads.start, heads.stop))
        fix = self._correction(columns, act.device)
        return act if fix is None else act - fix.to(act.dtype)

    def _single(self, act: torch.Tensor, hook) -> torch.Tensor:
        fix = self._correction([self.node[hook.name]], act.device)
        return act if fix is None else act - fix[:, :, 0].to(act.dtype)


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
