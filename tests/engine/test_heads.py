"""The head-level graph: sums to the paper graph, finite differences, per-query-head keys, cost."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_attribution import clean_outputs, hand_ablated_loss
from torch.utils._python_dispatch import TorchDispatchMode
from transformer_lens import HookedTransformer, HookedTransformerConfig

from rl_circuits.engine import (
    attribution,
    counterfactual,
    efficient,
    head_buffers,
    heads,
    methods,
    tl_compat,
)
from rl_circuits.engine.attribution import attribute, masked_nll
from rl_circuits.engine.graph import build_graph, parse_node
from rl_circuits.engine.passes import frozen
from rl_circuits.models.loading import load_model
from rl_circuits.models.tiny import ARCHITECTURES, make_tiny_checkpoint


def _batch(seed=0, batch=2, pos=14, start=7):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 90, (batch, pos), generator=gen)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, start:] = True
    return tokens, mask


def _raw_scores(model, tokens, mask, graph: str, scales) -> torch.Tensor:
    """The engines' own float64 matrices (attribute() hands out float32 copies)."""
    g = build_graph(graph, model.cfg.n_layers, model.cfg.n_heads)
    passes, zero = [methods.Pass(t=t) for t in scales], counterfactual.Counterfactual("zero")
    with frozen(model), torch.enable_grad(), efficient.efficient_attention(model):
        if graph == "heads":
            with tl_compat.ungrouped_kv(model):
                values, _ = heads.gradient_scores(model, tokens, mask, g, masked_nll, passes, zero)
        else:
            values, _ = attribution._gradient_scores(
                model, tokens, mask, g, masked_nll, passes, zero
            )
    return values


def _summed_to_paper(values: torch.Tensor, n_layers: int, n_heads: int) -> torch.Tensor:
    """Heads-graph scores with each layer's heads summed, upstream and downstream."""
    fine, coarse = build_graph("heads", n_layers, n_heads), build_graph("paper", n_layers)
    rows = torch.zeros(len(coarse.upstream), len(fine.upstream), dtype=values.dtype)
    for i, name in enumerate(fine.upstream):
        hook, head = parse_node(name)
        if head is not None:
            hook = hook.replace(".attn.hook_result", ".hook_attn_out")
        rows[coarse.upstream.index(hook), i] = 1
    cols = torch.zeros(len(fine.downstream), len(coarse.downstream), dtype=values.dtype)
    for j, name in enumerate(fine.downstream):
        cols[j, coarse.downstream.index(parse_node(name)[0])] = 1
    return rows @ values @ cols


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("steps", [1, 3])
def test_head_scores_sum_to_the_paper_graph(models64, arch, steps):
    """Per layer, summing heads gives hook_attn_out / hook_{q,k,v}_input: float64 round-off."""
    model = models64[arch]
    tokens, mask = _batch(seed=steps)
    scales = [k / steps for k in range(steps, 0, -1)]
    fine = _raw_scores(model, tokens, mask, "heads", scales)
    paper = _raw_scores(model, tokens, mask, "paper", scales)
    assert fine.dtype == torch.float64 and paper.abs().max() > 0
    summed = _summed_to_paper(fine, model.cfg.n_layers, model.cfg.n_heads)
    err = ((summed - paper).abs().max() / paper.abs().max()).item()
    print(f"{arch}, {steps} step(s): heads summed vs paper, max relative difference {err:.1e}")
    assert err < 1e-13


def _edge_kinds(scores, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """One edge of every kind: embedding/MLP/head into q, k, v heads, MLP input and logits."""
    up, down = scores.upstream, scores.downstream
    last = n_layers - 1
    pairs = [
        ("hook_embed", "blocks.0.hook_q_input[1]"),
        ("hook_embed", "blocks.0.hook_k_input[2]"),
        ("blocks.0.hook_mlp_out", f"blocks.{last}.hook_v_input[3]"),
        ("blocks.0.attn.hook_result[1]", f"blocks.{last}.hook_q_input[0]"),
        ("blocks.0.attn.hook_result[2]", f"blocks.{last}.hook_k_input[0]"),
        ("blocks.0.attn.hook_result[2]", f"blocks.{last}.hook_k_input[1]"),  # same key head
        ("blocks.0.attn.hook_result[3]", f"blocks.{last}.hook_v_input[2]"),
        ("blocks.0.attn.hook_result[0]", "blocks.0.hook_mlp_in"),
        (f"blocks.{last}.attn.hook_result[3]", f"blocks.{last}.hook_mlp_in"),
        ("blocks.0.attn.hook_result[1]", f"blocks.{last}.hook_resid_post"),
        (f"blocks.{last}.hook_mlp_out", f"blocks.{last}.hook_resid_post"),
    ]
    return [(up.index(u), down.index(d)) for u, d in pairs]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_edge_kind_matches_central_difference(models64, arch):
    """Five-point central differences of L(H_d - h O_u) through TransformerLens's own split
    q/k/v inputs (ungrouped) and hook_result, for every kind of edge."""
    model = models64[arch]
    cfg = model.cfg
    assert cfg.n_key_value_heads < cfg.n_heads  # grouped keys and values are exercised
    tokens, mask = _batch(seed=11)
    scores = attribute(model, tokens, mask, graph="heads")
    outs = clean_outputs(model, tokens, scores.upstream)
    scale = scores.values.abs().amax(dim=(1, 2)).double()
    for u, d in _edge_kinds(scores, cfg.n_layers, cfg.n_heads):
        assert scores.edge_mask[u, d]
        h = 1e-3
        f = {
            k: hand_ablated_loss(model, tokens, mask, scores.downstream[d], outs[u], k * h)
            for k in (-2, -1, 1, 2)
        }
        fd = (8 * (f[1] - f[-1]) - (f[2] - f[-2])) / (12 * h)
        got = scores.values[:, u, d].double()
        rel = ((got - fd).abs() / torch.maximum(fd.abs(), 1e-3 * scale)).max().item()
        assert rel <= 1e-6, (scores.upstream[u], scores.downstream[d], rel)


def test_keys_and_values_are_each_query_heads_own(models64):
    """Query heads sharing a key/value head get different k and v scores (not the group's)."""
    model = models64["LlamaForCausalLM"]
    tokens, mask = _batch(seed=12)
    scores = attribute(model, tokens, mask, graph="heads")
    group = model.cfg.n_heads // model.cfg.n_key_value_heads
    assert group > 1
    for part in "kv":
        a = scores.downstream.index(f"blocks.1.hook_{part}_input[0]")
        b = scores.downstream.index(f"blocks.1.hook_{part}_input[1]")
        diff = (scores.values[:, :, a] - scores.values[:, :, b]).abs().max()
        assert diff > 1e-3 * scores.values[:, :, a].abs().max()


def test_graph_names_parse_back_and_edges_follow_the_residual_order():
    graph = build_graph("heads", 2, n_heads=3)
    assert graph.upstream[:5] == (
        "hook_embed",
        "blocks.0.attn.hook_result[0]",
        "blocks.0.attn.hook_result[1]",
        "blocks.0.attn.hook_result[2]",
        "blocks.0.hook_mlp_out",
    )
    assert graph.downstream[:4] == (
        "blocks.0.hook_q_input[0]",
        "blocks.0.hook_q_input[1]",
        "blocks.0.hook_q_input[2]",
        "blocks.0.hook_k_input[0]",
    )
    assert graph.downstream[9:11] == ("blocks.0.hook_mlp_in", "blocks.1.hook_q_input[0]")
    assert graph.downstream[-1] == "blocks.1.hook_resid_post"
    mask = graph.edge_mask
    q00 = graph.downstream.index("blocks.0.hook_q_input[0]")
    q10 = graph.downstream.index("blocks.1.hook_q_input[0]")
    assert mask[:, q00].tolist() == [True] + [False] * 8  # only the embedding
    head = graph.upstream.index("blocks.0.attn.hook_result[2]")
    assert not mask[head, : graph.downstream.index("blocks.0.hook_mlp_in")].any()
    assert mask[head, graph.downstream.index("blocks.0.hook_mlp_in") :].all()
    assert mask[: graph.upstream.index("blocks.1.attn.hook_result[0]"), q10].all()
    assert parse_node("blocks.3.hook_q_input[5]") == ("blocks.3.hook_q_input", 5)
    assert parse_node("blocks.12.attn.hook_result[27]") == ("blocks.12.attn.hook_result", 27)
    assert parse_node("hook_embed") == ("hook_embed", None)
    for name in graph.upstream + graph.downstream:
        hook, head = parse_node(name)
        assert (hook if head is None else f"{hook}[{head}]") == name
    for bad in ("blocks.3.hook_q_input[x]", "blocks.3.hook_q_input[5", "a]"):
        with pytest.raises(ValueError, match="not of the form"):
            parse_node(bad)
    with pytest.raises(ValueError, match="needs n_heads"):
        build_graph("heads", 2)


def test_unsupported_models_are_refused_by_name():
    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=16,
        n_heads=2,
        d_head=8,
        d_mlp=32,
        d_vocab=20,
        n_ctx=8,
        act_fn="gelu",
        normalization_type="LN",
        device="cpu",
    )
    model = HookedTransformer(cfg)
    tokens = torch.tensor([[1, 2, 3]])
    mask = torch.tensor([[False, True, True]])
    with pytest.raises(ValueError, match="LN normalisation.*graph='paper'"):
        attribute(model, tokens, mask, graph="heads")
    attribute(model, tokens, mask, graph="paper")  # the coarser graph still works


def test_eap_ig_recipe_flags_are_tolerated_and_restored(models64):
    """A model set up for EAP-IG (split q/k/v inputs, hook_result, mlp_in, ungrouped) gives
    the same scores, and keeps its flags."""
    model = models64["MistralForCausalLM"]
    tokens, mask = _batch(seed=16)
    plain = attribute(model, tokens, mask, graph="heads")
    flags = dict(
        use_split_qkv_input=True,
        use_attn_result=True,
        use_hook_mlp_in=True,
        ungroup_grouped_query_attention=True,
    )
    saved = {key: getattr(model.cfg, key) for key in flags}
    try:
        for key, value in flags.items():
            setattr(model.cfg, key, value)
        recipe = attribute(model, tokens, mask, graph="heads")
        assert {key: getattr(model.cfg, key) for key in flags} == flags
    finally:
        for key, value in saved.items():
            setattr(model.cfg, key, value)
    torch.testing.assert_close(recipe.values, plain.values, rtol=1e-6, atol=1e-9)


def test_model_left_as_found(models64):
    model = models64["Qwen2ForCausalLM"]
    tokens, mask = _batch(seed=13)
    flags = [block.attn.cfg.ungroup_grouped_query_attention for block in model.blocks]
    handles = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    for method in ("eap", "exact"):
        attribute(model, tokens[:1, :9], mask[:1, :9], graph="heads", method=method)

    def broken(logits, tokens, mask):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        attribute(model, tokens, mask, graph="heads", metric=broken)
    assert [block.attn.cfg.ungroup_grouped_query_attention for block in model.blocks] == flags
    assert not model.cfg.ungroup_grouped_query_attention
    after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert after == handles
    assert all(p.grad is None for p in model.parameters())


class _LargestTensor(TorchDispatchMode):
    """Records the number of elements of the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def test_no_per_head_copy_of_the_residual_stream(tmp_path):
    """With many heads and few layers, no tensor reaches [batch, pos, n_heads, d_model]."""
    path = make_tiny_checkpoint(
        tmp_path / "wide", "Qwen2ForCausalLM", num_attention_heads=16, num_key_value_heads=4
    )
    model = load_model(path, dtype=torch.float32, device="cpu", max_seq_len=64)
    cfg = model.cfg
    tokens, mask = _batch(seed=14, batch=1, pos=48, start=8)
    per_head_copy = tokens.numel() * cfg.n_heads * cfg.d_model
    for checkpoint in (False, True):
        with _LargestTensor() as mode:
            attribute(model, tokens, mask, graph="heads", checkpoint=checkpoint)
        # the largest: a few heads' input gradients at a time, CHUNK residual copies
        assert mode.largest == heads.CHUNK * tokens.numel() * cfg.d_model < per_head_copy


@pytest.fixture(scope="module")
def heads_run(tiny_run, tmp_path_factory):
    """The tiny pipeline (tests' trained tiny models) rerun with attribute.graph = "heads"."""
    from config_support import write_config

    from rl_circuits.cli.main import main

    base, config = tiny_run
    out = tmp_path_factory.mktemp("heads-run")
    overrides = {"run": {"run_dir": str(out / "run")}, "attribute": {"graph": "heads"}}
    path = write_config(out / "heads.toml", overrides, base=config)
    assert main(["run", str(path)]) == 0
    return out / "run"


def test_pipeline_runs_the_heads_graph_end_to_end(heads_run):
    from rl_circuits import load_run

    run = load_run(heads_run)
    assert run.config.attribute.graph == "heads"
    scores = run.scores("tiny", "after", "sevens", 1.0)
    n_layers, n_heads = 2, 4  # the tiny models
    graph = build_graph("heads", n_layers, n_heads)
    assert scores.values.shape == (4, len(graph.upstream), len(graph.downstream))
    assert scores.upstream == graph.upstream and scores.downstream == graph.downstream
    assert torch.equal(scores.edge_mask, graph.edge_mask)
    assert scores.graph == "heads" and scores.method == run.config.attribute.method
    assert (scores.values[:, ~scores.edge_mask] == 0).all()
    assert scores.values[:, scores.edge_mask].abs().min() >= 0
    table = run.table1().to_markdown()
    assert "Act. Intens." in table
    html = (heads_run / "report" / "report.html").read_text()
    assert "each head&#x27;s outputs" in html or "each head's outputs" in html
    assert "blocks.1.hook_q_input[3]" in html  # the drill-down into one layer's q/k/v heads
    assert "graph heads" in html


def test_notebooks_run_on_the_heads_graph(heads_run, monkeypatch):
    import json

    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("RL_CIRCUITS_RUN", str(heads_run))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = Path(__file__).resolve().parents[2] / "notebooks"
    for path in sorted(root.glob("*.ipynb")):
        book = nbformat.read(path, as_version=4)
        NotebookClient(book, timeout=300, resources={"metadata": {"path": str(root)}}).execute()
        text = "\n".join(
            out.get("text", "") + json.dumps(out.get("data", {}))
            for cell in book.cells
            if cell.cell_type == "code"
            for out in cell.outputs
        )
        assert "Traceback" not in text, path.name
        if path.name.startswith("02"):
            assert "exact loss change" in text and "[" in text.split("edge ")[-1]
            assert "heads summed per layer" in text  # the heads branch of the edge matrix ran


def test_buffer_sizes_used_for_estimates_are_the_engines(models64):
    """heads.buffer_bytes (the 7B memory estimate's input) matches what the engine allocates."""
    model = models64["MistralForCausalLM"]
    buffers = head_buffers.HeadBuffers(model, 2, 10, "cpu", torch.float64)
    sizes = heads.buffer_bytes(model.cfg, 2, 10, torch.float64)["buffers"]
    allocated = [buffers.full, buffers.z, buffers.xhat, buffers.rinv, buffers.coef, buffers.grads]
    graph = build_graph("heads", model.cfg.n_layers, model.cfg.n_heads)
    scores = 2 * len(graph.upstream) * len(graph.downstream) * 8
    assert sum(sizes.values()) == sum(x.numel() * 8 for x in allocated) + scores


def test_heatmap_sums_heads_per_layer_and_drills_down():
    from rl_circuits.analysis.plots import relative_change_heatmap

    graph = build_graph("heads", 2, n_heads=3)
    gen = torch.Generator().manual_seed(15)
    shape = (4, len(graph.upstream), len(graph.downstream))
    before = torch.randn(shape, generator=gen, dtype=torch.float64) * graph.edge_mask
    after = torch.randn(shape, generator=gen, dtype=torch.float64) * graph.edge_mask
    figure = relative_change_heatmap(
        before, after, graph.upstream, graph.downstream, graph.edge_mask
    )
    summary = figure.data[0]
    assert summary.visible and not any(trace.visible for trace in figure.data[1:])
    assert list(summary.y)[:3] == [
        "hook_embed",
        "blocks.0.attn.hook_result",
        "blocks.0.hook_mlp_out",
    ]
    row, col = (
        list(summary.y).index("blocks.0.attn.hook_result"),
        list(summary.x).index("blocks.1.hook_k_input"),
    )
    ups = [graph.upstream.index(f"blocks.0.attn.hook_result[{h}]") for h in range(3)]
    downs = [graph.downstream.index(f"blocks.1.hook_k_input[{h}]") for h in range(3)]
    # one definition in every view: each sample's scores summed with signs, then mean |.|
    b = before[:, ups][:, :, downs].sum((1, 2)).abs().mean().item()
    a = after[:, ups][:, :, downs].sum((1, 2)).abs().mean().item()
    assert summary.customdata[row][col][0] == pytest.approx(b, rel=1e-6)
    assert summary.customdata[row][col][2] == pytest.approx((a - b) / b, rel=1e-5)
    expected = np.clip(np.log2(a / b), summary.zmin, summary.zmax)
    assert summary.z[row][col] == pytest.approx(expected, rel=1e-5)
    buttons = figure.layout.updatemenus[0].buttons
    assert buttons[0].args[1]["height"] == figure.layout.height  # each view sized to its own
    assert torch.isnan(torch.tensor(summary.z[row][list(summary.x).index("blocks.0.hook_q_input")]))
    menu = [button.label for button in figure.layout.updatemenus[0].buttons]
    assert menu[0] == "all nodes, heads summed per layer"
    assert "blocks.1.attn.hook_result: each head's outputs" in menu
    assert "blocks.0: each head's q/k/v inputs" in menu
    heads_of_1 = figure.data[menu.index("blocks.1.attn.hook_result: each head's outputs")]
    assert list(heads_of_1.y) == [f"blocks.1.attn.hook_result[{h}]" for h in range(3)]
    assert len(figure.data) == 1 + 2 + 2
