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
from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer

from rl_circuits.engine import counterfactual, methods, relp, tl_compat
from rl_circuits.engine.graph import Graph

CHUNK = 4  # heads per transient [batch, CHUNK, pos, d_model] tensor
_PARTS = "qkv"


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


@dataclass(frozen=True)
class _Layout:
    """Indices of the heads graph's nodes (see `rl_circuits.engine.graph._heads_graph`)."""

    n_layers: int
    n_heads: int

    def up_head(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1)

    def up_mlp(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def down_head(self, layer: int, part: int = 0) -> int:
        return layer * (3 * self.n_heads + 1) + part * self.n_heads

    def down_full(self, index: int) -> int:
        """`hook_mlp_in` of layer `index`, or the logits node for index n_layers."""
        return index * (3 * self.n_heads + 1) + (3 * self.n_heads if index < self.n_layers else 0)


def _qkv_weight(attn, part: str, device, dtype) -> tuple[torch.Tensor, int]:
    """The projection weight [n_weight_heads, d_model, d_head] and query heads per weight head."""
    weight, group = tl_compat.qkv_weight(attn, part)
    return weight.detach().to(device, dtype), group


def _w_out(model: HookedTransformer, layer: int, device, dtype) -> torch.Tensor:
    """W_O of a layer, [n_heads, d_head, d_model]."""
    return model.blocks[layer].attn.W_O.detach().to(device, dtype)


class _State:
    """Buffers of one attribution call (clean outputs) and of the current pass (norm inputs,
    rank-1 coefficients, full gradients)."""

    def __init__(self, model: HookedTransformer, batch: int, pos: int, device, dtype):
        cfg = model.cfg
        n_layers, n_heads, d_model = cfg.n_layers, cfg.n_heads, cfg.d_model
        width = n_heads * cfg.d_head
        self.device, self.dtype = device, dtype
        zeros = dict(device=device, dtype=dtype)
        self.full = torch.zeros(batch, n_layers + 1, pos, d_model, **zeros)  # embed, MLP outs
        self.z = torch.zeros(batch, n_layers, width, pos, **zeros)  # z^T per layer
        self.norms = [tl_compat.norm_kind(block.ln1) for block in model.blocks]
        self.has_norm = any(kind != "none" for kind in self.norms)
        if self.has_norm:
            self.xhat = torch.zeros(batch, n_layers, pos, d_model, **zeros)  # x / r
            self.rinv = torch.ones(batch, n_layers, pos, **zeros)  # 1 / r
            self.t = torch.zeros(batch, n_layers, 3, n_heads, pos, **zeros)
        self.grads = torch.zeros(batch, n_layers + 1, pos, d_model, **zeros)  # mlp_in, logits
        self.seen: set[tuple] = set()
        self.embed_scale = 1.0
        self.add = False  # record adds O to the buffers' -O' (`_fill`) instead of copying
        # Patching from another model: its z' [b, L, H d_head, pos] and W_O' per layer, since
        # z W_O - z' W_O' is no product of one W_O (the buffer z then holds the clean z alone).
        self.z_cf: torch.Tensor | None = None
        self.w_o_cf: list[torch.Tensor] | None = None
        self.interpolate: tuple[str, float] | None = None  # (output, t): see `methods.Pass`
        # RelP's norm-scale rule: ln1's scale a constant, its Jacobian the diagonal part alone.
        self.constant_scale = False

    def writers(self, model, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(z [b, H d_head, pos], W_O [H, d_head, d_model]) whose products give a layer's head
        outputs O - O': one pair, or the clean and the other model's (subtract the second)."""
        pairs = [(self.z[:, layer], _w_out(model, layer, self.device, self.dtype))]
        if self.z_cf is not None:
            pairs.append((self.z_cf[:, layer], self.w_o_cf[layer]))
        return pairs

    def once(self, *key) -> bool:
        """True the first time `key` is seen in this pass (checkpointed blocks run twice)."""
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _prepare(model: HookedTransformer, tokens: torch.Tensor) -> tuple[_Layout, _State]:
    """The node layout and empty buffers for one pass over `tokens`, accumulating in float64
    for float64 models and float32 otherwise (after refusing unsupported models)."""
    check_supported(model)
    cfg = model.cfg
    acc = torch.float64 if cfg.dtype == torch.float64 else torch.float32
    batch, pos = tokens.shape
    return _Layout(cfg.n_layers, cfg.n_heads), _State(model, batch, pos, tokens.device, acc)


def gradient_scores(
    model: HookedTransformer,
    tokens: torch.Tensor,
    loss_mask: torch.Tensor,
    graph: Graph,
    metric: Callable,
    passes: list[methods.Pass],
    cf: counterfactual.Counterfactual,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [batch, n_upstream, n_downstream] from the gradients averaged over `passes`
    (`rl_circuits.engine.methods`), and the clean loss."""
    cfg = model.cfg
    layout, state = _prepare(model, tokens)
    batch, device, acc = tokens.shape[0], state.device, state.dtype
    scores = torch.zeros(batch, len(graph.upstream), len(graph.downstream), dtype=acc)
    scores = scores.to(device)
    weight = 1.0 / len(passes)
    full_rows = torch.tensor(
        [0] + [layout.up_mlp(layer) for layer in range(cfg.n_layers)], device=device
    )
    engine = _Engine(model, state, scores, layout, full_rows, weight)
    _fill(model, state, cf)
    clean_loss = None
    if not methods.runs_clean(passes[0]):
        with torch.no_grad(), _gradient_hooks(model, state, _NoEngine(), record=True):
            clean_loss = metric(model(tokens), tokens, loss_mask)
    for step in passes:
        record = clean_loss is None
        state.seen = set()
        state.embed_scale = step.t if step.node is None else 1.0
        state.interpolate = None if step.node is None else (step.node, step.t)
        state.constant_scale = "norm-scale" in step.rules
        if step.node is not None:  # a constant output: sites before it may get no gradient
            state.grads.zero_()
            if state.has_norm:
                state.t.zero_()
        rules = relp.relp_rules(model, step.rules) if step.rules else nullcontext()
        with rules, _gradient_hooks(model, state, engine, record):
            loss = metric(model(cf.tokens if step.corrupted else tokens), tokens, loss_mask)
            loss.sum().backward()
        engine.finish()
        if record:
            clean_loss = loss.detach()
    return scores, clean_loss


def _fill(model: HookedTransformer, state: _State, cf: counterfactual.Counterfactual) -> None:
    """Write -O' into the output buffers (z of each head, the embedding and MLP outputs), so that
    the clean pass's record leaves O - O' there; zero ablation leaves them empty."""
    if cf.ablation == "zero":
        return
    state.add = True
    n_layers = model.cfg.n_layers
    names = ["hook_embed"] + [f"blocks.{i}.hook_mlp_out" for i in range(n_layers)]
    names += [f"blocks.{i}.attn.hook_z" for i in range(n_layers)]

    if cf.cross_model:
        state.z_cf = torch.zeros_like(state.z)
        state.w_o_cf = [_w_out(cf.model, i, state.device, state.dtype) for i in range(n_layers)]

    def slot(i: int) -> torch.Tensor:
        if i <= n_layers:
            return state.full[:, i]
        # -z' into z_cf, kept apart from z (subtracted there by `writers`)
        return (state.z if state.z_cf is None else state.z_cf)[:, i - n_layers - 1]

    def as_slot(i: int, act: torch.Tensor) -> torch.Tensor:
        """An output in its buffer's layout: z [.., pos, head, d_head] -> [.., width, pos]."""
        return act if i <= n_layers else act.flatten(-2).transpose(-1, -2)

    if cf.ablation == "patch":

        def on_output(i: int, act: torch.Tensor) -> None:
            value = as_slot(i, act).to(state.device, state.dtype)
            if state.z_cf is not None and i > n_layers:
                slot(i).copy_(value)
            else:
                slot(i).sub_(value)

        counterfactual.run_outputs(cf, names, on_output)
        return
    pos = state.full.shape[2]
    for i, mean in enumerate(counterfactual.means(cf, names, state.dtype)):
        if cf.ablation == "mean-positional":
            mean = mean[:pos]
        elif i > n_layers:
            mean = mean.unsqueeze(0)  # one z for every position: [1, head, d_head]
        slot(i).copy_(-as_slot(i, mean).to(state.device))


class _Engine:
    """The contractions, called from gradient hooks and after each backward pass."""

    def __init__(self, model, state: _State, scores, layout: _Layout, full_rows, weight):
        self.model, self.state, self.scores, self.layout = model, state, scores, layout
        self.full_rows, self.weight = full_rows, weight
        cfg = model.cfg
        self.n_heads, self.d_head, self.d_model = cfg.n_heads, cfg.d_head, cfg.d_model

    def on_qkv(self, layer: int, part: int, grad: torch.Tensor) -> None:
        """Scores into head `part` inputs of `layer`: from embedding/MLPs now, the diagonal
        part from earlier heads now, the rank-1 coefficients t kept for `finish`."""
        st, lay, n_heads, d_head = self.state, self.layout, self.n_heads, self.d_head
        batch, pos = grad.shape[:2]
        dx = grad.detach().to(st.device, st.dtype)  # [batch, pos, n_heads, d_head]
        attn = self.model.blocks[layer].attn
        w_x, group = _qkv_weight(attn, "QKV"[part], st.device, st.dtype)
        kind = st.norms[layer]
        ln1 = self.model.blocks[layer].ln1
        w_norm = ln1.w.detach().to(st.device, st.dtype) if kind == "rms" else None
        first = lay.down_head(layer, part)
        n_full = layer + 1
        outputs = st.full[:, :n_full].flatten(2)  # [batch, n_full, pos * d_model]
        rows = self.full_rows[:n_full, None]
        for start in range(0, n_heads, CHUNK):
            stop = min(start + CHUNK, n_heads)
            heads = torch.arange(start, stop, device=st.device)
            a = torch.einsum("bpcj,cmj->bcpm", dx[:, :, start:stop], w_x[heads // group])
            if kind != "none":
                a = a * st.rinv[:, layer, None, :, None]
                if w_norm is not None:
                    a = a * w_norm
            if kind != "none" and not st.constant_scale:  # the rank-1 part (else t stays 0)
                xhat = st.xhat[:, layer, None]  # [batch, 1, pos, d_model]
                t = (a * xhat).sum(-1) / self.d_model  # [batch, chunk, pos]
                st.t[:, layer, part, start:stop] = t
                a = a - xhat * t.unsqueeze(-1)  # each head's input gradient
            part_scores = torch.bmm(outputs, a.flatten(2).transpose(1, 2))  # [b, n_full, c]
            self.scores[:, rows, (first + heads)[None, :]] -= self.weight * part_scores
        if layer == 0:
            return
        dxn = dx * st.rinv[:, layer, :, None, None] if kind != "none" else dx
        dxn = dxn.reshape(batch, pos, n_heads * d_head)
        n_w = w_x.shape[0]
        w_in = w_x if w_norm is None else w_x * w_norm[None, :, None]
        w_in = w_in.permute(1, 0, 2).reshape(self.d_model, n_w * d_head)
        for source in range(layer):
            diag = None
            for z, w_o in st.writers(self.model, source):  # O = z W_O (minus z' W_O')
                c = torch.bmm(z, dxn)  # [batch, (h' i), (h j)]
                k = w_o.reshape(n_heads * d_head, self.d_model) @ w_in  # [(h' i), (g j)]
                term = torch.einsum(
                    "bhixgj,hixj->bhxg",
                    c.view(batch, n_heads, d_head, n_w, group, d_head),
                    k.view(n_heads, d_head, n_w, d_head),
                ).reshape(batch, n_heads, n_heads)
                diag = term if diag is None else diag - term
            up = lay.up_head(source)
            self.scores[:, up : up + n_heads, first : first + n_heads] -= self.weight * diag

    def on_full(self, index: int, grad: torch.Tensor) -> None:
        """Scores into `hook_mlp_in` of layer `index` (or the logits) from embedding/MLPs now;
        the gradient is kept for the heads, in `finish`."""
        st = self.state
        g = grad.detach().to(st.device, st.dtype)
        n_full = min(index + 1, len(self.full_rows))
        part = torch.bmm(st.full[:, :n_full].flatten(2), g.flatten(1).unsqueeze(2)).squeeze(2)
        self.scores[:, self.full_rows[:n_full], self.layout.down_full(index)] -= self.weight * part
        st.grads[:, index].copy_(g)

    def finish(self) -> None:
        """Head -> MLP input / logits, and the rank-1 part of head -> head, one head chunk of
        outputs O = z W_O at a time."""
        st, lay, n_heads, d_head = self.state, self.layout, self.n_heads, self.d_head
        n_layers = lay.n_layers
        batch, pos = st.full.shape[0], st.full.shape[2]
        for source in range(n_layers):
            writers = [
                (z.view(batch, n_heads, d_head, pos), w_o)
                for z, w_o in st.writers(self.model, source)
            ]
            grads = st.grads[:, source:].flatten(2)  # [batch, n_g, pos * d_model]
            cols = torch.tensor(
                [lay.down_full(i) for i in range(source, n_layers + 1)], device=st.device
            )
            later = n_layers - 1 - source
            for start in range(0, n_heads, CHUNK):
                stop = min(start + CHUNK, n_heads)
                low, high = lay.up_head(source) + start, lay.up_head(source) + stop
                rows = torch.arange(low, high, device=st.device)
                out = None
                for z, w_o in writers:  # O = z W_O (minus z' W_O')
                    term = torch.einsum("bcjp,cjm->bcpm", z[:, start:stop], w_o[start:stop])
                    out = term if out is None else out - term
                part = torch.bmm(out.flatten(2), grads.transpose(1, 2))  # [batch, c, n_g]
                self.scores[:, rows[:, None], cols[None, :]] -= self.weight * part
                if not st.has_norm or later == 0 or st.constant_scale:
                    continue
                alpha = torch.einsum("bcpm,bapm->bcap", out, st.xhat[:, source + 1 :])
                rank1 = torch.einsum("bcap,baxhp->bcaxh", alpha, st.t[:, source + 1 :])
                rank1 = rank1.reshape(batch, stop - start, later, 3 * n_heads)
                for i, layer in enumerate(range(source + 1, n_layers)):
                    first = lay.down_head(layer)
                    block = self.scores[:, low:high, first : first + 3 * n_heads]
                    block += self.weight * rank1[:, :, i]


@contextmanager
def _gradient_hooks(
    model: HookedTransformer, state: _State, engine: _Engine, record: bool
) -> Iterator[None]:
    """Hooks of one pass: record clean outputs (first pass), norm inputs, and register the
    gradient hooks at each head's q/k/v, each MLP input and the final residual state."""
    handles = []
    n_layers = model.cfg.n_layers

    def store(into: torch.Tensor, value: torch.Tensor) -> None:
        if state.add:
            into.add_(value.to(into.device, into.dtype))
        else:
            into.copy_(value)

    def interpolated(name: str, out: torch.Tensor, delta) -> torch.Tensor | None:
        """O' + t (O - O') = O - (1 - t) (O - O') where `name` is the interpolated output."""
        if state.interpolate is None or state.interpolate[0] != name:
            return None
        t = state.interpolate[1]
        return out.detach() - (1 - t) * delta().to(out.device, out.dtype)

    def on_embed(mod, args, out):
        if record and state.once("embed"):
            store(state.full[:, 0], out.detach())
        value = interpolated("hook_embed", out, lambda: state.full[:, 0])
        if value is not None:
            return value.requires_grad_(torch.is_grad_enabled())
        out = out.detach().requires_grad_(torch.is_grad_enabled())
        if state.embed_scale == 1.0:
            return out
        if not state.add:
            return out * state.embed_scale
        return out - (1 - state.embed_scale) * state.full[:, 0].to(out.device, out.dtype)

    def on_attn_out(layer, mod, args, out):
        def delta():
            out = None
            for z, w_o in state.writers(model, layer):  # z [batch, width, pos]
                term = torch.einsum("bwp,wm->bpm", z, w_o.flatten(0, 1))
                out = term if out is None else out - term
            return out

        return interpolated(f"blocks.{layer}.hook_attn_out", out, delta)

    def on_ln1(layer, mod, args):
        if state.norms[layer] != "none" and state.once("ln1", layer):
            x = args[0].detach().to(state.device, state.dtype)
            r = (x.pow(2).mean(-1) + mod.eps).sqrt()
            state.rinv[:, layer].copy_(1.0 / r)
            state.xhat[:, layer].copy_(x / r.unsqueeze(-1))

    def on_z(layer, mod, args, out):
        if record and state.once("z", layer):
            z = out.detach().flatten(2).transpose(1, 2)  # [batch, n_heads * d_head, pos]
            store(state.z[:, layer], z)

    def on_part(layer, part, mod, args, out):
        if not out.requires_grad or not state.once("qkv", layer, part):
            return None
        out = out.view_as(out)
        out.register_hook(lambda grad: engine.on_qkv(layer, part, grad))
        return out

    def on_ln2(layer, mod, args):
        if not args[0].requires_grad or not state.once("ln2", layer):
            return None
        x = args[0].view_as(args[0])
        x.register_hook(lambda grad: engine.on_full(layer, grad))
        return (x, *args[1:])

    def on_mlp(layer, mod, args, out):
        if record and state.once("mlp", layer):
            store(state.full[:, layer + 1], out.detach())
        return interpolated(f"blocks.{layer}.hook_mlp_out", out, lambda: state.full[:, layer + 1])

    def on_post(mod, args, out):
        if not out.requires_grad or not state.once("post"):
            return None
        out = out.view_as(out)
        out.register_hook(lambda grad: engine.on_full(n_layers, grad))
        return out

    def add(module, hook, pre=False):
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        handles.append(register(hook))

    try:
        add(model.hook_embed, on_embed)
        for layer, block in enumerate(model.blocks):
            add(block.ln1, lambda m, a, layer=layer: on_ln1(layer, m, a), pre=True)
            add(block.attn.hook_z, lambda m, a, o, layer=layer: on_z(layer, m, a, o))
            for part, name in enumerate(_PARTS):
                add(
                    getattr(block.attn, f"hook_{name}"),
                    lambda m, a, o, layer=layer, part=part: on_part(layer, part, m, a, o),
                )
            add(block.ln2, lambda m, a, layer=layer: on_ln2(layer, m, a), pre=True)
            add(block.hook_mlp_out, lambda m, a, o, layer=layer: on_mlp(layer, m, a, o))
            add(block.hook_attn_out, lambda m, a, o, layer=layer: on_attn_out(layer, m, a, o))
        add(model.blocks[n_layers - 1].hook_resid_post, on_post)
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- exact: one forward per edge, for validation --------------------------------------------


def exact_scores(
    model: HookedTransformer,
    tokens: torch.Tensor,
    loss_mask: torch.Tensor,
    graph: Graph,
    metric: Callable,
    cf: counterfactual.Counterfactual,
) -> tuple[torch.Tensor, torch.Tensor]:
    """loss(O_u replaced by O'_u in the input of node d) - clean loss, for every edge."""
    layout, state = _prepare(model, tokens)
    batch, acc = tokens.shape[0], state.dtype
    with torch.no_grad():
        _fill(model, state, cf)
        with _gradient_hooks(model, state, _NoEngine(), record=True):
            clean = metric(model(tokens), tokens, loss_mask)
        outputs = _Outputs(model, state, layout)
        scores = torch.zeros(batch, len(graph.upstream), len(graph.downstream), dtype=acc)
        for d, site in enumerate(graph.sites):
            for u in range(graph.n_before[d]):
                with _ablated(model, site, outputs(u)):
                    loss = metric(model(tokens), tokens, loss_mask)
                scores[:, u, d] = (loss - clean).to("cpu", acc)
    return scores, clean


class _NoEngine:
    """Gradient callbacks for a pass without gradients (never called)."""

    def on_qkv(self, layer, part, grad):  # pragma: no cover - no backward pass
        raise AssertionError

    on_full = on_qkv


class _Outputs:
    """Upstream node u's O_u - O'_u [batch, pos, d_model] (zero ablation: O_u), from the buffers."""

    def __init__(self, model, state: _State, layout: _Layout):
        self.model, self.state, self.layout = model, state, layout

    def __call__(self, u: int) -> torch.Tensor:
        st, n_heads = self.state, self.layout.n_heads
        if u == 0:
            return st.full[:, 0]
        layer, offset = divmod(u - 1, n_heads + 1)
        if offset == n_heads:
            return st.full[:, layer + 1]
        d_head = self.model.cfg.d_head
        out = None
        for z, w_o in st.writers(self.model, layer):
            z = z[:, offset * d_head : (offset + 1) * d_head]  # [batch, d_head, pos]
            term = torch.einsum("bjp,jm->bpm", z, w_o[offset])
            out = term if out is None else out - term
        return out


@contextmanager
def _ablated(model: HookedTransformer, site, removed: torch.Tensor) -> Iterator[None]:
    """Run with `removed` subtracted from the input of one downstream node."""
    handles = []
    seen: set[str] = set()
    try:
        if site.kind == "head":
            prefix, part = site.module.rsplit(".attn.hook_", 1)
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
                w = getattr(attn, f"W_{part.upper()}")[head]  # ungrouped: one per query head
                b = getattr(attn, f"b_{part.upper()}")[head]
                out = out.clone()
                out[:, :, head] = torch.einsum("bpm,mj->bpj", y.to(w.dtype), w) + b
                return out

            handles.append(block.ln1.register_forward_pre_hook(keep))
            handles.append(getattr(attn, f"hook_{part}").register_forward_hook(replace))
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


def buffer_bytes(cfg, batch: int, pos: int, dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Bytes of the heads engine's buffers for one call (`dtype`: float32 unless the model is
    float64), and of its largest transients: for memory estimates at scales not run here."""
    item = torch.empty((), dtype=dtype).element_size()
    n_layers, n_heads, d_model = cfg.n_layers, cfg.n_heads, cfg.d_model
    width = n_heads * cfg.d_head
    n_up = 1 + n_layers * (n_heads + 1)
    n_down = n_layers * (3 * n_heads + 1) + 1
    residual = batch * pos * d_model * item
    sizes = {
        "outputs: embedding and MLP outputs [b, L+1, pos, d_model]": (n_layers + 1) * residual,
        "z of every layer [b, L, H d_head, pos]": n_layers * batch * pos * width * item,
        "ln1 inputs / r [b, L, pos, d_model]": n_layers * residual + n_layers * batch * pos * item,
        "rank-1 coefficients t [b, L, 3, H, pos]": n_layers * 3 * n_heads * batch * pos * item,
        "MLP-input and logits gradients [b, L+1, pos, d_model]": (n_layers + 1) * residual,
        "scores [b, n_up, n_down]": batch * n_up * n_down * item,
    }
    transient = {
        # a few heads' input gradients, their product with xhat, and the result of the bmm
        "head chunk (a, a * xhat, g) 3 x [b, CHUNK, pos, d_model]": 3 * CHUNK * residual,
        "C and K [H d_head, H d_head] per layer pair": 2 * batch * width * width * item,
        "gradient at q/k/v [b, pos, H, d_head] as float32": batch * pos * width * item,
    }
    return {"buffers": sizes, "transients": transient}
