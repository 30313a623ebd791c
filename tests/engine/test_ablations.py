"""Every ablation and method against EAP-IG's definitions, written out here with TransformerLens
hooks (float64, all three families, paper and heads graphs).

EAP-IG (hannamw/EAP-IG, src/eap/attribute.py) scores an edge as <O'_u - O_u, g_d> summed over
positions and d_model, g_d the gradient of the metric at d's input averaged over its passes:
EAP one clean pass; EAP-IG-inputs the input embeddings E' + k/n (E - E'), k = 0..n-1;
EAP-IG-activations, for each of the embedding, each attention layer (all heads at once) and
each MLP in turn, k = 1..n: that output replaced by the constant k/n O + (1 - k/n) O', the
average taken over all n (1 + 2L) passes; clean-corrupted the clean and the corrupted input.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from checker import unchecked

from rl_circuits.engine.attribution import attribute, masked_nll
from rl_circuits.engine.circuits import evaluate_circuit
from rl_circuits.engine.graph import build_graph, parse_node
from rl_circuits.engine.methods import ABLATIONS, METHODS, RELP_RULES, methods_for
from rl_circuits.engine.relp import relp_rules
from rl_circuits.models.tiny import ARCHITECTURES

STEPS = 3
GRAPHS = ("paper", "heads")


def _batch(seed=0, batch=2, pos=11, start=5):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 90, (batch, pos), generator=gen)
    corrupted = torch.randint(4, 90, (batch, pos), generator=gen)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, start:] = True
    mask[1, pos - 2 :] = False  # a right-padded sample: its padding is left out of means
    return tokens, corrupted, mask


class _TL:
    """TransformerLens with one input per head (split q/k/v, ungrouped keys and values), MLP
    inputs and per-head results hooked, as EAP-IG configures it; restored on exit."""

    FLAGS = ("use_split_qkv_input", "use_hook_mlp_in", "use_attn_result")

    def __init__(self, *models):
        self.models = models

    def __enter__(self):
        for model in self.models:
            for flag in self.FLAGS:
                getattr(model, f"set_{flag}")(True)
            model.cfg.ungroup_grouped_query_attention = True

    def __exit__(self, *exc):
        for model in self.models:
            for flag in self.FLAGS:
                getattr(model, f"set_{flag}")(False)
            model.cfg.ungroup_grouped_query_attention = False


def _outputs(model, tokens, upstream) -> list[torch.Tensor]:
    """Each upstream node's output [batch, pos, d_model] in a clean run of `model`."""
    hooks = {parse_node(name)[0] for name in upstream}
    with _TL(model), torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
    out = []
    for name in upstream:
        hook, head = parse_node(name)
        out.append(cache[hook] if head is None else cache[hook][:, :, head])
    return out


def _site_hooks(model) -> list[str]:
    n = model.cfg.n_layers
    names = [f"blocks.{i}.hook_{p}_input" for i in range(n) for p in "qkv"]
    names += [f"blocks.{i}.hook_mlp_in" for i in range(n)]
    return names + [f"blocks.{n - 1}.hook_resid_post"]


def _gradients(model, tokens, targets, mask, replace=()) -> dict[str, torch.Tensor]:
    """dL/d(input) at every downstream hook (per head for q/k/v), `replace` = [(hook, value)]
    putting constant outputs in place (the gradient does not flow back through them)."""
    leaves = {}

    def probe(act, hook):
        leaves[hook.name] = torch.zeros_like(act, requires_grad=True)
        return act + leaves[hook.name]

    def constant(value):
        return lambda act, hook: value.clone()

    hooks = [(h, probe) for h in _site_hooks(model)] + [(h, constant(v)) for h, v in replace]
    with _TL(model), torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        masked_nll(logits, targets, mask).sum().backward()
    # A site cut off from the loss by a constant output gets no gradient: zero.
    return {n: torch.zeros_like(x) if x.grad is None else x.grad for n, x in leaves.items()}


def _grad_of(grads, node: str) -> torch.Tensor:
    """A downstream node's gradient [batch, pos, d_model]: a head's own, or summed over heads."""
    hook, head = parse_node(node)
    g = grads[hook]
    if g.ndim == 4:
        return g[:, :, head] if head is not None else g.sum(2)
    return g


def _scores(g, deltas, grads_list) -> torch.Tensor:
    """<O'_u - O_u, mean over passes of dL/dH_d> summed over positions and d_model."""
    out = torch.zeros(deltas[0].shape[0], len(g.upstream), len(g.downstream), dtype=torch.float64)
    for d, node in enumerate(g.downstream):
        grad = sum(_grad_of(grads, node) for grads in grads_list) / len(grads_list)
        for u in range(g.n_before[d]):
            out[:, u, d] = (deltas[u] * grad).sum((1, 2))
    return out


def _valid(mask):
    pos = mask.shape[1]
    last = pos - 1 - mask.flip(1).int().argmax(1)
    return (torch.arange(pos)[None] <= last[:, None]).double()


def _counterfactuals(model, tokens, corrupted, mask, upstream, ablation, other=None):
    """O'_u for every upstream node, written from its definition."""
    clean = _outputs(model, tokens, upstream)
    if ablation == "zero":
        return [torch.zeros_like(o) for o in clean]
    if ablation == "patch":
        return _outputs(other or model, corrupted if corrupted is not None else tokens, upstream)
    w = _valid(mask)
    if ablation == "mean":
        return [torch.einsum("bpm,bp->m", o, w).expand_as(o) / w.sum() for o in clean]
    return [(torch.einsum("bpm,bp->pm", o, w) / w.sum(0)[:, None]).expand_as(o) for o in clean]


def eap_ig_reference(model, tokens, corrupted, mask, graph, method, ablation, rule) -> torch.Tensor:
    """EAP-IG's definition of `method` under `ablation`, as its attribute code computes it
    (its own step rule: `left` for EAP-IG-inputs, `right` for EAP-IG-activations; the other
    rule of each is the same sum over k = 1..n or 0..n-1)."""
    ks = range(STEPS) if rule == "left" else range(1, STEPS + 1)
    g = build_graph(graph, model.cfg.n_layers, model.cfg.n_heads)
    clean = _outputs(model, tokens, g.upstream)
    cf = _counterfactuals(model, tokens, corrupted, mask, g.upstream, ablation)
    deltas = [c - o for c, o in zip(cf, clean, strict=True)]
    if method == "eap":
        passes = [_gradients(model, tokens, tokens, mask)]
    elif method == "relp":  # EAP's pass with RelP's rules (tests/engine/test_relp.py checks them)
        with relp_rules(model, RELP_RULES):
            passes = [_gradients(model, tokens, tokens, mask)]
    elif method == "eap-ig":  # EAP-IG-inputs
        embed, embed_cf = clean[0], cf[0]
        passes = [
            _gradients(
                model,
                tokens,
                tokens,
                mask,
                [("hook_embed", embed_cf + k / STEPS * (embed - embed_cf))],
            )
            for k in ks
        ]
    elif method == "eap-ig-activations":
        paper = build_graph("paper", model.cfg.n_layers).upstream
        o = _outputs(model, tokens, paper)
        o_cf = _counterfactuals(model, tokens, corrupted, mask, paper, ablation)
        passes = [
            _gradients(
                model, tokens, tokens, mask, [(name, k / STEPS * o[n] + (1 - k / STEPS) * o_cf[n])]
            )
            for n, name in enumerate(paper)
            for k in ks
        ]
    else:  # clean-corrupted
        passes = [
            _gradients(model, tokens, tokens, mask),
            _gradients(model, corrupted, tokens, mask),
        ]
    return _scores(g, deltas, passes)


CASES = [
    (m, a) for m, entry in METHODS.items() if entry.passes is not None for a in entry.ablations
]
# EAP-IG's rule first; the other one where a method integrates.
RULES = {"eap-ig": ("left", "right"), "eap-ig-activations": ("right", "left")}


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize(("method", "ablation"), CASES)
def test_every_method_and_ablation_equals_eap_ig_definition(models64, graph, method, ablation):
    worst = 0.0
    for arch in ARCHITECTURES:
        model = models64[arch]
        tokens, corrupted, mask = _batch(seed=ARCHITECTURES.index(arch))
        kw = {"corrupted_tokens": corrupted} if ablation == "patch" else {}
        for rule in RULES.get(method, ("right",)):
            got = attribute(
                model,
                tokens,
                mask,
                graph,
                method,
                ablation=ablation,
                ig_steps=STEPS,
                ig_rule=rule,
                **kw,
            ).values.double()
            want = eap_ig_reference(model, tokens, corrupted, mask, graph, method, ablation, rule)
            assert want.abs().max() > 1e-4  # a real signal
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    print(f"{method}/{ablation}/{graph}: worst relative error {worst:.1e}")
    assert worst <= 1e-6


# --- exact, across models, circuits ---------------------------------------------------------


@pytest.fixture(scope="module")
def pairs64(models64):
    """architecture -> (before, after): the tiny model and a copy with every weight perturbed
    by 5% of its mean magnitude (the "post-trained" model), float64."""
    out = {}
    for arch, model in models64.items():
        after = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in after.parameters():
                p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        out[arch] = (model, after)
    return out


def _patched_loss(model, tokens, mask, down: str, delta: torch.Tensor, eps: float = 1.0):
    """Loss with eps * delta added to the input of `down` (a head node: that head's copy only),
    through TransformerLens's per-input hooks."""
    hook, head = parse_node(down)

    def add(act, hook):
        if act.ndim == 3:
            return act + eps * delta
        act = act.clone()
        if head is None:
            return act + eps * delta.unsqueeze(2)
        act[:, :, head] += eps * delta
        return act

    with _TL(model), torch.no_grad():
        return masked_nll(model.run_with_hooks(tokens, fwd_hooks=[(hook, add)]), tokens, mask)


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("ablation", ["zero", "mean", "mean-positional", "patch"])
def test_exact_equals_hand_written_patch(models64, graph, ablation):
    model = models64["LlamaForCausalLM"]
    tokens, corrupted, mask = _batch(seed=5, pos=8, start=4)
    kw = {"corrupted_tokens": corrupted} if ablation == "patch" else {}
    exact = attribute(model, tokens, mask, graph, "exact", ablation=ablation, **kw)
    clean = _outputs(model, tokens, exact.upstream)
    cf = _counterfactuals(model, tokens, corrupted, mask, exact.upstream, ablation)
    with torch.no_grad():
        base = masked_nll(model(tokens), tokens, mask)
    for u, d in exact.edge_mask.nonzero().tolist():
        want = _patched_loss(model, tokens, mask, exact.downstream[d], cf[u] - clean[u]) - base
        torch.testing.assert_close(exact.values[:, u, d].double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("graph", GRAPHS)
def test_cross_model_exact_equals_hand_written_two_model_patch(pairs64, graph):
    before, after = pairs64["MistralForCausalLM"]
    tokens, _, mask = _batch(seed=6, pos=8, start=4)
    exact = attribute(before, tokens, mask, graph, "exact", ablation="patch", corrupted_model=after)
    mine, theirs = _outputs(before, tokens, exact.upstream), _outputs(after, tokens, exact.upstream)
    with torch.no_grad():
        base = masked_nll(before(tokens), tokens, mask)
    assert exact.values.abs().max() > 1e-4
    for u, d in exact.edge_mask.nonzero().tolist():
        want = _patched_loss(before, tokens, mask, exact.downstream[d], theirs[u] - mine[u]) - base
        torch.testing.assert_close(exact.values[:, u, d].double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cross_model_eap_equals_five_point_difference(pairs64, graph, arch):
    """d/dh loss(H_d + h (O'_u - O_u)) at h = 0 by the five-point stencil, for sampled edges."""
    before, after = pairs64[arch]
    tokens, _, mask = _batch(seed=8)
    eap = attribute(before, tokens, mask, graph, "eap", ablation="patch", corrupted_model=after)
    mine, theirs = _outputs(before, tokens, eap.upstream), _outputs(after, tokens, eap.upstream)
    edges = eap.edge_mask.nonzero()
    picked = edges[torch.randperm(len(edges), generator=torch.Generator().manual_seed(0))[:12]]
    scale = eap.values.abs().amax(dim=(1, 2)).double()
    h, worst = 1e-3, 0.0
    for u, d in picked.tolist():
        f = {
            k: _patched_loss(before, tokens, mask, eap.downstream[d], theirs[u] - mine[u], k * h)
            for k in (-2, -1, 1, 2)
        }
        fd = (8 * (f[1] - f[-1]) - (f[2] - f[-2])) / (12 * h)
        got = eap.values[:, u, d].double()
        rel = ((got - fd).abs() / torch.maximum(fd.abs(), 1e-3 * scale)).max().item()
        worst = max(worst, rel)
    print(f"cross-model eap vs five-point difference ({arch}, {graph}): {worst:.1e}")
    assert worst <= 1e-6


@pytest.mark.parametrize("graph", GRAPHS)
def test_identical_models_give_zero_scores_and_the_clean_loss(models64, graph):
    model = models64["Qwen2ForCausalLM"]
    twin = copy.deepcopy(model)
    tokens, _, mask = _batch(seed=9)
    g = build_graph(graph, model.cfg.n_layers, model.cfg.n_heads)
    for method in methods_for("patch", cross_model=True):
        scores = attribute(
            model, tokens, mask, graph, method, ablation="patch", corrupted_model=twin, ig_steps=2
        )
        assert (scores.values == 0).all(), method
    none = torch.zeros_like(g.edge_mask)
    patched = evaluate_circuit(
        model, tokens, mask, none, graph, ablation="patch", corrupted_model=twin
    )
    clean = evaluate_circuit(model, tokens, mask, g.edge_mask, graph)
    assert torch.equal(patched, clean)


def _fully_patched_by_hand(before, after, tokens, mask) -> torch.Tensor:
    """The after model's final residual stream read by the before model's final norm and
    unembedding: what every node of `before` computes from the after model's outputs."""
    last = f"blocks.{after.cfg.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        _, cache = after.run_with_cache(tokens, names_filter=[last])
        logits = before.unembed(before.ln_final(cache[last]))
    return masked_nll(logits, tokens, mask)


@pytest.mark.parametrize("graph", ["paper", "block", "residual", "heads"])
def test_circuits_with_patching_span_the_clean_and_the_fully_patched_loss(pairs64, graph):
    before, after = pairs64["LlamaForCausalLM"]
    tokens, corrupted, mask = _batch(seed=10)
    g = build_graph(graph, before.cfg.n_layers, before.cfg.n_heads)
    ends = torch.stack([g.edge_mask, torch.zeros_like(g.edge_mask)])
    with torch.no_grad():
        clean = masked_nll(before(tokens), tokens, mask)
        corrupted_run = masked_nll(before(corrupted), tokens, mask)
    within = evaluate_circuit(
        before, tokens, mask, ends, graph, ablation="patch", corrupted_tokens=corrupted
    )
    torch.testing.assert_close(within[0], clean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(within[1], corrupted_run, rtol=1e-9, atol=1e-9)
    across = evaluate_circuit(
        before, tokens, mask, ends, graph, ablation="patch", corrupted_model=after
    )
    fully = _fully_patched_by_hand(before, after, tokens, mask)
    torch.testing.assert_close(across[0], clean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(across[1], fully, rtol=1e-9, atol=1e-9)
    assert (across[1] - clean).abs().min() > 1e-4  # the perturbation matters


@pytest.mark.parametrize("ablation", ["mean", "mean-positional", "patch"])
def test_circuit_equals_hand_written_replacement(pairs64, ablation):
    """A random paper-graph circuit: each norm input outside the circuit reads O'_u (patch: from
    the after model) in place of O_u of this same pass."""
    before, after = pairs64["Qwen2ForCausalLM"]
    tokens, _, mask = _batch(seed=11)
    g = build_graph("paper", before.cfg.n_layers)
    keep = torch.rand(g.edge_mask.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    keep &= g.edge_mask
    kw = {"corrupted_model": after} if ablation == "patch" else {}
    got = evaluate_circuit(before, tokens, mask, keep, "paper", ablation=ablation, **kw)
    theirs = _counterfactuals(before, tokens, None, mask, g.upstream, ablation, other=after)
    written: dict[str, torch.Tensor] = {}
    names = {name: u for u, name in enumerate(g.upstream)}

    def store(act, hook):
        written[hook.name] = act
        return act

    def replace(d):
        def hook_fn(act, hook):
            n = g.n_before[d]
            fix = sum(written[g.upstream[u]] - theirs[u] for u in range(n) if not keep[u, d])
            if isinstance(fix, int):
                return act
            return act - (fix.unsqueeze(2) if act.ndim == 4 else fix)

        return hook_fn

    hooks = [(name, store) for name in names]
    hooks += [(name, replace(d)) for d, name in enumerate(g.downstream)]
    with _TL(before), torch.no_grad():
        want = masked_nll(before.run_with_hooks(tokens, fwd_hooks=hooks), tokens, mask)
        clean = masked_nll(before(tokens), tokens, mask)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert (got - clean).abs().min() > 1e-4  # the replacements matter


def test_bad_combinations_name_what_works(models64, pairs64):
    model = models64["Qwen2ForCausalLM"]
    tokens, corrupted, mask = _batch()
    other = models64["LlamaForCausalLM"]
    with pytest.raises(ValueError, match="eap, eap-ig-activations, relp, exact"):
        attribute(model, tokens, mask, method="eap-ig", ablation="patch", corrupted_model=model)
    with pytest.raises(ValueError, match="it works with patch"):
        attribute(model, tokens, mask, method="clean-corrupted")
    with pytest.raises(ValueError, match="needs corrupted_tokens"):
        attribute(model, tokens, mask, ablation="patch")
    with pytest.raises(ValueError, match="inputs of ablation='patch'"):
        attribute(model, tokens, mask, corrupted_tokens=corrupted)
    with pytest.raises(ValueError, match="corrupted_model does not match model: cfg.original_arch"):
        attribute(model, tokens, mask, ablation="patch", corrupted_model=other)
    with pytest.raises(ValueError, match="shape of tokens"), unchecked():  # hint: [batch pos]
        attribute(model, tokens, mask, ablation="patch", corrupted_tokens=corrupted[:, :4])
    with pytest.raises(ValueError, match="unknown ablation 'resample'"):
        evaluate_circuit(
            model, tokens, mask, build_graph("paper", 2).edge_mask, ablation="resample"
        )
    with pytest.raises(ValueError, match="unknown ig_rule 'middle'"):
        attribute(model, tokens, mask, method="eap-ig", ig_rule="middle")


def test_docs_table_is_the_registry():
    """docs/metrics.md's method x ablation table says what `engine.methods` declares."""
    text = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    header = "| method | " + " | ".join(ABLATIONS) + " | across models |"
    assert header in text
    rows = text.split(header)[1].split("\n\n")[0].strip().splitlines()[1:]
    table = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in rows}
    want = {
        name: ["yes" if a in m.ablations else "no" for a in ABLATIONS]
        + ["yes" if m.cross_model else "no"]
        for name, m in METHODS.items()
    }
    assert table == want


def test_mean_over_given_data_and_mask(models64):
    """mean_tokens / mean_mask choose the data of O'_u = mean(O_u): eap against the definition."""
    model = models64["MistralForCausalLM"]
    tokens, other, mask = _batch(seed=12)
    keep = torch.rand(other.shape, generator=torch.Generator().manual_seed(1)) < 0.6
    g = build_graph("paper", model.cfg.n_layers)
    got = attribute(model, tokens, mask, ablation="mean", mean_tokens=other, mean_mask=keep)
    w = keep.double()
    means = [torch.einsum("bpm,bp->m", o, w) / w.sum() for o in _outputs(model, other, g.upstream)]
    clean = _outputs(model, tokens, g.upstream)
    want = _scores(
        g,
        [m - o for m, o in zip(means, clean, strict=True)],
        [_gradients(model, tokens, tokens, mask)],
    )
    assert (got.values.double() - want).abs().max() <= 1e-6 * want.abs().max()


@pytest.mark.parametrize("graph", GRAPHS)
def test_checkpointing_keeps_patched_scores(pairs64, graph):
    """Blocks recomputed in the backward pass record and interpolate once: the same scores."""
    before, after = pairs64["Qwen2ForCausalLM"]
    tokens, corrupted, mask = _batch(seed=13)
    for method, kw in (
        ("eap", {"corrupted_model": after}),
        ("eap-ig-activations", {"corrupted_model": after}),
        ("eap-ig", {"corrupted_tokens": corrupted}),
    ):
        plain = attribute(before, tokens, mask, graph, method, ablation="patch", ig_steps=2, **kw)
        ckpt = attribute(
            before, tokens, mask, graph, method, ablation="patch", ig_steps=2, checkpoint=True, **kw
        )
        torch.testing.assert_close(ckpt.values, plain.values, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("graph", ["paper", "block", "residual", "heads"])
@pytest.mark.parametrize("ablation", ["mean", "mean-positional", "patch"])
def test_one_replaced_edge_equals_exact(pairs64, graph, ablation):
    """A circuit missing one edge loses exactly that edge's `exact` score (patch: from the
    after model), on every graph: circuits and attribution agree on O'_u."""
    before, after = pairs64["LlamaForCausalLM"]
    tokens, _, mask = _batch(seed=14, pos=8, start=4)
    kw = {"corrupted_model": after} if ablation == "patch" else {}
    exact = attribute(before, tokens, mask, graph, "exact", ablation=ablation, **kw)
    edges = exact.edge_mask.nonzero()
    picked = edges[torch.randperm(len(edges), generator=torch.Generator().manual_seed(2))[:8]]
    circuits = exact.edge_mask.repeat(len(picked), 1, 1)
    for i, (u, d) in enumerate(picked.tolist()):
        circuits[i, u, d] = False
    losses = evaluate_circuit(before, tokens, mask, circuits, graph, ablation=ablation, **kw)
    clean = evaluate_circuit(before, tokens, mask, exact.edge_mask, graph)
    want = torch.stack([exact.values[:, u, d] for u, d in picked.tolist()]).double()
    assert want.abs().max() > 1e-4
    torch.testing.assert_close(losses - clean, want, rtol=1e-5, atol=1e-7)
