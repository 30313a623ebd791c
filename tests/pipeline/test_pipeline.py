"""The whole pipeline on tiny checkpoints on CPU: every stage, idempotence, resume after kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from config_support import merge, tiny_models_overrides, write_config

from rl_circuits.cli.main import main
from rl_circuits.errors import ConfigError
from rl_circuits.pipeline.registry import STAGE_NAMES

ROOT = Path(__file__).resolve().parents[2]


def _files(run_dir: Path) -> dict[str, float]:
    return {
        str(p.relative_to(run_dir)): p.stat().st_mtime_ns
        for p in run_dir.rglob("*")
        if p.is_file() and p.name != ".lock"
    }


def test_every_stage_writes_its_outputs(tiny_run):
    base, _ = tiny_run
    run = base / "run"
    for rel in (
        "config.json",
        "manifest.json",
        "datasets/sevens.jsonl",
        "select/tiny/sevens.json",
        "analysis/compare.jsonl",
        "analysis/table1.md",
        "report/report.html",
    ):
        assert (run / rel).is_file(), rel
    selection = json.loads((run / "select/tiny/sevens.json").read_text())
    from rl_circuits import load_run

    loaded = load_run(run)
    correct = [
        {g["id"] for g in loaded.grades("tiny", role, "sevens") if g["verdict"] == "correct"}
        for role in ("before", "after")
    ]
    both = correct[0] & correct[1]
    # Both models are trained to answer 7: most of the five questions whose answer is 7.
    assert len(both) >= 2 and set(selection["ids"]) <= both
    assert len(selection["ids"]) == min(4, len(both))  # n = 4
    scores = loaded.scores("tiny", "after", "sevens", 1.0)
    skipped = json.loads((run / "attribute/tiny/after/sevens/alpha-1/skipped.json").read_text())
    n_scored = len(selection["ids"]) - len(skipped)
    assert scores.values.shape[0] == n_scored and scores.values.shape[1:] == (5, 9)
    assert scores.upstream[0] == "hook_embed"
    assert scores.downstream[-1] == "blocks.1.hook_resid_post"
    assert "Act. Intens." in loaded.table1().to_markdown()


def test_second_run_does_nothing(tiny_run, capsys):
    base, config = tiny_run
    before = _files(base / "run")
    assert main(["run", str(config)]) == 0
    assert _files(base / "run") == before
    out = capsys.readouterr().out
    assert out.count(": done") == len(STAGE_NAMES)


def test_changed_config_is_refused(tiny_run, tmp_path, capsys):
    base, config = tiny_run
    changed = write_config(tmp_path / "changed.toml", {"select": {"beta": 0.2}}, base=config)
    assert main(["run", str(changed), "--run-dir", str(base / "run")]) == 2
    assert "select.beta" in capsys.readouterr().err


def test_killed_attribution_resumes_to_identical_scores(tiny_run, tmp_path):
    base, config = tiny_run
    run_dir = tmp_path / "run"
    for stage in ("datasets", "generate", "grade", "select"):
        assert main([stage, str(config), "--run-dir", str(run_dir)]) == 0
    slow = (
        "import time, sys; from rl_circuits.store.run import RunStore; f = RunStore.write_scores\n"
        "def slow(*a, **k):\n    time.sleep(0.4); return f(*a, **k)\n"
        "RunStore.write_scores = slow\n"
        "from rl_circuits.cli.main import main; sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", slow, "attribute", str(config), "--run-dir", str(run_dir)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.time() + 120
    first = None
    while time.time() < deadline and first is None:
        first = next(run_dir.glob("attribute/**/q/*.safetensors"), None)
        time.sleep(0.05)
    assert first is not None, "no per-question score file appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(run_dir.glob("attribute/**/scores.safetensors"))  # killed part way
    assert main(["attribute", str(config), "--run-dir", str(run_dir)]) == 0
    reference = base / "run" / "attribute"
    merged = sorted(reference.glob("**/scores.safetensors"))
    assert len(merged) == 4  # 2 models x 2 alphas
    for path in merged:
        resumed = run_dir / "attribute" / path.relative_to(reference)
        assert resumed.read_bytes() == path.read_bytes()


def test_config_errors_name_the_key(tmp_path):
    from rl_circuits.config import load_config

    cases = {
        "[select]\nalphas = [0.0]": "alphas",
        "[select]\nbeta = 2.0\ngamma = 1.0": "beta",
        "[select]\ndelta = 1.5": "select.delta",
        "[select]\nn = 0": "select.n",
        "[select]\ncolour = 1": "colour",
        "[attribute]\nbatch_size = 'two'": "attribute.batch_size",
    }
    for body, key in cases.items():
        path = tmp_path / "c.toml"
        path.write_text('pairs = ["mistral"]\ndatasets = ["gsm8k"]\n' + body)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(path)
    path.write_text('pairs = ["no-such-pair"]\ndatasets = ["gsm8k"]\n')
    with pytest.raises(ConfigError, match="no-such-pair"):
        load_config(path)


def test_ids_option_keeps_only_those_questions(tiny_run, tmp_path):
    base, config = tiny_run
    ids = {"run": {"ids": ["sevens-1", "sevens-4"]}}
    path = write_config(tmp_path / "ids.toml", ids, base=config)
    assert main(["datasets", str(path), "--run-dir", str(tmp_path / "run")]) == 0
    kept = [json.loads(line)["id"] for line in (tmp_path / "run/datasets/sevens.jsonl").open()]
    assert kept == ["sevens-1", "sevens-4"]


def test_select_n_above_the_questions_left_says_so_on_terminal_and_in_funnel(
    tiny_run, tmp_path, capsys
):
    from rl_circuits import load_run

    base, config = tiny_run
    path = write_config(tmp_path / "n50.toml", {"select": {"n": 50}}, base=config)
    run = tmp_path / "run"
    for stage in ("datasets", "generate", "grade", "select"):
        assert main([stage, str(path), "--run-dir", str(run)]) == 0
    kept = json.loads((run / "select/tiny/sevens.json").read_text())["report"]["kept"]
    assert kept < 50
    assert (
        f"warning: pair tiny, dataset sevens: select.n = 50 questions requested, but only {kept} "
        "passed the filters (of 6)"
    ) in capsys.readouterr().err
    row = load_run(run).funnel().iloc[0]
    assert (row["requested"], row["kept"]) == (50, kept)


def test_run_writes_the_tiny_models_it_names_when_absent(tmp_path, capsys):
    overrides, pairs = tiny_models_overrides(tmp_path / "models")
    overrides = merge(overrides, {"run": {"run_dir": str(tmp_path / "run")}})
    config = write_config(tmp_path / "tiny.toml", overrides, pairs=pairs)
    assert main(["datasets", str(config)]) == 0
    for rel in ("before/model.safetensors", "after/config.json", "data/sevens/test.jsonl"):
        assert (tmp_path / "models" / rel).is_file(), rel
    assert "tiny_models:" in capsys.readouterr().out
    rows = (tmp_path / "run" / "datasets" / "sevens.jsonl").read_text().splitlines()
    assert len(rows) == 6


def test_tiny_models_refuses_a_file_path(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["tiny-models", str(target)]) == 2
    assert "is a file; name a directory" in capsys.readouterr().err


def test_report_shows_funnel_statistics_and_word_titles(tiny_run):
    """The tiny run's report: the selection funnel from select/*.json, Table 1's n, intervals
    and p-values as text, section titles in words, and a size far below plotly.js's 4.8 MB."""
    import re

    from plotly.offline import get_plotlyjs

    from rl_circuits import load_run

    base, _ = tiny_run
    run = base / "run"
    html = (run / "report/report.html").read_text(encoding="utf-8")
    size = len(html.encode())
    print(f"tiny report: {size / 1e6:.2f} MB (plotly.js alone: {len(get_plotlyjs()) / 1e6:.2f} MB)")
    assert size < 0.5 * len(get_plotlyjs())
    report = json.loads((run / "select/tiny/sevens.json").read_text())["report"]
    funnel = load_run(run).funnel()
    row = funnel.iloc[0]
    assert (row["pair"], row["dataset"]) == ("tiny", "sevens")
    assert row["questions"] == report["entering"] and row["kept"] == report["kept"]
    for step in report["filters"]:
        assert row[f"− {step['filter'].replace('_', ' ')}"] == step["removed"]
    assert "Question selection: how many questions each filter removed" in html
    assert "Table 1 in full: sample size, intervals and p-values" in html
    compare = [
        json.loads(line)
        for line in (run / "analysis/compare.jsonl").read_text().split("\n")
        if line
    ]
    assert f"<td>{compare[0]['p_value']:.3g}</td>" in html
    titles = re.findall(r"<h2>([^<]*)</h2>", html)
    assert "Activation intensity against alpha" in titles
    assert not [t for t in titles if re.search(r"\w_\w", t)]  # no code names as titles
