"""The weights stage on the tiny run: its table, the reader, the join with edges, the report."""

import json
import shutil

import numpy as np
import pytest
from config_support import write_config

from rl_circuits.cli.main import main
from rl_circuits.errors import RLCircuitsError
from rl_circuits.store.layout import RunLayout


def test_weights_stage_table_equals_weight_diff_and_reaches_the_report(tiny_run):
    from rl_circuits import load_run, weight_diff

    base, _ = tiny_run
    run = load_run(base / "run")
    table = run.weights("tiny")
    direct = weight_diff(base / "models" / "before", base / "models" / "after", graph="paper")
    assert table.equals(direct) and table.attrs["model"] == direct.attrs["model"]
    both = run.weights()
    assert both.index.names == ["pair", "node"] and set(both.attrs["model"]) == {"tiny"}
    html = (base / "run" / RunLayout.REPORT_HTML).read_text()
    for name in (
        "Parameters changed per node: tiny",
        "Weight change vs edge change: tiny, sevens, alpha=1",
        "Parameters changed, whole model",
    ):
        assert name in html


def test_weight_edges_joins_each_graph_node_to_its_outgoing_edge_change(tiny_run):
    from rl_circuits import load_run

    base, _ = tiny_run
    run = load_run(base / "run")
    joined, stats = run.weight_edges("tiny", "sevens", 1.0)
    before, after = (run.scores("tiny", role, "sevens", 1.0) for role in ("before", "after"))
    assert list(joined.index) == list(before.upstream)  # norms and unembed own no edges
    mass = [
        np.where(s.edge_mask.numpy(), s.values.abs().mean(0).numpy(), 0).sum(1)
        for s in (before, after)
    ]
    assert joined["edge_change"].to_numpy() == pytest.approx(mass[1] / mass[0] - 1)
    rho, p = stats["edge_change"]
    assert -1 <= rho <= 1 and 0 < p <= 1
    assert "diff_mass" not in joined and set(stats) == {"edge_change"}
    # Where a diff stage wrote after-into-before scores, their per-node mass is joined too.
    target = base / "run" / RunLayout.diff_scores("tiny", "after_into_before", "sevens", 1.0)
    target.parent.mkdir(parents=True)
    src = base / "run" / RunLayout.scores("tiny", "after", "sevens", 1.0)
    shutil.copy(src, target)
    try:
        joined, stats = load_run(base / "run").weight_edges("tiny", "sevens", 1.0)
    finally:
        shutil.rmtree(base / "run" / "diff")
    assert joined["diff_mass"].to_numpy() == pytest.approx(mass[1])
    assert set(stats) == {"edge_change", "diff_mass"}


def test_weights_stage_resumes_and_can_be_disabled(tiny_run, tmp_path):
    from rl_circuits import load_run

    base, config = tiny_run
    run_dir = tmp_path / "run"
    shutil.copytree(base / "run", run_dir)
    table = run_dir / RunLayout.weights("tiny")
    record = json.loads(table.read_text())
    record["model"]["marker"] = "kept"
    table.write_text(json.dumps(record))
    assert (
        main(["weights", str(config), "--run-dir", str(run_dir)]) == 0
    )  # a finished pair is not recomputed
    assert load_run(run_dir).weights("tiny").attrs["model"]["marker"] == "kept"
    off = write_config(tmp_path / "off.toml", {"weights": {"enabled": False}}, base=config)
    assert main(["run", str(off), "--run-dir", str(run_dir), "--force"]) == 0
    run = load_run(run_dir)
    with pytest.raises(RLCircuitsError, match=r"no weights tables.*enabled = true"):
        run.weights()
    assert not any(name.startswith("Parameters changed") for name in run.figures())


def test_a_pair_of_two_architectures_gets_its_reason_and_the_stage_goes_on(
    tiny_run, tiny_checkpoints, tmp_path
):
    from rl_circuits import load_run

    _, config = tiny_run
    pairs = {
        "tiny": {
            "before": str(tiny_checkpoints["Qwen2ForCausalLM"]),
            "after": str(tiny_checkpoints["LlamaForCausalLM"]),
        }
    }
    config = write_config(tmp_path / "c.toml", base=config, pairs=pairs)
    run_dir = tmp_path / "run"
    assert main(["weights", str(config), "--run-dir", str(run_dir)]) == 0  # needs no other stage
    record = json.loads((run_dir / RunLayout.weights("tiny")).read_text())
    assert "is a Qwen2ForCausalLM but" in record["skipped"]
    run = load_run(run_dir)
    with pytest.raises(RLCircuitsError, match="no weights table for tiny: .* is a Qwen2"):
        run.weights("tiny")
    with pytest.raises(RLCircuitsError, match="no weights tables yet"):
        run.weights()
