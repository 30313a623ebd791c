"""Edge attribution patching: one edge-score matrix per sample, from TransformerLens hooks.

score(u, d) = -<dL/dH_d, O_u>, summed over positions and d_model: the first-order change of
the sample's loss when upstream output O_u is removed from downstream input H_d (zero
ablation, paper Eq. 9). One forward and one backward pass fill every edge: forward hooks copy
each upstream output into one preallocated buffer, and a gradient hook at each downstream
site contracts its gradient with the buffer prefix of nodes that write before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from typing import Literal

import torch
from jaxtyping import Bool, Int
from transformer_lens import HookedTransformer

from rl_circuits.engine import counterfactual, efficient, heads, methods, relp, tl_compat
from rl_circuits.engine.graph import Graph, build_graph
from rl_circuits.engine.inputs import (
    LossMask,
    Metric,
    Tokens,
    check_inputs,
    check_sample_ids,
    checked_metric,
    masked_nll,
)
from rl_circuits.engine.passes import frozen, node_hooks, output_buffers
from rl_circuits.engine.scores import EdgeScores
from rl_circuits.errors import NumericalError

Method = Literal["eap", "eap-ig", "eap-ig-activations", "relp", "clean-corrupted", "exact"]
METHODS: tuple[str, ...] = methods.METHOD_NAMES
# Metric and masked_nll live in `engine.inputs`; this module keeps them importable from here.
__all__ = ["METHODS", "Method", "Metric", "attribute", "masked_nll"]


def attribute(
    model: HookedTransformer,
    tokens: Tokens,
    loss_mask: LossMask,
    graph: str = "paper",
    method: str = "eap",
    *,
    ablation: str = "zero",
    corrupted_tokens: Int[torch.Tensor, "batch pos"] | None = None,
    corrupted_model: HookedTransformer | None = None,
    mean_tokens: Int[torch.Tensor, "mean_batch mean_pos"] | None = None,
    mean_mask: Bool[torch.Tensor, "mean_batch mean_pos"] | None = None,
    ig_steps: int = 8,
    ig_rule: str = "right",
    relp_rules: Sequence[str] | None = None,
    metric: Metric = masked_nll,
    sample_ids: Sequence[str] | None = None,
    efficient_attention: bool = True,
    checkpoint: bool = False,
) -> EdgeScores:
    """Score every edge of `graph` for each sample of the batch.

    score(u, d) = <dL/dH_d, O'_u - O_u> over positions and d_model: the first-order change of
    the sample's loss when O_u's contribution to H_d is replaced by its counterfactual O'_u
    (`ablation`, see `rl_circuits.engine.methods`): `zero` (O'_u = 0, paper Eq. 9), `mean` /
    `mean-positional` (O_u averaged over `mean_tokens`' positions where `mean_mask` is True,
    by default all of them, overall or per position; without `mean_tokens`: over `tokens` up
    to each sample's last loss position),
    `patch` (O_u of `corrupted_model or model` run on `corrupted_tokens or tokens`; the
    corrupted model must have `model`'s shapes and may sit on another device).

    `loss_mask[b, t]` is True where token t is predicted (from position t-1) in sample b's
    loss. Pad on the right: with causal attention padding never reaches a sample's loss, so
    each sample's matrix is the one it would get alone. Methods (`methods.METHODS`): `eap`
    (one forward and one backward), `eap-ig` (gradients averaged over `ig_steps` inputs on the
    path from the counterfactual embedding to the real one, EAP-IG-inputs; `ig_rule` "right":
    t = 1, ..., 1/n, "left": t = 0, ..., (n-1)/n as EAP-IG), `eap-ig-activations` and
    `clean-corrupted` (as EAP-IG defines them), `relp` (one forward and one backward with
    RelP's propagation rules, `relp_rules`, default all of `methods.RELP_RULES`; under the
    attention-pattern rule q/k inputs get no relevance: their names are in `meta["unscored"]`),
    `exact` (one forward per edge with O_u really replaced by O'_u in H_d; for validation on
    small models).

    `graph="heads"` scores every attention head as a node (`rl_circuits.engine.heads`: no per-head
    copy of the residual stream is ever made; keys and values per query head).
    `efficient_attention` computes attention with fused kernels (memory linear in pos, no
    pattern tensors; hooks on `hook_pattern`/`hook_attn_scores` then raise): same scores.
    `checkpoint` recomputes each block in the backward pass: less memory, one more forward.
    `sample_ids` (one distinct string per sample) name the samples in errors and become the
    result's `ids`; `metric` must return one float per sample. TransformerLens flags that only
    add per-head copies of inputs or outputs (`use_split_qkv_input`, ...) are off during the
    call and restored after it: they do not change the model's function.
    """
    entry = _check_options(model, method, ablation, corrupted_model, ig_steps, ig_rule, relp_rules)
    g = build_graph(graph, model.cfg.n_layers, model.cfg.n_heads)
    tokens, loss_mask = check_inputs(model, tokens, loss_mask)
    ids = check_sample_ids(sample_ids, tokens.shape[0])
    metric = checked_metric(metric, tokens.shape[0])
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
    per_head = g.name == "heads"
    if per_head:
        heads.check_supported(model)
    flags = tl_compat.ungrouped_kv(model) if per_head else tl_compat.single_stream_inputs(model)
    # the flags first: efficient attention checks them on entry
    attention = efficient.efficient_attention(model) if efficient_attention else nullcontext()
    blocks = efficient.checkpoint_blocks(model) if checkpoint else nullcontext()
    with frozen(model), torch.enable_grad(), flags, attention, blocks:
        if entry.passes is None:
            exact = heads.exact_scores if per_head else _exact_scores
            values, loss = exact(model, tokens, loss_mask, g, metric, cf)
        else:
            passes = entry.passes(model.cfg.n_layers, ig_steps, ig_rule)
            if relp_rules is not None:
                passes = [replace(p, rules=relp.check_rules(relp_rules)) for p in passes]
            gradient = heads.gradient_scores if per_head else _gradient_scores
            values, loss = gradient(model, tokens, loss_mask, g, metric, passes, cf)
    _check_finite(loss, values, ids, method)
    rules = passes[0].rules if entry.passes is not None else ()
    return EdgeScores(
        values=values.float().cpu(),
        upstream=g.upstream,
        downstream=g.downstream,
        edge_mask=g.edge_mask,
        loss=loss.float().cpu(),
        graph=graph,
        method=method,
        ids=ids,
        meta={"unscored": relp.unscored(g, rules)} if rules else {},
    )


def _check_options(
    model: HookedTransformer,
    method: str,
    ablation: str,
    corrupted_model: HookedTransformer | None,
    ig_steps: int,
    ig_rule: str,
    relp_rules: Sequence[str] | None,
) -> methods.Method:
    """The method's registry entry, after refusing options that do not go together and models
    whose blocks the graphs cannot describe."""
    entry = methods.check(method, ablation, corrupted_model is not None)
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise ValueError(f"ig_steps must be an integer >= 1, got {ig_steps!r}")
    methods.ig_points(1, ig_rule)  # refuses an unknown rule
    if relp_rules is not None and method != "relp":
        raise ValueError(f"relp_rules apply to method='relp' only, not method={method!r}")
    unsupported = [k for k in ("parallel_attn_mlp", "attn_only") if getattr(model.cfg, k, False)]
    if unsupported:
        raise ValueError(
            f"attribute() does not support models with {unsupported[0]}=True: the graphs assume "
            "each block's attention output feeds its MLP (attention then MLP, both present)"
        )
    return entry


def _gradient_scores(
    model, tokens, loss_mask, graph: Graph, metric: Metric, passes: list, cf
) -> tuple[torch.Tensor, torch.Tensor]:
    """<mean gradient over `passes` at each H_d, O'_u - O_u> for every edge, and the clean loss.

    The buffer slot of u holds O_u - O'_u: -O'_u written before the clean pass, O_u added by
    it. When the first pass is not the clean one, a forward without gradients records first.
    """
    batch, pos = tokens.shape
    acc = torch.float64 if model.cfg.dtype == torch.float64 else torch.float32
    chunks = output_buffers(model, batch, pos, acc)
    scores = torch.zeros(batch, len(graph.upstream), len(graph.downstream), dtype=acc)
    scores = scores.to(tokens.device)
    weight = 1.0 / len(passes)
    slots = [buf[:, i] for _, buf in chunks for i in range(buf.shape[1])]
    counterfactual.fill(cf, graph.upstream, slots)
    add = cf.ablation != "zero"  # zero: copy O_u into the empty slot, as before
    node_of = {name: u for u, name in enumerate(graph.upstream)}

    def on_grad(d: int, grad: torch.Tensor) -> None:
        n = graph.n_before[d]
        for start, buf in chunks:
            k = min(n - start, buf.shape[1])
            if k <= 0:
                break
            g = grad.detach().to(buf.device, acc).flatten(1).unsqueeze(2)  # [b, p*m, 1]
            partial = torch.bmm(buf[:, :k].flatten(2), g).squeeze(2)  # [b, k]
            scores[:, start : start + k, d] -= weight * partial.to(scores.device)

    def capture(d: int, x: torch.Tensor) -> torch.Tensor:
        x = x.view_as(x)  # an autograd node of its own: its gradient is this site's alone
        x.register_hook(lambda grad, d=d: on_grad(d, grad))
        return x

    clean_loss = None
    if not methods.runs_clean(passes[0]):
        with torch.no_grad(), node_hooks(model, graph, record=slots, add=add):
            clean_loss = metric(model(tokens), tokens, loss_mask)
    for step in passes:
        record = clean_loss is None
        rules = relp.relp_rules(model, step.rules) if step.rules else nullcontext()
        with (
            rules,
            node_hooks(
                model, graph, transform=capture, record=slots if record else None, add=add
            ) as hooks,
        ):
            hooks.embed_scale = step.t if step.node is None else 1.0
            if step.node is not None:
                hooks.interpolate = (node_of[step.node], step.t, slots)
            hooks.counterfactual = slots[0] if add else None
            inputs = cf.tokens if step.corrupted else tokens
            loss = metric(model(inputs), tokens, loss_mask)
            loss.sum().backward()  # samples are independent: each gets its own gradient
        if record:
            clean_loss = loss.detach()
    return scores, clean_loss


def _exact_scores(model, tokens, loss_mask, graph: Graph, metric: Metric, cf):
    batch, pos = tokens.shape
    acc = torch.float64 if model.cfg.dtype == torch.float64 else torch.float32
    chunks = output_buffers(model, batch, pos, acc)
    slots = [buf[:, i] for _, buf in chunks for i in range(buf.shape[1])]
    with torch.no_grad():
        counterfactual.fill(cf, graph.upstream, slots)
        with node_hooks(model, graph, record=slots, add=cf.ablation != "zero"):
            clean = metric(model(tokens), tokens, loss_mask)
        scores = torch.zeros(batch, len(graph.upstream), len(graph.downstream), dtype=acc)
        for d in range(len(graph.downstream)):
            for u in range(graph.n_before[d]):

                def ablate(node: int, x: torch.Tensor, u: int = u) -> torch.Tensor:
                    return x - slots[u].to(x.device, x.dtype)  # O_u - O'_u

                with node_hooks(model, graph, transform=ablate, nodes=[d]):
                    loss = metric(model(tokens), tokens, loss_mask)
                scores[:, u, d] = (loss - clean).to("cpu", acc)
    return scores, clean


def _check_finite(loss, values, sample_ids, method: str) -> None:
    bad = (~torch.isfinite(loss)) | (~torch.isfinite(values).flatten(1).all(1)).to(loss.device)
    if bad.any():
        i = int(bad.nonzero()[0])
        name = sample_ids[i] if sample_ids is not None else f"sample {i}"
        raise NumericalError(
            f"{name}: loss {float(loss[i]):.4g} or its {method} scores are NaN/inf during "
            "attribution; float16 overflows easily: load the model in float32 or bfloat16."
        )
