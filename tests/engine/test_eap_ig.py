"""EAP-IG graph files: a file laid out by EAP-IG's own rules (restated below from hannamw/EAP-IG
`Graph.from_model`, `to_json`, `to_pt`, `_forward_index`, `_backward_index`) reads into the
right edges and is written back identically; our scores round-trip through both formats."""

from __future__ import annotations

import json

import pytest
import torch

from rl_circuits.engine.attribution import attribute
from rl_circuits.engine.scores import EdgeScores
from rl_circuits.errors import DataError

N_LAYERS, N_HEADS, D_MODEL = 2, 3, 16


def _eap_ig_edges(n_layers: int, n_heads: int) -> list[str]:
    """EAP-IG's Graph.from_model (parallel_attn_mlp False): every edge name, in its order."""
    edges, stream = [], ["input"]
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        edges += [f"{p}->{a}<{x}>" for p in stream for a in heads for x in "qkv"]
        stream += heads
        edges += [f"{p}->m{layer}" for p in stream]
        stream.append(f"m{layer}")
    return edges + [f"{p}->logits" for p in stream]


def _forward_index(name: str, n_heads: int) -> int:  # EAP-IG Graph._forward_index
    if name == "input":
        return 0
    if name[0] == "m":
        return 1 + int(name[1:]) * (n_heads + 1) + n_heads
    layer, head = name.split(".")
    return 1 + int(layer[1:]) * (n_heads + 1) + int(head[1:])


def _backward_index(name: str, n_layers: int, n_heads: int) -> int:  # _backward_index
    if name == "logits":
        return n_layers * (3 * n_heads + 1)  # -1: the last
    if name[0] == "m":
        return int(name[1:]) * (3 * n_heads + 1) + 3 * n_heads
    node, qkv = name[:-3], name[-2]
    layer, head = node.split(".")
    return int(layer[1:]) * (3 * n_heads + 1) + "qkv".index(qkv) * n_heads + int(head[1:])


def _fixture_scores() -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    edges = _eap_ig_edges(N_LAYERS, N_HEADS)
    # float32 values, as EAP-IG's scores tensor holds them
    return dict(zip(edges, torch.randn(len(edges), generator=gen).tolist(), strict=True))


def _write_eap_ig_json(path, scores: dict[str, float]) -> dict:
    cfg = {"n_layers": N_LAYERS, "n_heads": N_HEADS, "parallel_attn_mlp": False, "d_model": D_MODEL}
    nodes = ["input"]
    for layer in range(N_LAYERS):
        nodes += [f"a{layer}.h{h}" for h in range(N_HEADS)] + [f"m{layer}"]
    nodes.append("logits")
    data = {
        "cfg": cfg,
        "nodes": {n: {"in_graph": True} for n in nodes},
        "edges": {e: {"score": s, "in_graph": True} for e, s in scores.items()},
    }
    path.write_text(json.dumps(data))
    return data


def _write_eap_ig_pt(path, scores: dict[str, float]) -> dict:
    n_forward = 1 + N_LAYERS * (N_HEADS + 1)
    n_backward = N_LAYERS * (3 * N_HEADS + 1) + 1
    matrix = torch.zeros(n_forward, n_backward)
    real = torch.zeros(n_forward, n_backward, dtype=torch.bool)
    for edge, score in scores.items():
        parent, child = edge.split("->")
        index = (_forward_index(parent, N_HEADS), _backward_index(child, N_LAYERS, N_HEADS))
        matrix[index], real[index] = score, True
    src = ["input"]
    dst = []
    for layer in range(N_LAYERS):
        src += [f"a{layer}.h{h}" for h in range(N_HEADS)] + [f"m{layer}"]
        dst += [f"a{layer}.h{h}<{x}>" for x in "qkv" for h in range(N_HEADS)] + [f"m{layer}"]
    cfg = {"n_layers": N_LAYERS, "n_heads": N_HEADS, "parallel_attn_mlp": False, "d_model": D_MODEL}
    data = {
        "cfg": cfg,
        "src_nodes": src,
        "dst_nodes": [*dst, "logits"],
        "edges_scores": matrix,
        "edges_in_graph": real,
        "nodes_in_graph": torch.ones(n_forward, dtype=torch.bool),
    }
    torch.save(data, path)
    return data


# EAP-IG edge name -> (our upstream node, our downstream node) on the heads graph
NAMED_EDGES = {
    "input->a0.h2<v>": ("hook_embed", "blocks.0.hook_v_input[2]"),
    "a0.h1->a1.h2<k>": ("blocks.0.attn.hook_result[1]", "blocks.1.hook_k_input[2]"),
    "a1.h0->m1": ("blocks.1.attn.hook_result[0]", "blocks.1.hook_mlp_in"),
    "m0->a1.h1<q>": ("blocks.0.hook_mlp_out", "blocks.1.hook_q_input[1]"),
    "m1->logits": ("blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"),
}


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_a_file_in_eap_igs_format_reads_and_writes_back(tmp_path, suffix):
    fixture = _fixture_scores()
    path = tmp_path / f"eap{suffix}"
    written = (_write_eap_ig_json if suffix == ".json" else _write_eap_ig_pt)(path, fixture)
    scores = EdgeScores.from_eap_ig(path)
    assert scores.graph == "heads" and scores.values.shape[0] == 1
    assert int(scores.edge_mask.sum()) == len(fixture)
    for edge, (up, down) in NAMED_EDGES.items():
        value = scores.values[0, scores.index(up), scores.index(down)]
        assert float(value) == pytest.approx(fixture[edge], abs=0, rel=1e-7), edge
    mean_of_fixture = sum(fixture.values()) / len(fixture)
    assert float(scores.values.double().sum()) / len(fixture) == pytest.approx(mean_of_fixture)

    again = tmp_path / f"again{suffix}"
    scores.to_eap_ig(again)  # d_model from the file's cfg, kept in meta
    if suffix == ".json":
        assert json.loads(again.read_text()) == written
    else:
        back = torch.load(again, weights_only=True)
        assert back.keys() == written.keys()
        for key, value in written.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(back[key], value), key
            else:
                assert back[key] == value, key


@pytest.mark.parametrize("graph", ["heads", "paper"])
def test_attributed_scores_round_trip(models64, tmp_path, graph):
    model = models64["Qwen2ForCausalLM"]
    tokens = torch.randint(4, 90, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    scores = attribute(model, tokens, mask, graph=graph, method="eap")
    mean = scores.values.double().mean(0).float()
    for suffix in (".json", ".pt"):
        path = tmp_path / f"{graph}{suffix}"
        scores.to_eap_ig(path, d_model=model.cfg.d_model)
        back = EdgeScores.from_eap_ig(path)
        assert back.graph == graph
        assert back.upstream == scores.upstream and back.downstream == scores.downstream
        assert torch.equal(back.edge_mask, scores.edge_mask)
        torch.testing.assert_close(back.values[0], mean, rtol=0, atol=0)
        scores.to_eap_ig(path, sample=1, d_model=model.cfg.d_model)
        torch.testing.assert_close(EdgeScores.from_eap_ig(path).values[0], scores.values[1])
    cfg = json.loads((tmp_path / f"{graph}.json").read_text())["cfg"]
    assert cfg["n_heads"] == (model.cfg.n_heads if graph == "heads" else 1)


def test_graphs_eap_ig_lacks_and_bad_files_are_refused(models64, tmp_path):
    model = models64["LlamaForCausalLM"]
    tokens = torch.randint(4, 90, (1, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    block = attribute(model, tokens, mask, graph="block", method="eap")
    with pytest.raises(ValueError, match="heads and paper graphs"):
        block.to_eap_ig(tmp_path / "block.json", d_model=model.cfg.d_model)
    heads = attribute(model, tokens, mask, graph="heads", method="eap")
    with pytest.raises(ValueError, match="d_model=model.cfg.d_model"):
        heads.to_eap_ig(tmp_path / "heads.json")
    with pytest.raises(ValueError, match=".json or .pt"):
        heads.to_eap_ig(tmp_path / "heads.txt", d_model=model.cfg.d_model)
    data = _write_eap_ig_json(tmp_path / "eap.json", _fixture_scores())
    del data["edges"]["a0.h1->a1.h2<k>"]
    (tmp_path / "eap.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="a0.h1->a1.h2<k>"):
        EdgeScores.from_eap_ig(tmp_path / "eap.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="Graph.to_json"):
        EdgeScores.from_eap_ig(tmp_path / "bad.json")


def test_a_failed_write_leaves_the_existing_file_whole(tmp_path, monkeypatch):
    _write_eap_ig_pt(tmp_path / "eap.pt", _fixture_scores())
    scores = EdgeScores.from_eap_ig(tmp_path / "eap.pt")
    target = tmp_path / "kept.pt"
    scores.to_eap_ig(target)
    before = target.read_bytes()

    def disk_full(obj, path):
        path.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        scores.to_eap_ig(target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eap.pt", "kept.pt"]
