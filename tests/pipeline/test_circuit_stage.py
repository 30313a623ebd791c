"""The circuits stage through the CLI on the tiny run: files, identities, Table 1, report."""

import json
import math

import pytest
from config_support import write_config, write_unchecked_config

from rl_circuits.cli.main import main


@pytest.mark.parametrize(
    ("select", "rank_by"),
    [
        ({}, "mean"),
        # The authors' rules keep answers shorter than T_cut, their loss over what they have.
        ({"reference": "mean", "rules": "authors-code"}, "sample"),
    ],
)
def test_circuits_stage_runs_resumes_and_reaches_table1_and_report(
    tiny_run, tmp_path, select, rank_by
):
    from rl_circuits import load_run

    base, config = tiny_run
    run_dir = tmp_path / "run"
    overrides = {
        "run": {"run_dir": str(run_dir)},
        "select": select,
        "circuits": {"enabled": True, "points": 6, "batch_size": 3, "rank_by": rank_by},
    }
    config = write_config(tmp_path / "circuits.toml", overrides, base=config)
    assert main(["run", str(config)]) == 0
    run = load_run(run_dir)
    curves = run.circuit_curves()
    vocab = json.loads((base / "models" / "before" / "config.json").read_text())["vocab_size"]
    for role in ("before", "after"):
        for alpha in (0.3, 1.0):
            cell = run.circuits("tiny", role, "sevens", alpha)
            scores = run.scores("tiny", role, "sevens", alpha)
            assert cell["ids"] == list(scores.ids) and len(cell["ids"]) >= 2
            ks = cell["ks"]
            assert ks[0] == 1 and ks[-1] == int(scores.edge_mask.sum()) and len(ks) <= 6
            assert len(cell["losses"]) == len(ks)
            assert all(len(row) == len(cell["ids"]) for row in cell["losses"])
            # The all-edge circuit is the clean model: the loss the attribute stage measured.
            for clean, loss in zip(cell["clean"], scores.loss.tolist(), strict=True):
                assert math.isclose(clean, loss, rel_tol=1e-5)
            if select and role == "before":  # 22-token answers, T_cut(1.0) = 30
                lengths = {
                    g["id"]: len(g["answer_ids"]) for g in run.generations("tiny", role, "sevens")
                }
                short = [q for q in cell["ids"] if lengths[q] < scores.meta["t_cut"]]
                assert short or alpha < 1.0
            # No edge: zero final residual, uniform next-token distribution.
            assert all(math.isclose(n, math.log(vocab), rel_tol=1e-6) for n in cell["none"])
    key = "tiny|sevens|1"
    assert set(curves) == {"tiny|sevens|0.3", key}
    assert len(curves[key]["overlap"]) == len(curves[key]["ks"])
    assert curves[key]["overlap"][-1] == 1.0  # all edges: the same circuit
    assert curves[key]["before"][-1] == 1.0 and curves[key]["after"][-1] == 1.0
    table = run.table1().to_markdown()
    assert "Circuit size (f≥0.8)" in table and "Circuit size (f≥0.9)" in table
    rows = [r for r in run.comparisons().to_dict("records") if r["metric"] == "circuit_size_80"]
    assert len(rows) == 2 and all(r["n"] >= 2 for r in rows)
    report = (run_dir / "report" / "report.html").read_text()
    assert "Faithfulness of the top-k edges (tiny, sevens, alpha=1" in report
    # Resumable: a second run changes nothing.
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "circuits").rglob("*.json")}
    assert main(["run", str(config)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "circuits").rglob("*.json")} == stamps


def test_circuits_config_is_validated(tiny_run, tmp_path, capsys):
    _, config = tiny_run
    for extra, message in (
        ({"thresholds": [0.8, 1.5]}, "circuits.thresholds = [0.8, 1.5] is out of range"),
        (
            {"alphas": [0.5]},
            "circuits.alphas = [0.5] is out of range: each entry must be a number "
            "among select.alphas",
        ),
        ({"ablation": "resample"}, "circuits.ablation = 'resample' is out of range"),
    ):
        edits = {"circuits": {"enabled": True, **extra}}
        bad = write_unchecked_config(tmp_path / "bad.toml", edits, base=config)
        assert main(["circuits", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
        assert message in capsys.readouterr().err


def test_methods_are_ranked_per_cell_into_the_method_table_and_report(tiny_run, tmp_path):
    """`[circuits] methods`: one ranking file per cell, `load_run().methods()`, the method table
    (analysis/methods.md) and its section of the report."""
    from rl_circuits import load_run

    base, config = tiny_run
    run_dir = tmp_path / "run"
    overrides = {
        "run": {"run_dir": str(run_dir)},
        "circuits": {
            "enabled": True,
            "points": 3,
            "alphas": [1.0],
            "methods": ["eap", "relp"],
            "n_exact": 12,
        },
    }
    config = write_config(tmp_path / "methods.toml", overrides, base=config)
    assert main(["run", str(config)]) == 0
    run = load_run(run_dir)
    table = run.methods()
    assert len(table) == 2 * 2  # roles x methods
    assert list(table["method"].unique()) == ["eap", "relp"]
    n_layers = run.scores("tiny", "before", "sevens", 1.0).upstream.__len__() // 2
    for row in table.itertuples():
        assert row.cpr_low <= row.cpr <= row.cpr_high and row.cmd_low <= row.cmd <= row.cmd_high
        assert -1 <= row.spearman <= 1 and row.n_exact == 12 and row.seconds > 0
        assert row.unscored == (2 * n_layers if row.method == "relp" else 0)
        cell = json.loads(
            (run_dir / "methods" / "tiny" / row.role / "sevens" / "alpha-1.json").read_text()
        )
        assert cell["ids"] == run.circuits("tiny", row.role, "sevens", 1.0)["ids"]
        (curve,) = [r for r in cell["rows"] if r["method"] == row.method]
        assert math.isclose(curve["f"][-1], 1.0, abs_tol=1e-5)  # all edges: the clean model
    text = (run_dir / "analysis" / "methods.md").read_text()
    assert "| method | tiny/before, sevens, alpha=1 | tiny/after, sevens, alpha=1 |" in text
    assert "Seconds of attribution per question: eap" in text
    html = (run_dir / "report" / "report.html").read_text()
    assert "Attribution methods ranked by faithfulness" in html


def test_ranked_methods_are_validated(tiny_run, tmp_path, capsys):
    _, config = tiny_run
    for methods in (["clean-corrupted"], ["eap", "eap"]):
        edits = {"circuits": {"enabled": True, "methods": methods}}
        bad = write_unchecked_config(tmp_path / "bad.toml", edits, base=config)
        assert main(["circuits", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
        assert f"circuits.methods = {methods!r} is out of range" in capsys.readouterr().err


def test_a_cell_of_one_question_gets_no_method_rows(tiny_run):
    """Intervals over questions need two: the cell's file says why it has no rows."""
    from types import SimpleNamespace

    from rl_circuits.config import load_config
    from rl_circuits.pipeline.circuits import _cell_methods

    _, config = tiny_run
    cfg = load_config(config)
    out = _cell_methods(None, SimpleNamespace(ids=["q1"]), [("q1", [5, 6, 7], 1)], cfg, "x", False)
    assert out == {"ids": ["q1"], "rows": [], "why": "1 question(s)"}
