"""Every node name of every graph fires in TransformerLens inside `hooks_enabled`, means there
what it means in the scores, and the README's hand-patched edge reproduces `method="exact"`."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

import rl_circuits
from rl_circuits.engine.attribution import attribute
from rl_circuits.engine.graph import GRAPHS, build_graph
from rl_circuits.engine.hooks import hook_point, hooks_enabled
from rl_circuits.models.tiny import ARCHITECTURES

FLAGS = (
    "use_split_qkv_input",
    "use_attn_in",
    "use_attn_result",
    "use_hook_mlp_in",
    "ungroup_grouped_query_attention",
)
README = Path(__file__).resolve().parents[2] / "README.md"


def _tokens(batch=2, pos=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, 90, (batch, pos), generator=gen)


def _flags(model):
    configs = [model.cfg] + [m.cfg for m in model.modules() if hasattr(m, "cfg")]
    return [tuple(getattr(cfg, f) for f in FLAGS) for cfg in configs]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("graph", GRAPHS)
def test_every_node_is_cached_and_hooked(models64, arch, graph):
    model = models64[arch]
    g = build_graph(graph, model.cfg.n_layers, model.cfg.n_heads)
    names = g.upstream + g.downstream
    before = _flags(model)
    tokens = _tokens()
    clean = model(tokens)
    with hooks_enabled(model, names):
        points = {name: hook_point(model, name) for name in names}
        hooks = sorted({hook for hook, _ in points.values()})
        logits, cache = model.run_with_cache(tokens, names_filter=hooks)
        fired: list[str] = []
        model.run_with_hooks(
            tokens, fwd_hooks=[(h, lambda x, hook: fired.append(hook.name)) for h in hooks]
        )
    assert _flags(model) == before
    torch.testing.assert_close(logits, clean, rtol=0, atol=1e-12)  # same function
    assert sorted(cache.keys()) == hooks
    assert sorted(set(fired)) == hooks
    for name, (hook, head) in points.items():
        act = cache[hook]
        if head is not None:  # one slice per query head, keys and values ungrouped
            assert act.shape[2] == model.cfg.n_heads, name
            act = act[:, :, head]
        elif act.dim() == 4:  # a per-head copy of the residual stream: all copies equal
            torch.testing.assert_close(act, act[:, :, :1].expand_as(act), rtol=0, atol=0)
            act = act[:, :, 0]
        assert act.shape == (*tokens.shape, model.cfg.d_model), name


def test_names_mean_the_node_of_the_scores(models64):
    """Grouped keys: hook_k_input[1] is query head 1's own copy only when ungrouped (Qwen2 tiny:
    4 query heads, 2 key/value heads), and attn_in fires under GQA (TL refuses set_use_attn_in)."""
    model = models64["Qwen2ForCausalLM"]
    assert model.cfg.n_key_value_heads < model.cfg.n_heads
    tokens = _tokens()
    with hooks_enabled(model, ["blocks.1.hook_k_input"]):
        _, grouped = model.run_with_cache(tokens, names_filter="blocks.1.hook_k_input")
    with hooks_enabled(model, ["blocks.1.hook_k_input[3]", "blocks.0.attn.hook_result[3]"]):
        _, cache = model.run_with_cache(tokens)
    assert grouped["blocks.1.hook_k_input"].shape[2] == model.cfg.n_key_value_heads
    assert cache["blocks.1.hook_k_input"].shape[2] == model.cfg.n_heads
    heads = cache["blocks.0.attn.hook_result"]
    torch.testing.assert_close(heads.sum(2), cache["blocks.0.hook_attn_out"], rtol=0, atol=1e-12)
    with hooks_enabled(model, ["blocks.1.hook_attn_in"]):
        _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_attn_in")
    assert cache["blocks.1.hook_attn_in"].shape[2] == model.cfg.n_heads


def test_flags_restored_after_an_error_and_bad_names_refused(models64):
    model = models64["MistralForCausalLM"]
    model.cfg.use_hook_mlp_in = True  # the user's own setting survives
    try:
        before = _flags(model)
        with pytest.raises(RuntimeError, match="inside"):
            with hooks_enabled(model, ["blocks.0.attn.hook_result[1]", "blocks.1.hook_attn_in"]):
                assert model.cfg.use_attn_result and model.cfg.use_attn_in
                raise RuntimeError("inside")
        assert _flags(model) == before
    finally:
        model.cfg.use_hook_mlp_in = False
    with pytest.raises(ValueError, match="set both ways"):
        with hooks_enabled(model, ["blocks.0.hook_attn_in", "blocks.0.hook_q_input"]):
            pytest.fail("hooks_enabled entered with a conflicting pair of names")
    with pytest.raises(ValueError, match="out of range"):
        hook_point(model, f"blocks.0.hook_q_input[{model.cfg.n_heads}]")
    with pytest.raises(ValueError, match="no head axis"):
        hook_point(model, "blocks.0.hook_mlp_in[0]")
    with pytest.raises(ValueError, match="no hook point"):
        hook_point(model, "blocks.9.hook_mlp_in")


def _readme_example() -> str:
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    found = [b for b in blocks if "hooks_enabled" in b and "run_with_hooks" in b]
    assert len(found) == 1, "README: one python block patches an edge through hooks_enabled"
    return found[0]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("graph", GRAPHS)
def test_readme_patch_by_hand_reproduces_exact(models64, arch, graph):
    model = models64[arch]
    tokens = _tokens(batch=2, pos=10, seed=1)
    loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
    loss_mask[:, 5:] = True
    scores = attribute(model, tokens, loss_mask, graph=graph, method="exact")
    _check_readme_example(model, tokens, loss_mask, scores)
    if graph == "heads":  # also an edge from one head's output into another head's input
        headed = torch.tensor([n.endswith("]") for n in scores.upstream])[:, None] & torch.tensor(
            [n.endswith("]") for n in scores.downstream]
        )
        between_heads = dataclasses.replace(scores, edge_mask=scores.edge_mask & headed)
        up, down = _check_readme_example(model, tokens, loss_mask, between_heads)
        assert up.endswith("]") and down.endswith("]")


def _check_readme_example(model, tokens, loss_mask, scores) -> tuple[str, str]:
    namespace = {
        "rl_circuits": rl_circuits,
        "torch": torch,
        "model": model,
        "tokens": tokens,
        "loss_mask": loss_mask,
        "scores": scores,
    }
    exec(compile(_readme_example(), "README.md", "exec"), namespace)
    up, down = namespace["up"], namespace["down"]
    want = scores.values[:, scores.index(up), scores.index(down)].double()
    change = namespace["change"].double()
    assert want.abs().max() > 1e-4  # a real edge, far above the tolerance
    # Scores and losses are stored in float32 (losses about 4.6: 2.4e-7 per rounding).
    torch.testing.assert_close(change, want, rtol=0, atol=1e-6)
    assert abs(float(change.detach().mean()) - namespace["score"]) < 1e-6
    return up, down
