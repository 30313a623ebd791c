"""RelP (method="relp"): its rules are the backward pass of the model linearised at its input.

On a model whose nonlinearities are replaced by the linear maps the rules assume (written here
with TransformerLens hooks: the recorded norm scales and attention patterns as constants, the
gated product and SiLU by their linearisations), plain EAP gives RelP's scores; every rule off
gives EAP; with all rules relevance is conserved across every cut of the residual stream
(float64, all three families).
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from rl_circuits.engine import (
    attribution,
    counterfactual,
    efficient,
    heads,
    methods,
    tl_compat,
)
from rl_circuits.engine.attribution import attribute, masked_nll
from rl_circuits.engine.graph import build_graph, parse_node
from rl_circuits.engine.methods import RELP_RULES
from rl_circuits.engine.passes import frozen
from rl_circuits.engine.relp import relp_rules, unscored
from rl_circuits.models.tiny import ARCHITECTURES

ALL = RELP_RULES
SUBSETS = [ALL, ("norm-scale",), ("attention-pattern",), ("half",), ("identity",)]


def _batch(seed=0, batch=2, pos=11, start=5):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 90, (batch, pos), generator=gen)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, start:] = True
    return tokens, mask


def _raw(model, tokens, mask, graph, rules=(), metric=masked_nll, fwd_hooks=(), fused=True):
    """The engines' own float64 scores and loss for one pass (attribute() hands out float32)."""
    g = build_graph(graph, model.cfg.n_layers, model.cfg.n_heads)
    passes, zero = [methods.Pass(rules=tuple(rules))], counterfactual.Counterfactual("zero")
    attention = efficient.efficient_attention(model) if fused else nullcontext()
    with frozen(model), torch.enable_grad(), attention:
        with model.hooks(fwd_hooks=list(fwd_hooks)):
            if graph == "heads":
                with tl_compat.ungrouped_kv(model):
                    return heads.gradient_scores(model, tokens, mask, g, metric, passes, zero)
            return attribution._gradient_scores(model, tokens, mask, g, metric, passes, zero)


def _linearised(model, tokens, rules):
    """Forward hooks that make `model` the linear map each of `rules` assumes at `tokens`: norm
    scales and attention patterns recorded from a clean run and fed back as constants; the gated
    MLP's act(pre) * lin as (A(pre) lin0 + a0 lin) / 2 (half rule) and SiLU as pre a0 / pre0
    (identity rule), pre0, lin0, a0 = SiLU(pre0) recorded."""
    assert model.cfg.act_fn == "silu" and model.cfg.gated_mlp
    _, cache = model.run_with_cache(tokens)
    hooks = []

    def constant(name):
        return lambda x, hook: cache[name].clone()

    for name in cache.keys():
        if "norm-scale" in rules and name.endswith("hook_scale"):
            hooks.append((name, constant(name)))
        if "attention-pattern" in rules and name.endswith("hook_pattern"):
            hooks.append((name, constant(name)))
    if "half" in rules or "identity" in rules:
        for layer, block in enumerate(model.blocks):
            live = {}
            pre0 = cache[f"blocks.{layer}.mlp.hook_pre"]
            lin0 = cache[f"blocks.{layer}.mlp.hook_pre_linear"]
            a0 = F.silu(pre0)

            def keep(x, hook, key, live=live):
                live[key] = x

            def post(x, hook, live=live, pre0=pre0, lin0=lin0, a0=a0, b_in=block.mlp.b_in):
                pre, lin = live["pre"], live["lin"]
                act = pre * (a0 / pre0) if "identity" in rules else F.silu(pre)
                if "half" in rules:
                    return (act * lin0 + a0 * lin) / 2 + b_in
                return act * lin + b_in

            hooks += [
                (f"blocks.{layer}.mlp.hook_pre", lambda x, hook, keep=keep: keep(x, hook, "pre")),
                (
                    f"blocks.{layer}.mlp.hook_pre_linear",
                    lambda x, hook, keep=keep: keep(x, hook, "lin"),
                ),
                (f"blocks.{layer}.mlp.hook_post", post),
            ]
    return hooks


def _relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("rules", SUBSETS, ids="+".join)
def test_relp_is_eap_of_the_linearised_model(models64, arch, rules):
    """RelP on the model (fused attention, its own hooks) equals EAP on the model made linear
    where the rules say (TransformerLens attention, the patterns as constants): float64
    round-off; EAP on the model itself differs."""
    model = models64[arch]
    tokens, mask = _batch()
    relp, relp_loss = _raw(model, tokens, mask, "paper", rules)
    lin, lin_loss = _raw(
        model, tokens, mask, "paper", fwd_hooks=_linearised(model, tokens, rules), fused=False
    )
    eap, eap_loss = _raw(model, tokens, mask, "paper")
    err = _relative(relp, lin)
    print(f"{arch} {'+'.join(rules)}: relp vs eap of the linearised model {err:.1e}")
    assert err < 1e-12
    torch.testing.assert_close(relp_loss, eap_loss, rtol=0, atol=0)  # the forward is the model's
    torch.testing.assert_close(lin_loss, eap_loss, rtol=1e-12, atol=1e-12)
    assert _relative(relp, eap) > 1e-3


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("graph", ["paper", "block", "residual", "heads"])
def test_relp_with_every_rule_off_is_eap(models64, arch, graph):
    model = models64[arch]
    tokens, mask = _batch(seed=1)
    off = attribute(model, tokens, mask, graph=graph, method="relp", relp_rules=())
    eap = attribute(model, tokens, mask, graph=graph, method="eap")
    assert torch.equal(off.values, eap.values) and torch.equal(off.loss, eap.loss)
    assert off.meta == {}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("rules", [ALL, ("norm-scale",)], ids="+".join)
def test_heads_graph_sums_to_the_paper_graph_under_the_rules(models64, arch, rules):
    """The heads engine's hand-written ln1 Jacobian drops its rank-1 part under norm-scale: its
    scores summed per layer equal the paper graph's (which autograd computes)."""
    from test_heads import _summed_to_paper

    model = models64[arch]
    tokens, mask = _batch(seed=2)
    fine, _ = _raw(model, tokens, mask, "heads", rules)
    paper, _ = _raw(model, tokens, mask, "paper", rules)
    summed = _summed_to_paper(fine, model.cfg.n_layers, model.cfg.n_heads)
    assert _relative(summed, paper) < 1e-12


def _target_logits(logits, tokens, loss_mask):
    """A metric linear in the logits: each sample's summed logits of its masked tokens."""
    picked = logits[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return (picked * loss_mask[:, 1:]).sum(1)


def _order(name: str, n_layers: int) -> tuple[int, int]:
    """A node's place in the residual stream: (layer, 0) attention, (layer, 1) MLP."""
    if name == "hook_embed":
        return (-1, 1)
    if name == f"blocks.{n_layers - 1}.hook_resid_post":
        return (n_layers, 0)
    layer = int(name.split(".")[1])
    return (layer, 1 if "mlp" in name else 0)


def _cut_relevance(values, graph, n_layers):
    """Per cut c of the residual stream: -sum of scores of edges from before c to after c,
    i.e. <dy/dR_c, R_c> with R_c the residual stream at c."""
    up = [_order(u, n_layers) for u in graph.upstream]
    down = [_order(d, n_layers) for d in graph.downstream]
    cuts = sorted(set(down))
    out = []
    for cut in cuts:
        rows = torch.tensor([u < cut for u in up])
        cols = torch.tensor([d >= cut for d in down])
        out.append(-values[:, rows][:, :, cols].sum((1, 2)))
    return torch.stack(out, 1)  # [batch, cuts]


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM"])
def test_relevance_is_conserved_across_every_cut(models64, arch):
    """With all rules and no biases the network above any cut is, for the backward pass, a
    linear map of the residual stream there: <dy/dR_c, R_c> = y at every cut c (y linear in the
    logits). EAP's gradients break it (softmax, norm scales, SiLU, the product)."""
    model = models64[arch]
    assert all(
        float(p.detach().abs().max()) == 0
        for n, p in model.named_parameters()
        if ".b_" in n or "._b_" in n
    )
    tokens, mask = _batch(seed=3)
    graph = build_graph("paper", model.cfg.n_layers)
    relp, y = _raw(model, tokens, mask, "paper", ALL, metric=_target_logits)
    cuts = _cut_relevance(relp, graph, model.cfg.n_layers)
    err = ((cuts - y[:, None]).abs().max() / y.abs().max()).item()
    print(f"{arch}: relevance across {cuts.shape[1]} cuts vs y, max relative difference {err:.1e}")
    assert err < 1e-12
    eap, _ = _raw(model, tokens, mask, "paper", metric=_target_logits)
    assert ((_cut_relevance(eap, graph, model.cfg.n_layers) - y[:, None]).abs().max()) > 1e-3 * (
        y.abs().max()
    )


@pytest.mark.parametrize("graph", ["paper", "block", "heads"])
def test_query_and_key_inputs_are_reported_unscored(models64, graph):
    """Under the attention-pattern rule nothing reaches q/k inputs: their scores are 0 and
    attribute() names them in meta["unscored"], not as unimportant edges."""
    model = models64["Qwen2ForCausalLM"]
    tokens, mask = _batch(seed=4)
    scores = attribute(model, tokens, mask, graph=graph, method="relp")
    g = build_graph(graph, model.cfg.n_layers, model.cfg.n_heads)
    names = unscored(g, RELP_RULES)
    assert scores.meta["unscored"] == names
    kinds = {parse_node(d)[0].rsplit(".", 1)[-1] for d in names}
    assert kinds == (set() if graph == "block" else {"hook_q_input", "hook_k_input"})
    cols = [g.downstream.index(d) for d in names]
    assert torch.all(scores.values[:, :, cols] == 0)
    other = [j for j in range(len(g.downstream)) if j not in cols]
    assert scores.values[:, :, other].abs().sum() > 0
    no_pattern = attribute(model, tokens, mask, graph=graph, method="relp", relp_rules=ALL[:1])
    assert no_pattern.meta["unscored"] == []


@pytest.mark.parametrize("graph", ["paper", "heads"])
def test_relp_runs_one_forward(models64, monkeypatch, graph):
    """The clean pass records the outputs: no extra forward for the rules (one backward)."""
    model = models64["LlamaForCausalLM"]
    tokens, mask = _batch()
    calls = []
    forward = type(model).forward
    monkeypatch.setattr(
        type(model), "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k)
    )
    attribute(model, tokens, mask, graph=graph, method="relp")
    assert len(calls) == 1


@pytest.mark.parametrize("graph", ["paper", "heads"])
def test_checkpointed_blocks_give_the_same_scores(models64, graph):
    """Checkpointing recomputes each block (and its rule hooks) in the backward pass."""
    model = models64["Qwen2ForCausalLM"]
    tokens, mask = _batch(seed=5)
    plain = attribute(model, tokens, mask, graph=graph, method="relp")
    again = attribute(model, tokens, mask, graph=graph, method="relp", checkpoint=True)
    torch.testing.assert_close(again.values, plain.values, rtol=1e-6, atol=1e-9)


def test_bad_rules_are_refused(models64):
    model = models64["LlamaForCausalLM"]
    tokens, mask = _batch()
    with pytest.raises(ValueError, match="unknown RelP rule 'softmax'"):
        attribute(model, tokens, mask, method="relp", relp_rules=["softmax"])
    with pytest.raises(ValueError, match="method='relp' only"):
        attribute(model, tokens, mask, method="eap", relp_rules=ALL)
    with pytest.raises(ValueError, match="sequence of rule names"):
        with relp_rules(model, "half"):
            pytest.fail("relp_rules entered with a bare string of rules")


def test_mlps_the_rules_are_not_written_for_are_refused():
    """A GELU MLP without a gate: half/identity refused with the way out; the other rules run."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=90,
        act_fn="gelu", normalization_type="LN", dtype=torch.float64, seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    tokens, mask = _batch()
    with pytest.raises(ValueError, match="needs gated MLPs.*use method='eap'"):
        attribute(model, tokens, mask, method="relp")
    rules = ("norm-scale", "attention-pattern")
    scores = attribute(model, tokens, mask, method="relp", relp_rules=rules)
    assert scores.values.abs().sum() > 0 and len(scores.meta["unscored"]) == 2
