"""Edge attribution on the head-level graph without any per-head copy of the residual stream.

Every attention head is a node (see `rl_circuits.engine.graph`): upstream, head h' of layer
l' writes O = z_h' W_O[h']; downstream, head h of layer l reads its own query (key, value)
input x, through ln1 and its projection W_Q[h]. The score of an edge is
-sum_p <O[p], dL/dx_h[p]> as in the other graphs. Materialising O for every head, or dL/dx_h
for every head, would cost n_heads copies of the residual stream; instead:

* A head's input gradient is J_p^T a_h[p] with a_h = W_Q[h] dq_h (dq_h: the gradient at
  `hook_q`, head h) and J_p the Jacobian of ln1 at the layer's one residual input x_p. For
  RMSNorm y = w * x / r, J^T a = (w * a) / r - xhat <xhat, w * a> / (d r) with xhat = x / r: a
  diagonal part and a rank-1 part per position, shared by all heads of the layer.
* Head -> head, diagonal part: sum_p z_h'[p] W_O[h'] diag(w) W_Q[h] dq_h[p] / r_p is
  <K[h', h], C[h', h]> with K = W_O diag(w) W_Q (weights only, [H d_head, H d_head]) and
  C = Z^T (dQ / r) (one [pos]-contraction for all head pairs of two layers).
* Head -> head, rank-1 part: alpha_h'[p] = <O_h'[p], xhat_p> times t_h[p] = <xhat, w a_h>/(d r),
  summed over positions; alpha needs O of one head at a time, after the backward pass.
* Head -> MLP input / logits: the full gradients are kept (one residual per layer) and
  contracted with O of one head at a time after the backward pass.
* Embedding / MLP -> head: each head's input gradient is built for a few heads at a time and
  contracted with the stored outputs, as in the other graphs.

Keys and values are scored per query head (TransformerLens's `ungroup_grouped_query_attention`,
set by `tl_compat.ungrouped_kv` while attributing): `hook_k` and `hook_v` give one key and value
per query head and their gradients are each head's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from jaxtyping import Bool, Float, Int
from transformer_lens import HookedTransformer

from rl_circuits.engine import counterfactual, methods, relp, tl_compat
from rl_circuits.engine.graph import Graph, Site
from rl_circuits.engine.head_buffers import CHUNK, HeadBuffers, buffer_bytes, fill

__all__ = ["CHUNK", "buffer_bytes", "check_supported", "exact_scores", "gradient_scores"]
QKV = "qkv"  # the letters of a head's three inputs, in `qkv` index order


def check_supported(model: HookedTransformer) -> None:
    """Refuse, with the reason, models whose attention inputs the heads engine cannot follow."""
    cfg = model.cfg
    problems = []
    if cfg.normalization_type not in ("RMS", "RMSPre", None):
        problems.append(f"{cfg.normalization_type} normalisation (RMSNorm or none is needed)")
    if cfg.parallel_attn_mlp:
        problems.append("parallel attention and MLP")
    if tl_compat.has_post_norm(cfg):
        problems.append("normalisation after attention")
    if cfg.attn_only:
        problems.append("attention-only blocks (no MLP)")
    if cfg.positional_embedding_type == "shortformer":
        problems.append("shortformer positional embeddings")
    if problems:
        raise ValueError(
            f"graph='heads' does not support {'; '.join(problems)}; use graph='paper' for this "
            "model"
        )
    biased = [i for i, block in enumerate(model.blocks) if bool(block.attn.b_O.detach().any())]
    if biased:
        raise ValueError(
            f"graph='heads' gives an attention output bias b_O to no head, and layer(s) "
            f"{biased} have a nonzero b_O, so the heads' scores would miss it. Llama, Mistral and "
            "Qwen2 have no b_O: a nonzero one is the value bias b_V moved there by "
            "TransformerLens's weight processing (fold_value_biases). Load the model with "
            "rl_circuits.load_model (its fold_ln and center_unembed keep b_V with its head) or "
            "with fold_value_biases=False, or use graph='paper'."
        )


def _qkv_weight(
    attn: torch.nn.Module, letter: str, device: torch.device | str, dtype: torch.dtype
) -> tuple[Float[torch.Tensor, "weight_head d_model d_head"], int]:
    """The projection weight of `letter` ("q", "k", "v") and query heads per weight head."""
    weight, group = tl_compat.qkv_weight(attn, letter.upper())
    return weight.detach().to(device, dtype), group


def _prepare(model: HookedTransformer, tokens: torch.Tensor) -> HeadBuffers:
    """Empty buffers for one pass over `tokens`, accumulating in float64 for float64 models and
    float32 otherwise (after refusing unsupported models)."""
    check_supported(model)
    acc = torch.float64 if model.cfg.dtype == torch.float64 else torch.float32
    batch, pos = tokens.shape
    return HeadBuffers(model, batch, pos, tokens.device, acc)


def gradient_scores(
    model: HookedTransformer,
    tokens: Int[torch.Tensor, "batch pos"],
    loss_mask: Bool[torch.Tensor, "batch pos"],
    graph: Graph,
    metric: Callable,
    passes: list[methods.Pass],
    cf: counterfactual.Counterfactual,
) -> tuple[Float[torch.Tensor, "batch n_upstream n_downstream"], Float[torch.Tensor, " batch"]]:
    """Scores from the gradients averaged over `passes` (`rl_circuits.engine.methods`), and the
    clean loss."""
    buffers = _prepare(model, tokens)
    batch, acc = tokens.shape[0], buffers.dtype
    scores = torch.zeros(batch, len(graph.upstream), len(graph.downstream), dtype=acc)
    engine = _Engine(model, buffers, scores.to(buffers.device), graph, 1.0 / len(passes))
    fill(model, buffers, cf)
    clean_loss = None
    if not methods.runs_clean(passes[0]):
        with torch.no_grad(), _gradient_hooks(model, buffers, _NoEngine(), record=True):
            clean_loss = metric(model(tokens), tokens, loss_mask)
    for step in passes:
        record = clean_loss is None
        buffers.seen = set()
        buffers.embed_scale = step.t if step.node is None else 1.0
        buffers.interpolate = None if step.node is None else (step.node, step.t)
        buffers.constant_scale = "norm-scale" in step.rules
        if step.node is not None:  # a constant output: sites before it may get no gradient
            buffers.grads.zero_()
            if buffers.has_norm:
                buffers.coef.zero_()
        rules = relp.relp_rules(model, step.rules) if step.rules else nullcontext()
        with rules, _gradient_hooks(model, buffers, engine, record):
            loss = metric(model(cf.tokens if step.corrupted else tokens), tokens, loss_mask)
            loss.sum().backward()
        engine.finish()
        if record:
            clean_loss = loss.detach()
    return engine.scores, clean_loss


class _Engine:
    """The contractions, called from gradient hooks and after each backward pass; node
    positions come from the graph (`Graph.forward_index`, `backward_index`)."""

    def __init__(
        self,
        model: HookedTransformer,
        buffers: HeadBuffers,
        scores: Float[torch.Tensor, "batch n_upstream n_downstream"],
        graph: Graph,
        weight: float,
    ):
        self.model, self.buffers, self.scores, self.graph = model, buffers, scores, graph
        self.weight = weight
        cfg = model.cfg
        self.n_layers, self.n_heads = cfg.n_layers, cfg.n_heads
        self.d_head, self.d_model = cfg.d_head, cfg.d_model
        # the rows of the embedding and MLP outputs, in the order of `buffers.full`
        full = [graph.forward_index("embed")]
        full += [graph.forward_index("mlp", layer) for layer in range(self.n_layers)]
        self.full_rows = torch.tensor(full, device=buffers.device)

    def full_column(self, index: int) -> int:
        """The column of `hook_mlp_in` of layer `index`, or of the logits for index n_layers."""
        if index == self.n_layers:
            return self.graph.backward_index("logits")
        return self.graph.backward_index("mlp", index)

    def on_qkv(self, layer: int, qkv: int, grad: torch.Tensor) -> None:
        """Scores into the `QKV[qkv]` inputs of `layer`'s heads: from embedding/MLPs now, the
        diagonal part from earlier heads now, the rank-1 coefficients kept for `finish`."""
        buffers, n_heads = self.buffers, self.n_heads
        dx = grad.detach().to(buffers.device, buffers.dtype)  # [batch, pos, n_heads, d_head]
        attn = self.model.blocks[layer].attn
        w_x, group = _qkv_weight(attn, QKV[qkv], buffers.device, buffers.dtype)
        kind = buffers.norms[layer]
        ln1 = self.model.blocks[layer].ln1
        w_norm = ln1.w.detach().to(buffers.device, buffers.dtype) if kind == "rms" else None
        columns = self.graph.backward_heads(QKV[qkv], layer)
        n_full = layer + 1
        outputs = buffers.full[:, :n_full].flatten(2)  # [batch, n_full, pos * d_model]
        rows = self.full_rows[:n_full, None]
        for start in range(0, n_heads, CHUNK):
            stop = min(start + CHUNK, n_heads)
            heads = torch.arange(start, stop, device=buffers.device)
            grad_in = torch.einsum("bpcj,cmj->bcpm", dx[:, :, start:stop], w_x[heads // group])
            if kind != "none":
                grad_in = grad_in * buffers.rinv[:, layer, None, :, None]
                if w_norm is not None:
                    grad_in = grad_in * w_norm
            if kind != "none" and not buffers.constant_scale:  # the rank-1 part (else 0)
                xhat = buffers.xhat[:, layer, None]  # [batch, 1, pos, d_model]
                coef = (grad_in * xhat).sum(-1) / self.d_model  # [batch, chunk, pos]
                buffers.coef[:, layer, qkv, start:stop] = coef
                grad_in = grad_in - xhat * coef.unsqueeze(-1)  # each head's input gradient
            partial = torch.bmm(outputs, grad_in.flatten(2).transpose(1, 2))  # [b, n_full, c]
            self.scores[:, rows, (columns.start + heads)[None, :]] -= self.weight * partial
        if layer > 0:
            self._head_to_head(layer, dx, w_x, group, w_norm, columns)

    def _head_to_head(
        self,
        layer: int,
        dx: Float[torch.Tensor, "batch pos n_heads d_head"],
        w_x: Float[torch.Tensor, "weight_head d_model d_head"],
        group: int,
        w_norm: Float[torch.Tensor, " d_model"] | None,
        columns: slice,
    ) -> None:
        """The diagonal part of every earlier head's edges into `columns` (one input of each of
        `layer`'s heads): <K[h', h], C[h', h]> per head pair, as the module docstring derives."""
        buffers, n_heads, d_head = self.buffers, self.n_heads, self.d_head
        batch, pos = dx.shape[:2]
        dxn = dx * buffers.rinv[:, layer, :, None, None] if buffers.norms[layer] != "none" else dx
        dxn = dxn.reshape(batch, pos, n_heads * d_head)
        n_w = w_x.shape[0]
        w_in = w_x if w_norm is None else w_x * w_norm[None, :, None]
        w_in = w_in.permute(1, 0, 2).reshape(self.d_model, n_w * d_head)
        for source in range(layer):
            diag = None
            for z, w_o in buffers.writers(self.model, source):  # O = z W_O (minus z' W_O')
                c = torch.bmm(z, dxn)  # [batch, (h' i), (h j)]
                k = w_o.reshape(n_heads * d_head, self.d_model) @ w_in  # [(h' i), (g j)]
                term = torch.einsum(
                    "bhixgj,hixj->bhxg",
                    c.view(batch, n_heads, d_head, n_w, group, d_head),
                    k.view(n_heads, d_head, n_w, d_head),
                ).reshape(batch, n_heads, n_heads)
                diag = term if diag is None else diag - term
            self.scores[:, self.graph.forward_heads(source), columns] -= self.weight * diag

    def on_full(self, index: int, grad: torch.Tensor) -> None:
        """Scores into `hook_mlp_in` of layer `index` (or the logits) from embedding/MLPs now;
        the gradient is kept for the heads, in `finish`."""
        buffers = self.buffers
        g = grad.detach().to(buffers.device, buffers.dtype)
        n_full = min(index + 1, len(self.full_rows))
        flat = g.flatten(1).unsqueeze(2)
        partial = torch.bmm(buffers.full[:, :n_full].flatten(2), flat).squeeze(2)
        self.scores[:, self.full_rows[:n_full], self.full_column(index)] -= self.weight * partial
        buffers.grads[:, index].copy_(g)

    def finish(self) -> None:
        """Head -> MLP input / logits, and the rank-1 part of head -> head, one head chunk of
        outputs O = z W_O at a time."""
        buffers, graph, n_heads, d_head = self.buffers, self.graph, self.n_heads, self.d_head
        n_layers = self.n_layers
        batch, pos = buffers.full.shape[0], buffers.full.shape[2]
        for source in range(n_layers):
            writers = [
                (z.view(batch, n_heads, d_head, pos), w_o)
                for z, w_o in buffers.writers(self.model, source)
            ]
            grads = buffers.grads[:, source:].flatten(2)  # [batch, n_g, pos * d_model]
            cols = torch.tensor(
                [self.full_column(i) for i in range(source, n_layers + 1)], device=buffers.device
            )
            later = n_layers - 1 - source
            first = graph.forward_heads(source).start
            for start in range(0, n_heads, CHUNK):
                stop = min(start + CHUNK, n_heads)
                low, high = first + start, first + stop
                rows = torch.arange(low, high, device=buffers.device)
                out = None
                for z, w_o in writers:  # O = z W_O (minus z' W_O')
                    term = torch.einsum("bcjp,cjm->bcpm", z[:, start:stop], w_o[start:stop])
                    out = term if out is None else out - term
                partial = torch.bmm(out.flatten(2), grads.transpose(1, 2))  # [batch, c, n_g]
                self.scores[:, rows[:, None], cols[None, :]] -= self.weight * partial
                if not buffers.has_norm or later == 0 or buffers.constant_scale:
                    continue
                alpha = torch.einsum("bcpm,bapm->bcap", out, buffers.xhat[:, source + 1 :])
                rank1 = torch.einsum("bcap,baxhp->bcaxh", alpha, buffers.coef[:, source + 1 :])
                for i, layer in enumerate(range(source + 1, n_layers)):
                    for qkv, letter in enumerate(QKV):  # [batch, chunk, n_heads] each
                        block = self.scores[:, low:high, graph.backward_heads(letter, layer)]
                        block += self.weight * rank1[:, :, i, qkv]


class _PassHooks:
    """The hooks of one pass: record clean outputs (first pass) and norm inputs, interpolate an
    output (`methods.Pass`), and register the gradient hooks at each head's q/k/v, each MLP
    input and the final residual state."""

    def __init__(
        self,
        model: HookedTransformer,
        buffers: HeadBuffers,
        engine: _Engine | _NoEngine,
        record: bool,
    ):
        self.model, self.buffers, self.engine, self.record = model, buffers, engine, record

    def _store(self, into: torch.Tensor, value: torch.Tensor) -> None:
        if self.buffers.add:
            into.add_(value.to(into.device, into.dtype))
        else:
            into.copy_(value)

    def _interpolated(
        self, name: str, out: torch.Tensor, delta: Callable[[], torch.Tensor]
    ) -> torch.Tensor | None:
        """O' + t (O - O') = O - (1 - t) (O - O') where `name` is the interpolated output."""
        interpolate = self.buffers.interpolate
        if interpolate is None or interpolate[0] != name:
            return None
        return out.detach() - (1 - interpolate[1]) * delta().to(out.device, out.dtype)

    def _grad_hook(self, out: torch.Tensor, on_grad: Callable) -> torch.Tensor:
        """`out` as an autograd node of its own whose gradient goes to `on_grad`."""
        out = out.view_as(out)
        out.register_hook(on_grad)
        return out

    def on_embed(self, mod, args, out):
        buffers = self.buffers
        if self.record and buffers.once("embed"):
            self._store(buffers.full[:, 0], out.detach())
        value = self._interpolated("hook_embed", out, lambda: buffers.full[:, 0])
        if value is not None:
            return value.requires_grad_(torch.is_grad_enabled())
        out = out.detach().requires_grad_(torch.is_grad_enabled())
        if buffers.embed_scale == 1.0:
            return out
        if not buffers.add:
            return out * buffers.embed_scale
        return out - (1 - buffers.embed_scale) * buffers.full[:, 0].to(out.device, out.dtype)

    def on_attn_out(self, layer, mod, args, out):
        def delta():
            total = None
            for z, w_o in self.buffers.writers(self.model, layer):  # z [batch, width, pos]
                term = torch.einsum("bwp,wm->bpm", z, w_o.flatten(0, 1))
                total = term if total is None else total - term
            return total

        return self._interpolated(f"blocks.{layer}.hook_attn_out", out, delta)

    def on_ln1(self, layer, mod, args):
        buffers = self.buffers
        if buffers.norms[layer] != "none" and buffers.once("ln1", layer):
            x = args[0].detach().to(buffers.device, buffers.dtype)
            r = (x.pow(2).mean(-1) + mod.eps).sqrt()
            buffers.rinv[:, layer].copy_(1.0 / r)
            buffers.xhat[:, layer].copy_(x / r.unsqueeze(-1))

    def on_z(self, layer, mod, args, out):
        if self.record and self.buffers.once("z", layer):
            z = out.detach().flatten(2).transpose(1, 2)  # [batch, n_heads * d_head, pos]
            self._store(self.buffers.z[:, layer], z)

    def on_qkv(self, layer, qkv, mod, args, out):
        if not out.requires_grad or not self.buffers.once("qkv", layer, qkv):
            return None
        return self._grad_hook(out, lambda grad: self.engine.on_qkv(layer, qkv, grad))

    def on_ln2(self, layer, mod, args):
        if not args[0].requires_grad or not self.buffers.once("ln2", layer):
            return None
        x = self._grad_hook(args[0], lambda grad: self.engine.on_full(layer, grad))
        return (x, *args[1:])

    def on_mlp(self, layer, mod, args, out):
        full = self.buffers.full
        if self.record and self.buffers.once("mlp", layer):
            self._store(full[:, layer + 1], out.detach())
        return self._interpolated(f"blocks.{layer}.hook_mlp_out", out, lambda: full[:, layer + 1])

    def on_post(self, mod, args, out):
        if not out.requires_grad or not self.buffers.once("post"):
            return None
        n_layers = self.model.cfg.n_layers
        return self._grad_hook(out, lambda grad: self.engine.on_full(n_layers, grad))


@contextmanager
def _gradient_hooks(
    model: HookedTransformer, buffers: HeadBuffers, engine: _Engine | _NoEngine, record: bool
) -> Iterator[None]:
    """Add the hooks of one pass (`_PassHooks`); every hook added is removed on exit."""
    hooks = _PassHooks(model, buffers, engine, record)
    handles = []

    def add(module, hook, pre=False):
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        handles.append(register(hook))

    try:
        add(model.hook_embed, hooks.on_embed)
        for layer, block in enumerate(model.blocks):
            add(block.ln1, lambda m, a, layer=layer: hooks.on_ln1(layer, m, a), pre=True)
            add(block.attn.hook_z, lambda m, a, o, layer=layer: hooks.on_z(layer, m, a, o))
            for qkv, letter in enumerate(QKV):
                add(
                    getattr(block.attn, f"hook_{letter}"),
                    lambda m, a, o, layer=layer, qkv=qkv: hooks.on_qkv(layer, qkv, m, a, o),
                )
            add(block.ln2, lambda m, a, layer=layer: hooks.on_ln2(layer, m, a), pre=True)
            add(block.hook_mlp_out, lambda m, a, o, layer=layer: hooks.on_mlp(layer, m, a, o))
            add(
                block.hook_attn_out,
                lambda m, a, o, layer=layer: hooks.on_attn_out(layer, m, a, o),
            )
        add(model.blocks[-1].hook_resid_post, hooks.on_post)
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- exact: one forward per edge, for validation --------------------------------------------


def exact_scores(
    model: HookedTransformer,
    tokens: Int[torch.Tensor, "batch pos"],
    loss_mask: Bool[torch.Tensor, "batch pos"],
    graph: Graph,
    metric: Callable,
    cf: counterfactual.Counterfactual,
) -> tuple[Float[torch.Tensor, "batch n_upstream n_downstream"], Float[torch.Tensor, " batch"]]:
    """loss(O_u replaced by O'_u in the input of node d) - clean loss, for every edge."""
    buffers = _prepare(model, tokens)
    batch, acc = tokens.shape[0], buffers.dtype
    with torch.no_grad():
        fill(model, buffers, cf)
        with _gradient_hooks(model, buffers, _NoEngine(), record=True):
            clean = metric(model(tokens), tokens, loss_mask)
        outputs = _Outputs(model, buffers, graph)
        scores = torch.zeros(batch, len(graph.upstream), len(graph.downstream), dtype=acc)
        for d, site in enumerate(graph.sites):
            for u in range(graph.n_before[d]):
                with _ablated(model, site, outputs(u)):
                    loss = metric(model(tokens), tokens, loss_mask)
                scores[:, u, d] = (loss - clean).to("cpu", acc)
    return scores, clean


class _NoEngine:
    """Gradient callbacks for a pass without gradients (never called)."""

    def on_qkv(self, layer, qkv, grad):  # pragma: no cover - no backward pass
        raise AssertionError

    on_full = on_qkv


class _Outputs:
    """Upstream node u's O_u - O'_u [batch, pos, d_model] (zero ablation: O_u), from the buffers."""

    def __init__(self, model: HookedTransformer, buffers: HeadBuffers, graph: Graph):
        self.model, self.buffers, self.graph = model, buffers, graph

    def __call__(self, u: int) -> Float[torch.Tensor, "batch pos d_model"]:
        key = self.graph.forward_key(u)
        if key.component == "embed":
            return self.buffers.full[:, 0]
        if key.component == "mlp":
            return self.buffers.full[:, key.layer + 1]
        d_head, head = self.model.cfg.d_head, key.head
        out = None
        for z, w_o in self.buffers.writers(self.model, key.layer):
            z = z[:, head * d_head : (head + 1) * d_head]  # [batch, d_head, pos]
            term = torch.einsum("bjp,jm->bpm", z, w_o[head])
            out = term if out is None else out - term
        return out


@contextmanager
def _ablated(
    model: HookedTransformer, site: Site, removed: Float[torch.Tensor, "batch pos d_model"]
) -> Iterator[None]:
    """Run with `removed` subtracted from the input of one downstream node."""
    handles = []
    seen: set[str] = set()
    try:
        if site.kind == "head":
            prefix, letter = site.module.rsplit(".attn.hook_", 1)
            block = model.get_submodule(prefix)
            attn, head = block.attn, site.head
            inputs = {}

            def keep(mod, args):
                if "x" not in inputs:
                    inputs["x"] = args[0]

            def replace(mod, args, out):
                if "done" in seen:
                    return None
                seen.add("done")
                x = inputs["x"]
                y = block.ln1(x - removed.to(x.device, x.dtype))
                w = getattr(attn, f"W_{letter.upper()}")[head]  # ungrouped: one per query head
                b = getattr(attn, f"b_{letter.upper()}")[head]
                out = out.clone()
                out[:, :, head] = torch.einsum("bpm,mj->bpj", y.to(w.dtype), w) + b
                return out

            handles.append(block.ln1.register_forward_pre_hook(keep))
            handles.append(getattr(attn, f"hook_{letter}").register_forward_hook(replace))
        elif site.kind == "input":

            def sub_input(mod, args):
                if "done" in seen:
                    return None
                seen.add("done")
                x = args[0]
                return (x - removed.to(x.device, x.dtype), *args[1:])

            handles.append(model.get_submodule(site.module).register_forward_pre_hook(sub_input))
        else:

            def sub_output(mod, args, out):
                return out - removed.to(out.device, out.dtype)

            handles.append(model.get_submodule(site.module).register_forward_hook(sub_output))
        yield
    finally:
        for handle in handles:
            handle.remove()
