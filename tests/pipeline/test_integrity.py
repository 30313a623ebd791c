"""Results always match their config: a changed config or data file recomputes exactly the
affected stages and cells (with --force), or is refused naming them (issue 18, item A)."""

import json
import shutil
from pathlib import Path

import pytest
from config_support import merge, tiny_models_overrides, write_config

from rl_circuits.cli.main import main
from rl_circuits.pipeline.registry import SHARDED_STAGES, STAGE_NAMES, STAGES


def _copy(tiny_run, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tiny run (run directory, data) and its config pointed at the copy."""
    base, config = tiny_run
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    data = tmp_path / "data"
    shutil.copytree(base / "models" / "data", data)
    moved = {"run": {"run_dir": str(run), "data_dir": str(data)}}
    return run, write_config(tmp_path / "c.toml", moved, base=config)


def _moved(tiny_run, tmp_path, capsys) -> tuple[Path, Path]:
    """The copy, after running it once where it now is (moved run and data: nothing reruns)."""
    run, config = _copy(tiny_run, tmp_path)
    assert main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[: len(STAGE_NAMES)] == [f"{s}: done" for s in STAGE_NAMES]
    return run, config


def test_moving_a_run_and_its_data_needs_no_force_and_recomputes_nothing(
    tiny_run, tmp_path, capsys
):
    from rl_circuits import load_run

    run, config = _copy(tiny_run, tmp_path)
    results = {k: v for k, v in _bytes(run, ".").items() if k not in ("config.json", ".lock")}
    results.pop("manifest.json")
    assert main(["run", str(config)]) == 0  # run_dir and data_dir changed, the data did not
    out = capsys.readouterr().out  # every stage current: nothing recomputed
    assert out.splitlines()[: len(STAGE_NAMES)] == [f"{s}: done" for s in STAGE_NAMES]
    assert {k: (run / k).read_bytes() for k in results} == results
    assert json.loads((run / "config.json").read_text())["run"]["run_dir"] == str(run)
    event = json.loads((run / "manifest.json").read_text())["history"][-1]
    assert event["event"] == "config_changed"
    assert {line.split(":")[0] for line in event["changes"]} == {"run.run_dir", "run.data_dir"}
    # moved again by hand: the loaded config names the directory it was read from
    shutil.move(run, tmp_path / "elsewhere")
    loaded = load_run(tmp_path / "elsewhere")
    assert loaded.config.run.run_dir == str((tmp_path / "elsewhere").resolve())


def _bytes(run: Path, under: str) -> dict[str, bytes]:
    return {
        p.relative_to(run).as_posix(): p.read_bytes()
        for p in (run / under).rglob("*")
        if p.is_file()
    }


def _rewrite(config: Path, overrides: dict) -> None:
    """Change keys of the config file `config` in place."""
    write_config(config, overrides, base=config)


def test_registry_declares_every_stage_once():
    assert STAGE_NAMES == (
        "datasets",
        "generate",
        "grade",
        "select",
        "attribute",
        "circuits",
        "diff",
        "analyze",
        "weights",
        "report",
    )
    for spec in STAGES.values():
        assert all(req in STAGE_NAMES[: STAGE_NAMES.index(spec.name)] for req in spec.requires)
        assert (spec.load().merge is not None) == spec.sharded  # a sharded stage merges
    assert "select.alphas" in STAGES["attribute"].per_cell
    assert SHARDED_STAGES == ("generate", "attribute")


def test_added_alpha_computes_only_its_cells(tiny_run, tmp_path, capsys):
    run, config = _moved(tiny_run, tmp_path, capsys)
    kept = {**_bytes(run, "generate"), **_bytes(run, "grade"), **_bytes(run, "attribute")}
    markers = {s: (run / "stages" / f"{s}.json").read_bytes() for s in ("generate", "grade")}
    _rewrite(config, {"select": {"alphas": [0.3, 0.5, 1.0]}})

    assert main(["run", str(config)]) == 2  # refused without --force, naming the stages
    err = capsys.readouterr().err
    assert "select.alphas" in err and "attribute: compute new 2 cells" in err
    assert "select: recompute 1 cell" in err and "generate" not in err
    assert not (run / "attribute/tiny/before/sevens/alpha-0.5").exists()

    assert main(["run", str(config), "--force"]) == 0
    out = capsys.readouterr().out
    assert "generate: done" in out
    for rel, data in kept.items():  # nothing of the old cells was recomputed
        assert (run / rel).read_bytes() == data, rel
    for stage, data in markers.items():
        assert (run / "stages" / f"{stage}.json").read_bytes() == data
    selection = json.loads((run / "select/tiny/sevens.json").read_text())
    assert "0.5" in selection["t_cut"]
    rows = [
        json.loads(line)
        for line in (run / "analysis/compare.jsonl").read_text().split("\n")
        if line
    ]
    assert sorted({r["alpha"] for r in rows}) == [0.3, 0.5, 1.0]
    for role in ("before", "after"):
        assert (run / f"attribute/tiny/{role}/sevens/alpha-0.5/skipped.json").is_file()
    marker = json.loads((run / "stages" / "attribute.json").read_text())
    assert len(marker["fingerprint"]) == 16
    # the same command again: everything is current
    assert main(["run", str(config)]) == 0
    assert "recomput" not in capsys.readouterr().out


def test_enabled_diff_computes_only_its_cells_and_a_diff_key_recomputes_them(
    tiny_run, tmp_path, capsys
):
    run, config = _moved(tiny_run, tmp_path, capsys)
    kept = {**_bytes(run, "generate"), **_bytes(run, "attribute")}
    _rewrite(config, {"diff": {"enabled": True, "points": 4, "alphas": [1.0]}})
    assert main(["run", str(config)]) == 2  # refused without --force, naming the cells
    err = capsys.readouterr().err
    assert "diff: compute new 2 cells" in err and "attribute: " not in err
    assert main(["run", str(config), "--force"]) == 0
    capsys.readouterr()
    for rel, data in kept.items():
        assert (run / rel).read_bytes() == data, rel
    curve = "diff/tiny/after_into_before/sevens/alpha-1/curve.json"
    assert len(json.loads((run / curve).read_text())["ks"]) <= 4
    _rewrite(config, {"diff": {"points": 3}})
    assert main(["run", str(config), "--force"]) == 0
    assert "diff: recompute 2 cells" in capsys.readouterr().out
    assert len(json.loads((run / curve).read_text())["ks"]) <= 3
    for rel, data in kept.items():
        assert (run / rel).read_bytes() == data, rel


def test_single_stage_after_added_alpha_recomputes_select_first(tiny_run, tmp_path, capsys):
    run, config = _moved(tiny_run, tmp_path, capsys)
    _rewrite(config, {"select": {"alphas": [0.3, 0.5, 1.0]}})
    assert main(["attribute", str(config), "--force"]) == 0
    out = capsys.readouterr().out
    assert "select: recomputing (invalidated by the config change)" in out
    assert (run / "attribute/tiny/after/sevens/alpha-0.5/skipped.json").is_file()
    # analyze was invalidated: analyze alone runs, report is then missing for `run` to redo
    assert not (run / "stages/analyze.json").exists() and not (run / "analysis").exists()
    assert main(["report", str(config)]) == 2
    err = capsys.readouterr().err
    assert "needs the analyze stage" in err and f"rl-circuits analyze {config}" in err


def test_changed_graph_recomputes_attribute_and_after(tiny_run, tmp_path, capsys):
    run, config = _moved(tiny_run, tmp_path, capsys)
    kept = {**_bytes(run, "generate"), **_bytes(run, "select")}
    _rewrite(config, {"attribute": {"graph": "block"}})
    assert main(["run", str(config), "--force"]) == 0
    out = capsys.readouterr().out
    assert "attribute: recompute 4 cells" in out and "select: recompute" not in out
    for rel, data in kept.items():
        assert (run / rel).read_bytes() == data, rel
    from rl_circuits import load_run
    from rl_circuits.engine.graph import build_graph

    loaded = load_run(run)
    block = build_graph("block", 2, 2)
    for alpha in (0.3, 1.0):
        scores = loaded.scores("tiny", "before", "sevens", alpha)
        assert scores.graph == "block"
        assert scores.downstream == tuple(block.downstream)
    assert "graph block" in (run / "report/report.html").read_text()


def test_changed_data_file_is_a_change(tiny_run, tmp_path, capsys):
    run, config = _moved(tiny_run, tmp_path, capsys)
    data = tmp_path / "data" / "sevens" / "test.jsonl"
    line = json.dumps({"question": "What is 1+6", "answer": "#### 7"})
    data.write_text(data.read_text() + line + "\n")
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "data file of dataset 'sevens'" in err and "datasets: recompute 1 cell" in err
    assert main(["run", str(config), "--force"]) == 0
    records = (run / "datasets/sevens.jsonl").read_text().splitlines()
    assert any("1+6" in r for r in records)
    gens = (run / "stages").rglob("*.json")
    assert gens
    from rl_circuits import load_run

    loaded = load_run(run)
    ids = {g["id"] for g in loaded.generations("tiny", "before", "sevens")}
    assert len(ids) == len(records)
    manifest = json.loads((run / "manifest.json").read_text())
    from rl_circuits.data.datasets import dataset_hash

    assert manifest["dataset_hashes"]["sevens"] == dataset_hash(data)


def test_new_key_at_its_default_is_no_change(tiny_run, tmp_path, capsys):
    """An old run's config.json lacks keys a newer version added: no change, nothing reruns."""
    run, config = _moved(tiny_run, tmp_path, capsys)
    stored = json.loads((run / "config.json").read_text())
    del stored["circuits"]
    del stored["generate"]["end_token"]
    (run / "config.json").write_text(json.dumps(stored))
    before = _bytes(run, "stages")
    assert main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    assert "recomput" not in out and out.count(": done") == len(STAGE_NAMES)
    assert _bytes(run, "stages") == before


def test_explicit_run_table_is_honoured(tiny_run, tmp_path, capsys):
    from rl_circuits.config import load_config
    from rl_circuits.errors import ConfigError

    path = tmp_path / "r.toml"
    path.write_text(
        'pairs = ["qwen2.5"]\n[run]\nrun_dir = "elsewhere"\nlimit = 3\ndatasets = ["x"]\n'
    )
    cfg = load_config(path)
    assert cfg.run.run_dir == "elsewhere" and cfg.run.limit == 3
    path.write_text('limit = 2\npairs = ["qwen2.5"]\n[run]\nlimit = 3\ndatasets = ["x"]\n')
    with pytest.raises(ConfigError, match="limit is set both at the top level and in"):
        load_config(path)


def test_cell_that_ends_empty_is_reported(tiny_run, tmp_path, capsys):
    """A configured cell whose questions were all skipped: named in Table 1, the report, and
    the command's last message."""
    run, config = _moved(tiny_run, tmp_path, capsys)
    ids = json.loads((run / "select/tiny/sevens.json").read_text())["ids"]
    for role in ("before", "after"):
        cell = run / f"attribute/tiny/{role}/sevens/alpha-1"
        shutil.rmtree(cell)
        cell.mkdir()
        (cell / "skipped.json").write_text(json.dumps({q: "too short" for q in ids}))
    assert main(["analyze", str(config)]) == 0
    err = capsys.readouterr().err
    why = f"tiny, sevens, alpha=1: no question left: all {len(ids)} selected were skipped"
    assert err.startswith("warning: Cells without results") and why in err
    from rl_circuits import load_run

    loaded = load_run(run)
    assert why in loaded.table1().note and why in loaded.table1().to_markdown()
    assert loaded.skipped_cells()["tiny|sevens|1"].endswith("skipped (e.g. too short)")
    assert main(["report", str(config)]) == 0
    html = (run / "report/report.html").read_text()
    assert why in html and "Relative change: tiny, sevens, alpha=0.3" in html


def test_run_made_with_relative_paths_loads_from_elsewhere(tiny_run, tmp_path, monkeypatch, capsys):
    """config.json keeps the paths as written (they key the run's folders); the manifest records
    where the run was made, and `Run.model_path` resolves them from any directory."""
    base, config = tiny_run
    work = tmp_path / "work"
    shutil.copytree(base / "models", work / "models")
    overrides, pairs = tiny_models_overrides(Path("models"))
    overrides = merge(overrides, {"run": {"run_dir": "runs/rel"}})
    write_config(work / "rel.toml", overrides, base=config, pairs=pairs)
    monkeypatch.chdir(work)
    assert main(["run", "rel.toml"]) == 0
    assert json.loads((work / "runs/rel/config.json").read_text())["pairs"]["tiny"]["after"] == (
        "models/after"
    )
    monkeypatch.chdir(tmp_path)
    from rl_circuits import load_model, load_run

    run = load_run(work / "runs/rel")
    assert run.workdir == work
    assert run.model_path("tiny", "after") == str(work / "models/after")
    assert run.resolve_path("Qwen/Qwen2.5-Math-7B") == "Qwen/Qwen2.5-Math-7B"  # a hub id
    model = load_model(run.model_path("tiny", "after"), device="cpu")
    assert model.cfg.n_layers == 2
