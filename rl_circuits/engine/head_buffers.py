"""The heads engine's buffers (`rl_circuits.engine.heads`): what one attribution call keeps of
the clean pass (embedding and MLP outputs, each layer's z) and of the current pass (norm inputs,
rank-1 coefficients, full gradients), how the counterfactual is written into them, and their
sizes for memory estimates at scales not run here.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer, HookedTransformerConfig

from rl_circuits.engine import counterfactual, tl_compat
from rl_circuits.engine.graph import build_graph

CHUNK = 4  # heads per transient [batch, CHUNK, pos, d_model] tensor


def w_out(
    model: HookedTransformer, layer: int, device: torch.device | str, dtype: torch.dtype
) -> Float[torch.Tensor, "n_heads d_head d_model"]:
    """W_O of a layer."""
    return model.blocks[layer].attn.W_O.detach().to(device, dtype)


class HeadBuffers:
    """Buffers of one attribution call (clean outputs) and of the current pass (norm inputs,
    rank-1 coefficients, full gradients)."""

    def __init__(
        self,
        model: HookedTransformer,
        batch: int,
        pos: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
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
            # the rank-1 coefficients t_h[p] of each head's q, k and v input gradient
            self.coef = torch.zeros(batch, n_layers, 3, n_heads, pos, **zeros)
        self.grads = torch.zeros(batch, n_layers + 1, pos, d_model, **zeros)  # mlp_in, logits
        self.seen: set[tuple] = set()
        self.embed_scale = 1.0
        self.add = False  # record adds O to the buffers' -O' (`fill`) instead of copying
        # Patching from another model: its z' [b, L, H d_head, pos] and W_O' per layer, since
        # z W_O - z' W_O' is no product of one W_O (the buffer z then holds the clean z alone).
        self.z_cf: torch.Tensor | None = None
        self.w_o_cf: list[torch.Tensor] | None = None
        self.interpolate: tuple[str, float] | None = None  # (output, t): see `methods.Pass`
        # RelP's norm-scale rule: ln1's scale a constant, its Jacobian the diagonal part alone.
        self.constant_scale = False

    def writers(
        self, model: HookedTransformer, layer: int
    ) -> list[
        tuple[Float[torch.Tensor, "batch width pos"], Float[torch.Tensor, "n_heads d_head d_model"]]
    ]:
        """(z, W_O) pairs whose products give a layer's head outputs O - O': one pair, or the
        clean and the other model's (subtract the second)."""
        pairs = [(self.z[:, layer], w_out(model, layer, self.device, self.dtype))]
        if self.z_cf is not None:
            pairs.append((self.z_cf[:, layer], self.w_o_cf[layer]))
        return pairs

    def once(self, *key: object) -> bool:
        """True the first time `key` is seen in this pass (checkpointed blocks run twice)."""
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def fill(model: HookedTransformer, buffers: HeadBuffers, cf: counterfactual.Counterfactual) -> None:
    """Write -O' into the output buffers (z of each head, the embedding and MLP outputs), so that
    the clean pass's record leaves O - O' there; zero ablation leaves them empty."""
    if cf.ablation == "zero":
        return
    buffers.add = True
    n_layers = model.cfg.n_layers
    names = ["hook_embed"] + [f"blocks.{i}.hook_mlp_out" for i in range(n_layers)]
    names += [f"blocks.{i}.attn.hook_z" for i in range(n_layers)]

    if cf.cross_model:
        buffers.z_cf = torch.zeros_like(buffers.z)
        buffers.w_o_cf = [
            w_out(cf.model, i, buffers.device, buffers.dtype) for i in range(n_layers)
        ]

    def slot(i: int) -> torch.Tensor:
        if i <= n_layers:
            return buffers.full[:, i]
        # -z' into z_cf, kept apart from z (subtracted there by `writers`)
        return (buffers.z if buffers.z_cf is None else buffers.z_cf)[:, i - n_layers - 1]

    def as_slot(i: int, act: torch.Tensor) -> torch.Tensor:
        """An output in its buffer's layout: z [.., pos, head, d_head] -> [.., width, pos]."""
        return act if i <= n_layers else act.flatten(-2).transpose(-1, -2)

    if cf.ablation == "patch":

        def on_output(i: int, act: torch.Tensor) -> None:
            value = as_slot(i, act).to(buffers.device, buffers.dtype)
            if buffers.z_cf is not None and i > n_layers:
                slot(i).copy_(value)
            else:
                slot(i).sub_(value)

        counterfactual.run_outputs(cf, names, on_output)
        return
    pos = buffers.full.shape[2]
    for i, mean in enumerate(counterfactual.means(cf, names, buffers.dtype)):
        if cf.ablation == "mean-positional":
            mean = mean[:pos]
        elif i > n_layers:
            mean = mean.unsqueeze(0)  # one z for every position: [1, head, d_head]
        slot(i).copy_(-as_slot(i, mean).to(buffers.device))


def buffer_bytes(
    cfg: HookedTransformerConfig, batch: int, pos: int, dtype: torch.dtype = torch.float32
) -> dict[str, dict[str, int]]:
    """Bytes of the heads engine's buffers for one call (`dtype`: float32 unless the model is
    float64), and of its largest transients: for memory estimates at scales not run here."""
    item = torch.empty((), dtype=dtype).element_size()
    n_layers, n_heads, d_model = cfg.n_layers, cfg.n_heads, cfg.d_model
    width = n_heads * cfg.d_head
    graph = build_graph("heads", n_layers, n_heads)
    n_up, n_down = len(graph.upstream), len(graph.downstream)
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
