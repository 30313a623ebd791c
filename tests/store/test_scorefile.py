"""Score files: `EdgeScores` round-trip exactly (graph, method and loss included), bad scores
are refused, merges are byte-identical to direct writes in any process, and files written
before issue 13 (rl-circuits-scores/1) still load and rewrite to the same bytes."""

from __future__ import annotations

import json
import struct
import textwrap
from dataclasses import replace

import pytest
import torch
from store_support import CONFIG, make_scores, run_python

from rl_circuits.engine.scores import EdgeScores
from rl_circuits.errors import DataError
from rl_circuits.store.run import RunStore


def test_scores_round_trip_exactly(tmp_path):
    values = make_scores(3).values
    values[0, 0, 0] = -0.0
    values[1, 2, 3] = float("inf")
    values[2, 1, 1] = float("nan")
    loss = torch.tensor([0.5, 1 / 3, 7.25])
    scores = make_scores(
        3, values=values, ids=["q-é", "q/2", "q 3"], loss=loss, graph="paper", method="eap-ig"
    )
    with RunStore.open(tmp_path / "run", CONFIG) as store:
        path = store.write_scores("attribute/base.safetensors", scores)
        back = store.read_scores("attribute/base.safetensors")
    assert path.name == "base.safetensors"
    assert back.values.dtype == torch.float32 and back.edge_mask.dtype == torch.bool
    assert torch.equal(back.values.view(torch.int32), values.view(torch.int32))
    assert torch.equal(back.edge_mask, scores.edge_mask)
    assert back.ids == scores.ids
    assert back.upstream == scores.upstream and back.downstream == scores.downstream
    assert back.meta == scores.meta
    assert (back.graph, back.method) == ("paper", "eap-ig")
    assert torch.equal(back.loss, loss)


def test_scores_without_loss_graph_or_method_read_back_none(tmp_path):
    with RunStore.open(tmp_path / "run", CONFIG) as store:
        store.write_scores("s.safetensors", make_scores(2))
        back = store.read_scores("s.safetensors")
    assert back.loss is None and back.graph is None and back.method is None


def test_scores_are_validated(tmp_path):
    with RunStore.open(tmp_path / "run", CONFIG) as store:
        with pytest.raises(DataError, match="s.safetensors in run directory .*float32"):
            store.write_scores(
                "s.safetensors", make_scores(2, values=torch.zeros(2, 3, 4).double())
            )
        with pytest.raises(DataError, match="need ids"):
            store.write_scores("s.safetensors", make_scores(2, ids=None))
        with pytest.raises(DataError, match=r"meta keys \['graph'\] are fields"):
            store.write_scores("s.safetensors", make_scores(2, meta={"graph": "paper"}))
        with pytest.raises(DataError, match="meta cannot be stored as JSON"):
            store.write_scores("s.safetensors", make_scores(2, meta={"x": float("nan")}))
        store.write_text("not.safetensors", "garbage")
        with pytest.raises(DataError, match="not.safetensors"):
            store.read_scores("not.safetensors")
        assert not store.exists("s.safetensors")


def _v1_file(values: torch.Tensor, ids: list[str], meta: dict) -> bytes:
    """A score file byte for byte as the store wrote it before issue 13 (format
    rl-circuits-scores/1): safetensors with a compact, key-sorted JSON header padded with spaces
    to 8 bytes, float32 values then the bool edge mask, and graph, method and loss inside
    `meta`. Written here from the format, independently of the store's writer."""

    def compact(obj) -> str:
        return json.dumps(obj, separators=(",", ":"), sort_keys=True)

    upstream = ["hook_embed", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"]
    downstream = [
        "blocks.0.hook_mlp_in",
        "blocks.1.hook_q_input",
        "blocks.1.hook_mlp_in",
        "blocks.1.hook_resid_post",
    ]
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 0] = False
    value_bytes = values.numpy().astype("<f4").tobytes()
    mask_bytes = mask.numpy().tobytes()
    header = {
        "__metadata__": {
            "downstream": compact(downstream),
            "format": "rl-circuits-scores/1",
            "ids": compact(ids),
            "meta": compact(meta),
            "upstream": compact(upstream),
        },
        "edge_mask": {
            "data_offsets": [len(value_bytes), len(value_bytes) + len(mask_bytes)],
            "dtype": "BOOL",
            "shape": [3, 4],
        },
        "values": {"data_offsets": [0, len(value_bytes)], "dtype": "F32", "shape": [*values.shape]},
    }
    text = compact(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + value_bytes + mask_bytes


def test_files_from_before_the_shared_type_load_and_rewrite_identically(tmp_path):
    """A merged cell and a per-question file as the pre-issue-13 store wrote them."""
    values = ((torch.arange(24) * 2 - 15) / 16).reshape(2, 3, 4)
    loss = {"sevens-0": 1.5, "sevens-1": 2.25}
    cell_v1 = _v1_file(
        values,
        ["sevens-0", "sevens-1"],
        {"graph": "paper", "loss": loss, "method": "eap", "t_cut": 4},
    )
    question_v1 = _v1_file(  # a per-question file stored its loss as a bare number
        values[1:], ["sevens-1"], {"graph": "paper", "loss": 2.25, "method": "eap", "t_cut": 3}
    )
    run = tmp_path / "run"
    with RunStore.open(run, CONFIG) as store:
        (run / "cell-v1.safetensors").write_bytes(cell_v1)
        (run / "question-v1.safetensors").write_bytes(question_v1)
        cell = store.read_scores("cell-v1.safetensors")
        question = store.read_scores("question-v1.safetensors")
        assert cell.ids == ["sevens-0", "sevens-1"] and question.ids == ["sevens-1"]
        for scores in (cell, question):
            assert (scores.graph, scores.method) == ("paper", "eap")
            assert scores.values.shape == (len(scores.ids), 3, 4)
        assert cell.loss.tolist() == [1.5, 2.25] and cell.meta == {"t_cut": 4}
        assert question.loss.tolist() == [2.25] and question.meta == {"t_cut": 3}
        assert torch.equal(cell.values, values) and torch.equal(question.values[0], values[1])
        rewritten = store.write_scores("again.safetensors", cell).read_bytes()
    assert rewritten == cell_v1


MERGE_CHILD = textwrap.dedent(
    """
    import sys
    from rl_circuits.store.run import RunStore
    with RunStore.open(sys.argv[1], {}) as store:
        store.merge_scores(sys.argv[3:], sys.argv[2], ["q2-0", "q0-0", "q1-0"])
    """
)


def test_merge_stacks_in_order_and_is_byte_identical(tmp_path):
    mask = make_scores(1).edge_mask
    parts = {
        seed: make_scores(
            1, seed, edge_mask=mask, loss=torch.tensor([seed + 0.5]), graph="g", method="eap"
        )
        for seed in range(3)
    }
    order = ["q2-0", "q0-0", "q1-0"]
    names = [f"per_question/{seed}.safetensors" for seed in range(3)]
    with RunStore.open(tmp_path / "run", {}) as store:
        for name, part in zip(names, parts.values(), strict=True):
            store.write_scores(name, part)
        first = store.merge_scores(names, "merged.safetensors", order).read_bytes()
        second = store.merge_scores(names[::-1], "again.safetensors", order).read_bytes()
        merged = store.read_scores("merged.safetensors")
        # merging equals writing the stacked scores directly
        stacked = replace(
            parts[0],
            values=torch.cat([parts[i].values for i in (2, 0, 1)]),
            loss=torch.tensor([2.5, 0.5, 1.5]),
            ids=order,
        )
        direct = store.write_scores("direct.safetensors", stacked).read_bytes()
    assert first == second == direct
    assert merged.ids == order and merged.loss.tolist() == [2.5, 0.5, 1.5]
    assert (merged.graph, merged.method) == ("g", "eap")
    assert torch.equal(merged.values[0], parts[2].values[0])
    assert torch.equal(merged.values[2], parts[1].values[0])
    # another process (other hash seeds, fresh safetensors state) writes the same bytes
    child = run_python(MERGE_CHILD, str(tmp_path / "run"), "child.safetensors", *names)
    assert child.returncode == 0, child.stderr
    assert (tmp_path / "run" / "child.safetensors").read_bytes() == first


def test_merge_refuses_inconsistent_inputs(tmp_path):
    with RunStore.open(tmp_path / "run", {}) as store:
        a = make_scores(1, seed=0)
        b = make_scores(1, seed=1, edge_mask=a.edge_mask, meta={"metric": "other"})
        store.write_scores("a.safetensors", a)
        store.write_scores("b.safetensors", b)
        with pytest.raises(DataError, match="meta differs"):
            store.merge_scores(["a.safetensors", "b.safetensors"], "m.safetensors", ["q0-0"])
        with pytest.raises(DataError, match="not in the order"):
            store.merge_scores(
                ["a.safetensors", "b.safetensors"], "m.safetensors", ["q0-0"], meta={}
            )
        with pytest.raises(DataError, match="more than once"):
            store.merge_scores(["a.safetensors"], "m.safetensors", ["q0-0", "q0-0"])
        with pytest.raises(DataError, match="have no scores"):
            store.merge_scores(["a.safetensors"], "m.safetensors", ["q0-0", "zzz"])
        store.merge_scores(
            ["a.safetensors", "b.safetensors"], "m.safetensors", ["q1-0", "q0-0"], meta={"x": 1}
        )
        merged = store.read_scores("m.safetensors")
        assert merged.meta == {"x": 1} and merged.loss is None  # the inputs recorded none
        store.write_scores("c.safetensors", replace(b, upstream=("x", "y", "z")))
        with pytest.raises(DataError, match="node names"):
            store.merge_scores(["a.safetensors", "c.safetensors"], "n.safetensors", ["q0-0"])
        store.write_scores("d.safetensors", replace(b, method="exact"))
        with pytest.raises(DataError, match="graph/method"):
            store.merge_scores(
                ["a.safetensors", "d.safetensors"], "n.safetensors", ["q0-0", "q1-0"], meta={}
            )
        with pytest.raises(DataError, match="in both"):
            store.merge_scores(["a.safetensors", "a.safetensors"], "n.safetensors", ["q0-0"])
        assert not store.exists("n.safetensors")


def test_attribute_output_is_what_the_store_writes(tiny_checkpoints, tmp_path):
    """`attribute()`'s scores go to disk as they are once given ids, and come back equal."""
    from rl_circuits.engine.attribution import attribute
    from rl_circuits.models.loading import load_model

    model = load_model(tiny_checkpoints["LlamaForCausalLM"], device="cpu")
    tokens = torch.arange(1, 9).reshape(2, 4) % model.cfg.d_vocab
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, -2:] = True
    scores = attribute(model, tokens, mask)
    assert isinstance(scores, EdgeScores)
    with RunStore.open(tmp_path / "run", {}) as store:
        store.write_scores("s.safetensors", replace(scores, ids=["a", "b"], meta={"t_cut": 2}))
        back = store.read_scores("s.safetensors")
    assert torch.equal(back.values, scores.values) and torch.equal(back.loss, scores.loss)
    assert (back.graph, back.method, back.ids) == (scores.graph, scores.method, ["a", "b"])
