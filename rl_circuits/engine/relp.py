"""RelP's propagation rules as backward-pass changes of a HookedTransformer (Jafari et al. 2025).

Relevance patching (RelP, arXiv:2508.21258) is attribution patching with the local gradients
replaced by LRP's propagation coefficients; the rule per layer is the table "Propagation Rules
for Transformers" of the authors' README (FarnoushRJ/RelP). Their TransformerLens fork
(`cfg.use_lrp` with `cfg.LRP_rules`) applies them in the forward pass, as values that are
unchanged but whose gradients follow the rule; these hooks do the same:

* `norm-scale` (LN-rule, Ali et al. 2022; the fork's `rms_norm.py`, `layer_norm.py`: `x /
  scale.detach()`): every normalisation's scale is a constant, so the norm is the linear map
  x -> w x / r at this input. Hook: `hook_scale` returns its value detached.
* `attention-pattern` (AH-rule, Ali et al. 2022; the fork's `abstract_attention.py`:
  `pattern.detach()`): the attention pattern is a constant, so a head is the linear map
  v -> P v. The pattern depends on the inputs only through the queries and keys, so the hooks
  detach `hook_q` and `hook_k` (the same backward pass, and it works with fused attention):
  **no relevance reaches a query or key input** (`unscored`).
* `half` (Half-rule, Jafari et al. 2024, Arras et al. 2019; the fork's `gated_mlp.py`:
  `g / 2 + (g / 2).detach()`): the gated MLP's product a * b passes half of the gradient to
  each factor, i.e. the linear map (a b0 + a0 b) / 2 at (a0, b0).
* `identity` (Identity-rule, Jafari et al. 2024; the fork's `ModifiedAct`: `x * (act(x) /
  x).detach()`): the activation is the linear map x -> x act(x0) / x0, so it passes relevance
  unchanged (x * gradient is the same on both sides). Where x0 = 0 the slope is 0 (the fork
  adds 1e-6 to x0 and gets 0 there too; elsewhere it divides exactly here).

With every rule the network is, for its backward pass, the linear map it is at this input:
relevance x * gradient is conserved through each layer (no biases) - the identity the tests
check.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformer_lens import HookedTransformer

from rl_circuits.engine.graph import Graph
from rl_circuits.engine.methods import RELP_RULES

# Downstream node kinds that get no relevance under the attention-pattern rule.
NO_RELEVANCE_SITES: tuple[str, ...] = ("hook_q_input", "hook_k_input")


def check_rules(rules: Sequence[str]) -> tuple[str, ...]:
    """The rules as a tuple, or a ValueError naming the known ones."""
    if isinstance(rules, str):
        raise ValueError(f"rules must be a sequence of rule names, got the string {rules!r}")
    unknown = [r for r in rules if r not in RELP_RULES]
    if unknown:
        raise ValueError(f"unknown RelP rule {unknown[0]!r}; choose among {', '.join(RELP_RULES)}")
    return tuple(r for r in RELP_RULES if r in rules)


def check_supported(model: HookedTransformer, rules: Sequence[str]) -> None:
    """Refuse MLPs the half and identity rules are not written for (gated MLPs are)."""
    cfg = model.cfg
    if not {"half", "identity"} & set(rules):
        return
    if not cfg.gated_mlp or cfg.is_layer_norm_activation() or cfg.num_experts:
        raise ValueError(
            "method='relp' with the half or identity rule needs gated MLPs without a norm inside "
            "(Llama, Mistral, Qwen2); this model's MLP differs: pass rules without 'half' and "
            "'identity', or use method='eap'"
        )


def unscored(graph: Graph, rules: Sequence[str]) -> list[str]:
    """The downstream nodes that `rules` give no relevance by construction (their scores are 0
    because nothing reaches them, not because they are unimportant)."""
    if "attention-pattern" not in rules:
        return []
    return [d for d in graph.downstream if any(s in d for s in NO_RELEVANCE_SITES)]


@contextmanager
def relp_rules(model: HookedTransformer, rules: Sequence[str]) -> Iterator[None]:
    """Hooks that give `model`'s backward pass the chosen rules (forward values unchanged);
    every hook added is removed on exit, even on error."""
    rules = check_rules(rules)
    check_supported(model, rules)
    handles = []

    def detach(mod, args, out):
        return out.detach()

    try:
        for name, module in model.named_modules():
            last = name.rsplit(".", 1)[-1]
            if "norm-scale" in rules and last == "hook_scale":
                handles.append(module.register_forward_hook(detach))
            if "attention-pattern" in rules and name.endswith(("attn.hook_q", "attn.hook_k")):
                handles.append(module.register_forward_hook(detach))
        if "half" in rules or "identity" in rules:
            for block in model.blocks:
                handles += _mlp_hooks(block.mlp, half="half" in rules, identity="identity" in rules)
        yield
    finally:
        for handle in handles:
            handle.remove()


def _mlp_hooks(mlp, half: bool, identity: bool) -> list:
    """hook_post of a gated MLP (act(pre) * lin + b_in) keeps its value and takes the rules'
    backward pass (`_RuledProduct`) from pre and lin."""
    seen: dict[str, torch.Tensor] = {}

    def keep(key):
        def hook(mod, args, out):
            seen[key] = out
            return None

        return hook

    def post(mod, args, out):
        pre, lin = seen.pop("pre"), seen.pop("lin")
        if not (pre.requires_grad or lin.requires_grad):
            return None
        return _RuledProduct.apply(out.detach(), pre, lin, mlp.act_fn, half, identity)

    return [
        mlp.hook_pre.register_forward_hook(keep("pre")),
        mlp.hook_pre_linear.register_forward_hook(keep("lin")),
        mlp.hook_post.register_forward_hook(post),
    ]


class _RuledProduct(torch.autograd.Function):
    """The value act(pre) * lin (+ b_in) as computed, with the gradient of h (A(pre) lin0 +
    a0 lin) at (pre0, lin0), a0 = act(pre0): A = act, or x -> x a0 / pre0 under the identity
    rule; h = 1/2 under the half rule, else 1 (then the product's own gradient). Keeps pre and
    lin alone for the backward pass (act is recomputed there): no more than autograd keeps."""

    @staticmethod
    def forward(ctx, value, pre, lin, act, half: bool, identity: bool):
        ctx.save_for_backward(pre, lin)
        ctx.act, ctx.scale, ctx.identity = act, 0.5 if half else 1.0, identity
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        pre, lin = ctx.saved_tensors
        if ctx.identity:
            a0 = ctx.act(pre)
            zero = pre == 0
            slope = torch.where(zero, 0.0, a0 / torch.where(zero, 1.0, pre))
        else:
            with torch.enable_grad():
                x = pre.detach().requires_grad_(True)
                a = ctx.act(x)
                (slope,) = torch.autograd.grad(a, x, torch.ones_like(a))
            a0 = a.detach()
        grad = ctx.scale * grad
        return None, grad * lin * slope, grad * a0, None, None, None
