"""Fused attention and block checkpointing give TransformerLens's values, hooks and scores."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from rl_circuits.engine.attribution import attribute
from rl_circuits.engine.efficient import (
    EfficientAttentionError,
    checkpoint_blocks,
    efficient_attention,
)
from rl_circuits.engine.graph import GRAPHS
from rl_circuits.models.loading import load_model
from rl_circuits.models.tiny import ARCHITECTURES

POS = 20  # longer than the tiny Mistral's sliding window (6)
TOL = {torch.float64: 1e-8, torch.float32: 1e-4}


def _batch(seed=0, batch=2, pos=POS, start=6):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 90, (batch, pos), generator=gen)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, start:] = True
    return tokens, mask


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    """(architecture, dtype) -> model, for float64 and float32."""
    return {
        (arch, dtype): load_model(path, dtype=dtype, device="cpu", max_seq_len=64)
        for arch, path in tiny_checkpoints.items()
        for dtype in TOL
    }


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def _patched(model: HookedTransformer) -> list[str]:
    """Names of the attention layers and blocks whose forward is currently an instance patch."""
    return [name for name, module in model.named_modules() if "forward" in module.__dict__]


def test_mistral_sequence_is_longer_than_its_window(models):
    cfg = models["MistralForCausalLM", torch.float64].cfg
    assert cfg.attn_types == ["local", "local"] and cfg.window_size < POS


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_and_hooks_equal_plain_transformer_lens(models, arch, dtype):
    model = models[arch, dtype]
    tokens, _ = _batch()
    names = ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z", "hook_attn_out")
    names += ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "ln1.hook_normalized")

    def wanted(name: str) -> bool:
        return name.endswith(names)

    with torch.no_grad():
        ref, ref_cache = model.run_with_cache(tokens, names_filter=wanted)
        with efficient_attention(model):
            got, cache = model.run_with_cache(tokens, names_filter=wanted)
    assert _rel(got, ref) <= TOL[dtype]
    assert set(cache.keys()) == set(ref_cache.keys())
    assert len(cache.keys()) == model.cfg.n_layers * len(names)
    for name in ref_cache.keys():
        assert _rel(cache[name], ref_cache[name]) <= TOL[dtype], name
    assert not _patched(model)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_scores_equal_plain_path(models, arch, dtype):
    model = models[arch, dtype]
    tokens, mask = _batch(seed=1)
    for graph in GRAPHS:
        for method in ("eap", "exact"):
            ref = attribute(model, tokens, mask, graph, method, efficient_attention=False)
            got = attribute(model, tokens, mask, graph, method, efficient_attention=True)
            assert ref.values.abs().max() > 0
            assert _rel(got.values, ref.values) <= TOL[dtype], (graph, method)
            assert _rel(got.loss, ref.loss) <= TOL[dtype]
    assert not _patched(model)


def test_split_qkv_inputs_run_through_the_fused_path(models):
    """TransformerLens's per-head q/k/v inputs (the authors' recipe) work with it too."""
    model = models["Qwen2ForCausalLM", torch.float64]
    tokens, _ = _batch(seed=2)
    model.set_use_split_qkv_input(True)
    try:
        with torch.no_grad():
            ref = model(tokens)
            with efficient_attention(model):
                got = model(tokens)
    finally:
        model.set_use_split_qkv_input(False)
    assert _rel(got, ref) <= 1e-8


@pytest.mark.parametrize("fused", [False, True])
def test_checkpointing_leaves_scores_unchanged(models, fused):
    model = models["MistralForCausalLM", torch.float64]
    tokens, mask = _batch(seed=3)
    calls = []
    handle = model.blocks[0].hook_attn_out.register_forward_hook(
        lambda mod, args, out: calls.append(1)
    )
    try:
        for graph in GRAPHS:
            plain = attribute(model, tokens, mask, graph, efficient_attention=fused)
            calls.clear()
            ckpt = attribute(model, tokens, mask, graph, efficient_attention=fused, checkpoint=True)
            assert len(calls) == 2  # the block really was recomputed in the backward pass
            assert torch.equal(plain.values, ckpt.values), graph
            assert torch.equal(plain.loss, ckpt.loss)
        ig = attribute(model, tokens, mask, "paper", "eap-ig", ig_steps=2)
        ig_ckpt = attribute(model, tokens, mask, "paper", "eap-ig", ig_steps=2, checkpoint=True)
        assert torch.equal(ig.values, ig_ckpt.values)
        exact = attribute(model, tokens, mask, "block", "exact")
        exact_ckpt = attribute(model, tokens, mask, "block", "exact", checkpoint=True)
        assert torch.equal(exact.values, exact_ckpt.values)
    finally:
        handle.remove()
    assert not _patched(model)


def test_bfloat16_runs_and_agrees_roughly(tiny_checkpoints):
    model = load_model(
        tiny_checkpoints["MistralForCausalLM"], dtype=torch.bfloat16, device="cpu", max_seq_len=64
    )
    tokens, mask = _batch(seed=4)
    with torch.no_grad():
        ref = model(tokens)
        with efficient_attention(model):
            got = model(tokens)
    assert got.dtype == torch.bfloat16 and _rel(got, ref) < 0.05
    plain = attribute(model, tokens, mask, efficient_attention=False)
    fused = attribute(model, tokens, mask, checkpoint=True)
    assert torch.isfinite(fused.values).all() and _rel(fused.values, plain.values) < 0.1


def test_pattern_hooks_are_refused(models):
    model = models["LlamaForCausalLM", torch.float32]
    tokens, mask = _batch(seed=5)
    for name in ("blocks.1.attn.hook_pattern", "blocks.0.attn.hook_attn_scores"):
        model.add_hook(name, lambda act, hook: act)
        try:
            with pytest.raises(EfficientAttentionError, match="efficient_attention=False"):
                attribute(model, tokens, mask)
            attribute(model, tokens, mask, efficient_attention=False)  # works without it
        finally:
            model.reset_hooks()
        assert not _patched(model)
    # A hook added while the context is active is refused when the layer runs.
    with efficient_attention(model):
        with pytest.raises(EfficientAttentionError, match="blocks.0.attn.hook_attn_scores"):
            model.run_with_cache(tokens)  # caches every hook point, patterns included
    assert not _patched(model)
    assert all(not m._forward_hooks for m in model.modules())


def test_forwards_restored_even_after_an_error(models):
    model = models["Qwen2ForCausalLM", torch.float32]
    tokens, _ = _batch()
    before = {name: type(m).forward for name, m in model.named_modules()}
    with pytest.raises(RuntimeError, match="boom"):
        with efficient_attention(model), checkpoint_blocks(model):
            assert len(_patched(model)) == 2 * model.cfg.n_layers
            raise RuntimeError("boom")
    assert not _patched(model)
    # Nested contexts restore the outer patch, then the class forward.
    with efficient_attention(model):
        outer = model.blocks[0].attn.forward
        with efficient_attention(model):
            assert model.blocks[0].attn.forward is not outer
        assert model.blocks[0].attn.forward is outer
    assert not _patched(model)
    with pytest.raises(EfficientAttentionError, match="KV cache"):
        with efficient_attention(model):
            model.generate(tokens[:1, :4], max_new_tokens=2, verbose=False)
    assert not _patched(model)
    assert {name: type(m).forward for name, m in model.named_modules()} == before


def test_padding_masks_are_refused_and_all_ones_masks_accepted(models):
    model = models["Qwen2ForCausalLM", torch.float64]
    tokens, _ = _batch()
    with torch.no_grad():
        ref = model(tokens)
        with efficient_attention(model):
            ones = model(tokens, attention_mask=torch.ones_like(tokens))
            padded = torch.ones_like(tokens)
            padded[0, :3] = 0
            with pytest.raises(EfficientAttentionError, match="pad on the right"):
                model(tokens, attention_mask=padded)
    assert _rel(ones, ref) <= 1e-8


def test_unsupported_attention_is_refused():
    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=16,
        n_heads=2,
        d_head=8,
        d_vocab=20,
        n_ctx=8,
        act_fn="gelu",
        attn_only=True,
        positional_embedding_type="alibi",
        device="cpu",
    )
    model = HookedTransformer(cfg)
    with pytest.raises(EfficientAttentionError, match="alibi.*efficient_attention=False"):
        with efficient_attention(model):
            pass
    assert not _patched(model)


def test_repeated_key_value_heads_where_sdpa_cannot_share_them(models, monkeypatch):
    """torch < 2.5 has no enable_gqa: key/value heads are repeated instead, same values."""
    import rl_circuits.engine.efficient as efficient

    model = models["Qwen2ForCausalLM", torch.float64]
    tokens, _ = _batch(seed=6)
    with torch.no_grad():
        ref = model(tokens)
        monkeypatch.setattr(efficient, "_SDPA_SHARES_HEADS", False)
        with efficient_attention(model):
            got = model(tokens)
    assert _rel(got, ref) <= 1e-8
