"""`load_run` on unusual requests (issue 22): alphas as strings or rounded sums, and a run whose
later stages have not run yet, which names the stage to run instead of a bare missing file."""

import shutil

import pytest
from checker import unchecked

from rl_circuits import load_run, table1
from rl_circuits.errors import RLCircuitsError


def test_alpha_as_text_or_float_sum_reads_the_same_scores(tiny_run):
    base, _ = tiny_run
    run = load_run(base / "run")
    pair, dataset = next(iter(run.config.pairs)), run.config.run.datasets[0]
    assert 1.0 in run.config.alphas and 0.3 in run.config.alphas
    ones = run.scores(pair, "after", dataset, 1.0)
    for alpha in ("1", 1, "1.0"):
        assert run.scores(pair, "after", dataset, alpha).ids == ones.ids
    assert 0.1 * 3 != 0.3
    thirds = run.scores(pair, "after", dataset, 0.1 * 3)
    assert thirds.ids == run.scores(pair, "after", dataset, 0.3).ids
    for bad in ("one", 0.35, None):  # None: not an `Alpha`, refused with the same message
        with (
            pytest.raises(RLCircuitsError, match=rf"alpha {bad!r} is not in run .*; it has "),
            unchecked(),
        ):
            run.scores(pair, "after", dataset, bad)


def test_a_half_finished_run_names_the_stage_to_run(tiny_run, tmp_path):
    base, _ = tiny_run
    half = tmp_path / "half"
    shutil.copytree(base / "run", half)
    for folder in ("select", "attribute", "circuits", "analysis", "report"):
        shutil.rmtree(half / folder, ignore_errors=True)
    for marker in (half / "stages").glob("*.json"):
        if marker.stem.split(".")[0] in ("select", "attribute", "circuits", "analyze", "report"):
            marker.unlink()
    run = load_run(half)
    pair, dataset = next(iter(run.config.pairs)), run.config.run.datasets[0]
    analyze = r"has no metric comparisons .* yet: run `rl-circuits analyze CONFIG`"
    for call in (run.table1, run.figures, run.comparisons, lambda: table1(half)):
        with pytest.raises(RLCircuitsError, match=analyze):
            call()
    with pytest.raises(RLCircuitsError, match=r"no selection for .* yet: run `rl-circuits select"):
        run.selection(pair, dataset)
    with pytest.raises(RLCircuitsError, match=r"run `rl-circuits attribute CONFIG`"):
        run.scores(pair, "before", dataset, 1.0)
    with pytest.raises(RLCircuitsError, match=r"run `rl-circuits circuits CONFIG`"):
        run.circuits(pair, "before", dataset, 1.0)
    with pytest.raises(RLCircuitsError, match=r"faithfulness curves .* `rl-circuits analyze"):
        run.circuit_curves()
    with pytest.raises(RLCircuitsError, match=r"dataset 'nope' is not in run"):
        run.selection(pair, "nope")
    assert len(run.generations(pair, "before", dataset)) > 0  # what did run still reads
