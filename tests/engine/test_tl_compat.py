"""The TransformerLens facts `rl_circuits.engine.tl_compat` encodes, checked against the installed
version: when one fails after an upgrade, port tl_compat (and only it)."""

from __future__ import annotations

import tomllib
from contextlib import nullcontext

import pytest
import torch
from packaging.version import Version
from transformer_lens import HookedTransformer, HookedTransformerConfig

from rl_circuits.engine import tl_compat
from rl_circuits.engine.efficient import efficient_attention
from rl_circuits.models.loading import load_model, model_maps
from rl_circuits.models.tiny import ARCHITECTURES
from rl_circuits.resources import resource_dir

POS = 20  # longer than the tiny Mistral's sliding window (6)


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    """architecture -> its tiny checkpoint in float64 (GQA everywhere, Qwen2 qkv biases,
    Mistral sliding-window layers)."""
    return {
        arch: load_model(path, dtype=torch.float64, device="cpu", max_seq_len=64)
        for arch, path in tiny_checkpoints.items()
    }


def _tokens(seed=0, batch=2, pos=POS):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, 90, (batch, pos), generator=gen)


def _config(**overrides) -> HookedTransformerConfig:
    fields = dict(
        n_layers=1,
        d_model=16,
        n_heads=2,
        d_head=8,
        d_vocab=20,
        n_ctx=8,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        device="cpu",
    )
    return HookedTransformerConfig(**{**fields, **overrides})


def test_installed_version_is_the_one_written_for():
    installed = Version(tl_compat.installed_version())
    written = Version(tl_compat.WRITTEN_FOR)
    assert installed.major == written.major and installed >= written


@pytest.mark.parametrize("split", [False, True])
def test_ln1_is_called_for_query_key_value_inputs_in_order(models, split):
    """Three ln1 calls per block; changing the input of call i changes only part LN1_CALLS[i]
    (with split inputs, told apart by head count too); the fused path calls it the same way."""
    model = models["Qwen2ForCausalLM"]
    block = model.blocks[1]
    tokens = _tokens()
    parts = {part: getattr(block.attn, f"hook_{part}") for part in "qkv"}

    def run(perturb: int | None, fused: bool):
        seen, outs, calls = [], {}, [0]

        def pre(mod, args):
            seen.append(args[0].clone())
            call, calls[0] = calls[0], calls[0] + 1
            if call == perturb:
                return (args[0] + 0.5 * torch.randn_like(args[0]), *args[1:])
            return None

        handles = [block.ln1.register_forward_pre_hook(pre)]
        for part, hook in parts.items():
            handles.append(hook.register_forward_hook(lambda m, a, o, p=part: outs.update({p: o})))
        try:
            with torch.no_grad(), efficient_attention(model) if fused else nullcontext():
                model(tokens)
        finally:
            for handle in handles:
                handle.remove()
        return seen, outs

    model.set_use_split_qkv_input(split)
    try:
        for fused in (False, True):
            seen, clean = run(None, fused)
            assert len(seen) == len(tl_compat.LN1_CALLS) == 3
            if split:
                cfg = model.cfg
                assert [x.shape[2] for x in seen] == [cfg.n_heads] + 2 * [cfg.n_key_value_heads]
            reference, _ = run(None, fused=False)
            for a, b in zip(seen, reference, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
            for call, part in enumerate(tl_compat.LN1_CALLS):
                _, outs = run(call, fused)
                changed = {p for p in "qkv" if not torch.equal(outs[p], clean[p])}
                assert changed == {part}, (call, fused)
    finally:
        model.set_use_split_qkv_input(False)


def _reference_attend(attn, record):
    """softmax(q k^T * score_scale + causal/sliding-window mask) v, written out in full."""

    def attend(q, k, v):
        record.append(True)
        repeats = q.shape[2] // k.shape[2]
        k, v = (x.repeat_interleave(repeats, dim=2) for x in (k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * tl_compat.score_scale(attn)
        i = torch.arange(q.shape[1])
        allowed = i[None, :] <= i[:, None]
        window = tl_compat.sliding_window(attn)
        if window is not None:
            allowed &= i[None, :] > i[:, None] - window
        pattern = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return torch.einsum("bhqk,bkhd->bqhd", pattern, v)

    return attend


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_copied_forward_equals_transformer_lens_own(models, arch):
    """`attention_forward` around a hand-written attention gives TL's logits and hook values,
    fires no pattern hook, and asks `check` first (all-ones mask: no padding)."""
    model = models[arch]
    assert all(tl_compat.runs_reference_forward(b.attn) for b in model.blocks)
    assert all(not tl_compat.unsupported_features(b.attn) for b in model.blocks)
    if arch == "MistralForCausalLM":
        assert {tl_compat.sliding_window(b.attn) for b in model.blocks} == {6}
    names = ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z", "hook_attn_out")
    tokens = _tokens(seed=1)
    with torch.no_grad():
        ref, ref_cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(names))
    calls, attended, fired = [], [], []
    for block in model.blocks:
        attn = block.attn
        attn.forward = tl_compat.attention_forward(
            attn, calls.append, _reference_attend(attn, attended)
        )
        for name in tl_compat.PATTERN_HOOKS:
            getattr(attn, name).add_hook(lambda act, hook: fired.append(hook.name))
    try:
        with torch.no_grad():
            got, cache = model.run_with_cache(
                tokens,
                names_filter=lambda n: n.endswith(names),
                attention_mask=torch.ones_like(tokens),
            )
    finally:
        model.reset_hooks()
        for block in model.blocks:
            del block.attn.forward
    n_layers = model.cfg.n_layers
    assert len(attended) == n_layers and not fired
    assert calls == [tl_compat.AttentionCall(False, False, False)] * n_layers
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    assert set(cache.keys()) == set(ref_cache.keys()) and len(cache.keys()) == n_layers * 7
    for name in ref_cache.keys():
        torch.testing.assert_close(cache[name], ref_cache[name], rtol=1e-9, atol=1e-9)


def test_attention_call_reports_what_the_stand_in_would_leave_out(models):
    attn = models["LlamaForCausalLM"].blocks[0].attn
    calls = []
    forward = tl_compat.attention_forward(attn, calls.append, _reference_attend(attn, []))
    x = torch.randn(1, 5, attn.cfg.d_model, dtype=torch.float64)
    padded = torch.ones(1, 5, dtype=torch.long)
    padded[0, 0] = 0
    forward(x, x, x, attention_mask=padded)
    forward(x, x, x, additive_attention_mask=torch.zeros(1, 1, 1, 5))
    forward(x, x, x, position_bias=torch.zeros(1, 2, 5, 5))
    assert calls == [
        tl_compat.AttentionCall(kv_cache=False, additive_mask=False, padding_mask=True),
        tl_compat.AttentionCall(kv_cache=False, additive_mask=True, padding_mask=False),
        tl_compat.AttentionCall(kv_cache=False, additive_mask=True, padding_mask=False),
    ]


def test_features_outside_the_copied_forward_are_named():
    attn = HookedTransformer(_config(attn_scores_soft_cap=30.0, use_attn_result=True)).blocks[0]
    found = tl_compat.unsupported_features(attn.attn)
    assert "attention-score soft capping" in found
    assert "per-head results (use_attn_result)" in found
    plain = HookedTransformer(_config()).blocks[0].attn
    assert tl_compat.unsupported_features(plain) == []
    assert plain._attention_dir_override is None  # the private attribute TL's forward reads
    assert tl_compat.attention_direction(plain) == "causal"
    plain._attention_dir_override = "bidirectional"
    assert tl_compat.unsupported_features(plain) == ["non-causal attention"]
    assert tl_compat.is_attention(plain) and not tl_compat.is_attention(torch.nn.Linear(2, 2))


def test_pattern_hooks_are_seen_however_they_were_added(models):
    hook = models["LlamaForCausalLM"].blocks[0].attn.hook_pattern
    assert not tl_compat.hooks_registered(hook)
    hook.add_hook(lambda act, hook: None)
    assert tl_compat.hooks_registered(hook)
    hook.remove_hooks(including_permanent=True)
    assert not tl_compat.hooks_registered(hook)
    for register in ("forward", "forward_pre", "full_backward", "full_backward_pre"):
        handle = getattr(hook, f"register_{register}_hook")(lambda *args: None)
        assert tl_compat.hooks_registered(hook), register
        handle.remove()
        assert not tl_compat.hooks_registered(hook)


def test_grouped_key_value_weights_are_stored_once_per_kv_head(models):
    model = models["Qwen2ForCausalLM"]
    attn, cfg = model.blocks[0].attn, model.cfg
    group = cfg.n_heads // cfg.n_key_value_heads
    assert group > 1
    weight, got_group = tl_compat.qkv_weight(attn, "Q")
    assert weight is attn.W_Q and got_group == 1
    for part in "KV":
        weight, got_group = tl_compat.qkv_weight(attn, part)
        assert got_group == group and weight.shape[0] == cfg.n_key_value_heads
        assert weight is getattr(attn, f"_W_{part}")  # the parameter itself, not a copy
        public = getattr(attn, f"W_{part}")  # TL repeats it per query head
        torch.testing.assert_close(public, weight.repeat_interleave(group, dim=0), rtol=0, atol=0)
    dense = HookedTransformer(_config()).blocks[0].attn
    weight, got_group = tl_compat.qkv_weight(dense, "K")
    assert weight is dense.W_K and got_group == 1


def test_bias_parameter_names(models):
    """BIAS_PARAMETER matches exactly the biases; QKV_BIAS_PARAMETER the parameters behind
    the public b_Q, b_K, b_V of grouped-query attention."""
    model = models["Qwen2ForCausalLM"]
    params = dict(model.named_parameters())
    biases = {name for name in params if tl_compat.BIAS_PARAMETER.search(name)}
    assert biases == {name for name in params if name.rsplit(".", 1)[1].lstrip("_")[:2] == "b_"}
    qkv = sorted(name for name in params if tl_compat.QKV_BIAS_PARAMETER.search(name))
    attn = model.blocks[0].attn
    group = model.cfg.n_heads // model.cfg.n_key_value_heads
    assert qkv[:3] == ["blocks.0.attn._b_K", "blocks.0.attn._b_V", "blocks.0.attn.b_Q"]
    assert len(qkv) == 3 * model.cfg.n_layers
    assert params["blocks.0.attn.b_Q"] is attn.b_Q
    for part in "KV":
        stored = params[f"blocks.0.attn._b_{part}"]
        assert torch.equal(getattr(attn, f"b_{part}"), stored.repeat_interleave(group, dim=0))


def test_conversion_tables_name_transformer_lens_parameters(models):
    """Every parameter name in model_maps/conversions is one of the model's parameters."""
    params = set(dict(models["Qwen2ForCausalLM"].named_parameters()))
    names = set()
    for file in sorted((resource_dir("model_maps") / "conversions").glob("*.toml")):
        names |= set(tomllib.loads(file.read_text())["weights"])
    assert names == {name for m in model_maps().values() for name in m.weights}
    assert {name.replace("{l}", "1") for name in names} <= params
    assert any(name.startswith("blocks.{l}.attn._") for name in names)  # the grouped ones


def test_ungrouped_kv_sets_and_restores_the_flags(models):
    model = models["LlamaForCausalLM"]
    cfg = model.cfg
    tokens = _tokens(seed=3, pos=9)
    flags = ("ungroup_grouped_query_attention", "use_split_qkv_input", "use_hook_mlp_in")
    before = {key: getattr(cfg, key) for key in flags}
    shapes = {}

    def keep(act, hook):
        shapes[hook.name.rsplit(".", 1)[1]] = act.shape

    names = ("hook_k", "hook_k_input", "hook_mlp_in")
    hooks = [(f"blocks.0.attn.{names[0]}", keep)] + [(f"blocks.0.{n}", keep) for n in names[1:]]
    with torch.no_grad(), tl_compat.ungrouped_kv(model):
        assert all(b.attn.cfg.ungroup_grouped_query_attention for b in model.blocks)
        model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert shapes == {"hook_k": (2, 9, cfg.n_heads, cfg.d_head)}  # one key per query head
    shapes.clear()
    with torch.no_grad(), tl_compat.ungrouped_kv(model, per_head_inputs=True):
        model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert shapes["hook_k_input"] == (2, 9, cfg.n_heads, cfg.d_model)  # each head's own input
    assert shapes["hook_mlp_in"] == (2, 9, cfg.d_model)
    assert {key: getattr(cfg, key) for key in flags} == before
    with pytest.raises(RuntimeError, match="inside"):
        with tl_compat.ungrouped_kv(model, per_head_inputs=True):
            raise RuntimeError("inside")
    assert {key: getattr(cfg, key) for key in flags} == before


def test_norm_kinds_and_post_norm_architectures(models):
    assert {tl_compat.norm_kind(b.ln1) for b in models["MistralForCausalLM"].blocks} == {"rms"}
    for normalization, kind in (("RMSPre", "rmspre"), ("LN", "none"), (None, "none")):
        block = HookedTransformer(_config(normalization_type=normalization)).blocks[0]
        assert tl_compat.norm_kind(block.ln1) == kind, normalization
    assert not tl_compat.has_post_norm(_config())
    assert tl_compat.has_post_norm(_config(use_normalization_before_and_after=True))
    assert tl_compat.has_post_norm(_config(original_architecture="Olmo2ForCausalLM"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_optional_hooks_fire_only_under_their_flags(models, arch):
    """HOOK_FLAGS: each optional hook is silent with its flag off and fires under `hook_flags`
    (attn_in on grouped-query attention too, once keys and values are ungrouped)."""
    model = models[arch]
    for ending in tl_compat.HOOK_FLAGS:
        name = f"blocks.1.{ending}"
        fired = []
        point = model.hook_dict[name]  # HookPoint.add_hook: no flag check at adding time
        point.add_hook(lambda x, hook, fired=fired: fired.append(x.shape), dir="fwd")
        try:
            with tl_compat.flags_set(model, dict.fromkeys(tl_compat.HOOK_FLAGS.values(), False)):
                model(_tokens(pos=6))
            assert not fired, name
            with tl_compat.flags_set(model, tl_compat.hook_flags(name, per_query_head=True)):
                model(_tokens(pos=6))
        finally:
            point.remove_hooks()
        assert len(fired) == 1, name
        if ending.endswith(tl_compat.HEAD_AXIS_HOOKS):
            assert fired[0][2] == model.cfg.n_heads, name
