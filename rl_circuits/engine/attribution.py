"""Edge attribution patching: one edge-score matrix per sample, from TransformerLens hooks.

score(u, d) = -<dL/dH_d, O_u>, summed over positions and d_model: the first-order change of
the sample's loss when upstream output O_u is removed from downstream input H_d (zero
ablation, paper Eq. 9). One forward and one backward pass fill every edge: forward hooks copy
each upstream output into one preallocated buffer, and a gradient hook at each downstream
site contracts its gradient with the buffer prefix of nodes that write before it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Literal

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from transformer_lens import HookedTransformer

from rl_circuits.engine import counterfactual, efficient, heads, methods, relp, tl_compat
from rl_circuits.engine.graph import Graph, build_graph
from rl_circuits.engine.scores import EdgeScores
from rl_circuits.errors import NumericalError

Method = Literal["eap", "eap-ig", "eap-ig-activations", "relp", "clean-corrupted", "exact"]
METHODS: tuple[str, ...] = methods.METHOD_NAMES
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


def attribute(
    model: HookedTransformer,
    tokens: Int[torch.Tensor, "batch pos"],
    loss_mask: Bool[torch.Tensor, "batch pos"],
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
    g = build_graph(graph, model.cfg.n_layers, model.cfg.n_heads)
    tokens, loss_mask = _check_inputs(model, tokens, loss_mask)
    ids = _check_sample_ids(sample_ids, tokens.shape[0])
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
    with _frozen(model), torch.enable_grad(), flags, attention, blocks:
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


def _gradient_scores(
    model, tokens, loss_mask, graph: Graph, metric: Metric, passes: list, cf
) -> tuple[torch.Tensor, torch.Tensor]:
    """<mean gradient over `passes` at each H_d, O'_u - O_u> for every edge, and the clean loss.

    The buffer slot of u holds O_u - O'_u: -O'_u written before the clean pass, O_u added by
    it. When the first pass is not the clean one, a forward without gradients records first.
    """
    batch, pos = tokens.shape
    acc = torch.float64 if model.cfg.dtype == torch.float64 else torch.float32
    chunks = _buffers(model, batch, pos, acc)
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
            part = torch.bmm(buf[:, :k].flatten(2), g).squeeze(2)  # [b, k]
            scores[:, start : start + k, d] -= weight * part.to(scores.device)

    def capture(d: int, x: torch.Tensor) -> torch.Tensor:
        x = x.view_as(x)  # an autograd node of its own: its gradient is this site's alone
        x.register_hook(lambda grad, d=d: on_grad(d, grad))
        return x

    clean_loss = None
    if not methods.runs_clean(passes[0]):
        with torch.no_grad(), _hooks(model, graph, record=slots, add=add):
            clean_loss = metric(model(tokens), tokens, loss_mask)
    for step in passes:
        record = clean_loss is None
        rules = relp.relp_rules(model, step.rules) if step.rules else nullcontext()
        with (
            rules,
            _hooks(
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
    chunks = _buffers(model, batch, pos, acc)
    slots = [buf[:, i] for _, buf in chunks for i in range(buf.shape[1])]
    with torch.no_grad():
        counterfactual.fill(cf, graph.upstream, slots)
        with _hooks(model, graph, record=slots, add=cf.ablation != "zero"):
            clean = metric(model(tokens), tokens, loss_mask)
        scores = torch.zeros(batch, len(graph.upstream), len(graph.downstream), dtype=acc)
        for d in range(len(graph.downstream)):
            for u in range(graph.n_before[d]):

                def ablate(node: int, x: torch.Tensor, u: int = u) -> torch.Tensor:
                    return x - slots[u].to(x.device, x.dtype)  # O_u - O'_u

                with _hooks(model, graph, transform=ablate, nodes=[d]):
                    loss = metric(model(tokens), tokens, loss_mask)
                scores[:, u, d] = (loss - clean).to("cpu", acc)
    return scores, clean


def _buffers(model, batch: int, pos: int, dtype) -> list[tuple[int, torch.Tensor]]:
    """One buffer [batch, n, pos, d_model] per device for its contiguous run of upstream nodes."""
    devices = [model.embed.W_E.device]
    for block in model.blocks:
        device = next(block.parameters()).device
        devices += [device, device]
    chunks, start = [], 0
    for i in range(1, len(devices) + 1):
        if i == len(devices) or devices[i] != devices[start]:
            shape = (batch, i - start, pos, model.cfg.d_model)
            chunks.append((start, torch.zeros(shape, dtype=dtype, device=devices[start])))
            start = i
    return chunks


class _Hooks:
    """State shared by the hooks of one pass: call counts per module, the input scale."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.embed_scale = 1.0
        # The embedding's counterfactual offset O_0 - O'_0: the input is then E - (1 - t) that
        # (E' + t (E - E')); None: zero ablation, the input is t E.
        self.counterfactual: torch.Tensor | None = None
        # (u, t, slots): upstream output u replaced by O_u - (1 - t) slots[u], a constant.
        self.interpolate: tuple[int, float, list[torch.Tensor]] | None = None
        self.recorded: set[int] = set()  # upstream outputs already copied in this pass


@contextmanager
def _hooks(
    model: HookedTransformer,
    graph: Graph,
    *,
    transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    record: list[torch.Tensor] | None = None,
    nodes: Sequence[int] | None = None,
    add: bool = False,
) -> Iterator[_Hooks]:
    """Add the hooks for one forward pass; every hook added is removed on exit, even on error.

    `transform(d, x)` replaces the input of downstream node d (all nodes, or `nodes`);
    `record[u]` receives a copy of upstream output u (`add`: the output is added to it). The
    embedding output is made the leaf that gradients flow back to.
    """
    state = _Hooks()
    handles = []
    try:
        if transform is not None:
            by_module: dict[str, dict[int, list[int]]] = {}
            for d in range(len(graph.downstream)) if nodes is None else nodes:
                site = graph.sites[d]
                for call in site.calls:
                    by_module.setdefault(site.module, {}).setdefault(call, []).append(d)
            for name, by_call in by_module.items():
                kind = graph.sites[by_call[next(iter(by_call))][0]].kind

                def apply(x, name=name, by_call=by_call):
                    call = state.calls.get(name, 0)
                    state.calls[name] = call + 1
                    for d in by_call.get(call, ()):
                        x = transform(d, x)
                    return x

                module = model.get_submodule(name)
                if kind == "input":
                    hook = module.register_forward_pre_hook(
                        lambda mod, args, apply=apply: (apply(args[0]), *args[1:])
                    )
                else:
                    hook = module.register_forward_hook(
                        lambda mod, args, out, apply=apply: apply(out)
                    )
                handles.append(hook)

        def on_output(u: int, out: torch.Tensor):
            # First write wins: a checkpointed block's recomputation in the backward pass
            # calls this again (and the downstream sites' counters are past their calls then).
            if record is not None and u not in state.recorded:
                if add:
                    record[u].add_(out.detach().to(record[u].device))
                else:
                    record[u].copy_(out.detach())
                state.recorded.add(u)
            if state.interpolate is not None and state.interpolate[0] == u:
                _, t, slots = state.interpolate
                out = out.detach() - (1 - t) * slots[u].to(out.device, out.dtype)
                return out.requires_grad_(torch.is_grad_enabled()) if u == 0 else out
            if u == 0:
                out = out.detach().requires_grad_(torch.is_grad_enabled())
                if state.embed_scale == 1.0:
                    return out
                if state.counterfactual is None:
                    return out * state.embed_scale
                offset = state.counterfactual.to(out.device, out.dtype)
                return out - (1 - state.embed_scale) * offset
            return None

        for u, name in enumerate(graph.upstream):
            handles.append(
                model.get_submodule(name).register_forward_hook(
                    lambda mod, args, out, u=u: on_output(u, out)
                )
            )
        yield state
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients during attribution; the user's flags are restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _check_inputs(model, tokens, loss_mask):
    tokens = _as_tensor(tokens, "tokens")
    loss_mask = _as_tensor(loss_mask, "loss_mask")
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


def _check_sample_ids(sample_ids, batch: int) -> list[str] | None:
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


def _as_tensor(x, what: str) -> torch.Tensor:
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


def _check_finite(loss, values, sample_ids, method: str) -> None:
    bad = (~torch.isfinite(loss)) | (~torch.isfinite(values).flatten(1).all(1)).to(loss.device)
    if bad.any():
        i = int(bad.nonzero()[0])
        name = sample_ids[i] if sample_ids is not None else f"sample {i}"
        raise NumericalError(
            f"{name}: loss {float(loss[i]):.4g} or its {method} scores are NaN/inf during "
            "attribution; float16 overflows easily: load the model in float32 or bfloat16."
        )
