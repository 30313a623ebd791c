"""weight_diff: which node owns each changed parameter, and how much changed."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rl_circuits.errors import CheckpointError, ConfigError
from rl_circuits.models.tiny import ARCHITECTURES, make_tiny_checkpoint
from rl_circuits.models.weight_diff import COLUMNS, effective_rank, weight_diff

D_HEAD = 8  # tiny_config: hidden 32, 4 query heads, 2 key-value heads


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint `src` at `dst` with `edit(name, tensor) -> tensor` applied to every
    tensor of every weight file."""
    shutil.copytree(src, dst)
    for file in dst.glob("*.safetensors"):
        tensors = load_file(file)
        save_file({n: edit(n, t.clone()) for n, t in tensors.items()}, file, {"format": "pt"})
    return dst


def _changed_rows(frame) -> list[str]:
    return list(frame.index[frame["n_changed"] > 0])


@pytest.mark.parametrize("graph", ["paper", "heads"])
def test_identical_pair_changes_nothing(tiny_checkpoint, graph):
    frame = weight_diff(tiny_checkpoint, tiny_checkpoint, graph=graph)
    assert list(frame.columns) == list(COLUMNS)
    assert (frame[["n_changed", "fraction_changed", "rel_norm", "effective_rank"]] == 0).all().all()
    assert frame.attrs["model"]["fraction_changed"] == 0
    if graph == "paper":  # every parameter in one row
        assert frame.attrs["model"]["n_params"] == frame["n_params"].sum()


def test_one_heads_output_rows_are_its_change_alone(tiny_checkpoints, tmp_path):
    def edit(name, t):
        if name == "model.layers.1.self_attn.o_proj.weight":
            t[:, 3 * D_HEAD : 4 * D_HEAD] += 0.01  # head 3's columns of layer 1's o_proj
        return t

    for arch in ARCHITECTURES:
        before = tiny_checkpoints[arch]

        after = _rewrite(before, tmp_path / arch, edit)
        heads = weight_diff(before, after, graph="heads")
        assert _changed_rows(heads) == ["blocks.1.attn.hook_result[3]"], arch
        row = heads.loc["blocks.1.attn.hook_result[3]"]
        assert row["n_changed"] == 32 * D_HEAD
        assert row["effective_rank"] == pytest.approx(1.0, abs=1e-4)  # a shift: rank 1 + rounding
        paper = weight_diff(before, after, graph="paper")
        assert _changed_rows(paper) == ["blocks.1.hook_attn_out"], arch
        assert paper.attrs["model"]["n_changed"] == 32 * D_HEAD


def test_a_key_value_head_counts_in_each_query_head_that_reads_it(tiny_checkpoints, tmp_path):
    before = tiny_checkpoints["LlamaForCausalLM"]

    def edit(name, t):
        if name == "model.layers.0.self_attn.k_proj.weight":
            t[D_HEAD : 2 * D_HEAD] *= 1.5  # key-value head 1: query heads 2 and 3
        return t

    after = _rewrite(before, tmp_path / "after", edit)
    heads = weight_diff(before, after, graph="heads", dtype="float32")
    assert _changed_rows(heads) == ["blocks.0.attn.hook_result[2]", "blocks.0.attn.hook_result[3]"]
    # each query head owns its own q and o blocks and its key-value head's k and v blocks
    assert heads.loc["blocks.0.attn.hook_result[2]", "n_params"] == 4 * 32 * D_HEAD
    assert heads.attrs["model"]["n_changed"] == 32 * D_HEAD  # counted once in the model


def test_one_mlp_is_its_change_alone_with_tied_embeddings(tmp_path):
    for arch in ARCHITECTURES:
        before = make_tiny_checkpoint(tmp_path / f"{arch}-b", arch, tie_word_embeddings=True)
        assert "lm_head.weight" not in load_file(before / "model.safetensors")

        def edit(name, t):
            if name == "model.layers.0.mlp.down_proj.weight":
                t += 0.05 * torch.outer(torch.ones(t.shape[0]), torch.linspace(-1, 1, t.shape[1]))
            return t

        after = _rewrite(before, tmp_path / f"{arch}-a", edit)
        for graph in ("paper", "heads"):
            frame = weight_diff(before, after, graph=graph)
            assert "unembed" not in frame.index  # the embedding owns the shared matrix
            assert _changed_rows(frame) == ["blocks.0.hook_mlp_out"], (arch, graph)
            assert frame.loc["blocks.0.hook_mlp_out", "effective_rank"] == pytest.approx(
                1.0, abs=1e-4
            )
        assert frame.attrs["model"]["n_params"] == sum(
            t.numel() for t in load_file(before / "model.safetensors").values()
        )


def _numpy_reference(before: Path, after: Path, dtype: torch.dtype, tol: float):
    """Per HF tensor name, (changed, ||a - b||^2, ||a||^2) from the whole state dicts."""
    a = {n: t for f in sorted(before.glob("*.safetensors")) for n, t in load_file(f).items()}
    b = {n: t for f in sorted(after.glob("*.safetensors")) for n, t in load_file(f).items()}
    out = {}
    for name in a:
        x = a[name].to(dtype).double().numpy()
        y = b[name].to(dtype).double().numpy()
        x_saved, y_saved = a[name].double().numpy(), b[name].double().numpy()
        out[name] = (
            int(np.sum(np.abs(x - y) > tol)),
            float(np.sum((x_saved - y_saved) ** 2)),
            float(np.sum(x_saved**2)),
            x.size,
        )
    return out


_PAPER_NODE = [
    (r"model\.embed_tokens\.", "hook_embed"),
    (r"model\.layers\.(\d+)\.input_layernorm\.", r"blocks.\1.ln1"),
    (r"model\.layers\.(\d+)\.self_attn\.", r"blocks.\1.hook_attn_out"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"blocks.\1.ln2"),
    (r"model\.layers\.(\d+)\.mlp\.", r"blocks.\1.hook_mlp_out"),
    (r"model\.norm\.", "ln_final"),
    (r"lm_head\.", "unembed"),
]


def _paper_node(name: str) -> str:
    for pattern, node in _PAPER_NODE:
        if re.match(pattern, name):
            return re.sub(pattern + ".*", node, name)
    raise AssertionError(name)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fractions_equal_numpy_over_the_state_dicts(tiny_checkpoints, tmp_path, arch):
    before = tiny_checkpoints[arch]
    gen = torch.Generator().manual_seed(0)

    def edit(name, t):
        # half the entries move by 10^U(-7, -3) relative: around the tolerance at every dtype
        move = torch.rand(t.shape, generator=gen) < 0.5
        scale = 10 ** (-7 + 4 * torch.rand(t.shape, generator=gen))
        return t + move * scale * t.abs().clamp_min(1e-3)

    after = _rewrite(before, tmp_path / "after", edit)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        reference = _numpy_reference(before, after, dtype, 1e-5)
        frame = weight_diff(before, after, dtype=dtype, tol=1e-5)
        nodes: dict[str, list] = {}
        for name, stats in reference.items():
            nodes.setdefault(_paper_node(name), []).append(stats)
        assert sorted(nodes) == sorted(frame.index)
        for node, stats in nodes.items():
            changed, sq_diff, sq_before, n = (sum(s[i] for s in stats) for i in range(4))
            assert frame.loc[node, "n_params"] == n
            assert frame.loc[node, "n_changed"] == changed, (node, dtype)
            assert frame.loc[node, "fraction_changed"] == changed / n
            assert frame.loc[node, "rel_norm"] == pytest.approx(np.sqrt(sq_diff / sq_before))
        total = sum(s[0] for s in reference.values()), sum(s[3] for s in reference.values())
        assert frame.attrs["model"]["n_changed"] == total[0]
        assert frame.attrs["model"]["fraction_changed"] == total[0] / total[1]
        assert 0 < total[0] < total[1]
    counts = [
        weight_diff(before, after, dtype=d)["n_changed"].sum() for d in ("float32", "bfloat16")
    ]
    assert counts[1] < counts[0]  # bfloat16 hides the smallest moves


def _saved(path: Path, arch: str, dtype: torch.dtype, **save) -> Path:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(make_tiny_checkpoint(path, arch))
    model.to(dtype).save_pretrained(path, safe_serialization=True, **save)
    return path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sharded_and_half_precision_checkpoints_give_the_unsharded_table(tmp_path, dtype):
    whole = _saved(tmp_path / "whole", "Qwen2ForCausalLM", dtype)
    sharded = _saved(tmp_path / "sharded", "Qwen2ForCausalLM", dtype, max_shard_size="20KB")
    sharded_files = sorted(sharded.glob("*.safetensors"))
    assert (sharded / "model.safetensors.index.json").is_file() and len(sharded_files) > 1
    for file in sharded.glob("model.safetensors"):
        file.unlink()  # left over from make_tiny_checkpoint
    after_whole = _rewrite(whole, tmp_path / "after-whole", lambda n, t: t * 1.01)
    after_sharded = _rewrite(sharded, tmp_path / "after-sharded", lambda n, t: t * 1.01)
    a = weight_diff(whole, after_whole, dtype="saved", graph="heads")
    b = weight_diff(sharded, after_sharded, dtype="saved", graph="heads")
    assert a.equals(b) and a.attrs == b.attrs
    assert a.attrs["model"]["dtype"] == "saved"
    assert (a["fraction_changed"] > 0.5).all()
    # x 1.01 rounded to the saved precision (1.01 -> 1.0078 in bfloat16)
    assert ((a["rel_norm"] > 0.007) & (a["rel_norm"] < 0.011)).all()


def test_different_models_get_one_clear_error(tmp_path, tiny_checkpoints):
    qwen = tiny_checkpoints["Qwen2ForCausalLM"]
    with pytest.raises(CheckpointError, match="is a Qwen2ForCausalLM but .* is a Llama"):
        weight_diff(qwen, tiny_checkpoints["LlamaForCausalLM"])
    wider = make_tiny_checkpoint(tmp_path / "wider", "Qwen2ForCausalLM", intermediate_size=96)
    with pytest.raises(CheckpointError, match="different shapes .*d_mlp 64 vs 96"):
        weight_diff(qwen, wider)
    tied = make_tiny_checkpoint(tmp_path / "tied", "Qwen2ForCausalLM", tie_word_embeddings=True)
    with pytest.raises(CheckpointError, match="'lm_head.weight' is only in .*tied embeddings"):
        weight_diff(qwen, tied)
    half = _rewrite(qwen, tmp_path / "half", lambda n, t: t.to(torch.bfloat16))
    with pytest.raises(ConfigError, match="saved as torch.float32 .* but torch.bfloat16"):
        weight_diff(qwen, half, dtype="saved")
    assert weight_diff(qwen, half, dtype="bfloat16")["n_changed"].sum() == 0
    with pytest.raises(ConfigError, match="graph 'nodes' is not known"):
        weight_diff(qwen, qwen, graph="nodes")
    pickled = tmp_path / "pickled"
    shutil.copytree(qwen, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="only pickle weights; weight_diff reads safetensors"):
        weight_diff(qwen, pickled)


def test_effective_rank_of_a_planted_rank_r_update_and_its_subsample(tiny_checkpoints, tmp_path):
    before = tiny_checkpoints["MistralForCausalLM"]
    gen = torch.Generator().manual_seed(1)
    # rank 3 with equal singular values: orthonormal factors
    left = torch.linalg.qr(torch.randn(64, 3, generator=gen))[0]
    right = torch.linalg.qr(torch.randn(32, 3, generator=gen))[0]

    def edit(name, t):
        if name == "model.layers.1.mlp.up_proj.weight":  # [d_mlp, d_model]
            t += 0.1 * left @ right.T
        return t

    after = _rewrite(before, tmp_path / "after", edit)
    exact = weight_diff(before, after, dtype="float32")
    assert exact.loc["blocks.1.hook_mlp_out", "effective_rank"] == pytest.approx(3.0, rel=1e-4)
    sampled = weight_diff(before, after, dtype="float32", rank_rows=40)  # 40 of 192 rows
    assert sampled.loc["blocks.1.hook_mlp_out", "effective_rank"] <= 3.0 + 1e-4
    assert sampled.loc["blocks.1.hook_mlp_out", "effective_rank"] > 2.0
    assert effective_rank(np.array([2.0, 2.0, 0.0])) == pytest.approx(2.0)
    assert effective_rank(np.zeros(4)) == 0.0
