"""The diff stage through the CLI on the tiny run: files, identities, resume, reader, Table 1,
report; and a pair of identical models, which has no gap."""

import json
import math

import numpy as np
import pytest
from config_support import write_config, write_unchecked_config

from rl_circuits.cli.main import main
from rl_circuits.models.pairs import DIRECTIONS, direction_roles
from rl_circuits.store.layout import RunLayout

ALPHAS = (0.3, 1.0)


def _diff_config(tmp_path, config, name="diff", **extra):
    run_dir = tmp_path / name
    diff = {"enabled": True, "points": 6, "batch_size": 3}  # two batches of the 4 questions
    overrides = {"run": {"run_dir": str(run_dir)}, "diff": diff}
    return write_config(tmp_path / f"{name}.toml", overrides, base=config, **extra), run_dir


@pytest.fixture(scope="module")
def diff_run(tiny_run, tmp_path_factory):
    _, config = tiny_run
    config, run_dir = _diff_config(tmp_path_factory.mktemp("diff"), config)
    assert main(["run", str(config)]) == 0
    return config, run_dir


def test_diff_stage_scores_each_question_and_measures_the_gap(diff_run):
    from rl_circuits import load_run

    _, run_dir = diff_run
    run = load_run(run_dir)
    for direction in DIRECTIONS:
        runs, reads = direction_roles(direction)
        for alpha in ALPHAS:
            cell = run.diff_losses("tiny", direction, "sevens", alpha)
            scores = run.diff_scores("tiny", direction, "sevens", alpha)
            # the questions and tokens the attribute stage scored for the model being read
            attributed = run.scores("tiny", reads, "sevens", alpha)
            assert cell["ids"] == list(scores.ids) == list(attributed.ids)
            assert len(cell["ids"]) >= 2 and scores.meta["direction"] == direction
            assert scores.method == "eap" and scores.graph == "paper"
            n_edges = int(scores.edge_mask.sum())
            ks = cell["ks"]
            assert ks[0] == 1 and ks[-1] == n_edges and len(ks) <= 6
            assert len(cell["losses"]) == len(ks)
            assert all(len(row) == len(cell["ids"]) for row in cell["losses"])
            assert cell["patched"] == cell["losses"][-1]
            # L_A(x): the read model's own loss on its answer, as the attribute stage measured
            for source, loss in zip(cell["source"], attributed.loss.tolist(), strict=True):
                assert math.isclose(source, loss, rel_tol=1e-5)
            # L_B(x): the running model's clean loss, as its cross-model attribution measured
            for clean, loss in zip(cell["clean"], scores.loss.tolist(), strict=True):
                assert math.isclose(clean, loss, rel_tol=1e-5)
            # the models differ: patching moves the loss
            assert not np.allclose(cell["patched"], cell["clean"], rtol=1e-3)
            assert scores.values.abs().max() > 0
    summaries = run.diff()
    assert set(summaries) == {f"tiny|{d}|sevens|{a:g}" for d in DIRECTIONS for a in ALPHAS}
    for key, summary in summaries.items():
        _, direction, _, alpha = key.split("|")
        cell = run.diff_losses("tiny", direction, "sevens", float(alpha))
        gap = np.mean(np.subtract(cell["clean"], cell["source"]))
        assert math.isclose(summary["gap"], gap, rel_tol=1e-9)
        assert math.isclose(summary["patched"], np.mean(cell["patched"]), rel_tol=1e-9)
        assert summary["n_edges"] == cell["ks"][-1] and set(summary["edges"]) == {"50", "80", "90"}
        for k, low, high, fraction in summary["edges"].values():
            if k is not None:
                assert k in cell["ks"] and math.isclose(fraction, k / summary["n_edges"])
                assert low <= k <= high
    # every file the stage wrote is a path of RunLayout
    named = {RunLayout.DIFF_CURVES, RunLayout.marker("diff")}
    for direction in DIRECTIONS:
        for alpha in ALPHAS:
            cell = ("tiny", direction, "sevens", alpha)
            named |= {RunLayout.diff_scores(*cell), RunLayout.diff_curve(*cell)}
            for qid in run.diff_losses(*cell)["ids"]:
                named.add(RunLayout.diff_question_scores(*cell, qid))
                named.add(RunLayout.diff_question_losses(*cell, qid))
    written = {
        p.relative_to(run_dir).as_posix() for p in (run_dir / "diff").rglob("*") if p.is_file()
    }
    assert written and written <= named
    assert (run_dir / RunLayout.DIFF_CURVES).is_file()
    top = run.diff_edges("tiny", "after_into_before", "sevens", 1.0, count=5)
    assert len(top) == 5 and top["mean |score|"].is_monotonic_decreasing


def test_diff_stage_numbers_are_the_engines_on_the_answer_it_reads(diff_run):
    """One question by hand: the before model on the after model's answer, patched from the
    after model; its scores, and its loss with the top edge carrying the after model's output."""
    import torch

    from rl_circuits import attribute, evaluate_circuit, load_model, load_run

    _, run_dir = diff_run
    run = load_run(run_dir)
    cell = run.diff_losses("tiny", "after_into_before", "sevens", 1.0)
    scores = run.diff_scores("tiny", "after_into_before", "sevens", 1.0)
    qid, t_cut = cell["ids"][0], scores.meta["t_cut"]
    gen = next(g for g in run.generations("tiny", "after", "sevens") if g["id"] == qid)
    answer = gen["answer_ids"][:t_cut]
    tokens = torch.tensor([gen["prompt_ids"] + answer])
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[0, -len(answer) :] = True
    before, after = (
        load_model(run.model_path("tiny", role), device="cpu", max_seq_len=tokens.shape[1])
        for role in ("before", "after")
    )
    mine = attribute(before, tokens, mask, ablation="patch", corrupted_model=after)
    assert torch.allclose(mine.values[0], scores.values[0], rtol=1e-4, atol=1e-6)
    magnitude = torch.where(scores.edge_mask, scores.values.double().abs().mean(0), -1.0)
    top = torch.zeros_like(scores.edge_mask)
    top.view(-1)[magnitude.view(-1).argmax()] = True
    patched = evaluate_circuit(before, tokens, mask, ~top, ablation="patch", corrupted_model=after)
    assert cell["ks"][0] == 1
    assert math.isclose(patched.item(), cell["losses"][0][0], rel_tol=1e-5)
    assert math.isclose(mine.loss.item(), cell["clean"][0], rel_tol=1e-5)


def test_diff_stage_reaches_table1_and_the_report(diff_run):
    from rl_circuits import load_run

    _, run_dir = diff_run
    run = load_run(run_dir)
    rows = [r for r in run.comparisons().to_dict("records") if r["metric"].startswith("gap_")]
    assert {r["metric"] for r in rows} == {f"gap_edges_80_{d}" for d in DIRECTIONS}
    assert len(rows) == 4 and all(r["n"] >= 2 for r in rows)
    table = run.table1().to_markdown()
    assert "Edges for 80% of the gap (after→before)" in table
    assert "Edges for 80% of the gap (before→after)" in table
    report = (run_dir / "report" / "report.html").read_text()
    assert "Edges that carry the change: tiny, after_into_before, sevens, alpha=1" in report
    assert "Share of the loss gap the top-k edges carry (tiny, sevens, alpha=1" in report
    assert "Mean cross-model patching score, after into before (tiny, sevens, alpha=1)" in report


def test_diff_stage_resumes_at_the_first_missing_question(diff_run):
    from rl_circuits import load_run

    config, run_dir = diff_run
    cell = ("tiny", "before_into_after", "sevens", 1.0)
    run = load_run(run_dir)
    before = run.diff_losses(*cell)
    first, second = before["ids"][:2]
    kept = run_dir / RunLayout.diff_question_losses(*cell, first)
    stamp = kept.stat().st_mtime_ns
    # a run killed after the first question's scores: later files and the merged ones gone
    for rel in (
        RunLayout.diff_curve(*cell),
        RunLayout.diff_scores(*cell),
        RunLayout.diff_question_losses(*cell, second),
        RunLayout.diff_question_scores(*cell, second),
    ):
        (run_dir / rel).unlink()
    assert main(["diff", str(config)]) == 0
    after = load_run(run_dir).diff_losses(*cell)
    assert kept.stat().st_mtime_ns == stamp  # done work is not redone
    assert after["ids"] == before["ids"] and after["ks"] == before["ks"]
    assert np.allclose(after["losses"], before["losses"], rtol=1e-6)
    assert np.allclose(after["source"], before["source"], rtol=1e-6)


def test_diff_settings_choose_the_graph_method_and_cells(tiny_run, tmp_path):
    from rl_circuits import load_run
    from rl_circuits.engine.graph import build_graph

    base, config = tiny_run
    settings = {
        "enabled": True,
        "points": 3,
        "graph": "heads",
        "method": "eap-ig-activations",
        "alphas": [1.0],
        "directions": ["before_into_after"],
    }
    config = write_config(
        tmp_path / "heads.toml",
        {"run": {"run_dir": str(tmp_path / "run")}, "diff": settings},
        base=config,
    )
    assert main(["run", str(config)]) == 0
    run = load_run(tmp_path / "run")
    assert list(run.diff()) == ["tiny|before_into_after|sevens|1"]
    scores = run.diff_scores("tiny", "before_into_after", "sevens", 1.0)
    assert (scores.graph, scores.method) == ("heads", "eap-ig-activations")
    shape = json.loads((base / "models" / "before" / "config.json").read_text())
    heads = build_graph("heads", shape["num_hidden_layers"], shape["num_attention_heads"])
    assert scores.upstream == tuple(heads.upstream)
    cell = run.diff_losses("tiny", "before_into_after", "sevens", 1.0)
    assert cell["ks"][-1] == int(heads.edge_mask.sum()) and len(cell["ks"]) <= 3
    assert not (
        tmp_path / "run" / RunLayout.diff("tiny", "after_into_before", "sevens", 1.0)
    ).exists()
    assert not (
        tmp_path / "run" / RunLayout.diff("tiny", "before_into_after", "sevens", 0.3)
    ).exists()


def test_identical_models_have_no_gap(tiny_run, tmp_path):
    from rl_circuits import load_run

    base, config = tiny_run
    same = str(base / "models" / "before")
    config, run_dir = _diff_config(
        tmp_path, config, pairs={"tiny": {"before": same, "after": same}}
    )
    assert main(["run", str(config)]) == 0
    run = load_run(run_dir)
    for direction in DIRECTIONS:
        cell = run.diff_losses("tiny", direction, "sevens", 1.0)
        scores = run.diff_scores("tiny", direction, "sevens", 1.0)
        assert len(cell["ids"]) >= 2
        assert scores.values.abs().max() == 0  # O'_u - O_u is exactly 0
        assert cell["source"] == cell["clean"]
        # float32 rounding of H_d - O_u + O'_u: measured <= 6e-9 nats on losses of ~3e-3
        assert np.allclose(cell["patched"], cell["clean"], rtol=0, atol=1e-7)
        summary = run.diff()[f"tiny|{direction}|sevens|1"]
        assert summary["gap"] == 0 and summary["curve"] == [None] * len(cell["ks"])
        assert all(edges[0] is None for edges in summary["edges"].values())


def test_diff_config_and_reader_refuse_clearly(diff_run, tiny_run, tmp_path, capsys):
    from rl_circuits import load_run
    from rl_circuits.errors import RLCircuitsError

    _, config = tiny_run
    bad = write_unchecked_config(
        tmp_path / "bad.toml", {"diff": {"enabled": True, "alphas": [0.5]}}, base=config
    )
    assert main(["diff", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
    assert "diff.alphas = [0.5] is out of range" in capsys.readouterr().err
    run = load_run(diff_run[1])
    with pytest.raises(RLCircuitsError, match="direction 'sideways' is not one of"):
        run.diff_scores("tiny", "sideways", "sevens", 1.0)
    with pytest.raises(RLCircuitsError, match="alpha 0.5 is not in run"):
        run.diff_losses("tiny", "after_into_before", "sevens", 0.5)
    with pytest.raises(RLCircuitsError, match=r"no diff results: set `\[diff\] enabled = true`"):
        load_run(tiny_run[0] / "run").diff()
