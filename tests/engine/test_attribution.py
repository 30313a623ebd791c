"""The attribution engine against finite differences and hand-written ablations (float64)."""

from contextlib import contextmanager

import pytest
import torch
from scipy.stats import spearmanr
from transformer_lens import HookedTransformer, HookedTransformerConfig

from rl_circuits.engine.attribution import attribute, masked_nll
from rl_circuits.engine.circuits import evaluate_circuit
from rl_circuits.engine.graph import GRAPHS, build_graph, parse_node
from rl_circuits.errors import NumericalError
from rl_circuits.models.loading import load_model


def _batch(seed=0, batch=2, pos=14, start=7, vocab=90):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, vocab, (batch, pos), generator=gen)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, start:] = True
    return tokens, mask


@contextmanager
def _official_hooks(model):
    """TransformerLens's own per-input hook points (one key/value input per query head),
    independent of the engine's sites."""
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    model.cfg.ungroup_grouped_query_attention = True
    try:
        yield
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)
        model.cfg.ungroup_grouped_query_attention = False


def hand_ablated_loss(model, tokens, mask, down: str, out_u: torch.Tensor, eps: float):
    """Loss with eps * O_u subtracted from the input of `down`, via TransformerLens hooks.

    A head node `hook_q_input[h]` loses O_u from head h's own copy of the input only.
    """
    hook, head = parse_node(down)
    if hook.endswith("hook_attn_in"):
        names = [hook.replace("attn_in", f"{p}_input") for p in "qkv"]
    else:
        names = [hook]

    def sub(act, hook):
        delta = eps * out_u
        if act.ndim == 3:
            return act - delta
        if head is None:
            return act - delta.unsqueeze(2)  # every head's copy
        act = act.clone()
        act[:, :, head] -= delta
        return act

    with _official_hooks(model), torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(n, sub) for n in names])
    return masked_nll(logits, tokens, mask)


def clean_outputs(model, tokens, upstream):
    """Each upstream node's clean output; a head's from TransformerLens's `hook_result`."""
    hooks = {parse_node(name)[0] for name in upstream}
    model.set_use_attn_result(True)
    try:
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
    finally:
        model.set_use_attn_result(False)
    outputs = []
    for name in upstream:
        hook, head = parse_node(name)
        outputs.append(cache[hook] if head is None else cache[hook][:, :, head])
    return outputs


@pytest.mark.parametrize("graph", GRAPHS)
def test_eap_equals_central_difference(models64, graph):
    """values[u, d] = d/d eps of L(H_d - eps O_u) at 0, to 1e-6 relative, on every family."""
    tokens, mask = _batch()
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for model in models64.values():
        scores = attribute(model, tokens, mask, graph=graph)
        outs = clean_outputs(model, tokens, scores.upstream)
        edges = scores.edge_mask.nonzero().tolist()
        picks = torch.randperm(len(edges), generator=gen)[:8].tolist()
        picks.append(len(edges) - 1)  # always an edge into the logits node
        for u, d in (edges[i] for i in picks):
            # Five-point central difference of L(H_d - h O_u) at 0: O(h^4) truncation.
            h = 1e-3
            f = {
                k: hand_ablated_loss(model, tokens, mask, scores.downstream[d], outs[u], k * h)
                for k in (-2, -1, 1, 2)
            }
            fd = (8 * (f[1] - f[-1]) - (f[2] - f[-2])) / (12 * h)
            got = scores.values[:, u, d].double()
            scale = scores.values.abs().amax(dim=(1, 2)).double()
            rel = ((got - fd).abs() / torch.maximum(fd.abs(), 1e-3 * scale)).max().item()
            worst = max(worst, rel)
    print(f"worst relative error vs central difference ({graph}): {worst:.2e}")
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("graph", GRAPHS)
def test_exact_equals_hand_written_ablation(models64, graph):
    model = models64["Qwen2ForCausalLM"]
    tokens, mask = _batch(seed=2, pos=10, start=5)
    exact = attribute(model, tokens, mask, graph=graph, method="exact")
    outs = clean_outputs(model, tokens, exact.upstream)
    with torch.no_grad():
        clean = masked_nll(model(tokens), tokens, mask)
    for u, d in exact.edge_mask.nonzero().tolist():
        ablated = hand_ablated_loss(model, tokens, mask, exact.downstream[d], outs[u], 1.0)
        torch.testing.assert_close(
            exact.values[:, u, d].double(), ablated - clean, rtol=1e-5, atol=1e-6
        )
    assert (exact.values[:, ~exact.edge_mask] == 0).all()


def _linear_toy():
    """Attention-only at one position, no norms, MLPs switched off: linear in every ablation."""
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        n_heads=2,
        d_head=8,
        d_mlp=32,
        d_vocab=20,
        n_ctx=8,
        act_fn="silu",
        gated_mlp=True,
        normalization_type=None,
        positional_embedding_type="rotary",
        rotary_dim=8,
        dtype=torch.float64,
        seed=0,
        device="cpu",
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.W_out.zero_()
    return model


def test_eap_equals_exact_when_the_model_is_linear():
    model = _linear_toy()
    tokens = torch.tensor([[3, 7], [5, 1]])
    mask = torch.tensor([[False, True], [False, True]])

    def target_logit(logits, tokens, mask):  # linear in the logits
        return logits[:, 0].gather(-1, tokens[:, 1:]).squeeze(-1)

    for graph in GRAPHS:
        eap = attribute(model, tokens, mask, graph=graph, metric=target_logit)
        exact = attribute(model, tokens, mask, graph=graph, method="exact", metric=target_logit)
        assert eap.values.abs().max() > 1e-3
        torch.testing.assert_close(eap.values, exact.values, rtol=1e-5, atol=1e-6)


def test_eap_correlates_with_exact_on_a_real_model(models64):
    model = models64["LlamaForCausalLM"]
    tokens, mask = _batch(seed=3, batch=1, pos=16, start=8)
    eap = attribute(model, tokens, mask)
    exact = attribute(model, tokens, mask, method="exact")
    rho = spearmanr(eap.values[0][eap.edge_mask], exact.values[0][eap.edge_mask]).statistic
    print(f"Spearman(eap, exact) on a tiny random Llama: {rho:.3f}")
    assert rho > 0.4  # measured 0.55: whole-edge removal is far from linear here


def test_qkv_scores_sum_to_attention_input(models64):
    model = models64["MistralForCausalLM"]
    tokens, mask = _batch(seed=4)
    paper = attribute(model, tokens, mask, graph="paper")
    block = attribute(model, tokens, mask, graph="block")
    n_layers = model.cfg.n_layers
    for layer in range(n_layers):
        qkv = sum(
            paper.values[:, :, paper.downstream.index(f"blocks.{layer}.hook_{p}_input")]
            for p in "qkv"
        )
        attn_in = block.values[:, :, block.downstream.index(f"blocks.{layer}.hook_attn_in")]
        torch.testing.assert_close(qkv, attn_in, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(paper.values[:, :, -1], block.values[:, :, -1])


def test_graph_shapes_and_edges():
    shapes = (
        ("paper", 7, 4 * 3 + 1),
        ("block", 7, 2 * 3 + 1),
        ("residual", 7, 2 * 3),
        ("heads", 1 + 3 * (2 + 1), 3 * (3 * 2 + 1) + 1),
    )
    for name, n_up, n_down in shapes:
        graph = build_graph(name, 3, n_heads=2)
        assert len(graph.upstream) == n_up and len(graph.downstream) == n_down
        mask = graph.edge_mask
        assert mask[:, -1].all()  # every writer reaches the logits
        assert mask[0].all()  # the embedding reaches every reader
        assert not mask[-1, :-1].any()  # the last MLP writes only to the logits
    assert build_graph("paper", 1).downstream == (
        "blocks.0.hook_q_input",
        "blocks.0.hook_k_input",
        "blocks.0.hook_v_input",
        "blocks.0.hook_mlp_in",
        "blocks.0.hook_resid_post",
    )


def test_batch_invariance_with_right_padding(tiny_checkpoints):
    model = load_model(tiny_checkpoints["Qwen2ForCausalLM"], device="cpu", max_seq_len=64)
    gen = torch.Generator().manual_seed(5)
    lengths = [9, 15, 12]
    tokens = torch.zeros(3, max(lengths), dtype=torch.long)  # pad id 0
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.randint(4, 90, (n,), generator=gen)
        mask[i, n - 4 : n] = True
    batched = attribute(model, tokens, mask)
    for i, n in enumerate(lengths):
        alone = attribute(model, tokens[i : i + 1, :n], mask[i : i + 1, :n])
        err = (batched.values[i] - alone.values[0]).abs().max() / alone.values.abs().max()
        assert err <= 1e-5


def test_eap_ig_equals_hand_written_integrated_gradients(models64):
    model = models64["Qwen2ForCausalLM"]
    tokens, mask = _batch(seed=6)
    eap = attribute(model, tokens, mask, graph="residual")
    one = attribute(model, tokens, mask, graph="residual", method="eap-ig", ig_steps=1)
    torch.testing.assert_close(one.values, eap.values, rtol=0, atol=0)
    steps = 4
    ig = attribute(model, tokens, mask, graph="residual", method="eap-ig", ig_steps=steps)
    # Hand-written: scale the embedding by k/steps, average the state gradients.
    outs = clean_outputs(model, tokens, ig.upstream)
    grads = {name: 0.0 for name in ig.downstream}
    for k in range(1, steps + 1):
        saved = {}

        def keep(act, hook, saved=saved):
            act.retain_grad()
            saved[hook.name] = act

        def scale(act, hook, t=k / steps):
            return (act * t).detach().requires_grad_(True)

        hooks = [("hook_embed", scale)] + [(name, keep) for name in ig.downstream]
        loss = masked_nll(model.run_with_hooks(tokens, fwd_hooks=hooks), tokens, mask)
        loss.sum().backward()
        for name in ig.downstream:
            grads[name] = grads[name] + saved[name].grad / steps
        model.zero_grad(set_to_none=True)
    for u, d in ig.edge_mask.nonzero().tolist():
        expected = -(grads[ig.downstream[d]] * outs[u]).sum((1, 2))
        torch.testing.assert_close(ig.values[:, u, d].double(), expected, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(ig.values, eap.values)


def _hook_count(model):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def test_hooks_removed_and_model_untouched_even_on_error(models64):
    model = models64["LlamaForCausalLM"]
    tokens, mask = _batch(seed=7)
    before_cfg = dict(model.cfg.__dict__)
    before_hooks = _hook_count(model)
    flags = [p.requires_grad for p in model.parameters()]
    attribute(model, tokens, mask)
    assert _hook_count(model) == before_hooks
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients

    def broken(logits, tokens, mask):
        raise RuntimeError("metric failed")

    for method in ("eap", "exact"):
        with pytest.raises(RuntimeError, match="metric failed"):
            attribute(model, tokens, mask, method=method, metric=broken)
        assert _hook_count(model) == before_hooks
    assert dict(model.cfg.__dict__) == before_cfg
    assert [p.requires_grad for p in model.parameters()] == flags


def test_non_finite_loss_names_the_sample(models64):
    model = models64["LlamaForCausalLM"]
    tokens, mask = _batch(seed=8)

    def nan_second(logits, tokens, mask):
        loss = masked_nll(logits, tokens, mask)
        return loss * torch.tensor([1.0, float("nan")], dtype=loss.dtype)

    with pytest.raises(NumericalError, match="q-17.*float32 or bfloat16"):
        attribute(model, tokens, mask, metric=nan_second, sample_ids=["q-3", "q-17"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_models_agree_with_float64(tiny_checkpoints, models64, dtype):
    path = tiny_checkpoints["Qwen2ForCausalLM"]
    model = load_model(path, dtype=dtype, device="cpu", max_seq_len=64)
    tokens, mask = _batch(seed=9)
    got = attribute(model, tokens, mask)
    ref = attribute(models64["Qwen2ForCausalLM"], tokens, mask)
    assert got.values.dtype == torch.float32
    rel = (got.values - ref.values).abs().max() / ref.values.abs().max()
    assert rel < (1e-5 if dtype == torch.float32 else 0.1)


@pytest.fixture(scope="module")
def processed_qwen2(tiny_checkpoints):
    """The tiny Qwen2 checkpoint (qkv biases) raw, and with each weight processing offered."""
    path = tiny_checkpoints["Qwen2ForCausalLM"]
    options = [{}, {"fold_ln": True}, {"center_unembed": True}]
    options.append({"fold_ln": True, "center_unembed": True})
    return [
        load_model(path, dtype=torch.float64, device="cpu", max_seq_len=64, **kw) for kw in options
    ]


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("method", ["eap", "exact"])
def test_weight_processing_keeps_scores(processed_qwen2, graph, method):
    """fold_ln / center_unembed keep every graph's scores, the heads graph's too: b_V stays
    with its head instead of moving into b_O, which belongs to no head."""
    raw, *processed = processed_qwen2
    assert raw.blocks[0].attn.b_V.abs().max() > 0  # the qkv biases that used to move
    tokens, mask = _batch(seed=10, pos=10, start=5)
    a = attribute(raw, tokens, mask, graph=graph, method=method)
    scale = a.values.abs().max()
    for model in processed:
        assert all(not block.attn.b_O.any() for block in model.blocks)
        b = attribute(model, tokens, mask, graph=graph, method=method)
        assert (b.values - a.values).abs().max() < 1e-6 * scale  # float32 copies of float64


def test_heads_graph_refuses_a_value_bias_folded_into_the_output_bias(tiny_checkpoints):
    """TransformerLens's own processing moves b_V into b_O: the heads graph then refuses the
    model, naming the cause and the fix; the paper graph (which owns b_O) still works."""
    path = tiny_checkpoints["Qwen2ForCausalLM"]
    model = load_model(path, dtype=torch.float64, device="cpu", max_seq_len=64)
    model.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=False)
    tokens, mask = _batch(seed=11)
    for method in ("eap", "exact"):
        with pytest.raises(ValueError, match=r"layer\(s\) \[0, 1\] have a nonzero b_O.*b_V"):
            attribute(model, tokens, mask, graph="heads", method=method)
    heads = build_graph("heads", model.cfg.n_layers, model.cfg.n_heads)
    with pytest.raises(ValueError, match="fold_value_biases=False"):
        evaluate_circuit(model, tokens, mask, heads.edge_mask, graph="heads")
    assert attribute(model, tokens, mask, graph="paper").values.abs().max() > 0


def test_bad_inputs_are_refused(models64):
    model = models64["LlamaForCausalLM"]
    tokens, mask = _batch()
    with pytest.raises(ValueError, match="loss_mask\\[:, 0\\]"):
        bad = mask.clone()
        bad[:, 0] = True
        attribute(model, tokens, bad)
    with pytest.raises(ValueError, match="no masked position"):
        attribute(model, tokens, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="unknown graph"):
        attribute(model, tokens, mask, graph="nodes")
    with pytest.raises(ValueError, match="max_seq_len"):
        long = torch.ones(1, 65, dtype=torch.long)
        attribute(
            model,
            long,
            torch.ones_like(long, dtype=torch.bool).index_fill(1, torch.tensor([0]), False),
        )
