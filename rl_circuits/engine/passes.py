"""One forward pass over a graph's nodes on the layer graphs (`paper`, `block`, `residual`):
per-device buffers of the upstream outputs, the hooks that record those outputs and change the
downstream inputs, and the model's parameters frozen meanwhile. `attribution` and `circuits`
both run their passes through these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer

from rl_circuits.engine.graph import Graph


def output_buffers(
    model: HookedTransformer, batch: int, pos: int, dtype: torch.dtype
) -> list[tuple[int, Float[torch.Tensor, "batch nodes pos d_model"]]]:
    """One buffer [batch, nodes, pos, d_model] per device, for its run of upstream nodes."""
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


class PassState:
    """State shared by the hooks of one pass: call counts per module, the input scale."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.embed_scale = 1.0
        # The embedding's counterfactual offset O_0 - O'_0: the input is then E - (1 - t) that
        # (E' + t (E - E')); None: zero ablation, the input is t E.
        self.counterfactual: torch.Tensor | None = None
        # (u, t, slots): upstream output u replaced by O_u - (1 - t) slots[u], a constant.
        self.interpolate: tuple[int, float, list[torch.Tensor]] | None = None
        self.recorded: set[int] = set()  # upstream outputs already copied in this pass


@contextmanager
def node_hooks(
    model: HookedTransformer,
    graph: Graph,
    *,
    transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    record: list[Float[torch.Tensor, "batch pos d_model"]] | None = None,
    nodes: Sequence[int] | None = None,
    add: bool = False,
) -> Iterator[PassState]:
    """Add the hooks for one forward pass; every hook added is removed on exit, even on error.

    `transform(d, x)` replaces the input of downstream node d (all nodes, or `nodes`);
    `record[u]` receives a copy of upstream output u (`add`: the output is added to it). The
    embedding output is made the leaf that gradients flow back to.
    """
    state = PassState()
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
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients during attribution; the user's flags are restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
